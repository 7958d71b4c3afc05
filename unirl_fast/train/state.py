"""A run's state in its checkpoints (train.checkpoint writes them atomically and without pickle): the trained weights
(everything, or with LoRA only the adapters, connector and queries), the optimizer, the EMA, the old policy (nft /
awm), the batch rolled out for the next step (--off-policy 1), the step, the metric history and the RNG states
(Python's task draws, the rollout generator, torch's global), so a resumed run continues exactly where the
uninterrupted one would be. eval and export read the weights (and the EMA) only; DeepSpeed checkpoints go through
train.distributed.
"""
from __future__ import annotations

import contextlib

import torch

from . import offpolicy
from .checkpoint import has_entry, load_checkpoint, read_entry, save_checkpoint
from .pipeline import Pending, Scoring, chunk_rows
from .rundir import trim_metrics


def trained_state(model, lora: dict) -> dict:
    """What a checkpoint holds of the model: everything, or with LoRA only the trained weights (adapters,
    connector and queries); the base comes from where the run builds it."""
    sd = model.state_dict()
    if not lora:
        return sd
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k in names}


def save(t):
    """Trainer `t`'s checkpoint at its current step (waits for the scores of a prefetched batch: it is saved
    scored)."""
    st = {"step": t.step, "history": t.history, "py_rng": t.rng.getstate(), "gen": t.gen.get_state(),
          "torch_rng": torch.get_rng_state()}
    extra = {"ema": t.ema.state_dict()} if t.ema is not None else {}
    if t.old is not None:
        extra["old_policy"] = t.old.state_dict()
    if t.prefetched is not None:  # --off-policy 1: the next step's batch
        extra["prefetch"] = offpolicy.batch_state(t.prefetched.result(), t.prefetched_ids)
    if t.dist is not None:
        return t.dist.save(t, st, extra, lambda: trained_state(t.model, t.lora))
    return save_checkpoint(t.run_dir, t.step, {"model": trained_state(t.model, t.lora), "optim": t.opt.state_dict(),
                                               "state": st, **extra}, keep=t.cfg.keep_checkpoints)


def resume(t, path):
    """Trainer `t` set to the checkpoint at `path` (eval / export: the weights and the EMA; their RNG states too)."""
    if t.dist is not None:
        st = t.dist.resume(t, path)
        if t.ema is not None:  # only the main rank keeps (and reads) the EMA
            _load_ema(t, read_entry(path, "ema") if has_entry(path, "ema") else None, path)
    else:
        ck = load_checkpoint(path)
        _load_weights(t, ck["model"], path)
        if "optim" not in ck:  # written under DeepSpeed: fine for evaluation, training refuses (see Trainer.train)
            t._no_optim_state = path
        elif t.opt is not None:
            t.opt.load_state_dict(ck["optim"])
        st = ck["state"]
        _load_ema(t, ck.get("ema"), path)
        _load_old_policy(t, ck.get("old_policy"), path)
        _load_prefetch(t, ck.get("prefetch"))
    t.step, t.history = st["step"], st["history"]
    if t.is_main and not t.readonly:
        dropped = trim_metrics(t.run_dir / "metrics.jsonl", t.step)
        if dropped:
            t.log(f"metrics.jsonl: {dropped} records after step {t.step} (written before the checkpoint was resumed) "
                  "removed; they are recomputed")
    t.rng.setstate(st["py_rng"])
    t.gen.set_state(st["gen"])
    torch.set_rng_state(st["torch_rng"])
    t.log(f"loaded {path} (step {t.step})" if t.readonly else f"resumed from {path} at step {t.step}")


def _load_weights(t, sd, path):
    if not t.lora:
        t.model.load_state_dict(sd)
        return
    want = set(trained_state(t.model, t.lora))  # the trained weights only: every one of them, and nothing else
    if set(sd) != want:
        raise ValueError(f"checkpoint {path} does not hold this run's LoRA weights (missing "
                         f"{sorted(want - set(sd))[:3]}, unexpected {sorted(set(sd) - want)[:3]})")
    t.model.load_state_dict(sd, strict=False)


def _load_average(avg, state, missing: str):
    """An average of the weights (the EMA, the old policy) set from its checkpoint entry; ValueError `missing` when
    the run keeps one and the checkpoint has none."""
    if avg is None:
        return
    if state is None:
        raise ValueError(missing)
    avg.load_state_dict(state)


def _load_ema(t, state, path):
    _load_average(t.ema, state, f"checkpoint {path} holds no EMA weights but ema_decay is {t.cfg.ema_decay}: it was "
                                "written without --ema-decay; resume it with --ema-decay 0")


def _load_old_policy(t, state, path):
    _load_average(t.old, state, f"checkpoint {path} holds no old policy but image_algo {t.cfg.image_algo!r} needs one: "
                                "it was written by another algorithm or version; start a new --run-dir")


def _load_prefetch(t, state):
    """--off-policy 1: the batch the checkpointed run had rolled out for its next step (none after its last)."""
    if state is None or not t.cfg.off_policy or t.readonly:
        return
    b, t.prefetched_ids = offpolicy.batch_from_state(state, t.train_tasks, t.model.device)
    t.prefetched = Pending(b, Scoring(None, False, contextlib.nullcontext, t.stop),
                           chunk_rows(b.group_ids, t.cfg.rollout_chunks))
