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
LOGPROB_KINDS = ("gaussian", "flow_grpo")


def _sigma_values(name, value, sample):
    """Validate a float or batch-shaped sigma; return (fp32 tensor on sample's device, batch ndim or None).
    A float becomes a device tensor by a fill (no host-to-device copy, no sync); a sampler passes its schedule
    as device tensors built once per trajectory, so a step makes neither."""
    if isinstance(value, torch.Tensor):
        C.check_tensor(name, value, floating=True)
        if value.ndim == 0:
            return value.float(), None
        if value.ndim >= sample.ndim or tuple(value.shape) != tuple(sample.shape[:value.ndim]):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected a float or the leading batch dims "
                             f"of sample {tuple(sample.shape)} (e.g. [{sample.shape[0]}])")
        C.check_same_device(**{name: value, "sample": sample})
        return value.float(), value.ndim
    return torch.full((), C.check_finite_scalar(name, value), dtype=torch.float32, device=sample.device), None


def _check_flow_step(velocity, sample, sigma, sigma_next, noise_level, sde, sigma_max, logprob):
    """Shared validation; returns (sigma, sigma_next, sigma_max, batch_ndim). The sigma range checks are cheap
    ([S] values) and deferred without a host sync on CUDA (see `unirl_fast.set_checks`)."""
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
    smax = None
    if sde == "sde" and sigma_max is not None:
        smax, _ = _sigma_values("sigma_max", sigma_max, sample)
    _check_sigmas(sde, sigma, sigma_next, sigma_max, sig, nxt, smax, logprob)
    return sig, nxt, smax, batch_ndim


def _sigma_rules(sde, has_smax, logprob):
    """(test(sigma, sigma_next, sigma_max) -> ok, message) for one step; works on floats and on tensors."""
    rules = [(lambda s, n, m: (s > 0) & (s <= 1), "sigma must be in (0, 1]"),
             (lambda s, n, m: (n >= 0) & (n < s), "sigma_next must be in [0, sigma)")]
    if sde == "sde" and has_smax:
        rules.append((lambda s, n, m: (m > 0) & (m < 1), "sigma_max must be in (0, 1) (the schedule's second-largest "
                                                         "sigma)"))
    elif sde == "sde":
        rules.append((lambda s, n, m: s != 1, "sigma == 1 needs sigma_max (the schedule's second-largest sigma): the "
                                              "'sde' std divides by 1 - sigma"))
    if sde == "cps" and logprob == "gaussian":  # Flow-GRPO's score is defined there: 0 at next = mean
        rules.append((lambda s, n, m: n != 0, "sde='cps' with sigma_next == 0 is a zero-variance step with no "
                                              "Gaussian log-prob; run the last step with sde='ode' (or score it with "
                                              "logprob='flow_grpo', Flow-GRPO's convention: next = mean, log-prob 0)"))
    return rules


def check_schedule(sigmas, kinds, sigma_max, logprob="gaussian") -> None:
    """A sampler's whole schedule against the step rules, once per trajectory and on the host (Python floats: no
    device work): sigmas [T + 1] (a list), kinds [T] ("sde" | "cps" | "ode"), sigma_max the schedule's
    second-largest sigma. Raises ValueError naming the step."""
    if not C.value_checks_enabled():
        return
    for i, kind in enumerate(kinds):
        if kind == "ode":
            continue
        s, n = sigmas[i], sigmas[i + 1]
        for test, what in _sigma_rules(kind, kind == "sde", logprob):
            if not test(s, n, sigma_max):
                raise ValueError(f"schedule step {i}: {what}; got sigma={s!r}, sigma_next={n!r}, "
                                 f"sigma_max={sigma_max!r}")


def _check_sigmas(sde, sigma, sigma_next, sigma_max, sig, nxt, smax, logprob):
    """Every sigma rule in one check: on the host at once for Python floats (free), else one device flag for the
    whole batch (no host sync), whose message finds the failing rule and values on the error path only."""
    if not C.value_checks_enabled():
        return
    rules = _sigma_rules(sde, smax is not None, logprob)
    raw = (sigma, sigma_next, sigma_max)
    if not any(isinstance(v, torch.Tensor) for v in raw):
        for test, what in rules:
            if not test(*(None if v is None else float(v) for v in raw)):
                raise ValueError(f"{what}; got sigma={sigma!r}, sigma_next={sigma_next!r}, sigma_max={sigma_max!r}")
        return
    s, n = torch.broadcast_tensors(sig, nxt)
    m = None if smax is None else torch.broadcast_to(smax, s.shape)
    ok = torch.ones_like(s, dtype=torch.bool)
    for test, _ in rules:
        ok = ok & test(s, n, m)
    refs = tuple(C.weak(x) for x in (s, n, m))

    def message(i):
        vals = tuple(None if r is None or r() is None else r()[i].item() for r in refs)
        if vals[0] is not None and vals[1] is not None:
            failed = [what for test, what in rules if not test(*vals)]
            if failed:
                return f"{failed[0]}; got sigma={vals[0]}, sigma_next={vals[1]}, sigma_max={vals[2]} at {list(i)}"
        return f"a sigma rule failed at {list(i)}: " + "; ".join(what for _, what in rules)
    C.flag(~ok, message)


def _check_logp(name, logp, inputs):
    """Cheap check of a step's per-sample log-prob [S]: NaN/inf in any input of the step shows up there."""
    if logp is not None and C.value_checks_enabled():
        C.flag(~torch.isfinite(logp.detach()),
               lambda i: f"{name}: non-finite log-prob for sample {C._fmt_index(i)}: {inputs} holds NaN or inf "
                         "(set_checks('full') scans each input)")


def flow_sde_step(velocity, sample, sigma, sigma_next, *, noise=None, generator=None, noise_level=0.7, sde="sde",
                  sigma_max=None, impl="auto", logprob="gaussian"):
    """One Flow-GRPO sampler step from sigma to sigma_next with the transition's log-prob.

    Args:
        velocity, sample: [*S, ...] any float dtype (S = [B] or [T, B]). noise: optional, same shape
        (standard normal); otherwise drawn with `generator`. sde: sde | cps | ode. noise_level: a.
        sigma_max: the schedule's second-largest sigma, needed by "sde" where sigma == 1.
        logprob: "gaussian" (the step's Gaussian log-density, default) or "flow_grpo" (Flow-GRPO's score: for
        sde="cps" the mean of -(x_next - mean)^2 without 1 / (2 s^2) or constants; for "sde" the Gaussian).
        A cps step to sigma_next = 0 (std 0, next = mean) has a score only under "flow_grpo": 0, as Flow-GRPO's.
    Returns:
        (next_sample fp32, logp [S] fp32 (None for "ode"), mean fp32, std [S] fp32 = the step's Gaussian std)
    Example:
        >>> x = torch.randn(2, 4, 8, 8); v = torch.randn_like(x)
        >>> nxt, logp, mean, std = flow_sde_step(v, x, 0.8, 0.6)
    """
    C.check_option("logprob", logprob, LOGPROB_KINDS)
    sig, nxt, smax, nd = _check_flow_step(velocity, sample, sigma, sigma_next, noise_level, sde, sigma_max, logprob)
    if noise is not None:
        if generator is not None:
            raise ValueError("pass either noise or generator, not both")
        C.check_tensor("noise", noise, floating=True)
        C.check_same_shape("noise", noise, "sample", sample)
        C.scan_finite("noise", noise)
    C.scan_finite("velocity", velocity)
    C.scan_finite("sample", sample)
    if sample.numel() == 0:  # an empty batch: empty results, no kernel
        S = sample.shape[:nd]
        f32 = dict(dtype=torch.float32, device=sample.device)
        empty = torch.empty(sample.shape, **f32)
        return empty, (None if sde == "ode" else torch.empty(S, **f32)), empty.clone(), torch.empty(S, **f32)
    kw = dict(noise=noise, generator=generator, noise_level=float(noise_level), sde=sde, sigma_max=smax,
              batch_ndim=nd, logprob=logprob)
    fn = triton_impl("flow_sde_step") if choose("flow_sde_step", impl, sample.device) == "triton" else flow_sde_step_ref
    out = fn(velocity, sample, sig, nxt, **kw)
    _check_logp("flow_sde_step", out[1], "velocity, sample or noise")
    return out


def flow_step_logprob(velocity, sample, next_sample, sigma, sigma_next, *, noise_level=0.7, sde="sde", sigma_max=None,
                      impl="auto", logprob="gaussian"):
    """Training-time log-prob [S] (fp32) of stored transitions sample -> next_sample under the current velocity.

    Differentiable in `velocity` only (sample and next_sample are data). sde: sde | cps ("ode" has no density).
    logprob: "gaussian" (default) | "flow_grpo" (Flow-GRPO's cps score, see `flow_sde_step`); score a replay
    with the convention its rollout stored, or the log-ratio mixes the two.
    Example:
        >>> x = torch.randn(2, 4, 8, 8); v = torch.randn_like(x, requires_grad=True)
        >>> nxt, old, _, _ = flow_sde_step(v.detach(), x, 0.8, 0.6)
        >>> flow_step_logprob(v, x, nxt, 0.8, 0.6).sum().backward()
    """
    if sde == "ode":
        raise ValueError("sde='ode' is deterministic and has no log-prob; use 'sde' or 'cps'")
    C.check_option("logprob", logprob, LOGPROB_KINDS)
    sig, nxt, smax, nd = _check_flow_step(velocity, sample, sigma, sigma_next, noise_level, sde, sigma_max, logprob)
    C.check_tensor("next_sample", next_sample, floating=True)
    C.check_same_shape("next_sample", next_sample, "sample", sample)
    for name, x in (("velocity", velocity), ("sample", sample), ("next_sample", next_sample)):
        C.scan_finite(name, x.detach())
    if sample.numel() == 0:
        return velocity.sum(tuple(range(nd, velocity.ndim)), dtype=torch.float32)  # [S] empty, still in the graph
    kw = dict(noise_level=float(noise_level), sde=sde, sigma_max=smax, batch_ndim=nd, logprob=logprob)
    if choose("flow_step_logprob", impl, sample.device) == "triton":
        out = triton_impl("flow_step_logprob")(velocity, sample, next_sample, sig, nxt, **kw)
    else:
        out = flow_step_logprob_ref(velocity, sample, next_sample, sig, nxt, **kw)
    _check_logp("flow_step_logprob", out, "velocity, sample or next_sample")
    return out


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
        C.check_finite(name, x.detach())
    _check_pair("velocity", velocity, "ref_velocity", ref_velocity, logp.shape)
    _check_pair("mean", mean, "ref_mean", ref_mean, logp.shape)
    if beta_velocity > 0 and velocity is None:
        raise ValueError(f"beta_velocity={beta_velocity!r} needs velocity and ref_velocity")
    if mean is not None or beta_kl > 0:
        if mean is None or std is None:
            raise ValueError("the latent KL needs mean, ref_mean and std")
        if isinstance(std, torch.Tensor):
            C.check_same_shape("std", std, "logp", logp)
            C.check_in_range("std", std.detach(), std.detach() > 0, "must be > 0 everywhere (a zero-variance step "
                                                                    "has no KL)")
        else:
            C.check_finite_scalar("std", std, positive=True)
    if logp.numel() == 0:  # no sample: zero loss (still in the graph) and zero metrics, never NaN
        names = ["pg_loss", "clip_frac", "ratio_mean", "approx_kl"]
        names += ["velocity_mse"] * (velocity is not None) + ["latent_kl"] * (mean is not None)
        return logp.sum(dtype=torch.float32) * 0.0, {k: torch.zeros((), device=logp.device) for k in names}
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


