"""Triton path of `fused_linear_policy_loss`: LM head + log-probs + entropy + GRPO-family loss, fused.

Legend: B sequences, L tokens, N = B*L, H hidden, V vocab, C rows per chunk.

Gradients are computed during the forward, chunk by chunk (the loss is a weighted sum over tokens and
the aggregation weights w_t are known from the mask before the pass):

    zr  = h_c W^T (+ b)                 cuBLAS, fp32 accumulate, stored in the GEMM dtype    2 C H V
    one kernel per chunk (kernels/fused_linear_policy_loss.py): online softmax stats, logp, H, the policy
        derivative g = dL/dlogp, gH = dL/dH, then dlogits written in place over zr
    dh_c = dz W ; dW += dz^T h_c ; db += sum_rows dz                                         4 C H V
Token-level IS: one pass, 6NHV FLOPs. Sequence-level IS (GSPO) needs every logp of a sequence before any
gradient: a logp-only pass (2NHV), the policy kernel on the [B, L] log-probs to get g and gH, then the
gradient pass (6NHV): 8NHV in all. The loss value and metrics come from the same policy kernel as
`policy_loss` (kernels/policy_loss.py) run on the [N] log-probs and entropies, so both ops agree exactly.
Backward only multiplies the stored grads by the upstream scalar.

Memory: one [C, V] logits buffer with C = CHUNK_ELEMENTS // V rows (fixed element budget: 2^28 elements,
512 MiB in bf16, whatever N is), the grads of hidden (N H) and weight (V H) and O(N) fp32 vectors. Nothing
else grows with N. The head gradient is summed over the chunks in an fp32 [V, H] accumulator by default
(`accum_dtype=torch.float32`; cuBLAS adds into the fp32 C directly, `addmm(out_dtype=float32)`) and rounded to
the head's dtype once: summing in bf16 rounds the running sum once per chunk (5 / 10 / 38 times at 8k / 16k /
64k tokens at qwen-3b), the instability Liger users traced to it. The accumulator costs 4 V H bytes during the
forward (1.2 GB at qwen-3b) and is freed before the op returns; `accum_dtype=None` keeps the old in-dtype sums.
Under autocast over fp32 master weights the head gradient is still rounded to the autocast dtype once (the op
runs on the cast head), then widened by autograd.
Backward scales the stored gradients by the upstream scalar in place (no second dh / dW buffer), so one call
supports one backward (a second raises instead of scaling twice).

Precision: GEMMs run in the inputs' dtype (the autocast dtype when autocast is on, like F.linear);
softmax, logp, entropy and the loss are fp32. fp16 runs its GEMMs in fp32: fp16 dlogits (~w p, 1e-9
and below) would underflow. `logits_dtype=torch.float32` with a bf16 head: the chunk GEMM writes fp32 logits
from the bf16 operands (`mm_fp32`: cuBLAS with out_dtype=float32 where torch has it, upcast operands elsewhere),
the row kernel reads fp32 rows and writes fp32 dlogits over them, and a bf16 copy of those (rounded to nearest
once, the dtype verl's fused kernel gives its backward GEMMs) feeds the dh / dW GEMMs, which stay bf16 tensor-core
GEMMs; db sums the fp32 dlogits. The chunk keeps its byte budget: fp32 logits + their bf16 copy are 6 bytes a
logit, so a chunk holds a third of the rows (half in a log-prob-only pass). The copy costs one more read of the
fp32 dlogits and a bf16 write per logit (a bf16 store from the row kernel itself would save it; the kernel writes
in place and is shared with the default path, which this leaves untouched). Error against the fp64 oracle:
tests/test_logits_fp32.py. Registered as `unirl_fast::fused_linear_policy_loss` (custom_op +
register_autograd + register_fake) so torch.compile(fullgraph=True) traces through it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import fused_linear_policy_loss as K
from ..kernels._rows import aligned_rows
from ..kernels.fused_linear_logprobs import _fp32_accumulate_ok, mm_fp32
from ._dispatch import register_triton
from .policy_loss_triton import METRIC_NAMES, _opt_float, metrics_dict, row_weights, run_policy_kernel, tis_input

CHUNK_ELEMENTS = 1 << 28  # logits elements per chunk (tests lower it to exercise many chunks)


def chunk_rows(N, V, wide=False, grads=True):
    """Rows per chunk: CHUNK_ELEMENTS logits in the compute dtype. With fp32 logits (bf16 inputs) the same bytes hold
    the fp32 logits and, when the pass makes gradients, their bf16 copy for the GEMMs: 6 bytes a logit, not 2."""
    elems = CHUNK_ELEMENTS * 2 // (6 if grads else 4) if wide else CHUNK_ELEMENTS
    return max(1, min(N, elems // V))


def _addmm_fp32(acc, a, b):
    """acc (fp32) += a @ b for 16-bit a, b with fp32 accumulation and no 16-bit rounding of the product.
    cuBLAS takes the fp32 C directly where torch has `addmm(out_dtype=float32)` (probed once per device and
    dtype); elsewhere the product runs in fp32 over row blocks of a, whose fp32 copies stay below a quarter
    of a's size (the CPU path; exact, just slower)."""
    if _fp32_accumulate_ok(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    b32 = b.float()
    step = max(1, a.shape[0] // 4)
    for r in range(0, a.shape[0], step):
        acc[r:r + step].addmm_(a[r:r + step].float(), b32)


def _chunk_logits(hc, W, Wt, b, z, wide):
    """z = hc W^T (+ b): in the GEMM dtype, or fp32 from the bf16 operands when wide (`mm_fp32`)."""
    if wide:
        mm_fp32(hc, Wt, b, out=z)  # [C, H] x [H, V] -> [C, V] fp32
    elif b is None:
        torch.mm(hc, Wt, out=z)  # [C, H] x [H, V] -> [C, V]
    else:
        torch.addmm(b, hc, Wt, out=z)


def _head_pass(h2, W, b, tgt, vec, opts, *, mode, need_dh, need_dw, need_db, accum_fp32, fp32_logits=False):
    """One chunked sweep over the head: -> (logp [N], ent [N], dh | None, dW | None, db | None).
    With accum_fp32 (and a 16-bit head over more than one chunk) dW is summed over the chunks in an fp32
    [V, H] buffer and rounded to the head's dtype once at the end; otherwise cuBLAS adds each chunk into dW in
    the head's dtype (one rounding per chunk). fp32_logits (bf16 head): fp32 logits chunks; the row kernel writes
    fp32 dlogits over them, and a bf16 copy (rounded to nearest once) feeds the dh / dW GEMMs; db sums the fp32."""
    N, H = h2.shape
    V = W.shape[0]
    f32 = dict(dtype=torch.float32, device=h2.device)
    logp, ent = torch.empty(N, **f32), torch.empty(N, **f32)
    grads = mode != K.MODE_LOGP
    wide = fp32_logits and W.dtype == torch.bfloat16
    rows = chunk_rows(N, V, wide, grads)
    acc32 = accum_fp32 and W.dtype in (torch.bfloat16, torch.float16) and N > rows
    dh = torch.empty(N, H, dtype=h2.dtype, device=h2.device) if grads and need_dh else None
    dW = None
    if grads and need_dw:
        dW = torch.zeros(V, H, **f32) if acc32 else (torch.zeros_like(W) if N == 0 else torch.empty_like(W))
    db = torch.zeros(V, **f32) if grads and need_db else None
    # each row on a 16-byte boundary (same rounding at any row); padding zeroed (GEMMs may read whole vectors)
    zbuf = aligned_rows(rows, V, torch.float32 if wide else W.dtype, h2.device)
    dzbuf = aligned_rows(rows, V, W.dtype, h2.device) if wide and grads else None
    Wt = W.t()
    for i, s in enumerate(range(0, N, rows)):
        e = min(N, s + rows)
        hc, z = h2[s:e], zbuf[: e - s]
        _chunk_logits(hc, W, Wt, b, z, wide)
        K.flpl_chunk(z, s, tgt, logp, ent, mode=mode, **vec, **opts)
        dz = z if dzbuf is None else dzbuf[: e - s].copy_(z)
        if dh is not None:
            torch.mm(dz, W, out=dh[s:e])  # [C, V] x [V, H] -> [C, H]
        if dW is not None:
            if acc32:
                _addmm_fp32(dW, dz.t(), hc)  # [V, C] x [C, H] -> [V, H], fp32 C
            elif i == 0:
                torch.mm(dz.t(), hc, out=dW)  # [V, C] x [C, H] -> [V, H]
            else:
                dW.addmm_(dz.t(), hc)
        if db is not None:
            db += z.sum(0, dtype=torch.float32)  # [C, V] -> [V]
    if acc32 and dW is not None:
        del zbuf, dzbuf, z, dz  # the chunk buffers go before the rounded copy of dW is made
        dW = dW.to(W.dtype)
    return logp, ent, dh, dW, db


def _token_vectors(targets, vocab, old_logp, advantages, mask, ref_logp, rollout_logp, ignore_index, loss_type,
                   max_completion_length, num_tokens, empty_seqs, dr_grpo_norm):
    """Per-token fp32 [N] inputs of the row kernel; tgt = -1 marks tokens outside the loss, tgt = V an
    out-of-range id (never read by the kernel: NaN log-prob). rollout_logp is whatever `tis_input` made of it."""
    B, L = targets.shape
    valid = mask & (targets != ignore_index)
    ids = torch.where((targets >= 0) & (targets < vocab), targets, vocab)
    tgt = torch.where(valid, ids, -1).to(torch.int32).reshape(-1)
    wrow = row_weights(valid, loss_type, max_completion_length, num_tokens, empty_seqs, dr_grpo_norm)
    w = (valid.float() * wrow[:, None]).reshape(-1)

    def flat(x):
        return None if x is None else torch.where(valid, x.detach().float(), 0.0).reshape(-1).contiguous()

    A = advantages.detach().float()
    A = A[:, None].expand(B, L) if A.ndim == 1 else A
    vec = dict(w=w, old=flat(old_logp), adv=flat(A), roll=flat(rollout_logp), ref=flat(ref_logp))
    return valid, tgt, vec


@torch.library.custom_op("unirl_fast::fused_linear_policy_loss", mutates_args=())
def _flpl_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
             advantages: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor],
             ref_logp: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor], temperature: float,
             ignore_index: int, loss_type: str, eps_low: float, eps_high: float, dual_clip: Optional[float],
             importance_sampling: str, beta: float, kl: str, tis_cap: Optional[float], entropy_coef: float,
             max_completion_length: Optional[int], num_tokens: Optional[float], need_dh: bool, need_dw: bool,
             need_db: bool, accum_fp32: bool, empty_seqs: str, dr_grpo_norm: str, log_ratio_min: Optional[float],
             log_ratio_max: Optional[float], kl_clamp: Optional[float], tis_level: str,
             tis_weights: Optional[torch.Tensor], fp32_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):
        B, L = targets.shape
        h2 = hidden.reshape(B * L, hidden.shape[-1])
        valid = mask & (targets != ignore_index)
        tis, tis_mode = tis_input(old_logp, rollout_logp, tis_weights, valid, tis_level)
        valid, tgt, vec = _token_vectors(targets, weight.shape[0], old_logp, advantages, mask, ref_logp,
                                         tis, ignore_index, loss_type, max_completion_length, num_tokens,
                                         empty_seqs, dr_grpo_norm)
        bounds = dict(log_ratio_min=log_ratio_min, log_ratio_max=log_ratio_max, kl_clamp=kl_clamp)
        popts = dict(loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                     importance_sampling=importance_sampling, beta=beta, kl=kl, tis_cap=tis_cap,
                     entropy_coef=entropy_coef, max_completion_length=max_completion_length, num_tokens=num_tokens,
                     empty_seqs=empty_seqs, dr_grpo_norm=dr_grpo_norm, **bounds)
        kopts = dict(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                     tis_cap=tis_cap, beta=beta, entropy_coef=entropy_coef, kl=kl, tis_mode=tis_mode, **bounds)
        need = dict(need_dh=need_dh, need_dw=need_dw, need_db=need_db and bias is not None, accum_fp32=accum_fp32,
                    fp32_logits=fp32_logits)
        grads = need_dh or need_dw or need["need_db"]
        seq = importance_sampling == "sequence"
        first = K.MODE_TOKEN if grads and not seq else K.MODE_LOGP
        logp, ent, dh, dW, db = _head_pass(h2, weight, bias, tgt, vec, kopts, mode=first, **need)
        loss, metrics, dlogp, dent = run_policy_kernel(
            logp.view(B, L), old_logp, advantages, valid, ref_logp, rollout_logp, ent.view(B, L),
            write_grad=grads and seq, tis_level=tis_level, tis_weights=tis_weights, **popts)
        if grads and seq:
            given = dict(vec, g=dlogp.reshape(-1), gh=dent.reshape(-1))
            _, _, dh, dW, db = _head_pass(h2, weight, bias, tgt, given, kopts, mode=K.MODE_GIVEN, **need)
    def empty(x, like):  # a distinct tensor per output (custom-op outputs may not alias each other)
        return like.new_empty(0) if x is None else x

    return loss, metrics, empty(dh, hidden).view(hidden.shape if dh is not None else (0,)), empty(dW, weight), \
        empty(db, metrics)


@_flpl_op.register_fake
def _(hidden, weight, targets, old_logp, advantages, mask, bias, ref_logp, rollout_logp, temperature,
      ignore_index, loss_type, eps_low, eps_high, dual_clip, importance_sampling, beta, kl, tis_cap, entropy_coef,
      max_completion_length, num_tokens, need_dh, need_dw, need_db, accum_fp32, empty_seqs, dr_grpo_norm,
      log_ratio_min, log_ratio_max, kl_clamp, tis_level, tis_weights, fp32_logits=False):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (torch.empty((), **f32), torch.empty(len(METRIC_NAMES), **f32),
            hidden.new_empty(hidden.shape if need_dh else (0,)), weight.new_empty(weight.shape if need_dw else (0,)),
            torch.empty(weight.shape[0] if (need_db and bias is not None) else 0, **f32))


def _setup(ctx, inputs, output):
    ctx.bias_dtype = None if inputs[6] is None else inputs[6].dtype
    ctx.save_for_backward(*output[2:])
    ctx.set_materialize_grads(False)  # no zero [N, H] / [V, H] grads for the gradient outputs nobody uses
    ctx.consumed = False


def _backward(ctx, g_loss, g_metrics, g_dh, g_dw, g_db):
    """The gradients were computed in the forward; scale them by the upstream scalar IN PLACE (no second
    [N, H] / [V, H] buffer). A second backward through the same call would scale them twice, so it raises."""
    if ctx.consumed:
        raise RuntimeError("fused_linear_policy_loss computes its gradients in the forward and the first backward "
                           "scales them in place: backward through the same call only once (call the op again "
                           "instead of retain_graph=True)")
    ctx.consumed = not torch.compiler.is_compiling()  # a traced backward is a functional graph: scaling copies there
    dh, dW, db = ctx.saved_tensors

    if g_loss is None:  # the loss took no part in what was differentiated
        return (None,) * 34

    def scale(x):
        return None if x.numel() == 0 else x.mul_(g_loss)
    d_b = None if ctx.bias_dtype is None or db.numel() == 0 else (db * g_loss).to(ctx.bias_dtype)
    return (scale(dh), scale(dW)) + (None,) * 4 + (d_b,) + (None,) * 27


_flpl_op.register_autograd(_backward, setup_context=_setup)


def _compute_dtype(hidden, weight):
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
    else:
        cdt = torch.promote_types(hidden.dtype, weight.dtype)
    return torch.float32 if cdt in (torch.float16, torch.float64) else cdt


@register_triton("fused_linear_policy_loss")
def fused_linear_policy_loss_triton(hidden, weight, targets, old_logp, advantages, mask, *, bias=None,
                                    temperature=1.0, ignore_index=-100, loss_type="grpo", eps_low=0.2,
                                    eps_high=0.2, dual_clip=None, importance_sampling="token", ref_logp=None,
                                    beta=0.0, kl="k3", rollout_logp=None, tis_cap=None, entropy_coef=0.0,
                                    max_completion_length=None, num_tokens=None, accum_dtype=torch.float32,
                                    empty_seqs="count", dr_grpo_norm="batch_length", log_ratio_min=None,
                                    log_ratio_max=None, kl_clamp=None, tis_level="token", tis_weights=None,
                                    logits_dtype=None):
    """Triton `fused_linear_policy_loss`: same arguments and results as its reference. accum_dtype: fp32 sums the
    head gradient over token chunks in fp32; None in the head's dtype (one rounding per chunk). logits_dtype:
    torch.float32 forms a bf16 head's logits in fp32 (None: in the compute dtype)."""
    cdt = _compute_dtype(hidden, weight)
    h, W = hidden.to(cdt), weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    on = torch.is_grad_enabled()
    loss, metrics, _, _, _ = _flpl_op(
        h, W, targets, old_logp, advantages, mask, b, ref_logp, rollout_logp, float(temperature), int(ignore_index),
        loss_type, float(eps_low), float(eps_high), None if dual_clip is None else float(dual_clip),
        importance_sampling, float(beta), kl, None if tis_cap is None else float(tis_cap), float(entropy_coef),
        max_completion_length, None if num_tokens is None else float(num_tokens),
        on and h.requires_grad, on and W.requires_grad, on and b is not None and b.requires_grad,
        accum_dtype is not None, empty_seqs, dr_grpo_norm, _opt_float(log_ratio_min), _opt_float(log_ratio_max),
        _opt_float(kl_clamp), tis_level, None if tis_weights is None else tis_weights.detach(),
        logits_dtype is torch.float32)
    return loss, metrics_dict(metrics, dual=dual_clip is not None, kl=ref_logp is not None, entropy=True,
                              tis=rollout_logp is not None or tis_weights is not None)
