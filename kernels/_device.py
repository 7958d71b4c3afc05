"""What launchers ask of the device they launch on, and the launch guard every launcher runs under.

A Triton kernel launches on the *current* CUDA device's current stream, not on its tensors' device: a call with
cuda:1 tensors while cuda:0 is current would launch on GPU 0 with GPU 1 pointers. `launch_guard` (a decorator on
every launcher in this package) makes the inputs' device current for the duration of the launch, so the kernel
runs on that device and on that device's current stream (the one the caller's `torch.cuda.stream(...)` set).
The same guard (`device_guard`) wraps the value checks' flag copy and its event (`unirl_fast._checks.flag`), so the
event is recorded on the stream the copy was queued on. flash-attn and flash-linear-attention guard their launches
the same way. `current_guard()` says which device the innermost guard made current (tests check every launch
against it).

A compile report (bench/kernel_report.py) launches on meta tensors as an H100 would, with no GPU: the meta device
counts as an H100 here (132 SMs). Under the Triton interpreter (CPU tensors) a small count keeps test launches
short while still exercising the multi-program paths.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

H100_SMS = 132
_state = threading.local()


def sm_count(device) -> int:
    if device.type == "meta":
        return H100_SMS
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


@contextlib.contextmanager
def device_guard(device: torch.device):
    """`device` current (a CUDA device; anything else changes nothing) for the block; `current_guard()` names it."""
    outer = getattr(_state, "device", None)
    _state.device = device
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        _state.device = outer


def current_guard():
    """The device of the innermost active guard, or None outside every guard."""
    return getattr(_state, "device", None)


def _first_tensor(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    raise TypeError("launch_guard: the launcher got no tensor argument to take the device from")


def launch_guard(fn):
    """Decorator for a function that launches Triton kernels: it runs under its first tensor argument's device (and
    so that device's current stream)."""
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        with device_guard(_first_tensor(args, kwargs).device):
            return fn(*args, **kwargs)
    guarded.__launch_guard__ = True
    return guarded
