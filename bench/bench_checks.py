"""What the value checks cost: `logprobs_from_logits` and `fused_linear_policy_loss`, forward + backward, with
checks "off", "cheap" (the default: O(output), no host sync) and "full" (the old input scans), side by side.

The ops run their default backend on the device (`impl="auto"`: the Triton kernels on CUDA, the fp32 reference on a
CPU), so on a CPU this measures the reference ops with each check mode, the case the target below is stated for.
Columns: median ms (p20, p80) per mode and `x_vs_off` = t(mode) / t(off), the checks' relative cost
(target: cheap <= 1.05 on a CPU at N = 4096, V = 32000 fp32, <= 1.02 on a GPU).

Shapes: on a CPU N = 4096 tokens (B4 x L1024), V = 32000, H = 512, fp32 (the logits op is the target's; the fused
loss at H = 512 keeps its reference inside memory); on a GPU the qwen-3b shape (N = 8192, H = 2048, V = 151936) in
bf16; `--smoke` tiny shapes. A mode's time is the median of `--rep` calls, modes interleaved round by round so
a drift of the machine's speed hits every mode alike.

    python bench/bench_checks.py                 # CPU: the target shape (about a minute on 2 cores)
    python bench/bench_checks.py --smoke         # tiny shapes (what CI runs)
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import unirl_fast as U  # noqa: E402
from bench.common import append_rows, base_parser, env_columns, format_table, sync, time_fn  # noqa: E402

MODES = ("off", "cheap", "full")


def shapes(dev, smoke):
    """name -> (B, L, H, V, dtype)"""
    if smoke:
        return {"smoke": (2, 64, 32, 3000, torch.float32)}
    if dev.type == "cuda":
        return {"qwen-3b": (8, 1024, 2048, 151936, torch.bfloat16)}
    return {"cpu-N4096-V32000": (4, 1024, 512, 32000, torch.float32)}


def cases(B, L, H, V, dtype, dev):
    """op name -> fwd+bwd closure over fresh random inputs."""
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(B, L, V, device=dev, dtype=dtype, generator=g).requires_grad_()
    y = torch.randint(0, V, (B, L), device=dev, generator=g)
    h = torch.randn(B, L, H, device=dev, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    old = torch.randn(B, L, device=dev, generator=g) - 5.0
    adv = torch.randn(B, device=dev, generator=g)
    mask = torch.ones(B, L, device=dev, dtype=torch.bool)

    def logprobs():
        logp, ent = U.logprobs_from_logits(z, y, return_entropy=True)
        torch.autograd.grad(logp.sum() + ent.sum(), [z])

    def fused_loss():
        loss, _ = U.fused_linear_policy_loss(h, w, y, old, adv, mask)
        torch.autograd.grad(loss, [h, w])

    return {"logprobs_from_logits": logprobs, "fused_linear_policy_loss": fused_loss}


def interleaved(fn, dev, rep):
    """{mode: Timing-like (median, p20, p80)} with the modes timed round-robin after one warm-up call each."""
    samples = {m: [] for m in MODES}
    for m in MODES:
        with U.checks(m):
            time_fn(fn, device=dev, warmup=1, rep=1) if dev.type == "cuda" else fn()
    for _ in range(rep):
        for m in MODES:
            with U.checks(m):
                if dev.type == "cuda":
                    samples[m].append(time_fn(fn, device=dev, warmup=1, rep=3).median_ms)
                else:
                    sync(dev)
                    t0 = time.perf_counter()
                    fn()
                    sync(dev)
                    samples[m].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for m, s in samples.items():
        q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else s * 9
        out[m] = (statistics.median(s), q[1], q[7])
    return out


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rep", type=int, default=None, help="timed rounds per mode (default 15, smoke 3)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    rep = args.rep or (3 if args.smoke else 15)
    env = env_columns(dev)
    rows = []
    for shape, (B, L, H, V, dtype) in shapes(dev, args.smoke).items():
        for op, fn in cases(B, L, H, V, dtype, dev).items():
            t = interleaved(fn, dev, rep)
            for m in MODES:
                rows.append({**env, "checks": m, "op": op, "shape": shape, "B": B, "L": L, "H": H, "V": V,
                             "dtype": str(dtype).replace("torch.", ""), "impl": f"checks={m}",
                             "median_ms": t[m][0], "p20_ms": t[m][1], "p80_ms": t[m][2],
                             "x_vs_off": t[m][0] / t["off"][0]})
    path = append_rows("checks.csv", rows, args.out)
    print(format_table(rows, ["op", "shape", "checks", "median_ms", "p20_ms", "p80_ms", "x_vs_off"]))
    print(f"rows appended to {path}")
    return rows


if __name__ == "__main__":
    main()
