"""Drop-in use of the fused ops in other stacks.

- `unirl_fast.integrations.hf`: `token_logprobs(model, input_ids, attention_mask, ...)` for any Hugging Face
  causal LM with a linear head.
- `unirl_fast.integrations.trl`: `patch_grpo_trainer(trainer)` for TRL's GRPOTrainer (imports trl lazily).
"""
from .hf import token_logprobs

__all__ = ["token_logprobs"]
