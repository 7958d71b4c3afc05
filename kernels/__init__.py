"""Triton kernels, installed as `unirl_fast.kernels` (never as a top-level `kernels` module).

One file per op: only `@triton.jit` kernels and their launchers (tensors in, tensors out); the autograd
wrappers live in `unirl_fast.ops`. Kernels must run on the GPU machine's Triton (3.6) and, under
TRITON_INTERPRET=1, on the CPU with the newest Triton.
"""
