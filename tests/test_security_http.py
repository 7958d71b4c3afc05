"""Reward services, safe by default (real servers on 127.0.0.1 only): the client follows no redirect and sends its
token only where it cannot be read on the way, every request has a deadline and a size cap, and the first failure
of a call cancels the rest so a failed run exits at once without a checkpoint of the failed step."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from unirl_fast.cli import main
from unirl_fast.rewards import RewardBatch, RewardError
from unirl_fast.rewards.http import HttpReward, check_service, is_loopback
from unirl_fast.tasks import Task
from unirl_fast.train import preflight
from unirl_fast.train.config import PRESETS

HERE = Path(__file__).parent
SMOKE = PRESETS["smoke"]


def _batch(n=3):
    return RewardBatch([Task(f"prompt {i}") for i in range(n)], [f"c{i}" for i in range(n)],
                       torch.zeros(n, 3, 8, 8))


def _prompts(path):
    rows = [{"prompt": f"{c} {s}", "split": "eval" if i % 4 == 0 else "train"}
            for i, (c, s) in enumerate((c, s) for c in ("red", "blue", "green") for s in ("square", "circle",
                                                                                            "star", "ring"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path  # 3 held-out tasks, 9 training tasks


def _scores(handler) -> bytes:
    n = len(json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))["samples"])
    return json.dumps({"scores": [0.5] * n}).encode()


def _reply(handler, code, body=b"", headers=()):
    handler.send_response(code)
    for k, v in headers:
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def serve():
    """serve(handler class) -> base URL of a ThreadingHTTPServer on 127.0.0.1 (stopped after the test)."""
    servers = []

    def start(handler):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _recorder():
    seen = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("Authorization")))
            _reply(self, 200, b'{"scores": [1, 1, 1]}')

        def do_POST(self):
            seen.append(("POST", self.path, self.headers.get("Authorization")))
            _reply(self, 200, _scores(self))

        def log_message(self, *a):
            pass

    return Record, seen


def _redirector(target, code=302):
    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            _reply(self, code, b"moved", [("Location", target)])

        def log_message(self, *a):
            pass

    return Redirect


def _run(fn, limit=20.0):
    """fn() in a thread: (its result or exception, seconds), failing the test when it outlives `limit`."""
    out = {}

    def go():
        t0 = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as e:  # handed back to the test
            out["value"] = e
        out["s"] = time.monotonic() - t0

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(limit)
    assert not th.is_alive(), f"still running after {limit} s"
    return out["value"], out["s"]


# redirects and the token ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_error_and_the_token_never_reaches_the_new_host(serve, monkeypatch, code):
    monkeypatch.setenv("UNIRL_REWARD_TOKEN", "s3cret")
    record, seen = _recorder()
    other, _ = serve(record)
    url, _ = serve(_redirector(other + "/steal", code))
    err, _ = _run(lambda: HttpReward(url + "/score", token_env="UNIRL_REWARD_TOKEN", retries=2)(_batch()))
    assert isinstance(err, RewardError)
    assert f"reward service {url}/score answered HTTP {code}" in str(err)
    assert f"redirecting to '{other}/steal'" in str(err) and "redirects are not followed" in str(err)
    assert seen == []  # neither the samples nor the token went to the other host


def test_a_redirecting_service_stops_the_run_in_one_line(tmp_path, serve, monkeypatch, capsys):
    monkeypatch.setenv("UNIRL_REWARD_TOKEN", "s3cret")
    record, seen = _recorder()
    other, _ = serve(record)
    url, _ = serve(_redirector(other + "/"))
    run = tmp_path / "run"
    assert main(["train", "--config", "smoke", "--scenario", "generate", "--run-dir", str(run), "--tasks",
                 str(_prompts(tmp_path / "p.jsonl")), "--reward", url + "/"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "stopped at step 0" in err[0] and "HTTP 302" in err[0] and other in err[0], err
    assert seen == [] and not (run / "checkpoints").exists()


def test_the_token_goes_only_to_https_or_loopback(monkeypatch):
    monkeypatch.setenv("TOK", "s3cret")
    for host in ("127.0.0.1", "127.9.8.7", "[::1]", "localhost"):
        assert is_loopback(host.strip("[]"))
        HttpReward(f"http://{host}:9/score", token_env="TOK").close()
    HttpReward("https://192.0.2.7/score", token_env="TOK").close()  # TEST-NET: never contacted here
    for url in ("http://192.0.2.7:8000/score", "http://10.0.0.1/", "http://example.com/",
                "http://127.0.0.1.example.com/"):
        with pytest.raises(ValueError, match=r"the bearer token in \$TOK would cross the network unencrypted to "
                                             r".*--reward-allow-insecure-token"):
            HttpReward(url, token_env="TOK")
    HttpReward("http://192.0.2.7:8000/score", token_env="TOK", allow_insecure_token=True).close()
    monkeypatch.delenv("TOK")
    HttpReward("http://192.0.2.7:8000/score", token_env="TOK").close()  # no token, nothing to leak
    check_service("http://192.0.2.7/", token_env=None)


def test_a_token_for_plain_http_elsewhere_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNIRL_REWARD_TOKEN", "s3cret")
    run = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--scenario", "generate", "--run-dir", str(run), "--tasks",
            str(_prompts(tmp_path / "p.jsonl")), "--reward", "http://192.0.2.7:8000/score"]
    t0 = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "$UNIRL_REWARD_TOKEN would cross the network unencrypted to 192.0.2.7" in err[0]
    assert not run.exists() and time.monotonic() - t0 < 60  # refused in preflight: no model was built
    import dataclasses

    cfg = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(run), tasks=str(tmp_path / "p.jsonl"),
                              reward=("http://192.0.2.7:8000/score",), reward_allow_insecure_token=True)
    preflight(cfg)  # the explicit flag lets it through (nothing contacted: preflight does no work)
    with pytest.raises(ValueError, match="reward_ca_file '/nope.pem' is not a file"):
        dataclasses.replace(cfg, reward_ca_file="/nope.pem").validate()


# deadline, size cap, cancellation -------------------------------------------------------------------------------
def _trickler(started):
    """A raw server that reads the request, then sends its answer one byte every 50 ms, forever: each socket read
    gets a byte in time, so only a deadline on the whole request ends it."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def loop():
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            started.append(time.monotonic())
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    def drip(conn):
        conn.recv(1 << 20)
        try:
            for ch in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100000:
                conn.sendall(bytes([ch]))
                time.sleep(0.05)
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return lsock


def test_the_deadline_covers_a_service_that_trickles_its_answer():
    started = []
    lsock = _trickler(started)
    try:
        r = HttpReward(f"http://127.0.0.1:{lsock.getsockname()[1]}/", timeout=0.5, retries=1, backoff=0.01)
        err, seconds = _run(lambda: r(_batch()))
    finally:
        lsock.close()
    assert isinstance(err, RewardError), err
    assert "after 2 attempts (0.5 s deadline each): no complete answer within the 0.5 s deadline" in str(err)
    assert len(started) == 2 and seconds < 10  # two deadlines of 0.5 s, not a wait on the trickle


@pytest.mark.parametrize("declared", [True, False])
def test_an_answer_over_the_size_cap_is_refused(serve, declared):
    class Huge(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # without Content-Length the body runs until the connection closes

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            if declared:
                self.send_header("Content-Length", str(50_000))
            self.end_headers()
            self.wfile.write(b"[" + b"1," * 25_000)

        def log_message(self, *a):
            pass

    url, _ = serve(Huge)
    err, _ = _run(lambda: HttpReward(url, max_response_bytes=10_000, retries=3)(_batch()))
    assert isinstance(err, RewardError) and "the answer is larger than 10000 bytes" in str(err), err


def test_the_first_failure_cancels_the_rest_of_the_call(serve):
    seen, hold = [], threading.Event()

    class HangThenRefuse(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["samples"][0]["index"])
            if len(seen) == 1:
                hold.wait(60)  # chunk one never answers (within the client's 60 s deadline)
                return
            time.sleep(0.2)
            _reply(self, 403, b'{"error": "no"}')

        def log_message(self, *a):
            pass

    url, _ = serve(HangThenRefuse)
    r = HttpReward(url, batch_size=1, concurrency=2, timeout=60, retries=3, backoff=5)
    try:
        err, seconds = _run(lambda: r(_batch(6)))
        time.sleep(0.5)
        assert isinstance(err, RewardError) and "refused samples" in str(err) and "HTTP 403" in str(err), err
        assert len(seen) == 2, seen  # the four queued chunks were never sent
        assert seconds < 10  # not the 60 s the hanging chunk's deadline would take
    finally:
        hold.set()
        r.close()


DYING = r"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
answered, lock = [0], threading.Lock()
class Dying(BaseHTTPRequestHandler):
    def do_POST(self):
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["samples"])
        with lock:
            first_after = answered[0] >= int(sys.argv[1])
            answered[0] += n
        if first_after:  # the service dies: the listener closes, this request hangs, the others are dropped
            if answered[0] - n == int(sys.argv[1]):
                threading.Thread(target=lambda: (srv.shutdown(), srv.socket.close()), daemon=True).start()
                time.sleep(600)
            self.close_connection = True
            return
        body = json.dumps({"scores": [0.5] * n}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = ThreadingHTTPServer(("127.0.0.1", 0), Dying)
srv.daemon_threads = True
print(srv.server_address[1], flush=True)
srv.serve_forever()
time.sleep(600)
"""


def test_a_service_that_dies_mid_run_stops_it_at_once_without_a_checkpoint_of_the_step(tmp_path):
    """Base evaluation (3 samples) and step 1 (4 samples) are answered; in step 2 the service dies with one request
    hanging. The run must stop with one line and exit right after it, not wait out the hanging request's 120 s."""
    service = subprocess.Popen([sys.executable, "-c", DYING, "7"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(service.stdout.readline())
        run = tmp_path / "run"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
        proc = subprocess.Popen([sys.executable, "-m", "unirl_fast.cli", "train", "--config", "smoke", "--scenario",
                                 "generate", "--steps", "3", "--eval-every", "3", "--run-dir", str(run), "--tasks",
                                 str(_prompts(tmp_path / "p.jsonl")), "--reward", f"http://127.0.0.1:{port}/",
                                 "--reward-batch-size", "1", "--reward-concurrency", "2", "--reward-timeout", "120",
                                 "--reward-retries", "1"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True, env=env)
        lines = []
        for line in proc.stderr:  # lines as they come, with the time each arrived
            lines.append((time.monotonic(), line))
        code = proc.wait(timeout=300)
        exited = time.monotonic()
    finally:
        service.kill()
        service.wait()
    stops = [(t, line) for t, line in lines if "stopped at step" in line]
    assert code == 1 and len(stops) == 1, [line for _, line in lines][-5:]
    t_err, msg = stops[0]
    assert "stopped at step 1" in msg and f"reward service http://127.0.0.1:{port}/" in msg
    print(f"exit {exited - t_err:.2f} s after the error line")
    assert exited - t_err < 5  # well under the hanging request's 120 s deadline (measured ~0.1-0.5 s)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000001"]
