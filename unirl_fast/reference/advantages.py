"""Reference group advantages (FORMULAS.md section 3), eager fp32 PyTorch.

N samples, each with an arbitrary integer group id (groups may be ragged, ids need not be sorted).

    grpo : A = (R - mean_group) / (std + eps)   std = group std | batch std ("global") | 1 ("none")
    rloo : A = R - (sum_group - R) / (G - 1)
    optional clip of A to [-clip, clip]

std is population (ddof 0) unless unbiased=True. A group of one sample or a group whose rewards are
all equal gives A = 0 exactly (decided from max == min, not from a rounded std), never NaN.
No input validation here: `unirl_fast.ops.group_advantages` validates before calling.
"""
from __future__ import annotations

import torch


def _segment_sum(x, inv, n_groups):
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, inv, x)


def group_advantages_ref(rewards, group_ids, *, mode="grpo", std="group", unbiased=False, eps=1e-4, clip=None):
    """rewards [N] float, group_ids [N] int -> advantages [N] fp32."""
    R = rewards.float()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max().item()) + 1 if inv.numel() else 0
    count = _segment_sum(torch.ones_like(R), inv, n_groups)
    total = _segment_sum(R, inv, n_groups)
    mean = total / count
    gmax = torch.full((n_groups,), float("-inf"), device=R.device).scatter_reduce(0, inv, R, "amax")
    gmin = torch.full((n_groups,), float("inf"), device=R.device).scatter_reduce(0, inv, R, "amin")
    flat = (gmax == gmin)[inv]  # singleton or zero-variance group
    if mode == "rloo":
        G = count[inv]
        A = torch.where(G > 1, R - (total[inv] - R) / (G - 1).clamp(min=1.0), torch.zeros_like(R))
    else:
        centered = R - mean[inv]
        if std == "group":
            ddof = 1.0 if unbiased else 0.0
            var = _segment_sum(centered * centered, inv, n_groups) / (count - ddof).clamp(min=1.0)
            A = centered / (var.sqrt()[inv] + eps)
        elif std == "global":
            s = R.std(unbiased=unbiased) if R.numel() > int(unbiased) else R.new_zeros(())
            A = centered / (s + eps)
        else:
            A = centered
    A = torch.where(flat, torch.zeros_like(A), A)
    if clip is not None:
        A = A.clamp(-clip, clip)
    return A
