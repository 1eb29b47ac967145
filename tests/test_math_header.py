"""The per-element helpers of csrc/include/dalle_fast/math.h, compiled for the CPU by the host compiler.

The CUDA kernels reduce with softmax_stats_of / softmax_stats_combine and argmax_combine, and draw noise
with philox_block / gumbel_from_uint32; no GPU runs here, so these tests run that same header code on the
CPU (tests/cpp/math_probe.cpp), in both a sequential and a pairwise (tree) order as warps and blocks do,
against torch in fp64.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from dalle_fast import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors" / "philox.json"


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler (g++) is needed to compile the header probe"
    exe = tmp_path_factory.mktemp("probe") / "math_probe"
    src = ROOT / "tests" / "cpp" / "math_probe.cpp"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", str(src), "-o", str(exe)], check=True)

    def run(lines):
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        return [line.split() for line in out.stdout.splitlines()]

    return run


def _fmt(v: float) -> str:
    return repr(float(v))  # 'nan', 'inf', '-inf' or a round-tripping decimal


def test_noise_matches_vectors_and_reference(probe):
    with open(VECTORS) as f:
        cases = json.load(f)["cases"]
    lines, expected_bits, expected_g = [], [], []
    for case in cases:
        for n, bits in zip(case["n"], case["uint32"]):
            lines.append(f"noise {case['seed']} {n}")
            expected_bits.append(bits)
        n = torch.tensor(case["n"], dtype=torch.int64)
        u = reference.uniform_from_uint32(reference.philox_uint32(n, case["seed"])).double()
        expected_g += reference.philox.gumbel_from_uniform(u).tolist()
    out = probe(lines)
    assert [int(r[0]) for r in out] == expected_bits
    torch.testing.assert_close(
        torch.tensor([float(r[1]) for r in out], dtype=torch.float64),
        torch.tensor(expected_g, dtype=torch.float64),
        rtol=1e-6,
        atol=1e-6,
    )


def _softmax_cases():
    gen = torch.Generator().manual_seed(3)
    cases = []
    for k in (1, 2, 7, 33, 1000):
        for special in (None, "-inf", "nan", "+inf", "all-inf"):
            z = (torch.randn(k, generator=gen, dtype=torch.float64) * 5).float()
            if special == "all-inf":
                z[:] = -math.inf
            elif special is not None:
                idx = torch.randint(0, k, (max(1, k // 4),), generator=gen)
                z[idx] = {"-inf": -math.inf, "nan": math.nan, "+inf": math.inf}[special]
            cases.append(z)
    return cases


def test_softmax_stats_combine(probe):
    cases = _softmax_cases()
    out = probe([f"softmax {len(z)} " + " ".join(_fmt(v) for v in z.tolist()) for z in cases])
    for z, row in zip(cases, out):
        m, s_seq, s_tree, t_seq, t_tree = (float(v) for v in row)
        zd = z.double()
        w = torch.arange(1, len(z) + 1, dtype=torch.float64)
        finite_max = zd[~torch.isnan(zd)].max().item() if (~torch.isnan(zd)).any() else -math.inf
        if torch.isnan(zd).any() or (zd == math.inf).any():
            expected_s = expected_t = math.nan  # torch.softmax gives NaN rows here
        elif finite_max == -math.inf:
            expected_s = expected_t = 0.0  # y = 0 / 0 = NaN, as torch.softmax
        else:
            e = torch.exp(zd - finite_max)
            expected_s, expected_t = e.sum().item(), (w * e).sum().item()
        assert m == finite_max or math.isclose(m, finite_max, rel_tol=1e-7)  # %.9g round-trips fp32
        for got in (s_seq, s_tree):
            assert math.isclose(got, expected_s, rel_tol=1e-5) or (math.isnan(got) and math.isnan(expected_s)), z
        for got in (t_seq, t_tree):
            assert math.isclose(got, expected_t, rel_tol=1e-5, abs_tol=1e-4) or (
                math.isnan(got) and math.isnan(expected_t)
            ), z


def test_argmax_combine_follows_torch(probe):
    gen = torch.Generator().manual_seed(5)
    cases = [torch.tensor([1.0, 3.0, 3.0, math.nan, math.nan]), torch.full((5,), -math.inf), torch.tensor([2.0])]
    for k in (2, 9, 64, 257):
        v = torch.randint(-3, 4, (k,), generator=gen).float()  # many ties
        cases.append(v.clone())
        v[torch.randint(0, k, (2,), generator=gen)] = math.nan
        cases.append(v.clone())
        v[:] = -math.inf
        v[k // 2] = math.inf
        cases.append(v)
    out = probe([f"argmax {len(v)} " + " ".join(_fmt(x) for x in v.tolist()) for v in cases])
    for v, (seq, tree) in zip(cases, out):
        expected = torch.argmax(v).item()
        assert int(seq) == expected and int(tree) == expected, v
