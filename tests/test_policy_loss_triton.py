"""Triton `policy_loss` and `fused_linear_policy_loss` against the fp32 reference, forward, gradients and metrics.

On CPU the kernels run under the Triton interpreter (tiny H, few tokens); the chunk budget is lowered so
the fused op runs several chunks. GPU-marked tests use the docs/benchmarks.md qwen-1.5b shape.
"""
import pytest
import torch
from tolerance import assert_close_rule, rel_err

import unirl_fast as U
import unirl_fast.ops.fused_linear_policy_loss_triton as FL
from unirl_fast.reference import fused_linear_policy_loss_ref, logprobs_from_logits_ref
from unirl_fast.reference.policy_loss import policy_loss_ref

LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo", "seq_sum"]
FULL = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.05, kl="k3", tis_cap=1.2, entropy_coef=0.01)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(FL, "CHUNK_ELEMENTS", 7 * 300)  # 7 rows per chunk at V=300: several chunks, ragged tail


def _policy_data(B, L, device, per_token_adv=False):
    old = torch.randn(B, L, device=device) * 0.5 - 2.0
    mask = torch.rand(B, L, device=device) > 0.25
    mask[-1] = False  # a fully masked sequence
    return dict(
        old_logp=old,
        advantages=torch.randn(B, L, device=device) if per_token_adv else torch.randn(B, device=device),
        mask=mask,
        ref_logp=old + 0.3 * torch.randn(B, L, device=device),
        rollout_logp=old + 0.3 * torch.randn(B, L, device=device),
    )


def _check_metrics(m_ours, m_ref, atol=2e-6):
    assert m_ours.keys() == m_ref.keys()
    for k in m_ref:
        assert abs(float(m_ours[k]) - float(m_ref[k])) <= atol * max(1.0, abs(float(m_ref[k]))), k


def _assert_loss(loss, loss_r, loss_abs, rtol=4e-6):
    """The loss is a signed sum over tokens; judge its error against the cancellation-free scale loss_abs
    (the same loss with |A|, whose per-token terms share one sign) rather than the possibly tiny |loss|."""
    err = abs(float(loss) - float(loss_r))
    scale = max(abs(float(loss_r)), abs(float(loss_abs)), 1e-12)
    assert err <= rtol * scale, f"loss {float(loss)} vs reference {float(loss_r)}: err {err:.3e}, scale {scale:.3e}"


def _opts(loss_type, importance_sampling, d, **over):
    kw = dict(FULL, loss_type=loss_type, importance_sampling=importance_sampling, ref_logp=d["ref_logp"],
              rollout_logp=d["rollout_logp"])
    if loss_type == "dr_grpo":
        kw["max_completion_length"] = 80
    if loss_type == "dapo":
        kw["num_tokens"] = 37.0
    kw.update(over)
    return {k: v for k, v in kw.items() if v is not None}


# ---------------------------------------------------------------- policy_loss on given log-probs

@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_matches_reference(device, loss_type, is_level):
    B, L = 3, 63
    d = _policy_data(B, L, device)
    logp = (d["old_logp"] + 0.3 * torch.randn(B, L, device=device)).requires_grad_()
    ent = (3 * torch.rand(B, L, device=device)).requires_grad_()
    logp.data[~d["mask"]] = float("nan")  # garbage at masked positions must not leak
    kw = _opts(loss_type, is_level, d, entropy=ent)
    args = (d["old_logp"], d["advantages"], d["mask"])
    go = torch.rand((), device=device) + 0.5
    loss, met = U.policy_loss(logp, *args, impl="triton", **kw)
    g = torch.autograd.grad(loss * go, [logp, ent])
    loss_r, met_r = policy_loss_ref(logp, *args, **kw)
    g_r = torch.autograd.grad(loss_r * go, [logp, ent])
    loss_abs, _ = policy_loss_ref(logp, d["old_logp"], d["advantages"].abs(), d["mask"], **kw)
    _assert_loss(loss, loss_r, loss_abs)
    assert_close_rule(g[0], g_r[0], atol=2e-6, name="dlogp")
    assert_close_rule(g[1], g_r[1], atol=2e-6, name="dentropy")
    _check_metrics(met, met_r)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_policy_loss_kl_kinds_per_token_adv(device, kl, is_level):
    B, L = 4, 17
    d = _policy_data(B, L, device, per_token_adv=True)
    logp = (d["old_logp"] + 0.5 * torch.randn(B, L, device=device)).to(torch.bfloat16).requires_grad_()
    kw = dict(loss_type="grpo", importance_sampling=is_level, ref_logp=d["ref_logp"], beta=0.3, kl=kl,
              eps_low=0.1, eps_high=0.4)
    args = (d["old_logp"], d["advantages"], d["mask"])
    loss, met = U.policy_loss(logp, *args, impl="triton", **kw)
    (g,) = torch.autograd.grad(loss, [logp])
    loss_r, met_r = policy_loss_ref(logp, *args, **kw)
    (g_r,) = torch.autograd.grad(loss_r, [logp])
    assert g.dtype == torch.bfloat16
    _assert_loss(loss, loss_r, policy_loss_ref(logp, d["old_logp"], d["advantages"].abs(), d["mask"], **kw)[0])
    assert_close_rule(g, g_r, g_r.float(), atol=1e-2, name="dlogp")  # bf16 output rounding
    _check_metrics(met, met_r)


def test_policy_loss_all_masked_is_zero(device):
    B, L = 2, 5
    logp = torch.randn(B, L, device=device, requires_grad=True)
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    for lt in LOSS_TYPES:
        loss, met = U.policy_loss(logp, logp.detach(), torch.randn(B, device=device), mask, loss_type=lt,
                                  impl="triton")
        (g,) = torch.autograd.grad(loss, [logp])
        assert float(loss) == 0.0 and torch.count_nonzero(g) == 0
        assert all(torch.isfinite(v) for v in met.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_split_along_l(device, loss_type):
    """Token IS splits each sequence over several programs (one partial-sum row per segment): same loss, metrics and
    gradients as the reference, with ragged segments, a fully masked sequence and per-token advantages."""
    from unirl_fast.kernels.policy_loss import segments

    B, L = 2, 517
    assert segments(B, L, torch.device(device), False) > 1 and segments(B, L, torch.device(device), True) == 1
    d = _policy_data(B, L, device, per_token_adv=True)
    logp = (d["old_logp"] + 0.3 * torch.randn(B, L, device=device)).requires_grad_()
    ent = (3 * torch.rand(B, L, device=device)).requires_grad_()
    kw = _opts(loss_type, "token", d, entropy=ent)
    args = (d["old_logp"], d["advantages"], d["mask"])
    loss, met = U.policy_loss(logp, *args, impl="triton", **kw)
    g = torch.autograd.grad(loss, [logp, ent])
    loss_r, met_r = policy_loss_ref(logp, *args, **kw)
    g_r = torch.autograd.grad(loss_r, [logp, ent])
    _assert_loss(loss, loss_r, policy_loss_ref(logp, d["old_logp"], d["advantages"].abs(), d["mask"], **kw)[0])
    assert_close_rule(g[0], g_r[0], atol=2e-6, name="dlogp")
    assert_close_rule(g[1], g_r[1], atol=2e-6, name="dentropy")
    _check_metrics(met, met_r)


@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_policy_loss_long_sequence(device, is_level):
    B, L = 1, 70_000  # L past 65535: token IS splits it over programs (grid (B, S)), sequence IS loops in one
    d = _policy_data(2, L, device)
    d = {k: v[:1] for k, v in d.items()}
    d["mask"][0, :5] = True
    logp = (d["old_logp"] + 0.2 * torch.randn(B, L, device=device)).requires_grad_()
    kw = dict(loss_type="dr_grpo", importance_sampling=is_level, ref_logp=d["ref_logp"], beta=0.1)
    args = (d["old_logp"], d["advantages"], d["mask"])
    loss, met = U.policy_loss(logp, *args, impl="triton", **kw)
    (g,) = torch.autograd.grad(loss, [logp])
    loss_r, met_r = policy_loss_ref(logp, *args, **kw)
    (g_r,) = torch.autograd.grad(loss_r, [logp])
    _assert_loss(loss, loss_r, policy_loss_ref(logp, d["old_logp"], d["advantages"].abs(), d["mask"], **kw)[0])
    assert_close_rule(g, g_r, atol=2e-6, name="dlogp")
    _check_metrics(met, met_r, atol=1e-5)


def test_policy_loss_compiles_fullgraph(device):
    B, L = 2, 9
    d = _policy_data(B, L, device)
    logp = (d["old_logp"] + 0.1).requires_grad_()

    def f(lp):
        loss, met = U.policy_loss(lp, d["old_logp"], d["advantages"], d["mask"], impl="triton")
        return loss, met["clip_frac_high"]

    backend = "inductor" if device.type == "cuda" else "aot_eager"  # no C++ compile on the CPU runner
    loss_c, clip_c = torch.compile(f, fullgraph=True, backend=backend)(logp)
    (g_c,) = torch.autograd.grad(loss_c, [logp])
    loss_e, clip_e = f(logp)
    (g_e,) = torch.autograd.grad(loss_e, [logp])
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(g_c, g_e)
    torch.testing.assert_close(clip_c, clip_e)


# ---------------------------------------------------------------- fused_linear_policy_loss

def _head(B, L, H, V, device, dtype=torch.float32, bias=True, scale=1.0):
    h = (torch.randn(B, L, H, device=device) * scale).to(dtype).requires_grad_()
    W = (torch.randn(V, H, device=device) / H ** 0.5).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(V, device=device)).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (B, L), device=device)
    y[0, 1] = -100  # ignore_index inside a valid sequence
    return h, W, b, y


def _fused_both(h, W, b, y, d, kw, go):
    params = [t for t in (h, W, b) if t is not None]
    args = (y, d["old_logp"], d["advantages"], d["mask"])
    loss, met = U.fused_linear_policy_loss(h, W, *args, bias=b, impl="triton", **kw)
    g = torch.autograd.grad(loss * go, params)
    loss_r, met_r = fused_linear_policy_loss_ref(h, W, *args, bias=b, **kw)
    g_r = torch.autograd.grad(loss_r * go, params)
    with torch.no_grad():
        loss_abs, _ = fused_linear_policy_loss_ref(h, W, y, d["old_logp"], d["advantages"].abs(), d["mask"], bias=b,
                                                   **kw)
    return (loss, g, met), (loss_r, g_r, met_r, loss_abs)


def _assert_fused(ours, ref, atol=2e-6):
    (loss, g, met), (loss_r, g_r, met_r, loss_abs) = ours, ref
    _assert_loss(loss, loss_r, loss_abs, rtol=2 * atol)
    for name, a, r in zip(("dhidden", "dweight", "dbias"), g, g_r):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert_close_rule(a, r, atol=atol, name=name)
    _check_metrics(met, met_r, atol=max(atol, 2e-6))


@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_matches_reference(device, small_chunks, loss_type, is_level):
    B, L, H, V = 3, 9, 16, 300
    h, W, b, y = _head(B, L, H, V, device)
    d = _policy_data(B, L, device)
    d["old_logp"] = d["old_logp"] - 3.0  # near log(1/V) so ratios straddle the clip range
    kw = _opts(loss_type, is_level, d, temperature=0.7)
    _assert_fused(*_fused_both(h, W, b, y, d, kw, torch.rand((), device=device) + 0.5))


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_fused_kl_kinds_per_token_adv_no_bias(device, small_chunks, kl):
    B, L, H, V = 2, 11, 8, 300
    h, W, _, y = _head(B, L, H, V, device, bias=False)
    d = _policy_data(B, L, device, per_token_adv=True)
    kw = dict(loss_type="bnpo", ref_logp=d["ref_logp"] - 3.0, beta=0.2, kl=kl, entropy_coef=-0.02)
    _assert_fused(*_fused_both(h, W, None, y, d, kw, 1.0))


def test_fused_awkward_vocab_and_length(device):
    B, L, H, V = 2, 63, 8, 3000  # V not a multiple of any block, L = 63
    h, W, b, y = _head(B, L, H, V, device)
    d = _policy_data(B, L, device)
    kw = _opts("grpo", "token", d, temperature=0.7)
    _assert_fused(*_fused_both(h, W, b, y, d, kw, 1.0))


def _oracle64(h, W, b, y, d, kw):
    """fp64 head (logits, logp, entropy) + the reference loss: the oracle where fp32 itself cancels."""
    z = h.double() @ W.double().t() + b.double()
    valid = y != -100
    lsm = torch.log_softmax(z, -1)
    logp = torch.where(valid, lsm.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    ent = torch.where(valid, -(lsm.exp() * lsm).sum(-1), 0.0)
    loss, met = policy_loss_ref(logp, d["old_logp"], d["advantages"], d["mask"] & valid, entropy=ent, **kw)
    return loss, torch.autograd.grad(loss, [h, W, b]), met


def test_fused_very_negative_logits(device, small_chunks):
    B, L, H, V = 2, 6, 8, 300
    # every logit near -2e4; entries are multiples of 1/4 so the logits are exact in fp32. The fp32
    # reference loses the entropy to cancellation there (lse - E_p z at |z| = 2e4); ours shifts by the max.
    h = (torch.randint(-2, 3, (B, L, H), device=device) / 2.0).requires_grad_()
    W = (torch.randint(-2, 3, (V, H), device=device) / 2.0).requires_grad_()
    b = (torch.randint(-8, 8, (V,), device=device) / 4.0 - 2e4).requires_grad_()
    y = torch.randint(0, V, (B, L), device=device)
    d = _policy_data(B, L, device)
    kw = dict(loss_type="grpo", entropy_coef=0.1)
    (loss, g, met), (loss_r, g_r, _, _) = _fused_both(h, W, b, y, d, kw, 1.0)
    loss_o, g_o, met_o = _oracle64(h, W, b, y, d, kw)
    assert_close_rule(loss, loss_o, loss_r, atol=1e-6, name="loss")
    for name, a, o, r in zip(("dhidden", "dweight", "dbias"), g, g_o, g_r):
        assert_close_rule(a, o, r, atol=1e-6, name=name)
    assert abs(float(met["entropy_mean"]) - float(met_o["entropy_mean"])) < 1e-5


def test_fused_noncontiguous_hidden_and_no_grad_weight(device, small_chunks):
    B, L, H, V = 2, 7, 8, 300
    base = torch.randn(L, B, 2 * H, device=device)
    h = base[..., ::2].transpose(0, 1).requires_grad_()  # [B, L, H], non-contiguous
    assert not h.is_contiguous()
    W = torch.randn(V, H, device=device) / H ** 0.5
    y = torch.randint(0, V, (B, L), device=device)
    d = _policy_data(B, L, device)
    args = (y, d["old_logp"], d["advantages"], d["mask"])
    loss, met = U.fused_linear_policy_loss(h, W, *args, impl="triton", importance_sampling="sequence")
    (g,) = torch.autograd.grad(loss, [h])
    loss_r, met_r = fused_linear_policy_loss_ref(h, W, *args, importance_sampling="sequence")
    (g_r,) = torch.autograd.grad(loss_r, [h])
    loss_abs, _ = fused_linear_policy_loss_ref(h, W, y, d["old_logp"], d["advantages"].abs(), d["mask"],
                                               importance_sampling="sequence")
    _assert_loss(loss, loss_r, loss_abs)
    assert_close_rule(g, g_r, atol=2e-6, name="dhidden")
    _check_metrics(met, met_r)


def test_fused_flattened_hidden_no_grad(device):
    B, L, H, V = 2, 5, 8, 300
    h, W, b, y = _head(B, L, H, V, device)
    d = _policy_data(B, L, device)
    with torch.no_grad():
        loss, met = U.fused_linear_policy_loss(h.reshape(B * L, H), W, y, d["old_logp"], d["advantages"], d["mask"],
                                               bias=b, impl="triton")
        loss_r, met_r = fused_linear_policy_loss_ref(h, W, y, d["old_logp"], d["advantages"], d["mask"], bias=b)
        loss_abs, _ = fused_linear_policy_loss_ref(h, W, y, d["old_logp"], d["advantages"].abs(), d["mask"], bias=b)
    _assert_loss(loss, loss_r, loss_abs)
    _check_metrics(met, met_r)


@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_fused_all_masked_is_zero(device, is_level):
    B, L, H, V = 2, 4, 8, 300
    h, W, b, y = _head(B, L, H, V, device)
    y[1] = -100
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    mask[1] = True  # valid mask but every target ignored
    loss, met = U.fused_linear_policy_loss(h, W, y, torch.randn(B, L, device=device), torch.randn(B, device=device),
                                           mask, bias=b, importance_sampling=is_level, beta=0.1,
                                           ref_logp=torch.randn(B, L, device=device), impl="triton")
    grads = torch.autograd.grad(loss, [h, W, b])
    assert float(loss) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert all(bool(torch.isfinite(v)) for v in met.values())


def _bf16_baseline(h, W, b, y, d, kw):
    """torch at the same precision: bf16 logits from a bf16 GEMM, then the fp32 reference loss."""
    z = h @ W.t() + b
    logp, ent = logprobs_from_logits_ref(z, y, temperature=kw.get("temperature", 1.0), return_entropy=True)
    mask = d["mask"] & (y != -100)
    loss, _ = policy_loss_ref(logp, d["old_logp"], d["advantages"], mask, entropy=ent,
                              **{k: v for k, v in kw.items() if k != "temperature"})
    return loss, torch.autograd.grad(loss, [h, W, b])


@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_fused_bf16_inputs_tolerance_rule(device, small_chunks, is_level):
    B, L, H, V = 2, 9, 32, 300
    h, W, b, y = _head(B, L, H, V, device, dtype=torch.bfloat16)
    d = _policy_data(B, L, device)
    kw = _opts("grpo", is_level, d, temperature=0.7)
    (loss, g, met), (loss_r, g_r, met_r, _) = _fused_both(h, W, b, y, d, kw, 1.0)
    loss_b, g_b = _bf16_baseline(h, W, b, y, d, kw)
    assert_close_rule(loss, loss_r, loss_b, atol=1e-3, name="loss")
    for name, a, r, base in zip(("dhidden", "dweight", "dbias"), g, g_r, g_b):
        assert a.dtype == torch.bfloat16
        assert_close_rule(a, r, base, atol=1e-2, name=name)


def test_fused_autocast_fp32_params(device, small_chunks):
    B, L, H, V = 2, 5, 16, 300
    h, W, b, y = _head(B, L, H, V, device)
    d = _policy_data(B, L, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, _ = U.fused_linear_policy_loss(h, W, y, d["old_logp"], d["advantages"], d["mask"], bias=b,
                                             impl="triton")
    g = torch.autograd.grad(loss, [h, W, b])
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in g)
    loss_r, g_r = _bf16_baseline(*(t.detach().to(torch.bfloat16).requires_grad_() for t in (h, W, b)), y, d, {})
    loss_f, _ = fused_linear_policy_loss_ref(h, W, y, d["old_logp"], d["advantages"], d["mask"], bias=b)
    assert_close_rule(loss, loss_f, loss_r, atol=1e-3, name="loss")


@pytest.mark.slow
def test_fused_fp16_inputs(device, small_chunks):
    B, L, H, V = 2, 9, 16, 300
    h, W, b, y = _head(B, L, H, V, device, dtype=torch.float16)
    d = _policy_data(B, L, device)
    kw = _opts("dr_grpo", "token", d)
    (loss, g, _), (loss_r, g_r, _, loss_abs) = _fused_both(h, W, b, y, d, kw, 1.0)
    _assert_loss(loss, loss_r, loss_abs, rtol=1e-5)
    for name, a, r in zip(("dhidden", "dweight", "dbias"), g, g_r):
        assert a.dtype == torch.float16
        assert_close_rule(a, r, r.float().half(), atol=1e-3, name=name)


def test_fused_compiles_fullgraph(device, small_chunks):
    B, L, H, V = 2, 5, 8, 300
    h, W, b, y = _head(B, L, H, V, device)
    d = _policy_data(B, L, device)

    def f(h, W, b):
        loss, met = U.fused_linear_policy_loss(h, W, y, d["old_logp"], d["advantages"], d["mask"], bias=b,
                                               impl="triton", beta=0.1, ref_logp=d["ref_logp"])
        return loss, met["kl_mean"]

    backend = "inductor" if device.type == "cuda" else "aot_eager"  # no C++ compile on the CPU runner
    out_c = torch.compile(f, fullgraph=True, backend=backend)(h, W, b)
    g_c = torch.autograd.grad(out_c[0], [h, W, b])
    out_e = f(h, W, b)
    g_e = torch.autograd.grad(out_e[0], [h, W, b])
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(g_c, g_e)


def _head_grads(h, W, b, y, d, rows, monkeypatch, **kw):
    monkeypatch.setattr(FL, "CHUNK_ELEMENTS", rows * W.shape[0])
    leaves = [t.detach().clone().requires_grad_() for t in (h, W, b)]
    loss, _ = U.fused_linear_policy_loss(leaves[0], leaves[1], y, d["old_logp"], d["advantages"], d["mask"],
                                         bias=leaves[2], impl="triton", loss_type="seq_sum", **kw)
    return torch.autograd.grad(loss, leaves)


def test_fused_head_grad_accumulates_in_fp32(device, monkeypatch):
    """bf16 head, 2 rows per chunk (128 chunks): summed in fp32 across chunks, dW equals the one-chunk result (one
    GEMM, rounded once) and is as close to the fp64 oracle; summed in bf16 (accum_dtype=None, the old behaviour) it
    is measurably further from both. dh and db never accumulate across chunks and are the same either way."""
    B, L, H, V = 4, 64, 32, 300
    h, W, b, y = _head(B, L, H, V, device, dtype=torch.bfloat16)
    d = _policy_data(B, L, device)
    d["mask"][:] = True
    one = _head_grads(h, W, b, y, d, B * L, monkeypatch)
    acc32 = _head_grads(h, W, b, y, d, 2, monkeypatch)
    acc16 = _head_grads(h, W, b, y, d, 2, monkeypatch, accum_dtype=None)
    Wd = W.detach().double().requires_grad_()
    loss_d, _ = fused_linear_policy_loss_ref(h.detach().double(), Wd, y, d["old_logp"].double(),
                                             d["advantages"].double(), d["mask"], bias=b.detach().double(),
                                             loss_type="seq_sum")
    (oracle,) = torch.autograd.grad(loss_d, [Wd])
    assert acc32[1].dtype == torch.bfloat16
    assert rel_err(acc32[1], one[1]) <= 1e-3  # the chunked fp32 sum rounds like one GEMM (rare 1-ulp flips at most)
    assert rel_err(acc32[1], oracle) <= rel_err(one[1], oracle) + 1e-4
    assert rel_err(acc16[1], oracle) > 1.5 * rel_err(acc32[1], oracle), (rel_err(acc16[1], oracle),
                                                                         rel_err(acc32[1], oracle))
    assert torch.equal(acc32[0], acc16[0]) and torch.equal(acc32[2], acc16[2])
    with pytest.raises(ValueError, match="accum_dtype"):
        _head_grads(h, W, b, y, d, 2, monkeypatch, accum_dtype=torch.bfloat16)


def test_fused_memory_and_in_place_backward(device, monkeypatch):
    """Peak extra memory of forward + backward (op allocations beyond the gradients the caller gets): one logits
    chunk plus the fp32 [V, H] accumulator and O(N) vectors. Backward scales the stored gradients in place (no
    second [N, H] or [V, H] buffer) and refuses a second backward through the same call."""
    from memprobe import AllocProbe

    B, L, H, V = 4, 32, 64, 1000
    h, W, b, y = _head(B, L, H, V, device, dtype=torch.bfloat16)
    d = _policy_data(B, L, device)
    rows = 16
    monkeypatch.setattr(FL, "CHUNK_ELEMENTS", rows * V)
    with AllocProbe() as fwd:
        loss, _ = U.fused_linear_policy_loss(h, W, y, d["old_logp"], d["advantages"], d["mask"], bias=b,
                                             impl="triton")
    with AllocProbe() as bwd:
        (loss * 0.5).backward(retain_graph=True)
    grads = (h.numel() + W.numel()) * 2 + V * 4  # what the caller receives: dh, dW (bf16), db (fp32 then bf16)
    budget = rows * V * 2 + V * H * 4 + 64 * B * L * 4 + grads + 4096
    assert fwd.peak_bytes <= budget, (fwd.peak_bytes, budget, sorted(fwd.allocs, key=lambda a: -a[2])[:6])
    assert bwd.count_at_least(B * L * H) == 0, bwd.allocs  # scaled in place: no new dh / dW buffer
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    again, _ = U.fused_linear_policy_loss(h, W, y, d["old_logp"], d["advantages"], d["mask"], bias=b, impl="triton")
    full = torch.autograd.grad(again, [h, W])
    assert torch.equal(h.grad * 2, full[0]) and torch.equal(W.grad * 2, full[1])  # x 0.5 is exact in bf16


@pytest.mark.gpu
def test_fused_gpu_long_sequence():
    B, L, H, V = 1, 70_000, 64, 1000  # L past 65535 (docs/benchmarks.md long has L = 65536), many chunks
    dev = torch.device("cuda")
    h, W, b, y = _head(B, L, H, V, dev)
    d = _policy_data(2, L, dev)
    d = {k: v[:1] for k, v in d.items()}
    kw = _opts("grpo", "token", d)
    _assert_fused(*_fused_both(h, W, b, y, d, kw, 1.0), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_fused_gpu_qwen_1p5b_shape(is_level):
    B, L, H, V = 8, 1024, 1536, 151936  # docs/benchmarks.md qwen-1.5b
    dev = torch.device("cuda")
    h, W, b, y = _head(B, L, H, V, dev, dtype=torch.bfloat16)
    d = _policy_data(B, L, dev)
    d["old_logp"] = d["old_logp"] - 10.0
    kw = _opts("grpo", is_level, d)
    (loss, g, met), (loss_r, g_r, met_r, _) = _fused_both(h, W, b, y, d, kw, 1.0)
    loss_b, g_b = _bf16_baseline(h, W, b, y, d, kw)
    assert_close_rule(loss, loss_r, loss_b, atol=1e-3, name="loss")
    for name, a, r, base in zip(("dhidden", "dweight", "dbias"), g, g_r, g_b):
        assert_close_rule(a, r, base, atol=1e-2, name=name)
    _check_metrics(met, met_r, atol=1e-3)
