"""Benchmark of `logprobs_from_logits` and `fused_linear_logprobs` (protocol: docs/benchmarks.md), fwd / bwd / fwd+bwd.

Side by side in one process, bf16 on the GPU:
  ours          the Triton path (impl="triton"); `ours_inplace` adds inplace_backward=True (logits op only,
                fwd+bwd only: its forward is ours's, and its backward cannot be re-run on a retained graph)
  eager_ref     the fp32 reference op (materialises fp32 logits / log-softmax)
  compiled_ref  torch.compile of the same reference
  trl_rowwise   TRL's selective_log_softmax idea: log_softmax one sequence at a time (after the head GEMM)
  liger_flce    Liger's fused linear cross entropy (loss = -sum logp; it computes the gradients inside
                forward, 6NHV, and has no per-token entropy): only when liger_kernel is installed

Throughput formulas (columns `rate`, `unit`, `frac_of_ceiling`):
  logprobs_from_logits: bytes = N V e (forward reads the logits once), 2 N V e (backward reads them and
    writes dlogits once), 3 N V e for fwd+bwd; e = bytes per logit. Ceiling: measured copy GB/s.
  fused_linear_logprobs: FLOPs = 2NHV forward, 6NHV backward (recompute + dh + dW), 8NHV fwd+bwd, for
    every implementation (so a faster rate means less time for the same work). Ceiling: measured bf16 GEMM.
Peak extra memory is for one fwd+bwd above what was allocated before (inputs excluded, grads included).
Backward is timed by re-running autograd.grad on a retained graph.

    python bench/bench_logprobs.py --smoke          # CPU: tiny shapes, the Triton kernels under the interpreter
    python bench/bench_logprobs.py                  # GPU: docs/benchmarks.md shapes
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU smoke runs the real kernels through the interpreter

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
    trl_rowwise_logprobs,
)
from unirl_fast.reference.logprobs import fused_linear_logprobs_ref, logprobs_from_logits_ref  # noqa: E402

SHAPES = {"qwen-1.5b": (8, 1024, 1536, 151936), "qwen-3b": (8, 1024, 2048, 151936),
          "qwen-7b": (16, 1024, 3584, 151936), "long": (1, 65536, 2048, 151936)}
SMOKE_SHAPES = {"smoke-V3000": (2, 63, 64, 3000), "smoke-V151936": (1, 4, 32, 151936)}
MODES = ("fwd", "bwd", "fwd+bwd")


def liger_flce():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def logits_impls(entropy, with_compile):
    def ours(z, y):
        return U.logprobs_from_logits(z, y, return_entropy=entropy, impl="triton")

    def ours_inplace(z, y):  # overwrites z with dlogits in backward: harmless for timing (values stay finite)
        return U.logprobs_from_logits(z, y, return_entropy=entropy, impl="triton", inplace_backward=True)

    def ref(z, y):
        return logprobs_from_logits_ref(z, y, return_entropy=entropy)

    impls = {"ours": ours, "ours_inplace": ours_inplace, "eager_ref": ref,
             "trl_rowwise": lambda z, y: (trl_rowwise_logprobs(z, y), None)}
    if with_compile:
        impls["compiled_ref"] = torch.compile(ref)
    return impls


def linear_impls(entropy, with_compile):
    def ours(h, w, y):
        return U.fused_linear_logprobs(h, w, y, return_entropy=entropy, impl="triton")

    def ref(h, w, y):
        return fused_linear_logprobs_ref(h, w, y, return_entropy=entropy)

    impls = {"ours": ours, "eager_ref": ref,
             "trl_rowwise": lambda h, w, y: (trl_rowwise_logprobs(h @ w.t(), y), None)}
    if with_compile:
        impls["compiled_ref"] = torch.compile(ref)
    flce = liger_flce()
    if flce is not None:
        def liger(h, w, y):
            return -flce(w, h.reshape(-1, h.shape[-1]), y.reshape(-1)).reshape(1), None
        impls["liger_flce"] = liger
    return impls


def _loss(out, g, gh):
    logp, ent = out
    if logp.numel() == 1:  # a summed loss (Liger): weight it by one scalar
        return (logp * g.mean()).sum()
    loss = (logp * g).sum()
    return loss if ent is None else loss + (ent * gh).sum()


def _fns(impl, inputs, g, gh, inplace=False):
    """Callables for fwd, bwd (on a retained graph) and fwd+bwd of one implementation."""
    leaves = [x for x in inputs if x.is_floating_point()]

    def fwd():
        with torch.no_grad():
            return impl(*inputs)

    def fwd_bwd():
        torch.autograd.grad(_loss(impl(*inputs), g, gh), leaves)

    if inplace:  # its backward consumes the logits buffer (a retained graph cannot run twice); fwd is `ours`
        return {"fwd+bwd": fwd_bwd}
    graph = []

    def bwd():  # the graph is built on the first (warm-up) call, after fwd and fwd+bwd were measured
        if not graph:
            graph.append(_loss(impl(*inputs), g, gh))
        torch.autograd.grad(graph[0], leaves, retain_graph=True)
    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "bwd": bwd}


def _work(op, mode, N, H, V, elem):
    if op == "logprobs_from_logits":
        return {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode] * N * V * elem, "GB/s"
    return {"fwd": 2, "bwd": 6, "fwd+bwd": 8}[mode] * N * H * V, "TFLOP/s"


def bench_shape(name, shape, args, dev, dtype, ceil, smoke):
    B, L, H, V = shape
    N = B * L
    y = torch.randint(0, V, (B, L), device=dev)
    g = torch.randn(B, L, device=dev)
    gh = torch.randn(B, L, device=dev)
    h = torch.randn(B, L, H, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, device=dev) / H ** 0.5).to(dtype).requires_grad_()
    cases = []
    if "logits" in args.ops:
        z = torch.randn(B, L, V, device=dev, dtype=dtype).mul_(2).requires_grad_()  # no fp32 temporary (long: 20 GB)
        cases.append(("logprobs_from_logits", logits_impls(args.entropy, args.compile or not smoke), (z, y)))
    if "linear" in args.ops:
        cases.append(("fused_linear_logprobs", linear_impls(args.entropy, args.compile or not smoke), (h, w, y)))
    rows = []
    for op, impls, inputs in cases:
        for impl_name, impl in impls.items():
            rows += bench_impl(op, impl_name, impl, inputs, g, gh, (name, N, H, V, dtype), dev, ceil, smoke)
    _add_ratios(rows)
    return rows


def bench_impl(op, impl_name, impl, inputs, g, gh, shape_info, dev, ceil, smoke):
    name, N, H, V, dtype = shape_info
    try:
        fns = _fns(impl, inputs, g, gh, inplace=impl_name.endswith("inplace"))
        mem = peak_extra_memory_bytes(fns["fwd+bwd"], dev)
        times = {m: time_fn(fns[m], device=dev, warmup=1 if smoke else 3, rep=3 if smoke else 20) for m in fns}
    except (RuntimeError, torch.OutOfMemoryError) as e:  # an OOM or compile failure of a baseline is a result
        print(f"{op} {impl_name} at {name}: failed: {str(e).splitlines()[0][:160]}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return [{"op": op, "shape": name, "impl": impl_name, "mode": m, "failed": str(e).splitlines()[0][:160]}
                for m in MODES]
    out = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for m, t in times.items():
        work, unit = _work(op, m, N, H, V, elem)
        rate = work / (t.median_ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
        ceiling = ceil["copy_GBps"] if unit == "GB/s" else ceil["gemm_TFLOPs"]
        out.append({"op": op, "shape": name, "N": N, "H": H, "V": V, "dtype": str(dtype).replace("torch.", ""),
                    "impl": impl_name, "mode": m, "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                    "rate": rate, "unit": unit, "frac_of_ceiling": rate / ceiling,
                    "peak_extra_MiB": None if mem is None else mem / 2 ** 20, "smoke": smoke})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _add_ratios(rows):
    """x_vs_<baseline>: speed-up of ours over each baseline at the same op, shape and mode."""
    key = {(r["op"], r["shape"], r["mode"], r["impl"]): r.get("median_ms") for r in rows}
    for r in rows:
        if r["impl"] != "ours" or "median_ms" not in r:
            continue
        for (op, shape, mode, impl), ms in key.items():
            if (op, shape, mode) == (r["op"], r["shape"], r["mode"]) and impl not in ("ours", "ours_inplace"):
                r[f"x_vs_{impl}"] = ratio(ms, r["median_ms"])


def plot(rows, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sel = [r for r in rows if r.get("mode") == "fwd+bwd" and r.get("median_ms")]
    groups = sorted({(r["op"], r["shape"]) for r in sel})
    impls = sorted({r["impl"] for r in sel})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
    for ax, (op, shape) in zip(axes[0], groups):
        vals = {r["impl"]: r["median_ms"] for r in sel if (r["op"], r["shape"]) == (op, shape)}
        names = [i for i in impls if i in vals]
        ax.bar(names, [vals[i] for i in names], color=["C1" if n.startswith("ours") else "C0" for n in names])
        ax.set_title(f"{op}\n{shape} fwd+bwd", fontsize=8)
        ax.set_ylabel("ms (median)")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    p.add_argument("--ops", nargs="*", default=["logits", "linear"], choices=["logits", "linear"])
    p.add_argument("--entropy", action="store_true", help="also return (and backprop through) the entropy")
    p.add_argument("--compile", action="store_true", help="time torch.compile(reference) in smoke mode too")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    smoke = resolve_smoke(args)
    torch.manual_seed(0)
    shapes = SMOKE_SHAPES if smoke else {k: SHAPES[k] for k in (args.shapes or SHAPES)}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ceil = measure_ceilings(dev, smoke=smoke)
    env = env_columns(dev)
    rows = []
    for name, shape in shapes.items():
        rows += [{**r, **env, "ceil_copy_GBps": ceil["copy_GBps"], "ceil_gemm_TFLOPs": ceil["gemm_TFLOPs"]}
                 for r in bench_shape(name, shape, args, dev, dtype, ceil, smoke)]
    path = append_rows("logprobs.csv", rows, args.out)
    title = env["device"] + (" (smoke: Triton interpreter on CPU, timings meaningless)" if smoke else "")
    png = plot(rows, path.with_suffix(".png"), title)
    print(f"ceilings on {env['device']}: copy {ceil['copy_GBps']:.1f} GB/s, "
          f"{ceil['gemm_dtype']} GEMM {ceil['gemm_TFLOPs']:.3f} TFLOP/s")
    cols = ["op", "shape", "impl", "mode", "median_ms", "p20_ms", "p80_ms", "rate", "unit", "frac_of_ceiling",
            "peak_extra_MiB", "x_vs_eager_ref", "x_vs_compiled_ref", "x_vs_trl_rowwise", "x_vs_liger_flce"]
    print(format_table(rows, cols))
    print(f"rows appended to {path}" + (f"; plot {png}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
