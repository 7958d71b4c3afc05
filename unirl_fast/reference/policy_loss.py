"""Reference GRPO-family policy loss (FORMULAS.md section 2), eager fp32 PyTorch.

Shapes: B sequences, L tokens. Per token (fp32):

    log_ratio = logp - old_logp                     (old_logp is data: no gradient)
    r         = exp(log_ratio)                       token-level IS
              | exp(sum_t m log_ratio / sum_t m)     sequence-level IS (GSPO), one r per sequence
    pg        = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    dual clip : A < 0 -> pg = min(pg, -c A)
    TIS       : pg *= min(exp(old_logp - rollout_logp), C)          (detached)
    kl        : k1 logp - ref | k2 0.5 (logp - ref)^2 | k3 exp(ref - logp) - (ref - logp) - 1
    L         = pg + beta kl - entropy_coef H

Aggregation by loss_type: grpo (seq-mean-token-mean), bnpo/dapo (token-mean; denominator num_tokens
when given), dr_grpo (sum / (B * max_completion_length)), seq_sum (seq-mean-token-sum). A fully masked
sequence adds 0 (grpo clamps its denominator to 1, so it still counts in the mean over B); with no
valid token at all the loss is 0 with zero gradient, never NaN.
No input validation here: `unirl_fast.ops.policy_loss` validates before calling.
"""
from __future__ import annotations

import torch


def kl_ref(logp, ref_logp, kind):
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1.0


def _ratio(log_ratio, m, importance_sampling):
    if importance_sampling == "token":
        return torch.exp(log_ratio)
    n = m.sum(-1, keepdim=True)
    seq = (log_ratio * m).sum(-1, keepdim=True) / n.clamp(min=1.0)
    return torch.exp(seq).expand_as(log_ratio)


def _aggregate(per_tok, m, loss_type, max_completion_length, num_tokens):
    B, L = per_tok.shape
    masked = per_tok * m
    if loss_type == "grpo":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):
        denom = m.sum() if num_tokens is None else torch.as_tensor(float(num_tokens), device=m.device)
        return masked.sum() / denom.clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (B * (L if max_completion_length is None else max_completion_length))
    return masked.sum(-1).mean()  # seq_sum


def policy_loss_ref(logp, old_logp, advantages, mask, *, loss_type="grpo", eps_low=0.2, eps_high=0.2,
                    dual_clip=None, importance_sampling="token", ref_logp=None, beta=0.0, kl="k3",
                    rollout_logp=None, tis_cap=None, entropy=None, entropy_coef=0.0,
                    max_completion_length=None, num_tokens=None):
    """logp, old_logp, mask [B, L]; advantages [B] or [B, L] -> (loss scalar fp32, metrics dict)."""
    m = mask.float()
    on = m > 0

    def clean(x):  # masked positions may hold garbage (inf, NaN): keep them out of every branch
        return torch.where(on, x.float(), torch.zeros((), device=x.device))

    logp = clean(logp)
    old = clean(old_logp.detach())
    A = advantages.detach().float()
    A = A.unsqueeze(-1) if A.ndim == 1 else A
    log_ratio = logp - old
    r = _ratio(log_ratio, m, importance_sampling)
    r_clip = r.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(-A * r, -A * r_clip)
    dual_active = None
    if dual_clip is not None:
        dual_active = (A < 0) & (pg > -dual_clip * A)
        pg = torch.where(dual_active, -dual_clip * A, pg)
    tis_w = None
    if rollout_logp is not None:
        tis_w = torch.exp(old - clean(rollout_logp.detach())).clamp(max=tis_cap)
        pg = pg * tis_w
    per_tok = pg
    kl_t = None
    if ref_logp is not None:
        kl_t = kl_ref(logp, clean(ref_logp.detach()), kl)
        if beta != 0.0:
            per_tok = per_tok + beta * kl_t
    ent = clean(entropy) if entropy is not None else None
    if ent is not None and entropy_coef != 0.0:
        per_tok = per_tok - entropy_coef * ent
    loss = _aggregate(per_tok, m, loss_type, max_completion_length, num_tokens)
    return loss, _metrics(r, A, m, eps_low, eps_high, dual_active, kl_t, ent, tis_w, tis_cap)

def _metrics(r, A, m, eps_low, eps_high, dual_active, kl_t, entropy, tis_w, tis_cap):
    with torch.no_grad():
        n = m.sum().clamp(min=1.0)

        def tok_mean(x):
            return (x.float() * m).sum() / n

        out = {
            "clip_frac_low": tok_mean((r < 1.0 - eps_low) & (A < 0)),
            "clip_frac_high": tok_mean((r > 1.0 + eps_high) & (A > 0)),
            "ratio_mean": tok_mean(r),
        }
        if dual_active is not None:
            out["dual_clip_frac"] = tok_mean(dual_active)
        if kl_t is not None:
            out["kl_mean"] = tok_mean(kl_t)
        if entropy is not None:
            out["entropy_mean"] = tok_mean(entropy)
        if tis_w is not None:
            out["tis_weight_mean"] = tok_mean(tis_w)
            out["tis_capped_frac"] = tok_mean(tis_w >= tis_cap)
        return out
