"""Flow-GRPO Triton kernels (FORMULAS.md section 4): SDE step + log-prob, step log-prob recompute and its backward.
The flow policy loss (section 5) lives in `flow_loss.py` and reuses the launch plan below.

Legend: N samples (the batch dims S flattened: B for one step, T*B for a replay of T steps), D latent elements
per sample, P programs, C chunks per sample (P = N * C), BLOCK elements per loop iteration.

Step math (per sample n, fp32 whatever the input dtype), mean = c_x x + c_v v:
    sde: std_t = a sqrt(sigma / (1 - sigma')), sigma' = sigma_max where sigma == 1 else sigma
         c_x = 1 + std_t^2 dt / (2 sigma), c_v = (1 + std_t^2 (1 - sigma) / (2 sigma)) dt, s = std_t sqrt(-dt)
    cps: s = sigma_next sin(a pi / 2), k = sqrt(sigma_next^2 - s^2),
         c_x = (1 - sigma_next) + k, c_v = -sigma (1 - sigma_next) + (1 - sigma) k
    ode: c_x = 1, c_v = dt, s = 0
    logp_n = -q sum_d (x_next - mean)^2 / D + k,   dlogp_n / dv = 2 q c_v (x_next - mean) / D
    Gaussian:                    q = 1 / (2 s^2), k = -log s - log(2 pi) / 2
    Flow-GRPO's cps (SQ_ERR=1):  q = 1,           k = 0           (a runtime scalar: no second compile)
    (at s = 0, a cps step into sigma_next = 0, only SQ_ERR=1 is allowed by the op: the unselected Gaussian branch's
    inf never reaches q or k through tl.where, and next = mean + 0 * noise = mean)

Grid: one flat axis of P = N * C programs (never a y/z axis over samples, so no 65535 limit). Program p owns
chunk p % C of sample p // C: it computes the sample's coefficients once (a handful of scalar loads), then loops
over its chunk in BLOCK-element steps (vectorised loads; the row offset is int64, in-row offsets are int32 so D
must stay below 2^31). C is the largest count with N * C <= RESIDENT programs per SM x SMs (the kernel's resident
count in the compile report), so a launch is one wave: the replay at T10 x B32 took 640 programs where 528 fit
(a second, nearly empty wave); a chunk is a multiple of BLOCK.

Reduction (deterministic, one launch): each program writes its partial sum to part[N, C] (chunk 0 also adds the
-log s - log(2 pi)/2 term) and counts itself in on a per-sample counter; the last of a sample's C programs sums
its partials in a fixed order and writes logp (`_finish_sample`). Bit-identical run to run on one GPU and config;
a sampler step is one kernel launch (plus torch's noise draw), a replay's log-prob one.

Memory traffic, bytes counted once each way (bf16 inputs, fp32 outputs; E = N * D):
    step fwd    : read v, x, noise (3 * 2E), write mean, next (2 * 4E)         = 14E  (ode: 2 * 2E + 4E)
    logprob fwd : read v, x, x_next (2E + 2E + 4E if x_next is stored fp32)    =  8E, writes N floats
    logprob bwd : read v, x, x_next, write dv in v's dtype                     = 10E
Limits: the step's noise is read from memory (drawn by torch when the caller passes a generator, so a generator
gives the same noise as the reference); an in-kernel Philox stream would save 4E of traffic but would not match
the reference draw. Inputs must have a contiguous latent part per sample (launchers copy otherwise).
Codegen (checked by an ahead-of-time sm_90 compile, tests/test_flow_triton.py, no GPU run yet): all bf16 loads are
128-bit; the step kernel's two fp32 stores go through a shared-memory layout conversion (8 -> 4 elements per thread,
8 KiB), the first thing to try on the GPU if the step misses its bandwidth target (BLOCK 1024 at 8 warps avoids it,
at the cost of 64-bit bf16 loads).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._device import launch_guard, sm_count

KIND_SDE, KIND_CPS, KIND_ODE = 0, 1, 2
KINDS = {"sde": KIND_SDE, "cps": KIND_CPS, "ode": KIND_ODE}
_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))


@triton.jit
def _step_coeffs(p_sig, p_nxt, p_smax, i_n, stride_sig, stride_nxt, stride_smax, a, sin_a,
                 KIND: tl.constexpr, HAS_SMAX: tl.constexpr):
    """Per-sample (c_x, c_v, s) of one step, fp32 scalars; mean = c_x * x + c_v * v."""
    sig = tl.load(p_sig + i_n * stride_sig).to(tl.float32)
    nxt = tl.load(p_nxt + i_n * stride_nxt).to(tl.float32)
    dt = nxt - sig
    if KIND == 2:
        c_x = sig * 0.0 + 1.0
        c_v = dt
        s = sig * 0.0
    elif KIND == 1:
        s = nxt * sin_a
        k = tl.sqrt(tl.maximum(nxt * nxt - s * s, 0.0))
        c_x = (1.0 - nxt) + k
        c_v = -sig * (1.0 - nxt) + (1.0 - sig) * k
    else:
        sig_p = sig
        if HAS_SMAX:
            smax = tl.load(p_smax + i_n * stride_smax).to(tl.float32)
            sig_p = tl.where(sig == 1.0, smax, sig)
        std_t = a * tl.sqrt(sig / (1.0 - sig_p))
        var_over = std_t * std_t / (2.0 * sig)
        c_x = 1.0 + var_over * dt
        c_v = (1.0 + var_over * (1.0 - sig)) * dt
        s = std_t * tl.sqrt(-dt)
    return c_x, c_v, s


@triton.jit
def _logp_terms(s, sq_err):
    """(q, k) of logp = -q mean_d (x_next - mean)^2 + k: the Gaussian, or Flow-GRPO's cps score when sq_err."""
    gauss = sq_err == 0.0
    q = tl.where(gauss, 1.0 / (2.0 * s * s), 1.0)
    k = tl.where(gauss, -tl.log(s) - _HALF_LOG_2PI, 0.0)
    return q, k


@triton.jit
def _finish_sample(p_part, p_cnt, p_logp, part, i_n, i_p, n_chunks, CMAX: tl.constexpr):
    """Deterministic per-sample sum of the C chunk partials inside the same launch: each program stores its partial,
    then counts itself in (acq_rel atomic); the program that arrives last sums the sample's C partials in a fixed
    order, writes logp and resets the counter to 0 for the next launch (the counters are a zeroed workspace that
    every launch leaves zeroed)."""
    if n_chunks == 1:
        tl.store(p_logp + i_n, part)
    else:
        tl.store(p_part + i_p, part)
        done = tl.atomic_add(p_cnt + i_n, 1, sem="acq_rel")
        if done == n_chunks - 1:
            o_c = tl.arange(0, CMAX)
            b_p = tl.load(p_part + i_n * n_chunks + o_c, mask=o_c < n_chunks, other=0.0, volatile=True)
            # [CMAX] -> scalar
            tl.store(p_logp + i_n, tl.sum(b_p, axis=0))
            tl.atomic_xchg(p_cnt + i_n, 0)


@triton.jit
def _flow_sde_step_fwd_kernel(
    p_v, p_x, p_eps, p_sig, p_nxt, p_smax, p_mean, p_next, p_std, p_part, p_cnt, p_logp,
    a, sin_a, sq_err,
    # shapes
    D, n_chunks, chunk_len,
    # strides
    stride_v, stride_x, stride_eps, stride_out, stride_sig, stride_nxt, stride_smax,
    KIND: tl.constexpr, HAS_SMAX: tl.constexpr, BLOCK: tl.constexpr, CMAX: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_n = i_p // n_chunks
    i_c = i_p % n_chunks
    c_x, c_v, s = _step_coeffs(p_sig, p_nxt, p_smax, i_n, stride_sig, stride_nxt, stride_smax, a, sin_a,
                               KIND, HAS_SMAX)
    i_n64 = i_n.to(tl.int64)
    p_v += i_n64 * stride_v
    p_x += i_n64 * stride_x
    p_eps += i_n64 * stride_eps
    p_mean += i_n64 * stride_out
    p_next += i_n64 * stride_out
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, chunk_len, BLOCK):
        o_d = i_c * chunk_len + off + tl.arange(0, BLOCK)
        m_d = o_d < D
        b_v = tl.load(p_v + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_x = tl.load(p_x + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_mean = c_x * b_x + c_v * b_v
        tl.store(p_mean + o_d, b_mean, mask=m_d)
        if KIND != 2:
            b_eps = tl.load(p_eps + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_next = b_mean + s * b_eps
            tl.store(p_next + o_d, b_next, mask=m_d)
            b_d = b_next - b_mean
            acc += tl.where(m_d, b_d * b_d, 0.0)
    if i_c == 0:
        tl.store(p_std + i_n, s)
    if KIND != 2:
        # [BLOCK] -> scalar
        q, k = _logp_terms(s, sq_err)
        part = -tl.sum(acc, axis=0) * q / D
        part += tl.where(i_c == 0, k, 0.0)
        _finish_sample(p_part, p_cnt, p_logp, part, i_n, i_p, n_chunks, CMAX)


@triton.jit
def _flow_step_logprob_fwd_kernel(
    p_v, p_x, p_xn, p_sig, p_nxt, p_smax, p_part, p_cnt, p_logp,
    a, sin_a, sq_err,
    # shapes
    D, n_chunks, chunk_len,
    # strides
    stride_v, stride_x, stride_xn, stride_sig, stride_nxt, stride_smax,
    KIND: tl.constexpr, HAS_SMAX: tl.constexpr, BLOCK: tl.constexpr, CMAX: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_n = i_p // n_chunks
    i_c = i_p % n_chunks
    c_x, c_v, s = _step_coeffs(p_sig, p_nxt, p_smax, i_n, stride_sig, stride_nxt, stride_smax, a, sin_a,
                               KIND, HAS_SMAX)
    i_n64 = i_n.to(tl.int64)
    p_v += i_n64 * stride_v
    p_x += i_n64 * stride_x
    p_xn += i_n64 * stride_xn
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, chunk_len, BLOCK):
        o_d = i_c * chunk_len + off + tl.arange(0, BLOCK)
        m_d = o_d < D
        b_v = tl.load(p_v + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_x = tl.load(p_x + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_xn = tl.load(p_xn + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_d = b_xn - (c_x * b_x + c_v * b_v)
        acc += tl.where(m_d, b_d * b_d, 0.0)
    # [BLOCK] -> scalar
    q, k = _logp_terms(s, sq_err)
    part = -tl.sum(acc, axis=0) * q / D
    part += tl.where(i_c == 0, k, 0.0)
    _finish_sample(p_part, p_cnt, p_logp, part, i_n, i_p, n_chunks, CMAX)


@triton.jit
def _flow_step_logprob_bwd_kernel(
    p_g, p_v, p_x, p_xn, p_sig, p_nxt, p_smax, p_dv,
    a, sin_a, sq_err,
    # shapes
    D, n_chunks, chunk_len,
    # strides
    stride_g, stride_v, stride_x, stride_xn, stride_dv, stride_sig, stride_nxt, stride_smax,
    KIND: tl.constexpr, HAS_SMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_n = i_p // n_chunks
    i_c = i_p % n_chunks
    c_x, c_v, s = _step_coeffs(p_sig, p_nxt, p_smax, i_n, stride_sig, stride_nxt, stride_smax, a, sin_a,
                               KIND, HAS_SMAX)
    g = tl.load(p_g + i_n * stride_g).to(tl.float32)
    q, _ = _logp_terms(s, sq_err)
    coef = 2.0 * q * g * c_v / D
    i_n64 = i_n.to(tl.int64)
    p_v += i_n64 * stride_v
    p_x += i_n64 * stride_x
    p_xn += i_n64 * stride_xn
    p_dv += i_n64 * stride_dv
    for off in range(0, chunk_len, BLOCK):
        o_d = i_c * chunk_len + off + tl.arange(0, BLOCK)
        m_d = o_d < D
        b_v = tl.load(p_v + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_x = tl.load(p_x + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_xn = tl.load(p_xn + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_dv = coef * (b_xn - (c_x * b_x + c_v * b_v))
        tl.store(p_dv + o_d, b_dv.to(p_dv.dtype.element_ty), mask=m_d)


# ----------------------------------------------------------------------------------------------------------------
# launchers: tensors in, tensors out


# Programs per SM each kernel keeps resident on an H100 (the smallest over Triton 3.6 / 3.9 and the dtypes the trainer
# passes in the compile report, bench/kernel_report.py: with fp32 latents the replay kernels take 40 registers a
# thread, 6 programs of 8 warps per SM): a launch uses at most this many per SM, so it runs in one wave.
RESIDENT = {"step": 4, "logprob": 6, "loss": 8}


def plan(N, D, device, block=None, resident=4, share=1, spare=0):
    """(BLOCK, C chunks per sample, chunk length, num_warps): the most chunks per sample with N * C programs in one
    wave, at least one. One wave holds `resident` programs per SM; a launch that runs `share` such terms side by
    side plus `spare` other programs gives each term its part. `block` fixes BLOCK."""
    if N == 0 or D == 0:
        raise ValueError(f"flow kernels need at least one sample and one latent element, got {N} x {D}")
    target = (resident * sm_count(device) - spare) // share
    if block is None:
        block = max_block(device)
        if N * triton.cdiv(D, block) < target:
            block = max(128, min(block // 2, triton.next_power_of_2(D)))
    n_chunks = max(1, min(target // N, triton.cdiv(D, block)))
    chunk_len = triton.cdiv(triton.cdiv(D, n_chunks), block) * block
    return block, triton.cdiv(D, chunk_len), chunk_len, 8 if block >= 2048 else 4


_COUNTERS: dict = {}


def counters(device, n: int) -> torch.Tensor:
    """A zeroed int32 workspace of >= n per-sample counters for `_finish_sample`, one per (device, stream): every
    launch leaves it zeroed, so it is allocated (and zeroed) once, not per step."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


def max_block(device) -> int:
    """2048 elements per loop step on the GPU (8 per thread at 8 warps: 16-byte bf16 loads); 256 when
    interpreting, so small test shapes still split into several chunks and loop inside a chunk."""
    return 2048 if device.type in ("cuda", "meta") else 256


def rows(t, N):
    """[*S, ...] -> [N, D] with a contiguous latent part (a view when possible)."""
    t = t.reshape(N, t.numel() // N if N else 0)
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def per_sample(t, N):
    """fp32 scalar or batch-shaped tensor -> (flat tensor, stride): stride 0 broadcasts one value to N samples."""
    t = t.reshape(-1).contiguous()
    if t.numel() not in (1, N):
        raise ValueError(f"per-sample tensor has {t.numel()} values for {N} samples")
    return t, (1 if t.numel() > 1 else 0)


def _coeff_args(sig, nxt, smax, noise_level, kind, N, sq_err=False):
    sig, s_sig = per_sample(sig, N)
    nxt, s_nxt = per_sample(nxt, N)
    smax, s_smax = per_sample(smax, N) if smax is not None else (sig, 0)
    sin_a = math.sin(noise_level * math.pi / 2.0) if kind == KIND_CPS else 0.0
    return (sig, nxt, smax), (float(noise_level), sin_a, 1.0 if sq_err else 0.0), (s_sig, s_nxt, s_smax)


@launch_guard
def flow_sde_step_fwd(v, x, eps, sig, nxt, smax, noise_level, kind, N, sq_err=False):
    """-> (mean [N, D] fp32, next [N, D] fp32 | None for ode, std [N] fp32, logp [N] fp32 | None for ode)."""
    v, x = rows(v, N), rows(x, N)
    D = x.shape[1]
    ode = kind == KIND_ODE
    eps = x if ode else rows(eps, N)
    mean = torch.empty((N, D), dtype=torch.float32, device=x.device)
    nxt_out = mean if ode else torch.empty_like(mean)
    std = torch.empty(N, dtype=torch.float32, device=x.device)
    block, n_chunks, chunk_len, warps = plan(N, D, x.device, resident=RESIDENT["step"])
    part = torch.empty((N, n_chunks), dtype=torch.float32, device=x.device)
    logp = torch.empty(N, dtype=torch.float32, device=x.device)
    sigs, scal, strides = _coeff_args(sig, nxt, smax, noise_level, kind, N, sq_err)
    _flow_sde_step_fwd_kernel[(N * n_chunks,)](
        v, x, eps, *sigs, mean, nxt_out, std, part, counters(x.device, N), logp, *scal,
        D, n_chunks, chunk_len,
        v.stride(0), x.stride(0), eps.stride(0), mean.stride(0), *strides,
        KIND=kind, HAS_SMAX=smax is not None, BLOCK=block, CMAX=triton.next_power_of_2(n_chunks), num_warps=warps)
    if ode:
        return mean, None, std, None
    return mean, nxt_out, std, logp


@launch_guard
def flow_step_logprob_fwd(v, x, xn, sig, nxt, smax, noise_level, kind, N, sq_err=False):
    """-> logp [N] fp32 of the stored transitions x -> xn under velocity v."""
    v, x, xn = rows(v, N), rows(x, N), rows(xn, N)
    D = x.shape[1]
    block, n_chunks, chunk_len, warps = plan(N, D, x.device, resident=RESIDENT["logprob"])
    part = torch.empty((N, n_chunks), dtype=torch.float32, device=x.device)
    logp = torch.empty(N, dtype=torch.float32, device=x.device)
    sigs, scal, strides = _coeff_args(sig, nxt, smax, noise_level, kind, N, sq_err)
    _flow_step_logprob_fwd_kernel[(N * n_chunks,)](
        v, x, xn, *sigs, part, counters(x.device, N), logp, *scal,
        D, n_chunks, chunk_len,
        v.stride(0), x.stride(0), xn.stride(0), *strides,
        KIND=kind, HAS_SMAX=smax is not None, BLOCK=block, CMAX=triton.next_power_of_2(n_chunks), num_warps=warps)
    return logp


@launch_guard
def flow_step_logprob_bwd(g, v, x, xn, sig, nxt, smax, noise_level, kind, N, sq_err=False):
    """g [N] upstream dL/dlogp -> dv [N, D] in v's dtype."""
    v, x, xn = rows(v, N), rows(x, N), rows(xn, N)
    g = g.reshape(N)
    D = x.shape[1]
    dv = torch.empty((N, D), dtype=v.dtype, device=v.device)
    block, n_chunks, chunk_len, warps = plan(N, D, x.device, resident=RESIDENT["logprob"])
    sigs, scal, strides = _coeff_args(sig, nxt, smax, noise_level, kind, N, sq_err)
    _flow_step_logprob_bwd_kernel[(N * n_chunks,)](
        g, v, x, xn, *sigs, dv, *scal,
        D, n_chunks, chunk_len,
        g.stride(0), v.stride(0), x.stride(0), xn.stride(0), dv.stride(0), *strides,
        KIND=kind, HAS_SMAX=smax is not None, BLOCK=block, num_warps=warps)
    return dv
