"""`unirl-fast profile`: a fixed-length measured trainer run, and `--compare`: fast vs reference side by side.

What runs: the lean trainer's own `Trainer.train_step` (no copy of the loop), on a model built from a model
preset with random init at a fixed seed (no world pretrain: only speed is measured, yet the synthetic world's
prompts and verifiers still give rewards, so every phase does its real work). `tiny` / `tiny-fp8` use the
world's 32 px geometry (`train.pretrain.world_model_config`); other presets are used at their own image size
(bench-1.5b: DC-AE, 512 px) with the character tokenizer (the world's prompts are plain text; the LM's vocab is
larger than the 97 character ids) and, for edit scenarios, twice the DiT's input channels. On CUDA the model
runs in bf16, on CPU in fp32. `--fp8` goes through the trainer's own `convert_to_fp8` (the unified precision
flow: rollout and training share the FP8 modules).

Measurement: `warmup` steps first (Triton compilation, autotuning, allocator and cache warm-up), then `steps`
measured steps; every step's record (phases, throughput, FLOPs, MFU, NVML) goes to `<out>/<impl>/metrics.jsonl`
(so `unirl-fast report <out>/<impl>` works on it) and the means over the measured steps to
`<out>/profile.json` and `<out>/profile.csv`.

`--impl fast` = impl "auto" (the Triton kernels on CUDA; on CPU "auto" resolves to the eager reference ops, so a
CPU comparison measures the harness, not the kernels); `--impl reference` = every public op in eager PyTorch
(log-probs, policy losses, flow log-probs and losses, advantages, and the image rollout's SDE step).

`--compare` runs fast, then reference, in one process, from identical initial weights (the model is rebuilt
from the same seed), at the same batch and seed, and checks the first `check_steps` steps' losses and rewards
as |fast - reference| <= atol + rtol * max(|fast|, |reference|):
- fp32 (CPU): rtol 1e-4, atol 1e-6. The ops' tests bound kernel-vs-oracle error near 1e-6 relative; a step's
  loss is a mean of O(1) terms, so anything above 1e-4 relative is a real difference, not rounding.
- bf16 (CUDA): rtol 2e-2, atol 1e-3. Both impls accumulate in fp32 from the same bf16 inputs, so step 1
  (identical weights and rollouts) agrees to ~1e-5; from step 2 on the weights are one bf16 update apart, and a
  gradient differing in its last bits can flip the bf16 rounding of an update (one ulp = 2^-8 relative), so a
  few ulps (2e-2) is the honest bound. atol covers GRPO losses near 0 (at step 1 every ratio is 1 and the
  group advantages sum to 0). Sampling can diverge once weights differ, which is why only the first steps
  are checked.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import json
from pathlib import Path

import torch

from .report import PHASES, summarize
from .train.config import use_device

IMPLS = {"fast": "auto", "reference": "reference"}
TOLERANCE = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (2e-2, 1e-3)}
CHECKED = ("text_loss", "image_loss", "reward")


def profile_model_config(preset: str, edit: bool):
    """The UnifiedConfig the profiler builds for a model preset (see the module docstring)."""
    from .models import preset_config
    from .train.pretrain import world_model_config

    if preset in ("tiny", "tiny-fp8", "tiny-vlm"):
        return world_model_config(preset, edit)
    cfg = preset_config(preset)
    if cfg.tokenizer is None:
        cfg = cfg.replace(tokenizer="char")
    if edit and not cfg.edit:
        cfg = cfg.replace(edit=True, dit={**cfg.dit, "in_channels": 2 * cfg.dit["in_channels"]})
    return cfg


def build_model(preset: str, edit: bool, seed: int, device, dtype):
    from .models import UnifiedModel

    torch.manual_seed(seed)
    return UnifiedModel(profile_model_config(preset, edit)).to(device=device, dtype=dtype)


def _prepare_dir(d: Path) -> None:
    if (d / "checkpoints").exists():
        raise ValueError(f"{d} holds checkpoints (a training run?): give profile an output directory of its own")
    d.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "config.json"):
        (d / name).unlink(missing_ok=True)


def run_impl(cfg, impl: str, out: Path, warmup: int, steps: int, device, dtype, log=print) -> list:
    """warmup + steps train steps of a fresh model at impl `impl` ("fast" | "reference"); the step records."""
    from .train import Trainer
    from .train.scenarios import get_scenario

    run_dir = out / impl
    _prepare_dir(run_dir)
    c = dataclasses.replace(cfg, impl=IMPLS[impl], run_dir=str(run_dir), steps=warmup + steps)
    model = build_model(c.preset, get_scenario(c.scenario).edit, c.seed, device, dtype)
    t = Trainer(c, log=log, model=model)
    recs = []
    try:
        with open(run_dir / "metrics.jsonl", "a") as f:
            for i in range(warmup + steps):
                rec = {"phase": "train", "impl": impl, "warmup": i < warmup, **t.train_step()}
                f.write(json.dumps(rec) + "\n")
                recs.append(rec)
                log(f"{impl} step {rec['step']}/{warmup + steps}{' (warm-up)' if i < warmup else ''}  "
                    f"{rec['step_ms']:.1f} ms  {rec['samples_per_s']:.2f} samples/s")
    finally:
        t.profile.stop()
        del t, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return recs


def check_losses(fast: list, ref: list, n: int, dtype) -> tuple:
    """Rows (step, key, fast, reference, |diff|, bound, ok) for the first n steps, and whether all pass."""
    rtol, atol = TOLERANCE[dtype]
    rows = []
    for a, b in list(zip(fast, ref))[:n]:
        for k in CHECKED:
            if k in a and k in b:
                diff = abs(a[k] - b[k])
                bound = atol + rtol * max(abs(a[k]), abs(b[k]))
                rows.append((a["step"], k, a[k], b[k], diff, bound, diff <= bound))
    return rows, bool(rows) and all(r[-1] for r in rows)


def _metric_rows(summaries: dict) -> list:
    """(metric, value per impl) rows shared by the table, the JSON and the CSV."""
    impls = list(summaries)
    rows = [(f"{p} ms", [summaries[i]["phases_ms"].get(p) for i in impls]) for p in PHASES
            if any(p in summaries[i]["phases_ms"] for i in impls)]
    for key, name in (("step_ms", "step ms"), ("samples_per_s", "samples/s"), ("gen_tokens_per_s", "gen tokens/s"),
                      ("trained_tokens_per_s", "trained tokens/s"), ("images_per_s", "images/s"),
                      ("tflops_per_s", "TFLOP/s"), ("mfu", "MFU")):
        rows.append((name, [summaries[i][key] for i in impls]))
    return rows


def _ratio(vals):
    """fast / reference of a metric row, None when either side is missing (or the reference is 0)."""
    return vals[0] / vals[1] if len(vals) == 2 and vals[0] is not None and vals[1] else None


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def format_table(summaries: dict, loss_rows=(), passed=None, tol=None, same_ops=False) -> str:
    """same_ops: both sides ran the same ops (impl "auto" resolves to the reference ops off CUDA), so the step-time
    ratio is run-to-run noise and no speed-up is claimed."""
    impls = list(summaries)
    compare = impls == ["fast", "reference"]
    head = f"{'metric':<20}" + "".join(f"{i:>12}" for i in impls) + (f"{'fast/ref':>10}" if compare else "")
    lines = [head, "-" * len(head)]
    for name, vals in _metric_rows(summaries):
        line = f"{name:<20}" + "".join(f"{_fmt(v):>12}" for v in vals)
        if compare:
            line += f"{_fmt(_ratio(vals)):>10}"
        lines.append(line)
    if compare and same_ops:
        lines.append("no speed-up claimed: off CUDA both sides run the same (reference) ops, so fast/ref is "
                     "run-to-run noise; the fused kernels run on a GPU")
    elif compare:
        f, r = summaries["fast"], summaries["reference"]
        lines.append(f"speed-up (reference step time / fast step time): {r['step_ms'] / f['step_ms']:.3f}x")
    if loss_rows:
        lines += ["", f"first steps, fast vs reference (ok: |diff| <= {tol[1]:g} + {tol[0]:g} * max|value|)",
                  f"{'step':>4} {'value':<11}{'fast':>14}{'reference':>14}{'|diff|':>11}{'bound':>11}  ok"]
        for step, k, a, b, d, bound, ok in loss_rows:
            lines.append(f"{step:>4} {k:<11}{a:>14.6g}{b:>14.6g}{d:>11.3g}{bound:>11.3g}  {'yes' if ok else 'NO'}")
        lines.append(f"losses equal within tolerance: {'PASS' if passed else 'FAIL'}")
    return "\n".join(lines)


def write_results(out: Path, result: dict) -> tuple:
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    impls = list(result["summaries"])
    with open(out / "profile.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["metric", *impls, *(["fast_over_reference"] if len(impls) == 2 else [])])
        for name, vals in _metric_rows(result["summaries"]):
            w.writerow([name, *vals, *([_ratio(vals)] if len(vals) == 2 else [])])
    return out / "profile.json", out / "profile.csv"


def profile(cfg, impl: str = "fast", *, steps: int, warmup: int = 1, compare: bool = False, out="runs/profile",
            check_steps: int = 2, log=print) -> dict:
    """Run the profile (see the module docstring); returns {"table", "summaries", "losses", "passed", ...}."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {tuple(IMPLS)}, got {impl!r}")
    if steps < 1 or warmup < 0 or check_steps < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, check_steps >= 1; got {steps}, {warmup}, {check_steps}")
    cfg.validate()
    device = use_device(cfg)  # cuda:N current before the model is built there
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(out)
    impls = ["fast", "reference"] if compare else [impl]
    records = {i: run_impl(cfg, i, out, warmup, steps, device, dtype, log) for i in impls}
    summaries = {i: summarize(r, warmup) for i, r in records.items()}
    loss_rows, passed = check_losses(records["fast"], records["reference"], check_steps, dtype) if compare \
        else ([], None)
    table = format_table(summaries, loss_rows, passed, TOLERANCE[dtype], same_ops=device.type != "cuda")
    result = {"config": dataclasses.asdict(cfg), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "dtype": str(dtype), "warmup": warmup, "steps": steps, "summaries": summaries,
              "losses": [dict(zip(("step", "key", "fast", "reference", "abs_diff", "bound", "ok"), r))
                         for r in loss_rows], "passed": passed, "tolerance": dict(zip(("rtol", "atol"),
                                                                                     TOLERANCE[dtype]))}
    paths = write_results(out, result)
    return {**result, "table": table, "files": [str(p) for p in paths]}
