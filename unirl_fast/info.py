"""`unirl-fast info`: versions, the device, and which optional backends are usable here."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import platform
import sys

import torch


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str):
    if module == "deepspeed" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "Setting accelerator to CPU" warning on a CPU machine
    try:
        with contextlib.redirect_stdout(sys.stderr):  # deepspeed logs to stdout on import; `info --json` is stdout
            importlib.import_module(module)
        return True, ""
    except Exception as e:  # an installed-but-broken backend is reported, not raised
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def collect() -> dict:
    cuda = torch.cuda.is_available()
    dev = {"cuda": cuda, "cpu_count": os.cpu_count()}
    if cuda:
        cap = torch.cuda.get_device_capability(0)
        dev.update(name=torch.cuda.get_device_name(0), capability=f"{cap[0]}.{cap[1]}",
                   count=torch.cuda.device_count(),
                   memory_GiB=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    backends = {}
    for name, module, dist in (("triton", "triton", "triton"), ("flash-attn", "flash_attn", "flash-attn"),
                               ("deepspeed", "deepspeed", "deepspeed"), ("diffusers", "diffusers", "diffusers"),
                               ("liger", "liger_kernel", "liger-kernel")):
        ok, why = _importable(module) if _version(dist) else (False, "not installed")
        note = why
        if name == "triton" and ok and not cuda:
            note = "kernels run only under TRITON_INTERPRET=1 (no CUDA device)"
        if name == "flash-attn" and ok and not cuda:
            ok, note = False, "installed, but needs a CUDA device"
        backends[name] = {"usable": ok, "version": _version(dist), "note": note}
    fp8 = cuda and torch.cuda.get_device_capability(0) >= (8, 9) and hasattr(torch, "_scaled_mm")
    backends["fp8-gemm"] = {"usable": bool(fp8), "version": None,
                            "note": "" if fp8 else "needs a CUDA GPU with compute capability >= 8.9"}
    versions = {"unirl_fast": _version("unirl-fast"), "python": platform.python_version(), "torch": torch.__version__,
                "transformers": _version("transformers"), "numpy": _version("numpy"),
                "nvidia-ml-py": _version("nvidia-ml-py")}
    return {"versions": versions, "device": dev, "backends": backends}


def format_info(info: dict) -> str:
    lines = ["versions:"]
    lines += [f"  {k:14s} {v or 'not installed'}" for k, v in info["versions"].items()]
    d = info["device"]
    lines.append("device:")
    if d["cuda"]:
        lines.append(f"  {d['name']} (sm {d['capability']}, {d['memory_GiB']} GiB) x{d['count']}")
    else:
        lines.append(f"  cpu only ({d['cpu_count']} cores); ops run their fp32 reference path")
    lines.append("backends:")
    for k, b in info["backends"].items():
        state = "usable" if b["usable"] else "unusable"
        ver = f" {b['version']}" if b["version"] else ""
        note = f"  ({b['note']})" if b["note"] else ""
        lines.append(f"  {k:14s} {state}{ver}{note}")
    return "\n".join(lines)
