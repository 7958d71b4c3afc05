"""The benchmark suite behind `unirl-fast bench`: run bench/bench_*.py in one process into one results folder,
then plot and summarise their rows.

Registry: the benchmark names are the file names `bench/bench_<name>.py` (nothing else lists them); each
script's `main(argv)` takes the same `--smoke / --device / --out` (bench.common.base_parser) and returns its
rows, the same dicts it appends to `<out>/<name>.csv`. The suite passes those flags through and never parses a
script's own options.

Isolation between scripts in one process: each runs with `os.environ` and `torch.get_num_threads()` restored
afterwards (a script may set environment variables or one CPU thread for itself), `torch._dynamo.reset()`
(the scripts compile the same reference functions; without a reset their guards accumulate toward dynamo's
recompile limit, past which "compiled_ref" would silently run eager) and, on CUDA, `empty_cache()`. A script
that raises is reported and the others still run.

Summary rows (one schema over every script's columns):
    bench   the script name;  op: the row's op / case / part / bench column (+ its mode), else the bench name
    shape   the row's shape, else its size columns;  impl, median_ms as written
    ref     the reference of the row's (op, shape) group: the first of REFERENCE_IMPLS present there
    x_vs_ref = ref median / this median (> 1: faster than the reference); x_vs_compiled likewise vs compiled_ref
    rate, unit, frac_ceiling: the script's throughput column and its fraction of the ceiling measured in that run
Rows without a time (FP8 mismatch metrics, failed baselines) stay in the CSVs only. The printed table shows our
implementations (not BASELINE_PREFIXES), whose x_vs_ref / x_vs_compiled carry the comparison.
Plots: `<name>_summary.png` per script, median ms (log scale) and speed-up vs the reference per (op, shape)
group and implementation, made from the rows above; scripts that draw their own figure write it alongside.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import math
import os
import traceback
from pathlib import Path

import torch

from .common import RESULTS_DIR, append_rows, format_table

BENCH_DIR = Path(__file__).resolve().parent
REFERENCE_IMPLS = ("eager_ref", "bf16_linear", "transformers generate", "CFG w=4.5")
# impls that are baselines, not ours: the printed table leaves them out (their times are in summary.csv)
BASELINE_PREFIXES = REFERENCE_IMPLS + ("compiled_ref", "trl_", "liger_", "CFG w=")
_OP_COLUMNS = ("op", "case", "part", "bench", "mode")
_SIZE_COLUMNS = ("B", "L", "M", "N", "K", "H", "V", "batch", "prompt", "new_tokens", "steps")
# (rate column, unit column or literal unit), first match wins; frac columns likewise
_RATE_COLUMNS = (("rate", "unit"), ("TFLOPs_6NHV", "TFLOP/s 6NHV"), ("TFLOPs", "TFLOP/s"), ("GBps", "GB/s"),
                 ("throughput", "unit"))
_FRAC_COLUMNS = ("frac_of_ceiling", "frac_gemm", "frac_copy")
SUMMARY_COLUMNS = ["bench", "op", "shape", "impl", "median_ms", "ref", "x_vs_ref", "x_vs_compiled", "rate", "unit",
                   "frac_ceiling"]


def names() -> list:
    """Every benchmark: the `<name>` of each bench/bench_<name>.py."""
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def check_names(requested) -> list:
    """The requested names in order (all when empty); ValueError naming the valid ones on an unknown name."""
    valid = names()
    bad = [n for n in requested if n not in valid]
    if bad:
        raise ValueError(f"unknown benchmark {', '.join(map(repr, bad))}; valid names: {', '.join(valid)}")
    return list(dict.fromkeys(requested)) or valid


def default_out_dir(smoke: bool) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / (stamp + ("-smoke" if smoke else ""))
    k = 1
    while path.exists():
        path, k = RESULTS_DIR / f"{stamp}{'-smoke' if smoke else ''}-{k}", k + 1
    return path


@contextlib.contextmanager
def _isolated():
    env, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_one(name: str, out_dir, smoke: bool, device=None) -> list:
    """Run bench/bench_<name>.py's main in this process, writing into out_dir; returns its rows."""
    argv = ["--out", str(out_dir)] + (["--smoke"] if smoke else []) + (["--device", device] if device else [])
    with _isolated():
        module = importlib.import_module(f"bench.bench_{name}")
        rows = module.main(argv)
    if not isinstance(rows, list):
        raise TypeError(f"bench/bench_{name}.py main() returned {type(rows).__name__}, expected its list of rows")
    return rows


def run(requested, out_dir=None, smoke=False, device=None, log=print) -> dict:
    """Run the named benchmarks (all when empty) into one folder; returns {"out_dir", "summary", "failed",
    "plots"}. Each script writes its CSV (and its own figure) there; the suite adds summary.csv and one
    `<name>_summary.png` per script."""
    selected = check_names(requested)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir) if out_dir else default_out_dir(smoke or dev.type != "cuda")  # the scripts' resolve_smoke
    out.mkdir(parents=True, exist_ok=True)
    summary, failed, plots = [], {}, []
    for name in selected:
        log(f"=== bench {name} -> {out}")
        try:
            rows = run_one(name, out, smoke, device)
        except Exception as e:  # one broken script must not hide the others' results
            traceback.print_exc()
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        srows = summary_rows(name, rows)
        summary += srows
        if srows:
            plots.append(plot_summary(srows, out / f"{name}_summary.png", _title(name, rows)))
    if summary:
        append_rows("summary.csv", summary, out)
    return {"out_dir": out, "summary": summary, "failed": failed, "plots": plots}


def _title(name, rows):
    r = rows[0] if rows else {}
    return (f"bench_{name} on {r.get('device', '?')} (torch {r.get('torch', '?')}, triton {r.get('triton', '?')})"
            + (" [smoke: tiny shapes, few repeats; not GPU figures]" if str(r.get("smoke")) == "True" else ""))


def _num(v):
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _op(name, r):
    parts = [str(r[c]) for c in _OP_COLUMNS if r.get(c) not in (None, "")]
    return "/".join(parts) or name


def _shape(r):
    """The shape name plus the size columns (two FP8 smoke GEMMs share the name "smoke" but not M, N, K)."""
    sizes = " ".join(f"{c}{r[c]}" for c in _SIZE_COLUMNS if r.get(c) not in (None, ""))
    name = str(r["shape"]) if r.get("shape") not in (None, "") else ""
    return (f"{name} ({sizes})" if name and sizes else name or sizes) or "-"


def _rate(r):
    for col, unit in _RATE_COLUMNS:
        if _num(r.get(col)) is not None:
            return _num(r[col]), (r.get(unit) or col) if unit == "unit" else unit
    return None, None


def summary_rows(name: str, rows: list) -> list:
    """One row per timed (op, shape, impl) of a script, in the SUMMARY_COLUMNS schema (works on CSV strings too)."""
    out = []
    for r in rows:
        ms = _num(r.get("median_ms"))
        if ms is None or ms <= 0:
            continue
        rate, unit = _rate(r)
        frac = next((_num(r[c]) for c in _FRAC_COLUMNS if _num(r.get(c)) is not None), None)
        out.append({"bench": name, "op": _op(name, r), "shape": _shape(r), "impl": str(r.get("impl", "-")),
                    "median_ms": ms, "rate": rate, "unit": unit, "frac_ceiling": frac})
    groups = {}
    for s in out:
        groups.setdefault((s["op"], s["shape"]), {})[s["impl"]] = s["median_ms"]
    for s in out:
        times = groups[(s["op"], s["shape"])]
        ref = next((i for i in REFERENCE_IMPLS if i in times), None)
        s["ref"] = ref
        s["x_vs_ref"] = times[ref] / s["median_ms"] if ref else None
        s["x_vs_compiled"] = times["compiled_ref"] / s["median_ms"] if "compiled_ref" in times else None
    return out


def plot_summary(srows: list, path, title: str):
    """Median ms and speed-up vs the reference (both log y: CPU smoke ratios span 1e-3 to 1e3), bars per
    implementation, one group per (op, shape); a missing bar is an implementation not run for that group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((s["op"], s["shape"]) for s in srows))
    impls = list(dict.fromkeys(s["impl"] for s in srows))
    at = {(s["op"], s["shape"], s["impl"]): s for s in srows}
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(2, 1, figsize=(min(40, max(8, 0.28 * len(groups) * len(impls) + 2)), 8), sharex=True)
    for k, impl in enumerate(impls):
        xs = [i + k * width for i in range(len(groups))]
        ms = [at[(*g, impl)]["median_ms"] if (*g, impl) in at else math.nan for g in groups]
        sp = [(at[(*g, impl)]["x_vs_ref"] or math.nan) if (*g, impl) in at else math.nan for g in groups]
        axes[0].bar(xs, ms, width, label=impl)
        axes[1].bar(xs, sp, width, label=impl)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("median ms (log)")
    axes[1].set_yscale("log")
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_ylabel("speed-up vs reference\n(" + " / ".join(sorted({s["ref"] for s in srows if s["ref"]})) + ")")
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    axes[1].set_xticklabels([f"{op}\n{shape}" for op, shape in groups], fontsize=6, rotation=30, ha="right",
                            rotation_mode="anchor")
    axes[0].legend(fontsize=7, ncol=min(4, len(impls)))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def format_summary(srows: list, baselines=False) -> str:
    """The table printed at the end: our implementations only unless `baselines` (their ratios carry the
    comparison; summary.csv keeps every row)."""
    if not baselines:
        srows = [s for s in srows if not s["impl"].startswith(BASELINE_PREFIXES)]
    return format_table(srows, SUMMARY_COLUMNS)
