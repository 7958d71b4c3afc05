"""Public token log-prob / entropy ops (FORMULAS.md section 1).

Shapes: N tokens in any leading dims ([B, L] or flattened [N]), V vocab, H hidden.
Both ops return fp32 per-token log-probs (and entropies) and are differentiable in their float inputs.
"""
from __future__ import annotations

from .. import _checks as C
from ..reference.logprobs import fused_linear_logprobs_ref, logprobs_from_logits_ref
from ._dispatch import choose, triton_impl


def _check_common(temperature, ignore_index, return_entropy):
    C.check_finite_scalar("temperature", temperature, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")


def _check_inplace(inplace_backward):
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")


def logprobs_from_logits(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False, impl="auto",
                         inplace_backward=False):
    """Per-token log-probs (and entropy) of `targets` under softmax(logits / temperature).

    `inplace_backward=True` lets the Triton path write dlogits over the logits buffer during backward
    (no second [N, V] buffer; flash-attn's cross-entropy does the same). It is a permission, not a
    requirement: the caller promises not to read `logits` after backward, and the reference path, which
    has no such buffer to reuse, gives the same gradients without touching `logits`.

    Args:
        logits: [..., V] fp16/bf16/fp32, differentiable. -inf entries (masked vocabulary) are allowed.
        targets: [...] integer ids in [0, V) or `ignore_index` (gives logp = 0, entropy = 0, no gradient).
    Returns:
        (logp [...] fp32, entropy [...] fp32 or None)
    Example:
        >>> logp, ent = logprobs_from_logits(torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5)), return_entropy=True)
    """
    C.check_tensor("logits", logits, min_ndim=1, floating=True)
    C.check_tensor("targets", targets, integer=True)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)} but logits {tuple(logits.shape)} needs "
                         f"{tuple(logits.shape[:-1])}")
    C.check_same_device(logits=logits, targets=targets)
    _check_common(temperature, ignore_index, return_entropy)
    _check_inplace(inplace_backward)
    C.check_no_nan_or_posinf("logits", logits)
    C.check_targets("targets", targets, logits.shape[-1], ignore_index)
    if choose("logprobs_from_logits", impl, logits.device) == "triton":
        return triton_impl("logprobs_from_logits")(logits, targets, temperature=float(temperature),
                                                   ignore_index=ignore_index, return_entropy=return_entropy,
                                                   inplace_backward=inplace_backward)
    return logprobs_from_logits_ref(logits, targets, temperature=float(temperature), ignore_index=ignore_index,
                                    return_entropy=return_entropy)


def check_linear_head(hidden, weight, targets, bias):
    """Validate a hidden/head/targets triple; return hidden viewed as targets.shape + (H,)."""
    C.check_tensor("hidden", hidden, min_ndim=2, floating=True)
    C.check_tensor("weight", weight, ndim=2, floating=True)
    C.check_tensor("targets", targets, min_ndim=1, integer=True)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but hidden has H={H} (expected weight [V, {H}])")
    if bias is not None:
        C.check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has V={weight.shape[0]}")
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        if hidden.ndim == 2 and hidden.shape[0] == targets.numel():
            hidden = hidden.reshape(*targets.shape, H)
        else:
            raise ValueError(f"hidden has shape {tuple(hidden.shape)} but targets has shape {tuple(targets.shape)}; "
                             "expected hidden [*targets.shape, H] or flattened [targets.numel(), H]")
    C.check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    C.check_all_finite("hidden", hidden)
    C.check_all_finite("weight", weight)
    if bias is not None:
        C.check_all_finite("bias", bias)
    return hidden


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, impl="auto"):
    """Per-token log-probs (and entropy) of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    The Triton path never materialises the [N, V] logits; the reference does (fp32).
    Args:
        hidden: [..., H] or flattened [N, H], fp16/bf16/fp32, differentiable.
        weight: [V, H] head weight, differentiable. bias: optional [V], differentiable.
        targets: [...] integer ids in [0, V) or `ignore_index`.
    Returns:
        (logp fp32, entropy fp32 or None), both shaped like `targets`.
    Example:
        >>> h, W = torch.randn(2, 7, 16), torch.randn(50, 16)
        >>> logp, _ = fused_linear_logprobs(h, W, torch.randint(0, 50, (2, 7)))
    """
    hidden = check_linear_head(hidden, weight, targets, bias)
    _check_common(temperature, ignore_index, return_entropy)
    C.check_targets("targets", targets, weight.shape[0], ignore_index)
    if choose("fused_linear_logprobs", impl, hidden.device) == "triton":
        return triton_impl("fused_linear_logprobs")(hidden, weight, targets, bias=bias,
                                                    temperature=float(temperature), ignore_index=ignore_index,
                                                    return_entropy=return_entropy)
    return fused_linear_logprobs_ref(hidden, weight, targets, bias=bias, temperature=float(temperature),
                                     ignore_index=ignore_index, return_entropy=return_entropy)
