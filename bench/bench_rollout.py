"""Rollout throughput: the text engine vs transformers `generate`, and the image engine with and without CFG.

Text: tokens/s = B * new_tokens / wall time of one batched rollout (prefill included), both sides sampling at
temperature 1 with EOS disabled so every row produces exactly new_tokens tokens. Ours: static KV cache, decode
step under torch.compile(mode="reduce-overhead") on CUDA. Baseline: `lm.generate(do_sample=True)` with its
default (dynamic) cache, as a user would call it. Target on H100 (bench-1.5b, batch 64, 512 new tokens): >= 3x.

Image: images/s = B / wall time of `ImageEngine.generate` (LM conditioning + num_steps DiT steps, decode off),
CFG-free (one B-row DiT pass per step) vs CFG (one 2B-row pass per step + the unconditional LM pass).
Target on H100: CFG-free >= 1.9x CFG.

Timing: whole rollouts take seconds, so each is timed with perf_counter around a synchronised call (warm-up 1,
median of `--reps`), not do_bench. bf16 weights on CUDA, fp32 on CPU.

    python bench/bench_rollout.py --smoke            # tiny preset on CPU
    python bench/bench_rollout.py                    # bench-1.5b on the GPU
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_rows, base_parser, env_columns, format_table, resolve_smoke, sync, time_fn  # noqa: E402
from unirl_fast.models import UnifiedModel  # noqa: E402
from unirl_fast.rollout import ImageEngine, ImageSamplingParams, SamplingParams, TextEngine  # noqa: E402


def _timed(fn, dev, reps):
    def run():
        fn()
        sync(dev)
    return time_fn(run, device="cpu", warmup=1, rep=reps)


def bench_text(model, dev, B, P, T, reps):
    vocab = model.lm.config.vocab_size
    ids = torch.randint(4, vocab, (B, P), device=dev)
    mask = torch.ones_like(ids)
    mask[: B // 2, : P // 4] = 0  # half the prompts are shorter: left padding
    engine = TextEngine(model.lm)
    params = SamplingParams(max_new_tokens=T, temperature=1.0, eos_token_ids=())
    g = torch.Generator(device=dev).manual_seed(0)
    ours = _timed(lambda: engine.generate(ids, mask, params, generator=g), dev, reps)
    hf = _timed(lambda: model.lm.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                          top_k=0, top_p=1.0, max_new_tokens=T, min_new_tokens=T,
                                          pad_token_id=0, eos_token_id=None), dev, reps)
    rows = []
    for name, t in (("ours (static cache" + (", compiled)" if engine.compile else ")"), ours),
                    ("transformers generate", hf)):
        rows.append({"bench": "text", "impl": name, "batch": B, "prompt": P, "new_tokens": T,
                     "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                     "throughput": B * T / (t.median_ms * 1e-3), "unit": "tokens/s"})
    rows[0]["speedup"] = hf.median_ms / ours.median_ms
    return rows


def bench_image(model, dev, B, steps, reps):
    ids = torch.randint(4, min(model.lm.config.vocab_size, 1000), (B, 16), device=dev)
    mask = torch.ones_like(ids)
    engine = ImageEngine(model)
    rows, times = [], {}
    for name, w in (("CFG-free", 1.0), ("CFG w=4.5", 4.5)):
        p = ImageSamplingParams(num_steps=steps, guidance_scale=w, decode=False, window_start=0,
                                window_size=min(2, steps))
        g = torch.Generator(device=dev).manual_seed(0)
        times[name] = t = _timed(lambda p=p, g=g: engine.generate(ids, mask, p, generator=g), dev, reps)
        rows.append({"bench": "image", "impl": name, "batch": B, "steps": steps, "median_ms": t.median_ms,
                     "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "throughput": B / (t.median_ms * 1e-3),
                     "unit": "images/s"})
    rows[0]["speedup"] = times["CFG w=4.5"].median_ms / times["CFG-free"].median_ms
    return rows


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="default: bench-1.5b (tiny with --smoke)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--image-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    smoke = resolve_smoke(args)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # the CPU smoke run shares 2 cores: one thread keeps the ratio stable
    preset = args.preset or ("tiny" if smoke else "bench-1.5b")
    B = args.batch or (4 if smoke else 64)
    P = args.prompt_len or (8 if smoke else 64)
    T = args.new_tokens or (16 if smoke else 512)
    IB = args.image_batch or (2 if smoke else 32)
    steps = args.steps or (3 if smoke else 10)
    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the device: bench-1.5b is ~2.5B fp32 parameters
        model = UnifiedModel.from_preset(preset).eval()
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    with torch.no_grad():
        rows = bench_text(model, dev, B, P, T, args.reps) + bench_image(model, dev, IB, steps, args.reps)
    env = env_columns(dev)
    for r in rows:
        r.update(preset=preset, smoke=smoke, **env)
    print(f"device: {env['device']}  torch {env['torch']}  preset {preset}")
    print(format_table(rows, ["bench", "impl", "batch", "new_tokens", "steps", "median_ms", "p20_ms", "p80_ms",
                              "throughput", "unit", "speedup"]))
    print("results:", append_rows("rollout.csv", rows, args.out))
    return rows


if __name__ == "__main__":
    main()
