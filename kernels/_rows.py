"""Vectorised row access for any row length, and the online softmax step the row kernels share.

A row of V elements starting `off` elements past a 16-byte boundary splits into a head of `head` < VEC elements
(up to the first boundary), a body of whole 16-byte vectors (VEC elements each: 8 for bf16/fp16, 4 for fp32)
and a tail of < VEC elements. The body is loaded through a pointer the compiler knows to be VEC-aligned, with a
mask that is constant per vector (`o // VEC < n_vec`), so it compiles to 16-byte loads and stores whatever V is
(a mask `o < V` with V not a multiple of 16, or a row stride that is not, made Triton fall back to 2-byte
accesses: V = 50257, 32001). Head and tail go through one small [2 VEC] masked access.

`off` counts from a 16-byte boundary of the allocation: the launcher passes `base_shift`, the data pointer's own
offset from a boundary in elements (0 for fresh allocations). With a base that is not 16-byte aligned Triton
does not specialise the pointer as aligned and emits scalar accesses: correct, just not vectorised.

Rounding: a reduction over a row visits head + tail, then the body blocks, so where the split falls (the row's
alignment) decides the fp32 summation order. The same row at another alignment (a sliced view of a [B, L, V]
tensor vs a contiguous copy, with V or the row stride not a multiple of 8) can differ in the last bits. The
fused head ops compute their logits chunks into `aligned_rows` buffers, so their results never depend on that.
"""
from __future__ import annotations

import triton
import triton.language as tl


def vec_elems(t) -> int:
    """Elements per 16 bytes of t's dtype."""
    return max(1, 16 // t.element_size())


def aligned_rows(rows: int, n: int, dtype, device):
    """A [rows, n] buffer whose rows each start on a 16-byte boundary (row stride n rounded up to a vector):
    every row then splits the same way, so a row's result does not depend on its position in the batch (the fused
    head ops' logits chunks; a rollout and a training pass of the same tokens agree bitwise).

    The [:, :n] view is uninitialised (its user writes it), but the padding columns past n are zeroed: a GEMM
    handed the strided view may read whole vectors across the row end (torch 2.13's CPU oneDNN bf16 GEMM does, and
    multiplies those lanes by zero), so a NaN bit pattern left there would turn a whole row of its output into
    NaN. Zeroing costs rows x (stride - n) < rows x 8 elements, once per buffer."""
    import torch

    vec = max(1, 16 // dtype.itemsize)
    stride = -(-n // vec) * vec
    buf = torch.empty(rows, stride, dtype=dtype, device=device)
    if stride > n:
        buf[:, n:].zero_()
    return buf[:, :n]


def base_shift(t) -> int:
    """t's data pointer past the previous 16-byte boundary, in elements (0 on the meta device)."""
    return (t.data_ptr() % 16) // t.element_size()


@triton.jit
def row_split(off, n, VEC: tl.constexpr):
    """(head, n_body) of a row of n elements whose first element is `off` elements past a 16-byte boundary:
    head < VEC elements before the first boundary, then n_body (a multiple of VEC) in whole vectors."""
    head = tl.minimum((VEC - off % VEC) % VEC, n)
    return head, ((n - head) // VEC) * VEC


@triton.jit
def row_edges(head, n_body, n, VEC: tl.constexpr):
    """In-row offsets [2 VEC] of the head (lanes < VEC) and the tail (lanes >= VEC), and their mask."""
    o_e = tl.arange(0, 2 * VEC)
    idx = tl.where(o_e < VEC, o_e, head + n_body + o_e - VEC)
    return idx, tl.where(o_e < VEC, o_e < head, idx < n)


@triton.jit
def online_softmax_step(m, s, t, b_z, HAS_ENT: tl.constexpr):
    """One slice b_z of an online softmax: running max m, s = sum e^(z - m), t = sum e^(z - m) (z - m), all kept
    relative to the running max (no cancellation for rows near -1e4). -inf entries add nothing (and no NaN)."""
    # [BLOCK] -> scalar
    m_new = tl.maximum(m, tl.max(b_z, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    b_p = tl.exp(b_z - m_safe)
    if HAS_ENT:
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
        b_d = tl.where(b_p > 0.0, b_z - m_safe, 0.0)
        # [BLOCK] -> scalar
        t = alpha * (t + s * shift) + tl.sum(b_p * b_d, 0)
    # [BLOCK] -> scalar
    s = s * alpha + tl.sum(b_p, 0)
    return m_new, s, t
