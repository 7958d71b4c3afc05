"""Overview benchmark of every public op, forward + backward: ours (impl="auto") vs the eager fp32
reference, plus a TRL-style per-row log_softmax baseline for the log-prob ops, and torch.compile of the
reference off smoke mode. On CPU this is the smoke run the README's first command does; the per-op
scripts (bench_<op>.py) hold the full docs/benchmarks.md comparisons on the GPU.

Throughput formula (the column `GB/s` or `TFLOP/s`): log-prob ops count the logits bytes read once
(logits input) or the 2NHV head FLOPs; flow ops count velocity + sample + noise read and next_sample +
mean written once, fp32; forward_process_loss counts its five [N, D] inputs read and dL/dv written once.

    python bench/bench_ops.py --smoke
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

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
from unirl_fast import reference as R  # noqa: E402


def _cases(dev, smoke):
    B, L, V, H = (2, 63, 3000, 64) if smoke else (8, 1024, 151936, 2048)
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    logits = torch.randn(B, L, V, device=dev, dtype=dt, requires_grad=True)
    y = torch.randint(0, V, (B, L), device=dev)
    h = torch.randn(B, L, H, device=dev, dtype=dt, requires_grad=True)
    W = (torch.randn(V, H, device=dev, dtype=dt) / H ** 0.5).requires_grad_()
    old = torch.randn(B, L, device=dev) - 3
    adv = torch.randn(B, device=dev)
    mask = torch.rand(B, L, device=dev) > 0.1
    lp = (torch.randn(B, L, device=dev) - 3).requires_grad_()
    rewards = torch.rand(64 if smoke else 4096, device=dev)
    gid = torch.arange(rewards.numel(), device=dev) // 8
    fb, fs = (4, (4, 16, 16)) if smoke else (32, (16, 64, 64))
    x = torch.randn(fb, *fs, device=dev)
    v = torch.randn(fb, *fs, device=dev, requires_grad=True)
    noise = torch.randn_like(x)
    sig = torch.full((fb,), 0.8, device=dev)
    flow_bytes = 5 * x.numel() * 4
    t_rows, adv_rows = 0.05 + 0.9 * torch.rand(fb, device=dev), torch.randn(fb, device=dev)
    v_old, v_ref = v.detach() + 0.1 * noise, v.detach() - 0.1 * noise

    def fwd_bwd(loss_of):
        def run():
            out = loss_of()
            out.backward()
        return run

    logit_bytes = logits.numel() * logits.element_size()
    head_flops = 2 * B * L * H * V
    lv, lhv = f"B{B}xL{L}xV{V}", f"B{B}xL{L}xH{H}xV{V}"
    return [  # (op, shape, throughput unit, work, {impl: fn})
        ("logprobs_from_logits", lv, "GB/s", logit_bytes, {
            "ours": fwd_bwd(lambda: U.logprobs_from_logits(logits, y)[0].sum()),
            "eager_ref": fwd_bwd(lambda: R.logprobs_from_logits_ref(logits, y)[0].sum()),
            "trl_rowwise": fwd_bwd(lambda: trl_rowwise_logprobs(logits, y).sum()),
        }),
        ("fused_linear_logprobs", lhv, "TFLOP/s", head_flops, {
            "ours": fwd_bwd(lambda: U.fused_linear_logprobs(h, W, y)[0].sum()),
            "eager_ref": fwd_bwd(lambda: R.fused_linear_logprobs_ref(h, W, y)[0].sum()),
        }),
        ("fused_linear_policy_loss", lhv, "TFLOP/s", head_flops, {
            "ours": fwd_bwd(lambda: U.fused_linear_policy_loss(h, W, y, old, adv, mask)[0]),
            "eager_ref": fwd_bwd(lambda: R.fused_linear_policy_loss_ref(h, W, y, old, adv, mask)[0]),
        }),
        ("policy_loss", f"B{B}xL{L}", None, None, {
            "ours": fwd_bwd(lambda: U.policy_loss(lp, old, adv, mask)[0]),
            "eager_ref": fwd_bwd(lambda: R.policy_loss_ref(lp, old, adv, mask)[0]),
        }),
        ("group_advantages", f"{rewards.numel()} rewards, groups of 8", None, None, {
            "ours": lambda: U.group_advantages(rewards, gid),
            "eager_ref": lambda: R.group_advantages_ref(rewards, gid),
        }),
        ("flow_sde_step", "B{}x{}".format(fb, "x".join(map(str, fs))), "GB/s", flow_bytes, {
            "ours": lambda: U.flow_sde_step(v.detach(), x, sig, sig - 0.1, noise=noise),
            "eager_ref": lambda: R.flow_sde_step_ref(v.detach(), x, sig, sig - 0.1, noise=noise),
        }),
        ("forward_process_loss", "nft N{}x{}".format(fb, "x".join(map(str, fs))), "GB/s", 6 * x.numel() * 4, {
            "ours": fwd_bwd(lambda: U.forward_process_loss(v, v_old, x, noise, t_rows, adv_rows, v_ref=v_ref,
                                                           beta_kl=1e-4)[0]),
            "eager_ref": fwd_bwd(lambda: R.forward_process_loss_ref(v, v_old, x, noise, t_rows, adv_rows, v_ref=v_ref,
                                                                    beta_kl=1e-4)[0]),
        }),
    ]


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="also time torch.compile(reference) (slow to compile on CPU)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    smoke = resolve_smoke(args)
    torch.manual_seed(0)
    ceil = measure_ceilings(dev, smoke=smoke)
    env = env_columns(dev)
    rows = []
    for op, shape, unit, work, fns in _cases(dev, smoke):
        if args.compile or not smoke:
            fns["compiled_ref"] = torch.compile(fns["eager_ref"])
        times = {name: time_fn(fn, device=dev, warmup=2, rep=5 if smoke else 20) for name, fn in fns.items()}
        for name, t in times.items():
            row = {"op": op, "shape": shape, "impl": name, "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                   "p80_ms": t.p80_ms,
                   "x_vs_eager_ref": ratio(times["eager_ref"].median_ms, t.median_ms),
                   "peak_extra_MiB": _mib(peak_extra_memory_bytes(fns[name], dev)), "smoke": smoke}
            if unit == "GB/s":
                row["rate"] = work / (t.median_ms * 1e-3) / 1e9
                row["unit"] = unit
                row["frac_of_ceiling"] = row["rate"] / ceil["copy_GBps"]
            elif unit == "TFLOP/s":
                row["rate"] = work / (t.median_ms * 1e-3) / 1e12
                row["unit"] = "fwd TFLOP/s"
            rows.append({**row, **env})
    path = append_rows("ops_overview.csv", rows, args.out)
    print(f"ceilings on {env['device']}: copy {ceil['copy_GBps']:.1f} GB/s, "
          f"{ceil['gemm_dtype']} GEMM {ceil['gemm_TFLOPs']:.3f} TFLOP/s, FP8 GEMM {ceil['fp8_gemm_TFLOPs']}")
    print(format_table(rows, ["op", "shape", "impl", "median_ms", "p20_ms", "p80_ms", "x_vs_eager_ref", "rate",
                              "unit", "peak_extra_MiB"]))
    print(f"rows appended to {path}")
    return rows


def _mib(b):
    return None if b is None else b / 2 ** 20


if __name__ == "__main__":
    main()
