"""Quick parity check of the C++ CPU Gumbel-softmax ops against dalle_fast.reference (not the test suite).

    python scripts/check_gumbel_cpu.py          # exits non-zero on the first mismatch
"""

import itertools
import json
import os

import torch

import dalle_fast._C  # noqa: F401  (registers the ops)
from dalle_fast import reference as ref

ops = torch.ops.dalle_fast
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def signed(seed):
    return seed - 2**64 if seed >= 2**63 else seed


def check(name, got, want, rtol, atol):
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{name}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{tuple(want.shape)}")
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def vectors():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vectors", "philox.json")
    path = path if os.path.exists(path) else "/work/shared/vectors/philox.json"
    with open(path) as f:
        cases = json.load(f)["cases"]
    n_checked = 0
    for case in cases:
        for n, u in zip(case["n"], case["uniform"]):
            g = ops.gumbel_noise(torch.empty(0), [1], signed(case["seed"]), n)
            want = ref.gumbel_from_uniform(torch.tensor([u], dtype=torch.float32)) if hasattr(ref, "gumbel_from_uniform") \
                else -torch.log(-torch.log(torch.tensor([u], dtype=torch.float32)))
            check(f"noise seed={case['seed']} n={n}", g, want, 1e-5, 1e-6)
            n_checked += 1
    print(f"philox vectors: {n_checked} ok")


def layouts(shape, dtype):
    x = torch.randn(shape, dtype=torch.float32).to(dtype) * 3
    yield "contiguous", x
    yield "transposed", torch.randn(tuple(reversed(shape)), dtype=torch.float32).to(dtype).permute(*reversed(range(len(shape))))
    if shape[0] > 1:
        yield "sliced", (torch.randn((shape[0] * 2,) + tuple(shape[1:]), dtype=torch.float32).to(dtype))[::2]


def main():
    torch.manual_seed(0)
    vectors()
    # noise for long runs, odd offsets, 64-bit seeds
    for seed, offset in itertools.product([0, 2**63 + 5, 12345], [0, 3, 2**40 + 1]):
        got = ops.gumbel_noise(torch.empty(0), [7, 1001], signed(seed), offset)
        check(f"noise seed={seed} offset={offset}", got, ref.gumbel_noise((7, 1001), seed, offset), 1e-5, 1e-6)
        got16 = ops.gumbel_noise(torch.empty(0, dtype=torch.float16), [5, 33], signed(seed), offset)
        check("noise fp16", got16, ref.gumbel_noise((5, 33), seed, offset).half(), 1e-3, 1e-3)
    shapes = [((4, 1), -1), ((3, 3), -1), ((5, 1000), -1), ((3, 8191), -1), ((2, 8192), -1),
              ((2, 3, 5, 7), 1), ((2, 1000, 4, 4), 1), ((1, 8191, 3, 2), 1), ((2, 8192, 2, 8), 1), ((2, 17, 16, 5), 1),
              ((3, 1, 6), 1), ((1000, 3), 0), ((8191, 2, 2), 0), ((6, 40), 0)]
    n = 0
    for (shape, dim), dtype in itertools.product(shapes, [torch.float32, torch.float16, torch.bfloat16]):
        rtol, atol = TOL[dtype]
        for (lname, x), seed, offset in itertools.product(layouts(shape, dtype), [0, 2**63 + 5], [0, 3, 2**40 + 1]):
            if dtype != torch.float32 and (lname != "contiguous" or offset == 3):
                continue
            d = dim % len(shape)
            tau = 0.5 if offset else 1.0
            tag = f"{shape} dim={dim} {dtype} {lname} seed={seed} offset={offset}"
            for hard in (False, True):
                y = ops.gumbel_softmax_fwd(x, tau, hard, d, signed(seed), offset)
                want = ref.gumbel_softmax(x, tau, hard, d, seed, offset)
                if hard and dtype != torch.float32:  # rounding of x + g in the reference may move ties
                    pass
                check(f"fwd hard={hard} {tag}", y, want, rtol, atol)
                assert y.is_contiguous()
            am = ops.gumbel_argmax(x, d, signed(seed), offset)
            check(f"argmax {tag}", am, ref.gumbel_argmax(x, d, seed, offset), 0, 0)
            # backward vs autograd of the reference, with a non-contiguous grad of another dtype
            xr = x.detach().float().requires_grad_(True) if dtype == torch.float32 else x.detach().requires_grad_(True)
            yr = ref.gumbel_softmax(xr, tau, False, d, seed, offset)
            gy = torch.randn(tuple(reversed(shape)), dtype=torch.float32).permute(*reversed(range(len(shape))))
            (gx_ref,) = torch.autograd.grad(yr, xr, gy.to(yr.dtype))
            gx = ops.gumbel_softmax_bwd(gy.to(yr.dtype), x, tau, d, signed(seed), offset)
            check(f"bwd {tag}", gx, gx_ref.to(dtype), rtol, atol * 10)
            gx32 = ops.gumbel_softmax_bwd(gy, x, tau, d, signed(seed), offset)  # fp32 grad for any logits
            check(f"bwd fp32 grad {tag}", gx32, gx_ref.to(dtype), rtol, atol * 10)
            n += 1
    print(f"fwd/bwd/argmax: {n} cases ok")
    # NaN and ties in argmax / hard
    x = torch.zeros(4, 50)
    x[1, 7] = float("nan")
    x[1, 30] = float("nan")
    x[2] = float("-inf")
    x[3, 10] = 1e30
    check("argmax nan", ops.gumbel_argmax(x, 1, 7, 0), ref.gumbel_argmax(x, 1, 7, 0), 0, 0)
    xt = x.t().contiguous().reshape(50, 4, 1)
    check("argmax nan dim0", ops.gumbel_argmax(xt, 0, 7, 0), ref.gumbel_argmax(xt, 0, 7, 0), 0, 0)
    # empty tensors and K == 0
    assert ops.gumbel_softmax_fwd(torch.empty(0, 5), 1.0, False, 1, 0, 0).shape == (0, 5)
    assert ops.gumbel_argmax(torch.empty(0, 5), 1, 0, 0).shape == (0,)
    assert ops.gumbel_softmax_bwd(torch.empty(3, 0), torch.empty(3, 0), 1.0, 1, 0, 0).shape == (3, 0)
    # bad input
    bad = [
        lambda: ops.gumbel_softmax_fwd(torch.zeros(3, dtype=torch.int32), 1.0, False, 0, 0, 0),
        lambda: ops.gumbel_softmax_fwd(torch.zeros(3), 0.0, False, 0, 0, 0),
        lambda: ops.gumbel_softmax_fwd(torch.zeros(3), float("inf"), False, 0, 0, 0),
        lambda: ops.gumbel_softmax_fwd(torch.zeros(3), 1.0, False, 1, 0, 0),
        lambda: ops.gumbel_softmax_fwd(torch.zeros(3), 1.0, False, 0, 0, -1),
        lambda: ops.gumbel_softmax_bwd(torch.zeros(4), torch.zeros(3), 1.0, 0, 0, 0),
        lambda: ops.gumbel_softmax_bwd(torch.zeros(3, dtype=torch.float64), torch.zeros(3), 1.0, 0, 0, 0),
        lambda: ops.gumbel_argmax(torch.zeros(3, dtype=torch.float64), 0, 0, 0),
        lambda: ops.gumbel_noise(torch.empty(0, dtype=torch.int64), [3], 0, 0),
        lambda: ops.gumbel_noise(torch.empty(0), [-1], 0, 0),
    ]
    for f in bad:
        try:
            f()
        except RuntimeError as e:
            print("  error ok:", str(e).splitlines()[0])
        else:
            raise AssertionError("bad input accepted")
    print("all ok")


if __name__ == "__main__":
    main()
