"""The step as a pipeline (train.pipeline): chunks of whole groups, each scored beside the next chunk's rollout with
reward_overlap on, bitwise the serial step's numbers; a failing chunk stops the step at the next check."""
import dataclasses
import json
import threading

import pytest
import reward_fns
import torch

from unirl_fast.rewards import RewardError
from unirl_fast.train import PRESETS, Trainer
from unirl_fast.train.config import with_image_schedule, with_pipeline
from unirl_fast.train.pipeline import TRAJ_JOIN, chunk_rows

SMOKE = PRESETS["smoke"]
pytestmark = pytest.mark.usefixtures("slow_reward")
TIMING = ("_ms", "per_s", "mfu", "tflops", "mem", "nvml")


def _numbers(rec):
    return {k: v for k, v in rec.items() if not any(t in k for t in TIMING)}


def test_chunks_are_contiguous_runs_of_whole_groups():
    gid = torch.arange(5).repeat_interleave(3)
    assert chunk_rows(gid, 2) == [(0, 6), (6, 15)]
    assert chunk_rows(gid, 5) == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15)]
    assert chunk_rows(gid, 9) == chunk_rows(gid, 5) and chunk_rows(gid, 1) == [(0, 15)]
    with pytest.raises(ValueError, match="not contiguous"):
        chunk_rows(torch.tensor([0, 1, 0, 1]), 2)


def test_every_trajectory_field_has_a_join_rule():
    from unirl_fast.rollout.image import ImageTrajectory

    assert {f.name for f in dataclasses.fields(ImageTrajectory)} <= set(TRAJ_JOIN)


def test_defaults_chunk_and_overlap_only_a_slow_reward():
    world = with_pipeline(SMOKE)
    assert (world.rollout_chunks, world.reward_overlap) == (1, "off")
    http = with_pipeline(dataclasses.replace(SMOKE, reward=("world", "http://127.0.0.1:9/x=0")))
    assert (http.rollout_chunks, http.reward_overlap) == (2, "on")  # at most prompts_per_step (2)
    slow = with_pipeline(dataclasses.replace(SMOKE, prompts_per_step=8, reward=("reward_fns:slow_varied",)))
    assert (slow.rollout_chunks, slow.reward_overlap) == (4, "on")
    fast = with_pipeline(dataclasses.replace(SMOKE, prompts_per_step=8, reward=("reward_fns:varied",)))
    assert (fast.rollout_chunks, fast.reward_overlap) == (1, "off")
    given = with_pipeline(dataclasses.replace(SMOKE, reward=("reward_fns:slow_varied",), rollout_chunks=3,
                                              reward_overlap="off"))
    assert (given.rollout_chunks, given.reward_overlap) == (3, "off")


def _trainer(tmp_path, name, scenario, **over):
    cfg = dataclasses.replace(SMOKE, scenario=scenario, run_dir=str(tmp_path / name), prompts_per_step=4,
                              **{"micro_batch": 4, "reward": ("reward_fns:slow_varied",), **over})
    return Trainer(cfg, log=lambda *_: None)


@pytest.mark.parametrize("scenario", ["generate", "reason-generate", "edit"])
def test_overlap_gives_bitwise_the_serial_steps_metrics_weights_and_evaluation(scenario, tmp_path):
    """4 chunks of one group each, the slow reward scored inline (off) or on the scorer thread (on, the default for
    it): the same metrics, weights and held-out rewards, bit for bit."""
    serial = _trainer(tmp_path, "serial", scenario, reward_overlap="off")
    recs = [_numbers(serial.train_step()) for _ in range(2)]
    ev = serial.evaluate()
    assert set(reward_fns.SLOW["threads"]) == {threading.main_thread().name}
    reward_fns.SLOW["threads"] = []
    over = _trainer(tmp_path, "overlap", scenario)
    assert (over.cfg.rollout_chunks, over.cfg.reward_overlap) == (4, "on")
    assert [_numbers(over.train_step()) for _ in range(2)] == recs
    ev_over = over.evaluate()
    assert set(reward_fns.SLOW["threads"]) == {"reward-scorer"}
    for (k, a), b in zip(serial.model.state_dict().items(), over.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(ev["_rewards"], ev_over["_rewards"]) and ev["eval_reward"] == ev_over["eval_reward"]


def test_scoring_runs_while_the_next_chunk_rolls_out(tmp_path):
    """Chunk i's reward call waits for chunk i + 1's rollout to begin: with overlap that happens; scored inline it
    never could (the wait would time out and fail the step)."""
    t = _trainer(tmp_path, "r", "generate")
    began = []
    import unirl_fast.train.trainer as trainer_mod

    real = trainer_mod.rollout

    def spy(*a, **kw):
        began.append(True)
        return real(*a, **kw)

    def gate(n):
        for _ in range(600):
            if len(began) > n or n == 4:
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"chunk {n + 1}'s rollout never began while chunk {n} was scored")

    reward_fns.SLOW["gate"] = gate
    trainer_mod.rollout = spy
    try:
        t.train_step()
    finally:
        trainer_mod.rollout = real
    assert len(began) == 4 and reward_fns.SLOW["threads"] == ["reward-scorer"] * 4


def test_the_first_micro_batches_train_while_the_last_chunk_is_scored(tmp_path):
    """Advantages wait for their group's scores only: the last chunk's reward call waits until the first micro-batch's
    loss has run (scoring everything before the losses could never get there), and the step's numbers are the
    serial step's."""
    serial = _trainer(tmp_path, "serial", "generate", micro_batch=2, reward_overlap="off")
    want = _numbers(serial.train_step())
    t = _trainer(tmp_path, "r", "generate", micro_batch=2)
    real_fwd, losses = t._fwd, []

    def fwd(*a):
        losses.append(1)
        return real_fwd(*a)

    def gate(n):
        for _ in range(3000):  # at most 30 s
            if n < 4 or losses:
                return
            threading.Event().wait(0.01)
        raise AssertionError("no micro-batch trained while the last chunk was being scored")

    reward_fns.SLOW.update(threads=[], gate=gate)
    t._fwd = fwd
    assert _numbers(t.train_step()) == want


def test_a_failing_chunk_stops_the_next_chunks_rollout_and_the_step(tmp_path):
    """Chunk 2's reward raises while chunk 3 rolls out (a sampler step of chunk 3 waits for it): the step stops at
    chunk 3's next sampler step, chunk 4 is never rolled out, no weight changes, and the error is the reward's."""
    import unirl_fast.rollout.image as image_mod
    import unirl_fast.train.trainer as trainer_mod

    t = _trainer(tmp_path, "r", "generate")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    began, steps = [], []
    real, real_step = trainer_mod.rollout, image_mod.ImageEngine.step

    def spy(*a, **kw):
        began.append(True)
        return real(*a, **kw)

    def counted_step(self, *a, **kw):  # the engine is made in the first step, after this patch
        steps.append(len(began))
        while len(began) == 3 and t.stop.error is None:
            threading.Event().wait(0.01)
        return real_step(self, *a, **kw)

    def gate(n):
        while n == 2 and len(began) < 3:
            threading.Event().wait(0.01)
        if n == 2:
            raise RuntimeError("the judge crashed")

    reward_fns.SLOW["gate"] = gate
    trainer_mod.rollout, image_mod.ImageEngine.step = spy, counted_step
    try:
        with pytest.raises(RewardError, match="the judge crashed"):
            t.train_step()
    finally:
        trainer_mod.rollout, image_mod.ImageEngine.step = real, real_step
    # stopped inside chunk 3's rollout, at its first or second sampler step's check; chunk 4 never began
    assert len(began) == 3 and steps.count(3) <= 1 and steps.count(2) == t.cfg.image_steps
    assert t.step == 0 and all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    with pytest.raises(RewardError):  # the run is stopped: a later step raises the same error at once
        t.train_step()


def test_the_resolved_pipeline_is_recorded_and_overlap_may_change_on_resume(tmp_path):
    from unirl_fast.train.rundir import check_run_dir

    cfg = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path), steps=1,
                              reward=("reward_fns:slow_varied",))
    Trainer(cfg, log=lambda *_: None).train()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["rollout_chunks"], saved["reward_overlap"]) == (2, "on")
    resolved = with_image_schedule(cfg)
    info = check_run_dir(with_pipeline(dataclasses.replace(resolved, steps=2, reward_overlap="off")))
    assert info["changes"]["reward_overlap"] == ("on", "off")
    with pytest.raises(ValueError, match="rollout_chunks 2 -> 1"):
        check_run_dir(with_pipeline(dataclasses.replace(resolved, rollout_chunks=1)))
