"""PNG outputs of a run: reward curves (train per step, held-out per evaluation) and labelled sample sheets."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

N_SHOW = 8  # tasks shown on a sample sheet
CELL, PAD, TEXT_W, HEAD = 128, 8, 560, 44  # pixels: an image cell (images upscaled nearest-neighbour), gap, text


def _pixels(img: torch.Tensor):
    """[3, h, w] in [-1, 1] -> [h, w, 3] in [0, 1] (numpy)."""
    return ((img.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


def sheet_size(n_rows: int, n_image_cols: int) -> tuple:
    """(width, height) in pixels of a sample sheet."""
    return (PAD + n_image_cols * (CELL + PAD) + TEXT_W, HEAD + n_rows * (CELL + PAD) + PAD)


def _cell_text(task, columns, i) -> str:
    lines = textwrap.wrap(f"prompt: {task['prompt']}", 70)
    for name, samples in columns.items():
        s = samples[i]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in s["parts"].items() if k != "total")
        if s.get("text") is not None:  # the LM's completion (None: no text rollout in this scenario)
            verdict = "" if s.get("right") is None else ("  RIGHT" if s["right"] else "  WRONG")
            lines += textwrap.wrap(f"{name}: {s['text']!r}{verdict}", 70)
        lines.append(f"{name}: reward {s['reward']:.3f}" + (f" ({parts})" if parts else ""))
    return "\n".join(lines)


def save_samples(columns: dict, path, title: str) -> Path:
    """A sample sheet: one row per task (the same tasks in every column), left to right the task's source image
    (edits, understanding), each column's image (e.g. before and after RL; upscaled 4x, nearest-neighbour), then
    the prompt and each column's completion (if any) and reward with its parts. columns: label -> list of
    {"prompt", "text" (None: no completion), "right" (None: no exact answer), "image", "source", "reward", "parts"}
    (image / source [3, h, w] in [-1, 1] or None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    first = columns[names[0]][:N_SHOW]
    has_src = any(s["source"] is not None for s in first)
    img_cols = [n for n in names if any(s["image"] is not None for s in columns[n][:N_SHOW])]
    headers = (["source"] if has_src else []) + img_cols
    W, H = sheet_size(len(first), len(headers))
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=100)
    fig.text(PAD / W, 1 - 6 / H, title, fontsize=10, va="top", weight="bold")
    for j, name in enumerate(headers):
        fig.text((PAD + j * (CELL + PAD)) / W, 1 - (HEAD - 4) / H, name, fontsize=8, va="bottom")
    for i in range(len(first)):
        y = 1 - (HEAD + i * (CELL + PAD) + CELL) / H
        imgs = ([first[i]["source"]] if has_src else []) + [columns[n][i]["image"] for n in img_cols]
        for j, img in enumerate(imgs):
            ax = fig.add_axes([(PAD + j * (CELL + PAD)) / W, y, CELL / W, CELL / H])
            ax.axis("off")
            if img is not None:
                ax.imshow(_pixels(img), interpolation="nearest")
        ax = fig.add_axes([(PAD + len(imgs) * (CELL + PAD)) / W, y, (TEXT_W - PAD) / W, CELL / H])
        ax.axis("off")
        ax.text(0, 1, _cell_text(first[i], {n: columns[n] for n in names}, i), va="top", fontsize=7,
                family="monospace", transform=ax.transAxes)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def reward_series(recs) -> dict:
    """label -> (steps, values) of what the reward plot draws: the train reward (batch mean), each of its parts
    (the reward terms and their named parts; not a part equal to the total at every step), and the held-out
    reward."""
    train = [r for r in recs if r.get("phase") == "train"]
    evals = [r for r in recs if r.get("phase") == "eval"]
    out = {}
    if train:
        out["train reward (batch mean)"] = ([r["step"] for r in train], [r["reward"] for r in train])
        for k in [k for k in train[-1] if k.startswith("reward_")]:
            pts = [(r["step"], r[k]) for r in train if k in r]
            if all(r.get(k) == r["reward"] for r in train):  # the one term, unweighted: it is the total, drawn
                continue  # already (its line would lie exactly under the total's, a legend entry with no line)
            out[f"train {k[len('reward_'):]}"] = ([s for s, _ in pts], [v for _, v in pts])
    if evals:
        out["held-out reward"] = ([r["step"] for r in evals], [r["eval_reward"] for r in evals])
    return out


def plot_rewards(metrics_path, out_path) -> Path:
    """Reward curves: the train reward and held-out reward (bold), the reward's parts (thin, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(metrics_path)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (steps, values) in reward_series(recs).items():
        if label == "held-out reward":
            ax.plot(steps, values, "o-", label=label)
        elif label == "train reward (batch mean)":
            ax.plot(steps, values, label=label, alpha=0.7)
        else:
            ax.plot(steps, values, "--", label=label, alpha=0.6, linewidth=1)
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
