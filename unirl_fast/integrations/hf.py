"""Token log-probs of a Hugging Face causal LM without materialising its [B, L, V] logits.

Design notes.

A `*ForCausalLM` forward is `logits = transform(lm_head(backbone(input_ids)))`. We run the backbone only
(`model.base_model`, the decoder with its final norm), keep the hidden states of the positions that predict
the given tokens, and hand them to `unirl_fast.fused_linear_logprobs` with the model's own head weight and
bias (FORMULAS.md section 1). The head parameters are used as they are, so tied input/output embeddings
(one shared Parameter) receive the gradient of both uses, as in the model's own forward.

Shift. Position t predicts token t+1: with L tokens there are L-1 targets. `logits_to_keep=K` (TRL's name)
scores only the last K tokens, i.e. hidden positions L-K-1 .. L-2 -> output [B, K].

Padding. A target whose attention_mask is 0 is not scored: its log-prob and entropy are 0 and it gets no
gradient. Only the valid rows are gathered and sent to the op ([N, H], N = number of valid targets), so
padding costs no head FLOPs and garbage hidden states at padded positions never reach the op. This is the
same convention as TRL's fused LM head (labels = input_ids masked by attention_mask).

Logit transforms. The fused op computes softmax((h W^T + b) / T). A head whose logits are multiplied by a
positive scalar s (Cohere `logit_scale`, Falcon-H1 `lm_head_multiplier`, `output_multiplier`, Granite
`logits_scaling` (divides), HyperCLOVA X `logits_scaling` (multiplies), `logits_mup_width_multiplier`
(divides the hidden states)) is folded exactly into the temperature: (s z) / T = z / (T / s). Non-linear
transforms (final logit soft-capping: Gemma 2/3, `logits_soft_cap`, `output_logit_soft_cap`) cannot be
expressed and raise; so does a head that is not a plain `nn.Linear` over the backbone's hidden size
(e.g. a low-rank unembedding projection).

Cost: the backbone forward, plus the op's 2NHV FLOPs over the N scored tokens; memory O(N H) for the
gathered hidden states instead of O(B L V) logits (on the Triton path; the reference path materialises
fp32 logits of the N scored rows).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks as C
from ..ops import fused_linear_logprobs

# (config attribute, how the logits depend on it): "mul" logits * v, "div" logits / v.
_SCALAR_TRANSFORMS = (
    ("logit_scale", "mul"),
    ("output_multiplier", "mul"),
    ("lm_head_multiplier", "mul"),
    ("logits_scaling", "div"),  # Granite family; HyperCLOVA X multiplies (handled below)
    ("logits_mup_width_multiplier", "div"),
)
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a Hugging Face PreTrainedModel with a .config, got {type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_logit_scale(model) -> float:
    """The positive scalar s with logits = s * lm_head(h); raise for transforms that are not a scalar scale."""
    cfg = _text_config(model)
    for name in _SOFTCAPS:
        value = getattr(cfg, name, None)
        if value not in (None, 0, 0.0):
            raise ValueError(f"{type(model).__name__} applies a non-linear logit transform ({name}={value!r}); "
                             "fused_linear_logprobs computes softmax(h W^T + b) and cannot reproduce it. "
                             f"Set config.{name}=None only if the model was trained without it.")
    scale = 1.0
    for name, kind in _SCALAR_TRANSFORMS:
        value = getattr(cfg, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{type(model).__name__} scales its logits by config.{name}={value!r}; only a finite "
                             "number > 0 can be folded into the temperature")
        if kind == "div" and not (name == "logits_scaling" and getattr(cfg, "model_type", "") == "hyperclovax"):
            scale /= float(value)
        else:
            scale *= float(value)
    return scale


def linear_head(model):
    """(weight [V, H], bias [V] or None, logit scale s) of a causal LM whose logits are s * (h W^T + b)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
                        "token_logprobs needs a causal LM with a linear head")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(f"{type(model).__name__}'s head is {type(head).__name__}, not a plain nn.Linear; "
                        "its logits cannot be computed from (weight, bias) alone")
    return head.weight, head.bias, head_logit_scale(model)


def _backbone(model):
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"{type(model).__name__} exposes no backbone through .base_model; pass a *ForCausalLM model")
    return base


def _check_inputs(input_ids, attention_mask, logits_to_keep):
    C.check_tensor("input_ids", input_ids, ndim=2, integer=True)
    B, L = input_ids.shape
    if L < 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; need at least 2 tokens to score one")
    if attention_mask is not None:
        C.check_tensor("attention_mask", attention_mask, ndim=2)
        C.check_same_shape("attention_mask", attention_mask, "input_ids", input_ids)
    if logits_to_keep is None:
        return L - 1
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or not 1 <= logits_to_keep <= L - 1:
        raise ValueError(f"logits_to_keep must be an int in [1, {L - 1}] for input_ids of length {L}, "
                         f"got {logits_to_keep!r}")
    return logits_to_keep


def scoring_inputs(model, input_ids, attention_mask=None, *, logits_to_keep=None, **model_kwargs):
    """Run the backbone and return what the head needs to score the last K tokens.

    Returns (hidden [B, K, H] in the backbone's dtype, targets [B, K] int64, valid [B, K] bool,
    (weight, bias, logit_scale)). hidden at invalid positions is left as the backbone produced it.
    """
    K = _check_inputs(input_ids, attention_mask, logits_to_keep)
    head = linear_head(model)
    kwargs = dict(model_kwargs)
    kwargs.setdefault("use_cache", False)
    out = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    weight = head[0]
    if hidden.shape[-1] != weight.shape[1]:
        raise TypeError(f"{type(model).__name__}'s backbone returns hidden size {hidden.shape[-1]} but its head "
                        f"weight is {tuple(weight.shape)}: the head is not applied directly to the last hidden "
                        "states")
    L = input_ids.shape[1]
    hidden = hidden[:, L - K - 1:L - 1].to(weight.device)
    targets = input_ids[:, L - K:].to(weight.device)
    if attention_mask is None:
        valid = torch.ones_like(targets, dtype=torch.bool)
    else:
        valid = attention_mask[:, L - K:].to(weight.device) != 0
    return hidden, targets, valid, head


def token_logprobs(model, input_ids, attention_mask=None, *, logits_to_keep=None, temperature=1.0,
                   return_entropy=False, impl="auto", **model_kwargs):
    """Per-token log-probs (and entropies) of `input_ids` under a causal LM, without its [B, L, V] logits.

    Args:
        model: a Hugging Face `*ForCausalLM` (backbone at `.base_model`, linear head at `get_output_embeddings()`).
        input_ids: [B, L] int. attention_mask: [B, L] 0/1 (left or right padding) or None.
        logits_to_keep: None (score tokens 1..L-1) or K in [1, L-1] (score the last K tokens, like TRL).
        temperature: > 0; logits are divided by it (a config logit scale is folded in, see module notes).
        model_kwargs: passed to the backbone (e.g. position_ids).
    Returns:
        (logp, entropy or None), fp32, [B, L-1] or [B, K]; 0 (and no gradient) where the target is padding.
        Differentiable in the model parameters (backbone and head).
    Example:
        >>> logp, ent = token_logprobs(model, ids, mask, logits_to_keep=8, temperature=0.7, return_entropy=True)
    """
    C.check_finite_scalar("temperature", temperature, positive=True)
    hidden, targets, valid, (weight, bias, scale) = scoring_inputs(
        model, input_ids, attention_mask, logits_to_keep=logits_to_keep, **model_kwargs)
    logp, ent = fused_linear_logprobs(hidden[valid], weight, targets[valid], bias=bias,
                                      temperature=float(temperature) / scale, return_entropy=return_entropy,
                                      impl=impl)
    logp = logp.new_zeros(valid.shape).masked_scatter(valid, logp)
    if ent is not None:
        ent = ent.new_zeros(valid.shape).masked_scatter(valid, ent)
    return logp, ent
