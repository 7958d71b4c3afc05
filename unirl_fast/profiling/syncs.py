"""Counting the host syncs of a block of work: the ops that make the host wait for the device.

A GPU step stays fast when the host queues kernels ahead of the device; every read of a device value on the host
(`.item()`, `float(t)`, `bool(t)`, `if t.any():`), every op whose output size depends on the data (`nonzero`,
boolean-mask indexing, `unique`, `masked_select`, `repeat_interleave` without an output size) and every
device-to-host copy (`.cpu()`, `.tolist()`, `.numpy()`) drains that queue. `HostSyncCounter` counts them
without a GPU: a `TorchDispatchMode` sees the aten ops (so it works on CPU tensors, where the same code paths run),
and the host reads that never reach the dispatcher on a CPU tensor (`.tolist()`, `.cpu()`, `.numpy()`) are counted
by wrapping those methods for the duration. On a CPU every such read is counted, including reads of tensors that
live on the host anyway (task ids, rewards of a host-side reward), so the count is an upper bound of what the same
code syncs on a GPU; tensors marked host-resident (`_checks.mark_host_resident`: the value checks' flag copies, an
optimizer's step counters) are the exception, as reading them is no sync anywhere. On a GPU,
`torch.cuda.set_sync_debug_mode("warn")` is the device's own count (bench/gpu_suite.sh runs both).

    with HostSyncCounter() as syncs:
        trainer.train_step()
    syncs.total, syncs.counts        # {"aten._local_scalar_dense.default": 3, "Tensor.tolist": 1, ...}
    syncs.where                      # with HostSyncCounter(trace=True): {"unirl_fast/train/rl.py:212": 2, ...}
"""
from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .._checks import is_host_resident

aten = torch.ops.aten

# ops that always wait for the device: a value read on the host, or an output whose size depends on the data
_ALWAYS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.allclose.default,
           aten.is_nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default, aten._unique.default, aten.bincount.default}
_HOST_METHODS = ("tolist", "cpu", "numpy")


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _is_sync(func, args, kwargs) -> bool:
    if args and is_host_resident(args[0]):  # host memory on every device (a check flag's copy, a step counter)
        return False
    if func in _ALWAYS:
        return True
    if func is aten.index.Tensor or func in (aten.index_put.default, aten.index_put_.default):
        return _has_bool_index(args[1])  # a boolean mask index is a nonzero inside
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (aten._to_copy.default, aten.copy_.default):  # device -> host copies (seen on a GPU)
        src = args[1] if func is aten.copy_.default else args[0]
        dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
        return src.device.type not in ("cpu", "meta") and dst is not None and torch.device(dst).type == "cpu"
    return False


class HostSyncCounter(TorchDispatchMode):
    """Counts sync-forcing ops (see the module docstring) inside the block: `total`, `counts` by op name."""

    def __init__(self, trace: bool = False):
        super().__init__()
        self.counts = collections.Counter()
        self.where = collections.Counter()  # trace=True: the innermost unirl_fast frame of each sync
        self.trace = trace
        self._saved = {}

    def _count(self, name: str) -> None:
        self.counts[name] += 1
        if self.trace:
            frames = [f for f in traceback.extract_stack()[:-2] if "unirl_fast" in f.filename
                      and not f.filename.endswith("syncs.py")]
            f = frames[-1] if frames else None
            self.where[f"{f.filename.split('unirl_fast/')[-1]}:{f.lineno}" if f else "outside unirl_fast"] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self._count(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in _HOST_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                if not is_host_resident(t):
                    self._count(f"Tensor.{_name}")
                return _orig(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
        self._saved = {}
        return super().__exit__(*exc)
