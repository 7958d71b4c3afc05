"""Public GRPO-family policy loss ops (FORMULAS.md section 2).

Shapes: B sequences, L tokens, H hidden, V vocab. The loss is an fp32 scalar; metrics are detached
fp32 scalar tensors (no host sync): clip_frac_low, clip_frac_high, ratio_mean, TRL's sequence views of the clip
fractions (seq_clip_frac_low / _high: mean over sequences of each one's clipped fraction; seq_clip_frac_low_min /
_high_max: their min / max over non-empty sequences, 0 if none), and where given dual_clip_frac, kl_mean,
entropy_mean, tis_weight_mean, tis_capped_frac.

The peers' conventions are options (docs/conventions.md maps each to TRL, verl, Liger and Flow-GRPO), all off by
default: empty_seqs, dr_grpo_norm, log_ratio_min / log_ratio_max, kl_clamp, kl "abs" and straight-through "k1+" /
"k3+" / "abs+", tis_level, tis_weights.
"""
from __future__ import annotations

import torch

from .. import _checks as C
from ..reference import fused_linear_policy_loss_ref
from ..reference.policy_loss import policy_loss_ref
from ._dispatch import choose, triton_impl
from .logprobs import _check_common, blame_head, check_linear_head, check_logits_dtype

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "seq_sum")
IS_LEVELS = ("token", "sequence")
KL_KINDS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
EMPTY_SEQS = ("count", "skip")
DR_GRPO_NORMS = ("batch_length", "length")
TIS_LEVELS = ("token", "sequence")


def _check_per_token(name, x, ref, mask, *, required=False):
    if x is None and not required:
        return
    C.check_tensor(name, x, floating=True)
    C.check_same_shape(name, x, "logp", ref)
    C.check_finite(f"{name} (at a valid, mask=1 token)", x.detach(), where=mask)


def check_convention_options(*, empty_seqs, dr_grpo_norm, log_ratio_min, log_ratio_max, kl_clamp, tis_level,
                             tis_weights, rollout_logp, tis_cap):
    """Validate the peer-convention options (docs/conventions.md)."""
    C.check_option("empty_seqs", empty_seqs, EMPTY_SEQS)
    C.check_option("dr_grpo_norm", dr_grpo_norm, DR_GRPO_NORMS)
    C.check_option("tis_level", tis_level, TIS_LEVELS)
    lo = None if log_ratio_min is None else C.check_finite_scalar("log_ratio_min", log_ratio_min)
    hi = None if log_ratio_max is None else C.check_finite_scalar("log_ratio_max", log_ratio_max)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"log_ratio_min={log_ratio_min!r} must be below log_ratio_max={log_ratio_max!r}")
    if kl_clamp is not None:
        C.check_finite_scalar("kl_clamp", kl_clamp, positive=True)
    if tis_weights is not None:
        if rollout_logp is not None:
            raise ValueError("pass either rollout_logp (weights computed here) or tis_weights (given), not both")
        if tis_level != "token":
            raise ValueError(f"tis_level={tis_level!r} applies to weights computed from rollout_logp; given "
                             "tis_weights are used as they are")
    elif tis_level != "token" and rollout_logp is None:
        raise ValueError(f"tis_level={tis_level!r} needs rollout_logp and tis_cap")
    if tis_weights is not None and tis_cap is not None and not (isinstance(tis_cap, (int, float)) and tis_cap > 0):
        raise ValueError(f"tis_cap must be a number > 0 (float('inf') for no cap), got {tis_cap!r}")


def check_policy_options(B, L, advantages, *, loss_type, eps_low, eps_high, dual_clip, importance_sampling,
                         beta, kl, rollout_logp, tis_cap, ref_logp, entropy_coef, max_completion_length,
                         num_tokens, tis_weights=None):
    """Validate everything in policy_loss that does not depend on the per-token log-probs."""
    C.check_option("loss_type", loss_type, LOSS_TYPES)
    C.check_option("importance_sampling", importance_sampling, IS_LEVELS)
    C.check_option("kl", kl, KL_KINDS)
    C.check_tensor("advantages", advantages, ndim=(1, 2), floating=True)
    if tuple(advantages.shape) not in ((B,), (B, L)):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected [{B}] or [{B}, {L}]")
    C.check_finite("advantages", advantages.detach())
    lo = C.check_finite_scalar("eps_low", eps_low, nonneg=True)
    if lo > 1:
        raise ValueError(f"eps_low must be in [0, 1], got {eps_low!r}")
    C.check_finite_scalar("eps_high", eps_high, nonneg=True)
    if dual_clip is not None:
        C.check_finite_scalar("dual_clip", dual_clip, gt=1.0)
    C.check_finite_scalar("beta", beta, nonneg=True)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta!r} needs ref_logp")
    if tis_weights is None and (rollout_logp is None) != (tis_cap is None):
        raise ValueError("rollout_logp and tis_cap go together (truncated importance sampling needs both); "
                         f"got rollout_logp={'set' if rollout_logp is not None else None}, tis_cap={tis_cap!r}")
    if tis_cap is not None and not (isinstance(tis_cap, (int, float)) and tis_cap > 0):
        raise ValueError(f"tis_cap must be a number > 0 (float('inf') for no cap), got {tis_cap!r}")
    C.check_finite_scalar("entropy_coef", entropy_coef)
    if max_completion_length is not None and (not isinstance(max_completion_length, int)
                                              or isinstance(max_completion_length, bool)
                                              or max_completion_length < 1):
        raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
    if num_tokens is not None:
        if loss_type not in ("bnpo", "dapo"):
            raise ValueError(f"num_tokens is only used by loss_type 'bnpo'/'dapo', got loss_type={loss_type!r}")
        C.check_finite_scalar("num_tokens", num_tokens, positive=True)


def policy_loss(logp, old_logp, advantages, mask, *, loss_type="grpo", eps_low=0.2, eps_high=0.2, dual_clip=None,
                importance_sampling="token", ref_logp=None, beta=0.0, kl="k3", rollout_logp=None, tis_cap=None,
                entropy=None, entropy_coef=0.0, max_completion_length=None, num_tokens=None, impl="auto",
                empty_seqs="count", dr_grpo_norm="batch_length", log_ratio_min=None, log_ratio_max=None,
                kl_clamp=None, tis_level="token", tis_weights=None):
    """GRPO-family clipped surrogate with optional KL, entropy bonus and truncated importance sampling.

    Args:
        logp: [B, L] current-policy token log-probs (differentiable). old_logp: [B, L] behaviour log-probs (data).
        advantages: [B] (or per-token [B, L]). mask: [B, L] bool or 0/1.
        ref_logp, rollout_logp, entropy: optional [B, L]; entropy is differentiable.
        loss_type: grpo | bnpo | dapo | dr_grpo | seq_sum; importance_sampling: token | sequence.
        kl: k1 | k2 | k3 | abs, or k1+ | k3+ | abs+ (that value with k2's gradient, verl's straight-through).
        max_completion_length: dr_grpo's normaliser (default L). num_tokens: bnpo/dapo global token count.
        Peer conventions (docs/conventions.md; defaults keep FORMULAS.md section 2):
        empty_seqs: "count" (TRL) | "skip" (verl: sequences without a valid token leave the seq-mean
            denominators of grpo, seq_sum and dr_grpo). dr_grpo_norm: "batch_length" (B x length, TRL) |
            "length" (the length alone, older verl). log_ratio_min / log_ratio_max: clamp the log-ratio (token IS)
            or the sequence's mean log-ratio (sequence IS) before exp, no gradient outside (verl: +-20 / max 10).
            kl_clamp: |kl_t| <= kl_clamp, no gradient outside (verl's k3: 10). tis_level: "token" |
            "sequence" (one weight min(exp(sum_t m (old - rollout)), tis_cap) per sequence). tis_weights: [B, L]
            given IS weights (data; e.g. verl's rollout_is_weights), capped at tis_cap when given.
    Returns:
        (loss fp32 scalar, metrics dict of detached fp32 scalars)
    Example:
        >>> lp = torch.randn(4, 6).requires_grad_()
        >>> loss, m = policy_loss(lp, lp.detach(), torch.randn(4), torch.ones(4, 6, dtype=torch.bool))
    """
    C.check_tensor("logp", logp, ndim=2, floating=True)
    B, L = logp.shape
    mask = C.check_mask("mask", mask)
    C.check_same_shape("mask", mask, "logp", logp)
    check_policy_options(B, L, advantages, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high,
                         dual_clip=dual_clip, importance_sampling=importance_sampling, beta=beta, kl=kl,
                         rollout_logp=rollout_logp, tis_cap=tis_cap, ref_logp=ref_logp, entropy_coef=entropy_coef,
                         max_completion_length=max_completion_length, num_tokens=num_tokens, tis_weights=tis_weights)
    conv = dict(empty_seqs=empty_seqs, dr_grpo_norm=dr_grpo_norm, log_ratio_min=log_ratio_min,
                log_ratio_max=log_ratio_max, kl_clamp=kl_clamp, tis_level=tis_level, tis_weights=tis_weights)
    check_convention_options(rollout_logp=rollout_logp, tis_cap=tis_cap, **conv)
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef!r} needs entropy")
    _check_per_token("old_logp", old_logp, logp, mask, required=True)
    for name, x in (("logp", logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp), ("entropy", entropy),
                    ("tis_weights", tis_weights)):
        _check_per_token(name, x, logp, mask)
    C.check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                        rollout_logp=rollout_logp, entropy=entropy, tis_weights=tis_weights)
    kw = dict(loss_type=loss_type, eps_low=float(eps_low), eps_high=float(eps_high), dual_clip=dual_clip,
              importance_sampling=importance_sampling, ref_logp=ref_logp, beta=float(beta), kl=kl,
              rollout_logp=rollout_logp, tis_cap=tis_cap, entropy=entropy, entropy_coef=float(entropy_coef),
              max_completion_length=max_completion_length, num_tokens=num_tokens, **conv)
    fn = triton_impl("policy_loss") if choose("policy_loss", impl, logp.device) == "triton" else policy_loss_ref
    return fn(logp, old_logp, advantages, mask, **kw)


def fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask, *, bias=None, temperature=1.0,
                             ignore_index=-100, loss_type="grpo", eps_low=0.2, eps_high=0.2, dual_clip=None,
                             importance_sampling="token", ref_logp=None, beta=0.0, kl="k3", rollout_logp=None,
                             tis_cap=None, entropy_coef=0.0, max_completion_length=None, num_tokens=None,
                             impl="auto", accum_dtype=torch.float32, empty_seqs="count", dr_grpo_norm="batch_length",
                             log_ratio_min=None, log_ratio_max=None, kl_clamp=None, tis_level="token",
                             tis_weights=None, logits_dtype=None):
    """`policy_loss` computed straight from hidden states and the LM head.

    Token log-probs and entropies come from softmax((hidden @ weight.T + bias) / temperature); entropy
    is always computed (metric `entropy_mean`) and enters the loss when entropy_coef != 0. Targets equal
    to `ignore_index` are treated as masked out.
    Args:
        hidden: [B, L, H] or flattened [B*L, H] (differentiable); weight: [V, H] (differentiable); bias: [V] or None.
        targets, old_logp, mask: [B, L]; advantages: [B] or [B, L]; other options (the peer conventions
            included) as in `policy_loss`.
        accum_dtype: torch.float32 (default) sums the head gradient over token chunks in fp32 and rounds it to
            the head's dtype once (Triton path); None sums in the head's dtype (one rounding per chunk). The
            reference computes in fp32 either way.
        logits_dtype: None (default) keeps the Triton path's logits in the compute dtype (bf16 for a bf16 head, as
            a Hugging Face lm_head has them); torch.float32 forms a bf16 head's logits in fp32 (exact products,
            fp32 sums, as verl's fused kernel) in chunks of the same bytes (a third of the rows; the module doc of
            ops/fused_linear_policy_loss_triton.py has the backward's dtypes). fp16 heads already compute in fp32;
            the reference forms fp32 logits whatever this says.
    Returns:
        (loss fp32 scalar, metrics dict)
    Example:
        >>> h, W, y = torch.randn(2, 5, 8, requires_grad=True), torch.randn(40, 8), torch.randint(0, 40, (2, 5))
        >>> loss, m = fused_linear_policy_loss(h, W, y, torch.zeros(2, 5) - 3.0, torch.randn(2), torch.ones(2, 5))
    """
    C.check_tensor("targets", targets, ndim=2, integer=True)
    hidden = check_linear_head(hidden, weight, targets, bias)
    _check_common(temperature, ignore_index, False)
    C.check_targets("targets", targets, weight.shape[0], ignore_index)
    B, L = targets.shape
    mask = C.check_mask("mask", mask)
    C.check_same_shape("mask", mask, "targets", targets)
    check_policy_options(B, L, advantages, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high,
                         dual_clip=dual_clip, importance_sampling=importance_sampling, beta=beta, kl=kl,
                         rollout_logp=rollout_logp, tis_cap=tis_cap, ref_logp=ref_logp, entropy_coef=entropy_coef,
                         max_completion_length=max_completion_length, num_tokens=num_tokens, tis_weights=tis_weights)
    conv = dict(empty_seqs=empty_seqs, dr_grpo_norm=dr_grpo_norm, log_ratio_min=log_ratio_min,
                log_ratio_max=log_ratio_max, kl_clamp=kl_clamp, tis_level=tis_level, tis_weights=tis_weights)
    check_convention_options(rollout_logp=rollout_logp, tis_cap=tis_cap, **conv)
    valid = mask & (targets != ignore_index)
    _check_per_token("old_logp", old_logp, targets, valid, required=True)
    for name, x in (("ref_logp", ref_logp), ("rollout_logp", rollout_logp), ("tis_weights", tis_weights)):
        _check_per_token(name, x, targets, valid)
    C.check_same_device(hidden=hidden, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                        rollout_logp=rollout_logp, tis_weights=tis_weights)
    kw = dict(bias=bias, temperature=float(temperature), ignore_index=ignore_index, loss_type=loss_type,
              eps_low=float(eps_low), eps_high=float(eps_high), dual_clip=dual_clip,
              importance_sampling=importance_sampling, ref_logp=ref_logp, beta=float(beta), kl=kl,
              rollout_logp=rollout_logp, tis_cap=tis_cap, entropy_coef=float(entropy_coef),
              max_completion_length=max_completion_length, num_tokens=num_tokens, **conv)
    if accum_dtype not in (torch.float32, None):
        raise ValueError(f"accum_dtype must be torch.float32 or None (the head's dtype), got {accum_dtype!r}")
    check_logits_dtype(logits_dtype)
    kw["logits_dtype"] = logits_dtype
    if choose("fused_linear_policy_loss", impl, hidden.device) == "triton":
        loss, metrics = triton_impl("fused_linear_policy_loss")(hidden, weight, targets, old_logp, advantages,
                                                                mask, accum_dtype=accum_dtype, **kw)
    else:
        loss, metrics = fused_linear_policy_loss_ref(hidden, weight, targets, old_logp, advantages, mask, **kw)
    if C.value_checks_enabled():
        # NaN/inf in hidden, weight or bias makes a valid token's entropy, so their mean, non-finite; a finite head
        # never does (unlike the loss, which a huge ratio may legitimately make infinite)
        refs = tuple(C.weak(x) for x in (hidden, weight, bias))
        C.flag(~torch.isfinite(metrics["entropy_mean"]), lambda i: blame_head(refs, where="non-finite entropy"))
    return loss, metrics
