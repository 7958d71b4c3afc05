"""The held-out evaluation: greedy text, ODE images from fixed noise (the same every evaluation), the run's reward.

With eval_samples K > 1 every task is drawn K times (pass k over all tasks uses the k-th noise draws) and a task's
reward is the mean of its K. The tasks go in micro-batches, each scored as soon as it is rolled out (beside the next
one's rollout with reward_overlap on: train.pipeline); the noise comes from its own generator, so neither that nor
the scores depend on when a score arrives. The trainer swaps the EMA weights in around it (ema_decay > 0).
"""
from __future__ import annotations

import torch

from . import records
from .pipeline import Scoring
from .plots import N_SHOW
from .progress import bar
from .rl import rollout


@torch.no_grad()
def held_out(t) -> dict:
    """Trainer `t`'s held-out reward: {"eval_reward", "eval_reward_<part>", "_rewards": one per task in order (paired
    comparisons across evaluations), "_samples": the sample-sheet records of the first N_SHOW tasks (first pass)}."""
    c, m = t.cfg, t.model
    m.eval()
    gen = torch.Generator(device=m.device).manual_seed(c.seed + 4242)
    tasks_all = t.eval_tasks * c.eval_samples
    starts = range(0, len(tasks_all), c.micro_batch)
    scoring = Scoring(t.reward, c.reward_overlap == "on", t._autocast, t.stop, scorer=t.scorer)
    batches = []
    with bar(len(starts), "eval", unit="batch", show=t.is_main) as progress:
        for start in starts:
            tasks = tasks_all[start:start + c.micro_batch]
            with t._autocast():
                b = rollout(m, t.scenario, c, tasks, torch.arange(len(tasks)), gen, eval_mode=True,
                            engines=t._engines(), inverse=t._cycle_model)
            scoring.submit(b)
            batches.append(b)
            progress.update(1)
        scoring.wait()
    n_show = min(N_SHOW, len(t.eval_tasks))  # the first tasks of the first pass go on the sample sheets
    samples, parts = [], []
    for start, b in zip(starts, batches):
        parts += b.reward_parts
        samples += records.samples(b, range(min(len(b.tasks), max(0, n_show - start))))
    per_task = torch.cat([b.rewards for b in batches]).view(c.eval_samples, len(t.eval_tasks)).mean(0)
    return {"eval_reward": per_task.mean().item(), **records.reward_parts(parts, prefix="eval_"),
            "_samples": samples, "_rewards": per_task}
