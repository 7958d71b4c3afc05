"""Rollout / training mismatch metrics (FORMULAS.md section 6).

With d = train_logp - rollout_logp per sampled token (tokens were drawn by the rollout policy):
    k3            = exp(d) - d - 1      (k3(rollout, train) of section 2's estimator; unbiased for KL(rollout || train))
    exp_abs_dlogp = exp(|d|)            (1 when the two engines agree exactly)
both averaged over the masked tokens (token mean) in float64. Returned as 0-dim tensors (no host sync).
"""
from __future__ import annotations

import torch

from .._checks import check_mask, check_same_shape, check_tensor


def rollout_mismatch(rollout_logp: torch.Tensor, train_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mismatch between the log-probs that sampled each token and the ones the trainer recomputes.

    rollout_logp, train_logp: [B, L] (any equal shapes) float; mask: same shape, bool or 0/1.
    Returns {"k3": mean k3, "mean_exp_abs_dlogp": mean exp|d|, "max_abs_dlogp": max |d|, "tokens": count}.
    A mask with no token gives k3 = 0, mean_exp_abs_dlogp = 1, max 0.
    """
    check_tensor("rollout_logp", rollout_logp, floating=True)
    check_tensor("train_logp", train_logp, floating=True)
    check_same_shape("train_logp", train_logp, "rollout_logp", rollout_logp)
    check_same_shape("mask", mask, "rollout_logp", rollout_logp)
    m = check_mask("mask", mask).to(torch.float64)
    d = (train_logp.detach().double() - rollout_logp.detach().double()) * m
    n = m.sum()
    denom = n.clamp_min(1)
    k3 = ((torch.exp(d) - d - 1) * m).sum() / denom
    eabs = ((torch.exp(d.abs()) - 1) * m).sum() / denom + 1
    return {"k3": k3, "mean_exp_abs_dlogp": eabs, "max_abs_dlogp": d.abs().max() if d.numel() else d.sum(),
            "tokens": n}
