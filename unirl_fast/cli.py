"""The `unirl-fast` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_info(args) -> int:
    from .info import collect, format_info

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_train(args) -> int:
    from .train import Trainer, preflight
    from .train.config import config_from_args

    try:  # every check that needs no model, before any work: one line and exit 2, nothing written
        cfg = config_from_args(args)
        if args.print_config:  # the resolved config, as config.json would hold it (a valid --config-file)
            import dataclasses

            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        info = preflight(cfg)
    except (ValueError, FileNotFoundError) as e:
        if _DEBUG:
            raise
        print(f"unirl-fast train: {e}", file=sys.stderr)
        return 2
    done = info["checkpoint_step"]
    if done is not None and done >= cfg.steps and _final_eval_logged(cfg.run_dir, done):
        print(f"run {cfg.run_dir} is already complete at step {done} of {cfg.steps}: nothing to do (--steps N with "
              f"N > {done} trains on; `unirl-fast eval {cfg.run_dir}` evaluates it)")
        return 0
    from ._checks import DeferredCheckError
    from .rewards import RewardError
    from .train.checkpoint import CheckpointError

    trainer = None
    try:
        trainer = Trainer(cfg, run_info=info)
        result = trainer.train()
    except KeyboardInterrupt:
        if _DEBUG:
            raise
        print(f"unirl-fast train: {_interrupted(cfg, trainer)}", file=sys.stderr)
        return _end(args, 130)
    except (CheckpointError, ValueError, FileNotFoundError) as e:  # what the run finds unusable once it reads it
        if _DEBUG:  # (a checkpoint the safe loader refuses, another algorithm's state, a task image): one line
            raise
        print(f"unirl-fast train: {e}", file=sys.stderr)
        return 2
    except (RewardError, DeferredCheckError) as e:  # no made-up reward, no update from a flagged step: the reason
        if _DEBUG:
            raise
        step = trainer.step if trainer is not None else 0
        print(f"unirl-fast train: stopped at step {step} (the checkpoints in {cfg.run_dir} hold no step "
              f"after it; rerun the command to resume): {e}", file=sys.stderr)
        return _end(args, 1)
    if trainer.dist is None or trainer.dist.is_main:
        print(json.dumps({"run_dir": cfg.run_dir, **result}))
    return 0


def _final_eval_logged(run_dir, step: int) -> bool:
    """Whether metrics.jsonl has the evaluation of `step` (a run stopped between its last checkpoint and that
    evaluation is not complete: the trainer makes it)."""
    from pathlib import Path

    path = Path(run_dir) / "metrics.jsonl"
    return path.is_file() and any(r.get("phase") == "eval" and r.get("step") == step
                                  for r in map(json.loads, path.read_text().splitlines()))


def _interrupted(cfg, trainer) -> str:
    """The Ctrl-C line: where the run was, and where the same command picks it up."""
    from .train.checkpoint import latest_checkpoint

    try:
        ckpt = latest_checkpoint(cfg.run_dir)
    except FileNotFoundError:
        ckpt = None
    resume = int(ckpt.name.split("-")[-1]) if ckpt is not None else 0
    if trainer is None:
        where = "while setting up (building or pretraining the base model)"
    else:
        where = f"after step {trainer.step} of {cfg.steps}"
    again = f"resume from step {resume} (its latest checkpoint)" if ckpt is not None else "start again from step 0" \
        + (" (the pretrained base is cached in the run directory once built)" if trainer is None else "")
    return f"interrupted {where}; rerun the same command to {again}"


def _end(args, code: int) -> int:
    """Exit with `code` now when this is the program itself: everything the run keeps is written, and the
    interpreter's teardown of torch and its extensions takes seconds on a loaded machine."""
    if getattr(args, "as_program", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _cmd_eval(args) -> int:
    from .train import Trainer
    from .train.rundir import append_eval, saved_config

    over = {k: getattr(args, k) for k in ("eval_prompts", "eval_samples") if getattr(args, k) is not None}
    # the token goes only where this command line says: config.json may come from anyone
    over.update(reward_token_env=args.reward_token_env or "",
                reward_allow_insecure_token=args.reward_allow_insecure_token)
    try:
        cfg = saved_config(args.run_dir, **over)  # one process reads the run
    except ValueError as e:
        print(f"unirl-fast eval: {e}", file=sys.stderr)
        return 2
    from .train.checkpoint import CheckpointError

    try:
        trainer = Trainer(cfg, purpose="eval")  # reads the run; writes only its result line (no optimizer)
    except (CheckpointError, ValueError) as e:
        print(f"unirl-fast eval: {e}", file=sys.stderr)
        return 2
    res = {k: v for k, v in trainer.evaluate().items() if not k.startswith("_")}

    out = append_eval(args.run_dir, {"step": trainer.step, "eval_prompts": cfg.eval_prompts,
                                     "eval_samples": cfg.eval_samples, **res})
    print(json.dumps(res))
    print(f"appended to {out}", file=sys.stderr)
    return 0


def _bench_suite():
    """Import bench/suite.py from the source checkout: `bench/` sits beside the package (not installed by
    setup.py), found relative to this file (editable install) or, failing that, in the working directory."""
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    root = next((r for r in (here, Path.cwd()) if (r / "bench" / "suite.py").is_file()), None)
    if root is None:
        raise FileNotFoundError(f"the bench scripts are not installed (no bench/suite.py under {here} or the "
                                "working directory): run from a source checkout (git clone, pip install -e .)")
    if str(root) not in sys.path:
        sys.path.append(str(root))  # after the installed packages, which it must not shadow
    import bench.suite

    if Path(bench.suite.__file__).resolve().parent != root / "bench":
        raise ImportError(f"'bench' resolves to {bench.suite.__file__}, not {root / 'bench'}: another module "
                          "named bench shadows the source checkout's")
    return bench.suite


def _cmd_time_to_reward(argv) -> int:
    """`unirl-fast bench --time-to-reward ...`: the rest of the command line goes to bench/time_to_reward.py."""
    try:
        _bench_suite()  # the source checkout's bench/ on the path
        import bench.time_to_reward as ttr

        ttr.main(argv)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"unirl-fast bench --time-to-reward: {e}", file=sys.stderr)
        return 2
    return 0


def _needs_interpreter(device) -> bool:
    """On a CPU the Triton kernels run only if TRITON_INTERPRET=1 was set before they were defined, i.e. before
    `import unirl_fast`, which has happened by the time this command runs."""
    import torch

    from .ops._dispatch import interpreting, triton_installed

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev.type != "cuda" and triton_installed() and not interpreting()


def _cmd_bench(args) -> int:
    import os
    import subprocess
    from pathlib import Path

    try:
        suite = _bench_suite()
        ops = suite.check_names(args.ops)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"unirl-fast bench: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(suite.names()))
        return 0
    if args.compile_report:  # its own process: it compiles for sm_90 and must not run under the interpreter
        script = Path(suite.__file__).resolve().parent / "kernel_report.py"
        argv = ["--shapes", "smoke" if args.smoke else "bench"] + (["--out", args.out] if args.out else [])
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, str(script), *argv, "--check"], env=env).returncode
    if _needs_interpreter(args.device):  # re-run this command in a child that defines the kernels interpreted
        argv = ["bench", *ops] + (["--smoke"] if args.smoke else []) + (["--out", args.out] if args.out else [])
        argv += (["--device", args.device] if args.device else []) + (["--baselines"] if args.baselines else [])
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "unirl_fast.cli", *argv], env=env).returncode
    res = suite.run(ops, out_dir=args.out, smoke=args.smoke, device=args.device)
    print(f"\nsummary (x_vs_ref > 1: faster than the reference; {len(res['summary'])} rows with the baselines' "
          "in summary.csv):")
    print(suite.format_summary(res["summary"], baselines=args.baselines))
    for name, err in res["failed"].items():
        print(f"FAILED bench {name}: {err}", file=sys.stderr)
    print(f"results (CSV + PNG): {res['out_dir']}")
    return 1 if res["failed"] else 0


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="kernel benchmarks (bench/bench_*.py) into one results folder, CSV + plots")
    b.add_argument("ops", nargs="*", help="benchmarks to run (default: all; --list names them)")
    b.add_argument("--out", default=None, help="results folder (default: a new timestamped folder in bench/results)")
    b.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats (implied without CUDA)")
    b.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    b.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    b.add_argument("--baselines", action="store_true", help="also print the baselines' rows in the summary table")
    b.add_argument("--compile-report", action="store_true",
                   help="no timing: compile every kernel launch for sm_90 (no GPU needed) and write registers, spills, "
                        "occupancy, load widths, prefetch and a bandwidth estimate to kernel_report.csv/.md "
                        "(bench/kernel_report.py); exits 1 on a compile error or a spill")
    b.add_argument("--time-to-reward", action="store_true",
                   help="compute (expert forwards/backwards, counted) and wall-clock to a held-out reward of named "
                        "trainer configurations over seeds (bench/time_to_reward.py); every argument after it goes "
                        "there: `unirl-fast bench --time-to-reward --help`")
    b.set_defaults(func=_cmd_bench)


def _cmd_serve_reward(args) -> int:
    from .rewards import build_reward
    from .rewards.server import exposure_warning, make_server

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"unirl-fast serve-reward: --token-env {args.token_env}: that environment variable is not set",
                  file=sys.stderr)
            return 2
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        reward = build_reward(args.reward, scenario=None, device=args.device)
        server = make_server(reward, args.host, args.port, token=token, label=reward.describe(),
                             log=None if args.quiet else say, error_log=say, workers=args.workers,
                             backlog=args.backlog, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                             max_samples=args.max_samples, max_image_pixels=args.max_image_pixels,
                             max_request_pixels=args.max_request_pixels, certfile=args.certfile,
                             keyfile=args.keyfile)
    except (ValueError, OSError) as e:
        print(f"unirl-fast serve-reward: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    warning = exposure_warning(host, token, args.certfile is not None)
    if warning:
        say(f"unirl-fast serve-reward: {warning}")
    shown = f"[{host}]" if ":" in host else host
    print(f"serving reward {reward.describe()} at {'https' if args.certfile else 'http'}://{shown}:{port}/ (POST; "
          f"GET /health)" + (" with a bearer token" if token else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        reward.close()
    return 0


def _add_serve_reward_parser(sub) -> None:
    from .rewards import server as srv

    sr = sub.add_parser("serve-reward", help="serve a reward over HTTP for `train --reward http://HOST:PORT/`",
                        description="Serve a reward (the weighted sum of the given specs) with the protocol of "
                                    "unirl_fast.rewards.http, for a trainer on another machine: --reward "
                                    "https://HOST:PORT/. Requests over a limit get 413, malformed ones 400, a full "
                                    "server 429; a failing reward answers 500 with a request id and its traceback "
                                    "goes to this process's standard error.")
    sr.add_argument("reward", nargs="+", metavar="SPEC[=WEIGHT]",
                    help="pkg.module:function, clip:DIR, pickscore:DIR, answer, format:REGEX")
    sr.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: loopback only; any other address exposes the reward to "
                         "the network: use --token-env and --certfile/--keyfile there)")
    sr.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed)")
    sr.add_argument("--token-env", default=None, metavar="VAR",
                    help="require `Authorization: Bearer $VAR` on every request")
    sr.add_argument("--certfile", default=None, help="TLS: the server's certificate chain (PEM)")
    sr.add_argument("--keyfile", default=None, help="TLS: its private key (PEM)")
    sr.add_argument("--workers", type=int, default=4, help="requests served at once (default 4)")
    sr.add_argument("--backlog", type=int, default=16,
                    help="connections that may wait for a worker; more are answered 429 (default 16)")
    sr.add_argument("--max-body-mb", type=float, default=srv.MAX_BODY_BYTES / 2 ** 20,
                    help="largest request body in MiB (default %(default)g)")
    sr.add_argument("--max-samples", type=int, default=srv.MAX_SAMPLES,
                    help="most samples per request (default %(default)s)")
    sr.add_argument("--max-image-pixels", type=int, default=srv.MAX_IMAGE_PIXELS,
                    help="most pixels of one image, read from its PNG header before decoding (default %(default)s)")
    sr.add_argument("--max-request-pixels", type=int, default=srv.MAX_REQUEST_PIXELS,
                    help="most pixels of all the images of one request (default %(default)s)")
    sr.add_argument("--device", default=None, help="device of model-based rewards (CLIP): cpu, cuda, cuda:N")
    sr.add_argument("--quiet", action="store_true", help="do not log each request (errors are still logged)")
    sr.set_defaults(func=_cmd_serve_reward)


def _cmd_export(args) -> int:
    """The run's latest checkpoint as a plain unified-model directory (split layout), LoRA adapters merged."""
    from pathlib import Path

    from .train import Trainer
    from .train.progress import bar, say
    from .train.rundir import saved_config

    out = Path(args.out)
    progress = bar(3, "export", unit="part")  # load the run, fold EMA / LoRA in, write
    try:
        cfg = saved_config(args.run_dir)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{args.out!r} exists and is not empty")
        # the weights, LoRA and the EMA only: no reward, tasks, reference or optimizer (train.setup, purpose export)
        trainer = Trainer(cfg, purpose="export", log=lambda *a: say(*a, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        progress.close()
        print(f"unirl-fast export: {e}", file=sys.stderr)
        return 2
    progress.update(1)
    if trainer.step == 0:
        print(f"unirl-fast export: {args.run_dir!r} has no checkpoint yet", file=sys.stderr)
        return 2
    model = trainer.model
    if args.ema:
        if trainer.ema is None:
            print("unirl-fast export: --ema but the run keeps no EMA weights (--ema-decay 0)", file=sys.stderr)
            return 2
        trainer.ema.copy_to_model()
    if trainer.lora:
        from .models.lora import merge_lora

        merged = merge_lora(model)
        say(f"merged {merged} LoRA layers into the weights", file=sys.stderr)
    progress.update(1)
    import torch

    if not torch.cuda.is_available():  # transformers' save path imports DeepSpeed when installed, which warns that
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # it found no GPU: this process only writes files
    model.save_pretrained(out)
    from .train.inputs import copy_scheduler_config, model_copy

    copy = model_copy(args.run_dir)  # the DiT pipeline's scheduler config, as in the run's inputs: beside dit/
    if copy is not None:
        copy_scheduler_config(copy / "dit", out)
    progress.update(1)
    progress.close()
    print(json.dumps({"run_dir": args.run_dir, "step": trainer.step, "out": str(out)}))
    return 0


def _add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="a run's latest checkpoint as a unified-model directory (LoRA merged)",
                        description="Write a run's latest checkpoint as a unified-model directory: lm/ (transformers), "
                                    "dit/ and vae/ (diffusers), connector.safetensors and unified_config.json, with "
                                    "LoRA adapters merged into the weights. Load it with UnifiedModel.from_pretrained "
                                    "or train on with --model-path.")
    ex.add_argument("run_dir")
    ex.add_argument("out", help="output directory (new or empty)")
    ex.add_argument("--ema", action="store_true", help="export the EMA weights (runs with --ema-decay > 0)")
    ex.set_defaults(func=_cmd_export)


def _cmd_plan(args) -> int:
    import torch

    from .models import UnifiedModel, preset_config
    from .models.plan import format_plan, memory_plan
    from .train.preflight_checks import lora_reference, lora_trainable
    from .train.scenarios import get_scenario

    try:
        sc = get_scenario(args.scenario)
        cfg = preset_config(args.preset)
        with torch.device("meta"):  # shapes only: nothing is allocated, nothing is read
            model = UnifiedModel(cfg.replace(edit=sc.edit) if sc.edit != cfg.edit else cfg)
            trainable = lora_trainable(model, sc, args.lora_lm, args.lora_dit)
            if args.fp8:
                from .fp8 import convert_to_fp8

                convert_to_fp8(model)
            plan = memory_plan(model, train_lm=sc.train_lm, train_dit=sc.train_dit, batch=args.batch,
                               micro_batch=args.micro_batch, prompt_len=args.prompt_len,
                               completion_len=args.completion_len, trained_steps=args.trained_steps, gpus=args.gpus,
                               precision=args.precision, frozen_dtype=args.frozen_dtype,
                               grad_ckpt_lm=not args.no_grad_ckpt,
                               grad_ckpt_dit=not args.no_grad_ckpt,
                               reference=not lora_reference(args.lora_lm, args.lora_dit, sc), trainable=trainable,
                               rollout={"lm_writes": sc.lm_writes, "draws": sc.draws, "guidance": False},
                               ema=args.ema, fp8=args.fp8, old_policy=args.old_policy,
                               cond_len=args.completion_len if sc.lm_writes else args.prompt_len)
    except (ValueError, ImportError) as e:
        print(f"unirl-fast plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in plan.items()}, indent=2, default=str))
    else:
        print(format_plan(plan, f"{args.preset} ({args.scenario})"))
    return 0


def _add_plan_parser(sub) -> None:
    from .models.config import PRESETS
    from .train.config import SCENARIOS

    pl = sub.add_parser("plan", help="parameter count and per-GPU memory plan of a model preset (meta device: no "
                                     "memory, no weights)")
    pl.add_argument("--preset", default="qwen2.5-1.5b-sana-0.6b", choices=sorted(PRESETS))
    pl.add_argument("--scenario", default="reason-generate", choices=SCENARIOS, help="which experts train")
    pl.add_argument("--batch", type=int, default=64, help="samples per RL step (all GPUs)")
    pl.add_argument("--micro-batch", type=int, default=8, help="samples per forward / backward on one GPU")
    pl.add_argument("--prompt-len", type=int, default=256)
    pl.add_argument("--completion-len", type=int, default=512)
    pl.add_argument("--trained-steps", type=int, default=2, help="denoising steps trained per image (the SDE window)")
    pl.add_argument("--gpus", type=int, default=8)
    pl.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    pl.add_argument("--frozen-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="weights of the experts the scenario does not train and of the autoencoder (train's "
                         "--frozen-dtype; trained weights are fp32)")
    pl.add_argument("--no-grad-ckpt", action="store_true", help="without gradient checkpointing")
    pl.add_argument("--fp8", action="store_true", help="the run converts its eligible Linear layers to FP8")
    pl.add_argument("--ema", action="store_true", help="the run keeps an EMA of the trained weights (--ema-decay)")
    pl.add_argument("--old-policy", action="store_true",
                    help="the run keeps an nft / awm old policy (an average of the trained weights; give its trained "
                         "timesteps per sample as --trained-steps)")
    pl.add_argument("--lora-lm", default=None, metavar="R,ALPHA[,MODULES]")
    pl.add_argument("--lora-dit", default=None, metavar="R,ALPHA[,MODULES] | default")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_cmd_plan)


def _cmd_report(args) -> int:
    from .report import report

    try:
        text, _, paths = report(args.run_dir, warmup=args.warmup, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as e:
        print(f"unirl-fast report: {e}", file=sys.stderr)
        return 2
    print(text)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _add_report_parser(sub) -> None:
    rep = sub.add_parser("report", help="summary table and PNG plots of a run directory's metrics")
    rep.add_argument("run_dir")
    rep.add_argument("--warmup", type=int, default=None,
                     help="first steps left out of the means (default: a profile run's warm-up, else 1)")
    rep.add_argument("--no-plots", action="store_true", help="print the table only")
    rep.set_defaults(func=_cmd_report)


def _cmd_profile(args) -> int:
    import dataclasses

    from .profile_run import profile
    from .train.config import config_from_args

    if args.config is None:
        args.config = "bench" if args.preset in ("bench-1.5b", "bench-vlm-2b") else "smoke"
    try:
        cfg = config_from_args(args)
        res = profile(dataclasses.replace(cfg, run_dir=args.out), args.impl_kind, steps=args.measured_steps,
                      warmup=args.warmup, compare=args.compare, out=args.out, check_steps=args.check_steps,
                      log=(lambda *_: None) if args.quiet else print)
    except ValueError as e:
        print(f"unirl-fast profile: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    for p in res["files"]:
        print(f"wrote {p}")
    return 1 if res["passed"] is False else 0


def _add_profile_parser(sub) -> None:
    from .train.config import add_config_args

    prof = sub.add_parser("profile", help="fixed-length measured trainer run from a random-init model preset; "
                                          "--compare: fast vs reference ops side by side")
    add_config_args(prof, exclude=("impl", "steps", "run_dir"))
    prof.add_argument("--impl", dest="impl_kind", choices=("fast", "reference"), default="fast",
                      help="fast: the fused ops (impl auto); reference: eager PyTorch ops")
    prof.add_argument("--steps", dest="measured_steps", type=int, default=5, help="measured steps (after warm-up)")
    prof.add_argument("--warmup", type=int, default=1, help="warm-up steps run first and excluded (default 1)")
    prof.add_argument("--compare", action="store_true", help="run fast then reference and print the ratios")
    prof.add_argument("--check-steps", type=int, default=2, help="first steps whose losses --compare checks")
    prof.add_argument("--out", default="runs/profile", help="output directory (JSON, CSV, per-impl metrics)")
    prof.add_argument("--quiet", action="store_true", help="print only the table")
    prof.set_defaults(config=None, func=_cmd_profile)


TRAIN_EPILOG = """\
--config picks the trainer's defaults (tiny: the default run, with each scenario's measured defaults on top;
smoke: a seconds-long run; bench: the profiling batch); --preset picks the model. Flags override both, and the
defaults shown above are the effective ones for the --config and --scenario on this command line.

Resuming: rerun with the same --run-dir. Training continues from the latest checkpoint; the run's config.json is
compared first, and a change to what the run is (scenario, model, batch, optimizer, sampler, seed...) is refused
before any work. --steps (to train on), the evaluation and checkpoint cadence, --device and --impl may change;
the change is recorded in resumes.jsonl. A run already at --steps reports that it is complete. One run per
--run-dir at a time (a second is refused, naming the first's pid and host).

Ctrl-C stops the run: the checkpoints keep what was saved (also when it comes during a save), and the same command
resumes from the latest one. Errors you can fix end in one line (exit 2; 1 when the reward or a value check stopped
the run); --debug (or UNIRL_FAST_DEBUG=1) shows their traceback.
"""


def _effective_defaults(argv):
    """The TrainConfig that --config / --scenario on this command line give, for the help's defaults."""
    from .train.config import ALGO_DEFAULTS, PRESETS, SCENARIOS, train_preset

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="tiny")
    pre.add_argument("--scenario", default=None)
    pre.add_argument("--image-algo", default=None)
    known, _ = pre.parse_known_args(argv or [])
    config = known.config if known.config in PRESETS else "tiny"
    scenario = known.scenario if known.scenario in SCENARIOS else None
    algo = known.image_algo if known.image_algo in ALGO_DEFAULTS else None
    return train_preset(config, scenario, algo)


def build_parser(argv=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unirl-fast", description="Fused ops and a lean trainer for unified-model RL")
    # `deepspeed --module unirl_fast.cli` puts --local_rank=N before the sub-command
    p.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device and usable optional backends")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    from .train.config import add_config_args

    train = sub.add_parser("train", help="RL on a unified model (default: reason-generate on the synthetic world)",
                           description="RL on a unified model: pretrain (or load) the base model, evaluate it, run "
                                       "RL, evaluate again; outputs in --run-dir.",
                           epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(train, defaults=_effective_defaults(argv))
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (preset, config file and flags) as JSON and exit")
    train.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                       help="set by the deepspeed launcher (data parallel under DeepSpeed ZeRO; see --zero-stage)")
    train.set_defaults(func=_cmd_train)
    ev = sub.add_parser("eval", help="held-out reward of a run's latest checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--eval-prompts", type=int, default=None)
    ev.add_argument("--eval-samples", type=int, default=None, help="images per held-out task")
    ev.add_argument("--reward-token-env", default=None, metavar="VAR",
                    help="send the bearer token in $VAR to the run's reward services (not taken from the run's "
                         "config.json: a run directory from elsewhere names its own URLs)")
    ev.add_argument("--reward-allow-insecure-token", action="store_true",
                    help="also send it to a plain http:// service on another machine")
    ev.set_defaults(func=_cmd_eval)
    _add_bench_parser(sub)
    _add_serve_reward_parser(sub)
    _add_export_parser(sub)
    _add_plan_parser(sub)
    _add_report_parser(sub)
    _add_profile_parser(sub)
    return p


_DEBUG = False  # --debug / UNIRL_FAST_DEBUG=1: the traceback of a user-caused error too


def main(argv=None) -> int:
    """Errors a user causes (bad input, a failing reward, Ctrl-C) end in one line naming what to change, exit 2 (1 for a
    run stopped by its reward or a failed value check, 130 for Ctrl-C); with --debug (anywhere on the command line) or
    UNIRL_FAST_DEBUG=1 they raise with their traceback. Any other exception is a bug of ours: always its traceback."""
    global _DEBUG
    as_program = argv is None  # the command itself (console script, python -m), not a call from Python code
    argv = sys.argv[1:] if argv is None else list(argv)
    _DEBUG = "--debug" in argv or os.environ.get("UNIRL_FAST_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["bench"] and "--time-to-reward" in argv:  # its own options (--config NAME=..., --seeds ...)
        return _cmd_time_to_reward([a for a in argv[1:] if a != "--time-to-reward"])
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # report an unknown flag with the subcommand's own usage, not the top-level one
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subs.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    for rank in (getattr(args, "launcher_local_rank", None), getattr(args, "local_rank", None)):
        if rank is not None:  # the deepspeed launcher passes --local_rank=N (and also sets LOCAL_RANK)
            os.environ.setdefault("LOCAL_RANK", str(rank))
    args.as_program = as_program
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if _DEBUG:
            raise
        print(f"unirl-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # bad input found while working: one line
        if _DEBUG:
            raise
        print(f"unirl-fast {args.command}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except Exception as e:
        from ._checks import DeferredCheckError
        from .rewards.base import RewardError

        if _DEBUG or not isinstance(e, (RewardError, DeferredCheckError)):
            raise  # a bug of ours: its traceback, always
        print(f"unirl-fast {args.command}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
