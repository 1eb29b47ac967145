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


# ---- dVAE kernels (kernels/dvae.py; launch tables of dalle_fast/ops/_triton_dvae.py) ----

# (K, S, C): the benchmark shapes (GPU and CPU), the test shapes, C past one 128-channel block.
_DVAE_SHAPES = [(8192, 1024, 128), (1024, 256, 128), (37, 15, 11), (70, 16, 130), (16, 9, 130), (5, 7, 3)]
_DVAE_QUICK_SHAPES = [(8192, 1024, 128), (1024, 256, 128)]


def _load_dvae():
    """(kernels/dvae.py loaded as a submodule of a stand-in kernels package, the launcher module)."""
    import importlib
    import importlib.util

    pkg = "dalle_fast_kernels_aot"
    if pkg not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            pkg,
            os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")],
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[pkg] = mod
        spec.loader.exec_module(mod)
    kern = importlib.import_module(f"{pkg}.dvae")
    from dalle_fast.ops import _triton_dvae as launch

    return kern, launch


def _signature(kernel: str, types: dict, consts: dict) -> dict:
    """Every argument of the kernel in order: its type from `types` ("i32" by default), or constexpr."""
    fn = getattr(_load_dvae()[0], kernel)
    return {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}


def _dvae_jobs(quick: bool) -> list[tuple[str, dict, dict, int, str]]:
    """(kernel, signature, constexprs, num_warps, label) of every configuration the dVAE launchers use."""
    _, launch = _load_dvae()
    jobs, seen = [], set()

    def add(kernel, types, consts, num_warps, label):
        sig = _signature(kernel, types, consts)
        key = (kernel, tuple(sorted(sig.items())), tuple(sorted(consts.items())), num_warps)
        if key not in seen:
            seen.add(key)
            jobs.append((kernel, sig, consts, num_warps, label))

    scalars = {"seed": "i64", "offset": "i64", "inv_tau": "fp32"}
    for K, S, C in _DVAE_QUICK_SHAPES if quick else _DVAE_SHAPES:
        for dt in ["fp32"] if quick else list(_DTYPES):
            precs = ["ieee", "tf32"] if dt == "fp32" else ["tf32"]  # fp32: tf32 where cudnn.allow_tf32 is on
            ptr = _DTYPES[dt]
            for aligned in (True, False):
                cfg = launch.quantize_config("fwd", K, S, C)
                blocks = {"BLOCK_K": cfg.block_k, "BLOCK_S": cfg.block_s, "BLOCK_C": cfg.block_c}
                for hard, prec in [(h, p) for h in (False, True) for p in precs]:
                    consts = {"stride_xs": 1, "stride_wk": 1, "HAS_BIAS": True, "HARD": hard, "ALIGNED": aligned,
                              "PRECISION": prec, **blocks}  # fmt: skip
                    types = {"x_ptr": ptr, "w_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": ptr,
                             "lse_ptr": "*fp32", "idx_ptr": "*i64", **scalars}  # fmt: skip
                    add("_gumbel_quantize_fwd_kernel", types, consts, cfg.num_warps,
                        f"{dt} {prec} K={K} S={S} C={C} hard={int(hard)} aligned={int(aligned)} {blocks}")  # fmt: skip
                cfg = launch.quantize_config("dx", K, S, C)
                blocks = {"BLOCK_K": cfg.block_k, "BLOCK_S": cfg.block_s, "BLOCK_C": cfg.block_c}
                for prec in precs:
                    consts = {"stride_xs": 1, "stride_wk": 1, "ALIGNED": aligned, "PRECISION": prec, **blocks}
                    types = {"x_ptr": ptr, "w_ptr": "*fp32", "dout_ptr": "*fp32", "lse_ptr": "*fp32", "dx_ptr": ptr,
                             **scalars}  # fmt: skip
                    add("_gumbel_quantize_bwd_dx_kernel", types, consts, cfg.num_warps,
                        f"{dt} {prec} K={K} S={S} C={C} aligned={int(aligned)} {blocks}")  # fmt: skip
                cfg = launch.quantize_config("dw", K, S, C)
                blocks = {"BLOCK_K": cfg.block_k, "BLOCK_S": cfg.block_s, "BLOCK_C": cfg.block_c}
                for hard in (False, True):
                    consts = {"stride_xs": 1, "HARD": hard, "ALIGNED": aligned, "PRECISION": "ieee", **blocks}
                    types = {"x_ptr": ptr, "dout_ptr": "*fp32", "lse_ptr": "*fp32", "idx_ptr": "*i64",
                             "dw_ptr": "*fp32", **scalars}  # fmt: skip
                    add("_gumbel_quantize_bwd_dw_kernel", types, consts, cfg.num_warps,
                        f"{dt} K={K} S={S} C={C} hard={int(hard)} aligned={int(aligned)} {blocks}")  # fmt: skip
            # The losses: the NLL on the image-sized [B, 3, 8H, 8W], the KL on the [B, K, S] logits.
            for reduce in (False, True):
                add("_logit_laplace_nll_fwd_kernel", {"x_ptr": ptr, "mu_ptr": ptr, "lb_ptr": ptr, "out_ptr": "*fp32"},
                    {"REDUCE": reduce, "BLOCK": launch.NLL_BLOCK}, 4, f"{dt} reduce={int(reduce)}")  # fmt: skip
                add("_logit_laplace_nll_bwd_kernel",
                    {"g_ptr": "*fp32", "x_ptr": ptr, "mu_ptr": ptr, "lb_ptr": ptr, "dx_ptr": ptr, "dmu_ptr": ptr,
                     "dlb_ptr": ptr, "g_scale": "fp32"},
                    {"G_SCALAR": reduce, "BLOCK": launch.NLL_BLOCK}, 4, f"{dt} g_scalar={int(reduce)}")  # fmt: skip
            for outer, inner in ((8, S), (8 * S, 1)):
                cfg = launch.kl_config(outer, K, inner)
                unit = "stride_xi" if cfg.col else "stride_xk"
                consts = {unit: 1, "COL": cfg.col, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
                label = f"{dt} K={K} {'col' if cfg.col else 'row'} {cfg.block_m}x{cfg.block_n} w{cfg.num_warps}"
                add("_categorical_kl_fwd_kernel", {"x_ptr": ptr, "stats_ptr": "*fp32"}, consts, cfg.num_warps, label)
                add("_categorical_kl_bwd_kernel", {"x_ptr": ptr, "stats_ptr": "*fp32", "g_ptr": "*fp32", "dx_ptr": ptr},
                    consts, cfg.num_warps, label)  # fmt: skip
    return jobs


# Sparse attention (kernels/attention.py) -------------------------------------------------------------------

_SM90_MAX_SMEM = 232448  # bytes of shared memory one block may opt in to on sm_90 (227 KiB)


def _load_attention():
    import importlib.util

    import triton  # noqa: F401

    spec = importlib.util.spec_from_file_location(
        "dalle_fast_kernels_attention", os.path.join(ROOT, "kernels", "attention.py")
    )
    kern = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kern)
    return kern


def _load_attention_launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "dalle_fast_triton_attention_launch", os.path.join(ROOT, "dalle_fast", "ops", "_triton_attention.py")
    )
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return launch


def _attention_jobs(quick: bool) -> list[tuple]:
    """Every configuration of the sparse-attention launch table (each head size and dtype, each kind flag
    combination the kernels specialise on: KIND 0..3, TORUS for conv), plus the 16 x 16 tiles the GPU run of
    the tests launches (--quick: fp16 and fp32, row and torus conv only). Contiguous last dims (stride 1,
    specialised as the JIT does), 16-byte aligned pointers and strides divisible by 16 (as the JIT sees q, k, v
    of head size >= 32 and our own outputs)."""
    import torch

    launch = _load_attention_launcher()
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    kinds = [(0, False), (1, False), (2, False), (3, False), (3, True)]
    entries = [(d, dt, launch.launch_config(d, dt, *launch.block_sizes(d, dt)), kinds) for d, dt in launch.CONFIGS]
    # the 16 x 16 tiles the GPU run of tests/test_sparse_attention.py launches (its _blocks): every kind at D=32,
    # row layers at D=64 and 128 (test_parity_head_dims), fp16 and fp32
    entries += [(d, dt, launch.launch_config(d, dt, 16, 16), kinds if d == 32 else [(1, False)])
                for d in launch.HEAD_DIMS for dt in (torch.float16, torch.float32)]  # fmt: skip
    if quick:
        entries = [(d, dt, c, [k for k in ks if k in ((1, False), (3, True))]) for d, dt, c, ks in entries
                   if dt != torch.bfloat16]  # fmt: skip
    scalars_i32 = ["H", "seq_len", "n_rows", "text_len", "grid_h", "grid_w", "half"]

    def strides(*tensors):
        out = {}
        for t in tensors:
            for a in "bhld":
                out[f"stride_{t}{a}"] = "constexpr" if a == "d" else "i32"
        return out

    jobs = []
    for d, dt, c, entry_kinds in entries:
        ty = _DTYPES[names[dt]]
        tag = f"{names[dt]} D{d} {c.block_m}x{c.block_n}"
        # delta preprocess: no mask, one per head size and dtype
        sig = {"out_ptr": ty, "do_ptr": ty, "delta_ptr": "*fp32", **strides("o", "do"), "H": "i32", "seq_len": "i32",
               "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr"}  # fmt: skip
        consts = {k: 1 for k, v in sig.items() if v == "constexpr" and k.startswith("stride_")}
        consts.update(HEAD_DIM=d, BLOCK_M=c.pre_rows)
        div = [k for k, v in sig.items() if v.startswith("*") or (k.startswith("stride_") and v == "i32")]
        label = f"{names[dt]} D{d} rows{c.pre_rows} w{c.pre_warps}"
        job = ("_sparse_attention_bwd_preprocess_kernel", sig, consts, {"num_warps": c.pre_warps}, label, div)
        if job[:5] not in [j[:5] for j in jobs]:
            jobs.append(job)
        for kind, torus in entry_kinds:
            common = {"KIND": kind, "TORUS": torus, "HEAD_DIM": d, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n}
            kname = f"{'full row column conv'.split()[kind]}{'-torus' if torus else ''}"
            for kernel, ptrs, ts, scalars, extra, warps, stages in (
                ("_sparse_attention_fwd_kernel",
                 {"q_ptr": ty, "k_ptr": ty, "v_ptr": ty, "out_ptr": ty, "lse_ptr": "*fp32", "kv_indptr_ptr": "*i32",
                  "kv_index_ptr": "*i32", "kv_partial_ptr": "*i32"},
                 ("q", "k", "v", "o"), ["qk_scale"], {}, c.fwd_warps, c.fwd_stages),
                ("_sparse_attention_bwd_dkdv_kernel",
                 {"q_ptr": ty, "k_ptr": ty, "v_ptr": ty, "do_ptr": ty, "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                  "dk_ptr": ty, "dv_ptr": ty, "q_indptr_ptr": "*i32", "q_index_ptr": "*i32",
                  "q_partial_ptr": "*i32"},
                 ("q", "k", "v", "do", "dk", "dv"), ["qk_scale", "scale"], {"SUB_M": c.dkdv_sub_m},
                 c.dkdv_warps, c.dkdv_stages),
                ("_sparse_attention_bwd_dq_kernel",
                 {"q_ptr": ty, "k_ptr": ty, "v_ptr": ty, "do_ptr": ty, "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                  "dq_ptr": ty, "kv_indptr_ptr": "*i32", "kv_index_ptr": "*i32", "kv_partial_ptr": "*i32"},
                 ("q", "k", "v", "do", "dq"), ["qk_scale", "scale"], {"SUB_N": c.dq_sub_n},
                 c.dq_warps, c.dq_stages),
            ):  # fmt: skip
                sig = {**ptrs, **strides(*ts), **{k: "i32" for k in scalars_i32}, **{k: "fp32" for k in scalars}}
                sig.update({k: "constexpr" for k in (*common, *extra)})
                consts = {k: 1 for k, v in sig.items() if v == "constexpr" and k.startswith("stride_")}
                consts.update(common, **extra)
                div = [k for k, v in sig.items() if v.startswith("*") or (k.startswith("stride_") and v == "i32")]
                sub = "".join(f" sub{v}" for v in extra.values())
                label = f"{tag} {kname}{sub} w{warps} s{stages}"
                jobs.append((kernel, sig, consts, {"num_warps": warps, "num_stages": stages}, label, div))
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
                        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                        jobs.append(("_scaled_matmul_fwd_kernel", sig, consts, options, label, aligned))
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


# ---------------------------------------------------------------------------------------- decoding attention


def _load_decode():
    import importlib.util

    import triton  # noqa: F401

    spec = importlib.util.spec_from_file_location(
        "dalle_fast_kernels_decode", os.path.join(ROOT, "kernels", "decode.py")
    )
    kern = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kern)
    spec = importlib.util.spec_from_file_location(
        "dalle_fast_triton_decode_launch", os.path.join(ROOT, "dalle_fast", "ops", "_triton_decode.py")
    )
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    return kern, launch


def _decode_jobs(quick: bool) -> list[tuple]:
    """Every entry of the decoding kernel's launch table (kind x head size), each dtype, the torus switch for
    conv, the position from a pointer or a scalar (quick: fp16 and fp32, position from a pointer)."""
    kern, launch = _load_decode()
    fn = kern._sparse_decode_attention_kernel
    jobs = []
    dtypes = ["fp16", "fp32"] if quick else list(_DTYPES)
    for (kind, d), c in sorted(launch.CONFIGS.items()):
        for dt in dtypes:
            for torus in (False, True) if kind == 3 else (False,):
                for from_ptr in (True,) if quick else (True, False):
                    consts = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1, "KIND": kind,
                              "TORUS": torus, "POS_FROM_PTR": from_ptr, "HEAD_DIM": d, "BLOCK_T": c.block_t,
                              "BLOCK_I": c.block_i}  # fmt: skip
                    types = {"q_ptr": _DTYPES[dt], "k_ptr": _DTYPES[dt], "v_ptr": _DTYPES[dt], "out_ptr": _DTYPES[dt],
                             "pos_ptr": "*i64", "qk_scale": "fp32"}  # fmt: skip
                    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
                    div = [a for a, v in sig.items() if v.startswith("*") and a != "pos_ptr"]
                    div += [a for a, v in sig.items() if a.startswith("stride_") and v == "i32"]
                    kname = "full row column conv".split()[kind] + ("-torus" if torus else "")
                    label = f"{dt} D{d} {kname} T{c.block_t} I{c.block_i} w{c.num_warps} ptr={int(from_ptr)}"
                    jobs.append(("_sparse_decode_attention_kernel", sig, consts, {"num_warps": c.num_warps}, label,
                                 div))  # fmt: skip
    return jobs


def _load_loss():
    import importlib.util

    import triton  # noqa: F401

    spec = importlib.util.spec_from_file_location("dalle_fast_kernels_loss", os.path.join(ROOT, "kernels", "loss.py"))
    kern = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kern)
    return kern


def _loss_jobs(quick: bool) -> list[tuple]:
    """The loss head (dalle_fast/ops/_triton_loss.py): its row kernel at ROW_BLOCK / ROW_WARPS, and the three
    GEMMs it runs on _scaled_matmul_fwd_kernel with the strides they have (x @ W^T into the fp32 logits, G @ W
    into dx, G^T @ x into fp32 dW; no scale, bias or filter) for its sm_90 entries and the default ones."""
    _, launch = _load_matmul_modules()
    jobs = []
    from dalle_fast.ops import _triton_loss as loss_launch

    for has_bias in (True, False):
        for write in (True, False):
            sig = {"acc_ptr": "*fp32", "bias_ptr": "*fp32", "target_ptr": "*i64", "loss_ptr": "*fp32",
                   "stride_am": "i32", "V": "i32"}  # fmt: skip
            consts = {"HAS_BIAS": has_bias, "WRITE_GRAD": write, "BLOCK_V": loss_launch.ROW_BLOCK}
            sig.update(dict.fromkeys(consts, "constexpr"))
            label = f"bias={int(has_bias)} grad={int(write)} {loss_launch.ROW_BLOCK} w{loss_launch.ROW_WARPS}"
            jobs.append(("_cross_entropy_rows_kernel", sig, consts, loss_launch.ROW_WARPS, label))
    import torch

    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtypes = ["fp16"] if quick else list(_DTYPES)
    for x_dt in dtypes:
        cls = "fp32" if x_dt == "fp32" else "low"
        cfgs = {loss_launch.config_for((9, 0), torch_dtypes[x_dt]), launch.DEFAULT_CONFIG[cls]}
        # (what, a dtype, b dtype, out dtype, the unit strides of a, b and out)
        gemms = [
            ("logits", x_dt, x_dt, "fp32", ("stride_ak", "stride_bk", "stride_on")),
            ("dx", "fp32", x_dt, x_dt, ("stride_ak", "stride_bn", "stride_on")),
            ("dW", "fp32", x_dt, "fp32", ("stride_am", "stride_bn", "stride_on")),
        ]
        for cfg in sorted(cfgs):
            for what, a_dt, b_dt, o_dt, units in gemms:
                strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_om", "stride_on")
                sig = {"a_ptr": _DTYPES[a_dt], "b_ptr": _DTYPES[b_dt], "bias_ptr": "*fp32", "scale_ptr": "*fp32",
                       "out_ptr": _DTYPES[o_dt], "flag_ptr": "*i32"}  # fmt: skip
                sig.update({k: "i32" for k in strides})
                sig.update({"M": "i32", "N": "i32", "K": "i32", "alpha": "fp32"})
                consts = {k: 1 for k in units}
                consts.update({"HAS_BIAS": False, "HAS_SCALE": False, "FILTER": False, "PRESCALE_A": a_dt != b_dt,
                               "IEEE": b_dt == "fp32", "DOT_F32": False, "INT64": False, "BLOCK_M": cfg.block_m,
                               "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m})  # fmt: skip
                sig.update(dict.fromkeys(consts, "constexpr"))
                label = (f"loss {what} {a_dt}x{b_dt}->{o_dt} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} "
                         f"w{cfg.num_warps} s{cfg.num_stages}")  # fmt: skip
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                jobs.append(("_scaled_matmul_fwd_kernel", sig, consts, options, label))
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


def _compile_one(job):
    # Jobs are (kernel, signature, constexprs, num_warps or an options dict, label[, names divisible by 16]).
    kernel, sig, consts, options, label, *rest = job
    options = options if isinstance(options, dict) else {"num_warps": options}
    import triton
    from triton.backends.compiler import GPUTarget

    kern, _ = _load_modules()
    fn = (
        getattr(kern, kernel, None)
        or getattr(_load_attention(), kernel, None)
        or getattr(_load_matmul_modules()[0], kernel, None)
        or getattr(_load_loss(), kernel, None)
        or getattr(_load_decode()[0], kernel, None)
        or getattr(_load_dvae()[0], kernel, None)
        or getattr(_load_sample(), kernel)
    )
    target = GPUTarget("cuda", 90, 32)
    errors = []
    compiled = None
    # What the JIT assumes of 16-byte aligned pointers and strides divisible by 16 (triton >= 3.3 form).
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in (rest[0] if rest else ())}
    # ASTSource's signature format changed across triton versions: try the current forms in turn.
    attempts = [
        lambda: triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        lambda: triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
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
            compiled = triton.compile(src, target=target, options=options)
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


# ---- Sampling kernel (kernels/sample.py; launch table of dalle_fast/ops/_triton_sample.py) ----

# (R, V): the benchmark shape, the test shapes (odd V, past the one-chunk limit, unaligned chunks), V = 16384.
_SAMPLE_SHAPES = [(16, 8192), (4, 256), (2, 8191), (1, 16384), (1, 9001), (2, 4099), (3, 37), (5, 1), (1, 30000)]
_SAMPLE_QUICK_SHAPES = [(16, 8192), (1, 9001)]


def _load_sample():
    import importlib

    _load_dvae()  # registers the stand-in kernels package (kernels/sample.py imports .gumbel from it)
    return importlib.import_module("dalle_fast_kernels_aot.sample")


def _sample_jobs(quick: bool) -> list[tuple[str, dict, dict, int, str]]:
    """(kernel, signature, constexprs, num_warps, label) of every configuration the sampling launcher uses."""
    kern = _load_sample()
    from dalle_fast.ops import _triton_sample as launch

    jobs, seen = [], set()
    for R, V in _SAMPLE_QUICK_SHAPES if quick else _SAMPLE_SHAPES:
        for offset in (0, 1):
            cfg = launch.sample_config(R, V, offset)
            for dt in ["fp32"] if quick else list(_DTYPES):
                for use_k, use_p in ((False, False), (True, False), (False, True), (True, True)):
                    consts = {"stride_xv": 1, "USE_K": use_k, "USE_P": use_p, "ONE_CHUNK": cfg.one_chunk,
                              "ALIGNED": cfg.aligned, "BLOCK_R": cfg.block_r, "BLOCK_V": cfg.block_v}  # fmt: skip
                    types = {"x_ptr": _DTYPES[dt], "out_ptr": "*i64", "seed": "i64", "offset": "i64",
                             "temperature": "fp32", "top_p": "fp32"}  # fmt: skip
                    names = kern._sample_kernel.arg_names
                    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in names}
                    key = (tuple(sorted(sig.items())), tuple(sorted(consts.items())), cfg.num_warps)
                    if key in seen:
                        continue
                    seen.add(key)
                    label = (f"{dt} V={V} {'1chunk' if cfg.one_chunk else 'chunked'} aligned={int(cfg.aligned)} "
                             f"{cfg.block_r}x{cfg.block_v} w{cfg.num_warps} k={int(use_k)} p={int(use_p)}")  # fmt: skip
                    jobs.append(("_sample_kernel", sig, consts, cfg.num_warps, label))
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="benchmark and test shapes only, fp32 only")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = ap.parse_args()
    import triton

    every = _jobs(args.quick) + _attention_jobs(args.quick) + _dvae_jobs(args.quick) + _matmul_jobs(args.quick)
    every += _decode_jobs(args.quick)
    every += _sample_jobs(args.quick)
    every += _loss_jobs(args.quick)
    jobs = [j for j in every if args.filter in j[0]]
    print(f"triton {triton.__version__}: compiling {len(jobs)} kernel configurations for sm_90 ({args.jobs} jobs)")
    print(f"cuobjdump: {_cuobjdump()}")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        results = list(ex.map(_compile_one, jobs))
    bad = 0
    w = max(len(r[1]) for r in results)
    kw = max([28] + [len(r[0]) for r in results])
    print(f"{'kernel':{kw}s} {'config':{w}s} {'regs':>5s} {'spill':>6s} {'stack':>6s} {'smem':>7s}")
    for kernel, label, res, err in results:
        if err:
            bad += 1
            print(f"{kernel:{kw}s} {label:{w}s} ERROR {err}")
            continue
        spill = res["LOCAL"] or 0
        stack = res["STACK"] or 0
        flag = ""
        if spill or stack:
            bad += 1
            flag = "  <-- SPILL"
        elif res["SHARED"] > _SM90_MAX_SMEM:
            bad += 1
            flag = "  <-- SHARED MEMORY"
        print(f"{kernel:{kw}s} {label:{w}s} {res['REG']:5d} {spill:6d} {stack:6d} {res['SHARED']:7d}{flag}")
    print(f"{len(results) - bad} ok, {bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
