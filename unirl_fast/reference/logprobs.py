"""Reference token log-probs and entropy (FORMULAS.md section 1), eager fp32 PyTorch.

Shapes: N tokens (any leading dims), V vocab, H hidden.

    z    = (h @ W.T + b) / T        (fp32 even for bf16 inputs)
    logp = z[y] - logsumexp(z)
    H    = logsumexp(z) - sum_j p_j z_j

A target equal to `ignore_index` gives logp = 0, H = 0 and no gradient. An id outside [0, V) that is not
ignore_index is never read: its logp and H are NaN (the public op's check names it). Logits may hold -inf
(masked vocabulary entries): such an entry has p = 0 and adds nothing to the entropy.
This oracle materialises the full fp32 [N, V] logits; it is for correctness, not for memory.
No input validation here: the public ops in `unirl_fast.ops` validate before calling.
"""
from __future__ import annotations

import torch


def logprobs_from_logits_ref(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """logits [..., V] (any float dtype), targets [...] int -> (logp [...] fp32, entropy [...] fp32 | None)."""
    z = logits.float() / temperature
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < z.shape[-1])
    safe_t = torch.where(valid & in_range, targets, torch.zeros_like(targets)).long()
    nan = torch.full((), float("nan"), device=z.device)
    # Work on z - max(z): the same values, but no fp32 cancellation when every logit is large
    # (rows near -2e4 lose ~1e-3 absolute in z[y] - lse otherwise).
    zmax = z.detach().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    zs = z - zmax
    lse_s = torch.logsumexp(zs, dim=-1)
    zero = torch.zeros_like(lse_s)
    logp = torch.gather(zs, -1, safe_t.unsqueeze(-1)).squeeze(-1) - lse_s
    logp = torch.where(valid, torch.where(in_range, logp, nan), zero)
    if not return_entropy:
        return logp, None
    p = torch.exp(zs - lse_s.unsqueeze(-1))
    # p * z with p == 0 at z == -inf must be 0, not NaN (forward and backward).
    zs_safe = torch.where(p > 0, zs, torch.zeros_like(zs))
    ent = lse_s - (p * zs_safe).sum(-1)  # H = lse - E_p[z], shift-invariant
    return logp, torch.where(valid, torch.where(in_range, ent, nan), zero)

def linear_logits_ref(hidden, weight, bias=None):
    """fp32 logits h @ W.T (+ b) for hidden [..., H], weight [V, H]."""
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    return z


def fused_linear_logprobs_ref(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                              return_entropy=False, logits_dtype=None):
    """hidden [..., H], weight [V, H], targets [...] -> (logp [...] fp32, entropy | None). The logits are fp32
    whatever `logits_dtype` says (None or torch.float32, the Triton path's option; this is the fp32 oracle)."""
    z = linear_logits_ref(hidden, weight, bias)
    return logprobs_from_logits_ref(z, targets, temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=return_entropy)
