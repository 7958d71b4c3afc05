"""The reference reward server: `unirl-fast serve-reward SPEC`, or `make_server(fn)` in code (protocol: `http`).

Standard library only (http.server, socketserver, ssl, hmac), and built to face a network:
- it listens on 127.0.0.1 unless told otherwise; `exposure_warning` says what is wrong with another address
  (no token: anyone who reaches the port uses the reward; a token without TLS: it crosses the network readable);
- a fixed pool of `workers` threads serves the connections, `backlog` more may wait; beyond that a connection is
  answered 429 at once (plain HTTP; under TLS it is closed: no handshake is spent on it), so load never grows the
  thread count or the memory;
- limits, checked before the work they bound: a body over `max_body_bytes` (from Content-Length: it is not read),
  more than `max_samples` samples, an image whose PNG header gives more than `max_image_pixels` pixels, or the
  request's images adding up to more than `max_request_pixels` (all headers are checked before any pixel is
  decoded) are answered 413; a body that is not the protocol's (not JSON, no prompt, not a base64 PNG) 400;
- the token is compared with hmac.compare_digest (no timing clue about its prefix), on every request: GET /health
  too (401 without it), so a trainer's preflight finds a wrong token before any work;
- every answer carries an X-Request-Id; an error is one line of JSON {"error": ..., "request_id": ...} written by
  this module, never an exception's text: a failing reward answers 500, and its traceback goes to the server's
  log under the request id;
- TLS with `certfile` / `keyfile`.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import json
import queue
import socket
import ssl
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from .base import RewardBatch, as_result
from .http import is_loopback

MAX_BODY_BYTES = 128 << 20
MAX_SAMPLES = 256
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_PIXELS = 32 << 20  # 32 images of 1024 x 1024: 384 MB as float32
DRAIN_BYTES = 8 << 20  # an unread body up to this size is read and dropped so the client can read the answer
READ_SECONDS = 120.0  # the whole request body must arrive within this (one slow client holds one worker at most)
_BUSY_BODY = b'{"error": "every worker is busy and the queue is full: retry later"}'
BUSY = (b"HTTP/1.0 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class TooLarge(ValueError):
    """A request over one of the server's limits (413)."""


def _open_png(text, j: int, key: str):
    """Base64 PNG -> an opened (not yet decoded) PIL image: only its header has been read."""
    from PIL import Image

    if not isinstance(text, str):
        raise ValueError(f"sample {j}: {key!r} must be a base64 PNG string")
    try:
        im = Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=("PNG",))
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError):
        raise ValueError(f"sample {j}: {key!r} is not a base64 PNG") from None
    return im


def decode_samples(payload, *, max_samples: int = MAX_SAMPLES, max_image_pixels: int = MAX_IMAGE_PIXELS,
                   max_request_pixels: int = MAX_REQUEST_PIXELS) -> RewardBatch:
    """The request body (parsed) -> a RewardBatch. ValueError names the bad sample; TooLarge a limit. Every image
    header is read and checked against the pixel limits before the first image is decoded."""
    from ..tasks import Task
    from ..tasks.base import pil_to_tensor

    if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list) or not payload["samples"]:
        raise ValueError("the request must be {\"samples\": [...]} with at least one sample")
    if len(payload["samples"]) > max_samples:
        raise TooLarge(f"{len(payload['samples'])} samples in one request; this server takes at most {max_samples}")
    tasks, texts, fields, total = [], [], {"image": [], "cycled": [], "source": []}, 0
    for j, s in enumerate(payload["samples"]):
        if not isinstance(s, dict) or not isinstance(s.get("prompt"), str):
            raise ValueError(f"sample {j}: needs a 'prompt' string")
        meta = s.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"sample {j}: 'meta' must be an object")
        tasks.append(Task(s["prompt"], str(s.get("answer") or ""), meta=meta, origin=f"request sample {j}"))
        texts.append(str(s.get("completion") or ""))
        for k, opened in fields.items():
            im = None if s.get(k) is None else _open_png(s[k], j, k)
            if im is not None:
                w, h = im.size
                if w * h > max_image_pixels:
                    raise TooLarge(f"sample {j}: {k!r} is {w} x {h} pixels; this server takes at most "
                                   f"{max_image_pixels} per image")
                total += w * h
                if total > max_request_pixels:
                    raise TooLarge(f"the request's images add up to more than {max_request_pixels} pixels (at "
                                   f"sample {j}); send fewer samples per request")
            opened.append(im)
    stacked = {}
    for k, v in fields.items():
        if all(x is None for x in v):
            stacked[k] = None
        elif any(x is None for x in v) or len({x.size for x in v}) != 1:
            raise ValueError(f"{k!r}: every sample needs one, all of the same size")
        else:
            try:
                stacked[k] = torch.stack([pil_to_tensor(x.convert("RGB")) for x in v])
            except (OSError, ValueError):  # a truncated or corrupt PNG body behind a good header
                raise ValueError(f"{k!r}: an image cannot be decoded as a PNG") from None
    return RewardBatch(tasks, texts, stacked["image"], None if stacked["cycled"] is None else list(stacked["cycled"]),
                       stacked["source"])


def exposure_warning(host: str, token: str | None, tls: bool) -> str | None:
    """What is unsafe about listening on `host` (None when nothing is): beyond loopback, no token lets anyone who
    reaches the port use the reward; a token without TLS crosses the network readable."""
    if is_loopback(host):
        return None
    if token is None:
        return (f"warning: listening on {host} without a token: anyone who can reach this port can use the reward "
                "(set --token-env, and --certfile/--keyfile for TLS)")
    if not tls:
        return (f"warning: listening on {host} without TLS: the token and the samples cross the network readable "
                "(give --certfile/--keyfile)")
    return None


class RewardServer(HTTPServer):
    """HTTPServer with a fixed pool of worker threads and a bounded number of waiting connections."""

    def __init__(self, address, handler, *, workers: int, backlog: int, ssl_context=None):
        family = socket.AF_INET6 if _is_ipv6(address[0]) else socket.AF_INET
        self.address_family = family
        super().__init__(address, handler)
        self.ssl_context = ssl_context
        self._slots = threading.BoundedSemaphore(workers + backlog)
        self._queue = queue.SimpleQueue()
        self._refusals = queue.Queue(maxsize=64)
        self._workers = [threading.Thread(target=self._work, name=f"reward-server-{i}", daemon=True)
                         for i in range(workers)]
        for t in [*self._workers, threading.Thread(target=self._answer_busy, name="reward-server-busy", daemon=True)]:
            t.start()

    def process_request(self, request, client_address):
        if self._slots.acquire(blocking=False):
            return self._queue.put((request, client_address))
        try:  # under TLS no handshake is spent on a refusal: the connection is closed
            if self.ssl_context is not None:
                raise queue.Full
            self._refusals.put_nowait(request)
        except queue.Full:
            self.shutdown_request(request)

    def _answer_busy(self):
        """429 to each refused connection, one at a time (at most a second each): the request head is read first,
        since closing a socket with unread data resets it and the client would never see the answer."""
        while (request := self._refusals.get()) is not None:
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.recv(1 << 16)
                request.sendall(BUSY)
            self.shutdown_request(request)

    def _work(self):
        while (item := self._queue.get()) is not None:
            request, client_address = item
            try:
                if self.ssl_context is not None:
                    request.settimeout(_Handler.timeout)
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._slots.release()

    def handle_error(self, request, client_address):
        self.error_log(f"connection from {client_address[0]}: {traceback.format_exc(limit=-1).strip()}")

    def server_close(self):
        super().server_close()
        for _ in self._workers:
            self._queue.put(None)
        with contextlib.suppress(queue.Full):
            self._refusals.put_nowait(None)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server_version = "unirl-fast-reward"
    sys_version = ""
    timeout = 30  # seconds a connection may stay silent

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", self.rid)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code, msg, drain: int = 0):
        if 0 < drain <= DRAIN_BYTES:  # the unread body, dropped, so that the client gets to read this answer
            with contextlib.suppress(OSError, TimeoutError):
                while drain > 0 and (got := self.rfile.read(min(drain, 1 << 16))):
                    drain -= len(got)
        self.close_connection = True
        self._send(code, {"error": msg, "request_id": self.rid})

    def do_GET(self):
        self.rid = uuid.uuid4().hex[:12]
        if self.path.rstrip("/") in ("", "/health"):
            if not self._authorized():  # a trainer's preflight checks its token here, before any work
                return self._error(401, "missing or wrong bearer token")
            return self._send(200, {"ok": True, "reward": self.server.label})
        self._send(404, {"error": "no such path", "request_id": self.rid})

    def do_POST(self):
        s, self.rid = self.server, uuid.uuid4().hex[:12]
        length = self.headers.get("Content-Length", "")
        n = int(length) if length.strip().isdigit() else None
        if self.headers.get("Transfer-Encoding") or n is None:
            return self._error(411, "send the body with a Content-Length (no chunked encoding)")
        if not self._authorized():
            return self._error(401, "missing or wrong bearer token", drain=n)
        if n > s.max_body_bytes:
            return self._error(413, f"the body is {n} bytes; this server takes at most {s.max_body_bytes}", drain=n)
        body = self._read(n)
        if body is None:
            return self._error(408, f"the body did not arrive within {READ_SECONDS:g} s")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as e:
            why = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else \
                "not UTF-8, or nested too deep"
            return self._error(400, f"bad request: not JSON ({why})")
        try:
            batch = decode_samples(payload, max_samples=s.max_samples, max_image_pixels=s.max_image_pixels,
                                   max_request_pixels=s.max_request_pixels)
        except TooLarge as e:
            return self._error(413, str(e))
        except ValueError as e:  # decode_samples' own messages
            return self._error(400, f"bad request: {e}")
        try:
            r = as_result(s.fn(batch), batch, s.label)
        except Exception:  # the reward's failure: a 500 the client reports (and retries); the details stay here
            s.error_log(f"request {self.rid}: the reward failed\n{traceback.format_exc()}")
            return self._error(500, "the reward failed; the server's log has the details under this request id")
        self._send(200, {"scores": r.scores.tolist(), "parts": {k: v.tolist() for k, v in r.parts.items()}})

    def _authorized(self) -> bool:
        s = self.server
        return s.token is None or hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                      f"Bearer {s.token}".encode())

    def _read(self, n: int) -> bytes | None:
        """The body, or None when it does not arrive within READ_SECONDS (a trickle resets no clock)."""
        deadline, parts, left = time.monotonic() + READ_SECONDS, [], n
        try:
            while left > 0 and time.monotonic() < deadline and (got := self.rfile.read1(min(left, 1 << 20))):
                parts.append(got)
                left -= len(got)
        except (OSError, TimeoutError):
            return None
        return None if left else b"".join(parts)

    def log_message(self, fmt, *args):
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {getattr(self, 'rid', '-')} {fmt % args}")


def make_server(fn, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None, label: str = "reward",
                log=None, error_log=None, workers: int = 4, backlog: int = 16, max_body_bytes: int = MAX_BODY_BYTES,
                max_samples: int = MAX_SAMPLES, max_image_pixels: int = MAX_IMAGE_PIXELS,
                max_request_pixels: int = MAX_REQUEST_PIXELS, certfile: str | None = None,
                keyfile: str | None = None) -> RewardServer:
    """A server answering the protocol with `fn(RewardBatch)`; port 0 picks a free port (server.server_address[1]).
    Run it with serve_forever(); stop it with shutdown() and server_close(). `log(line)`: one line per request (None:
    none); `error_log(text)`: a failing reward's traceback with its request id (default: standard error)."""
    for name, v in (("workers", workers), ("max_body_bytes", max_body_bytes), ("max_samples", max_samples),
                    ("max_image_pixels", max_image_pixels), ("max_request_pixels", max_request_pixels)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"serve-reward: {name} must be an integer >= 1, got {v!r}")
    if not isinstance(backlog, int) or backlog < 0:
        raise ValueError(f"serve-reward: backlog must be an integer >= 0, got {backlog!r}")
    if (certfile is None) != (keyfile is None):
        raise ValueError("serve-reward: TLS needs both --certfile and --keyfile")
    ctx = None
    if certfile is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"serve-reward: cannot load the TLS certificate {certfile!r} / key {keyfile!r} ({e})") \
                from None
    server = RewardServer((host, port), _Handler, workers=workers, backlog=backlog, ssl_context=ctx)
    server.fn, server.token, server.label, server.log = fn, token, label, log
    server.error_log = error_log or (lambda text: print(text, file=sys.stderr, flush=True))
    server.max_body_bytes, server.max_samples = max_body_bytes, max_samples
    server.max_image_pixels, server.max_request_pixels = max_image_pixels, max_request_pixels
    return server
