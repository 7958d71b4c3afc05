"""The harness itself: interpreter set-up, tolerance helpers, markers."""
import os

import pytest
import torch
from tolerance import assert_close_rule, rel_err, scale_free_err


def test_interpreter_is_on_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: kernels run natively")
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_a_triton_kernel_runs_here(device):
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _axpy(x_ptr, y_ptr, out_ptr, a, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        tl.store(out_ptr + o, a * tl.load(x_ptr + o, mask=m) + tl.load(y_ptr + o, mask=m), mask=m)

    x, y = torch.randn(1000, device=device), torch.randn(1000, device=device)
    out = torch.empty_like(x)
    _axpy[(triton.cdiv(1000, 256),)](x, y, out, 0.5, 1000, BLOCK=256)
    torch.testing.assert_close(out, 0.5 * x + y)


def test_rel_err_and_rule():
    ref = torch.randn(100, dtype=torch.float64)
    assert rel_err(ref, ref) == 0.0
    assert rel_err(ref.float(), ref) < 1e-6
    bad = ref.clone()
    bad[3] = float("nan")
    assert rel_err(bad, ref) == float("inf")
    noisy = ref + 1e-3 * torch.randn_like(ref)
    with pytest.raises(AssertionError):
        assert_close_rule(noisy, ref, ref.float(), atol=1e-6)
    assert_close_rule(ref.float(), ref, ref.half(), atol=0)


def test_rel_err_matching_infinities():
    ref = torch.tensor([float("-inf"), 1.0, 2.0], dtype=torch.float64)
    assert rel_err(ref.clone(), ref) == 0.0
    assert rel_err(torch.tensor([0.0, 1.0, 2.0]), ref) == float("inf")


def test_scale_free_err():
    x = torch.randn(1000)
    assert scale_free_err(x, x) < 1e-12
    assert scale_free_err(x, 3 * x) > 0.1  # same direction, different size: far from 0
    assert scale_free_err(2 * x, 2 * x + 1e-3 * torch.randn(1000)) < 1e-5


@pytest.mark.gpu
def test_gpu_marker_only_runs_with_cuda():
    assert torch.cuda.is_available()
