"""The trainer: every scenario runs a few steps, resume continues exactly, checkpoints are atomic, bad configs
are rejected before any work. The learning tests (held-out reward rises, every scenario) are in test_learning.py."""
import dataclasses
import json

import pytest
import torch

from unirl_fast.cli import main
from unirl_fast.train import PRESETS, SCENARIOS, TrainConfig, Trainer, preflight
from unirl_fast.train import checkpoint as ckpt

SMOKE = PRESETS["smoke"]


def _records(run_dir, phase="train"):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if f'"phase": "{phase}"' in line]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_runs_a_few_steps(scenario, tmp_path):
    cfg = dataclasses.replace(SMOKE, scenario=scenario, run_dir=str(tmp_path))
    out = Trainer(cfg, log=lambda *_: None).train()
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert all(torch.isfinite(torch.tensor(float(v))) for k, v in r.items() if isinstance(v, float))
        assert 0.0 <= r["reward"] <= 1.0 + cfg.format_weight
        assert r["samples_per_s"] > 0 and "phase/reward_ms" in r
    assert out["base_eval_reward"] is not None and out["final_eval_reward"] is not None
    assert (tmp_path / "config.json").is_file() and (tmp_path / "rewards.png").is_file()
    for name in ("samples_before.png", "samples_after.png", "samples.png"):  # understand too (its scenes)
        assert (tmp_path / name).is_file(), name


def test_cps_window_replays_its_own_logprobs(tmp_path):
    """sde_type="cps": the training window uses the marginal-preserving step; the replay reproduces the
    rollout's log-probs (ratio 1, approx KL ~0 on the first, on-policy update) and the samples are finite."""
    cfg = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path), steps=1, sde_type="cps",
                              noise_level=0.7, beta_velocity=0.0)
    t = Trainer(cfg, log=lambda *_: None)
    rec = t.train_step()
    from unirl_fast.train.rl import image_params

    assert image_params(cfg).sde == "cps" and image_params(cfg, eval_mode=True).sde == "ode"
    assert abs(rec["image_ratio_mean"] - 1.0) < 1e-5
    assert abs(rec["image_approx_kl"]) < 1e-8 and 0.0 <= rec["reward"] <= 1.0


def test_eval_samples_average_each_task_over_its_draws(tmp_path, monkeypatch):
    """eval_samples K: every held-out task is drawn K times and `_rewards[i]` is task i's mean over its K draws
    (micro-batches straddle the passes here: 3 tasks x 2 draws in micro-batches of 4); images: the first pass."""
    import unirl_fast.train.pipeline as pipeline_mod

    real_score = pipeline_mod.score
    seen = {}

    def tagged_score(*args, **kw):  # reward = task index + 10 x (how often that task was scored before)
        b = real_score(*args, **kw)
        vals = []
        for task in b.tasks:
            i = next(j for j, t in enumerate(t_eval) if t is task)
            vals.append(i + 10.0 * seen.get(i, 0))
            seen[i] = seen.get(i, 0) + 1
        b.rewards = torch.tensor(vals)
        return b

    cfg = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path), eval_prompts=3, eval_samples=2,
                              micro_batch=4)
    t = Trainer(cfg, log=lambda *_: None)
    t_eval = t.eval_tasks
    monkeypatch.setattr(pipeline_mod, "score", tagged_score)
    out = t.evaluate()
    assert out["_rewards"].tolist() == [5.0, 6.0, 7.0]  # (i + 0 + i + 10) / 2
    assert out["eval_reward"] == pytest.approx(6.0)
    assert [s["prompt"] for s in out["_samples"]] == [t.prompt for t in t_eval]  # the first pass, once each
    monkeypatch.setattr(pipeline_mod, "score", real_score)
    one = Trainer(dataclasses.replace(cfg, eval_samples=1), log=lambda *_: None).evaluate()
    assert one["_rewards"].shape == (3,)


def test_trained_experts_change_and_frozen_ones_do_not(tmp_path, monkeypatch):
    import unirl_fast.train.pipeline as pipeline_mod

    real_score = pipeline_mod.score

    def varied_score(*args, **kw):  # rewards that differ inside each group, so advantages are not all zero
        b = real_score(*args, **kw)
        b.rewards = torch.arange(len(b.rewards), dtype=torch.float32) % 2
        return b

    monkeypatch.setattr(pipeline_mod, "score", varied_score)
    cfg = dataclasses.replace(SMOKE, scenario="refine-prompt", run_dir=str(tmp_path), steps=1, lr_lm=1e-2)
    t = Trainer(cfg, log=lambda *_: None)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train_step()
    after = t.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lm"}  # refine-prompt: the DiT and the connector stay frozen


def test_resume_continues_with_the_same_losses(tmp_path):
    base = dataclasses.replace(SMOKE, scenario="understand", steps=3, save_every=1, temperature=1.5)
    Trainer(dataclasses.replace(base, run_dir=str(tmp_path / "a")), log=lambda *_: None).train()
    Trainer(dataclasses.replace(base, run_dir=str(tmp_path / "b"), steps=2), log=lambda *_: None).train()
    Trainer(dataclasses.replace(base, run_dir=str(tmp_path / "b")), log=lambda *_: None).train()
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3]
    for k in ("reward", "text_loss", "grad_norm"):
        assert a[2][k] == b[2][k], k


def test_ema_weights_average_updates_are_evaluated_and_resume(tmp_path):
    """ema_decay: the average follows e <- d e + (1 - d) w with d = min(decay, (1 + n) / (10 + n)); evaluate()
    scores the averaged weights and puts the trained ones back; a resumed run continues the same average."""
    cfg = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path / "a"), steps=3, save_every=1,
                              ema_decay=0.15, lr_dit=1e-2, lr_connector=1e-2)
    t = Trainer(cfg, log=lambda *_: None)
    params = {k: p for k, p in t.model.named_parameters() if p.requires_grad}
    expect = {k: p.detach().clone() for k, p in params.items()}
    for n in range(3):
        t.train_step()
        d = min(0.15, (1 + n) / (10 + n))  # 0.1, then the cap 0.15
        expect = {k: d * expect[k] + (1 - d) * params[k].detach() for k in params}
    assert max((t.ema.shadow[k] - expect[k]).abs().max().item() for k in params) < 1e-6
    trained = {k: p.detach().clone() for k, p in params.items()}
    assert any(not torch.equal(trained[k], expect[k]) for k in params)  # the average differs from the weights
    ev = t.evaluate()
    assert all(torch.equal(params[k], trained[k]) for k in params)  # put back
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(expect[k])
    plain = dataclasses.replace(cfg, ema_decay=0.0)
    t.cfg, t.ema = plain, None
    assert torch.allclose(t.evaluate()["_rewards"], ev["_rewards"])  # the same as evaluating those weights

    Trainer(cfg, log=lambda *_: None).train()  # uninterrupted, 3 steps
    b = dataclasses.replace(cfg, run_dir=str(tmp_path / "b"))
    Trainer(dataclasses.replace(b, steps=2), log=lambda *_: None).train()
    Trainer(b, log=lambda *_: None).train()  # resumed at step 2
    ea = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "a"))["ema"]
    eb = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))["ema"]
    assert ea["n"] == eb["n"] == 3
    assert all(torch.equal(ea["shadow"][k], eb["shadow"][k]) for k in ea["shadow"])
    assert _records(tmp_path / "a", "eval")[-1]["eval_reward"] == _records(tmp_path / "b", "eval")[-1]["eval_reward"]
    Trainer(dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path / "c"), steps=1),
            log=lambda *_: None).train()
    c2 = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path / "c"), steps=2, ema_decay=0.5)
    with pytest.raises(ValueError, match=r"other settings \(ema_decay 0.0 -> 0.5\)"):  # a run created without EMA
        Trainer(c2, log=lambda *_: None)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "ema_decay": 0.5}))  # config edited by hand
    with pytest.raises(ValueError, match="no EMA weights"):  # the checkpoint itself still has none
        Trainer(c2, log=lambda *_: None)


def test_checkpoint_crash_mid_save_keeps_last_good(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}, "state": {"step": 1}})
    real = ckpt.write_entry
    calls = []

    def flaky(directory, name, obj):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(directory, name, obj)

    monkeypatch.setattr(ckpt, "write_entry", flaky)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(2)}, "state": {"step": 2}})
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-0000001"
    assert ckpt.load_checkpoint(latest)["state"]["step"] == 1


@pytest.mark.parametrize("over,needle", [
    (dict(scenario="dance"), "scenario must be one of"),
    (dict(loss_type="foo"), "loss_type must be one of"),
    (dict(preset="huge"), "preset must be one of"),
    (dict(group_size=1), "group_size"),
    (dict(cycle_back="source"), "cycle_back"),
    (dict(prompts_per_step=3, group_size=4, micro_batch=8), "not divisible"),
    (dict(lr_lm=0.0), "lr_lm"),
    (dict(lr_dit=-1.0), "lr_dit"),
    (dict(model_path="/nonexistent/model"), "model_path"),
    (dict(sde_window=0), "sde_window"),
    (dict(device="tpu"), "device"),
    pytest.param(dict(device="cuda"), "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    (dict(sde_type="dpm"), "sde_type"),
    (dict(eval_samples=0), "eval_samples"),
    (dict(ema_decay=1.0), "ema_decay"),
])
def test_bad_configs_are_rejected_before_work(over, needle, tmp_path):
    # preflight: what the trainer and the CLI run before any model (the config's own checks first, then its inputs)
    with pytest.raises(ValueError, match=needle):
        preflight(dataclasses.replace(TrainConfig(run_dir=str(tmp_path)), **over))
    assert not (tmp_path / "config.json").exists()


def test_cli_rejects_bad_config(capsys):
    assert main(["train", "--group-size", "1"]) == 2
    assert "group_size" in capsys.readouterr().err


def test_cli_eval_takes_eval_samples_and_rejects_bad_ones(tmp_path, capsys):
    cfg = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path), steps=1)
    Trainer(cfg, log=lambda *_: None).train()
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--eval-samples", "2"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_reward"] <= 1.0
    assert main(["eval", str(tmp_path), "--eval-samples", "0"]) == 2
    assert "eval_samples must be >= 1, got 0" in capsys.readouterr().err


def test_device_resolution():
    from unirl_fast.train.config import resolve_device

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(TrainConfig()).type == want
    assert resolve_device(TrainConfig(device="cpu")).type == "cpu"


def test_scenario_defaults_apply_to_tiny_and_yield_to_flags():
    import argparse

    from unirl_fast.train.config import (
        SCENARIO_DEFAULTS,
        add_config_args,
        config_from_args,
        with_image_schedule,
        with_pipeline,
    )

    p = argparse.ArgumentParser()
    add_config_args(p)
    gen = config_from_args(p.parse_args(["--scenario", "generate"]))
    assert {k: getattr(gen, k) for k in SCENARIO_DEFAULTS["generate"]} == SCENARIO_DEFAULTS["generate"]
    assert config_from_args(p.parse_args(["--scenario", "generate", "--sde-type", "sde"])).sde_type == "sde"
    # the default run: reason-generate, unchanged (the schedule resolved: linspace, shift 1; one rollout chunk and no
    # reward overlap for the world's reward)
    assert config_from_args(p.parse_args([])) == with_pipeline(with_image_schedule(TrainConfig()))
    assert config_from_args(p.parse_args(["--config", "smoke", "--scenario", "generate"])).sde_type == "sde"


def test_impl_reaches_the_image_rollout_and_the_cycle_back(tmp_path, monkeypatch):
    """`--impl reference` runs every op in eager PyTorch, the SDE step inside the rollout engine included."""
    import unirl_fast.rollout.image as image_mod

    seen = set()
    real = image_mod.flow_sde_step

    def spy(*a, **kw):
        seen.add(kw.get("impl"))
        return real(*a, **kw)

    monkeypatch.setattr(image_mod, "flow_sde_step", spy)
    cfg = dataclasses.replace(SMOKE, scenario="edit", run_dir=str(tmp_path), steps=1, impl="reference")
    Trainer(cfg, log=lambda *_: None).train_step()
    assert seen == {"reference"}


@pytest.mark.parametrize("cycle_back", ["reference", "policy"])
def test_cycle_back_model(cycle_back, tmp_path, monkeypatch):
    """The edit reward's inverse edit is made by the policy or (cycle_back="reference") by the frozen reference,
    in training and in evaluation alike."""
    import unirl_fast.train.rl as rl_mod

    engines = []
    real = rl_mod.ImageEngine

    def spy(model, **kw):
        engines.append(model)
        return real(model, **kw)

    monkeypatch.setattr(rl_mod, "ImageEngine", spy)
    cfg = dataclasses.replace(SMOKE, scenario="edit", run_dir=str(tmp_path), steps=1, cycle_back=cycle_back)
    t = Trainer(cfg, log=lambda *_: None)
    back = t.ref if cycle_back == "reference" else t.model
    t.train_step()
    assert engines[0] is t.model and engines[1] is back and len(engines) == 2  # rollout, then the cycle-back
    engines.clear()
    t.evaluate()  # rollouts reuse the run's engine (made in the step); each cycle-back makes its own
    assert engines and all(e is back for e in engines) and t.engines.image.model is t.model


@pytest.mark.parametrize("group_noise", [True, False])
def test_group_noise_shares_the_initial_latent_within_groups(group_noise, tmp_path):
    from unirl_fast.train.rl import rollout

    cfg = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path), prompts_per_step=3, group_size=3,
                              micro_batch=3, group_noise=group_noise)
    t = Trainer(cfg, log=lambda *_: None)
    tasks, gid = t._sample_tasks()
    gid = gid * 5 + 2  # ids need not be 0..G-1
    x0 = rollout(t.model, t.scenario, cfg, tasks, gid, t.gen).traj.samples[0]
    for g in gid.unique():
        rows = x0[gid == g]
        assert torch.equal(rows[0], rows[1]) == group_noise and torch.equal(rows[1], rows[2]) == group_noise
    assert not torch.equal(x0[0], x0[3])  # groups differ
    ev = rollout(t.model, t.scenario, cfg, tasks, gid, t.gen, eval_mode=True).traj.samples[0]
    assert not torch.equal(ev[0], ev[1])  # evaluation draws one latent per sample either way


def test_sample_sheet_is_readable_and_labelled(tmp_path):
    """The sheet's size follows its layout (images upscaled to 128 px cells) and every row's text band holds
    text: dark pixels on the white background where the prompt and rewards are written."""
    import numpy as np
    from PIL import Image

    from unirl_fast.train.plots import CELL, HEAD, PAD, save_samples, sheet_size
    from unirl_fast.world import Obj, Scene, render_scene

    img = render_scene(Scene((Obj("red", "circle", "left"),)), 32)

    def rec(reward, text="", right=None, source=None):
        return {"prompt": "draw a red circle on the left", "text": text, "right": right, "image": img,
                "source": source, "reward": reward, "parts": {"image": reward, "total": reward}}
    columns = {"base": [rec(0.1), rec(0.2), rec(0.3)], "step 40": [rec(0.5), rec(0.6), rec(0.7)]}
    path = save_samples(columns, tmp_path / "s.png", "generate: held-out tasks")
    sheet = np.asarray(Image.open(path).convert("L"))
    assert (sheet.shape[1], sheet.shape[0]) == sheet_size(3, 2)
    text_x0 = PAD + 2 * (CELL + PAD)
    for row in range(3):
        y0 = HEAD + row * (CELL + PAD)
        band = sheet[y0:y0 + CELL, text_x0:]
        assert (band < 128).sum() > 200, f"row {row}: no text in the label band"
        cell = sheet[y0:y0 + CELL, PAD:PAD + CELL]
        assert cell.std() > 10  # the upscaled image, not an empty cell
    understand = {"base": [rec(0.0, "red", False, img)], "step 40": [rec(1.0, "blue", True, img)]}
    path = save_samples(understand, tmp_path / "u.png", "understand")
    sheet = np.asarray(Image.open(path).convert("L"))
    assert (sheet.shape[1], sheet.shape[0]) == sheet_size(1, 3)  # the scene and both (here given) images
