"""Run by tests/test_distributed.py, one process per rank (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* set): one
train step of the plain single-process trainer on the global batch, then one step of the same trainer under
DeepSpeed, where every rank trains on its rows of that very rollout (the plain rollout is recomputed and sliced,
so the data are identical). Prints one JSON line with the gradient / update differences.

Gradients are what catch wrong scaling (1/GAS twice, a missing average over ranks, per-rank instead of global token
counts for bnpo/dapo): AdamW's first step is nearly invariant to a constant gradient scale, so parameters alone
would not.

    python tests/ds_one_step.py RUN_DIR STAGE LOSS_TYPE [DEEPSPEED_JSON]
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

import unirl_fast.train.pipeline as pl
import unirl_fast.train.trainer as tm
from unirl_fast.rollout.text import TextRolloutOutput
from unirl_fast.train import PRESETS, Trainer

run_dir, stage, loss_type = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ds_json = sys.argv[4] if len(sys.argv) > 4 else None
DIST = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}  # the plain trainer runs first
rank, world = int(DIST["RANK"]), int(DIST["WORLD_SIZE"])
# 2 prompts x 4 samples; under 2 ranks a local batch of 4 in two micro-batches of 2. Clipping off so it cannot hide
# a scale error; temperature 1.5 so completion lengths (token counts) differ between ranks.
cfg = dataclasses.replace(PRESETS["smoke"], scenario="reason-generate", prompts_per_step=2, group_size=4,
                          micro_batch=2, steps=1, grad_clip=1e9, loss_type=loss_type, temperature=1.5,
                          run_dir=os.path.join(run_dir, f"plain-rank{rank}"))
real_rollout, real_score = tm.rollout, pl.score
offset = [0]  # this process's first global row (rewards depend on the global row, as in the plain batch)


def score(*args, **kw):  # rewards that differ inside each group, so the advantages are not all zero
    b = real_score(*args, **kw)
    b.rewards = (torch.arange(len(b.rewards), dtype=torch.float32) + offset[0]) % 3 / 2
    return b


def capture(trainer, grads_of):
    """Record every trainable parameter's full gradient right before the optimizer step."""
    out = {}
    real = trainer._optimizer_step

    def step():
        for n, p in trainer.model.named_parameters():
            if p.requires_grad:
                g = grads_of(p)
                out[n] = torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None else g.clone()
        return real()

    trainer._optimizer_step = step
    return out


def rows(b, sl):
    """Rows `sl` of a rollout Batch (trajectory tensors are [S, B, ...], the rest [B, ...])."""
    cut = lambda t: None if t is None else t[sl]  # noqa: E731
    cond = lambda c: None if c is None else c.__class__(c.cond[sl], cut(c.pooled))  # noqa: E731
    t = b.traj  # per-sample fields cut; the schedule's (trainable, train_steps, kinds, params, ...) kept
    traj = dataclasses.replace(t, samples=t.samples[:, sl], next_samples=t.next_samples[:, sl],
                               sigmas=t.sigmas[:, sl], sigmas_next=t.sigmas_next[:, sl], log_probs=t.log_probs[:, sl],
                               latents=cut(t.latents), conditioning=cond(t.conditioning), uncond=cond(t.uncond),
                               source_latents=cut(t.source_latents), images=cut(t.images))
    x = b.text
    text = TextRolloutOutput(x.prompt_ids[sl], x.prompt_mask[sl], x.completion_ids[sl], x.logprobs[sl],
                             x.completion_mask[sl], x.texts[sl])
    g = b.group_ids[sl]
    return dataclasses.replace(b, tasks=b.tasks[sl], group_ids=g - g.min(), text=text, completions=b.completions[sl],
                               cond_ids=b.cond_ids[sl], cond_mask=b.cond_mask[sl], traj=traj, images=cut(b.images),
                               sources=cut(b.sources))


pl.score = score
Trainer(cfg, log=lambda *_: None)  # pretrains the base model into <run_dir>/plain-rank<r>/base/<key>
base = next(p for p in (Path(cfg.run_dir) / "base").iterdir() if p.is_dir() and not p.name.endswith(".tmp"))
plain = Trainer(dataclasses.replace(cfg, model_path=str(base), run_dir=cfg.run_dir + "-b"), log=lambda *_: None)
start = {n: p.detach().clone() for n, p in plain.model.named_parameters() if p.requires_grad}
plain_grads = capture(plain, lambda p: p.grad)
rec_plain = plain.train_step()
plain_params = {n: p.detach().clone() for n, p in plain.model.named_parameters() if p.requires_grad}
assert "deepspeed" not in sys.modules, "the single-process path imported deepspeed"

from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

os.environ.update(DIST)
ds = Trainer(dataclasses.replace(cfg, zero_stage=stage, model_path=str(base), deepspeed_config=ds_json,
                                 run_dir=os.path.join(run_dir, "ds")), log=lambda *_: None)
local = cfg.batch_size // world
offset[0] = rank * local
global_tasks = []
real_sample = ds._sample_tasks
ds._sample_tasks = lambda: global_tasks.extend(real_sample()) or tuple(global_tasks)


def sliced_rollout(model, scenario, c, tasks, gid, generator, **kw):
    """The plain run's global rollout (fresh generator seeded like the plain trainer's), this rank's rows."""
    full = real_rollout(model, scenario, c, global_tasks[0], global_tasks[1], torch.Generator().manual_seed(c.seed))
    b = rows(full, slice(rank * local, (rank + 1) * local))
    assert b.tasks == tasks
    return b


tm.rollout = sliced_rollout
ds_grads = capture(ds, safe_get_full_grad)
rec_ds = ds.train_step()
ds_params = {n: safe_get_full_fp32_param(p) for n, p in ds.model.named_parameters() if p.requires_grad}


def max_rel(a, b, floor):
    """Largest per-tensor max-abs error, relative to that tensor's scale floored at `floor` x the largest tensor's.
    The DiT's key biases get ~1e-11 gradients (softmax-invariant noise no two reduction orders agree on), which
    AdamW turns into updates of ~1e-3 lr: gradients use floor 1e-3, updates are measured against the largest one."""
    top = max(v.abs().max().item() for v in b.values())
    return max(((a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), floor * top, 1e-30)) for k in b)


gnorm = torch.sqrt(sum(g.double().pow(2).sum() for g in plain_grads.values())).item()
moved = max((plain_params[k] - v).abs().max().item() for k, v in start.items())
print("RESULT " + json.dumps({
    "rank": rank, "n_params": len(plain_grads), "grad_rel": max_rel(ds_grads, plain_grads, 1e-3),
    "update_rel": max_rel({k: ds_params[k] - v for k, v in start.items()},
                          {k: plain_params[k] - v for k, v in start.items()}, 1.0),
    "moved": moved, "grad_norm_plain": gnorm, "grad_norm_ds": rec_ds["grad_norm"],
    "ref_local_numel": sum(p.numel() for p in ds.ref.parameters()),  # ZeRO-3: partitioned (0 here)
    "ref_numel": sum(getattr(p, "ds_numel", p.numel()) for p in ds.ref.parameters()),
    "loss_plain": rec_plain.get("text_loss", 0.0) + rec_plain.get("image_loss", 0.0),
    "loss_ds": rec_ds.get("text_loss", 0.0) + rec_ds.get("image_loss", 0.0)}), flush=True)
