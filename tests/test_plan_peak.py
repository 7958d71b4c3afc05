"""`unirl-fast plan` against the measured peak memory of a tiny preset's train steps (CPU, one process: ZeRO-0).

Measured: the weights and the frozen reference copy (alive all run; their bytes are exact) plus the peak of every
other allocation over two train steps (tests/memprobe.py's AllocProbe: optimizer states, gradients, activations,
the rollout engines' KV caches, rollout and loss temporaries). The plan, given the run's shapes (prompt and
conditioning lengths as the run drew them), must be within 15% of it for every trained expert and with --fp8.
"""
from __future__ import annotations

import pytest
import torch
from memprobe import AllocProbe

import unirl_fast.train.trainer as T
from unirl_fast.models.plan import memory_plan
from unirl_fast.profile_run import build_model
from unirl_fast.train import TrainConfig, Trainer
from unirl_fast.train.scenarios import get_scenario

TOLERANCE = 0.15


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("scenario, extra", [("reason-generate", {}), ("generate", {}), ("understand", {}),
                                             ("reason-generate", dict(fp8=True)),
                                             ("reason-generate", dict(micro_batch=4, max_new_tokens=16)),
                                             ("generate", dict(image_algo="nft", image_steps=4, fp_timesteps=3))],
                         ids=["reason-generate", "generate", "understand", "fp8", "micro4", "nft"])
def test_plan_within_15_percent_of_the_measured_peak(tmp_path, monkeypatch, scenario, extra):
    c = TrainConfig(**{**dict(scenario=scenario, preset="tiny-fp8", run_dir=str(tmp_path / "run"), steps=3,
                              prompts_per_step=2, group_size=2, micro_batch=2, max_new_tokens=8, image_steps=3,
                              sde_window=2, impl="reference", reward=("format",)), **extra})
    s = get_scenario(scenario)
    model = build_model(c.preset, s.edit, 0, torch.device("cpu"), torch.float32)
    t = Trainer(c, model=model, log=lambda *a, **k: None)  # converts the model to FP8 with --fp8
    lengths = []
    real = T.rollout

    def rollout(*a, **k):
        b = real(*a, **k)
        lengths.append((0 if b.text is None else b.text.prompt_ids.shape[1],
                        0 if b.cond_ids is None else b.cond_ids.shape[1]))
        return b
    monkeypatch.setattr(T, "rollout", rollout)
    probe = AllocProbe()
    with probe:
        for _ in range(2):
            t.train_step()
    # alive all run as well: nft / awm's old policy (fp32 shadows of the trained weights, made with the trainer)
    old = 0 if t.old is None else sum(v.numel() * v.element_size() for v in t.old.shadow.values())
    measured = probe.peak_bytes + _param_bytes(t.model) + _param_bytes(t.ref) + old
    fp = c.image_algo != "flow_grpo"
    plan = memory_plan(t.model, train_lm=s.train_lm, train_dit=s.train_dit, batch=c.prompts_per_step * c.group_size,
                       micro_batch=c.micro_batch, prompt_len=max(p for p, _ in lengths),
                       completion_len=c.max_new_tokens, cond_len=max(q for _, q in lengths),
                       trained_steps=c.fp_timesteps if fp else c.sde_window, gpus=1, precision="fp32",
                       grad_ckpt_lm=False, grad_ckpt_dit=False, reference=True, fp8=c.fp8, old_policy=fp,
                       rollout=dict(lm_writes=s.lm_writes, draws=s.draws, guidance=False))
    stage = plan["stages"][0]
    assert stage["peak_phase"] == "training"
    print(f"{scenario} {extra}: plan {stage['total'] / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    assert abs(stage["total"] / measured - 1) < TOLERANCE, (stage, measured)
    if c.fp8:
        assert stage["fp8_saved"] > 0
    if fp:
        assert old > 0 and stage["old_policy"] == old


def test_zero3_plan_models_what_the_code_keeps():
    """ZeRO-3: the reference partitioned like the weights, the full weights gathered for rollout, the largest module
    gathered whole in training, every FP8 layer's quantized weight kept to its backward (1 B a parameter)."""
    from unirl_fast.fp8 import convert_to_fp8
    from unirl_fast.models import UnifiedModel, preset_config

    with torch.device("meta"):
        m = UnifiedModel(preset_config("qwen2.5-1.5b-sana-0.6b"))
        fp8_names = convert_to_fp8(m)
    n = sum(p.numel() for p in m.parameters())
    embed = m.lm.get_input_embeddings().weight.numel()
    plan = memory_plan(m, train_lm=True, train_dit=True, gpus=8, fp8=True)
    z3 = plan["stages"][3]
    assert z3["reference"] == z3["weights"] == n * 4 / 8
    assert z3["gathered"] == n * 4 * 7 / 8 and z3["largest_layer"] >= embed * 4
    assert z3["peak_phase"] == "rollout" and z3["total"] >= n * 4  # every rank holds the whole model in rollout
    fp8_params = sum(m.get_submodule(k).weight.numel() for k in fp8_names if k.startswith(("lm.", "dit.")))
    assert z3["fp8_saved"] == fp8_params > 0
    lora = memory_plan(m, train_lm=True, train_dit=True, gpus=8, reference=False)["stages"][3]
    assert lora["reference"] == plan["params"]["connector"] * 4 / 8  # only the connector is copied
