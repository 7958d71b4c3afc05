"""Backend choice for the public ops: `impl="auto" | "triton" | "reference"`.

auto picks the Triton kernel on CUDA tensors when one is registered for the op and the reference on
anything else. An explicitly requested backend never falls back: asking for "triton" where it cannot
run raises. Under TRITON_INTERPRET=1 the Triton kernels also run on CPU tensors (tests use this).
Kernel issues register their launch functions with `register_triton(op_name)`.
"""
from __future__ import annotations

import importlib.util
import os

from .._checks import check_impl

_TRITON_IMPLS: dict = {}


def register_triton(op_name: str):
    def deco(fn):
        _TRITON_IMPLS[op_name] = fn
        return fn
    return deco


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # a plain bool: torch.compile traces it freely


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose(op_name: str, impl: str, device) -> str:
    """Return "triton" or "reference" for this op on tensors living on `device`."""
    check_impl(impl)
    if impl == "reference":
        return "reference"
    usable = op_name in _TRITON_IMPLS and triton_installed()
    if impl == "auto":
        return "triton" if usable and device.type == "cuda" else "reference"
    if op_name not in _TRITON_IMPLS:
        raise NotImplementedError(f"impl='triton' is not available for {op_name} in this build; use impl='reference'")
    if not triton_installed():
        raise RuntimeError(f"impl='triton' requested for {op_name} but triton is not installed")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"impl='triton' for {op_name} needs CUDA tensors, got device {device}; "
            "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
        )
    return "triton"


def triton_impl(op_name: str):
    return _TRITON_IMPLS[op_name]
