"""Profiling: phase timers (CUDA events / host timers), a FLOP model for MFU, and an NVML sampler.

Run level: `step_flops` (a trainer step's model FLOPs per phase). `counters`: the experts' forwards and backwards
(DiT rows, LM tokens) counted by hooks as they happen (what the time-to-reward harness measures). Nothing here imports
the trainer (which uses these): the drivers that run it, `unirl-fast report` and `unirl-fast profile`, are
`unirl_fast.report` and `unirl_fast.profile_run`, beside the command line."""
from .counters import ComputeCounter, Counts
from .flops import (
           DiTShape,
           LMShape,
           device_peak_tflops,
           dit_forward_flops,
           lm_decode_flops,
           lm_forward_flops,
           lm_sequence_flops,
           mfu,
)
from .nvml import NvmlSampler
from .timers import PhaseTimer

__all__ = ["ComputeCounter", "Counts", "PhaseTimer", "NvmlSampler", "LMShape", "DiTShape", "lm_forward_flops",
           "lm_sequence_flops", "lm_decode_flops", "dit_forward_flops", "mfu", "device_peak_tflops"]
