#!/usr/bin/env python3
"""Compile every Triton kernel of dalle_fast ahead of time for sm_90 (no GPU needed) and fail on register spills.

For each kernel in kernels/ and each configuration the launchers actually use (the launch table of
dalle_fast/ops/_triton_gumbel.py applied to a sweep of shapes; dtypes fp32/fp16/bf16; every constexpr
combination), this runs triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)), then the
cuobjdump shipped with triton (triton/backends/nvidia/bin) with -res-usage on the cubin, and prints a table
of kernel, config, registers, spill (local memory / stack) bytes and shared memory. Exit status 1 on any
spill or compile failure.

The scaled matmul kernels (kernels/matmul.py) are covered by _matmul_jobs: every entry of the launcher's
config table for sm_90 and the default, the sm_90 autotune candidates, each operand dtype and epilogue switch.

Usage: python scripts/triton_aot_check.py [--jobs N] [--quick] [--filter SUBSTR]
Must run WITHOUT TRITON_INTERPRET (the interpreter does not compile).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_aot_check: TRITON_INTERPRET is set; unset it (the interpreter compiles nothing)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (outer, K, inner) views the table is asked about: the benchmark shapes, the test shapes, and a sweep
# of K so that every block size of the table appears.
_SHAPES = (
    # benchmark and test shapes
    [(8192, 8192, 1), (8, 8192, 1024), (2, 1000, 15), (2, 8192, 16), (6, 1, 2), (4, 3, 1), (1, 20000, 1)]
    # every row-layout tile width (one pass up to the largest one-pass K, then the two-pass chunk)
    + [(8192, 2**e, 1) for e in (0, 2, 6, 9, 11, 12, 13, 14, 15)]
    + [(1, 2**e, 1) for e in (13, 14)]
    # column layout: one pass and two passes, wide and narrow inner tiles
    + [(outer, 2**e, inner) for e in (3, 7, 13) for outer, inner in ((8, 1024), (2, 3), (64, 64))]
)
_QUICK_SHAPES = [(8192, 8192, 1), (8, 8192, 1024), (2, 1000, 15), (4, 3, 1), (1, 20000, 1)]

_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _load_modules():
    import importlib.util

    import triton  # noqa: F401

    # dalle_fast.kernels is installed from kernels/ (package_dir); load the source file directly so the
    # check also runs from a bare checkout.
    spec = importlib.util.spec_from_file_location(
        "dalle_fast_kernels_gumbel", os.path.join(ROOT, "kernels", "gumbel.py")
    )
    kern = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kern)
    spec = importlib.util.spec_from_file_location(
        "dalle_fast_triton_gumbel_launch", os.path.join(ROOT, "dalle_fast", "ops", "_triton_gumbel.py")
    )
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return kern, launch


def _jobs(quick: bool) -> list[tuple[str, dict, dict, int, str]]:
    """(kernel, signature, constexprs, num_warps, label) of every configuration the launchers use."""
    _, launch = _load_modules()
    shapes = _QUICK_SHAPES if quick else _SHAPES
    jobs = []
    seen = set()

    def add(kernel, sig, consts, num_warps, label):
        key = (kernel, tuple(sorted(sig.items())), tuple(sorted(consts.items())), num_warps)
        if key not in seen:
            seen.add(key)
            jobs.append((kernel, sig, consts, num_warps, label))

    dtypes = ["fp32"] if quick else list(_DTYPES)
    # Noise: one config per alignment and output dtype.
    for dt in dtypes:
        for aligned in (True, False):
            bm, bn, _, nw, _ = launch._noise_config(1 << 20, 0 if aligned else 1)
            sig = {"out_ptr": _DTYPES[dt], "numel": "i64", "seed": "i64", "offset": "i64",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "ALIGNED": "constexpr"}  # fmt: skip
            consts = {"BLOCK_M": bm, "BLOCK_N": bn, "ALIGNED": aligned}
            add("_gumbel_noise_kernel", sig, consts, nw, f"{dt} aligned={int(aligned)} {bm}x{bn}")

    for outer, K, inner in shapes:
        for kernel, one_pass_max, hards in (
            ("_gumbel_softmax_fwd_kernel", launch.ONE_PASS_MAX_FWD, (False,)),
            ("_gumbel_softmax_fwd_kernel", launch.ONE_PASS_MAX_HARD, (True,)),
            ("_gumbel_softmax_bwd_kernel", launch.ONE_PASS_MAX_BWD, (None,)),
            ("_gumbel_argmax_kernel", launch.ONE_PASS_MAX_ARGMAX, (None,)),
        ):
            for offset in (0, 1):
                cfg = launch._reduction_config(outer, K, inner, offset, one_pass_max)
                for dt in dtypes:
                    # The common contiguous case: the unit stride is specialised to the constexpr 1, as the JIT does.
                    unit = "stride_xi" if cfg.col else "stride_xk"
                    if kernel == "_gumbel_softmax_fwd_kernel":
                        ptrs = {"x_ptr": _DTYPES[dt], "y_ptr": _DTYPES[dt]}
                        strides = ["stride_xo", "stride_xk", "stride_xi"]
                        scalars = {"seed": "i64", "offset": "i64", "inv_tau": "fp32"}
                    elif kernel == "_gumbel_softmax_bwd_kernel":
                        ptrs = {"dy_ptr": _DTYPES[dt], "x_ptr": _DTYPES[dt], "dx_ptr": _DTYPES[dt]}
                        strides = ["stride_dyo", "stride_dyk", "stride_dyi", "stride_xo", "stride_xk", "stride_xi"]
                        scalars = {"seed": "i64", "offset": "i64", "inv_tau": "fp32"}
                    else:
                        ptrs = {"x_ptr": _DTYPES[dt], "out_ptr": "*i64"}
                        strides = ["stride_xo", "stride_xk", "stride_xi"]
                        scalars = {"seed": "i64", "offset": "i64"}
                    unit_names = {unit, unit.replace("stride_x", "stride_dy")}
                    for hard in hards:
                        sig = dict(ptrs)
                        consts = {}
                        for s in strides:
                            if s in unit_names:
                                sig[s] = "constexpr"
                                consts[s] = 1
                            else:
                                sig[s] = "i32"
                        sig.update({"outer": "i32", "K": "i32", "inner": "i32"})
                        sig.update(scalars)
                        c = {"COL": cfg.col, "ONE_PASS": cfg.one_pass, "ALIGNED": cfg.aligned,
                             "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}  # fmt: skip
                        if hard is not None:
                            c = {"HARD": hard, **c}
                        for name in c:
                            sig[name] = "constexpr"
                        consts.update(c)
                        label = (
                            f"{dt} {'col' if cfg.col else 'row'} {'1pass' if cfg.one_pass else '2pass'} "
                            f"aligned={int(cfg.aligned)} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps}"
                            + ("" if hard is None else f" hard={int(hard)}")
                        )
                        add(kernel, sig, consts, cfg.num_warps, label)
    return jobs


# ---------------------------------------------------------------------------------------- scaled matmul


def _load_matmul_modules():
    import importlib.util

    import triton  # noqa: F401

    spec = importlib.util.spec_from_file_location(
        "dalle_fast_kernels_matmul", os.path.join(ROOT, "kernels", "matmul.py")
    )
    kern = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kern)
    spec = importlib.util.spec_from_file_location(
        "dalle_fast_triton_matmul_launch", os.path.join(ROOT, "dalle_fast", "ops", "_triton_matmul.py")
    )
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return kern, launch


def _matmul_jobs(quick: bool) -> list[tuple]:
    """Every launcher configuration of the scaled matmul kernels: the sm_90 table entries, the default entries
    and the sm_90 autotune candidates, for each operand dtype, with the epilogue's constexpr switches (quick:
    only the fullest epilogue: bias, scale, filter)."""
    _, launch = _load_matmul_modules()
    jobs, seen = [], set()
    configs = {"low": set(), "fp32": set()}
    for table in (launch.CONFIGS[9], launch.DEFAULT_CONFIG):
        for cls, cfg in table.items():
            configs[cls].add(cfg)
    if not quick:
        for cls, cands in launch.CANDIDATES.get(9, {}).items():
            configs[cls].update(cands)
    # (a dtype, b/out dtype) per operand class; the mixed case reads an fp32 a (PRESCALE_A)
    operands = {"low": [("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp16")], "fp32": [("fp32", "fp32")]}
    if quick:
        operands["low"] = [("fp16", "fp16")]
    switches = [(True, True, True)] if quick else [(hb, True, f) for hb in (True, False) for f in (True, False)]
    for cls, cfgs in configs.items():
        for cfg in sorted(cfgs):
            for a_dt, b_dt in operands[cls]:
                for has_bias, has_scale, filt in switches:
                    sig = {"a_ptr": _DTYPES[a_dt], "b_ptr": _DTYPES[b_dt], "bias_ptr": "*fp32", "scale_ptr": "*fp32",
                           "out_ptr": _DTYPES[b_dt], "flag_ptr": "*i32",
                           "stride_am": "i32", "stride_ak": "constexpr", "stride_bk": "i32", "stride_bn": "constexpr",
                           "stride_om": "i32", "stride_on": "constexpr", "M": "i32", "N": "i32", "K": "i32",
                           "alpha": "fp32"}  # fmt: skip
                    consts = {"stride_ak": 1, "stride_bn": 1, "stride_on": 1,
                              "HAS_BIAS": has_bias, "HAS_SCALE": has_scale, "FILTER": filt,
                              "PRESCALE_A": a_dt != b_dt, "IEEE": b_dt == "fp32", "DOT_F32": False, "INT64": False,
                              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                              "GROUP_M": cfg.group_m}  # fmt: skip
                    for name in consts:
                        sig[name] = "constexpr"
                    label = (
                        f"{a_dt}x{b_dt} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
                        f" bias={int(has_bias)} filter={int(filt)}"
                    )
                    key = (label,)
                    if key not in seen:
                        seen.add(key)
                        aligned = ("a_ptr", "b_ptr", "bias_ptr", "out_ptr", "stride_am", "stride_bk", "stride_om",
                                   "M", "N", "K")  # fmt: skip
                        jobs.append(("_scaled_matmul_fwd_kernel", sig, consts, cfg.num_warps, label,
                                     {"num_stages": cfg.num_stages, "divisible_by_16": aligned}))  # fmt: skip
    x_out = [("fp16", "fp32"), ("fp32", "fp16")] if quick else [(x, o) for x in _DTYPES for o in _DTYPES]
    for x_dt, o_dt in x_out:
        for invert in (True, False):
            for filt in (True, False):
                sig = {"x_ptr": _DTYPES[x_dt], "scale_ptr": "*fp32", "out_ptr": _DTYPES[o_dt], "flag_ptr": "*i32",
                       "n": "i32", "alpha": "fp32"}  # fmt: skip
                consts = {"HAS_SCALE": True, "INVERT": invert, "FILTER": filt, "BLOCK": launch.SCALE_FILTER_BLOCK}
                for name in consts:
                    sig[name] = "constexpr"
                label = f"{x_dt}->{o_dt} invert={int(invert)} filter={int(filt)} {launch.SCALE_FILTER_BLOCK}"
                jobs.append(("_scale_filter_kernel", sig, consts, launch.SCALE_FILTER_WARPS, label))
    return jobs


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(path):
        return path
    found = shutil.which("cuobjdump")
    if found:
        return found
    raise FileNotFoundError(f"cuobjdump: not found at {path} nor on PATH")


def _kernel_module(kernel: str):
    """The kernels/ module that defines `kernel` (gumbel unless a family below claims it)."""
    if kernel.startswith(("_scaled_matmul", "_scale_filter")):
        return _load_matmul_modules()[0]
    return _load_modules()[0]


def _compile_one(job):
    kernel, sig, consts, num_warps, label, *extra = job  # extra: optional compile options (num_stages)
    import triton
    from triton.backends.compiler import GPUTarget

    kern = _kernel_module(kernel)
    fn = getattr(kern, kernel)
    opts = dict(extra[0]) if extra else {}
    # Arguments the JIT would specialise as divisible by 16 (aligned pointers, strides and sizes that are
    # multiples of 16, as on the benchmark shapes): without them loads cannot be vectorised or pipelined.
    aligned = opts.pop("divisible_by_16", ())
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    target = GPUTarget("cuda", 90, 32)
    errors = []
    compiled = None
    # ASTSource's signature format changed across triton versions: try the current forms in turn.
    attempts = [
        lambda: triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        lambda: triton.compiler.ASTSource(
            fn=fn, signature={k: v for k, v in sig.items() if v != "constexpr"}, constexprs=consts
        ),
        lambda: triton.compiler.ASTSource(
            fn=fn,
            signature={fn.arg_names.index(k): v for k, v in sig.items() if v != "constexpr"},
            constants={fn.arg_names.index(k): v for k, v in consts.items()},
        ),
    ]
    for make in attempts:
        try:
            src = make()
            compiled = triton.compile(
                src, target=target, options={"num_warps": num_warps, **(extra[0] if extra else {})}
            )
            break
        except Exception as e:  # noqa: BLE001 - report every form's failure if none works
            errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    if compiled is None:
        return kernel, label, None, "compile failed: " + " | ".join(errors)
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    res = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        res[key] = int(m.group(1)) if m else None
    if res["REG"] is None:
        return kernel, label, None, "could not parse cuobjdump output: " + out.strip()[-300:]
    # Triton's own shared-memory figure includes the dynamic part cuobjdump does not see.
    meta_shared = getattr(compiled.metadata, "shared", None)
    res["SHARED"] = max(res["SHARED"] or 0, meta_shared or 0)
    return kernel, label, res, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="benchmark and test shapes only, fp32 only")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = ap.parse_args()
    import triton

    jobs = [j for j in _jobs(args.quick) + _matmul_jobs(args.quick) if args.filter in j[0]]
    print(f"triton {triton.__version__}: compiling {len(jobs)} kernel configurations for sm_90 ({args.jobs} jobs)")
    print(f"cuobjdump: {_cuobjdump()}")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        results = list(ex.map(_compile_one, jobs))
    bad = 0
    w = max(len(r[1]) for r in results)
    print(f"{'kernel':28s} {'config':{w}s} {'regs':>5s} {'spill':>6s} {'stack':>6s} {'smem':>7s}")
    for kernel, label, res, err in results:
        if err:
            bad += 1
            print(f"{kernel:28s} {label:{w}s} ERROR {err}")
            continue
        spill = res["LOCAL"] or 0
        stack = res["STACK"] or 0
        flag = ""
        if spill or stack:
            bad += 1
            flag = "  <-- SPILL"
        print(f"{kernel:28s} {label:{w}s} {res['REG']:5d} {spill:6d} {stack:6d} {res['SHARED']:7d}{flag}")
    print(f"{len(results) - bad} ok, {bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
