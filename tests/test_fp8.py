"""FP8 unified precision flow (FORMULAS.md section 6): quantizers, FP8Linear, convert_to_fp8, mismatch metrics.

Oracles written here, independent of the package: a plain quantizer (explicit block reshapes) and fp64 matmuls
of its dequantized operands. The Triton kernels run on CPU under the interpreter (their FP8 cast is done by
torch there, see kernels/fp8_quant.py); the real FP8 GEMM paths (scaled_mm, Triton on tensor cores) are GPU-marked.
"""
import contextlib
import copy

import pytest
import torch
from tolerance import rel_err, scale_free_err
from torch import nn

from unirl_fast.fp8 import (
    FP8Linear,
    convert_to_fp8,
    dequantize_fp8,
    fp8_weight_cache,
    invalidate_fp8_weights,
    quantize_fp8,
    rollout_mismatch,
    scaled_mm_failure,
)

E4M3 = torch.float8_e4m3fn
# DeepGEMM's bound for its FP8 GEMMs; E4M3 on both operands of Gaussian data measures ~6.6e-4 here
FP8_VS_EXACT_BOUND = 1e-3
# same FP8 operands, different fp32 summation order, one bf16 rounding: only rare 1-ulp bf16 flips remain
SAME_OPERANDS_BOUND = 1e-6
IMPLS = ["reference", "triton"]


def plain_quant(x, gr, gc):
    """Textbook block quantizer: x [R, C] -> q [R_pad, C] fp8, s [R_pad/gr, C/gc] (zero rows pad R to gr)."""
    x = x.double().float()
    r_pad = -(-x.shape[0] // gr) * gr
    x = torch.cat([x, x.new_zeros(r_pad - x.shape[0], x.shape[1])])
    blocks = x.reshape(r_pad // gr, gr, x.shape[1] // gc, gc)
    amax = blocks.abs().amax(dim=(1, 3))
    s = torch.maximum(amax, torch.tensor(1e-12)) / 448.0
    q = torch.clamp(blocks / s[:, None, :, None], -448.0, 448.0).to(E4M3).reshape(r_pad, -1)
    return q, s


def plain_deq(q, s):
    gr, gc = q.shape[0] // s.shape[0], q.shape[1] // s.shape[1]
    return q.double() * s.double().repeat_interleave(gr, 0).repeat_interleave(gc, 1)


def natural(q, s, grouping, rows):
    """Package layouts -> (q [R_pad, C], s [R_pad/gr, C/gc]) as plain_quant returns them."""
    if grouping == "128x1":
        return q.t(), s.t()
    return q, s


GROUP_SHAPES = {"1x128": (1, 128), "128x1": (128, 1), "128x128": (128, 128)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grouping,shape", [("1x128", (37, 384)), ("128x1", (203, 256)), ("128x128", (256, 384)),
                                            ("1x128", (1, 128)), ("128x1", (128, 128))],
                         ids=["tok-37x384", "col-203x256", "blk-256x384", "tok-1x128", "col-128x128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantizer_matches_plain(impl, grouping, shape, dtype, device):
    x = (torch.randn(shape, device=device) * torch.logspace(-3, 3, shape[1], device=device)).to(dtype)
    q, s = quantize_fp8(x, grouping, impl=impl)
    gr, gc = GROUP_SHAPES[grouping]
    q_ref, s_ref = plain_quant(x.cpu(), gr, gc)
    q_n, s_n = natural(q.cpu(), s.cpu(), grouping, shape[0])
    assert q.dtype == E4M3 and s.dtype == torch.float32
    assert torch.equal(q_n.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s_n, s_ref)
    # round trip: E4M3 keeps 3 mantissa bits (relative half-ulp 2^-4); subnormal spacing 2^-9 in units of s
    x_hat = plain_deq(q_ref, s_ref)[: shape[0]]
    sb = s_ref.double().repeat_interleave(gr, 0).repeat_interleave(gc, 1)[: shape[0]]
    assert bool(((x_hat - x.cpu().double()).abs() <= x.cpu().double().abs() * 2 ** -4 + sb * 2 ** -10).all())
    assert torch.equal(dequantize_fp8(q, s).cpu(), plain_deq(q.cpu(), s.cpu()).float())  # fp32 product


@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_noncontiguous_input(impl, device):
    x = torch.randn(256, 200, device=device).t()  # [200, 256], strides (1, 200)
    for grouping in ("1x128", "128x1"):
        q, s = quantize_fp8(x, grouping, impl=impl)
        q2, s2 = quantize_fp8(x.contiguous(), grouping, impl="reference")
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


@pytest.mark.parametrize("rows", [77, 256], ids=["R77", "R256"])
def test_fused_dual_quantizer_equals_two_calls(rows, device):
    from unirl_fast.fp8.quantize import _quantize_fp8_dual_triton

    x = torch.randn(rows, 384, device=device, dtype=torch.bfloat16) * 5
    x[:, 128:256] = 0.0
    q, s, qt, st = _quantize_fp8_dual_triton(x)
    for (a, sa), grouping in (((q, s), "1x128"), ((qt, st), "128x1")):
        b, sb = quantize_fp8(x, grouping, impl="reference")
        assert a.shape == b.shape and a.stride() == b.stride() and sa.shape == sb.shape
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grouping", ["1x128", "128x1", "128x128"])
def test_zero_blocks(impl, grouping, device):
    x = torch.randn(256, 256, device=device)
    x[:128, :128] = 0.0
    q, s = quantize_fp8(x, grouping, impl=impl)
    gr, gc = GROUP_SHAPES[grouping]
    q_n, s_n = natural(q, s, grouping, 256)
    tiny = torch.tensor(1e-12, dtype=torch.float32) / 448.0
    zs = s_n[: 128 // gr, : 128 // gc]
    assert torch.equal(zs.cpu(), tiny.expand_as(zs))
    assert torch.equal(q_n[:128, :128].float(), torch.zeros(128, 128, device=device))
    assert bool((s_n[128 // gr:, 128 // gc:] > 1e-6).all())


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy inf/inf
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("grouping", ["1x128", "128x1", "128x128"])
def test_nonfinite_input_raises(impl, bad, grouping, device):
    x = torch.randn(256, 256, device=device)
    x[200, 131] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8(x, grouping, impl=impl)


def test_quantizer_bad_shapes():
    with pytest.raises(ValueError, match="200 columns"):
        quantize_fp8(torch.randn(4, 200))
    with pytest.raises(ValueError, match="100 rows"):
        quantize_fp8(torch.randn(100, 256), "128x128")
    with pytest.raises(ValueError, match="grouping"):
        quantize_fp8(torch.randn(4, 256), "1x64")


@pytest.mark.parametrize("features", [(200, 256), (256, 100), (64, 64)], ids=["in200", "out100", "64x64"])
def test_fp8linear_rejects_non_multiple_of_128(features):
    with pytest.raises(ValueError, match="divisible by 128"):
        FP8Linear(*features)
    with pytest.raises(ValueError, match="divisible by 128"):
        FP8Linear.from_linear(nn.Linear(*features))


def _oracle(x2, w, dy):
    """fp64 products of the plain-quantized operands, each GEMM output rounded to bf16."""
    xq, xs = plain_quant(x2, 1, 128)
    wq, ws = plain_quant(w, 128, 128)
    y = (plain_deq(xq, xs) @ plain_deq(wq, ws).t()).bfloat16()
    gq, gs = plain_quant(dy, 1, 128)
    dx = (plain_deq(gq, gs) @ plain_deq(wq, ws)).bfloat16()
    gtq, gts = plain_quant(dy, 128, 1)
    xtq, xts = plain_quant(x2, 128, 1)
    dw = (plain_deq(gtq, gts).t() @ plain_deq(xtq, xts)).bfloat16()
    return y, dx, dw


@pytest.mark.parametrize("backend", ["emulation", "triton"])
@pytest.mark.parametrize("lead,k,n,dtype", [((77,), 256, 384, torch.float32), ((2, 33), 128, 256, torch.bfloat16)],
                         ids=["M77-256x384-fp32", "B2xL33-128x256-bf16"])
def test_fp8linear_vs_oracle(backend, lead, k, n, dtype, device):
    layer = FP8Linear(k, n, backend=backend, device=device, dtype=dtype)
    x = torch.randn(*lead, k, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, k).cpu(), dy.reshape(-1, n).cpu()
    w = layer.weight.detach().cpu()
    y_o, dx_o, dw_o = _oracle(x2, w, dy2)
    y_o = y_o.to(dtype) + layer.bias.detach().cpu()  # the layer adds the bias in the input dtype too
    assert y.dtype == dtype and x.grad.dtype == dtype and layer.weight.grad.dtype == dtype
    assert scale_free_err(y.reshape(-1, n).cpu(), y_o) < SAME_OPERANDS_BOUND
    assert scale_free_err(x.grad.reshape(-1, k).cpu(), dx_o) < SAME_OPERANDS_BOUND
    assert scale_free_err(layer.weight.grad.cpu(), dw_o) < SAME_OPERANDS_BOUND
    assert rel_err(layer.bias.grad.cpu(), dy2.double().sum(0)) < (1e-6 if dtype == torch.float32 else 4e-3)
    # against exact math (no FP8): the recipe's own error, DeepGEMM's bound
    exact_y = x2.double() @ w.double().t()
    assert scale_free_err(y.reshape(-1, n).cpu() - layer.bias.detach().cpu(), exact_y) < FP8_VS_EXACT_BOUND
    assert scale_free_err(x.grad.reshape(-1, k).cpu(), dy2.double() @ w.double()) < FP8_VS_EXACT_BOUND
    assert scale_free_err(layer.weight.grad.cpu(), dy2.double().t() @ x2.double()) < FP8_VS_EXACT_BOUND


def _saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", ["emulation", "triton"])
def test_fp8linear_empty_batch(backend, device):
    layer = FP8Linear(128, 256, backend=backend, device=device)
    x = torch.randn(0, 128, device=device, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 256) and x.grad.shape == (0, 128)
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def test_save_fp8_activation_both_ways():
    base = FP8Linear(256, 384, bias=False, backend="emulation", save_fp8_activation=True)
    other = FP8Linear.from_linear(base, backend="emulation", save_fp8_activation=False)
    x = torch.randn(150, 256, dtype=torch.bfloat16)
    dy = torch.randn(150, 384, dtype=torch.bfloat16)
    results = []
    for layer in (base, other):
        xi = x.clone().requires_grad_()
        y, saved = _saved_tensors(lambda layer=layer, xi=xi: layer(xi))
        y.backward(dy)
        results.append((y, xi.grad, base.weight.grad.clone(), saved))
        base.weight.grad = None
    (y1, dx1, dw1, s1), (y2, dx2, dw2, s2) = results
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    assert any(t.dtype == E4M3 and t.shape == (256, 256) for t in s1)  # x^T in FP8, tokens padded to 256
    assert not any(t.dtype == torch.bfloat16 and t.shape == (150, 256) for t in s1)
    assert any(t.dtype == torch.bfloat16 and t.shape == (150, 256) for t in s2)


def _emulated(layer, x):
    """What an FP8Linear of the layer's CURRENT weights computes: a fresh module over copies (no shared state)."""
    fresh = FP8Linear.from_linear(nn.Linear(layer.in_features, layer.out_features), backend="emulation")
    fresh.weight = nn.Parameter(layer.weight.detach().clone())
    fresh.bias = nn.Parameter(layer.bias.detach().clone())
    with torch.no_grad():
        return fresh(x)


def _flat_buffer(layer):
    """ZeRO-1/2's layout: the parameters become views of one flat buffer; returns the update that refreshes them
    by an in-place copy into that buffer (through `.data`, so the parameters' version counters never move)."""
    flat = torch.cat([p.detach().reshape(-1) for p in layer.parameters()])
    o = 0
    for p in layer.parameters():
        p.data = flat[o:o + p.numel()].view_as(p)
        o += p.numel()

    def update():
        version = layer.weight._version
        flat.data.copy_(flat.data - 0.5)
        assert layer.weight._version == version  # invisible to any (storage, version) key
    return update


UPDATES = {
    "adamw_fused": lambda layer: torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True),
    "adamw_foreach": lambda layer: torch.optim.AdamW(layer.parameters(), lr=0.5, foreach=True),
    "sgd": lambda layer: torch.optim.SGD(layer.parameters(), lr=0.5),
    "flat_buffer_copy": None,
}


@pytest.mark.parametrize("update", list(UPDATES), ids=list(UPDATES))
@pytest.mark.parametrize("cached", [False, True], ids=["plain", "in_cache_block"])
def test_fp8_weights_never_stale(update, cached):
    """After any kind of weight update the FP8 forward equals the emulation of the current weights exactly, with a
    rollout-style (no-grad) forward and a training forward before the update; `in_cache_block` also keeps one
    fp8_weight_cache block open across the update (an optimizer step clears it; the flat-buffer copy is followed
    by the explicit invalidation the block's contract asks for)."""
    layer = FP8Linear(256, 256, backend="emulation")
    x = torch.randn(9, 256)
    step = _flat_buffer(layer) if UPDATES[update] is None else UPDATES[update](layer).step
    block = fp8_weight_cache(layer) if cached else contextlib.nullcontext()
    with block:
        with torch.no_grad():
            y0 = layer(x)
        layer(x).square().sum().backward()
        step()
        if cached and UPDATES[update] is None:
            invalidate_fp8_weights(layer)
        with torch.no_grad():
            y_rollout = layer(x)
        y_train = layer(x)
    want = _emulated(layer, x)
    assert not torch.equal(y_rollout, y0)
    assert torch.equal(y_rollout, want) and torch.equal(y_train.detach(), want)


def test_fp8_weight_cache_is_scoped(monkeypatch):
    """Outside a block every forward quantizes the weight; inside, no-grad forwards share one quantization and a
    forward that builds a graph still re-quantizes; leaving the block drops the copy; copies start outside."""
    import unirl_fast.fp8.linear as lin

    calls = []
    real = lin._quant
    monkeypatch.setattr(lin, "_quant", lambda x, grouping, *a: calls.append(grouping) or real(x, grouping, *a))
    model = nn.Sequential(FP8Linear(128, 256, backend="emulation"), FP8Linear(256, 128, backend="emulation"))
    x = torch.randn(5, 128)

    def weight_quants(fn):
        calls.clear()
        fn()
        return calls.count("128x128")
    with torch.no_grad():
        assert weight_quants(lambda: (model(x), model(x))) == 4  # no block: every forward
    with fp8_weight_cache(model), torch.no_grad():
        assert weight_quants(lambda: [model(x) for _ in range(5)]) == 2  # once per layer
        with fp8_weight_cache(model):  # nested
            assert weight_quants(lambda: model(x)) == 0
        assert model[0]._wcache is not None and copy.deepcopy(model)[0]._cache_depth == 0
    assert model[0]._wcache is None and model[0]._cache_depth == 0
    with fp8_weight_cache(model):
        assert weight_quants(lambda: model(x).sum().backward()) == 2  # a graph-building forward: fresh weights
        with torch.no_grad():
            model(x)
        assert model[0]._wcache is not None
        torch.optim.SGD(model.parameters(), lr=0.1).step()  # any optimizer step clears every cache
        assert model[0]._wcache is None and model[1]._wcache is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [384, 512], ids=["K-3-blocks", "K-4-blocks"])
def test_scaled_mm_scale_layouts(impl, k, device):
    """The layouts torch._scaled_mm's blockwise checks ask for, built from our quantizers' outputs: A scales
    outer-dim-major, 128x128 B scales with 16-byte aligned strides (K/128 = 3 padded to 4), token-grouped B scales
    (the wgrad operand, from the 128x1 quantizer) outer-dim-major, both wgrad scales without a copy."""
    from unirl_fast.fp8.gemm import scaled_mm_scales

    m, n = 200, 256
    aq, sa = quantize_fp8(torch.randn(m, k, device=device), "1x128", impl=impl)
    _, sw = quantize_fp8(torch.randn(n, k, device=device), "128x128", impl=impl)
    scale_a, scale_b = scaled_mm_scales(sa, sw, n)
    assert scale_a.shape == (m, k // 128) and scale_a.stride() == (1, m)
    assert scale_b.shape == (k // 128, n // 128) and scale_b.stride() == (1, -(-(k // 128) // 4) * 4)
    assert torch.equal(scale_b, sw.t())
    tokens = 300  # the wgrad GEMM: dW [n, k] = dy^T [n, T_pad] x (x^T [k, T_pad])^T, both 128x1 along tokens
    _, sdy = quantize_fp8(torch.randn(tokens, n, device=device), "128x1", impl=impl)
    _, sx = quantize_fp8(torch.randn(tokens, k, device=device), "128x1", impl=impl)
    scale_a, scale_b = scaled_mm_scales(sdy, sx, k)
    t_blocks = -(-tokens // 128)
    assert scale_a.shape == (n, t_blocks) and scale_a.stride() == (1, n) and scale_a.data_ptr() == sdy.data_ptr()
    assert scale_b.shape == (t_blocks, k) and scale_b.stride() == (k, 1) and scale_b.data_ptr() == sx.data_ptr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on hardware without FP8 GEMMs")
def test_real_fp8_gemm_requested_on_cpu_raises(monkeypatch):
    x = torch.randn(4, 128)
    with pytest.raises(RuntimeError, match="FP8 tensor cores"):
        FP8Linear(128, 128, backend="scaled_mm")(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="FP8 tensor cores"):
        FP8Linear(128, 128, backend="triton")(x)
    with pytest.raises(ValueError, match="backend"):
        FP8Linear(128, 128, backend="cublas")


def _tiny_lm(kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if kind == "llama":  # untied head with a 128-divisible vocab: skipped because it is the head, not by shape
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=False)
        return LlamaForCausalLM(cfg)
    cfg = Qwen2Config(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def _token_logp(model, ids):
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_convert_to_fp8_transformers(kind):
    model = _tiny_lm(kind)
    params_before = {n: p for n, p in model.named_parameters()}
    names = convert_to_fp8(model, backend="emulation")
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expect = {n for n, m in lins.items() if n != "lm_head" and m.in_features % 128 == 0 and m.out_features % 128 == 0}
    assert set(names) == expect and names
    assert all(isinstance(lins[n], FP8Linear) for n in names)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    if kind == "llama":  # kv heads 1 x head_dim 64 -> k/v projections have 64 outputs: skipped by shape
        assert "model.layers.0.self_attn.k_proj" not in names and "model.layers.0.self_attn.q_proj" in names
        assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear
    else:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {n: p for n, p in model.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for n in names:
        g = model.get_submodule(n).weight.grad
        assert g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0, n
    only_mlp = convert_to_fp8(_tiny_lm(kind), lambda n, m: ".mlp." in n)
    assert only_mlp and all(".mlp." in n for n in only_mlp)


def test_convert_to_fp8_diffusion_transformer():
    SD3Transformer2DModel = pytest.importorskip("diffusers").SD3Transformer2DModel  # the [diffusion] extra

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                  num_attention_heads=2, joint_attention_dim=128, caption_projection_dim=128,
                                  pooled_projection_dim=128, out_channels=4, pos_embed_max_size=16)
    names = convert_to_fp8(model, backend="emulation")
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.1.ff.net.2" in names
    assert not any("norm" in n or "time_text_embed" in n for n in names)
    assert type(model.transformer_blocks[0].norm1.linear) is nn.Linear and type(model.proj_out) is nn.Linear
    out = model(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 7, 128),
                pooled_projections=torch.randn(2, 128), timestep=torch.tensor([500.0, 20.0])).sample
    out.square().mean().backward()
    assert all(model.get_submodule(n).weight.grad is not None for n in names)


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("qwen2", torch.float32), ("qwen2", torch.bfloat16)],
                         ids=["llama-fp32", "qwen2-fp32", "qwen2-bf16"])
def test_unified_rollout_equals_training(kind, dtype):
    model = _tiny_lm(kind).to(dtype)
    plain = copy.deepcopy(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    convert_to_fp8(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 24))
    mask = torch.rand(3, 23) > 0.2
    model.eval()
    with torch.no_grad():
        rollout = _token_logp(model, ids)
    model.train()
    train = _token_logp(model, ids)
    train.sum().backward()
    assert train.requires_grad and torch.equal(rollout, train.detach())
    same = rollout_mismatch(rollout, train, mask)
    assert same["k3"].item() == 0.0 and same["mean_exp_abs_dlogp"].item() == 1.0
    for ref in (plain, bf16):
        with torch.no_grad():
            other = _token_logp(ref, ids)
        mm = rollout_mismatch(rollout, other, mask)
        assert mm["k3"].item() > 1e-7 and mm["max_abs_dlogp"].item() > 1e-3, mm


def test_rollout_mismatch_formula():
    r = torch.randn(4, 9) - 2
    t = r + 0.3 * torch.randn(4, 9)
    mask = torch.rand(4, 9) > 0.3
    mask[0] = False
    d = (t - r).double()[mask]
    out = rollout_mismatch(r, t, mask.int())
    assert torch.allclose(out["k3"], (torch.exp(d) - d - 1).mean(), rtol=1e-12)
    assert torch.allclose(out["mean_exp_abs_dlogp"], torch.exp(d.abs()).mean(), rtol=1e-12)
    assert out["max_abs_dlogp"].item() == d.abs().max().item() and out["tokens"].item() == mask.sum().item()
    empty = rollout_mismatch(r, t, torch.zeros(4, 9, dtype=torch.bool))
    assert empty["k3"].item() == 0.0 and empty["mean_exp_abs_dlogp"].item() == 1.0
    with pytest.raises(ValueError, match="mask"):
        rollout_mismatch(r, t, mask[:, :5])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["block", "row"])
def test_scaled_mm_probe_reports(kind):
    reason = scaled_mm_failure("cuda", kind)
    if reason is not None:
        pytest.skip(f"blockwise scaled_mm not used for {kind}: {reason}")
    from unirl_fast.fp8.gemm import gemm_emulation, gemm_scaled_mm
    a = torch.randn(1000, 512, device="cuda")
    b = torch.randn(768, 512, device="cuda")
    aq, sa = quantize_fp8(a, "1x128")
    bq, sb = quantize_fp8(b, "128x128" if kind == "block" else "1x128")
    assert scale_free_err(gemm_scaled_mm(aq, sa, bq, sb), gemm_emulation(aq, sa, bq, sb)) < SAME_OPERANDS_BOUND


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "scaled_mm"])
@pytest.mark.parametrize("m,k,n", [(1000, 512, 768), (4096, 1024, 3584)], ids=["M1000", "M4096"])
def test_fp8linear_gpu_backends_vs_emulation(backend, m, k, n):
    if backend == "scaled_mm" and (scaled_mm_failure("cuda", "block") or scaled_mm_failure("cuda", "row")):
        pytest.skip(f"scaled_mm unusable: {scaled_mm_failure('cuda', 'block') or scaled_mm_failure('cuda', 'row')}")
    layer = FP8Linear(k, n, backend=backend, device="cuda", dtype=torch.bfloat16)
    emu = FP8Linear.from_linear(layer, backend="emulation")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    outs = []
    for mod in (layer, emu):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(dy)
        outs.append((y, xi.grad, mod.weight.grad.clone()))
        layer.weight.grad = None
    for got, want in zip(*outs):
        assert scale_free_err(got, want) < SAME_OPERANDS_BOUND


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_emulation_exact_under_bf16_autocast(x_dtype):
    """--fp8 --precision bf16: the emulated GEMMs ignore autocast (they are the exact fp32 emulation), so a layer
    under bf16 autocast gives the same output and gradients as without it (before: the dequantized fp32 matmul ran
    in bf16 under autocast, ~8e-3 off)."""
    torch.manual_seed(0)
    layer = FP8Linear(256, 128, backend="emulation")
    x = torch.randn(9, 256, dtype=x_dtype)
    outs = []
    for autocast in (False, True):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xi)
        (y.float() * torch.linspace(-1, 1, 128)).sum().backward()
        outs.append((y.detach(), xi.grad, layer.weight.grad.clone()))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and torch.equal(a, b)
