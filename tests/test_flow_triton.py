"""Flow-GRPO Triton kernels (impl="triton") against the fp32 reference ops.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), where the launchers use BLOCK <= 256 and
few programs so that the small awkward shapes here still split a sample into several chunks and loop inside a chunk.
The fp32 reference is the oracle; both sides do the same fp32 math on the same upcast inputs, so the bound is an
absolute relative error (`assert_close_rule` with no baseline) set by fp32 reassociation of the sums.
GPU tests at the docs/benchmarks.md shapes are marked `gpu`.
"""
from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_rule

import unirl_fast as U

SHAPES = {"B3x5x7x11": (3, 5, 7, 11), "B5x3x17x19": (5, 3, 17, 19)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(shape, dtype, device, lead=None):
    lead = lead or shape[:1]
    full = tuple(lead) + tuple(shape[1:])
    x = torch.randn(full, device=device).to(dtype)
    v = torch.randn(full, device=device).to(dtype)
    noise = torch.randn(full, device=device).to(dtype)
    return v, x, noise


def _sigmas(lead, device, first_is_one=False):
    """Per-sample sigmas in (0.15, 0.95), sigma_next a random fraction below."""
    sig = 0.15 + 0.8 * torch.rand(lead, device=device)
    if first_is_one:
        sig.view(-1)[0] = 1.0
    nxt = sig * (0.3 + 0.6 * torch.rand(lead, device=device))
    return sig, nxt


def _both(fn, *args, **kw):
    return fn(*args, impl="triton", **kw), fn(*args, impl="reference", **kw)


def _check_step(ours, ref, atol=3e-6):
    for name, a, b in zip(("next_sample", "logp", "mean", "std"), ours, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert_close_rule(a, b, atol=atol, name=name)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("sde", ["sde", "cps", "ode"])
def test_step_per_sample_sigmas(sde, shape, dtype, device):
    v, x, noise = _inputs(shape, dtype, device)
    sig, nxt = _sigmas(shape[:1], device, first_is_one=sde == "sde")
    kw = dict(noise=noise, sde=sde, noise_level=0.7 if sde != "cps" else 0.5, sigma_max=0.96 if sde == "sde" else None)
    _check_step(*_both(U.flow_sde_step, v, x, sig, nxt, **kw))


@pytest.mark.parametrize("sde", ["sde", "cps", "ode"])
def test_step_float_sigmas_and_generator(sde, device):
    v, x, _ = _inputs((4, 3, 9, 10), torch.float32, device)
    outs = []
    for impl in ("triton", "reference"):
        gen = torch.Generator(device=device).manual_seed(7)
        outs.append(U.flow_sde_step(v, x, 0.62, 0.41, generator=gen, sde=sde, impl=impl))
    _check_step(*outs)


@pytest.mark.parametrize("sde", ["sde", "ode"])
def test_first_step_sigma_one_needs_sigma_max(sde, device):
    v, x, noise = _inputs((3, 4, 8, 9), torch.bfloat16, device)
    sig = torch.tensor([1.0, 1.0, 0.7], device=device)
    nxt = torch.tensor([0.96, 0.9, 0.5], device=device)
    smax = torch.tensor([0.96, 0.9, 0.9], device=device)
    _check_step(*_both(U.flow_sde_step, v, x, sig, nxt, noise=noise, sde=sde, sigma_max=smax))
    if sde == "sde":
        with pytest.raises(ValueError, match="sigma_max"):
            U.flow_sde_step(v, x, sig, nxt, noise=noise, sde=sde, impl="triton")


@pytest.mark.parametrize("sde", ["sde", "ode"])
def test_last_step_sigma_next_zero(sde, device):
    v, x, noise = _inputs((3, 4, 8, 9), torch.float32, device)
    sig = torch.tensor([0.1, 0.3, 0.05], device=device)
    ours, ref = _both(U.flow_sde_step, v, x, sig, 0.0, noise=noise, sde=sde)
    _check_step(ours, ref)
    if sde == "sde":
        assert torch.isfinite(ours[1]).all()
        lp = U.flow_step_logprob(v, x, ours[0], sig, 0.0, impl="triton")
        assert_close_rule(lp, ref[1], atol=3e-6, name="recomputed logp")


def test_cps_last_step_raises(device):
    v, x, noise = _inputs((2, 4, 8, 8), torch.float32, device)
    sig = torch.tensor([0.2, 0.1], device=device)
    with pytest.raises(ValueError, match="zero-variance"):
        U.flow_sde_step(v, x, sig, 0.0, noise=noise, sde="cps", impl="triton")
    with pytest.raises(ValueError, match="zero-variance"):
        U.flow_step_logprob(v, x, x, sig, torch.tensor([0.1, 0.0], device=device), sde="cps", impl="triton")


@pytest.mark.parametrize("sde", ["sde", "cps"])
def test_replay_equals_loop_of_steps(sde, device):
    T, B, lat = 3, 4, (3, 10, 11)
    v, x, noise = _inputs((B,) + lat, torch.bfloat16, device, lead=(T, B))
    sig, nxt = _sigmas((T, B), device, first_is_one=sde == "sde")
    kw = dict(sde=sde, sigma_max=0.97 if sde == "sde" else None)
    rep = U.flow_sde_step(v, x, sig, nxt, noise=noise, impl="triton", **kw)
    _check_step(rep, U.flow_sde_step(v, x, sig, nxt, noise=noise, impl="reference", **kw))
    vg = v.float().requires_grad_()
    lp_rep = U.flow_step_logprob(vg, x, rep[0], sig, nxt, impl="triton", **kw)
    g = torch.randn(T, B, device=device)
    (dv_rep,) = torch.autograd.grad(lp_rep, vg, g)
    for t in range(T):
        one = U.flow_sde_step(v[t], x[t], sig[t], nxt[t], noise=noise[t], impl="triton", **kw)
        for name, a, b in zip(("next_sample", "logp", "mean", "std"), rep, one):
            if name == "logp":  # a different chunking of the same sum: equal up to fp32 reassociation
                assert_close_rule(a[t], b, atol=1e-6, name=f"replay {name} t={t}")
            else:  # elementwise: bit-identical
                assert torch.equal(a[t], b), f"replay {name} differs at t={t}"
        vt = v[t].float().requires_grad_()
        lp_t = U.flow_step_logprob(vt, x[t], rep[0][t], sig[t], nxt[t], impl="triton", **kw)
        assert torch.equal(torch.autograd.grad(lp_t, vt, g[t])[0], dv_rep[t])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("sde", ["sde", "cps"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["step", "replay"])
def test_logprob_grad_vs_reference(lead, sde, dtype, device):
    v, x, noise = _inputs((lead[-1], 3, 17, 19), dtype, device, lead=lead)
    sig, nxt = _sigmas(lead, device, first_is_one=sde == "sde")
    kw = dict(sde=sde, sigma_max=0.95 if sde == "sde" else None, noise_level=0.8)
    nxt_sample = U.flow_sde_step(v, x, sig, nxt, noise=noise, impl="reference", **kw)[0]
    nxt_sample = nxt_sample + 0.05 * torch.randn_like(nxt_sample)  # a policy that moved: nonzero gradients
    g = torch.randn(lead, device=device)
    res = {}
    for impl in ("triton", "reference"):
        vg = v.clone().requires_grad_()
        lp = U.flow_step_logprob(vg, x, nxt_sample, sig, nxt, impl=impl, **kw)
        (dv,) = torch.autograd.grad(lp, vg, g)
        res[impl] = (lp, dv)
    assert res["triton"][1].dtype == dtype
    assert_close_rule(res["triton"][0], res["reference"][0], atol=3e-6, name="logp")
    assert_close_rule(res["triton"][1], res["reference"][1], atol=1e-5 if dtype == torch.float32 else 8e-3,
                      name="dlogp/dv")


def test_noncontiguous_inputs(device):
    v, x, noise = _inputs((4, 6, 9, 7), torch.float32, device)
    v_nc, x_nc = v.transpose(2, 3), x.transpose(2, 3)  # latent part not contiguous: the launcher copies
    sig, nxt = _sigmas((4,), device)
    _check_step(*_both(U.flow_sde_step, v_nc, x_nc, sig, nxt, noise=noise.transpose(2, 3)))
    big = torch.randn(4, 2, 6, 9, 7, device=device)
    v_rows = big[:, 1]  # row stride != D: read in place
    _check_step(*_both(U.flow_sde_step, v_rows, x, sig, nxt, noise=noise))


def test_step_is_deterministic(device):
    v, x, noise = _inputs((5, 3, 17, 19), torch.bfloat16, device)
    sig, nxt = _sigmas((5,), device)
    a = U.flow_sde_step(v, x, sig, nxt, noise=noise, impl="triton")
    b = U.flow_sde_step(v, x, sig, nxt, noise=noise, impl="triton")
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def _loss_inputs(lead, lat, device, dtype=torch.float32):
    logp = (torch.randn(lead, device=device) * 0.3 - 2.0).requires_grad_()
    delta = 2e-4 * torch.randn(lead, device=device)  # ratios straddle 1 +- clip (clip_range 1e-4)
    delta.view(-1)[:2] = torch.tensor([5e-5, -4e-4])  # at least one step inside and one outside the clip range
    old = logp.detach() + delta
    adv = torch.randn(lead[-1], device=device)
    v = torch.randn(tuple(lead) + lat, device=device).to(dtype).requires_grad_()
    v_ref = v.detach() + 0.1 * torch.randn_like(v)
    mean = torch.randn(tuple(lead) + lat, device=device).to(dtype).requires_grad_()
    mean_ref = mean.detach() + 0.05 * torch.randn_like(mean)
    std = 0.05 + 0.2 * torch.rand(lead, device=device)
    return logp, old, adv, v, v_ref, mean, mean_ref, std


def _policy_loss_fp64(logp, old, adv, v, v_ref, mean, mean_ref, std, clip, beta_v, beta_kl):
    """FORMULAS.md section 5 in fp64: the oracle both the kernel and the fp32 reference are measured against."""
    lr = logp.double() - old.double()
    r = lr.exp()
    A = adv.double().expand_as(r)
    pg = torch.maximum(-A * r, -A * r.clamp(1 - clip, 1 + clip)).mean()
    mse = ((v.double() - v_ref.double()) ** 2).mean()
    s = torch.as_tensor(std, dtype=torch.float64, device=logp.device)
    s = s.reshape(s.shape + (1,) * (mean.ndim - s.ndim))
    kl = ((mean.double() - mean_ref.double()) ** 2 / (2 * s * s)).mean()
    metrics = {"pg_loss": pg, "clip_frac": ((r - 1).abs() > clip).double().mean(), "ratio_mean": r.mean(),
               "approx_kl": 0.5 * (lr * lr).mean(), "velocity_mse": mse, "latent_kl": kl}
    return pg + beta_v * mse + beta_kl * kl, metrics


@pytest.mark.parametrize("std_kind", ["tensor", "float"])
@pytest.mark.parametrize("lead", [(6,), (3, 5)], ids=["B6", "T3xB5"])
def test_policy_loss_vs_reference(lead, std_kind, device):
    """err(triton) <= 2 err(fp32 reference) + atol, both against fp64; the pg mean cancels, so fp32 matters."""
    logp, old, adv, v, v_ref, mean, mean_ref, std = _loss_inputs(lead, (3, 11, 13), device)
    std = std if std_kind == "tensor" else 0.13
    g = torch.rand((), device=device) + 0.5
    kw = dict(clip_range=1e-4, velocity=v, ref_velocity=v_ref, beta_velocity=0.3, mean=mean, ref_mean=mean_ref,
              std=std, beta_kl=0.02)
    res = {}
    for impl in ("triton", "reference"):
        loss, metrics = U.flow_policy_loss(logp, old, adv, impl=impl, **kw)
        res[impl] = (loss, metrics, torch.autograd.grad(loss, (logp, v, mean), g))
    loss64, m64 = _policy_loss_fp64(logp, old, adv, v, v_ref, mean, mean_ref, std, 1e-4, 0.3, 0.02)
    g64 = torch.autograd.grad(loss64, (logp, v, mean), g.double())
    (lo, mo, go), (lr, mr, gr) = res["triton"], res["reference"]
    assert_close_rule(lo, loss64, lr, atol=1e-6, name="loss")
    assert set(mo) == set(mr) == set(m64)
    assert 0 < mr["clip_frac"] < 1, "inputs should exercise both clipped and unclipped steps"
    for k in mr:
        assert_close_rule(mo[k], m64[k], mr[k], atol=1e-6, name=k)
    for name, a, b, c in zip(("dlogp", "dvelocity", "dmean"), go, gr, g64):
        assert a.dtype == b.dtype
        assert_close_rule(a, c, b, atol=1e-6, name=name)


def test_policy_loss_bf16_and_zero_betas(device):
    logp, old, adv, v, v_ref, mean, mean_ref, std = _loss_inputs((2, 4), (5, 6), device, dtype=torch.bfloat16)
    res = {}
    for impl in ("triton", "reference"):
        loss, metrics = U.flow_policy_loss(logp, old, adv, velocity=v, ref_velocity=v_ref, beta_velocity=0.5,
                                           mean=mean, ref_mean=mean_ref, std=std, beta_kl=0.0, impl=impl)
        dl, dv, dm = torch.autograd.grad(loss, (logp, v, mean), allow_unused=True)
        res[impl] = (loss, metrics, dl, dv, dm)
    o, r = res["triton"], res["reference"]
    assert r[4] is None and o[4] is None, "beta_kl=0: no gradient to mean"
    assert_close_rule(o[0], r[0], atol=2e-6, name="loss")
    assert_close_rule(o[1]["latent_kl"], r[1]["latent_kl"], atol=2e-6, name="latent_kl metric")
    assert_close_rule(o[2], r[2], atol=2e-6, name="dlogp")
    assert o[3].dtype == torch.bfloat16
    assert_close_rule(o[3], r[3], atol=8e-3, name="dvelocity (bf16)")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.gpu)])
def test_compile_fullgraph_traces_custom_ops(backend, device):
    """aot_eager runs dynamo + fake tensors + AOT autograd over the custom ops (no codegen, so fast on CPU);
    inductor (GPU only) also compiles the glue around them."""
    v, x, noise = _inputs((3, 4, 6, 5), torch.float32, device)
    sig, nxt = _sigmas((3,), device)
    old, adv = torch.randn(3, device=device) - 2, torch.randn(3, device=device)

    def train_step(v, x, noise, sig, nxt, old, adv):
        nxt_sample, _, _, _ = U.flow_sde_step(v.detach(), x, sig, nxt, noise=noise, impl="triton")
        lp = U.flow_step_logprob(v, x, nxt_sample, sig, nxt, impl="triton")
        loss, _ = U.flow_policy_loss(lp, old, adv, velocity=v, ref_velocity=v.detach() * 0.9, beta_velocity=0.1,
                                     impl="triton")
        return loss

    compiled = torch.compile(train_step, fullgraph=True, backend=backend)
    vc, ve = v.clone().requires_grad_(), v.clone().requires_grad_()
    lc, le = compiled(vc, x, noise, sig, nxt, old, adv), train_step(ve, x, noise, sig, nxt, old, adv)
    lc.backward()
    le.backward()
    assert_close_rule(lc, le, atol=1e-6, name="compiled loss")
    assert_close_rule(vc.grad, ve.grad, atol=1e-6, name="compiled dv")


def test_custom_ops_opcheck(device):
    """Schema, fake-tensor, autograd-registration and AOT-dispatch checks of every registered custom op."""
    x = torch.randn(3, 4, 5, 6, device=device)
    v = torch.randn_like(x).requires_grad_()
    noise = torch.randn_like(x)
    sig = 0.4 + 0.5 * torch.rand(3, device=device)
    smax = torch.full((3,), 0.95, device=device)
    lp = torch.randn(2, 3, device=device, requires_grad=True)
    vv = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    ops = torch.ops.unirl_fast
    cases = [
        (ops.flow_sde_step.default, (v.detach(), x, noise, sig, sig - 0.2, smax, 0.7, 0, 1, False)),
        (ops.flow_sde_step.default, (v.detach(), x, None, sig, sig - 0.2, None, 0.0, 2, 1, False)),
        (ops.flow_step_logprob.default, (v, x, x + 0.1 * noise, sig, sig - 0.2, None, 0.7, 1, 1, False)),
        (ops.flow_step_logprob.default, (v, x, x + 0.1 * noise, sig, sig - 0.2, None, 0.7, 1, 1, True)),
        (ops.flow_policy_loss.default, (lp, lp.detach() + 1e-4, torch.randn(3, device=device), vv,
                                        vv.detach() * 0.5, vv, vv.detach() * 0.9, torch.rand(2, 3, device=device) + 0.1,
                                        1e-4, 0.1, 0.2)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.gpu
@pytest.mark.parametrize("lat", [(16, 64, 64), (32, 16, 16)], ids=["sd3", "dcae"])
@pytest.mark.parametrize("T", [1, 10], ids=["step", "replay10"])
def test_bench_shapes_gpu(T, lat):
    dev = torch.device("cuda")
    lead = (32,) if T == 1 else (T, 32)
    v, x, noise = _inputs((32,) + lat, torch.bfloat16, dev, lead=lead)
    sig, nxt = _sigmas(lead, dev, first_is_one=True)
    kw = dict(sigma_max=0.97)
    ours, ref = _both(U.flow_sde_step, v, x, sig, nxt, noise=noise, **kw)
    _check_step(ours, ref, atol=1e-5)
    g = torch.randn(lead, device=dev)
    res = {}
    for impl in ("triton", "reference"):
        vg = v.clone().requires_grad_()
        lp = U.flow_step_logprob(vg, x, ref[0] + 0.05 * noise.float(), sig, nxt, impl=impl, **kw)
        res[impl] = (lp, torch.autograd.grad(lp, vg, g)[0])
    assert_close_rule(res["triton"][0], res["reference"][0], atol=1e-5, name="logp")
    assert_close_rule(res["triton"][1], res["reference"][1], atol=8e-3, name="dlogp/dv")


_SM90_SCRIPT = r'''
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unirl_fast.kernels import flow as K, flow_loss as KL

BF16 = ("p_v", "p_x", "p_eps", "p_dv", "p_vref", "p_mean", "p_mref", "p_dmean")
FP = {"a", "sin_a", "sq_err", "clip", "beta_v", "beta_kl", "inv_numel_v", "inv_numel_k", "scale_v", "scale_k"}
DIV16 = ("D", "chunk_len", "D_v", "D_k", "chunk_v", "chunk_k")
jobs = [(K._flow_sde_step_fwd_kernel, dict(KIND=k, HAS_SMAX=True, BLOCK=2048, CMAX=4), 3 if k < 2 else 2)
        for k in (0, 1, 2)]
jobs += [(K._flow_step_logprob_fwd_kernel, dict(KIND=k, HAS_SMAX=False, BLOCK=2048, CMAX=4), 3) for k in (0, 1)]
jobs += [(K._flow_step_logprob_bwd_kernel, dict(KIND=k, HAS_SMAX=False, BLOCK=2048), 3) for k in (0, 1)]
jobs += [(KL._flow_policy_loss_fwd_kernel, dict(BLOCK=2048, BLOCK_M=512), 4),
         (KL._flow_policy_loss_combine_kernel, dict(BLOCK=128), 0),
         (KL._flow_policy_loss_bwd_kernel, dict(HAS_DLOGP=True, BLOCK=2048, BLOCK_M=512), 4)]
for fn, consts, min_v4 in jobs:
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else ("*bf16" if n in BF16 else "*fp32") if n.startswith("p_")
           else "fp32" if n in FP else "i32" for n in names}
    div = [n for n in names if sig[n].startswith("*") or (sig[n] == "i32" and (n.startswith("stride") or n in DIV16))]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    v4 = ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4")
    if v4 < min_v4:
        sys.exit(f"{fn.fn.__name__} {consts}: {v4} 128-bit loads, expected >= {min_v4}")
print("ok", len(jobs))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_vector_loads(tmp_path):
    """Compile every kernel ahead of time for sm_90 (no GPU needed: Triton's bundled ptxas) in a fresh process
    without the interpreter, with the divisibility Triton infers at the standard shapes, and require 128-bit loads."""
    import os
    import subprocess
    import sys

    script = tmp_path / "sm90.py"
    script.write_text(_SM90_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]
