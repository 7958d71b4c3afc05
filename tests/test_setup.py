"""The set-up (train.setup): built once from the config, only what the purpose needs: export builds no reward, no
tasks, no reference and no optimizer; eval no optimizer and no reference (unless an edit's inverse needs it)."""
import dataclasses
import json

import pytest
import torch

import unirl_fast.train.setup as S
from unirl_fast.cli import main
from unirl_fast.train import PRESETS, Trainer


@pytest.fixture
def trained_run(tmp_path):
    cfg = dataclasses.replace(PRESETS["smoke"], scenario="generate", run_dir=str(tmp_path / "run"), steps=1)
    Trainer(cfg, log=lambda *_: None).train()
    return cfg


def _refuse(monkeypatch, *names):
    def refused(*a, **k):
        raise AssertionError("built although the purpose needs none")

    for name in names:
        if name == "optimizer":
            monkeypatch.setattr(torch.optim.AdamW, "__init__", refused)
        else:
            monkeypatch.setattr(S, name, refused)


def test_export_builds_no_reward_tasks_reference_or_optimizer(trained_run, tmp_path, monkeypatch, capsys):
    _refuse(monkeypatch, "build_run_reward", "load_run_tasks", "_reference", "optimizer")
    assert main(["export", trained_run.run_dir, str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1
    assert (tmp_path / "out" / "unified_config.json").is_file()


def test_eval_builds_no_optimizer_or_reference(trained_run, monkeypatch, capsys):
    _refuse(monkeypatch, "_reference", "optimizer")
    assert main(["eval", trained_run.run_dir]) == 0
    t = Trainer(dataclasses.replace(trained_run), purpose="eval", log=lambda *_: None)
    assert t.opt is None and t.ref is None and t.old is None and t.reward is not None and t.step == 1
    with pytest.raises(ValueError, match="built to eval, not to train"):
        t.train()


def test_capabilities_are_computed_once_per_run(tmp_path, monkeypatch):
    calls = []
    real = S.run_lm_has_vision
    monkeypatch.setattr(S, "run_lm_has_vision", lambda *a: calls.append(1) or real(*a))
    t = Trainer(dataclasses.replace(PRESETS["smoke"], scenario="understand", run_dir=str(tmp_path)),
                log=lambda *_: None)
    assert len(calls) == 1 and t.caps.vision is False and t.caps.lora == () and t.caps.device.type == "cpu"
