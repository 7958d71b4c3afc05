"""No op reads memory it did not write.

Every float buffer made by torch.empty / empty_like / empty_strided is filled with NaN (a deterministic stand-in for
whatever bit pattern an allocator leaves), and every GEMM reads whole rows of a strided operand up to its row stride,
multiplying the lanes past the row end by zero, as torch 2.13's CPU oneDNN bf16 GEMM does on some CPUs (and nothing
guarantees a GPU GEMM never does). The fused head ops must still give finite outputs and gradients, on the reference
and the Triton paths, in bf16, fp16 and fp32, with logits in the inputs' dtype or in fp32 (`logits_dtype`), with a
vocabulary that is not a multiple of 8 (so the 16-byte aligned logits rows have padding columns).
"""
import pytest
import torch

import unirl_fast as U

B, L, H, V = 3, 47, 31, 123  # V % 8 != 0: every aligned row has padding lanes


@pytest.fixture
def poisoned(monkeypatch):
    real = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poison(name):
        def make(*args, **kwargs):
            out = real[name](*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out
        return make

    for name in real:
        monkeypatch.setattr(torch, name, poison(name))
    probe = torch.empty(4, 9)
    assert probe.isnan().all()  # the poison is live for code that allocates through torch
    _lane_reading_gemms(monkeypatch)


def _padded(a, b):
    """(a, b) widened so that a's rows run to their stride (the lanes a vectorised GEMM may read) and b gets zero
    rows to match; unchanged when a has no padding inside its storage."""
    if a.dim() != 2 or a.stride(1) != 1 or a.stride(0) <= a.size(1) or a.size(0) == 0:
        return a, b
    room = a.untyped_storage().nbytes() // a.element_size() - a.storage_offset()
    if room < a.size(0) * a.stride(0):
        return a, b
    full = a.as_strided((a.size(0), a.stride(0)), (a.stride(0), 1))
    return full, torch.cat([b, b.new_zeros(a.stride(0) - a.size(1), b.size(1))])


def _lane_reading_gemms(monkeypatch):
    mm, addmm, addmm_ = torch.mm, torch.addmm, torch.Tensor.addmm_
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: mm(*_padded(a, b), **kw))
    monkeypatch.setattr(torch, "addmm", lambda c, a, b, **kw: addmm(c, *_padded(a, b), **kw))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda c, a, b, **kw: addmm_(c, *_padded(a, b), **kw))
    z = torch.full((2, 8), float("nan"))[:, :5].copy_(torch.ones(2, 5))
    assert torch.mm(z, torch.ones(5, 3)).isnan().all()  # the emulation reads the padding, like the real GEMM


def _head(dtype, device):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(B, L, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.2).to(device, dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (B, L), generator=g).to(device)
    y[0, :5] = -100
    return h, w, b, y


def _finite(*tensors):
    for t in tensors:
        bad = int((~torch.isfinite(t.float())).sum())
        assert bad == 0, f"{tuple(t.shape)} has {bad} non-finite values"


IMPLS = ["reference", "triton"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LOGITS = [None, torch.float32]  # fp32 logits of 16-bit inputs; for fp32 inputs the same run as None


def _dtype_id(d):
    return "inputs_dtype" if d is None else str(d).split(".")[-1]


@pytest.mark.parametrize("logits_dtype", LOGITS, ids=lambda d: "logits_" + _dtype_id(d))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_fused_linear_logprobs_reads_no_uninitialised_memory(poisoned, device, impl, dtype, logits_dtype):
    h, w, b, y = _head(dtype, device)
    logp, ent = U.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, impl=impl, logits_dtype=logits_dtype)
    _finite(logp, ent)
    (logp.sum() + 0.1 * ent.sum()).backward()
    _finite(h.grad, w.grad, b.grad)


@pytest.mark.parametrize("logits_dtype", LOGITS, ids=lambda d: "logits_" + _dtype_id(d))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_fused_linear_policy_loss_reads_no_uninitialised_memory(poisoned, device, impl, dtype, logits_dtype):
    h, w, b, y = _head(dtype, device)
    g = torch.Generator().manual_seed(1)
    old = (torch.randn(B, L, generator=g) * 0.3 - 4.0).to(device)
    adv = torch.randn(B, generator=g).to(device)
    mask = (y != -100)
    loss, metrics = U.fused_linear_policy_loss(h, w, y, old, adv, mask, bias=b, ref_logp=old, beta=0.04,
                                               entropy_coef=0.01, impl=impl, logits_dtype=logits_dtype)
    _finite(loss, *[v for v in metrics.values() if torch.is_tensor(v)])
    loss.backward()
    _finite(h.grad, w.grad, b.grad)
