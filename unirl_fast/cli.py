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
    from .train import Trainer
    from .train.config import config_from_args

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"unirl-fast train: {e}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg)
    result = trainer.train()
    if trainer.dist is None or trainer.dist.is_main:
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
    cfg = dataclasses.replace(TrainConfig(**json.loads(path.read_text())), zero_stage=None)  # one process reads
    if args.eval_prompts:
        cfg = dataclasses.replace(cfg, eval_prompts=args.eval_prompts)
    res = Trainer(cfg).evaluate()
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unirl-fast", description="Fused ops and a lean trainer for unified-model RL")
    # `deepspeed --module unirl_fast.cli` puts --local_rank=N before the sub-command
    p.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device and usable optional backends")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)
    from .train.config import add_config_args

    train = sub.add_parser("train", help="RL on a unified model (default: reason-generate on the synthetic world)")
    add_config_args(train)
    train.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                       help="set by the deepspeed launcher (data parallel under DeepSpeed ZeRO; see --zero-stage)")
    train.set_defaults(func=_cmd_train)
    ev = sub.add_parser("eval", help="held-out reward of a run's latest checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--eval-prompts", type=int, default=None)
    ev.set_defaults(func=_cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for rank in (getattr(args, "launcher_local_rank", None), getattr(args, "local_rank", None)):
        if rank is not None:  # the deepspeed launcher passes --local_rank=N (and also sets LOCAL_RANK)
            os.environ.setdefault("LOCAL_RANK", str(rank))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
