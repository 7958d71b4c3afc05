"""Fused LM head + token log-probs / entropy without the [N, V] logits (FORMULAS.md section 1).

Legend: N tokens, H hidden, V vocab, T temperature; Nc / Vc the token / vocab chunk widths.

The GEMMs are cuBLAS (`torch.mm` in the inputs' dtype, fp32 accumulate); the softmax work is the
one-pass row kernels of `logprobs.py`. Only per-token fp32 vectors (logp, H, lse) outlive a chunk.

Forward, chunked over tokens (the row reduction needs whole rows):

    for each token chunk c (Nc rows):  Z_c = h_c @ W^T (+ b)   [Nc, V]  -> row kernel -> logp, H, lse

Backward, chunked over the vocabulary. Given the saved lse and H, dz is elementwise in (z_j, lse, H),
so each vocab slice is independent:

    for each vocab slice v (Vc cols):  Z_v = h @ W_v^T (+ b_v)  [N, Vc]
                                       dZ_v = bwd kernel(Z_v), written over Z_v in place
                                       dW_v = dZ_v^T @ h       (written once: exact, no accumulation)
                                       db_v = sum_n dZ_v
                                       dh  += dZ_v @ W_v        (fp32 accumulator for 16-bit inputs)

Slicing the vocabulary in backward (instead of tokens) means dW is produced by a single GEMM per
slice, rounded once like torch's own dW; no fp32 [V, H] accumulator (2.2 GB at V=151936, H=3584) and
no bf16 rounding per token chunk. The price is an fp32 [N, H] accumulator for dh. Where cuBLAS can take
an fp32 C with 16-bit A, B (`torch.addmm(..., out_dtype=torch.float32)`, probed once) the dh GEMM adds
into it directly (8 N H bytes per slice); otherwise a 16-bit temporary and an add cost 12 N H bytes per
slice, ~8% of the GEMM time at the `long` shape (37 slices).

FLOPs: forward 2NHV; backward 6NHV (recompute + dh + dW): 8NHV in all.
Memory: one chunk of logits of at most CHUNK_ELEMS elements in the compute dtype (default 2^28, i.e.
512 MiB in bf16), so the peak does not grow with N, apart from the fp32 [N, H] dh accumulator and the
[N] vectors. When N exceeds CHUNK_ELEMS / MIN_VOCAB_CHUNK (2^20 tokens), vocab slices stop shrinking
and the chunk grows with N.
Inputs of different float dtypes are computed in their promoted dtype (autocast is disabled inside).

fp32 logits (`fp32_logits=True` with 16-bit inputs; the public op's `logits_dtype=torch.float32`): each chunk
Z_c = h_c W^T (+ b) is written in fp32 by the GEMM from the 16-bit operands (exact products, fp32 accumulate, no
16-bit rounding of the logits; `mm_fp32`), and the row kernels read fp32 rows (4-element vectors, rows on 16-byte
boundaries). The chunk keeps the same byte budget (CHUNK_ELEMS x the inputs' element size), so it holds half the
rows in forward. Backward writes dZ_v for the dW / dh GEMMs in the dtype `dlogits_dtype` picks:
- bf16: bf16, written straight from the fp32 logits by the row kernel (rounded to nearest once), and the two GEMMs
  stay bf16 tensor-core GEMMs with fp32 accumulation, as verl's fused kernel does. The slice then holds the fp32
  logits and the bf16 dlogits: 6 bytes a logit, a third of the columns of the bf16 path's slice. Against the fp64
  oracle this rounding costs 1.2-1.8x the error of torch's fp32-logits backward, whose only rounding is the
  gradient's own to bf16 (tests/test_logits_fp32.py, Triton interpreter: dh 1.3-1.5x, dW 1.3-1.5x, db 1.2x here,
  dh 1.8x in fused_linear_policy_loss; the tolerance rule allows 2x). Splitting dZ into two bf16 halves reached
  1.0x in a torch emulation, for two more GEMMs (10NHV backward instead of 6NHV): not worth it to us.
- fp16: fp32, and the two GEMMs run in fp32 on operands upcast for them (h once, [N, H] fp32; W one slice at a
  time), 1.0x torch's error: fp16 dlogits lose small probabilities to underflow (in a torch emulation with an
  entropy-only gradient, dh 1.1x / 1.7x / 3.2x torch's error at V 3000 / 20000 / 150000). fused_linear_policy_loss
  already computes fp16 heads in fp32. On a GPU those are fp32 GEMMs (TF32 where torch's matmul precision allows).
"""
from __future__ import annotations

import functools

import torch

from ._rows import aligned_rows
from .logprobs import logprobs_bwd, logprobs_fwd

CHUNK_ELEMS = 1 << 28
MIN_VOCAB_CHUNK = 256
ROW_ALIGN = 128


def token_chunk(V: int, chunk_elems: int) -> int:
    """Rows per forward chunk: as many as fit in chunk_elems, a multiple of ROW_ALIGN when possible."""
    n = max(1, chunk_elems // max(V, 1))
    return n - n % ROW_ALIGN if n > ROW_ALIGN else n


def vocab_chunk(N: int, V: int, chunk_elems: int) -> int:
    """Vocab columns per backward slice (at least MIN_VOCAB_CHUNK, a multiple of it when possible)."""
    v = max(MIN_VOCAB_CHUNK, chunk_elems // max(N, 1))
    v -= v % MIN_VOCAB_CHUNK
    return min(V, v)


@functools.lru_cache(maxsize=None)
def _fp32_accumulate_ok(device, dtype) -> bool:
    """Whether `torch.addmm(C32, A16, B16, out_dtype=float32, out=C32)` (cuBLAS with an fp32 C, torch >= 2.8
    on CUDA) exists here and accumulates correctly in place; checked once per device and dtype on a small
    problem. Without it dh takes a 16-bit temporary and a separate add."""
    if device.type != "cuda":
        return False
    try:
        a = torch.randn(64, 40, device=device, dtype=dtype)
        b = torch.randn(40, 48, device=device, dtype=dtype)
        c = torch.randn(64, 48, device=device)
        want = c + a.float() @ b.float()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(torch.allclose(c, want, rtol=1e-4, atol=1e-3))
    except (RuntimeError, TypeError):
        return False


@functools.lru_cache(maxsize=None)
def _fp32_out_ok(device, dtype, with_bias) -> bool:
    """Whether `torch.mm(A16, B16, out_dtype=float32, out=C32)` (with_bias: `torch.addmm(b32, A16, B16,
    out_dtype=float32, out=C32)` with a [N] bias), cuBLAS writing fp32 from 16-bit operands (torch >= 2.8 on CUDA),
    exists here and is right; checked once per device, dtype and form on a small problem. Without it `mm_fp32`
    upcasts the operands."""
    if device.type != "cuda":
        return False
    try:
        a = torch.randn(64, 40, device=device, dtype=dtype)
        b = torch.randn(40, 48, device=device, dtype=dtype)
        bias = torch.randn(48, device=device) if with_bias else torch.zeros(48, device=device)
        c = torch.empty(64, 48, device=device)
        if with_bias:
            torch.addmm(bias, a, b, out_dtype=torch.float32, out=c)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=c)
        return bool(torch.allclose(c, a.float() @ b.float() + bias, rtol=1e-4, atol=1e-3))
    except (RuntimeError, TypeError):
        return False


def mm_fp32(a, b, bias=None, *, out):
    """out (fp32 [M, N]) = a @ b (+ bias) for 16-bit a [M, K], b [K, N] and a 16-bit bias [N]: exact products, fp32
    accumulation, the result never rounded to 16 bits. cuBLAS writes the fp32 result where torch has
    `mm` / `addmm(out_dtype=float32)` for a's dtype on its device (probed once, `_fp32_out_ok`); elsewhere (the CPU)
    the operands are upcast for this GEMM only, b in column blocks whose fp32 copies stay below half of b's size."""
    if _fp32_out_ok(a.device, a.dtype, bias is not None):
        if bias is None:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        else:
            torch.addmm(bias.float(), a, b, out_dtype=torch.float32, out=out)
        return out
    a32 = a.float()
    step = max(1, b.shape[1] // 4)
    for c in range(0, b.shape[1], step):
        o, b32 = out[:, c:c + step], b[:, c:c + step].float()
        if bias is None:
            torch.mm(a32, b32, out=o)
        else:
            torch.addmm(bias[c:c + step].float(), a32, b32, out=o)
    return out


def wide_logits(dtype, fp32_logits) -> bool:
    """Whether the logits are formed in fp32 instead of the inputs' dtype: asked for, and the inputs are 16-bit (fp32
    and fp64 inputs already have logits at least that wide)."""
    return bool(fp32_logits) and dtype in (torch.bfloat16, torch.float16)


def dlogits_dtype(dtype, wide):
    """dlogits dtype of the backward GEMMs: the inputs' dtype, except fp32 for fp16 inputs with fp32 logits (fp16
    dlogits underflow; see the module doc)."""
    return torch.float32 if wide and dtype == torch.float16 else dtype


def _logits(h, w, b, out=None, wide=False):
    if wide:
        if out is None:
            out = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=torch.float32)
        return mm_fp32(h, w.t(), b, out=out)
    if b is not None:
        return torch.addmm(b, h, w.t(), out=out)
    return torch.mm(h, w.t(), out=out)


def fused_linear_logprobs_fwd(h, w, b, y, temperature, ignore_index, return_entropy, chunk_elems=None,
                              fp32_logits=False):
    """h [N, H], w [V, H], b [V] | None (one float dtype), y [N] -> (logp, ent, lse) fp32 [N]. fp32_logits: form the
    logits chunks in fp32 for 16-bit inputs (same bytes per chunk, half the rows)."""
    N, V = h.shape[0], w.shape[0]
    wide = wide_logits(h.dtype, fp32_logits)
    zdt = torch.float32 if wide else h.dtype
    logp = torch.empty(N, device=h.device, dtype=torch.float32)
    ent = torch.zeros_like(logp)
    lse = torch.empty_like(logp)
    nc = token_chunk(V, (chunk_elems or CHUNK_ELEMS) * h.element_size() // zdt.itemsize)
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        z = _logits(h[n0:n1], w, b, out=aligned_rows(n1 - n0, V, zdt, h.device), wide=wide)  # 16-byte row starts
        lp, e, ls = logprobs_fwd(z, y[n0:n1], temperature, ignore_index, return_entropy)
        logp[n0:n1] = lp
        lse[n0:n1] = ls
        if return_entropy:
            ent[n0:n1] = e
    return logp, ent, lse


def _add_dh(dh, dz, w_v, acc_fp32):
    """dh += dz @ w_v: into the fp32 accumulator for 16-bit operands (cuBLAS adds into it directly where it can),
    in place otherwise. fp32 dz with 16-bit w_v (fp16 inputs with fp32 logits) multiplies the upcast slice."""
    if dz.dtype != w_v.dtype:
        dh.addmm_(dz, w_v.to(dz.dtype))
    elif acc_fp32 and _fp32_accumulate_ok(dz.device, dz.dtype):
        torch.addmm(dh, dz, w_v, out_dtype=torch.float32, out=dh)
    elif acc_fp32:
        dh += torch.mm(dz, w_v)
    else:
        dh.addmm_(dz, w_v)


def fused_linear_logprobs_bwd(h, w, b, y, lse, ent, g, gh, temperature, ignore_index, has_ent,
                              need_dh=True, need_dw=True, need_db=True, chunk_elems=None, fp32_logits=False):
    """Gradients (dh [N, H] | None, dw [V, H] | None, db [V] | None) in the inputs' dtype for upstream g, gh
    fp32 [N]; a gradient that is not needed costs nothing (a frozen head skips the dW GEMM). fp32_logits: recompute
    the logits in fp32 as the forward did; dlogits in `dlogits_dtype`."""
    N, H = h.shape
    V = w.shape[0]
    wide = wide_logits(h.dtype, fp32_logits)
    ddt = dlogits_dtype(h.dtype, wide)
    per_logit = (4 + (ddt.itemsize if ddt != torch.float32 else 0)) if wide else h.element_size()
    vc = vocab_chunk(N, V, (chunk_elems or CHUNK_ELEMS) * h.element_size() // per_logit)
    dw = torch.empty_like(w) if need_dw else None
    db = torch.empty(V, device=w.device, dtype=torch.float32) if (need_db and b is not None) else None
    acc_fp32 = h.dtype in (torch.bfloat16, torch.float16) and (vc < V or ddt != h.dtype)
    dh = torch.zeros(N, H, device=h.device, dtype=torch.float32 if acc_fp32 else h.dtype) if need_dh else None
    h_g = h.to(ddt) if need_dw else None  # the dW GEMM's operand: h itself, or its fp32 copy for fp32 dlogits
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        w_v = w[v0:v1]
        z = _logits(h, w_v, None if b is None else b[v0:v1], wide=wide)
        dz = z if ddt == z.dtype else torch.empty_like(z, dtype=ddt)  # same strides as z (contiguous)
        logprobs_bwd(z, y, lse, ent, g, gh, temperature, ignore_index, has_ent, out=dz, col0=v0)
        if dw is not None:
            if ddt == dw.dtype:
                torch.mm(dz.t(), h_g, out=dw[v0:v1])
            else:
                dw[v0:v1] = torch.mm(dz.t(), h_g)  # fp32 product, rounded to the head's dtype once
        if db is not None:
            db[v0:v1] = dz.sum(0, dtype=torch.float32)
        if dh is not None:
            _add_dh(dh, dz, w_v, acc_fp32)
    if acc_fp32 and dh is not None:
        dh = dh.to(h.dtype)
    return dh, dw, None if db is None else db.to(b.dtype)
