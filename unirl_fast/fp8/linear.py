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

Quantizations per layer and step: W in every forward that builds a graph for backward, and once per rollout
(see "weight cache"), x once (rollout) or one fused dual pass (training), dy one fused dual pass, W^T a
transposed copy of the FP8 weight (N*K bytes) in backward. Non-finite x, dy or W raise ValueError; that check
reads only the scales and never syncs the host (on CUDA it is deferred to `unirl_fast.check_pending()`).

Weight cache: the FP8 weight is NOT cached by default: any forward re-quantizes the current weight (a
128x128-block pass over N*K elements, < 2% of the GEMM beside it at M >= 1024 tokens), so no optimizer or
engine can leave it stale: fused / foreach AdamW and DeepSpeed's ZeRO-1/2 flat-buffer refresh write the
weights without bumping the tensor's version, and ZeRO-3 re-gathers them at the same address, so no key on
(storage, version) can see those updates. Caching is scoped: inside `with fp8_weight_cache(model):` a forward
that builds no graph (rollout, reference forwards) reuses one FP8 copy per layer, and leaving the block drops
every copy (so no FP8 copy of a ZeRO-3-partitioned weight outlives its gather). The rollout engines open
that block around each generate call (weights cannot change inside one); a forward that builds a graph
re-quantizes even inside it, and any torch optimizer step (a global post-step hook) clears every cache.

Unified flow: rollout (eval / no_grad) and training call the same `FP8LinearFunction.forward`, which
quantizes x and W with one quantizer family and runs one GEMM, so a token's rollout log-prob and the one
the trainer recomputes come from literally the same function (bitwise equal for the same batch).

Saved for backward: with save_fp8_activation=True (Jet-RL) the 128x1 FP8 copy of x that wgrad consumes
(1 byte/elem + 1/32 for scales, quantized in the forward) instead of x itself (2 bytes/elem in bf16). The
wgrad operand is the same tensor either way, so both settings give bitwise identical gradients; only
memory (and where the quantization runs) differs.

Limits: 2-D weights only; K, N multiples of 128 (ValueError otherwise; `convert_to_fp8` skips such layers);
no autocast integration (FP8 is its own precision policy); not made torch.compile-friendly (the scoped
weight cache reads the storage pointer and version counter: expect a graph break per layer); embeddings, LM head,
norms and attention stay in the input dtype by construction (only nn.Linear layers are swapped).
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

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
        self._cache_depth = 0  # > 0 inside fp8_weight_cache()
        _LIVE.add(self)

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
        """(wq [N, K] e4m3, ws [N/128, K/128] fp32) of the current weight. Reused only inside fp8_weight_cache()
        by forwards that build no graph (and then only while storage, version and device are unchanged)."""
        w = self.weight
        if self._cache_depth == 0 or (torch.is_grad_enabled() and w.requires_grad):
            with torch.no_grad():
                return _quant(w.detach(), "128x128", gemm, "weight")
        key = (w.data_ptr(), w._version, w.device, w.dtype, gemm == "emulation")
        if self._wcache is None or self._wcache[0] != key:
            with torch.no_grad():
                self._wcache = (key, *_quant(w.detach(), "128x128", gemm, "weight"))
        return self._wcache[1], self._wcache[2]

    def invalidate_weight_cache(self) -> None:
        """Drop the cached FP8 weight (the next cached forward re-quantizes)."""
        self._wcache = None

    def __getstate__(self):
        """Copies (deepcopy, pickle) start outside any cache block, with no cached weight."""
        return {**self.__dict__, "_wcache": None, "_cache_depth": 0}

    def __setstate__(self, state):
        super().__setstate__(state)
        _LIVE.add(self)

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


_LIVE: "weakref.WeakSet[FP8Linear]" = weakref.WeakSet()


@contextlib.contextmanager
def fp8_weight_cache(module: nn.Module):
    """Within the block, every FP8Linear in `module` quantizes its weight once and reuses it in forwards that
    build no graph (rollout, frozen-reference forwards); on exit every cached copy is dropped. The weights must
    not change inside the block except through a torch optimizer step (which clears the caches) or a call of
    `invalidate_fp8_weights`. Blocks nest. Example:
        with torch.no_grad(), fp8_weight_cache(model):
            out = engine.generate(...)          # one FP8 weight quantization per layer, not one per token
    """
    layers = [m for m in module.modules() if isinstance(m, FP8Linear)]
    for m in layers:
        m._cache_depth += 1
    try:
        yield
    finally:
        for m in layers:
            m._cache_depth -= 1
            if m._cache_depth == 0:
                m.invalidate_weight_cache()


def with_fp8_weight_cache(attr: str):
    """Method decorator: run the method inside `fp8_weight_cache(getattr(self, attr))` (the rollout engines)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            with fp8_weight_cache(getattr(self, attr)):
                return fn(self, *args, **kwargs)
        return wrapper
    return deco


def has_fp8_layers(module: nn.Module) -> bool:
    """Whether any submodule is an FP8Linear (such a module is not torch.compile-friendly: see the limits above)."""
    return any(isinstance(m, FP8Linear) for m in module.modules())


def invalidate_fp8_weights(module: nn.Module | None = None) -> None:
    """Drop the cached FP8 weights of every FP8Linear in `module` (all live ones when None)."""
    for m in (_LIVE if module is None else module.modules()):
        if isinstance(m, FP8Linear):
            m.invalidate_weight_cache()


def _after_optimizer_step(optimizer, args, kwargs):
    invalidate_fp8_weights()


# Any torch optimizer's step (DeepSpeed's wrapped optimizers included) clears every cached FP8 weight.
register_optimizer_step_post_hook(_after_optimizer_step)


def _check_features(in_features: int, out_features: int) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if v % GROUP:
            raise ValueError(f"FP8Linear needs {name} divisible by {GROUP} (128x128 weight blocks), got {v}")
