"""Reference token log-probs / entropy (FORMULAS.md section 1) against an independent fp64 oracle."""
import pytest
import torch
from tolerance import assert_close_rule

import unirl_fast as U


def oracle(logits, targets, T=1.0, ignore_index=-100, dtype=torch.float64):
    """fp64 (or `dtype`: the torch-at-same-precision baseline), written independently of the
    reference: log_softmax, gather, entropy as -sum p log p."""
    z = logits.to(dtype) / T
    logq = torch.log_softmax(z, -1)
    p = logq.exp()
    valid = targets != ignore_index
    t = targets.clamp(min=0)
    logp = logq.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    ent = -(p * torch.where(p > 0, logq, torch.zeros_like(logq))).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


@pytest.mark.parametrize("shape", [(2, 63, 3000), (1, 4, 151936), (5, 17)], ids=["B2-L63-V3000", "V151936", "flat"])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_forward_matches_oracle(shape, T):
    logits = torch.randn(*shape) * 3
    targets = torch.randint(0, shape[-1], shape[:-1])
    targets.view(-1)[::5] = -100
    logp, ent = U.logprobs_from_logits(logits, targets, temperature=T, return_entropy=True, impl="reference")
    ref_lp, ref_ent = oracle(logits, targets, T)
    base_lp, base_ent = oracle(logits, targets, T, dtype=torch.float32)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close_rule(logp, ref_lp, base_lp, atol=1e-6, name="logp")
    assert_close_rule(ent, ref_ent, base_ent, atol=1e-6, name="entropy")
    assert (logp.view(-1)[::5] == 0).all() and (ent.view(-1)[::5] == 0).all()


def test_very_negative_rows_and_neg_inf():
    logits = torch.randn(3, 50) - 2e4  # every logit below -1e4
    logits[1, 7:20] = float("-inf")  # masked vocabulary entries
    targets = torch.tensor([0, 3, 49])
    logp, ent = U.logprobs_from_logits(logits, targets, return_entropy=True)
    ref_lp, ref_ent = oracle(logits, targets)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert_close_rule(logp, ref_lp, atol=1e-5)
    assert_close_rule(ent, ref_ent, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_match_formula_and_oracle(dtype):
    """Autograd of the reference == the closed-form backward of FORMULAS.md == fp64 autograd."""
    B, L, V, T = 2, 9, 301, 0.8
    logits = (torch.randn(B, L, V) * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, L))
    targets[0, 3] = -100
    g, gH = torch.randn(B, L), torch.randn(B, L)
    logp, ent = U.logprobs_from_logits(logits, targets, temperature=T, return_entropy=True)
    (logp * g + ent * gH).sum().backward()

    x64 = logits.detach().double().requires_grad_()  # same (rounded) inputs: only our arithmetic differs
    lp64, ent64 = oracle(x64, targets, T)
    (lp64 * g.double() + ent64 * gH.double()).sum().backward()
    z = x64.detach() / T
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), V).double()
    Ez = (p * z).sum(-1, keepdim=True)
    dz = g.double()[..., None] * (onehot - p) - gH.double()[..., None] * p * (z - Ez)
    dz = torch.where((targets != -100)[..., None], dz, 0.0)
    assert_close_rule(x64.grad, dz / T, atol=1e-10, name="formula vs fp64 autograd")
    assert_close_rule(logits.grad, x64.grad, atol=1e-5 if dtype == torch.float32 else 1e-2, name="grad")
    assert (logits.grad[0, 3] == 0).all()


@pytest.mark.parametrize("flat", [False, True], ids=["BLH", "NH"])
def test_fused_linear_matches_logits_path(flat):
    B, L, H, V = 3, 13, 32, 3000
    h = torch.randn(B, L, H, requires_grad=True)
    W = (torch.randn(V, H) / H ** 0.5).requires_grad_()
    b = torch.randn(V, requires_grad=True)
    y = torch.randint(0, V, (B, L))
    hin = h.reshape(B * L, H) if flat else h
    logp, ent = U.fused_linear_logprobs(hin, W, y, bias=b, temperature=1.3, return_entropy=True)
    assert logp.shape == (B, L)
    ref_lp, ref_ent = oracle(h.double() @ W.double().t() + b.double(), y, 1.3)
    assert_close_rule(logp, ref_lp, atol=1e-5)
    assert_close_rule(ent, ref_ent, atol=1e-5)
    (logp.sum() + ent.sum()).backward()
    h64, W64, b64 = (t.detach().double().requires_grad_() for t in (h, W, b))
    lp64, e64 = oracle(h64 @ W64.t() + b64, y, 1.3)
    (lp64.sum() + e64.sum()).backward()
    for got, want, n in ((h.grad, h64.grad, "dh"), (W.grad, W64.grad, "dW"), (b.grad, b64.grad, "db")):
        assert_close_rule(got, want, atol=1e-5, name=n)


def test_fused_linear_bf16_and_noncontiguous():
    H, V = 64, 500
    h = torch.randn(40, 3, H).to(torch.bfloat16).transpose(0, 1)  # [3, 40, H], non-contiguous
    W = (torch.randn(V, H) / 8).to(torch.bfloat16)
    y = torch.randint(0, V, (3, 40))
    assert not h.is_contiguous()
    logp, _ = U.fused_linear_logprobs(h, W, y)
    ref_lp, _ = oracle(h.double() @ W.double().t(), y)
    torch_bf16, _ = oracle((h @ W.t()).double(), y)  # torch at bf16: logits rounded to bf16
    assert_close_rule(logp, ref_lp, torch_bf16, atol=1e-6)
