"""Reference forward-process image RL losses (FORMULAS.md section 7): DiffusionNFT and Advantage Weighted Matching.

Rows n = (sample, trained timestep) pairs; every [N, *D] tensor is flattened to [N, D] and "mean" is over the D
elements of a row. u = noise - x0 is the flow-matching target velocity (x_t = (1 - t) x0 + t noise).

    nft:  vp = b v + (1 - b) v_old,  vn = (1 + b) v_old - b v,  ep = t (u - vp),  en = t (u - vn)
          wp = max(mean |ep|, 1e-5), wn = max(mean |en|, 1e-5)                  (no gradient through w)
          r  = clip(clip(A, -A_max, A_max) / (2 A_max) + 1/2, 0, 1)
          row = A_max (r mean(ep^2) / wp + (1 - r) mean(en^2) / wn) / b  [+ beta_kl mean((v - v_ref)^2)]
    awm:  m = mean((v - u)^2),  ghuber = ((m + 1e-10)^p - 1e-10^p) t / p,  A' = clip(A, -A_max, A_max) / A_max
          row = A' ghuber  [+ beta_kl mean((v - v_ref)^2)]  [+ beta_old mean((v - v_old)^2)]
    loss = mean over rows.

Math in fp32 (fp64 when v is fp64: the tests' oracle runs this function on fp64 inputs). Only v carries a
gradient; every other tensor is detached. No validation here: `unirl_fast.ops.forward_loss` validates first.
"""
from __future__ import annotations

import torch

NFT_FLOOR = 1e-5
AWM_EPS = 1e-10


def _rows(x, N, dtype):
    return x.reshape(N, -1).to(dtype)


def forward_process_loss_ref(v, v_old, x0, noise, t, advantages, *, algo="nft", v_ref=None, beta_kl=0.0,
                             nft_beta=1.0, adv_clip=5.0, awm_power=0.25, beta_old=0.0):
    """v, v_old, x0, noise, v_ref [N, *D]; t, advantages [N] -> (loss 0-dim, metrics dict of 0-dim tensors)."""
    N = v.shape[0]
    dt = torch.promote_types(v.dtype, torch.float32)
    vf = _rows(v, N, dt)
    u = _rows(noise.detach(), N, dt) - _rows(x0.detach(), N, dt)
    tt = t.detach().to(dt).reshape(N, 1)
    A = advantages.detach().to(dt).clamp(-adv_clip, adv_clip)
    metrics = {}
    vo = None if v_old is None else _rows(v_old.detach(), N, dt)
    if algo == "nft":
        b = nft_beta
        ep = tt * (u - (b * vf + (1.0 - b) * vo))
        en = tt * (u - ((1.0 + b) * vo - b * vf))
        with torch.no_grad():
            wp = ep.abs().mean(1).clamp(min=NFT_FLOOR)
            wn = en.abs().mean(1).clamp(min=NFT_FLOOR)
            r = (A / (2.0 * adv_clip) + 0.5).clamp(0.0, 1.0)
        pos = (ep * ep).mean(1) / wp
        neg = (en * en).mean(1) / wn
        row = adv_clip * (r * pos + (1.0 - r) * neg) / b
        metrics["positive_loss"] = pos.detach().mean()
        metrics["negative_loss"] = neg.detach().mean()
    else:
        p = awm_power
        m = ((vf - u) ** 2).mean(1)
        ghuber = ((m + AWM_EPS) ** p - AWM_EPS ** p) * tt.reshape(N) / p
        row = (A / adv_clip) * ghuber
        metrics["matching_mse"] = m.detach().mean()
    loss = row.mean()
    metrics["policy_loss"] = loss.detach()
    if v_ref is not None:
        kl = ((vf - _rows(v_ref.detach(), N, dt)) ** 2).mean()
        metrics["kl_loss"] = kl.detach()
        loss = loss + beta_kl * kl
    if vo is not None:
        old = ((vf - vo) ** 2).mean()
        metrics["old_deviate"] = old.detach()
        if algo == "awm":
            loss = loss + beta_old * old
    return loss, metrics
