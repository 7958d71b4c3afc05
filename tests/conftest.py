"""Test harness.

- Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set here, before any
  test module (and so triton's `@jit` decorators) is imported.
- Markers: `gpu` (skipped without CUDA), `slow` (skipped unless --runslow).
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow; pass --runslow")
    cuda = torch.cuda.is_available()
    for item in items:
        # markers, not keywords: keywords also hold the names of the directories above (a checkout in .../gpu/)
        if item.get_closest_marker("gpu") is not None and not cuda:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("slow") is not None and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture
def device():
    """Where kernel tests run: CUDA when present, else CPU (Triton through the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test id (crc32: stable across processes, unlike hash())."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny, launch-bound work: on a shared 2-core CPU more threads only
    oversubscribe (and make repeated timings incomparable). Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def slow_reward():
    """tests/reward_fns.py's slow_varied reward with its call log cleared before and after (SLOW: threads, gate)."""
    import reward_fns

    reward_fns.SLOW.update(threads=[], gate=None)
    yield reward_fns.SLOW
    reward_fns.SLOW.update(threads=[], gate=None)
