"""Reference Flow-GRPO step, step log-prob and flow loss (FORMULAS.md sections 4-5) against a
per-sample scalar oracle in fp64."""
import math

import pytest
import torch

import unirl_fast as U


def step_oracle(v, x, eps, sig, nxt, a, sde, sig_max):
    """One sample, fp64, straight from FORMULAS.md section 4."""
    v, x, eps = v.double(), x.double(), eps.double()
    dt = nxt - sig
    if sde == "ode":
        return x + v * dt, None
    if sde == "sde":
        sp = sig_max if sig == 1.0 else sig
        std_t = a * math.sqrt(sig / (1 - sp))
        mean = x * (1 + std_t ** 2 / (2 * sig) * dt) + v * (1 + std_t ** 2 * (1 - sig) / (2 * sig)) * dt
        s = std_t * math.sqrt(-dt)
    else:
        s = nxt * math.sin(a * math.pi / 2)
        x0, x1 = x - sig * v, x + (1 - sig) * v
        mean = x0 * (1 - nxt) + x1 * math.sqrt(nxt ** 2 - s ** 2)
    nx = mean + s * eps
    lp = (-(nx - mean) ** 2 / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)).mean()
    return nx, lp


SIGMAS = [[1.0, 0.9, 0.55, 0.2], [0.9, 0.6, 0.3, 0.0]]  # first step (sigma == 1) and last step (sigma_next == 0)


@pytest.mark.parametrize("sde", ["sde", "cps", "ode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_oracle_per_sample_sigmas(sde, dtype):
    B = 4
    sig = torch.tensor(SIGMAS[0])
    nxt = torch.tensor(SIGMAS[1]) if sde != "cps" else torch.tensor([0.9, 0.6, 0.3, 0.05])
    x = torch.randn(B, 3, 5, 6).to(dtype)
    v = torch.randn(B, 3, 5, 6).to(dtype)
    eps = torch.randn(B, 3, 5, 6)
    nx, lp, mean, std = U.flow_sde_step(v, x, sig, nxt, noise=eps, sde=sde, sigma_max=0.95, impl="reference")
    assert nx.dtype == torch.float32 and mean.dtype == torch.float32 and std.shape == (B,)
    for i in range(B):
        want_nx, want_lp = step_oracle(v[i], x[i], eps[i], sig[i].item(), nxt[i].item(), 0.7, sde, 0.95)
        torch.testing.assert_close(nx[i].double(), want_nx, rtol=1e-5, atol=1e-5)
        if sde == "ode":
            assert lp is None and std[i] == 0
        else:
            torch.testing.assert_close(lp[i].double(), want_lp, rtol=1e-5, atol=1e-5)


def test_scalar_sigmas_and_generator_reproducible():
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = U.flow_sde_step(v, x, 0.8, 0.6, generator=g1)
    b = U.flow_sde_step(v, x, 0.8, 0.6, generator=g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("sde", ["sde", "cps"])
def test_logprob_recompute_equals_rollout_and_grad(sde):
    B = 3
    sig, nxt = torch.tensor([0.9, 0.7, 0.5]), torch.tensor([0.8, 0.5, 0.2])
    x, v = torch.randn(B, 2, 4, 4), torch.randn(B, 2, 4, 4)
    nx, lp, _, _ = U.flow_sde_step(v, x, sig, nxt, sde=sde)
    v_req = v.clone().requires_grad_()
    lp2 = U.flow_step_logprob(v_req, x, nx, sig, nxt, sde=sde)
    torch.testing.assert_close(lp2, lp, rtol=1e-5, atol=1e-5)
    g = torch.randn(B)
    (lp2 * g).sum().backward()
    v64 = v.double().requires_grad_()
    total = 0
    for i in range(B):  # fp64 recompute of the same transition through the mean only
        dt = nxt[i].item() - sig[i].item()
        if sde == "sde":
            std_t = 0.7 * math.sqrt(sig[i].item() / (1 - sig[i].item()))
            mean = x[i].double() * (1 + std_t ** 2 / (2 * sig[i].item()) * dt) + \
                v64[i] * (1 + std_t ** 2 * (1 - sig[i].item()) / (2 * sig[i].item())) * dt
            s = std_t * math.sqrt(-dt)
        else:
            s = nxt[i].item() * math.sin(0.7 * math.pi / 2)
            mean = (x[i].double() - sig[i].item() * v64[i]) * (1 - nxt[i].item()) + \
                (x[i].double() + (1 - sig[i].item()) * v64[i]) * math.sqrt(nxt[i].item() ** 2 - s ** 2)
        total = total + g[i].double() * (-(nx[i].double() - mean) ** 2 / (2 * s * s)).mean()
    total.backward()
    torch.testing.assert_close(v_req.grad.double(), v64.grad, rtol=1e-4, atol=1e-7)


def test_replay_equals_loop_of_single_steps():
    T, B = 3, 2
    sig = torch.tensor([[1.0, 0.9], [0.8, 0.7], [0.5, 0.4]])
    nxt = sig - 0.1
    x, v, eps = torch.randn(T, B, 2, 4, 4), torch.randn(T, B, 2, 4, 4), torch.randn(T, B, 2, 4, 4)
    nx, lp, mean, std = U.flow_sde_step(v, x, sig, nxt, noise=eps, sigma_max=0.95)
    assert lp.shape == (T, B) and std.shape == (T, B)
    lp_re = U.flow_step_logprob(v, x, nx, sig, nxt, sigma_max=0.95)
    for t in range(T):
        nx_t, lp_t, _, _ = U.flow_sde_step(v[t], x[t], sig[t], nxt[t], noise=eps[t], sigma_max=0.95)
        torch.testing.assert_close(nx[t], nx_t)
        torch.testing.assert_close(lp[t], lp_t)
        torch.testing.assert_close(lp_re[t], lp_t, rtol=1e-5, atol=1e-5)


def test_cps_last_step_logprob_is_a_clear_error():
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="zero-variance"):
        U.flow_step_logprob(v, x, x, 0.2, 0.0, sde="cps")
    with pytest.raises(ValueError, match="zero-variance"):
        U.flow_sde_step(v, x, 0.2, 0.0, sde="cps")
    nx, lp, _, _ = U.flow_sde_step(v, x, 0.2, 0.0, sde="sde")  # fine for sde
    assert torch.isfinite(lp).all()
    nx, lp, _, _ = U.flow_sde_step(v, x, 0.2, 0.0, sde="ode")
    assert lp is None


def test_sigma_one_needs_sigma_max():
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="sigma_max"):
        U.flow_sde_step(v, x, 1.0, 0.9)


def test_flow_policy_loss_matches_manual():
    T, B = 3, 4
    logp = (torch.randn(T, B) * 1e-4).requires_grad_()
    old = torch.zeros(T, B)
    A = torch.randn(B)
    v = torch.randn(T, B, 2, 3, 3, requires_grad=True)
    v_ref = torch.randn(T, B, 2, 3, 3)
    mean = torch.randn(T, B, 2, 3, 3, requires_grad=True)
    mean_ref = torch.randn(T, B, 2, 3, 3)
    std = torch.rand(T, B) + 0.1
    loss, m = U.flow_policy_loss(logp, old, A, clip_range=5e-5, velocity=v, ref_velocity=v_ref, beta_velocity=0.3,
                                 mean=mean, ref_mean=mean_ref, std=std, beta_kl=0.02)
    r = torch.exp(logp - old)
    pg = torch.maximum(-A * r, -A * r.clamp(1 - 5e-5, 1 + 5e-5)).mean()
    mse = ((v - v_ref) ** 2).mean()
    kl = ((mean - mean_ref) ** 2 / (2 * std[..., None, None, None] ** 2)).mean()
    torch.testing.assert_close(loss, pg + 0.3 * mse + 0.02 * kl)
    torch.testing.assert_close(m["clip_frac"], ((r - 1).abs() > 5e-5).float().mean())
    torch.testing.assert_close(m["velocity_mse"], mse.detach())
    loss.backward()
    assert v.grad is not None and mean.grad is not None and logp.grad is not None


def test_cfg_velocity():
    vu, vc = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(U.cfg_velocity(vu, vc, 4.5), vu + 4.5 * (vc - vu))
    torch.testing.assert_close(U.cfg_velocity(vu, vc, 1.0), vc)
