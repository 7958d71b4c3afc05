"""Public group advantages op (FORMULAS.md section 3). N samples, ragged groups with arbitrary integer ids."""
from __future__ import annotations

from .. import _checks as C
from ..reference.advantages import group_advantages_ref
from ._dispatch import choose, triton_impl

MODES = ("grpo", "rloo")
STDS = ("group", "global", "none")


def group_advantages(rewards, group_ids, *, mode="grpo", std="group", unbiased=False, eps=1e-4, clip=None,
                     impl="auto"):
    """Group-normalised advantages.

    Args:
        rewards: [N] float (finite). group_ids: [N] integer; samples of one prompt share an id.
        mode: grpo | rloo. std: group | global | none (grpo only). unbiased: ddof=1 std (TRL) instead of 0.
        eps: added to the std. clip: clip A to [-clip, clip] (Flow-GRPO uses 5).
    Returns:
        advantages [N] fp32 (not differentiable). Singleton and zero-variance groups give exactly 0.
    Example:
        >>> group_advantages(torch.tensor([1., 0., 3., 3.]), torch.tensor([7, 7, 2, 2]))
    """
    C.check_tensor("rewards", rewards, ndim=1, floating=True)
    C.check_tensor("group_ids", group_ids, ndim=1, integer=True)
    C.check_same_shape("group_ids", group_ids, "rewards", rewards)
    C.check_same_device(rewards=rewards, group_ids=group_ids)
    C.check_option("mode", mode, MODES)
    C.check_option("std", std, STDS)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {unbiased!r}")
    C.check_finite_scalar("eps", eps, nonneg=True)
    if clip is not None:
        C.check_finite_scalar("clip", clip, positive=True)
    C.check_finite("rewards", rewards)
    kw = dict(mode=mode, std=std, unbiased=unbiased, eps=float(eps), clip=None if clip is None else float(clip))
    if choose("group_advantages", impl, rewards.device) == "triton":
        return triton_impl("group_advantages")(rewards, group_ids, **kw)
    return group_advantages_ref(rewards, group_ids, **kw)
