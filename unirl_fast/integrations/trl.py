"""`patch_grpo_trainer(trainer)`: TRL's GRPOTrainer computes its log-probs and loss through unirl_fast.

Tested against trl==1.16.0 (transformers 5.23, torch 2.13). After the call, on that trainer instance:

- `_get_per_token_logps_and_entropies` (old / reference log-probs, generation-time) goes through
  `unirl_fast.integrations.hf.token_logprobs` (fused_linear_logprobs);
- `_compute_loss` runs the backbone once and computes the loss through `fused_linear_policy_loss`
  from the hidden states and the head weight: no [B, L, V] logits on the Triton path.

How TRL's objective maps onto ours (FORMULAS.md section 2; TRL `_compute_loss`):

    TRL loss_type      ours       TRL normaliser (train)                   how it is reproduced
    grpo               grpo       / grad_accum                             grpo, then / grad_accum
    bnpo               bnpo       / grad_accum                             bnpo (local token mean), then / grad_accum
    dr_grpo            dr_grpo    / (B * max_completion_length) / accum    max_completion_length passed, / grad_accum
    dapo               dapo       num_items_in_batch/procs*accum/spg       num_tokens = that normaliser (no / accum)
    luspo              seq_sum    / grad_accum                             seq_sum, then / grad_accum
    cispo, sapo, vespo -          -                                        raise (different surrogate)

- epsilon / epsilon_high -> eps_low / eps_high; importance_sampling_level token|sequence -> same name.
- delta (INTELLECT-2 "two-sided clipping") clamps the unclipped ratio from above: for A < 0 the term is
  -A max(min(r, delta), clip(r)); our dual clip is -A min(max(r, clip(r)), c). With c = delta these agree in
  value and gradient iff delta >= 1 + epsilon_high (then delta only binds where r > delta >= clip(r)); for
  A >= 0 delta never binds. So delta >= 1 + epsilon_high (and > 1) maps to dual_clip=delta; smaller raises.
- beta with the reference model: TRL's KL is k3, added after the IS correction, as ours. TRL's default
  `use_bias_correction_kl=True` multiplies the KL by the (differentiable) ratio, which changes the gradient
  even on-policy; we cannot express that, so beta != 0 requires use_bias_correction_kl=False.
- Per-token multipliers of the policy term only (vLLM importance-sampling correction in every mode, the
  top-entropy-quantile mask, the off-policy sequence mask) are nonnegative weights w on pg: their product goes
  to the op as `tis_weights` (pg_t *= w_t after the clip and dual clip, as TRL multiplies them in), so the
  advantages, and with them the clip-ratio metrics, stay TRL's. The KL term is untouched, as in TRL.
- When TRL has no old log-probs (on-policy: it uses per_token_logps.detach()), and for the entropy and
  off-policy masks, which need the current log-probs before the loss, a no-grad fused_linear_logprobs
  pre-pass over the same hidden states supplies them (+2NHV FLOPs, no logits kept).
- Entropy bonus: TRL subtracts coef * token-mean entropy / accum regardless of loss_type; ours puts -coef H_t
  inside the aggregation, which equals TRL's only for bnpo without an entropy mask. Other combinations and
  adaptive entropy control raise.
- temperature: TRL's; a config logit scale (Cohere, Granite ...) is folded in by `hf.linear_head`.

Raises (never silently changes the objective): unsupported loss types, delta < 1 + epsilon_high,
use_bias_correction_kl with beta != 0, the entropy bonus outside bnpo, MoE auxiliary loss, multimodal
inputs, and multi-process / DeepSpeed / FSDP runs (calling the backbone directly would bypass the wrapper).
Precision: our head computes the logits in fp32 (FORMULAS.md section 1). Under TRL's default bf16 autocast
TRL's own head runs in bf16 unless cast_lm_head_to_fp32=True, so the two agree to bf16 rounding (measured on CPU:
~5e-3 relative on parameter gradients). With cast_lm_head_to_fp32=True the losses agree to fp32 rounding and the
gradients to bf16 rounding of the hidden-state gradient (~1.5e-4 relative); with bf16=False, to fp32 rounding.
Logged metrics: every one TRL 1.16 logs from `_compute_loss`, by its definition: entropy, kl (token means),
policy_loss (with an entropy bonus); clip_ratio/low_mean, high_mean, region_mean as token-weighted means at
importance_sampling_level="token" and as means over all sequences at "sequence" (the op's seq_clip_frac_*);
clip_ratio/low_min and high_max as the min / max over sequences of each one's clipped fraction (TRL gathers them
across processes; here there is one), NaN when no sequence has a valid token, as TRL's nanmin / nanmax.
"""
from __future__ import annotations

import types

import torch

from .._checks import check_pending
from ..ops import fused_linear_logprobs, fused_linear_policy_loss
from .hf import scoring_inputs, token_logprobs

LOSS_TYPES = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "luspo": "seq_sum"}
_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _unsupported(option, value, why):
    raise ValueError(f"patch_grpo_trainer: {option}={value!r} is not supported: {why}")


def check_grpo_options(trainer):
    """Raise for every GRPOTrainer option the fused path cannot reproduce exactly."""
    args = trainer.args
    if trainer.loss_type not in LOSS_TYPES:
        _unsupported("loss_type", trainer.loss_type, f"supported are {sorted(LOSS_TYPES)}")
    delta = getattr(args, "delta", None)
    if delta is not None and not (delta > 1.0 and delta >= 1.0 + trainer.epsilon_high):
        _unsupported("delta", delta, f"it equals unirl_fast's dual clip only when delta > 1 and delta >= "
                     f"1 + epsilon_high = {1.0 + trainer.epsilon_high}")
    if trainer.beta != 0.0 and getattr(args, "use_bias_correction_kl", False):
        _unsupported("use_bias_correction_kl", True, f"with beta={trainer.beta} it multiplies the KL by the "
                     "differentiable ratio; set use_bias_correction_kl=False (plain k3 KL)")
    if getattr(trainer, "use_adaptive_entropy", False):
        _unsupported("use_adaptive_entropy", True, "adaptive entropy control needs the per-token entropies")
    if trainer.entropy_coef != 0.0 and (trainer.loss_type != "bnpo" or trainer.top_entropy_quantile < 1.0):
        _unsupported("entropy_coef", trainer.entropy_coef, "TRL's bonus is a token mean over the whole batch; "
                     f"it matches the fused loss only for loss_type='bnpo' without top_entropy_quantile "
                     f"(got loss_type={trainer.loss_type!r}, top_entropy_quantile={trainer.top_entropy_quantile})")
    if getattr(trainer, "aux_loss_enabled", False):
        _unsupported("router_aux_loss_coef", trainer.router_aux_loss_coef, "the MoE auxiliary loss is not computed")
    if trainer.accelerator.num_processes > 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        _unsupported("num_processes", trainer.accelerator.num_processes, "multi-process, DeepSpeed and FSDP runs "
                     "are not supported yet (the backbone is called directly, bypassing the wrapper)")


def _core_model(model):
    """The *ForCausalLM under an optional PEFT wrapper (LoRA layers stay in place inside it)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def _reject_multimodal(kwargs):
    for name in _MULTIMODAL:
        if kwargs.get(name) is not None:
            _unsupported(name, "<given>", "multimodal inputs are not supported by the fused path")


def _per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                   compute_entropy=False, compute_aux_loss=False, **multimodal):
    """Drop-in for GRPOTrainer._get_per_token_logps_and_entropies through token_logprobs."""
    _reject_multimodal(multimodal)
    if compute_aux_loss:
        _unsupported("compute_aux_loss", True, "the MoE auxiliary loss is not computed")
    core = _core_model(model)
    batch_size = batch_size or input_ids.size(0)
    logps, ents = [], []
    for start in range(0, input_ids.size(0), batch_size):
        sl = slice(start, start + batch_size)
        with self.accelerator.autocast():
            lp, ent = token_logprobs(core, input_ids[sl], attention_mask[sl], logits_to_keep=logits_to_keep,
                                     temperature=self.temperature, return_entropy=compute_entropy,
                                     impl=self._unirl_fast_impl)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), (torch.cat(ents) if compute_entropy else None), None


def _pg_weights(self, inputs, adv, mask, pre):
    """Nonnegative per-token multipliers of the policy term ([B, 1] or [B, K] each)."""
    weights = []
    if self.top_entropy_quantile < 1.0:
        weights.append(self.get_high_entropy_mask(pre[1], mask, 1 - self.top_entropy_quantile).float())
    if self.off_policy_mask_threshold is not None:
        old = inputs.get("old_per_token_logps", pre[0])
        weights.append(self.get_off_policy_mask(adv, pre[0], inputs.get("sampling_per_token_logps", old), mask,
                                                self.off_policy_mask_threshold).float())
    if self.use_vllm and self.vllm_importance_sampling_correction:
        weights.append(inputs["importance_sampling_ratio"].float())
    return weights


def _normaliser(self, inputs, mode):
    """(num_tokens for dapo or None, factor the op's loss is multiplied by)."""
    accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    if self.loss_type != "dapo":
        return None, 1.0 / accum
    norm = float(inputs["num_items_in_batch"].clamp(min=1.0)) / self.accelerator.num_processes
    if mode == "train":
        norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
    # the op clamps its denominator at 1; TRL's normaliser can be smaller, so rescale exactly
    return max(norm, 1.0), max(norm, 1.0) / norm


def _compute_loss(self, model, inputs):
    """Drop-in for GRPOTrainer._compute_loss through fused_linear_policy_loss."""
    check_grpo_options(self)
    _reject_multimodal(inputs)
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    with self.accelerator.autocast():
        hidden, targets, valid, (weight, bias, scale) = scoring_inputs(
            _core_model(model), input_ids, attention_mask, logits_to_keep=completion_ids.size(1))
    hidden = torch.where(valid.unsqueeze(-1), hidden, hidden.new_zeros(()))  # padded rows may hold garbage
    targets = targets.masked_fill(~valid, -100)
    temperature, impl = self.temperature / scale, self._unirl_fast_impl
    adv = inputs["advantages"]
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    old = inputs.get("old_per_token_logps")
    pre = None
    if old is None or self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None:
        with torch.no_grad():
            pre = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                        return_entropy=True, impl=impl)
        old = pre[0] if old is None else old
    tis = None
    for w in _pg_weights(self, inputs, adv, mask, pre):
        tis = w.expand(mask.shape) if tis is None else tis * w
    mode = "train" if self.model.training else "eval"
    num_tokens, factor = _normaliser(self, inputs, mode)
    loss, metrics = fused_linear_policy_loss(
        hidden, weight, targets, old, adv.squeeze(1) if adv.shape[1] == 1 else adv, mask.bool(), bias=bias,
        temperature=temperature, loss_type=LOSS_TYPES[self.loss_type], eps_low=self.epsilon_low,
        eps_high=self.epsilon_high, dual_clip=self.args.delta, importance_sampling=self.importance_sampling_level,
        ref_logp=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, beta=self.beta, kl="k3",
        entropy_coef=self.entropy_coef, max_completion_length=self.max_completion_length, num_tokens=num_tokens,
        impl=impl, tis_weights=None if tis is None else tis.contiguous())
    _log_metrics(self, mode, loss, metrics, mask)  # reads the metrics on the host: the step's sync point anyway
    check_pending()  # so the deferred value checks of this loss call raise here, at no extra sync
    return loss * factor


def _log_metrics(self, mode, loss, metrics, mask):
    log = self._metrics[mode]
    if self.entropy_coef != 0.0:
        log["policy_loss"].append((loss + self.entropy_coef * metrics["entropy_mean"]).item())
    if self.beta != 0.0:
        log["kl"].append(metrics["kl_mean"].item())
    log["entropy"].append(metrics["entropy_mean"].item())
    seq = self.importance_sampling_level == "sequence"
    low, high = (metrics["seq_clip_frac_low" if seq else "clip_frac_low"].item(),
                 metrics["seq_clip_frac_high" if seq else "clip_frac_high"].item())
    log["clip_ratio/low_mean"].append(low)
    log["clip_ratio/high_mean"].append(high)
    log["clip_ratio/region_mean"].append(low + high)  # the two sides never clip the same token
    n = mask.sum(-1)
    low_min, high_max = metrics["seq_clip_frac_low_min"].item(), metrics["seq_clip_frac_high_max"].item()
    if not bool((n > 0).any()):  # TRL: nanmin / nanmax of all-NaN per-sequence fractions
        low_min = high_max = float("nan")
    if seq and bool((n == 0).any()):  # at sequence level TRL scores an empty sequence (ratio 1) as unclipped: 0
        low_min, high_max = (0.0, max(high_max, 0.0)) if low_min == low_min else (0.0, 0.0)
    log["clip_ratio/low_min"].append(low_min)
    log["clip_ratio/high_max"].append(high_max)


def patch_grpo_trainer(trainer, *, impl="auto"):
    """Make a TRL GRPOTrainer compute its log-probs and loss with unirl_fast's fused ops (in place).

    Args:
        trainer: a `trl.GRPOTrainer` (tested with trl 1.16.0), text-only, single process.
        impl: "auto" | "triton" | "reference", passed to every op call.
    Returns:
        the same trainer. Raises ValueError naming the option for anything it cannot reproduce exactly
        (see the module notes); the check runs now and again on every loss call.
    Example:
        >>> trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(beta=0.0), train_dataset=ds)
        >>> patch_grpo_trainer(trainer).train()
    """
    from trl import GRPOTrainer

    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    check_grpo_options(trainer)
    trainer._unirl_fast_impl = impl
    trainer._get_per_token_logps_and_entropies = types.MethodType(_per_token_logps_and_entropies, trainer)
    trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    return trainer
