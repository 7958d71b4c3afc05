"""The tolerance rule of docs/contributing.md.

A result passes when  err(ours) <= 2 * err(torch at the same precision) + atol,  where err is the
relative error ||x - ref|| / ||ref|| against an fp64 oracle. "torch at the same precision" is the
plain PyTorch computation run in the inputs' dtype (the framework's own error); when ours and the
baseline are both exact to fp32 rounding, atol carries the comparison.
FP8 results use the scale-free metric 1 - 2<x,y> / (|x|^2 + |y|^2) under a per-recipe bound.
"""
from __future__ import annotations

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / max(||ref||, tiny), in fp64. NaN anywhere gives inf (never passes)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(x).all() and not torch.equal(torch.isfinite(x), torch.isfinite(ref)):
        return float("inf")
    fin = torch.isfinite(ref)
    if not torch.equal(x[~fin], ref[~fin]):
        return float("inf")
    num = (x[fin] - ref[fin]).norm().item()
    den = ref[fin].norm().item()
    return num / max(den, 1e-30)


def assert_close_rule(ours, ref, baseline=None, *, atol=1e-6, name="output"):
    """Assert err(ours) <= 2 * err(baseline) + atol (baseline None: err(ours) <= atol)."""
    e = rel_err(ours, ref)
    eb = 0.0 if baseline is None else rel_err(baseline, ref)
    bound = 2.0 * eb + atol
    assert e <= bound, f"{name}: rel err {e:.3e} > bound {bound:.3e} (baseline err {eb:.3e}, atol {atol:g})"
    return e


def scale_free_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2<x,y> / (|x|^2 + |y|^2): 0 for equal tensors, scale-free (DeepGEMM's FP8 metric)."""
    x, y = x.detach().double().flatten(), y.detach().double().flatten()
    denom = (x * x).sum() + (y * y).sum()
    return float(1.0 - 2.0 * (x * y).sum() / denom) if denom > 0 else 0.0
