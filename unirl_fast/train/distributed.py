"""DeepSpeed ZeRO-2 / ZeRO-3 scale-out of the trainer: the same entry point, data parallel over ranks.

    deepspeed --num_gpus 8 --module unirl_fast.cli train --zero-stage 3 ...   # or torchrun, or any launcher
                                                                              # that sets RANK / WORLD_SIZE / LOCAL_RANK
When it is on: `--zero-stage 2|3` was given, or a launcher set LOCAL_RANK (the `deepspeed` launcher also passes
`--local_rank`, which the CLI accepts); a launch without `--zero-stage` uses ZeRO-2. Otherwise the trainer never
imports deepspeed and runs single-process exactly as before. Asking for it without deepspeed installed raises.

Data parallel. Every rank draws the step's `prompts_per_step` prompts from the same seeded stream (so the global
batch is the single-process one) and keeps its contiguous share of whole groups: rank r rolls out prompts
[r k, (r + 1) k), k = prompts_per_step / world, so group advantages are local (prompts_per_step % world == 0 is
required, and the local batch k * group_size must be divisible by micro_batch). Rollout noise comes from a generator
seeded `seed + rank` (rank 0 draws what a single process draws). Step records are reduced over ranks for the log
(counts and rates such as samples/s summed, peak memory the max, losses, rewards and times averaged); only rank 0
logs, writes metrics.jsonl, plots and evaluates (others wait).

Gradient math. Per micro-batch the losses are already scaled by micro/B_local (rl.py), so the accumulated local
gradient is the local-batch mean; DeepSpeed averages gradients over ranks, which gives the global-batch mean = the
single-process gradient. We therefore call `engine.backward(loss, scale_wrt_gas=False)` (no second 1/GAS) with
`gradient_accumulation_steps = B_local / micro_batch` and mark the boundary by hand on the last micro-batch, then one
`engine.step()`. Token-normalised losses (bnpo/dapo: sum / N_tokens) use N = all-reduced global tokens / world,
so the rank average is sum_all / N_global as in one process. Clipping is DeepSpeed's `gradient_clipping`
(= grad_clip, global norm, same as clip_grad_norm_); grad_norm is the engine's pre-clip global norm.

Optimizer: the trainer's own `torch.optim.AdamW` (per-expert param groups LM / DiT / connector with their learning
rates), handed to ZeRO as a client optimizer: DeepSpeed's fused CPU/GPU Adam ops need a JIT build we do not
require. The engine keeps fp32 weights like the single-process path; `--precision bf16` is autocast around the
engine's forward (tested at ZeRO-2 and ZeRO-3 with gradient checkpointing); a bf16 section in `--deepspeed-config`
(DeepSpeed's own bf16 weights) is passed to DeepSpeed but untested here. tests/test_distributed.py checks that one
2-rank step gives the single-process gradients and update on the same global rollout (ZeRO-2 with dapo, ZeRO-3
with grpo).

ZeRO-3. The engine wraps `_StepModule` (the UnifiedModel as its only child), and every micro-batch loss runs inside
`engine(...)`, so the partitioned-parameter hooks fetch each sub-module's weights in forward and backward. Weights
used outside their own module's forward (the LM head in the fused policy loss, the connector's query embeddings)
are registered as external parameters of the step module. Rollout and evaluation run inside DeepSpeed's
`unwrap_model_for_generation` (one all-gather of the full weights, hooks off): token-by-token decoding with per-layer
gathers would be far slower, and the tiny-to-medium models this trainer targets fit whole on one device. The frozen
reference copy is partitioned the same way at ZeRO-3 (a second engine, without an optimizer: ZeRO-3 inference), so a
rank keeps 1/N of it; the reference phase (and a cycle-back edit by the reference) gathers it whole like rollout
(`reference_weights`). At ZeRO-2 it is a plain copy on every rank. With LoRA on every trained expert there is no
copy (the policy with its adapters off).

Base model: rank 0 pretrains (or loads) first and writes the cache, the others wait and then read the cache, so
no two ranks write one directory; every rank ends with the same bits.

Checkpoints keep the single-process layout and guarantees (checkpoint.py): all ranks write into `step-N.tmp/`
(DeepSpeed's partitioned model/optimizer files under `ds/`, `state-rank<r>` with each rank's RNG states), rank 0
adds the consolidated `model` (what `unirl-fast eval` reads) and `state`, fsyncs everything, renames the directory
into place and swaps `latest`. Resume loads the engine state with DeepSpeed (same world size required) and each
rank's RNG states, so a resumed run continues as the uninterrupted one. DeepSpeed's own files are pickles that its
readers load with weights_only=False; during the resume every torch.load is a weights_only=True load that allows
only the few DeepSpeed classes its checkpoints hold (DEEPSPEED_GLOBALS), so a crafted ds/ file runs nothing.
Multi-node runs need `run_dir` on a shared file system.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import fsync_tree, publish_checkpoint, read_entry, weights_only_loads, write_entry
from .scenarios import get_scenario

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def requested(cfg) -> bool:
    """True when the run must go through DeepSpeed: --zero-stage given or started by a distributed launcher."""
    return cfg.zero_stage is not None or "LOCAL_RANK" in os.environ


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError("DeepSpeed was requested (--zero-stage, or a distributed launcher set LOCAL_RANK) but "
                           f"`import deepspeed` failed ({e}); install it with `pip install deepspeed` (the "
                           "trainer never falls back to one process silently)") from e
    return deepspeed


def check_world(cfg, world: int) -> int:
    """Validate the batch split over `world` ranks; returns the local batch size."""
    if cfg.prompts_per_step % world:
        raise ValueError(f"bad config: prompts_per_step {cfg.prompts_per_step} is not divisible by the world size "
                         f"{world} (each rank rolls out whole groups)")
    local = cfg.prompts_per_step // world * cfg.group_size
    if local % cfg.micro_batch:
        raise ValueError(f"bad config: the per-rank batch {local} ((prompts_per_step / world) x group_size) is not "
                         f"divisible by micro_batch {cfg.micro_batch}")
    return local


def deepspeed_config(cfg, world: int) -> dict:
    """The engine's config from TrainConfig; `--deepspeed-config` JSON is merged on top (batch keys excluded)."""
    local = check_world(cfg, world)
    gas = local // cfg.micro_batch
    out = {"train_micro_batch_size_per_gpu": cfg.micro_batch, "gradient_accumulation_steps": gas,
           "train_batch_size": cfg.micro_batch * gas * world, "gradient_clipping": cfg.grad_clip,
           "zero_optimization": {"stage": cfg.zero_stage or 2}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    if cfg.deepspeed_config:
        user = json.loads(Path(cfg.deepspeed_config).read_text())
        bad = [k for k in _BATCH_KEYS if k in user]
        if bad:
            raise ValueError(f"bad config: {cfg.deepspeed_config} sets {bad}; batch sizes come from "
                             "--prompts-per-step / --group-size / --micro-batch")
        zero = {**out["zero_optimization"], **user.pop("zero_optimization", {})}
        if cfg.zero_stage is not None and zero["stage"] != cfg.zero_stage:
            raise ValueError(f"bad config: --zero-stage {cfg.zero_stage} but {cfg.deepspeed_config} says stage "
                             f"{zero['stage']}")
        if zero["stage"] not in (2, 3):
            raise ValueError(f"bad config: ZeRO stage must be 2 or 3, got {zero['stage']} from "
                             f"{cfg.deepspeed_config}")
        out.update(user)
        out["zero_optimization"] = zero
    return out


# the classes DeepSpeed's ZeRO-2 / ZeRO-3 checkpoint files pickle besides tensors, numbers, strings and containers
# (read from the files DeepSpeed 0.19 writes; plain data holders: a dataclass, an enum, the loss scaler's settings)
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def deepspeed_safe_globals() -> list:
    """DEEPSPEED_GLOBALS as classes: what the safe reader of a resume allows."""
    import importlib

    out = []
    for name in DEEPSPEED_GLOBALS:
        mod, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(mod), attr))
    return out


class _StepModule(torch.nn.Module):
    """What the engine wraps: forward(fn, *args) runs fn(*args) so ZeRO-3's hooks bracket the whole loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(*args)


class DeepSpeedRuntime:
    """Process group, engine and the rank-aware pieces of the loop. Built by `Trainer` when `requested(cfg)`."""

    def __init__(self, cfg):
        self.ds = import_deepspeed()
        self.cfg = cfg
        if not dist.is_initialized():
            self.ds.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ds_config = deepspeed_config(cfg, self.world)  # raises on a bad split before any work
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.is_main = self.rank == 0
        self.engine = None
        self.ref_engine = None  # ZeRO-3: the partitioned frozen reference (wrap)
        self._ref_gathered = False

    # set-up ---------------------------------------------------------------------------------------------------
    def main_first_enter(self):
        """Before building the base model: ranks > 0 wait until rank 0 has built (and cached) it."""
        if not self.is_main:
            dist.barrier()

    def main_first_exit(self, model):
        if self.is_main:
            dist.barrier()
        for p in model.parameters():  # rank 0's freshly pretrained model still holds the warm-up's gradients
            p.grad = None
        return model.to(self.device)

    def wrap(self, trainer):
        """The engine over the trained model with the trainer's AdamW; re-seeds the rollout generator per rank."""
        module = _StepModule(trainer.model)
        if self.stage == 3:
            zp = self.ds.zero
            for p in self._external_params(trainer.model):
                zp.register_external_parameter(module, p)
        self.engine, *_ = self.ds.initialize(model=module, optimizer=trainer.opt, config=self.ds_config)
        trainer.opt = self.engine.optimizer
        trainer.gen.manual_seed(self.cfg.seed + self.rank)
        if self.stage == 3 and trainer.ref is not None:  # the frozen copy partitioned too: 1/N of it per rank
            self.ref_engine, *_ = self.ds.initialize(model=_StepModule(trainer.ref), config=self.ds_config)

    @contextmanager
    def reference_weights(self):
        """Context for a phase that runs the frozen reference copy: at ZeRO-3 its full weights (one gather, a
        collective: every rank enters; nested entries gather nothing more)."""
        if self.ref_engine is None or self._ref_gathered:
            yield
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        self._ref_gathered = True
        try:
            with unwrap_model_for_generation(self.ref_engine):
                yield
        finally:
            self._ref_gathered = False

    @staticmethod
    def _external_params(model):
        head = model.lm.get_output_embeddings()
        out = [head.weight, model.connector.queries]
        if getattr(head, "bias", None) is not None:
            out.append(head.bias)
        return out

    # one step -------------------------------------------------------------------------------------------------
    def shard(self, tasks, gid):
        """This rank's contiguous share of whole groups (group ids renumbered from 0)."""
        n = len(tasks) // self.world
        sl = slice(self.rank * n, (self.rank + 1) * n)
        g = gid[sl]
        return tasks[sl], g - g.min()

    def full_weights(self):
        """Context for rollout / evaluation: the full weights on every rank (one gather under ZeRO-3)."""
        if self.stage != 3:
            return nullcontext()
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        return unwrap_model_for_generation(self.engine)

    def token_norm(self, n_tok: int) -> float:
        t = torch.tensor(float(n_tok), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def forward(self, fn, *args):
        return self.engine(fn, *args)

    def backward(self, loss, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else float("nan")

    def reduce_record(self, rec: dict) -> dict:
        """One record for the whole step: counts and rates (samples, tokens, images, FLOPs) summed over ranks, peak
        memory the max, everything else (losses, rewards, times, MFU) the mean; step and grad_norm are global."""
        keys = sorted(k for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                      and k not in ("step", "grad_norm"))
        mem = [k for k in keys if "mem" in k]
        summed = [k for k in keys if k not in mem and _extensive(k)]
        mean = [k for k in keys if k not in mem and k not in summed]
        out = dict(rec)
        for group, op, div in ((mean, dist.ReduceOp.SUM, self.world), (summed, dist.ReduceOp.SUM, 1),
                               (mem, dist.ReduceOp.MAX, 1)):
            if not group:
                continue
            t = torch.tensor([float(rec[k]) for k in group], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=op)
            out.update(zip(group, (t / div).tolist()))
        return out

    def evaluate(self, run_eval):
        """Rank 0 evaluates with the full weights; the numbers (not the sample-sheet images) reach every rank. An edit
        evaluation whose cycle-back is the reference gathers that too, on every rank (the gather is collective)."""
        cycle_ref = self.cfg.cycle_back == "reference" and get_scenario(self.cfg.scenario).edit
        with self.full_weights(), self.reference_weights() if cycle_ref else nullcontext():
            res = [run_eval() if self.is_main else None]
            dist.barrier()
        if self.is_main:
            samples = res[0].pop("_samples")
        dist.broadcast_object_list(res, src=0)
        res = res[0]
        res["_samples"] = samples if self.is_main else None
        return res

    def barrier(self):
        dist.barrier()

    def param_checksums(self, model) -> list[float]:
        """Every rank's checksum of the full trained weights (for the end-of-run consistency check)."""
        with self.full_weights():
            s = sum(p.detach().double().sum().item() + p.detach().double().abs().sum().item()
                    for p in model.parameters() if p.requires_grad)
        out = [None] * self.world
        dist.all_gather_object(out, s)
        return out

    # checkpoints ----------------------------------------------------------------------------------------------
    def save(self, trainer, state: dict, extra: dict, model_state) -> Path:
        """extra: name -> object the main rank saves beside the model (e.g. the EMA weights); model_state(): what the
        checkpoint holds of the model (train.state.trained_state), read on the main rank under the full weights."""
        root = Path(trainer.run_dir) / "checkpoints"
        final, tmp = root / f"step-{trainer.step:07d}", root / f"step-{trainer.step:07d}.tmp"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir()
        dist.barrier()
        lora = bool(trainer.lora)  # LoRA: only the trained weights (adapters, connector), in ds/ and model alike
        self.engine.save_checkpoint(str(tmp), tag="ds", save_latest=False, exclude_frozen_parameters=lora)
        write_entry(tmp, f"state-rank{self.rank}", {**state, "world_size": self.world})
        with self.full_weights():
            model_sd = {k: v.detach().cpu().clone() for k, v in model_state().items()} if self.is_main else None
        if self.is_main:
            for name, obj in {"model": model_sd, "state": state, **extra}.items():
                write_entry(tmp, name, obj)
        dist.barrier()
        if self.is_main:
            fsync_tree(tmp)
            publish_checkpoint(tmp, final, keep=trainer.cfg.keep_checkpoints)
        dist.barrier()
        return final

    def resume(self, trainer, path) -> dict:
        """The engine (weights, optimizer) from checkpoint `path`; returns this rank's state entry (train.state reads
        the rest: the EMA)."""
        path = Path(path)
        name = f"state-rank{self.rank}"
        if not (path / "ds").is_dir() or not any((path / f"{name}{e}").is_file() for e in (".json", ".pt")):
            raise ValueError(f"checkpoint {path} was not written by a {self.world}-rank DeepSpeed run (no ds/ or "
                             f"{name}); resume it the way it was written")
        st = read_entry(path, name)
        if st["world_size"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {st['world_size']} ranks; this run has {self.world}")
        with weights_only_loads(deepspeed_safe_globals()):  # DeepSpeed's readers pass weights_only=False
            load_path, _ = self.engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True,
                                                       load_lr_scheduler_states=False,
                                                       load_module_strict=not trainer.lora)  # LoRA: trained only
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the engine state from {path / 'ds'}")
        return st


def _extensive(key: str) -> bool:
    """Step-record keys that add up over ranks (this rank's counts and rates)."""
    return key in ("samples_per_s", "tokens_generated", "tokens_trained", "gen_tokens_per_s", "trained_tokens_per_s",
                   "images", "images_per_s", "flops", "tflops_per_s") or key.startswith("flops/")
