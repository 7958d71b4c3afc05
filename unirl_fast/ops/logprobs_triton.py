"""Triton paths of `logprobs_from_logits` and `fused_linear_logprobs` (kernels in `unirl_fast.kernels`).

Legend: N tokens (leading dims flattened), V vocab, H hidden.

Each op is a `torch.library.custom_op` (namespace `unirl_fast`) with `register_autograd` and
`register_fake`, so `torch.compile(fullgraph=True)` traces through it as one opaque node and autograd
sees logp and entropy as differentiable outputs (lse is a saved side output, never differentiated).
The ops compute in fp32 whatever the autocast state: autocast is switched off inside the fused-linear
op (its GEMMs run in the inputs' promoted dtype with fp32 accumulate) and the row kernels upcast on load. The
fused-linear op's logits are in that dtype too, or fp32 for 16-bit inputs with `logits_dtype=torch.float32`.

`LogprobsFromLogitsFunction` / `FusedLinearLogprobsFunction` are the autograd entry points (thin
classes whose `apply` calls the custom op, so callers get the same graph node in eager and compiled
code). In-place backward (`inplace_backward=True`, logits path only) writes dlogits over the logits
buffer and hands that buffer back as the gradient, as flash-attn's cross-entropy does: the caller
promises that nothing else reads those logits after this op's backward. Under torch.compile the
functionalisation pass may turn the mutation into a copy; the gradients are the same.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.fused_linear_logprobs import fused_linear_logprobs_bwd, fused_linear_logprobs_fwd
from ..kernels.logprobs import logprobs_bwd, logprobs_fwd
from ._dispatch import register_triton


def _rowvecs(n, device):
    return torch.empty(n, device=device, dtype=torch.float32)


def _grad_or_zeros(g, n, device):
    return torch.zeros(n, device=device, dtype=torch.float32) if g is None else g.float().contiguous()


# ----------------------------------------------------------------------------- logprobs_from_logits

@torch.library.custom_op("unirl_fast::logprobs_fwd", mutates_args=())
def _logprobs_fwd_op(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                     return_entropy: bool, inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    return logprobs_fwd(logits, targets, temperature, ignore_index, return_entropy)


@_logprobs_fwd_op.register_fake
def _(logits, targets, temperature, ignore_index, return_entropy, inplace_backward):
    n = logits.shape[:-1].numel()
    return _rowvecs(n, logits.device), _rowvecs(n, logits.device), _rowvecs(n, logits.device)


@torch.library.custom_op("unirl_fast::logprobs_bwd", mutates_args=())
def _logprobs_bwd_op(logits: Tensor, targets: Tensor, lse: Tensor, ent: Tensor, g: Tensor, gh: Tensor,
                     temperature: float, ignore_index: int, has_ent: bool) -> Tensor:
    return logprobs_bwd(logits, targets, lse, ent, g, gh, temperature, ignore_index, has_ent)


@_logprobs_bwd_op.register_fake
def _(logits, targets, lse, ent, g, gh, temperature, ignore_index, has_ent):
    return torch.empty_strided(logits.shape, logits.stride(), device=logits.device, dtype=logits.dtype)


@torch.library.custom_op("unirl_fast::logprobs_bwd_", mutates_args=("logits",))
def _logprobs_bwd_inplace_op(logits: Tensor, targets: Tensor, lse: Tensor, ent: Tensor, g: Tensor, gh: Tensor,
                             temperature: float, ignore_index: int, has_ent: bool) -> None:
    logprobs_bwd(logits, targets, lse, ent, g, gh, temperature, ignore_index, has_ent, out=logits)


@_logprobs_bwd_inplace_op.register_fake
def _(logits, targets, lse, ent, g, gh, temperature, ignore_index, has_ent):
    return None


def _logprobs_setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, return_entropy, inplace_backward = inputs
    _, ent, lse = output
    ctx.save_for_backward(logits, targets, lse, ent)
    ctx.opts = (temperature, ignore_index, return_entropy, inplace_backward)


def _logprobs_backward(ctx, g_logp, g_ent, g_lse):
    logits, targets, lse, ent = ctx.saved_tensors
    temperature, ignore_index, has_ent, inplace = ctx.opts
    n = targets.numel()
    g = _grad_or_zeros(g_logp, n, logits.device)
    gh = _grad_or_zeros(g_ent if has_ent else None, n, logits.device)
    if inplace:
        torch.ops.unirl_fast.logprobs_bwd_(logits, targets, lse, ent, g, gh, temperature, ignore_index, has_ent)
        dlogits = logits
    else:
        dlogits = torch.ops.unirl_fast.logprobs_bwd(logits, targets, lse, ent, g, gh, temperature, ignore_index,
                                                    has_ent)
    return dlogits, None, None, None, None, None


_logprobs_fwd_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


class LogprobsFromLogitsFunction:
    """Autograd entry point: `apply(logits [N, V] or [B, L, V] (any strides), targets [N] contiguous,
    temperature, ignore_index, return_entropy, inplace_backward) -> (logp [N] fp32, entropy [N] fp32
    (zeros unless return_entropy))`."""

    @staticmethod
    def apply(logits, targets, temperature, ignore_index, return_entropy, inplace_backward):
        logp, ent, _ = torch.ops.unirl_fast.logprobs_fwd(logits, targets, temperature, ignore_index,
                                                         return_entropy, inplace_backward)
        return logp, ent


@register_triton("logprobs_from_logits")
def logprobs_from_logits_triton(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                                inplace_backward=False):
    """Triton path of `unirl_fast.logprobs_from_logits` (inputs already validated)."""
    V = logits.shape[-1]
    if logits.stride(-1) != 1:  # the kernels read rows with a unit column stride (16-byte vectors)
        logits = logits.contiguous()
    # Rows are addressed through (B, L) strides, so logits[:, :-1] and other sliced views run without a copy.
    x = logits.flatten(0, -3) if logits.ndim >= 3 else logits.reshape(-1, V)
    y = targets.reshape(-1).contiguous()
    logp, ent = LogprobsFromLogitsFunction.apply(x, y, float(temperature), int(ignore_index), bool(return_entropy),
                                                 bool(inplace_backward))
    logp = logp.view(targets.shape)
    return logp, (ent.view(targets.shape) if return_entropy else None)


# ----------------------------------------------------------------------------- fused_linear_logprobs

@torch.library.custom_op("unirl_fast::fused_linear_logprobs_fwd", mutates_args=())
def _fl_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
               ignore_index: int, return_entropy: bool, fp32_logits: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):
        return fused_linear_logprobs_fwd(hidden, weight, bias, targets, temperature, ignore_index, return_entropy,
                                         fp32_logits=fp32_logits)


@_fl_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, return_entropy, fp32_logits=False):
    n = hidden.shape[0]
    return _rowvecs(n, hidden.device), _rowvecs(n, hidden.device), _rowvecs(n, hidden.device)


@torch.library.custom_op("unirl_fast::fused_linear_logprobs_bwd", mutates_args=())
def _fl_bwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, ent: Tensor,
               g: Tensor, gh: Tensor, temperature: float, ignore_index: int, has_ent: bool,
               need_dh: bool, need_dw: bool, need_db: bool, fp32_logits: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):
        dh, dw, db = fused_linear_logprobs_bwd(hidden, weight, bias, targets, lse, ent, g, gh, temperature,
                                               ignore_index, has_ent, need_dh=need_dh, need_dw=need_dw,
                                               need_db=need_db, fp32_logits=fp32_logits)
    return tuple(hidden.new_empty(0) if x is None else x for x in (dh, dw, db))  # distinct: no aliased returns


@_fl_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, ent, g, gh, temperature, ignore_index, has_ent, need_dh, need_dw, need_db,
      fp32_logits=False):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_dw else hidden.new_empty(0)
    db = torch.empty_like(bias) if (need_db and bias is not None) else hidden.new_empty(0)
    return dh, dw, db


def _fl_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, return_entropy, fp32_logits = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.opts = (temperature, ignore_index, return_entropy, fp32_logits)
    ctx.needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)


def _fl_backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    temperature, ignore_index, has_ent, fp32_logits = ctx.opts
    n = hidden.shape[0]
    g = _grad_or_zeros(g_logp, n, hidden.device)
    gh = _grad_or_zeros(g_ent if has_ent else None, n, hidden.device)
    need_dh, need_dw, need_db = ctx.needs
    dh, dw, db = torch.ops.unirl_fast.fused_linear_logprobs_bwd(hidden, weight, bias, targets, lse, ent, g, gh,
                                                                temperature, ignore_index, has_ent, need_dh,
                                                                need_dw, need_db, fp32_logits)
    return (dh if need_dh else None), (dw if need_dw else None), (db if need_db else None), None, None, None, None, \
        None


_fl_fwd_op.register_autograd(_fl_backward, setup_context=_fl_setup)


class FusedLinearLogprobsFunction:
    """Autograd entry point: `apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature,
    ignore_index, return_entropy, fp32_logits=False) -> (logp [N] fp32, entropy [N] fp32 (zeros unless
    return_entropy))`. hidden, weight and bias must share one float dtype; fp32_logits forms 16-bit inputs' logits
    in fp32 (kernels/fused_linear_logprobs.py)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, ignore_index, return_entropy, fp32_logits=False):
        logp, ent, _ = torch.ops.unirl_fast.fused_linear_logprobs_fwd(hidden, weight, bias, targets, temperature,
                                                                      ignore_index, return_entropy, fp32_logits)
        return logp, ent


@register_triton("fused_linear_logprobs")
def fused_linear_logprobs_triton(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                                 return_entropy=False, logits_dtype=None):
    """Triton path of `unirl_fast.fused_linear_logprobs` (inputs already validated; hidden is targets.shape + (H,)).
    logits_dtype: None (the inputs' promoted dtype) or torch.float32 (fp32 logits for 16-bit inputs)."""
    dtype = weight.dtype if bias is None else torch.promote_types(weight.dtype, bias.dtype)
    dtype = torch.promote_types(hidden.dtype, dtype)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = weight.to(dtype).contiguous()
    b = None if bias is None else bias.to(dtype).contiguous()
    y = targets.reshape(-1).contiguous()
    logp, ent = FusedLinearLogprobsFunction.apply(h, w, b, y, float(temperature), int(ignore_index),
                                                  bool(return_entropy), logits_dtype is torch.float32)
    logp = logp.view(targets.shape)
    return logp, (ent.view(targets.shape) if return_entropy else None)
