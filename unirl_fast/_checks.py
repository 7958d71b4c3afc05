"""Input validation shared by every public op.

Every check raises `ValueError` or `TypeError` naming the argument and the offending value or shape.
Shape, dtype and option checks are always on: they cost nothing. Value checks (NaN/inf, target range,
0/1 masks, sigma ranges) follow one switch, `set_checks(mode)` (or `UNIRL_FAST_VALUE_CHECKS`):

    "cheap" (default)  O(output) and sync-free: NaN/inf in logits, hidden states or a head show up in the
                       per-token log-probs, so those [N] outputs are checked instead of scanning [N, V] logits
                       or a [V, H] head; small inputs ([N] targets, [B, L] masks and log-probs, rewards,
                       sigmas, FP8 scales) are checked directly. Nothing is read back on the host in the op.
    "full"             "cheap" plus today's thorough input scans ([N, V] logits, [V, H] head, latents),
                       each raising at once (one host sync per check): for debugging.
    "off"              no value checks. Kernels still never read out of bounds: an out-of-range target id
                       gives a NaN log-prob, never a read past the row.

How a cheap check raises without a host sync: `flag(bad, message)` takes a device bool tensor (`bad`, any
shape) and a message builder. On a CPU tensor the check is free to read at once, so it raises right away. On
a CUDA tensor [any(bad), a bad index] is copied into pinned host memory without blocking and a CUDA event
is recorded; the flag is read once the event has completed: at the next checked op call if the GPU is done
by then (`Event.query()`, no wait), and at the latest when `check_pending()` is called (the trainer calls it
once per step; another trainer may call it once per step too). A flag whose event has not completed is never
waited for inside an op, so rollout decode and sampler steps stay free of host syncs (and CUDA-graph
capturable: under stream capture and under torch.compile tracing value checks are skipped, as the graph
cannot branch on data). An error raised from a later call names the op and argument it came from.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from typing import Callable, Iterable

import torch

from .kernels._device import device_guard

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CHECK_MODES = ("full", "cheap", "off")
_ENV = "UNIRL_FAST_VALUE_CHECKS"
_ENV_MODES = {"0": "off", "off": "off", "1": "cheap", "cheap": "cheap", "full": "full", "": "cheap"}
_mode: str | None = None  # set_checks(); None: the environment variable decides (default "cheap")
MAX_PENDING = 256  # deferred flags kept before the oldest is waited for (bounds pinned memory, never reached in a step)
_loop = threading.local()  # .paused: this thread is inside a decode / sampler loop's later steps (paused_in_loop)


def set_checks(mode: str | None) -> str | None:
    """Value-check mode for every op: "full" | "cheap" (default) | "off"; None goes back to the environment
    variable UNIRL_FAST_VALUE_CHECKS (0/off, 1/cheap, full). Returns the previous setting (for try/finally)."""
    global _mode
    if mode is not None:
        check_option("mode", mode, CHECK_MODES)
    prev, _mode = _mode, mode
    return prev


@contextlib.contextmanager
def checks(mode: str | None):
    """`with checks("full"): ...`: the given mode for the duration, the previous one restored after."""
    prev = set_checks(mode)
    try:
        yield
    finally:
        set_checks(prev)


@contextlib.contextmanager
def paused_in_loop():
    """For the steps of a decode or sampler loop after its first: in mode "cheap" the per-call value checks are
    off (no check work per layer call or per step); the loop checks its first step as usual and its outputs once
    (the rollout engines do). Mode "full" keeps checking every call; "off" stays off. Per thread: a rollout on
    another thread (one-step-off training) pauses its own checks, never the training thread's."""
    if get_checks() != "cheap":
        yield
        return
    prev, _loop.paused = getattr(_loop, "paused", False), True
    try:
        yield
    finally:
        _loop.paused = prev


def get_checks() -> str:
    """The mode in force: set_checks() if called, else UNIRL_FAST_VALUE_CHECKS (unset: "cheap"); "off" inside this
    thread's paused_in_loop."""
    if getattr(_loop, "paused", False):
        return "off"
    if _mode is not None:
        return _mode
    env = os.environ.get(_ENV, "1").strip().lower()
    if env not in _ENV_MODES:
        raise ValueError(f"{_ENV}={env!r} is not one of 0/off, 1/cheap, full")
    return _ENV_MODES[env]


def _tracing() -> bool:
    """torch.compile tracing or CUDA-graph capture: no data-dependent check can run."""
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is not None and compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def value_checks_enabled() -> bool:
    """Cheap (O(output), sync-free) value checks are on: mode "cheap" or "full", and not tracing. (Tracing is asked
    first: a graph then never reads the mode, so it is not recompiled when a loop pauses the checks.)"""
    return not _tracing() and get_checks() != "off"


def full_checks_enabled() -> bool:
    """The thorough input scans (mode "full"): O(input) and one host sync each."""
    return not _tracing() and get_checks() == "full"


class DeferredCheckError(ValueError):
    """A value check that ran deferred (CUDA tensors) failed; raised by a later checked op or `check_pending()`,
    with the message of the op and argument it came from."""


class _Pending:
    """One deferred flag: [any, a bad index] on its way to pinned host memory, and the event that says it arrived."""

    def __init__(self, host, event, shape, message):
        self.host, self.event, self.shape, self.message = host, event, shape, message

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def error(self):
        if self.event is not None:
            self.event.synchronize()
        bad, where = (int(v) for v in self.host.tolist())
        if not bad:
            return None
        return DeferredCheckError(self.message(_unravel(where, self.shape)))


_pending: list = []
_defer_on_cpu = False  # tests set this to run the CUDA (deferred) path on CPU tensors


def _unravel(i: int, shape) -> tuple:
    out = []
    for d in reversed(tuple(shape)):
        out.append(i % d if d else 0)
        i = i // d if d else 0
    return tuple(reversed(out))


def _fmt_index(idx: tuple) -> str:
    return str(idx[0]) if len(idx) == 1 else str(list(idx))


def flag(bad: torch.Tensor, message: Callable[[tuple], str]) -> None:
    """Raise ValueError(message(index of a True element of `bad`)) if any element of `bad` is True.

    CPU tensors (and mode "full") are read at once; CUDA tensors are deferred without a host sync (see the
    module docstring). `message` must not keep large tensors alive (it may run a step later): pass weak
    references where it wants to inspect an input."""
    if bad.numel() == 0:
        return
    defer = (bad.device.type != "cpu" or _defer_on_cpu) and get_checks() != "full"
    if not defer:
        if bool(bad.any()):
            first = int(torch.nonzero(bad.reshape(-1))[0, 0])
            raise ValueError(message(_unravel(first, bad.shape)))
        return
    poll()
    any_bad, where = bad.reshape(-1).to(torch.uint8).max(0)  # one reduction: whether any, and a bad index
    packed = torch.stack([any_bad.to(torch.int64), where])
    if bad.device.type == "cuda":
        with device_guard(bad.device):  # the copy and its event on the flag's device and its current stream
            host = mark_host_resident(torch.empty(2, dtype=torch.int64, pin_memory=True))
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(bad.device))
    else:
        host, event = mark_host_resident(packed), None  # stands for the pinned copy the CUDA path reads
    _pending.append(_Pending(host, event, tuple(bad.shape), message))
    if len(_pending) > MAX_PENDING:
        _raise_first([_pending.pop(0)])


def _raise_first(items) -> None:
    for p in items:
        err = p.error()
        if err is not None:
            _pending.clear()  # one error is enough: the rest may be its consequences
            raise err


def poll() -> None:
    """Raise the first failed deferred check whose result has already reached the host (never waits). Under a
    data-parallel process group nothing is raised here: one rank raising alone would leave the others waiting in
    their next collective, so the flags wait for `check_pending_all_ranks`."""
    if not _pending or _data_parallel():
        return
    done = []
    while _pending and _pending[0].ready():
        done.append(_pending.pop(0))
    _raise_first(done)


def check_pending() -> None:
    """Wait for every deferred value check and raise the first that failed (one host sync). Call once per
    training step before the optimizer step (the trainer does), or before trusting results computed with checks
    deferred."""
    err = pending_error()
    if err is not None:
        raise err


def pending_error() -> DeferredCheckError | None:
    """Wait for every deferred value check (one host sync) and return the first failure as a ValueError, or None;
    the queue is emptied either way. `check_pending` raises it; a data-parallel trainer reduces it over the ranks
    first, so that every rank stops at the same step."""
    items = list(_pending)
    _pending.clear()
    for p in items:
        err = p.error()
        if err is not None:
            return err
    return None


def _data_parallel() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank_error(err: ValueError | None) -> ValueError | None:
    """This rank's `pending_error()` made common to every rank of the default process group: one all-reduce of a
    flag (on the current CUDA device under NCCL); when any rank failed, every rank gets the first failing rank's
    error (the messages are gathered on that path only), so all stop at the same step instead of the others waiting
    in the next collective until its timeout. Without an initialised process group, `err` itself."""
    import torch.distributed as dist

    if not _data_parallel():
        return err
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    failed = torch.tensor([0 if err is None else 1], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return None
    msgs = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if err is None else str(err))
    rank, msg = next((r, m) for r, m in enumerate(msgs) if m is not None)
    return err if err is not None else DeferredCheckError(f"rank {rank}: {msg}")


def check_pending_all_ranks() -> None:
    """`check_pending` for data-parallel training: raises on every rank when any rank's deferred checks failed."""
    err = any_rank_error(pending_error())
    if err is not None:
        raise err


_HOST_RESIDENT = "_unirl_host_resident"


def mark_host_resident(t: torch.Tensor) -> torch.Tensor:
    """Mark a tensor that lives in host memory on every device (a check flag's host copy, an optimizer's step
    counter): reading it is no device sync, and `profiling.syncs.HostSyncCounter` does not count it."""
    setattr(t, _HOST_RESIDENT, True)
    return t


def is_host_resident(t) -> bool:
    return getattr(t, _HOST_RESIDENT, False)


def weak(x):
    """A weak reference to a tensor (None stays None) for deferred messages that inspect an input."""
    return None if x is None else weakref.ref(x)


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


def _value(ref, idx) -> str | None:
    """The weakly referenced tensor's element at idx as text, or None once the tensor is gone."""
    x = None if ref is None else ref()
    if x is None:
        return None
    try:
        return str(x[idx].item())
    except (IndexError, RuntimeError):
        return None


def _at(ref, idx) -> str:
    v = _value(ref, idx)
    return "" if v is None else f" (value {v})"


def check_finite(name: str, x: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Cheap check (O(x), sync-free) of a small input or an op's output: NaN and +/-inf, only where `where`."""
    if not value_checks_enabled():
        return
    bad = ~torch.isfinite(x)
    if where is not None:
        bad = bad & where
    ref = weak(x)
    flag(bad, lambda i: f"{name} has a non-finite value at index {_fmt_index(i)}{_at(ref, i)}; "
                        "a finite value is required")


def scan_finite(name: str, x: torch.Tensor) -> None:
    """Full check (mode "full" only): reject NaN and +/-inf anywhere in a large input, at once (one sync)."""
    if full_checks_enabled() and not bool(torch.isfinite(x).all()):
        bad = x[~torch.isfinite(x)].flatten()[0].item()
        raise ValueError(f"{name} contains non-finite values (e.g. {bad}); a finite value is required")


def scan_no_nan_or_posinf(name: str, x: torch.Tensor) -> None:
    """Full check (mode "full" only): reject NaN and +inf in logits; -inf is allowed (a masked logit)."""
    if full_checks_enabled():
        bad = torch.isnan(x) | (x == float("inf"))
        if bool(bad.any()):
            v = x[bad].flatten()[0].item()
            raise ValueError(f"{name} contains {v}; logits may be -inf but never NaN or +inf")


def bad_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """[...] bool: ids outside [0, vocab) that are not ignore_index."""
    return (targets != ignore_index) & ((targets < 0) | (targets >= vocab))


def check_targets(name: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Cheap check ([N] ints, sync-free). The kernels never read an out-of-range id (its log-prob is NaN)."""
    check_tensor(name, targets, integer=True)
    if not value_checks_enabled():
        return
    ref = weak(targets)

    def message(i):
        t = ref()
        v = f"id {int(t[i])}" if t is not None else f"an id at index {_fmt_index(i)}"
        return f"{name} contains {v} outside [0, {vocab}) that is not ignore_index={ignore_index}"
    flag(bad_targets(targets, vocab, ignore_index), message)


def check_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Accept bool, integer or float 0/1 masks (others: cheap check); return a bool mask."""
    check_tensor(name, mask)
    if mask.dtype == torch.bool:
        return mask
    if value_checks_enabled():
        ref = weak(mask)
        flag((mask != 0) & (mask != 1),
             lambda i: f"{name} must hold only 0 and 1, found {_value(ref, i) or 'another value'} at {_fmt_index(i)}")
    return mask != 0


def check_in_range(name: str, x: torch.Tensor, ok: torch.Tensor, what: str) -> None:
    """Cheap check: every element of x satisfies `ok` (a bool tensor broadcastable to x); else `name what`."""
    if not value_checks_enabled():
        return
    ref = weak(x)
    flag(~torch.broadcast_to(ok, x.shape),
         lambda i: f"{name} {what}, got {_value(ref, i) or 'another value'} at index {_fmt_index(i)}")


def check_impl(impl: str) -> None:
    check_option("impl", impl, ("auto", "triton", "reference"))
