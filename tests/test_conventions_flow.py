"""Flow-GRPO's cps step score as an option (`logprob="flow_grpo"`, FORMULAS.md 4 and docs/conventions.md).

The oracle below transcribes Flow-GRPO's released cps step (sd3_sde_with_logprob.py, sde_type "cps") into fp64:
std = sigma_next sin(a pi / 2), mean = (x - sigma v)(1 - sigma_next) + (x + (1 - sigma) v) sqrt(sigma_next^2 - std^2),
score = mean over the non-batch dims of -(x_next - mean)^2. Both the reference and the Triton (interpreter) paths
must equal it, values and velocity gradients; for sde="sde" Flow-GRPO scores the full Gaussian, so the option
changes nothing there.
"""
from __future__ import annotations

import math

import pytest
import torch
from tolerance import assert_close_rule

import unirl_fast as U
from unirl_fast.rollout.image import ImageSamplingParams

IMPLS = ("reference", "triton")


def flow_grpo_cps_oracle(v, x, x_next, sigma, sigma_next, a):
    """fp64 transcription of Flow-GRPO's cps step score; sigma / sigma_next are [B] tensors."""
    v, x, x_next = v.double(), x.double(), x_next.double()
    shape = (-1,) + (1,) * (x.ndim - 1)
    sig, nxt = sigma.double().view(shape), sigma_next.double().view(shape)
    std = nxt * math.sin(a * math.pi / 2)
    x0 = x - sig * v
    x1 = x + (1 - sig) * v
    mean = x0 * (1 - nxt) + x1 * torch.sqrt(nxt ** 2 - std ** 2)
    return (-((x_next - mean) ** 2)).mean(dim=tuple(range(1, x.ndim))), mean, std


def _inputs(B=3, shape=(4, 5, 7)):
    x = torch.randn(B, *shape)
    v = torch.randn(B, *shape)
    sigma = torch.tensor([0.9, 0.5, 0.21])[:B]
    sigma_next = sigma - torch.tensor([0.1, 0.2, 0.2])[:B]
    return v, x, sigma, sigma_next


@pytest.mark.parametrize("impl", IMPLS)
def test_cps_flow_grpo_logprob_matches_oracle(impl):
    v, x, sig, nxt = _inputs()
    a = 0.7
    _, mean, std = flow_grpo_cps_oracle(v, x, x, sig, nxt, a)
    x_next = (mean + std * torch.randn(x.shape, dtype=torch.float64)).float()
    want, _, _ = flow_grpo_cps_oracle(v, x, x_next, sig, nxt, a)
    vd = v.double().requires_grad_()
    g = torch.randn(3, dtype=torch.float64)
    want_grad = torch.autograd.grad(flow_grpo_cps_oracle(vd, x, x_next, sig, nxt, a)[0], vd, g)[0]
    vg = v.clone().requires_grad_()
    got = U.flow_step_logprob(vg, x, x_next, sig, nxt, noise_level=a, sde="cps", logprob="flow_grpo", impl=impl)
    assert_close_rule(got, want, atol=1e-5, name="logp")
    assert_close_rule(torch.autograd.grad(got, vg, g.float())[0], want_grad, atol=1e-5, name="dlogp/dv")
    gauss = U.flow_step_logprob(v, x, x_next, sig, nxt, noise_level=a, sde="cps", impl=impl)
    s = std.flatten()
    # the two conventions' log-ratios differ by the factor 1 / (2 s^2) per step (docs/conventions.md)
    shift = -torch.log(s) - 0.5 * math.log(2 * math.pi)
    assert_close_rule(gauss.double(), want / (2 * s * s) + shift, atol=1e-5, name="gaussian vs flow_grpo")


@pytest.mark.parametrize("impl", IMPLS)
def test_sampler_stores_the_chosen_score(impl):
    v, x, sig, nxt = _inputs()
    noise = torch.randn_like(x)
    nx, lp, mean, std = U.flow_sde_step(v, x, sig, nxt, noise=noise, noise_level=0.5, sde="cps", impl=impl,
                                        logprob="flow_grpo")
    want, _, _ = flow_grpo_cps_oracle(v, x, nx, sig, nxt, 0.5)
    assert_close_rule(lp, want, atol=1e-5, name="stored logp")
    # the same transition rescored at training time gives the stored value (ratio 1 with unchanged weights)
    again = U.flow_step_logprob(v, x, nx, sig, nxt, noise_level=0.5, sde="cps", logprob="flow_grpo", impl=impl)
    assert_close_rule(again, lp, atol=1e-6, name="replay")


@pytest.mark.parametrize("impl", IMPLS)
def test_sde_kind_is_gaussian_under_both_conventions(impl):
    v, x, sig, nxt = _inputs()
    nx, lp, _, _ = U.flow_sde_step(v, x, sig, nxt, noise=torch.randn_like(x), impl=impl)
    a = U.flow_step_logprob(v, x, nx, sig, nxt, impl=impl)
    b = U.flow_step_logprob(v, x, nx, sig, nxt, impl=impl, logprob="flow_grpo")
    assert torch.equal(a, b)


def test_bad_logprob_option_is_named():
    v, x, sig, nxt = _inputs()
    with pytest.raises(ValueError, match="logprob='flowgrpo'"):
        U.flow_step_logprob(v, x, x, sig, nxt, sde="cps", logprob="flowgrpo")
    with pytest.raises(ValueError, match="logprob='gauss'"):
        U.flow_sde_step(v, x, sig, nxt, sde="cps", logprob="gauss")
    with pytest.raises(ValueError, match="logprob='x'"):
        ImageSamplingParams(sde="cps", logprob="x")


def test_trainer_flag_trains_with_the_flow_grpo_score(tmp_path):
    """--flow-logprob flow_grpo reaches the sampler and the replay: on-policy the step ratio is 1, and the stored
    rollout scores are Flow-GRPO's (mean squared distance to the step mean, negated), not the Gaussian's."""
    import dataclasses

    from unirl_fast.train import PRESETS, Trainer
    from unirl_fast.train.rl import rollout

    cfg = dataclasses.replace(PRESETS["smoke"], scenario="generate", sde_type="cps", run_dir=str(tmp_path),
                              flow_logprob="flow_grpo", steps=1)
    t = Trainer(cfg, log=lambda *_: None)
    rec = t.train_step()
    assert rec["image_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    tasks, gid = t._sample_tasks()
    traj = rollout(t.model, t.scenario, cfg, tasks, gid, t.gen).traj
    assert traj.params.logprob == "flow_grpo"
    lp = traj.log_probs[traj.trainable]
    assert (lp <= 0).all() and lp.abs().max() < 1.0  # a mean squared distance, not a log-density over C x H x W


@pytest.mark.parametrize("impl", IMPLS)
def test_cps_last_step_is_flow_grpos_under_its_score(impl):
    """A cps step into sigma_next = 0 has std 0: Flow-GRPO's sampler returns next = mean and log-prob 0 there, and
    its replay scores -(x_next - mean)^2 with the new velocity; the Gaussian score has no density there (refused)."""
    v, x, sig, _ = _inputs()
    nxt = torch.tensor([0.8, 0.3, 0.0])  # the last sample steps to 0
    noise = torch.randn_like(x)
    nx, lp, mean, std = U.flow_sde_step(v, x, sig, nxt, noise=noise, sde="cps", impl=impl, logprob="flow_grpo")
    want, want_mean, want_std = flow_grpo_cps_oracle(v, x, nx, sig, nxt, 0.7)
    assert std[2] == 0 and lp[2] == 0 and torch.isfinite(nx).all()
    assert_close_rule(nx[2], want_mean[2], atol=1e-6, name="next = mean at sigma_next 0")
    assert_close_rule(lp, want, atol=1e-5, name="stored logp")
    one, _, _, _ = U.flow_sde_step(v[2:], x[2:], 0.21, 0.0, noise=noise[2:], sde="cps", impl=impl, logprob="flow_grpo")
    assert torch.equal(one, nx[2:])  # float sigmas (checked on the host) take the same path
    v2 = (v + 0.1 * torch.randn_like(v)).requires_grad_()  # the replay after an update: no longer 0
    got = U.flow_step_logprob(v2, x, nx, sig, nxt, sde="cps", logprob="flow_grpo", impl=impl)
    vd = v2.detach().double().requires_grad_()
    want2 = flow_grpo_cps_oracle(vd, x, nx, sig, nxt, 0.7)[0]
    assert got[2] < 0
    assert_close_rule(got, want2, atol=1e-5, name="replayed logp")
    g = torch.randn(3)
    assert_close_rule(torch.autograd.grad(got, v2, g)[0], torch.autograd.grad(want2, vd, g.double())[0], atol=1e-5,
                      name="dlogp/dv")
    with pytest.raises(ValueError, match="zero-variance step with no Gaussian log-prob.*logprob='flow_grpo'"):
        U.flow_sde_step(v, x, sig, nxt, noise=noise, sde="cps", impl=impl)
    with pytest.raises(ValueError, match="zero-variance"):
        U.flow_step_logprob(v, x, nx, 0.21, 0.0, sde="cps", impl=impl)
