"""A peak-memory probe that works on CPU: a TorchDispatchMode that follows every storage created by an op.

Each op's output tensors that own a storage not seen before count as an allocation (nbytes of the storage); the
storage is counted live while any tensor produced by an op on it (the allocating op's output or a later view)
is alive, by weak references (a tensor's Python object lives as long as its C++ tensor). So:
    live_bytes   bytes of op-made storages alive now;  peak_bytes: the most at any point inside the block
    allocs       (op name, numel, nbytes) of every new storage, in order
Tensors made before the block (the inputs), by `out=` ops into existing buffers, or by code that bypasses the
dispatcher (the Triton interpreter's own buffers) are not counted: the probe measures what the ops allocate,
which is what "extra memory" means in the tests.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocProbe(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.refs = {}  # storage key -> number of live tensors on it
        self.nbytes = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocs = []

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live_bytes -= self.nbytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or (key in inputs and key not in self.refs):  # a view of (or out= into) an untracked input
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.nbytes[key] = st.nbytes()
                self.live_bytes += st.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                self.allocs.append((str(func), t.numel(), st.nbytes()))
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out

    def largest(self) -> int:
        """numel of the largest tensor any op allocated in the block."""
        return max((n for _, n, _ in self.allocs), default=0)

    def count_at_least(self, numel: int) -> int:
        return sum(1 for _, n, _ in self.allocs if n >= numel)


def _key(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr()
