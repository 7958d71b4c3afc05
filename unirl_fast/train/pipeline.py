"""The step's rollout and rewards as a pipeline: the rollout cut into chunks of whole prompt groups, each chunk scored
as soon as it is rolled out, on a thread while the next chunk rolls out (`--reward-overlap`).

    chunks = chunk_rows(group_ids, cfg.rollout_chunks)      # K contiguous runs of whole groups
    pending = roll_and_score(roll, tasks, group_ids, chunks, scoring)
    ... the reference's forwards, the old policy's: they need no reward ...
    adv = Advantages(pending, cfg.adv_std, cfg.impl, device)
    for each micro-batch: adv.rows(start, end), then its loss   # waits only for the chunks holding those rows
    b = pending.result()                                     # every chunk's scores: b.rewards, b.reward_parts

Why chunks of whole groups: a group's advantage needs all of its scores, and a reward may normalise within a group;
so no group is cut, and the chunks are rolled out in order from the step's generator (each chunk takes its random
draws after the previous one's). Scoring then changes no number whether it runs inline or on the thread: the same
chunks meet the same reward call, the scores land in the same rows, and nothing rolled out depends on when a score
arrives (the cycle edit, which does draw noise, is a rollout stage: `rl.rollout(inverse=...)`). The serial step at
the same chunking is the check: metrics and weights bitwise equal (tests/test_pipeline.py). More chunks than one do
change the numbers against an uncut rollout (other batch shapes, another order of draws), which is why the chunk
count is its own setting (`--rollout-chunks`, part of what a run is) and overlap only a schedule.

Time: with K chunks, the rollout's time R, the reward's S (inline) and the losses' L give R + S + L per step; with
overlap each chunk's scores come back while the next chunk rolls out and, past the rollout, while the reference runs
and the scored chunks' micro-batches train, so a step takes about max(R + L, R / K + S + L / K) instead. The
cost: a K times smaller rollout batch, which on a GPU decodes at nearly the same time per token as the whole batch
(decoding is memory-bound): chunking pays only when the reward is slow. So by default (`config.with_pipeline`) a run
chunks (K = 4) and overlaps only when its reward is a service or a callable marked slow.

Threads: one scorer thread per run (`Scorer`), started on demand, scoring the queued chunks in order under the
trainer's autocast and no_grad (both are per thread), so a reward never sees two calls at once. Advantages wait for
their group's scores, not the whole batch's (`Advantages`: with GRPO's per-group std a chunk's rows get theirs as
soon as it is scored), so the losses of the first micro-batches run while the last chunks are still being scored. A
failure there is the run's: the scorer sets the run's StopFlag (`unirl_fast._stop`) and the training thread raises
that error at its next check, within one decode step, sampler step or micro-batch: no more rollout, no optimizer
step, no checkpoint of the step, no reward made up.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time

import torch

from .. import _stop
from .rl import Batch, score


def chunk_rows(group_ids: torch.Tensor, k: int) -> list:
    """Row ranges (start, end) of K contiguous runs of whole groups (sizes differing by at most one group); fewer
    when there are fewer groups. group_ids (host data) must hold each group's rows together."""
    if k <= 1:
        return [(0, len(group_ids))]
    ids = group_ids.tolist()
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    if len(set(ids)) != len(starts):
        raise ValueError(f"chunk_rows: the rows of a group are not contiguous (group ids {ids})")
    k = max(1, min(k, len(starts)))
    bounds = [starts[len(starts) * j // k] for j in range(k)] + [len(ids)]
    return list(zip(bounds[:-1], bounds[1:]))


class Scorer:
    """The run's scorer thread: reward calls queued by every batch (the step's chunks, the next step's under
    --off-policy 1, an evaluation's) run on it one at a time, in the order they came, so a reward never sees two
    calls at once. Started on demand, it ends after a second with nothing to do, once the main thread is gone (the
    interpreter exits: it never holds it), or when the run has failed. Not a daemon: a reward call in flight is never
    cut off by the interpreter."""

    IDLE_S = 1.0

    def __init__(self, flag: _stop.StopFlag):
        self.flag = flag
        self._jobs, self._cv, self._thread = collections.deque(), threading.Condition(), None

    def submit(self, job) -> None:
        with self._cv:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="reward-scorer")
                self._thread.start()
            self._cv.notify()

    def _work(self):
        while True:
            with self._cv:
                while not self._jobs:
                    if not self._cv.wait(self.IDLE_S) or not threading.main_thread().is_alive():
                        if not self._jobs:
                            self._thread = None
                            return
                job = self._jobs.popleft()
            if self.flag.error is None:
                job()


class Scoring:
    """Scores a batch's chunks in the order they come: inline (overlap off, timed as `phase("reward")`), or as jobs
    of the run's Scorer (on); a failure sets the run's `flag`. `context()`: the block every reward call runs in
    (autocast). busy_s: the time spent in the reward calls."""

    def __init__(self, reward, overlap: bool, context, flag: _stop.StopFlag, phase=None, scorer: Scorer = None):
        self.reward, self.overlap, self.context, self.flag = reward, overlap, context, flag
        self.phase, self.scorer = phase, scorer if scorer is not None or not overlap else Scorer(flag)
        self.chunks, self.busy_s = [], 0.0
        self.scored = []  # one Event per submitted chunk, set once its scores are in

    def submit(self, chunk: Batch) -> None:
        j = len(self.chunks)
        self.chunks.append(chunk)
        self.scored.append(threading.Event())
        if not self.overlap:
            with self.phase("reward") if self.phase is not None else contextlib.nullcontext():
                self._score(j)
            return
        self.scorer.submit(lambda: self._score(j))

    def _score(self, j):
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), self.context():
                score(self.chunks[j], self.reward)
        except BaseException as e:  # the run's error: the training thread raises it at its next check
            self.flag.set(e)
            if not self.overlap:
                raise
            return
        finally:
            self.busy_s += time.perf_counter() - t0
        self.scored[j].set()

    def wait_chunk(self, j: int) -> Batch:
        """Chunk j, once scored (the run's failure raised instead, within 0.05 s of it)."""
        while not self.scored[j].wait(0.05):
            self.flag.raise_if_set()
        return self.chunks[j]

    def wait(self) -> None:
        """Every submitted chunk scored; the run's failure raised instead."""
        for j in range(len(self.chunks)):
            self.wait_chunk(j)


class Pending:
    """A rolled-out batch whose chunks (rows `bounds`) are being scored (`result` waits for them all)."""

    def __init__(self, batch: Batch, scoring: Scoring, bounds: list):
        self.batch, self.scoring, self.bounds = batch, scoring, bounds

    def chunk_rewards(self, j: int) -> torch.Tensor:
        """Chunk j's scores, once they are in (a batch scored before, e.g. loaded from a checkpoint, has them)."""
        if not self.scoring.chunks:
            start, end = self.bounds[j]
            return self.batch.rewards[start:end]
        return self.scoring.wait_chunk(j).rewards

    def result(self) -> Batch:
        self.scoring.wait()
        b, chunks = self.batch, self.scoring.chunks
        if len(chunks) > 1:  # the scores were set on the chunks
            b.rewards = torch.cat([c.rewards for c in chunks])
            b.reward_parts = [p for c in chunks for p in c.reward_parts]
        return b


def roll_and_score(roll, tasks, group_ids, chunks, scoring: Scoring) -> Pending:
    """`roll(tasks, group_ids) -> Batch` on each chunk in turn, each submitted to `scoring` when it is done; the
    chunks joined into one batch (a failed chunk's error raised at the next check)."""
    parts = []
    for start, end in chunks:
        _stop.check()
        part = roll(tasks[start:end], group_ids[start:end])
        scoring.submit(part)
        parts.append(part)
    _stop.check()
    return Pending(parts[0] if len(parts) == 1 else cat_batches(parts), scoring, chunks)


class Advantages:
    """The step's group advantages as their scores arrive: with std "group" (GRPO's) a group's advantage needs only
    its own group's scores, so the rows of a chunk get theirs as soon as the chunk is scored and the losses of its
    micro-batches can run while later chunks are still being scored; with std "global" every score first. Each
    chunk's groups are computed together, in both modes, so the values are the same whenever they are asked for."""

    def __init__(self, pending: Pending, std: str, impl: str, device):
        from .. import group_advantages

        self.pending, self.std, self.impl, self.device = pending, std, impl, device
        self._fn, self._done = group_advantages, {}
        self.waited_s = 0.0  # time spent waiting for scores

    def rows(self, start: int, end: int) -> torch.Tensor:
        """The advantages of rows [start, end) (waits for the chunks holding them)."""
        bounds = self.pending.bounds if self.std == "group" else [(0, len(self.pending.batch.tasks))]
        parts = []
        for j, (a, b) in enumerate(bounds):
            if a < end and b > start:
                adv = self._chunk(j, a, b)
                parts.append(adv[max(start, a) - a:min(end, b) - a])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def all(self) -> torch.Tensor:
        return self.rows(0, len(self.pending.batch.tasks))

    def _chunk(self, j, a, b):
        if (a, b) not in self._done:
            t0 = time.perf_counter()
            if self.std == "group":
                rewards = self.pending.chunk_rewards(j)
            else:
                rewards = torch.cat([self.pending.chunk_rewards(i) for i in range(len(self.pending.bounds))])
            self.waited_s += time.perf_counter() - t0
            gid = self.pending.batch.group_ids[a:b]
            self._done[a, b] = self._fn(rewards, gid, std=self.std, impl=self.impl).to(self.device)
        return self._done[a, b]


# joining chunks -------------------------------------------------------------------------------------------------
def _repad_left(tensors: list, value) -> torch.Tensor:
    """Left-padded [B_i, L_i] tensors -> one [sum B_i, max L_i], padded on the left with `value`."""
    L = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (L - t.shape[1], 0), value=value) for t in tensors])


def _cat_vision(parts: list):
    if parts[0] is None:
        return None
    return dataclasses.replace(parts[0], pixel_values=torch.cat([p.pixel_values for p in parts]),
                               image_grid_thw=torch.cat([p.image_grid_thw for p in parts]))


def _cat_text(parts: list, pad_id: int):
    first = parts[0]
    return dataclasses.replace(
        first, prompt_ids=_repad_left([p.prompt_ids for p in parts], pad_id),
        prompt_mask=_repad_left([p.prompt_mask for p in parts], 0),
        completion_ids=torch.cat([p.completion_ids for p in parts]), logprobs=torch.cat([p.logprobs for p in parts]),
        completion_mask=torch.cat([p.completion_mask for p in parts]),
        texts=None if first.texts is None else [t for p in parts for t in p.texts],
        vision=_cat_vision([p.vision for p in parts]))


# how each ImageTrajectory field joins: the batch dimension, "same" (shared by every chunk), "sum", or "cond"
# (a Conditioning, or None); a field missing here is an error, so a new field is never joined wrongly
TRAJ_JOIN = {"samples": 1, "next_samples": 1, "sigmas": 1, "sigmas_next": 1, "log_probs": 1, "trainable": "same",
             "latents": 0, "conditioning": "cond", "params": "same", "sigma_max": "same", "uncond": "cond",
             "source_latents": 0, "images": 0, "train_steps": "same", "dit_rows": "sum", "kinds": "same"}


def _cat_cond(parts: list):
    if parts[0] is None:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out.cat(p)
    return out


def _cat_traj(parts: list):
    out = {}
    for f in dataclasses.fields(parts[0]):
        how, vals = TRAJ_JOIN.get(f.name), [getattr(p, f.name) for p in parts]
        if how is None:
            raise ValueError(f"pipeline: ImageTrajectory field {f.name!r} has no join rule (TRAJ_JOIN)")
        if how == "same" or vals[0] is None:
            out[f.name] = vals[0]
        elif how == "sum":
            out[f.name] = sum(vals)
        elif how == "cond":
            out[f.name] = _cat_cond(vals)
        else:
            out[f.name] = torch.cat(vals, how)
    return type(parts[0])(**out)


def cat_batches(parts: list, pad_id: int = 0) -> Batch:
    """Chunks of one step (rolled out, maybe scored) as one batch: rows in chunk order, prompts re-padded on the
    left to the longest; what comes after the rollout (reference outputs, forward-process draws) must not be set, and
    the scores are joined by `Pending.result` (they may still be on their way)."""
    first = parts[0]
    for name in ("ref_logp", "ref_velocity", "fp"):
        if getattr(first, name) is not None:
            raise ValueError(f"cat_batches: {name} is computed on the joined batch, not per chunk")

    def rows(name):
        vals = [getattr(p, name) for p in parts]
        if vals[0] is None:
            return None
        return [x for v in vals for x in v] if isinstance(vals[0], list) else torch.cat(vals)

    b = Batch([t for p in parts for t in p.tasks], rows("group_ids"))
    for name in ("completions", "images", "sources", "lm_images", "cycled", "versions"):
        setattr(b, name, rows(name))
    if first.text is not None:
        b.text = _cat_text([p.text for p in parts], pad_id)
    if first.cond_ids is not None:
        b.cond_ids = _repad_left([p.cond_ids for p in parts], pad_id)
        b.cond_mask = _repad_left([p.cond_mask for p in parts], 0)
    b.cond_vision = _cat_vision([p.cond_vision for p in parts])
    if first.traj is not None:
        b.traj = _cat_traj([p.traj for p in parts])
    return b
