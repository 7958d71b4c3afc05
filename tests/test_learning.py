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

from unirl_fast.train import PRESETS, SCENARIOS, Trainer

# RL steps per scenario: enough for the improvement to clear the bar, within ~3 minutes on 2 idle cores.
STEPS = {"understand": 30, "generate": 40, "reason-generate": 40, "refine-prompt": 40, "edit": 40, "reason-edit": 40}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """One cache of warmed-up base models for the module: scenarios with the same warm-up data share one."""
    return tmp_path_factory.mktemp("bases")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rl_raises_held_out_reward(scenario, base_dir, tmp_path):
    (tmp_path / "base").symlink_to(base_dir, target_is_directory=True)
    cfg = dataclasses.replace(PRESETS["tiny"], scenario=scenario, run_dir=str(tmp_path), steps=STEPS[scenario],
                              eval_every=10**6, save_every=10**6)
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
