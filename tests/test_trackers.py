"""--report-to: every metrics.jsonl record as scalars, the sample sheets as images and the config, read back from each
tracker's offline store on CPU (TensorBoard event files, a wandb offline run, an MLflow file store, trackio's local
database). Each test skips when its package (an optional extra) is not installed; a missing package is one line
before any work."""
import json
import os

import pytest

from unirl_fast.cli import main


def _train(run, tracker, steps=2):
    assert main(["train", "--config", "smoke", "--run-dir", str(run), "--steps", str(steps), "--eval-every", "2",
                 "--report-to", tracker]) == 0
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def _expected(records, key="reward", phase="train"):
    return [(r["step"], r[key]) for r in records if r["phase"] == phase]


def _same(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want])


def test_tensorboard_event_files_hold_the_curves_images_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recs = _train(tmp_path / "run", "tensorboard")
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    _same([(e.step, e.value) for e in ea.Scalars("train/reward")], _expected(recs))
    assert [e.step for e in ea.Scalars("eval/eval_reward")] == [0, 2]
    assert {"samples_before", "samples_after", "samples"} <= set(ea.Tags()["images"])
    assert "config/text_summary" in ea.Tags()["tensors"]
    # a resume from step 1 purges the later events: no step twice
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-0000001")
    assert main(["train", "--config", "smoke", "--run-dir", str(tmp_path / "run"), "--steps", "2", "--eval-every", "2",
                 "--save-every", "1", "--report-to", "tensorboard"]) == 0
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/reward")] == [1, 2]


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recs = _train(tmp_path / "run", "wandb")
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb_id"]
    [offline] = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    # wandb >= 0.2x writes offline runs from its Go core with no Python reader: the record file holds every key
    import time

    deadline, path = time.monotonic() + 60, offline / f"run-{run_id}.wandb"
    while b"eval/eval_reward" not in (data := path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)  # its core process finishes the file after finish() returns
    for key in ("train/reward", "train/phase/reward_ms", "eval/eval_reward", "prompts_per_step"):
        assert key.encode() in data, key
    assert len(recs) == 4  # eval 0, train 1, train 2, eval 2
    images = {p.name.split("_")[0] + "_" + p.name.split("_")[1] for p in (offline / "files" / "media").rglob("*.png")}
    assert {"samples_before", "samples_after", "samples_2"} <= images, images


def test_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recs = _train(tmp_path / "run", "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "run" / "mlruns").absolute().as_uri())
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow_run_id"]
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/reward"))
    _same(hist, _expected(recs))
    run = client.get_run(run_id)
    assert run.data.params["prompts_per_step"] == "2"
    arts = {a.path for a in client.list_artifacts(run_id, "samples/step-2")}
    assert "samples/step-2/samples.png" in arts


def test_trackio_local_store(tmp_path, monkeypatch):
    import importlib.util
    import sys
    import uuid

    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed")
    if "trackio" not in sys.modules:  # its store directory is read at import: keep it in tmp_path
        monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    project = f"unirl-fast-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRACKIO_PROJECT", project)
    recs = _train(tmp_path / "run", "trackio")
    import trackio

    logs = trackio.SQLiteStorage.get_logs(project, "run")
    _same([(r["step"], r["train/reward"]) for r in logs if "train/reward" in r], _expected(recs))
    assert [r["step"] for r in logs if "eval/eval_reward" in r] == [0, 2]
    trackio.delete_project(project, force=True)  # a store outside tmp_path when trackio was imported earlier


def test_a_missing_tracker_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", "--config", "smoke", "--run-dir", str(tmp_path / "run"), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("unirl-fast train: --report-to wandb: the wandb package is not installed (pip install "
                           "'unirl-fast[wandb]')")
    assert not (tmp_path / "run").exists()
    assert main(["train", "--config", "smoke", "--run-dir", str(tmp_path / "run"), "--report-to", "comet"]) == 2
    assert "report_to must name trackers" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
