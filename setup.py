"""Build of dalle_fast and its extension dalle_fast._C.

csrc/ops.cpp (every schema) and csrc/cpu/*.cpp are always compiled; csrc/cuda/*.cu whenever a CUDA toolkit
and a CUDA build of torch are present. No GPU is needed to compile. Install against the torch already
installed:

    pip install --no-build-isolation -e .

Environment switches:
    DALLE_FAST_CUDA=0|1|auto   force the CUDA sources off, on (fail if impossible), or decide (default auto)
    TORCH_CUDA_ARCH_LIST       GPU archs; default: the visible GPUs', or "9.0" when none is visible
    DALLE_FAST_DEBUG=1         -O0 -g and the kernels' debug assertions (DALLE_FAST_DEBUG)
    MAX_JOBS                   parallel compile jobs (ninja); default from cores and memory
    CUDA_HOME                  the toolkit; default: found from nvcc, resolving wrapper scripts
"""

import glob
import os
import re
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The toolkit root. torch guesses it from `which nvcc`, which is wrong for a wrapper script."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        try:  # a shell wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, errors="ignore") as f:
                head = f.read(4096)
            candidates += [os.path.dirname(os.path.dirname(p)) for p in re.findall(r"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(os.path.join(c, "include", "cuda.h")):
            return c
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    switch = os.environ.get("DALLE_FAST_CUDA", "auto").lower()
    if switch not in ("0", "1", "auto"):
        raise SystemExit(f"DALLE_FAST_CUDA: expected 0, 1 or auto, got {switch!r}")
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if _cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if switch == "1" and reasons:
        raise SystemExit("DALLE_FAST_CUDA=1 but the CUDA sources cannot be built: " + "; ".join(reasons))
    if switch == "0":
        return False, ["DALLE_FAST_CUDA=0"]
    return not reasons, reasons


def _default_jobs():
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gb // 4))))  # nvcc on torch headers: ~3-4 GB a job


def extensions():
    with_cuda, why_not = _want_cuda()
    debug = os.environ.get("DALLE_FAST_DEBUG", "0") == "1"
    opt = ["-O0", "-g", "-DDALLE_FAST_DEBUG"] if debug else ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -Wno-psabi: the CPU sources' eight-float vectors (csrc/cpu/common.h) draw an ABI note on every function
    # taking one, though all of them are always inlined into the per-ISA clones and no such call exists
    cxx = opt + ["-fopenmp", "-fvisibility=hidden", "-Wno-psabi", "-DDALLE_FAST_TORCH_EXTENSION"]
    if not with_cuda:
        print("dalle_fast: building without the CUDA sources: " + "; ".join(why_not))
        return [
            CppExtension(
                "dalle_fast._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
                py_limited_api=False,
            )
        ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if not visible:  # torch fails to pick archs without a GPU
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    print(f"dalle_fast: building the CUDA sources for {os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')}")
    nvcc = opt + ["-lineinfo", "-DDALLE_FAST_TORCH_EXTENSION", "--expt-relaxed-constexpr"]
    return [
        CUDAExtension(
            "dalle_fast._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs,
            define_macros=[("DALLE_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]


_default_jobs()
setup(
    name="dalle_fast",
    version="0.1.0",
    description="DALL-E v1 (dVAE + sparse transformer) on fused Triton, CUDA C++ and C++ CPU kernels",
    packages=["dalle_fast", "dalle_fast.reference", "dalle_fast.ops", "dalle_fast.kernels", "dalle_fast.nn"],
    package_dir={"dalle_fast": "dalle_fast", "dalle_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "ninja"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scipy", "ruff"], "bench": ["pytest-benchmark"]},
    entry_points={"console_scripts": ["dalle-fast = dalle_fast.cli:main"]},
)
