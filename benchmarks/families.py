"""The kernel families the suite knows, in the order the GPU check runs them: name -> module.

Each module has `main(argv) -> int` (the command line: --device, --smoke, --quick, --time-budget, --out)
and a pytest wrapper benchmarks/test_bench_<name>.py. Add a family here and in scripts/sanitize_ops.py.
"""

FAMILIES = {
    "gumbel": "benchmarks.gumbel",
    "attention": "benchmarks.attention",
    "dvae": "benchmarks.dvae",
}
FAMILIES["matmul"] = "benchmarks.matmul"
FAMILIES["generate"] = "benchmarks.generate"
FAMILIES["decode"] = "benchmarks.decode"
FAMILIES["sample"] = "benchmarks.sample"
FAMILIES["dalle"] = "benchmarks.dalle"
FAMILIES["loss"] = "benchmarks.loss"
