"""Time to reward: how much expert compute (and wall-clock) named trainer configurations need to reach a held-out
reward, on the embedded world, over several seeds, paired against a baseline.

    unirl-fast bench --time-to-reward --scenario generate --config flow_grpo --config window2 --seeds 3
    unirl-fast bench --time-to-reward --config "fast=--image-steps 6 --sde-window 3" --config flow_grpo
    unirl-fast bench --time-to-reward --smoke            # seconds: CI's end-to-end check
    unirl-fast bench --time-to-reward --merge OUT_S0 OUT_S1 OUT_S2 --out OUT   # seeds run as parallel processes
    unirl-fast bench --time-to-reward --reward-sleep 1 --side-by-side --config serial --config overlap \
        --config off_policy --baseline serial        # wall-clock: the step's pipeline modes against a slow reward

Configurations: a name from CONFIGS (trainer flags on top of the scenario's defaults; `--list` prints them), a
new one as `--config "NAME=--flag value ..."`, or a YAML / JSON `--configs-file` ({name: "flags" | [flags] |
{flag: value}}). `--common "FLAGS"` applies to every configuration. A configuration may not set what the harness
owns (the scenario, seed, run directory, steps and the evaluation: it must be the same for all).

Runs (bench/time_to_reward_runs.py): for each seed, the baseline first, then every other configuration; with
`--side-by-side` every configuration of a seed is built first and they train in turn, one RL step each, all for the
baseline's steps with evaluations at its steps (a wall-clock comparison on a shared machine: every configuration
meets the same load). All runs of a seed start from one
pretrained base model: each run directory's `base/` links to one cache (`--base-cache`, default `<out>/base`), so
pretraining happens once per seed (and per preset / pretraining settings, which key the cache). Each run drives
the public `Trainer` (train_step / evaluate) with a `ComputeCounter` attached to the policy, the frozen reference
copy when there is one, and any other model the trainer keeps ("auxiliary", e.g. an old policy) (profiling.counters:
DiT rows and LM tokens, forward and backward, counted by hooks); under its `watch()` an expert that is not attached
stops the run instead of going uncounted.

Compute: the x axis is DiT forward-equivalents (forwards + 2 x backwards, policy and reference together) for the
scenarios that draw, LM token-equivalents for the LM-only ones (`--unit` to choose). Training compute is every
forward and backward of the RL steps (rollout, reward-side inverse edits, reference, losses); evaluation runs in its
own counter section and is reported apart (eval_* columns), never as training compute. Wall-clock is the sum of the
RL steps' times (no pretraining, no evaluation); on a shared CPU it is noisy, the counts are not.

Schedule (fixed in compute, the same grid for every configuration of a seed): the baseline trains `--steps` steps
(default: its trainer config's) and is evaluated every ceil(steps / evals) steps: its per-seed compute at the end
is the budget, its evaluations' compute the grid. Every other configuration trains until its next step would pass
the budget (or `--max-steps`), and is evaluated after the first step at or past each grid point and at the end:
its last evaluation is at compute <= budget, so "at equal compute" never gives it more than the baseline had.
`--budget X` instead gives every run (baseline included) the budget X and the grid X k / evals.

Slow reward (`--reward-sleep S`): a reward service on 127.0.0.1 (bench/sleep_reward.py) that sleeps S seconds per
request (one request at a time unless --reward-workers) is added to every run as a reward term of weight 0 (the run
still trains on the world's reward, unchanged) and stops by itself when the harness is gone. The wall-clock table
gives each configuration's RL steps per hour (steps / the steps' own wall-clock) and its per-seed ratio to the
baseline's, and the held-out reward at the baseline's last step (equal steps).

Report (bench/time_to_reward_analysis.py has the definitions): per configuration and seed, compute, wall-clock and
steps to the target (default: the baseline's final held-out reward, mean over seeds), "not reached" when no
evaluation got there; per configuration mean +- sample std over seeds; the paired per-seed ratio to the
baseline's compute to target; the held-out reward at the baseline's budget minus the baseline's, with its standard
error over seeds and over held-out tasks. Files in --out: curves.csv (one row per evaluation per run, with the means
of the RL steps since the previous one: steps_reward, steps_useful_frac, steps_rollout_dit_rows), summary.csv
(per seed and per configuration), time_to_reward.png, report.md, runs.json (everything, per-task rewards included),
runs/ (the trainer's run directories) and base/ (the cache).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as a script: the checkout's bench package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, append_rows, env_columns  # noqa: E402
from bench.time_to_reward_analysis import format_table, plot_curves, summarize, wall_table  # noqa: E402
from bench.time_to_reward_runs import Schedule, attach_trainer, run_one, run_side_by_side  # noqa: E402,F401

# name -> trainer flags over the scenario's defaults. flow_grpo / grpo: the defaults themselves (Flow-GRPO on the
# DiT, GRPO on the LM where it trains); the others change one setting that moves the compute per step.
CONFIGS = {
    "flow_grpo": (),
    "grpo": (),
    "window1": ("--sde-window", "1"),
    "window2": ("--sde-window", "2"),
    "group4": ("--group-size", "4"),
    "steps6": ("--image-steps", "6"),
    # the forward-process algorithms (train.forward_rl) with their published settings: an ODE rollout of the
    # evaluation's image_steps and every timestep of the first 90 % of that schedule trained per sample
    "nft": ("--image-algo", "nft"),
    "awm": ("--image-algo", "awm"),
    # the same with a 4-step rollout and 2 trained timesteps per sample (what the world needs: see README)
    "nft_fast": ("--image-algo", "nft", "--rollout-steps", "4", "--fp-timesteps", "2"),
    "awm_fast": ("--image-algo", "awm", "--rollout-steps", "4", "--fp-timesteps", "2"),
    # the rollout scheduler (train.sampler): the window moved to step 3 and the group branched there (one ODE prefix
    # per prompt: DiT rows per group 3 + G (T - 3) instead of G T); the same with a 2-step window and the ODE tail
    # after it halved; MixGRPO's sliding window (every 5 RL steps one step later) branched at its start; the
    # second-order ODE solver alone (no compute change: what it does to learning)
    "branch3": ("--window-start", "3", "--branch-at", "3"),
    "branch3_fast": ("--window-start", "3", "--sde-window", "2", "--branch-at", "3", "--ode-tail", "0.5"),
    "slide": ("--window", "slide", "--window-every", "5", "--branch-at", "window"),
    "dpm2": ("--ode-solver", "dpm2"),
    # the step's pipeline (train.pipeline, train.offpolicy) against a slow reward (--reward-sleep): the serial step,
    # rewards scored while the next rollout chunk runs (the same numbers), and the rollout of step k + 1 made with
    # step k's weights while step k trains
    "serial": ("--reward-overlap", "off"),
    "overlap": ("--reward-overlap", "on"),
    "off_policy": ("--reward-overlap", "on", "--off-policy", "1"),
    # no branching: the window kept at the noisy start, 2 steps, and the ODE after it at half its steps, second order
    "window2_tail": ("--sde-window", "2", "--ode-solver", "dpm2", "--ode-tail", "0.5"),
}
# what the harness owns; a configuration may not set the evaluation either (--common may: it is the same for all)
HARNESS_OWNED = ("scenario", "seed", "run_dir", "steps", "eval_every", "save_every")
OWNED = (*HARNESS_OWNED, "eval_prompts", "eval_samples")
SMOKE_CONFIGS = {"generate": ("flow_grpo", "window1"), "understand": ("grpo", "group4")}
UNITS = {"dit": ("dit_fe", "DiT forward-equivalents (forward 1, backward 2)"),
         "lm": ("lm_te", "LM token-equivalents (forward 1, backward 2)")}


class _Raising(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def _trainer_parser():
    from unirl_fast.train.config import add_config_args

    p = _Raising(prog="trainer flags", add_help=False, allow_abbrev=False)  # a misspelt flag is an error
    add_config_args(p)
    return p


def parse_flags(what: str, flags, parser=None, owned=OWNED) -> argparse.Namespace:
    """Trainer flags (a configuration's, `what` names it) -> the namespace the trainer's CLI would build."""
    parser = parser or _trainer_parser()
    try:
        ns, extra = parser.parse_known_args(list(flags))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if extra:
        raise ValueError(f"{what}: unknown trainer flags {' '.join(extra)} (see unirl-fast train --help)")
    taken = [f"--{k.replace('_', '-')}" for k in owned if getattr(ns, k, None) is not None]
    if taken:
        raise ValueError(f"{what} sets {', '.join(taken)}, which the harness owns (the same for every "
                         "configuration); use the harness's options (--scenario, --seeds, --steps, --common)")
    return ns


def config_specs(args) -> dict:
    """name -> trainer flags of the requested configurations (the baseline included, first)."""
    specs = {}
    if args.configs_file:
        specs.update(_read_configs_file(args.configs_file))
    for item in args.config or []:
        name, eq, flags = item.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"--config {item!r}: no name (NAME or NAME=--flag value ...)")
        if eq:
            specs[name] = tuple(shlex.split(flags))
        elif name in CONFIGS:
            specs[name] = CONFIGS[name]
        elif name not in specs:
            raise ValueError(f"unknown configuration {name!r}: known {', '.join(CONFIGS)} (or define it: "
                             f"--config '{name}=--flag value ...')")
    if not args.config and not args.configs_file:
        specs = {n: CONFIGS[n] for n in SMOKE_CONFIGS.get(args.scenario, SMOKE_CONFIGS["generate"])}
    if args.baseline not in specs:
        if args.baseline not in CONFIGS:
            raise ValueError(f"baseline {args.baseline!r} is neither a requested nor a known configuration")
        specs = {args.baseline: CONFIGS[args.baseline], **specs}
    if len(specs) < 2:
        raise ValueError(f"nothing to compare: only {', '.join(specs)}; add --config NAME")
    return {args.baseline: specs.pop(args.baseline), **specs}


def _read_configs_file(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"configs file {str(path)!r} does not exist")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(p.read_text())
    else:
        data = json.loads(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"configs file {str(path)!r} must map names to flags, got {type(data).__name__}")
    out = {}
    for name, v in data.items():
        if isinstance(v, str):
            out[str(name)] = tuple(shlex.split(v))
        elif isinstance(v, list):
            out[str(name)] = tuple(str(x) for x in v)
        elif isinstance(v, dict):
            out[str(name)] = tuple(a for k, val in v.items() for a in _flag(k, val))
        else:
            raise ValueError(f"configs file {str(path)!r}: {name!r} must be a flag string, a list or a mapping")
    return out


def _flag(key, value) -> list:
    flag = "--" + str(key).replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


def run_config(base_flags, flags, seed, run_dir, steps, name):
    """The TrainConfig of one run: trainer defaults < --common < the configuration < what the harness owns (steps:
    None keeps the trainer config's)."""
    from unirl_fast.train.config import config_from_args

    owned = ["--seed", str(seed), "--run-dir", str(run_dir), "--eval-every", str(10 ** 9), "--save-every",
             str(10 ** 9)] + (["--steps", str(steps)] if steps is not None else [])
    ns = _trainer_parser().parse_known_args([*base_flags, *flags, *owned])[0]
    try:
        return config_from_args(ns)
    except ValueError as e:
        raise ValueError(f"config {name!r}: {e}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="unirl-fast bench --time-to-reward", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--scenario", default="generate", help="the scenario every configuration trains (default generate)")
    p.add_argument("--config", action="append", metavar="NAME[=FLAGS]",
                   help="a configuration: a known name (--list) or NAME='--flag value ...'; repeatable")
    p.add_argument("--configs-file", default=None, help="YAML / JSON: {name: flags string | list | {flag: value}}")
    p.add_argument("--baseline", default=None, help="the configuration the others are paired with (default: flow_grpo "
                   "for scenarios that draw, grpo for LM-only ones; added when not requested)")
    p.add_argument("--common", default="", metavar="FLAGS", help="trainer flags for every configuration")
    p.add_argument("--trainer-config", default=None, help="trainer preset under every configuration (default tiny; "
                   "smoke with --smoke)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --smoke)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="the baseline's RL steps (default: its trainer config's)")
    p.add_argument("--budget", type=float, default=None, help="compute budget of every run in the unit (default: the "
                   "baseline's compute at --steps, per seed)")
    p.add_argument("--max-steps", type=int, default=None, help="step cap of a budgeted run (default 10 x the "
                   "baseline's steps)")
    p.add_argument("--evals", type=int, default=None, help="evaluations per run after the base one (default 8; 2 with "
                   "--smoke)")
    p.add_argument("--target", type=float, default=None, help="held-out reward target (default: the baseline's final, "
                   "mean over seeds)")
    p.add_argument("--unit", choices=("auto", *UNITS), default="auto", help="x axis: dit (DiT forward-equivalents; "
                   "auto for scenarios that draw) or lm (LM token-equivalents; auto for LM-only ones)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/time_to_reward-SCENARIO-TIME)")
    p.add_argument("--base-cache", default=None, help="pretrained base models, shared by the runs (default <out>/base)")
    p.add_argument("--resume", action="store_true", help="keep the finished runs of --out's runs.json (same "
                   "settings) and run the missing ones: an interrupted comparison, or new configurations or seeds "
                   "against runs already made")
    p.add_argument("--smoke", action="store_true", help="seconds: smoke trainer preset, 1 seed, 2 configurations")
    p.add_argument("--list", action="store_true", help="print the known configurations and exit")
    p.add_argument("--verbose", action="store_true", help="print the trainer's own log lines too")
    p.add_argument("--reward-sleep", type=float, default=None, metavar="SECONDS", help="add a reward service on "
                   "127.0.0.1 that sleeps this long per request (weight 0: the reward is unchanged) to every run")
    p.add_argument("--reward-workers", type=int, default=1, help="requests that service answers at once (default 1)")
    p.add_argument("--side-by-side", action="store_true", help="train a seed's configurations in turn, one step each, "
                   "all for the baseline's steps (wall-clock comparisons on a shared machine)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="report together the runs of several result folders (e.g. seeds run as parallel processes "
                   "with --first-seed / --seeds 1 and one --base-cache): their settings must match; writes --out")
    args = p.parse_args(argv)
    args.trainer_config = args.trainer_config or ("smoke" if args.smoke else "tiny")
    args.seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 3)
    args.evals = args.evals if args.evals is not None else (2 if args.smoke else 8)
    for name in ("seeds", "evals", "steps", "max_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.resume and not args.out:
        raise ValueError("--resume needs --out (the folder whose runs to keep)")
    if args.budget is not None and not args.budget > 0:
        raise ValueError(f"--budget must be > 0, got {args.budget}")
    if args.reward_sleep is not None and not args.reward_sleep >= 0:
        raise ValueError(f"--reward-sleep must be >= 0 seconds, got {args.reward_sleep}")
    if args.reward_workers < 1:
        raise ValueError(f"--reward-workers must be >= 1, got {args.reward_workers}")
    if args.side_by_side and args.budget is not None:
        raise ValueError("--side-by-side trains every configuration for the baseline's steps: no --budget")
    return args


def _unit(args) -> tuple:
    from unirl_fast.train import get_scenario

    unit = args.unit if args.unit != "auto" else ("dit" if get_scenario(args.scenario).draws else "lm")
    return UNITS[unit]


def plan(args) -> dict:
    """Every run's TrainConfig, checked (trainer preflight included) before any work; and the schedule's numbers."""
    from unirl_fast.train import get_scenario, preflight

    get_scenario(args.scenario)  # an unknown scenario fails here, naming the valid ones
    if args.baseline is None:
        args.baseline = "flow_grpo" if get_scenario(args.scenario).draws else "grpo"
    specs = config_specs(args)
    parser = _trainer_parser()
    common = shlex.split(args.common)
    parse_flags("--common", common, parser, owned=HARNESS_OWNED)
    for name, flags in specs.items():
        parse_flags(f"config {name!r}", flags, parser)
    base_flags = ["--config", args.trainer_config, "--scenario", args.scenario, *common]
    if args.reward_sleep is not None:
        sets = [f"config {n!r}" for n, f in specs.items() if parser.parse_known_args(list(f))[0].reward] + \
            (["--common"] if parser.parse_known_args(common)[0].reward else [])
        if sets:
            raise ValueError(f"--reward-sleep adds its service to the world's reward; {', '.join(sets)} sets --reward")
        if getattr(args, "reward_url", None):  # the service is up (main): every run gets it, at weight 0
            base_flags += ["--reward", "world", "--reward", f"{args.reward_url}=0"]
    out = Path(args.out) if args.out else RESULTS_DIR / (
        f"time_to_reward-{args.scenario}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
        + ("-smoke" if args.smoke else ""))
    if not args.resume and ((out / "runs").exists() or (out / "curves.csv").exists()):
        raise ValueError(f"{out} already holds results: choose another --out, or --resume to keep its runs and run "
                         f"the missing ones (reuse pretrained bases with --base-cache {out / 'base'})")
    steps = args.steps or run_config(base_flags, specs[args.baseline], 0, out / "probe", None, args.baseline).steps
    p = {"specs": specs, "out": out, "steps": steps, "max_steps": args.max_steps or 10 * steps, "cfgs": {},
         "base_flags": base_flags, "done": []}
    if args.resume:
        p["done"] = _kept_runs(out, _settings(args, p, _unit(args)[0]), specs)
        p["specs"] = specs = {**{r["config"]: tuple(r["flags"]) for r in p["done"]}, **specs}
    done = {(r["config"], r["seed"]) for r in p["done"]}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, flags in specs.items():
            if (name, seed) in done:
                continue
            own = steps if (name == args.baseline or args.side_by_side) and args.budget is None else p["max_steps"]
            cfg = run_config(base_flags, flags, seed, out / "runs" / f"{name}-seed{seed}", own, name)
            preflight(cfg)
            p["cfgs"][name, seed] = cfg
    return p


UNSET = {"reward_workers": 1, "side_by_side": False}  # what results made before these settings ran with
COMPARISON = ("scenario", "baseline", "trainer_config", "common", "baseline_steps", "budget", "max_steps", "evals",
              "unit", "reward_sleep", "reward_workers", "side_by_side")


def _kept_runs(out: Path, settings: dict, specs: dict) -> list:
    """--resume: the finished runs of out/runs.json, if they were made with these settings (the same flags for the
    configurations named in both)."""
    path = out / "runs.json"
    if not path.is_file():
        raise ValueError(f"--resume: {path} does not exist (nothing to keep)")
    old = json.loads(path.read_text())
    diff = [f"{k} {old['settings'].get(k, UNSET.get(k))!r} -> {settings[k]!r}" for k in COMPARISON
            if old["settings"].get(k, UNSET.get(k)) != settings[k]]
    diff += [f"config {r['config']!r} flags {r['flags']} -> {list(specs[r['config']])}" for r in old["runs"]
             if r["config"] in specs and list(specs[r["config"]]) != r["flags"]]
    if diff:
        raise ValueError(f"--resume: {path} was made with other settings: {'; '.join(dict.fromkeys(diff))}")
    return old["runs"]


def _schedule(args, p, name, baseline_points) -> Schedule:
    if args.budget is not None:
        return Schedule(grid=tuple(args.budget * k / args.evals for k in range(1, args.evals + 1)),
                        budget=args.budget, max_steps=p["max_steps"])
    if name == args.baseline:
        return Schedule(steps=p["steps"], every=max(1, math.ceil(p["steps"] / args.evals)))
    return Schedule(grid=tuple(q["x"] for q in baseline_points[1:]), budget=baseline_points[-1]["x"],
                    max_steps=p["max_steps"])


def _link_base(run_dir: Path, cache: Path):
    """The run directory's base/ -> the shared cache: pretraining once per seed (and pretraining settings). A run
    directory left by an interrupted run (never recorded in runs.json) is started afresh."""
    import shutil

    if run_dir.exists():
        print(f"  {run_dir}: left by an interrupted run, removed (its run is redone from step 0)")
        shutil.rmtree(run_dir)
    cache.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "base").symlink_to(cache.resolve(), target_is_directory=True)


def merge(args) -> dict:
    """One report from the runs.json of several result folders run with the same settings (other seeds)."""
    loads = []
    for d in args.merge:
        path = Path(d) / "runs.json"
        if not path.is_file():
            raise ValueError(f"--merge {d}: no runs.json (not a time-to-reward result folder, or still running)")
        loads.append(json.loads(path.read_text()))
    same = ("scenario", "baseline", "configs", "trainer_config", "common", "baseline_steps", "budget", "evals", "unit",
            "reward_sleep", "reward_workers", "side_by_side")
    first = loads[0]["settings"]
    for d, ld in zip(args.merge[1:], loads[1:]):
        diff = [k for k in same if ld["settings"].get(k, UNSET.get(k)) != first.get(k, UNSET.get(k))]
        if diff:
            raise ValueError(f"--merge {d}: settings {diff} differ from {args.merge[0]}'s")
    runs = [r for ld in loads for r in ld["runs"]]
    seen = [(r["config"], r["seed"]) for r in runs]
    if len(set(seen)) != len(seen):
        raise ValueError("--merge: a configuration and seed appear in two folders")
    if args.out is None:
        raise ValueError("--merge needs --out (the folder of the combined report)")
    out = Path(args.out)
    if (out / "curves.csv").exists():
        raise ValueError(f"{out} already holds results: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for k in ("scenario", "baseline", "trainer_config", "common", "budget", "evals", "reward_sleep", "side_by_side"):
        setattr(args, k, first.get(k))
    args.seeds = len({r["seed"] for r in runs})
    p = {"steps": first["baseline_steps"], "specs": {k: tuple(v) for k, v in first["configs"].items()}}
    unit_key = first["unit"]
    xlabel = next(label for key, label in UNITS.values() if key == unit_key)
    (out / "runs.json").write_text(json.dumps({"settings": {**first, "seeds": args.seeds, "merged": args.merge},
                                               "runs": runs}))
    return write_outputs(out, runs, args, p, unit_key, xlabel)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    if args.list:
        for name, flags in CONFIGS.items():
            print(f"{name:12s} {' '.join(flags) or '(the scenario defaults)'}")
        return {}
    service = None
    try:
        if args.reward_sleep is not None:  # up before the plan: the trainers' preflight asks it GET /health
            from bench.sleep_reward import start

            service, port = start(args.reward_sleep, workers=args.reward_workers)
            args.reward_url = f"http://127.0.0.1:{port}/sleep"
        p = plan(args)
        unit_key, xlabel = _unit(args)
        runs = _run_all(args, p, unit_key)
    finally:
        if service is not None:
            service.terminate()
            service.wait()
    return write_outputs(p["out"], runs, args, p, unit_key, xlabel)


def _run_all(args, p, unit_key) -> list:
    """Every planned run (seed-major, the baseline first in each seed), runs.json rewritten after each."""
    out, cache = p["out"], Path(args.base_cache) if args.base_cache else p["out"] / "base"
    runs = list(p["done"])
    if runs:
        print(f"kept {len(runs)} finished runs of {out / 'runs.json'}")
    env = {k: v for k, v in env_columns().items() if k in ("device", "torch", "commit", "date")}
    log = print if args.verbose else None
    for seed in dict.fromkeys(seed for _, seed in p["cfgs"]):
        todo = {name: cfg for (name, s), cfg in p["cfgs"].items() if s == seed}
        for cfg in todo.values():
            _link_base(Path(cfg.run_dir), cache)
        if args.side_by_side:
            every = max(1, math.ceil(p["steps"] / args.evals))
            print(f"[seed {seed}] side by side: {', '.join(todo)}", flush=True)
            done = run_side_by_side({n: (c, Schedule(steps=p["steps"], every=every)) for n, c in todo.items()},
                                    unit_key, trainer_log=log)
        else:
            done = {}
            for name, cfg in todo.items():
                print(f"[{name} seed {seed}] {' '.join(p['specs'][name]) or '(defaults)'}", flush=True)
                base = next((r["points"] for r in runs if r["config"] == args.baseline and r["seed"] == seed), None)
                done[name] = run_one(cfg, _schedule(args, p, name, base), unit_key,
                                     trainer_log=log)
                runs.append({"config": name, "seed": seed, "flags": list(p["specs"][name]), "env": env,
                             "points": done[name]})
                (out / "runs.json").write_text(json.dumps({"settings": _settings(args, p, unit_key), "runs": runs}))
            continue
        runs += [{"config": n, "seed": seed, "flags": list(p["specs"][n]), "env": env, "points": pts}
                 for n, pts in done.items()]
        (out / "runs.json").write_text(json.dumps({"settings": _settings(args, p, unit_key), "runs": runs}))
    return runs


def _settings(args, p, unit_key) -> dict:
    return {"scenario": args.scenario, "baseline": args.baseline,
            "configs": {k: list(v) for k, v in p["specs"].items()}, "trainer_config": args.trainer_config,
            "common": args.common, "seeds": args.seeds,
            "first_seed": args.first_seed, "baseline_steps": p["steps"], "budget": args.budget,
            "max_steps": p["max_steps"], "evals": args.evals, "unit": unit_key, "reward_sleep": args.reward_sleep,
            "reward_workers": args.reward_workers, "side_by_side": args.side_by_side, **env_columns()}


def write_outputs(out: Path, runs, args, p, unit_key, xlabel) -> dict:
    target, per_seed, per_config = summarize(runs, args.baseline, args.target)
    env = env_columns()
    curves = [{"config": r["config"], "seed": r["seed"], "eval": i, **{k: v for k, v in pt.items()
                                                                     if k != "task_rewards"}}
              for r in runs for i, pt in enumerate(r["points"])]
    for name in ("curves.csv", "summary.csv"):  # written whole from runs.json's runs (a --resume rewrites them)
        (out / name).unlink(missing_ok=True)
    append_rows("curves.csv", curves, out)
    append_rows("summary.csv", [{k: v for k, v in r.items() if not k.startswith("_")} | {"unit": unit_key, **env}
                                for r in per_seed + per_config], out)
    n = len({r["seed"] for r in runs})
    title = f"{args.scenario}: held-out reward vs training compute, {n} seed{'s' if n > 1 else ''} (band: min-max)"
    plot_curves(runs, target, xlabel, out / "time_to_reward.png", title)
    table = format_table(per_seed, per_config, unit_key) + "\n\n" + wall_table(per_seed, per_config, args.baseline)
    how = "given (--target)" if args.target is not None else \
        f"the final held-out reward of {args.baseline!r} at its budget, mean over {n} seed{'s' if n > 1 else ''}"
    commits = list(dict.fromkeys(r.get("env", {}).get("commit", "unrecorded") for r in runs))
    budgets = ", ".join(f"s{r['seed']}: {r['points'][-1]['x']}" for r in runs if r["config"] == args.baseline)
    text = "\n".join([
        f"# Time to reward: {args.scenario}", "",
        f"Target {target:.4f}: {how}. x: {xlabel} (`{unit_key}`), training only (evaluation counted apart). Budget: "
        + (f"{args.budget:g} for every run" if args.budget is not None else
           f"the baseline's compute at {p['steps']} steps ({budgets})") + f"; {args.evals} evaluations per run.",
        f"Trainer preset `{args.trainer_config}`" + (f", common flags `{args.common}`" if args.common else "")
        + f"; device {env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}"
        + (f" (runs made at commits {', '.join(commits)})" if commits != [env["commit"]] else "")
        + ". Wall-clock: the RL steps only, on a shared machine: noisy; the counts are exact"
        + ("; the configurations of a seed trained side by side (one step each in turn, the same load)"
           if args.side_by_side else "; the runs one after another (the machine's load may differ between them)")
        + (f". Reward: the world's plus a loopback service sleeping {args.reward_sleep:g} s per request (weight 0, "
           f"{args.reward_workers} at once)" if args.reward_sleep is not None else "") + ".", "",
        "Configurations: " + "; ".join(f"`{k}`: `{' '.join(v) or '(defaults)'}`" for k, v in p["specs"].items()),
        "", table, ""])
    (out / "report.md").write_text(text)
    print("\n" + text + f"\nresults: {out}")
    return {"out_dir": out, "target": target, "per_seed": per_seed, "per_config": per_config, "runs": runs}


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"time_to_reward: {e}", file=sys.stderr)
        sys.exit(2)
