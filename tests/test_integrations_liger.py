"""`unirl_fast.integrations.liger.LigerGRPOLoss` without liger-kernel: Liger's call against an fp64 oracle of the
TRL / Liger objective it stands for (loss, metrics, hidden / head / bias gradients), and the options it refuses.
Liger's own test file runs against it in tests/test_liger_suite.py."""
from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_rule

from unirl_fast.integrations.liger import LigerGRPOLoss

B, T, H, V = 3, 9, 8, 21


def _oracle(x, W, b, y, mask, A, old, ref, *, beta, eps_low, eps_high, temperature, loss_type, level, delta, n_items,
            w, max_len):
    """fp64 TRL 1.16 objective (Liger's where they agree): returns (loss, kl mean, clip fraction)."""
    z = (x.double() @ W.double().T + (0 if b is None else b.double())) / temperature
    lp = z.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    m = mask.double()
    lr = lp - (lp.detach() if old is None else old.double())
    if level == "sequence":
        lr = ((lr * m).sum(-1) / m.sum(-1).clamp(min=1))[:, None]
    r = lr.exp()
    Ae = A.double()[:, None]
    clipped = (((r < 1 - eps_low) & (Ae < 0)) | ((r > 1 + eps_high) & (Ae > 0))).double().expand_as(m)
    rc = r.clamp(1 - eps_low, 1 + eps_high)
    r = r if delta is None else r.clamp(max=delta)
    ptl = -torch.minimum(r * Ae, rc * Ae)
    ptl = ptl if w is None else ptl * w.double()
    ref = lp.detach() if ref is None else ref.double()  # no reference model: KL to the current log-probs, 0
    kl = (ref - lp).exp() - (ref - lp) - 1 if beta else torch.zeros_like(lp)
    ptl = (ptl + beta * kl).expand_as(m)
    s = (ptl * m).sum(-1)
    norm = {"grpo": None, "bnpo": m.sum().clamp(min=1), "dapo": max(n_items or m.sum().item(), 1),
            "dr_grpo": B * (max_len or 1), "luspo": B}[loss_type]
    loss = (s / m.sum(-1).clamp(min=1)).mean() if norm is None else s.sum() / norm
    tok = m.sum().clamp(min=1)
    return loss, (kl * m).sum() / tok, (clipped * m).sum() / tok


CASES = {
    "grpo-ref_head-bias": dict(loss_type="grpo", beta=0.1, ref="head", old=True, bias=True),
    "dapo-items-vllm_is": dict(loss_type="dapo", beta=0.0, n_items=57, w=True, old=True),
    "luspo-on_policy": dict(loss_type="luspo", level="sequence", beta=0.0, old=False),
    "dr_grpo-delta-ref_logps": dict(loss_type="dr_grpo", beta=0.04, ref="logps", delta=2.0, old=True, max_len=T),
    "bnpo-no_ref_model": dict(loss_type="bnpo", beta=0.1, ref="none", old=True, temperature=0.7),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_liger_call_matches_the_oracle(case, impl):
    c = {**dict(level="token", delta=None, n_items=None, w=False, ref=None, bias=False, temperature=1.0,
                max_len=None), **CASES[case]}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, generator=g)
    W, bias = torch.randn(V, H, generator=g), torch.randn(V, generator=g) if c["bias"] else None
    y = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    A = torch.tensor([-0.9, 0.4, 1.3])
    with torch.no_grad():
        lp = ((x @ W.T + (0 if bias is None else bias)) / c["temperature"]).log_softmax(-1)
        lp = lp.gather(-1, y[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(B, T, generator=g) if c["old"] else None
    ref_in, ref_W = x + 0.05 * torch.randn(B, T, H, generator=g), W + 0.05 * torch.randn(V, H, generator=g)
    with torch.no_grad():
        ref_head = ((ref_in @ ref_W.T + (0 if bias is None else bias)) / c["temperature"]).log_softmax(-1)
        ref_head = ref_head.gather(-1, y[..., None])[..., 0]
    ref_logps = lp + 0.1 * torch.randn(B, T, generator=g)
    w = torch.rand(B, T, generator=g) * 2 if c["w"] else None
    module = LigerGRPOLoss(beta=c["beta"], loss_type=c["loss_type"], importance_sampling_level=c["level"],
                           delta=c["delta"], temperature=c["temperature"], max_completion_length=c["max_len"],
                           use_ref_model=c["ref"] != "none", epsilon_high=0.28, impl=impl)
    args = [x.clone().requires_grad_(), W.clone().requires_grad_(),
            None if bias is None else bias.clone().requires_grad_()]
    loss, metrics = module(args[0], args[1], y, mask, A, args[2], ref_per_token_logps=ref_logps if c["ref"] == "logps"
                           else None, old_per_token_logps=old, ref_input=ref_in, ref_weight=ref_W, ref_bias=bias,
                           vllm_is_ratio=w, num_items_in_batch=c["n_items"])
    ref = {"head": ref_head, "logps": ref_logps}.get(c["ref"])
    o_args = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    want, kl, clip = _oracle(*o_args, y, mask, A, old, ref, beta=c["beta"], eps_low=0.2, eps_high=0.28,
                             temperature=c["temperature"], loss_type=c["loss_type"], level=c["level"], delta=c["delta"],
                             n_items=c["n_items"], w=w, max_len=c["max_len"])
    assert_close_rule(loss.reshape(1), want.reshape(1), atol=1e-6, name="loss")
    assert len(metrics) == (2 if c["beta"] else 1)
    assert_close_rule(metrics[-1].reshape(1), clip.reshape(1), atol=1e-6, name="clip fraction")
    if c["beta"]:
        # a small difference of close log-probs (the reference head's are ours vs torch's in fp32): 1e-5 relative
        assert_close_rule(metrics[0].reshape(1), kl.reshape(1), atol=1e-5 if kl > 0 else 1e-12, name="kl")
    got = torch.autograd.grad(loss, [a for a in args if a is not None])
    wanted = torch.autograd.grad(want, [a for a in o_args if a is not None])
    for name, a, b in zip(("hidden", "head", "bias"), got, wanted):
        assert_close_rule(a, b, atol=1e-5, name=name)


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="cispo"), "loss_type='cispo'"), (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(loss_type="vespo"), "loss_type='vespo'"), (dict(loss_type="luspo"), "importance_sampling_level='token'"),
    (dict(loss_type="dr_grpo"), "needs max_completion_length"), (dict(delta=1.1), "delta=1.1"),
    (dict(beta=0.1, use_bias_correction_kl=True), "use_bias_correction_kl=True")])
def test_options_it_cannot_reproduce_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LigerGRPOLoss(**kw)
