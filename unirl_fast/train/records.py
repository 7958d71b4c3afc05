"""What a run says about itself: the step's record (losses and metrics summed on the device and read once, the
reward and its parts, throughput, model FLOPs, MFU, NVML), the console line, and the run directory's outputs
(metrics.jsonl and the trackers, the sample sheets, the reward plot).

MFU uses the device's datasheet peak on CUDA and is None elsewhere (never guessed for a CPU); NVML samples the
GPU in the background on CUDA, and on a CPU (or without NVML) the first record says why, once.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..profiling import NvmlSampler, device_peak_tflops
from ..profiling.step_flops import step_flops
from .checkpoint import read_entry, write_entry


class StepProfile:
    """Throughput, FLOPs and MFU of a step, and the NVML summary over it."""

    def __init__(self, device, fp8: bool):
        self.peak_tflops, self.nvml = None, None
        self._note = "unavailable: not a CUDA device"
        if device.type == "cuda":
            self.peak_tflops = device_peak_tflops(torch.cuda.get_device_name(device), "fp8" if fp8 else "bf16")
            self.nvml = NvmlSampler(device_index=_nvml_index(device), interval_s=0.1).start()
            self._note = None if self.nvml.available else f"unavailable: {self.nvml.reason}"

    def throughput(self, model, scenario, cfg, b, n_tok, seconds) -> dict:
        """samples/s, generated and trained text tokens/s, images/s, model FLOPs per phase and MFU (None where the
        device's peak is unknown, e.g. on a CPU). Counts are this rank's (summed over ranks by reduce_record)."""
        trained = n_tok if scenario.train_lm else 0
        n_img = len(b.tasks) if b.images is not None else 0
        flops = step_flops(model, scenario, cfg, b)
        total = sum(flops.values())
        out = {"samples_per_s": len(b.tasks) / seconds, "tokens_generated": n_tok, "tokens_trained": trained,
               "gen_tokens_per_s": n_tok / seconds, "trained_tokens_per_s": trained / seconds, "images": n_img,
               "images_per_s": n_img / seconds, **{f"flops/{k}": v for k, v in flops.items()}, "flops": total,
               "tflops_per_s": total / seconds / 1e12}
        out["mfu"] = total / seconds / (self.peak_tflops * 1e12) if self.peak_tflops else None
        return out

    def nvml_record(self, t0, t1) -> dict:
        """The NVML summary over this step on CUDA; on a CPU (or without NVML) the reason, once per run."""
        if self.nvml is not None and self.nvml.available:
            return {f"nvml/{k}": v for k, v in self.nvml.summary(since=t0, until=t1).items()}
        if self._note is None:
            return {}
        note, self._note = self._note, None
        return {"nvml": note}

    def stop(self):
        if self.nvml is not None:
            self.nvml.stop()


def _nvml_index(dev) -> int:
    """NVML numbers every GPU of the machine; CUDA only the visible ones: map through CUDA_VISIBLE_DEVICES."""
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


class RunOutputs:
    """The run directory's records, written by the main process only (nothing when `write` is False: eval / export,
    a DeepSpeed rank other than 0): metrics.jsonl and the --report-to trackers, sample sheets, the reward plot."""

    def __init__(self, cfg, run_dir, write: bool):
        self.cfg, self.run_dir, self.write_files, self.trackers = cfg, Path(run_dir), write, None
        self.metrics = self.run_dir / "metrics.jsonl"

    def open_trackers(self, step: int, report: bool):
        """--report-to: the trackers every record and sample sheet also goes to (train.trackers)."""
        from .trackers import Trackers

        config = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        self.trackers = Trackers(self.cfg.report_to if report else (), self.run_dir, config, step)

    def write(self, rec: dict):
        if not self.write_files:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.trackers is not None:
            self.trackers.log(rec)

    def save_samples(self, columns, name, step: int, before=False):
        """A labelled sample sheet; at the end of the run also samples.png, the base and the final model side by
        side (the base's samples are kept in samples_before.json / .safetensors for that, so a resumed run can draw
        it too)."""
        from .plots import save_samples

        if not self.write_files:
            return
        d = self.run_dir
        save_samples(columns, d / name, f"{self.cfg.scenario}: held-out tasks, {', '.join(columns)}")
        sheets = [name]
        if before:
            write_entry(d, "samples_before", columns)
        elif any((d / f"samples_before{e}").is_file() for e in (".json", ".pt")):
            both = {**read_entry(d, "samples_before"), **columns}
            save_samples(both, d / "samples.png", f"{self.cfg.scenario}: held-out tasks before and after RL")
            sheets.append("samples.png")
        if self.trackers is not None:
            for sheet in sheets:
                self.trackers.image(Path(sheet).stem, d / sheet, step)

    def plot(self):
        from .plots import plot_rewards

        if self.write_files:
            plot_rewards(self.metrics, self.run_dir / "rewards.png")

    def eval_missing(self, step: int) -> bool:
        """Whether metrics.jsonl lacks the evaluation record of `step`."""
        if not self.metrics.is_file():
            return True
        return not any(r.get("phase") == "eval" and r.get("step") == step
                       for r in map(json.loads, self.metrics.read_text().splitlines()))

    def close(self):
        if self.trackers is not None:
            self.trackers.close()


_MAX_METRICS = ("ratio_exact", "logp_mismatch")  # maxima over the step's micro-batches (train.rl.image_loss)


def accumulate(metrics, prefix, loss, m, weight):
    """Loss values are already scaled for accumulation (they add up); metrics are micro-batch means (weighted),
    _MAX_METRICS the maximum. Kept on the device: the step reads them once (`host_values`), not per micro-batch."""
    metrics[f"{prefix}_loss"] = metrics.get(f"{prefix}_loss", 0.0) + loss.detach().float()
    for k, v in m.items():
        key = f"{prefix}_{k}"
        v = v.detach().float() if isinstance(v, torch.Tensor) else v
        if k in _MAX_METRICS:
            metrics[key] = torch.maximum(metrics[key], v) if key in metrics else v
        else:
            metrics[key] = metrics.get(key, 0.0) + v * weight


def useful_frac(rewards, group_ids):
    """The share of samples in groups whose rewards differ (the samples a group advantage gives a gradient)."""
    r, g = rewards.float(), group_ids.to(rewards.device)  # group ids < B (whole groups of >= 2 per rank)
    hi = torch.full_like(r, -float("inf")).scatter_reduce(0, g, r, "amax")
    lo = torch.full_like(r, float("inf")).scatter_reduce(0, g, r, "amin")
    return (hi[g] > lo[g]).float().mean()


def host_values(d: dict) -> dict:
    """d with its tensor values read to Python floats: one stacked copy per device (one host sync for the lot)."""
    out = dict(d)
    by_device = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():
        out.update(zip(keys, torch.stack([d[k].detach().float().reshape(()) for k in keys]).tolist()))
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def reward_parts(parts, prefix=""):
    if not parts:
        return {}
    keys = [k for k in parts[0] if k != "total"]
    return {f"{prefix}reward_{k}": sum(p[k] for p in parts) / len(parts) for k in keys}


def samples(b, rows) -> list:
    """Sample-sheet records of a scored batch's rows: prompt, completion, right / wrong (exact-answer tasks), image,
    source image (edits; the scene asked about for understanding), reward and its parts. All on the CPU."""
    out = []
    for i in rows:
        t, part = b.tasks[i], b.reward_parts[i]
        src = b.sources[i].cpu() if b.sources is not None else None  # an edit's source, as the DiT saw it
        if src is None and b.lm_images is not None:  # the image a VLM was asked about, as it saw it
            src = b.lm_images[i]
        elif src is None and t.image is not None:  # the image a text-only LM read a description of
            src = t.source_image(b.images.shape[-1] if b.images is not None else 32)
        out.append({"prompt": t.prompt, "text": b.completions[i] if b.completions else None,
                    "right": bool(part["answer"]) if "answer" in part else None,
                    "image": b.images[i].cpu() if b.images is not None else None, "source": src,
                    "reward": float(part["total"]), "parts": {k: float(v) for k, v in part.items()}})
    return out


def public(d):
    return {k: v for k, v in d.items() if not k.startswith("_")}


def log_line(r, kl_used=False):
    """What moves in a step: the reward and its parts, the advantage spread, the policy ratio and clipping (which an
    on-policy single update keeps at 1 and 0: they matter once rollouts go stale), the entropy, KL only when a KL
    term is in the loss, the step time and throughput. The losses are in metrics.jsonl."""
    parts = " ".join(f"{k[len('reward_'):]} {v:.3f}" for k, v in r.items()
                     if k.startswith("reward_") and k != "reward_call_ms")
    out = [f"step {r['step']:4d}", f"reward {r['reward']:.3f}" + (f" ({parts})" if parts else ""),
           f"adv std {r['adv_std']:.2f}"]
    for side in ("text", "image"):
        if f"{side}_ratio_mean" in r:
            clip = r.get(f"{side}_clip_frac_low", 0.0) + r.get(f"{side}_clip_frac_high", 0.0) + \
                r.get(f"{side}_clip_frac", 0.0)
            out.append(f"{side} ratio {r[f'{side}_ratio_mean']:.3f} clip {clip:.2f}")
    if "text_entropy_mean" in r:
        out.append(f"entropy {r['text_entropy_mean']:.2f}")
    if kl_used and "text_kl_mean" in r:
        out.append(f"kl {r['text_kl_mean']:.2e}")
    if "image_velocity_mse" in r:
        out.append(f"v-mse {r['image_velocity_mse']:.1e}")
    out.append(f"{r['step_ms'] / 1e3:.1f} s/step {r['samples_per_s']:.1f} samples/s")
    return "  ".join(out)


def read_evals(path):
    evals = [json.loads(line) for line in open(path) if '"phase": "eval"' in line]
    return {"base_eval_reward": evals[0]["eval_reward"] if evals else None,
            "final_eval_reward": evals[-1]["eval_reward"] if evals else None}
