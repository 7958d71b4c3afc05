"""`LigerGRPOLoss`: Liger's `LigerFusedLinearGRPOLoss` interface (liger-kernel 0.8.5) over `fused_linear_policy_loss`.

Construct it with Liger's arguments and call it as Liger's module: (hidden [B, T, H], lm-head weight [V, H],
token ids [B, T], attention mask [B, T], advantages [B], bias, ref_per_token_logps, old_per_token_logps, ref_input,
ref_weight, ref_bias, vllm_is_ratio, num_items_in_batch) -> (loss, [kl mean if beta != 0, clip fraction]). Liger's
own test file runs against it (tests/test_liger_suite.py); docs/conventions.md explains where the two differ.

How Liger's options map onto ours (Liger follows TRL's conventions):

    loss_type  grpo, bnpo, dr_grpo (max_completion_length)  -> the same names
               dapo  -> dapo with num_tokens = num_items_in_batch, else the mask's token count (Liger's normaliser
                        in one process), clamped at 1
               luspo -> seq_sum (sequence-level only, as in Liger)
               cispo, sapo, vespo -> ValueError (other surrogates, not options of our op)
    delta      -> dual_clip=delta when delta >= 1 + epsilon_high (then the two agree in value and gradient; see
                  integrations/trl.py), else ValueError
    beta       k3 KL to ref_per_token_logps, else to the reference head (ref_input, ref_weight, ref_bias) under
               no_grad, else to the current log-probs (KL 0, as Liger without a reference model)
    use_bias_correction_kl with beta != 0 -> ValueError (the KL times the differentiable ratio is not expressible)
    vllm_is_ratio -> tis_weights (multiplies the policy term before the KL, as Liger)
    old_per_token_logps None -> the current log-probs, detached (on-policy), from a no-grad pre-pass
    compiled, chunk_size -> accepted and unused (our op has its own chunking)
"""
from __future__ import annotations

import torch

from ..ops import fused_linear_logprobs, fused_linear_policy_loss

LOSS_TYPES = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "luspo": "seq_sum"}


def _unsupported(option, value, why):
    raise ValueError(f"unirl_fast LigerGRPOLoss: {option}={value!r} is not supported: {why}")


class LigerGRPOLoss(torch.nn.Module):
    """Liger's `LigerFusedLinearGRPOLoss` arguments and call; the loss and gradients from `fused_linear_policy_loss`
    (module docstring)."""

    def __init__(self, beta=0.04, compiled=True, use_ref_model=True, chunk_size=1, epsilon_low=0.2, epsilon_high=0.2,
                 loss_type="dapo", max_completion_length=None, importance_sampling_level="token",
                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, temperature=1.0, delta=None,
                 use_bias_correction_kl=False, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                 vespo_lambda_neg=2.0, impl="auto"):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            _unsupported("loss_type", loss_type, f"supported are {sorted(LOSS_TYPES)}")
        if loss_type == "luspo" and importance_sampling_level != "sequence":
            _unsupported("importance_sampling_level", importance_sampling_level, "luspo is sequence-level (Liger too)")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        if delta is not None and not (delta > 1.0 and delta >= 1.0 + epsilon_high):
            _unsupported("delta", delta, f"it equals our dual clip only when delta >= 1 + epsilon_high = "
                         f"{1.0 + epsilon_high}")
        if beta != 0.0 and use_bias_correction_kl:
            _unsupported("use_bias_correction_kl", True, "the KL times the differentiable ratio is not an option")
        self.beta, self.use_ref_model, self.temperature, self.impl = beta, use_ref_model, temperature, impl
        self.kw = dict(loss_type=LOSS_TYPES[loss_type], eps_low=epsilon_low, eps_high=epsilon_high,
                       importance_sampling=importance_sampling_level, dual_clip=delta, beta=beta,
                       max_completion_length=max_completion_length, temperature=temperature, impl=impl)

    def _logps(self, x, w, b, ids):
        with torch.no_grad():
            return fused_linear_logprobs(x, w, ids, bias=b, temperature=self.temperature, impl=self.impl)[0]

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        current = None
        if old_per_token_logps is None or (self.beta != 0.0 and ref_per_token_logps is None
                                           and not self.use_ref_model):
            current = self._logps(_input, lin_weight, bias, selected_token_ids)
        old = current if old_per_token_logps is None else old_per_token_logps
        ref = ref_per_token_logps
        if self.beta != 0.0 and ref is None:
            ref = self._logps(ref_input, ref_weight, ref_bias, selected_token_ids) if self.use_ref_model else current
        kw = dict(self.kw)
        if kw["loss_type"] == "dapo":
            n = attention_mask.float().sum() if num_items_in_batch is None else num_items_in_batch
            kw["num_tokens"] = max(float(n), 1.0)  # our op takes a number: one host read (Liger's is a tensor)
        loss, m = fused_linear_policy_loss(_input, lin_weight, selected_token_ids, old, advantages, attention_mask,
                                           bias=bias, ref_logp=ref if self.beta != 0.0 else None,
                                           tis_weights=vllm_is_ratio, **kw)
        metrics = [m["kl_mean"]] if self.beta != 0.0 else []
        return loss, metrics + [m["clip_frac_low"] + m["clip_frac_high"]]
