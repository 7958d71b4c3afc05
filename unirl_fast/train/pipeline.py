"""The step's rollout and rewards as a pipeline: the rollout cut into chunks of whole prompt groups, each chunk scored
as soon as it is rolled out, on a thread while the next chunk rolls out (`--reward-overlap`).

    chunks = chunk_rows(group_ids, cfg.rollout_chunks)      # K contiguous runs of whole groups
    pending = roll_and_score(roll, tasks, group_ids, chunks, scoring)
    ... the reference's forwards, the old policy's: they need no reward ...
    b = pending.result()                                     # every chunk's scores: b.rewards, b.reward_parts

Why chunks of whole groups: a group's advantage needs all of its scores, and a reward may normalise within a group;
so no group is cut, and the chunks are rolled out in order from the step's generator (each chunk takes its random
draws after the previous one's). Scoring then changes no number whether it runs inline or on the thread: the same
chunks meet the same reward call, the scores land in the same rows, and nothing rolled out depends on when a score
arrives (the cycle edit, which does draw noise, is a rollout stage: `rl.rollout(inverse=...)`). The serial step at
the same chunking is the check: metrics and weights bitwise equal (tests/test_pipeline.py). More chunks than one do
change the numbers against an uncut rollout (other batch shapes, another order of draws), which is why the chunk
count is its own setting (`--rollout-chunks`, part of what a run is) and overlap only a schedule.

Time: with K chunks the rollout's time R and the reward's S (inline) give R + S per step; with overlap about
R + S / K when S / K < R / K per chunk (each chunk's scores come back while the next chunk rolls out), and the last
chunk's scores wait behind the reference's forwards too. The cost: a K times smaller rollout batch, which on a GPU
decodes at nearly the same time per token as the whole batch (decoding is memory-bound): chunking pays only when
the reward is slow. So by default (`config.with_pipeline`) a run chunks (K = 4) and overlaps only when its reward is
a service or a callable marked slow.

Threads: one scorer thread per batch, started at its first chunk, scoring the chunks in order under the trainer's
autocast and no_grad (both are per thread). A failure there is the step's: the scorer sets the step's StopFlag
(`unirl_fast._stop`) and the training thread raises that error at its next check, within one decode step, sampler
step or micro-batch: no more rollout, no optimizer step, no checkpoint of the step, no reward made up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
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


class Scoring:
    """Scores a batch's chunks in the order they come: inline (overlap off), or on one thread (on) that sets the run's
    `flag` when a chunk fails. `context()`: the block every reward call runs in (autocast). busy_s: the time spent in
    the reward calls (inline or on the thread)."""

    def __init__(self, reward, overlap: bool, context, flag: _stop.StopFlag, phase=None):
        self.reward, self.overlap, self.context, self.flag = reward, overlap, context, flag
        self.phase = phase  # inline scoring is timed as this phase ("reward"); a thread's time is busy_s only
        self.chunks, self.busy_s = [], 0.0
        self._queue, self._thread = queue.SimpleQueue(), None

    def submit(self, chunk: Batch) -> None:
        self.chunks.append(chunk)
        if not self.overlap:
            with self.phase("reward") if self.phase is not None else contextlib.nullcontext():
                self._score(chunk)
            return
        if self._thread is None:  # not a daemon: a reward call in flight is never cut off by the interpreter's exit
            self._thread = threading.Thread(target=self._work, name="reward-scorer")
            self._thread.start()
        self._queue.put(chunk)

    def _score(self, chunk):
        t0 = time.perf_counter()
        with torch.no_grad(), self.context():
            score(chunk, self.reward)
        self.busy_s += time.perf_counter() - t0

    def _work(self):
        """Score queued chunks until the end marker; stop early once the flag is set (this run failed) or the main
        thread is gone (the interpreter is exiting: never hold it)."""
        while True:
            try:
                chunk = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self.flag.error is not None or not threading.main_thread().is_alive():
                    return
                continue
            if chunk is None or self.flag.error is not None:
                return
            try:
                self._score(chunk)
            except BaseException as e:  # the run's error: the training thread raises it at its next check
                self.flag.set(e)
                return

    def wait(self) -> None:
        """Every submitted chunk scored; the first failure (this batch's or the step's) raised."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.flag.raise_if_set()



class Pending:
    """A rolled-out batch whose chunks are being scored (`result` waits for them)."""

    def __init__(self, batch: Batch, scoring: Scoring):
        self.batch, self.scoring = batch, scoring

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
    return Pending(parts[0] if len(parts) == 1 else cat_batches(parts), scoring)


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
