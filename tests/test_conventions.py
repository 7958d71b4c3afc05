"""The peers' policy-loss conventions as options of our ops (docs/conventions.md), against fp64 oracles.

Each oracle below transcribes a peer's formula (verl 0.9.1's agg_loss, compute_policy_loss_vanilla / _gspo,
kl_penalty and sequence-level rollout IS; older verl's seq-mean-token-sum-norm by the length alone) into plain
fp64 PyTorch; it is not their code. Every case runs through the reference, the Triton kernel (interpreter on CPU)
and fused_linear_policy_loss, values and gradients, on a batch with the edge cases in it: a fully masked
sequence, a zero-advantage (flat or size-one group) sequence, log-ratios beyond verl's clamps and a k3 above 10.
"""
from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_rule

import unirl_fast as U

B, L, H, V = 5, 9, 8, 23


# ------------------------------------------------------------------------------------------ fp64 peer oracles


def agg(mat, mask, mode):
    """verl 0.9.1 agg_loss (single process): empty sequences leave the seq-mean denominators."""
    m = mask.double()
    n = m.sum(-1)
    nseq = (n > 0).double().sum()
    if mode == "token-mean":
        return (mat * m).sum() / m.sum()
    if mode == "seq-mean-token-mean":
        return ((mat * m).sum(-1) / (n + 1e-8) * (n > 0)).sum() / nseq
    if mode == "seq-mean-token-sum":
        return (mat * m).sum() / nseq
    if mode == "seq-mean-token-sum-norm":
        return (mat * m).sum() / nseq / mat.shape[-1]
    if mode == "legacy-token-sum-norm":  # verl before the seq-mean change: token sums / L only
        return (mat * m).sum() / mat.shape[-1]
    raise AssertionError(mode)


def kl_oracle(logp, ref, kind):
    """verl kl_penalty: k1, abs, k2, k3 (d clamped to +-20, value to +-10), '+' = k2's gradient."""
    base = kind.rstrip("+")
    if base == "k1":
        f = logp - ref
    elif base == "abs":
        f = (logp - ref).abs()
    elif base == "k2":
        f = 0.5 * (logp - ref) ** 2
    else:
        d = (ref - logp).clamp(-20, 20)
        f = (torch.exp(d) - d - 1).clamp(-10, 10)
    if kind.endswith("+"):
        b = 0.5 * (logp - ref) ** 2
        return b - b.detach() + f.detach()
    return f


def verl_oracle(logp, old, adv, mask, c):
    """verl's actor loss: policy loss (vanilla or gspo) + kl_coef * agg(kl) - ent_coef * agg(entropy)."""
    A = adv.double().unsqueeze(-1).expand(logp.shape) if adv.ndim == 1 else adv.double()
    m = mask.double()
    if c.get("gspo"):
        nkl = logp - old
        seq = (nkl * m).sum(-1) / m.sum(-1).clamp(min=1)
        lr = (logp - logp.detach() + seq.detach().unsqueeze(-1)).clamp(max=10.0)
        r = torch.exp(lr)
        pg = torch.maximum(-A * r, -A * r.clamp(1 - c["eps"], 1 + c["eps"]))
    else:
        r = torch.exp((logp - old).clamp(-20.0, 20.0))
        p1 = torch.maximum(-A * r, -A * r.clamp(1 - c["eps"], 1 + c["eps"]))
        pg = torch.where(A < 0, torch.minimum(-A * 3.0, p1), p1)
    if c.get("tis") == "sequence":
        lw = ((old - c["roll"]) * m).sum(-1, keepdim=True).clamp(-20, 20)
        pg = pg * (torch.exp(lw).expand(logp.shape) * m).clamp(max=c["cap"])
    loss = agg(pg, mask, c["agg"])
    if c.get("kl"):
        loss = loss + c["beta"] * agg(kl_oracle(logp, c["ref"], c["kl"]), mask, c["agg"])
    if c.get("ent_coef"):
        loss = loss - c["ent_coef"] * agg(c["ent"], mask, c["agg"])
    return loss


AGG = {"token-mean": dict(loss_type="bnpo"),
       "seq-mean-token-mean": dict(loss_type="grpo", empty_seqs="skip"),
       "seq-mean-token-sum": dict(loss_type="seq_sum", empty_seqs="skip"),
       "seq-mean-token-sum-norm": dict(loss_type="dr_grpo", empty_seqs="skip"),
       "legacy-token-sum-norm": dict(loss_type="dr_grpo", dr_grpo_norm="length")}

CASES = {
    "vanilla-token-mean": dict(agg="token-mean"),
    "vanilla-seqmean": dict(agg="seq-mean-token-mean"),
    "vanilla-seqsum": dict(agg="seq-mean-token-sum"),
    "vanilla-drgrpo": dict(agg="seq-mean-token-sum-norm"),
    "vanilla-drgrpo-legacy": dict(agg="legacy-token-sum-norm"),
    "gspo-seqmean": dict(agg="seq-mean-token-mean", gspo=True),
    "gspo-token-mean": dict(agg="token-mean", gspo=True),
    "k3": dict(agg="seq-mean-token-mean", kl="k3"),
    "k3+": dict(agg="seq-mean-token-mean", kl="k3+"),
    "k1+": dict(agg="token-mean", kl="k1+"),
    "abs": dict(agg="token-mean", kl="abs"),
    "seq-tis": dict(agg="seq-mean-token-mean", tis="sequence"),
    "seq-tis-gspo": dict(agg="seq-mean-token-mean", tis="sequence", gspo=True),
}


def ours_options(c):
    kw = dict(AGG[c["agg"]], eps_low=0.2, eps_high=0.2)
    if c.get("gspo"):
        kw.update(importance_sampling="sequence", log_ratio_max=10.0)
    else:
        kw.update(dual_clip=3.0, log_ratio_min=-20.0, log_ratio_max=20.0)
    if c.get("kl"):
        kw.update(beta=0.3, kl=c["kl"], kl_clamp=10.0 if c["kl"].startswith("k3") else None)
    if c.get("tis"):
        kw.update(tis_level="sequence", tis_cap=2.0)
    return kw


def batch(seed=0):
    """Edge cases on purpose: row 1 fully masked, row 2 zero advantage, tokens with |log-ratio| > 20, a row whose
    mean log-ratio is above 10 (GSPO cap), reference log-probs far enough for k3 > 10."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) > 0.25
    mask[1] = False
    mask[0, :3] = True
    adv = torch.randn(B, generator=g)
    adv[2] = 0.0
    adv[0], adv[3] = -1.0, -0.7  # negative: the unclipped side -A r is the one the clamps bound
    old_shift = 0.3 * torch.randn(B, L, generator=g)
    old_shift[3, 1] = 25.0
    old_shift[4, 2] = -24.0
    old_shift[0] = -12.0  # row 0: log-ratio +12 everywhere -> the GSPO sequence cap binds
    ref_shift = 0.5 * torch.randn(B, L, generator=g)
    ref_shift[3, 4] = 14.0  # k3 = e^14 - ... > 10: clamped
    ref_shift[4, 5] = -15.0
    roll_shift = 0.05 * torch.randn(B, L, generator=g)
    return mask, adv, old_shift, ref_shift, roll_shift


def oracle_config(c, logp64, old, ref, roll, ent):
    cfg = dict(c, eps=0.2, beta=0.3, cap=2.0, ref=ref.double(), roll=roll.double(), ent=ent)
    return cfg


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_policy_loss_matches_verl_oracle(case, impl):
    c = CASES[case]
    mask, adv, old_shift, ref_shift, roll_shift = batch()
    logp = -torch.rand(B, L) * 3
    old, ref = logp + old_shift, logp + ref_shift
    roll = old + roll_shift
    lp64 = logp.double().requires_grad_()
    want = verl_oracle(lp64, old.double(), adv, mask, oracle_config(c, lp64, old, ref, roll, None))
    g_want = torch.autograd.grad(want, lp64)[0]
    lp = logp.clone().requires_grad_()
    kw = ours_options(c)
    got, _ = U.policy_loss(lp, old, adv, mask, ref_logp=ref if c.get("kl") else None,
                           rollout_logp=roll if c.get("tis") else None, impl=impl, **kw)
    assert_close_rule(got.detach().reshape(1), want.detach().reshape(1), atol=2e-6, name=f"{case} loss")
    assert_close_rule(torch.autograd.grad(got, lp)[0], g_want, atol=2e-6, name=f"{case} dlogp")


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("case", ["vanilla-seqmean", "vanilla-drgrpo", "gspo-token-mean", "k3+", "abs", "seq-tis"])
def test_fused_linear_policy_loss_matches_verl_oracle(case, impl):
    c = dict(CASES[case])
    mask, adv, old_shift, ref_shift, roll_shift = batch(1)
    h, W = torch.randn(B, L, H), torch.randn(V, H) * 0.5
    y = torch.randint(0, V, (B, L))
    with torch.no_grad():
        logp0 = torch.log_softmax(h @ W.T, -1).gather(-1, y[..., None])[..., 0]
    old, ref = logp0 + old_shift, logp0 + ref_shift
    roll = old + roll_shift
    ent_coef = 0.01
    h64 = h.double().requires_grad_()
    z = h64 @ W.double().T
    lp64 = torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0]
    ent64 = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    cfg = oracle_config(dict(c, ent_coef=ent_coef), lp64, old, ref, roll, ent64)
    want = verl_oracle(lp64, old.double(), adv, mask, cfg)
    g_want = torch.autograd.grad(want, h64)[0]
    hg = h.clone().requires_grad_()
    got, _ = U.fused_linear_policy_loss(hg, W, y, old, adv, mask, ref_logp=ref if c.get("kl") else None,
                                        rollout_logp=roll if c.get("tis") else None, entropy_coef=ent_coef,
                                        impl=impl, **ours_options(c))
    assert_close_rule(got.detach().reshape(1), want.detach().reshape(1), atol=1e-5, name=f"{case} loss")
    assert_close_rule(torch.autograd.grad(got, hg)[0], g_want, atol=1e-5, name=f"{case} dh")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_given_tis_weights_and_all_empty_batch(impl):
    mask, adv, old_shift, _, _ = batch(2)
    logp = -torch.rand(B, L) * 3
    old = logp + 0.1 * old_shift.clamp(-1, 1)
    w = torch.rand(B, L) * 2
    lp64 = logp.double().requires_grad_()
    r = torch.exp(lp64 - old.double())
    A = adv.double()[:, None]
    pg = torch.maximum(-A * r, -A * r.clamp(0.8, 1.2)) * w.double().clamp(max=1.5)
    want = agg(pg, mask, "seq-mean-token-mean")
    lp = logp.clone().requires_grad_()
    got, met = U.policy_loss(lp, old, adv, mask, tis_weights=w, tis_cap=1.5, empty_seqs="skip", impl=impl)
    assert_close_rule(got.detach().reshape(1), want.detach().reshape(1), atol=2e-6, name="loss")
    assert_close_rule(torch.autograd.grad(got, lp)[0], torch.autograd.grad(want, lp64)[0], atol=2e-6, name="grad")
    assert "tis_weight_mean" in met
    empty = torch.zeros(B, L, dtype=torch.bool)
    for loss_type in ("grpo", "seq_sum", "dr_grpo"):
        lp = logp.clone().requires_grad_()
        got, met = U.policy_loss(lp, old, adv, empty, loss_type=loss_type, empty_seqs="skip", impl=impl)
        g = torch.autograd.grad(got, lp)[0]
        assert float(got) == 0.0 and torch.count_nonzero(g) == 0
        assert all(torch.isfinite(v) for v in met.values())


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_defaults_unchanged_and_empty_sequences_counted(impl):
    """Default (TRL) convention: an empty sequence still counts in grpo's 1/B; 'skip' divides by the non-empty."""
    mask, adv, _, _, _ = batch(3)
    logp = -torch.rand(B, L) * 3
    old = logp + 0.1
    base, _ = U.policy_loss(logp, old, adv, mask, impl=impl)
    skip, _ = U.policy_loss(logp, old, adv, mask, empty_seqs="skip", impl=impl)
    assert_close_rule(skip.reshape(1), base.reshape(1) * B / (B - 1), atol=1e-6, name="skip vs count")
    dr, _ = U.policy_loss(logp, old, adv, mask, loss_type="dr_grpo", impl=impl)
    dr_len, _ = U.policy_loss(logp, old, adv, mask, loss_type="dr_grpo", dr_grpo_norm="length", impl=impl)
    assert_close_rule(dr_len.reshape(1), dr.reshape(1) * B, atol=1e-6, name="length vs batch_length")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_trl_sequence_clip_metrics(impl):
    """TRL 1.16's clip_ratio/* at importance_sampling_level='sequence' are means over sequences, and low_min /
    high_max the min / max of per-sequence fractions (transcribed from GRPOTrainer._compute_loss)."""
    mask, adv, _, _, _ = batch(4)
    logp = -torch.rand(B, L) * 3
    old = logp + 0.4 * torch.randn(B, 1)
    for level in ("token", "sequence"):
        _, met = U.policy_loss(logp, old, adv, mask, importance_sampling=level, impl=impl)
        lr = (logp - old).double()
        m = mask.double()
        if level == "sequence":
            r = torch.exp((lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1))
        else:
            r = torch.exp(lr)
        low = ((r < 0.8) & (adv[:, None] < 0)).double().expand(B, L)
        high = ((r > 1.2) & (adv[:, None] > 0)).double().expand(B, L)
        f_low, f_high = (low * m).sum(-1) / m.sum(-1), (high * m).sum(-1) / m.sum(-1)  # NaN for the empty row
        ok = ~torch.isnan(f_low)
        if level == "sequence":
            assert_close_rule(met["seq_clip_frac_low"].reshape(1), torch.nan_to_num(f_low).mean().reshape(1),
                              atol=1e-7, name="low mean")
            assert_close_rule(met["seq_clip_frac_high"].reshape(1), torch.nan_to_num(f_high).mean().reshape(1),
                              atol=1e-7, name="high mean")
        assert_close_rule(met["seq_clip_frac_low_min"].reshape(1), f_low[ok].min().reshape(1), atol=1e-7, name="min")
        assert_close_rule(met["seq_clip_frac_high_max"].reshape(1), f_high[ok].max().reshape(1), atol=1e-7,
                          name="max")


@pytest.mark.parametrize("bad, match", [
    (dict(empty_seqs="drop"), "empty_seqs='drop'"),
    (dict(dr_grpo_norm="B"), "dr_grpo_norm='B'"),
    (dict(kl="k4", beta=0.1), "kl='k4'"),
    (dict(log_ratio_min=5.0, log_ratio_max=1.0), "log_ratio_min=5.0"),
    (dict(kl_clamp=0.0), "kl_clamp"),
    (dict(tis_level="sequence"), "tis_level='sequence' needs rollout_logp"),
    (dict(tis_level="seq", rollout_logp=torch.zeros(2, 3), tis_cap=2.0), "tis_level='seq'"),
])
def test_bad_convention_options_are_named(bad, match):
    kw = dict(bad)
    if "beta" in kw:
        kw["ref_logp"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        U.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), **kw)
