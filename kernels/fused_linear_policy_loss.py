"""Per-chunk row kernel of `fused_linear_policy_loss` (FORMULAS.md sections 1 and 2).

Legend: C rows (tokens) in a chunk, V vocab, N tokens in all.

The caller computes a chunk of raw logits zr = h_c W^T (+ b) with cuBLAS (fp32 accumulate, stored in the
GEMM dtype) and launches this kernel once per chunk, grid (C,): one program per row, looping over V in
BLOCK_V columns (V need not be a multiple of the block; padded columns are -inf).

    sweep 1 (online, z = zr / T):  m = max z,  s = sum e^(z-m),  t = sum e^(z-m) (z-m)
             lse = m + log s ;  logp = z_y - lse ;  H = log s - t / s          (no cancellation at |z| >> 1)
    policy : MODE_TOKEN:  g = dL/dlogp and gH = dL/dH from the shared token math of kernels/policy_loss.py
             MODE_GIVEN:  g, gH read from vectors (sequence-level IS: computed between a logp pass and this one)
    sweep 2: dzr_j = ( g (1[j=y] - p_j) - gH p_j ((z_j - m) - t/s) ) / T   written IN PLACE over zr
MODE_LOGP stops after sweep 1 (the first pass of sequence-level IS).

Traffic per chunk: zr read twice and written once (2 bytes each for bf16), i.e. about 3 C V * 2 bytes against
the 6 C H V GEMM FLOPs around it. Both sweeps keep the next BLOCK_V slice's load in flight (a register double
buffer) while reducing / writing the current one: without it each program waited a full memory latency per
slice (bench/kernel_report.py shows the double buffer as prefetch "reg").
Rows whose target is < 0 (ignore_index or mask 0, set by the caller) skip sweep 1 and write a zero row,
logp = H = 0. Rows whose target is >= V (an out-of-range id, mapped there by the caller) are never read at that
id: logp = H = NaN and a zero gradient row. An all -inf row is never produced by a finite head; the online update
is still guarded so -inf logits give p = 0 and no NaN.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from ._device import launch_guard
from ._rows import base_shift, online_softmax_step, row_edges, row_split, vec_elems
from .policy_loss import _bounded_exp, _kl_terms, _pg_terms, _tis_weight, bounds, kl_code

MODE_LOGP, MODE_TOKEN, MODE_GIVEN = 0, 1, 2


@triton.jit
def _row_stats(p_row, p_body, n_body, head, inv_temp, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """Online max m, s = sum e^(z-m), t = sum e^(z-m)(z-m) over one row of V raw logits: head and tail, then the
    16-byte-aligned body (kernels/_rows.py). Register double buffer: the next slice's load is issued before this
    slice's reductions (the loop has no tl.dot, so Triton's pipeliner would not), so a load is always in flight."""
    o_e, m_e = row_edges(head, n_body, V, VEC)
    b_e = tl.load(p_row + o_e, mask=m_e, other=-float("inf")).to(tl.float32) * inv_temp
    m, s, t = online_softmax_step(-float("inf"), 0.0, 0.0, b_e, True)
    o_v = tl.arange(0, BLOCK_V)
    n_vec = n_body // VEC
    b_next = tl.load(p_body + o_v, mask=o_v // VEC < n_vec, other=-float("inf"))
    for v0 in range(0, n_body, BLOCK_V):
        z = b_next.to(tl.float32) * inv_temp
        o_n = v0 + BLOCK_V + o_v
        b_next = tl.load(p_body + o_n, mask=o_n // VEC < n_vec, other=-float("inf"))
        m, s, t = online_softmax_step(m, s, t, z, True)
    return m, s, t


@triton.jit
def _grad_values(cols, tgt, g, gh, m_safe, ez, inv_s, inv_temp, b_z, OUT: tl.constexpr):
    """dzr over one slice (raw logits b_z already loaded), in the logits' dtype OUT."""
    zd = b_z.to(tl.float32) * inv_temp - m_safe
    pr = tl.exp(zd) * inv_s
    dz = -g * pr - gh * tl.where(pr > 0, pr * (zd - ez), 0.0)
    dz = tl.where(cols == tgt, dz + g, dz)
    return (dz * inv_temp).to(OUT)


@triton.jit
def _flpl_chunk_kernel(
    z_ptr, tgt_ptr, w_ptr, old_ptr, adv_ptr, roll_ptr, ref_ptr, g_ptr, gh_ptr, logp_ptr, ent_ptr,
    inv_temp, eps_low, eps_high, dual_clip, tis_cap, beta, entropy_coef, lr_lo, lr_hi, kl_clamp, base_shift,
    # shapes
    V, row0,
    # strides (per-token vectors are contiguous [N]; the chunk logits have row stride stride_zc, column stride 1)
    stride_zc,
    MODE: tl.constexpr, HAS_DUAL: tl.constexpr, TIS_MODE: tl.constexpr, HAS_REF: tl.constexpr,
    KL_KIND: tl.constexpr, KL_ST: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_n = row0 + i_c  # global token index
    off = base_shift + i_c * stride_zc
    z_row = z_ptr + (off - base_shift)
    head, n_body = row_split(off, V, VEC)
    z_body = z_ptr + (tl.multiple_of(off + head, VEC) - base_shift)
    n_vec = n_body // VEC
    tgt = tl.load(tgt_ptr + i_n).to(tl.int64)
    o_v = tl.arange(0, BLOCK_V)
    o_e, m_e = row_edges(head, n_body, V, VEC)
    if (tgt < 0) | (tgt >= V):
        out = tl.where(tgt < 0, 0.0, float("nan"))
        tl.store(logp_ptr + i_n, out)
        tl.store(ent_ptr + i_n, out)
        if MODE != 0:
            zero = tl.zeros([BLOCK_V], dtype=z_ptr.dtype.element_ty)
            tl.store(z_row + o_e, tl.zeros([2 * VEC], dtype=z_ptr.dtype.element_ty), mask=m_e)
            for v0 in range(0, n_body, BLOCK_V):
                tl.store(z_body + v0 + o_v, zero, mask=(v0 + o_v) // VEC < n_vec)
    else:
        m, s, t = _row_stats(z_row, z_body, n_body, head, inv_temp, V, BLOCK_V, VEC)
        m_safe = tl.where(m == -float("inf"), 0.0, m)
        log_s = tl.log(s)
        ez = t / s  # E_p[z] - m
        logp = tl.load(z_row + tgt).to(tl.float32) * inv_temp - m_safe - log_s
        tl.store(logp_ptr + i_n, logp)
        tl.store(ent_ptr + i_n, log_s - ez)
        if MODE != 0:
            if MODE == 1:
                w = tl.load(w_ptr + i_n)
                old = tl.load(old_ptr + i_n)
                A = tl.load(adv_ptr + i_n)
                r, gate = _bounded_exp(logp - old, lr_lo, lr_hi)
                tis_w = _tis_weight(old, tl.load(roll_ptr + i_n), tis_cap, TIS_MODE)
                pg, d, clo, chi, dual = _pg_terms(r, A, eps_low, eps_high, dual_clip, tis_w, HAS_DUAL)
                g = d * r * gate
                if HAS_REF:
                    if beta != 0.0:
                        _, dkl = _kl_terms(logp, tl.load(ref_ptr + i_n), kl_clamp, KL_KIND, KL_ST)
                        g += beta * dkl
                g = w * g
                gh = -entropy_coef * w
            else:
                g = tl.load(g_ptr + i_n)
                gh = tl.load(gh_ptr + i_n)
            inv_s = 1.0 / s
            out_ty = z_ptr.dtype.element_ty
            b_e = tl.load(z_row + o_e, mask=m_e, other=-float("inf"))
            tl.store(z_row + o_e, _grad_values(o_e.to(tl.int64), tgt, g, gh, m_safe, ez, inv_s, inv_temp, b_e,
                                               out_ty), mask=m_e)
            # Pipelined by one slice: iteration v0 loads slice v0 + 1, then stores the gradient of slice v0 - 1 (made
            # in the previous iteration), then computes slice v0's. The store may alias the load (same buffer), so
            # the compiler cannot sink the load below it: the next slice's load is issued before this slice's math
            # (with the store right after the math it was sunk behind the math; bench/kernel_report.py: ldg_pos).
            b_cur = tl.load(z_body + o_v, mask=o_v // VEC < n_vec, other=-float("inf"))
            o_prev = o_v - BLOCK_V + n_body * 0  # the type of v0 + o_v (n_body's)
            dz_prev = tl.zeros([BLOCK_V], dtype=out_ty)
            for v0 in range(0, n_body, BLOCK_V):
                o = v0 + o_v
                b_z = b_cur
                o_n = o + BLOCK_V
                b_cur = tl.load(z_body + o_n, mask=o_n // VEC < n_vec, other=-float("inf"))  # in flight meanwhile
                tl.store(z_body + o_prev, dz_prev, mask=(o_prev >= 0) & (o_prev // VEC < n_vec))
                dz_prev = _grad_values((head + o).to(tl.int64), tgt, g, gh, m_safe, ez, inv_s, inv_temp, b_z, out_ty)
                o_prev = o
            tl.store(z_body + o_prev, dz_prev, mask=(o_prev >= 0) & (o_prev // VEC < n_vec))


@launch_guard
def flpl_chunk(z, row0, tgt, logp, ent, *, mode, temperature, w=None, old=None, adv=None, roll=None, ref=None,
               g=None, gh=None, eps_low=0.2, eps_high=0.2, dual_clip=None, tis_cap=None, beta=0.0,
               entropy_coef=0.0, kl="k3", tis_mode=1, log_ratio_min=None, log_ratio_max=None, kl_clamp=None):
    """Run the row kernel over chunk logits z [C, V] (column stride 1) for global tokens row0 .. row0 + C.

    tgt [N] int32 (-1 = not a valid token); logp, ent [N] fp32 outputs; w, old, adv, roll, ref, g, gh [N]
    fp32 contiguous inputs as the mode needs them (roll: the rollout log-prob, tis_mode 1, or a given TIS weight,
    tis_mode 2). MODE_TOKEN / MODE_GIVEN overwrite z with dlogits.
    """
    C, V = z.shape
    if z.stride(1) != 1:
        raise ValueError(f"chunk logits must have unit column stride, got strides {z.stride()}")
    if C == 0:
        return
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    # 4096 columns at 4 warps: 32 per thread (four 16-byte loads); at qwen-3b 72 registers, 7 programs (28 warps)
    # per SM, ~56 KB in flight with the double buffer (compile report; 8 warps: 5 programs, ~40 KB)
    block = min(triton.next_power_of_2(V), 1024 if interp else 4096)

    def pick(x):  # logp stands in as the pointer of an input this mode does not read
        return logp if x is None else x
    _flpl_chunk_kernel[(C,)](
        z, tgt, pick(w), pick(old), pick(adv), pick(roll), pick(ref), pick(g), pick(gh), logp, ent,
        1.0 / float(temperature), float(eps_low), float(eps_high), float(dual_clip or 0.0),
        float("inf") if tis_cap is None else float(tis_cap), float(beta), float(entropy_coef),
        *bounds(log_ratio_min, log_ratio_max, kl_clamp), base_shift(z),
        V, row0, z.stride(0),
        MODE=mode, HAS_DUAL=dual_clip is not None, TIS_MODE=0 if roll is None else tis_mode, HAS_REF=ref is not None,
        KL_KIND=kl_code(kl)[0], KL_ST=kl_code(kl)[1], BLOCK_V=block, VEC=vec_elems(z), num_warps=4,
    )
