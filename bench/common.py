"""Shared benchmark machinery (docs/benchmarks.md): timing, hardware ceilings, peak extra memory, CSV rows.

- Timing: warm-up, then the median with p20/p80. On CUDA, `triton.testing.do_bench` (CUDA events; its
  warm-up/rep are milliseconds); on CPU, `time.perf_counter` around a synchronous call.
- Ceilings, measured in the same run: device copy bandwidth (bytes read + written), an 8192^3 bf16 GEMM
  and an FP8 GEMM (tensorwise `torch._scaled_mm`) where the GPU has FP8. CPU smoke mode uses small sizes.
- Peak extra memory: `max_memory_allocated()` after `reset_peak_memory_stats()`, minus what was allocated
  before the call. Not measurable on CPU (reported as empty).
- CSV rows carry the device name, torch / triton versions, the git commit and the value-check mode the ops
  ran with (`checks`: "ours" is timed with the default, "cheap": O(output), no host sync); files go to
  bench/results/.
Every benchmark script takes `--smoke` (tiny shapes, few repeats: what the CPU runs).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, *, device="cpu", warmup=3, rep=10, warmup_ms=25, rep_ms=100) -> Timing:
    """Median (p20, p80) of `fn()` in milliseconds, after warm-up."""
    if torch.device(device).type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7])


def peak_extra_memory_bytes(fn, device="cpu"):
    """Peak memory above the pre-call allocation for one call of `fn` (CUDA only; None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_ceilings(device="cpu", smoke=False) -> dict:
    """Copy GB/s and bf16 / FP8 GEMM TFLOP/s on this device, measured now."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n_copy = (1 << 28) if cuda and not smoke else (1 << 22)
    src = torch.randn(n_copy // 4, device=dev)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=dev)
    out = {"copy_GBps": 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9}
    n = 8192 if cuda and not smoke else 256
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = time_fn(lambda: a @ b, device=dev)
    out["gemm_TFLOPs"] = 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12
    out["gemm_dtype"] = str(dtype).replace("torch.", "")
    out["fp8_gemm_TFLOPs"] = _fp8_gemm_tflops(dev, n) if cuda else None
    return out


def _fp8_gemm_tflops(dev, n):
    if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(dev) < (8, 9):
        return None
    a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=dev)
    t = time_fn(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), device=dev)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def trl_rowwise_logprobs(logits, targets):
    """The TRL-style baseline (selective_log_softmax): log_softmax one sequence at a time, so the batch never
    gets a full fp32 copy. logits [B, L, V], targets [B, L] -> fp32 [B, L]."""
    return torch.stack([torch.log_softmax(row.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
                        for row, t in zip(logits, targets)])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_columns(device="cpu") -> dict:
    dev = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    from unirl_fast import get_checks

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{os.cpu_count()}"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checks": get_checks()}


def ratio(baseline_ms, ours_ms):
    """Speed-up of ours over a baseline (> 1 means ours is faster)."""
    if baseline_ms is None or ours_ms is None or ours_ms <= 0:
        return None
    return baseline_ms / ours_ms


def append_rows(csv_name: str, rows: list, out_dir=None) -> Path:
    """Append dict rows to `<out_dir or bench/results>/<csv_name>`; the header is the union of keys."""
    path = Path(out_dir or RESULTS_DIR) / csv_name
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    if path.exists():
        with open(path, newline="") as f:
            old_keys = next(csv.reader(f), [])
        if old_keys and old_keys != keys:
            path = path.with_name(f"{path.stem}.{datetime.datetime.now():%Y%m%d%H%M%S}{path.suffix}")
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list, columns: list) -> str:
    cells = [[c for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats (what runs on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    return p


def resolve_smoke(args) -> bool:
    """No CUDA means smoke mode: full docs/benchmarks.md shapes only make sense on the GPU machine."""
    return args.smoke or torch.device(args.device).type != "cuda"
