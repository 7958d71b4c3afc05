"""`unirl-fast report RUN_DIR`: a run's metrics.jsonl as a summary table and PNG plots.

Reads the per-step train records the trainer writes (phase times `phase/<name>_ms`, `step_ms`, per-phase peak
memory `phase/<name>_peak_mem_MiB`, throughput, model FLOPs, MFU, `nvml/*`) and the evaluation records (base
and final held-out reward). The first `warmup` steps are left out of every mean (compilation, allocator and
cache warm-up; default: the steps a `profile` run marked as warm-up, else 1); when a run has no more steps
than that, all steps are used and the table says so.
Throughputs are totals over the measured steps divided by their total time (not means of per-step rates).
Plots written into RUN_DIR: `phases.png` (stacked per-phase ms per step), `throughput.png` (samples/s,
images/s, tokens/s per step), `memory_power.png` (peak memory and mean power per step against run time;
the power panel says "unavailable" with the reason when NVML gave nothing, e.g. on a CPU).
"""
from __future__ import annotations

import json
from pathlib import Path

PHASES = ("text_rollout", "image_rollout", "cycle_edit", "reward", "ref", "train_fwd_bwd", "prefetch_wait", "optimizer",
          "other")


def load_run(run_dir):
    """(config dict or None, train records, eval records) of a run directory; ValueError / FileNotFoundError
    with the reason when it is not one."""
    d = Path(run_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    path = d / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no metrics.jsonl (not a trainer or profile run directory)")
    recs = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not valid JSON: {e}") from None
    train = [r for r in recs if r.get("phase") == "train" and "step_ms" in r]
    if not train:
        raise ValueError(f"{path} has no train-step records")
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    return cfg, train, [r for r in recs if r.get("phase") == "eval"]


def summarize(train: list, warmup: int = 1) -> dict:
    """Means over the steps after `warmup` (all steps when there are no more): see the module docstring."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    measured = train[warmup:] or train
    secs = sum(r["step_ms"] for r in measured) / 1e3
    n = len(measured)
    out = {"steps": len(train), "measured_steps": n, "warmup_excluded": len(train) - n,
           "step_ms": 1e3 * secs / n, "phases_ms": {}, "peak_mem_MiB": {}}
    for p in PHASES:
        vals = [r.get(f"phase/{p}_ms", 0.0) for r in measured]
        if any(f"phase/{p}_ms" in r for r in measured):
            out["phases_ms"][p] = sum(vals) / n
        mem = [r[f"phase/{p}_peak_mem_MiB"] for r in measured if f"phase/{p}_peak_mem_MiB" in r]
        if mem:
            out["peak_mem_MiB"][p] = max(mem)
    totals = {k: sum(r.get(k, 0) for r in measured) for k in ("tokens_generated", "tokens_trained", "images",
                                                               "flops")}
    samples = sum(r.get("samples_per_s", 0.0) * r["step_ms"] / 1e3 for r in measured)
    out.update(samples_per_s=samples / secs, gen_tokens_per_s=totals["tokens_generated"] / secs,
               trained_tokens_per_s=totals["tokens_trained"] / secs, images_per_s=totals["images"] / secs,
               flops_per_step=totals["flops"] / n, tflops_per_s=totals["flops"] / secs / 1e12)
    mfus = [r.get("mfu") for r in measured]
    out["mfu"] = None if any(m is None for m in mfus) else sum(m * r["step_ms"] for m, r in zip(mfus, measured)) / (
        1e3 * secs)
    for key in ("power_W_mean", "sm_util_pct_mean", "sm_clock_MHz_mean", "mem_used_MiB_max", "energy_J"):
        vals = [r[f"nvml/{key}"] for r in measured if f"nvml/{key}" in r]
        out[key] = None if not vals else max(vals) if key.endswith("_max") else sum(vals) / len(vals)
    power = out["power_W_mean"]
    notes = [r["nvml"] for r in train if isinstance(r.get("nvml"), str)]
    out["nvml_note"] = notes[0] if notes else (None if power else "no NVML samples recorded")
    return out


def format_summary(s: dict, cfg: dict | None = None, evals: list = (), title: str = "") -> str:
    lines = [title] if title else []
    if cfg:
        lines.append(f"scenario {cfg.get('scenario')}  preset {cfg.get('preset')}  batch "
                     f"{cfg.get('prompts_per_step', 0) * cfg.get('group_size', 0)}  impl {cfg.get('impl')}  "
                     f"fp8 {cfg.get('fp8')}")
    warm = (f"first {s['warmup_excluded']} excluded as warm-up" if s["warmup_excluded"]
            else "no warm-up excluded (too few steps)")
    lines.append(f"steps: {s['steps']} recorded, {s['measured_steps']} measured ({warm})")
    lines.append(f"mean step time: {s['step_ms']:.1f} ms")
    lines.append(f"{'phase':<16}{'ms':>10}{'%':>8}{'peak MiB':>11}")
    for p, ms in s["phases_ms"].items():
        mem = s["peak_mem_MiB"].get(p)
        lines.append(f"{p:<16}{ms:>10.1f}{100 * ms / s['step_ms']:>8.1f}{'' if mem is None else f'{mem:.0f}':>11}")
    total = sum(v for k, v in s["phases_ms"].items() if k != "other")
    lines.append(f"{'named phases':<16}{total:>10.1f}{100 * total / s['step_ms']:>8.1f}   (other = not covered)")
    lines.append(f"throughput: {s['samples_per_s']:.2f} samples/s, {s['gen_tokens_per_s']:.1f} generated tokens/s, "
                 f"{s['trained_tokens_per_s']:.1f} trained tokens/s, {s['images_per_s']:.2f} images/s")
    mfu = "unknown (no datasheet peak for this device)" if s["mfu"] is None else f"{100 * s['mfu']:.2f}%"
    lines.append(f"model FLOPs: {s['flops_per_step'] / 1e9:.3g} GFLOP/step, {s['tflops_per_s']:.4g} TFLOP/s, "
                 f"MFU {mfu}")
    if s["peak_mem_MiB"]:
        top = max(s["peak_mem_MiB"], key=s["peak_mem_MiB"].get)
        lines.append(f"peak memory: {s['peak_mem_MiB'][top]:.0f} MiB (in {top})")
    note = s["nvml_note"] or ""
    if s["power_W_mean"] is not None:
        lines.append(f"mean power: {s['power_W_mean']:.0f} W ({s['energy_J'] or 0:.0f} J/step), SM util "
                     f"{s['sm_util_pct_mean'] or 0:.0f}%, SM clock {s['sm_clock_MHz_mean'] or 0:.0f} MHz, device "
                     f"memory used up to {s['mem_used_MiB_max'] or 0:.0f} MiB (NVML)")
    else:
        lines.append("mean power: " + (note if note.startswith("unavailable") else f"unavailable ({note})"))
    if evals:
        lines.append(f"held-out reward: base {evals[0]['eval_reward']:.3f} (step {evals[0]['step']}) -> final "
                     f"{evals[-1]['eval_reward']:.3f} (step {evals[-1]['step']})")
    else:
        lines.append("held-out reward: not evaluated in this run")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(train: list, run_dir, warmup: int = 0) -> list:
    """phases.png, throughput.png, memory_power.png (memory.png without NVML data) in run_dir; returns their paths.
    The first `warmup` steps are left out (a warm-up step's compile and allocation would set the scale)."""
    plt, d = _plt(), Path(run_dir)
    shown = train[warmup:] or train
    steps = [r["step"] for r in shown]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(shown)
    for p in PHASES:
        vals = [r.get(f"phase/{p}_ms", 0.0) for r in shown]
        if any(vals):
            ax.bar(steps, vals, bottom=bottom, label=p)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(steps, [r["step_ms"] for r in shown], "k.", label="step_ms")
    left_out = f" (first {len(train) - len(shown)} warm-up step(s) left out)" if len(shown) < len(train) else ""
    ax.set(xlabel="step", ylabel="ms", title="phase breakdown" + left_out)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    if len(steps) <= 20:
        ax.set_xticks(steps)
    paths = [_save(fig, d / "phases.png")]
    panels = [p for p in (_lines(shown, ("samples_per_s", "samples/s"), ("images_per_s", "images/s")),
                          _lines(shown, ("gen_tokens_per_s", "generated tokens/s"),
                                 ("trained_tokens_per_s", "trained tokens/s"))) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for a, lines in zip(axes[0], panels):
        for (label, vals), style in zip(lines, ("o-", "s--")):
            a.plot(steps, vals, style, label=label)
        a.set_xlabel("step")
        a.legend(fontsize=7)
    fig.suptitle("throughput")
    paths.append(_save(fig, d / "throughput.png"))
    paths.append(_plot_memory_power(plt, shown, d))
    return paths


def _lines(train, *series):
    """[(label, values)] of the series that have data; a series equal to the one before it is merged into its
    label (samples/s = images/s when every sample is an image) instead of drawn twice."""
    out = []
    for key, label in series:
        vals = [r.get(key, 0.0) or 0.0 for r in train]
        if not any(vals):
            continue
        if out and out[-1][1] == vals:
            out[-1] = (f"{out[-1][0]} = {label}", vals)
        else:
            out.append((label, vals))
    return out


def _plot_memory_power(plt, train, d):
    """memory_power.png with NVML power samples; memory.png (one panel) without: no empty panel."""
    t, acc = [], 0.0
    for r in train:
        acc += r["step_ms"] / 1e3
        t.append(acc)
    power = [(x, r["nvml/power_W_mean"]) for x, r in zip(t, train) if "nvml/power_W_mean" in r]
    fig, axes = plt.subplots(2 if power else 1, 1, figsize=(7, 5 if power else 3), sharex=True, squeeze=False)
    mem = [max([v for k, v in r.items() if k.endswith("_peak_mem_MiB")] or [0.0]) for r in train]
    axes[0][0].plot(t, mem, "o-")
    axes[0][0].set(ylabel="peak MiB (step)", title="memory and power" if power else "memory (no power samples)")
    if power:
        axes[1][0].plot([p[0] for p in power], [p[1] for p in power], "o-", color="tab:red")
        axes[1][0].set_ylabel("mean power W (step)")
    axes[-1][0].set_xlabel("run time (s, sum of step times)")
    return _save(fig, d / ("memory_power.png" if power else "memory.png"))


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return Path(path)


def report(run_dir, warmup: int | None = None, plots: bool = True) -> tuple:
    """(summary table text, summary dict, plot paths) of a run directory. warmup None: the warm-up steps a
    `profile` run marked in its records, else 1."""
    cfg, train, evals = load_run(run_dir)
    if warmup is None:
        warmup = sum(bool(r.get("warmup")) for r in train) if any("warmup" in r for r in train) else 1
    s = summarize(train, warmup)
    text = format_summary(s, cfg, evals, title=f"run {run_dir}")
    return text, s, plot_run(train, run_dir, warmup) if plots else []
