"""Forward-process image RL in the trainer (`--image-algo nft | awm`, unirl_fast.train.forward_rl): settings and their
errors, the timestep draws, the old policy's average, the expert passes a step costs (counted by hooks), a step of
every image scenario, and an exact resume with the old policy."""
import dataclasses
import json

import pytest
import torch

from unirl_fast.cli import main
from unirl_fast.profiling.counters import ComputeCounter
from unirl_fast.train import Trainer
from unirl_fast.train import forward_rl as F
from unirl_fast.train.config import ALGO_DEFAULTS, PRESETS, train_preset

SMOKE = PRESETS["smoke"]


def _cfg(tmp_path, **kw):
    algo = kw.pop("image_algo", "nft")
    base = train_preset("smoke", kw.pop("scenario", "generate"), algo)
    return dataclasses.replace(base, run_dir=str(tmp_path / kw.pop("name", "run")), **kw)


def test_each_algorithm_brings_its_published_settings_and_flags_override(tmp_path, capsys):
    nft, awm = train_preset("tiny", "generate", "nft"), train_preset("tiny", "generate", "awm")
    assert (nft.image_algo, nft.adv_std, nft.beta_velocity, nft.old_decay_max, nft.fp_timestep_sampling) == \
        ("nft", "global", 1e-4, 0.5, "uniform")
    assert (awm.image_algo, awm.beta_velocity, awm.beta_old, awm.old_decay_max, awm.fp_timestep_sampling) == \
        ("awm", 1e-3, 1.0, 0.3, "stratified")
    assert train_preset("tiny", "generate").image_algo == "flow_grpo"
    assert main(["train", "--scenario", "generate", "--image-algo", "awm", "--beta-old", "0.5", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["image_algo"], out["beta_old"], out["fp_timestep_sampling"]) == ("awm", 0.5, "stratified")
    assert set(ALGO_DEFAULTS) == {"nft", "awm"}


@pytest.mark.parametrize("argv, match", [
    (["--scenario", "understand", "--image-algo", "nft"], "image_algo 'nft' trains the DiT and scenario 'understand'"),
    (["--scenario", "refine-prompt", "--image-algo", "awm"], "scenario 'refine-prompt' does not"),
    (["--scenario", "generate", "--image-algo", "nft", "--fp-timestep-fraction", "0.1"], "no trainable timestep"),
    (["--scenario", "generate", "--image-algo", "awm", "--image-steps", "2"], "no trainable timestep"),
    (["--scenario", "generate", "--image-algo", "nft", "--fp-timesteps", "9"], "fp_timesteps 9 must be in [1, 2]"),
    (["--scenario", "generate", "--image-algo", "nft", "--nft-beta", "0"], "nft_beta must be > 0"),
    (["--scenario", "generate", "--image-algo", "nft", "--old-decay-max", "1"], "old_decay_max must be in [0, 1)"),
    (["--scenario", "generate", "--image-algo", "nft", "--zero-stage", "2"], "under DeepSpeed"),
])
def test_settings_a_run_cannot_use_fail_in_one_line_before_any_work(tmp_path, capsys, argv, match):
    run = tmp_path / "run"
    assert main(["train", "--config", "smoke", "--run-dir", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not run.exists()


def test_an_unknown_algorithm_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--image-algo", "dpo"])
    assert e.value.code == 2 and "invalid choice: 'dpo'" in capsys.readouterr().err


def test_timestep_draws_uniform_and_stratified():
    g = torch.Generator().manual_seed(0)
    cfg = dataclasses.replace(SMOKE, image_steps=10, fp_timestep_fraction=0.9)
    idx = F.draw_timesteps(cfg, 64, g, "cpu")  # NFT: every one of the first 9 indices, in a random order
    assert idx.shape == (9, 64)
    assert all(sorted(col.tolist()) == list(range(9)) for col in idx.t())
    two = F.draw_timesteps(dataclasses.replace(cfg, fp_timesteps=2), 500, g, "cpu")
    assert two.shape == (2, 500) and (two[0] != two[1]).all() and set(two.flatten().tolist()) == set(range(9))
    st = dataclasses.replace(cfg, image_steps=14, fp_timestep_sampling="stratified", fp_timesteps=6)
    sidx = F.draw_timesteps(st, 400, g, "cpu")  # AWM discrete_wo_init: strata of [1, 12), t = 1 never drawn
    edges = torch.linspace(1, 12, 7, dtype=torch.float64).long()
    for k in range(6):
        assert set(sidx[k].tolist()) == set(range(int(edges[k]), int(edges[k + 1])))


def test_old_policy_decay_follows_min_rate_n_cap():
    m = torch.nn.Linear(3, 2)
    old = F.OldPolicy(m, rate=0.2, cap=0.5)
    w0 = m.weight.detach().clone()
    want = w0.clone()
    for d in (0.2, 0.4, 0.5, 0.5):
        with torch.no_grad():
            m.weight.add_(1.0)
        old.update()
        assert old.decay_now() == pytest.approx(d)
        want = d * want + (1 - d) * m.weight.detach()
        assert torch.allclose(old.shadow["weight"], want)
    trained = m.weight.detach().clone()
    with old.swapped_in():
        assert torch.equal(m.weight, old.shadow["weight"])
    assert torch.equal(m.weight, trained) and not torch.equal(trained, w0)


def _step_counts(cfg):
    tr = Trainer(cfg, log=lambda *a, **k: None)
    counter = ComputeCounter().attach(tr.model)
    if tr.ref is not None:
        counter.attach(tr.ref, role="reference")
    with counter:
        rec = tr.train_step()
    return tr, rec, counter.totals("train", role="policy"), counter.totals("train", role="reference")


@pytest.mark.parametrize("algo, old_max, kl", [("nft", 0.5, 1e-4), ("nft", 0.0, 0.0), ("awm", 0.3, 1e-3)])
def test_a_step_costs_the_counted_dit_passes(tmp_path, algo, old_max, kl):
    """Rollout T ODE steps x B, then K timesteps x B for the old policy (skipped when it is the current weights),
    the reference (when its KL is on) and the trained forward + backward."""
    cfg = _cfg(tmp_path, image_algo=algo, old_decay_max=old_max, beta_velocity=kl, image_steps=4)
    tr, rec, pol, ref = _step_counts(cfg)
    B, T, K = cfg.batch_size, cfg.image_steps, F.num_timesteps(cfg)
    old = 0 if old_max == 0 else K * B
    assert pol.dit_forward == T * B + old + K * B and pol.dit_backward == K * B
    assert ref.dit_forward == (K * B if kl > 0 else 0) and ref.dit_backward == 0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in rec.items() if k.startswith("image_"))
    assert ("phase/old_ms" in rec) == (old_max > 0)


@pytest.mark.parametrize("scenario", ["generate", "edit", "reason-generate", "reason-edit"])
@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_every_image_scenario_trains_a_step(tmp_path, scenario, algo):
    cfg = _cfg(tmp_path, scenario=scenario, image_algo=algo, steps=1)
    tr = Trainer(cfg, log=lambda *a, **k: None)
    dit0 = {k: p.detach().clone() for k, p in tr.model.dit.named_parameters()}
    lm0 = {k: p.detach().clone() for k, p in tr.model.lm.named_parameters()}
    rec = tr.train_step()
    assert torch.isfinite(torch.tensor(rec["image_loss"]))
    assert any(not torch.equal(p, dit0[k]) for k, p in tr.model.dit.named_parameters())
    lm_moved = any(not torch.equal(p, lm0[k]) for k, p in tr.model.lm.named_parameters())
    assert lm_moved == tr.scenario.train_lm


def test_the_first_step_with_the_old_policy_equals_the_one_without(tmp_path):
    """At step 1 the old policy is the base, i.e. the current weights: its separate forward gives the same loss as
    the detached current velocity that a zero decay cap uses (up to the batching's round-off)."""
    a = Trainer(_cfg(tmp_path, name="a", old_decay_max=0.5, beta_velocity=0.0), log=lambda *x, **k: None).train_step()
    b = Trainer(_cfg(tmp_path, name="b", old_decay_max=0.0, beta_velocity=0.0), log=lambda *x, **k: None).train_step()
    assert a["image_loss"] == pytest.approx(b["image_loss"], rel=1e-5)


def test_resume_is_exact_with_the_old_policy_and_never_switches_algorithm(tmp_path, capsys):
    args = ["train", "--config", "smoke", "--scenario", "generate", "--image-algo", "nft", "--save-every", "1"]
    assert main([*args, "--run-dir", str(tmp_path / "full"), "--steps", "3"]) == 0
    assert main([*args, "--run-dir", str(tmp_path / "cut"), "--steps", "2"]) == 0
    assert main([*args, "--run-dir", str(tmp_path / "cut"), "--steps", "3"]) == 0

    def train_recs(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if '"train"' in x]
    keep = ("reward", "image_loss", "grad_norm")
    assert [{k: r[k] for k in keep} for r in train_recs("full")] == [{k: r[k] for k in keep} for r in train_recs("cut")]
    capsys.readouterr()
    assert main([*args[:-4], "--image-algo", "awm", "--save-every", "1", "--run-dir", str(tmp_path / "cut"),
                 "--steps", "4"]) == 2
    assert "image_algo" in capsys.readouterr().err
    latest = tmp_path / "cut" / "checkpoints" / (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip()
    for f in latest.glob("old_policy.*"):
        f.unlink()
    assert main([*args, "--run-dir", str(tmp_path / "cut"), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no old policy" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("algo", ["nft", "awm"])
def test_the_trainer_step_is_the_same_through_the_triton_kernel(tmp_path, algo):
    """The fused kernel (Triton interpreter on a CPU) and the eager reference give the same first step."""
    from unirl_fast.ops._dispatch import interpreting

    if not (torch.cuda.is_available() or interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    recs = [Trainer(_cfg(tmp_path, name=impl, image_algo=algo, impl=impl), log=lambda *a, **k: None).train_step()
            for impl in ("reference", "triton")]
    for k in ("image_loss", "image_policy_loss", "grad_norm"):
        assert recs[1][k] == pytest.approx(recs[0][k], rel=1e-4, abs=1e-7), k
