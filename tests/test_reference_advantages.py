"""Reference group advantages (FORMULAS.md section 3) against a per-group loop oracle in fp64."""
import pytest
import torch

import unirl_fast as U


def loop_oracle(R, gid, mode, std, unbiased, eps, clip):
    R = R.double()
    out = torch.zeros_like(R)
    ddof = 1 if unbiased else 0
    gstd = R.std(correction=ddof) if R.numel() > ddof else torch.tensor(0.0, dtype=torch.float64)
    for g in gid.unique():
        idx = (gid == g).nonzero().flatten()
        r = R[idx]
        if len(idx) == 1 or (r == r[0]).all():
            continue
        if mode == "rloo":
            out[idx] = r - (r.sum() - r) / (len(idx) - 1)
        else:
            s = {"group": r.std(correction=ddof), "global": gstd, "none": torch.tensor(0.0)}[std]
            out[idx] = (r - r.mean()) / ((s + eps) if std != "none" else 1.0)
    return out.clamp(-clip, clip) if clip is not None else out


def _ragged():
    sizes = [4, 1, 7, 3, 4, 2]
    ids = torch.tensor([900, -5, 13, 2, 77, 8])  # arbitrary, unsorted
    gid = torch.cat([torch.full((n,), int(i)) for n, i in zip(sizes, ids)])
    perm = torch.randperm(gid.numel())
    R = torch.randn(gid.numel())
    R[gid == 77] = 0.3  # a zero-variance group
    return R[perm], gid[perm]


@pytest.mark.parametrize("mode,std", [("grpo", "group"), ("grpo", "global"), ("grpo", "none"), ("rloo", "group")])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("clip", [None, 0.8])
def test_matches_loop_oracle(mode, std, unbiased, clip):
    R, gid = _ragged()
    A = U.group_advantages(R, gid, mode=mode, std=std, unbiased=unbiased, clip=clip, impl="reference")
    want = loop_oracle(R, gid, mode, std, unbiased, 1e-4, clip)
    assert A.dtype == torch.float32 and A.shape == R.shape
    torch.testing.assert_close(A.double(), want, rtol=1e-5, atol=1e-6)


def test_singleton_and_flat_groups_are_exactly_zero():
    R = torch.tensor([0.1, 0.1, 0.1, 5.0, 1.0, 2.0])
    gid = torch.tensor([0, 0, 0, 1, 2, 2])
    for mode in ("grpo", "rloo"):
        for unbiased in (False, True):
            A = U.group_advantages(R, gid, mode=mode, unbiased=unbiased)
            assert (A[:4] == 0).all() and torch.isfinite(A).all()
            assert A[4] < 0 < A[5]


def test_single_sample_batch_global_std():
    A = U.group_advantages(torch.tensor([3.0]), torch.tensor([0]), std="global", unbiased=True)
    assert A.tolist() == [0.0]


def test_grpo_group_normalisation_value():
    A = U.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]), eps=0.0)
    torch.testing.assert_close(A, torch.tensor([1.0, -1.0, -1.0, 1.0]))
