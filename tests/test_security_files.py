"""Files from elsewhere, safe by default: checkpoints load without running code (a pickle that would is refused by
eval, export and resume with one line, and nothing runs), an earlier version's checkpoint still resumes, task data
fingerprints are stable for `datasets` directories with images (two processes, a resume), images are decoded per
use, and a task file's path that leaves the data directory is refused unless allowed."""
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unirl_fast.cli import main
from unirl_fast.train import PRESETS, Trainer
from unirl_fast.train import checkpoint as ckpt

HERE = Path(__file__).parent
SMOKE = PRESETS["smoke"]
QUIET = dict(log=lambda *_: None)


class _RunsCode:
    """Unpickling this calls exec: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _evil(path, marker):
    torch.save({"state": {0: {"step": torch.tensor(1.0)}}, "hook": _RunsCode(marker)}, path)


def _records(run_dir, phase="train"):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl") if f'"phase": "{phase}"' in line]


# the format -----------------------------------------------------------------------------------------------------
def test_checkpoint_entries_round_trip_without_pickle(tmp_path):
    w = torch.randn(4, 3)
    model = {"embed.weight": w, "head.weight": w, "norm.bias": torch.zeros(3)}  # tied: one storage
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))], lr=1e-3,
                            betas=(0.9, 0.99))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    rng = random.Random(3)
    state = {"step": 7, "history": [{"reward": 0.5, "kl": float("nan"), "nvml": "unavailable", "mfu": None}],
             "py_rng": rng.getstate(), "gen": torch.Generator().manual_seed(1).get_state(),
             "torch_rng": torch.get_rng_state()}
    ema = {"n": 3, "decay": 0.9, "shadow": {"a": torch.ones(2)}}
    path = ckpt.save_checkpoint(tmp_path, 7, {"model": model, "optim": opt.state_dict(), "state": state, "ema": ema})
    names = sorted(p.name for p in path.iterdir())
    assert names == ["ema.json", "ema.safetensors", "model.safetensors", "optim.json", "optim.safetensors",
                     "state.json", "state.safetensors"]
    back = ckpt.load_checkpoint(path)
    assert all(torch.equal(back["model"][k], v) for k, v in model.items())
    assert back["optim"]["param_groups"][0]["betas"] == (0.9, 0.99)  # a tuple again
    assert set(back["optim"]["state"]) == {0, 1}  # int keys again
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))])
    opt2.load_state_dict(back["optim"])
    assert torch.equal(opt2.state_dict()["state"][1]["exp_avg"], opt.state_dict()["state"][1]["exp_avg"])
    r2 = random.Random()
    r2.setstate(back["state"]["py_rng"])
    assert r2.random() == rng.random()
    h = back["state"]["history"][0]
    assert h["reward"] == 0.5 and h["kl"] != h["kl"] and h["mfu"] is None and back["state"]["step"] == 7
    assert torch.equal(back["state"]["gen"], state["gen"]) and back["ema"]["n"] == 3
    with pytest.raises(TypeError, match="a object cannot be saved without pickle|cannot be saved without pickle"):
        ckpt.write_entry(tmp_path, "bad", {"x": object()})


# malicious files ------------------------------------------------------------------------------------------------
def test_the_evil_file_would_run_code_with_an_unsafe_load(tmp_path):
    """The fixture is what it claims: torch.load(weights_only=False) runs it; the safe loaders do not."""
    marker = tmp_path / "ran"
    _evil(tmp_path / "optim.pt", marker)
    with pytest.raises(ckpt.CheckpointError, match=r"optim\.pt is refused: its pickle calls builtins\.exec"):
        ckpt.read_entry(tmp_path, "optim")
    with ckpt.weights_only_loads():  # what DeepSpeed's readers go through during a resume
        with pytest.raises(ckpt.CheckpointError, match="is refused"):
            torch.load(tmp_path / "optim.pt", weights_only=False)
    assert not marker.exists()
    torch.load(tmp_path / "optim.pt", weights_only=False)
    assert marker.read_text() == "ran"


def test_the_load_itself_refuses_what_the_static_check_might_miss(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    _evil(tmp_path / "state.pt", marker)
    monkeypatch.setattr(ckpt, "check_pickle", lambda *a, **k: None)  # only the weights_only load stands
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt is refused: a safe load stops at it \(.*exec"):
        ckpt.read_entry(tmp_path, "state")
    assert not marker.exists()


def _one_step_run(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--scenario", "understand", "--steps", "1", "--run-dir", str(run)]
    assert main(argv) == 0
    return run, argv


def test_eval_export_and_resume_refuse_a_checkpoint_that_would_run_code(tmp_path, capsys):
    run, argv = _one_step_run(tmp_path)
    step = ckpt.latest_checkpoint(run)
    marker = tmp_path / "ran"
    for f in step.glob("optim.*"):
        f.unlink()
    _evil(step / "optim.pt", marker)  # as an earlier version named it
    capsys.readouterr()
    for cmd, args in (("eval", ["eval", str(run)]), ("export", ["export", str(run), str(tmp_path / "out")]),
                      ("train", [*argv[:-4], "--steps", "2", "--run-dir", str(run)])):
        assert main(args) == 2, cmd
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"unirl-fast {cmd}: checkpoint file {step / 'optim.pt'} is "
                                                   "refused: its pickle calls builtins.exec"), (cmd, err)
        assert not marker.exists(), cmd
    assert not (tmp_path / "out").exists() and ckpt.latest_checkpoint(run) == step
    # the sample sheet's file of an earlier version is read at the end of a run: refused before it starts
    for f in step.glob("optim.*"):
        f.unlink()
    ckpt.write_entry(step, "optim", {"state": {}, "param_groups": []})
    for f in run.glob("samples_before.*"):
        f.unlink()
    _evil(run / "samples_before.pt", marker)
    assert main([*argv[:-4], "--steps", "2", "--run-dir", str(run)]) == 2
    assert "samples_before.pt is refused" in capsys.readouterr().err and not marker.exists()


def test_an_earlier_versions_checkpoint_still_resumes(tmp_path):
    """Checkpoints written before this format (torch.save of the same payload: model.pt, optim.pt, state.pt,
    samples_before.pt) load with weights_only=True and resume exactly."""
    base = dataclasses.replace(SMOKE, scenario="understand", steps=2, save_every=1, temperature=1.5)
    Trainer(dataclasses.replace(base, run_dir=str(tmp_path / "a")), **QUIET).train()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = tmp_path / "b"
    (b / "checkpoints" / "latest").write_text("step-0000001")
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in map(json.loads, open(b / "metrics.jsonl"))
                                             if r["step"] <= 1))
    for d, names in ((b / "checkpoints" / "step-0000001", ("model", "optim", "state")), (b, ("samples_before",))):
        for name in names:
            obj = ckpt.read_entry(d, name)
            for f in d.glob(f"{name}.*"):
                f.unlink()
            torch.save(obj, d / f"{name}.pt")  # what the earlier writer did
    assert sorted(p.name for p in (b / "checkpoints" / "step-0000001").iterdir()) == ["model.pt", "optim.pt",
                                                                                     "state.pt"]
    Trainer(dataclasses.replace(base, run_dir=str(b)), **QUIET).train()
    a2, b2 = _records(tmp_path / "a")[1], _records(b)[1]
    assert b2["step"] == 2 and all(a2[k] == b2[k] for k in ("reward", "text_loss", "grad_norm"))
    assert (b / "samples.png").is_file()  # drawn with the earlier samples_before.pt


def test_eval_and_export_reimport_a_reward_module_without_leaving_the_directory_on_sys_path(tmp_path, monkeypatch):
    """config.json names a reward module beside the command: eval re-imports it (working directory appended for
    the import, removed after), export never imports it."""
    mod = tmp_path / "cwd" / "my_saved_reward.py"
    mod.parent.mkdir()
    mod.write_text("CALLS = []\ndef score(batch):\n    CALLS.append(1)\n    return [1.0] * len(batch)\n")
    run = tmp_path / "run"
    code = ("import sys, json; from unirl_fast.cli import main; cwd = sys.argv[2]; "
            "rc = main(sys.argv[3:]); print(json.dumps({'rc': rc, 'left': [p for p in sys.path if p == cwd], "
            "'imported': 'my_saved_reward' in sys.modules}))")
    train = ["train", "--config", "smoke", "--scenario", "understand", "--steps", "1", "--run-dir", str(run),
             "--reward", "my_saved_reward:score"]
    for args, imported in ((train, True), (["eval", str(run)], True), (["export", str(run), str(tmp_path / "o")],
                                                                        False)):
        out = subprocess.run([sys.executable, "-c", code, "x", str(mod.parent), *args], cwd=mod.parent,
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res == {"rc": 0, "left": [], "imported": imported}, (args[0], res, out.stderr[-2000:])


# task data ------------------------------------------------------------------------------------------------------
def _png(path, colour=(200, 0, 0)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_a_task_path_that_leaves_the_data_directory_is_refused_naming_file_and_line(tmp_path, capsys):
    from unirl_fast.tasks import load_tasks
    from unirl_fast.train.scenarios import get_scenario

    edit = get_scenario("edit")
    data = tmp_path / "data"
    _png(data / "img" / "a.png")
    outside = _png(tmp_path / "elsewhere" / "b.png")
    (data / "img" / "link.png").symlink_to(outside)
    for bad in ("../elsewhere/b.png", str(outside), "img/../../elsewhere/b.png", "img/link.png", "/etc/passwd"):
        rows = [{"prompt": "make it blue", "image": "img/a.png"}, {"prompt": "make it green", "image": bad}]
        (data / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(ValueError, match=rf"p\.jsonl:2: image '{bad}' is outside the data directory .*"
                                             r"--allow-outside-paths"):
            load_tasks(str(data / "p.jsonl"), edit)
    (data / "p.csv").write_text(f"prompt,image\nmake it blue,img/a.png\nmake it red,img/a.png\n"
                                f"make it green,{outside}\n")
    with pytest.raises(ValueError, match=r"p\.csv:4: image .* is outside the data directory"):
        load_tasks(str(data / "p.csv"), edit)
    rows = [{"prompt": f"make it {c}", "image": "img/a.png" if c != "green" else "../elsewhere/b.png"}
            for c in ("blue", "green", "red", "cyan", "pink")]
    (data / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ts = load_tasks(str(data / "p.jsonl"), edit, allow_outside_paths=True)  # asked for: allowed
    assert str(outside.resolve()) in {t.image for t in ts.train + ts.eval}
    argv = ["train", "--config", "smoke", "--scenario", "edit", "--reward", "cycle", "--tasks", str(data / "p.jsonl"),
            "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl:2: image '../elsewhere/b.png' is outside the data directory" in err[0]
    assert not (tmp_path / "run").exists()
    from unirl_fast.train import preflight

    cfg = dataclasses.replace(SMOKE, scenario="edit", reward=("cycle",), tasks=str(data / "p.jsonl"),
                              run_dir=str(tmp_path / "run"), allow_outside_paths=True)
    assert preflight(cfg)["tasks"].name == str(data / "p.jsonl")  # the flag lets it through


def _image_dataset(path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    imgs = [Image.new("RGB", (16, 16), c) for c in ((200, 0, 0), (0, 0, 200), (0, 200, 0), (200, 200, 0))]
    feats = datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image(),
                               "inverse": datasets.Value("string")})
    rows = lambda ids: {"prompt": [f"make the square {i}" for i in ids], "image": [imgs[i] for i in ids],  # noqa: E731
                        "inverse": ["undo"] * len(ids)}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows([0, 1, 2]), features=feats),
                          "test": datasets.Dataset.from_dict(rows([3]), features=feats)}).save_to_disk(str(path))
    return imgs


FINGERPRINT = ("import sys; from unirl_fast.tasks import load_tasks; from unirl_fast.train.scenarios import "
               "get_scenario; print(load_tasks(sys.argv[1], get_scenario('edit')).fingerprint()['sha1'])")


def test_a_datasets_directory_with_images_has_one_fingerprint_in_every_process_and_resumes(tmp_path):
    from unirl_fast.tasks import load_tasks
    from unirl_fast.train.scenarios import get_scenario

    _image_dataset(tmp_path / "ds")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    sums = [subprocess.run([sys.executable, "-c", FINGERPRINT, str(tmp_path / "ds")], capture_output=True, text=True,
                           env=env, timeout=300).stdout.strip() for _ in range(2)]
    here = load_tasks(str(tmp_path / "ds"), get_scenario("edit")).fingerprint()["sha1"]
    assert len(sums[0]) == 40 and sums == [here, here]
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "unirl_fast.cli", "train", "--config", "smoke", "--scenario", "edit", "--reward",
            "cycle", "--tasks", str(tmp_path / "ds"), "--run-dir", str(run), "--steps"]
    for steps in ("1", "2"):  # the second process resumes: its fingerprint must match tasks.json
        out = subprocess.run([*argv, steps], capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and [r["step"] for r in _records(run)] == [1, 2]
    assert json.loads((run / "tasks.json").read_text())["sha1"] == here


def test_dataset_images_are_decoded_when_a_task_uses_them(tmp_path, monkeypatch):
    from PIL import ImageFile

    from unirl_fast.tasks import DatasetImage, load_image, load_tasks
    from unirl_fast.train.scenarios import get_scenario

    imgs = _image_dataset(tmp_path / "ds")
    decoded, real = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real(self))
    ts = load_tasks(str(tmp_path / "ds"), get_scenario("edit"))
    assert decoded == [] and all(isinstance(t.image, DatasetImage) for t in ts.train + ts.eval)
    src = ts.eval[0].source_image(16)
    assert decoded and torch.equal(src, load_image(imgs[3], 16))  # decoded now, for this task


def test_a_task_files_fingerprint_is_what_earlier_versions_recorded(tmp_path):
    """Run directories created before image contents were hashed still resume: for tasks without in-memory images
    the fingerprint is unchanged (the value below is what the previous version computed for this file)."""
    from unirl_fast.tasks import load_tasks
    from unirl_fast.train.scenarios import get_scenario

    rows = [{"prompt": "a red square", "answer": "red", "tag": "colors", "include": [{"class": "square", "count": 1}]},
            {"prompt": "two blue circles"}, {"prompt": "a green star", "context": "c", "n": 3}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fp = load_tasks(str(tmp_path / "p.jsonl"), get_scenario("generate"), eval_fraction=0.4).fingerprint()
    assert fp["sha1"] == "ddcda1bbdae3e26e75326cbcc8ce58c9dc721671"
