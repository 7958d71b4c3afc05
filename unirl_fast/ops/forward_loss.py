"""Public forward-process image RL loss: DiffusionNFT (`algo="nft"`) and Advantage Weighted Matching (`algo="awm"`).

Both train the velocity v of a flow-matching model on the forward (noising) process of its own clean rollouts:
rows n are (sample, trained timestep) pairs with x_t = (1 - t) x0 + t noise, and u = noise - x0 is the velocity that
flow matching regresses. The math is FORMULAS.md section 7; the reference is `unirl_fast.reference.forward_loss`,
the kernel `kernels/forward_loss.py` (one launch: loss, metrics and dL/dv). Where we chose between readings of the
published code (checked at NVlabs/DiffusionNFT @ 24af555 `scripts/train_nft_sd3.py` and
scxue/advantage_weighted_matching @ be51372 `advantage_weighted_matching/scripts/train_sd3_awm.py`):

- nft, x0 errors (their lines 864-870 and 934-955): they form x0_pred = x_t - t v+- and subtract x0; we take
  e = t (u - v+-), the same quantity without the cancellation of x_t - x0 at small t (at t = 1e-4 their fp32 form
  keeps ~3 digits).
- nft, weights (lines 941-955): the per-row mean |x0 error| is computed in fp64 there and floored at 1e-5 after the
  mean (`.mean(...).clip(min=0.00001)`); ours is an fp32 sum over the row (relative error ~1e-7 x sqrt(D) at most,
  a rounding of a detached row scale) with the same floor at the same place. Their positive / negative losses are
  then fp64 (tensor / fp64 weight); ours are fp32. Their blend b v + (1 - b) v_old runs in the DiT's output dtype
  (bf16 under autocast); ours in fp32.
- nft, advantage (lines 910-930): clip to +-A_max, r = clip(A / (2 A_max) + 1/2, 0, 1); their `adv_mode` variants
  (positive_only, binary, ...) are not offered. The loss is mean(A_max (r l+ + (1 - r) l-) / b) + lambda mean(KL)
  (lines 959-970), their `config.train.beta` being our `beta_kl`.
- awm, weighting (their `compute_log_prob_awm`, lines 210-252: 237-238 and 248-249): log_prob = -ghuber with
  ghuber = ((m + 1e-10)^p - 1e-10^p) t / p and m = mean((v - u)^2) in fp64; ours in fp32.
- awm, objective (lines 1293-1352): a PPO surrogate mean(max(-A' rho, -A' clip(rho, 1 - c, 1 + c))) with
  rho = exp(log_prob - old_log_prob). Their shipped configs (`config/dgx_awm.py`: off_policy False,
  gradient_accumulation_steps = num_batches_per_epoch, clip_range 1) take one optimizer step per epoch and set
  old_log_prob = log_prob.detach() in the same step (lines 1228 and 1283-1284), so rho = 1 exactly: the
  surrogate's value is the constant -mean(A') and its gradient is mean(A' grad ghuber), the gradient of our
  mean(A' ghuber). Our loss value is therefore the weighted matching loss, not their logged -mean(A'); with
  several optimizer steps per rollout batch their rho drifts from 1 and the two differ (we do not model that).
  A' = clip(A, +-A_max) / A_max is their `advantage_max = 1` (lines 1293-1299). The KL terms are their 'Uniform'
  kl_weight / kl_ema_weight: beta_kl mean((v - v_ref)^2) and beta_old mean((v - v_ema)^2) (lines 1333-1350),
  v_old being the EMA policy's prediction.
"""
from __future__ import annotations

import torch

from .. import _checks as C
from ..reference.forward_loss import forward_process_loss_ref
from ._dispatch import choose, triton_impl

ALGOS = ("nft", "awm")


def _check_rows(v, v_old, x0, noise, v_ref):
    C.check_tensor("v", v, min_ndim=2, floating=True)
    for name, x in (("v_old", v_old), ("x0", x0), ("noise", noise), ("v_ref", v_ref)):
        if x is not None:
            C.check_tensor(name, x, floating=True)
            C.check_same_shape(name, x, "v", v)
    C.check_same_device(v=v, v_old=v_old, x0=x0, noise=noise, v_ref=v_ref)
    if v.shape[0] > 0 and v[0].numel() == 0:
        raise ValueError(f"v has shape {tuple(v.shape)}: a row needs at least one latent element")


def _check_options(algo, v_old, v_ref, beta_kl, nft_beta, adv_clip, awm_power, beta_old):
    C.check_option("algo", algo, ALGOS)
    C.check_finite_scalar("nft_beta", nft_beta, positive=True)
    C.check_finite_scalar("adv_clip", adv_clip, positive=True)
    C.check_finite_scalar("awm_power", awm_power, positive=True)
    C.check_finite_scalar("beta_kl", beta_kl, nonneg=True)
    C.check_finite_scalar("beta_old", beta_old, nonneg=True)
    if algo == "nft" and v_old is None:
        raise ValueError("algo='nft' needs v_old (the old policy's velocity: the implicit positive and negative "
                         "policies are built from it)")
    if algo == "nft" and beta_old != 0:
        raise ValueError(f"beta_old={beta_old!r} is AWM's EMA-policy KL; algo='nft' has none (use beta_kl)")
    if algo == "awm" and beta_old > 0 and v_old is None:
        raise ValueError(f"beta_old={beta_old!r} needs v_old (the EMA policy's velocity)")
    if beta_kl > 0 and v_ref is None:
        raise ValueError(f"beta_kl={beta_kl!r} needs v_ref (the reference policy's velocity)")


def _check_per_row(t, advantages, v):
    N = v.shape[0]
    for name, x in (("t", t), ("advantages", advantages)):
        C.check_tensor(name, x, ndim=1, floating=True)
        if x.shape[0] != N:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but v {tuple(v.shape)} has N={N} rows")
    C.check_same_device(v=v, t=t, advantages=advantages)
    C.check_finite("advantages", advantages.detach())
    C.check_in_range("t", t.detach(), (t.detach() > 0) & (t.detach() <= 1), "must be in (0, 1] (t = sigma)")


def forward_process_loss(v, v_old, x0, noise, t, advantages, *, algo="nft", v_ref=None, beta_kl=0.0, nft_beta=1.0,
                         adv_clip=5.0, awm_power=0.25, beta_old=0.0, impl="auto"):
    """DiffusionNFT or AWM loss on N (sample, timestep) rows, with its metrics (FORMULAS.md section 7).

    Args:
        v: [N, *D] the current policy's velocity at x_t = (1 - t) x0 + t noise (bf16 / fp16 / fp32 / fp64); the
            only differentiable input.
        v_old: [N, *D] the old (EMA) policy's velocity, a constant; required for nft, for awm only with beta_old > 0.
        x0, noise: [N, *D] the clean rollout latents and the noise that made x_t (constants).
        t: [N] float in (0, 1], sigma of each row. advantages: [N] float, raw group advantages (clipped here to
            +-adv_clip).
        v_ref: [N, *D] optional reference velocity (constant) for beta_kl * mean((v - v_ref)^2).
        nft_beta: b > 0 of nft (v+ = b v + (1 - b) v_old). adv_clip: A_max > 0. awm_power: AWM's ghuber power p > 0.
        beta_old: awm only, weight of mean((v - v_old)^2) (the EMA-policy KL).
    Returns:
        (loss 0-dim fp32, metrics: dict of 0-dim fp32 tensors, detached):
        policy_loss (the mean policy term), kl_loss (mean (v - v_ref)^2, unweighted; with v_ref),
        old_deviate (mean (v - v_old)^2; with v_old), and for nft positive_loss / negative_loss (row means of the
        weighted x0 losses), for awm matching_mse (row mean of mean (v - u)^2).
        loss = policy_loss + beta_kl kl_loss (+ beta_old old_deviate for awm). An empty batch (N = 0) gives 0 and a
        zero gradient.
    Example:
        >>> v = torch.randn(6, 4, 8, 8, requires_grad=True); v_old = v.detach() + 0.01 * torch.randn(6, 4, 8, 8)
        >>> x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
        >>> t, adv = torch.rand(6) * 0.9 + 0.05, torch.randn(6)
        >>> loss, metrics = forward_process_loss(v, v_old, x0, noise, t, adv, algo="nft")
        >>> loss.backward()
    """
    _check_rows(v, v_old, x0, noise, v_ref)
    _check_options(algo, v_old, v_ref, beta_kl, nft_beta, adv_clip, awm_power, beta_old)
    _check_per_row(t, advantages, v)
    for name, x in (("v", v), ("v_old", v_old), ("x0", x0), ("noise", noise), ("v_ref", v_ref)):
        if x is not None:
            C.scan_finite(name, x.detach())
    kw = dict(algo=algo, v_ref=v_ref, beta_kl=float(beta_kl), nft_beta=float(nft_beta), adv_clip=float(adv_clip),
              awm_power=float(awm_power), beta_old=float(beta_old))
    if v.shape[0] == 0:
        return _empty(v, v_old, v_ref, algo)
    use_triton = choose("forward_process_loss", impl, v.device) == "triton"
    fn = triton_impl("forward_process_loss") if use_triton else forward_process_loss_ref
    loss, metrics = fn(v, v_old, x0, noise, t, advantages, **kw)
    if C.value_checks_enabled():  # NaN / inf in any [N, D] input shows up in the loss: O(1), no host sync
        C.flag(~torch.isfinite(loss.detach().reshape(1)),
               lambda i: "forward_process_loss: the loss is not finite: v, v_old, x0, noise or v_ref holds NaN or "
                         "inf (set_checks('full') scans each input)")
    return loss, metrics


def _empty(v, v_old, v_ref, algo):
    """No row: loss 0 (in the graph, so backward gives a zero gradient) and zero metrics, never NaN."""
    names = ["policy_loss"] + ["kl_loss"] * (v_ref is not None) + ["old_deviate"] * (v_old is not None)
    names += ["positive_loss", "negative_loss"] if algo == "nft" else ["matching_mse"]
    return v.sum(dtype=torch.float32) * 0.0, {k: torch.zeros((), device=v.device) for k in names}
