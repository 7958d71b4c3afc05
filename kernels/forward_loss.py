"""Forward-process image RL losses (FORMULAS.md section 7): DiffusionNFT and AWM, loss + metrics + dL/dv in one launch.

Legend: N rows (sample, trained timestep), D latent elements per row, BLOCK elements per streaming step, TAIL the
row part kept in registers, H = D - (that part) the streamed head (a multiple of BLOCK), u = noise - x0.

Per row (fp32 whatever the input dtypes; e1, e2 the per-element errors, kd = v - v_ref, od = v - v_old):
    nft: e1 = t (u - (b v + (1 - b) v_old)), e2 = t (u - ((1 + b) v_old - b v))
         wp = max(sum|e1| / D, 1e-5), wn = max(sum|e2| / D, 1e-5), r = clip(A_c / (2 A_max) + 1/2, 0, 1)
         pos = sum e1^2 / (D wp), neg = sum e2^2 / (D wn), policy = A_max (r pos + (1 - r) neg) / b
         dL/dv = [-2 A_max t r / (D wp) e1 + 2 A_max t (1 - r) / (D wn) e2 + 2 beta_kl / D kd] / N
    awm: e1 = v - u, m = sum e1^2 / D, q = (m + 1e-10)^p, policy = A_c / A_max (q - 1e-10^p) t / p
         dL/dv = [2 A_c / A_max t q / (m + 1e-10) / D e1 + 2 beta_kl / D kd + 2 beta_old / D od] / N
(A_c = clip(A, -A_max, A_max); b, the weights wp, wn and every input but v carry no gradient.)

One launch, one program per row. The gradient of a row needs its whole-row sums (wp, wn, m) before the first
element of dL/dv can be written, so a row is either held on chip or read twice:
  - the last TAIL_MAX elements of the row (all of it when D <= TAIL_MAX) are loaded once as one register block;
    their e1 / e2 / kd / od stay in registers across the row reduction and dL/dv is written from them;
  - the first H = D - (TAIL part) elements (H = 0 when D <= TAIL_MAX) are streamed in BLOCK steps for the sums
    (the next step's loads in flight during this step's reductions), and after the reduction streamed again in
    REVERSE order to write dL/dv: the second sweep starts with what the first read last, the part most likely
    still in L2.
Reads per input: exactly one for D <= TAIL_MAX (8192 on a GPU: the DC-AE 32x16x16 latents and smaller); for
D > TAIL_MAX, 1 + H / D from the kernel's side (1.875 at SD3's 16x64x64, D = 65536), of which the L2 serves
what it still holds (the working set is the resident programs' rows: unmeasured). dL/dv is written once. Without
a gradient (WRITE_GRAD off: no_grad, or v not requiring grad) there is no second sweep: every input is read once.
Each program writes its row's partial sums, counts itself in (acq_rel atomic on a zeroed workspace counter, left
zeroed for the next launch); the last program sums the N rows in a fixed order (deterministic, no float atomics)
into out = [loss, policy_loss, kl_loss, old_deviate, positive_loss | matching_mse, negative_loss].
Traffic (E = N D, es bytes per input element): 5 E es read (4 without v_ref or, for awm, without v_old) once,
plus H / D of that again for long rows; dL/dv written once (E x its element size); O(N) floats besides.
Codegen (bench/kernel_report.py, sm_90, Triton 3.9 and 3.6, no GPU run yet): 16 warps, 74-115 registers, no spills,
one program per SM, 16-byte loads and stores; at N = 320 rows that is 2.4 waves. Estimates: 0.83 of copy bandwidth
for D = 8192 (one read); for D = 65536 0.83 from the bytes in flight times 0.58 for re-reads that all miss L2, 0.48.
Limits: one program per row, so a batch of few long rows keeps few SMs busy (N = 32 rows: 32 of 132 SMs); the
latent part of each row must be contiguous (the op copies otherwise).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import launch_guard
from .flow import counters
from .logprobs import _store_dx

NFT, AWM = 0, 1
ALGOS = {"nft": NFT, "awm": AWM}
NPART = 6  # loss, policy, kl, old_deviate, positive | matching_mse, negative
NFT_FLOOR = tl.constexpr(1e-5)  # DiffusionNFT's floor on a row's mean |x0 error|
AWM_EPS = 1e-10  # AWM's ghuber offset
_AWM_EPS = tl.constexpr(AWM_EPS)


@triton.jit
def _errors(b_v, b_vo, b_x0, b_eps, b_vr, t, b, ALGO: tl.constexpr, HAS_REF: tl.constexpr,
            HAS_OLD: tl.constexpr):
    """(e1, e2, kd, od) of one tile in fp32; zero inputs (masked lanes) give zero everywhere."""
    v = b_v.to(tl.float32)
    u = b_eps.to(tl.float32) - b_x0.to(tl.float32)
    vo = b_vo.to(tl.float32)
    if ALGO == 0:
        e1 = t * (u - (b * v + (1.0 - b) * vo))
        e2 = t * (u - ((1.0 + b) * vo - b * v))
    else:
        e1 = v - u
        e2 = e1 * 0.0
    kd = v * 0.0
    if HAS_REF:
        kd = v - b_vr.to(tl.float32)
    od = v * 0.0
    if HAS_OLD:
        od = v - vo
    return e1, e2, kd, od


@triton.jit
def _load5(p_v, p_vo, p_x0, p_eps, p_vr, o, m, HAS_REF: tl.constexpr, HAS_OLD: tl.constexpr):
    """The five inputs of one tile in their own dtypes (v_old / v_ref not read where absent)."""
    b_v = tl.load(p_v + o, mask=m, other=0.0)
    b_x0 = tl.load(p_x0 + o, mask=m, other=0.0)
    b_eps = tl.load(p_eps + o, mask=m, other=0.0)
    b_vo = b_v
    if HAS_OLD:
        b_vo = tl.load(p_vo + o, mask=m, other=0.0)
    b_vr = b_v
    if HAS_REF:
        b_vr = tl.load(p_vr + o, mask=m, other=0.0)
    return b_v, b_vo, b_x0, b_eps, b_vr


@triton.jit
def _row_scalars(s_a1, s_a2, s_s1, s_s2, s_k, s_o, t, A, b, adv_clip, p, eps_p, beta_kl, beta_old, inv_d, inv_n,
                 ALGO: tl.constexpr):
    """(row loss, policy, kl, old_deviate, pos | m, neg, c1, c2, ck, co): the row's values and dL/dv coefficients
    of e1, e2, kd, od (already divided by N)."""
    kl = s_k * inv_d
    od = s_o * inv_d
    ck = 2.0 * beta_kl * inv_d * inv_n
    if ALGO == 0:
        wp = tl.maximum(s_a1 * inv_d, NFT_FLOOR)
        wn = tl.maximum(s_a2 * inv_d, NFT_FLOOR)
        r = tl.minimum(tl.maximum(A / (2.0 * adv_clip) + 0.5, 0.0), 1.0)
        x1 = s_s1 * inv_d / wp
        x2 = s_s2 * inv_d / wn
        policy = adv_clip * (r * x1 + (1.0 - r) * x2) / b
        c1 = -2.0 * adv_clip * t * r / wp * inv_d * inv_n
        c2 = 2.0 * adv_clip * t * (1.0 - r) / wn * inv_d * inv_n
        co = 0.0 * c1
        loss = policy + beta_kl * kl
    else:
        x1 = s_s1 * inv_d
        x2 = 0.0 * x1
        q = tl.exp(p * tl.log(x1 + _AWM_EPS))
        a_n = A / adv_clip
        policy = a_n * (q - eps_p) * t / p
        c1 = 2.0 * a_n * t * (q / (x1 + _AWM_EPS)) * inv_d * inv_n
        c2 = 0.0 * c1
        co = 2.0 * beta_old * inv_d * inv_n
        loss = policy + beta_kl * kl + beta_old * od
    return loss, policy, kl, od, x1, x2, c1, c2, ck, co


@triton.jit
def _finish(p_part, p_cnt, p_out, N, inv_n, NPART: tl.constexpr, BLOCK_N: tl.constexpr):
    """Called by every program after storing its row's partials: the last to arrive sums the [N, NPART] partials
    in a fixed order into out, then leaves the counter zeroed for the next launch."""
    done = tl.atomic_add(p_cnt, 1, sem="acq_rel")
    if done == N - 1:
        o_k = tl.arange(0, 8)
        acc = tl.zeros([BLOCK_N, 8], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m = (o_n[:, None] < N) & (o_k[None, :] < NPART)
            acc += tl.load(p_part + o_n[:, None] * NPART + o_k[None, :], mask=m, other=0.0, volatile=True)
        # [BLOCK_N, 8] -> [8]
        tot = tl.sum(acc, axis=0) * inv_n
        tl.store(p_out + o_k, tot, mask=o_k < NPART)
        tl.atomic_xchg(p_cnt, 0)


@triton.jit
def _head_sums(p_v, p_vo, p_x0, p_eps, p_vr, H, t, b, ALGO: tl.constexpr, HAS_REF: tl.constexpr,
               HAS_OLD: tl.constexpr, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """Sweep 1 over the head [0, H): (sum |e1|, sum |e2|, sum e1^2, sum e2^2, sum kd^2, sum od^2); the next step's
    loads are issued before this step's math (a register double buffer)."""
    o_b = tl.arange(0, BLOCK)
    acc_a1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_a2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_s1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_s2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK], dtype=tl.float32)
    if STREAM:
        n_v, n_vo, n_x0, n_eps, n_vr = _load5(p_v, p_vo, p_x0, p_eps, p_vr, o_b, o_b < H, HAS_REF, HAS_OLD)
        for h0 in range(0, H, BLOCK):
            e1, e2, kd, od = _errors(n_v, n_vo, n_x0, n_eps, n_vr, t, b, ALGO, HAS_REF, HAS_OLD)
            o_n = h0 + BLOCK + o_b
            n_v, n_vo, n_x0, n_eps, n_vr = _load5(p_v, p_vo, p_x0, p_eps, p_vr, o_n, o_n < H, HAS_REF, HAS_OLD)
            acc_s1 += e1 * e1
            if ALGO == 0:
                acc_a1 += tl.abs(e1)
                acc_a2 += tl.abs(e2)
                acc_s2 += e2 * e2
            acc_k += kd * kd
            acc_o += od * od
    # [BLOCK] -> scalar, six times
    return (tl.sum(acc_a1, 0), tl.sum(acc_a2, 0), tl.sum(acc_s1, 0), tl.sum(acc_s2, 0), tl.sum(acc_k, 0),
            tl.sum(acc_o, 0))


@triton.jit
def _head_grad(p_v, p_vo, p_x0, p_eps, p_vr, p_dv, H, t, b, c1, c2, ck, co, ALGO: tl.constexpr,
               HAS_REF: tl.constexpr, HAS_OLD: tl.constexpr, BLOCK: tl.constexpr, BF16_RNE_BITS: tl.constexpr):
    """Sweep 2 over the head in reverse (what sweep 1 read last comes first, the part most likely still in L2):
    dL/dv = c1 e1 + c2 e2 + ck kd + co od, again double-buffered."""
    o_b = tl.arange(0, BLOCK)
    o_p = H - BLOCK + o_b
    n_v, n_vo, n_x0, n_eps, n_vr = _load5(p_v, p_vo, p_x0, p_eps, p_vr, o_p, o_p >= 0, HAS_REF, HAS_OLD)
    for j in range(0, H, BLOCK):
        e1, e2, kd, od = _errors(n_v, n_vo, n_x0, n_eps, n_vr, t, b, ALGO, HAS_REF, HAS_OLD)
        o_r = H - BLOCK - j + o_b
        o_p = o_r - BLOCK
        n_v, n_vo, n_x0, n_eps, n_vr = _load5(p_v, p_vo, p_x0, p_eps, p_vr, o_p, o_p >= 0, HAS_REF, HAS_OLD)
        _store_dx(p_dv + o_r, c1 * e1 + c2 * e2 + ck * kd + co * od, o_r < H, BF16_RNE_BITS)


@triton.jit
def _forward_loss_fwd_kernel(
    p_v, p_vo, p_x0, p_eps, p_vr, p_t, p_a, p_dv, p_part, p_cnt, p_out,
    b, adv_clip, p, eps_p, beta_kl, beta_old, inv_d, inv_n,
    # shapes
    N, D, H,
    # strides (rows; the latent part of every [N, D] tensor is contiguous)
    s_v, s_vo, s_x0, s_eps, s_vr, s_dv, s_t, s_a,
    ALGO: tl.constexpr, HAS_REF: tl.constexpr, HAS_OLD: tl.constexpr, WRITE_GRAD: tl.constexpr, STREAM: tl.constexpr,
    NPART: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr,
    BF16_RNE_BITS: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    t = tl.load(p_t + i_n * s_t).to(tl.float32)
    A = tl.load(p_a + i_n * s_a).to(tl.float32)
    A = tl.minimum(tl.maximum(A, -adv_clip), adv_clip)
    p_v += i_n * s_v
    p_vo += i_n * s_vo
    p_x0 += i_n * s_x0
    p_eps += i_n * s_eps
    p_vr += i_n * s_vr
    p_dv += i_n * s_dv
    h_a1, h_a2, h_s1, h_s2, h_k, h_o = _head_sums(p_v, p_vo, p_x0, p_eps, p_vr, H, t, b, ALGO, HAS_REF, HAS_OLD,
                                                  STREAM, BLOCK)
    # the row's last part [H, D), kept in registers across the row reduction
    o_t = H + tl.arange(0, TAIL)
    m_t = o_t < D
    t_v, t_vo, t_x0, t_eps, t_vr = _load5(p_v, p_vo, p_x0, p_eps, p_vr, o_t, m_t, HAS_REF, HAS_OLD)
    f1, f2, fk, fo = _errors(t_v, t_vo, t_x0, t_eps, t_vr, t, b, ALGO, HAS_REF, HAS_OLD)
    # [TAIL] -> scalar, one per sum
    loss, policy, kl, od_row, x1, x2, c1, c2, ck, co = _row_scalars(
        h_a1 + tl.sum(tl.abs(f1), 0), h_a2 + tl.sum(tl.abs(f2), 0), h_s1 + tl.sum(f1 * f1, 0),
        h_s2 + tl.sum(f2 * f2, 0), h_k + tl.sum(fk * fk, 0), h_o + tl.sum(fo * fo, 0), t, A, b, adv_clip, p, eps_p,
        beta_kl, beta_old, inv_d, inv_n, ALGO)
    if WRITE_GRAD:
        _store_dx(p_dv + o_t, c1 * f1 + c2 * f2 + ck * fk + co * fo, m_t, BF16_RNE_BITS)
        if STREAM:
            _head_grad(p_v, p_vo, p_x0, p_eps, p_vr, p_dv, H, t, b, c1, c2, ck, co, ALGO, HAS_REF, HAS_OLD, BLOCK,
                       BF16_RNE_BITS)
    p_row = p_part + i_n * NPART
    tl.store(p_row + 0, loss)
    tl.store(p_row + 1, policy)
    tl.store(p_row + 2, kl)
    tl.store(p_row + 3, od_row)
    tl.store(p_row + 4, x1)
    tl.store(p_row + 5, x2)
    _finish(p_part, p_cnt, p_out, N, inv_n, NPART, BLOCK_N)


# ----------------------------------------------------------------------------------------------------------------
# launcher


TAIL_MAX = 8192  # elements of a row kept in registers on a GPU (16 per thread at 16 warps)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_plan(D, device):
    """(BLOCK, TAIL, H, num_warps) for rows of D elements. Under the interpreter the blocks are small, so that
    the test shapes exercise the streamed head and its reverse sweep."""
    gpu = device.type in ("cuda", "meta")
    tail_max, block = (TAIL_MAX, 4096) if gpu else (256, 64)
    if D <= tail_max:
        tail = max(16, triton.next_power_of_2(D))
        return min(block, tail), tail, 0, max(4, min(16, tail // 512))
    H = triton.cdiv(D - tail_max, block) * block
    return block, tail_max, H, 16 if gpu else 4


def grad_dtype(v_dtype):
    """dL/dv is written in v's dtype, except fp16 (its range would flush a mean loss's gradient: fp32)."""
    return torch.float32 if v_dtype == torch.float16 else v_dtype


@launch_guard
def forward_process_loss_fwd(v, v_old, x0, noise, v_ref, t, adv, *, algo, nft_beta, adv_clip, awm_power, beta_kl,
                             beta_old, write_grad):
    """[N, D] row views (contiguous latent part) and [N] t / advantages -> (out [6] fp32, dL/dv [N, D] | None)."""
    N, D = v.shape
    dev = v.device
    BLOCK, TAIL, H, warps = row_plan(D, dev)
    dv = torch.empty((N, D), dtype=grad_dtype(v.dtype), device=dev) if write_grad else None
    part = torch.empty((N, NPART), dtype=torch.float32, device=dev)
    out = torch.empty(NPART, dtype=torch.float32, device=dev)
    vo = v if v_old is None else v_old
    vr = v if v_ref is None else v_ref
    _forward_loss_fwd_kernel[(N,)](
        v, vo, x0, noise, vr, t, adv, dv if write_grad else v, part, counters(dev, 1), out,
        float(nft_beta), float(adv_clip), float(awm_power), AWM_EPS ** float(awm_power), float(beta_kl),
        float(beta_old), 1.0 / D, 1.0 / N,
        N, D, H,
        v.stride(0), vo.stride(0), x0.stride(0), noise.stride(0), vr.stride(0), dv.stride(0) if write_grad else 0,
        t.stride(0), adv.stride(0),
        ALGO=ALGOS[algo], HAS_REF=v_ref is not None, HAS_OLD=v_old is not None, WRITE_GRAD=write_grad, STREAM=H > 0,
        NPART=NPART, BLOCK=BLOCK, TAIL=TAIL, BLOCK_N=min(64 * warps, max(16, triton.next_power_of_2(N))),
        BF16_RNE_BITS=write_grad and dv.dtype == torch.bfloat16 and interpreting(), num_warps=warps)
    return out, dv

