"""Public ops: validation and backend choice; the math lives in `unirl_fast.reference` and `unirl_fast.kernels`."""
from ._dispatch import triton_installed
from .advantages import group_advantages
from .flow import cfg_velocity, flow_policy_loss, flow_sde_step, flow_step_logprob
from .forward_loss import forward_process_loss
from .logprobs import fused_linear_logprobs, logprobs_from_logits
from .policy_loss import fused_linear_policy_loss, policy_loss

if triton_installed():  # register the Triton paths; without triton every op runs its reference
    from . import (  # noqa: F401
        advantages_triton,
        flow_triton,
        forward_loss_triton,
        fused_linear_policy_loss_triton,
        logprobs_triton,
        policy_loss_triton,
    )

__all__ = [
    "logprobs_from_logits", "fused_linear_logprobs", "policy_loss", "fused_linear_policy_loss", "group_advantages",
    "flow_sde_step", "flow_step_logprob", "flow_policy_loss", "cfg_velocity", "forward_process_loss",
]
