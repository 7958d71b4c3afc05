"""forward_process_loss (DiffusionNFT / AWM): ours (Triton, impl="triton") vs the eager fp32 reference vs
torch.compile(reference), at the flow shapes of docs/benchmarks.md: N = B 32 x 10 trained timesteps rows of SD3 /
SANA 16x64x64 latents (D = 65536) and DC-AE 32x16x16 latents (D = 8192), every input bf16, fp32 math.

Cases (all three impls run the same call: loss + metrics, then dL/dv with a random upstream gradient):
    nft   algo="nft", b = 1, with v_ref (beta_kl = 1e-4): reads v, v_old, x0, noise, v_ref
    awm   algo="awm", with v_ref (beta_kl = 1e-3) and the EMA policy's v_old (beta_old = 1): the same five inputs
bytes = E (5 + 1) es: the five inputs read once and dL/dv written once (E = N D elements, es = 2 bytes), the
convention of the copy ceiling (bytes read + written, each tensor counted once). What ours moves beyond that, so
the fraction of copy it can reach at best: its backward scales the saved dL/dv by the upstream gradient (2 E es
more: 0.75 of the count at best), and for D > 8192 its forward reads the head of each row a second time, in
reverse, partly from L2 (kernels/forward_loss.py).
GB/s is reported against the copy bandwidth measured in the same run (`frac_copy`). Inputs rotate through enough
copies to exceed the 50 MB L2. "ours" goes through the public op with the default value checks.

    python bench/bench_forward_loss.py --smoke   # CPU: tiny shapes, ours under the Triton interpreter
    python bench/bench_forward_loss.py           # GPU: docs/benchmarks.md shapes, CSV to bench/results/
"""
from __future__ import annotations

import itertools
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: "ours" runs under the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import unirl_fast as U  # noqa: E402
from bench.common import (  # noqa: E402
    append_rows,
    base_parser,
    env_columns,
    format_table,
    measure_ceilings,
    peak_extra_memory_bytes,
    ratio,
    resolve_smoke,
    time_fn,
)
from unirl_fast.reference.forward_loss import forward_process_loss_ref  # noqa: E402

L2_BYTES = 50 * 2 ** 20
CASES = {"nft": dict(algo="nft", nft_beta=1.0, beta_kl=1e-4),
         "awm": dict(algo="awm", beta_kl=1e-3, beta_old=1.0, awm_power=0.25)}


def _shapes(smoke):
    if smoke:
        return 4, 2, {"4x16x16": (4, 16, 16), "4x8x9": (4, 8, 9)}
    return 32, 10, {"16x64x64": (16, 64, 64), "32x16x16": (32, 16, 16)}


def _make_set(N, lat, dev, dtype):
    shape = (N,) + lat
    v = torch.randn(shape, device=dev)
    return {"v": v.to(dtype), "v_old": (v + 0.1 * torch.randn(shape, device=dev)).to(dtype),
            "x0": torch.randn(shape, device=dev).to(dtype), "noise": torch.randn(shape, device=dev).to(dtype),
            "v_ref": (v + 0.1 * torch.randn(shape, device=dev)).to(dtype),
            "t": 0.05 + 0.9 * torch.rand(N, device=dev), "adv": 2 * torch.randn(N, device=dev),
            "g": torch.rand((), device=dev) + 0.5}


def _variants(opts, compile_ref):
    def ours(v, v_old, x0, noise, v_ref, t, adv):
        return U.forward_process_loss(v, v_old, x0, noise, t, adv, v_ref=v_ref, impl="triton", **opts)[0]

    def ref(v, v_old, x0, noise, v_ref, t, adv):
        return forward_process_loss_ref(v, v_old, x0, noise, t, adv, v_ref=v_ref, **opts)[0]

    fns = {"ours": ours, "eager_ref": ref}
    if compile_ref:
        fns["compiled_ref"] = torch.compile(ref, fullgraph=True)
    return fns


def _call(fn, s):
    """One training call: the loss, then dL/dv for the set's upstream gradient."""
    v = s["v"].detach().requires_grad_()
    loss = fn(v, s["v_old"], s["x0"], s["noise"], s["v_ref"], s["t"], s["adv"])
    return torch.autograd.grad(loss, v, s["g"])


def _cases(N, lat, dev, dtype, smoke, compile_ref):
    """Yield (case, bytes counted, {impl: zero-arg callable})."""
    E = N * math.prod(lat)
    es = torch.empty((), dtype=dtype).element_size()
    nbytes = 6 * E * es
    n_rot = 1 if smoke else min(16, max(2, math.ceil(2 * L2_BYTES / nbytes)))
    sets = [_make_set(N, lat, dev, dtype) for _ in range(n_rot)]
    for case, opts in CASES.items():
        fns = _variants(opts, compile_ref)
        yield case, nbytes, {k: _rotating([lambda f=f, s=s: _call(f, s) for s in sets]) for k, f in fns.items()}


def _rotating(calls):
    it = itertools.cycle(calls)
    return lambda: next(it)()


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="time torch.compile(reference) in smoke mode too")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    smoke = resolve_smoke(args)
    compile_ref = args.compile or not smoke
    torch.manual_seed(0)
    ceil = measure_ceilings(dev, smoke=smoke)
    env = env_columns(dev)
    B, T, shapes = _shapes(smoke)
    rows = []
    for shape_name, lat in shapes.items():
        for case, nbytes, fns in _cases(B * T, lat, dev, torch.bfloat16, smoke, compile_ref):
            times = {k: time_fn(f, device=dev, warmup=2, rep=3 if smoke else 20) for k, f in fns.items()}
            for impl, t in times.items():
                gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                peak = peak_extra_memory_bytes(fns[impl], dev)
                rows.append({"case": case, "shape": f"N{B}x{T}x{shape_name}", "impl": impl,
                             "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "GBps": gbps,
                             "frac_copy": gbps / ceil["copy_GBps"],
                             "x_vs_eager": ratio(times["eager_ref"].median_ms, t.median_ms),
                             "x_vs_compiled": ratio(times["compiled_ref"].median_ms, t.median_ms)
                             if "compiled_ref" in times else None,
                             "peak_extra_MiB": None if peak is None else peak / 2 ** 20,
                             "bytes": nbytes, "in_dtype": "bf16", "smoke": smoke, **env})
    path = append_rows("forward_loss.csv", rows, args.out)
    print(f"copy ceiling on {env['device']}: {ceil['copy_GBps']:.1f} GB/s (bytes read + written)")
    print(format_table(rows, ["case", "shape", "impl", "median_ms", "p20_ms", "p80_ms", "GBps", "frac_copy",
                              "x_vs_eager", "x_vs_compiled", "peak_extra_MiB"]))
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
