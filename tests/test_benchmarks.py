"""pytest-benchmark suite of the CPU paths (issue 8 item 5): the public ops (impl="auto", which on CPU tensors is
the fp32 reference), both rollout engines on the tiny preset and one trainer step of the smoke config.

Default run (pytest.ini has --benchmark-disable): each `benchmark(...)` calls its function once, so these are
ordinary tests, a few seconds in all; each checks what the timed call returned (against an independent fp64
formula for the ops, against a recompute / replay for the engines, finite metrics for the trainer step).
Timing run (no timing asserts anywhere; compare the JSON files of two commits with `pytest-benchmark compare`):

    python -m pytest tests/test_benchmarks.py --benchmark-enable --benchmark-only \
        --benchmark-json=bench/results/pytest-benchmark-cpu.json

Shapes are small CPU shapes (a 4 x 64-token batch over a 4096-word vocabulary, 8 latents of 16 x 32 x 32): what
the CPU smoke runs and the tiny trainer see, not the GPU shapes of docs/benchmarks.md (bench/ measures those).
"""
import dataclasses
import math

import pytest
import torch

import unirl_fast as U
from unirl_fast.models import UnifiedModel
from unirl_fast.rollout import (
    ImageEngine,
    ImageSamplingParams,
    SamplingParams,
    TextEngine,
    recompute_logprobs,
    replay_logprobs,
)

B, L, H, V = 4, 64, 128, 4096
LAT = (8, 16, 32, 32)
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 paths against fp64 formulas at these sizes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny, launch-bound work: see conftest


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


def _lm_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    y = torch.randint(0, V, (B, L), generator=g)
    return g, h, w, y


def _logsoftmax64(z, y):
    ls = torch.log_softmax(z.double(), -1)
    return ls.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(ls.exp() * ls).sum(-1)


@pytest.mark.benchmark(group="ops")
def test_logprobs_from_logits(benchmark):
    g, _, _, y = _lm_inputs(0)
    z = (3 * torch.randn(B, L, V, generator=g)).requires_grad_()
    up, uh = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)

    def run():
        logp, ent = U.logprobs_from_logits(z, y, return_entropy=True)
        return logp, ent, _grads((logp * up).sum() + (ent * uh).sum(), [z])[0]

    logp, ent, dz = benchmark(run)
    z64 = z.detach().double().requires_grad_()
    lp64, ent64 = _logsoftmax64(z64, y)
    (dz64,) = _grads((lp64 * up).sum() + (ent64 * uh).sum(), [z64])
    torch.testing.assert_close(logp.double(), lp64.detach(), **TOL)
    torch.testing.assert_close(ent.double(), ent64.detach(), **TOL)
    torch.testing.assert_close(dz.double(), dz64, **TOL)


@pytest.mark.benchmark(group="ops")
def test_fused_linear_logprobs(benchmark):
    g, h, w, y = _lm_inputs(1)
    h.requires_grad_()
    w.requires_grad_()
    up = torch.randn(B, L, generator=g)

    def run():
        logp, _ = U.fused_linear_logprobs(h, w, y)
        return (logp, *_grads((logp * up).sum(), [h, w]))

    logp, dh, dw = benchmark(run)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lp64, _ = _logsoftmax64(h64 @ w64.t(), y)
    dh64, dw64 = _grads((lp64 * up).sum(), [h64, w64])
    torch.testing.assert_close(logp.double(), lp64.detach(), **TOL)
    torch.testing.assert_close(dh.double(), dh64, **TOL)
    torch.testing.assert_close(dw.double(), dw64, **TOL)


def _grpo64(logp, old, adv, mask, eps=0.2):
    """GRPO token-IS clipped surrogate, per-sequence token mean, batch mean (FORMULAS.md), in fp64."""
    m = mask.double()
    r = torch.exp(logp.double() - old.double())
    a = adv.double().unsqueeze(-1)
    pg = torch.maximum(-a * r, -a * r.clamp(1 - eps, 1 + eps))
    return ((pg * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def _pg_inputs(g, shape):
    old = torch.randn(shape, generator=g) - 3
    logp = (old + 0.3 * torch.randn(shape, generator=g)).requires_grad_()  # ratios on both sides of the clip
    mask = torch.rand(shape, generator=g) > 0.1
    mask[0] = False  # one fully masked row
    return logp, old, torch.randn(shape[0], generator=g), mask


@pytest.mark.benchmark(group="ops")
def test_policy_loss(benchmark):
    g = torch.Generator().manual_seed(2)
    logp, old, adv, mask = _pg_inputs(g, (16, 256))

    def run():
        loss, metrics = U.policy_loss(logp, old, adv, mask)
        return loss, metrics, _grads(loss, [logp])[0]

    loss, metrics, dlogp = benchmark(run)
    lp64 = logp.detach().double().requires_grad_()
    want = _grpo64(lp64, old, adv, mask)
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    torch.testing.assert_close(dlogp.double(), _grads(want, [lp64])[0], **TOL)
    assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0  # both clips were hit


@pytest.mark.benchmark(group="ops")
def test_fused_linear_policy_loss(benchmark):
    g, h, w, y = _lm_inputs(3)
    h.requires_grad_()
    w.requires_grad_()
    _, old, adv, mask = _pg_inputs(g, (B, L))
    with torch.no_grad():  # old log-probs near the current ones, so the clip is active on some tokens
        old = _logsoftmax64(h @ w.t(), y)[0].float() + 0.3 * torch.randn(B, L, generator=g)

    def run():
        loss, _ = U.fused_linear_policy_loss(h, w, y, old, adv, mask)
        return (loss, *_grads(loss, [h, w]))

    loss, dh, dw = benchmark(run)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = _grpo64(_logsoftmax64(h64 @ w64.t(), y)[0], old, adv, mask)
    dh64, dw64 = _grads(want, [h64, w64])
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    torch.testing.assert_close(dh.double(), dh64, **TOL)
    torch.testing.assert_close(dw.double(), dw64, **TOL)


@pytest.mark.benchmark(group="ops")
def test_group_advantages(benchmark):
    g = torch.Generator().manual_seed(4)
    rewards = torch.rand(512, generator=g)
    gid = torch.arange(512) // 8
    rewards[gid == 5] = 0.5  # a zero-variance group gets zero advantage

    adv = benchmark(U.group_advantages, rewards, gid)
    per_group = adv.view(64, 8).double()
    r = rewards.view(64, 8).double()
    sd = r.std(-1, unbiased=False, keepdim=True)
    want = torch.where(sd > 0, (r - r.mean(-1, keepdim=True)) / (sd + 1e-4), torch.zeros_like(r))
    torch.testing.assert_close(per_group, want, **TOL)
    assert (adv[gid == 5] == 0).all()


def _sde_mean64(v, x, sig, nxt, a=0.7):
    """FORMULAS.md flow SDE step: mean = x (1 + std^2 dt / (2 sig)) + v (1 + std^2 (1 - sig) / (2 sig)) dt."""
    sig, nxt = sig.double().view(-1, 1, 1, 1), nxt.double().view(-1, 1, 1, 1)
    dt, std = nxt - sig, a * torch.sqrt(sig / (1 - sig))
    mean = x.double() * (1 + std ** 2 * dt / (2 * sig)) + v.double() * (1 + std ** 2 * (1 - sig) / (2 * sig)) * dt
    return mean, (std * torch.sqrt(-dt)).flatten()


def _gauss64(x_next, mean, s):
    sb = s.view(-1, 1, 1, 1)
    lp = -((x_next.double() - mean) ** 2) / (2 * sb ** 2) - torch.log(sb) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(-1)


def _flow_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    v, x, noise = (torch.randn(LAT, generator=g) for _ in range(3))
    sig = 0.2 + 0.7 * torch.rand(LAT[0], generator=g)
    return g, v, x, noise, sig, sig * 0.8


@pytest.mark.benchmark(group="ops")
def test_flow_sde_step(benchmark):
    _, v, x, noise, sig, nxt = _flow_inputs(5)
    x_next, logp, mean, std = benchmark(U.flow_sde_step, v, x, sig, nxt, noise=noise)
    mean64, s64 = _sde_mean64(v, x, sig, nxt)
    torch.testing.assert_close(mean.double(), mean64, **TOL)
    torch.testing.assert_close(std.double(), s64, **TOL)
    torch.testing.assert_close(x_next.double(), mean64 + s64.view(-1, 1, 1, 1) * noise.double(), **TOL)
    torch.testing.assert_close(logp.double(), _gauss64(x_next, mean64, s64), **TOL)


@pytest.mark.benchmark(group="ops")
def test_flow_step_logprob(benchmark):
    g, v, x, noise, sig, nxt = _flow_inputs(6)
    x_next = U.flow_sde_step(v, x, sig, nxt, noise=noise)[0]
    v_new = (v + 0.1 * torch.randn(LAT, generator=g)).requires_grad_()  # the policy moved since the rollout
    up = torch.randn(LAT[0], generator=g)

    def run():
        logp = U.flow_step_logprob(v_new, x, x_next, sig, nxt)
        return logp, _grads((logp * up).sum(), [v_new])[0]

    logp, dv = benchmark(run)
    v64 = v_new.detach().double().requires_grad_()
    mean64, s64 = _sde_mean64(v64, x, sig, nxt)
    want = _gauss64(x_next, mean64, s64)
    torch.testing.assert_close(logp.double(), want.detach(), **TOL)
    torch.testing.assert_close(dv.double(), _grads((want * up).sum(), [v64])[0], **TOL)


@pytest.mark.benchmark(group="ops")
def test_flow_policy_loss(benchmark):
    g = torch.Generator().manual_seed(7)
    T, Bf = 2, 4  # a replay of T SDE-window steps of Bf samples: [T, Bf, ...]
    lat = (T, Bf, *LAT[1:])
    old = torch.randn(T, Bf, generator=g) - 1
    logp = (old + 1e-4 * torch.randn(T, Bf, generator=g)).requires_grad_()  # Flow-GRPO's tiny clip range
    adv = torch.randn(Bf, generator=g)
    v, x = torch.randn(lat, generator=g).requires_grad_(), torch.randn(lat, generator=g)
    v_ref, mean_ref = v.detach() + 0.1 * torch.randn(lat, generator=g), x + 0.1 * torch.randn(lat, generator=g)
    mean, std = x.clone().requires_grad_(), 0.1 + 0.5 * torch.rand(T, Bf, generator=g)
    kw = dict(velocity=v, ref_velocity=v_ref, beta_velocity=0.1, mean=mean, ref_mean=mean_ref, std=std, beta_kl=0.01)

    def run():
        loss, _ = U.flow_policy_loss(logp, old, adv, **kw)
        return (loss, *_grads(loss, [logp, v, mean]))

    loss, *grads = benchmark(run)
    lp64, v64, m64 = (t.detach().double().requires_grad_() for t in (logp, v, mean))
    r = torch.exp(lp64 - old.double())
    a = adv.double()
    want = (torch.maximum(-a * r, -a * r.clamp(1 - 1e-4, 1 + 1e-4)).mean()
            + 0.1 * ((v64 - v_ref.double()) ** 2).mean()
            + 0.01 * ((m64 - mean_ref.double()) ** 2 / (2 * std.double().view(T, Bf, 1, 1, 1) ** 2)).mean())
    torch.testing.assert_close(loss.double(), want.detach(), **TOL)
    for got, exp in zip(grads, _grads(want, [lp64, v64, m64])):
        torch.testing.assert_close(got.double(), exp, **TOL)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UnifiedModel.from_preset("tiny").eval()


@pytest.mark.benchmark(group="rollout")
def test_text_engine_generate(benchmark, tiny):
    ids, mask = tiny.tokenizer(["The cat", "a much longer prompt here", "x", "two words"])
    engine = TextEngine(tiny.lm, pad_token_id=tiny.tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, eos_token_ids=())
    out = benchmark.pedantic(lambda: engine.generate(ids, mask, params, generator=torch.Generator().manual_seed(0)),
                             rounds=5, warmup_rounds=1)
    assert out.completion_ids.shape == out.logprobs.shape == (4, 16) and out.completion_mask.all()
    assert ((out.completion_ids >= 0) & (out.completion_ids < tiny.lm.config.vocab_size)).all()
    with torch.no_grad():
        torch.testing.assert_close(recompute_logprobs(tiny.lm, out), out.logprobs, rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="rollout")
def test_image_engine_generate(benchmark, tiny):
    ids, mask = tiny.tokenizer(["a red square", "two blue circles"])
    params = ImageSamplingParams(num_steps=4, guidance_scale=1.0, window_start=0, window_size=2)
    engine = ImageEngine(tiny)
    traj = benchmark.pedantic(lambda: engine.generate(ids, mask, params, generator=torch.Generator().manual_seed(0)),
                              rounds=5, warmup_rounds=1)
    assert traj.samples.shape == (4, 2, *tiny.latent_shape) and torch.isfinite(traj.latents).all()
    assert traj.images is not None and torch.isfinite(traj.images).all()
    with torch.no_grad():
        lp = replay_logprobs(tiny, traj)
    torch.testing.assert_close(lp, traj.log_probs[traj.trainable], rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="trainer")
def test_trainer_step_smoke_config(benchmark, tmp_path):
    from unirl_fast.train import PRESETS, Trainer

    cfg = dataclasses.replace(PRESETS["smoke"], run_dir=str(tmp_path))
    trainer = Trainer(cfg, log=lambda *_: None)
    trainable = [p for g in trainer.opt.param_groups for p in g["params"]]
    recs = []
    benchmark.pedantic(lambda: recs.append(trainer.train_step()), rounds=3, warmup_rounds=0)
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)) and trainer.step == len(recs)
    for r in recs:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert 0.0 <= r["reward"] <= 1.0 + cfg.format_weight and r["samples_per_s"] > 0
        phases = ("text_rollout", "image_rollout", "ref", "train_fwd_bwd", "optimizer")
        assert {f"phase/{p}_ms" for p in phases} <= set(r)
    assert all(torch.isfinite(p).all() for p in trainable)
