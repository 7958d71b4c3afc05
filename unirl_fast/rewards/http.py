"""Rewards over HTTP: a client the trainer calls, and a small reference server that puts any reward on another machine.

Protocol (JSON, one POST per chunk of at most `batch_size` samples):

    request   {"samples": [{"index": i, "prompt": str, "completion": str, "answer": str, "meta": {...},
                            "image": PNG as base64 | null, "cycled": ... | null, "source": ... | null}, ...]}
    answer    {"scores": [one number per sample], "parts": {"name": [one number per sample], ...}}   (parts optional)

`index` is the sample's position in the trainer's batch. Images are 8-bit RGB PNGs of the [-1, 1] images.
An optional bearer token (`Authorization: Bearer <token>`) is read from an environment variable on both sides.
`GET /health` on the service's host answers 200 when it is up (with the token, when the server has one): the trainer
asks it once before any work (`probe_health`); a service without that route (404 / 405 / 501) passes with a
note.

Client (`HttpReward`), safe by default:
- no redirect is followed: a 3xx is an error naming the service and its Location (following one would re-send the
  samples and the token to another host, and turn the POST into a GET);
- the bearer token (`Authorization: Bearer <token>`, read from the environment variable `token_env`) goes only to
  https:// URLs and to loopback http:// (127.0.0.0/8, ::1, localhost); with a token set, any other http:// URL is
  refused before any work unless `allow_insecure_token=True` (`--reward-allow-insecure-token`);
- TLS certificates are always verified: the system's CAs, or only `ca_file` (`--reward-ca-file`, a private CA);
- every attempt has a deadline of `timeout` seconds for connect, send and the whole answer (a watchdog closes the
  socket, so a service trickling bytes cannot hold it), and an answer over `max_response_bytes` is an error;
- chunks are sent concurrently (at most `concurrency` in flight, on daemon threads); a connection error, a missed
  deadline, HTTP 408 / 429 or a 5xx is retried up to `retries` times with exponential backoff (backoff,
  2 x backoff, ... capped at 30 s); any other answer that is not the protocol's (another status, not JSON, wrong
  length, a non-finite score) stops at once;
- the first failure ends the whole call: queued chunks are never sent, backoff sleeps and in-flight sockets are cut,
  and RewardError (naming the service, the samples and the first sample's prompt) is raised at once, so a failed run
  exits without waiting on the service. A run never trains on a made-up reward.

The reference server (`unirl-fast serve-reward`, `make_server`) is in `unirl_fast.rewards.server`.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import io
import ipaddress
import json
import os
import queue
import socket
import ssl
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from urllib.parse import urlsplit

import torch

from .base import RewardBatch, RewardError, as_result, to_pil

RETRY_STATUS = (408, 429)
MAX_RESPONSE_BYTES = 16 << 20  # a scores answer for a chunk is a few kB


# images <-> PNG -------------------------------------------------------------------------------------------------
def encode_png(img) -> str | None:
    if img is None:
        return None
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def encode_samples(b: RewardBatch, rows) -> bytes:
    samples = []
    for i in rows:
        t = b.tasks[i]
        samples.append({"index": i, "prompt": t.prompt, "completion": b.completions[i], "answer": t.answer,
                        "meta": t.meta, "image": encode_png(None if b.images is None else b.images[i]),
                        "cycled": encode_png(None if b.cycled is None else b.cycled[i]),
                        "source": encode_png(None if b.sources is None else b.sources[i])})
    try:
        return json.dumps({"samples": samples}, default=_jsonable).encode()
    except (TypeError, ValueError) as e:
        raise RewardError(f"the tasks' meta cannot be sent as JSON ({e}); first task "
                          f"{b.tasks[rows[0]].origin}") from None


# client ---------------------------------------------------------------------------------------------------------
class _Retry(Exception):
    """An attempt failed in a way another attempt may fix (connection, deadline, 408 / 429 / 5xx)."""


class _Cancelled(Exception):
    """Another chunk of the same call failed: this one stops without a word."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name localhost: traffic that never leaves the machine."""
    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_service(url: str, *, token_env: str | None = None, allow_insecure_token: bool = False,
                  ca_file: str | None = None) -> None:
    """What can be checked of a reward service before any work (ValueError, one line): an http(s) URL with a host,
    a readable CA file, and no bearer token crossing the network in clear text. `token_env`: the variable holding
    the token when it is set (None: no token is sent)."""
    u = urlsplit(url)
    try:
        u.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        raise ValueError(f"reward service {url}: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"reward service url must be http(s)://HOST[:PORT]/PATH, got {url!r}")
    if ca_file is not None and not os.path.isfile(ca_file):
        raise ValueError(f"reward service {url}: --reward-ca-file {ca_file!r} is not a file")
    if token_env and u.scheme == "http" and not is_loopback(u.hostname) and not allow_insecure_token:
        raise ValueError(f"reward service {url}: the bearer token in ${token_env} would cross the network unencrypted "
                         f"to {u.hostname}: use https://, a loopback address, or pass --reward-allow-insecure-token "
                         f"(or unset {token_env})")


def probe_health(url: str, *, timeout: float, token_env: str | None = None, allow_insecure_token: bool = False,
                 ca_file: str | None = None) -> str | None:
    """Before any work: whether the service at `url` answers GET /health (on its host) within `timeout`, reached as
    HttpReward reaches it (its token rules, TLS verification, no redirect). None when it answers 2xx; a note when it
    answers 404 / 405 / 501 (reachable, no health route); ValueError (one line) otherwise."""
    client = HttpReward(url, timeout=timeout, retries=0, concurrency=1, token_env=token_env,
                        allow_insecure_token=allow_insecure_token, ca_file=ca_file)
    try:
        status = client.health()
    except RewardError as e:
        raise ValueError(f"{e} (checked before any work; start it, or fix --reward)") from None
    finally:
        client.close()
    if status < 300:
        return None
    if status in (404, 405, 501):
        return f"reward service {url}: GET /health answered HTTP {status} (no health route); it is reachable"
    why = {401: "the bearer token was refused" + (f" (${token_env})" if client.token else f" (set ${token_env})"),
           403: "forbidden"}.get(status, "redirects are not followed" if 300 <= status < 400 else "not healthy")
    raise ValueError(f"reward service {url} answered GET /health with HTTP {status}: {why} (checked before any work)")


class _DaemonPool:
    """A fixed set of daemon threads running submitted calls. concurrent.futures' pool joins its threads when the
    interpreter exits, so one request stuck on a dead service would hold a finished (or failed) process for its
    whole deadline and retries."""

    def __init__(self, n: int, name: str):
        self._q = queue.SimpleQueue()
        self._n = n
        for i in range(n):
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True).start()

    def submit(self, fn, *args) -> Future:
        f = Future()
        self._q.put((f, fn, args))
        return f

    def _run(self):
        while (item := self._q.get()) is not None:
            f, fn, args = item
            if not f.set_running_or_notify_cancel():
                continue
            try:
                f.set_result(fn(*args))
            except BaseException as e:  # handed to the caller through the future
                f.set_exception(e)

    def close(self):
        for _ in range(self._n):
            self._q.put(None)


def _shut(conn) -> None:
    """Wake whatever blocks on the connection's socket (a read, a write): it fails at once."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class HttpReward:
    def __init__(self, url: str, *, label: str = "http", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, concurrency: int = 4, batch_size: int = 32, token_env: str | None = None,
                 token_required: bool = False, allow_insecure_token: bool = False, ca_file: str | None = None,
                 max_response_bytes: int = MAX_RESPONSE_BYTES):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward service url must start with http:// or https://, got {url!r}")
        for name, v, lo in (("timeout", timeout, 0), ("backoff", backoff, -1e-9)):
            if not v > lo:
                raise ValueError(f"reward service {url}: {name} must be > {max(lo, 0)}, got {v}")
        for name, v, lo in (("retries", retries, 0), ("concurrency", concurrency, 1), ("batch_size", batch_size, 1),
                            ("max_response_bytes", max_response_bytes, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"reward service {url}: {name} must be an integer >= {lo}, got {v!r}")
        self.url, self.label = url, label
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.concurrency, self.batch_size, self.max_response_bytes = concurrency, batch_size, max_response_bytes
        self.token = os.environ.get(token_env) if token_env else None
        if token_required and not self.token:
            raise ValueError(f"reward service {url}: the bearer token's environment variable {token_env!r} is not set")
        check_service(url, token_env=token_env if self.token else None, allow_insecure_token=allow_insecure_token,
                      ca_file=ca_file)
        u = urlsplit(url)
        self._host, self._port, self._https = u.hostname, u.port, u.scheme == "https"
        self._target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._ssl = None
        if self._https:  # verification always on: the system's CAs, or only the given one
            try:
                self._ssl = ssl.create_default_context(cafile=ca_file)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"reward service {url}: cannot use --reward-ca-file {ca_file!r} ({e})") from None
        self._live, self._lock = {}, threading.Lock()  # open connection -> the cancel event of its call
        self._pool = _DaemonPool(concurrency, "reward-http")

    def __call__(self, b: RewardBatch) -> dict:
        n = len(b)
        chunks = [list(range(s, min(s + self.batch_size, n))) for s in range(0, n, self.batch_size)]
        cancel = threading.Event()
        futures = []
        try:
            # encoded and checked on this thread, sent on the pool's: the daemon workers never run torch code (a
            # daemon thread inside C++ code when the interpreter exits aborts the process)
            for rows in chunks:
                if any(f.done() and f.exception() is not None for f in futures):
                    break
                futures.append(self._pool.submit(self._post, encode_samples(b, rows), b, rows, cancel))
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            answers = [self._parse(f.result(), b, rows) for f, rows in zip(futures, chunks)]
        except BaseException:  # stop the rest now: nothing queued is sent, nothing in flight is waited for
            cancel.set()
            for f in futures:
                f.cancel()
            self._abort(cancel)
            raise
        scores, parts = [], {}
        names = set(answers[0].parts) if answers else set()
        for rows, r in zip(chunks, answers):
            if set(r.parts) != names:
                raise RewardError(f"reward service {self.url}: samples {rows[0]}..{rows[-1]} answered parts "
                                  f"{sorted(r.parts)}, other samples {sorted(names)}")
            scores.append(r.scores)
            for k, v in r.parts.items():
                parts.setdefault(k, []).append(v)
        return {"scores": torch.cat(scores), "parts": {k: torch.cat(v) for k, v in parts.items()}}

    def _parse(self, body: bytes, b, rows):
        where = f"reward service {self.url}, samples {rows[0]}..{rows[-1]}"
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RewardError(f"{where}: the answer is not JSON ({e}): {body[:200]!r}") from None
        try:
            return as_result(obj, b.subset(rows), self.label)
        except RewardError as e:
            raise RewardError(f"{where} (sample numbers below count from {rows[0]}): {e}") from None

    def _headers(self) -> dict:
        return {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.token}"} if self.token else {})}

    def health(self) -> int:
        """One GET /health on the service's host, under the same deadline, TLS and token rules as a scoring request
        and no retry: the HTTP status (redirects are not followed). RewardError when no answer came."""
        try:
            status, _, _ = self._attempt(None, self._headers(), threading.Event(), method="GET", target="/health")
        except _Retry as e:
            raise RewardError(f"reward service {self.url} did not answer GET /health: {e}") from None
        return status

    def _post(self, data: bytes, b, rows, cancel) -> bytes:
        headers = self._headers()
        what = f"samples {rows[0]}..{rows[-1]} (first prompt {b.tasks[rows[0]].prompt!r})"
        last = None
        for attempt in range(self.retries + 1):
            if cancel.wait(min(self.backoff * 2 ** (attempt - 1), 30.0) if attempt else 0):
                raise _Cancelled
            try:
                status, location, body = self._attempt(data, headers, cancel)
            except _Retry as e:
                last = str(e)
                continue
            if 300 <= status < 400:
                raise RewardError(f"reward service {self.url} answered HTTP {status} for {what}, redirecting to "
                                  f"{location!r}: redirects are not followed (they would take the samples and the "
                                  "token elsewhere); give the final URL")
            if status < 300:
                return body
            last = f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"
            if status not in RETRY_STATUS and status < 500:
                raise RewardError(f"reward service {self.url} refused {what}: {last}")
        raise RewardError(f"reward service {self.url} failed for {what} after {self.retries + 1} attempts "
                          f"({self.timeout:g} s deadline each): {last}")

    def _attempt(self, data: bytes | None, headers: dict, cancel, method: str = "POST", target=None) -> tuple:
        """One request under its deadline (connect, send and the whole answer): (status, Location, body). A watchdog
        closes the socket at the deadline, so a service that trickles bytes cannot hold it longer."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout, **({"context": self._ssl} if self._https else {}))
        expired = threading.Event()
        watchdog = threading.Timer(self.timeout, lambda: (expired.set(), _shut(conn)))
        watchdog.daemon = True
        with self._lock:
            self._live[conn] = cancel
        watchdog.start()
        try:
            conn.connect()
            if cancel.is_set() or expired.is_set():
                raise OSError("stopped")
            conn.request(method, target or self._target, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Location"), self._read(resp)
        except (OSError, http.client.HTTPException) as e:
            if cancel.is_set():
                raise _Cancelled from None
            if expired.is_set():
                raise _Retry(f"no complete answer within the {self.timeout:g} s deadline") from None
            if isinstance(e, ssl.SSLCertVerificationError):
                raise RewardError(f"reward service {self.url}: its TLS certificate was not accepted "
                                  f"({e.verify_message}); a private CA is given with --reward-ca-file") from None
            raise _Retry(f"{type(e).__name__}: {e}") from None
        finally:
            watchdog.cancel()
            with self._lock:
                self._live.pop(conn, None)
            conn.close()

    def _read(self, resp) -> bytes:
        cap = self.max_response_bytes
        length = resp.getheader("Content-Length")
        too_big = RewardError(f"reward service {self.url}: the answer is larger than {cap} bytes "
                              f"(Content-Length {length}); a scores answer is small")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            raise too_big
        parts, total = [], 0
        while piece := resp.read(min(1 << 16, cap + 1 - total)):
            parts.append(piece)
            total += len(piece)
            if total > cap:
                raise too_big
        return b"".join(parts)

    def _abort(self, cancel=None) -> None:
        """Close the sockets of the call `cancel` belongs to (every call's when None)."""
        with self._lock:
            live = [c for c, ev in self._live.items() if cancel is None or ev is cancel]
        for conn in live:
            _shut(conn)

    def close(self) -> None:
        self._abort()
        self._pool.close()
