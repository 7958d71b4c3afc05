"""FP8 (E4M3) block quantizers, FORMULAS.md section 6. One kernel, three group shapes.

Legend: R rows (tokens for activations / gradients, out-features for weights), C columns (channels),
G = 128 the group length.

    s = max(amax(group), eps) / 448        eps = 1e-12, fp32, dynamic ("current") scaling
    q = e4m3( clamp(x / s, -448, 448) )    x / s correctly rounded (div_rn), e4m3 round-to-nearest-even

Group shapes (MODE, a constexpr):
    0  "1x128"   one scale per row and 128 columns  (activations, output gradients: along the channel axis)
    1  "128x1"   one scale per column and 128 rows  (the wgrad operands: along tokens; R padded to a
                 multiple of 128 with zero rows, so a ragged token count needs no special GEMM)
    2  "128x128" one scale per 128 x 128 block      (weights)
Outputs are written through explicit strides, so the launcher chooses the layout the GEMM wants
(e.g. the 128x1 result is stored transposed, [C, R_pad] row-major, i.e. K-contiguous for the wgrad GEMM).
Scales are "outer-dim-major", the layout blockwise `torch._scaled_mm` takes for 1x128 groups without a copy:
1x128 scales [R, C/128] with strides (1, R), 128x1 scales [C, R_pad/128] with strides (1, C) (physically
[R_pad/128, C] row-major: the wgrad GEMM reads it as its A scales as is and as its B scales transposed).

Non-finite inputs: NaN is mapped to +inf before the amax, so any group holding NaN or +/-inf gets an
infinite scale; the caller checks the (small) scale tensor once instead of the data.

Memory traffic: read x once (2 or 4 B/elem), write q (1 B/elem) and one fp32 scale per 128 elements;
bandwidth-bound, the target is 0.75x of the measured copy bandwidth.

`fp8_quant_dual_fwd` fuses "1x128" and "128x1" of the same tensor (x in a training forward, dy in every
backward): one read of a [128, 128] tile, both amax directions, both outputs (the transpose-cast fusion of
DeepSeek-V3 / TransformerEngine), saving one full read of the activation and of the output gradient per layer.

Interpreter: under TRITON_INTERPRET=1 (triton 3.9 CPU) a float32 -> float8e4nv cast inside a kernel is
wrong (measured: -31.70 -> -16, -125.7 -> -64; 42117 of 197k values differed from torch), so when
interpreting the kernel stores the clamped fp32 value x / s (exact) and the launcher does the e4m3 cast
with torch. Everything else (amax, scales, masks, strides, padding) is the same code path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import launch_guard

FP8_MAX = 448.0
GROUP = 128
MODES = {"1x128": 0, "128x1": 1, "128x128": 2}
DUAL_SUB, DUAL_WARPS = 8, 4  # dual quantizer: rows per slice, warps per program (see its kernel)


@triton.jit
def _fp8_quant_kernel(
    x_ptr, q_ptr, s_ptr,
    eps,
    # shapes
    R, R_OUT, C,
    # strides
    stride_xr, stride_xc, stride_qr, stride_qc, stride_sr, stride_sc,
    MODE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, STORE_FP8: tl.constexpr,
):
    i_r = tl.program_id(0)
    i_c = tl.program_id(1)
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)
    o_c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
    m_in = (o_r[:, None] < R) & (o_c[None, :] < C)
    b_x = tl.load(x_ptr + o_r[:, None] * stride_xr + o_c[None, :] * stride_xc, mask=m_in, other=0.0).to(tl.float32)
    b_abs = tl.where(b_x != b_x, float("inf"), tl.abs(b_x))
    if MODE == 0:
        # [BR]: one group per row of the [BR, 128] tile
        b_s = tl.math.div_rn(tl.maximum(tl.max(b_abs, axis=1), eps), 448.0)
        b_q = tl.math.div_rn(b_x, b_s[:, None])
        tl.store(s_ptr + o_r * stride_sr + i_c * stride_sc, b_s, mask=o_r < R)
    elif MODE == 1:
        # [BC]: one group per column of the [128, BC] tile
        b_s = tl.math.div_rn(tl.maximum(tl.max(b_abs, axis=0), eps), 448.0)
        b_q = tl.math.div_rn(b_x, b_s[None, :])
        tl.store(s_ptr + i_r * stride_sr + o_c * stride_sc, b_s, mask=o_c < C)
    else:
        # scalar: the whole [128, 128] tile is one block
        b_s = tl.math.div_rn(tl.maximum(tl.max(tl.max(b_abs, axis=1), axis=0), eps), 448.0)
        b_q = tl.math.div_rn(b_x, b_s)
        tl.store(s_ptr + i_r * stride_sr + i_c * stride_sc, b_s)
    b_q = tl.minimum(tl.maximum(b_q, -448.0), 448.0)
    m_out = (o_r[:, None] < R_OUT) & (o_c[None, :] < C)
    p_q = q_ptr + o_r[:, None] * stride_qr + o_c[None, :] * stride_qc
    if STORE_FP8:
        tl.store(p_q, b_q.to(tl.float8e4nv), mask=m_out)
    else:
        tl.store(p_q, b_q, mask=m_out)


@triton.jit
def _dual_slice(x_ptr, i_r, r0, o_c, m_c, R, stride_xr, stride_xc, B: tl.constexpr, SUB: tl.constexpr):
    """Rows r0 .. r0 + SUB of the tile ([SUB, B], zeros outside x; nothing is read when r0 >= B)."""
    o_r = (i_r * B + r0 + tl.arange(0, SUB)).to(tl.int64)
    m_in = (o_r[:, None] < R) & m_c[None, :] & (r0 < B)
    return tl.load(x_ptr + o_r[:, None] * stride_xr + o_c[None, :] * stride_xc, mask=m_in, other=0.0)


@triton.jit
def _fp8_quant_dual_kernel(
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
    eps,
    # shapes
    R, R_PAD, C,
    # strides
    stride_xr, stride_xc, stride_qr, stride_qc, stride_sr, stride_sc, stride_qtc, stride_qtr, stride_stc, stride_str,
    STORE_FP8: tl.constexpr, B: tl.constexpr, SUB: tl.constexpr,
):
    """A [B, B] tile in [SUB, B] row slices, two passes: pass 1 quantizes each row (1x128 into q/s) and keeps the
    running column amax; pass 2 re-reads the slices (this program read them a moment ago, so from L2) and quantizes
    per column (128x1 into qt/st). Each pass loads the next slice before working on the current one. Holding the
    whole tile in registers took 192-229 registers per thread (8 resident warps per SM); slices of 8 rows at 4 warps
    keep it under 64 (32 resident warps; kernel report)."""
    i_r = tl.program_id(0)
    i_c = tl.program_id(1)
    o_c = (i_c * B + tl.arange(0, B)).to(tl.int64)
    m_c = o_c < C
    c_amax = tl.zeros([B], dtype=tl.float32)
    b_next = _dual_slice(x_ptr, i_r, 0, o_c, m_c, R, stride_xr, stride_xc, B, SUB)
    for r0 in range(0, B, SUB):
        b_x = b_next.to(tl.float32)
        b_next = _dual_slice(x_ptr, i_r, r0 + SUB, o_c, m_c, R, stride_xr, stride_xc, B, SUB)
        o_r = (i_r * B + r0 + tl.arange(0, SUB)).to(tl.int64)
        m_in = (o_r[:, None] < R) & m_c[None, :]
        b_abs = tl.where(b_x != b_x, float("inf"), tl.abs(b_x))
        # [SUB]: per-row groups
        b_s = tl.math.div_rn(tl.maximum(tl.max(b_abs, axis=1), eps), 448.0)
        b_q = tl.minimum(tl.maximum(tl.math.div_rn(b_x, b_s[:, None]), -448.0), 448.0)
        tl.store(s_ptr + o_r * stride_sr + i_c * stride_sc, b_s, mask=o_r < R)
        p_q = q_ptr + o_r[:, None] * stride_qr + o_c[None, :] * stride_qc
        if STORE_FP8:
            tl.store(p_q, b_q.to(tl.float8e4nv), mask=m_in)
        else:
            tl.store(p_q, b_q, mask=m_in)
        # [SUB, B] -> [B]: the column amax so far
        c_amax = tl.maximum(c_amax, tl.max(b_abs, axis=0))
    b_st = tl.math.div_rn(tl.maximum(c_amax, eps), 448.0)
    tl.store(st_ptr + o_c * stride_stc + i_r * stride_str, b_st, mask=m_c)
    b_next = _dual_slice(x_ptr, i_r, 0, o_c, m_c, R, stride_xr, stride_xc, B, SUB)
    for r0 in range(0, B, SUB):
        b_x = b_next.to(tl.float32)
        b_next = _dual_slice(x_ptr, i_r, r0 + SUB, o_c, m_c, R, stride_xr, stride_xc, B, SUB)
        o_r = (i_r * B + r0 + tl.arange(0, SUB)).to(tl.int64)
        b_qt = tl.minimum(tl.maximum(tl.math.div_rn(b_x, b_st[None, :]), -448.0), 448.0)
        p_qt = qt_ptr + o_r[:, None] * stride_qtr + o_c[None, :] * stride_qtc
        m_pad = (o_r[:, None] < R_PAD) & m_c[None, :]
        if STORE_FP8:
            tl.store(p_qt, b_qt.to(tl.float8e4nv), mask=m_pad)
        else:
            tl.store(p_qt, b_qt, mask=m_pad)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@launch_guard
def fp8_quant_fwd(x: torch.Tensor, mode: str, eps: float = 1e-12):
    """Quantize a 2-D tensor x [R, C] (C % 128 == 0; R % 128 == 0 for "128x128") to E4M3.

    Returns (q, s):
      "1x128":   q [R, C] row-major,            s [R, C/128]   strides (1, R)
      "128x1":   q [C, R_pad] row-major (x^T),  s [C, R_pad/128]  strides (1, C)  (R_pad = R rounded up to 128)
      "128x128": q [R, C] row-major,            s [R/128, C/128] row-major
    Non-finite groups give s = inf (checked by the caller).
    """
    m = MODES[mode]
    R, C = x.shape
    dev = x.device
    store_fp8 = not _interpreting()
    qdt = torch.float8_e4m3fn if store_fp8 else torch.float32
    if m == 0:
        q = torch.empty(R, C, device=dev, dtype=qdt)
        s = torch.empty(C // GROUP, R, device=dev, dtype=torch.float32).t()
        r_out, (br, bc) = R, (32, GROUP)
        sq, ss = (q.stride(0), q.stride(1)), (s.stride(0), s.stride(1))
    elif m == 1:
        r_out = triton.cdiv(R, GROUP) * GROUP
        qt = torch.empty(C, r_out, device=dev, dtype=qdt)
        st = torch.empty(r_out // GROUP, C, device=dev, dtype=torch.float32).t()  # [C, R_pad/128], strides (1, C)
        br, bc = GROUP, 64
        # kernel indexes q by (row r, column c) -> q^T[c, r]; s by (row group, column) -> s^T[c, g]
        sq, ss = (qt.stride(1), qt.stride(0)), (st.stride(1), st.stride(0))
        q, s = qt, st
    else:
        q = torch.empty(R, C, device=dev, dtype=qdt)
        s = torch.empty(R // GROUP, C // GROUP, device=dev, dtype=torch.float32)
        r_out, (br, bc) = R, (GROUP, GROUP)
        sq, ss = (q.stride(0), q.stride(1)), (s.stride(0), s.stride(1))
    grid = (triton.cdiv(r_out, br), triton.cdiv(C, bc))
    _fp8_quant_kernel[grid](
        x, q, s, eps, R, r_out, C, x.stride(0), x.stride(1), *sq, *ss,
        MODE=m, BR=br, BC=bc, STORE_FP8=store_fp8, num_warps=4 if m == 0 else 8,
    )
    if not store_fp8:
        q = q.to(torch.float8_e4m3fn)
    return q, s


@launch_guard
def fp8_quant_dual_fwd(x: torch.Tensor, eps: float = 1e-12):
    """Both quantizations of x [R, C] from one read: (q, s) as fp8_quant_fwd(x, "1x128") and (qt, st) as
    fp8_quant_fwd(x, "128x1"), bitwise identical to the two separate calls."""
    R, C = x.shape
    dev = x.device
    store_fp8 = not _interpreting()
    qdt = torch.float8_e4m3fn if store_fp8 else torch.float32
    r_pad = triton.cdiv(R, GROUP) * GROUP
    q = torch.empty(R, C, device=dev, dtype=qdt)
    s = torch.empty(C // GROUP, R, device=dev, dtype=torch.float32).t()
    qt = torch.empty(C, r_pad, device=dev, dtype=qdt)
    st = torch.empty(r_pad // GROUP, C, device=dev, dtype=torch.float32).t()
    grid = (r_pad // GROUP, triton.cdiv(C, GROUP))
    _fp8_quant_dual_kernel[grid](
        x, q, s, qt, st, eps, R, r_pad, C, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        s.stride(0), s.stride(1), qt.stride(0), qt.stride(1), st.stride(0), st.stride(1),
        STORE_FP8=store_fp8, B=GROUP, SUB=DUAL_SUB, num_warps=DUAL_WARPS,
    )
    if not store_fp8:
        q, qt = q.to(torch.float8_e4m3fn), qt.to(torch.float8_e4m3fn)
    return q, s, qt, st
