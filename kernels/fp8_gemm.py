"""Block-scaled FP8 GEMM (the fallback of FP8Linear where blockwise `torch._scaled_mm` is missing or wrong).

Legend: M rows of the output, N columns, K the reduction (a multiple of 128).

    C[M, N] = sum_kb ( A[:, kb] @ Bt[:, kb]^T ) * sa[m, kb] * sb[n // GN, kb]        bf16 out, fp32 accumulate

A [M, K] and Bt [N, K] are E4M3, both K-contiguous (the operand layout Hopper FP8 wgmma needs). One scale per
128 of K for every row of A (1x128); for Bt either one per 128x128 block (GN = 128, weights) or one per row
and 128 of K (GN = 1, the token-grouped wgrad operand). Each 128-deep partial product is accumulated by the
tensor core, then promoted into the fp32 accumulator with its scales (DeepGEMM's two-level accumulation:
Hopper's FP8 MMA keeps only ~14 mantissa bits of the running sum, so long K must not stay in it).

Traffic: (M + N) * K bytes of FP8 plus scales, 2 * M * N bytes out; compute-bound at the docs/benchmarks.md shapes.
With 128x128 weight blocks (GN = 128) and BN = 128 the weight scale is one scalar per K-step (not a [BN] vector
load per column). The autotune key buckets the token counts (M, or K in wgrad) by powers of two, so every new
sequence length does not re-benchmark. Known limit: the per-K-step promotion waits for the tensor cores to finish
that step's MMA before scaling (Triton cannot overlap it with the next step's MMA as DeepGEMM does).
Limits: BK is fixed at the scale group (128). Under TRITON_INTERPRET=1 the FP8 tiles are upcast to fp32
before `tl.dot` and the output is stored as fp32 and cast by the launcher (the interpreter truncates on
bf16 stores instead of rounding to nearest-even).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import launch_guard

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Configs that compile without spills for sm_90 on Triton 3.6 and 3.9 (bench/kernel_report.py); 128x256 and
# 256x128 tiles and 128x128 at 4 warps spilled 268-912 bytes per thread and were dropped.
_CONFIGS = [triton.Config({"BM": 32, "BN": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)] if _INTERPRET else [
    triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((128, 128, 8, 4), (128, 128, 8, 3), (64, 128, 4, 5), (128, 64, 4, 4))
]


def _prune(configs, nargs, **kwargs):
    """The token-grouped wgrad operand (B_GROUP_N = 1) loads a [BN] scale vector per K-step; with a 128x128 tile
    at 8 warps that reaches 255 registers and spills 8 bytes on Triton 3.6 (kernel report): it takes the smaller
    tiles only. The interpreter's single config is kept as is."""
    if kwargs.get("B_GROUP_N") != 1 or len(configs) == 1:
        return configs
    return [c for c in configs if c.kwargs["BM"] * c.kwargs["BN"] < 128 * 128]


def token_bucket(n: int) -> int:
    """The autotune key for a token count: its power-of-two bucket (at least 1024), so a new sequence length
    re-tunes only when it crosses a power of two (M is the token count in forward / dgrad, K in wgrad)."""
    return max(1024, triton.next_power_of_2(max(int(n), 1)))


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K_BUCKET", "B_GROUP_N"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr,
    # shapes
    M, N, K, M_BUCKET, K_BUCKET,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_sam, stride_sak, stride_sbn, stride_sbk,
    B_GROUP_N: tl.constexpr, UPCAST: tl.constexpr,
    BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
):
    i_pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    i_group = i_pid // (GROUP_M * n_n)
    first_m = i_group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    i_m = first_m + (i_pid % (GROUP_M * n_n)) % size_m
    i_n = (i_pid % (GROUP_M * n_n)) // size_m

    o_m = (i_m * BM + tl.arange(0, BM)).to(tl.int64)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
    o_k = tl.arange(0, BK).to(tl.int64)
    m_m = o_m < M
    m_n = o_n < N
    p_a = a_ptr + o_m[:, None] * stride_am + o_k[None, :] * stride_ak
    p_b = b_ptr + o_n[None, :] * stride_bn + o_k[:, None] * stride_bk
    p_sa = sa_ptr + o_m * stride_sam
    if B_GROUP_N >= BN:  # one 128x128 weight block spans the tile's columns: one scalar scale per K-step
        p_sb = sb_ptr + ((i_n * BN) // B_GROUP_N) * stride_sbn
    else:
        p_sb = sb_ptr + (o_n // B_GROUP_N) * stride_sbn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        b_a = tl.load(p_a, mask=m_m[:, None], other=0.0)
        b_b = tl.load(p_b, mask=m_n[None, :], other=0.0)
        b_sa = tl.load(p_sa + kb * stride_sak, mask=m_m, other=0.0)
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        # [BM, BN] = [BM, BK] @ [BK, BN], one scale group deep
        b_part = tl.dot(b_a, b_b)
        if B_GROUP_N >= BN:
            acc += b_part * (b_sa * tl.load(p_sb + kb * stride_sbk))[:, None]
        else:
            b_sb = tl.load(p_sb + kb * stride_sbk, mask=m_n, other=0.0)
            acc += b_part * b_sa[:, None] * b_sb[None, :]
        p_a += BK * stride_ak
        p_b += BK * stride_bk
    p_c = c_ptr + o_m[:, None] * stride_cm + o_n[None, :] * stride_cn
    tl.store(p_c, acc.to(c_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@launch_guard
def fp8_gemm_fwd(a: torch.Tensor, sa: torch.Tensor, bt: torch.Tensor, sb: torch.Tensor,
                 out_dtype=torch.bfloat16) -> torch.Tensor:
    """C = (A * sa) @ (Bt * sb)^T. a [M, K] e4m3, sa [M, K/128]; bt [N, K] e4m3, sb [N/128, K/128] or [N, K/128].

    Scales may have any strides. Returns C [M, N] in out_dtype (accumulated in fp32).
    """
    M, K = a.shape
    N = bt.shape[0]
    group_n = N // sb.shape[0]
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    c = torch.empty(M, N, device=a.device, dtype=torch.float32 if interp else out_dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    _fp8_gemm_kernel[grid](
        a, bt, c, sa, sb, M, N, K, token_bucket(M), token_bucket(K),
        a.stride(0), a.stride(1), bt.stride(0), bt.stride(1), c.stride(0), c.stride(1),
        sa.stride(0), sa.stride(1), sb.stride(0), sb.stride(1),
        B_GROUP_N=group_n, UPCAST=interp, BK=128,
    )
    return c.to(out_dtype) if interp else c
