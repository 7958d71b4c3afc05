"""The `unirl-fast` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from .info import collect, format_info

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_train(args) -> int:
    from .train import Trainer
    from .train.config import config_from_args

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"unirl-fast train: {e}", file=sys.stderr)
        return 2
    result = Trainer(cfg).train()
    print(json.dumps({"run_dir": cfg.run_dir, **result}))
    return 0


def _cmd_eval(args) -> int:
    import dataclasses
    from pathlib import Path

    from .train import TrainConfig, Trainer

    path = Path(args.run_dir) / "config.json"
    if not path.is_file():
        print(f"unirl-fast eval: {args.run_dir!r} has no config.json (not a run directory)", file=sys.stderr)
        return 2
    cfg = TrainConfig(**json.loads(path.read_text()))
    if args.eval_prompts:
        cfg = dataclasses.replace(cfg, eval_prompts=args.eval_prompts)
    res = Trainer(cfg).evaluate()
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}))
    return 0


def _cmd_report(args) -> int:
    from .profiling.report import report

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

    from .profiling.profile_run import profile
    from .train.config import config_from_args

    if args.config is None:
        args.config = "bench" if args.preset == "bench-1.5b" else "smoke"
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unirl-fast", description="Fused ops and a lean trainer for unified-model RL")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device and usable optional backends")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    from .train.config import add_config_args

    train = sub.add_parser("train", help="RL on a unified model (default: reason-generate on the synthetic world)")
    add_config_args(train)
    train.set_defaults(func=_cmd_train)
    ev = sub.add_parser("eval", help="held-out reward of a run's latest checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--eval-prompts", type=int, default=None)
    ev.set_defaults(func=_cmd_eval)
    _add_report_parser(sub)
    _add_profile_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
