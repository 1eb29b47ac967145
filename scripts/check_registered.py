"""Fails unless dalle_fast._C loaded and registered every op's CPU kernel (and CUDA kernel when
DALLE_FAST_EXPECT_CUDA=1, as CI sets after compiling the CUDA sources)."""

import os
import sys

import torch

import dalle_fast
from dalle_fast.ops import attention, gumbel, matmul

OPS = gumbel.OPS + attention.OPS + matmul.OPS

from dalle_fast.ops import dvae  # noqa: E402

OPS = OPS + dvae.OPS

from dalle_fast.ops import decode  # noqa: E402

OPS = OPS + decode.OPS

from dalle_fast.ops import sampling  # noqa: E402

OPS = OPS + sampling.OPS

from dalle_fast.ops import loss  # noqa: E402

OPS = OPS + loss.OPS

from dalle_fast.ops import fused_step  # noqa: E402

CPU_ONLY = fused_step.OPS  # a GPU decodes op by op inside a CUDA graph: no CUDA kernel

if dalle_fast.extension_error:
    sys.exit(f"dalle_fast._C did not load: {dalle_fast.extension_error}")
keys = ["CPU"] + (["CUDA"] if os.environ.get("DALLE_FAST_EXPECT_CUDA") == "1" else [])
missing = [
    f"{op}/{k}"
    for op in OPS + CPU_ONLY
    for k in (keys if op not in CPU_ONLY else ["CPU"])
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dalle_fast::{op}", k)
]
if missing:
    sys.exit("missing kernels: " + ", ".join(missing))
print(f"registered: {len(OPS)} ops x {keys}, {len(CPU_ONLY)} CPU-only")
