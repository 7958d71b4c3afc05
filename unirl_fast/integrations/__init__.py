"""Drop-in use of the fused ops in other stacks.

- `unirl_fast.integrations.hf`: `token_logprobs(model, input_ids, attention_mask, ...)` for any Hugging Face
  causal LM with a linear head.
- `unirl_fast.integrations.trl`: `patch_grpo_trainer(trainer)` for TRL's GRPOTrainer (imports trl lazily).
- `unirl_fast.integrations.verl`: `patch()` for verl's actor (imports verl when called).
- `unirl_fast.integrations.liger`: `LigerGRPOLoss`, Liger's `LigerFusedLinearGRPOLoss` interface (no Liger needed).
"""
from .hf import token_logprobs

__all__ = ["token_logprobs"]
