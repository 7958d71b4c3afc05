"""Phase timers: where a training step's time and memory go.

    timer = PhaseTimer(device)
    with timer.phase("text_rollout"): ...
    with timer.phase("train_fwd_bwd"): ...
    stats = timer.finish_step()   # {"phase/<name>_ms": ..., "phase/<name>_peak_mem_MiB": ..., "step_ms": ...}

On CUDA each phase is bracketed by CUDA events (no sync inside the step; one sync in finish_step), and
the peak allocated memory of each phase is read with reset_peak_memory_stats at its start. On CPU host
perf_counter timers are used and memory is the process RSS high-water mark where the OS reports it.
`step_ms` is measured independently of the phases (from the first phase start to finish_step), so
the sum of phases can be checked against it: `other_ms` is what no phase covered.
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._records = []  # (name, start, end, peak_bytes or None)
        self._step_start = None

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        if self._step_start is None:
            self._step_start = self._now()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = self._now()
        try:
            yield
        finally:
            end = self._now()
            peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else _rss_peak_bytes()
            self._records.append((name, start, end, peak))

    def _elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def finish_step(self) -> dict:
        """Close the step: per-phase ms (summed over repeats of a phase), peak memory, step and other ms."""
        end = self._now()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out = {}
        total = 0.0
        for name, a, b, peak in self._records:
            ms = self._elapsed_ms(a, b)
            total += ms
            out[f"phase/{name}_ms"] = out.get(f"phase/{name}_ms", 0.0) + ms
            if peak is not None:
                key = f"phase/{name}_peak_mem_MiB"
                out[key] = max(out.get(key, 0.0), peak / 2 ** 20)
        step = self._elapsed_ms(self._step_start, end) if self._step_start is not None else 0.0
        out["step_ms"] = step
        out["phase/other_ms"] = max(step - total, 0.0)
        self._records, self._step_start = [], None
        return out


def _rss_peak_bytes():
    """Process high-water RSS (Linux reports KiB)."""
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (OSError, ValueError):
        return None
