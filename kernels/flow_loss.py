"""Flow-GRPO policy loss kernels (FORMULAS.md section 5): clipped surrogate + velocity MSE + latent KL, fused.

Legend: M = T*B (step, sample) log-probs; rows n = 0..M-1 of the latent tensors ([*S, ...] flattened to [M, D]);
D_v, D_k latent elements per row of the velocity / mean tensors; C_v, C_k chunks per row; P programs.

    pg      = mean_j max(-A r_j, -A clip(r_j, 1 - eps, 1 + eps)),  r_j = exp(logp_j - old_j)
    mse     = mean (v - v_ref)^2                                    (UniGRPO velocity regulariser)
    kl      = mean (mean - ref_mean)^2 / (2 std_n^2)                (exact Gaussian KL between steps of std s)
    loss    = pg + beta_v mse + beta_kl kl
    dloss/dlogp_j = -A r_j / M where the unclipped branch is the max, else 0 (ties: inside the clip range or A = 0,
                    where both branches have the same gradient)
    dloss/dv = beta_v 2 (v - v_ref) / (M D_v);  dloss/dmean = beta_kl (mean - ref_mean) / (std_n^2 M D_k)

Forward = 2 launches: `_flow_policy_loss_fwd_kernel` runs P_v + P_k + 1 programs on one flat grid: programs
[0, P_v) reduce velocity-MSE chunks, [P_v, P_v + P_k) latent-KL chunks, the last one the M log-probs (surrogate,
its gradient, the ratio metrics). Each writes partial sums; `_flow_policy_loss_combine_kernel` (one program) adds
them in a fixed order (deterministic, no atomics) into the loss and the six metrics.
Backward = 1 launch over the same ranges: dv and dmean chunks, and the last program scales dlogp by the upstream
gradient (read from device memory: no host sync). The MSE/KL gradients are recomputed from (a, b) rather than
stored by the forward: the bytes are the same (2 reads + 1 write vs a stored gradient plus a scale pass) and no
[M, D] gradient is held between forward and backward.
Traffic (E = M D, inputs of es bytes): forward 4E es (v, v_ref, mean, ref_mean), backward 6E es (+ dv, dmean).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import launch_guard
from .flow import RESIDENT, max_block, per_sample, plan, rows


@triton.jit
def _sqdiff_chunk(p_a, p_b, i_n, i_c, chunk_len, D, stride_a, stride_b, BLOCK: tl.constexpr):
    """sum over chunk i_c of row i_n of (a - b)^2, fp32."""
    i_n64 = i_n.to(tl.int64)
    p_a += i_n64 * stride_a
    p_b += i_n64 * stride_b
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, chunk_len, BLOCK):
        o_d = i_c * chunk_len + off + tl.arange(0, BLOCK)
        m_d = o_d < D
        b_d = (tl.load(p_a + o_d, mask=m_d, other=0.0).to(tl.float32)
               - tl.load(p_b + o_d, mask=m_d, other=0.0).to(tl.float32))
        acc += b_d * b_d
    # [BLOCK] -> scalar
    return tl.sum(acc, axis=0)


@triton.jit
def _sqdiff_chunk_grad(p_a, p_b, p_da, coef, i_n, i_c, chunk_len, D, stride_a, stride_b, stride_da,
                       BLOCK: tl.constexpr):
    """da = coef (a - b) over chunk i_c of row i_n, stored in da's dtype."""
    i_n64 = i_n.to(tl.int64)
    p_a += i_n64 * stride_a
    p_b += i_n64 * stride_b
    p_da += i_n64 * stride_da
    for off in range(0, chunk_len, BLOCK):
        o_d = i_c * chunk_len + off + tl.arange(0, BLOCK)
        m_d = o_d < D
        b_d = (tl.load(p_a + o_d, mask=m_d, other=0.0).to(tl.float32)
               - tl.load(p_b + o_d, mask=m_d, other=0.0).to(tl.float32))
        tl.store(p_da + o_d, (coef * b_d).to(p_da.dtype.element_ty), mask=m_d)


@triton.jit
def _pg_terms(p_logp, p_old, p_adv, p_dlogp, p_part, clip, M, B, BLOCK_M: tl.constexpr):
    """The M log-probs: dlogp = d pg / d logp, and part[0:4] = mean pg, clip fraction, mean ratio, approx KL."""
    acc_pg = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_M], dtype=tl.float32)
    for off in range(0, M, BLOCK_M):
        o_m = off + tl.arange(0, BLOCK_M)
        m_m = o_m < M
        b_lr = (tl.load(p_logp + o_m, mask=m_m, other=0.0).to(tl.float32)
                - tl.load(p_old + o_m, mask=m_m, other=0.0).to(tl.float32))
        b_a = tl.load(p_adv + o_m % B, mask=m_m, other=0.0).to(tl.float32)
        b_r = tl.exp(b_lr)
        b_un = -b_a * b_r
        b_cl = -b_a * tl.minimum(tl.maximum(b_r, 1.0 - clip), 1.0 + clip)
        tl.store(p_dlogp + o_m, tl.where(b_un >= b_cl, b_un, 0.0) / M, mask=m_m)
        acc_pg += tl.where(m_m, tl.maximum(b_un, b_cl), 0.0)
        acc_clip += tl.where(m_m & (tl.abs(b_r - 1.0) > clip), 1.0, 0.0)
        acc_r += tl.where(m_m, b_r, 0.0)
        acc_kl += 0.5 * b_lr * b_lr
    # [BLOCK_M] -> scalar, four times
    tl.store(p_part + 0, tl.sum(acc_pg, axis=0) / M)
    tl.store(p_part + 1, tl.sum(acc_clip, axis=0) / M)
    tl.store(p_part + 2, tl.sum(acc_r, axis=0) / M)
    tl.store(p_part + 3, tl.sum(acc_kl, axis=0) / M)


@triton.jit
def _flow_policy_loss_fwd_kernel(
    p_logp, p_old, p_adv, p_dlogp, p_v, p_vref, p_mean, p_mref, p_std, p_part,
    clip,
    # shapes
    M, B, D_v, D_k, C_v, C_k, chunk_v, chunk_k, P_v, P_k,
    # strides
    stride_v, stride_vref, stride_mean, stride_mref, stride_std,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """part = [pg, clip_frac, ratio_mean, approx_kl, MSE partials (P_v), weighted KL partials (P_k)]."""
    i_p = tl.program_id(0)
    if i_p < P_v:
        part = _sqdiff_chunk(p_v, p_vref, i_p // C_v, i_p % C_v, chunk_v, D_v, stride_v, stride_vref, BLOCK)
        tl.store(p_part + 4 + i_p, part)
    elif i_p < P_v + P_k:
        i_q = i_p - P_v
        i_n = i_q // C_k
        s = tl.load(p_std + i_n * stride_std).to(tl.float32)
        part = _sqdiff_chunk(p_mean, p_mref, i_n, i_q % C_k, chunk_k, D_k, stride_mean, stride_mref, BLOCK)
        tl.store(p_part + 4 + i_p, part * 0.5 / (s * s))
    else:
        _pg_terms(p_logp, p_old, p_adv, p_dlogp, p_part, clip, M, B, BLOCK_M)


@triton.jit
def _flow_policy_loss_combine_kernel(
    p_part, p_out,
    beta_v, beta_kl, inv_numel_v, inv_numel_k,
    # shapes
    P_v, P_k,
    BLOCK: tl.constexpr,
):
    """out = [loss, pg, clip_frac, ratio_mean, approx_kl, mse, kl]: a fixed-order sum of the partials."""
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, P_v + P_k, BLOCK):
        o = off + tl.arange(0, BLOCK)
        b = tl.load(p_part + 4 + o, mask=o < P_v + P_k, other=0.0)
        acc_v += tl.where(o < P_v, b, 0.0)
        acc_k += tl.where(o >= P_v, b, 0.0)
    # [BLOCK] -> scalar, twice
    mse = tl.sum(acc_v, axis=0) * inv_numel_v
    kl = tl.sum(acc_k, axis=0) * inv_numel_k
    pg = tl.load(p_part)
    tl.store(p_out, pg + beta_v * mse + beta_kl * kl)
    for i in tl.static_range(4):
        tl.store(p_out + 1 + i, tl.load(p_part + i))
    tl.store(p_out + 5, mse)
    tl.store(p_out + 6, kl)


@triton.jit
def _flow_policy_loss_bwd_kernel(
    p_g, p_dlogp, p_dlogp_out, p_v, p_vref, p_dv, p_mean, p_mref, p_std, p_dmean,
    scale_v, scale_k,
    # shapes
    M, D_v, D_k, C_v, C_k, chunk_v, chunk_k, P_v, P_k,
    # strides
    stride_v, stride_vref, stride_dv, stride_mean, stride_mref, stride_dmean, stride_std,
    HAS_DLOGP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dv = g scale_v 2 (v - v_ref); dmean = g scale_k (mean - ref_mean) / std_n^2; dlogp_out = g dlogp."""
    i_p = tl.program_id(0)
    g = tl.load(p_g).to(tl.float32)
    if i_p < P_v:
        _sqdiff_chunk_grad(p_v, p_vref, p_dv, 2.0 * g * scale_v, i_p // C_v, i_p % C_v, chunk_v, D_v,
                           stride_v, stride_vref, stride_dv, BLOCK)
    elif i_p < P_v + P_k:
        i_q = i_p - P_v
        i_n = i_q // C_k
        s = tl.load(p_std + i_n * stride_std).to(tl.float32)
        _sqdiff_chunk_grad(p_mean, p_mref, p_dmean, g * scale_k / (s * s), i_n, i_q % C_k, chunk_k, D_k,
                           stride_mean, stride_mref, stride_dmean, BLOCK)
    elif HAS_DLOGP:
        for off in range(0, M, BLOCK_M):
            o_m = off + tl.arange(0, BLOCK_M)
            b = tl.load(p_dlogp + o_m, mask=o_m < M, other=0.0) * g
            tl.store(p_dlogp_out + o_m, b.to(p_dlogp_out.dtype.element_ty), mask=o_m < M)


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _term(a, b, M, device, block):
    """(a rows, b rows, D, C, chunk length, P) of one regulariser; a None term gets P = 0 (no programs)."""
    if a is None:
        return None, None, 1, 1, block, 0
    a, b = rows(a, M), rows(b, M)
    # both regularisers and the one surrogate program share a launch: each regulariser gets half of the rest
    _, n_chunks, chunk_len, _ = plan(M, a.shape[1], device, block=block, resident=RESIDENT["loss"], share=2, spare=1)
    return a, b, a.shape[1], n_chunks, chunk_len, M * n_chunks


def _block_m(M):
    return min(4096, max(128, triton.next_power_of_2(M)))


@launch_guard
def flow_policy_loss_fwd(logp, old_logp, advantages, velocity, ref_velocity, mean, ref_mean, std, clip_range,
                         beta_velocity, beta_kl):
    """-> (out [7] fp32 = loss, pg, clip_frac, ratio_mean, approx_kl, velocity_mse, latent_kl;
    dpg/dlogp fp32 with logp's shape). Absent terms (None tensors) contribute 0."""
    dev = logp.device
    lp, old, adv = logp.reshape(-1).contiguous(), old_logp.reshape(-1).contiguous(), advantages.contiguous()
    M = lp.numel()
    block = max_block(dev)
    v, vref, D_v, C_v, chunk_v, P_v = _term(velocity, ref_velocity, M, dev, block)
    mn, mref, D_k, C_k, chunk_k, P_k = _term(mean, ref_mean, M, dev, block)
    s, s_stride = per_sample(std, M) if mean is not None else (lp, 0)
    dlogp = torch.empty(M, dtype=torch.float32, device=dev)
    part = torch.empty(4 + P_v + P_k, dtype=torch.float32, device=dev)
    _flow_policy_loss_fwd_kernel[(P_v + P_k + 1,)](
        lp, old, adv, dlogp, v if v is not None else lp, vref if v is not None else lp,
        mn if mn is not None else lp, mref if mn is not None else lp, s, part, float(clip_range),
        M, adv.numel(), D_v, D_k, C_v, C_k, chunk_v, chunk_k, P_v, P_k,
        v.stride(0) if v is not None else 0, vref.stride(0) if v is not None else 0,
        mn.stride(0) if mn is not None else 0, mref.stride(0) if mn is not None else 0, s_stride,
        BLOCK=block, BLOCK_M=_block_m(M), num_warps=8 if block >= 2048 else 4)
    out = torch.empty(7, dtype=torch.float32, device=dev)
    _flow_policy_loss_combine_kernel[(1,)](
        part, out, float(beta_velocity), float(beta_kl), 1.0 / (M * D_v), 1.0 / (M * D_k), P_v, P_k,
        BLOCK=min(1024, max(128, triton.next_power_of_2(P_v + P_k))), num_warps=4)
    return out, dlogp.reshape(logp.shape)


@launch_guard
def flow_policy_loss_bwd(g, dlogp, need_logp, velocity, ref_velocity, mean, ref_mean, std, beta_velocity, beta_kl):
    """g: 1-element upstream dL/dloss (read on device). velocity / mean None: no gradient for that term (P = 0).
    -> (dL/dlogp fp32 | None when not need_logp, dv in v's dtype | None, dmean in mean's dtype | None)."""
    dev = g.device
    M = dlogp.numel()
    block = max_block(dev)
    v, vref, D_v, C_v, chunk_v, P_v = _term(velocity, ref_velocity, M, dev, block)
    mn, mref, D_k, C_k, chunk_k, P_k = _term(mean, ref_mean, M, dev, block)
    s, s_stride = per_sample(std, M) if mean is not None else (dlogp, 0)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev) if v is not None else None
    dm = torch.empty(mn.shape, dtype=mn.dtype, device=dev) if mn is not None else None
    d_lp = torch.empty(dlogp.shape, dtype=torch.float32, device=dev) if need_logp else None
    flat = dlogp.reshape(-1)
    _flow_policy_loss_bwd_kernel[(P_v + P_k + 1,)](
        g.reshape(1).float(), flat, d_lp if d_lp is not None else flat,
        v if v is not None else flat, vref if v is not None else flat, dv if dv is not None else flat,
        mn if mn is not None else flat, mref if mn is not None else flat, s, dm if dm is not None else flat,
        float(beta_velocity) / (M * D_v), float(beta_kl) / (M * D_k),
        M, D_v, D_k, C_v, C_k, chunk_v, chunk_k, P_v, P_k,
        *(t.stride(0) if t is not None else 0 for t in (v, vref, dv, mn, mref, dm)), s_stride,
        HAS_DLOGP=d_lp is not None, BLOCK=block, BLOCK_M=_block_m(M), num_warps=8 if block >= 2048 else 4)
    return (d_lp, None if dv is None else dv.reshape(velocity.shape),
            None if dm is None else dm.reshape(mean.shape))
