"""Rewards over HTTP: a client the trainer calls, and a small reference server that puts any reward on another machine.

Protocol (JSON, one POST per chunk of at most `batch_size` samples):

    request   {"samples": [{"index": i, "prompt": str, "completion": str, "answer": str, "meta": {...},
                            "image": PNG as base64 | null, "cycled": ... | null, "source": ... | null}, ...]}
    answer    {"scores": [one number per sample], "parts": {"name": [one number per sample], ...}}   (parts optional)

`index` is the sample's position in the trainer's batch. Images are 8-bit RGB PNGs of the [-1, 1] images.
An optional bearer token (`Authorization: Bearer <token>`) is read from an environment variable on both sides.

Client (`HttpReward`): chunks are sent concurrently (at most `concurrency` in flight), each with a per-request
timeout; a connection error, a timeout, HTTP 408 / 429 or a 5xx is retried up to `retries` times with exponential
backoff (backoff, 2 x backoff, ... capped at 30 s); any other HTTP error, or an answer that is not the protocol's
(not JSON, wrong length, a non-finite score), stops at once. Every failure raises RewardError naming the service,
the samples and the first sample's prompt: a run never trains on a made-up reward.

Server: `unirl-fast serve-reward SPEC --port N` (SPEC: any reward the trainer takes that needs no scenario, e.g.
`my_pkg.rewards:score`, `clip:DIR`, `answer`, `format:REGEX`), or `make_server(fn)` in code. Standard library only
(http.server, threads per request).
"""
from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .base import RewardBatch, RewardError, as_result, to_pil

RETRY_STATUS = (408, 429)


# images <-> PNG -------------------------------------------------------------------------------------------------
def encode_png(img) -> str | None:
    if img is None:
        return None
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> torch.Tensor:
    """Base64 PNG -> float32 [3, H, W] in [-1, 1]."""
    from PIL import Image

    from ..tasks.base import pil_to_tensor

    with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
        return pil_to_tensor(im.convert("RGB"))


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
class HttpReward:
    def __init__(self, url: str, *, label: str = "http", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, concurrency: int = 4, batch_size: int = 32, token_env: str | None = None,
                 token_required: bool = False):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward service url must start with http:// or https://, got {url!r}")
        for name, v, lo in (("timeout", timeout, 0), ("backoff", backoff, -1e-9)):
            if not v > lo:
                raise ValueError(f"reward service {url}: {name} must be > {max(lo, 0)}, got {v}")
        for name, v, lo in (("retries", retries, 0), ("concurrency", concurrency, 1), ("batch_size", batch_size, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"reward service {url}: {name} must be an integer >= {lo}, got {v!r}")
        self.url, self.label = url, label
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.concurrency, self.batch_size = concurrency, batch_size
        self.token = os.environ.get(token_env) if token_env else None
        if token_required and not self.token:
            raise ValueError(f"reward service {url}: the bearer token's environment variable {token_env!r} is not set")
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reward-http")

    def __call__(self, b: RewardBatch) -> dict:
        n = len(b)
        chunks = [list(range(s, min(s + self.batch_size, n))) for s in range(0, n, self.batch_size)]
        answers = list(self._pool.map(lambda rows: self._chunk(b, rows), chunks))
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

    def _chunk(self, b, rows):
        body = self._post(encode_samples(b, rows), b, rows)
        where = f"reward service {self.url}, samples {rows[0]}..{rows[-1]}"
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RewardError(f"{where}: the answer is not JSON ({e}): {body[:200]!r}") from None
        try:
            return as_result(obj, b.subset(rows), self.label)
        except RewardError as e:
            raise RewardError(f"{where} (sample numbers below count from {rows[0]}): {e}") from None

    def _post(self, data: bytes, b, rows) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return r.read()
            except urllib.error.HTTPError as e:
                text = e.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {e.code}: {text}"
                if e.code not in RETRY_STATUS and e.code < 500:
                    raise RewardError(f"reward service {self.url} refused samples {rows[0]}..{rows[-1]} (first prompt "
                                      f"{b.tasks[rows[0]].prompt!r}): {last}") from None
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                    http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
        raise RewardError(f"reward service {self.url} failed for samples {rows[0]}..{rows[-1]} (first prompt "
                          f"{b.tasks[rows[0]].prompt!r}) after {self.retries + 1} attempts ({self.timeout:g} s timeout "
                          f"each): {last}")

    def close(self) -> None:
        self._pool.shutdown(wait=False)


# server ---------------------------------------------------------------------------------------------------------
def decode_samples(payload) -> RewardBatch:
    """The request body (parsed) -> a RewardBatch; ValueError names the bad sample."""
    from ..tasks import Task

    if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list) or not payload["samples"]:
        raise ValueError("the request must be {\"samples\": [...]} with at least one sample")
    tasks, texts, fields = [], [], {"image": [], "cycled": [], "source": []}
    for j, s in enumerate(payload["samples"]):
        if not isinstance(s, dict) or not isinstance(s.get("prompt"), str):
            raise ValueError(f"sample {j}: needs a 'prompt' string")
        meta = s.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"sample {j}: 'meta' must be an object")
        tasks.append(Task(s["prompt"], str(s.get("answer") or ""), meta=meta, origin=f"request sample {j}"))
        texts.append(str(s.get("completion") or ""))
        for k in fields:
            try:
                fields[k].append(None if s.get(k) is None else decode_png(s[k]))
            except Exception as e:  # binascii / PIL errors: a bad upload, not a server fault
                raise ValueError(f"sample {j}: {k!r} is not a base64 PNG ({e})") from None
    stacked = {}
    for k, v in fields.items():
        if all(x is None for x in v):
            stacked[k] = None
        elif any(x is None for x in v) or len({tuple(x.shape) for x in v}) != 1:
            raise ValueError(f"{k!r}: every sample needs one, all of the same size")
        else:
            stacked[k] = torch.stack(v)
    return RewardBatch(tasks, texts, stacked["image"], None if stacked["cycled"] is None else list(stacked["cycled"]),
                       stacked["source"])


def make_server(fn, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None, label: str = "reward",
                log=None) -> ThreadingHTTPServer:
    """An HTTP server answering the protocol with `fn(RewardBatch)`; port 0 picks a free port
    (server.server_address[1]). Run it with serve_forever(); stop it with shutdown()."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"ok": True, "reward": label}) if self.path.rstrip("/") in ("", "/health") else \
                self._send(404, {"error": f"no such path {self.path!r}"})

        def do_POST(self):
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                return self._send(401, {"error": "missing or wrong bearer token"})
            try:
                n = int(self.headers.get("Content-Length", 0))
                batch = decode_samples(json.loads(self.rfile.read(n)))
            except (ValueError, json.JSONDecodeError) as e:
                return self._send(400, {"error": f"bad request: {e}"})
            try:
                r = as_result(fn(batch), batch, label)
            except Exception as e:  # the reward's own failure: a 500 the client reports (and retries)
                return self._send(500, {"error": f"{type(e).__name__}: {e}"})
            self._send(200, {"scores": r.scores.tolist(), "parts": {k: v.tolist() for k, v in r.parts.items()}})

        def log_message(self, fmt, *args):
            if log is not None:
                log(f"{self.address_string()} {fmt % args}")

    return ThreadingHTTPServer((host, port), Handler)
