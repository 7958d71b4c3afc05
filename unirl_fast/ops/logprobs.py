"""Public token log-prob / entropy ops (FORMULAS.md section 1).

Shapes: N tokens in any leading dims ([B, L] or flattened [N]), V vocab, H hidden.
Both ops return fp32 per-token log-probs (and entropies) and are differentiable in their float inputs.

Value checks (see `unirl_fast.set_checks`): by default ("cheap") the [N] outputs are checked, not the [N, V]
logits or the [V, H] head. A NaN or +inf logit, or a row of only -inf, makes that token's log-prob NaN on both
impls; a NaN/inf in hidden, weight or bias makes it non-finite (a finite head gives finite logits). So the check
is O(N) and needs no host sync. Out-of-range target ids are checked on the [N] ids; the kernels and the
reference never read them (their log-prob is NaN), whatever the mode. "full" also scans the inputs first.
"""
from __future__ import annotations

import torch

from .. import _checks as C
from ..reference.logprobs import fused_linear_logprobs_ref, logprobs_from_logits_ref
from ._dispatch import choose, triton_impl


def _check_common(temperature, ignore_index, return_entropy):
    C.check_finite_scalar("temperature", temperature, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")


def check_logits_dtype(logits_dtype):
    """The fused head ops' `logits_dtype`: None (the inputs' dtype) or torch.float32."""
    if logits_dtype is not None and logits_dtype is not torch.float32:
        raise ValueError(f"logits_dtype must be None (the inputs' dtype) or torch.float32, got {logits_dtype!r}")


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
    C.scan_no_nan_or_posinf("logits", logits)
    if choose("logprobs_from_logits", impl, logits.device) == "triton":
        out = triton_impl("logprobs_from_logits")(logits, targets, temperature=float(temperature),
                                                  ignore_index=ignore_index, return_entropy=return_entropy,
                                                  inplace_backward=inplace_backward)
    else:
        out = logprobs_from_logits_ref(logits, targets, temperature=float(temperature), ignore_index=ignore_index,
                                       return_entropy=return_entropy)
    _check_outputs(out[0], targets, logits.shape[-1], ignore_index, _logits_message, nan_only=True)
    return out


def _logits_message(i, refs):
    return (f"logits contain NaN or +inf (or only -inf) in the row of token {C._fmt_index(i)}: its log-prob is "
            "NaN; logits may hold -inf (masked entries) but never NaN or +inf")


def blame_head(refs, row=None, where="non-finite output") -> str:
    """Name which of hidden / weight / bias (weak references) is non-finite; looked at on the error path only,
    and only while the tensors are still alive. row: the token whose output was bad (None: any)."""
    hidden, weight, bias = (None if r is None else r() for r in refs)
    if hidden is not None and not bool(torch.isfinite(hidden if row is None else hidden[row]).all()):
        at = "" if row is None else f" in the row of token {C._fmt_index(row)}"
        return f"hidden contains NaN or inf{at} ({where})"
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and not bool(torch.isfinite(x).all()):
            return f"{name} contains NaN or inf ({where})"
    return f"{where}: hidden, weight or bias holds NaN or inf (or the logits overflowed)"


def _head_message(i, refs):
    return blame_head(refs, i, f"non-finite log-prob at token {C._fmt_index(i)}")


def _check_outputs(logp, targets, vocab, ignore_index, message, refs=(), *, nan_only=False):
    """Cheap output check, one flag for the ids and the values: an out-of-range id, or a valid token whose log-prob
    is NaN (nan_only: the logits path, where -inf logits are legal) / non-finite (head path). The message tells
    which on the error path only."""
    if not C.value_checks_enabled():
        return
    ids_bad = C.bad_targets(targets, vocab, ignore_index)
    bad = ids_bad | (torch.isnan(logp) if nan_only else ~torch.isfinite(logp))
    t_ref = C.weak(targets)

    def which(i):
        t = t_ref()
        if t is None or C.bad_targets(t[i], vocab, ignore_index):
            v = f"id {int(t[i])}" if t is not None else f"an id at {C._fmt_index(i)} (or a non-finite value there)"
            return f"targets contains {v} outside [0, {vocab}) that is not ignore_index={ignore_index}"
        return message(i, refs)
    C.flag(bad, which)


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
    C.scan_finite("hidden", hidden)
    C.scan_finite("weight", weight)
    if bias is not None:
        C.scan_finite("bias", bias)
    return hidden


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, impl="auto", logits_dtype=None):
    """Per-token log-probs (and entropy) of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    The Triton path never materialises the [N, V] logits; the reference does (fp32).
    Args:
        hidden: [..., H] or flattened [N, H], fp16/bf16/fp32, differentiable.
        weight: [V, H] head weight, differentiable. bias: optional [V], differentiable.
        targets: [...] integer ids in [0, V) or `ignore_index`.
        logits_dtype: None (default) keeps the Triton path's logits in the inputs' dtype, as a Hugging Face bf16
            lm_head followed by an fp32 log_softmax has them; torch.float32 forms them in fp32 from 16-bit inputs
            (exact products, fp32 sums, as verl's fused kernel), the softmax being fp32 either way. Same memory:
            a logits chunk keeps its byte budget and holds half the tokens (kernels/fused_linear_logprobs.py has
            the backward's dlogits dtype and its error). fp32 / fp64 inputs are unaffected; the reference forms
            fp32 logits whatever this says.
    Returns:
        (logp fp32, entropy fp32 or None), both shaped like `targets`.
    Example:
        >>> h, W = torch.randn(2, 7, 16), torch.randn(50, 16)
        >>> logp, _ = fused_linear_logprobs(h, W, torch.randint(0, 50, (2, 7)))
    """
    hidden = check_linear_head(hidden, weight, targets, bias)
    _check_common(temperature, ignore_index, return_entropy)
    check_logits_dtype(logits_dtype)
    kw = dict(bias=bias, temperature=float(temperature), ignore_index=ignore_index, return_entropy=return_entropy,
              logits_dtype=logits_dtype)
    if choose("fused_linear_logprobs", impl, hidden.device) == "triton":
        out = triton_impl("fused_linear_logprobs")(hidden, weight, targets, **kw)
    else:
        out = fused_linear_logprobs_ref(hidden, weight, targets, **kw)
    check_head_outputs(out[0], targets, weight.shape[0], ignore_index, hidden, weight, bias)
    return out


def check_head_outputs(logp, targets, vocab, ignore_index, hidden, weight, bias):
    """The cheap check of an op that computes logits from hidden @ weight.T + bias: finite per-token log-probs."""
    refs = tuple(C.weak(x) for x in (hidden, weight, bias))
    _check_outputs(logp, targets, vocab, ignore_index, _head_message, refs)
