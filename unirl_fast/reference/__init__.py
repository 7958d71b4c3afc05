"""fp32 eager PyTorch oracles for every op (FORMULAS.md sections 1-5). Tests and benchmarks import these."""
from .advantages import group_advantages_ref
from .flow import flow_policy_loss_ref, flow_sde_step_ref, flow_step_logprob_ref
from .forward_loss import forward_process_loss_ref
from .logprobs import fused_linear_logprobs_ref, logprobs_from_logits_ref
from .policy_loss import policy_loss_ref


def fused_linear_policy_loss_ref(hidden, weight, targets, old_logp, advantages, mask, *, bias=None,
                                 temperature=1.0, ignore_index=-100, logits_dtype=None, **policy_kwargs):
    """Head + log-probs + entropy + policy loss, unfused; targets equal to ignore_index are masked out. fp32 logits
    whatever `logits_dtype` says (the Triton path's option)."""
    logp, ent = fused_linear_logprobs_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                          ignore_index=ignore_index, return_entropy=True)
    mask = mask.bool() & (targets != ignore_index)
    return policy_loss_ref(logp, old_logp, advantages, mask, entropy=ent, **policy_kwargs)


__all__ = [
    "logprobs_from_logits_ref", "fused_linear_logprobs_ref", "policy_loss_ref", "fused_linear_policy_loss_ref",
    "group_advantages_ref", "flow_sde_step_ref", "flow_step_logprob_ref", "flow_policy_loss_ref",
    "forward_process_loss_ref",
]
