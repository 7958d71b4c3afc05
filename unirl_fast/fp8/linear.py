"""FP8Linear: all three GEMMs of a linear layer in E4M3 with block scales (Jet-RL / DeepSeek-V3 recipe).

Legend: M tokens (any count), K in_features, N out_features (both multiples of 128).

    forward  y  = x W^T   : x  1x128 (per token, along K)  x  W 128x128                      -> [M, N]
    dgrad    dx = dy W    : dy 1x128 (per token, along N)  x  W^T 128x128 (same blocks)       -> [M, K]
    wgrad    dW = dy^T x  : dy 128x1 (along tokens)        x  x 128x1 (along tokens)          -> [N, K]
Each GEMM accumulates in fp32 and rounds its output to bf16 once (then y, dx, dW are returned in the
dtype of x / of the weight; a bias is added after the GEMM in the input dtype and its gradient is an fp32
token sum). Every scale group runs along the GEMM's reduction axis, as block scaling requires; tokens are
padded to a multiple of 128 (zero rows) only inside the wgrad operands. Where both directions of one tensor
are needed (x in a training forward, dy in the backward) one fused kernel reads it once and writes both.

Quantizations per layer and step: W once per weight version (cached), x once (rollout) or one fused dual
pass (training), dy one fused dual pass, W^T a transposed copy of the FP8 weight (N*K bytes) in backward.
Non-finite x, dy or W raise ValueError; that check reads the scales on the host (one sync per quantization):
set UNIRL_FAST_VALUE_CHECKS=0 in a hot loop once the pipeline is trusted (the benchmark times it that way).

Unified flow: rollout (eval / no_grad) and training call the same `FP8LinearFunction.forward`, which
quantizes x and W with one quantizer family and runs one GEMM, so a token's rollout log-prob and the one
the trainer recomputes come from literally the same function (bitwise equal for the same batch).

Saved for backward: with save_fp8_activation=True (Jet-RL) the 128x1 FP8 copy of x that wgrad consumes
(1 byte/elem + 1/32 for scales, quantized in the forward) instead of x itself (2 bytes/elem in bf16). The
wgrad operand is the same tensor either way, so both settings give bitwise identical gradients; only
memory (and where the quantization runs) differs. The quantized weight is cached per module while the
weight is unchanged (same storage and `_version`), which is what rollout needs: FP8 weights once per
optimizer step, not once per decode step.

Limits: 2-D weights only; K, N multiples of 128 (ValueError otherwise; `convert_to_fp8` skips such layers);
no autocast integration (FP8 is its own precision policy); not made torch.compile-friendly (the weight
cache reads the storage pointer and version counter: expect a graph break per layer); embeddings, LM head,
norms and attention stay in the input dtype by construction (only nn.Linear layers are swapped).
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_option, check_tensor
from ..ops._dispatch import choose, triton_impl
from .gemm import BACKENDS, GEMMS, resolve_gemm
from .quantize import GROUP, check_scales_finite, quantize_fp8_dual_ref, quantize_fp8_ref


def _quant(x: torch.Tensor, grouping: str, gemm: str, name: str):
    """The one quantizer family: Triton on any real FP8 path (or the interpreter), the reference otherwise."""
    impl = "reference" if gemm == "emulation" else "triton"
    if choose("quantize_fp8", impl, x.device) == "triton":
        q, s = triton_impl("quantize_fp8")(x, grouping)
    else:
        q, s = quantize_fp8_ref(x, grouping)
    check_scales_finite(name, s)
    return q, s


def _quant_dual(x: torch.Tensor, gemm: str, name: str):
    """("1x128" q, s, "128x1" q, s) of x, from one read on the Triton path (bitwise equal to two `_quant` calls)."""
    impl = "reference" if gemm == "emulation" else "triton"
    if choose("quantize_fp8_dual", impl, x.device) == "triton":
        out = triton_impl("quantize_fp8_dual")(x)
    else:
        out = quantize_fp8_dual_ref(x)
    check_scales_finite(name, out[1])
    return out


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, wq, ws, gemms, save_fp8_activation, needs_wgrad):
        # x [M, K], weight [N, K], wq/ws its 128x128 quantization; gemms = (fwd/dgrad gemm, wgrad gemm)
        if needs_wgrad and save_fp8_activation:
            xq, xs, xtq, xts = _quant_dual(x, gemms[0], "x")
            saved, ctx.fp8_saved = (xtq, xts), True
        else:
            xq, xs = _quant(x, "1x128", gemms[0], "x")
            saved, ctx.fp8_saved = ((x, None) if needs_wgrad else (None, None)), False
        y = GEMMS[gemms[0]](xq, xs, wq, ws).to(x.dtype)                          # [M, N]
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.gemms, ctx.x_dtype = gemms, x.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, wq, ws, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, wq, ws, xa, xb = ctx.saved_tensors
        g_fwd, g_wgrad = ctx.gemms
        dy = dy.contiguous()
        dx = dw = db = None
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_dx and need_dw:
            dyq, dys, dytq, dyts = _quant_dual(dy, g_fwd, "grad_output")
        elif need_dx:
            dyq, dys = _quant(dy, "1x128", g_fwd, "grad_output")
        elif need_dw:
            dytq, dyts = _quant(dy, "128x1", g_wgrad, "grad_output")
        if need_dx:
            # [M, K] = [M, N] @ ([K, N])^T: W^T as the K-contiguous operand, blocks transposed with it
            dx = GEMMS[g_fwd](dyq, dys, wq.t().contiguous(), ws.t().contiguous()).to(ctx.x_dtype)
        if need_dw:
            xtq, xts = (xa, xb) if ctx.fp8_saved else _quant(xa, "128x1", g_wgrad, "x")
            # [N, K] = [N, M_pad] @ ([K, M_pad])^T
            dw = GEMMS[g_wgrad](dytq, dyts, xtq, xts).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0)
        return dx, dw, db, None, None, None, None, None


class FP8Linear(nn.Linear):
    """Drop-in nn.Linear whose forward, dgrad and wgrad GEMMs run in FP8 (E4M3, block-scaled, fp32 accumulate).

    Args: in_features, out_features (multiples of 128), bias, device, dtype as nn.Linear;
      backend: "auto" (scaled_mm where its probe passes, else the Triton GEMM, on FP8 GPUs; the exact emulation
        elsewhere) | "emulation" (quantize, dequantize, fp32 matmul; any device) | "scaled_mm" | "triton"
        (explicit: raise where they cannot run; "triton" also runs on CPU under TRITON_INTERPRET=1);
      save_fp8_activation: keep the activation for backward in FP8 (True, Jet-RL) or in its own dtype.
    Input x [..., in_features] fp32/bf16/fp16; output [..., out_features] in x's dtype (values rounded to bf16
    by the GEMM). Differentiable in x, weight and bias. Example:
        layer = FP8Linear(256, 512).to(torch.bfloat16); y = layer(torch.randn(7, 256, dtype=torch.bfloat16))
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 backend="auto", save_fp8_activation=True):
        _check_features(in_features, out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(backend, save_fp8_activation)

    def _setup(self, backend, save_fp8_activation):
        check_option("backend", backend, BACKENDS)
        self.backend = backend
        self.save_fp8_activation = bool(save_fp8_activation)
        self._wcache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend="auto", save_fp8_activation=True) -> FP8Linear:
        """Wrap an existing nn.Linear, keeping its weight and bias Parameter objects (optimizers keep working)."""
        _check_features(linear.in_features, linear.out_features)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(backend, save_fp8_activation)
        new.train(linear.training)
        return new

    def quantized_weight(self, gemm: str):
        """(wq [N, K] e4m3, ws [N/128, K/128] fp32), recomputed only when the weight changed."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype, gemm == "emulation")
        if self._wcache is None or self._wcache[0] != key:
            with torch.no_grad():
                self._wcache = (key, *_quant(w.detach(), "128x128", gemm, "weight"))
        return self._wcache[1], self._wcache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, min_ndim=1, floating=True)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has last dim {x.shape[-1]}, FP8Linear expects in_features={self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        gemms = (resolve_gemm(self.backend, x.device, "block"), resolve_gemm(self.backend, x.device, "row"))
        wq, ws = self.quantized_weight(gemms[0])
        needs_wgrad = torch.is_grad_enabled() and self.weight.requires_grad
        y = FP8LinearFunction.apply(x2, self.weight, self.bias, wq, ws, gemms, self.save_fp8_activation,
                                    needs_wgrad)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, backend={self.backend!r}, "
                f"save_fp8_activation={self.save_fp8_activation}")


def _check_features(in_features: int, out_features: int) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if v % GROUP:
            raise ValueError(f"FP8Linear needs {name} divisible by {GROUP} (128x128 weight blocks), got {v}")
