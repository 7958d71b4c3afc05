"""Value checks add no per-layer or per-step work inside the decode and sampler loops.

The rollout engines check a loop's first call as usual (the LM prefill, the first sampler step: that is where the
FP8 weights are quantized and their scales checked, once per generate call), validate the sampler's schedule once
on the host, and check the loop's outputs once (log-probs, final latents); the calls after the first run with the
per-call checks paused (mode "cheap"). Counted with a dispatch counter: the aten ops of every FP8Linear call in
decode, and of every sampler step after the first, equal the checks-off counts. The deferred (CUDA) path of the
checks is forced on CPU, as on a GPU.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unirl_fast._checks as C
from unirl_fast.fp8 import FP8Linear, convert_to_fp8
from unirl_fast.profile_run import build_model
from unirl_fast.rollout import ImageEngine, ImageSamplingParams, SamplingParams, TextEngine
from unirl_fast.rollout import image as image_mod


class OpsPerCall(TorchDispatchMode):
    """Counts the aten ops dispatched inside each bracketed call (`calls`: [(tag, ops)])."""

    def __init__(self):
        super().__init__()
        self.calls, self.open = [], None

    def begin(self, tag):
        self.open = [tag, 0]

    def end(self):
        self.calls.append(tuple(self.open))
        self.open = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.open is not None:
            self.open[1] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def fp8_model():
    m = build_model("tiny-fp8", False, 0, torch.device("cpu"), torch.float32).eval()
    assert convert_to_fp8(m)
    return m


def _fp8_decode_counts(model, mode):
    ids, mask = model.tokenizer(["draw: a red square", "two blue circles"], device="cpu")
    counter = OpsPerCall()
    hooks = []
    for layer in model.lm.modules():
        if isinstance(layer, FP8Linear):
            hooks.append(layer.register_forward_pre_hook(
                lambda mod, a: counter.begin("decode" if a[0].shape[-2] == 1 else "prefill")))
            hooks.append(layer.register_forward_hook(lambda mod, a, out: counter.end()))
    try:
        with C.checks(mode), counter:
            TextEngine(model.lm, pad_token_id=model.tokenizer.pad_token_id).generate(
                ids, mask, SamplingParams(max_new_tokens=5, temperature=1.0),
                generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    per_tag = collections.defaultdict(list)
    for tag, n in counter.calls:
        per_tag[tag].append(n)
    return per_tag


def test_fp8_layer_calls_in_decode_cost_what_checks_off_cost(fp8_model, monkeypatch):
    monkeypatch.setattr(C, "_defer_on_cpu", True)
    cheap, off = _fp8_decode_counts(fp8_model, "cheap"), _fp8_decode_counts(fp8_model, "off")
    assert cheap["decode"] and cheap["decode"] == off["decode"]
    assert sum(cheap["prefill"]) > sum(off["prefill"])  # the prefill (first call) is checked: the counter sees it
    C.check_pending()


def _sampler_step_counts(model, mode, monkeypatch):
    counter = OpsPerCall()
    real = ImageEngine.step

    def counted(self, *a, **k):
        counter.begin("step")
        try:
            return real(self, *a, **k)
        finally:
            counter.end()
    monkeypatch.setattr(ImageEngine, "step", counted)
    ids, mask = model.tokenizer(["a red square", "a b"], device="cpu")
    with torch.no_grad():
        cond = model.condition(ids, mask)
    params = ImageSamplingParams(num_steps=5, sde="sde", window_size=3, noise_level=0.7, decode=False)
    with C.checks(mode), counter:
        ImageEngine(model, impl="reference").sample(cond, params, generator=torch.Generator().manual_seed(0))
    return [n for _, n in counter.calls]


def test_sampler_steps_after_the_first_cost_what_checks_off_cost(monkeypatch):
    model = build_model("tiny", False, 0, torch.device("cpu"), torch.float32).eval()
    monkeypatch.setattr(C, "_defer_on_cpu", True)
    cheap = _sampler_step_counts(model, "cheap", monkeypatch)
    off = _sampler_step_counts(model, "off", monkeypatch)
    assert len(cheap) == 5 and cheap[1:] == off[1:]
    assert cheap[0] > off[0]  # the first step is checked
    C.check_pending()


def test_loop_failures_are_still_caught_once_per_call(monkeypatch):
    """A NaN appearing in a later step is caught by the once-per-call output checks, naming what to do."""
    model = build_model("tiny", False, 0, torch.device("cpu"), torch.float32).eval()
    ids, mask = model.tokenizer(["a red square", "a b"], device="cpu")
    real = image_mod.guided_velocity
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        v = real(*a, **k)
        return v if len(calls) < 3 else torch.full_like(v, float("nan"))
    monkeypatch.setattr(image_mod, "guided_velocity", poisoned)
    with pytest.raises(ValueError, match="log-probs.*later sampler step produced NaN"):
        ImageEngine(model, impl="reference").generate(ids, mask, ImageSamplingParams(num_steps=4, sde="sde"))
    monkeypatch.undo()
    lm_forward = TextEngine._forward
    steps = []

    def bad_decode(self, ids, *a):
        logits = lm_forward(self, ids, *a)
        steps.append(1)
        return logits if len(steps) < 3 else torch.full_like(logits, float("nan"))
    monkeypatch.setattr(TextEngine, "_forward", bad_decode)
    with pytest.raises(ValueError, match="log-probs.*decode step produced NaN"):
        TextEngine(model.lm, pad_token_id=model.tokenizer.pad_token_id).generate(
            ids, mask, SamplingParams(max_new_tokens=5, temperature=1.0, eos_token_ids=()))


def test_schedule_checked_once_on_the_host():
    from unirl_fast.ops.flow import check_schedule

    check_schedule([1.0, 0.7, 0.3, 0.0], ["sde", "sde", "ode"], 0.7)
    with pytest.raises(ValueError, match="schedule step 1: sigma_next must be in"):
        check_schedule([1.0, 0.7, 0.8, 0.0], ["sde", "sde", "ode"], 0.7)
