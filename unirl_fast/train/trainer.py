"""The lean trainer: rollout -> reward -> group advantages -> one policy update per step, from built parts.

    Trainer(cfg).train()                        # builds its parts (train.setup), evaluates, runs RL, evaluates again
    Trainer(setup.build(cfg, purpose="eval"))   # what `unirl-fast eval` builds: no optimizer, no reference

Per step (train_step, top to bottom): the batch (`prompts_per_step` tasks x `group_size`, rolled out in chunks of
whole groups, each scored as soon as it is rolled out: train.pipeline; or with --off-policy 1 rolled out during the
last step: train.offpolicy); the forward-process draws and the old policy's velocities (nft / awm); the frozen
reference's outputs; then the losses over micro-batches with gradient accumulation, each as soon as its rows'
group advantages are in (shared by the LM and the DiT); the deferred value checks; gradient clipping and AdamW with
per-expert learning rates; the record (train.records). Everything goes through the public ops with
`impl=cfg.impl`. A failure on any of the run's threads stops the step before the weights change.
Checkpoints: train.state; the run directory's outputs (config.json, metrics.jsonl, checkpoints/, base/, plots):
train.rundir, train.records. Under a distributed launch or `--zero-stage`, `train.distributed` runs the same loop
data parallel on DeepSpeed ZeRO.
"""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch

from .._checks import DeferredCheckError, any_rank_error, mark_host_resident, pending_error
from .._stop import StopFlag, check, watching
from ..fp8 import fp8_weight_cache
from ..profiling import PhaseTimer
from . import evaluation, forward_rl, offpolicy, records, state
from .checkpoint import latest_checkpoint
from .forward_rl import forward_image_loss
from .pipeline import Advantages, Pending, Scorer, Scoring, chunk_rows, roll_and_score
from .progress import bar, say
from .rl import _no_phase, image_loss, reference_outputs, rollout, rollout_engines, rollout_record, text_loss
from .rundir import trim_metrics, unlock_run_dir
from .setup import RunParts, build


class Trainer:
    def __init__(self, parts, log=None, **build_options):
        """parts: `setup.build`'s RunParts, or a TrainConfig, built here with `build_options` (purpose="train" |
        "eval" | "export", model=, run_info=; see setup.build). A checkpoint in the run directory is loaded; the run
        directory is locked by the set-up of a training run, and released by close() (train() calls it)."""
        if not isinstance(parts, RunParts):
            parts = build(parts, log=log or say, **build_options)
        p = self.parts = parts
        self.cfg, self.scenario, self.caps, self.dist, self.log = p.cfg, p.scenario, p.caps, p.dist, p.log
        self.model, self.lora, self.ref, self.ref_connector = p.model, p.lora, p.ref, p.ref_connector
        self.ema, self.old, self.opt, self.reward = p.ema, p.old, p.opt, p.reward
        self.train_tasks, self.eval_tasks = p.train_tasks, p.eval_tasks
        self.is_main, self.readonly, self.run_dir = p.is_main, p.readonly, Path(p.cfg.run_dir)
        self.rng = random.Random(self.cfg.seed)
        self.gen = torch.Generator(device=self.model.device).manual_seed(self.cfg.seed)
        self.step, self.history = 0, []
        self.engines = self.prefetch_engines = None  # the rollout engines, made on first use (_engines)
        self.prefetched = self.prefetched_ids = None  # --off-policy 1: the next step's batch (pipeline.Pending)
        self.stop = StopFlag()  # set by any thread of this run that fails (a reward chunk): every other one stops
        self.scorer = Scorer(self.stop)  # the run's one reward thread (reward_overlap on)
        self.profile = records.StepProfile(self.model.device, self.cfg.fp8)
        self.outputs = records.RunOutputs(self.cfg, self.run_dir, self.is_main and not self.readonly)
        self._fwd = _call
        if self.dist is not None:
            self.dist.wrap(self)  # the DeepSpeed engine over the model and self.opt; per-rank rollout seed
            self._fwd = self.dist.forward
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            state.resume(self, ckpt)
        elif self.is_main and not self.readonly and trim_metrics(self.run_dir / "metrics.jsonl", None):
            self.log("metrics.jsonl: the records of a run stopped before its first checkpoint removed; it starts "
                     "again from step 0")

    # contexts -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reference(self):
        """The frozen reference model for the duration: the copy, or the policy with its adapters off and the base
        connector swapped in (put back after, also on an error)."""
        if self.ref is not None:
            with self.dist.reference_weights() if self.dist is not None else contextlib.nullcontext():
                yield self.ref  # ZeRO-3: the partitioned copy gathered for the phase
            return
        from ..models.lora import adapters_disabled

        m = self.model
        trained = m.connector
        with adapters_disabled(m):
            m.connector = self.ref_connector
            try:
                yield m
            finally:
                m.connector = trained

    def _autocast(self):
        """bf16 autocast over the fp32 weights (--precision bf16), the same in rollout, reward and training."""
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def _full_weights(self):
        return self.dist.full_weights() if self.dist is not None else contextlib.nullcontext()

    def _cycle_model(self):
        """Who edits back for the cycle-consistency reward (a context yielding the model): the policy (None) or the
        frozen reference."""
        return self._reference() if self.cfg.cycle_back == "reference" else contextlib.nullcontext(None)

    def _engines(self, prefetch=False):
        """The run's rollout engines, made on first use and kept: one static KV cache per batch size (the step's and
        the evaluation's), compiled decode and sampler steps on CUDA; eager under ZeRO-3, whose gathered weights
        move between calls. prefetch: the one-step-off rollout thread's, on CUDA a second eager set (the compiled
        engines' CUDA graphs belong to the thread that captured them)."""
        if prefetch and self.model.device.type == "cuda":
            if self.prefetch_engines is None:
                self.prefetch_engines = rollout_engines(self.model, self.cfg, compile=False)
            return self.prefetch_engines
        if self.engines is None:
            zero3 = self.dist is not None and self.dist.stage == 3
            self.engines = rollout_engines(self.model, self.cfg, compile=False if zero3 else None)
        return self.engines

    # checkpoints (train.state) ------------------------------------------------------------------------------
    def save(self):
        return state.save(self)

    # one step ---------------------------------------------------------------------------------------------
    def _sample_tasks(self):
        """The step's tasks (each prompt group_size times) and group ids; their indices into train_tasks are kept in
        self.sampled_ids (a one-step-off checkpoint stores the next step's batch by them)."""
        c = self.cfg
        self.sampled_ids = [self.rng.randrange(len(self.train_tasks)) for _ in range(c.prompts_per_step)]
        tasks = [self.train_tasks[i] for i in self.sampled_ids for _ in range(c.group_size)]
        gid = torch.arange(c.prompts_per_step).repeat_interleave(c.group_size)
        return tasks, gid

    def train_step(self) -> dict:
        """One RL step (see the module docstring). Any failure in it, on this thread or another of the run's (a reward
        chunk scored beside the rollout, the next step's rollout), stops the run: no weight changes, no checkpoint of
        the step."""
        try:
            with watching(self.stop):
                return self._train_step()
        except BaseException as e:
            self.stop.set(e)  # the run's other threads (scorers, a prefetch) stop at their next check
            raise

    def _train_step(self) -> dict:
        c, m, s = self.cfg, self.model, self.scenario
        timer = PhaseTimer(m.device)
        m.eval()
        t0 = time.time()
        pending = self._batch(timer)  # chunks of whole groups, each scored as soon as it is rolled out
        b = pending.batch
        if c.image_algo != "flow_grpo" and s.train_dit and b.traj is not None:
            self._forward_process_batch(b, timer)
        ref_weights = self._full_weights() if self.ref is None else contextlib.nullcontext()  # LoRA: the policy's
        with timer.phase("ref"), ref_weights, self._reference() as ref, fp8_weight_cache(ref), self._autocast():
            reference_outputs(ref, s, c, b, c.micro_batch)  # frozen: one FP8 quantization per layer and step
        adv = Advantages(pending, c.adv_std, c.impl, m.device)  # per chunk, as soon as its scores are in
        m.train()
        nxt = self._prefetch()  # --off-policy 1: the next step's rollout runs from here, beside this step's losses
        metrics, n_local = self._losses(b, adv, timer)  # a micro-batch waits for its rows' advantages
        with timer.phase("reward"):  # every score in by now (a global std waited for them all)
            b = pending.result()
        if nxt is not None:
            with timer.phase("prefetch_wait"):  # the weights it reads must not move under it
                self.prefetched, self.prefetched_ids = nxt.join(), nxt.task_ids
        self._stop_on_failed_checks()  # before any weight changes: a flagged NaN never reaches the weights
        with timer.phase("optimizer"):
            gnorm = self._optimizer_step()
            if self.old is not None:
                self.old.update()
            if c.ema_decay > 0:
                with self._full_weights():  # a collective under ZeRO-3: every rank enters, the main one averages
                    if self.ema is not None:
                        self.ema.update()
        times = timer.finish_step()
        self.step += 1
        rec = {"step": self.step, "reward": records.mean(p["total"] for p in b.reward_parts),
               "reward_call_ms": 1e3 * pending.scoring.busy_s,
               **records.host_values({"adv_std": adv.all().float().std(), "grad_norm": gnorm, **metrics,
                                      "useful_frac": records.useful_frac(b.rewards, b.group_ids)}),  # one read
               **records.reward_parts(b.reward_parts), **rollout_record(b), **times}
        if c.off_policy:
            rec.update(offpolicy.staleness(b, self.step - 1), prefetch_rollout_ms=1e3 * nxt.seconds if nxt else 0.0)
        rec.update(self.profile.throughput(m, s, c, b, n_local, rec["step_ms"] / 1e3))
        rec.update(self.profile.nvml_record(t0, time.time()))
        if self.dist is not None:
            rec = self.dist.reduce_record(rec)
        return rec

    def _batch(self, timer) -> Pending:
        """This step's batch: the one rolled out during the last step (--off-policy 1), else rolled out now."""
        if self.prefetched is not None:
            pending, self.prefetched = self.prefetched, None
            return pending
        tasks, gid = self._sample_tasks()
        if self.dist is not None:
            tasks, gid = self.dist.shard(tasks, gid)  # this rank's whole groups
        return self._rollout(tasks, gid, timer, self.step)

    def _prefetch(self):
        """--off-policy 1: the next step's tasks drawn and its rollout started on a thread with the current weights
        (train.offpolicy); None on-policy and at the run's last step."""
        if not self.cfg.off_policy or self.step + 1 >= self.cfg.steps:
            return None
        tasks, gid = self._sample_tasks()
        step = self.step + 1

        def roll():
            with self._autocast():
                return self._rollout(tasks, gid, None, step, engines=self._engines(prefetch=True))
        nxt = offpolicy.Prefetch(roll, self.stop, self.model.device)
        nxt.task_ids = [i for i in self.sampled_ids for _ in range(self.cfg.group_size)]  # per sample
        return nxt

    def _rollout(self, tasks, gid, timer, step, engines=None) -> Pending:
        """Step `step`'s rollout (0-based: the sampler's schedule) in cfg.rollout_chunks chunks of whole groups, each
        submitted for scoring as it is done (inline, or beside the next chunk's rollout with reward_overlap on:
        train.pipeline); each sample records the policy version (optimizer steps so far) that rolled it out."""
        c = self.cfg
        phase = timer.phase if timer is not None else None
        scoring = Scoring(self.reward, c.reward_overlap == "on", self._autocast, self.stop, phase=phase,
                          scorer=self.scorer)

        def roll(t, g):
            b = rollout(self.model, self.scenario, c, t, g, self.gen, phase=phase or _no_phase,
                        engines=engines or self._engines(), step=step, inverse=self._cycle_model)
            b.versions = mark_host_resident(torch.full((len(t),), self.step, dtype=torch.long))
            return b
        with self._full_weights(), self._autocast():
            return roll_and_score(roll, tasks, gid, chunk_rows(gid, c.rollout_chunks), scoring)

    def _forward_process_batch(self, b, timer):
        """nft / awm: draw each sample's timesteps and noise, then the old policy's velocities on them (unless the
        old policy is the current weights: the loss then takes the detached current velocity)."""
        c, m = self.cfg, self.model
        b.fp = forward_rl.draw(c, b, self.gen)
        if self.old is not None:
            with timer.phase("old"), self.old.swapped_in(), self._autocast():
                b.fp.v_old = forward_rl.frozen_velocities(m, b, b.fp, c.micro_batch)

    def _losses(self, b, adv, timer) -> tuple:
        """Forward and backward of the step's losses over micro-batches (gradients accumulate), each after its rows'
        advantages (timed as "reward" while it waits for scores): (metrics summed on the device, this rank's
        completion tokens)."""
        c = self.cfg
        B, metrics = len(b.tasks), {}
        text_fn, image_fn = (offpolicy.text_loss, offpolicy.image_loss) if c.off_policy else (text_loss, image_loss)
        with timer.phase("train_fwd_bwd"):
            self.opt.zero_grad(set_to_none=True)
            n_local = n_tok = int(b.text.completion_mask.sum()) if b.text is not None else 0
            if self.dist is not None:
                n_tok = self.dist.token_norm(n_tok)  # global tokens / world: dapo's rank average = global mean
        for start in range(0, B, c.micro_batch):
            check()  # a failure on another of the run's threads stops the step before any weight changes
            with timer.phase("reward"):
                a = adv.rows(start, start + c.micro_batch)
            with timer.phase("train_fwd_bwd"):
                loss = self._micro_batch_loss(b, a, start, n_tok, metrics, text_fn, image_fn)
                if self.dist is not None:
                    self.dist.backward(loss, last=start + c.micro_batch >= B)
                else:
                    loss.backward()
        return metrics, n_local

    def _micro_batch_loss(self, b, a, start, n_tok, metrics, text_fn, image_fn):
        """The micro-batch at row `start`'s loss (scaled for accumulation); its metrics added to `metrics`."""
        c, m, s = self.cfg, self.model, self.scenario
        B = len(b.tasks)
        idx = torch.arange(start, start + c.micro_batch, device=m.device)  # device rows: no H2D copy
        loss = torch.zeros((), device=m.device)
        if s.train_lm and b.text is not None:
            with self._autocast():
                lt, mt = self._fwd(text_fn, m, c, b, idx, a, n_tok)
            loss = loss + lt
            records.accumulate(metrics, "text", lt, mt, c.micro_batch / B)
        if s.train_dit and b.traj is not None:
            with self._autocast():
                li, mi = self._fwd(forward_image_loss if b.fp is not None else image_fn, m, c, b, idx, a)
            loss = loss + li
            records.accumulate(metrics, "image", li, mi, c.micro_batch / B)
        return loss

    def _stop_on_failed_checks(self):
        """The step's deferred value checks (NaN/inf, ids, masks), read once before the optimizer step (one host
        sync): a failure skips the step (no weight, optimizer or EMA update, no checkpoint) and stops the run with
        the op's message. Under DeepSpeed one all-reduce tells every rank of any rank's failure, so all stop at the
        same step instead of waiting in the next collective until the timeout."""
        err = any_rank_error(pending_error())  # the all-reduce only under a process group (DeepSpeed)
        if err is not None:
            self.opt.zero_grad(set_to_none=True)
            raise DeferredCheckError(f"step {self.step + 1} skipped (weights not updated): {err}")

    def _optimizer_step(self) -> float:
        if self.dist is not None:
            return self.dist.step()  # DeepSpeed clips (gradient_clipping = grad_clip) and steps
        params = [p for g in self.opt.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # freed now: rollout and the reference phase never hold them
        return gnorm

    # evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean held-out reward: greedy text, ODE images from fixed noise (the same every evaluation).
        With eval_samples K > 1 every task is drawn K times (pass k over all tasks uses the k-th noise draws)
        and a task's reward is the mean of its K; `_rewards` holds one value per task, `_samples` the sample-sheet
        records of the first N_SHOW tasks (first pass).
        With ema_decay > 0 the averaged weights are evaluated (swapped in, then the trained ones put back).
        --off-policy 1: the next step's batch is scored first (one reward call at a time)."""
        if self.prefetched is not None:
            with watching(self.stop):
                self.prefetched.result()
        if self.dist is not None and not getattr(self, "_in_eval", False):
            self._in_eval = True  # rank 0 evaluates (full weights), every rank gets the numbers
            try:
                return self.dist.evaluate(self.evaluate)
            finally:
                self._in_eval = False
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext(), watching(self.stop):
            return evaluation.held_out(self)

    # the loop -------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """The RL loop from the current step to cfg.steps. Each step: train, log, checkpoint (at save_every and the
        last step), then evaluate (at eval_every and the last step): saved first, so a failing evaluation never costs
        the step's training; an evaluation that a resume finds missing at its checkpoint's step is made first."""
        c, out = self.cfg, self.outputs
        if self.opt is None:
            raise ValueError(f"this trainer was built to {self.parts.purpose}, not to train (setup.build purpose)")
        if getattr(self, "_no_optim_state", None) is not None:
            raise ValueError(f"checkpoint {self._no_optim_state} was written under DeepSpeed (partitioned optimizer "
                             "state): continue it under the same launcher and world size")
        if self.step >= c.steps and self.step > 0 and not self._eval_missing():
            self.log(f"run {self.run_dir} is already complete at step {self.step} of {c.steps}: nothing to do "
                     f"(--steps N with N > {self.step} trains on)")
            return self._finish()
        out.open_trackers(self.step, report=self.is_main and not self.readonly)
        if self.step == 0:
            base = self.evaluate()
            out.write({"step": 0, "phase": "eval", **records.public(base)})
            out.save_samples({"base": base["_samples"]}, "samples_before.png", self.step, before=True)
            self.log(f"base model held-out reward {base['eval_reward']:.3f}")
        elif self._eval_missing():  # stopped between the checkpoint and its evaluation
            self._evaluate_step()
        with bar(c.steps, c.scenario, initial=self.step, show=self.is_main) as steps:
            while self.step < c.steps:
                rec = self.train_step()
                self.history.append(rec)
                out.write({"phase": "train", **rec})
                steps.update(1)
                self.log(records.log_line(rec, kl_used=c.beta > 0))
                if self.step % c.save_every == 0 or self.step == c.steps:
                    self.save()
                if self.step % c.eval_every == 0 or self.step == c.steps:
                    self._evaluate_step()
        return self._finish()

    def _eval_missing(self) -> bool:
        """Whether the current step is an evaluation step whose record metrics.jsonl lacks."""
        c = self.cfg
        due = self.step > 0 and (self.step % c.eval_every == 0 or self.step == c.steps)
        return due and self.is_main and self.outputs.eval_missing(self.step)

    def _evaluate_step(self):
        ev = self.evaluate()
        self.history.append({"step": self.step, "phase": "eval", **records.public(ev)})
        self.outputs.write({"step": self.step, "phase": "eval", **records.public(ev)})
        self.log(f"step {self.step} held-out reward {ev['eval_reward']:.3f}")
        if self.step == self.cfg.steps:
            self.outputs.save_samples({f"step {self.step}": ev["_samples"]}, "samples_after.png", self.step)

    def _finish(self) -> dict:
        self.reward.close()
        self.profile.stop()
        if self.dist is not None:
            self.dist.barrier()
            sums = self.dist.param_checksums(self.model)
            if len(set(sums)) != 1:
                raise RuntimeError(f"ranks ended with different parameters (checksums {sums})")
        final = records.read_evals(self.outputs.metrics)
        self.outputs.plot()
        self.close()
        return final

    def close(self):
        """Close the trackers and release the run directory (its lock) for another run; train() does this when it
        ends."""
        self.outputs.close()
        if self.is_main and not self.readonly:
            unlock_run_dir(self.run_dir)


def _call(fn, *args):
    return fn(*args)
