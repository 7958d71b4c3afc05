"""The three FP8 GEMM backends behind FP8Linear, all computing one "NT" product

    C[M, N] = (A * sa) @ (Bt * sb)^T        A [M, K], Bt [N, K] E4M3, K-contiguous; fp32 accumulate, bf16 out

with sa one scale per row and 128 of K, sb one per 128x128 block ("block", weights) or per row and 128 of K
("row", the token-grouped wgrad operand).

- "emulation": dequantize both to fp32 and run an fp32 matmul (CPU and any device; the numerics oracle), with
  autocast off, so it stays exact under bf16 autocast (`--fp8 --precision bf16`).
- "scaled_mm": blockwise `torch._scaled_mm`, scales in the layouts its checks name (`scaled_mm_scales`): A scales
  [M, K/128] outer-dim-major; B scales [K/128, N/128] with 16-byte aligned strides (128x128 weights) or
  [K/128, N] outer-dim-major (the token-grouped wgrad operand; the layout used before, strides (1, K/128), was
  rejected, so wgrad silently ran on the Triton GEMM). Every (device, kind) is probed once on first use against
  the emulation (awkward M; K/128 = 3, which needs the padded stride, and K/128 = 4; scale-free error < 1e-5)
  before it is trusted.
- "triton": `unirl_fast.kernels.fp8_gemm` (any CUDA device with FP8 tensor cores, or the CPU interpreter).

`resolve_gemm(backend, device, kind)` maps the user's FP8Linear backend to one of these; "auto" takes
scaled_mm where its probe passed, else triton on FP8 GPUs, else the emulation. An explicit "scaled_mm" whose
probe failed raises with the probe's reason; "scaled_mm" / "triton" on hardware without FP8 GEMMs raise.
"""
from __future__ import annotations

import functools

import torch

from ..ops._dispatch import interpreting
from .quantize import dequantize_fp8, quantize_fp8_ref

BACKENDS = ("auto", "emulation", "scaled_mm", "triton")
PROBE_BOUND = 1e-5


def gemm_emulation(a, sa, bt, sb, out_dtype=torch.bfloat16):
    # autocast off: under --precision bf16 autocast would run this fp32 GEMM in bf16 (not the exact emulation)
    with torch.autocast(a.device.type, enabled=False):
        return (dequantize_fp8(a, sa) @ dequantize_fp8(bt, sb).t()).to(out_dtype)


def scaled_mm_scales(sa, sb, n: int):
    """The scale layouts blockwise `torch._scaled_mm` takes (torch's ScaledBlas checks), from our quantizers':
        A, 1x128:            scale_a [M, K/128], outer-dim-major (strides (1, M))
        B, 128x128 (block):  scale_b [K/128, N/128], near-inner-dim-major with 16-byte aligned strides: strides
                             (1, L4), L4 = K/128 rounded up to 4 (K/128 = 3 gives a 12-byte stride otherwise)
        B, 1x128 (row):      scale_b [K/128, N], outer-dim-major (strides (N, 1))
    sa [M, K/128], sb [N/128, K/128] (block) or [N, K/128] (row), any strides; the quantizers already write the
    1x128 / 128x1 layouts, so only the small 128x128 weight scales are copied (into their padded buffer)."""
    scale_a = sa.t().contiguous().t()
    if sb.shape[0] == n:  # row: per column of B and 128 of K
        return scale_a, sb.t().contiguous()
    nb, kb = sb.shape
    padded = sb.new_zeros(nb, -(-kb // 4) * 4)
    padded[:, :kb] = sb
    return scale_a, padded[:, :kb].t()


def gemm_scaled_mm(a, sa, bt, sb, out_dtype=torch.bfloat16):
    if a.numel() == 0 or bt.numel() == 0:  # empty batch (M = 0, or wgrad's K = M_pad = 0): not worth a cuBLAS call
        return torch.zeros(a.shape[0], bt.shape[0], device=a.device, dtype=out_dtype)
    scale_a, scale_b = scaled_mm_scales(sa, sb, bt.shape[0])
    return torch._scaled_mm(a, bt.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def gemm_triton(a, sa, bt, sb, out_dtype=torch.bfloat16):
    from ..kernels.fp8_gemm import fp8_gemm_fwd

    return fp8_gemm_fwd(a, sa, bt, sb, out_dtype)


GEMMS = {"emulation": gemm_emulation, "scaled_mm": gemm_scaled_mm, "triton": gemm_triton}


def has_fp8_gemm(device) -> bool:
    """CUDA device with FP8 tensor cores (sm89 Ada, sm90 Hopper and newer)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_failure(device, kind: str):
    """None when blockwise `torch._scaled_mm` matches the emulation for `kind` on `device`, else the reason."""
    device = torch.device(device)
    if not has_fp8_gemm(device):
        return f"{device} has no FP8 tensor cores"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    return _probe(device.index if device.index is not None else torch.cuda.current_device(), kind)


@functools.lru_cache(maxsize=None)
def _probe(index: int, kind: str):
    device = torch.device("cuda", index)
    g = torch.Generator(device=device).manual_seed(0)
    m = 200 if kind == "block" else 256
    for k in (384, 512):  # K/128 = 3 (an awkward count: padded scale stride) and 4
        a = torch.randn(m, k, device=device, generator=g)
        bt = torch.randn(256, k, device=device, generator=g)
        aq, sa = quantize_fp8_ref(a, "1x128")
        if kind == "block":
            bq, sb = quantize_fp8_ref(bt, "128x128")
        else:  # the wgrad operand: the 128x1 quantizer's output, as FP8Linear's backward passes it
            bq, sb = quantize_fp8_ref(bt.t().contiguous(), "128x1")
        try:
            out = gemm_scaled_mm(aq, sa, bq, sb)
            torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - any failure means "not supported here"; the reason is reported
            return f"torch._scaled_mm rejected the {kind}-scaled layout at K={k}: {type(e).__name__}: {e}"
        ref = gemm_emulation(aq, sa, bq, sb).double()
        out = out.double()
        err = float(1 - 2 * (out * ref).sum() / ((out * out).sum() + (ref * ref).sum()))
        if not err <= PROBE_BOUND:
            return (f"torch._scaled_mm {kind}-scaled result differs from the emulation at K={k} "
                    f"(scale-free error {err:.2e})")
    return None


def resolve_gemm(backend: str, device, kind: str) -> str:
    """Name of the GEMM ("emulation" | "scaled_mm" | "triton") that runs `kind` for this FP8Linear backend."""
    device = torch.device(device)
    if backend == "emulation":
        return "emulation"
    if backend == "auto":
        if not has_fp8_gemm(device):
            return "emulation"
        return "scaled_mm" if scaled_mm_failure(device, kind) is None else "triton"
    if backend == "triton":
        if has_fp8_gemm(device) or (device.type == "cpu" and interpreting()):
            return "triton"
        raise RuntimeError(f"backend='triton' needs a CUDA GPU with FP8 tensor cores (sm89+), "
                           f"got {_describe(device)}; use backend='emulation' (exact CPU emulation) or 'auto'")
    if not has_fp8_gemm(device):
        raise RuntimeError(f"backend='scaled_mm' needs a CUDA GPU with FP8 tensor cores (sm89+), "
                           f"got {_describe(device)}; use backend='emulation' (exact CPU emulation) or 'auto'")
    reason = scaled_mm_failure(device, kind)
    if reason is not None:
        raise RuntimeError(f"backend='scaled_mm' is not usable here: {reason}; use backend='triton' or 'auto'")
    return "scaled_mm"


def _describe(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (sm{''.join(map(str, torch.cuda.get_device_capability(device)))})"
    return str(device)
