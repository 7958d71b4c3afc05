"""The verl drop-in (unirl_fast.integrations.verl) against verl's own functions (verl 0.9.1, CPU).

Skipped when verl is not importable (the main venv does not carry it: verl pins its own dependency set; CI runs
these in a separate venv, see docs/conventions.md). verl's functions are the oracle here: the registry's policy
losses before and after `patch()` on the same inputs, its kl_penalty + agg_loss against our KL options, and its
actor loss path (`verl.workers.utils.losses.ppo_loss` fed by the engine's logprobs_from_logits /
entropy_from_logits on a tiny model) over a few optimizer steps with and without the drop-in.
"""
from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_rule

pytest.importorskip("verl")
pytest.importorskip("tensordict")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")

from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

import unirl_fast as U  # noqa: E402
import unirl_fast.integrations.verl as uf_verl  # noqa: E402

B, L = 6, 7
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.fixture
def patched():
    uf_verl.patch(impl="reference")
    yield
    uf_verl.unpatch()


def _config(loss_mode, agg, **kw):
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                      clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg,
                      policy_loss=PolicyLossConfig(loss_mode=loss_mode), **kw)
    return cfg


def _batch(seed, per_token_adv=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[1] = False  # an empty sequence
    mask[0, 0] = True
    logp = -torch.rand(B, L, generator=g) * 2
    old = logp + 0.4 * torch.randn(B, L, generator=g) + 0.5 * torch.randn(B, 1, generator=g)
    old[2, 3] = logp[2, 3] - 23.0  # beyond the +-20 token clamp
    old[3] = logp[3] - 11.0  # sequence log-ratio above the GSPO cap
    adv = torch.randn(B, generator=g)
    adv[4] = 0.0  # a flat group
    adv[3] = -0.5
    adv = adv[:, None].expand(B, L).contiguous()
    if per_token_adv:
        adv = adv + 0.1 * torch.randn(B, L, generator=g)
    return mask, logp, old, adv


def _run(fn, logp, old, adv, mask, agg, cfg, w):
    lp = logp.clone().requires_grad_()
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask.float(), loss_agg_mode=agg,
                       config=cfg, rollout_is_weights=w)
    return loss, torch.autograd.grad(loss, lp)[0], metrics


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
@pytest.mark.parametrize("weights", [None, "is"], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global"])
def test_registry_losses_match_verl(patched, loss_mode, agg, weights, global_info):
    verl_fn = {"vanilla": core_algos.compute_policy_loss_vanilla, "gspo": core_algos.compute_policy_loss_gspo}
    mask, logp, old, adv = _batch(0, per_token_adv=loss_mode == "vanilla")
    w = None
    if weights:  # verl's sequence-level rollout IS weights (what gspo accepts); vanilla gets per-token ones
        g = torch.Generator().manual_seed(5)
        w = (torch.rand(B, 1 if loss_mode == "gspo" else L, generator=g) * 2).expand(B, L) * mask
    cfg = _config(loss_mode, agg)
    if global_info:
        cfg.global_batch_info.update(dp_size=2, batch_num_tokens=int(mask.sum()) * 3, global_batch_size=3 * B,
                                     loss_scale_factor=11)
    ours = core_algos.get_policy_loss_fn(loss_mode)
    assert ours is not verl_fn[loss_mode]
    want = _run(verl_fn[loss_mode], logp, old, adv, mask, agg, cfg, w)
    got = _run(ours, logp, old, adv, mask, agg, cfg, w)
    assert_close_rule(got[0].reshape(1), want[0].reshape(1), atol=1e-6, name="loss")
    assert_close_rule(got[1], want[1], atol=1e-6, name="dlogp")
    for k, v in want[2].items():
        assert got[2][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("kl_type", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+", "abs+", "k2+"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_kl_types_match_verl(kl_type, impl):
    mask, logp, _, _ = _batch(1)
    ref = logp + 0.8 * torch.randn(B, L)
    ref[0, 0] = logp[0, 0] + 13.0  # k3 above verl's clamp of 10
    lp = logp.clone().requires_grad_()
    want = core_algos.agg_loss(core_algos.kl_penalty(lp, ref, kl_type), mask.float(), "seq-mean-token-mean")
    g_want = torch.autograd.grad(want, lp)[0]
    lp = logp.clone().requires_grad_()
    got, _ = U.policy_loss(lp, logp.detach(), torch.zeros(B), mask, ref_logp=ref, beta=1.0, loss_type="grpo",
                           empty_seqs="skip", impl=impl, **uf_verl.kl_options(kl_type))
    assert_close_rule(got.detach().reshape(1), want.detach().reshape(1), atol=1e-6, name="kl")
    assert_close_rule(torch.autograd.grad(got, lp)[0], g_want, atol=1e-6, name="dkl")


def _tiny_actor_data(seed):
    """A padded batch in verl's actor layout (prompts / responses / attention_mask) and a packed token stream."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    P, R, Vv = 3, 5, 17
    resp_len = torch.tensor([5, 3, 1, 4])
    n = len(resp_len)
    prompts = torch.randint(0, Vv, (n, P), generator=g)
    responses = torch.randint(0, Vv, (n, R), generator=g)
    rmask = (torch.arange(R)[None] < resp_len[:, None]).long()
    attn = torch.cat([torch.ones(n, P, dtype=torch.long), rmask], 1)
    packed = torch.cat([torch.cat([prompts[i], responses[i, :resp_len[i]]]) for i in range(n)])
    rolled = torch.roll(packed, -1)
    old = -2.5 + 0.3 * torch.randn(n, R, generator=g)
    adv = torch.randn(n, 1, generator=g).expand(n, R) * rmask
    ref = old + 0.2 * torch.randn(n, R, generator=g)
    data = TensorDict({"prompts": prompts, "responses": responses, "attention_mask": attn, "response_mask": rmask,
                       "old_log_probs": old, "advantages": adv, "ref_log_prob": ref}, batch_size=[n])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    return data, packed, rolled, Vv


@pytest.mark.parametrize("loss_mode, agg, kl", [("vanilla", "token-mean", "low_var_kl"),
                                                ("vanilla", "seq-mean-token-sum-norm", "k3+"),
                                                ("gspo", "seq-mean-token-mean", "abs")])
def test_actor_loss_path_steps_match_verl(loss_mode, agg, kl):
    """verl's ppo_loss fed by the engine's log-prob / entropy functions, three SGD steps of a tiny model: the same
    losses and gradients with and without the drop-in."""
    from verl.workers.utils.losses import ppo_loss

    def steps():
        torch.manual_seed(0)
        data, packed, rolled, Vv = _tiny_actor_data(3)
        emb, head = torch.nn.Embedding(Vv, 8), torch.nn.Linear(8, Vv)
        params = list(emb.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.5)
        cfg = _config(loss_mode, agg, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type=kl, entropy_coeff=0.01)
        out = []
        for _ in range(3):
            logits = head(torch.tanh(emb(packed)))
            lp = verl_F.logprobs_from_logits(logits, rolled, inplace_backward=False)
            ent = verl_F.entropy_from_logits(logits)
            loss, _ = ppo_loss(cfg, {"log_probs": lp, "entropy": ent}, data)
            opt.zero_grad()
            loss.backward()
            out.append((loss.detach().clone(), [p.grad.clone() for p in params]))
            opt.step()
        return out

    want = steps()
    uf_verl.patch(impl="reference")
    try:
        assert verl_F.logprobs_from_logits is uf_verl.logprobs_from_logits
        got = steps()
    finally:
        uf_verl.unpatch()
    assert verl_F.logprobs_from_logits is not uf_verl.logprobs_from_logits
    for (lw, gw), (lg, gg) in zip(want, got):
        assert_close_rule(lg.reshape(1), lw.reshape(1), atol=2e-6, name="loss")
        for a, b in zip(gg, gw):
            assert_close_rule(a, b, atol=2e-5, name="grad")


def test_unsupported_verl_options_raise(patched):
    mask, logp, old, adv = _batch(2)
    fn = core_algos.get_policy_loss_fn("vanilla")
    with pytest.raises(ValueError, match="loss_agg_mode='token-sum'"):
        fn(old, logp, adv, mask.float(), "token-sum", _config("vanilla", "token-mean"), None)
    gspo = core_algos.get_policy_loss_fn("gspo")
    with pytest.raises(ValueError, match="advantages"):
        gspo(old, logp, adv, mask.float(), "seq-mean-token-mean", _config("gspo", "seq-mean-token-mean"), None)
    with pytest.raises(ValueError, match="kl_loss_type='full'"):
        uf_verl.kl_options("full")


@pytest.mark.parametrize("shape", [(2, 9), (13,)], ids=["3d", "2d"])
def test_fused_head_matches_verl_and_is_what_verl_imports_after_patch(shape):
    """verl's fused head (use_fused_kernels): our linear_cross_entropy equals verl's own torch implementation
    (FusedLinearForPPOFunction), values and gradients; after patch() the names verl's models import at call time
    are ours, and unpatch() gives verl's back."""
    import importlib

    tf = importlib.import_module("verl.utils.experimental.torch_functional")
    lce = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    verl_fused = tf.FusedLinearForPPOFunction.apply
    V, H = 37, 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, H, generator=g).requires_grad_()  # fp32: both compute in fp32
    W = torch.randn(V, H, generator=g).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    outs, grads = [], []
    n = labels.numel()
    for fn in (lambda: verl_fused(h, W, labels, 0.7, 4), lambda: uf_verl.linear_cross_entropy(h, W, labels, 0.7)):
        logp, ent = (x.reshape(shape) for x in fn())
        (logp.sum() + 0.3 * ent.sum()).backward()
        outs.append((logp.detach(), ent.detach()))
        grads.append((h.grad.clone(), W.grad.clone()))
        h.grad, W.grad = None, None
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    before = (lce.linear_cross_entropy, tf.FusedLinearForPPO)
    uf_verl.patch(impl="reference")
    try:
        from verl.utils.experimental.torch_functional import FusedLinearForPPO
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

        assert linear_cross_entropy is uf_verl.linear_cross_entropy and FusedLinearForPPO is uf_verl.FusedLinearForPPO
        logp, ent = FusedLinearForPPO(impl_backend="torch")(h, W, labels, temperature=0.7)
        torch.testing.assert_close(logp, outs[0][0], rtol=1e-5, atol=1e-5)
        assert linear_cross_entropy(h, W, labels, 0.7)[0].shape == (n,)  # verl's kernel flattens
        with pytest.raises(ValueError, match="reduction='mean' is not supported"):
            linear_cross_entropy(h, W, labels, 1.0, "mean")
    finally:
        uf_verl.unpatch()
    assert (lce.linear_cross_entropy, tf.FusedLinearForPPO) == before


class _Engine:
    """The part of a verl engine `BaseEngine.train_batch` drives; the forward/backward plants a deferred failure."""

    def __init__(self, fail):
        self.fail, self.steps = fail, 0

    def optimizer_zero_grad(self):
        pass

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        import unirl_fast._checks as C

        C.flag(torch.tensor([False, self.fail]), lambda i: f"logp has a non-finite value at index {i[0]}")
        return {"metrics": {}}

    def optimizer_step(self):
        self.steps += 1
        return 0.0

    def is_mp_src_rank_with_outputs(self):
        return True


@pytest.mark.parametrize("fail", [False, True])
def test_actor_update_reads_the_checks_before_the_optimizer_step(patched, monkeypatch, fail):
    """One read per actor update (train_batch), between the backward and the optimizer step: a failure flagged by an
    op in the update raises with its message and the optimizer step does not run."""
    from tensordict import TensorDict
    from verl.workers.engine.base import BaseEngine

    import unirl_fast._checks as C

    monkeypatch.setattr(C, "_defer_on_cpu", True)
    engine = type("E", (_Engine, BaseEngine), {"is_param_offload_enabled": False,
                                                "is_optimizer_offload_enabled": False})(fail)
    data = TensorDict({}, batch_size=[])
    if fail:
        with pytest.raises(C.DeferredCheckError, match="non-finite value at index 1"):
            engine.train_batch(data, loss_function=None)
        assert engine.steps == 0
    else:
        engine.train_batch(data, loss_function=None)
        assert engine.steps == 1
    assert not C._pending and "optimizer_step" not in vars(engine)


def test_unpatch_restores_train_batch():
    from verl.workers.engine.base import BaseEngine

    orig = BaseEngine.train_batch
    uf_verl.patch(impl="reference")
    assert BaseEngine.train_batch is not orig
    uf_verl.unpatch()
    assert BaseEngine.train_batch is orig


# verl's own functions, taken before any test patches them
VERL_FNS = {"logprobs_from_logits": verl_F.logprobs_from_logits, "entropy_from_logits": verl_F.entropy_from_logits,
            "entropy_from_logits_with_chunking": verl_F.entropy_from_logits_with_chunking}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead", [(11,), (3, 5)], ids=["2d", "3d"])
def test_logits_drop_ins_return_verls_shape_and_dtype(patched, dtype, lead):
    """Each swapped function returns verl's shape and dtype for the input rank and dtype, and its values pass the
    tolerance rule against an fp64 oracle with verl's own function as the baseline."""
    g = torch.Generator().manual_seed(4)
    V = 29
    logits = (3 * torch.randn(*lead, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, lead, generator=g)
    x64 = logits.double()
    want = {"logprobs_from_logits": x64.log_softmax(-1).gather(-1, labels[..., None])[..., 0],
            "entropy_from_logits": -(x64.softmax(-1) * x64.log_softmax(-1)).sum(-1)}
    want["entropy_from_logits_with_chunking"] = want["entropy_from_logits"]
    for name, verl_fn in VERL_FNS.items():
        args = (logits, labels) if name == "logprobs_from_logits" else (logits,)
        if name == "entropy_from_logits_with_chunking":
            args = (logits.reshape(-1, V), 4)  # verl's takes [N, V]; 4-row chunks
        base, got = verl_fn(*args), getattr(verl_F, name)(*args)
        assert getattr(verl_F, name) is getattr(uf_verl, name)
        assert got.shape == base.shape and got.dtype == base.dtype, (name, got.shape, got.dtype, base.dtype)
        assert_close_rule(got, want[name].reshape(got.shape), base, atol=1e-6, name=name)
    # verl's GPU path flattens logits and labels, so labels [1, N] with logits [N, V] work there: here too
    flat = logits.reshape(-1, V)
    assert verl_F.logprobs_from_logits(flat, labels.reshape(1, -1)).shape == flat.shape[:1]
    assert uf_verl.entropy_from_logits_with_chunking(logits, 4).shape == lead  # any rank here


def test_logprob_dtype_follows_verls_flash_attn_path(patched, monkeypatch):
    """Where flash-attn's cross-entropy would run, verl returns fp32 log-probs for bf16 logits: so does ours."""
    logits, labels = torch.randn(6, 13).bfloat16(), torch.randint(0, 13, (6,))
    monkeypatch.setattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True, raising=False)
    assert verl_F.logprobs_from_logits(logits, labels).dtype == torch.float32
    monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
    assert verl_F.logprobs_from_logits(logits, labels).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead", [(13,), (2, 9), (1, 7)], ids=["2d", "3d", "3d_b1"])
def test_fused_head_returns_verls_shapes_and_dtypes(patched, dtype, lead):
    """linear_cross_entropy: fp32 [N] for any input rank (verl's kernel flattens); FusedLinearForPPO: shaped like the
    labels, log-probs fp32, entropy in the hidden states' dtype, as verl's torch backend (the oracle here)."""
    import importlib

    tf = importlib.import_module("verl.utils.experimental.torch_functional")
    g = torch.Generator().manual_seed(2)
    V, H = 37, 16
    h = torch.randn(*lead, H, generator=g).to(dtype).requires_grad_()
    W = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, lead, generator=g)
    logp, ent = uf_verl.linear_cross_entropy(h, W, labels, 0.7)
    assert logp.shape == ent.shape == (labels.numel(),) and logp.dtype == ent.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == h.shape and h.grad.dtype == dtype and W.grad.dtype == dtype
    verl_logp, verl_ent = tf.FusedLinearForPPOFunction.apply(h, W, labels, 0.7, 4)
    ours = tf.FusedLinearForPPO(impl_backend="torch")(h, W, labels, temperature=0.7)
    assert tf.FusedLinearForPPO is uf_verl.FusedLinearForPPO
    for a, b in zip(ours, (verl_logp, verl_ent)):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        assert_close_rule(a, b.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, name="FusedLinearForPPO")
    with pytest.raises(ValueError, match="hidden_states must be 2-D or 3-D"):
        tf.FusedLinearForPPO()(h[None, None], W, labels[None, None])


@pytest.mark.parametrize("shape", [(97, 56, 1521), (77, 64, 323)], ids=["N97_H56_V1521", "N77_H64_V323"])
def test_fused_head_keeps_fp32_logits_as_verls_kernel(shape, device):
    """verl's kernel (`linear_cross_entropy`) forms the logits in fp32 from bf16 hidden states and head: ours does too
    (`logits_dtype=torch.float32`, bitwise the op's result), within that kernel's tolerances against fp32-logit torch
    (verl's test: log-probs atol 1e-3 rtol 2e-4, entropy 5e-3 / 5e-4), where bf16 logits miss them at these
    test_linear_cross_entropy shapes; FusedLinearForPPO keeps the hidden states' dtype for its logits, as verl's
    torch backend. Triton path (the interpreter on CPU)."""
    N, H, V = shape
    g = torch.Generator().manual_seed(0)
    h = torch.empty(N, H).uniform_(-0.5, 0.5, generator=g).to(device, torch.bfloat16)
    w = torch.empty(V, H).uniform_(-0.5, 0.5, generator=g).to(device, torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    z = (h.float() @ w.float().t()) / 1.5
    want = (z.log_softmax(-1).gather(-1, labels[:, None])[:, 0], torch.special.entr(z.softmax(-1)).sum(-1))
    uf_verl.patch(impl="triton")
    try:
        got = uf_verl.linear_cross_entropy(h, w, labels, 1.5)
        ppo = uf_verl.FusedLinearForPPO()(h, w, labels, temperature=1.5)
    finally:
        uf_verl.unpatch()
    kw = dict(temperature=1.5, return_entropy=True, impl="triton")
    wide = U.fused_linear_logprobs(h, w, labels, logits_dtype=torch.float32, **kw)
    narrow = U.fused_linear_logprobs(h, w, labels, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, wide))
    assert torch.equal(ppo[0], narrow[0]) and torch.equal(ppo[1], narrow[1].to(torch.bfloat16))
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=2e-4)
    torch.testing.assert_close(got[1], want[1], atol=5e-3, rtol=5e-4)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(narrow[0], want[0], atol=1e-3, rtol=2e-4)


_FRESH = """
import json, sys
import unirl_fast.integrations.verl as v
assert not any(n.startswith("verl.workers.engine") for n in sys.modules), "verl's engines imported too early"
DEEP = {deep}
v.patch(impl="reference", deep=DEEP)
import verl.workers.engine.fsdp.transformer_impl as fsdp
from verl.trainer.ppo import core_algos
ours = {{id(f) for f in (v.logprobs_from_logits, v.entropy_from_logits, v.entropy_from_logits_with_chunking,
                        v.linear_cross_entropy, v.FusedLinearForPPO, v.compute_policy_loss_vanilla,
                        v.compute_policy_loss_gspo)}}

def holders():
    return sorted(f"{{n}}.{{a}}" for n, m in list(sys.modules.items()) if n.startswith("verl") and m is not None
                  for a, x in list(vars(m).items()) if id(x) in ours)

during = holders()
fsdp_ours = fsdp.logprobs_from_logits is v.logprobs_from_logits
deep_ours = core_algos.compute_policy_loss_vanilla is v.compute_policy_loss_vanilla
v.unpatch()
print(json.dumps(dict(during=during, fsdp_ours=fsdp_ours, deep_ours=deep_ours, after=holders(),
                      registry=core_algos.get_policy_loss_fn("vanilla") is core_algos.compute_policy_loss_vanilla)))
"""


@pytest.mark.parametrize("deep", [False, True], ids=["registry", "deep"])
def test_unpatch_restores_every_module_in_a_fresh_process(deep):
    """In a process where patch() is what first imports verl's engines, every module-level name it swapped holds
    ours while patched and verl's again after unpatch() (a scan of every loaded verl module)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRESH.format(deep=deep)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["fsdp_ours"] and res["deep_ours"] == deep
    assert "verl.workers.engine.fsdp.transformer_impl.logprobs_from_logits" in res["during"]
    assert "verl.utils.torch_functional.entropy_from_logits_with_chunking" in res["during"]
    assert res["after"] == [] and res["registry"]


def test_deep_patch_rebinds_the_module_level_losses():
    vanilla, gspo = core_algos.compute_policy_loss_vanilla, core_algos.compute_policy_loss_gspo
    uf_verl.patch(impl="reference")
    try:
        assert core_algos.compute_policy_loss_vanilla is vanilla  # registry only
        uf_verl.patch(impl="reference", deep=True)
        assert core_algos.compute_policy_loss_vanilla is uf_verl.compute_policy_loss_vanilla
        assert core_algos.compute_policy_loss_gspo is uf_verl.compute_policy_loss_gspo
        assert core_algos.get_policy_loss_fn("gspo") is uf_verl.compute_policy_loss_gspo
    finally:
        uf_verl.unpatch()
    assert (core_algos.compute_policy_loss_vanilla, core_algos.compute_policy_loss_gspo) == (vanilla, gspo)
    assert core_algos.get_policy_loss_fn("vanilla") is vanilla
    with pytest.raises(ValueError, match="deep must be True or False"):
        uf_verl.patch(deep="yes")


def test_kl_stays_verls_under_the_patch(patched):
    """The drop-in does not touch verl's KL: an unknown kl_loss_type raises verl's own NotImplementedError."""
    from verl.workers.utils.losses import ppo_loss

    data, packed, rolled, Vv = _tiny_actor_data(1)
    logits = torch.randn(packed.shape[0], Vv)
    lp = verl_F.logprobs_from_logits(logits, rolled)
    cfg = _config("vanilla", "token-mean", use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="full")
    with pytest.raises(NotImplementedError):
        ppo_loss(cfg, {"log_probs": lp, "entropy": verl_F.entropy_from_logits(logits)}, data)
