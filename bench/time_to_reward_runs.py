"""Running the time-to-reward harness's configurations: one at a time, or side by side (bench/time_to_reward.py has
the plan and the report).

A `Run` is one configuration for one seed: a `Trainer` driven through its public train_step / evaluate, with a
`ComputeCounter` attached to every model the trainer keeps (profiling.counters; under `watch()` an expert that is not
attached stops the run instead of going uncounted), its evaluation points, and the wall-clock of its RL steps (no
pretraining, no evaluation). `run_one` runs one to its schedule's end.

`run_side_by_side` steps several runs of one seed in turn, one RL step each (A, B, C, A, B, C, ...), so that on a
shared machine every configuration's steps meet the same load: a wall-clock comparison made any other way measures
the machine's load as much as the configurations. Each run keeps its own global torch RNG state (swapped in around
its steps and evaluations), so a run gives the same numbers side by side as alone. Nothing of a run is in flight
between its turns: a one-step-off run joins its next rollout before its optimizer step, and its turn (timed) also
waits for that rollout's last scores, so a reward call never runs into another configuration's turn (nor shares
the reward service with it). That costs one-step-off the overlap of those scores with its next step's start: its
wall-clock here is an upper bound.

Each evaluation point also holds what explains a wall-clock: the means of the steps' times since the previous point
(`steps_step_ms`, `steps_reward_call_ms`: inside the reward calls on any thread, `steps_phase/<phase>_ms`), and
digests for bitwise comparisons: `weights_sha1` (the policy's weights) and `steps_sha1` (the step records' numbers
other than times and throughput).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time


@dataclasses.dataclass
class Schedule:
    """When a run stops and evaluates: every `every` steps up to `steps`, or at the first step at or past each of
    `grid` (compute) while the next step stays within `budget` (at most `max_steps` steps)."""
    steps: int | None = None
    every: int | None = None
    grid: tuple = ()
    budget: float | None = None
    max_steps: int | None = None


def attach_trainer(counter, trainer):
    """Attach the trainer's policy, its frozen reference and any other model it keeps (e.g. an old policy, as
    "auxiliary"). With LoRA the reference is the policy with its adapters off: counted as the policy."""
    import torch

    seen = set()
    for value in vars(trainer).values():
        if isinstance(value, torch.nn.Module) and (hasattr(value, "dit") or hasattr(value, "lm")) \
                and id(value) not in seen:
            seen.add(id(value))
            role = "policy" if value is trainer.model else "reference" if value is trainer.ref else "auxiliary"
            counter.attach(value, role=role)
    return counter


class Run:
    """One configuration and seed on its schedule (see the module docstring)."""

    def __init__(self, cfg, schedule: Schedule, unit_key: str, log=print, trainer_log=None, name=""):
        import torch

        from unirl_fast.profiling import ComputeCounter
        from unirl_fast.train import Trainer

        self.schedule, self.unit_key, self.log, self.name = schedule, unit_key, log, name
        self.trainer = Trainer(cfg, log=trainer_log or (lambda *a, **k: None))
        self.counter = attach_trainer(ComputeCounter(), self.trainer)
        self.rng = torch.get_rng_state()  # this run's global RNG, as its Trainer left it
        self.points, self.wall, self.cost, self.grid = [], 0.0, None, list(schedule.grid)
        self.recs = []  # the trainer's records of the steps since the last evaluation

    @contextlib.contextmanager
    def _turn(self):
        """This run's global RNG state in, and back out after (another run's turn may come next); its counter
        watching."""
        import torch

        others = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        try:
            with self.counter.watch():
                yield
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(others)

    def x(self) -> int:
        t = self.counter.totals("train")
        return t.dit_forward_equivalents if self.unit_key == "dit_fe" else t.lm_token_equivalents

    def evaluate(self, note=""):
        """Evaluate (counted apart from training) and record the cumulative training compute before it."""
        c, tr = self.counter, self.trainer
        with self._turn(), c.section("eval"):
            ev = tr.evaluate()
        t, ref, evc = c.totals("train"), c.totals("train", "reference"), c.totals("eval")
        aux = c.totals("train", "auxiliary")
        p = {"step": tr.step, "x": None, "dit_fe": t.dit_forward_equivalents, "dit_forward": t.dit_forward,
             "dit_backward": t.dit_backward, "lm_te": t.lm_token_equivalents, "lm_forward_tokens": t.lm_forward_tokens,
             "lm_backward_tokens": t.lm_backward_tokens, "ref_dit_forward": ref.dit_forward,
             "ref_lm_forward_tokens": ref.lm_forward_tokens, "aux_dit_forward": aux.dit_forward,
             "aux_lm_forward_tokens": aux.lm_forward_tokens, "eval_dit_forward": evc.dit_forward,
             "eval_lm_forward_tokens": evc.lm_forward_tokens, "wall_s": self.wall, "eval_reward": ev["eval_reward"],
             **{k: v for k, v in ev.items() if k.startswith("eval_reward_")},
             "task_rewards": [float(v) for v in ev["_rewards"]], **_step_means(self.recs),
             "weights_sha1": weights_sha1(tr.model), "steps_sha1": _records_sha1(self.recs)}
        self.recs = []
        p["x"] = p[self.unit_key]
        self.points.append(p)
        self.log(f"  {self.name + ' ' if self.name else ''}step {tr.step}: {self.unit_key} {p['x']}, held-out reward "
                 f"{p['eval_reward']:.3f}, {self.wall:.1f} s{note}")

    def done(self) -> bool:
        s, step = self.schedule, self.trainer.step
        if s.steps is not None:
            return step >= s.steps
        return step >= s.max_steps or (self.cost is not None and self.x() + self.cost > s.budget)

    def step(self):
        """One RL step (its wall-clock added), then an evaluation when one is due."""
        x0 = self.x()
        with self._turn():
            t0 = time.perf_counter()
            self.recs.append(self.trainer.train_step())
            if self.trainer.prefetched is not None:  # one-step-off: its next batch's scores in (see the docstring)
                self.trainer.prefetched.result()
            self.wall += time.perf_counter() - t0
        x = self.x()
        self.cost = x - x0
        due = self.schedule.every is not None and self.trainer.step % self.schedule.every == 0
        while self.grid and x >= self.grid[0]:
            self.grid.pop(0)
            due = True
        if due:
            self.evaluate()

    def finish(self) -> list:
        """The end evaluation (unless the last step had one); the counter's hooks off, the reward closed."""
        try:
            if self.points[-1]["step"] != self.trainer.step:
                self.evaluate(" (end)")
        finally:
            self.close()
        return self.points

    def close(self):
        if self.counter is not None:
            self.counter.detach()
            self.trainer.reward.close()
            self.trainer.close()  # the run directory's lock released
            self.counter = None


def _step_means(recs) -> dict:
    """Means over the RL steps since the last evaluation of what explains a curve: the training reward, the share of
    samples in groups whose rewards differ (the ones a group advantage trains), the rollout's DiT rows per step; and
    of the step's times (step_ms, reward_call_ms, phase/*_ms)."""
    out = {}
    times = sorted({k for r in recs for k in r if k.endswith("_ms")})
    for key in ("reward", "useful_frac", "rollout_dit_rows", *times):
        vals = [r[key] for r in recs if r.get(key) is not None]
        out[f"steps_{key}"] = sum(vals) / len(vals) if vals else None
    return out


def _timing(key: str) -> bool:
    return key.endswith(("_ms", "_per_s", "_MiB")) or key.startswith(("flops", "tflops", "mfu", "nvml"))


def _records_sha1(recs) -> str:
    """A digest of the step records' numbers other than times and throughput (equal iff they are bitwise equal)."""
    rows = [{k: v for k, v in sorted(r.items()) if not _timing(k)} for r in recs]
    return hashlib.sha1(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha1(model) -> str:
    """A digest of a model's weights, bit for bit (names, shapes, dtypes and bytes)."""
    import torch

    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_one(cfg, schedule: Schedule, unit_key: str, log=print, trainer_log=None) -> list:
    """Train one configuration for one seed on its schedule; returns its evaluation points (step 0 first)."""
    run = Run(cfg, schedule, unit_key, log, trainer_log)
    try:
        run.evaluate()
        while not run.done():
            run.step()
        return run.finish()
    except BaseException:
        run.close()
        raise


def run_side_by_side(named: dict, unit_key: str, log=print, trainer_log=None) -> dict:
    """named: {name: (cfg, schedule)} for one seed (every schedule by steps). Builds every run, then steps them in
    turn until each is done; returns {name: points}."""
    runs = {}
    try:
        for name, (cfg, schedule) in named.items():
            if schedule.steps is None:
                raise ValueError(f"side by side: run {name!r} has a compute budget; runs side by side train steps")
            runs[name] = Run(cfg, schedule, unit_key, log, trainer_log, name=name)
        for run in runs.values():
            run.evaluate()
        while any(not r.done() for r in runs.values()):
            for run in runs.values():
                if not run.done():
                    run.step()
        return {name: run.finish() for name, run in runs.items()}
    except BaseException:
        for run in runs.values():
            run.close()
        raise
