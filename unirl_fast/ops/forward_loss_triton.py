"""Triton path of `forward_process_loss` (kernels/forward_loss.py) as the torch.library custom op
`unirl_fast::forward_process_loss`, so `torch.compile(fullgraph=True)` traces it as one node.

The forward is one kernel launch: it writes the loss, the metrics and dL/dv (the loss is a mean of row terms whose
row weights are detached, so its gradient is known once a row's sums are); autograd's backward only scales that
saved gradient by the upstream scalar. dL/dv is saved in v's dtype (fp32 for fp16 v, whose range would flush it
before a loss scaler's factor is applied): for bf16 v the backward rounds twice (the kernel's store, then the
scaled product), within the tolerance rule's bound.
Inputs whose latent part is not contiguous are copied first (`rows`); t and advantages are read with their strides.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import forward_loss as K
from ..kernels.flow import rows
from ._dispatch import register_triton

ALGO_METRICS = {"nft": ("positive_loss", "negative_loss"), "awm": ("matching_mse",)}


def _flat(x: Optional[Tensor], N: int) -> Optional[Tensor]:
    return None if x is None else rows(x, N)


@torch.library.custom_op("unirl_fast::forward_process_loss", mutates_args=())
def _forward_loss_op(v: Tensor, v_old: Optional[Tensor], x0: Tensor, noise: Tensor, v_ref: Optional[Tensor],
                     t: Tensor, advantages: Tensor, algo: str, nft_beta: float, adv_clip: float, awm_power: float,
                     beta_kl: float, beta_old: float, write_grad: bool) -> tuple[Tensor, Tensor]:
    """-> (out [6] fp32: loss, policy_loss, kl_loss, old_deviate, positive_loss | matching_mse, negative_loss;
    dL/dv shaped like v (empty when not write_grad))."""
    N = v.shape[0]
    out, dv = K.forward_process_loss_fwd(
        rows(v, N), _flat(v_old, N), rows(x0, N), rows(noise, N), _flat(v_ref, N), t, advantages, algo=algo,
        nft_beta=nft_beta, adv_clip=adv_clip, awm_power=awm_power, beta_kl=beta_kl, beta_old=beta_old,
        write_grad=write_grad)
    return out, (dv.reshape(v.shape) if write_grad else v.new_empty(0, dtype=torch.float32))


@_forward_loss_op.register_fake
def _(v, v_old, x0, noise, v_ref, t, advantages, algo, nft_beta, adv_clip, awm_power, beta_kl, beta_old, write_grad):
    dv = v.new_empty(v.shape, dtype=K.grad_dtype(v.dtype)) if write_grad else v.new_empty(0, dtype=torch.float32)
    return v.new_empty(K.NPART, dtype=torch.float32), dv


def _setup(ctx, inputs, output):
    ctx.v_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _backward(ctx, g_out, g_dv):
    (dv,) = ctx.saved_tensors
    d = None
    if dv.numel() > 0 and ctx.needs_input_grad[0]:
        d = (dv * g_out[0]).to(ctx.v_dtype)  # metrics are returned detached, so only the loss has a gradient
    return (d,) + (None,) * 13


_forward_loss_op.register_autograd(_backward, setup_context=_setup)


@register_triton("forward_process_loss")
def forward_process_loss_triton(v, v_old, x0, noise, t, advantages, *, algo="nft", v_ref=None, beta_kl=0.0,
                                nft_beta=1.0, adv_clip=5.0, awm_power=0.25, beta_old=0.0):
    """Same contract as `forward_process_loss_ref`: (loss 0-dim fp32, metrics dict of 0-dim fp32 tensors)."""
    write_grad = torch.is_grad_enabled() and v.requires_grad
    det = [None if x is None else x.detach() for x in (v_old, x0, noise, v_ref, t, advantages)]
    out, _ = _forward_loss_op(v, *det, algo, float(nft_beta), float(adv_clip),
                              float(awm_power), float(beta_kl), float(beta_old), write_grad)
    metrics = {"policy_loss": out[1].detach()}
    if v_ref is not None:
        metrics["kl_loss"] = out[2].detach()
    if v_old is not None:
        metrics["old_deviate"] = out[3].detach()
    for i, name in enumerate(ALGO_METRICS[algo]):
        metrics[name] = out[4 + i].detach()
    return out[0], metrics
