"""The first update's ratio is exactly 1 for the DiT window (`--old-logp replay`, train.rl.image_loss): the trainer's
per-step `image_ratio_exact` (max |ratio - 1| over the step's micro-batches, all before its one optimizer step) is 0
in fp32 on a CPU for odd batch and micro-batch sizes, padded prompts, LoRA and the FP8 emulation, while the sampler's
own log-probs (`--old-logp rollout`) differ from the batched replay by float round-off."""

import pytest
import torch

from unirl_fast.profile_run import build_model
from unirl_fast.train import TrainConfig, Trainer
from unirl_fast.train.scenarios import get_scenario

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(scenario="generate", preset="tiny", steps=2, prompts_per_step=3, group_size=3, micro_batch=3,
            image_steps=5, sde_window=2, sde_type="cps", noise_level=0.7, beta_velocity=0.005, impl="reference",
            reward=("reward_fns:brightness",))
CASES = {
    "odd-batch": dict(),  # 9 samples in micro-batches of 3; prompts of several lengths (left-padded)
    "padding-lm": dict(scenario="reason-generate", prompts_per_step=1, max_new_tokens=12),  # LM-written prompts
    "lora": dict(lora_dit="4,8"),
    "fp8": dict(preset="tiny-fp8", fp8=True),  # the trainer converts before the reference copy: FP8 GEMMs emulated
    "window-branch-dpm2": dict(image_steps=7, window_start=2, branch_at="window", ode_solver="dpm2",
                               micro_batch=9),
}


def _step(tmp_path, old_logp, **kw) -> dict:
    c = TrainConfig(**{**BASE, **kw, "old_logp": old_logp, "run_dir": str(tmp_path / old_logp)})
    model = build_model(c.preset, get_scenario(c.scenario).edit, 0, torch.device("cpu"), torch.float32)
    t = Trainer(c, model=model, log=lambda *a, **k: None)
    return t.train_step()


@pytest.mark.parametrize("case", list(CASES))
def test_ratio_is_exactly_one_at_the_first_update(tmp_path, case):
    rec = _step(tmp_path, "replay", **CASES[case])
    assert rec["image_ratio_exact"] == 0.0
    assert rec["image_ratio_mean"] == 1.0 and rec["image_clip_frac"] == 0.0
    assert 0.0 <= rec["image_logp_mismatch"] < 1e-3  # the sampler and the replay agree up to round-off
    roll = _step(tmp_path, "rollout", **CASES[case])
    assert roll["image_ratio_exact"] == pytest.approx(roll["image_logp_mismatch"], rel=1e-3, abs=1e-7)
    assert roll["image_logp_mismatch"] == rec["image_logp_mismatch"]  # the same rollout, the same replay


def test_the_sampler_log_probs_are_not_bitwise_the_replays(tmp_path):
    """Why replay: the per-step sampler calls (B rows) and the batched replay (S x micro rows) round differently, so
    with the sampler's log-probs the first ratio is 1 + round-off, not 1."""
    recs = [_step(tmp_path / case, "rollout", **CASES[case]) for case in ("odd-batch", "lora")]
    assert max(r["image_ratio_exact"] for r in recs) > 0.0


@pytest.mark.parametrize("algo", ["flow_grpo", "nft", "awm"])
def test_every_algorithm_takes_the_scheduler_and_the_harness_counts_it(tmp_path, algo):
    """Branching, DPM-Solver++(2M) and the compressed tail in one train step of each image algorithm: the policy's
    DiT rows the counter's hooks see are the rollout's K P + (T' - K) B (T' after the tail) plus the loss's (and the
    old policy's) rows, and the step records the sampler it used."""
    from unirl_fast.profiling import ComputeCounter
    from unirl_fast.train import forward_rl

    kw = dict(image_algo=algo, image_steps=10, branch_at="2", ode_solver="dpm2", ode_tail=0.5, beta_velocity=0.0)
    if algo == "flow_grpo":
        kw.update(window_start=2, sde_window=2)
    c = TrainConfig(**{**BASE, **kw, "run_dir": str(tmp_path / algo)})
    t = Trainer(c, model=build_model(c.preset, False, 0, torch.device("cpu"), torch.float32), log=lambda *a, **k: None)
    counter = ComputeCounter().attach(t.model)
    rec = t.train_step()
    rows = counter.totals("train").dit_forward
    counter.detach()
    P, B, K = 3, 9, 2
    S = 2 if algo == "flow_grpo" else 1  # the trained window / the stochastic branch step
    T = 7  # prefix 2 + stochastic S + the ODE tail halved: 6 -> 3 steps (flow_grpo), 7 -> 4 (nft / awm)
    assert (rec["branch_at"], rec["window_start"], rec["window_size"], rec["rollout_steps"]) == (K, K, S, T)
    assert rec["rollout_dit_rows"] == K * P + (T - K) * B
    if algo == "flow_grpo":
        trained = S * B
    else:
        n = forward_rl.num_timesteps(c)
        trained = n * B * (2 if forward_rl.needs_old(c) and not forward_rl.old_is_current(c) else 1)
    assert rows == rec["rollout_dit_rows"] + trained


@pytest.mark.parametrize("case", ["padding-lm", "lora-lm"])
def test_lm_tokens_ratio_is_exactly_one_with_old_logp_lm_replay(tmp_path, monkeypatch, case):
    """`--old-logp-lm replay`: the loss's own token log-probs and the old ones are the same bits (captured where the
    reference loss forms the ratio), so every valid token's ratio is exactly 1; the sampler's (`rollout`) differ."""
    import unirl_fast.reference as R

    seen = []
    real = R.policy_loss_ref

    def capture(logp, old_logp, advantages, mask, **kw):
        seen.append((logp.detach().clone(), old_logp.clone(), mask.clone()))
        return real(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setattr(R, "policy_loss_ref", capture)
    kw = dict(CASES["padding-lm"], prompts_per_step=2, micro_batch=3)  # two micro-batches of 3 (odd)
    if case == "lora-lm":
        kw.update(lora_lm="4,8", lora_dit="4,8")
    rec = _step(tmp_path, "replay", old_logp_lm="replay", **kw)
    assert len(seen) == 2
    for logp, old, mask in seen:
        assert torch.equal(logp[mask], old[mask])
    assert rec["text_ratio_mean"] == 1.0 and rec["text_clip_frac_low"] == rec["text_clip_frac_high"] == 0.0
    seen.clear()
    roll = _step(tmp_path / "r", "replay", old_logp_lm="rollout", **kw)
    assert rec["text_logp_mismatch"] > 0.0 and "text_logp_mismatch" not in roll  # decode vs whole-sequence forward
    assert any(not torch.equal(lp[m], o[m]) for lp, o, m in seen)  # so the sampler's old log-probs: ratio != 1
