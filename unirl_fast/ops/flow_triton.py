"""Triton paths of the Flow-GRPO ops (registered for `impl="triton"` / `"auto"` on CUDA), as torch.library custom ops
so `torch.compile(fullgraph=True)` traces them as single nodes.

- `unirl_fast::flow_sde_step`: one fused pass (mean, next sample, per-sample log-prob); not differentiable
  (a sampler step is data for the trainer).
- `unirl_fast::flow_step_logprob` (+ `_bwd`): the training recompute; differentiable in velocity only. Backward is
  one fused pass recomputing the mean from (v, x) rather than saving it (saves an fp32 [N, D] tensor per step).
- `unirl_fast::flow_policy_loss` (+ `_bwd`): clipped surrogate, velocity MSE and latent KL in two launches
  (kernels/flow_loss.py); the surrogate's gradient ([T, B] floats) comes out of the forward, the MSE/KL gradients
  are recomputed in one backward launch (same bytes as storing them, and nothing [N, D] held in between).

Shapes (see `unirl_fast.ops.flow`): S the batch dims ([B] or [T, B]), N = prod(S) samples, latent dims after S.
Latent-KL convention: (mean - ref_mean)^2 / (2 std^2), the exact Gaussian KL with the step std (FORMULAS.md 5).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import flow as K
from ..kernels import flow_loss as KL
from ._dispatch import register_triton

_METRICS = ("pg_loss", "clip_frac", "ratio_mean", "approx_kl", "velocity_mse", "latent_kl")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _on(t: Optional[Tensor], device) -> Optional[Tensor]:
    return None if t is None else t.to(device=device, dtype=torch.float32)


def _sq_err(logprob, kind) -> bool:
    """Flow-GRPO's cps score -(x_next - mean)^2 (FORMULAS.md 4); every other step is scored with the Gaussian."""
    return logprob == "flow_grpo" and kind == K.KIND_CPS


# ---------------------------------------------------------------------------------------------------- step


@torch.library.custom_op("unirl_fast::flow_sde_step", mutates_args=())
def _sde_step_op(velocity: Tensor, sample: Tensor, noise: Optional[Tensor], sigma: Tensor, sigma_next: Tensor,
                 sigma_max: Optional[Tensor], noise_level: float, kind: int, batch_ndim: int,
                 sq_err: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (mean, next_sample (empty for ode), std [S], logp [S] (empty for ode)), all fp32."""
    S = sample.shape[:batch_ndim]
    N = _numel(S)
    mean, nxt, std, logp = K.flow_sde_step_fwd(velocity, sample, noise, sigma, sigma_next, sigma_max, noise_level,
                                               kind, N, sq_err)
    if nxt is None:  # ode: two distinct empty outputs (custom-op outputs may not alias each other)
        return mean.reshape(sample.shape), sample.new_empty(0, dtype=torch.float32), std.reshape(S), \
            sample.new_empty(0, dtype=torch.float32)
    return mean.reshape(sample.shape), nxt.reshape(sample.shape), std.reshape(S), logp.reshape(S)


@_sde_step_op.register_fake
def _(velocity, sample, noise, sigma, sigma_next, sigma_max, noise_level, kind, batch_ndim, sq_err):
    S = sample.shape[:batch_ndim]
    mean = sample.new_empty(sample.shape, dtype=torch.float32)
    ode = kind == K.KIND_ODE
    nxt = sample.new_empty(0 if ode else sample.shape, dtype=torch.float32)
    logp = sample.new_empty(0 if ode else S, dtype=torch.float32)
    return mean, nxt, sample.new_empty(S, dtype=torch.float32), logp


@register_triton("flow_sde_step")
def flow_sde_step_triton(velocity, sample, sigma, sigma_next, *, noise=None, generator=None, noise_level=0.7,
                         sde="sde", sigma_max=None, batch_ndim=1, logprob="gaussian"):
    """Same contract as `flow_sde_step_ref`; noise is drawn by torch (fp32) when not given, as the reference does."""
    kind = K.KINDS[sde]
    dev = sample.device
    if kind != K.KIND_ODE and noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=dev, dtype=torch.float32)
    if kind == K.KIND_ODE:
        noise = None
    mean, nxt, std, logp = _sde_step_op(velocity.detach(), sample.detach(), noise, _on(sigma, dev),
                                        _on(sigma_next, dev), _on(sigma_max, dev), float(noise_level), kind,
                                        batch_ndim, _sq_err(logprob, kind))
    if kind == K.KIND_ODE:
        return mean, None, mean, std
    return nxt, logp, mean, std


# ---------------------------------------------------------------------------------------------------- log-prob


@torch.library.custom_op("unirl_fast::flow_step_logprob", mutates_args=())
def _logprob_op(velocity: Tensor, sample: Tensor, next_sample: Tensor, sigma: Tensor, sigma_next: Tensor,
                sigma_max: Optional[Tensor], noise_level: float, kind: int, batch_ndim: int, sq_err: bool) -> Tensor:
    S = sample.shape[:batch_ndim]
    return K.flow_step_logprob_fwd(velocity, sample, next_sample, sigma, sigma_next, sigma_max, noise_level, kind,
                                   _numel(S), sq_err).reshape(S)


@_logprob_op.register_fake
def _(velocity, sample, next_sample, sigma, sigma_next, sigma_max, noise_level, kind, batch_ndim, sq_err):
    return sample.new_empty(sample.shape[:batch_ndim], dtype=torch.float32)


@torch.library.custom_op("unirl_fast::flow_step_logprob_bwd", mutates_args=())
def _logprob_bwd_op(grad: Tensor, velocity: Tensor, sample: Tensor, next_sample: Tensor, sigma: Tensor,
                    sigma_next: Tensor, sigma_max: Optional[Tensor], noise_level: float, kind: int,
                    sq_err: bool) -> Tensor:
    N = grad.numel()
    return K.flow_step_logprob_bwd(grad.float(), velocity, sample, next_sample, sigma, sigma_next, sigma_max,
                                   noise_level, kind, N, sq_err).reshape(velocity.shape)


@_logprob_bwd_op.register_fake
def _(grad, velocity, sample, next_sample, sigma, sigma_next, sigma_max, noise_level, kind, sq_err):
    return velocity.new_empty(velocity.shape)  # contiguous, as the kernel writes it (empty_like keeps strides)


def _logprob_setup(ctx, inputs, output):
    velocity, sample, next_sample, sigma, sigma_next, sigma_max, noise_level, kind, _, sq_err = inputs
    ctx.save_for_backward(velocity, sample, next_sample, sigma, sigma_next, sigma_max)
    ctx.noise_level, ctx.kind, ctx.sq_err = noise_level, kind, sq_err


def _logprob_backward(ctx, grad):
    velocity, sample, next_sample, sigma, sigma_next, sigma_max = ctx.saved_tensors
    dv = None
    if ctx.needs_input_grad[0]:
        dv = _logprob_bwd_op(grad.contiguous(), velocity, sample, next_sample, sigma, sigma_next, sigma_max,
                             ctx.noise_level, ctx.kind, ctx.sq_err)
    return dv, None, None, None, None, None, None, None, None, None


_logprob_op.register_autograd(_logprob_backward, setup_context=_logprob_setup)


@register_triton("flow_step_logprob")
def flow_step_logprob_triton(velocity, sample, next_sample, sigma, sigma_next, *, noise_level=0.7, sde="sde",
                             sigma_max=None, batch_ndim=1, logprob="gaussian"):
    """Same contract as `flow_step_logprob_ref`: logp [S] fp32, differentiable in velocity only."""
    dev = sample.device
    kind = K.KINDS[sde]
    return _logprob_op(velocity, sample.detach(), next_sample.detach(), _on(sigma, dev), _on(sigma_next, dev),
                       _on(sigma_max, dev), float(noise_level), kind, batch_ndim, _sq_err(logprob, kind))


# ---------------------------------------------------------------------------------------------------- policy loss


@torch.library.custom_op("unirl_fast::flow_policy_loss", mutates_args=())
def _policy_loss_op(logp: Tensor, old_logp: Tensor, advantages: Tensor, velocity: Optional[Tensor],
                    ref_velocity: Optional[Tensor], mean: Optional[Tensor], ref_mean: Optional[Tensor],
                    std: Optional[Tensor], clip_range: float, beta_velocity: float,
                    beta_kl: float) -> tuple[Tensor, Tensor]:
    """-> (out [7] fp32 = loss then the _METRICS (0 where a term is absent), dpg/dlogp fp32 like logp)."""
    return KL.flow_policy_loss_fwd(logp, old_logp, advantages, velocity, ref_velocity, mean, ref_mean, std,
                                   clip_range, beta_velocity, beta_kl)


@_policy_loss_op.register_fake
def _(logp, old_logp, advantages, velocity, ref_velocity, mean, ref_mean, std, clip_range, beta_velocity, beta_kl):
    return logp.new_empty(7, dtype=torch.float32), logp.new_empty(logp.shape, dtype=torch.float32)


@torch.library.custom_op("unirl_fast::flow_policy_loss_bwd", mutates_args=())
def _policy_loss_bwd_op(grad: Tensor, dlogp: Tensor, need_logp: bool, velocity: Optional[Tensor],
                        ref_velocity: Optional[Tensor], mean: Optional[Tensor], ref_mean: Optional[Tensor],
                        std: Optional[Tensor], beta_velocity: float, beta_kl: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dlogp fp32, dvelocity, dmean); an empty tensor where no gradient was asked for."""
    d_lp, dv, dm = KL.flow_policy_loss_bwd(grad, dlogp, need_logp, velocity, ref_velocity, mean, ref_mean, std,
                                           beta_velocity, beta_kl)
    return tuple(grad.new_empty(0) if t is None else t for t in (d_lp, dv, dm))


@_policy_loss_bwd_op.register_fake
def _(grad, dlogp, need_logp, velocity, ref_velocity, mean, ref_mean, std, beta_velocity, beta_kl):
    return (dlogp.new_empty(dlogp.shape) if need_logp else grad.new_empty(0),
            velocity.new_empty(velocity.shape) if velocity is not None else grad.new_empty(0),
            mean.new_empty(mean.shape) if mean is not None else grad.new_empty(0))


def _loss_setup(ctx, inputs, output):
    logp, _, _, velocity, ref_velocity, mean, ref_mean, std, _, beta_v, beta_kl = inputs
    ctx.save_for_backward(output[1], velocity, ref_velocity, mean, ref_mean, std)
    ctx.logp_dtype, ctx.beta_v, ctx.beta_kl = logp.dtype, beta_v, beta_kl


def _loss_backward(ctx, g_out, g_dlogp):
    dlogp, velocity, ref_velocity, mean, ref_mean, std = ctx.saved_tensors
    need = ctx.needs_input_grad
    v_on = need[3] and velocity is not None and ctx.beta_v != 0.0
    k_on = need[5] and mean is not None and ctx.beta_kl != 0.0
    d_lp, dv, dm = _policy_loss_bwd_op(g_out[:1].contiguous(), dlogp, need[0], velocity if v_on else None,
                                       ref_velocity if v_on else None, mean if k_on else None,
                                       ref_mean if k_on else None, std if k_on else None, ctx.beta_v, ctx.beta_kl)
    return (d_lp.to(ctx.logp_dtype) if need[0] else None, None, None, dv if v_on else None, None,
            dm if k_on else None, None, None, None, None, None)


_policy_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


@register_triton("flow_policy_loss")
def flow_policy_loss_triton(logp, old_logp, advantages, *, clip_range=1e-4, velocity=None, ref_velocity=None,
                            beta_velocity=0.0, mean=None, ref_mean=None, std=None, beta_kl=0.0):
    """Same contract as `flow_policy_loss_ref`: (loss fp32 scalar, metrics dict of 0-dim fp32 tensors)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=logp.device) if mean is not None else None
    out, _ = _policy_loss_op(logp, old_logp.detach(), advantages.detach(), velocity,
                             None if ref_velocity is None else ref_velocity.detach(), mean,
                             None if ref_mean is None else ref_mean.detach(), std, float(clip_range),
                             float(beta_velocity), float(beta_kl))
    metrics = {k: out[1 + i].detach() for i, k in enumerate(_METRICS[:4])}
    if velocity is not None:
        metrics["velocity_mse"] = out[5].detach()
    if mean is not None:
        metrics["latent_kl"] = out[6].detach()
    return out[0], metrics
