"""Bad input raises ValueError/TypeError naming the argument and the value; never a silent result."""
import pytest
import torch

import unirl_fast as U
from unirl_fast.ops._dispatch import _TRITON_IMPLS, choose, register_triton

B, L, V, H = 2, 5, 11, 8


def lg():
    return torch.randn(B, L, V)


def tg():
    return torch.randint(0, V, (B, L))


def pl(**kw):
    return U.policy_loss(torch.randn(B, L), torch.randn(B, L), torch.randn(B), torch.ones(B, L, dtype=torch.bool), **kw)


def flow(**kw):
    x = torch.randn(B, 3, 4)
    args = dict(velocity=torch.randn(B, 3, 4), sample=x, sigma=0.8, sigma_next=0.6)
    args.update(kw)
    return U.flow_sde_step(args.pop("velocity"), args.pop("sample"), args.pop("sigma"), args.pop("sigma_next"), **args)


nan_logits = lg()
nan_logits[0, 1, 2] = float("nan")
pinf_logits = lg()
pinf_logits[1, 0, 0] = float("inf")
nan_adv = torch.tensor([0.0, float("nan")])

CASES = [
    ("logits rank", lambda: U.logprobs_from_logits(torch.tensor(1.0), torch.tensor(1)), ValueError, "logits"),
    ("targets shape", lambda: U.logprobs_from_logits(lg(), torch.randint(0, V, (B, L + 1))), ValueError, "targets"),
    ("float targets", lambda: U.logprobs_from_logits(lg(), tg().float()), TypeError, "targets"),
    ("int logits", lambda: U.logprobs_from_logits(tg()[..., None].expand(B, L, V), tg()), TypeError, "logits"),
    ("target id >= V", lambda: U.logprobs_from_logits(lg(), torch.full((B, L), V)), ValueError, f"id {V}"),
    ("negative target", lambda: U.logprobs_from_logits(lg(), torch.full((B, L), -3)), ValueError, "-3"),
    ("NaN logits", lambda: U.logprobs_from_logits(nan_logits, tg()), ValueError, "nan"),
    ("+inf logits", lambda: U.logprobs_from_logits(pinf_logits, tg()), ValueError, "inf"),
    ("negative temperature", lambda: U.logprobs_from_logits(lg(), tg(), temperature=-1.0), ValueError, "temperature"),
    ("zero temperature", lambda: U.logprobs_from_logits(lg(), tg(), temperature=0), ValueError, "temperature"),
    ("nan temperature", lambda: U.logprobs_from_logits(lg(), tg(), temperature=float("nan")), ValueError,
     "temperature"),
    ("unknown impl", lambda: U.logprobs_from_logits(lg(), tg(), impl="cuda"), ValueError, "impl='cuda'"),
    ("head width", lambda: U.fused_linear_logprobs(torch.randn(B, L, H), torch.randn(V, H + 1), tg()), ValueError,
     "weight"),
    ("head hidden/targets", lambda: U.fused_linear_logprobs(torch.randn(B, L + 2, H), torch.randn(V, H), tg()),
     ValueError, "hidden"),
    ("bias width", lambda: U.fused_linear_logprobs(torch.randn(B, L, H), torch.randn(V, H), tg(),
                                                   bias=torch.randn(V + 1)), ValueError, "bias"),
    ("NaN hidden", lambda: U.fused_linear_logprobs(torch.full((B, L, H), float("nan")), torch.randn(V, H), tg()),
     ValueError, "hidden"),
    ("loss_type", lambda: pl(loss_type="ppo"), ValueError, "loss_type='ppo'"),
    ("is level", lambda: pl(importance_sampling="seq"), ValueError, "importance_sampling='seq'"),
    ("kl kind", lambda: pl(kl="k4"), ValueError, "kl='k4'"),
    ("beta without ref", lambda: pl(beta=0.1), ValueError, "ref_logp"),
    ("negative beta", lambda: pl(beta=-0.1, ref_logp=torch.randn(B, L)), ValueError, "beta"),
    ("dual clip <= 1", lambda: pl(dual_clip=0.5), ValueError, "dual_clip"),
    ("tis without rollout", lambda: pl(tis_cap=2.0), ValueError, "rollout_logp"),
    ("rollout without cap", lambda: pl(rollout_logp=torch.randn(B, L)), ValueError, "tis_cap"),
    ("entropy coef without entropy", lambda: pl(entropy_coef=0.1), ValueError, "entropy"),
    ("num_tokens on grpo", lambda: pl(num_tokens=10), ValueError, "num_tokens"),
    ("bad max_completion_length", lambda: pl(loss_type="dr_grpo", max_completion_length=0), ValueError,
     "max_completion_length"),
    ("advantages shape", lambda: U.policy_loss(torch.randn(B, L), torch.randn(B, L), torch.randn(B + 1),
                                               torch.ones(B, L)), ValueError, "advantages"),
    ("NaN advantages", lambda: U.policy_loss(torch.randn(B, L), torch.randn(B, L), nan_adv, torch.ones(B, L)),
     ValueError, "advantages"),
    ("mask not 0/1", lambda: U.policy_loss(torch.randn(B, L), torch.randn(B, L), torch.randn(B),
                                           torch.full((B, L), 0.5)), ValueError, "mask"),
    ("old_logp missing", lambda: U.policy_loss(torch.randn(B, L), None, torch.randn(B), torch.ones(B, L)),
     TypeError, "old_logp"),
    ("rewards NaN", lambda: U.group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0])), ValueError,
     "rewards"),
    ("group ids float", lambda: U.group_advantages(torch.ones(3), torch.zeros(3)), TypeError, "group_ids"),
    ("group ids shape", lambda: U.group_advantages(torch.ones(3), torch.zeros(4, dtype=torch.long)), ValueError,
     "group_ids"),
    ("adv mode", lambda: U.group_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long), mode="ppo"), ValueError,
     "mode='ppo'"),
    ("adv std", lambda: U.group_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long), std="batch"), ValueError,
     "std='batch'"),
    ("sde kind", lambda: flow(sde="ddim"), ValueError, "sde='ddim'"),
    ("sigma > 1", lambda: flow(sigma=1.5), ValueError, "sigma"),
    ("sigma_next >= sigma", lambda: flow(sigma_next=0.9), ValueError, "sigma_next"),
    ("sigma shape", lambda: flow(sigma=torch.full((B + 1,), 0.8)), ValueError, "sigma"),
    ("velocity shape", lambda: flow(velocity=torch.randn(B, 3, 5)), ValueError, "velocity"),
    ("noise and generator", lambda: flow(noise=torch.randn(B, 3, 4), generator=torch.Generator()), ValueError,
     "generator"),
    ("cps noise level", lambda: flow(sde="cps", noise_level=1.5), ValueError, "noise_level"),
    ("ode log-prob", lambda: U.flow_step_logprob(torch.randn(B, 3), torch.randn(B, 3), torch.randn(B, 3), 0.5, 0.4,
                                                 sde="ode"), ValueError, "ode"),
    ("flow loss clip", lambda: U.flow_policy_loss(torch.randn(B), torch.randn(B), torch.randn(B), clip_range=0),
     ValueError, "clip_range"),
    ("flow loss beta_v without v", lambda: U.flow_policy_loss(torch.randn(B), torch.randn(B), torch.randn(B),
                                                              beta_velocity=0.1), ValueError, "velocity"),
]


@pytest.mark.parametrize("fn,exc,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_named_error(fn, exc, needle):
    with pytest.raises(exc) as info:
        fn()
    assert needle.lower() in str(info.value).lower(), str(info.value)


def test_value_checks_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("UNIRL_FAST_VALUE_CHECKS", "0")
    logp, _ = U.logprobs_from_logits(nan_logits, tg())  # no check: NaN flows through, as asked
    assert torch.isnan(logp).any()


def test_explicit_triton_never_falls_back(monkeypatch):
    with pytest.raises(NotImplementedError, match="not available"):
        choose("no_such_op", "triton", torch.device("cpu"))
    monkeypatch.setitem(_TRITON_IMPLS, "fake_op", lambda *a, **k: None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        choose("fake_op", "triton", torch.device("cpu"))
    assert choose("fake_op", "auto", torch.device("cpu")) == "reference"
    assert choose("fake_op", "reference", torch.device("cpu")) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose("fake_op", "triton", torch.device("cpu")) == "triton"


def test_register_triton_is_used_by_auto_on_cuda_only():
    sentinel = object()
    register_triton("another_fake")(sentinel)
    try:
        assert choose("another_fake", "auto", torch.device("cpu")) == "reference"
        assert choose("another_fake", "auto", torch.device("cuda")) == "triton"
    finally:
        del _TRITON_IMPLS["another_fake"]
