"""Run by tests/test_distributed.py, one process per rank (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* set): the
trainer under DeepSpeed with --fp8 (tiny-fp8 preset, smoke config) for two steps. Before the first step and after
each, every FP8Linear's rollout-style forward (no grad, inside the trainer's full-weights gather and an
fp8_weight_cache block, as the rollout engines run it; twice, so the second reuses the cached FP8 weight) must
equal the exact emulation of the weights the layer holds now. ZeRO-1/2 refresh the weights by an in-place copy
into a flat buffer and ZeRO-3 re-gathers them at the same address: a weight cache keyed on (storage, version)
served the pre-step FP8 weights here. Prints one RESULT JSON line.

    python tests/ds_fp8_step.py RUN_DIR STAGE [DEEPSPEED_JSON]
"""
import dataclasses
import json
import os
import sys

import torch
from torch import nn

from unirl_fast.fp8 import FP8Linear, fp8_weight_cache
from unirl_fast.train import PRESETS, Trainer

run_dir, stage = sys.argv[1], int(sys.argv[2])
ds_json = sys.argv[3] if len(sys.argv) > 3 else None
rank = int(os.environ["RANK"])
cfg = dataclasses.replace(PRESETS["smoke"], preset="tiny-fp8", fp8=True, scenario="reason-generate",
                          prompts_per_step=2, group_size=2, micro_batch=2, steps=2, zero_stage=stage,
                          deepspeed_config=ds_json, run_dir=run_dir)
t = Trainer(cfg, log=lambda *_: None)
layers = [(n, m) for n, m in t.model.named_modules() if isinstance(m, FP8Linear)]
gen = torch.Generator().manual_seed(rank)


def emulated(m, x):
    """FP8 emulation of the layer's current (gathered) weights, by a fresh module over copies: no shared state."""
    fresh = FP8Linear.from_linear(nn.Linear(m.in_features, m.out_features, bias=m.bias is not None),
                                  backend="emulation")
    fresh.weight = nn.Parameter(m.weight.detach().clone())
    if m.bias is not None:
        fresh.bias = nn.Parameter(m.bias.detach().clone())
    return fresh(x)


def max_diff():
    worst = 0.0
    with t._full_weights(), torch.no_grad(), fp8_weight_cache(t.model):
        for _, m in layers:
            x = torch.randn(5, m.in_features, generator=gen).to(m.weight.dtype)
            want = emulated(m, x)
            for _ in range(2):
                worst = max(worst, (m(x) - want).abs().max().item())
    return worst


def weights():
    with t._full_weights():
        return {n: m.weight.detach().clone() for n, m in layers}


diffs, start = [max_diff()], weights()
for _ in range(cfg.steps):
    t.train_step()
    diffs.append(max_diff())
end = weights()
moved = max((end[n] - start[n]).abs().max().item() for n in start)
print("RESULT " + json.dumps({"rank": rank, "layers": len(layers), "diffs": diffs, "moved": moved}), flush=True)
