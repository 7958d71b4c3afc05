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
    rep.add_argument("--warmup", type=int, default=1, help="first steps left out of the means (default 1)")
    rep.add_argument("--no-plots", action="store_true", help="print the table only")
    rep.set_defaults(func=_cmd_report)


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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
