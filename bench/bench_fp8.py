"""FP8 unified precision flow benchmark (issue 5): FP8Linear vs bf16 nn.Linear, quantizer bandwidth, FP8 error,
and the rollout/training mismatch of the unified flow vs FP8-rollout/bf16-training.

1. GEMM: forward + backward of FP8Linear (each available backend) vs bf16 nn.Linear at the FP8 shapes
   (docs/benchmarks.md): 8192^3 and the Qwen2.5-7B projections (N x K = 18944 x 3584, 3584 x 18944,
   4608 x 3584) at M = 8192, 16384.
   TFLOP/s = 6 M N K / t (three GEMMs); x_vs_bf16 = t(bf16) / t(ours). Error columns: scale-free metric
   1 - 2<a,b>/(|a|^2+|b|^2) of y, dx, dW against the bf16 layer's (the bf16 layer is itself rounded, so this
   is the FP8-vs-bf16 gap, not an error against exact math). Target on H100: >= 1.35x at M = 16384. Timed with
   the default value checks ("cheap": the scale check has no host sync), as a training loop runs them.
2. Quantizers: GB/s = (bytes of x read + FP8 bytes written + fp32 scales written) / t, as a fraction of the
   device copy ceiling measured in the same run (read + write bytes). Target on H100: >= 0.75x.
3. Mismatch on a transformers Qwen2 LM built from a config (same weights, same sampled tokens): tokens are sampled
   by the FP8 model (KV-cache decode); then
     (a) unified:   FP8 rollout scoring (eval, no_grad) vs FP8 training forward (train mode, grad)
     (b) mixed:     the same FP8 rollout log-probs vs a bf16 training forward of the unconverted model
     (c) decode:    the FP8 KV-cache decode's own log-probs vs the FP8 training forward (different batch shapes,
                    so not bitwise even in the unified flow)
   reporting k3(rollout, train), mean exp|dlogp| and max |dlogp| over the completion tokens.

Smoke (`--smoke`, or any CPU run): tiny shapes, the CPU emulation backend, and the mismatch experiment on a tiny
Qwen2 config (hidden 256). CSV rows go to bench/results/fp8.csv, the figure to bench/results/fp8.png.

    python bench/bench_fp8.py --smoke
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
)
from unirl_fast.fp8 import FP8Linear, convert_to_fp8, has_fp8_gemm, quantize_fp8, rollout_mismatch  # noqa: E402
from unirl_fast.fp8.gemm import scaled_mm_failure  # noqa: E402

QWEN7B_NK = [(18944, 3584), (3584, 18944), (4608, 3584)]


def sf_err(a, b):
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(1 - 2 * (a * b).sum() / ((a * a).sum() + (b * b).sum()))


def gemm_shapes(smoke):
    if smoke:
        return [("smoke", 256, 384, 256), ("smoke", 256, 256, 512)]
    shapes = [("8192^3", 8192, 8192, 8192)]
    for m in (8192, 16384):
        shapes += [(f"qwen7b-{n}x{k}", m, n, k) for n, k in QWEN7B_NK]
    return shapes


def fp8_backends(dev):
    if not has_fp8_gemm(dev):
        return ["emulation"]
    names = ["triton"]
    if scaled_mm_failure(dev, "block") is None and scaled_mm_failure(dev, "row") is None:
        names.insert(0, "scaled_mm")
    return names


def bench_gemms(dev, smoke, ceil):
    rows = []
    for name, m, n, k in gemm_shapes(smoke):
        ref = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        layers = {"bf16_linear": ref}
        layers.update({f"fp8_{b}": FP8Linear.from_linear(ref, backend=b) for b in fp8_backends(dev)})
        outs, times = {}, {}
        for impl, layer in layers.items():
            xi = x.clone().requires_grad_()

            def step(layer=layer, xi=xi, dy=dy):
                layer.weight.grad = None
                xi.grad = None
                layer(xi).backward(dy)

            step()
            y = layer(xi)
            outs[impl] = (y.detach(), xi.grad.clone(), layer.weight.grad.clone())
            times[impl] = time_fn(step, device=dev, warmup=1 if smoke else 3, rep=3 if smoke else 20)
            mem = peak_extra_memory_bytes(step, dev)
            rows.append({"part": "gemm", "shape": name, "M": m, "N": n, "K": k, "impl": impl,
                         "median_ms": times[impl].median_ms, "p20_ms": times[impl].p20_ms,
                         "p80_ms": times[impl].p80_ms, "TFLOPs": 6 * m * n * k / (times[impl].median_ms * 1e-3) / 1e12,
                         "peak_extra_MiB": None if mem is None else mem / 2 ** 20})
        for r in rows[-len(layers):]:
            r["x_vs_bf16"] = ratio(times["bf16_linear"].median_ms, times[r["impl"]].median_ms)
            got, want = outs[r["impl"]], outs["bf16_linear"]
            r["err_y"], r["err_dx"], r["err_dw"] = (sf_err(a, b) for a, b in zip(got, want))
            if ceil.get("fp8_gemm_TFLOPs") and r["impl"] != "bf16_linear":
                r["frac_of_ceiling"] = r["TFLOPs"] / ceil["fp8_gemm_TFLOPs"]
        del layers, outs
    return rows


def bench_quantizers(dev, smoke, ceil):
    m, k = (256, 512) if smoke else (16384, 3584)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    impl = "triton" if dev.type == "cuda" else "reference"
    rows = []
    for grouping in ("1x128", "128x1", "128x128"):
        t = time_fn(lambda g=grouping: quantize_fp8(x, g, impl=impl), device=dev,
                    warmup=2, rep=5 if smoke else 50)
        nbytes = x.numel() * (2 + 1) + x.numel() // 128 * 4
        gbps = nbytes / (t.median_ms * 1e-3) / 1e9
        rows.append({"part": "quant", "shape": f"{m}x{k} bf16", "impl": f"{impl}:{grouping}", "M": m, "K": k,
                     "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "GBps": gbps,
                     "frac_of_ceiling": gbps / ceil["copy_GBps"]})
    return rows


def mismatch_model(dev, smoke):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if smoke:
        cfg = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        shape = (2, 16, 16)
    else:
        cfg = Qwen2Config(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048)
        shape = (8, 64, 448)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dev, torch.bfloat16)
    return model, shape


def _score(model, seq, prompt_len):
    logits = model(input_ids=seq).logits[:, prompt_len - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, seq[:, prompt_len:, None]).squeeze(-1)


def bench_mismatch(dev, smoke):
    model, (b, p, t) = mismatch_model(dev, smoke)
    bf16_model = copy.deepcopy(model)
    convert_to_fp8(model)
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (b, p), device=dev)
    with torch.no_grad():
        gen = model.generate(prompt, do_sample=True, max_new_tokens=t, min_new_tokens=t, top_k=0, top_p=1.0,
                             temperature=1.0, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             eos_token_id=None)
        seq = gen.sequences
        decode = torch.log_softmax(torch.stack(gen.logits, 1).float(), -1).gather(-1, seq[:, p:, None]).squeeze(-1)
        rollout = _score(model, seq, p)
        bf16_train = _score(bf16_model.train(), seq, p)
    model.train()
    fp8_train = _score(model, seq, p)
    fp8_train.sum().backward()
    mask = torch.ones_like(rollout, dtype=torch.bool)
    cases = {"(a) fp8 rollout vs fp8 train (unified)": (rollout, fp8_train),
             "(b) fp8 rollout vs bf16 train": (rollout, bf16_train),
             "(c) fp8 kv-decode vs fp8 train": (decode, fp8_train)}
    rows = []
    for name, (r, tr) in cases.items():
        mm = {k: float(v) for k, v in rollout_mismatch(r, tr.detach(), mask).items()}
        rows.append({"part": "mismatch", "impl": name, "shape": f"qwen2-h{model.config.hidden_size} B{b} T{t}",
                     "k3": mm["k3"], "mean_exp_abs_dlogp": mm["mean_exp_abs_dlogp"],
                     "max_abs_dlogp": mm["max_abs_dlogp"], "bitwise_equal": bool(torch.equal(r, tr.detach()))})
    return rows


def plot(rows, path):
    """The figure needs the [bench] extra (matplotlib); without it only the CSV and the tables are written."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no figure written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    g = [r for r in rows if r["part"] == "gemm" and r["impl"] != "bf16_linear"]
    axes[0].bar(range(len(g)), [r["x_vs_bf16"] for r in g])
    axes[0].set_xticks(range(len(g)), [f"{r['impl']}\n{r['shape']}\nM{r['M']}" for r in g], fontsize=6)
    axes[0].axhline(1.35, color="r", ls="--", label="target 1.35x")
    axes[0].set_ylabel("fwd+bwd speed-up vs bf16 nn.Linear")
    axes[0].legend()
    mm = [r for r in rows if r["part"] == "mismatch"]
    axes[1].bar(range(len(mm)), [max(r["k3"], 1e-12) for r in mm])
    axes[1].set_yscale("log")
    axes[1].set_xticks(range(len(mm)), [r["impl"].replace(" vs ", "\nvs ") for r in mm], fontsize=7)
    axes[1].set_ylabel("k3(rollout, train), token mean (0 shown as 1e-12)")
    fig.suptitle(f"FP8 unified flow on {rows[0]['device']}" + (" (smoke: CPU emulation)" if rows[0]["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    dev = torch.device(args.device)
    smoke = resolve_smoke(args)
    torch.manual_seed(0)
    ceil = measure_ceilings(dev, smoke=smoke)
    env = env_columns(dev)
    rows = bench_gemms(dev, smoke, ceil) + bench_quantizers(dev, smoke, ceil) + bench_mismatch(dev, smoke)
    rows = [{**r, "smoke": smoke, **env} for r in rows]
    path = append_rows("fp8.csv", rows, args.out)
    png = Path(args.out or RESULTS_DIR) / ("fp8_smoke.png" if smoke else "fp8.png")
    png = plot(rows, png)
    print(f"ceilings on {env['device']}: copy {ceil['copy_GBps']:.1f} GB/s, {ceil['gemm_dtype']} GEMM "
          f"{ceil['gemm_TFLOPs']:.3f} TFLOP/s, FP8 GEMM {ceil['fp8_gemm_TFLOPs']}")
    cols = {"gemm": ["shape", "M", "N", "K", "impl", "median_ms", "p20_ms", "p80_ms", "TFLOPs", "x_vs_bf16",
                     "err_y", "err_dx", "err_dw", "peak_extra_MiB"],
            "quant": ["shape", "impl", "median_ms", "GBps", "frac_of_ceiling"],
            "mismatch": ["shape", "impl", "k3", "mean_exp_abs_dlogp", "max_abs_dlogp", "bitwise_equal"]}
    for part, c in cols.items():
        print(format_table([r for r in rows if r["part"] == part], c))
    print(f"rows appended to {path}; figure {png}")
    return rows


if __name__ == "__main__":
    main()
