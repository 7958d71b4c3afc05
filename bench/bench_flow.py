"""Flow-GRPO ops: ours (Triton, impl="triton") vs the eager fp32 reference vs torch.compile(reference), at
the flow shapes of docs/benchmarks.md (B=32 x 16x64x64 SD3/SANA latents, B=32 x 32x16x16 DC-AE), bf16 inputs, fp32 math.

Cases, each for one step ([B, ...], per-sample sigmas [B]) and a replay of T steps ([T, B, ...], sigmas [T, B]):
    step_fwd      flow_sde_step, given noise     bytes = E (3 * in_bytes + 2 * 4)  (v, x, noise in; mean, next out)
    logprob_fwd   flow_step_logprob recompute    bytes = E (2 * in_bytes + 4)      (v, x in; x_next stored fp32)
    logprob_bwd   its backward, d logp / d v     bytes = E (3 * in_bytes + 4)      (v, x in, x_next fp32 in; dv out)
    loss_fwd/bwd  flow_policy_loss with velocity MSE + latent KL (replay only)
                                                 bytes = 4 E in_bytes fwd (v, v_ref, mean, ref_mean); 6 E in_bytes bwd
E = elements of one latent tensor; every tensor is counted once each way (reads + writes, no re-reads), the same
convention as the copy ceiling (bytes read + written). Per-sample and scalar tensors are ignored (< 0.01%).
GB/s is reported against the copy bandwidth measured in the same run (`frac_copy`).

Inputs rotate through enough copies to exceed the 50 MB L2 (docs/benchmarks.md), so no case is timed from cache.
"ours" goes through the public op with the default value checks ("cheap": the per-sample log-probs and sigmas,
no host sync; the CSV's `checks` column says which); the reference rows call the reference functions directly
(no validation).
Backward rows time `autograd.grad(..., retain_graph=True)` on a graph built once per input copy.

    python bench/bench_flow.py --smoke          # CPU: tiny shapes, ours under the Triton interpreter
    python bench/bench_flow.py                  # GPU: docs/benchmarks.md shapes, CSV + PNG to bench/results/
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
from unirl_fast.reference import flow as R  # noqa: E402

L2_BYTES = 50 * 2 ** 20


def _shapes(smoke):
    if smoke:
        return 4, 2, {"4x16x16": (4, 16, 16), "8x8x8": (8, 8, 8)}
    return 32, 10, {"16x64x64": (16, 64, 64), "32x16x16": (32, 16, 16)}


def _make_set(lead, lat, dev, dtype):
    shape = tuple(lead) + lat
    sig = 0.2 + 0.7 * torch.rand(lead, device=dev)
    nxt = sig * (0.5 + 0.4 * torch.rand(lead, device=dev))
    s = {"v": torch.randn(shape, device=dev).to(dtype), "x": torch.randn(shape, device=dev).to(dtype),
         "noise": torch.randn(shape, device=dev).to(dtype), "sig": sig, "nxt": nxt,
         "g": torch.randn(lead, device=dev)}
    s["xn"] = R.flow_sde_step_ref(s["v"], s["x"], sig, nxt, noise=s["noise"], batch_ndim=len(lead))[0]
    s["v_ref"] = (s["v"].float() + 0.1 * torch.randn(shape, device=dev)).to(dtype)
    s["mean_ref"] = (s["x"].float() + 0.1 * torch.randn(shape, device=dev)).to(dtype)
    s["logp_old"] = torch.randn(lead, device=dev) - 1.0
    s["logp"] = (s["logp_old"] + 1e-4 * torch.randn(lead, device=dev)).requires_grad_()
    s["adv"] = torch.randn(lead[-1], device=dev)
    return s


def _variants(ours, ref, args_of, compile_ref):
    """{impl: fn(set, *extra)}; torch.compile sees only tensors (never the dict), so rotating sets never recompile."""
    fns = {"ours": ours, "eager_ref": ref}
    if compile_ref:
        # backward rows replay one graph (retain_graph=True), which AOT autograd's donated buffers forbid;
        # donation only lets the compiled backward reuse saved-tensor memory, it does not change its kernels
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
        fns["compiled_ref"] = torch.compile(ref, fullgraph=True)
    return {k: (lambda s, *extra, f=f: f(*args_of(s, *extra))) for k, f in fns.items()}


def _step_fns(nd, compile_ref):
    def ours(v, x, noise, sig, nxt):
        return U.flow_sde_step(v, x, sig, nxt, noise=noise, impl="triton")

    def ref(v, x, noise, sig, nxt):
        return R.flow_sde_step_ref(v, x, sig, nxt, noise=noise, batch_ndim=nd)

    return _variants(ours, ref, lambda s: (s["v"], s["x"], s["noise"], s["sig"], s["nxt"]), compile_ref)


def _logprob_fns(nd, compile_ref):
    def ours(v, x, xn, sig, nxt):
        return U.flow_step_logprob(v, x, xn, sig, nxt, impl="triton")

    def ref(v, x, xn, sig, nxt):
        return R.flow_step_logprob_ref(v, x, xn, sig, nxt, batch_ndim=nd)

    return _variants(ours, ref, lambda s, v: (v, s["x"], s["xn"], s["sig"], s["nxt"]), compile_ref)


def _loss_fns(compile_ref):
    def make(fn):
        def run(logp, old, adv, v, v_ref, mean, mean_ref, std):
            return fn(logp, old, adv, velocity=v, ref_velocity=v_ref, beta_velocity=0.1, mean=mean,
                      ref_mean=mean_ref, std=std, beta_kl=0.01)[0]
        return run

    ours = make(lambda *a, **k: U.flow_policy_loss(*a, impl="triton", **k))
    return _variants(ours, make(R.flow_policy_loss_ref),
                     lambda s, v, mean: (s["logp"], s["logp_old"], s["adv"], v, s["v_ref"], mean, s["mean_ref"],
                                         s["sig"]), compile_ref)


def _rotating(calls):
    it = itertools.cycle(calls)
    return lambda: next(it)()


def _cases(B, T, lat, dev, dtype, smoke, compile_ref):
    """Yield (case, mode, bytes moved, {impl: zero-arg callable})."""
    E1 = B * math.prod(lat)
    es = torch.empty((), dtype=dtype).element_size()
    for mode, lead in (("step", (B,)), (f"replay{T}", (T, B))):
        E = E1 * (T if mode != "step" else 1)
        n_rot = 1 if smoke else min(32, max(2, math.ceil(2 * L2_BYTES / (E * (3 * es + 8)))))
        sets = [_make_set(lead, lat, dev, dtype) for _ in range(n_rot)]
        nd = len(lead)
        step = _step_fns(nd, compile_ref)
        yield "step_fwd", mode, E * (3 * es + 8), {k: _rotating([lambda f=f, s=s: f(s) for s in sets])
                                                    for k, f in step.items()}
        lp = _logprob_fns(nd, compile_ref)
        yield "logprob_fwd", mode, E * (2 * es + 4), {k: _rotating([lambda f=f, s=s: f(s, s["v"]) for s in sets])
                                                       for k, f in lp.items()}
        yield "logprob_bwd", mode, E * (3 * es + 4), {k: _rotating(_bwd_calls(f, sets)) for k, f in lp.items()}
        if mode != "step":
            loss = _loss_fns(compile_ref)
            yield "loss_fwd", mode, 4 * E * es, {k: _rotating([lambda f=f, s=s: f(s, s["v"], s["x"]) for s in sets])
                                                 for k, f in loss.items()}
            yield "loss_bwd", mode, 6 * E * es, {k: _rotating(_loss_bwd_calls(f, sets)) for k, f in loss.items()}


def _bwd_calls(fn, sets):
    calls = []
    for s in sets:
        v = s["v"].detach().requires_grad_()
        out = fn(s, v)
        calls.append(lambda out=out, v=v, g=s["g"]: torch.autograd.grad(out, v, g, retain_graph=True))
    return calls


def _loss_bwd_calls(fn, sets):
    calls = []
    for s in sets:
        v, mean = s["v"].detach().requires_grad_(), s["x"].detach().requires_grad_()
        out = fn(s, v, mean)
        calls.append(lambda out=out, v=v, mean=mean, s=s: torch.autograd.grad(out, (s["logp"], v, mean),
                                                                                retain_graph=True))
    return calls


def _plot(rows, path, copy_gbps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["case"], r["shape"], r["mode"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(keys) * len(impls)), 4.5))
    w = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        vals = [next((r["GBps"] for r in rows if (r["case"], r["shape"], r["mode"]) == k and r["impl"] == impl), 0)
                for k in keys]
        ax.bar([i + j * w for i in range(len(keys))], vals, w, label=impl)
    ax.axhline(copy_gbps, color="k", ls="--", lw=1, label=f"copy {copy_gbps:.4g} GB/s")
    ax.axhline(0.7 * copy_gbps, color="gray", ls=":", lw=1, label="0.70 x copy (target)")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(keys))])
    ax.set_xticklabels(["\n".join(k) for k in keys], fontsize=7)
    ax.set_ylabel("GB/s (bytes once each way)")
    ax.set_title(f"Flow-GRPO ops on {rows[0]['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    dtype = torch.bfloat16
    rows = []
    for shape_name, lat in shapes.items():
        for case, mode, nbytes, fns in _cases(B, T, lat, dev, dtype, smoke, compile_ref):
            times = {k: time_fn(f, device=dev, warmup=2, rep=3 if smoke else 20) for k, f in fns.items()}
            for impl, t in times.items():
                gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                rows.append({"case": case, "shape": f"B{B}x{shape_name}", "mode": mode, "impl": impl,
                             "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "GBps": gbps,
                             "frac_copy": gbps / ceil["copy_GBps"],
                             "x_vs_eager": ratio(times["eager_ref"].median_ms, t.median_ms),
                             "x_vs_compiled": ratio(times["compiled_ref"].median_ms, t.median_ms)
                             if "compiled_ref" in times else None,
                             "peak_extra_MiB": _mib(peak_extra_memory_bytes(fns[impl], dev)),
                             "bytes": nbytes, "in_dtype": "bf16", "smoke": smoke, **env})
    path = append_rows("flow.csv", rows, args.out)
    png = path.with_suffix(".png")
    _plot(rows, png, ceil["copy_GBps"])
    print(f"copy ceiling on {env['device']}: {ceil['copy_GBps']:.1f} GB/s (bytes read + written)")
    print(format_table(rows, ["case", "shape", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "GBps",
                              "frac_copy", "x_vs_eager", "x_vs_compiled", "peak_extra_MiB"]))
    print(f"rows appended to {path}; plot {png}")
    return rows


def _mib(b):
    return None if b is None else b / 2 ** 20


if __name__ == "__main__":
    main()
