"""Sigma schedules (unirl_fast.rollout.schedule): "diffusers" equals FlowMatchEulerDiscreteScheduler.set_timesteps'
sigmas; the trainer's default comes from a --dit-path pipeline's scheduler config (the embedded world keeps
linspace, shift 1); one schedule reaches rollout, replay and eval, and config.json records it."""
import dataclasses
import json

import pytest
import torch

from unirl_fast.rollout import ImageSamplingParams
from unirl_fast.rollout.schedule import pipeline_schedule, timestep_schedule
from unirl_fast.train.config import PRESETS, TrainConfig, image_schedule, with_image_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5, 7.25])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 40])
def test_diffusers_schedule_equals_the_scheduler(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    ours = timestep_schedule(steps, shift, kind="diffusers")
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, sch.sigmas.float(), rtol=1.2e-7, atol=0)  # fp32 rounding (bit-equal here)
    if steps >= 10 and shift == 3.0:  # not the linspace schedule: its last nonzero sigma is far larger
        assert ours[-2] < 0.009 < 0.07 < timestep_schedule(steps, shift)[-2]


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be one of.*'karras'"):
        timestep_schedule(4, kind="karras")
    with pytest.raises(ValueError, match="schedule"):
        ImageSamplingParams(schedule="karras")


def _pipeline(tmp_path, scheduler: dict | None):
    """A diffusers pipeline layout: transformer/config.json beside scheduler/scheduler_config.json."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    if scheduler is not None:
        (tmp_path / "scheduler").mkdir()
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return str(tmp_path / "transformer")


def test_default_follows_the_pipelines_scheduler_config(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    dit = _pipeline(tmp_path, dict(sch.config, _class_name="FlowMatchEulerDiscreteScheduler"))
    cfg = TrainConfig(dit_path=dit)
    assert image_schedule(cfg) == ("diffusers", 3.0)
    assert image_schedule(dataclasses.replace(cfg, image_shift=2.0)) == ("diffusers", 2.0)
    assert image_schedule(dataclasses.replace(cfg, timestep_schedule="linspace")) == ("linspace", 3.0)
    assert image_schedule(TrainConfig()) == ("linspace", 1.0)  # the embedded world: unchanged
    assert image_schedule(PRESETS["bench"]) == ("linspace", 3.0)
    resolved = with_image_schedule(cfg)
    assert (resolved.timestep_schedule, resolved.image_shift) == ("diffusers", 3.0)


def test_flow_sigma_schedulers_give_linspace_and_others_nothing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    sana = _pipeline(a, {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0})
    assert pipeline_schedule(sana) == ("linspace", 3.0)
    ddpm = _pipeline(b, {"_class_name": "DDPMScheduler"})
    assert pipeline_schedule(ddpm) is None and image_schedule(TrainConfig(dit_path=ddpm)) == ("linspace", 1.0)
    assert pipeline_schedule(_pipeline(tmp_path, None)) is None


@pytest.mark.parametrize("option, value", [("use_dynamic_shifting", True), ("use_karras_sigmas", True),
                                           ("shift_terminal", 0.02), ("invert_sigmas", True),
                                           ("num_train_timesteps", 500)])
def test_scheduler_options_not_reproduced_are_refused(tmp_path, option, value):
    dit = _pipeline(tmp_path, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, option: value})
    with pytest.raises(ValueError, match=f"bad config: .*scheduler_config.json .*{option}"):
        TrainConfig(dit_path=dit).validate()
    # both given explicitly: the config is not consulted
    given = TrainConfig(dit_path=dit, timestep_schedule="diffusers", image_shift=3.0)
    assert image_schedule(given) == ("diffusers", 3.0)


def test_bad_shift_is_refused():
    with pytest.raises(ValueError, match="bad config: image_shift must be > 0, got -1.0"):
        TrainConfig(image_shift=-1.0).validate()


def test_one_schedule_in_rollout_replay_and_eval(tmp_path):
    """--timestep-schedule diffusers: the training rollout and the evaluation sample on it, the replay reproduces
    the rollout's log-probs on it (ratio 1 on-policy), and config.json says so."""
    from unirl_fast.train import Trainer
    from unirl_fast.train.rl import rollout

    cfg = dataclasses.replace(PRESETS["smoke"], scenario="generate", run_dir=str(tmp_path), steps=1,
                              image_steps=4, sde_window=3, timestep_schedule="diffusers", image_shift=3.0)
    t = Trainer(cfg, log=lambda *_: None)
    rec = t.train_step()
    assert rec["image_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    want = timestep_schedule(4, 3.0, kind="diffusers")
    tasks, gid = t._sample_tasks()
    for eval_mode in (False, True):
        traj = rollout(t.model, t.scenario, cfg, tasks, gid, t.gen, eval_mode=eval_mode).traj
        assert traj.params.schedule == "diffusers"
        torch.testing.assert_close(traj.sigmas[:, 0], want[:-1], rtol=0, atol=0)
        torch.testing.assert_close(traj.sigmas_next[:, 0], want[1:], rtol=0, atol=0)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["timestep_schedule"], saved["image_shift"]) == ("diffusers", 3.0)


def test_world_run_records_linspace(tmp_path):
    from unirl_fast.cli import main

    out = tmp_path / "cfg.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--config", "smoke", "--print-config"]) == 0
    printed = json.loads(buf.getvalue())
    assert (printed["timestep_schedule"], printed["image_shift"]) == ("linspace", 1.0)
    out.write_text(buf.getvalue())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--config-file", str(out), "--timestep-schedule", "diffusers", "--print-config"]) == 0
    assert json.loads(buf.getvalue())["timestep_schedule"] == "diffusers"
