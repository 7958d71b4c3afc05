"""GRPO policy loss from hidden states, forward + backward (docs/benchmarks.md): ours vs the field, side by side.

Implementations (each: loss from h [B, L, H], W [V, H], then backward into h and W, grads kept):
    ours          unirl_fast.fused_linear_policy_loss(impl="triton"): chunked cuBLAS GEMMs + one fused row kernel
                  per chunk, grads computed in forward (6NHV)
    eager_ref     unirl_fast.reference.fused_linear_policy_loss_ref (fp32 [N, V] logits)
    compiled_ref  torch.compile of the same reference
    trl_rowwise   bf16 logits h W^T, then TRL's selective_log_softmax idea (fp32 log_softmax one sequence at a
                  time) and the reference policy loss on the log-probs
    liger_fused   Liger's LigerFusedLinearGRPOLoss (chunked, torch.compile'd inside)      [when installed]
    liger_triton  bf16 logits, then Liger's triton_grpo_loss on them                     [when installed]
All run the same GRPO objective (token IS, eps 0.2/0.2, beta 0, loss_type "grpo" or Liger's nearest).

Columns: median (p20, p80) ms; TFLOP/s counted as 6NHV (head forward 2NHV + dlogits GEMMs 4NHV, whatever an
implementation really executes); frac_gemm = that rate / the bf16 GEMM ceiling measured in this run;
floor_ms = 6NHV / that ceiling; x_floor = median / floor_ms; speedup_vs_compiled, speedup_vs_eager;
peak_extra_MiB for one fwd+bwd with the grads of h and W (bench.common.peak_extra_memory_bytes) and
mem_vs_compiled. Rows are appended to bench/results/policy_loss.csv and a PNG plot is written next to it.

    python bench/bench_policy_loss.py --smoke            (CPU: Triton interpreter, tiny shape)
    python bench/bench_policy_loss.py --shapes qwen-3b qwen-7b
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton path runs on CPU only under the interpreter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import unirl_fast as U  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS_DIR,
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
from unirl_fast import reference as R  # noqa: E402
from unirl_fast.reference.policy_loss import policy_loss_ref  # noqa: E402

SHAPES = {  # name: (B, L, H, V), docs/benchmarks.md
    "qwen-1.5b": (8, 1024, 1536, 151936),
    "qwen-3b": (8, 1024, 2048, 151936),
    "qwen-7b": (16, 1024, 3584, 151936),
    "long": (1, 65536, 2048, 151936),
}
SMOKE_SHAPE = ("smoke", (2, 63, 32, 3000))


def _inputs(shape, dev, dtype):
    B, L, H, V = shape
    h = torch.randn(B, L, H, device=dev, dtype=dtype).requires_grad_()
    W = (torch.randn(V, H, device=dev, dtype=dtype) / H ** 0.5).requires_grad_()
    y = torch.randint(0, V, (B, L), device=dev)
    old = torch.randn(B, L, device=dev) * 0.5 - 12.0
    adv = torch.randn(B, device=dev)
    mask = torch.rand(B, L, device=dev) > 0.1
    return h, W, y, old, adv, mask


def trl_rowwise_loss(h, W, y, old, adv, mask):
    logits = h @ W.t()  # [B, L, V] in the input dtype
    return policy_loss_ref(trl_rowwise_logprobs(logits, y), old, adv, mask)[0]


def _liger_fns(h, W, y, old, adv, mask):
    """Liger's two GRPO paths, or {} when liger_kernel is not installed (the table says so)."""
    out = {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        LigerFusedLinearGRPOLoss = None
    if LigerFusedLinearGRPOLoss is not None:
        mods = []  # built on first call so a constructor that rejects an argument becomes an error row

        def liger_fused():
            if not mods:
                mods.append(LigerFusedLinearGRPOLoss(beta=0.0, loss_type="grpo"))
            return mods[0](h, W, y, mask.long(), adv, old_per_token_logps=old)[0]
        out["liger_fused"] = liger_fused
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        triton_grpo_loss = None
    if triton_grpo_loss is not None:
        def liger_triton():
            B, L, H = h.shape
            logits = torch.cat([h, h.new_zeros(B, 1, H)], 1) @ W.t()  # Liger wants [B, L + 1, V]
            res = triton_grpo_loss(logits, old, None, y, adv, mask.long(), temperature=1.0, beta=0.0,
                                   eps_low=0.2, eps_high=0.2, loss_type="grpo", reduce=True)
            return res[0] if isinstance(res, tuple) else res
        out["liger_triton"] = liger_triton
    return out


def _fns(h, W, y, old, adv, mask, with_compile):
    args = (h, W, y, old, adv, mask)
    fns = {
        "ours": lambda: U.fused_linear_policy_loss(*args, impl="triton")[0],
        "eager_ref": lambda: R.fused_linear_policy_loss_ref(*args)[0],
        "trl_rowwise": lambda: trl_rowwise_loss(*args),
    }
    if with_compile:
        compiled = torch.compile(R.fused_linear_policy_loss_ref)
        fns["compiled_ref"] = lambda: compiled(*args)[0]
    fns.update(_liger_fns(*args))

    def fwd_bwd(loss_fn):
        def run():
            h.grad, W.grad = None, None
            loss_fn().backward()
        return run

    return {k: fwd_bwd(f) for k, f in fns.items()}, (h, W)


def _bench_shape(name, shape, dev, ceil, smoke, with_compile, env):
    B, L, H, V = shape
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    flops = 6 * B * L * H * V
    floor_ms = flops / (ceil["gemm_TFLOPs"] * 1e12) * 1e3
    rows = []
    fns, (h, W) = _fns(*_inputs(shape, dev, dtype), with_compile)
    for impl, fn in fns.items():
        row = {"shape": name, "impl": impl, "B": B, "L": L, "H": H, "V": V, "dtype": str(dtype).replace("torch.", ""),
               "floor_ms": floor_ms, "smoke": smoke}
        try:
            t = time_fn(fn, device=dev, warmup=1 if smoke else 3, rep=3 if smoke else 20)
            h.grad, W.grad = None, None  # so the peak counts the new grads of h and W
            mem = peak_extra_memory_bytes(fn, dev)
        except Exception as e:  # a peer that fails at this shape is a result, not a crash (e.g. OOM, compile)
            rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", **env})
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rate = flops / (t.median_ms * 1e-3) / 1e12
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, TFLOPs_6NHV=rate,
                   frac_gemm=rate / ceil["gemm_TFLOPs"], x_floor=t.median_ms / floor_ms,
                   peak_extra_MiB=None if mem is None else mem / 2 ** 20, error="")
        rows.append({**row, **env})
    by = {r["impl"]: r for r in rows}
    for r in rows:
        for base in ("compiled_ref", "eager_ref"):
            b = by.get(base, {})
            r[f"speedup_vs_{base.split('_')[0]}"] = ratio(b.get("median_ms"), r.get("median_ms"))
        cm, m = by.get("compiled_ref", {}).get("peak_extra_MiB"), r.get("peak_extra_MiB")
        r["mem_vs_compiled"] = None if cm is None or m is None else m / cm
    return rows


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs = [i + k * width for i in range(len(shapes))]

        def get(col, impl=impl):
            return [next((r.get(col) or 0.0 for r in rows if r["shape"] == s and r["impl"] == impl), 0.0)
                    for s in shapes]
        axes[0].bar(xs, get("median_ms"), width, label=impl)
        axes[1].bar(xs, get("peak_extra_MiB"), width, label=impl)
    floors = [next(r["floor_ms"] for r in rows if r["shape"] == s) for s in shapes]
    axes[0].scatter([i + 0.4 - width / 2 for i in range(len(shapes))], floors, marker="_", s=800, color="k",
                    label="6NHV floor")
    for ax, title in zip(axes, ("fwd+bwd median ms", "peak extra MiB (grads included)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"fused linear GRPO loss on {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--compile", action="store_true", help="time torch.compile(reference) in smoke mode too")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    smoke = resolve_smoke(args)
    torch.manual_seed(0)
    ceil = measure_ceilings(dev, smoke=smoke)
    env = env_columns(dev)
    shapes = [SMOKE_SHAPE] if smoke else [(s, SHAPES[s]) for s in args.shapes]
    rows = []
    for name, shape in shapes:
        rows += _bench_shape(name, shape, dev, ceil, smoke, args.compile or not smoke, env)
    path = append_rows("policy_loss.csv", rows, args.out)
    png = _plot(rows, Path(args.out or RESULTS_DIR) / ("policy_loss_smoke.png" if smoke else "policy_loss.png"))
    print(f"ceilings on {env['device']}: {ceil['gemm_dtype']} GEMM {ceil['gemm_TFLOPs']:.3f} TFLOP/s, "
          f"copy {ceil['copy_GBps']:.1f} GB/s")
    print(format_table(rows, ["shape", "impl", "median_ms", "p20_ms", "p80_ms", "TFLOPs_6NHV", "frac_gemm",
                              "floor_ms", "x_floor", "speedup_vs_compiled", "speedup_vs_eager", "peak_extra_MiB",
                              "mem_vs_compiled", "error"]))
    print(f"rows appended to {path}; plot {png}")
    return rows


if __name__ == "__main__":
    main()
