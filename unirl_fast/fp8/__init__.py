"""FP8 unified precision flow (Jet-RL), FORMULAS.md section 6: one quantizer family and one FP8 GEMM for
rollout and training. See `linear.py` for the recipe, `quantize.py` for the quantizers and their layouts.
"""
from .convert import convert_to_fp8
from .gemm import has_fp8_gemm, scaled_mm_failure
from .linear import FP8Linear, FP8LinearFunction, fp8_weight_cache, invalidate_fp8_weights
from .metrics import rollout_mismatch
from .quantize import dequantize_fp8, quantize_fp8, quantize_fp8_ref

__all__ = ["FP8Linear", "FP8LinearFunction", "fp8_weight_cache", "invalidate_fp8_weights", "convert_to_fp8",
           "rollout_mismatch", "quantize_fp8", "quantize_fp8_ref", "dequantize_fp8", "has_fp8_gemm",
           "scaled_mm_failure"]
