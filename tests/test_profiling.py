"""Profiling pieces on CPU: phase timers add up, the FLOP model matches hand counts, NVML degrades cleanly."""
import time

import pytest
import torch
from transformers import Qwen2Config

from unirl_fast.profiling import (
    DiTShape,
    LMShape,
    NvmlSampler,
    PhaseTimer,
    device_peak_tflops,
    dit_forward_flops,
    lm_forward_flops,
    lm_sequence_flops,
    mfu,
)


def test_phase_timer_phases_add_up_to_step():
    t = PhaseTimer("cpu")
    with t.phase("a"):
        time.sleep(0.02)
    with t.phase("b"):
        time.sleep(0.01)
    with t.phase("a"):
        time.sleep(0.01)
    out = t.finish_step()
    assert out["phase/a_ms"] >= 29 and out["phase/b_ms"] >= 9
    covered = out["phase/a_ms"] + out["phase/b_ms"] + out["phase/other_ms"]
    assert abs(covered - out["step_ms"]) <= 0.05 * out["step_ms"]
    assert t.finish_step()["step_ms"] == 0.0  # state reset


def test_lm_flops_hand_count():
    s = LMShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1000)
    d, kv, f = 64, 32, 128
    per_tok = 2 * (2 * (2 * d * d + 2 * d * kv) + 4 * 10 * d + 2 * 3 * d * f) + 2 * d * 1000
    assert lm_forward_flops(s, 5, 10) == 5 * per_tok
    assert lm_sequence_flops(s, 2, 19, train=True) == 3 * lm_forward_flops(s, 38, 10)


def test_lm_shape_from_config_and_dense_matmul_count():
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    s = LMShape.from_hf_config(cfg)
    assert (s.kv_heads, s.gated_mlp) == (2, True)
    model_params = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 1000
    assert lm_forward_flops(s, 1, 0) == 2 * model_params  # zero context: 2 FLOPs per weight per token


def test_dit_flops_and_mfu():
    s = DiTShape(layers=1, hidden=8, intermediate=32, cross_attention=False)
    assert dit_forward_flops(s, 1, 4, 0) == 4 * (2 * 4 * 64 + 4 * 4 * 8 + 2 * 2 * 8 * 32)
    assert mfu(1e12, 1.0, 2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("cpu x2") is None


def test_nvml_sampler_reports_unavailable_instead_of_failing():
    s = NvmlSampler(interval_s=0.01)
    with s:
        time.sleep(0.05)
    summ = s.summary()
    if torch.cuda.is_available() and s.available:
        assert summ["nvml_samples"] > 0
    else:
        assert not s.available and s.reason
        assert summ["nvml"].startswith("unavailable")
    with pytest.raises(ValueError):
        NvmlSampler(interval_s=0)


def test_nvml_summary_over_a_time_window():
    s = NvmlSampler(interval_s=0.01)
    s.available = True
    s.samples = [{"t": float(t), "sm_util_pct": 10.0 * t, "mem_used_MiB": 100.0, "power_W": 100.0 + t,
                  "sm_clock_MHz": 1500.0, "mem_clock_MHz": 2600.0} for t in range(5)]
    w = s.summary(since=1.0, until=3.0)
    assert w["nvml_samples"] == 3 and w["sm_util_pct_mean"] == pytest.approx(20.0)
    assert w["power_W_max"] == 103.0 and w["energy_J"] == pytest.approx(101.5 + 102.5)
    assert s.summary()["nvml_samples"] == 5
    assert s.summary(since=10.0)["nvml"].startswith("no samples in the window")
