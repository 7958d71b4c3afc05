"""Value checks: one switch (set_checks / UNIRL_FAST_VALUE_CHECKS), O(output) and sync-free by default.

- NaN in logits / hidden / head, +inf logits and out-of-range target ids, through both impls: "cheap" (the
  default) and "full" raise naming the argument; "off" never reads an out-of-range id (its log-prob is NaN).
- The deferred path (what CUDA tensors take: the flag travels to the host without a sync and raises at the next
  checked op or at check_pending()) is exercised on CPU tensors by forcing it.
- The default path makes no [N, V]- or [V, H]-sized temporary (tests/memprobe.py counts op allocations).
- On a GPU: no host sync in a sampler step, an FP8 forward or the checked ops (torch.cuda.set_sync_debug_mode).
"""
import pytest
import torch
from memprobe import AllocProbe

import unirl_fast as U
from unirl_fast import _checks as C

N_B, N_L, V, H = 2, 5, 300, 16
IMPLS = ["reference", "triton"]


@pytest.fixture(autouse=True)
def _default_mode():
    prev = C.set_checks(None)
    yield
    C.set_checks(prev)
    C._pending.clear()


def test_modes_env_and_switch(monkeypatch):
    monkeypatch.delenv("UNIRL_FAST_VALUE_CHECKS", raising=False)
    assert U.get_checks() == "cheap"
    for env, mode in (("0", "off"), ("1", "cheap"), ("full", "full"), ("OFF", "off")):
        monkeypatch.setenv("UNIRL_FAST_VALUE_CHECKS", env)
        assert U.get_checks() == mode
    monkeypatch.setenv("UNIRL_FAST_VALUE_CHECKS", "maybe")
    with pytest.raises(ValueError, match="'maybe'"):
        U.get_checks()
    assert U.set_checks("full") is None and U.get_checks() == "full"  # the switch wins over the environment
    with U.checks("off"):
        assert U.get_checks() == "off"
    assert U.get_checks() == "full"
    with pytest.raises(ValueError, match="mode='fast'"):
        U.set_checks("fast")


def _logits_case(kind):
    z = torch.randn(N_B, N_L, V)
    y = torch.randint(0, V, (N_B, N_L))
    if kind == "nan":
        z[1, 2, 7] = float("nan")
    elif kind == "pinf":
        z[0, 3, 0] = float("inf")
    elif kind == "id_too_big":
        y[1, 1] = V + 10 ** 9  # far past the row: a read would fault or return garbage, not NaN
    elif kind == "id_negative":
        y[0, 4] = -7
    return z, y


def _head_case(kind):
    h, w, y = torch.randn(N_B, N_L, H), torch.randn(V, H), torch.randint(0, V, (N_B, N_L))
    if kind == "nan_hidden":
        h[1, 3, 2] = float("nan")
    elif kind == "inf_hidden":
        h[0, 0, 5] = float("inf")
    elif kind == "nan_weight":
        w[17, 4] = float("nan")
    elif kind == "id_too_big":
        y[0, 2] = V + 10 ** 9
    elif kind == "id_negative":
        y[1, 0] = -7
    return h, w, y


def _fused_loss(h, w, y, impl):
    old = torch.randn(N_B, N_L) - 3
    return U.fused_linear_policy_loss(h, w, y, old, torch.randn(N_B), torch.ones(N_B, N_L, dtype=torch.bool),
                                      impl=impl)


LOGIT_BAD = {"nan": "logits", "pinf": "logits", "id_too_big": f"id {V + 10 ** 9}", "id_negative": "id -7"}
HEAD_BAD = {"nan_hidden": "hidden", "inf_hidden": "hidden", "nan_weight": "weight", "id_too_big": "targets",
            "id_negative": "targets"}


@pytest.mark.parametrize("mode", ["cheap", "full"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(LOGIT_BAD))
def test_bad_logits_or_ids_raise_naming_the_argument(kind, impl, mode):
    z, y = _logits_case(kind)
    with U.checks(mode), pytest.raises(ValueError, match=LOGIT_BAD[kind]):
        U.logprobs_from_logits(z, y, return_entropy=True, impl=impl)


@pytest.mark.parametrize("mode", ["cheap", "full"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["fused_linear_logprobs", "fused_linear_policy_loss"])
@pytest.mark.parametrize("kind", list(HEAD_BAD))
def test_bad_head_inputs_raise_naming_the_argument(kind, op, impl, mode):
    h, w, y = _head_case(kind)
    with U.checks(mode), pytest.raises(ValueError, match=HEAD_BAD[kind]):
        if op == "fused_linear_logprobs":
            U.fused_linear_logprobs(h, w, y, impl=impl)
        else:
            _fused_loss(h, w, y, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["id_too_big", "id_negative"])
def test_checks_off_never_read_a_bad_id(kind, impl):
    """With checks off an out-of-range id gives NaN (never a read outside the row, never a silent number); every
    other token is exact, and the fused loss is NaN rather than a wrong finite value."""
    z, y = _logits_case(kind)
    bad = (y < 0) | (y >= V)
    with U.checks("off"):
        logp, ent = U.logprobs_from_logits(z, y, return_entropy=True, impl=impl)
        h, w, yh = _head_case(kind)
        lp_head, _ = U.fused_linear_logprobs(h, w, yh, impl=impl)
        loss, _ = _fused_loss(h, w, yh, impl)
    want, want_ent = U.logprobs_from_logits(z, torch.where(bad, -100, y), return_entropy=True, impl="reference")
    assert torch.isnan(logp[bad]).all() and torch.isnan(ent[bad]).all()
    torch.testing.assert_close(logp[~bad], want[~bad], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[~bad], want_ent[~bad], atol=1e-4, rtol=1e-5)
    hbad = (yh < 0) | (yh >= V)
    assert torch.isnan(lp_head[hbad]).all() and torch.isfinite(lp_head[~hbad]).all()
    assert torch.isnan(loss)


def test_good_inputs_pass_every_mode():
    z, y = _logits_case("good")
    y[0, 0] = -100
    z[1, 1, :] = float("-inf")  # a masked-out padding row with an ignored target is fine
    y[1, 1] = -100
    z[0, 1, ::2] = float("-inf")  # masked vocabulary entries
    y[0, 1] = 1
    outs = []
    for mode in ("off", "cheap", "full"):
        with U.checks(mode):
            outs.append(U.logprobs_from_logits(z, y, return_entropy=True)[0])
    assert all(torch.equal(outs[0], o) for o in outs)


@pytest.mark.parametrize("impl", IMPLS)
def test_deferred_flags_raise_at_check_pending_or_next_op(impl, monkeypatch):
    """The CUDA path, forced on CPU: a bad input does not raise inside its op; check_pending() (or the next checked
    op, once the flag has reached the host) raises the first failure, naming the op's argument."""
    monkeypatch.setattr(C, "_defer_on_cpu", True)
    z, y = _logits_case("nan")
    logp, _ = U.logprobs_from_logits(z, y, impl=impl)  # no raise here
    assert torch.isnan(logp).any() and len(C._pending) >= 1
    with pytest.raises(ValueError, match="logits"):
        U.check_pending()
    assert not C._pending
    U.check_pending()  # nothing left
    h, w, yh = _head_case("id_too_big")
    good_z, good_y = _logits_case("good")
    with pytest.raises(ValueError, match="targets"):  # the next check polls the flags that reached the host
        U.fused_linear_logprobs(h, w, yh, impl=impl)  # (here: its own output check, the targets flag is done)
        U.logprobs_from_logits(good_z, good_y, impl=impl)
    U.logprobs_from_logits(good_z, good_y, impl=impl)
    U.check_pending()


def test_deferred_policy_inputs_masks_rewards_sigmas(monkeypatch):
    monkeypatch.setattr(C, "_defer_on_cpu", True)
    lp = torch.randn(2, 4)
    cases = [
        (lambda: U.policy_loss(lp, lp, torch.tensor([0.0, float("nan")]), torch.ones(2, 4)), "advantages"),
        (lambda: U.policy_loss(lp, lp, torch.randn(2), torch.full((2, 4), 0.5)), "mask"),
        (lambda: U.policy_loss(lp, torch.full((2, 4), float("inf")), torch.randn(2), torch.ones(2, 4)), "old_logp"),
        (lambda: U.group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0])), "rewards"),
        (lambda: U.flow_sde_step(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([0.8, 1.5]),
                                 torch.tensor([0.6, 0.6])), "sigma must be in"),
        (lambda: U.flow_step_logprob(torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                                     torch.full((2, 3, 4), float("nan")), 0.8, 0.6), "next_sample"),
    ]
    for fn, needle in cases:
        with pytest.raises(ValueError, match=needle):  # from the op's own later checks or from check_pending
            fn()
            U.check_pending()
        assert not C._pending


def test_default_path_makes_no_input_sized_temporary():
    """Cheap checks allocate only O(N) tensors: the [N, V] / [V, H] allocations are the op's own (the same count as
    with checks off), while "full" adds its scans; the Triton path allocates no [N, V] tensor at all."""
    n = N_B * N_L
    z, y = torch.randn(N_B, N_L, V), torch.randint(0, V, (N_B, N_L))
    h, w, yh = _head_case("good")

    def count(mode, fn, numel):
        with U.checks(mode), AllocProbe() as p:
            fn()
        return p.count_at_least(numel)
    for impl in IMPLS:
        logits_op = lambda impl=impl: U.logprobs_from_logits(z, y, return_entropy=True, impl=impl)  # noqa: E731
        head_op = lambda impl=impl: U.fused_linear_logprobs(h, w, yh, impl=impl)  # noqa: E731
        assert count("cheap", logits_op, n * V) == count("off", logits_op, n * V) < count("full", logits_op, n * V)
        assert count("cheap", head_op, V * H) == count("off", head_op, V * H) < count("full", head_op, V * H)
    assert count("cheap", lambda: U.logprobs_from_logits(z, y, return_entropy=True, impl="triton"), n * V) == 0


def test_flow_ops_take_an_empty_batch():
    for impl in IMPLS:
        x = torch.randn(0, 3, 4)
        nxt, logp, mean, std = U.flow_sde_step(x, x, 0.8, 0.6, impl=impl)
        assert nxt.shape == (0, 3, 4) and logp.shape == (0,) and mean.shape == (0, 3, 4) and std.shape == (0,)
        assert U.flow_sde_step(x, x, 0.8, 0.6, sde="ode", impl=impl)[1] is None
        v = torch.randn(2, 0, 3, 4, requires_grad=True)
        lp = U.flow_step_logprob(v, v.detach(), v.detach(), torch.full((2, 0), 0.8), torch.full((2, 0), 0.6),
                                 impl=impl)
        assert lp.shape == (2, 0)
        loss, m = U.flow_policy_loss(lp, lp.detach(), torch.randn(0), velocity=v, ref_velocity=v.detach(),
                                     beta_velocity=0.1, impl=impl)
        assert loss.item() == 0.0 and set(m) >= {"pg_loss", "velocity_mse"} and all(x.item() == 0 for x in m.values())
        loss.backward()


def _no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_no_host_sync_in_sampler_step_fp8_forward_and_checked_ops():
    from unirl_fast.fp8 import FP8Linear, fp8_weight_cache
    from unirl_fast.rollout.image import timestep_schedule

    dev = torch.device("cuda")
    x = torch.randn(4, 16, 32, 32, device=dev, dtype=torch.bfloat16)
    sig = timestep_schedule(10, 3.0, dev)  # built once per trajectory, on the device
    s, s_next = sig[3].expand(4), sig[4].expand(4)
    _no_sync(lambda: U.flow_sde_step(x, x, s, s_next, noise_level=0.7, sde="cps", sigma_max=sig[1]))
    _no_sync(lambda: U.flow_sde_step(x, x, 0.8, 0.6))  # float sigmas: a device fill, no copy
    layer = FP8Linear(256, 256, device=dev, dtype=torch.bfloat16)
    a = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
    with torch.no_grad(), fp8_weight_cache(layer):
        layer(a)
        _no_sync(lambda: layer(a))  # a decode step's FP8 layer: cached weight, deferred scale check
    z, y = torch.randn(8, 1000, device=dev), torch.randint(0, 1000, (8,), device=dev)
    _no_sync(lambda: U.logprobs_from_logits(z, y, return_entropy=True))
    U.check_pending()
    z[3, 5] = float("nan")
    U.logprobs_from_logits(z, y)
    with pytest.raises(ValueError, match="logits"):
        U.check_pending()
