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


def _logits(h, w, b, out=None):
    if b is not None:
        return torch.addmm(b, h, w.t(), out=out)
    return torch.mm(h, w.t(), out=out)


def fused_linear_logprobs_fwd(h, w, b, y, temperature, ignore_index, return_entropy, chunk_elems=None):
    """h [N, H], w [V, H], b [V] | None (one float dtype), y [N] -> (logp, ent, lse) fp32 [N]."""
    N, V = h.shape[0], w.shape[0]
    logp = torch.empty(N, device=h.device, dtype=torch.float32)
    ent = torch.zeros_like(logp)
    lse = torch.empty_like(logp)
    nc = token_chunk(V, chunk_elems or CHUNK_ELEMS)
    for n0 in range(0, N, nc):
        n1 = min(N, n0 + nc)
        z = _logits(h[n0:n1], w, b, out=aligned_rows(n1 - n0, V, h.dtype, h.device))  # rows on 16-byte boundaries
        lp, e, ls = logprobs_fwd(z, y[n0:n1], temperature, ignore_index, return_entropy)
        logp[n0:n1] = lp
        lse[n0:n1] = ls
        if return_entropy:
            ent[n0:n1] = e
    return logp, ent, lse


def fused_linear_logprobs_bwd(h, w, b, y, lse, ent, g, gh, temperature, ignore_index, has_ent,
                              need_dh=True, need_dw=True, need_db=True, chunk_elems=None):
    """Gradients (dh [N, H] | None, dw [V, H] | None, db [V] | None) in the inputs' dtype for upstream g, gh
    fp32 [N]; a gradient that is not needed costs nothing (a frozen head skips the dW GEMM)."""
    N, H = h.shape
    V = w.shape[0]
    dw = torch.empty_like(w) if need_dw else None
    db = torch.empty(V, device=w.device, dtype=torch.float32) if (need_db and b is not None) else None
    vc = vocab_chunk(N, V, chunk_elems or CHUNK_ELEMS)
    acc_fp32 = h.dtype != torch.float32 and h.dtype != torch.float64 and vc < V
    dh = torch.zeros(N, H, device=h.device, dtype=torch.float32 if acc_fp32 else h.dtype) if need_dh else None
    for v0 in range(0, V, vc):
        v1 = min(V, v0 + vc)
        w_v = w[v0:v1]
        z = _logits(h, w_v, None if b is None else b[v0:v1])
        logprobs_bwd(z, y, lse, ent, g, gh, temperature, ignore_index, has_ent, out=z, col0=v0)
        if dw is not None:
            torch.mm(z.t(), h, out=dw[v0:v1])
        if db is not None:
            db[v0:v1] = z.sum(0, dtype=torch.float32)
        if dh is None:
            continue
        if acc_fp32 and _fp32_accumulate_ok(h.device, h.dtype):
            torch.addmm(dh, z, w_v, out_dtype=torch.float32, out=dh)
        elif acc_fp32:
            dh += torch.mm(z, w_v)
        else:
            dh.addmm_(z, w_v)
    if acc_fp32 and dh is not None:
        dh = dh.to(h.dtype)
    return dh, dw, None if db is None else db.to(b.dtype)
