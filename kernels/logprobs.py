"""Row kernels for token log-probs and entropy from logits (FORMULAS.md section 1).

Legend: N rows (tokens, all leading dims flattened), V vocab columns, T temperature.

Forward, one program per row, one pass over the row in BLOCK_V slices (online softmax):

    z     = x / T                                   (fp32, whatever the logits dtype)
    m     = running max            s = sum_j exp(z_j - m)          t = sum_j exp(z_j - m) (z_j - m)
    on a new max m':  s <- s e^(m - m') + ...      t <- e^(m - m') (t + s (m - m')) + ...
    lse   = m + log s ;  logp = z_y - lse ;  H = log s - t / s

t is kept relative to the running max so the entropy has no cancellation when every logit is near
-1e4: there z has an fp32 ulp of ~1e-3, the p_j are off by that relative amount, and lse - sum_j p_j z_j
is off by |z| * 1e-3 (13 nats measured at -2e4 with the fp32 reference), while log s - t / s is exact.
The max starts at -inf and padded columns load -inf, so V needs no relation to BLOCK_V; a -inf logit has
p = 0 and adds nothing to s or t (it is masked out of the p * z product, which would be 0 * inf). The
target logit is one extra scalar load. Per row it saves lse and H (fp32) for backward. The next slice is
loaded into registers before the current slice's reductions, so one 8-16 KB load per program stays in
flight across the reduce/exp/reduce chain (the loop has no tl.dot, so Triton's software pipeliner does
not do this). Rows whose target is `ignore_index` skip the row loop
entirely (padding costs no bandwidth) and give logp = H = 0; rows whose id is outside [0, V) skip it too
and give NaN (never a read outside the row; the public op's O(N) check reports the id).

Backward, grid (N, cdiv(V, BLOCK_V)), elementwise given the saved per-row lse and H:

    p_j  = exp(z_j - lse) ;  z_j - E_p[z] = (z_j - lse) + H
    dz_j = g (1[j = y] - p_j) - gH p_j (z_j - E_p[z]) ;   dlogit_j = dz_j / T

written in the logits dtype, optionally into the logits buffer itself (each element is read and then
written by the same program, so in place is race-free). `col0` shifts the column ids so the same
kernel serves a vocab slice [col0, col0 + V) of a larger head (fused_linear_logprobs backward).

Memory traffic: forward reads the logits once (plus N targets, writes 3N fp32); backward reads them
once and writes them once. Both are bandwidth bound on a GPU (one exp per element): BLOCK_V = 4096
with 8 warps gives 16 elements per thread. Rows are split into an unaligned head and tail (< 8 elements
each, one small masked access) and a 16-byte-aligned body (`kernels/_rows.py`), so every vocabulary
size gets 16-byte vector loads and stores (V = 50257 or 32001 fell back to 2-byte accesses before);
the column stride must be 1 (the op makes other layouts contiguous). dlogits share the logits' strides.
Limits: the grid puts rows on axis 0 (up to 2^31 - 1 rows) and vocab blocks on axis 1 (V / 4096, far
below 65535); offsets are int64. A row of only -inf logits has no distribution: logp is NaN there,
as in the reference.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import launch_guard
from ._rows import base_shift, online_softmax_step, row_edges, row_split, vec_elems

BLOCK_V_FWD = 4096
BLOCK_V_BWD = 4096
NUM_WARPS = 8


@triton.jit
def _logprobs_fwd_kernel(
    p_x, p_y, p_logp, p_ent, p_lse,
    inv_t, ignore_index, base_shift,
    # shapes
    L, V,
    # strides (the column stride is 1)
    s_xb, s_xl,
    BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, VEC: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    y = tl.load(p_y + i_n).to(tl.int64)
    valid = y != ignore_index
    # an id outside [0, V) is never read: its row is skipped and its logp / H are NaN (the op's check names it)
    bad = valid & ((y < 0) | (y >= V))
    off = base_shift + (i_n // L) * s_xb + (i_n % L) * s_xl
    p_row = p_x + (off - base_shift)
    head, n_body = row_split(off, tl.where(valid & ~bad, V, 0), VEC)
    p_body = p_x + (tl.multiple_of(off + head, VEC) - base_shift)
    n_vec = n_body // VEC
    # head and tail (< VEC elements each) first, then the 16-byte-aligned body
    o_e, m_e = row_edges(head, n_body, V, VEC)
    b_e = tl.load(p_row + o_e, mask=m_e, other=float("-inf")).to(tl.float32) * inv_t
    m, s, t = online_softmax_step(float("-inf"), 0.0, 0.0, b_e, HAS_ENT)
    o_v = tl.arange(0, BLOCK_V)
    # register double buffer: the next slice's load is issued before this slice's reductions
    b_next = tl.load(p_body + o_v, mask=o_v // VEC < n_vec, other=float("-inf"))
    for v0 in range(0, n_body, BLOCK_V):
        b_z = b_next.to(tl.float32) * inv_t
        o = v0 + BLOCK_V + o_v
        b_next = tl.load(p_body + o, mask=o // VEC < n_vec, other=float("-inf"))
        m, s, t = online_softmax_step(m, s, t, b_z, HAS_ENT)
    log_s = tl.log(s)
    lse = m + log_s
    y_safe = tl.where(valid & ~bad, y, 0)
    z_y = tl.load(p_row + y_safe).to(tl.float32) * inv_t
    # (z_y - m) - log s, not z_y - lse: lse rounded to fp32 loses ~1e-3 absolute on rows near -2e4
    tl.store(p_logp + i_n, tl.where(bad, float("nan"), tl.where(valid, (z_y - m) - log_s, 0.0)))
    tl.store(p_lse + i_n, lse)
    if HAS_ENT:
        tl.store(p_ent + i_n, tl.where(bad, float("nan"), tl.where(valid, log_s - t / s, 0.0)))


@triton.jit
def _dlogits(b_x, cols, y, g, gh, lse, ent, inv_t, valid, HAS_ENT: tl.constexpr):
    """dlogit of logits b_x at global column ids `cols` for a row with target y (FORMULAS.md section 1)."""
    b_z = b_x.to(tl.float32) * inv_t
    b_p = tl.exp(b_z - lse)
    b_dz = tl.where(cols == y, g, 0.0) - g * b_p
    if HAS_ENT:
        b_dz -= gh * tl.where(b_p > 0.0, b_p * (b_z - lse + ent), 0.0)
    return tl.where(valid, b_dz * inv_t, 0.0)


@triton.jit
def _store_dx(p_out, b_dz, mask, BF16_RNE_BITS: tl.constexpr):
    if BF16_RNE_BITS:
        # The interpreter truncates fp32 -> bf16; round to nearest even by hand (what the GPU's cvt.rn does).
        bits = b_dz.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(p_out, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(p_out, b_dz.to(p_out.dtype.element_ty), mask=mask)


@triton.jit
def _logprobs_bwd_kernel(
    p_x, p_dx, p_y, p_lse, p_ent, p_g, p_gh,
    inv_t, ignore_index, col0, base_shift,
    # shapes
    L, V,
    # strides (x and dx share them; the column stride is 1)
    s_xb, s_xl,
    BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, BF16_RNE_BITS: tl.constexpr, VEC: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    y = tl.load(p_y + i_n).to(tl.int64)
    valid = y != ignore_index
    lse = tl.load(p_lse + i_n)
    g = tl.load(p_g + i_n)
    ent = 0.0
    gh = 0.0
    if HAS_ENT:
        ent = tl.load(p_ent + i_n)
        gh = tl.load(p_gh + i_n)
    off = base_shift + (i_n // L) * s_xb + (i_n % L) * s_xl
    head, n_body = row_split(off, V, VEC)
    start = tl.multiple_of(off + head, VEC) - base_shift
    # program i_v: body columns [i_v BLOCK_V, (i_v + 1) BLOCK_V) (16-byte aligned), program 0 also the edges
    o = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o // VEC < n_body // VEC
    b_x = tl.load(p_x + start + o, mask=m_v, other=float("-inf"))
    b_dz = _dlogits(b_x, (head + o).to(tl.int64) + col0, y, g, gh, lse, ent, inv_t, valid, HAS_ENT)
    _store_dx(p_dx + start + o, b_dz, m_v, BF16_RNE_BITS)
    if i_v == 0:
        o_e, m_e = row_edges(head, n_body, V, VEC)
        p_row = off - base_shift
        b_e = tl.load(p_x + p_row + o_e, mask=m_e, other=float("-inf"))
        b_de = _dlogits(b_e, o_e.to(tl.int64) + col0, y, g, gh, lse, ent, inv_t, valid, HAS_ENT)
        _store_dx(p_dx + p_row + o_e, b_de, m_e, BF16_RNE_BITS)


def _as3d(x):
    """[N, V] -> [1, N, V] view; [B, L, V] unchanged (any strides: e.g. logits[:, :-1] needs no copy)."""
    return x.unsqueeze(0) if x.ndim == 2 else x


@launch_guard
def logprobs_fwd(x, y, temperature, ignore_index, return_entropy):
    """x [N, V] or [B, L, V] (N = B L), any float dtype, any row strides, column stride 1; y [N] int, contiguous
    -> (logp [N], ent [N] (zeros unless return_entropy), lse [N]), all fp32."""
    x = _as3d(x)
    _, L, V = x.shape
    N = y.numel()
    logp = torch.empty(N, device=x.device, dtype=torch.float32)
    ent = torch.empty_like(logp) if return_entropy else torch.zeros_like(logp)
    lse = torch.empty_like(logp)
    if N == 0:
        return logp, ent, lse
    _check_unit_columns(x)
    _logprobs_fwd_kernel[(N,)](
        x, y, logp, ent, lse,
        1.0 / temperature, ignore_index, base_shift(x),
        L, V,
        x.stride(0), x.stride(1),
        BLOCK_V=BLOCK_V_FWD, HAS_ENT=return_entropy, VEC=vec_elems(x), num_warps=NUM_WARPS,
    )
    return logp, ent, lse


@launch_guard
def logprobs_bwd(x, y, lse, ent, g, gh, temperature, ignore_index, has_ent, *, out=None, col0=0):
    """dlogits shaped like x ([N, V] or [B, L, V]) in x.dtype for upstream g (d/dlogp) and gh (d/dH),
    both fp32 [N].

    out: where to write (default: a new tensor with x's strides, so both share one row layout); pass `x`
    itself for the in-place variant. col0: id of x's first column when x is a vocab slice of a larger head.
    """
    if out is None:
        out = torch.empty_strided(x.shape, x.stride(), device=x.device, dtype=x.dtype)
    if out.stride() != x.stride():
        raise ValueError(f"out must have x's strides {x.stride()}, got {out.stride()}")
    x3, o3 = _as3d(x), _as3d(out)
    _, L, V = x3.shape
    N = y.numel()
    if N == 0 or V == 0:
        return out
    _check_unit_columns(x3)
    grid = (N, triton.cdiv(V, BLOCK_V_BWD))
    _logprobs_bwd_kernel[grid](
        x3, o3, y, lse, ent, g, gh,
        1.0 / temperature, ignore_index, col0, base_shift(x3),
        L, V,
        x3.stride(0), x3.stride(1),
        BLOCK_V=BLOCK_V_BWD, HAS_ENT=has_ent, VEC=vec_elems(x3), num_warps=NUM_WARPS,
        BF16_RNE_BITS=out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1",
    )
    return out


def _check_unit_columns(x):
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"logits need a unit column stride (got strides {x.stride()}); pass .contiguous()")
