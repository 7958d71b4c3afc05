"""The run directory tells the truth and the CLI fails before work (issue: the trainer as a user meets it).

- A resume that changes what the run is is refused before any model is built, naming the fields; an allowed
  change (more --steps) is recorded in resumes.jsonl and config.json keeps the creation's settings.
- `unirl-fast eval` leaves config.json untouched and appends its result to evals.jsonl.
- A run killed after step 2's records but before its checkpoint, resumed from step 1, has one record per step.
- A finished run says so and exits 0 without building a model.
- Bad flags fail in under a second (in process, imports warm) with one line, exit 2 and no run directory.
- `train --help` lists the choices and every TrainConfig field has help text.
"""
import dataclasses
import json
import os
import time

import pytest

from unirl_fast.cli import main
from unirl_fast.train import PRESETS, TrainConfig, Trainer
from unirl_fast.train import checkpoint as ckpt

SMOKE = PRESETS["smoke"]
QUIET = dict(log=lambda *_: None)


def _train(run_dir, **over):
    cfg = dataclasses.replace(SMOKE, scenario="reason-generate", run_dir=str(run_dir), **over)
    return Trainer(cfg, **QUIET).train()


def _steps(run_dir):
    return [(r["phase"], r["step"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


def test_resume_refuses_a_changed_run_and_records_an_allowed_change(tmp_path, capsys):
    _train(tmp_path, steps=1)
    saved = (tmp_path / "config.json").read_bytes()
    base = sorted(p.name for p in (tmp_path / "base").iterdir())
    t0 = time.perf_counter()
    assert main(["train", "--config", "smoke", "--run-dir", str(tmp_path), "--scenario", "edit",
                 "--group-size", "4"]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 1.0
    assert "scenario 'reason-generate' -> 'edit'" in err and "group_size 2 -> 4" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == base  # no second base model pretrained
    assert (tmp_path / "config.json").read_bytes() == saved
    assert main(["train", "--config", "smoke", "--run-dir", str(tmp_path), "--scenario", "reason-generate",
                 "--steps", "2", "--eval-every", "1"]) == 0
    assert (tmp_path / "config.json").read_bytes() == saved  # written once, at creation
    resumes = [json.loads(line) for line in open(tmp_path / "resumes.jsonl")]
    assert resumes[0]["step"] == 1 and resumes[0]["changes"] == {"steps": [1, 2], "eval_every": [2, 1]}
    assert _steps(tmp_path) == [("eval", 0), ("train", 1), ("eval", 1), ("train", 2), ("eval", 2)]


def test_eval_never_writes_config_and_keeps_its_results(tmp_path, capsys):
    _train(tmp_path, steps=1)
    cfg_path = tmp_path / "config.json"
    saved, mtime = cfg_path.read_bytes(), os.stat(cfg_path).st_mtime_ns
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--eval-prompts", "2"]) == 0
    assert cfg_path.read_bytes() == saved and os.stat(cfg_path).st_mtime_ns == mtime
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rec = json.loads((tmp_path / "evals.jsonl").read_text().splitlines()[-1])
    assert rec["eval_reward"] == out["eval_reward"] and rec["eval_prompts"] == 2 and rec["step"] == 1
    assert not (tmp_path / "resumes.jsonl").exists()


def test_kill_and_resume_leaves_one_record_per_step(tmp_path):
    _train(tmp_path, steps=2, save_every=1)
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-0000001")  # killed after step 2's records, before its checkpoint
    import shutil

    shutil.rmtree(root / "step-0000002")
    _train(tmp_path, steps=3, save_every=1)
    assert _steps(tmp_path) == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]


def test_finished_run_says_so_and_exits_zero(tmp_path, capsys, monkeypatch):
    _train(tmp_path, steps=1)
    before = _steps(tmp_path)
    import unirl_fast.train as T

    monkeypatch.setattr(T, "Trainer", lambda *a, **k: pytest.fail("a finished run must not build a trainer"))
    assert main(["train", "--config", "smoke", "--run-dir", str(tmp_path), "--steps", "1"]) == 0
    assert "already complete at step 1 of 1" in capsys.readouterr().out
    assert _steps(tmp_path) == before


@pytest.mark.parametrize("argv,needle", [
    (["--loss-type", "foo"], "invalid choice: 'foo'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--scenario", "dance"], "invalid choice: 'dance'"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--fp8"], "no Linear of preset 'tiny' is eligible"),
    (["--impl", "triton"], "needs CUDA tensors"),
    (["--stpes", "5"], "unrecognized arguments: --stpes 5"),
    (["--run-dir", "FILE"], "exists and is not a directory"),
], ids=["loss-type", "preset", "scenario", "steps", "fp8-tiny", "triton-on-cpu", "typo", "run-dir-file"])
def test_bad_flags_fail_fast_with_one_line_and_no_run_dir(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter: explicit Triton cannot run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("")
    main(["train", "--config", "smoke", "--fp8", "--run-dir", str(tmp_path / "warm")]) if argv == ["--fp8"] else None
    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        rc = main(["train", "--config", "smoke", *argv])
    except SystemExit as e:  # argparse's own errors (bad choice, unknown flag) exit 2 with the train usage
        rc = e.code
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and took < 1.0, (rc, err, took)
    assert "Traceback" not in err
    if "usage:" in err:
        assert err.startswith("usage: unirl-fast train") and err.strip().splitlines()[-1].startswith(
            "unirl-fast train: error:")
    else:
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_help_lists_choices_and_every_field_is_documented(capsys):
    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name
    with pytest.raises(SystemExit):
        main(["train", "--scenario", "edit", "--help"])
    out = capsys.readouterr().out
    assert "{understand,generate,reason-generate,refine-prompt,edit,reason-edit}" in out
    assert "{grpo,bnpo,dapo,dr_grpo,seq_sum}" in out and "{auto,triton,reference}" in out
    assert "(default: 60)" in out  # edit's measured steps, the effective default for this command line
    assert "Resuming" in out and "--preset picks the model" in out


def test_run_dir_with_checkpoints_but_no_config_is_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"state": {"step": 1}})
    with pytest.raises(ValueError, match="no config.json"):
        Trainer(dataclasses.replace(SMOKE, run_dir=str(tmp_path)), **QUIET)
