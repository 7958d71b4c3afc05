"""The training rollout's sampler, step by step: where the SDE window sits, where the group branches, which ODE
solver runs, and the checks that refuse a combination before any work.

Per RL step n the image rollout is an `ImageSamplingParams` (`train_params(cfg, n)`):
- flow_grpo: SDE steps only in the window [s_n, s_n + sde_window), s_n from `--window` (rollout.schedule.
  window_start_at: fixed, MixGRPO's slide, or random); those are the trained steps, everything else is ODE.
- nft / awm: the ODE (they train on the clean samples, not on the steps); with `--branch-at K` step K is made
  stochastic (`--sde-type`, `--noise-level`; its log-prob is not used) so that the branches of one prefix differ.
- `--branch-at K` (or `window`: K = s_n): the first K steps run once per prompt and the group's samples branch at
  step K (ImageEngine.sample's branches). Cost per group of G: K + G (T - K) DiT rows instead of G T. The prefix
  before a flow_grpo window is ODE, so branching at the window start gives the same trajectories as shared initial
  noise (`--group-noise`) without the G - 1 repeated prefixes; below the window start the branches still repeat
  identical ODE steps from K to the window.
- `--ode-solver dpm2`: DPM-Solver++(2M) on the ODE steps (same DiT calls, second order); `--ode-tail r` re-spaces the
  ODE steps after the last stochastic one into fewer (MixGRPO-Flash). Evaluation keeps Euler at --image-steps, so
  held-out rewards compare across these settings.
"""
from __future__ import annotations

from ..rollout import ImageSamplingParams
from ..rollout.schedule import window_start_at


def window_last(cfg) -> int:
    """The latest window start of a slide / random schedule (default: the last one that fits)."""
    return cfg.window_last if cfg.window_last is not None else cfg.train_rollout_steps - cfg.sde_window


def window_at(cfg, step: int) -> int:
    """The SDE window's first sampler step at RL step `step` (0-based)."""
    return window_start_at(cfg.window, step, start=cfg.window_start, last=window_last(cfg), every=cfg.window_every,
                           stride=cfg.window_stride, seed=cfg.seed)


def branch_point(cfg, start: int) -> int | None:
    """The branch step K when the window starts at `start` (None: no branching)."""
    if cfg.branch_at is None:
        return None
    return start if cfg.branch_at == "window" else int(cfg.branch_at)


def train_params(cfg, step: int, schedule: str, shift: float) -> ImageSamplingParams:
    """The sampler of RL step `step`'s rollout (see the module docstring)."""
    T = cfg.train_rollout_steps
    common = dict(num_steps=T, shift=shift, guidance_scale=cfg.guidance_scale, schedule=schedule,
                  ode_solver=cfg.ode_solver, ode_tail=cfg.ode_tail)
    if cfg.image_algo != "flow_grpo":
        K = branch_point(cfg, 0)
        if K is None:
            return ImageSamplingParams(sde="ode", **common)
        return ImageSamplingParams(sde=cfg.sde_type, noise_level=cfg.noise_level, window_start=K, window_size=1,
                                   branch_at=K, logprob=cfg.flow_logprob, **common)
    start = window_at(cfg, step)
    return ImageSamplingParams(sde=cfg.sde_type, noise_level=cfg.noise_level, window_start=start,
                               window_size=cfg.sde_window, logprob=cfg.flow_logprob, branch_at=branch_point(cfg, start),
                               **common)


def _starts(cfg) -> range:
    """Every window start the schedule can give."""
    if cfg.image_algo != "flow_grpo" or cfg.window == "fixed":
        return range(cfg.window_start, cfg.window_start + 1)
    return range(cfg.window_start, window_last(cfg) + 1, cfg.window_stride if cfg.window == "slide" else 1)


def check_sampler(cfg) -> None:
    """The window, branching and solver settings a run can use; ValueError (one line) otherwise."""
    from .config import image_schedule

    for name, lo in (("window_start", 0), ("window_every", 1), ("window_stride", 1)):
        if getattr(cfg, name) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {getattr(cfg, name)}")
    T, W, s = cfg.train_rollout_steps, cfg.sde_window, cfg.window_start
    if cfg.image_algo != "flow_grpo":
        if cfg.window != "fixed" or s != 0 or cfg.window_last is not None:
            raise ValueError(f"window settings (window {cfg.window!r}, window_start {s}, window_last "
                             f"{cfg.window_last}) place flow_grpo's SDE window; image_algo {cfg.image_algo!r} rolls "
                             "out the ODE (--branch-at K makes step K stochastic)")
    elif cfg.window == "fixed":
        if cfg.window_last is not None:
            raise ValueError(f"window_last {cfg.window_last} is for --window slide / random, not fixed")
        if s + W > T:
            raise ValueError(f"the SDE window [{s}, {s + W}) (window_start {s}, sde_window {W}) is outside the "
                             f"training rollout's {T} steps [0, {T})")
    elif not s <= window_last(cfg) <= T - W:
        raise ValueError(f"window {cfg.window!r}: window starts [{s}, {window_last(cfg)}] must lie in [0, {T - W}] "
                         f"(a window of {W} steps inside the training rollout's {T})")
    _check_branch(cfg)
    if not 0 < cfg.ode_tail <= 1:
        raise ValueError(f"ode_tail must be in (0, 1], got {cfg.ode_tail}")
    if cfg.ode_tail < 1 and cfg.image_algo != "flow_grpo" and cfg.branch_at is None:
        raise ValueError(f"ode_tail {cfg.ode_tail} re-spaces the ODE steps after the last stochastic one and the "
                         f"{cfg.image_algo} rollout has none: give fewer --rollout-steps instead")
    schedule, shift = image_schedule(cfg)
    plans = [_at_start(cfg, start, schedule, shift) for start in _starts(cfg)]  # each builds (and checks) its params
    if cfg.ode_solver == "dpm2" and not any(any(p.plan()[2]) for p in plans):
        raise ValueError(f"ode_solver 'dpm2' changes no step of this rollout ({cfg.image_algo}, sde_type "
                         f"{cfg.sde_type!r}, steps: {', '.join(plans[0].plan()[1])}): every ODE stretch is one step or "
                         "ends at sigma 0, where DPM-Solver++(2M) is Euler; use euler, or more ODE steps")


def _at_start(cfg, start: int, schedule: str, shift: float) -> ImageSamplingParams:
    import dataclasses

    return train_params(dataclasses.replace(cfg, window="fixed", window_start=start, window_last=None), 0, schedule,
                        shift)


def _check_branch(cfg) -> None:
    K, T = cfg.branch_at, cfg.train_rollout_steps
    if K is None:
        return
    if K == "window":
        if cfg.image_algo != "flow_grpo":
            raise ValueError(f"branch_at 'window' branches at flow_grpo's window start; image_algo "
                             f"{cfg.image_algo!r} has no window: give the step, --branch-at K")
        return
    if not (K.isdigit() and int(K) < T):
        raise ValueError(f"branch_at must be a sampler step in [0, {T}) or 'window', got {K!r}")
    K = int(K)
    if cfg.image_algo == "flow_grpo" and K > cfg.window_start:
        raise ValueError(f"branch_at {K} is after the window start {cfg.window_start}: the branches may share no "
                         "stochastic (trained) step (branch at or before the window, or --branch-at window)")
    if cfg.image_algo != "flow_grpo" and cfg.sde_type == "cps" and K == T - 1:
        raise ValueError(f"branch_at {K}: a cps step into sigma 0 is deterministic, so the branches would not differ; "
                         f"branch before step {T - 1}")
