"""Triton path of `policy_loss` (FORMULAS.md section 2) as a torch.library custom op.

Shapes: B sequences, L tokens. The forward runs one kernel (kernels/policy_loss.py, one program per
sequence) that produces the per-sequence partial sums of the loss and of every metric AND the
gradient dL/dlogp (and dL/dH) per token; the loss is a weighted sum, so its gradient is known in the
forward. Backward only multiplies by the upstream scalar. Cost: O(B L) reads and writes in fp32; the
[B, P] partials are reduced with torch (deterministic).

The aggregation weight of each token is w_t = m_t * wrow_i (`row_weights`), computed from the mask
before the pass. Everything is fp32 whatever the input dtype or autocast state. The op is registered as
`unirl_fast::policy_loss` (custom_op + register_autograd + register_fake), so torch.compile(fullgraph=True)
traces through it as one opaque node.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import policy_loss as K
from ..reference.policy_loss import seq_clip_metrics
from ._dispatch import register_triton

METRIC_NAMES = ("clip_frac_low", "clip_frac_high", "ratio_mean", "dual_clip_frac", "kl_mean", "entropy_mean",
                "tis_weight_mean", "tis_capped_frac", "seq_clip_frac_low", "seq_clip_frac_high",
                "seq_clip_frac_low_min", "seq_clip_frac_high_max")
_METRIC_COLS = (K.P_CLIP_LO, K.P_CLIP_HI, K.P_RATIO, K.P_DUAL, K.P_KL, K.P_ENT, K.P_TIS, K.P_TIS_CAP)


def row_weights(m, loss_type, max_completion_length, num_tokens, empty_seqs="count", dr_grpo_norm="batch_length"):
    """Per-sequence aggregation weight wrow [B] fp32; token weight w_t = m_t * wrow_i (FORMULAS.md table).
    empty_seqs="skip" counts only the sequences with a valid token in the seq-mean denominators (verl);
    dr_grpo_norm="length" divides dr_grpo's token sum by the length alone."""
    B, L = m.shape
    mf = m.float()
    n = B if empty_seqs == "count" else (mf.sum(-1) > 0).float().sum().clamp(min=1.0)
    if loss_type == "grpo":
        return 1.0 / (n * mf.sum(-1).clamp(min=1.0))
    if loss_type in ("bnpo", "dapo"):
        denom = mf.sum() if num_tokens is None else torch.full((), float(num_tokens), device=m.device)
        return (1.0 / denom.clamp(min=1.0)).expand(B).contiguous()
    if loss_type == "dr_grpo":
        length = L if max_completion_length is None else max_completion_length
        return torch.ones(B, device=m.device) / (length if dr_grpo_norm == "length" else n * length)
    return torch.ones(B, device=m.device) / n  # seq_sum


def tis_input(old, roll, weights, mask, tis_level):
    """(x, tis_mode) for the kernels: the rollout log-probs as given (mode 1, token level), or a per-token weight
    (mode 2): the given weights, or exp(sum_t m (old - rollout)) of each sequence broadcast over its tokens."""
    if weights is not None:
        return weights, 2
    if roll is None or tis_level == "token":
        return roll, 1
    on = mask.bool()
    lw = torch.where(on, old.detach().float() - roll.detach().float(), 0.0).sum(-1, keepdim=True)
    return torch.exp(lw).expand(mask.shape).contiguous(), 2


def reduce_parts(part, B):
    """[B * S, NPART] partial sums (one row per sequence segment) -> (loss fp32 scalar, metrics [12] fp32)."""
    n = part[:, K.P_COUNT].sum().clamp(min=1.0)
    per_seq = part.view(B, part.shape[0] // max(B, 1), K.NPART).sum(1)  # [B, S, NPART] -> [B, NPART]
    seq = seq_clip_metrics(per_seq[:, K.P_CLIP_LO], per_seq[:, K.P_CLIP_HI], per_seq[:, K.P_COUNT])
    tok = part[:, list(_METRIC_COLS)].sum(0) / n
    return part[:, K.P_LOSS].sum(), torch.cat([tok, torch.stack([seq[k] for k in METRIC_NAMES[8:]])])


def metrics_dict(vec, *, dual, kl, entropy, tis):
    """Unpack the metrics vector into the reference's dict (same keys present, detached)."""
    vec = vec.detach()
    present = (True, True, True, dual, kl, entropy, tis, tis) + (True,) * 4
    return {k: vec[i] for i, (k, p) in enumerate(zip(METRIC_NAMES, present)) if p}


def prep_bl(x, B, L):
    """fp32 contiguous [B, L] (a no-op for fp32 contiguous input)."""
    return x.detach().to(torch.float32).contiguous().view(B, L)


def run_policy_kernel(logp, old, adv, mask, ref, roll, ent, *, loss_type, eps_low, eps_high, dual_clip,
                      importance_sampling, beta, kl, tis_cap, entropy_coef, max_completion_length, num_tokens,
                      write_grad, empty_seqs="count", dr_grpo_norm="batch_length", log_ratio_min=None,
                      log_ratio_max=None, kl_clamp=None, tis_level="token", tis_weights=None):
    """Shared by policy_loss and fused_linear_policy_loss: -> (loss, metrics [12], dlogp | None, dent | None)."""
    B, L = mask.shape
    m = mask.contiguous()
    wrow = row_weights(m, loss_type, max_completion_length, num_tokens, empty_seqs, dr_grpo_norm)
    roll, tis_mode = tis_input(old, roll, tis_weights, m, tis_level)
    A = adv.detach().to(torch.float32)
    A = A.contiguous() if A.ndim == 1 else A.contiguous().view(B, L)

    def opt(x):
        return None if x is None else prep_bl(x, B, L)
    part, dlogp, dent = K.policy_loss_fwd(
        prep_bl(logp, B, L), prep_bl(old, B, L), A, m.view(torch.uint8), wrow, ref=opt(ref), roll=opt(roll),
        ent=opt(ent), eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, tis_cap=tis_cap, beta=beta,
        entropy_coef=entropy_coef, kl=kl, seq_is=importance_sampling == "sequence", write_grad=write_grad,
        tis_mode=tis_mode, log_ratio_min=log_ratio_min, log_ratio_max=log_ratio_max, kl_clamp=kl_clamp)
    loss, metrics = reduce_parts(part, B)
    return loss, metrics, dlogp, dent


@torch.library.custom_op("unirl_fast::policy_loss", mutates_args=())
def _policy_loss_op(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    ref_logp: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor],
                    entropy: Optional[torch.Tensor], loss_type: str, eps_low: float, eps_high: float,
                    dual_clip: Optional[float], importance_sampling: str, beta: float, kl: str,
                    tis_cap: Optional[float], entropy_coef: float, max_completion_length: Optional[int],
                    num_tokens: Optional[float], write_grad: bool, empty_seqs: str, dr_grpo_norm: str,
                    log_ratio_min: Optional[float], log_ratio_max: Optional[float], kl_clamp: Optional[float],
                    tis_level: str, tis_weights: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, metrics, dlogp, dent = run_policy_kernel(
        logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, loss_type=loss_type, eps_low=eps_low,
        eps_high=eps_high, dual_clip=dual_clip, importance_sampling=importance_sampling, beta=beta, kl=kl,
        tis_cap=tis_cap, entropy_coef=entropy_coef, max_completion_length=max_completion_length,
        num_tokens=num_tokens, write_grad=write_grad, empty_seqs=empty_seqs, dr_grpo_norm=dr_grpo_norm,
        log_ratio_min=log_ratio_min, log_ratio_max=log_ratio_max, kl_clamp=kl_clamp, tis_level=tis_level,
        tis_weights=tis_weights)
    def empty(x):  # a distinct tensor per output (custom-op outputs may not alias each other)
        return logp.new_empty(0, dtype=torch.float32) if x is None else x

    return loss, metrics, empty(dlogp), empty(dent)


@_policy_loss_op.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, loss_type, eps_low, eps_high, dual_clip,
      importance_sampling, beta, kl, tis_cap, entropy_coef, max_completion_length, num_tokens, write_grad,
      empty_seqs, dr_grpo_norm, log_ratio_min, log_ratio_max, kl_clamp, tis_level, tis_weights):
    f32 = dict(dtype=torch.float32, device=logp.device)
    grad_shape = tuple(logp.shape) if write_grad else (0,)
    ent_shape = tuple(logp.shape) if (write_grad and entropy is not None) else (0,)
    return (torch.empty((), **f32), torch.empty(len(METRIC_NAMES), **f32), torch.empty(grad_shape, **f32),
            torch.empty(ent_shape, **f32))


def _setup(ctx, inputs, output):
    logp, entropy = inputs[0], inputs[6]
    ctx.logp_dtype = logp.dtype
    ctx.ent_dtype = None if entropy is None else entropy.dtype
    ctx.save_for_backward(output[2], output[3])


def _backward(ctx, g_loss, g_metrics, g_dlogp, g_dent):
    dlogp, dent = ctx.saved_tensors
    d_lp = None if dlogp.numel() == 0 else (dlogp * g_loss).to(ctx.logp_dtype)
    d_ent = None if ctx.ent_dtype is None or dent.numel() == 0 else (dent * g_loss).to(ctx.ent_dtype)
    return (d_lp, None, None, None, None, None, d_ent) + (None,) * 19


_policy_loss_op.register_autograd(_backward, setup_context=_setup)


@register_triton("policy_loss")
def policy_loss_triton(logp, old_logp, advantages, mask, *, loss_type="grpo", eps_low=0.2, eps_high=0.2,
                       dual_clip=None, importance_sampling="token", ref_logp=None, beta=0.0, kl="k3",
                       rollout_logp=None, tis_cap=None, entropy=None, entropy_coef=0.0,
                       max_completion_length=None, num_tokens=None, empty_seqs="count", dr_grpo_norm="batch_length",
                       log_ratio_min=None, log_ratio_max=None, kl_clamp=None, tis_level="token", tis_weights=None):
    """Triton `policy_loss`: same arguments and results as `unirl_fast.reference.policy_loss.policy_loss_ref`."""
    write_grad = torch.is_grad_enabled() and (logp.requires_grad or (entropy is not None and entropy.requires_grad))
    loss, metrics, _, _ = _policy_loss_op(
        logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, loss_type, float(eps_low),
        float(eps_high), None if dual_clip is None else float(dual_clip), importance_sampling, float(beta), kl,
        None if tis_cap is None else float(tis_cap), float(entropy_coef), max_completion_length,
        None if num_tokens is None else float(num_tokens), write_grad, empty_seqs, dr_grpo_norm,
        _opt_float(log_ratio_min), _opt_float(log_ratio_max), _opt_float(kl_clamp), tis_level,
        None if tis_weights is None else tis_weights.detach())
    return loss, metrics_dict(metrics, dual=dual_clip is not None, kl=ref_logp is not None,
                              entropy=entropy is not None, tis=rollout_logp is not None or tis_weights is not None)


def _opt_float(x):
    return None if x is None else float(x)
