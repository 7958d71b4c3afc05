"""FLOP model for MFU: the LM expert (decoder transformer) and the DiT (diffusion transformer).

Counting convention (as nanoGPT/PaLM): a matmul of [m, k] x [k, n] is 2mkn FLOPs; forward = F,
backward = 2F, so a training step is 3F (4F with activation recomputation, not counted here).
Per token of a decoder layer with hidden d, kv width d_kv (GQA), MLP width f (gated: 3 matrices):

    attention projections  2 * (d*d + 2*d*d_kv + d*d)
    attention scores/values 2 * 2 * ctx * d          (ctx = tokens attended; causal prefill: ~L/2 on average)
    MLP                    2 * n_mlp * d * f          (n_mlp = 3 for SwiGLU, 2 otherwise)
    LM head                2 * d * V                  (once per token, not per layer)

DiT per latent token with hidden d, MLP width f, T_img image tokens and T_txt conditioning tokens:
self-attention over image tokens, cross-attention to the conditioning, MLP (2 matrices unless gated).
MFU = achieved FLOP/s / peak FLOP/s of the dtype; peaks default to dense H100 SXM datasheet values,
and a measured ceiling (bench.common.measure_ceilings) can be passed instead.
"""
from __future__ import annotations

from dataclasses import dataclass

PEAK_TFLOPS = {"h100": {"bf16": 989.0, "fp8": 1979.0}, "h200": {"bf16": 989.0, "fp8": 1979.0}}


@dataclass(frozen=True)
class LMShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True

    @classmethod
    def from_hf_config(cls, cfg) -> "LMShape":
        heads = cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                   cfg.intermediate_size, cfg.vocab_size, getattr(cfg, "hidden_act", "silu") in ("silu", "swiglu"))


def lm_forward_flops(shape: LMShape, tokens: int, context: float, *, with_head: bool = True) -> float:
    """Forward FLOPs for `tokens` tokens each attending to `context` tokens on average."""
    d, kv = shape.hidden, shape.hidden * shape.kv_heads // shape.heads
    proj = 2 * (2 * d * d + 2 * d * kv)
    attn = 4 * context * d
    mlp = 2 * (3 if shape.gated_mlp else 2) * d * shape.intermediate
    per_tok = shape.layers * (proj + attn + mlp) + (2 * d * shape.vocab if with_head else 0)
    return float(per_tok) * tokens


def lm_sequence_flops(shape: LMShape, batch: int, seq_len: int, *, train: bool) -> float:
    """A causal pass over [batch, seq_len]: average context (L+1)/2; training = 3x forward."""
    f = lm_forward_flops(shape, batch * seq_len, (seq_len + 1) / 2)
    return 3 * f if train else f


def lm_decode_flops(shape: LMShape, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Generation: prefill of the prompt plus one token at a time attending to the growing cache."""
    prefill = lm_forward_flops(shape, batch * prompt_len, (prompt_len + 1) / 2)
    decode = lm_forward_flops(shape, batch * new_tokens, prompt_len + (new_tokens + 1) / 2)
    return prefill + decode


@dataclass(frozen=True)
class DiTShape:
    layers: int
    hidden: int
    intermediate: int
    cross_attention: bool = True
    cond_dim: int = 0  # width of the conditioning tokens (cross-attention K/V input)


def dit_forward_flops(shape: DiTShape, batch: int, img_tokens: int, cond_tokens: int) -> float:
    """One DiT forward over `batch` images (one denoising step, one branch: CFG doubles it)."""
    d = shape.hidden
    self_attn = 2 * 4 * d * d + 4 * img_tokens * d
    cross = 0.0
    if shape.cross_attention:
        c = shape.cond_dim or d
        cross = 2 * 2 * d * d + 2 * 2 * c * d * cond_tokens / img_tokens + 4 * cond_tokens * d
    mlp = 2 * 2 * d * shape.intermediate
    return float(batch * img_tokens * shape.layers * (self_attn + cross + mlp))


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]."""
    if seconds <= 0 or peak_tflops <= 0:
        raise ValueError(f"seconds and peak_tflops must be > 0, got {seconds}, {peak_tflops}")
    return flops / seconds / (peak_tflops * 1e12)


def device_peak_tflops(device_name: str, dtype: str = "bf16"):
    """Datasheet dense peak for a known GPU name, else None (MFU then unreported, not guessed)."""
    name = device_name.lower()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[dtype]
    return None
