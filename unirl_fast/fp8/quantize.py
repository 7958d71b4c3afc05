"""FP8 block quantizers: the public `quantize_fp8` and its plain-PyTorch reference (the CPU emulation).

FORMULAS.md section 6: E4M3 (max 448), fp32 scales, s = max(amax, 1e-12) / 448, q = clamp(x / s, -448, 448).
The reference below and the Triton kernel (`unirl_fast.kernels.fp8_quant`) produce bitwise identical (q, s):
the amax is order-free, x / s is a correctly rounded fp32 division in both (torch's `/`, Triton's `div_rn`)
and the e4m3 cast rounds to nearest-even in both. Rollout and training call this one function family, so a
token's log-prob is computed by the same quantizer whichever engine asks for it.

Layouts (chosen for the GEMMs in `unirl_fast.fp8.linear`, every GEMM there is C = A @ Bt^T with both
operands K-contiguous, which Hopper FP8 tensor cores and `torch._scaled_mm` require):
    "1x128"   x [R, C] -> q [R, C],            s [R, C/128]    (column-major: strides (1, R))
    "128x1"   x [R, C] -> q [C, R_pad] (= x^T), s [C, R_pad/128] (strides (1, C); R_pad: R rounded up to 128,
                                                                    zero rows)
    "128x128" x [R, C] -> q [R, C],            s [R/128, C/128]
`dequantize_fp8(q, s)` inverts any of them to fp32 in q's layout.

Non-finite inputs raise ValueError (the check reads only the scale tensor, 1/128 of the data, without a host
sync: on CUDA it is deferred to the next checked op or `unirl_fast.check_pending()`; skipped under torch.compile
and with checks "off", like every value check in unirl_fast).
"""
from __future__ import annotations

import torch

from .._checks import check_option, check_tensor, flag, value_checks_enabled
from ..ops._dispatch import choose, register_triton, triton_impl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128
EPS = 1e-12
GROUPINGS = ("1x128", "128x1", "128x128")


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp_min(EPS) / FP8_MAX


def _cast(y: torch.Tensor) -> torch.Tensor:
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _abs_nan_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x.abs())


def quantize_fp8_ref(x: torch.Tensor, grouping: str):
    """Plain PyTorch quantizer (fp32 math); same outputs and layouts as the Triton kernel."""
    x = x.float()
    R, C = x.shape
    if grouping == "1x128":
        g = x.view(R, C // GROUP, GROUP)
        s = _scale(_abs_nan_inf(g).amax(-1))                                   # [R, C/128]
        q = _cast(g / s[..., None]).view(R, C)
        return q, s.t().contiguous().t()
    if grouping == "128x1":
        r_pad = -(-R // GROUP) * GROUP
        xt = torch.zeros(C, r_pad, dtype=torch.float32, device=x.device)
        xt[:, :R] = x.t()
        g = xt.view(C, r_pad // GROUP, GROUP)
        s = _scale(_abs_nan_inf(g).amax(-1))                                   # [C, R_pad/128]
        return _cast(g / s[..., None]).view(C, r_pad), s.t().contiguous().t()
    g = x.view(R // GROUP, GROUP, C // GROUP, GROUP)
    s = _scale(_abs_nan_inf(g).amax(dim=(1, 3)))                               # [R/128, C/128]
    return _cast(g / s[:, None, :, None]).view(R, C), s


def dequantize_fp8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp32 values q * s, with s broadcast over its groups (any of the three layouts above)."""
    R, C = q.shape
    if q.numel() == 0:
        return torch.zeros(R, C, dtype=torch.float32, device=q.device)
    gr, gc = R // s.shape[0], C // s.shape[1]
    return (q.float().view(s.shape[0], gr, s.shape[1], gc) * s[:, None, :, None]).view(R, C)


@register_triton("quantize_fp8")
def _quantize_fp8_triton(x: torch.Tensor, grouping: str):
    from ..kernels.fp8_quant import fp8_quant_fwd

    return fp8_quant_fwd(x, grouping, EPS)


@register_triton("quantize_fp8_dual")
def _quantize_fp8_dual_triton(x: torch.Tensor):
    from ..kernels.fp8_quant import fp8_quant_dual_fwd

    return fp8_quant_dual_fwd(x, EPS)


def quantize_fp8_dual_ref(x: torch.Tensor):
    """("1x128" q, s, "128x1" q, s) of the same x: what the fused kernel returns from one read."""
    return (*quantize_fp8_ref(x, "1x128"), *quantize_fp8_ref(x, "128x1"))


def quantize_fp8(x: torch.Tensor, grouping: str = "1x128", *, impl: str = "auto"):
    """Quantize x [R, C] (fp32/bf16/fp16) to E4M3 with fp32 block scales.

    grouping: "1x128" (activations, output gradients), "128x1" (the wgrad operands, along tokens) or
    "128x128" (weights). C must be a multiple of 128; R too for "128x128". Returns (q, s) in the layouts
    of the module docstring. Not differentiable (FP8Linear owns the gradient).

    Example: q, s = quantize_fp8(torch.randn(4, 256)); x_hat = dequantize_fp8(q, s)
    """
    check_tensor("x", x, ndim=2, floating=True)
    check_option("grouping", grouping, GROUPINGS)
    R, C = x.shape
    if C % GROUP:
        raise ValueError(f"x has {C} columns; FP8 block quantization needs a multiple of {GROUP}")
    if grouping == "128x128" and R % GROUP:
        raise ValueError(f"x has {R} rows; 128x128 weight blocks need a multiple of {GROUP}")
    if choose("quantize_fp8", impl, x.device) == "triton":
        q, s = triton_impl("quantize_fp8")(x, grouping)
    else:
        q, s = quantize_fp8_ref(x, grouping)
    check_scales_finite("x", s)
    return q, s


def check_scales_finite(name: str, s: torch.Tensor) -> None:
    """An infinite scale marks a group that held NaN or +/-inf (see the kernel's design note). A cheap check
    (the scales are 1/128 of the data or less) with no host sync: deferred on CUDA (`unirl_fast.check_pending`)."""
    if value_checks_enabled():
        flag(~torch.isfinite(s), lambda i: f"{name} contains NaN or inf (scale group {list(i)} is non-finite); "
                                           "FP8 quantization needs finite inputs")
