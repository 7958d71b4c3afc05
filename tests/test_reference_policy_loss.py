"""Reference GRPO-family policy loss (FORMULAS.md section 2) against a per-token loop oracle in fp64."""
import math

import pytest
import torch
from tolerance import assert_close_rule

import unirl_fast as U


def loop_oracle(logp, old, A, mask, *, loss_type, eps_low, eps_high, dual_clip, is_level, ref, beta, kl, roll, cap,
                ent, ent_coef, mcl, num_tokens):
    """Python loops over sequences and tokens, fp64 scalars; differentiable through `logp` (and `ent`)."""
    B, L = logp.shape
    seq_losses, total, count = [], 0.0, 0
    for i in range(B):
        toks = [t for t in range(L) if mask[i, t]]
        if is_level == "sequence" and toks:
            r_seq = torch.exp(sum(logp[i, t] - old[i, t] for t in toks) / len(toks))
        s = 0.0
        for t in toks:
            r = r_seq if is_level == "sequence" else torch.exp(logp[i, t] - old[i, t])
            a = A[i] if A.ndim == 1 else A[i, t]
            pg = torch.maximum(-a * r, -a * r.clamp(1 - eps_low, 1 + eps_high))
            if dual_clip is not None and a < 0:
                pg = torch.minimum(pg, -dual_clip * a)
            if roll is not None:
                pg = pg * min(math.exp(old[i, t] - roll[i, t]), cap)
            if ref is not None and beta:
                d = ref[i, t] - logp[i, t]
                pg = pg + beta * {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - d - 1}[kl]
            if ent is not None and ent_coef:
                pg = pg - ent_coef * ent[i, t]
            s = s + pg
        count += len(toks)
        total = total + s
        seq_losses.append(s / max(len(toks), 1) if loss_type == "grpo" else s)
    if loss_type == "grpo" or loss_type == "seq_sum":
        return sum(seq_losses) / B
    if loss_type in ("bnpo", "dapo"):
        return total / max(num_tokens if num_tokens is not None else count, 1)
    return total / (B * (mcl or L))


def _inputs(B=4, L=11, per_token_adv=False):
    logp = (torch.randn(B, L) * 0.3 - 2).double()
    old = (logp + 0.25 * torch.randn(B, L)).double()
    A = torch.randn(B, L) if per_token_adv else torch.randn(B)
    mask = torch.rand(B, L) > 0.3
    mask[1] = False  # an empty sequence
    return logp, old, A.double(), mask


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dapo-global": dict(loss_type="dapo", num_tokens=57),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=16),
    "seq_sum": dict(loss_type="seq_sum"),
    "gspo": dict(loss_type="grpo", importance_sampling="sequence"),
    "asym-dual": dict(loss_type="bnpo", eps_low=0.1, eps_high=0.28, dual_clip=3.0),
    "k1": dict(loss_type="grpo", beta=0.1, kl="k1"),
    "k2": dict(loss_type="grpo", beta=0.1, kl="k2"),
    "k3": dict(loss_type="dapo", beta=0.04, kl="k3"),
    "tis": dict(loss_type="grpo", tis_cap=1.5),
    "entropy": dict(loss_type="grpo", entropy_coef=0.01),
    "everything": dict(loss_type="dr_grpo", eps_high=0.3, dual_clip=2.0, beta=0.05, kl="k3", tis_cap=2.0,
                       entropy_coef=0.02),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("per_token_adv", [False, True], ids=["seqA", "tokA"])
def test_matches_loop_oracle(case, per_token_adv):
    opts = dict(CASES[case])
    logp, old, A, mask = _inputs(per_token_adv=per_token_adv)
    B, L = logp.shape
    ref = (logp + 0.1 * torch.randn(B, L)).double()
    roll = (old + 0.3 * torch.randn(B, L)).double()
    ent = (torch.rand(B, L) * 3).double()
    kw = dict(opts)
    if kw.get("beta"):
        kw["ref_logp"] = ref.float()
    if "tis_cap" in kw:
        kw["rollout_logp"] = roll.float()
    if kw.get("entropy_coef"):
        kw["entropy"] = ent.float().requires_grad_()
    lp = logp.float().requires_grad_()
    loss, metrics = U.policy_loss(lp, old.float(), A.float(), mask, impl="reference", **kw)
    loss.backward()

    lp64 = logp.clone().requires_grad_()
    want = loop_oracle(lp64, old, A, mask, loss_type=opts["loss_type"], eps_low=opts.get("eps_low", 0.2),
                       eps_high=opts.get("eps_high", 0.2), dual_clip=opts.get("dual_clip"),
                       is_level=opts.get("importance_sampling", "token"), ref=ref if kw.get("beta") else None,
                       beta=opts.get("beta", 0.0), kl=opts.get("kl", "k3"), roll=roll if "tis_cap" in kw else None,
                       cap=opts.get("tis_cap"), ent=ent if kw.get("entropy_coef") else None,
                       ent_coef=opts.get("entropy_coef", 0.0), mcl=opts.get("max_completion_length"),
                       num_tokens=opts.get("num_tokens"))
    want.backward()
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert_close_rule(loss.detach().reshape(1), want.detach().reshape(1), atol=1e-5, name="loss")
    assert_close_rule(lp.grad, lp64.grad, atol=1e-5, name="dlogp")
    assert (lp.grad[~mask] == 0).all()
    assert {"clip_frac_low", "clip_frac_high", "ratio_mean"} <= set(metrics)


def test_metrics_definitions():
    logp, old, A, mask = _inputs()
    _, m = U.policy_loss(logp.float(), old.float(), A.float(), mask, ref_logp=logp.float(), entropy=logp.float().exp())
    r = torch.exp(logp - old)
    a = A[:, None].expand_as(r)
    n = mask.sum()
    torch.testing.assert_close(m["clip_frac_low"].double(), (((r < 0.8) & (a < 0) & mask).sum() / n).double())
    torch.testing.assert_close(m["clip_frac_high"].double(), (((r > 1.2) & (a > 0) & mask).sum() / n).double())
    torch.testing.assert_close(m["ratio_mean"].double(), (r * mask).sum() / n, rtol=1e-5, atol=1e-6)
    assert m["kl_mean"].abs() < 1e-7
    assert "entropy_mean" in m


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo", "seq_sum"])
def test_no_valid_token_is_zero_not_nan(loss_type):
    lp = torch.randn(3, 5, requires_grad=True)
    loss, metrics = U.policy_loss(lp, torch.randn(3, 5), torch.randn(3), torch.zeros(3, 5, dtype=torch.bool),
                                  loss_type=loss_type)
    loss.backward()
    assert loss.item() == 0.0
    assert (lp.grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_garbage_at_masked_positions_stays_out():
    logp, old, A, mask = _inputs()
    lp = logp.float().clone()
    lp[~mask] = float("nan")
    old_f = old.float().clone()
    old_f[~mask] = float("-inf")
    ref = logp.float().clone()
    ref[~mask] = float("inf")
    lp.requires_grad_()
    loss, _ = U.policy_loss(lp, old_f, A.float(), mask, ref_logp=ref, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    clean, _ = U.policy_loss(logp.float(), old.float(), A.float(), mask, ref_logp=logp.float(), beta=0.1)
    torch.testing.assert_close(loss, clean)


def test_float_mask_equals_bool_mask():
    logp, old, A, mask = _inputs()
    a, _ = U.policy_loss(logp.float(), old.float(), A.float(), mask)
    b, _ = U.policy_loss(logp.float(), old.float(), A.float(), mask.float())
    assert torch.equal(a, b)


def test_fused_linear_policy_loss_reference_matches_composition():
    B, L, H, V = 3, 10, 16, 3000
    h = torch.randn(B, L, H, requires_grad=True)
    W = (torch.randn(V, H) / 4).requires_grad_()
    y = torch.randint(0, V, (B, L))
    y[0, :3] = -100
    old = torch.randn(B, L) - 8
    A = torch.randn(B)
    mask = torch.ones(B, L, dtype=torch.bool)
    loss, m = U.fused_linear_policy_loss(h, W, y, old, A, mask, temperature=0.9, entropy_coef=0.01, beta=0.0)
    logp, ent = U.fused_linear_logprobs(h, W, y, temperature=0.9, return_entropy=True)
    want, _ = U.policy_loss(logp, old, A, mask & (y != -100), entropy=ent, entropy_coef=0.01)
    torch.testing.assert_close(loss, want)
    assert "entropy_mean" in m
