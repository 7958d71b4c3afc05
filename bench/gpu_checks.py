"""Two measurements of the trainer's lean paths that only a GPU can make (bench/gpu_suite.sh runs this).

1. Decode tokens/s, compiled vs eager: one `TextEngine(compile=True)` (torch.compile fullgraph, CUDA graphs) and
   one `TextEngine(compile=False)` over the same LM (bf16 on CUDA), B left-padded prompts, T new tokens at
   temperature 1 with EOS off (every row writes T tokens); a warm-up rollout each (the compiled engine compiles
   there), then the median of --reps timed rollouts. tokens/s = B x T / wall time (prefill included).
2. Host syncs per train step: one reason-generate step of a random-init tiny model with a device-side reward
   (`brightness` below), after a warm-up step, under `torch.cuda.set_sync_debug_mode("warn")`: every
   synchronizing CUDA call warns and is counted; beside it `profiling.syncs.HostSyncCounter`'s count of the same
   step (tests/test_host_syncs.py holds that one at 9 on a CPU).

On a CPU (--smoke) the same code runs at tiny sizes: the decode times are CPU times of the interpreter-free eager
and inductor paths (not GPU figures) and the device's own sync count is "unmeasured". Results: OUT/gpu_checks.json
(written after each part, so a step cut by its time limit keeps what finished).

    python bench/gpu_checks.py --out DIR [--smoke]
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import base_parser, resolve_smoke, sync  # noqa: E402


def brightness(batch):
    """A reward computed on the device (no host read of the images): mean pixel value in [0, 1]."""
    return (batch.images.float().mean(dim=(1, 2, 3)) + 1) / 2


def decode_rates(preset, dev, B, P, T, reps) -> dict:
    from unirl_fast.profile_run import build_model
    from unirl_fast.rollout import SamplingParams, TextEngine

    model = build_model(preset, False, 0, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ids = torch.randint(4, model.lm.config.vocab_size, (B, P), device=dev)
    mask = torch.ones_like(ids)
    mask[: B // 2, : P // 4] = 0
    params = SamplingParams(max_new_tokens=T, temperature=1.0, eos_token_ids=())
    out = {"preset": preset, "batch": B, "prompt": P, "new_tokens": T}
    for name, compile in (("eager", False), ("compiled", True)):
        engine = TextEngine(model.lm, compile=compile)
        g = torch.Generator(device=dev).manual_seed(0)
        t0 = time.perf_counter()
        engine.generate(ids, mask, params, generator=g)  # warm-up (compiles)
        sync(dev)
        out[f"{name}_first_call_s"] = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.generate(ids, mask, params, generator=g)
            sync(dev)
            times.append(time.perf_counter() - t0)
        out[f"{name}_tokens_per_s"] = B * T / sorted(times)[len(times) // 2]
    out["compiled_over_eager"] = out["compiled_tokens_per_s"] / out["eager_tokens_per_s"]
    return out


def step_syncs(dev) -> dict:
    from unirl_fast import _checks as C
    from unirl_fast.profile_run import build_model
    from unirl_fast.profiling.syncs import HostSyncCounter
    from unirl_fast.train import TrainConfig, Trainer
    from unirl_fast.train.scenarios import get_scenario

    c = TrainConfig(scenario="reason-generate", preset="tiny", run_dir=tempfile.mkdtemp(), steps=3,
                    prompts_per_step=2, group_size=2, micro_batch=2, max_new_tokens=8, image_steps=4, sde_window=2,
                    beta=0.02, device=str(dev), reward=("bench.gpu_checks:brightness",))
    model = build_model(c.preset, get_scenario(c.scenario).edit, 0, dev, torch.float32)
    t = Trainer(c, model=model, log=lambda *a, **k: None)
    t.train_step()  # warm-up: optimizer state, compiled engines
    for state in t.opt.state.values():
        C.mark_host_resident(state["step"])
    out = {}
    C._defer_on_cpu = dev.type != "cuda"  # a CPU runs the checks' deferred (CUDA) path, as tests/test_host_syncs.py
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostSyncCounter() as counted:
                t.train_step()
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            C._defer_on_cpu = False
    device_syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    out["host_sync_counter"] = counted.total
    out["device_sync_warnings"] = len(device_syncs) if dev.type == "cuda" else "unmeasured (no CUDA)"
    out["device_sync_examples"] = sorted(set(m[:160] for m in device_syncs))[:10]
    return out


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    smoke = resolve_smoke(args)
    dev = torch.device(args.device)
    out = Path(args.out or "bench/results")
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "smoke": smoke}
    path = out / "gpu_checks.json"
    shape = dict(preset="tiny", B=4, P=8, T=8, reps=1) if smoke else dict(preset="small", B=16, P=64, T=64,
                                                                            reps=args.reps)
    res["decode"] = decode_rates(dev=dev, **shape)
    path.write_text(json.dumps(res, indent=2))
    print("decode:", json.dumps(res["decode"]))
    res["train_step_syncs"] = step_syncs(dev)
    path.write_text(json.dumps(res, indent=2))
    print("train step syncs:", json.dumps(res["train_step_syncs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
