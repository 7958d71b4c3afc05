"""Triton path of `group_advantages` (FORMULAS.md section 3) as the custom op `unirl_fast::group_advantages`.

Host side: torch.unique of the ids (sorted, with inverse and counts), a stable argsort of the inverse ids
(the samples of each group become one segment) and a cumsum of the counts (segment offsets); the global
std for std="global" is one torch reduction. Then one segmented Triton pass (kernels/advantages.py).
The number of groups is data-dependent, which is why this is an opaque custom op: torch.compile sees
an [N] -> [N] function (register_fake). Not differentiable (advantages are data in GRPO).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import advantages as K
from ._dispatch import register_triton


@torch.library.custom_op("unirl_fast::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_ids: torch.Tensor, mode: str, std: str, unbiased: bool,
                         eps: float, clip: Optional[float]) -> torch.Tensor:
    R = rewards.detach().to(torch.float32).contiguous()
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=R.device)
    torch.cumsum(counts, 0, out=starts[1:])
    if std == "global" and mode == "grpo":
        gstd = R.std(unbiased=unbiased) if R.numel() > int(unbiased) else R.new_zeros(())
    else:
        gstd = R.new_zeros(())
    return K.group_advantages_fwd(R, order, starts, gstd.reshape(()).contiguous(), mode=mode, std=std,
                                  unbiased=unbiased, eps=eps, clip=clip)


@_group_advantages_op.register_fake
def _(rewards, group_ids, mode, std, unbiased, eps, clip):
    return rewards.new_empty(rewards.shape, dtype=torch.float32)


@register_triton("group_advantages")
def group_advantages_triton(rewards, group_ids, *, mode="grpo", std="group", unbiased=False, eps=1e-4, clip=None):
    """Triton `group_advantages`: same arguments and result as `group_advantages_ref`."""
    return _group_advantages_op(rewards, group_ids, mode, std, bool(unbiased), float(eps),
                                None if clip is None else float(clip))
