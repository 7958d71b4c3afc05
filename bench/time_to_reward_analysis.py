"""The arithmetic of the time-to-reward harness (bench/time_to_reward.py) on recorded curves: no training here.

A run is {"config", "seed", "points": [...]}; a point is one held-out evaluation with the cumulative training
compute before it: {"step", "x" (compute in the harness's unit), "wall_s", "eval_reward", "task_rewards" (one
per held-out task, optional)}, in the order they were taken (x non-decreasing). Definitions:

- target: given, or the baseline's final held-out reward (its last evaluation, at its budget), mean over seeds.
- reaching the target: the first evaluation with eval_reward >= target; its x, wall-clock and step are the
  compute, time and steps to the target. A run none of whose evaluations reaches it is "not reached": no number
  is made up (an evaluation grid only bounds the crossing from above: the true crossing is at or before it).
- reward at compute x: the latest evaluation taken at compute <= x (what the run had reached by then; None when
  none was).
- paired comparison with the baseline, per seed (both runs start from the same base model and are evaluated on
  the same held-out tasks from the same noise): the ratio of compute (and wall-clock) to the target when both
  reached it; when only the configuration did, the baseline needed more than its whole budget, so
  x_config / budget is an upper bound on the ratio (`x_ratio_upper`); and the held-out reward at the baseline's
  budget (equal compute) minus the baseline's final one. Over seeds: mean and sample standard deviation (the
  spread; none for one seed), the paired difference's standard error over seeds, and over all held-out tasks of
  all seeds (per-task differences d, se = std(d) / sqrt(n), z = mean(d) / se, as the learning tests do).
- wall-clock: steps per hour = 3600 x steps / the RL steps' wall-clock at the run's last evaluation; the speed ratio
  is a run's steps per hour over the baseline's of the same seed (> 1: faster); the held-out reward at equal steps
  is the latest evaluation at or before the baseline's last step, paired with the baseline's final one.
"""
from __future__ import annotations

import math

NOT_REACHED = "not reached"


ROUND_OFF = 1e-9  # a reward equal to the target up to the round-off of a mean over seeds reaches it


def first_reach(points: list, target: float):
    """The first evaluation with held-out reward >= target, or None."""
    return next((p for p in points if p["eval_reward"] >= target - ROUND_OFF), None)


def reward_at(points: list, x: float):
    """The latest evaluation taken at compute <= x (None when none was)."""
    before = [p for p in points if p["x"] <= x]
    return before[-1] if before else None


def mean_std(values: list):
    """(mean, sample std) of a list; std None for fewer than 2 values; (None, None) when empty."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def default_target(runs: list, baseline: str) -> float:
    """The baseline's final held-out reward, mean over its seeds."""
    finals = [r["points"][-1]["eval_reward"] for r in runs if r["config"] == baseline]
    if not finals:
        raise ValueError(f"no run of the baseline {baseline!r} to take the target from")
    return sum(finals) / len(finals)


def _ratio(a, b):
    return a / b if a is not None and b else None


def seed_row(run: dict, base: dict, target: float) -> dict:
    """One configuration's run against the baseline's run of the same seed."""
    pts, bpts = run["points"], base["points"]
    hit, bhit = first_reach(pts, target), first_reach(bpts, target)
    budget = bpts[-1]["x"]
    eq, bfinal = reward_at(pts, budget), bpts[-1]
    row = {"config": run["config"], "seed": run["seed"], "steps": pts[-1]["step"], "final_x": pts[-1]["x"],
           "final_reward": pts[-1]["eval_reward"], "target": target, "reached": hit is not None,
           "x_to_target": hit["x"] if hit else None, "wall_to_target_s": hit["wall_s"] if hit else None,
           "steps_to_target": hit["step"] if hit else None, "x_ratio": None, "x_ratio_upper": None,
           "wall_ratio": None, "equal_x": budget, "reward_at_equal_x": eq["eval_reward"] if eq else None,
           "diff_vs_baseline": eq["eval_reward"] - bfinal["eval_reward"] if eq else None}
    if hit and bhit:
        row["x_ratio"] = _ratio(hit["x"], bhit["x"])
        row["wall_ratio"] = _ratio(hit["wall_s"], bhit["wall_s"])
    elif hit:
        row["x_ratio_upper"] = _ratio(hit["x"], budget)
    row["_task_diffs"] = _task_diffs(eq, bfinal)
    row["steps_per_hour"], base_rate = _rate(pts[-1]), _rate(bfinal)
    row["speed_ratio"] = _ratio(row["steps_per_hour"], base_rate)
    at = ([p for p in pts if p["step"] <= bfinal["step"]] or [None])[-1]
    row["reward_at_equal_steps"] = at["eval_reward"] if at else None
    row["diff_at_equal_steps"] = at["eval_reward"] - bfinal["eval_reward"] if at else None
    row["_step_diffs"] = _task_diffs(at, bfinal)
    row.update(time_shares(pts))
    row["bitwise"] = _bitwise(pts, bpts)
    return row


_ROLLOUT_PHASES = ("text_rollout", "image_rollout", "cycle_edit")


def time_shares(points) -> dict:
    """Over a run's RL steps (the evaluation points' step means, weighted by their steps): seconds per step, and the
    shares of the step's time spent inside the reward calls (on any thread: they may overlap the rest), waiting for
    scores (phase "reward") and rolling out on the step's own thread. None without the times (older runs.json)."""
    sums, prev = {}, 0
    for p in points:
        n, prev = p["step"] - prev, p["step"]
        for k in ("step_ms", "reward_call_ms", "phase/reward_ms", *(f"phase/{r}_ms" for r in _ROLLOUT_PHASES)):
            if n and p.get(f"steps_{k}") is not None:
                sums[k] = sums.get(k, 0.0) + n * p[f"steps_{k}"]
    step = sums.get("step_ms")
    if not step:
        return dict.fromkeys(("step_s", "reward_call_share", "reward_wait_share", "rollout_share"))
    return {"step_s": step / 1e3 / prev, "reward_call_share": sums.get("reward_call_ms", 0.0) / step,
            "reward_wait_share": sums.get("phase/reward_ms", 0.0) / step,
            "rollout_share": sum(sums.get(f"phase/{r}_ms", 0.0) for r in _ROLLOUT_PHASES) / step}


def _bitwise(pts, bpts):
    """Whether the run's policy weights and step records are bit for bit the baseline's at every evaluation step
    both have (None without the digests)."""
    base = {p["step"]: p for p in bpts}
    pairs = [(p, base[p["step"]]) for p in pts if p["step"] in base and p["step"] > 0]
    if not pairs or any(q.get("weights_sha1") is None for pair in pairs for q in pair):
        return None
    return all(p["weights_sha1"] == q["weights_sha1"] and p["steps_sha1"] == q["steps_sha1"] for p, q in pairs)


def _rate(point):
    """RL steps per hour up to an evaluation point (None before any step or without a clock)."""
    return 3600.0 * point["step"] / point["wall_s"] if point["step"] and point.get("wall_s") else None


def _task_diffs(p, q) -> list:
    if p is None or not p.get("task_rewards") or not q.get("task_rewards"):
        return []
    if len(p["task_rewards"]) != len(q["task_rewards"]):
        raise ValueError(f"held-out sets differ in size ({len(p['task_rewards'])} vs {len(q['task_rewards'])}): "
                         "the runs were not evaluated on the same tasks")
    return [a - b for a, b in zip(p["task_rewards"], q["task_rewards"])]


def aggregate_row(rows: list) -> dict:
    """One configuration over its seeds (rows from `seed_row`)."""
    n = len(rows)
    reached = [r for r in rows if r["reached"]]
    out = {"config": rows[0]["config"], "seed": "all", "n_seeds": n, "n_reached": len(reached),
           "target": rows[0]["target"]}
    for key in ("x_to_target", "wall_to_target_s", "steps_to_target"):  # defined only when every seed got there
        m, s = mean_std([r[key] for r in rows]) if len(reached) == n else (None, None)
        out[f"{key}_mean"], out[f"{key}_std"] = m, s
    for key in ("x_ratio", "wall_ratio", "final_reward", "final_x", "reward_at_equal_x", "steps_per_hour",
                "speed_ratio", "reward_at_equal_steps", "step_s", "reward_call_share", "reward_wait_share",
                "rollout_share"):
        vals = [r[key] for r in rows if r[key] is not None]
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std(vals)
        out[f"{key}_n"] = len(vals)
    known = [r["bitwise"] for r in rows if r["bitwise"] is not None]
    out["bitwise"] = f"{sum(known)}/{len(known)}" if known else None  # seeds bitwise equal to the baseline
    diffs = [r["diff_vs_baseline"] for r in rows if r["diff_vs_baseline"] is not None]
    m, s = mean_std(diffs)
    out["diff_mean"], out["diff_se_seeds"] = m, (s / math.sqrt(len(diffs)) if s is not None else None)
    tasks = [d for r in rows for d in r["_task_diffs"]]
    tm, ts = mean_std(tasks)
    se = ts / math.sqrt(len(tasks)) if ts is not None else None
    out["diff_se_tasks"], out["diff_n_tasks"] = se, len(tasks)
    out["diff_z_tasks"] = tm / se if se else None
    steps = [r["diff_at_equal_steps"] for r in rows if r["diff_at_equal_steps"] is not None]
    m, s = mean_std(steps)
    out["step_diff_mean"], out["step_diff_se_seeds"] = m, (s / math.sqrt(len(steps)) if s is not None else None)
    tm, ts = mean_std([d for r in rows for d in r["_step_diffs"]])
    n = sum(len(r["_step_diffs"]) for r in rows)
    out["step_diff_se_tasks"] = ts / math.sqrt(n) if ts is not None else None
    out["step_diff_z_tasks"] = tm / out["step_diff_se_tasks"] if out["step_diff_se_tasks"] else None
    return out


def summarize(runs: list, baseline: str, target: float | None = None) -> tuple:
    """(target, per-seed rows, per-configuration rows). Every configuration's seeds must include the baseline's."""
    target = default_target(runs, baseline) if target is None else target
    base = {r["seed"]: r for r in runs if r["config"] == baseline}
    configs = list(dict.fromkeys(r["config"] for r in runs))
    per_seed, per_config = [], []
    for name in configs:
        rows = []
        for run in (r for r in runs if r["config"] == name):
            if run["seed"] not in base:
                raise ValueError(f"config {name!r} has seed {run['seed']} but the baseline {baseline!r} has no run "
                                 "of that seed to pair it with")
            rows.append(seed_row(run, base[run["seed"]], target))
        per_seed += rows
        per_config.append(aggregate_row(rows))
    return target, per_seed, per_config


def _num(v) -> str:
    """Compute counts in full (no exponent), smaller values to 4 significant digits."""
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _pm(m, s, fmt=None):
    """mean ± spread; fmt formats both (default `_num`); a leading + in fmt signs the mean only."""
    if m is None:
        return "-"
    show = _num if fmt is None else fmt.format
    spread = _num if fmt is None else fmt.replace("+", "").format
    return show(m) + ("" if s is None else " ± " + spread(s))


def format_table(per_seed: list, per_config: list, unit: str) -> str:
    """A markdown table: one line per configuration, the per-seed values of compute to target listed."""
    head = (f"| config | reached | {unit} to target (mean ± std) | per seed | wall-clock s to target | "
            f"{unit} ratio vs baseline (per seed) | final held-out reward | at equal {unit}: paired diff "
            "(± se seeds; se, z over tasks) |")
    lines = [head, "|" + "---|" * 8]
    for agg in per_config:
        rows = [r for r in per_seed if r["config"] == agg["config"]]
        seeds = ", ".join(f"s{r['seed']}: " + (_num(r["x_to_target"]) if r["reached"] else NOT_REACHED)
                          for r in rows)
        ratios = ", ".join(f"{r['x_ratio']:.3g}" if r["x_ratio"] is not None else
                           f"< {r['x_ratio_upper']:.3g}" if r["x_ratio_upper"] is not None else "-" for r in rows)
        full = agg["n_reached"] == agg["n_seeds"]
        to_target = _pm(agg["x_to_target_mean"], agg["x_to_target_std"]) if full else \
            f"{NOT_REACHED} ({agg['n_seeds'] - agg['n_reached']} of {agg['n_seeds']} seeds)"
        wall = _pm(agg["wall_to_target_s_mean"], agg["wall_to_target_s_std"], "{:.1f}") if full else NOT_REACHED
        diff = _pm(agg["diff_mean"], agg["diff_se_seeds"], "{:+.3f}")
        if agg["diff_se_tasks"]:
            diff += f" (se {agg['diff_se_tasks']:.3f}, z {agg['diff_z_tasks']:+.2f}, n {agg['diff_n_tasks']})"
        lines.append(f"| {agg['config']} | {agg['n_reached']}/{agg['n_seeds']} | {to_target} | {seeds} | {wall} | "
                     f"{ratios} | {_pm(agg['final_reward_mean'], agg['final_reward_std'], '{:.3f}')} | {diff} |")
    return "\n".join(lines)


def wall_table(per_seed: list, per_config: list, baseline: str) -> str:
    """A markdown table of the wall-clock columns: RL steps per hour, the per-seed speed ratio to the baseline, and
    the held-out reward at the baseline's last step paired with the baseline's."""
    lines = [f"| config | RL steps per hour (mean ± std) | per seed | speed vs {baseline} (per seed) | mean speed "
             "ratio | s/step | in reward calls / waiting for scores / rolling out (share of the step) | bitwise = "
             f"{baseline} (seeds) | held-out reward at equal steps | paired diff at equal steps (± se seeds; se, z "
             "over tasks) |", "|" + "---|" * 10]
    for agg in per_config:
        rows = [r for r in per_seed if r["config"] == agg["config"]]
        seeds = ", ".join(f"s{r['seed']}: " + (f"{r['steps_per_hour']:.0f}" if r["steps_per_hour"] else "-")
                          for r in rows)
        ratios = ", ".join(f"{r['speed_ratio']:.2f}" if r["speed_ratio"] else "-" for r in rows)
        diff = _pm(agg["step_diff_mean"], agg["step_diff_se_seeds"], "{:+.3f}")
        shares = " / ".join("-" if agg[f"{k}_share_mean"] is None else f"{agg[f'{k}_share_mean']:.0%}"
                            for k in ("reward_call", "reward_wait", "rollout"))
        if agg["step_diff_se_tasks"]:
            diff += f" (se {agg['step_diff_se_tasks']:.3f}, z {agg['step_diff_z_tasks']:+.2f})"
        lines.append(f"| {agg['config']} | {_pm(agg['steps_per_hour_mean'], agg['steps_per_hour_std'], '{:.0f}')} | "
                     f"{seeds} | {ratios} | {_pm(agg['speed_ratio_mean'], agg['speed_ratio_std'], '{:.2f}')} | "
                     f"{_pm(agg['step_s_mean'], agg['step_s_std'], '{:.2f}')} | {shares} | {agg['bitwise'] or '-'} | "
                     f"{_pm(agg['reward_at_equal_steps_mean'], agg['reward_at_equal_steps_std'], '{:.3f}')} | "
                     f"{diff} |")
    return "\n".join(lines)


def plot_curves(runs: list, target: float, xlabel: str, path, title: str) -> None:
    """Held-out reward vs compute: one line per configuration (the mean over seeds of each seed's reward at x),
    the band between the seeds' lowest and highest, each seed's evaluations as faint dots, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["config"] for r in runs):
        mine = [r["points"] for r in runs if r["config"] == name]
        grid = sorted({p["x"] for pts in mine for p in pts if p["x"] <= min(q[-1]["x"] for q in mine)})
        at = [[reward_at(pts, x)["eval_reward"] for pts in mine] for x in grid]
        line, = ax.plot(grid, [sum(v) / len(v) for v in at], "-", drawstyle="steps-post",
                        label=f"{name} ({len(mine)} seed{'s' if len(mine) > 1 else ''})")
        ax.fill_between(grid, [min(v) for v in at], [max(v) for v in at], step="post", alpha=0.2,
                        color=line.get_color())
        for pts in mine:
            ax.plot([p["x"] for p in pts], [p["eval_reward"] for p in pts], ".", alpha=0.35, color=line.get_color())
    ax.axhline(target, linestyle="--", color="grey", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out reward")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
