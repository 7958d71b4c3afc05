"""Run by tests/test_distributed.py in a fresh process: one train step of the plain trainer and of the same trainer
under DeepSpeed (1 rank, ZeRO stage argv[2]) from the same weights on the same rollout; prints JSON with the max
gradient / parameter differences. Gradients are what catch wrong loss scaling: AdamW's first step is nearly
invariant to a constant gradient scale, so parameters alone would not.

    MASTER_PORT=29500 python tests/ds_one_step.py RUN_DIR STAGE LOSS_TYPE [DEEPSPEED_JSON]
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from unirl_fast.train import PRESETS, Trainer

run_dir, stage, loss_type = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ds_json = sys.argv[4] if len(sys.argv) > 4 else None
# micro_batch 2 of a local batch of 8: four accumulated micro-batches; clipping off so it cannot hide a scale error
cfg = dataclasses.replace(PRESETS["smoke"], scenario="reason-generate", prompts_per_step=2, group_size=4,
                          micro_batch=2, steps=1, grad_clip=1e9, loss_type=loss_type, temperature=1.5,
                          run_dir=os.path.join(run_dir, "plain"))


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


def varied_rewards():  # rewards that differ inside each group, so the advantages are not all zero
    import unirl_fast.train.trainer as tm

    real = tm.score

    def score(*args):
        b = real(*args)
        b.rewards = torch.arange(len(b.rewards), dtype=torch.float32) % 3 / 2
        return b

    tm.score = score


varied_rewards()
Trainer(cfg, log=lambda *_: None)  # pretrains the base model into <run_dir>/plain/base/<key>
base = next(p for p in (Path(cfg.run_dir) / "base").iterdir() if p.is_dir() and not p.name.endswith(".tmp"))
plain = Trainer(dataclasses.replace(cfg, model_path=str(base), run_dir=os.path.join(run_dir, "p2")),
                log=lambda *_: None)
start = {n: p.detach().clone() for n, p in plain.model.named_parameters() if p.requires_grad}
plain_grads = capture(plain, lambda p: p.grad)
rec_plain = plain.train_step()
plain_params = {n: p.detach().clone() for n, p in plain.model.named_parameters() if p.requires_grad}
assert "deepspeed" not in sys.modules, "the single-process path imported deepspeed"

from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
ds_cfg = dataclasses.replace(cfg, zero_stage=stage, model_path=str(base), run_dir=os.path.join(run_dir, "ds"),
                             deepspeed_config=ds_json)
ds = Trainer(ds_cfg, log=lambda *_: None)
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
    "n_params": len(plain_grads), "grad_rel": max_rel(ds_grads, plain_grads, 1e-3),
    "update_rel": max_rel({k: ds_params[k] - v for k, v in start.items()},
                          {k: plain_params[k] - v for k, v in start.items()}, 1.0),
    "moved": moved, "grad_norm_plain": gnorm,
    "grad_norm_ds": rec_ds["grad_norm"], "grad_norm_rec_plain": rec_plain["grad_norm"],
    "loss_plain": rec_plain.get("text_loss", 0.0) + rec_plain.get("image_loss", 0.0),
    "loss_ds": rec_ds.get("text_loss", 0.0) + rec_ds.get("image_loss", 0.0)}))
