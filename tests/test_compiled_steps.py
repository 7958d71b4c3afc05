"""The rollout engines' compiled steps and the trainer's one set of engines per run.

- The text decode step (TextEngine(compile=True)) and one flow sampler step (ImageEngine(compile=True)) trace with
  torch.compile(fullgraph=True) under inductor on a CPU (fullgraph raises on any graph break) and give the eager
  step's tokens at temperature 0 (the sampler: the eager trajectory to float round-off). On CUDA the engines compile
  by default (the decode with CUDA graphs); on a CPU they run eager unless asked.
- The text engine allocates one static KV cache per batch size and reuses it; a longer request grows it, a shorter
  one uses it with the extra columns masked (same tokens and log-probs as a fresh engine).
- The trainer keeps one set of engines for the run: its rollouts and evaluations reuse them (and their caches).
"""
from __future__ import annotations

import sys

import pytest
import torch
import transformers

from unirl_fast.profile_run import build_model
from unirl_fast.rollout import ImageEngine, ImageSamplingParams, SamplingParams, TextEngine
from unirl_fast.train import TrainConfig, Trainer
from unirl_fast.train.scenarios import get_scenario


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", False, 0, torch.device("cpu"), torch.float32).eval()


def _prompts(model, texts=("draw: a red square", "a b", "two blue circles left of a green one")):
    return model.tokenizer(list(texts), device="cpu")


def test_decode_step_traces_fullgraph_and_matches_eager(model):
    ids, mask = _prompts(model)
    p = SamplingParams(max_new_tokens=6, temperature=0.0)
    eager = TextEngine(model.lm, pad_token_id=model.tokenizer.pad_token_id, compile=False).generate(ids, mask, p)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = TextEngine(model.lm, pad_token_id=model.tokenizer.pad_token_id, compile=True, prompt_bucket=1)
    out = engine.generate(ids, mask, p)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one decode graph, traced whole
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch.equal(out.completion_ids, eager.completion_ids)
    assert torch.equal(out.completion_mask, eager.completion_mask)
    torch.testing.assert_close(out.logprobs, eager.logprobs, rtol=1e-5, atol=1e-5)


def test_flow_sampler_step_traces_fullgraph_and_matches_eager(model):
    ids, mask = _prompts(model)
    with torch.no_grad():
        cond = model.condition(ids, mask)
    params = ImageSamplingParams(num_steps=2, sde="sde", noise_level=0.7, decode=False)  # every step stochastic
    eager = ImageEngine(model, impl="reference").sample(cond, params, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = ImageEngine(model, impl="reference", compile=True)
    traj = engine.sample(cond, params, generator=torch.Generator().manual_seed(3))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one step graph, reused by both steps
    assert not torch._dynamo.utils.counters["graph_break"]
    for a, b in ((traj.samples, eager.samples), (traj.next_samples, eager.next_samples),
                 (traj.log_probs, eager.log_probs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _CountingCache(transformers.StaticCache):
    made = []

    def __init__(self, *a, max_cache_len, **k):
        super().__init__(*a, max_cache_len=max_cache_len, **k)
        _CountingCache.made.append(max_cache_len)


@pytest.fixture
def counted_caches(monkeypatch, model):
    """StaticCache constructions (lengths). After `model`: building the first model replaces the lazy
    `transformers` module object in sys.modules, so the patch goes on the one the engine will import from."""
    _CountingCache.made = []
    monkeypatch.setattr(sys.modules["transformers"], "StaticCache", _CountingCache)
    return _CountingCache.made


def test_cache_allocated_once_per_batch_size_and_grown(model, counted_caches):
    ids, mask = _prompts(model)
    P = ids.shape[1]
    engine = TextEngine(model.lm, pad_token_id=model.tokenizer.pad_token_id)
    engine.generate(ids, mask, SamplingParams(max_new_tokens=8, temperature=0.0))
    short = SamplingParams(max_new_tokens=3, temperature=1.0)
    out = engine.generate(ids, mask, short, generator=torch.Generator().manual_seed(1))  # reuses the longer cache
    assert counted_caches == [P + 8]
    fresh = TextEngine(model.lm, pad_token_id=model.tokenizer.pad_token_id).generate(
        ids, mask, short, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.completion_ids, fresh.completion_ids)
    torch.testing.assert_close(out.logprobs, fresh.logprobs, rtol=1e-6, atol=1e-6)
    engine.generate(ids[:2], mask[:2], short)  # another batch size: its own cache
    engine.generate(ids, mask, SamplingParams(max_new_tokens=12, temperature=0.0))  # longer: grows
    engine.generate(ids, mask, SamplingParams(max_new_tokens=12, temperature=0.0))
    assert counted_caches == [P + 8, P + 3, P + 3, P + 12]  # the first, `fresh`'s, batch 2's, the grown one


def test_fp8_layers_decode_eager_and_refuse_compile():
    from unirl_fast.fp8 import convert_to_fp8

    m = build_model("tiny-fp8", False, 0, torch.device("cpu"), torch.float32)
    assert convert_to_fp8(m)
    assert not TextEngine(m.lm).compile and not ImageEngine(m, compile=None).compile
    with pytest.raises(ValueError, match="FP8Linear"):
        TextEngine(m.lm, compile=True)
    with pytest.raises(ValueError, match="FP8Linear"):
        ImageEngine(m, compile=True)


def test_trainer_keeps_one_set_of_engines(tmp_path, counted_caches, monkeypatch):
    c = TrainConfig(scenario="reason-generate", preset="tiny", run_dir=str(tmp_path / "run"), steps=3,
                    prompts_per_step=2, group_size=2, micro_batch=2, max_new_tokens=4, image_steps=3, sde_window=2,
                    eval_prompts=3, impl="reference")
    t = Trainer(c, model=build_model(c.preset, get_scenario(c.scenario).edit, 0, torch.device("cpu"), torch.float32),
                log=lambda *a, **k: None)
    made = []  # (batch size, cache length) of every cache the run's rollouts allocate
    orig = TextEngine._static_cache

    def spy(engine, B, needed, device, dtype):
        n = len(counted_caches)
        out = orig(engine, B, needed, device, dtype)
        if len(counted_caches) > n:
            made.append((B, out[1]))
        return out
    monkeypatch.setattr(TextEngine, "_static_cache", spy)
    t.train_step()
    engines = t.engines
    t.train_step()
    t.evaluate()  # micro-batches of 2 and a last one of 1: caches for batch sizes 4 (the step), 2 and 1
    t.train_step()
    t.evaluate()
    assert t.engines is engines
    assert sorted(k[0] for k in engines.text._caches) == [1, 2, 4]
    for B in (1, 2, 4):  # allocated once per batch size, then again only to grow
        lengths = [n for b, n in made if b == B]
        assert lengths and lengths == sorted(set(lengths)), made
    assert len(made) < 7, made  # 3 steps + 2 evaluations of 2 rollouts each would be 7 without reuse
