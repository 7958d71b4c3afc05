"""NVML sampler: SM utilisation, memory, power and clocks at ~10 Hz in a background thread.

    with NvmlSampler(device_index=0, interval_s=0.1) as s: ...train...
    s.samples   -> list of dicts (t, sm_util_pct, mem_used_MiB, power_W, sm_clock_MHz, mem_clock_MHz)
    s.summary() -> means / maxima, energy in joules (trapezoid over power)
    s.summary(since=t0, until=t1) -> the same over the samples taken in [t0, t1] (time.time() stamps), e.g. one
                                     trainer step

When NVML is unavailable (no nvidia-ml-py, no driver, no GPU) the sampler does not fail: `available`
is False, `reason` says why, and `summary()` returns {"nvml": "unavailable: <reason>"}.
"""
from __future__ import annotations

import threading
import time


class NvmlSampler:
    def __init__(self, device_index: int = 0, interval_s: float = 0.1):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.device_index, self.interval_s = device_index, interval_s
        self.samples: list = []
        self.available, self.reason = False, ""
        self._stop = threading.Event()
        self._thread = None
        self._nvml = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml = pynvml
            self.available = True
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, InvalidArgument ...
            self.reason = f"{type(e).__name__}: {e}"

    def _read(self) -> dict:
        n, h = self._nvml, self._handle
        util = n.nvmlDeviceGetUtilizationRates(h)
        mem = n.nvmlDeviceGetMemoryInfo(h)
        return {"t": time.time(), "sm_util_pct": float(util.gpu), "mem_used_MiB": mem.used / 2 ** 20,
                "power_W": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "sm_clock_MHz": float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                "mem_clock_MHz": float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM))}

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception as e:  # a read failing mid-run ends sampling with a reason, not a crash
                self.reason, self.available = f"read failed: {type(e).__name__}: {e}", False
                return
            self._stop.wait(self.interval_s)

    def start(self):
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5 * self.interval_s + 1)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def summary(self, since: float | None = None, until: float | None = None) -> dict:
        s = [x for x in list(self.samples) if (since is None or x["t"] >= since) and (until is None or x["t"] <= until)]
        if not s:
            if not self.available or not self.samples:
                return {"nvml": f"unavailable: {self.reason}" if self.reason else "no samples"}
            return {"nvml": "no samples in the window (shorter than the sampling interval)"}
        energy = sum((b["t"] - a["t"]) * (a["power_W"] + b["power_W"]) / 2 for a, b in zip(s, s[1:]))
        out = {"nvml_samples": len(s), "energy_J": energy}
        for k in ("sm_util_pct", "mem_used_MiB", "power_W", "sm_clock_MHz", "mem_clock_MHz"):
            vals = [x[k] for x in s]
            out[f"{k}_mean"] = sum(vals) / len(vals)
            out[f"{k}_max"] = max(vals)
        return out
