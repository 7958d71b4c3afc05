"""Triton kernel for group advantages over ragged groups (FORMULAS.md section 3).

Legend: N samples, G groups. The caller sorts the samples by group once (torch.unique + a stable argsort
of the inverse ids, O(N log N) on tiny N) and passes `order` [N] (sample indices grouped together) and
`starts` [G + 1] (segment offsets). One program per group (grid (G,), 1D) walks its segment:

    pass 1: count n, sum S, max, min
    pass 2 (std="group"): sum (R - S/n)^2  -> var = . / max(n - ddof, 1)      (two-pass, as the reference)
    pass 3: grpo A = (R - S/n) / (std + eps) | (R - S/n) / (global std + eps) | R - S/n
            rloo A = R - (S - R) / (n - 1)   (0 for n == 1)
            max == min (singleton or zero-variance group) -> A = 0 exactly; optional clip; scatter to out[order]
IEEE division and square root (div_rn / sqrt_rn) so GPU results match the reference to fp32 rounding of
the sums. Traffic: R read 2-3 times through `order`, A written once: negligible next to any model step.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._device import launch_guard

STD_CODES = {"group": 0, "global": 1, "none": 2}


@triton.jit
def _group_advantages_fwd_kernel(
    r_ptr, order_ptr, starts_ptr, gstd_ptr, out_ptr,
    eps, clip, ddof,
    RLOO: tl.constexpr, STD: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    i_g = tl.program_id(0)
    start = tl.load(starts_ptr + i_g)
    end = tl.load(starts_ptr + i_g + 1)
    o_j = tl.arange(0, BLOCK)
    s = 0.0
    vmax = -float("inf")
    vmin = float("inf")
    for j0 in range(start, end, BLOCK):
        m_j = (j0 + o_j) < end
        idx = tl.load(order_ptr + j0 + o_j, mask=m_j, other=0)
        r = tl.load(r_ptr + idx, mask=m_j, other=0.0)
        s += tl.sum(r, 0)  # [BLOCK] -> scalar
        vmax = tl.maximum(vmax, tl.max(tl.where(m_j, r, -float("inf")), 0))
        vmin = tl.minimum(vmin, tl.min(tl.where(m_j, r, float("inf")), 0))
    n = (end - start).to(tl.float32)
    mean = tl.div_rn(s, n)
    denom = 1.0
    if not RLOO:
        if STD == 0:
            ss = 0.0
            for j0 in range(start, end, BLOCK):
                m_j = (j0 + o_j) < end
                idx = tl.load(order_ptr + j0 + o_j, mask=m_j, other=0)
                c = tl.where(m_j, tl.load(r_ptr + idx, mask=m_j, other=0.0) - mean, 0.0)
                ss += tl.sum(c * c, 0)  # [BLOCK] -> scalar
            var = tl.div_rn(ss, tl.maximum(n - ddof, 1.0))
            denom = tl.sqrt_rn(var) + eps
        elif STD == 1:
            denom = tl.load(gstd_ptr) + eps
    flat = vmax == vmin
    for j0 in range(start, end, BLOCK):
        m_j = (j0 + o_j) < end
        idx = tl.load(order_ptr + j0 + o_j, mask=m_j, other=0)
        r = tl.load(r_ptr + idx, mask=m_j, other=0.0)
        if RLOO:
            a = tl.where(n > 1, r - tl.div_rn(s - r, tl.maximum(n - 1.0, 1.0)), 0.0)
        else:
            a = r - mean
            if STD != 2:
                a = tl.div_rn(a, a * 0.0 + denom)
        a = tl.where(flat, 0.0, a)
        if HAS_CLIP:
            a = tl.minimum(tl.maximum(a, -clip), clip)
        tl.store(out_ptr + idx, a, mask=m_j)


@launch_guard
def group_advantages_fwd(rewards, order, starts, global_std, *, mode, std, unbiased, eps, clip):
    """rewards [N] fp32, order [N] int64, starts [G + 1] int64, global_std [] fp32 -> advantages [N] fp32."""
    out = rewards.new_empty(rewards.shape)
    G = starts.numel() - 1
    if G <= 0:
        return out
    _group_advantages_fwd_kernel[(G,)](
        rewards, order, starts, global_std, out, float(eps), float(clip or 0.0), 1.0 if unbiased else 0.0,
        RLOO=mode == "rloo", STD=STD_CODES[std], HAS_CLIP=clip is not None, BLOCK=128,
    )
    return out
