"""Public Flow-GRPO ops (FORMULAS.md sections 4-5): SDE step with log-prob, step log-prob recompute,
flow policy loss with velocity-MSE / latent-KL regularisers, and classifier-free guidance.

Shapes: samples [*S, ...latent] with batch dims S = [B] (one step) or [T, B] (replay of T steps).
sigma / sigma_next: a float, or a tensor of shape S (per-sample / per-(step, sample)). With float
sigmas the batch is the first dim. All math is fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch

from .. import _checks as C
from ..reference.flow import flow_policy_loss_ref, flow_sde_step_ref, flow_step_logprob_ref
from ._dispatch import choose, triton_impl

SDE_KINDS = ("sde", "cps", "ode")


def _sigma_values(name, value, sample):
    """Validate a float or batch-shaped sigma; return (fp32 tensor or float, batch ndim or None)."""
    if isinstance(value, torch.Tensor):
        C.check_tensor(name, value, floating=True)
        if value.ndim == 0:
            return value.float(), None
        if value.ndim >= sample.ndim or tuple(value.shape) != tuple(sample.shape[:value.ndim]):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected a float or the leading batch dims "
                             f"of sample {tuple(sample.shape)} (e.g. [{sample.shape[0]}])")
        C.check_same_device(**{name: value, "sample": sample})
        return value.float(), value.ndim
    return torch.tensor(C.check_finite_scalar(name, value), dtype=torch.float32, device=sample.device), None


def _check_flow_step(velocity, sample, sigma, sigma_next, noise_level, sde, sigma_max):
    """Shared validation; returns (sigma, sigma_next, sigma_max, batch_ndim)."""
    C.check_tensor("sample", sample, min_ndim=2, floating=True)
    C.check_tensor("velocity", velocity, floating=True)
    C.check_same_shape("velocity", velocity, "sample", sample)
    C.check_same_device(velocity=velocity, sample=sample)
    C.check_option("sde", sde, SDE_KINDS)
    a = C.check_finite_scalar("noise_level", noise_level, nonneg=True)
    if sde == "sde" and a == 0:
        raise ValueError("noise_level=0 makes the 'sde' step deterministic (no density); use sde='ode'")
    if sde == "cps" and not 0 < a <= 1:
        raise ValueError(f"noise_level for sde='cps' must be in (0, 1], got {noise_level!r}")
    sig, nd1 = _sigma_values("sigma", sigma, sample)
    nxt, nd2 = _sigma_values("sigma_next", sigma_next, sample)
    if nd1 is not None and nd2 is not None and nd1 != nd2:
        raise ValueError(f"sigma has {nd1} batch dims but sigma_next has {nd2}")
    batch_ndim = nd1 or nd2 or 1
    if C.value_checks_enabled():
        if not bool(((sig > 0) & (sig <= 1)).all()):
            raise ValueError(f"sigma must be in (0, 1], got {sig[~((sig > 0) & (sig <= 1))].flatten()[0].item()}")
        bad = ~((nxt >= 0) & (nxt < sig))
        if bool(bad.any()):
            got_n = torch.broadcast_to(nxt, bad.shape)[bad][0].item()
            got_s = torch.broadcast_to(sig, bad.shape)[bad][0].item()
            raise ValueError(f"sigma_next must be in [0, sigma), got {got_n} for sigma {got_s}")
    smax = None
    if sde == "sde":
        if sigma_max is not None:
            smax, _ = _sigma_values("sigma_max", sigma_max, sample)
            if C.value_checks_enabled() and not bool(((smax > 0) & (smax < 1)).all()):
                raise ValueError(f"sigma_max must be in (0, 1) (the schedule's second-largest sigma), "
                                 f"got {sigma_max!r}")
        elif C.value_checks_enabled() and bool((sig == 1).any()):
            raise ValueError("sigma == 1 needs sigma_max (the schedule's second-largest sigma): the 'sde' std "
                             "divides by 1 - sigma")
    if sde == "cps" and C.value_checks_enabled() and bool((nxt == 0).any()):
        raise ValueError("sde='cps' with sigma_next == 0 is a zero-variance step with no log-prob; "
                         "run the last step with sde='ode'")
    return sig, nxt, smax, batch_ndim


def flow_sde_step(velocity, sample, sigma, sigma_next, *, noise=None, generator=None, noise_level=0.7, sde="sde",
                  sigma_max=None, impl="auto"):
    """One Flow-GRPO sampler step from sigma to sigma_next with the transition's log-prob.

    Args:
        velocity, sample: [*S, ...] any float dtype (S = [B] or [T, B]). noise: optional, same shape
        (standard normal); otherwise drawn with `generator`. sde: sde | cps | ode. noise_level: a.
        sigma_max: the schedule's second-largest sigma, needed by "sde" where sigma == 1.
    Returns:
        (next_sample fp32, logp [S] fp32 (None for "ode"), mean fp32, std [S] fp32 = the step's Gaussian std)
    Example:
        >>> x = torch.randn(2, 4, 8, 8); v = torch.randn_like(x)
        >>> nxt, logp, mean, std = flow_sde_step(v, x, 0.8, 0.6)
    """
    sig, nxt, smax, nd = _check_flow_step(velocity, sample, sigma, sigma_next, noise_level, sde, sigma_max)
    if noise is not None:
        if generator is not None:
            raise ValueError("pass either noise or generator, not both")
        C.check_tensor("noise", noise, floating=True)
        C.check_same_shape("noise", noise, "sample", sample)
        C.check_all_finite("noise", noise)
    kw = dict(noise=noise, generator=generator, noise_level=float(noise_level), sde=sde, sigma_max=smax,
              batch_ndim=nd)
    fn = triton_impl("flow_sde_step") if choose("flow_sde_step", impl, sample.device) == "triton" else flow_sde_step_ref
    return fn(velocity, sample, sig, nxt, **kw)


def flow_step_logprob(velocity, sample, next_sample, sigma, sigma_next, *, noise_level=0.7, sde="sde", sigma_max=None,
                      impl="auto"):
    """Training-time log-prob [S] (fp32) of stored transitions sample -> next_sample under the current velocity.

    Differentiable in `velocity` only (sample and next_sample are data). sde: sde | cps ("ode" has no density).
    Example:
        >>> x = torch.randn(2, 4, 8, 8); v = torch.randn_like(x, requires_grad=True)
        >>> nxt, old, _, _ = flow_sde_step(v.detach(), x, 0.8, 0.6)
        >>> flow_step_logprob(v, x, nxt, 0.8, 0.6).sum().backward()
    """
    if sde == "ode":
        raise ValueError("sde='ode' is deterministic and has no log-prob; use 'sde' or 'cps'")
    sig, nxt, smax, nd = _check_flow_step(velocity, sample, sigma, sigma_next, noise_level, sde, sigma_max)
    C.check_tensor("next_sample", next_sample, floating=True)
    C.check_same_shape("next_sample", next_sample, "sample", sample)
    C.check_all_finite("next_sample", next_sample)
    kw = dict(noise_level=float(noise_level), sde=sde, sigma_max=smax, batch_ndim=nd)
    if choose("flow_step_logprob", impl, sample.device) == "triton":
        return triton_impl("flow_step_logprob")(velocity, sample, next_sample, sig, nxt, **kw)
    return flow_step_logprob_ref(velocity, sample, next_sample, sig, nxt, **kw)


def _check_pair(a_name, a, b_name, b, lead):
    if (a is None) != (b is None):
        raise ValueError(f"{a_name} and {b_name} go together; got only one of them")
    if a is None:
        return
    C.check_tensor(a_name, a, floating=True)
    C.check_tensor(b_name, b, floating=True)
    C.check_same_shape(b_name, b, a_name, a)
    if tuple(a.shape[:len(lead)]) != tuple(lead) or a.ndim <= len(lead):
        raise ValueError(f"{a_name} has shape {tuple(a.shape)}; expected [{', '.join(map(str, lead))}, ...]")


def flow_policy_loss(logp, old_logp, advantages, *, clip_range=1e-4, velocity=None, ref_velocity=None,
                     beta_velocity=0.0, mean=None, ref_mean=None, std=None, beta_kl=0.0, impl="auto"):
    """Flow-GRPO clipped surrogate over trained steps, plus velocity-MSE (UniGRPO) and latent-KL regularisers.

    Args:
        logp: [T, B] or [B] current log-probs (differentiable); old_logp: same shape (data); advantages: [B],
        shared by every step of a sample. velocity/ref_velocity: [*logp.shape, ...] for the MSE term
        beta_velocity * mean((v - v_ref)^2). mean/ref_mean: [*logp.shape, ...] step means and std (float or
        logp-shaped) for beta_kl * mean((mean - ref_mean)^2 / (2 std^2)): the exact Gaussian KL when std is the
        step std that `flow_sde_step` returns; pass std_t to get Flow-GRPO's released-code convention.
    Returns:
        (loss fp32 scalar, metrics: pg_loss, clip_frac, ratio_mean, approx_kl, velocity_mse, latent_kl)
    """
    C.check_tensor("logp", logp, ndim=(1, 2), floating=True)
    C.check_tensor("old_logp", old_logp, floating=True)
    C.check_same_shape("old_logp", old_logp, "logp", logp)
    C.check_tensor("advantages", advantages, ndim=1, floating=True)
    if advantages.shape[0] != logp.shape[-1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)} but logp {tuple(logp.shape)} has "
                         f"B={logp.shape[-1]}")
    C.check_finite_scalar("clip_range", clip_range, positive=True)
    C.check_finite_scalar("beta_velocity", beta_velocity, nonneg=True)
    C.check_finite_scalar("beta_kl", beta_kl, nonneg=True)
    for name, x in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        C.check_all_finite(name, x)
    _check_pair("velocity", velocity, "ref_velocity", ref_velocity, logp.shape)
    _check_pair("mean", mean, "ref_mean", ref_mean, logp.shape)
    if beta_velocity > 0 and velocity is None:
        raise ValueError(f"beta_velocity={beta_velocity!r} needs velocity and ref_velocity")
    if mean is not None or beta_kl > 0:
        if mean is None or std is None:
            raise ValueError("the latent KL needs mean, ref_mean and std")
        if isinstance(std, torch.Tensor):
            C.check_same_shape("std", std, "logp", logp)
            if C.value_checks_enabled() and not bool((std > 0).all()):
                raise ValueError("std must be > 0 everywhere (a zero-variance step has no KL)")
        else:
            C.check_finite_scalar("std", std, positive=True)
    kw = dict(clip_range=float(clip_range), velocity=velocity, ref_velocity=ref_velocity,
              beta_velocity=float(beta_velocity), mean=mean, ref_mean=ref_mean, std=std, beta_kl=float(beta_kl))
    fn = triton_impl("flow_policy_loss") if choose("flow_policy_loss", impl, logp.device) == "triton" \
        else flow_policy_loss_ref
    return fn(logp, old_logp, advantages, **kw)


def cfg_velocity(v_uncond, v_cond, guidance_scale):
    """Classifier-free guidance: v = v_u + w (v_c - v_u). w = 1 is the conditional velocity (CFG-free)."""
    C.check_tensor("v_uncond", v_uncond, floating=True)
    C.check_tensor("v_cond", v_cond, floating=True)
    C.check_same_shape("v_cond", v_cond, "v_uncond", v_uncond)
    w = C.check_finite_scalar("guidance_scale", guidance_scale)
    return v_uncond + w * (v_cond - v_uncond)


