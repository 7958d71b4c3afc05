"""Triton `group_advantages` against the reference: ragged groups with arbitrary ids, every mode / std."""
import pytest
import torch
from tolerance import assert_close_rule

import unirl_fast as U
from unirl_fast.reference import group_advantages_ref


def _ragged(device, n=97):
    ids = torch.randint(-40, 40, (n,), device=device) * 13 + 5  # arbitrary, unsorted, negative ids
    R = torch.randn(n, device=device)
    R[ids == ids[0]] = 1.5  # a zero-variance group
    ids[-1] = 10_000  # a singleton group
    return R, ids


@pytest.mark.parametrize("clip", [None, 0.8], ids=["noclip", "clip"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["ddof0", "ddof1"])
@pytest.mark.parametrize("mode,std", [("grpo", "group"), ("grpo", "global"), ("grpo", "none"), ("rloo", "group")])
def test_group_advantages_matches_reference(device, mode, std, unbiased, clip):
    R, ids = _ragged(device)
    A = U.group_advantages(R, ids, mode=mode, std=std, unbiased=unbiased, clip=clip, impl="triton")
    A_r = group_advantages_ref(R, ids, mode=mode, std=std, unbiased=unbiased, clip=clip)
    assert A.dtype == torch.float32 and A.shape == R.shape
    assert_close_rule(A, A_r, atol=2e-6)
    flat = (A_r == 0)
    assert torch.equal(A == 0, flat)  # singleton / zero-variance groups exactly 0, nothing else
    assert bool((A[ids == ids[0]] == 0).all()) and float(A[-1]) == 0.0


def test_group_advantages_bf16_rewards_and_single_group(device):
    R = torch.randn(33, device=device).to(torch.bfloat16)
    ids = torch.full((33,), 7, device=device)
    A = U.group_advantages(R, ids, eps=0.0, impl="triton")
    assert_close_rule(A, group_advantages_ref(R, ids, eps=0.0), atol=2e-6)


def test_group_advantages_compiles_fullgraph(device):
    R, ids = _ragged(device, n=40)
    backend = "inductor" if device.type == "cuda" else "aot_eager"  # no C++ compile on the CPU runner
    f = torch.compile(lambda r, g: U.group_advantages(r, g, impl="triton", clip=1.0), fullgraph=True, backend=backend)
    torch.testing.assert_close(f(R, ids), U.group_advantages(R, ids, impl="triton", clip=1.0))


@pytest.mark.gpu
def test_group_advantages_gpu_many_groups():
    dev = torch.device("cuda")
    ids = torch.randint(0, 5000, (65536,), device=dev)
    R = torch.rand(65536, device=dev)
    for std in ("group", "global"):
        A = U.group_advantages(R, ids, std=std, unbiased=True, impl="triton")
        assert_close_rule(A, group_advantages_ref(R, ids, std=std, unbiased=True), atol=2e-6)
