"""PNG outputs of a run: reward curves (train per step, held-out per evaluation) and sample grids."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path, ncol: int = 8) -> Path:
    """images [N, 3, H, W] in [-1, 1] -> one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, h, w = images.shape
    rows = (n + ncol - 1) // ncol
    grid = torch.ones(3, rows * (h + 2), ncol * (w + 2))
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = (img.float() + 1) / 2
    plt.imsave(str(path), grid.clamp(0, 1).permute(1, 2, 0).numpy())
    return Path(path)


def plot_rewards(metrics_path, out_path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in recs if r.get("phase") == "train"]
    evals = [r for r in recs if r.get("phase") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot([r["step"] for r in train], [r["reward"] for r in train], label="train reward (batch mean)", alpha=0.7)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out reward")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
