"""Rewards (unirl_fast.rewards): the interface and its checks, the weighted sum, Python callables by import path,
the HTTP client against real local servers (batching, timeout, retried failures, a service that keeps failing, a
malformed answer, a bearer token), the reference server, the CLIP-style reward on a tiny random CLIP, and runs of
the trainer on a JSONL prompt file with a weighted pair of rewards, one served over HTTP."""
import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import reward_fns
import torch

from unirl_fast import world as W
from unirl_fast.cli import main
from unirl_fast.rewards import RewardBatch, RewardError, as_result, build_reward, load_callable, parse_spec
from unirl_fast.rewards.http import HttpReward
from unirl_fast.rewards.server import make_server
from unirl_fast.tasks import Task
from unirl_fast.train import PRESETS, Trainer
from unirl_fast.train.plots import reward_series
from unirl_fast.train.scenarios import get_scenario

HERE = Path(__file__).parent


def _batch(n=5, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = [Task(f"prompt {i}" + "x" * i, answer=f"a{i}", meta={"i": i}, origin=f"t.jsonl:{i + 1}") for i in range(n)]
    return RewardBatch(tasks, [f"a{i}" if i % 2 else "no" for i in range(n)],
                       torch.rand(n, 3, size, size, generator=g) * 2 - 1)


@pytest.fixture
def serve():
    """serve(fn or handler class, **kw) -> base URL of a server on 127.0.0.1 (stopped after the test)."""
    servers = []

    def start(fn, **kw):
        if isinstance(fn, type):
            srv = ThreadingHTTPServer(("127.0.0.1", 0), fn)
        else:
            srv = make_server(fn, "127.0.0.1", 0, **kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


# the interface ------------------------------------------------------------------------------------------------
def test_parse_spec_and_weights():
    assert parse_spec("world") == ("world", 1.0)
    assert parse_spec("format=0.2") == ("format", 0.2)
    assert parse_spec("http://h:8/score?x=y") == ("http://h:8/score?x=y", 1.0)  # not a number after '='
    assert parse_spec("http://h:8/s?x=y=2") == ("http://h:8/s?x=y", 2.0)
    for bad, match in (("=1", "no reward before the weight"), ("", "non-empty"), ("a=nan", "finite")):
        with pytest.raises(ValueError, match=match):
            parse_spec(bad)


def test_as_result_accepts_the_documented_answers_and_names_bad_samples():
    b = _batch(3)
    assert as_result([1, 2.5, 0], b, "r").scores.tolist() == [1.0, 2.5, 0.0]
    r = as_result({"scores": torch.ones(3), "parts": {"p": (0, 1, 2)}}, b, "r")
    assert r.parts["p"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(RewardError, match=r"reward 'r': expected 3 numbers \(one per sample\), got 4"):
        as_result([0] * 4, b, "r")
    with pytest.raises(RewardError, match=r"reward 'r': sample 1 \(prompt 'prompt 1x'\) got nan"):
        as_result([0, float("nan"), 0], b, "r")
    with pytest.raises(RewardError, match=r"reward 'r' part 'p': sample 2 .* got 'x'"):
        as_result({"scores": [0, 0, 0], "parts": {"p": [0, 0, "x"]}}, b, "r")
    with pytest.raises(RewardError, match="needs 'scores'"):
        as_result({"score": [0, 0, 0]}, b, "r")
    with pytest.raises(RewardError, match="expected 3 numbers, got NoneType"):
        as_result(None, b, "r")


def test_weighted_sum_of_callables_by_import_path_with_labels_and_parts():
    b = _batch(4)
    r = build_reward(["reward_fns:brightness=2", "reward_fns:prompt_length=0.5", "answer"])
    out = r(b)
    bright = (b.images + 1).div(2).mean(dim=(1, 2, 3)).double()
    length = torch.tensor([len(p) / 100 for p in b.prompts], dtype=torch.float64)
    answer = torch.tensor([float(c == t.answer) for c, t in zip(b.completions, b.tasks)], dtype=torch.float64)
    torch.testing.assert_close(out.scores, 2 * bright + 0.5 * length + answer)
    assert set(out.parts) == {"brightness", "brightness/red", "prompt_length", "answer"}
    torch.testing.assert_close(out.parts["brightness"], bright)  # unweighted
    one = build_reward(["reward_fns:brightness"])(b)
    assert set(one.parts) == {"red"}  # one term: its own parts
    twice = build_reward(["answer", "answer=2"])
    assert [t.label for t in twice.terms] == ["answer", "answer_2"]
    with pytest.raises(RewardError, match=r"reward 'wrong_length': expected 4 numbers"):
        build_reward(["reward_fns:wrong_length"])(b)
    with pytest.raises(RewardError, match=r"reward 'not_finite': sample 3 .* got nan"):
        build_reward(["reward_fns:not_finite"])(b)


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:f", r"no module 'no_such_module_xyz' in the working directory or on the Python path "
                             r"\(searched: "),
    ("reward_fns:nope", r"'reward_fns' has no attribute 'nope'"),
    ("reward_fns:NOT_CALLABLE", r"is a int, not a callable"),
    ("what", r"unknown reward 'what'"),
    ("world", r"needs a scenario"),
    ("format", r"needs a scenario"),
])
def test_bad_reward_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        build_reward([spec])


def test_a_reward_module_beside_the_command_imports_without_touching_sys_path(tmp_path, monkeypatch):
    (tmp_path / "my_local_rewards.py").write_text("def score(batch):\n    return [0.5] * len(batch)\n")
    (tmp_path / "my_local_pkg").mkdir()
    (tmp_path / "my_local_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_local_pkg" / "scores.py").write_text("def one(batch):\n    return [1.0] * len(batch)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    assert load_callable("my_local_rewards:score").__name__ == "score"
    assert load_callable("my_local_pkg.scores:one").__name__ == "one"
    assert sys.path == before  # appended for the import, then removed: never in front of installed packages


@pytest.mark.parametrize("name", ["json", "torch"])
def test_a_local_file_named_like_an_installed_module_is_refused(tmp_path, monkeypatch, name):
    (tmp_path / f"{name}.py").write_text("def score(batch):\n    return [0.0] * len(batch)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(ValueError, match=rf"{tmp_path / name}\.py has the name of the installed module '{name}' "
                                         rf"\(.*{name}.*\): rename your file"):
        load_callable(f"{name}:score")
    assert getattr(__import__(name), "__file__", "") != str(tmp_path / f"{name}.py")


def test_world_reward_is_the_world_verifier_and_format_takes_a_pattern():
    sc = get_scenario("reason-generate")
    tasks = W.generation_tasks("train")[:3]
    imgs = torch.stack([W.render_scene(W.scene_of(t.spec), 32) for t in tasks])
    texts = [tasks[0].canonical, "nonsense", tasks[2].canonical]
    out = build_reward(["world"], scenario=sc, format_weight=0.2)(RewardBatch(tasks, texts, imgs))
    assert out.parts["image"].tolist() == [1.0, 1.0, 1.0] and out.parts["format"].tolist() == [1.0, 0.0, 1.0]
    assert out.scores.tolist() == [1.2, 1.0, 1.2]
    pat = build_reward(["format:^[a-z ]+$"])(RewardBatch(tasks, ["ok text", "Not ok", " fine "], imgs))
    assert pat.scores.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="give the form as format:REGEX"):
        build_reward(["format"], scenario=sc)(RewardBatch([Task("p", origin="f:1")], ["x"]))
    with pytest.raises(RewardError, match=r"reward 'world' scores the embedded world's tasks only .* f:1"):
        build_reward(["world"], scenario=sc)(RewardBatch([Task("p", origin="f:1")], ["x"], imgs[:1]))


# HTTP ------------------------------------------------------------------------------------------------------------
def test_http_round_trip_batching_and_concurrency(serve):
    seen, lock, inflight = [], threading.Lock(), {"now": 0, "max": 0}

    def slow_bright(batch):
        with lock:
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
            seen.append(len(batch))
        time.sleep(0.2)
        with lock:
            inflight["now"] -= 1
        return reward_fns.brightness(batch)

    b = _batch(7)
    r = HttpReward(serve(slow_bright), batch_size=3, concurrency=2)
    out = as_result(r(b), b, "http")
    local = as_result(reward_fns.brightness(b), b, "local")
    # the images travel as 8-bit PNGs: brightness within half a grey level
    torch.testing.assert_close(out.scores, local.scores, atol=0.5 / 255, rtol=0)
    torch.testing.assert_close(out.parts["red"], local.parts["red"], atol=0.5 / 255, rtol=0)
    assert sorted(seen) == [1, 3, 3] and inflight["max"] == 2
    r.close()


def test_http_meta_and_text_reach_the_service(serve):
    got = {}

    def echo(batch):
        got["meta"], got["completions"], got["answers"] = batch.metas, batch.completions, batch.answers
        return [t.meta["i"] for t in batch.tasks]

    b = _batch(3)
    assert as_result(HttpReward(serve(echo))(b), b, "e").scores.tolist() == [0.0, 1.0, 2.0]
    assert got == {"meta": [{"i": 0}, {"i": 1}, {"i": 2}], "completions": b.completions, "answers": b.answers}


def test_http_timeout_then_retry_then_error(serve):
    def sleepy(batch):
        time.sleep(1.0)
        return [0.0] * len(batch)

    r = HttpReward(serve(sleepy) + "/score", timeout=0.2, retries=1, backoff=0.01)
    t0 = time.time()
    with pytest.raises(RewardError, match=r"reward service http://127\.0\.0\.1:\d+/score failed for samples 0\.\.2 "
                                          r"\(first prompt 'prompt 0'\) after 2 attempts \(0\.2 s deadline each\)"):
        r(_batch(3))
    assert time.time() - t0 < 1.5


def test_http_fails_twice_then_answers_is_retried(serve):
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("warming up")
        return [1.0] * len(batch)

    b = _batch(2)
    assert as_result(HttpReward(serve(flaky), retries=2, backoff=0.01)(b), b, "f").scores.tolist() == [1.0, 1.0]
    assert calls["n"] == 3


def test_http_always_failing_and_refusing_services(serve):
    def broken(batch):
        raise RuntimeError("the detector crashed")

    with pytest.raises(RewardError, match=r"after 3 attempts .*HTTP 500: .*the reward failed.*request_id") as e:
        HttpReward(serve(broken), retries=2, backoff=0.01)(_batch(2))
    assert "detector" not in str(e.value)  # the exception's text stays in the server's log
    url = serve(reward_fns.brightness, token="s3cret")
    with pytest.raises(RewardError, match=r"refused samples 0\.\.1 .*HTTP 401"):  # not retried
        HttpReward(url, retries=5, backoff=10)(_batch(2))
    with pytest.raises(RewardError, match=r"after 1 attempts .*(Connection|refused)"):
        HttpReward("http://127.0.0.1:9/", retries=0)(_batch(2))


def test_http_bearer_token_from_the_environment(serve, monkeypatch):
    url = serve(reward_fns.prompt_length, token="s3cret")
    monkeypatch.setenv("MY_TOKEN", "s3cret")
    b = _batch(2)
    assert len(as_result(HttpReward(url, token_env="MY_TOKEN")(b), b, "t").scores) == 2
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(ValueError, match="'MY_TOKEN' is not set"):
        HttpReward(url, token_env="MY_TOKEN", token_required=True)


class _Garbage(BaseHTTPRequestHandler):
    answers = {"/notjson": b"<html>oops</html>", "/short": b'{"scores": [0.5]}',
               "/nan": b'{"scores": [0.5, NaN]}', "/parts": b'{"scores": [1, 2], "parts": [1, 2]}'}

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = self.answers[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("path, match", [
    ("/notjson", r"samples 0\.\.1: the answer is not JSON"),
    ("/short", r"samples 0\.\.1 .*expected 2 numbers \(one per sample\), got 1"),
    ("/nan", r"sample 1 \(prompt 'prompt 1x'\) got nan"),
    ("/parts", r"'parts' must map names"),
])
def test_http_malformed_answers_are_clear_errors(serve, path, match):
    with pytest.raises(RewardError, match=match):
        HttpReward(serve(_Garbage) + path, retries=3, backoff=10)(_batch(2))  # not retried: would take 10 s


def test_serve_reward_cli(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "unirl_fast.cli", "serve-reward", "reward_fns:brightness=2",
                             "--port", "0", "--quiet"], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving reward 2 x brightness at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]
        b = _batch(3)
        out = as_result(HttpReward(url)(b), b, "srv")
        torch.testing.assert_close(out.scores, 2 * as_result(reward_fns.brightness(b), b, "x").scores,
                                   atol=1 / 255, rtol=0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert main(["serve-reward", "nope_mod:f"]) == 2


# CLIP-style ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("clip")
    words = ["[PAD]", "[UNK]", "a", "red", "blue", "square", "circle", "on", "the", "left", "right", "prompt"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=24, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    return d


def test_clip_and_pickscore_rewards(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    from unirl_fast.rewards.clip import OPENAI_MEAN, OPENAI_STD

    tasks = [Task("a red square on the left"), Task("a blue circle on the right"), Task("a red circle")]
    imgs = torch.rand(3, 3, 24, 24) * 2 - 1  # already the vision tower's size: no resize
    b = RewardBatch(tasks, [""] * 3, imgs)
    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), AutoTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        px = ((imgs + 1) / 2 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        v = model.vision_model(pixel_values=px).pooler_output
        t_in = tok([t.prompt for t in tasks], padding=True, return_tensors="pt")
        t = model.text_model(input_ids=t_in["input_ids"], attention_mask=t_in["attention_mask"]).pooler_output
        iv = torch.nn.functional.normalize(model.visual_projection(v), dim=-1)
        tv = torch.nn.functional.normalize(model.text_projection(t), dim=-1)
        cos = (iv * tv).sum(-1)
    clip = build_reward([f"clip:{tiny_clip}"])
    pick = build_reward([f"pickscore:{tiny_clip}=0.5"])
    torch.testing.assert_close(clip(b).scores.float(), 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pick(b).scores.float(), 0.5 * model.logit_scale.exp() * cos, atol=1e-4, rtol=1e-5)
    big = RewardBatch(tasks, [""] * 3, torch.nn.functional.interpolate(imgs, size=48))  # resized to 24 inside
    assert clip(big).scores.shape == (3,)
    with pytest.raises(ValueError, match="not a transformers model directory"):
        build_reward([f"clip:{tiny_clip / 'nope'}"])


# the trainer on a user's prompts and rewards ----------------------------------------------------------------------
SMOKE = PRESETS["smoke"]
QUIET = dict(log=lambda *_: None)


def _prompts(path, n=12):
    rows = [{"prompt": f"{c} {s} on the {r}", "split": "eval" if i % 4 == 0 else "train"}
            for i, (c, s, r) in enumerate([(c, s, r) for c in ("red", "blue", "green") for s in ("square", "circle")
                                           for r in ("left", "right")][:n])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_on_a_jsonl_file_with_a_weighted_pair_one_over_http(tmp_path, serve, capsys):
    url = serve(reward_fns.brightness) + "/bright"
    run = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--scenario", "generate", "--steps", "3", "--run-dir", str(run),
            "--tasks", str(_prompts(tmp_path / "p.jsonl")), "--reward", "reward_fns:prompt_length=0.5",
            "--reward", f"{url}=1.0", "--eval-every", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["tasks"] == str(tmp_path / "p.jsonl") and saved["reward"] == ["reward_fns:prompt_length=0.5",
                                                                                f"{url}=1.0"]
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r for r in recs if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert {"reward_prompt_length", "reward_bright", "reward_bright/red"} <= set(r)
        assert r["reward"] == pytest.approx(0.5 * r["reward_prompt_length"] + r["reward_bright"], abs=1e-6)
    evals = [r for r in recs if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and "eval_reward_bright" in evals[0]
    assert "bright/red" in out and "prompt_length" in out  # the log line
    assert {"train bright", "train bright/red", "train prompt_length"} <= set(reward_series(recs))
    assert (run / "rewards.png").is_file() and (run / "samples.png").is_file()


def test_a_reward_service_that_keeps_failing_stops_the_run_without_a_bad_checkpoint(tmp_path, serve, capsys,
                                                                                     monkeypatch):
    monkeypatch.setitem(reward_fns.CALLS, "n", 0)
    # base evaluation (1 call), step 1 (2 calls: a service's rollout comes in 2 chunks here), then it breaks
    monkeypatch.setitem(reward_fns.CALLS, "fail_from", 4)
    url = serve(reward_fns.counted)
    run = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--scenario", "generate", "--steps", "3", "--run-dir", str(run),
            "--tasks", str(_prompts(tmp_path / "p.jsonl")), "--reward", url, "--reward-retries", "1",
            "--eval-every", "3"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "stopped at step 1" in err and f"reward service {url}" in err and "the reward failed" in err
    rid = re.search(r'"request_id": "([0-9a-f]{12})"', err).group(1)  # the client's line names the request id ...
    assert f"request {rid}: the reward failed" in err and "the detector crashed" in err  # ... the server's log it
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000001"]
    assert [(r["phase"], r["step"]) for r in map(json.loads, open(run / "metrics.jsonl"))] == [("eval", 0),
                                                                                               ("train", 1)]


def test_edit_on_user_images_with_cycle_and_understand_on_a_csv(tmp_path):
    from unirl_fast.rewards import to_pil

    rows = []
    for i, (c, new) in enumerate([("red", "blue"), ("blue", "green"), ("green", "red"), ("cyan", "yellow")]):
        to_pil(W.render_scene(W.Scene((W.Obj(c, "square", "left"),)), 32)).save(tmp_path / f"{i}.png")
        rows.append({"prompt": f"make the square {new}", "image": f"{i}.png", "inverse": f"make the square {c}",
                     "split": "eval" if i == 3 else "train"})
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dataclasses.replace(SMOKE, scenario="edit", run_dir=str(tmp_path / "edit"),
                              tasks=str(tmp_path / "edits.jsonl"), reward=("cycle", "reward_fns:brightness=0.1"))
    Trainer(cfg, **QUIET).train()
    rec = [json.loads(line) for line in open(tmp_path / "edit" / "metrics.jsonl")][1]
    assert 0 < rec["reward_cycle"] <= 1 and rec["reward"] == pytest.approx(rec["reward_cycle"] +
                                                                           0.1 * rec["reward_brightness"], abs=1e-6)
    (tmp_path / "q.csv").write_text("prompt,context,answer,split\nwhat colour?,one red square,red,train\n"
                                    "how many?,two blue circles,two,train\n"
                                    "where?,one cyan square on the left,left,eval\n")
    cfg = dataclasses.replace(SMOKE, scenario="understand", run_dir=str(tmp_path / "und"),
                              tasks=str(tmp_path / "q.csv"), reward=("answer", "format:^[a-z]+$=0.1"))
    Trainer(cfg, **QUIET).train()
    rec = [json.loads(line) for line in open(tmp_path / "und" / "metrics.jsonl")][1]
    assert {"reward_answer", "reward_format"} <= set(rec)


def test_preflight_errors_for_user_data(tmp_path, capsys):
    p = _prompts(tmp_path / "p.jsonl")
    base = ["train", "--config", "smoke", "--run-dir", str(tmp_path / "r"), "--tasks", str(p)]
    for extra, match in ((["--scenario", "generate"], "reward 'world' is the embedded world's .* give --reward"),
                         (["--scenario", "generate", "--reward", "format"], "give the form as format:REGEX"),
                         (["--scenario", "generate", "--reward", "cycle"], "reward 'cycle' needs an edit scenario"),
                         (["--scenario", "understand", "--reward", "answer"], "needs a 'context'"),
                         (["--scenario", "generate", "--reward", "clip:/nope"], "not a transformers model"),
                         (["--scenario", "generate", "--reward", "reward_fns:nope"], "has no attribute 'nope'"),
                         (["--tasks", str(tmp_path / "missing.jsonl")], "no such file or directory")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), (extra, err)
    assert not (tmp_path / "r").exists()
