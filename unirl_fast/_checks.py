"""Input validation shared by every public op.

Every check raises `ValueError` or `TypeError` naming the argument and the offending value or shape.
Value checks (NaN/inf, target range, 0/1 masks) need a device->host sync; they are skipped while
`torch.compile` traces (the graph cannot branch on data) and can be switched off for a hot loop with
`UNIRL_FAST_VALUE_CHECKS=0`. Shape, dtype and option checks are always on: they cost nothing.
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def value_checks_enabled() -> bool:
    if os.environ.get("UNIRL_FAST_VALUE_CHECKS", "1") == "0":
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    return not (compiling is not None and compiling())


def check_option(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def check_tensor(name: str, x, *, ndim=None, min_ndim=None, floating=False, integer=False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim not in ((ndim,) if isinstance(ndim, int) else tuple(ndim)):
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name} must have rank >= {min_ndim}, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if integer and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def check_same_device(**tensors) -> None:
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")


def check_finite_scalar(name: str, value, *, positive=False, nonneg=False, gt=None) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if gt is not None and not v > gt:
        raise ValueError(f"{name} must be > {gt}, got {value!r}")
    return v


def check_all_finite(name: str, x: torch.Tensor) -> None:
    """Reject NaN and +/-inf."""
    if value_checks_enabled() and not bool(torch.isfinite(x).all()):
        bad = x[~torch.isfinite(x)].flatten()[0].item()
        raise ValueError(f"{name} contains non-finite values (e.g. {bad}); a finite value is required")


def check_no_nan_or_posinf(name: str, x: torch.Tensor) -> None:
    """Reject NaN and +inf; -inf is allowed (a masked logit)."""
    if value_checks_enabled():
        bad = torch.isnan(x) | (x == float("inf"))
        if bool(bad.any()):
            v = x[bad].flatten()[0].item()
            raise ValueError(f"{name} contains {v}; logits may be -inf but never NaN or +inf")


def check_targets(name: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    check_tensor(name, targets, integer=True)
    if value_checks_enabled() and targets.numel():
        valid = targets != ignore_index
        bad = valid & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            v = targets[bad].flatten()[0].item()
            raise ValueError(
                f"{name} contains id {v} outside [0, {vocab}) that is not ignore_index={ignore_index}"
            )


def check_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Accept bool, integer or float 0/1 masks; return a bool mask."""
    check_tensor(name, mask)
    if mask.dtype == torch.bool:
        return mask
    if value_checks_enabled() and bool(((mask != 0) & (mask != 1)).any()):
        v = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"{name} must hold only 0 and 1, found {v}")
    return mask != 0


def check_impl(impl: str) -> None:
    check_option("impl", impl, ("auto", "triton", "reference"))
