"""The lean on-policy trainer: rollout -> reward -> group advantages -> one policy update per step.

    Trainer(cfg).train()      # pretrains (or loads) the base model, evaluates it, runs RL, evaluates again

Per step: `prompts_per_step` training tasks, each repeated `group_size` times; rollout; rewards; GRPO group
advantages (shared by the LM and the DiT); losses over micro-batches with gradient accumulation; gradient
clipping; AdamW with per-expert learning rates (LM / DiT / connector). A frozen copy of the base model is the
reference for the text KL and the velocity-MSE. Everything goes through the public ops with `impl=cfg.impl`.
Outputs in the run directory: config.json, metrics.jsonl (one line per step and per evaluation),
checkpoints/, base/ (the cached warmed-up model), and PNG plots (reward curves, sample grids).
Under a distributed launch or `--zero-stage`, `train.distributed` runs the same loop data parallel on DeepSpeed ZeRO.
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from pathlib import Path

import torch

from .._checks import DeferredCheckError, any_rank_error, mark_host_resident, pending_error
from .._stop import StopFlag, check, watching
from ..fp8 import fp8_weight_cache
from ..profiling import NvmlSampler, PhaseTimer, device_peak_tflops
from ..profiling.step_flops import step_flops
from . import forward_rl, offpolicy
from .checkpoint import check_run_files, latest_checkpoint, load_checkpoint, read_entry, save_checkpoint, write_entry
from .config import (
    check_reward_specs,
    resolve_device,
    reward_specs,
    use_device,
    use_threads,
    with_image_schedule,
    with_pipeline,
)
from .distributed import requested as _distributed_requested
from .ema import ParamEMA
from .forward_rl import forward_image_loss
from .inputs import cast_frozen, check_inputs, load_run_model, run_tasks
from .pipeline import Advantages, Pending, Scorer, Scoring, chunk_rows, roll_and_score
from .plots import N_SHOW
from .preflight_checks import run_checks
from .pretrain import pretrain, run_lm_has_vision, world_model_config
from .progress import bar, say
from .rl import _no_phase, image_loss, reference_outputs, rollout, rollout_engines, rollout_record, text_loss
from .rundir import check_run_dir, check_tasks_unchanged, create_or_resume, lock_run_dir, trim_metrics, unlock_run_dir
from .scenarios import get_scenario


class Trainer:
    def __init__(self, cfg, log=say, model=None, readonly=False, reward=True, run_info=None):
        """model: an already built UnifiedModel to train instead of the pretrained world model (the profiler passes
        a random-init preset model); None pretrains (or loads cfg.model_path). readonly: evaluate an existing run
        without writing to its directory (`unirl-fast eval`): no config check against config.json either.
        reward=False: no reward is built (`export`: nothing the run's config names is imported or contacted).
        run_info: preflight(cfg)'s answer when the caller already ran it (the CLI), else it runs here.
        The run directory is locked for this process (rundir.lock_run_dir) before anything is written to it;
        config.json is written once the model and the reward are built."""
        self.readonly = readonly
        cfg = with_pipeline(with_image_schedule(cfg))  # config.json records what ran: the schedule, the chunks
        if not readonly and run_info is None:
            run_info = preflight(cfg)  # before any model is built or file written (validates cfg)
        self.cfg = cfg.validate() if readonly else cfg
        self.dist = None  # the DeepSpeed runtime (train.distributed); None: single process, deepspeed never imported
        if _distributed_requested(cfg):
            from .distributed import DeepSpeedRuntime

            self.dist = DeepSpeedRuntime(cfg)  # sets its local rank's device
            log = log if self.dist.is_main else (lambda *a, **k: None)
        else:
            use_device(cfg)
        use_threads(cfg)
        self.is_main = self.dist is None or self.dist.is_main  # the process that logs, writes metrics and plots
        self.log = log
        self.scenario = get_scenario(cfg.scenario)
        self.run_dir = Path(cfg.run_dir)
        if readonly:  # eval / export: a checkpoint whose pickle would run code is refused before any work
            check_run_files(self.run_dir)
        if self.is_main and not readonly:
            for note in [lock_run_dir(cfg.run_dir), *run_info.get("notes", ())]:
                if note:
                    log(note)
        torch.manual_seed(cfg.seed)
        if self.dist is not None:
            self.dist.main_first_enter()  # rank 0 builds and caches the base model, then the others read it
        attn = cfg.attn_implementation if cfg.attn_implementation != "auto" else _auto_attention()
        if model is not None:
            self.model = model
        elif cfg.model_path or cfg.lm_path:  # your model: from the run's copy of it once there is one
            self.model = load_run_model(cfg, self.scenario, attn=attn, device=resolve_device(cfg), log=log,
                                        write_copy=self.is_main and not readonly)
        else:
            self.model = pretrain(cfg, self.scenario, log=log, show=self.is_main)
        cast_frozen(self.model, cfg, self.scenario)  # --frozen-dtype (a loaded model already has it)
        if cfg.fp8:
            from ..fp8 import convert_to_fp8  # the unified precision flow: rollout and training share these

            names = convert_to_fp8(self.model)
            if not names:
                raise ValueError(f"--fp8 was requested but no Linear of preset {cfg.preset!r} is eligible (in/out "
                                 "features divisible by 128): nothing would run in FP8")
            log(f"fp8: {len(names)} Linear layers converted (rollout and training share them)")
        if self.dist is not None:
            self.model = self.dist.main_first_exit(self.model)
        self._set_memory_options()
        self.lora = self._add_lora()
        # the frozen reference: the base with adapters disabled when every trained expert is LoRA-adapted (only the
        # small connector is copied), else a frozen copy of the whole model
        self.ref, self.ref_connector = None, None
        if self.lora and all(self.lora.get(k) for k, t in (("lm", self.scenario.train_lm),
                                                           ("dit", self.scenario.train_dit)) if t):
            self.ref_connector = copy.deepcopy(self.model.connector).eval().requires_grad_(False)
        else:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._set_trainable()
        if cfg.off_policy:
            offpolicy.check_model(self.model)
        self.ema = None  # the averaged weights evaluation uses (ema_decay > 0), kept by the process that evaluates
        if cfg.ema_decay > 0 and self.is_main:
            self.ema = ParamEMA(self.model, cfg.ema_decay)
        self.old = None  # nft / awm: the old policy, a slow average of the trained weights (forward_rl)
        if cfg.image_algo != "flow_grpo" and forward_rl.needs_old(cfg) and not forward_rl.old_is_current(cfg):
            self.old = forward_rl.OldPolicy(self.model, cfg.old_decay_rate, cfg.old_decay_max)
        self.opt = torch.optim.AdamW(self._param_groups(), weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator(device=self.model.device).manual_seed(cfg.seed)
        taskset = run_info["tasks"] if run_info is not None else load_run_tasks(cfg, self.scenario)
        self.train_tasks = taskset.train
        self.eval_tasks = taskset.eval[: cfg.eval_prompts]
        self.reward = build_run_reward(cfg, self.scenario, resolve_device(cfg) if self.dist is None else
                                       self.model.device) if reward else None
        log(f"tasks: {taskset.name} ({len(taskset.train)} train, {len(taskset.eval)} held-out); reward: "
            f"{self.reward.describe() if reward else 'not built'}")
        if self.is_main and not readonly:
            create_or_resume(cfg, run_info)  # the run exists from here: what failed before left no config.json
        self.step = 0
        self.history = []
        self.engines = self.prefetch_engines = None  # the rollout engines, made on first use (_engines)
        self.prefetched = self.prefetched_ids = None  # --off-policy 1: the next step's batch (pipeline.Pending)
        self.stop = StopFlag()  # set by any thread of this run that fails (a reward chunk): every other one stops
        self.scorer = Scorer(self.stop)  # the run's one reward thread (reward_overlap on)
        self._init_profiling()
        self._fwd = _call
        if self.dist is not None:
            self.dist.wrap(self)  # the DeepSpeed engine over the model and self.opt; per-rank rollout seed
            self._fwd = self.dist.forward
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            self._resume(ckpt)
        elif self.is_main and not readonly and trim_metrics(self.run_dir / "metrics.jsonl", None):
            log("metrics.jsonl: the records of a run stopped before its first checkpoint removed; it starts again "
                "from step 0")

    # set-up ---------------------------------------------------------------------------------------------------
    def _set_trainable(self):
        """The scenario's experts train (the DiT with the connector); an expert with LoRA adapters trains only them."""
        m, s = self.model, self.scenario
        m.requires_grad_(False)
        for name, on in (("lm", s.train_lm), ("dit", s.train_dit)):
            expert = getattr(m, name)
            if self.lora.get(name):
                for pname, p in expert.named_parameters():
                    p.requires_grad_(on and "lora_" in pname)
            else:
                expert.requires_grad_(on)
        m.connector.requires_grad_(s.train_dit)

    def _set_memory_options(self):
        c, m = self.cfg, self.model
        if c.grad_ckpt_lm:  # newer transformers name it activation checkpointing (the old name warns there)
            if hasattr(m.lm, "activation_checkpointing_enable"):
                m.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if c.grad_ckpt_dit:
            m.dit.enable_gradient_checkpointing()

    def _add_lora(self) -> dict:
        """LoRA adapters from --lora-lm / --lora-dit (peft); {expert: adapted modules}."""
        c = self.cfg
        if not (c.lora_lm or c.lora_dit):
            return {}
        from ..models.lora import add_lora, parse_lora

        out = add_lora(self.model, lm=parse_lora(c.lora_lm, "lm") if c.lora_lm else None,
                       dit=parse_lora(c.lora_dit, "dit") if c.lora_dit else None)
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(f"lora: {', '.join(f'{k} {v} layers' for k, v in out.items())} ({n / 1e6:.2f} M adapter weights)")
        return out

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

    def _trained_state(self) -> dict:
        """What a checkpoint holds of the model: everything, or with LoRA only the trained weights (adapters,
        connector and queries); the base comes from where the run builds it."""
        sd = self.model.state_dict()
        if not self.lora:
            return sd
        names = {k for k, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in sd.items() if k in names}

    def _init_profiling(self):
        """MFU peak (datasheet, CUDA only: never guessed for a CPU) and the NVML sampler (CUDA only)."""
        dev = self.model.device
        self.peak_tflops, self.nvml = None, None
        self._nvml_note = "unavailable: not a CUDA device"
        if dev.type == "cuda":
            self.peak_tflops = device_peak_tflops(torch.cuda.get_device_name(dev), "fp8" if self.cfg.fp8 else "bf16")
            self.nvml = NvmlSampler(device_index=_nvml_index(dev), interval_s=0.1).start()
            self._nvml_note = None if self.nvml.available else f"unavailable: {self.nvml.reason}"

    def _param_groups(self):
        m, c = self.model, self.cfg
        groups = [("lm", m.lm, c.lr_lm), ("dit", m.dit, c.lr_dit), ("connector", m.connector, c.lr_connector)]
        out = []
        for name, mod, lr in groups:
            params = [p for p in mod.parameters() if p.requires_grad]
            if params:
                out.append({"params": params, "lr": lr, "name": name})
        if not out:
            raise ValueError(f"scenario {self.scenario.name!r} trains nothing")
        return out

    def _resume(self, path):
        if self.dist is not None:
            st = self.dist.resume(self, path)
        else:
            ck = load_checkpoint(path)
            if self.lora:  # the trained weights only: every one of them must be there, and nothing else
                want = set(self._trained_state())
                if set(ck["model"]) != want:
                    raise ValueError(f"checkpoint {path} does not hold this run's LoRA weights (missing "
                                     f"{sorted(want - set(ck['model']))[:3]}, unexpected "
                                     f"{sorted(set(ck['model']) - want)[:3]})")
                self.model.load_state_dict(ck["model"], strict=False)
            else:
                self.model.load_state_dict(ck["model"])
            if "optim" in ck:
                self.opt.load_state_dict(ck["optim"])
            else:  # written under DeepSpeed: fine for evaluation, training refuses (see train())
                self._no_optim_state = path
            st = ck["state"]
            self._load_ema(ck.get("ema"), path)
            self._load_old_policy(ck.get("old_policy"), path)
            self._load_prefetch(ck.get("prefetch"), path)
        self.step, self.history = st["step"], st["history"]
        if self.is_main and not self.readonly:
            dropped = trim_metrics(self.run_dir / "metrics.jsonl", self.step)
            if dropped:
                self.log(f"metrics.jsonl: {dropped} records after step {self.step} (written before the checkpoint "
                         "was resumed) removed; they are recomputed")
        self.rng.setstate(st["py_rng"])
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        self.log(f"loaded {path} (step {self.step})" if self.readonly else f"resumed from {path} at step {self.step}")

    def _load_ema(self, state, path):
        if self.ema is None:
            return
        if state is None:
            raise ValueError(f"checkpoint {path} holds no EMA weights but ema_decay is {self.cfg.ema_decay}: it was "
                             "written without --ema-decay; resume it with --ema-decay 0")
        self.ema.load_state_dict(state)

    def _load_old_policy(self, state, path):
        if self.old is None:
            return
        if state is None:
            raise ValueError(f"checkpoint {path} holds no old policy but image_algo {self.cfg.image_algo!r} needs "
                             "one: it was written by another algorithm or version; start a new --run-dir")
        self.old.load_state_dict(state)

    def _load_prefetch(self, state, path):
        """--off-policy 1: the batch the checkpointed run had rolled out for its next step (none after its last)."""
        if state is None or not self.cfg.off_policy or self.readonly:
            return
        b, self.prefetched_ids = offpolicy.batch_from_state(state, self.train_tasks, self.model.device)
        self.prefetched = Pending(b, Scoring(None, False, contextlib.nullcontext, self.stop),
                                  chunk_rows(b.group_ids, self.cfg.rollout_chunks))

    def save(self):
        st = {"step": self.step, "history": self.history, "py_rng": self.rng.getstate(),
              "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()}
        extra = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        if self.old is not None:
            extra["old_policy"] = self.old.state_dict()
        if self.prefetched is not None:  # --off-policy 1: the next step's batch, scored (waits for its scores)
            extra["prefetch"] = offpolicy.batch_state(self.prefetched.result(), self.prefetched_ids)
        if self.dist is not None:
            return self.dist.save(self, st, extra)
        return save_checkpoint(self.run_dir, self.step, {"model": self._trained_state(),
                                                         "optim": self.opt.state_dict(), "state": st, **extra},
                               keep=self.cfg.keep_checkpoints)

    # one step -------------------------------------------------------------------------------------------------
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
            b, adv = pending.result(), adv.all()
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
        rec = {"step": self.step, "reward": _mean(p["total"] for p in b.reward_parts),
               "reward_call_ms": 1e3 * pending.scoring.busy_s,
               **_host_values({"adv_std": adv.float().std(), "useful_frac": _useful_frac(b.rewards, b.group_ids),
                               "grad_norm": gnorm, **metrics}),  # one read
               **_reward_parts(b.reward_parts), **rollout_record(b), **times}
        if c.off_policy:
            rec.update(offpolicy.staleness(b, self.step - 1), prefetch_rollout_ms=1e3 * nxt.seconds if nxt else 0.0)
        rec.update(self._throughput(b, n_local, rec["step_ms"] / 1e3))
        rec.update(self._nvml_record(t0, time.time()))
        if self.dist is not None:
            rec = self.dist.reduce_record(rec)
        return rec

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
            _accumulate(metrics, "text", lt, mt, c.micro_batch / B)
        if s.train_dit and b.traj is not None:
            with self._autocast():
                li, mi = self._fwd(forward_image_loss if b.fp is not None else image_fn, m, c, b, idx, a)
            loss = loss + li
            _accumulate(metrics, "image", li, mi, c.micro_batch / B)
        return loss

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

    def _stop_on_failed_checks(self):
        """The step's deferred value checks (NaN/inf, ids, masks), read once before the optimizer step (one host
        sync): a failure skips the step (no weight, optimizer or EMA update, no checkpoint) and stops the run with
        the op's message. Under DeepSpeed one all-reduce tells every rank of any rank's failure, so all stop at the
        same step instead of waiting in the next collective until the timeout."""
        err = any_rank_error(pending_error())  # the all-reduce only under a process group (DeepSpeed)
        if err is not None:
            self.opt.zero_grad(set_to_none=True)
            raise DeferredCheckError(f"step {self.step + 1} skipped (weights not updated): {err}")

    def _throughput(self, b, n_tok, seconds) -> dict:
        """samples/s, generated and trained text tokens/s, images/s, model FLOPs per phase and MFU (None where the
        device's peak is unknown, e.g. on a CPU). Counts are this rank's (summed over ranks by reduce_record)."""
        c, s = self.cfg, self.scenario
        trained = n_tok if s.train_lm else 0
        n_img = len(b.tasks) if b.images is not None else 0
        flops = step_flops(self.model, s, c, b)
        total = sum(flops.values())
        out = {"samples_per_s": len(b.tasks) / seconds, "tokens_generated": n_tok, "tokens_trained": trained,
               "gen_tokens_per_s": n_tok / seconds, "trained_tokens_per_s": trained / seconds, "images": n_img,
               "images_per_s": n_img / seconds, **{f"flops/{k}": v for k, v in flops.items()}, "flops": total,
               "tflops_per_s": total / seconds / 1e12}
        out["mfu"] = total / seconds / (self.peak_tflops * 1e12) if self.peak_tflops else None
        return out

    def _nvml_record(self, t0, t1) -> dict:
        """The NVML summary over this step on CUDA; on a CPU (or without NVML) the reason, once per run."""
        if self.nvml is not None and self.nvml.available:
            return {f"nvml/{k}": v for k, v in self.nvml.summary(since=t0, until=t1).items()}
        if self._nvml_note is None:
            return {}
        note, self._nvml_note = self._nvml_note, None
        return {"nvml": note}

    def _optimizer_step(self) -> float:
        if self.dist is not None:
            return self.dist.step()  # DeepSpeed clips (gradient_clipping = grad_clip) and steps
        params = [p for g in self.opt.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # freed now: rollout and the reference phase never hold them
        return gnorm

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

    def _cycle_model(self):
        """Who edits back for the cycle-consistency reward (a context yielding the model): the policy (None) or the
        frozen reference."""
        return self._reference() if self.cfg.cycle_back == "reference" else contextlib.nullcontext(None)

    def _full_weights(self):
        return self.dist.full_weights() if self.dist is not None else contextlib.nullcontext()

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
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            return self._evaluate()

    def _evaluate(self) -> dict:
        c, m = self.cfg, self.model
        m.eval()
        gen = torch.Generator(device=m.device).manual_seed(c.seed + 4242)
        rewards, parts, samples = [], [], []
        tasks_all = self.eval_tasks * c.eval_samples
        n_show = min(N_SHOW, len(self.eval_tasks))  # the first tasks of the first pass go on the sample sheets
        starts = range(0, len(tasks_all), c.micro_batch)
        # each micro-batch scored as it is rolled out (beside the next one's rollout with reward_overlap on)
        scoring = Scoring(self.reward, c.reward_overlap == "on", self._autocast, self.stop, scorer=self.scorer)
        batches = []
        with bar(len(starts), "eval", unit="batch", show=self.is_main) as progress, watching(self.stop):
            for start in starts:
                tasks = tasks_all[start:start + c.micro_batch]
                with self._autocast():
                    b = rollout(m, self.scenario, c, tasks, torch.arange(len(tasks)), gen, eval_mode=True,
                                engines=self._engines(), inverse=self._cycle_model)
                scoring.submit(b)
                batches.append(b)
                progress.update(1)
            scoring.wait()
        for start, b in zip(starts, batches):
            rewards.append(b.rewards)
            parts += b.reward_parts
            samples += _samples(b, range(min(len(b.tasks), max(0, n_show - start))))
        per_task = torch.cat(rewards).view(c.eval_samples, len(self.eval_tasks)).mean(0)
        out = {"eval_reward": per_task.mean().item(), **_reward_parts(parts, prefix="eval_")}
        out["_samples"] = samples
        out["_rewards"] = per_task  # per held-out task, in order (paired comparisons across evaluations)
        return out

    # the loop -------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """The RL loop from the current step to cfg.steps. Each step: train, log, checkpoint (at save_every and the
        last step), then evaluate (at eval_every and the last step): saved first, so a failing evaluation never costs
        the step's training; an evaluation that a resume finds missing at its checkpoint's step is made first."""
        c = self.cfg
        if getattr(self, "_no_optim_state", None) is not None:
            raise ValueError(f"checkpoint {self._no_optim_state} was written under DeepSpeed (partitioned optimizer "
                             "state): continue it under the same launcher and world size")
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.step >= c.steps and self.step > 0 and not self._eval_missing(metrics_path):
            self.log(f"run {self.run_dir} is already complete at step {self.step} of {c.steps}: nothing to do "
                     f"(--steps N with N > {self.step} trains on)")
            return self._finish(metrics_path)
        self._open_trackers()
        if self.step == 0:
            base = self.evaluate()
            self._write(metrics_path, {"step": 0, "phase": "eval", **_public(base)})
            self._save_samples({"base": base["_samples"]}, "samples_before.png", before=True)
            self.log(f"base model held-out reward {base['eval_reward']:.3f}")
        elif self._eval_missing(metrics_path):  # stopped between the checkpoint and its evaluation
            self._evaluate_step(metrics_path)
        with bar(c.steps, c.scenario, initial=self.step, show=self.is_main) as steps:
            while self.step < c.steps:
                rec = self.train_step()
                self.history.append(rec)
                self._write(metrics_path, {"phase": "train", **rec})
                steps.update(1)
                self.log(_log_line(rec, kl_used=c.beta > 0))
                if self.step % c.save_every == 0 or self.step == c.steps:
                    self.save()
                if self.step % c.eval_every == 0 or self.step == c.steps:
                    self._evaluate_step(metrics_path)
        return self._finish(metrics_path)

    def _eval_missing(self, metrics_path) -> bool:
        """Whether the current step is an evaluation step whose record metrics.jsonl lacks."""
        c = self.cfg
        if self.step == 0 or not (self.step % c.eval_every == 0 or self.step == c.steps) or not self.is_main:
            return False
        if not Path(metrics_path).is_file():
            return True
        return not any(r.get("phase") == "eval" and r.get("step") == self.step
                       for r in map(json.loads, Path(metrics_path).read_text().splitlines()))

    def _evaluate_step(self, metrics_path):
        ev = self.evaluate()
        self.history.append({"step": self.step, "phase": "eval", **_public(ev)})
        self._write(metrics_path, {"step": self.step, "phase": "eval", **_public(ev)})
        self.log(f"step {self.step} held-out reward {ev['eval_reward']:.3f}")
        if self.step == self.cfg.steps:
            self._save_samples({f"step {self.step}": ev["_samples"]}, "samples_after.png")

    def _finish(self, metrics_path) -> dict:
        self.reward.close()
        if self.nvml is not None:
            self.nvml.stop()
        if self.dist is not None:
            self.dist.barrier()
            sums = self.dist.param_checksums(self.model)
            if len(set(sums)) != 1:
                raise RuntimeError(f"ranks ended with different parameters (checksums {sums})")
        final = _read_evals(metrics_path)
        self._plot(metrics_path)
        self.close()
        return final

    def close(self):
        """Close the trackers and release the run directory (its lock) for another run; train() does this when it
        ends."""
        if getattr(self, "trackers", None) is not None:
            self.trackers.close()
        if self.is_main and not self.readonly:
            unlock_run_dir(self.run_dir)

    def _open_trackers(self):
        """--report-to: the trackers every record and sample sheet also goes to (train.trackers), main process."""
        import dataclasses

        from .trackers import Trackers

        names = self.cfg.report_to if self.is_main and not self.readonly else ()
        config = json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        self.trackers = Trackers(names, self.run_dir, config, self.step)

    def _write(self, path, rec):
        if not self.is_main:
            return
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if getattr(self, "trackers", None) is not None:
            self.trackers.log(rec)

    def _save_samples(self, columns, name, before=False):
        """A labelled sample sheet; at the end of the run also samples.png, the base and the final model side by
        side (the base's samples are kept in samples_before.json / .safetensors for that, so a resumed run can draw
        it too)."""
        from .plots import save_samples

        if not self.is_main:
            return
        title = f"{self.cfg.scenario}: held-out tasks, {', '.join(columns)}"
        save_samples(columns, self.run_dir / name, title)
        sheets = [name]
        if before:
            write_entry(self.run_dir, "samples_before", columns)
        elif any((self.run_dir / f"samples_before{e}").is_file() for e in (".json", ".pt")):
            both = {**read_entry(self.run_dir, "samples_before"), **columns}
            save_samples(both, self.run_dir / "samples.png", f"{self.cfg.scenario}: held-out tasks before and "
                                                             "after RL")
            sheets.append("samples.png")
        if getattr(self, "trackers", None) is not None:
            for sheet in sheets:
                self.trackers.image(Path(sheet).stem, self.run_dir / sheet, self.step)

    def _plot(self, metrics_path):
        from .plots import plot_rewards

        if not self.is_main:
            return
        plot_rewards(metrics_path, self.run_dir / "rewards.png")


def preflight(cfg) -> dict:
    """Every check that needs no model and writes nothing, run before any work (the CLI calls it too, to fail in a
    second with one line): the config, the run directory (usable; a resume only changes what may change), the task
    rows, the reward specs, preflight_checks.run_checks (LoRA vs scenario, reward services' /health, task images,
    the step's memory) and, with --fp8, that the preset has FP8-eligible layers (found on a meta-device build: no
    memory, no weights). Returns check_run_dir's answer with "tasks" and "notes" (lines for the log)."""
    cfg.validate()
    info = check_run_dir(cfg)
    check_run_files(cfg.run_dir)  # a checkpoint whose pickle would run code: refused here, read by nothing
    scenario = get_scenario(cfg.scenario)
    check_inputs(cfg, scenario)  # the expert directories, a saved model, a chat template (not on a resume's copy)
    info["tasks"], source = run_tasks(cfg, scenario, run_lm_has_vision(cfg, scenario))  # a bad row: file and line
    if source == "source":
        check_tasks_unchanged(cfg.run_dir, info["tasks"])
    check_reward_specs(cfg, scenario)  # imports a callable, looks for a CLIP directory: loads no model
    forward_rl.check_config(cfg, scenario)
    offpolicy.check_config(cfg, scenario)
    info["notes"] = run_checks(cfg, scenario, info["tasks"])  # LoRA, services, images, memory (preflight_checks)
    if cfg.fp8 and cfg.model_path is None and cfg.lm_path is None:
        from ..fp8 import convert_to_fp8
        from ..models import UnifiedModel

        with torch.device("meta"):
            model = UnifiedModel(world_model_config(cfg.preset, scenario.edit))
        eligible = []
        convert_to_fp8(model, lambda name, mod: eligible.append(name) and False)
        if not eligible:
            raise ValueError(f"--fp8 was requested but no Linear of preset {cfg.preset!r} is eligible (in/out features "
                             "divisible by 128): nothing would run in FP8; use --preset tiny-fp8")
    return info


def load_run_tasks(cfg, scenario):
    """The run's tasks: its source, or the run's copy of it when the source has gone."""
    return run_tasks(cfg, scenario, run_lm_has_vision(cfg, scenario))[0]


def build_run_reward(cfg, scenario, device):
    """The run's reward: the weighted sum of its --reward terms (the scenario's default when none is given)."""
    from ..rewards import build_reward

    http = dict(timeout=cfg.reward_timeout, retries=cfg.reward_retries, concurrency=cfg.reward_concurrency,
                batch_size=cfg.reward_batch_size, token_env=cfg.reward_token_env,
                allow_insecure_token=cfg.reward_allow_insecure_token, ca_file=cfg.reward_ca_file)
    return build_reward(reward_specs(cfg), scenario=scenario, format_weight=cfg.format_weight, device=device,
                        http_options=http)


def _nvml_index(dev) -> int:
    """NVML numbers every GPU of the machine; CUDA only the visible ones: map through CUDA_VISIBLE_DEVICES."""
    import os

    index = dev.index if dev.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


def _auto_attention() -> str:
    from ..models.experts import sdpa_or_flash

    return sdpa_or_flash()


def _call(fn, *args):
    return fn(*args)


_MAX_METRICS = ("ratio_exact", "logp_mismatch")  # maxima over the step's micro-batches (train.rl.image_loss)


def _accumulate(metrics, prefix, loss, m, weight):
    """Loss values are already scaled for accumulation (they add up); metrics are micro-batch means (weighted),
    _MAX_METRICS the maximum. Kept on the device: the step reads them once (`_host_values`), not per micro-batch."""
    metrics[f"{prefix}_loss"] = metrics.get(f"{prefix}_loss", 0.0) + loss.detach().float()
    for k, v in m.items():
        key = f"{prefix}_{k}"
        v = v.detach().float() if isinstance(v, torch.Tensor) else v
        if k in _MAX_METRICS:
            metrics[key] = torch.maximum(metrics[key], v) if key in metrics else v
        else:
            metrics[key] = metrics.get(key, 0.0) + v * weight


def _useful_frac(rewards, group_ids):
    """The share of samples in groups whose rewards differ (the samples a group advantage gives a gradient)."""
    r, g = rewards.float(), group_ids.to(rewards.device)  # group ids < B (whole groups of >= 2 per rank)
    hi = torch.full_like(r, -float("inf")).scatter_reduce(0, g, r, "amax")
    lo = torch.full_like(r, float("inf")).scatter_reduce(0, g, r, "amin")
    return (hi[g] > lo[g]).float().mean()


def _host_values(d: dict) -> dict:
    """d with its tensor values read to Python floats: one stacked copy per device (one host sync for the lot)."""
    out = dict(d)
    by_device = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():
        out.update(zip(keys, torch.stack([d[k].detach().float().reshape(()) for k in keys]).tolist()))
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _reward_parts(parts, prefix=""):
    if not parts:
        return {}
    keys = [k for k in parts[0] if k != "total"]
    return {f"{prefix}reward_{k}": sum(p[k] for p in parts) / len(parts) for k in keys}


def _samples(b, rows) -> list:
    """Sample-sheet records of a scored batch's rows: prompt, completion, right / wrong (exact-answer tasks), image,
    source image (edits; the scene asked about for understanding), reward and its parts. All on the CPU."""
    out = []
    for i in rows:
        t, part = b.tasks[i], b.reward_parts[i]
        src = b.sources[i].cpu() if b.sources is not None else None  # an edit's source, as the DiT saw it
        if src is None and b.lm_images is not None:  # the image a VLM was asked about, as it saw it
            src = b.lm_images[i]
        elif src is None and t.image is not None:  # the image a text-only LM read a description of
            src = t.source_image(b.images.shape[-1] if b.images is not None else 32)
        out.append({"prompt": t.prompt, "text": b.completions[i] if b.completions else None,
                    "right": bool(part["answer"]) if "answer" in part else None,
                    "image": b.images[i].cpu() if b.images is not None else None, "source": src,
                    "reward": float(part["total"]), "parts": {k: float(v) for k, v in part.items()}})
    return out


def _public(d):
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _log_line(r, kl_used=False):
    """What moves in a step: the reward and its parts, the advantage spread, the policy ratio and clipping (which an
    on-policy single update keeps at 1 and 0: they matter once rollouts go stale), the entropy, KL only when a KL
    term is in the loss, the step time and throughput. The losses are in metrics.jsonl."""
    parts = " ".join(f"{k[len('reward_'):]} {v:.3f}" for k, v in r.items() if k.startswith("reward_"))
    out = [f"step {r['step']:4d}", f"reward {r['reward']:.3f}" + (f" ({parts})" if parts else ""),
           f"adv std {r['adv_std']:.2f}"]
    for side in ("text", "image"):
        if f"{side}_ratio_mean" in r:
            clip = r.get(f"{side}_clip_frac_low", 0.0) + r.get(f"{side}_clip_frac_high", 0.0) + \
                r.get(f"{side}_clip_frac", 0.0)
            out.append(f"{side} ratio {r[f'{side}_ratio_mean']:.3f} clip {clip:.2f}")
    if "text_entropy_mean" in r:
        out.append(f"entropy {r['text_entropy_mean']:.2f}")
    if kl_used and "text_kl_mean" in r:
        out.append(f"kl {r['text_kl_mean']:.2e}")
    if "image_velocity_mse" in r:
        out.append(f"v-mse {r['image_velocity_mse']:.1e}")
    out.append(f"{r['step_ms'] / 1e3:.1f} s/step {r['samples_per_s']:.1f} samples/s")
    return "  ".join(out)


def _read_evals(path):
    evals = [json.loads(line) for line in open(path) if '"phase": "eval"' in line]
    return {"base_eval_reward": evals[0]["eval_reward"] if evals else None,
            "final_eval_reward": evals[-1]["eval_reward"] if evals else None}
