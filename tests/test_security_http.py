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
                              reward=("http://192.0.2.7:8000/score",), reward_allow_insecure_token=True,
                              reward_timeout=2.0)
    with pytest.raises(ValueError, match="did not answer GET /health"):  # the flag lets the token through; then
        preflight(cfg)  # preflight asks the service for /health (TEST-NET: nothing answers)
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


# the reference server -------------------------------------------------------------------------------------------
def _png_header_only(w, h) -> str:
    """A real w x h black RGB PNG, built row by row (never w x h x 3 bytes in memory), as base64."""
    import base64
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row, idat = zlib.compressobj(9), b"\0" * (1 + 3 * w), []
    for _ in range(h):
        idat.append(z.compress(row))
    idat.append(z.flush())
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def _post(port, body: bytes, headers=None, *, tls=None):
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=30) if tls else \
        http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read()), dict(r.getheaders())
    finally:
        conn.close()


def _raw(port, data: bytes):
    """Send bytes as they are (a request head that announces more than is sent); the status and JSON answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _samples(n, image=None):
    return json.dumps({"samples": [{"prompt": f"p{i}", "image": image} for i in range(n)]}).encode()


def _vmhwm(pid) -> int:
    """Peak resident memory of a process, bytes."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def test_serve_reward_limits_answer_413_and_bad_requests_400_at_once_and_it_keeps_serving():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.Popen([sys.executable, "-m", "unirl_fast.cli", "serve-reward", "reward_fns:brightness",
                             "--port", "0", "--max-body-mb", "1", "--max-samples", "4", "--quiet"], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        small = _png_header_only(8, 8)
        assert _post(port, _samples(2, small))[0] == 200  # warm: PIL and torch paths loaded before the baseline
        before = _vmhwm(proc.pid)
        huge = _png_header_only(8000, 8000)  # 64 M pixels: 768 MB as float32 once decoded; ~190 kB as sent
        cases = [
            ("body", lambda: _raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: 209715200\r\n\r\n{"), 413,
             "the body is 209715200 bytes; this server takes at most 1048576"),
            ("samples", lambda: _post(port, _samples(5))[:2], 413,
             "5 samples in one request; this server takes at most 4"),
            ("pixels", lambda: _post(port, _samples(1, huge))[:2], 413,
             "sample 0: 'image' is 8000 x 8000 pixels; this server takes at most 16777216 per image"),
            ("json", lambda: _post(port, b'{"samples": [')[:2], 400, "bad request: not JSON"),
            ("png", lambda: _post(port, _samples(1, "aGVsbG8="))[:2], 400,
             "bad request: sample 0: 'image' is not a base64 PNG"),
            ("shape", lambda: _post(port, json.dumps({"samples": [{"completion": "x"}]}).encode())[:2], 400,
             "bad request: sample 0: needs a 'prompt' string"),
        ]
        for name, send, code, msg in cases:
            t0 = time.monotonic()
            status, obj = send()
            seconds = time.monotonic() - t0
            print(f"{name}: HTTP {status} in {seconds:.3f} s")
            assert status == code and obj["error"].startswith(msg) and "\n" not in obj["error"], (name, obj)
            assert len(obj["request_id"]) == 12 and seconds < 3, (name, seconds)  # answered from headers, at once
        grew = _vmhwm(proc.pid) - before
        print(f"peak memory grew by {grew / 2**20:.1f} MiB")
        assert grew < 100 * 2**20  # the 8000 x 8000 image was never decoded
        status, obj, _ = _post(port, _samples(3, small))
        assert status == 200 and len(obj["scores"]) == 3  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_full_server_answers_429_and_the_client_retries_it():
    from unirl_fast.rewards.server import make_server

    entered, release = threading.Event(), threading.Event()

    def slow(batch):
        entered.set()
        release.wait(30)
        return [1.0] * len(batch)

    srv = make_server(slow, workers=1, backlog=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        first, _ = [], None
        th = threading.Thread(target=lambda: first.append(_post(port, _samples(1))), daemon=True)
        th.start()
        assert entered.wait(30)
        status, obj, headers = _post(port, _samples(1))  # the one worker is busy and nothing may wait
        assert status == 429 and "busy" in obj["error"] and headers["Retry-After"] == "1"
        threading.Timer(0.5, release.set).start()
        out = HttpReward(f"http://127.0.0.1:{port}/", retries=6, backoff=0.2)(_batch(2))
        assert out["scores"].tolist() == [1.0, 1.0]  # 429 is retried until the worker is free
        th.join(30)
        assert first[0][0] == 200
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()


def test_the_token_is_compared_in_constant_time(monkeypatch):
    import hmac

    from unirl_fast.rewards import server

    calls, real = [], hmac.compare_digest
    monkeypatch.setattr(server.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    srv = server.make_server(lambda b: [0.0] * len(b), token="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        assert _post(port, _samples(1))[0] == 401
        assert _post(port, _samples(1), {"Authorization": "Bearer s3cre"})[0] == 401
        assert _post(port, _samples(1), {"Authorization": "Bearer s3cret"})[0] == 200
        assert len(calls) == 3
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_failing_reward_shows_the_client_a_request_id_and_logs_the_traceback_under_it():
    from unirl_fast.rewards.server import make_server

    logged = []

    def leaky(batch):
        raise RuntimeError("cannot open /srv/secret/weights.bin")

    srv = make_server(leaky, error_log=logged.append)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, obj, headers = _post(srv.server_address[1], _samples(1))
    finally:
        srv.shutdown()
        srv.server_close()
    assert status == 500 and "secret" not in json.dumps(obj) and "RuntimeError" not in json.dumps(obj)
    assert obj["request_id"] == headers["X-Request-Id"]
    assert len(logged) == 1 and logged[0].startswith(f"request {obj['request_id']}: the reward failed\nTraceback")
    assert "cannot open /srv/secret/weights.bin" in logged[0]


def _self_signed(tmp_path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


def test_tls_server_and_a_client_that_verifies_it_with_a_private_ca(tmp_path, monkeypatch):
    from unirl_fast.rewards.server import make_server

    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("TOK", "s3cret")
    srv = make_server(lambda b: [2.0] * len(b), token="s3cret", certfile=cert, keyfile=key, error_log=lambda t: None)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{srv.server_address[1]}/"
    try:
        err, _ = _run(lambda: HttpReward(url, token_env="TOK", retries=3, backoff=5)(_batch(2)))
        assert isinstance(err, RewardError) and "its TLS certificate was not accepted" in str(err) and \
            "--reward-ca-file" in str(err), err  # not retried: a certificate does not get better
        out = HttpReward(url, token_env="TOK", ca_file=cert)(_batch(2))
        assert out["scores"].tolist() == [2.0, 2.0]
        with pytest.raises(ValueError, match="--reward-ca-file '/nope.pem' is not a file"):
            HttpReward(url, ca_file="/nope.pem")
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(ValueError, match="TLS needs both --certfile and --keyfile"):
        make_server(lambda b: [], certfile=cert)


def test_serve_reward_listens_on_loopback_and_warns_beyond_it():
    from unirl_fast.cli import build_parser
    from unirl_fast.rewards.server import exposure_warning

    assert build_parser(["serve-reward", "x:y"]).parse_args(["serve-reward", "x:y"]).host == "127.0.0.1"
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warning(host, None, False) is None
    assert "without a token: anyone who can reach this port" in exposure_warning("0.0.0.0", None, False)
    assert "without TLS: the token and the samples cross the network" in exposure_warning("::", "t", False)
    assert exposure_warning("10.1.2.3", "t", True) is None


def test_eval_sends_a_token_only_when_its_own_command_line_says_so(tmp_path, serve, monkeypatch, capsys):
    """A run directory's config.json names its reward URLs and token variable: `eval` of it sends no token unless
    --reward-token-env is given to eval itself."""
    record, seen = _recorder()
    url, _ = serve(record)
    monkeypatch.setenv("UNIRL_REWARD_TOKEN", "s3cret")
    run = tmp_path / "run"
    assert main(["train", "--config", "smoke", "--scenario", "generate", "--steps", "1", "--run-dir", str(run),
                 "--tasks", str(_prompts(tmp_path / "p.jsonl")), "--reward", url + "/"]) == 0
    assert seen and all(auth == "Bearer s3cret" for _, _, auth in seen)  # the trainer's own command line
    seen.clear()
    assert main(["eval", str(run)]) == 0
    assert seen and all(auth is None for _, _, auth in seen)
    seen.clear()
    assert main(["eval", str(run), "--reward-token-env", "UNIRL_REWARD_TOKEN"]) == 0
    assert seen and all(auth == "Bearer s3cret" for _, _, auth in seen)
