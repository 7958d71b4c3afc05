"""forward_process_loss (DiffusionNFT / AWM, FORMULAS.md section 7): reference and Triton against an fp64 oracle.

The oracle is a separate transcription of the published code's form in fp64: nft builds x_t = (1 - t) x0 + t noise
and the x0 predictions x_t - t v+- as DiffusionNFT's trainer does; awm takes its gradient from AWM's PPO surrogate
with rho = exp(logp - sg(logp)) and clip range 1, so the test also checks that this gradient equals the gradient of
our weighted matching loss. Tolerance rule (tests/tolerance.py): err(ours) <= 2 err(torch at the inputs' precision)
+ atol, the baseline being the same transcription run in the inputs' dtype. On CPU the kernel runs under the
Triton interpreter with small blocks (a 256-element register tail, 64-element streamed steps), so D = 1600 here
streams a head and sweeps it back in reverse, as D = 65536 does on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_rule, rel_err
from unirl_fast.kernels import forward_loss as K

import unirl_fast as U

SHAPES = {"N7xD3x5x7": (7, 3, 5, 7), "N5xD4x20x20": (5, 4, 20, 20), "N1xD2x9x9": (1, 2, 9, 9),
          "N4xD256": (4, 256)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("reference", "triton")


def _formula(v, v_old, x0, noise, t, adv, *, algo, v_ref, beta_kl, nft_beta, adv_clip, awm_power, beta_old, dtype):
    """(loss, metrics, dL/dv) of the published code's form, computed in `dtype` (fp64: the oracle)."""
    N = v.shape[0]
    vv = v.detach().to(dtype).reshape(N, -1).requires_grad_()
    vo = None if v_old is None else v_old.to(dtype).reshape(N, -1)
    x0f, nz = x0.to(dtype).reshape(N, -1), noise.to(dtype).reshape(N, -1)
    tt = t.to(dtype).reshape(N, 1)
    a = adv.to(dtype).clamp(-adv_clip, adv_clip)
    out = {}
    if algo == "nft":
        b = nft_beta
        xt = (1 - tt) * x0f + tt * nz
        ep = xt - tt * (b * vv + (1 - b) * vo) - x0f
        en = xt - tt * ((1 + b) * vo - b * vv) - x0f
        wp = ep.detach().abs().mean(1).clamp(min=1e-5)
        wn = en.detach().abs().mean(1).clamp(min=1e-5)
        r = (a / adv_clip / 2 + 0.5).clamp(0, 1)
        pos, neg = (ep ** 2).mean(1) / wp, (en ** 2).mean(1) / wn
        policy = (adv_clip * (r * pos + (1 - r) * neg) / b).mean()
        surrogate = policy
        out.update(positive_loss=pos.mean(), negative_loss=neg.mean())
    else:
        m = ((vv - (nz - x0f)) ** 2).mean(1)
        logp = -((m + 1e-10) ** awm_power - torch.tensor(1e-10, dtype=dtype) ** awm_power) * tt[:, 0] / awm_power
        a_n = a / adv_clip
        ratio = torch.exp(logp - logp.detach())
        surrogate = torch.maximum(-a_n * ratio, -a_n * ratio.clamp(0.0, 2.0)).mean()  # AWM's, clip range 1
        policy = (-a_n * logp).mean()
        out["matching_mse"] = m.mean()
    loss, grad_loss = policy, surrogate
    out["policy_loss"] = policy
    if v_ref is not None:
        kl = ((vv - v_ref.to(dtype).reshape(N, -1)) ** 2).mean()
        out["kl_loss"] = kl
        loss, grad_loss = loss + beta_kl * kl, grad_loss + beta_kl * kl
    if vo is not None:
        old = ((vv - vo) ** 2).mean()
        out["old_deviate"] = old
        if algo == "awm":
            loss, grad_loss = loss + beta_old * old, grad_loss + beta_old * old
    (g,) = torch.autograd.grad(grad_loss, vv)
    return loss.detach(), {k: x.detach() for k, x in out.items()}, g.reshape(v.shape)


def _inputs(shape, dtype, *, v_ref=True, v_old=True):
    """Rows with t at the schedule's ends (1, 0.01, 1e-4 and 1e-6, where nft's 1e-5 floor holds) and advantages at
    0 and beyond the clip, then random ones."""
    N = shape[0]
    v = torch.randn(shape)
    d = dict(v=v.to(dtype), x0=torch.randn(shape).to(dtype), noise=torch.randn(shape).to(dtype))
    d["v_old"] = (v + 0.3 * torch.randn(shape)).to(dtype) if v_old else None
    d["v_ref"] = (v + 0.2 * torch.randn(shape)).to(dtype) if v_ref else None
    ends = torch.tensor([1.0, 0.01, 1e-4, 1e-6])
    t = torch.where(torch.arange(N) < 4, ends[torch.arange(N) % 4], 0.05 + 0.9 * torch.rand(N))
    adv = 3 * torch.randn(N)
    adv[: min(N, 3)] = torch.tensor([0.0, 7.5, -12.0])[: min(N, 3)]
    d["t"], d["advantages"] = t, adv
    return d


def _run(d, impl, g, **kw):
    """(loss, metrics, dL/dv scaled by the upstream g) through the public op."""
    v = d["v"].clone().requires_grad_()
    loss, metrics = U.forward_process_loss(v, d["v_old"], d["x0"], d["noise"], d["t"], d["advantages"],
                                           v_ref=d["v_ref"], impl=impl, **kw)
    (grad,) = torch.autograd.grad(loss, v, g)
    return loss, metrics, grad


def _options(algo, with_ref, with_old):
    """nft with b = 0.4 (not 1, so the blend is exercised); awm with the EMA-policy KL where v_old is given."""
    return dict(algo=algo, beta_kl=0.05 if with_ref else 0.0, nft_beta=0.4 if algo == "nft" else 1.0, adv_clip=5.0,
                awm_power=0.25, beta_old=0.7 if algo == "awm" and with_old else 0.0)


def _check(d, kw, impl, *, atol_loss=2e-6, atol_grad=2e-6):
    g = torch.tensor(0.5 + torch.rand(()).item())
    args = (d["v"], d["v_old"], d["x0"], d["noise"], d["t"], d["advantages"])
    full = dict(v_ref=d["v_ref"], beta_kl=0.0, nft_beta=1.0, adv_clip=5.0, awm_power=0.25, beta_old=0.0)
    full.update(kw)
    o_loss, o_met, o_grad = _formula(*args, **full, dtype=torch.float64)
    b_loss, b_met, b_grad = _formula(*args, **full, dtype=d["v"].dtype)
    loss, met, grad = _run(d, impl, g, **kw)
    assert loss.dtype == torch.float32 and loss.ndim == 0 and set(met) == set(o_met)
    assert_close_rule(loss, o_loss, b_loss, atol=atol_loss, name="loss")
    for k in o_met:
        assert met[k].dtype == torch.float32 and met[k].ndim == 0, k
        assert_close_rule(met[k], o_met[k], b_met[k], atol=atol_loss, name=k)
    assert grad.dtype == d["v"].dtype and grad.shape == d["v"].shape
    assert_close_rule(grad, g.double() * o_grad, g.double() * b_grad, atol=atol_grad, name="dL/dv")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_matches_fp64_oracle(algo, shape, dtype, impl):
    d = _inputs(shape, dtype)
    _check(d, _options(algo, True, True), impl)


TERMS = {"nft-no_ref": ("nft", False, True), "awm-no_ref": ("awm", False, True), "awm-ref_only": ("awm", True, False),
         "awm-nothing": ("awm", False, False)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", TERMS.values(), ids=TERMS.keys())
def test_optional_terms(case, impl):
    """Without v_ref (no KL), and for awm with and without v_old / beta_old (nft always needs v_old)."""
    algo, with_ref, with_old = case
    d = _inputs((6, 3, 9, 10), torch.float32, v_ref=with_ref, v_old=with_old)
    _check(d, _options(algo, with_ref, with_old), impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_nft_weight_floor(impl):
    """Every row at t = 1e-6: mean |x0 error| ~ 1e-6 < 1e-5, so DiffusionNFT's floor sets both weights."""
    d = _inputs((4, 3, 8, 8), torch.float32)
    d["t"] = torch.full((4,), 1e-6)
    kw = _options("nft", True, True)
    _check(d, kw, impl)
    _, met, _ = _run(d, impl, torch.tensor(1.0), **kw)
    u = (d["noise"] - d["x0"]).reshape(4, -1).double()
    vp = 0.4 * d["v"].reshape(4, -1).double() + 0.6 * d["v_old"].reshape(4, -1).double()
    ep = 1e-6 * (u - vp)
    assert (ep.abs().mean(1) < 1e-5).all()
    torch.testing.assert_close(met["positive_loss"].double(), ((ep * ep).mean(1) / 1e-5).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_all_zero_advantages(algo, impl):
    """A flat group (A = 0 everywhere): awm's policy term and its gradient vanish, nft weighs both halves by 1/2."""
    d = _inputs((5, 4, 8, 8), torch.float32)
    d["advantages"] = torch.zeros(5)
    kw = _options(algo, True, True)
    _check(d, kw, impl)
    loss, met, _ = _run(d, impl, torch.tensor(1.0), **kw)
    if algo == "awm":
        assert met["policy_loss"].item() == 0.0
    else:
        expect = 5.0 * 0.5 * (met["positive_loss"] + met["negative_loss"]) / 0.4
        torch.testing.assert_close(met["policy_loss"], expect, rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_non_contiguous_inputs(algo, impl):
    """Latents as strided views (a transposed latent part, every other row of a larger batch) and strided t / A."""
    base = _inputs((8, 5, 6, 7), torch.bfloat16)
    d = {k: (None if x is None else x.transpose(-1, -2)) for k, x in base.items() if k not in ("t", "advantages")}
    d["noise"] = torch.randn(16, 5, 7, 6).to(torch.bfloat16)[::2]
    tt, aa = torch.rand(16) * 0.9 + 0.05, 4 * torch.randn(16)
    d["t"], d["advantages"] = tt[::2], aa[::2]
    assert not d["v"].is_contiguous() and not d["t"].is_contiguous()
    _check(d, _options(algo, True, True), impl)
    contiguous = {k: (None if x is None else x.contiguous()) for k, x in d.items()}
    g = torch.tensor(1.0)
    a, b = _run(d, impl, g, **_options(algo, True, True)), _run(contiguous, impl, g, **_options(algo, True, True))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_empty_batch(algo, impl):
    d = _inputs((0, 3, 4, 4), torch.float32)
    v = d["v"].clone().requires_grad_()
    loss, met = U.forward_process_loss(v, d["v_old"], d["x0"], d["noise"], d["t"], d["advantages"],
                                       v_ref=d["v_ref"], impl=impl, **_options(algo, True, True))
    loss.backward()
    assert loss.item() == 0.0 and all(x.item() == 0.0 for x in met.values())
    assert v.grad is not None and v.grad.shape == v.shape and "policy_loss" in met


@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_one_launch_per_call_and_none_in_backward(algo, monkeypatch):
    """The forward is one Triton launch (loss, metrics and dL/dv); backward launches no Triton kernel."""
    launches = []
    kernel = K._forward_loss_fwd_kernel
    real = type(kernel).__getitem__

    def counting(self, grid):
        launches.append(grid)
        return real(self, grid)
    monkeypatch.setattr(type(kernel), "__getitem__", counting)
    d = _inputs((5, 4, 20, 20), torch.float32)
    v = d["v"].clone().requires_grad_()
    loss, _ = U.forward_process_loss(v, d["v_old"], d["x0"], d["noise"], d["t"], d["advantages"], v_ref=d["v_ref"],
                                     impl="triton", **_options(algo, True, True))
    assert launches == [(5,)]
    loss.backward()
    assert launches == [(5,)]
    U.forward_process_loss(v, d["v_old"], d["x0"], d["noise"], d["t"], d["advantages"], v_ref=d["v_ref"],
                           impl="reference", **_options(algo, True, True))
    assert len(launches) == 1


@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_no_grad_call_skips_the_gradient(algo):
    d = _inputs((4, 3, 8, 8), torch.float32)
    args = (d["v"], d["v_old"], d["x0"], d["noise"], d["t"], d["advantages"])
    with torch.no_grad():
        loss, met = U.forward_process_loss(*args, v_ref=d["v_ref"], impl="triton", **_options(algo, True, True))
    ref, _ = U.forward_process_loss(*args, v_ref=d["v_ref"], impl="reference", **_options(algo, True, True))
    assert_close_rule(loss, ref, atol=2e-6)
    assert set(met) == {"policy_loss", "kl_loss", "old_deviate"} | set(
        ["positive_loss", "negative_loss"] if algo == "nft" else ["matching_mse"])
    assert loss.grad_fn is None


def test_only_v_gets_a_gradient():
    d = _inputs((3, 2, 6, 6), torch.float32)
    ins = {k: (x.clone().requires_grad_() if k in ("v", "v_old", "x0", "noise", "v_ref", "t") else x)
           for k, x in d.items()}
    for impl in IMPLS:
        loss, _ = U.forward_process_loss(ins["v"], ins["v_old"], ins["x0"], ins["noise"], ins["t"],
                                         ins["advantages"], v_ref=ins["v_ref"], impl=impl, beta_kl=0.1)
        grads = torch.autograd.grad(loss, [ins[k] for k in ("v", "v_old", "x0", "noise", "v_ref", "t")],
                                    allow_unused=True)
        assert grads[0] is not None and all(gr is None for gr in grads[1:]), impl


def test_fp16_gradient_kept_in_fp32_until_scaled():
    """A loss scaler's factor is applied to the saved gradient: fp16 v gets its dL/dv rounded once, after scaling
    (saved in fp16 the mean over 2^16 elements would flush to zero first)."""
    d = _inputs((2, 4, 128, 128), torch.float16)
    g = torch.tensor(65536.0)
    _, _, grad = _run(d, "triton", g, **_options("awm", True, True))
    _, _, ref = _run(d, "reference", g, **_options("awm", True, True))
    assert grad.dtype == torch.float16 and (grad != 0).float().mean() > 0.99
    assert rel_err(grad, ref) < 2e-3


def test_compile_fullgraph_and_opcheck():
    d = _inputs((3, 2, 5, 6), torch.float32)

    def f(v):
        loss, met = U.forward_process_loss(v, d["v_old"], d["x0"], d["noise"], d["t"], d["advantages"],
                                           v_ref=d["v_ref"], beta_kl=0.1, impl="triton")
        return loss, met["old_deviate"]
    v = d["v"].clone().requires_grad_()
    lc, oc = torch.compile(f, fullgraph=True, backend="aot_eager")(v)
    (gc,) = torch.autograd.grad(lc, v)
    le, oe = f(v)
    (ge,) = torch.autograd.grad(le, v)
    torch.testing.assert_close((lc, oc, gc), (le, oe, ge))
    args = (v, d["v_old"], d["x0"], d["noise"], d["v_ref"], d["t"], d["advantages"], "awm", 1.0, 5.0, 0.25, 0.1,
            0.2, True)
    result = torch.library.opcheck(torch.ops.unirl_fast.forward_process_loss.default, args)
    assert all(r == "SUCCESS" for r in result.values()), result


def _bad(**change):
    d = _inputs((3, 2, 4, 4), torch.float32)
    kw = dict(algo="nft", v_ref=d.pop("v_ref"))
    for k, x in change.items():
        (d if k in d else kw)[k] = x
    return lambda: U.forward_process_loss(d["v"], d["v_old"], d["x0"], d["noise"], d["t"], d["advantages"], **kw)


BAD = [
    ("unknown algo", _bad(algo="grpo"), ValueError, "algo='grpo'"),
    ("nft without v_old", _bad(v_old=None), ValueError, "v_old"),
    ("awm beta_old without v_old", _bad(algo="awm", v_old=None, beta_old=0.5), ValueError, "beta_old=0.5"),
    ("nft beta_old", _bad(beta_old=0.5), ValueError, "beta_old=0.5"),
    ("beta_kl without v_ref", _bad(v_ref=None, beta_kl=0.1), ValueError, "beta_kl=0.1"),
    ("nft_beta 0", _bad(nft_beta=0.0), ValueError, "nft_beta"),
    ("adv_clip negative", _bad(adv_clip=-1.0), ValueError, "adv_clip"),
    ("awm_power 0", _bad(algo="awm", awm_power=0.0), ValueError, "awm_power"),
    ("beta_kl nan", _bad(beta_kl=float("nan")), ValueError, "beta_kl"),
    ("x0 shape", _bad(x0=torch.randn(3, 2, 4, 5)), ValueError, "x0"),
    ("v_ref shape", _bad(v_ref=torch.randn(3, 2, 4, 5)), ValueError, "v_ref"),
    ("v rank 1", _bad(v=torch.randn(3), v_old=torch.randn(3), x0=torch.randn(3), noise=torch.randn(3),
                      v_ref=torch.randn(3)), ValueError, "v must have rank"),
    ("integer noise", _bad(noise=torch.zeros(3, 2, 4, 4, dtype=torch.long)), TypeError, "noise"),
    ("t length", _bad(t=torch.full((4,), 0.5)), ValueError, "t has shape"),
    ("t zero", _bad(t=torch.tensor([0.5, 0.0, 0.5])), ValueError, "t must be in (0, 1]"),
    ("t above one", _bad(t=torch.tensor([0.5, 1.5, 0.5])), ValueError, "t must be in (0, 1]"),
    ("advantages inf", _bad(advantages=torch.tensor([0.0, float("inf"), 1.0])), ValueError, "advantages"),
    ("advantages rank", _bad(advantages=torch.zeros(3, 1)), ValueError, "advantages"),
    ("tensor beta", _bad(beta_kl=torch.tensor(0.1)), TypeError, "beta_kl"),
    ("impl", _bad(impl="cuda"), ValueError, "impl"),
    ("nan in v", _bad(v=torch.full((3, 2, 4, 4), float("nan"))), ValueError, "not finite"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(case):
    _, call, exc, fragment = case
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("lat", [(16, 64, 64), (32, 16, 16)], ids=["sd3", "dcae"])
@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_bench_shapes_gpu(algo, lat):
    """The docs/benchmarks.md shapes on the GPU (N = 32 x 10 rows, bf16): D = 65536 streams a head and re-reads it,
    D = 8192 stays in registers."""
    torch.set_default_device("cuda")
    try:
        d = _inputs((320,) + lat, torch.bfloat16)
    finally:
        torch.set_default_device(None)
    g = torch.tensor(0.7, device="cuda")
    kw = _options(algo, True, True)
    ours, ref = _run(d, "triton", g, **kw), _run(d, "reference", g, **kw)
    assert_close_rule(ours[0], ref[0], atol=1e-5, name="loss")
    for k in ref[1]:
        assert_close_rule(ours[1][k], ref[1][k], atol=1e-5, name=k)
    assert_close_rule(ours[2], ref[2], atol=8e-3, name="dL/dv (bf16)")
