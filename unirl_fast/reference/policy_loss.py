"""Reference GRPO-family policy loss (FORMULAS.md section 2), eager fp32 PyTorch.

Shapes: B sequences, L tokens. Per token (fp32):

    log_ratio = logp - old_logp                     (old_logp is data: no gradient)
    r         = exp(log_ratio)                       token-level IS
              | exp(sum_t m log_ratio / sum_t m)     sequence-level IS (GSPO), one r per sequence
    pg        = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    dual clip : A < 0 -> pg = min(pg, -c A)
    TIS       : pg *= min(exp(old_logp - rollout_logp), C)          (detached)
    kl        : k1 logp - ref | k2 0.5 (logp - ref)^2 | k3 exp(ref - logp) - (ref - logp) - 1 | abs |logp - ref|
    L         = pg + beta kl - entropy_coef H

Peer conventions as options (docs/conventions.md), all off by default:
    log_ratio_min / log_ratio_max : the log-ratio (token IS) or the sequence's mean log-ratio (sequence IS) is
                                    clamped before exp; outside the bounds it carries no gradient (torch.clamp)
    kl_clamp                      : kl_t clamped to [-kl_clamp, kl_clamp], no gradient outside (verl k3: 10)
    kl "k1+" / "k3+" / "abs+"     : that estimator's value with k2's gradient (straight through, verl)
    tis_level "sequence"          : one weight per sequence, min(exp(sum_t m (old - rollout)), C)
    tis_weights                   : given per-token weights (e.g. verl's rollout_is_weights), capped at C if given
    empty_seqs "skip"             : sequences with no valid token leave the seq-mean denominators (verl)
    dr_grpo_norm "length"         : dr_grpo divides by max_completion_length only, not by B times it

Aggregation by loss_type: grpo (seq-mean-token-mean), bnpo/dapo (token-mean; denominator num_tokens
when given), dr_grpo (sum / (B * max_completion_length)), seq_sum (seq-mean-token-sum). A fully masked
sequence adds 0 (grpo clamps its denominator to 1, so it still counts in the mean over B unless
empty_seqs="skip"); with no valid token at all the loss is 0 with zero gradient, never NaN.
No input validation here: `unirl_fast.ops.policy_loss` validates before calling.
"""
from __future__ import annotations

import torch


def kl_ref(logp, ref_logp, kind, clamp=None):
    d = ref_logp - logp
    base = kind[:-1] if kind.endswith("+") else kind
    if base == "k1":
        kl = -d
    elif base == "k2":
        kl = 0.5 * d * d
    elif base == "abs":
        kl = d.abs()
    else:
        kl = torch.exp(d) - d - 1.0
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    if kind.endswith("+"):  # the value above with k2's gradient
        k2 = 0.5 * d * d
        kl = k2 - k2.detach() + kl.detach()
    return kl


def _ratio(log_ratio, m, importance_sampling, lo=None, hi=None):
    if importance_sampling == "token":
        return torch.exp(_bound(log_ratio, lo, hi))
    n = m.sum(-1, keepdim=True)
    seq = (log_ratio * m).sum(-1, keepdim=True) / n.clamp(min=1.0)
    return torch.exp(_bound(seq, lo, hi)).expand_as(log_ratio)


def _bound(x, lo, hi):
    return x if lo is None and hi is None else x.clamp(min=lo, max=hi)


def _tis(old, roll, given, m, tis_level, tis_cap):
    """The detached truncated-IS weight per token, or None."""
    if given is not None:
        return given if tis_cap is None else given.clamp(max=tis_cap)
    if roll is None:
        return None
    lw = old - roll
    if tis_level == "sequence":
        lw = (lw * m).sum(-1, keepdim=True).expand_as(lw)
    return torch.exp(lw).clamp(max=tis_cap)


def _aggregate(per_tok, m, loss_type, max_completion_length, num_tokens, empty_seqs="count",
               dr_grpo_norm="batch_length"):
    B, L = per_tok.shape
    masked = per_tok * m
    n_seq = B if empty_seqs == "count" else (m.sum(-1) > 0).float().sum().clamp(min=1.0)
    if loss_type == "grpo":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.mean() if empty_seqs == "count" else per_seq.sum() / n_seq
    if loss_type in ("bnpo", "dapo"):
        denom = m.sum() if num_tokens is None else torch.as_tensor(float(num_tokens), device=m.device)
        return masked.sum() / denom.clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = L if max_completion_length is None else max_completion_length
        return masked.sum() / (length if dr_grpo_norm == "length" else n_seq * length)
    return masked.sum(-1).mean() if empty_seqs == "count" else masked.sum() / n_seq  # seq_sum


def policy_loss_ref(logp, old_logp, advantages, mask, *, loss_type="grpo", eps_low=0.2, eps_high=0.2,
                    dual_clip=None, importance_sampling="token", ref_logp=None, beta=0.0, kl="k3",
                    rollout_logp=None, tis_cap=None, entropy=None, entropy_coef=0.0,
                    max_completion_length=None, num_tokens=None, empty_seqs="count", dr_grpo_norm="batch_length",
                    log_ratio_min=None, log_ratio_max=None, kl_clamp=None, tis_level="token", tis_weights=None):
    """logp, old_logp, mask [B, L]; advantages [B] or [B, L] -> (loss scalar fp32, metrics dict)."""
    m = mask.float()
    on = m > 0

    def clean(x):  # masked positions may hold garbage (inf, NaN): keep them out of every branch
        return None if x is None else torch.where(on, x.float(), torch.zeros((), device=x.device))

    logp = clean(logp)
    old = clean(old_logp.detach())
    A = advantages.detach().float()
    A = A.unsqueeze(-1) if A.ndim == 1 else A
    log_ratio = logp - old
    r = _ratio(log_ratio, m, importance_sampling, log_ratio_min, log_ratio_max)
    r_clip = r.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(-A * r, -A * r_clip)
    dual_active = None
    if dual_clip is not None:
        dual_active = (A < 0) & (pg > -dual_clip * A)
        pg = torch.where(dual_active, -dual_clip * A, pg)
    tis_w = _tis(old, clean(None if rollout_logp is None else rollout_logp.detach()),
                 clean(None if tis_weights is None else tis_weights.detach()), m, tis_level, tis_cap)
    if tis_w is not None:
        pg = pg * tis_w
    per_tok = pg
    kl_t = None
    if ref_logp is not None:
        kl_t = kl_ref(logp, clean(ref_logp.detach()), kl, kl_clamp)
        if beta != 0.0:
            per_tok = per_tok + beta * kl_t
    ent = clean(entropy) if entropy is not None else None
    if ent is not None and entropy_coef != 0.0:
        per_tok = per_tok - entropy_coef * ent
    loss = _aggregate(per_tok, m, loss_type, max_completion_length, num_tokens, empty_seqs, dr_grpo_norm)
    cap = float("inf") if tis_cap is None else tis_cap
    return loss, _metrics(r, A, m, eps_low, eps_high, dual_active, kl_t, ent, tis_w, cap)


def _metrics(r, A, m, eps_low, eps_high, dual_active, kl_t, entropy, tis_w, tis_cap):
    with torch.no_grad():
        n = m.sum().clamp(min=1.0)

        def tok_mean(x):
            return (x.float() * m).sum() / n

        low, high = (r < 1.0 - eps_low) & (A < 0), (r > 1.0 + eps_high) & (A > 0)
        out = {"clip_frac_low": tok_mean(low), "clip_frac_high": tok_mean(high), "ratio_mean": tok_mean(r)}
        out.update(seq_clip_metrics((low.float() * m).sum(-1), (high.float() * m).sum(-1), m.sum(-1)))
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


def seq_clip_metrics(low, high, n):
    """Per-sequence clip counts [B] and valid-token counts [B] -> TRL's sequence views of the clip fractions:
    seq_clip_frac_low / _high, the mean over all B sequences of each one's clipped fraction (an empty sequence
    counts as 0); seq_clip_frac_low_min / high_max, the min / max of those fractions over the non-empty
    sequences (0 when there is none, so that metrics stay finite)."""
    f_lo, f_hi = low / n.clamp(min=1.0), high / n.clamp(min=1.0)
    some = n > 0
    zero = torch.zeros((), device=n.device)
    if n.numel() == 0:
        return dict.fromkeys(("seq_clip_frac_low", "seq_clip_frac_high", "seq_clip_frac_low_min",
                              "seq_clip_frac_high_max"), zero)
    inf = torch.full((), float("inf"), device=n.device)
    return {"seq_clip_frac_low": f_lo.mean(), "seq_clip_frac_high": f_hi.mean(),
            "seq_clip_frac_low_min": torch.where(some.any(), torch.where(some, f_lo, inf).amin(), zero),
            "seq_clip_frac_high_max": torch.where(some.any(), torch.where(some, f_hi, -inf).amax(), zero)}
