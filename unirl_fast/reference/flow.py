"""Reference Flow-GRPO SDE step, step log-prob and flow policy loss (FORMULAS.md sections 4-5), fp32.

Convention: x_sigma = (1 - sigma) x0 + sigma eps, sigma falls from ~1 to 0, the model predicts v.
Shapes: samples are [*S, ...latent] where S are the batch dims: [B] for one step, [T, B] for a replay
of T steps. sigma / sigma_next are floats or tensors of shape S (per-sample or per-(step, sample)).

    sde : std_t = a sqrt(sigma / (1 - sigma')), sigma' = sigma_max where sigma == 1 else sigma
          mean  = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
          s     = std_t sqrt(-dt)
    cps : s = sigma_next sin(a pi / 2)
          mean = (x - sigma v)(1 - sigma_next) + (x + (1 - sigma) v) sqrt(sigma_next^2 - s^2)
    ode : mean = x + v dt, s = 0 (no density, so no log-prob)
    logp = mean over latent dims of [-(x_next - mean)^2 / (2 s^2) - log s - log(2 pi) / 2]     logprob="gaussian"
         = mean over latent dims of [-(x_next - mean)^2]                                     logprob="flow_grpo"
The "flow_grpo" log-prob is what Flow-GRPO's released cps sampler scores a step with (its constants and the
1 / (2 s^2) factor dropped); its log-ratio is the Gaussian one times 2 s^2, so one clip range means different
things along a trajectory. For sde="sde" Flow-GRPO scores the full Gaussian, so there both conventions agree.
A cps step into sigma_next = 0 has s = 0 (next = mean): only the "flow_grpo" score is defined there (0 in the
rollout, as Flow-GRPO's); `unirl_fast.ops.flow` refuses it under the Gaussian.

Latent KL convention (`flow_policy_loss`): the exact Gaussian KL between two steps with the same std s,
(mean - ref_mean)^2 / (2 s^2), averaged over latent elements. Flow-GRPO's released code divides by
std_t^2 instead (|dt| times this); pass `std = std_t` to get that convention.
No input validation here: `unirl_fast.ops.flow` validates before calling.
"""
from __future__ import annotations

import math

import torch

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(value, shape, device):
    """Float or tensor of batch shape S -> fp32 tensor of shape S."""
    return torch.as_tensor(value, dtype=torch.float32, device=device).expand(shape)


def _bcast(t, ndim):
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def flow_step_coeffs_ref(sigma, sigma_next, batch_shape, device, *, noise_level=0.7, sde="sde", sigma_max=None):
    """Per-sample (c_x, c_v, s, kind-specific) so that mean = c_x * x + c_v * v; s = step std [S]."""
    sig = _per_sample(sigma, batch_shape, device)
    nxt = _per_sample(sigma_next, batch_shape, device)
    dt = nxt - sig
    if sde == "ode":
        return torch.ones_like(sig), dt, torch.zeros_like(sig)
    if sde == "cps":
        s = nxt * math.sin(noise_level * math.pi / 2.0)
        k = torch.sqrt((nxt * nxt - s * s).clamp(min=0.0))
        c_x = (1.0 - nxt) + k
        c_v = -sig * (1.0 - nxt) + (1.0 - sig) * k
        return c_x, c_v, s
    sig_p = sig if sigma_max is None else torch.where(sig == 1.0, _per_sample(sigma_max, batch_shape, device), sig)
    std_t = noise_level * torch.sqrt(sig / (1.0 - sig_p))
    var_over = std_t * std_t / (2.0 * sig)
    c_x = 1.0 + var_over * dt
    c_v = (1.0 + var_over * (1.0 - sig)) * dt
    return c_x, c_v, std_t * torch.sqrt(-dt)


def gaussian_logprob_ref(next_sample, mean, s, logprob="gaussian"):
    """Mean over latent dims of the Gaussian log-density (or, logprob="flow_grpo" with sde="cps", of the
    unscaled -(x_next - mean)^2); s has the batch shape S."""
    S = s.shape
    sq = (next_sample.float() - mean) ** 2
    if logprob == "flow_grpo":
        return (-sq).reshape(*S, -1).mean(-1)
    sb = _bcast(s, mean.ndim)
    lp = -sq / (2.0 * sb * sb) - torch.log(sb) - _HALF_LOG_2PI
    return lp.reshape(*S, -1).mean(-1)


def _logprob_kind(logprob, sde):
    """The log-prob the step is scored with: Flow-GRPO's convention differs from the Gaussian only for cps."""
    return "flow_grpo" if logprob == "flow_grpo" and sde == "cps" else "gaussian"


def flow_sde_step_ref(velocity, sample, sigma, sigma_next, *, noise=None, generator=None, noise_level=0.7,
                      sde="sde", sigma_max=None, batch_ndim=1, logprob="gaussian"):
    """-> (next_sample fp32, logp [S] fp32 | None for "ode", mean fp32, std [S] fp32)."""
    S = sample.shape[:batch_ndim]
    v, x = velocity.float(), sample.float()
    c_x, c_v, s = flow_step_coeffs_ref(sigma, sigma_next, S, x.device, noise_level=noise_level, sde=sde,
                                       sigma_max=sigma_max)
    mean = _bcast(c_x, x.ndim) * x + _bcast(c_v, x.ndim) * v
    if sde == "ode":
        return mean, None, mean, s
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    next_sample = mean + _bcast(s, x.ndim) * noise.float()
    return next_sample, gaussian_logprob_ref(next_sample, mean, s, _logprob_kind(logprob, sde)), mean, s


def flow_step_logprob_ref(velocity, sample, next_sample, sigma, sigma_next, *, noise_level=0.7, sde="sde",
                          sigma_max=None, batch_ndim=1, logprob="gaussian"):
    """Log-prob [S] of stored transitions; differentiable in velocity only (through the mean)."""
    S = sample.shape[:batch_ndim]
    x = sample.detach().float()
    c_x, c_v, s = flow_step_coeffs_ref(sigma, sigma_next, S, x.device, noise_level=noise_level, sde=sde,
                                       sigma_max=sigma_max)
    mean = _bcast(c_x, x.ndim) * x + _bcast(c_v, x.ndim) * velocity.float()
    return gaussian_logprob_ref(next_sample.detach(), mean, s, _logprob_kind(logprob, sde))


def flow_policy_loss_ref(logp, old_logp, advantages, *, clip_range=1e-4, velocity=None, ref_velocity=None,
                         beta_velocity=0.0, mean=None, ref_mean=None, std=None, beta_kl=0.0):
    """logp/old_logp [T, B] or [B], advantages [B] -> (loss fp32 scalar, metrics)."""
    logp = logp.float()
    log_ratio = logp - old_logp.detach().float()
    A = advantages.detach().float().expand_as(logp)
    r = torch.exp(log_ratio)
    pg_t = torch.maximum(-A * r, -A * r.clamp(1.0 - clip_range, 1.0 + clip_range))
    pg = pg_t.mean()
    loss = pg
    with torch.no_grad():
        metrics = {
            "pg_loss": pg.detach(),
            "clip_frac": ((r - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": r.mean(),
            "approx_kl": 0.5 * (log_ratio * log_ratio).mean(),
        }
    if velocity is not None and ref_velocity is not None:
        mse = ((velocity.float() - ref_velocity.detach().float()) ** 2).mean()
        metrics["velocity_mse"] = mse.detach()
        if beta_velocity != 0.0:
            loss = loss + beta_velocity * mse
    if mean is not None and ref_mean is not None:
        s = _bcast(torch.as_tensor(std, dtype=torch.float32, device=mean.device), mean.ndim)
        kl = ((mean.float() - ref_mean.detach().float()) ** 2 / (2.0 * s * s)).mean()
        metrics["latent_kl"] = kl.detach()
        if beta_kl != 0.0:
            loss = loss + beta_kl * kl
    return loss, metrics
