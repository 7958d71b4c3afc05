"""One-step-off training (train.offpolicy, --off-policy 1): the next step's rollout on a thread beside the losses,
staleness per sample, the behaviour correction in the losses, exact resume, refusals, per-thread check pauses."""
import dataclasses
import threading

import pytest
import reward_fns
import torch

import unirl_fast._checks as C
from unirl_fast.cli import main
from unirl_fast.rewards import RewardError
from unirl_fast.train import PRESETS, Trainer

SMOKE = PRESETS["smoke"]
pytestmark = pytest.mark.usefixtures("slow_reward")
TIMING = ("_ms", "per_s", "mfu", "tflops", "mem", "nvml")


def _cfg(tmp_path, name="run", **over):
    return dataclasses.replace(SMOKE, run_dir=str(tmp_path / name), off_policy=1, **{"scenario": "generate", **over})


def _numbers(rec):
    return {k: v for k, v in rec.items() if not any(t in k for t in TIMING)}


@pytest.mark.parametrize("over, needle", [
    (dict(zero_stage=2), "DeepSpeed"),
    (dict(fp8=True, preset="tiny-fp8"), "--fp8"),
    (dict(scenario="reason-generate", grad_ckpt_lm=True), "--grad-ckpt-lm"),
    (dict(scenario="edit", lora_dit="default", cycle_back="reference"), "LoRA with cycle_back 'reference'"),
], ids=["deepspeed", "fp8", "grad-ckpt-lm", "lora-cycle-reference"])
def test_what_it_cannot_run_with_is_refused_in_one_line_before_any_work(over, needle, tmp_path, capsys):
    from unirl_fast.train import preflight
    from unirl_fast.train.config import with_pipeline

    with pytest.raises(ValueError, match=f"--off-policy 1 cannot run with {needle}"):
        preflight(with_pipeline(_cfg(tmp_path, **over)))
    assert not (tmp_path / "run").exists()
    argv = ["train", "--config", "smoke", "--off-policy", "1", "--run-dir", str(tmp_path / "cli"), "--scenario",
            "reason-generate", "--grad-ckpt-lm"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--off-policy 1 cannot run with --grad-ckpt-lm" in err[0]
    assert not (tmp_path / "cli").exists()


def test_a_model_with_active_dropout_is_refused():
    from unirl_fast.train.offpolicy import check_model

    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    with pytest.raises(ValueError, match="dropout: 1 has p=0.1"):
        check_model(m)
    check_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0)))


def test_the_next_rollout_runs_beside_the_losses_with_the_weights_before_the_update(tmp_path):
    """Step 1 rolls out in place (staleness 0); step k's batch was rolled out on the prefetch thread during step
    k - 1, beside its losses, with the weights before its update (unchanged from the rollout's start to its end);
    staleness 1; the last step prefetches nothing."""
    import unirl_fast.train.trainer as trainer_mod

    t = Trainer(_cfg(tmp_path, steps=3), log=lambda *_: None)
    real, seen = trainer_mod.rollout, []

    def weights():
        return sum(float(p.detach().double().sum()) for p in t.model.dit.parameters())

    def spy(*a, **kw):
        w0 = weights()
        out = real(*a, **kw)
        seen.append((threading.current_thread().name, w0, weights()))
        return out

    trainer_mod.rollout, recs, before = spy, [], []
    try:
        for _ in range(3):
            before.append(weights())
            recs.append(t.train_step())
    finally:
        trainer_mod.rollout = real
    assert [r["staleness_mean"] for r in recs] == [0.0, 1.0, 1.0] and [r["staleness_max"] for r in recs] == [0, 1, 1]
    assert [name for name, _, _ in seen] == ["MainThread", "rollout-prefetch", "rollout-prefetch"]
    # step 1's own batch and step 2's (prefetched during step 1) from step 1's weights, step 3's from step 2's
    assert [(w0, w1) for _, w0, w1 in seen] == [(w, w) for w in (before[0], before[0], before[1])]
    assert len(set(before)) == 3 and t.prefetched is None and recs[-1]["prefetch_rollout_ms"] == 0.0
    assert all(r["image_is_weight_mean"] > 0 for r in recs) and recs[0]["image_is_capped_frac"] == 0.0


def _grads(model, fn, *args):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss, _ = fn(*args)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_the_text_loss_takes_the_behaviour_log_probs_through_a_per_token_truncated_weight(tmp_path):
    """Behaviour log-probs equal to the current weights': the gradient is the on-policy loss's. Lower by log 3 on
    every token: the weight is min(3, tis_cap) and the gradient scales by exactly that."""
    from unirl_fast.train import offpolicy, rl

    t = Trainer(_cfg(tmp_path, scenario="understand", steps=1, beta=0.0), log=lambda *_: None)
    b = t._batch(None).result()
    m, c, B = t.model, t.cfg, len(b.tasks)
    idx, adv = torch.arange(B), torch.linspace(-1, 1, B)
    with torch.no_grad():
        ids, mask, pos = rl._sequences(b, idx)
        h = rl._last_hidden(m.lm, b, idx, ids, mask, pos)[:, b.text.prompt_ids.shape[1] - 1:-1]
        cur, _ = rl.fused_linear_logprobs(h, m.lm.get_output_embeddings().weight, b.text.completion_ids,
                                          temperature=c.temperature)
    cur = torch.where(b.text.completion_mask, cur, 0.0)
    b.text.logprobs = cur
    on = _grads(m, rl.text_loss, m, c, b, idx, adv, 0)
    same = _grads(m, offpolicy.text_loss, m, c, b, idx, adv, 0)
    for g0, g1 in zip(on, same):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)
    b.text.logprobs = cur - torch.log(torch.tensor(3.0)) * b.text.completion_mask
    for cap in (c.tis_cap, 10.0):
        scaled = _grads(m, offpolicy.text_loss, m, dataclasses.replace(c, tis_cap=cap), b, idx, adv, 0)
        for g1, g2 in zip(same, scaled):
            torch.testing.assert_close(g2, min(3.0, cap) * g1, rtol=1e-4, atol=1e-7)


def test_the_image_loss_takes_one_truncated_weight_per_trajectory(tmp_path):
    """Flow-GRPO: the rollout's window log-probs lower by log 3 in total (spread over the window's steps, sample 0
    only): that sample's weight is min(3, cap), the others' 1; the gradient of the loss on sample 0 scales by it."""
    from unirl_fast.train import offpolicy, rl

    t = Trainer(_cfg(tmp_path, steps=1, beta_velocity=0.0), log=lambda *_: None)
    b = t._batch(None).result()
    m, c = t.model, t.cfg
    steps = b.traj.trained_steps()
    one, adv = torch.tensor([0]), torch.tensor([0.7])
    same = _grads(m, offpolicy.image_loss, m, c, b, one, adv)
    on = _grads(m, rl.image_loss, m, c, b, one, adv)
    for g0, g1 in zip(on, same):  # the replay reproduces the rollout's log-probs: weight 1, the on-policy gradient
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-8)
    lp = b.traj.log_probs.clone()
    b.traj.log_probs[steps, 0] -= torch.log(torch.tensor(3.0)) / len(steps)
    for cap in (c.tis_cap, 10.0):
        scaled = _grads(m, offpolicy.image_loss, m, dataclasses.replace(c, tis_cap=cap), b, one, adv)
        for g1, g2 in zip(same, scaled):
            torch.testing.assert_close(g2, min(3.0, cap) * g1, rtol=1e-4, atol=1e-8)
    b.traj.log_probs = lp
    _, mets = offpolicy.image_loss(m, c, b, torch.arange(len(b.tasks)), torch.ones(len(b.tasks)))
    assert float(mets["is_weight_mean"]) == pytest.approx(1.0, abs=1e-5) and float(mets["is_capped_frac"]) == 0.0


@pytest.mark.parametrize("scenario, over", [("reason-generate", {}), ("generate", dict(image_algo="nft"))],
                         ids=["reason-generate", "nft"])
def test_resume_continues_exactly_with_the_prefetched_batch(scenario, over, tmp_path):
    """A run stopped after step 2 of 3 (its checkpoint holds step 3's batch, rolled out and scored during step 2)
    and resumed gives step 3 bitwise as the uninterrupted run, weights included."""
    cfg = _cfg(tmp_path, "a", scenario=scenario, steps=3, save_every=1, reward=("reward_fns:slow_varied",), **over)
    a = Trainer(cfg, log=lambda *_: None)
    recs = [_numbers(a.train_step()) for _ in range(3)]
    b = Trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "b")), log=lambda *_: None)
    for _ in range(2):
        b.train_step()
        b.save()
    assert b.prefetched is not None
    del b
    r = Trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "b")), log=lambda *_: None)
    assert r.step == 2 and r.prefetched is not None
    assert _numbers(r.train_step()) == recs[2]
    for (k, x), y in zip(a.model.state_dict().items(), r.model.state_dict().values()):
        assert torch.equal(x, y), k


def test_a_reward_failing_on_the_prefetched_batch_stops_the_step_before_its_update(tmp_path):
    """The next step's batch is scored on the scorer thread while this step trains; its reward raising (here while
    the first loss micro-batch waits for it) stops this step at its next micro-batch: no optimizer step, the error is
    the reward's, and the run stays stopped."""
    t = Trainer(_cfg(tmp_path, steps=3, micro_batch=2, reward=("reward_fns:slow_varied",)), log=lambda *_: None)
    t.train_step()  # step 1; step 2's batch rolled out and scored beside it
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    calls, real_fwd, fwd_calls = len(reward_fns.SLOW["threads"]), t._fwd, []

    def gate(n):
        if n > calls:  # step 3's batch, prefetched during step 2
            raise RuntimeError("judge down")

    def fwd(*a):
        fwd_calls.append(1)
        for _ in range(3000):  # at most 30 s
            if len(fwd_calls) > 1 or t.stop.error is not None:
                break
            threading.Event().wait(0.01)
        return real_fwd(*a)

    reward_fns.SLOW["gate"], t._fwd = gate, fwd
    with pytest.raises(RewardError, match="judge down"):
        t.train_step()
    assert len(fwd_calls) == 1  # the second micro-batch never ran
    assert t.step == 1 and all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    with pytest.raises(RewardError):
        t.train_step()


def test_value_check_pauses_are_per_thread():
    """A decode loop on one thread pauses its own checks ("off" there), never another thread's."""
    seen, inside = {}, threading.Event()
    release = threading.Event()

    def loop():
        with C.paused_in_loop():
            seen["loop"] = C.get_checks()
            inside.set()
            release.wait(30)

    th = threading.Thread(target=loop)
    th.start()
    inside.wait(30)
    seen["main"] = C.get_checks()
    release.set()
    th.join()
    assert seen == {"loop": "off", "main": "cheap"} and C.get_checks() == "cheap"


def test_the_compute_counter_counts_from_two_threads_exactly():
    from unirl_fast.profiling.counters import ComputeCounter

    c = ComputeCounter()
    ths = [threading.Thread(target=lambda: [c._add("train", "policy", "dit_forward", 1) for _ in range(20000)])
           for _ in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert c.totals("train").dit_forward == 80000
