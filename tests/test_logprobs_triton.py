"""Triton paths of logprobs_from_logits and fused_linear_logprobs vs an fp64 oracle (docs/contributing.md).

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) with small awkward shapes; the docs/benchmarks.md
shapes are `gpu`-marked. Every case drives backward with random upstream grads for logp and entropy.
The oracle is fp64 end to end (the fp32 reference's entropy is off by ~13 nats on rows near -2e4, where
lse - E_p[z] cancels; the kernels keep the entropy relative to the row max and stay exact).
The "torch at the same precision" baseline is the reference op run on the same-dtype inputs.
"""
import pytest
import torch
import unirl_fast.kernels.fused_linear_logprobs as FK
from tolerance import assert_close_rule

import unirl_fast as U
from unirl_fast.reference.logprobs import logprobs_from_logits_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = 1e-5


def oracle_from_logits(z, targets, temperature=1.0, ignore_index=-100):
    """fp64 logp and entropy; the entropy as -sum p (z - lse), without cancellation. Ignored rows are
    zeroed before the softmax so an all -inf padding row gives 0 (not NaN) gradients."""
    valid = targets != ignore_index
    z = torch.where(valid.unsqueeze(-1), z.double(), 0.0) / temperature
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(z, -1, keepdim=True)
    zc = z - lse
    p = zc.exp()
    logp = torch.where(valid, zc.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0.0)
    ent = -(p * torch.where(p > 0, zc, torch.zeros_like(zc))).sum(-1)
    return logp, torch.where(valid, ent, 0.0)


def run(fn, leaves, g_logp, g_ent):
    """Forward + backward with upstream grads; returns (logp, ent, [grads of leaves])."""
    leaves = [x.detach().requires_grad_() for x in leaves]
    logp, ent = fn(*leaves)
    loss = (logp.double() * g_logp).sum() + (0 if ent is None else (ent.double() * g_ent).sum())
    grads = torch.autograd.grad(loss, leaves)
    return logp.detach(), (None if ent is None else ent.detach()), list(grads)


def check_all(ours, ref, base, names):
    for o, r, b, n in zip(ours, ref, base, names):
        assert o.dtype == b.dtype, f"{n}: dtype {o.dtype} != {b.dtype}"
        assert_close_rule(o, r, b, atol=ATOL, name=n)


def make_logits(shape, V, dtype, device, *, shifted=False, neg_inf=False, pad_row=False):
    z = torch.randn(*shape, V, device=device, dtype=torch.float64) * 3
    y = torch.randint(0, V, shape, device=device)
    flat_z, flat_y = z.view(-1, V), y.view(-1)
    n = flat_z.shape[0]
    if shifted:
        flat_z[::3] -= 2e4
    if neg_inf:
        flat_z[1::2, ::5] = float("-inf")
        flat_y[1::2] = torch.where(flat_y[1::2] % 5 == 0, flat_y[1::2] + 1, flat_y[1::2]).clamp_max(V - 1)
    flat_y[torch.randperm(n, device=device)[: max(1, n // 8)]] = -100
    if pad_row:
        flat_z[-1] = float("-inf")
        flat_y[-1] = -100
    return z.to(dtype), y


LOGIT_CASES = {
    "V3000_B2xL63": dict(shape=(2, 63), V=3000, T=1.0),
    "V5000_T0.7_neg2e4_rows_inf_entries": dict(shape=(11,), V=5000, T=0.7, shifted=True, neg_inf=True),
    "V4097_padding_row": dict(shape=(3, 5), V=4097, T=1.3, pad_row=True),
    "V151936_3tokens": dict(shape=(3,), V=151936, T=1.0),
}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(LOGIT_CASES), ids=list(LOGIT_CASES))
@pytest.mark.parametrize("entropy", [True, False], ids=["entropy", "logp_only"])
def test_logprobs_from_logits(case, dtype, entropy, device):
    c = LOGIT_CASES[case]
    if device.type == "cpu" and not entropy and dtype != "fp32":
        pytest.skip("interpreter time: the logp-only path is covered in fp32")
    if device.type == "cpu" and c["V"] > 100_000 and dtype != "bf16":
        pytest.skip("interpreter time: one dtype is enough for the V=151936 case")
    z, y = make_logits(c["shape"], c["V"], DTYPES[dtype], device, shifted=c.get("shifted", False),
                       neg_inf=c.get("neg_inf", False), pad_row=c.get("pad_row", False))
    g_logp = torch.randn(y.shape, device=device, dtype=torch.float64)
    g_ent = torch.randn(y.shape, device=device, dtype=torch.float64)
    kw = dict(temperature=c["T"], return_entropy=entropy)
    ours = run(lambda x: U.logprobs_from_logits(x, y, impl="triton", **kw), [z], g_logp, g_ent)
    base = run(lambda x: logprobs_from_logits_ref(torch.where((y != -100).unsqueeze(-1), x, 0), y, **kw),
               [z], g_logp, g_ent)
    ref = run(lambda x: oracle_from_logits(x, y, c["T"]) if entropy else (oracle_from_logits(x, y, c["T"])[0], None),
              [z.double()], g_logp, g_ent)
    assert ours[0].dtype == torch.float32 and ours[0].shape == y.shape
    assert_close_rule(ours[0], ref[0], base[0], atol=ATOL, name="logp")
    if entropy:
        assert_close_rule(ours[1], ref[1], base[1], atol=ATOL, name="entropy")
        if c.get("shifted"):  # the fp32 baseline is far off here (cancellation); ours must not be
            assert_close_rule(ours[1], ref[1], None, atol=2e-3, name="entropy on rows near -2e4")
    else:
        assert ours[1] is None
    check_all(ours[2], ref[2], base[2], ["dlogits"])
    ignored = y == -100
    assert torch.all(ours[0][ignored] == 0) and torch.all(ours[2][0][ignored] == 0)
    if entropy:
        assert torch.all(ours[1][ignored] == 0)


def test_logprobs_leading_dims_inplace_and_strides(device):
    """A sliced [B, L, V] view vs its flattened copy [N, V]: equal up to fp32 summation order (rows of the view sit
    at other 16-byte alignments, which move the head/body split of kernels/_rows.py), bitwise equal gradients
    (elementwise) and bitwise equal everything for a view whose rows keep the copy's alignment; in-place
    backward gives the same grads and overwrites the logits buffer (and refuses a second backward)."""
    V = 3000
    big = torch.randn(2, 64, V + 37, device=device, dtype=torch.bfloat16)
    z = big[:, :-1, :V]  # the shifted-logits slice: rows are not one stride apart
    y = torch.randint(0, V, (2, 63), device=device)
    g = torch.randn(2, 63, device=device, dtype=torch.float64)
    gh = torch.randn(2, 63, device=device, dtype=torch.float64)
    kw = dict(temperature=0.7, return_entropy=True, impl="triton")
    a = run(lambda x: U.logprobs_from_logits(x, y, **kw), [z], g, gh)
    b = run(lambda x: tuple(o.view(2, 63) for o in U.logprobs_from_logits(x.reshape(-1, V), y.reshape(-1), **kw)),
            [z], g, gh)
    torch.testing.assert_close(a[0], b[0], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(a[1], b[1], rtol=2e-6, atol=2e-5)
    assert_close_rule(a[2][0], b[2][0], atol=1e-2, name="dlogits of the view vs the copy")  # bf16 of ~equal values
    aligned = torch.randn(2, 64, V + 8, device=device, dtype=torch.bfloat16)[:, :-1, :V]  # rows 16-byte aligned
    c = run(lambda x: U.logprobs_from_logits(x, y, **kw), [aligned], g, gh)
    d = run(lambda x: tuple(o.view(2, 63) for o in U.logprobs_from_logits(x.reshape(-1, V), y.reshape(-1), **kw)),
            [aligned], g, gh)
    for u, v in zip([c[0], c[1], c[2][0]], [d[0], d[1], d[2][0]]):
        assert torch.equal(u, v)
    src = z.detach().clone().requires_grad_()  # contiguous: the flattened copy's row layout
    buf = src * 1  # non-leaf logits buffer, as an LM head output would be
    logp, ent = U.logprobs_from_logits(buf, y, inplace_backward=True, **kw)
    loss = (logp.double() * g).sum() + (ent.double() * gh).sum()
    loss.backward(retain_graph=True)
    assert torch.equal(src.grad, b[2][0])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the logits were consumed: autograd's version counter refuses a second pass
    assert torch.equal(buf.detach(), b[2][0]), "in-place backward should leave dlogits in the logits buffer"
    with pytest.raises(TypeError, match="inplace_backward"):
        U.logprobs_from_logits(z, y, inplace_backward=1)


def test_reference_ignores_inplace_flag():
    z = torch.randn(4, 50, requires_grad=True)
    y = torch.randint(0, 50, (4,))
    lp, _ = U.logprobs_from_logits(z, y, impl="reference", inplace_backward=True)
    lp.sum().backward()
    assert torch.isfinite(z).all() and not torch.equal(z.detach(), z.grad)


def linear_baseline(h, w, y, b, T, entropy):
    """torch at the same precision: the head GEMM in the inputs' dtype, then the fp32 softmax reference."""
    z = torch.nn.functional.linear(h, w, b)
    return logprobs_from_logits_ref(z, y, temperature=T, return_entropy=entropy)


LINEAR_CASES = {
    "B2xL63_H48_V3000_bias_T0.7_noncontig": dict(shape=(2, 63), H=48, V=3000, bias=True, T=0.7, noncontig=True),
    "N37_flat_H32_V1000": dict(shape=(37,), H=32, V=1000, bias=False, T=1.0, noncontig=False),
    "flattened_hidden_for_BxL_targets": dict(shape=(3, 7), H=16, V=777, bias=True, T=1.0, flat_hidden=True),
}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(LINEAR_CASES), ids=list(LINEAR_CASES))
@pytest.mark.parametrize("chunks", ["one_chunk", "chunked"])
def test_fused_linear_logprobs(case, dtype, chunks, device, monkeypatch):
    """chunked: about 3 token chunks in forward and 3-4 vocab slices in backward."""
    c = LINEAR_CASES[case]
    dt = DTYPES[dtype]
    N, H, V = int(torch.tensor(c["shape"]).prod()), c["H"], c["V"]
    if chunks == "chunked":
        if device.type == "cpu" and N > 100 and dtype != "bf16":
            pytest.skip("interpreter time: the large chunked case runs in bf16 only")
        monkeypatch.setattr(FK, "CHUNK_ELEMS", N * V // 3)
        monkeypatch.setattr(FK, "MIN_VOCAB_CHUNK", 128)
        assert FK.token_chunk(V, N * V // 3) < N and FK.vocab_chunk(N, V, N * V // 3) < V
    if c.get("noncontig"):
        h = torch.randn(H + 5, *c["shape"], device=device, dtype=dt)[:H].movedim(0, -1)
        assert not h.is_contiguous()
    else:
        h = torch.randn(N, H, device=device, dtype=dt)
        h = h if c.get("flat_hidden") or len(c["shape"]) == 1 else h.view(*c["shape"], H)
    w = (torch.randn(V, H, device=device) / H ** 0.5).to(dt)
    b = torch.randn(V, device=device).to(dt) if c["bias"] else None
    y = torch.randint(0, V, c["shape"], device=device)
    y.view(-1)[:: 5] = -100
    g = torch.randn(c["shape"], device=device, dtype=torch.float64)
    gh = torch.randn(c["shape"], device=device, dtype=torch.float64)
    leaves = [h, w] + ([b] if b is not None else [])
    kw = dict(temperature=c["T"], return_entropy=True)

    def ours_fn(h, w, b=None):
        return U.fused_linear_logprobs(h, w, y, bias=b, impl="triton", **kw)

    def base_fn(h, w, b=None):
        return linear_baseline(h.reshape(*c["shape"], H), w, y, b, c["T"], True)

    def ref_fn(h, w, b=None):
        return oracle_from_logits(torch.nn.functional.linear(h.reshape(*c["shape"], H), w, b), y, c["T"])

    ours = run(ours_fn, leaves, g, gh)
    base = run(base_fn, leaves, g, gh)
    ref = run(ref_fn, [x.double() for x in leaves], g, gh)
    assert_close_rule(ours[0], ref[0], base[0], atol=ATOL, name="logp")
    assert_close_rule(ours[1], ref[1], base[1], atol=ATOL, name="entropy")
    check_all(ours[2], ref[2], base[2], ["dhidden", "dweight", "dbias"][: len(leaves)])
    assert ours[2][0].shape == h.shape


def test_fused_linear_v151936_few_tokens(device):
    V, H = 151936, 16
    h = torch.randn(2, 3, H, device=device, dtype=torch.bfloat16)
    w = (torch.randn(V, H, device=device) / 4).to(torch.bfloat16)
    y = torch.tensor([[0, V - 1, -100], [77, 151935, 4096]], device=device)
    g, gh = (torch.randn(2, 3, device=device, dtype=torch.float64) for _ in range(2))
    ours = run(lambda h, w: U.fused_linear_logprobs(h, w, y, return_entropy=True, impl="triton"), [h, w], g, gh)
    base = run(lambda h, w: linear_baseline(h, w, y, None, 1.0, True), [h, w], g, gh)
    ref = run(lambda h, w: oracle_from_logits(h @ w.t(), y), [h.double(), w.double()], g, gh)
    assert_close_rule(ours[0], ref[0], base[0], atol=ATOL, name="logp")
    assert_close_rule(ours[1], ref[1], base[1], atol=ATOL, name="entropy")
    check_all(ours[2], ref[2], base[2], ["dhidden", "dweight"])


def test_fused_linear_frozen_head_and_frozen_hidden(device):
    """Only the gradients that are needed are computed, and they match the all-grads run."""
    h = torch.randn(2, 5, 24, device=device)
    w = torch.randn(300, 24, device=device) / 5
    y = torch.randint(0, 300, (2, 5), device=device)
    g = torch.randn(2, 5, device=device, dtype=torch.float64)

    def fn(h, w):
        return U.fused_linear_logprobs(h, w, y, impl="triton")
    both = run(fn, [h, w], g, None)[2]
    hg = h.detach().requires_grad_()
    wg = w.detach().requires_grad_()
    assert torch.equal(torch.autograd.grad((fn(hg, w)[0] * g).sum(), hg)[0], both[0])
    assert torch.equal(torch.autograd.grad((fn(h, wg)[0] * g).sum(), wg)[0], both[1])


def test_fused_linear_under_autocast_computes_fp32(device):
    """Under autocast (bf16) with fp32 inputs the op still computes in fp32: fp32-tight against fp64."""
    h = torch.randn(9, 24, device=device)
    w = torch.randn(300, 24, device=device) / 5
    y = torch.randint(0, 300, (9,), device=device)
    g, gh = (torch.randn(9, device=device, dtype=torch.float64) for _ in range(2))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = run(lambda h, w: U.fused_linear_logprobs(h, w, y, return_entropy=True, impl="triton"), [h, w], g, gh)
    ref = run(lambda h, w: oracle_from_logits(h @ w.t(), y), [h.double(), w.double()], g, gh)
    for o, r, n in zip([ours[0], ours[1], *ours[2]], [ref[0], ref[1], *ref[2]], ["logp", "ent", "dh", "dw"]):
        assert_close_rule(o, r, None, atol=1e-5, name=n)


def _logits_loss(z, y):
    lp, ent = U.logprobs_from_logits(z * 1, y, temperature=0.7, return_entropy=True, impl="triton",
                                     inplace_backward=True)
    return (lp * 2 + ent).sum()


def _linear_loss(h, w, b, y):
    lp, ent = U.fused_linear_logprobs(h, w, y, bias=b, temperature=0.7, return_entropy=True, impl="triton")
    return (lp * 2 + ent).sum()


def _compiled_matches_eager(fn, leaves, backend):
    a = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in leaves]
    e = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in leaves]
    out = torch.compile(fn, fullgraph=True, backend=backend)(*a)
    out.backward()
    ref = fn(*e)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for x, y in zip(a, e):
        if x.is_floating_point():
            torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("op", ["logits", "linear"])
def test_compile_fullgraph_aot_eager(op, device):
    """torch.compile(fullgraph=True) traces through the custom ops (fwd + bwd, in-place bwd included).
    On CPU the graph runs with the aot_eager backend (Inductor's CPU C++ build takes ~30 s on this box);
    the Inductor backend is the gpu-marked test below."""
    y = torch.randint(0, 300, (2, 7), device=device)
    y[0, 3] = -100
    if op == "logits":
        _compiled_matches_eager(_logits_loss, [torch.randn(2, 7, 300, device=device), y], "aot_eager")
    else:
        leaves = [torch.randn(2, 7, 16, device=device), torch.randn(300, 16, device=device),
                  torch.randn(300, device=device), y]
        _compiled_matches_eager(_linear_loss, leaves, "aot_eager")


def test_custom_ops_opcheck(device):
    from torch.library import opcheck
    x = torch.randn(5, 300, device=device, requires_grad=True)
    y = torch.randint(0, 300, (5,), device=device)
    opcheck(torch.ops.unirl_fast.logprobs_fwd.default, (x, y, 0.7, -100, True, False))
    h = torch.randn(5, 16, device=device, requires_grad=True)
    w = torch.randn(300, 16, device=device, requires_grad=True)
    b = torch.randn(300, device=device, requires_grad=True)
    opcheck(torch.ops.unirl_fast.fused_linear_logprobs_fwd.default, (h, w, b, y, 0.7, -100, True))


@pytest.mark.gpu
def test_compile_fullgraph_inductor_gpu():
    dev = torch.device("cuda")
    y = torch.randint(0, 3000, (4, 63), device=dev)
    z = torch.randn(4, 63, 3000, device=dev, dtype=torch.bfloat16)
    _compiled_matches_eager(_logits_loss, [z, y], "inductor")
    leaves = [torch.randn(4, 63, 256, device=dev, dtype=torch.bfloat16),
              torch.randn(3000, 256, device=dev, dtype=torch.bfloat16) / 16,
              torch.randn(3000, device=dev, dtype=torch.bfloat16), y]
    _compiled_matches_eager(_linear_loss, leaves, "inductor")


BENCH_SHAPES = {"qwen-1.5b": (8, 1024, 1536), "qwen-3b": (8, 1024, 2048), "qwen-7b": (16, 1024, 3584),
                "long": (1, 65536, 2048)}
V_QWEN = 151936


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(BENCH_SHAPES))
def test_fused_linear_bench_shapes_gpu(shape):
    """docs/benchmarks.md shapes, bf16: logp/entropy on 256 sampled tokens vs fp64, and dh/dW vs the torch bf16
    baseline with the tolerance rule (fp64 gradients of a sampled-token loss)."""
    dev = torch.device("cuda")
    B, L, H = BENCH_SHAPES[shape]
    h = torch.randn(B, L, H, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(V_QWEN, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    y = torch.randint(0, V_QWEN, (B, L), device=dev)
    y[:, ::7] = -100
    rows = torch.randperm(B * L, device=dev)[:256]  # distinct rows: dW sums each once
    hs, ys = h.view(-1, H)[rows], y.view(-1)[rows]
    # gradients of a loss on the sampled tokens only (upstream grads zero elsewhere)
    g = torch.zeros(B * L, device=dev, dtype=torch.float64)
    g[rows] = torch.randn(256, device=dev, dtype=torch.float64)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    ours = run(lambda h, w: U.fused_linear_logprobs(h, w, y.view(-1), temperature=0.9, return_entropy=True),
               [h.view(-1, H), w], g, g * 0.5)
    peak = torch.cuda.max_memory_allocated() - base_mem
    lp, ent = ours[0], ours[1]
    ref_lp, ref_ent = oracle_from_logits(hs.double() @ w.double().t(), ys, 0.9)
    base_lp, base_ent = linear_baseline(hs, w, ys, None, 0.9, True)
    assert_close_rule(lp[rows], ref_lp, base_lp, atol=ATOL, name="logp")
    assert_close_rule(ent[rows], ref_ent, base_ent, atol=ATOL, name="entropy")
    sub = run(lambda hs, w: linear_baseline(hs, w, ys, None, 0.9, True), [hs, w], g[rows], g[rows] * 0.5)
    ref = run(lambda hs, w: oracle_from_logits(hs @ w.t(), ys, 0.9), [hs.double(), w.double()], g[rows],
              g[rows] * 0.5)
    assert_close_rule(ours[2][0][rows], ref[2][0], sub[2][0], atol=ATOL, name="dhidden")
    assert_close_rule(ours[2][1], ref[2][1], sub[2][1], atol=ATOL, name="dweight")
    # one logits chunk (512 MiB bf16) + fp32 dh accumulator + grads: far below the [N, V] logits
    assert peak < 1.5 * 2 ** 30 + B * L * H * 4 + 2 * w.numel() * 2 + 2 * h.numel() * 2, peak


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen-1.5b", "long"])
def test_logprobs_from_logits_bench_shapes_gpu(shape):
    """Full [N, V=151936] bf16 logits (long: 65536 rows, past a 65535 grid limit) vs fp64 on sampled rows."""
    dev = torch.device("cuda")
    B, L, _ = BENCH_SHAPES[shape]
    z = torch.randn(B, L, V_QWEN, device=dev, dtype=torch.bfloat16).mul_(2)  # long: 20 GB, no fp32 temporary
    y = torch.randint(0, V_QWEN, (B, L), device=dev)
    y[:, 1::5] = -100
    g = torch.randn(B, L, device=dev, dtype=torch.float64)
    ours = run(lambda z: U.logprobs_from_logits(z, y, return_entropy=True, inplace_backward=False), [z], g, g * 0.5)
    rows = torch.cat([torch.randint(0, B * L, (128,), device=dev), torch.tensor([B * L - 1], device=dev)])
    zf, yf = z.view(-1, V_QWEN)[rows], y.view(-1)[rows]
    ref = run(lambda z: oracle_from_logits(z, yf), [zf.double()], g.view(-1)[rows], g.view(-1)[rows] * 0.5)
    base = run(lambda z: logprobs_from_logits_ref(z, yf, return_entropy=True), [zf], g.view(-1)[rows],
               g.view(-1)[rows] * 0.5)
    assert_close_rule(ours[0].view(-1)[rows], ref[0], base[0], atol=ATOL, name="logp")
    assert_close_rule(ours[1].view(-1)[rows], ref[1], base[1], atol=ATOL, name="entropy")
    assert_close_rule(ours[2][0].view(-1, V_QWEN)[rows], ref[2][0], base[2][0], atol=ATOL, name="dlogits")


def test_fp64_logits_int32_targets(device):
    """Any float dtype in (fp64 here: computed in fp32, dlogits written in fp64), int32 targets."""
    z = torch.randn(3, 17, 777, device=device, dtype=torch.float64) * 4
    y = torch.randint(0, 777, (3, 17), device=device, dtype=torch.int32)
    y[1, 4] = -100
    g, gh = (torch.randn(3, 17, device=device, dtype=torch.float64) for _ in range(2))
    ours = run(lambda x: U.logprobs_from_logits(x, y, return_entropy=True, impl="triton"), [z], g, gh)
    base = run(lambda x: logprobs_from_logits_ref(x, y, return_entropy=True), [z], g, gh)
    ref = run(lambda x: oracle_from_logits(x, y), [z], g, gh)
    assert ours[2][0].dtype == torch.float64
    for o, r, b, n in zip([ours[0], ours[1], ours[2][0]], [ref[0], ref[1], ref[2][0]], [base[0], base[1], base[2][0]],
                          ["logp", "entropy", "dlogits"]):
        assert_close_rule(o, r, b, atol=ATOL, name=n)
