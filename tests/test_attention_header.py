"""The mask predicate of csrc/include/dalle_fast/attention.h, compiled for the CPU by the host compiler.

The CUDA kernels apply processing_allowed on partial tiles and load rows through processing_row; no GPU runs
here, so this runs that same header code on the CPU (tests/cpp/attention_probe.cpp) against the reference
masks and dalle_fast.masks' processing order.
"""

import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from dalle_fast import masks

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler (g++) is needed to compile the header probe"
    exe = tmp_path_factory.mktemp("probe") / "attention_probe"
    src = ROOT / "tests" / "cpp" / "attention_probe.cpp"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", str(src), "-o", str(exe)], check=True)

    def run(kind, t, gh, gw, kernel, torus, n):
        line = f"mask {masks.KINDS.index(kind)} {t} {gh} {gw} {kernel} {int(torus)} {n}\n"
        out = subprocess.run([str(exe)], input=line, capture_output=True, text=True, check=True).stdout.split("\n")
        n_rows = int(out[0])
        rows = torch.tensor([int(x) for x in out[1].split()], dtype=torch.int64)
        mask = torch.tensor([[c == "1" for c in line] for line in out[2 : 2 + n_rows]], dtype=torch.bool)
        return n_rows, rows, mask.view(n_rows, n_rows)

    return run


CASES = [
    (kind, t, gh, gw, kernel, torus, cut)
    for kind in masks.KINDS
    for (t, gh, gw) in ((0, 4, 6), (5, 5, 7), (3, 7, 4))
    for (kernel, torus) in ((3, False), (5, True), (1, False))
    for cut in (0, 4)
    if kind == "conv" or (kernel, torus) == (3, False)
]


@pytest.mark.parametrize("kind,t,gh,gw,kernel,torus,cut", CASES)
def test_header_mask_equals_reference(probe, kind, t, gh, gw, kernel, torus, cut):
    n = t + gh * gw - cut
    n_rows, rows, got = probe(kind, t, gh, gw, kernel, torus, n)
    assert n_rows == masks.processing_length(kind, t, gh, gw, n)
    assert torch.equal(rows, masks.processing_row(kind, t, gh, gw, torch.arange(n_rows)))
    variant = "torus" if torus else "clipped"
    dense = masks.dense_mask(kind, t, gh, gw, kernel=kernel, conv_variant=variant)
    present = rows < n
    r = rows.clamp(max=n - 1)
    want = dense[r][:, r] & present[:, None] & present[None, :]
    assert torch.equal(got, want)
