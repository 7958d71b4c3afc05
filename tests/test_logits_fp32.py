"""`logits_dtype=torch.float32` of the fused head ops (fused_linear_logprobs, fused_linear_policy_loss) with 16-bit
hidden states and head, forward and backward, against an fp64 oracle under the tolerance rule (docs/contributing.md).

"torch at the same precision" is torch forming the logits in fp32 from the 16-bit inputs (exact products, fp32 sums)
and differentiating in fp32: the fp32 reference run on the 16-bit leaves, whose gradients autograd rounds to the
leaves' dtype once. The Triton path also rounds its dlogits to bf16 for the backward GEMMs (kernels/
fused_linear_logprobs.py), which the rule's factor 2 has to absorb. Awkward vocabularies (V % 8 != 0), several
chunks in forward and several vocab slices in backward, ignore_index rows; on CPU the kernels run under the Triton
interpreter. The default (None) is checked bitwise against the path it always was: torch's 16-bit GEMM and our
row kernels.
"""
import pytest
import torch
import unirl_fast.kernels.fused_linear_logprobs as FK
from tolerance import assert_close_rule
from unirl_fast.kernels._rows import aligned_rows

import unirl_fast as U
import unirl_fast.ops.fused_linear_policy_loss_triton as FL
from unirl_fast.reference import fused_linear_logprobs_ref, fused_linear_policy_loss_ref
from unirl_fast.reference.policy_loss import policy_loss_ref

F32 = torch.float32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = 1e-5


def _grads(out, leaves, g, gh):
    loss = (out[0].double() * g).sum() + (0 if out[1] is None else (out[1].double() * gh).sum())
    return [o.detach() for o in out if o is not None], list(torch.autograd.grad(loss, leaves))


def _oracle64(h, w, b, y, T):
    """fp64 log-probs and entropy (ignored rows 0), from the 16-bit leaves."""
    z = h.double() @ w.double().t() + (0 if b is None else b.double())
    lsm = torch.log_softmax(z / T, -1)
    valid = y != -100
    logp = torch.where(valid, lsm.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
    return logp, torch.where(valid, -(lsm.exp() * lsm).sum(-1), 0.0)


LINEAR_CASES = {
    "N37_H24_V1001_bias_T0.7_chunked": dict(shape=(37,), H=24, V=1001, bias=True, T=0.7, chunked=True),
    "B2xL63_H48_V3000_one_chunk": dict(shape=(2, 63), H=48, V=3000, bias=False, T=1.0, chunked=False),
}


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_fused_linear_logprobs_fp32_logits(case, dtype, impl, device, monkeypatch):
    c, dt = LINEAR_CASES[case], DTYPES[dtype]
    N, H, V = int(torch.tensor(c["shape"]).prod()), c["H"], c["V"]
    if c["chunked"]:  # ~6 token chunks of fp32 logits in forward, 8 vocab slices in backward
        monkeypatch.setattr(FK, "CHUNK_ELEMS", N * V // 3)
        monkeypatch.setattr(FK, "MIN_VOCAB_CHUNK", 128)
        assert FK.token_chunk(V, N * V // 3 * 2 // 4) < N // 4 and FK.vocab_chunk(N, V, N * V // 9) < V // 4
    g0 = torch.Generator().manual_seed(0)
    h = torch.randn(*c["shape"], H, generator=g0).to(device, dt)
    w = (torch.randn(V, H, generator=g0) * 2 / H ** 0.5).to(device, dt)  # logits ~ N(0, 4): bf16 rounds them by ~1e-2
    b = (torch.randn(V, generator=g0) * 0.5).to(device, dt) if c["bias"] else None
    y = torch.randint(0, V, c["shape"], generator=g0).to(device)
    y.view(-1)[::5] = -100
    g, gh = (torch.randn(c["shape"], generator=g0, dtype=torch.float64).to(device) for _ in range(2))
    leaves = [x.requires_grad_() for x in (h, w, b) if x is not None]
    kw = dict(bias=b, temperature=c["T"], return_entropy=True)
    ours = _grads(U.fused_linear_logprobs(h, w, y, impl=impl, logits_dtype=F32, **kw), leaves, g, gh)
    base = _grads(fused_linear_logprobs_ref(h, w, y, **kw), leaves, g, gh)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    ref = _grads(_oracle64(*leaves64[:2], leaves64[2] if b is not None else None, y, c["T"]), leaves64, g, gh)
    for o, r, bs, name in zip(ours[0] + ours[1], ref[0] + ref[1], base[0] + base[1],
                              ["logp", "entropy", "dhidden", "dweight", "dbias"]):
        assert o.dtype == bs.dtype and o.shape == bs.shape, name
        assert_close_rule(o, r, bs, atol=ATOL, name=name)


def _policy_data(B, L, device, g):
    mask = torch.rand(B, L, generator=g) > 0.25
    mask[-1] = False  # a fully masked sequence
    old = torch.randn(B, L, generator=g) * 0.5 - 7.0  # near log(1/V): ratios straddle the clip range
    return dict(old_logp=old.to(device), advantages=torch.randn(B, generator=g).to(device), mask=mask.to(device),
                ref_logp=(old + 0.3 * torch.randn(B, L, generator=g)).to(device))


def _policy_oracle64(h, w, b, y, d, kw):
    lp, ent = _oracle64(h, w, b, y, kw.get("temperature", 1.0))
    opts = {k: v for k, v in kw.items() if k != "temperature"}
    return policy_loss_ref(lp, d["old_logp"].double(), d["advantages"].double(), d["mask"] & (y != -100),
                           entropy=ent, ref_logp=d["ref_logp"].double(), **opts)[0]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("is_level", ["token", "sequence"])
def test_fused_linear_policy_loss_fp32_logits(is_level, impl, device, monkeypatch):
    """bf16 head, V = 1001, 3 rows per chunk (fp32 logits + their bf16 copy in the bf16 path's bytes): 12 chunks."""
    monkeypatch.setattr(FL, "CHUNK_ELEMENTS", 9 * 1001)
    B, L, H, V = 3, 12, 24, 1001
    assert FL.chunk_rows(B * L, V, wide=True) == 3
    g0 = torch.Generator().manual_seed(1)
    h = torch.randn(B, L, H, generator=g0).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, generator=g0) * 2 / H ** 0.5).to(device, torch.bfloat16).requires_grad_()
    b = (torch.randn(V, generator=g0) * 0.5).to(device, torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (B, L), generator=g0).to(device)
    y[0, 1] = -100  # ignore_index inside a valid sequence
    d = _policy_data(B, L, device, g0)
    kw = dict(temperature=0.7, importance_sampling=is_level, beta=0.05, entropy_coef=0.01, eps_high=0.28)
    args = (y, d["old_logp"], d["advantages"], d["mask"])
    loss, met = U.fused_linear_policy_loss(h, w, *args, bias=b, ref_logp=d["ref_logp"], impl=impl,
                                           logits_dtype=F32, **kw)
    ours = [loss.detach(), *torch.autograd.grad(loss, [h, w, b])]
    loss_b, met_b = fused_linear_policy_loss_ref(h, w, *args, bias=b, ref_logp=d["ref_logp"], **kw)
    base = [loss_b.detach(), *torch.autograd.grad(loss_b, [h, w, b])]
    leaves64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    loss_o = _policy_oracle64(*leaves64, y, d, kw)
    ref = [loss_o.detach(), *torch.autograd.grad(loss_o, leaves64)]
    for o, r, bs, name in zip(ours, ref, base, ["loss", "dhidden", "dweight", "dbias"]):
        assert o.dtype == bs.dtype, name
        assert_close_rule(o, r, bs, atol=ATOL, name=name)
    assert abs(float(met["entropy_mean"]) - float(met_b["entropy_mean"])) < 1e-5



def _both_outputs(fn, leaves, g, gh):
    outs, grads = _grads(fn(*leaves), leaves, g, gh)
    return outs + grads


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_default_logits_dtype_is_the_inputs_dtype_bitwise(dtype, device):
    """logits_dtype=None (the default) is what the fused head always computed: torch's GEMM in the inputs' dtype,
    then our row kernels, bitwise, forward and backward (one chunk; V % 8 == 0 so the aligned rows are the
    contiguous ones). fp32 logits are a different result for 16-bit inputs, the same for fp32 inputs."""
    dt = {**DTYPES, "fp32": F32}[dtype]
    N, H, V = 21, 16, 400
    g0 = torch.Generator().manual_seed(3)
    h = torch.randn(N, H, generator=g0).to(device, dt).requires_grad_()
    w = (torch.randn(V, H, generator=g0) / 2).to(device, dt).requires_grad_()
    b = (torch.randn(V, generator=g0) / 2).to(device, dt).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g0).to(device)
    y[::4] = -100
    g, gh = (torch.randn(N, generator=g0, dtype=torch.float64).to(device) for _ in range(2))
    kw = dict(temperature=0.8, return_entropy=True, impl="triton")

    def fused(**extra):
        return _both_outputs(lambda h, w, b: U.fused_linear_logprobs(h, w, y, bias=b, **kw, **extra), [h, w, b], g, gh)

    composed = _both_outputs(lambda h, w, b: U.logprobs_from_logits(torch.nn.functional.linear(h, w, b), y, **kw),
                             [h, w, b], g, gh)
    default, none, wide = fused(), fused(logits_dtype=None), fused(logits_dtype=F32)
    names = ["logp", "entropy", "dhidden", "dweight", "dbias"]
    for a, c, n, name in zip(default, composed, none, names):
        assert torch.equal(a, c) and torch.equal(a, n), name
    same = [torch.equal(a, x) for a, x in zip(default, wide)]
    assert all(same) if dt == F32 else not any(same[:2]), same


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_policy_loss_fp32_logits_is_a_no_op_where_logits_are_already_fp32(dtype, device, monkeypatch):
    """fused_linear_policy_loss computes fp16 heads in fp32 (and fp32 heads in fp32): logits_dtype=torch.float32 then
    changes nothing, bitwise; logits_dtype=None equals the default call."""
    monkeypatch.setattr(FL, "CHUNK_ELEMENTS", 5 * 301)
    B, L, H, V = 2, 9, 16, 301
    g0 = torch.Generator().manual_seed(4)
    h = torch.randn(B, L, H, generator=g0).to(device, DTYPES.get(dtype, F32)).requires_grad_()
    w = (torch.randn(V, H, generator=g0) / 4).to(device, h.dtype).requires_grad_()
    y = torch.randint(0, V, (B, L), generator=g0).to(device)
    d = _policy_data(B, L, device, g0)

    def run(**extra):
        loss, met = U.fused_linear_policy_loss(h, w, y, d["old_logp"], d["advantages"], d["mask"], impl="triton",
                                               entropy_coef=0.01, **extra)
        return [loss, *met.values(), *torch.autograd.grad(loss, [h, w])]

    default = run()
    for other in (run(logits_dtype=None), run(logits_dtype=F32)):
        assert all(torch.equal(a, x) for a, x in zip(default, other))


@pytest.mark.parametrize("op", ["fused_linear_logprobs", "fused_linear_policy_loss"])
@pytest.mark.parametrize("bad", [torch.bfloat16, torch.float64, "float32", True])
def test_bad_logits_dtype_raises(op, bad, device):
    h, w = torch.randn(2, 3, 8, device=device), torch.randn(50, 8, device=device)
    y = torch.randint(0, 50, (2, 3), device=device)
    if op == "fused_linear_logprobs":
        def call(): return U.fused_linear_logprobs(h, w, y, logits_dtype=bad)
    else:
        def call(): return U.fused_linear_policy_loss(h, w, y, torch.zeros(2, 3, device=device),
                                                      torch.ones(2, device=device), torch.ones(2, 3, device=device),
                                                      logits_dtype=bad)
    with pytest.raises(ValueError, match=f"logits_dtype must be None .* or torch.float32, got {bad!r}"):
        call()


def test_fp32_logit_chunks_are_aligned_zero_padded_fp32_rows_in_the_same_bytes(device, monkeypatch):
    """The chunks the row kernels read with fp32 logits: fp32, every row on a 16-byte boundary (row stride a multiple of
    4 elements), the padding lanes zero; the forward chunk holds half the rows of a bf16 one, the backward slice
    (fp32 logits + bf16 dlogits) a third of the columns: the chunk's byte budget is the bf16 path's."""
    import unirl_fast.kernels.logprobs as KL

    N, H, V, budget = 40, 8, 1001, 40 * 1001 // 2
    monkeypatch.setattr(FK, "CHUNK_ELEMS", budget)
    monkeypatch.setattr(FK, "MIN_VOCAB_CHUNK", 64)
    seen = {"fwd": [], "bwd": []}

    def spy(kind, real):
        def run(x, *a, **k):
            seen[kind].append((x, k.get("out")))
            return real(x, *a, **k)
        return run

    monkeypatch.setattr(FK, "logprobs_fwd", spy("fwd", KL.logprobs_fwd))
    monkeypatch.setattr(FK, "logprobs_bwd", spy("bwd", KL.logprobs_bwd))
    h = torch.randn(N, H, device=device, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(V, H, device=device, dtype=torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    lp, _ = U.fused_linear_logprobs(h, w, y, impl="triton", logits_dtype=F32)
    lp.sum().backward()
    for z, _ in seen["fwd"]:
        assert z.dtype == F32 and z.stride(0) % 4 == 0 and z.stride(0) > V and z.data_ptr() % 16 == 0
        full = z.as_strided((z.shape[0], z.stride(0)), (z.stride(0), 1))
        assert torch.count_nonzero(full[:, V:]) == 0  # zeroed padding (a GEMM may read whole vectors)
        assert z.numel() * 4 <= budget * 2
    assert max(z.shape[0] for z, _ in seen["fwd"]) == FK.token_chunk(V, budget // 2) < FK.token_chunk(V, budget)
    for z, dz in seen["bwd"]:
        assert z.dtype == F32 and dz.dtype == torch.bfloat16 and dz.stride() == z.stride()
        assert z.numel() * (4 + 2) <= budget * 2 + N * 64 * 6  # the last slice may round up to MIN_VOCAB_CHUNK


def test_aligned_rows_pads_per_dtype_and_zeroes_the_padding():
    for dtype, vec in ((torch.bfloat16, 8), (torch.float16, 8), (F32, 4), (torch.float64, 2)):
        for n in (1001, 1000, 3):
            z = aligned_rows(5, n, dtype, torch.device("cpu"))
            stride = -(-n // vec) * vec
            assert z.shape == (5, n) and z.stride() == (stride, 1) and z.data_ptr() % 16 == 0
            assert torch.count_nonzero(z.as_strided((5, stride), (stride, 1))[:, n:]) == 0


def test_policy_loss_fp32_logits_keeps_the_chunk_bytes(device, monkeypatch):
    """Peak extra memory of forward + backward with fp32 logits: within the bf16 path's budget (one chunk's bytes, the
    fp32 [V, H] head-gradient accumulator, O(N) vectors, the gradients), the chunk holding a third of the rows."""
    from memprobe import AllocProbe

    B, L, H, V, rows = 4, 32, 64, 1000, 24
    monkeypatch.setattr(FL, "CHUNK_ELEMENTS", rows * V)
    assert FL.chunk_rows(B * L, V, wide=True) == rows // 3
    g0 = torch.Generator().manual_seed(5)
    h = torch.randn(B, L, H, generator=g0).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, generator=g0) / 8).to(device, torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (B, L), generator=g0).to(device)
    d = _policy_data(B, L, device, g0)
    with AllocProbe() as fwd:
        loss, _ = U.fused_linear_policy_loss(h, w, y, d["old_logp"], d["advantages"], d["mask"], impl="triton",
                                             logits_dtype=F32)
    loss.backward()
    grads = (h.numel() + w.numel()) * 2
    budget = rows * V * 2 + V * H * 4 + 64 * B * L * 4 + grads + 4096
    assert fwd.peak_bytes <= budget, (fwd.peak_bytes, budget, sorted(fwd.allocs, key=lambda a: -a[2])[:6])


def test_fp32_logits_ops_pass_opcheck_and_compile_fullgraph(device, monkeypatch):
    """The custom ops with fp32 logits: torch.library's opcheck (fake, autograd registration) and
    torch.compile(fullgraph=True) (aot_eager on CPU) equal to eager, both ops."""
    from torch.library import opcheck

    monkeypatch.setattr(FL, "CHUNK_ELEMENTS", 4 * 300)
    g0 = torch.Generator().manual_seed(6)
    h = torch.randn(2, 5, 16, generator=g0).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(300, 16, generator=g0) / 4).to(device, torch.bfloat16).requires_grad_()
    b = torch.randn(300, generator=g0).to(device, torch.bfloat16).requires_grad_()
    y = torch.randint(0, 300, (2, 5), generator=g0).to(device)
    opcheck(torch.ops.unirl_fast.fused_linear_logprobs_fwd.default, (h.view(10, 16), w, b, y.view(-1), 0.7, -100,
                                                                      True, True))
    d = _policy_data(2, 5, device, g0)

    def f(h, w, b):
        lp, ent = U.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, impl="triton", logits_dtype=F32)
        loss, _ = U.fused_linear_policy_loss(h, w, y, d["old_logp"], d["advantages"], d["mask"], bias=b,
                                             impl="triton", logits_dtype=F32)
        return (lp * 0.3).sum() + ent.sum() + loss

    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w, b)
    g_c = torch.autograd.grad(out_c, [h, w, b])
    out_e = f(h, w, b)
    g_e = torch.autograd.grad(out_e, [h, w, b])
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(g_c, g_e)
