"""What launchers ask of the device they launch on.

A compile report (bench/kernel_report.py) launches on meta tensors as an H100 would, with no GPU: the meta device
counts as an H100 here (132 SMs). Under the Triton interpreter (CPU tensors) a small count keeps test launches
short while still exercising the multi-program paths.
"""
from __future__ import annotations

import torch

H100_SMS = 132


def sm_count(device) -> int:
    if device.type == "meta":
        return H100_SMS
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count
