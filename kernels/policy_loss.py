"""Triton kernels for the GRPO-family policy loss on given token log-probs (FORMULAS.md section 2).

Legend: B sequences, L tokens per sequence, N = B*L tokens, P = NPART per-sequence partial sums.

Per token t of sequence i (fp32), with the aggregation weight w_t = m_t * wrow_i known before the pass
(grpo 1/(B max(n_i,1)), bnpo/dapo 1/max(sum m,1) or 1/max(num_tokens,1), dr_grpo 1/(B Lmax), seq_sum 1/B):

    r      = exp(logp - old)                    | r_seq_i = exp(sum_t m (logp - old) / max(n_i, 1))
             the exponent clamped to [lr_lo, lr_hi] (runtime, +-inf by default), no gradient outside
    u, c   = -A r, -A clip(r, 1-eps_low, 1+eps_high);  pg = max(u, c)
    dpg/dr = -A * (a_u + a_c [1-eps_low <= r <= 1+eps_high])     a_u, a_c: torch.maximum's split (1/0, 0/1, 1/2 on ties)
    dual   : A < 0 and pg > -c A  ->  pg = -c A, dpg/dr = 0
    tis    : pg, dpg/dr *= min(exp(old - rollout), C)  (TIS_MODE 1) | min(w, C) for a given weight w (TIS_MODE 2:
             a sequence-level weight broadcast by the caller, or weights computed elsewhere)
    kl     : k1 | k2 | k3 | abs, clamped to [-kl_clamp, kl_clamp] (no gradient outside); KL_ST: k2's gradient
    L_t    = pg + beta kl_t - entropy_coef H_t
    token IS    : dL/dlogp_t = w_t (dpg/dr r + beta dkl/dlogp)
    sequence IS : dL/dlogp_t = m_t / max(n_i,1) * r_seq_i * sum_s w_s dpg_s/dr  +  w_t beta dkl/dlogp
    dL/dH_t = -entropy_coef w_t

`_pg_terms` / `_kl_terms` are shared with the fused head kernel (kernels/fused_linear_policy_loss.py) so both
paths run the same per-token math. The gradient is produced in the forward pass (it is a few bytes per
token); autograd's backward only scales it. Grid (B, S): program (i, s) loops over segment s of sequence i in
blocks (S segments of a multiple of BLOCK_L tokens, S chosen for about 4 programs per SM: a grid of (B,) left most
of the GPU idle at B8 and all but one SM at B1 x L65536; the y axis is at most L / BLOCK_L, far below 65535):
pass 2 loss, metric sums and the token-IS gradient of the segment. Sequence IS keeps S = 1 and adds pass 1 (the
sequence log-ratio) and pass 3 (the gradient). Memory traffic: each [B, L] input read once per pass, dlogp / dH
written once. Partial sums [B * S, P] (one row per sequence segment) are reduced by the caller (deterministic; no
atomics). Masked positions may hold garbage (inf/NaN): every load is masked and replaced by 0 before it reaches
arithmetic, as the reference does.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._device import launch_guard, sm_count

# Columns of the per-sequence partial sums.
P_LOSS, P_COUNT, P_CLIP_LO, P_CLIP_HI, P_RATIO, P_DUAL, P_KL, P_ENT, P_TIS, P_TIS_CAP = range(10)
NPART = 10
KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}


def kl_code(kind):
    """(KL_KIND, KL_ST) constexprs of a KL estimator name; a trailing '+' is the straight-through k2 gradient."""
    return KL_CODES[kind.rstrip("+")], kind.endswith("+")


@triton.jit
def _pg_terms(r, A, eps_low, eps_high, dual_clip, tis_w, HAS_DUAL: tl.constexpr):
    """Clipped surrogate pg and dpg/dr (both TIS-scaled), and the clip / dual-clip flags."""
    lo = 1.0 - eps_low
    hi = 1.0 + eps_high
    rc = tl.minimum(tl.maximum(r, lo), hi)
    u = -A * r
    c = -A * rc
    pg = tl.maximum(u, c)
    a_u = tl.where(u > c, 1.0, tl.where(u == c, 0.5, 0.0))
    in_rng = (r >= lo) & (r <= hi)
    d = -A * (a_u + (1.0 - a_u) * tl.where(in_rng, 1.0, 0.0))
    dual = A < A  # all False, same shape as A
    if HAS_DUAL:
        dual = (A < 0) & (pg > -dual_clip * A)
        pg = tl.where(dual, -dual_clip * A, pg)
        d = tl.where(dual, 0.0, d)
    clip_lo = (r < lo) & (A < 0)
    clip_hi = (r > hi) & (A > 0)
    return pg * tis_w, d * tis_w, clip_lo, clip_hi, dual


@triton.jit
def _kl_terms(logp, ref, kl_clamp, KL_KIND: tl.constexpr, KL_ST: tl.constexpr):
    """kl_t and dkl/dlogp for k1 / k2 / k3 / abs (d = ref - logp), the value clamped to +-kl_clamp (no gradient
    outside, as torch.clamp); KL_ST replaces the gradient by k2's (straight through)."""
    d = ref - logp
    if KL_KIND == 1:
        kl = -d
        dkl = d * 0.0 + 1.0
    elif KL_KIND == 2:
        kl = 0.5 * d * d
        dkl = -d
    elif KL_KIND == 4:
        kl = tl.abs(d)
        dkl = tl.where(d > 0, -1.0, tl.where(d < 0, 1.0, 0.0))
    else:
        e = tl.exp(d)
        kl = e - d - 1.0
        dkl = 1.0 - e
    dkl = tl.where((kl >= -kl_clamp) & (kl <= kl_clamp), dkl, 0.0)
    kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
    if KL_ST:
        dkl = -d
    return kl, dkl


@triton.jit
def _tis_weight(old, x, tis_cap, TIS_MODE: tl.constexpr):
    """Truncated-IS weight: from the rollout log-prob x (mode 1) or a given weight x (mode 2); 1 without TIS."""
    if TIS_MODE == 1:
        return tl.minimum(tl.exp(old - x), tis_cap)
    if TIS_MODE == 2:
        return tl.minimum(x, tis_cap)
    return old * 0.0 + 1.0


@triton.jit
def _bounded_exp(lr, lr_lo, lr_hi):
    """(exp(clamp(lr, lr_lo, lr_hi)), 1 inside the bounds else 0): the ratio and its gradient gate."""
    inside = (lr >= lr_lo) & (lr <= lr_hi)
    return tl.exp(tl.minimum(tl.maximum(lr, lr_lo), lr_hi)), tl.where(inside, 1.0, 0.0)


@triton.jit
def _load0(ptr, o, m):
    """fp32 load with masked (and invalid) positions set to 0."""
    return tl.where(m, tl.load(ptr + o, mask=m, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, roll_ptr, ent_ptr, wrow_ptr,
    dlogp_ptr, dent_ptr, part_ptr,
    eps_low, eps_high, dual_clip, tis_cap, beta, entropy_coef, lr_lo, lr_hi, kl_clamp,
    # shapes
    L, seg_len,
    # strides ([B, L] inputs share one layout; advantages has its own, stride_al = 0 for [B])
    stride_b, stride_l, stride_ab, stride_al,
    SEQ_IS: tl.constexpr, HAS_DUAL: tl.constexpr, TIS_MODE: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr, KL_KIND: tl.constexpr, KL_ST: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    n_seg = tl.num_programs(1)
    l_start = i_s * seg_len  # this program's segment of the sequence (the whole of it under sequence IS)
    l_end = tl.minimum(L, l_start + seg_len)
    row = i_b * stride_b
    arow = i_b * stride_ab
    wrow = tl.load(wrow_ptr + i_b)
    o_l = tl.arange(0, BLOCK_L)
    n_i = 0.0
    r_seq = 1.0
    gate_seq = 1.0
    if SEQ_IS:
        s_lr = 0.0
        for l0 in range(0, L, BLOCK_L):
            m_l = (l0 + o_l) < L
            o = row + (l0 + o_l).to(tl.int64) * stride_l
            on = (tl.load(mask_ptr + o, mask=m_l, other=0) != 0) & m_l
            s_lr += tl.sum(_load0(logp_ptr, o, on) - _load0(old_ptr, o, on), 0)  # [BLOCK_L] -> scalar
            n_i += tl.sum(on.to(tl.float32), 0)
        r_seq, gate_seq = _bounded_exp(s_lr / tl.maximum(n_i, 1.0), lr_lo, lr_hi)
    s_loss = 0.0
    s_n = 0.0
    s_clo = 0.0
    s_chi = 0.0
    s_r = 0.0
    s_dual = 0.0
    s_kl = 0.0
    s_ent = 0.0
    s_tis = 0.0
    s_cap = 0.0
    s_dpg = 0.0
    for l0 in range(l_start, l_end, BLOCK_L):
        m_l = (l0 + o_l) < l_end
        o = row + (l0 + o_l).to(tl.int64) * stride_l
        on = (tl.load(mask_ptr + o, mask=m_l, other=0) != 0) & m_l
        mf = on.to(tl.float32)
        w = mf * wrow
        lp = _load0(logp_ptr, o, on)
        old = _load0(old_ptr, o, on)
        A = _load0(adv_ptr, arow + (l0 + o_l).to(tl.int64) * stride_al, on)
        if SEQ_IS:
            r = mf * 0.0 + r_seq
            gate = mf * 0.0 + gate_seq
        else:
            r, gate = _bounded_exp(lp - old, lr_lo, lr_hi)
        tis_w = _tis_weight(old, _load0(roll_ptr, o, on), tis_cap, TIS_MODE)
        pg, d, clo, chi, dual = _pg_terms(r, A, eps_low, eps_high, dual_clip, tis_w, HAS_DUAL)
        per_tok = pg
        g = d * r * gate
        kl = mf * 0.0
        if HAS_REF:
            kl, dkl = _kl_terms(lp, _load0(ref_ptr, o, on), kl_clamp, KL_KIND, KL_ST)
            if beta != 0.0:
                per_tok += beta * kl
                g += beta * dkl
        ent = mf * 0.0
        if HAS_ENT:
            ent = _load0(ent_ptr, o, on)
            per_tok -= entropy_coef * ent
        if WRITE_GRAD:
            if SEQ_IS:
                s_dpg += tl.sum(w * d, 0)
            else:
                tl.store(dlogp_ptr + o, w * g, mask=m_l)
            if HAS_ENT:
                tl.store(dent_ptr + o, -entropy_coef * w, mask=m_l)
        # [BLOCK_L] -> scalar partial sums; masked tokens contribute exactly 0
        s_loss += tl.sum(tl.where(on, w * per_tok, 0.0), 0)
        s_n += tl.sum(mf, 0)
        s_clo += tl.sum(tl.where(on & clo, 1.0, 0.0), 0)
        s_chi += tl.sum(tl.where(on & chi, 1.0, 0.0), 0)
        s_r += tl.sum(tl.where(on, r, 0.0), 0)
        s_dual += tl.sum(tl.where(on & dual, 1.0, 0.0), 0)
        s_kl += tl.sum(tl.where(on, kl, 0.0), 0)
        s_ent += tl.sum(tl.where(on, ent, 0.0), 0)
        s_tis += tl.sum(tl.where(on, tis_w, 0.0), 0)
        s_cap += tl.sum(tl.where(on & (tis_w >= tis_cap), 1.0, 0.0), 0)
    p_row = part_ptr + (i_b * n_seg + i_s) * 10  # NPART columns, one row per (sequence, segment)
    tl.store(p_row + 0, s_loss)
    tl.store(p_row + 1, s_n)
    tl.store(p_row + 2, s_clo)
    tl.store(p_row + 3, s_chi)
    tl.store(p_row + 4, s_r)
    tl.store(p_row + 5, s_dual)
    tl.store(p_row + 6, s_kl)
    tl.store(p_row + 7, s_ent)
    tl.store(p_row + 8, s_tis)
    tl.store(p_row + 9, s_cap)
    if SEQ_IS and WRITE_GRAD:
        scale = r_seq * gate_seq * s_dpg / tl.maximum(n_i, 1.0)
        for l0 in range(0, L, BLOCK_L):
            m_l = (l0 + o_l) < L
            o = row + (l0 + o_l).to(tl.int64) * stride_l
            on = (tl.load(mask_ptr + o, mask=m_l, other=0) != 0) & m_l
            mf = on.to(tl.float32)
            g = mf * scale
            if HAS_REF:
                if beta != 0.0:
                    _, dkl = _kl_terms(_load0(logp_ptr, o, on), _load0(ref_ptr, o, on), kl_clamp, KL_KIND, KL_ST)
                    g += mf * wrow * beta * dkl
            tl.store(dlogp_ptr + o, g, mask=m_l)


def bounds(log_ratio_min, log_ratio_max, kl_clamp):
    """Runtime fp32 (lr_lo, lr_hi, kl_clamp): an absent bound is +-inf (no clamp, no recompile)."""
    inf = float("inf")
    return (-inf if log_ratio_min is None else float(log_ratio_min), inf if log_ratio_max is None
            else float(log_ratio_max), inf if kl_clamp is None else float(kl_clamp))


MIN_SEGMENT = 128  # tokens: below this a program's fixed cost (scalars, 10 partial sums) outweighs its work


def segments(B, L, device, seq_is) -> int:
    """Programs per sequence: up to about 4 programs per SM over the batch, each at least MIN_SEGMENT tokens (one
    program per sequence left 8-16 programs for the whole GPU at B8-16 x L1024, one at B1 x L65536). Sequence IS
    needs the whole sequence's mean log-ratio before any token's gradient, so it keeps one program per sequence."""
    if seq_is:
        return 1
    return max(1, min(triton.cdiv(L, MIN_SEGMENT), triton.cdiv(4 * sm_count(device), max(B, 1))))


@launch_guard
def policy_loss_fwd(logp, old, adv, mask_u8, wrow, *, ref=None, roll=None, ent=None, eps_low, eps_high,
                    dual_clip, tis_cap, beta, entropy_coef, kl, seq_is, write_grad, tis_mode=1, log_ratio_min=None,
                    log_ratio_max=None, kl_clamp=None):
    """Launch the policy kernel on fp32 [B, L] tensors sharing one layout (mask uint8, adv [B] or [B, L]).
    roll is the rollout log-prob (tis_mode 1) or a given weight (tis_mode 2).

    Returns (partials [B, NPART] fp32 (columns P_*), dlogp [B, L] fp32 | None, dent [B, L] fp32 | None).
    """
    B, L = logp.shape
    for name, x in (("old", old), ("mask", mask_u8), ("ref", ref), ("roll", roll), ("ent", ent)):
        if x is not None and x.stride() != logp.stride():
            raise ValueError(f"{name} has strides {x.stride()} but logp has {logp.stride()}; pass one layout")
    seg_len = triton.cdiv(L, segments(B, L, logp.device, seq_is)) if L else 1
    block = min(1024, max(16, triton.next_power_of_2(seg_len)))
    seg_len = triton.cdiv(seg_len, block) * block
    seg = triton.cdiv(L, seg_len) if L else 1
    part = logp.new_empty(B * seg, NPART)
    dlogp = logp.new_empty(B, L) if write_grad else None
    if dlogp is not None and dlogp.stride() != logp.stride():
        raise ValueError(f"logp must be contiguous for the gradient output, got strides {logp.stride()}")
    dent = logp.new_empty(B, L) if (write_grad and ent is not None) else None
    sab, sal = (adv.stride(0), 0) if adv.ndim == 1 else adv.stride()
    dummy = logp
    if B == 0:
        return part, dlogp, dent
    _policy_loss_fwd_kernel[(B, seg)](
        logp, old, adv, mask_u8, dummy if ref is None else ref, dummy if roll is None else roll,
        dummy if ent is None else ent, wrow, dummy if dlogp is None else dlogp, dummy if dent is None else dent,
        part, float(eps_low), float(eps_high), float(dual_clip or 0.0),
        float("inf") if tis_cap is None else float(tis_cap), float(beta), float(entropy_coef),
        *bounds(log_ratio_min, log_ratio_max, kl_clamp),
        L, seg_len, logp.stride(0), logp.stride(1), sab, sal,
        SEQ_IS=seq_is, HAS_DUAL=dual_clip is not None, TIS_MODE=0 if roll is None else tis_mode,
        HAS_REF=ref is not None, HAS_ENT=ent is not None, KL_KIND=kl_code(kl)[0], KL_ST=kl_code(kl)[1],
        WRITE_GRAD=write_grad, BLOCK_L=block, num_warps=4,
    )
    return part, dlogp, dent
