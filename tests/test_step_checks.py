"""Deferred value checks stop a training step before the optimizer step, on every rank.

The CUDA (deferred) path of the checks is forced on CPU (`_checks._defer_on_cpu`): a failure planted in a step's
loss only surfaces where the step reads the checks. The trainer reads them between the last backward and the
optimizer step, so a flagged NaN never reaches the weights, the optimizer state or the EMA; under data parallelism
one all-reduced flag makes every rank raise the failing rank's message (two gloo processes here).
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import unirl_fast._checks as C
from unirl_fast._checks import DeferredCheckError
from unirl_fast.profile_run import build_model
from unirl_fast.train import TrainConfig, Trainer
from unirl_fast.train import trainer as T
from unirl_fast.train.scenarios import get_scenario

PLANTED = "planted: logp has a non-finite value at index 3"


def tiny_trainer(tmp_path, **kw):
    cfg = dict(scenario="reason-generate", preset="tiny", run_dir=str(tmp_path / "run"), steps=4, prompts_per_step=2,
               group_size=2, micro_batch=2, max_new_tokens=4, image_steps=3, sde_window=2, impl="reference")
    c = TrainConfig(**{**cfg, **kw})
    model = build_model(c.preset, get_scenario(c.scenario).edit, 0, torch.device("cpu"), torch.float32)
    return Trainer(c, model=model, log=lambda *a, **k: None)


def _plant(monkeypatch, where):
    orig = getattr(T, where)

    def loss(*args, **kwargs):
        out = orig(*args, **kwargs)
        C.flag(torch.ones(1, dtype=torch.bool), lambda i: PLANTED)  # deferred: read later
        return out
    monkeypatch.setattr(T, where, loss)


@pytest.mark.parametrize("where, micro_batch, raised_by", [
    ("image_loss", 4, "step 2 skipped"),  # the step's last op: the trainer's read before the optimizer raises
    ("text_loss", 2, ""),  # a later checked op of the step raises it (the flag had reached the host)
])
def test_failed_check_skips_the_optimizer_step(tmp_path, monkeypatch, where, micro_batch, raised_by):
    t = tiny_trainer(tmp_path, ema_decay=0.9, micro_batch=micro_batch)
    t.train_step()  # a clean step first: optimizer state and EMA exist
    monkeypatch.setattr(C, "_defer_on_cpu", True)
    _plant(monkeypatch, where)
    weights = {k: v.detach().clone() for k, v in t.model.named_parameters() if v.requires_grad}
    opt_steps = [s["step"].clone() for s in t.opt.state.values()]
    ema = {k: v.clone() for k, v in t.ema.shadow.items()}
    with pytest.raises(DeferredCheckError, match=f"{raised_by}.*{PLANTED}"):
        t.train_step()
    assert t.step == 1 and not C._pending
    assert all(torch.equal(v, dict(t.model.named_parameters())[k]) for k, v in weights.items())
    assert all(torch.equal(a, s["step"]) for a, s in zip(opt_steps, t.opt.state.values()))
    assert all(torch.equal(v, t.ema.shadow[k]) for k, v in ema.items()) and t.ema.n == 1


def test_clean_step_reads_the_checks_and_updates(tmp_path, monkeypatch):
    t = tiny_trainer(tmp_path)
    monkeypatch.setattr(C, "_defer_on_cpu", True)
    before = {k: v.detach().clone() for k, v in t.model.named_parameters() if v.requires_grad}
    t.train_step()
    assert not C._pending and t.step == 1
    assert any(not torch.equal(v, dict(t.model.named_parameters())[k]) for k, v in before.items())


def _rank_main(rank, world, init, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        C._defer_on_cpu = True
        C.flag(torch.tensor([rank == 1, False]), lambda i: f"rank-local failure at {i[0]}")
        try:
            C.check_pending_all_ranks()
            results[rank] = "no error"
        except ValueError as e:
            results[rank] = str(e)
        C.flag(torch.zeros(2, dtype=torch.bool), lambda i: "never")
        C.check_pending_all_ranks()  # nothing failed anywhere: no raise on any rank
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_with_the_failing_ranks_message():
    with tempfile.TemporaryDirectory() as d:
        results = mp.Manager().dict()
        mp.spawn(_rank_main, args=(2, f"file://{os.path.join(d, 'pg')}", results), nprocs=2)
    assert results[1] == "rank-local failure at 0"
    assert results[0] == "rank 1: rank-local failure at 0"
