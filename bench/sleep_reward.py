"""A reward service for wall-clock measurements: on 127.0.0.1, it sleeps a set time per request and answers 0 for
every sample, and it stops by itself.

    python bench/sleep_reward.py --sleep 0.25 [--workers 1] [--max-requests 100000] [--idle-exit 3600]

The first line it prints is `port N` (the port it listens on, chosen free unless --port). A run uses it as one more
reward term of weight 0 (`--reward world --reward http://127.0.0.1:N/sleep=0`), so the reward it trains on is the
world's, unchanged, and every step pays the service's latency: what a slow judge (a VLM, a detector on another GPU)
costs, without its compute on this machine. bench/time_to_reward.py starts one with `--reward-sleep`.

The service is `unirl_fast.rewards.server.make_server` (the project's own reward server: limits, 429 when full) with
`workers` threads: with 1 (the default) requests are answered one at a time, like one judge on one GPU, so a step
that sends n requests waits n x sleep however the client spreads them. Bounded: at most `workers` requests are in
work and the server's backlog waits (beyond it: 429); it stops after `--max-requests` answered requests, after
`--idle-exit` seconds without one, and when the process that started it is gone (its parent pid changes), so a killed
benchmark never leaves it running.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as a script: the checkout's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class SleepingReward:
    """sleep(seconds) per call, then 0 per sample; counts the calls and the time of the last one."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.calls = 0
        self.last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, batch):
        time.sleep(self.seconds)
        with self._lock:
            self.calls += 1
            self.last = time.monotonic()
        return [0.0] * len(batch)


def serve(seconds: float, *, port: int = 0, workers: int = 1, max_requests: int = 100_000, idle_exit: float = 3600.0,
          poll: float = 0.1, announce=print) -> int:
    """Serve until one of the stop conditions (module docstring); returns the number of requests answered."""
    from unirl_fast.rewards.server import make_server

    fn = SleepingReward(seconds)
    server = make_server(fn, "127.0.0.1", port, label="sleep", workers=workers, backlog=16)
    announce(f"port {server.server_address[1]}")
    parent = os.getppid()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll}, daemon=True)
    thread.start()
    try:
        while fn.calls < max_requests and time.monotonic() - fn.last < idle_exit and os.getppid() == parent:
            time.sleep(poll)
    finally:
        server.shutdown()
        server.server_close()
    return fn.calls


def start(seconds: float, *, workers: int = 1, idle_exit: float = 3600.0) -> tuple:
    """This script as a child process: (its Popen, its port). Stop it with terminate(); it also stops by itself."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--sleep", str(seconds), "--workers",
                             str(workers), "--idle-exit", str(idle_exit)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("port "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the sleeping reward service did not start (it printed {line!r}, exit {proc.poll()})")
    return proc, int(line.split()[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sleep_reward", description=__doc__.split("\n\n")[0])
    p.add_argument("--sleep", type=float, required=True, help="seconds slept per request")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--workers", type=int, default=1, help="requests answered at once (default 1)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many answers")
    p.add_argument("--idle-exit", type=float, default=3600.0, help="stop after this many seconds without a scoring "
                   "request (a harness pretrains its base models first: minutes without one)")
    args = p.parse_args(argv)
    for name, lo in (("sleep", 0.0), ("idle_exit", 1e-9)):
        if not getattr(args, name) >= lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo:g}, got {getattr(args, name)}")
    for name in ("workers", "max_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    n = serve(args.sleep, port=args.port, workers=args.workers, max_requests=args.max_requests,
              idle_exit=args.idle_exit, announce=lambda line: print(line, flush=True))
    print(f"answered {n} requests", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
