"""Preflight (issue: the run as a user meets it, part 2): everything that can be known before the model fails in one
line, exit 2, in about a second, and leaves no run directory behind: reward typos and weights, patterns, LoRA on a
frozen expert, zero cadences, reward services that do not answer /health (or refuse the token), corrupt task images,
a step that cannot fit in memory. config.json is written only once the trainer is built."""
import http.server
import json
import socket
import threading
import time

import pytest

from unirl_fast.cli import main
from unirl_fast.train import preflight as run_preflight
from unirl_fast.train import preflight_checks


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _png(path, size=8):
    from PIL import Image

    Image.new("RGB", (size, size), (200, 30, 30)).save(path)
    return path


def _refused(argv, tmp_path, capsys, needle):
    """main(train ...) exits 2 with one line holding `needle`, fast, and leaves no run directory."""
    run = tmp_path / "run"
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main(["train", "--config", "smoke", "--run-dir", str(run), *argv])
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, (rc, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not run.exists()
    assert took < 5.0, took  # no model built, nothing trained (a generous bound for a loaded CPU)
    return err


@pytest.mark.parametrize("argv, needle", [
    (["--reward", "anwser"], "unknown reward 'anwser' (did you mean 'answer'?)"),
    (["--reward", "answer=abc"], "must be a number, not 'abc'"),
    (["--reward", "format:a(b"], "the pattern is not a regular expression"),
    (["--scenario", "generate", "--lora-lm", "8,16"], "--lora-lm was given but scenario 'generate' does not train"),
    (["--save-every", "0"], "save_every must be >= 1, got 0"),
    (["--eval-every", "0"], "eval_every must be >= 1, got 0"),
], ids=["reward-typo", "reward-weight", "reward-pattern", "lora-frozen-expert", "save-every-0", "eval-every-0"])
def test_config_errors_fail_before_any_work(argv, needle, tmp_path, capsys):
    _refused(argv, tmp_path, capsys, needle)


# reward services: GET /health with the client's timeout and token rules ---------------------------------------------
def _serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def test_an_unreachable_reward_service_fails_before_any_work(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _refused(["--reward", f"http://127.0.0.1:{port}/score", "--reward-timeout", "2"], tmp_path, capsys,
             f"reward service http://127.0.0.1:{port}/score did not answer GET /health")


def test_a_refused_token_fails_before_any_work_and_the_right_one_passes(tmp_path, capsys, monkeypatch):
    from unirl_fast.rewards.server import make_server

    srv = make_server(lambda b: [0.0] * len(b), token="s3cret", log=None)
    port = _serve(srv)
    try:
        monkeypatch.setenv("UNIRL_REWARD_TOKEN", "wrong")
        _refused(["--reward", f"http://127.0.0.1:{port}/score"], tmp_path, capsys,
                 "answered GET /health with HTTP 401: the bearer token was refused ($UNIRL_REWARD_TOKEN)")
        monkeypatch.delenv("UNIRL_REWARD_TOKEN")
        _refused(["--reward", f"http://127.0.0.1:{port}/score"], tmp_path, capsys, "(set $UNIRL_REWARD_TOKEN)")
        monkeypatch.setenv("UNIRL_REWARD_TOKEN", "s3cret")
        cfg = _cfg(tmp_path, reward=(f"http://127.0.0.1:{port}/score",))
        assert run_preflight(cfg)["notes"] == []
        assert not (tmp_path / "run").exists()
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_service_without_a_health_route_passes_with_a_note(tmp_path):
    class NoHealth(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoHealth)
    port = _serve(srv)
    try:
        notes = run_preflight(_cfg(tmp_path, reward=(f"http://127.0.0.1:{port}/score",)))["notes"]
    finally:
        srv.shutdown()
        srv.server_close()
    assert notes == [f"reward service http://127.0.0.1:{port}/score: GET /health answered HTTP 404 (no health "
                     "route); it is reachable"]


def _cfg(tmp_path, **over):
    import dataclasses

    from unirl_fast.train import PRESETS

    return dataclasses.replace(PRESETS["smoke"], run_dir=str(tmp_path / "run"), **over).validate()


# task images ---------------------------------------------------------------------------------------------------------
def _edit_tasks(tmp_path, bad: bytes | None):
    good = _png(tmp_path / "good.png")
    rows = [{"prompt": f"make it blue {i}", "image": good.name, "split": "eval" if i < 2 else "train"}
            for i in range(6)]
    if bad is not None:
        (tmp_path / "bad.png").write_bytes(bad)
        rows.append({"prompt": "make it green", "image": "bad.png", "split": "train"})
    return _rows(tmp_path / "edits.jsonl", rows)


def test_a_corrupt_task_image_fails_before_any_work(tmp_path, capsys):
    good = (tmp_path / "x.png")
    _png(good, 64)
    truncated = good.read_bytes()[:60]  # a valid PNG header, the pixels cut off: found only by decoding
    tasks = _edit_tasks(tmp_path, truncated)
    _refused(["--scenario", "edit", "--tasks", tasks, "--reward", "answer"], tmp_path, capsys,
             "edits.jsonl:7: image")
    _refused(["--scenario", "edit", "--tasks", _edit_tasks(tmp_path, b"not an image"), "--reward", "answer"],
             tmp_path, capsys, "cannot be read as an image")


def test_big_image_sets_read_headers_only_and_say_so(tmp_path, monkeypatch):
    P = run_preflight
    monkeypatch.setattr(preflight_checks, "IMAGE_DECODE_BYTES", 0)
    good = (tmp_path / "x.png")
    _png(good, 64)
    cfg = _cfg(tmp_path, scenario="edit", tasks=_edit_tasks(tmp_path, good.read_bytes()[:60]), reward=("answer",))
    notes = P(cfg)["notes"]
    assert any(n.startswith("task images: 2 checked, headers read") for n in notes), notes
    with pytest.raises(ValueError, match="cannot be read as an image"):
        P(_cfg(tmp_path, scenario="edit", tasks=_edit_tasks(tmp_path, b"junk"), reward=("answer",)))


# memory -----------------------------------------------------------------------------------------------------------
def test_a_step_that_cannot_fit_is_refused_naming_the_flag(tmp_path, capsys, monkeypatch):
    """The newcomer's --group-size 100000 (it took 17 of 24 GB in 2 minutes) on a machine with 24 GB available."""
    monkeypatch.setattr(preflight_checks, "_available", lambda dev, torch: (24 * 2 ** 30, "this machine's RAM"))
    err = _refused(["--group-size", "100000"], tmp_path, capsys, "lower --group-size or --prompts-per-step")
    assert "one step needs about" in err and "but this machine's RAM has 24.0 GiB" in err
    assert run_preflight(_cfg(tmp_path))["notes"] == []  # the smoke run fits


def test_the_bound_counts_the_whole_batch_rollout():
    import torch

    from unirl_fast.models import UnifiedModel
    from unirl_fast.models.plan import memory_plan
    from unirl_fast.train.pretrain import world_model_config

    with torch.device("meta"):
        m = UnifiedModel(world_model_config("tiny", False))
    kw = dict(train_lm=True, train_dit=True, micro_batch=4, prompt_len=64, completion_len=40, trained_steps=2, gpus=1,
              precision="fp32", rollout={"lm_writes": True, "draws": True, "guidance": False})
    small, big = (memory_plan(m, batch=b, **kw)["stages"][0] for b in (16, 16000))
    assert big["activations"] == small["activations"]  # one micro-batch either way
    assert big["rollout"] > 900 * small["rollout"]  # the rollout holds the whole batch (x1000)
    assert big["total"] > 10 * small["total"]


def test_config_json_is_written_only_once_the_trainer_is_built(tmp_path, monkeypatch, capsys):
    import unirl_fast.train.setup as S

    def broken(*a, **k):
        raise ValueError("reward could not be built")

    monkeypatch.setattr(S, "build_run_reward", broken)
    assert main(["train", "--config", "smoke", "--run-dir", str(tmp_path / "run")]) == 2
    assert "reward could not be built" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()
    monkeypatch.undo()
    assert main(["train", "--config", "smoke", "--run-dir", str(tmp_path / "run"), "--group-size", "4",
                 "--steps", "1"]) == 0  # another setting: no "holds a run with other settings"
