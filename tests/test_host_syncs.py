"""Host-sync audit of the trainer: syncs per step do not grow with micro-batches, decode length or sampler steps.

`profiling.syncs.HostSyncCounter` counts every op that would make the host wait for a GPU (value reads, data-sized
outputs, device-to-host copies) during a train step on CPU, where the same code runs; the value checks run their
deferred (CUDA) path (`_checks._defer_on_cpu`). The reward is a device-side callable (tests/reward_fns.py:
brightness), so the count is the trainer's own: a host-side reward such as the world verifier reads each image on
the host, which the trainer cannot change.

The bound, per train step of reason-generate (text and image rollout, reference log-probs and velocities, both
losses): SYNC_BOUND = 9 counted, measured the same with micro-batches 4 / 2 / 1, 8 or 40 new tokens and 4 or 9
sampler steps, or a moving SDE window with branching, DPM-Solver++(2M) and a compressed ODE tail (train.sampler; the
code before this audit: 62, and 129 / 64 / 67 with 1 micro-batch / 40 tokens / 9 steps). They are:
- the rollout: the LM prefill's padding check (transformers, once per generate), the completions' ids and mask
  read once for decoding, the reward's scores and part read once each (a device-side reward: 2), the group
  advantages' `unique` and group count on the host rewards (host data: no GPU sync);
- the step: completion tokens counted once (the dapo normaliser and the throughput), the step's metrics read once
  (one stacked copy); the deferred value checks are read once before the optimizer step (an event wait on a GPU,
  not an op the counter sees on a CPU: +1 there).
None per micro-batch, per decoded token or per sampler step.
"""
from __future__ import annotations

import pytest
import torch

import unirl_fast._checks as C
from unirl_fast.profile_run import build_model
from unirl_fast.profiling.syncs import HostSyncCounter
from unirl_fast.train import TrainConfig, Trainer
from unirl_fast.train.scenarios import get_scenario

SYNC_BOUND = 9
BASE = dict(scenario="reason-generate", preset="tiny", steps=4, prompts_per_step=2, group_size=2, micro_batch=4,
            max_new_tokens=8, image_steps=4, sde_window=2, beta=0.02, beta_velocity=0.005, impl="reference",
            reward=("reward_fns:brightness",))


def step_syncs(tmp_path, monkeypatch, **kw) -> HostSyncCounter:
    """Syncs of the second train step (the first allocates the optimizer state) of a tiny random-init model."""
    monkeypatch.setattr(C, "_defer_on_cpu", True)
    c = TrainConfig(**{**BASE, "run_dir": str(tmp_path / "run"), **kw})
    model = build_model(c.preset, get_scenario(c.scenario).edit, 0, torch.device("cpu"), torch.float32)
    t = Trainer(c, model=model, log=lambda *a, **k: None)
    t.train_step()
    for state in t.opt.state.values():  # torch keeps AdamW's step counters on the host (non-capturable): no sync
        C.mark_host_resident(state["step"])
    with HostSyncCounter(trace=True) as syncs:
        t.train_step()
    return syncs


@pytest.fixture(scope="module")
def base_count(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        return step_syncs(tmp_path_factory.mktemp("base"), mp)
    finally:
        mp.undo()


def test_bound_per_step(base_count):
    assert 0 < base_count.total <= SYNC_BOUND, dict(base_count.where)


@pytest.mark.parametrize("change", [dict(micro_batch=1), dict(micro_batch=2), dict(max_new_tokens=40),
                                    dict(image_steps=9, sde_window=3),
                                    dict(image_steps=9, sde_window=2, window="slide", window_every=1,
                                         branch_at="window", ode_solver="dpm2", ode_tail=0.5, old_logp="rollout")],
                         ids=["micro1", "micro2", "tokens40", "steps9", "scheduler"])
def test_syncs_do_not_grow(base_count, tmp_path, monkeypatch, change):
    syncs = step_syncs(tmp_path, monkeypatch, **change)
    assert syncs.total == base_count.total, (dict(syncs.where), dict(base_count.where))


def test_counter_sees_what_syncs():
    """The instrument itself: each sync-forcing read is counted once, device-side work and host-resident reads
    are not."""
    x = torch.arange(6.0)
    with HostSyncCounter() as s:
        y = (x * 2).sum()  # device work: nothing
        float(y), bool(x.any()), x.tolist(), x[x > 2], x.nonzero(), torch.unique(x), x.cpu()
        C.mark_host_resident(x).tolist()
    assert s.total == 7, dict(s.counts)
