"""unirl_fast: fused GPU ops and a lean trainer for RL on unified (LM + diffusion) models.

Every op takes `impl="auto" | "triton" | "reference"`; see `unirl_fast.ops` and FORMULAS.md. Value checks:
`set_checks("cheap" | "full" | "off")` ("cheap", the default, is O(output) and sync-free; see `_checks`).
"""
from ._checks import check_pending, checks, get_checks, set_checks
from .ops import (
    cfg_velocity,
    flow_policy_loss,
    flow_sde_step,
    flow_step_logprob,
    fused_linear_logprobs,
    fused_linear_policy_loss,
    group_advantages,
    logprobs_from_logits,
    policy_loss,
)

__version__ = "0.1.0"

__all__ = [
    "logprobs_from_logits", "fused_linear_logprobs", "policy_loss", "fused_linear_policy_loss", "group_advantages",
    "flow_sde_step", "flow_step_logprob", "flow_policy_loss", "cfg_velocity", "set_checks", "get_checks", "checks",
    "check_pending", "__version__",
]
