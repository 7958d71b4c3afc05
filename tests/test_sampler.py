"""The rollout scheduler (train.sampler, rollout.schedule, ImageEngine.sample): window schedules, shared-prefix
branching (counted DiT rows, bit-identical prefixes), DPM-Solver++(2M) on an analytic flow (error slope ~2 against
Euler's ~1, SDE steps unchanged), the compressed ODE tail, and the checks that refuse bad combinations."""
import dataclasses
import json
import math

import pytest
import torch

from unirl_fast.models import UnifiedModel
from unirl_fast.models.unified import Conditioning
from unirl_fast.profiling import ComputeCounter
from unirl_fast.rollout import ImageEngine, ImageSamplingParams, replay_logprobs
from unirl_fast.rollout.schedule import compress_tail, timestep_schedule, window_start_at
from unirl_fast.train.config import TrainConfig, train_preset
from unirl_fast.train.rundir import check_run_dir
from unirl_fast.train.sampler import train_params, window_at

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedModel.from_preset("tiny").eval()


def _groups(P, G):
    """P prompts x G samples, each prompt's rows adjacent (the trainer's layout)."""
    return [p for p in range(P) for _ in range(G)]


def _cond(model, P, G):
    texts = [f"a {c} square" for c in ("red", "blue", "green", "white", "black")[:P]]
    ids, mask = model.tokenizer([t for t in texts for _ in range(G)])
    return ids, mask


# --- window schedules -----------------------------------------------------------------------------------------------

def test_slide_is_mixgrpos_progressive_schedule_with_roll_back():
    got = [window_start_at("slide", n, start=1, last=4, every=2, stride=1) for n in range(12)]
    assert got == [1, 1, 2, 2, 3, 3, 4, 4, 1, 1, 2, 2]
    assert [window_start_at("slide", n, start=0, last=5, every=1, stride=2) for n in range(5)] == [0, 2, 4, 0, 2]
    assert [window_start_at("fixed", n, start=3, last=3) for n in range(3)] == [3, 3, 3]


def test_random_window_covers_its_range_and_depends_on_seed_and_step_only():
    a = [window_start_at("random", n, start=2, last=5, seed=7) for n in range(200)]
    assert set(a) == {2, 3, 4, 5}
    assert a == [window_start_at("random", n, start=2, last=5, seed=7) for n in range(200)]  # resumable
    assert a != [window_start_at("random", n, start=2, last=5, seed=8) for n in range(200)]


def test_trained_and_stochastic_steps_are_the_windows(model):
    cfg = dataclasses.replace(train_preset("tiny", "generate"), image_steps=6, sde_window=2, window="slide",
                              window_every=1, group_size=2, prompts_per_step=1, micro_batch=2).validate()
    ids, mask = _cond(model, 1, 2)
    for n, start in enumerate([0, 1, 2, 3, 4, 0]):
        assert window_at(cfg, n) == start
        p = train_params(cfg, n, "linspace", 1.0)
        traj = ImageEngine(model).generate(ids, mask, dataclasses.replace(p, decode=False),
                                           generator=torch.Generator().manual_seed(n))
        stoch = [i for i, k in enumerate(traj.kinds) if k != "ode"]
        window = [s for s in range(start, start + 2) if s < 5]  # cps: the step into sigma 0 is deterministic
        assert stoch == window and traj.trained_steps().tolist() == window
        assert (traj.log_probs[[i for i in range(6) if i not in window]] == 0).all()


# --- branching ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde,guidance", [("cps", 1.0), ("sde", 1.0), ("sde", 2.0)], ids=["cps", "sde", "sde-cfg"])
def test_branches_share_bit_identical_prefixes_and_save_dit_rows(model, sde, guidance):
    P, G, T, K = 2, 4, 6, 3
    ids, mask = _cond(model, P, G)
    p = ImageSamplingParams(num_steps=T, sde=sde, noise_level=0.7, window_start=K, window_size=2, branch_at=K,
                            guidance_scale=guidance, decode=False)
    gen = torch.Generator().manual_seed(0)
    counter = ComputeCounter().attach(model)
    traj = ImageEngine(model).generate(ids, mask, p, generator=gen, branches=_groups(P, G),
                                       noise=torch.randn(P, *model.latent_shape, generator=gen))
    rows = counter.totals("train").dit_forward  # DiT rows the hooks saw (a CFG call counts both halves)
    counter.detach()
    assert traj.dit_rows == K * P + (T - K) * P * G
    assert rows == (2 if guidance != 1 else 1) * traj.dit_rows
    for g in range(P):
        rows = traj.samples[:K + 1, g * G:(g + 1) * G]  # the prefix and the branch point's input
        assert torch.equal(rows, rows[:, :1].expand_as(rows))  # bitwise
        after = traj.next_samples[K, g * G:(g + 1) * G]
        assert not torch.equal(after[0], after[1])  # the branches diverge at the window
    replayed = replay_logprobs(model, traj)
    torch.testing.assert_close(replayed, traj.log_probs[traj.trained_steps()], atol=2e-5, rtol=1e-5)


def test_branching_equals_shared_noise_without_the_repeated_prefix(model):
    """Branching at the window start computes what shared initial noise does (the prefix is ODE), in fewer rows."""
    P, G, T, K = 2, 3, 5, 2
    ids, mask = _cond(model, P, G)
    base = dict(num_steps=T, sde="cps", noise_level=0.7, window_start=K, window_size=2, decode=False)
    noise = torch.randn(P, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    a = ImageEngine(model).generate(ids, mask, ImageSamplingParams(**base, branch_at=K), branches=_groups(P, G),
                                    noise=noise, generator=torch.Generator().manual_seed(4))
    b = ImageEngine(model).generate(ids, mask, ImageSamplingParams(**base), noise=noise.repeat_interleave(G, 0),
                                    generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.samples, b.samples, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-4, rtol=1e-5)
    assert (a.dit_rows, b.dit_rows) == (K * P + (T - K) * P * G, T * P * G)


def test_the_issue_count_at_g8_t10_branch3(model):
    """Rollout DiT rows per sample at G = 8, T = 10, branch at step 3 (the window [3, 5)): counted by the hooks.
    Branching alone: 80 -> 59 per group (1.36x); with the ODE tail after the window compressed to 2 of its 5 steps
    (--ode-tail 0.4, MixGRPO-Flash's ratio): 80 -> 35 (2.29x)."""
    G, T, K = 8, 10, 3
    ids, mask = _cond(model, 1, G)
    rows = {}
    for name, extra in (("today", {}), ("branch", dict(branch_at=K)), ("tail", dict(branch_at=K, ode_tail=0.4))):
        p = ImageSamplingParams(num_steps=T, sde="cps", noise_level=0.7, window_start=K if extra else 0,
                                window_size=2, decode=False, **extra)
        counter = ComputeCounter().attach(model)
        ImageEngine(model).generate(ids, mask, p, generator=torch.Generator().manual_seed(0),
                                    branches=[0] * G if extra else None)
        rows[name] = counter.totals("train").dit_forward
        counter.detach()
    assert rows == {"today": 80, "branch": 59, "tail": 35}


def test_branch_inputs_are_checked(model):
    ids, mask = _cond(model, 1, 2)
    p = ImageSamplingParams(num_steps=4, sde="cps", window_start=1, window_size=2, branch_at=1, decode=False)
    with pytest.raises(ValueError, match="needs both"):
        ImageEngine(model).generate(ids, mask, p)
    with pytest.raises(ValueError, match="each used"):
        ImageEngine(model).generate(ids, mask, p, branches=[1, 1])
    with pytest.raises(ValueError, match="noise has shape"):
        ImageEngine(model).generate(ids, mask, p, branches=[0, 0], noise=torch.randn(2, *model.latent_shape))
    with pytest.raises(ValueError, match="after the window start"):
        ImageSamplingParams(num_steps=4, sde="cps", window_start=1, window_size=2, branch_at=2)
    with pytest.raises(ValueError, match="no stochastic step"):
        ImageSamplingParams(num_steps=4, sde="ode", branch_at=0)


# --- DPM-Solver++(2M) -----------------------------------------------------------------------------------------------

class GaussianFlow(torch.nn.Module):
    """The exact flow-matching velocity of N(mu, s^2) data: x_sigma = (1 - sigma) mu + S(sigma) z along the ODE from
    x_1 = z, S = sqrt((1 - sigma)^2 s^2 + sigma^2), so v = -mu + S'/S (x - (1 - sigma) mu)."""

    def __init__(self, mu=0.3, s=0.5):
        super().__init__()
        self.mu, self.s, self.latent_shape, self.device = mu, s, (2, 3, 3), torch.device("cpu")

    def S(self, sigma):
        return math.sqrt((1 - sigma) ** 2 * self.s ** 2 + sigma ** 2)

    def velocity(self, x, sigma, cond, source_latents=None):
        sig = sigma.double().view(-1, *[1] * (x.dim() - 1))
        S2 = (1 - sig) ** 2 * self.s ** 2 + sig ** 2
        return (-self.mu + (sig - (1 - sig) * self.s ** 2) / S2 * (x.double() - (1 - sig) * self.mu)).float()

    def decode_latents(self, x):
        return x


def _ode_errors(flow, solver, shift, steps, at):
    """Max error of the ODE sample at sigma(at) (a fraction of the steps: 0.5 mid-way, 1.0 the end) over T steps."""
    z = torch.randn(4, *flow.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(torch.zeros(4, 1, 1))
    errs = []
    for T in steps:
        p = ImageSamplingParams(num_steps=T, shift=shift, sde="ode", ode_solver=solver, decode=False)
        traj = ImageEngine(flow).sample(cond, p, noise=z)
        i = int(T * at)
        x = traj.latents if i == T else traj.samples[i]
        sig = 0.0 if i == T else float(traj.sigmas[i, 0])
        exact = (1 - sig) * flow.mu + flow.S(sig) * z.double()
        errs.append((x.double() - exact).abs().max().item())
    return errs


def _slope(errs):
    return math.log2(errs[-2] / errs[-1])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpm2_is_second_order_on_an_analytic_flow(shift):
    """Mid-way (sigma = 1/2 for shift 1) the error halves per doubling for Euler and quarters for DPM-Solver++(2M).
    To sigma = 0 2M's slope approaches 2 more slowly: on a grid uniform in sigma its steps near 0 are of constant
    size in lambda = log((1 - sigma) / sigma), so their errors sum to O(log T / T^2) (diffusers' DPMSolverMultistep
    on flow sigmas shows the same), still far below Euler's."""
    flow = GaussianFlow()
    steps = (16, 32, 64)
    euler, dpm2 = _ode_errors(flow, "euler", shift, steps, 0.5), _ode_errors(flow, "dpm2", shift, steps, 0.5)
    assert 0.9 < _slope(euler) < 1.1 and 1.75 < _slope(dpm2) < 2.2, (euler, dpm2)
    steps = (64, 128, 256) if shift == 1 else (128,)  # shift 3: the end error's two parts cancel until T ~ 128
    euler, dpm2 = (_ode_errors(flow, s, shift, steps, 1.0) for s in ("euler", "dpm2"))
    assert dpm2[-1] < euler[-1] / 5, (euler, dpm2)
    if shift == 1:
        assert 0.9 < _slope(euler) < 1.1 and _slope(dpm2) > 1.6, (euler, dpm2)


def test_dpm2_leaves_the_sde_window_unchanged(model):
    """The solver acts on ODE steps only: with the window first, the window's transitions and log-probs are the
    same bits under both solvers (the same noise), the ODE steps after it are not; a window after ODE steps replays
    to its stored log-probs under dpm2 as under Euler."""
    ids, mask = _cond(model, 2, 2)
    runs = {}
    for solver in ("euler", "dpm2"):
        p = ImageSamplingParams(num_steps=6, sde="sde", noise_level=0.7, window_start=0, window_size=2,
                                ode_solver=solver, decode=False)
        runs[solver] = ImageEngine(model).generate(ids, mask, p, generator=torch.Generator().manual_seed(1))
    e, d = runs["euler"], runs["dpm2"]
    assert torch.equal(e.next_samples[:3], d.next_samples[:3]) and torch.equal(e.log_probs, d.log_probs)
    assert not torch.equal(e.latents, d.latents)  # steps 3 and 4 took the second-order correction
    p = ImageSamplingParams(num_steps=8, sde="sde", noise_level=0.7, window_start=4, window_size=2,
                            ode_solver="dpm2", decode=False)
    traj = ImageEngine(model).generate(ids, mask, p, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(replay_logprobs(model, traj), traj.log_probs[4:6], atol=2e-5, rtol=1e-5)


def test_compressed_tail_keeps_the_interval_and_respaces_it():
    sig = timestep_schedule(10, 3.0).tolist()
    out = compress_tail(sig, 5, 0.4, 3.0)
    assert out[:6] == sig[:6] and len(out) == 6 + 2 and out[-1] == 0.0  # 5 tail steps -> round(2.0) = 2
    u = [s / (3.0 - 2.0 * s) for s in out[5:]]  # unshifted: uniform
    assert u[0] - u[1] == pytest.approx(u[1] - u[2], rel=1e-5)
    assert compress_tail(sig, 5, 1.0, 3.0) == sig
    p = ImageSamplingParams(num_steps=10, shift=3.0, sde="cps", window_start=3, window_size=2, ode_tail=0.4)
    sigmas, kinds, _ = p.plan()
    assert kinds == ["ode"] * 3 + ["cps"] * 2 + ["ode"] * 2 and sigmas[:6] == sig[:6]


# --- the trainer's checks -------------------------------------------------------------------------------------------

GEN = train_preset("tiny", "generate")  # T 8, cps window of 4


@pytest.mark.parametrize("change,message", [
    (dict(window_start=5), r"SDE window \[5, 9\).*outside the training rollout's 8 steps"),
    (dict(window="slide", window_last=6), r"window starts \[0, 6\] must lie in \[0, 4\]"),
    (dict(window_last=2), "window_last 2 is for --window slide / random"),
    (dict(branch_at="3"), "branch_at 3 is after the window start 0"),
    (dict(branch_at="8"), r"branch_at must be a sampler step in \[0, 8\)"),
    (dict(sde_window=8, ode_solver="dpm2"), "ode_solver 'dpm2' changes no step.*cps"),
    (dict(window_every=0, window="slide"), "window_every must be >= 1"),
    (dict(image_algo="nft", window="slide"), "place flow_grpo's SDE window; image_algo 'nft'"),
    (dict(image_algo="awm", branch_at="window"), "has no window: give the step"),
    (dict(image_algo="nft", sde_type="cps", branch_at="7"), "cps step into sigma 0 is deterministic"),
    (dict(image_algo="nft", ode_tail=0.5), "give fewer --rollout-steps"),
    (dict(ode_tail=0.0), r"ode_tail must be in \(0, 1\]"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_bad_combinations_are_refused_in_one_line(change, message):
    with pytest.raises(ValueError, match=message) as e:
        dataclasses.replace(GEN, **change).validate()
    assert str(e.value).startswith("bad config:") and "\n" not in str(e.value)


def test_good_combinations_pass():
    for change in (dict(window="slide", window_every=5, branch_at="window", ode_solver="dpm2", ode_tail=0.5),
                   dict(window="random", window_last=3, sde_window=2, branch_at="window"),
                   dict(window_start=3, branch_at="2", sde_window=2, ode_solver="dpm2"),
                   dict(image_algo="nft", branch_at="2", ode_solver="dpm2", ode_tail=0.6),
                   dict(image_algo="awm", rollout_steps=4, branch_at="1")):
        dataclasses.replace(GEN, **change).validate()


def test_a_resume_that_changes_the_sampler_is_refused(tmp_path):
    run = tmp_path / "run"
    cfg = dataclasses.replace(GEN, run_dir=str(run))
    run.mkdir()
    cfg.save(run / "config.json")
    for change in (dict(window="slide"), dict(branch_at="0"), dict(ode_solver="dpm2"), dict(ode_tail=0.5)):
        with pytest.raises(ValueError, match=f"{next(iter(change))} "):
            check_run_dir(dataclasses.replace(cfg, **change))
    assert check_run_dir(dataclasses.replace(cfg, old_logp="rollout"))["changes"] == {"old_logp": ("replay",
                                                                                                    "rollout")}
    old = json.loads((run / "config.json").read_text())  # a run made before the options: read as their old values
    for key in ("window", "window_start", "branch_at", "ode_solver", "ode_tail", "old_logp"):
        old.pop(key)
    (run / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="branch_at None -> '0'"):
        check_run_dir(dataclasses.replace(cfg, branch_at="0"))
    assert "window" not in check_run_dir(cfg)["changes"]


def test_config_file_takes_an_int_branch_point(tmp_path):
    from unirl_fast.train.config import read_config_file

    f = tmp_path / "run.yaml"
    f.write_text("branch_at: 3\nwindow_start: 3\nscenario: generate\n")
    got = read_config_file(f)
    assert got["branch_at"] == "3"
    dataclasses.replace(TrainConfig(), **{**got, "sde_window": 2}).validate()
