"""Every Triton launch runs under its inputs' device (and so that device's current stream).

Two fake CUDA devices are impossible on a CPU, so the guard is checked two ways that do not need them:
- read-through: every function in kernels/ that launches a Triton kernel (`kernel[grid](...)`) is decorated with
  `launch_guard`, and no launch exists outside kernels/;
- at run time: every registered Triton implementation (forward and backward) and the FP8 Triton GEMM run on CPU
  under the interpreter with a hook on every launch that records the device the innermost guard made current; each
  launch must be inside a guard for its tensors' device. A registered implementation with no sample call here
  fails the test (add one), and an implementation that skips the guard fails it (checked on a toy launcher).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import KernelInterface
from unirl_fast.kernels._device import current_guard, launch_guard

import unirl_fast as U
from unirl_fast._checks import checks
from unirl_fast.fp8.gemm import GEMMS
from unirl_fast.fp8.quantize import quantize_fp8_ref
from unirl_fast.ops._dispatch import _TRITON_IMPLS, interpreting, triton_impl

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")


# ----------------------------------------------------------------------------------------------- read-through

def launch_sites(path: Path, kernel_names) -> list:
    """[(function name, decorated with launch_guard?)] for every function of `path` with a `k[grid](...)` launch of
    a name in kernel_names."""
    tree = ast.parse(path.read_text())
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        launches = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                    and isinstance(n.func.value, ast.Name) and n.func.value.id in kernel_names]
        if launches:
            guarded = any(isinstance(d, ast.Name) and d.id == "launch_guard" for d in fn.decorator_list)
            out.append((fn.name, guarded))
    return out


def _kernel_names(module) -> set:
    return {k for k, v in vars(module).items() if isinstance(v, KernelInterface)}


def test_every_launcher_in_kernels_is_guarded():
    sites = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        mod = importlib.import_module(f"unirl_fast.kernels.{path.stem}")
        sites += [(path.name, *s) for s in launch_sites(path, _kernel_names(mod))]
    assert len(sites) >= 12, sites  # every launcher was found (a parser that finds nothing proves nothing)
    assert [s for s in sites if not s[2]] == [], "launchers without @launch_guard"


def test_no_launch_outside_kernels():
    for path in sorted((ROOT / "unirl_fast").rglob("*.py")):
        assert "_kernel[" not in path.read_text(), f"{path}: launch Triton kernels from kernels/ (guarded)"


def test_read_through_flags_an_unguarded_launcher(tmp_path):
    src = tmp_path / "toy.py"
    src.write_text("@launch_guard\ndef good(x):\n    _k[(1,)](x)\n\ndef bad(x):\n    _k[(1,)](x)\n")
    assert launch_sites(src, {"_k"}) == [("good", True), ("bad", False)]


# ----------------------------------------------------------------------------------------------- at run time

class LaunchLog:
    """Patches every Triton launch (`kernel[grid](...)`) to record (kernel, guard device, tensor devices)."""

    def __init__(self, monkeypatch):
        self.launches = []
        orig = KernelInterface.__getitem__

        def getitem(kernel, grid):
            run = orig(kernel, grid)

            def launch(*args, **kwargs):
                devs = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
                self.launches.append((getattr(kernel, "__name__", repr(kernel)), current_guard(), devs))
                return run(*args, **kwargs)
            return launch
        monkeypatch.setattr(KernelInterface, "__getitem__", getitem)

    def unguarded(self) -> list:
        return [(k, g, d) for k, g, d in self.launches if g is None or d != {g}]


def _policy_inputs(device, B=3, L=5):
    g = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    return g(B, L) * 0.1 - 1, g(B, L) * 0.1 - 1, g(B), mask


def _head(device, N=6, H=16, V=37):
    h = torch.randn(2, N // 2, H, device=device, requires_grad=True)
    w = torch.randn(V, H, device=device, requires_grad=True)
    return h, w, torch.randint(0, V, (2, N // 2), device=device)


def _flow(device, B=2, shape=(3, 4, 4)):
    v = torch.randn(B, *shape, device=device, requires_grad=True)
    x = torch.randn(B, *shape, device=device)
    return v, x, torch.full((B,), 0.6, device=device), torch.full((B,), 0.4, device=device)


def s_logprobs(device):
    x = torch.randn(2, 5, 37, device=device, requires_grad=True)
    lp, ent = U.logprobs_from_logits(x, torch.randint(0, 37, (2, 5), device=device), return_entropy=True,
                                     impl="triton")
    (lp.sum() + ent.sum()).backward()


def s_fused_linear_logprobs(device):
    h, w, y = _head(device)
    lp, ent = U.fused_linear_logprobs(h, w, y, return_entropy=True, impl="triton")
    (lp.sum() + ent.sum()).backward()


def s_policy_loss(device):
    logp, old, adv, mask = _policy_inputs(device)
    logp.requires_grad_(True)
    loss, _ = U.policy_loss(logp, old, adv, mask, ref_logp=old, beta=0.1, impl="triton")
    loss.backward()


def s_fused_linear_policy_loss(device):
    h, w, y = _head(device)
    _, old, adv, mask = _policy_inputs(device, 2, 3)
    loss, _ = U.fused_linear_policy_loss(h, w, y, old, adv[:2], mask, impl="triton")
    loss.backward()


def s_group_advantages(device):
    U.group_advantages(torch.randn(6, device=device), torch.arange(3, device=device).repeat_interleave(2),
                       impl="triton")


def s_flow_sde_step(device):
    v, x, s, n = _flow(device)
    U.flow_sde_step(v.detach(), x, s, n, impl="triton")


def s_flow_step_logprob(device):
    v, x, s, n = _flow(device)
    U.flow_step_logprob(v, x, x + 0.1, s, n, impl="triton").sum().backward()


def s_flow_policy_loss(device):
    v, _, _, _ = _flow(device)
    logp = torch.randn(1, 2, device=device, requires_grad=True)
    loss, _ = U.flow_policy_loss(logp, logp.detach() + 0.01, torch.randn(2, device=device), velocity=v[None],
                                 ref_velocity=v.detach()[None] + 0.1, beta_velocity=0.5, impl="triton")
    loss.backward()


def s_forward_process_loss(device):
    v, x, t, _ = _flow(device)
    for algo in ("nft", "awm"):
        loss, _ = U.forward_process_loss(v, v.detach() + 0.1, x, x + 1.0, t, torch.randn(2, device=device),
                                         algo=algo, v_ref=v.detach() - 0.1, beta_kl=0.1, impl="triton")
        loss.backward()


def s_quantize_fp8(device):
    for grouping in ("1x128", "128x1", "128x128"):
        triton_impl("quantize_fp8")(torch.randn(128, 256, device=device), grouping)


def s_quantize_fp8_dual(device):
    triton_impl("quantize_fp8_dual")(torch.randn(130, 256, device=device))


def s_fp8_gemm(device):  # not a registered op: FP8Linear calls it through fp8.gemm.GEMMS
    a, sa = quantize_fp8_ref(torch.randn(5, 256, device=device), "1x128")
    b, sb = quantize_fp8_ref(torch.randn(128, 256, device=device), "128x128")
    GEMMS["triton"](a, sa, b, sb)


SAMPLES = {
    "logprobs_from_logits": s_logprobs, "fused_linear_logprobs": s_fused_linear_logprobs,
    "policy_loss": s_policy_loss, "fused_linear_policy_loss": s_fused_linear_policy_loss,
    "group_advantages": s_group_advantages, "flow_sde_step": s_flow_sde_step,
    "flow_step_logprob": s_flow_step_logprob, "flow_policy_loss": s_flow_policy_loss,
    "forward_process_loss": s_forward_process_loss,
    "quantize_fp8": s_quantize_fp8, "quantize_fp8_dual": s_quantize_fp8_dual,
}


def test_every_registered_triton_impl_has_a_sample():
    missing = sorted(set(_TRITON_IMPLS) - set(SAMPLES))
    assert not missing, f"registered Triton implementations with no guard sample here: {missing}"


@pytest.mark.parametrize("name", sorted(SAMPLES) + ["fp8_gemm"])
def test_every_launch_runs_under_the_guard(name, monkeypatch, device):
    log = LaunchLog(monkeypatch)
    with checks("cheap"):
        (s_fp8_gemm if name == "fp8_gemm" else SAMPLES[name])(device)
    assert log.launches, f"{name}: no Triton launch seen (the sample did not reach the kernels)"
    assert log.unguarded() == [], f"{name}: launches outside a guard for their tensors' device"


@triton.jit
def _toy_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def _toy_unguarded(x):
    _toy_kernel[(1,)](x)
    return x


@launch_guard
def _toy_guarded(x):
    _toy_kernel[(1,)](x)
    return x


def test_run_time_check_fails_for_an_unguarded_launcher(monkeypatch, device):
    log = LaunchLog(monkeypatch)
    x = torch.zeros(1, device=device)
    _toy_unguarded(x)
    assert len(log.unguarded()) == 1
    _toy_guarded(x)
    assert len(log.unguarded()) == 1 and len(log.launches) == 2  # the guarded launch passes
    assert float(x) == 2.0


def test_guard_names_the_device_and_restores(device):
    assert current_guard() is None

    @launch_guard
    def inner(t):
        return current_guard()
    assert inner(torch.zeros(1, device=device)) == torch.zeros(1, device=device).device
    assert current_guard() is None


@pytest.mark.gpu
def test_guard_sets_the_current_cuda_device():
    last = torch.device("cuda", torch.cuda.device_count() - 1)

    @launch_guard
    def where(t):
        return torch.cuda.current_device()
    before = torch.cuda.current_device()
    assert where(torch.zeros(1, device=last)) == last.index
    assert torch.cuda.current_device() == before


def test_device_flag_sets_the_current_cuda_device(monkeypatch):
    """`--device cuda:N` makes N current (the trainer and the profiler call use_device before building anything)."""
    from unirl_fast.train import TrainConfig
    from unirl_fast.train.config import use_device

    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    assert use_device(TrainConfig(device="cuda:1")) == torch.device("cuda", 1)
    assert seen == [torch.device("cuda", 1)]
    use_device(TrainConfig(device="cpu"))
    assert seen == [torch.device("cuda", 1)]
