"""Sigma schedules of the flow sampler, and the one a diffusers pipeline's scheduler config implies.

Two schedules, both time-shifted as sigma -> shift sigma / (1 + (shift - 1) sigma) (SD3 / SANA; shift 1 = none):
- "linspace" (DanceGRPO): T + 1 points of linspace(1, 0), shifted.
- "diffusers" (Flow-GRPO, SD3 pipelines): what `FlowMatchEulerDiscreteScheduler.set_timesteps(T)` gives without
  dynamic shifting: T points of linspace(1, s_min), shifted, then 0, where s_min is the scheduler's smallest training
  sigma, shift(1 / N) with N = num_train_timesteps (so 1 / N is shifted twice, as diffusers does). Its last nonzero
  sigma is much smaller: 0.0089 against linspace's 0.25 at 10 steps, shift 3.

A model is best sampled on the schedule it was trained and is used on, so a DiT directory that belongs to a diffusers
pipeline (`<pipeline>/transformer` beside `<pipeline>/scheduler/scheduler_config.json`) picks its default from that
config (`pipeline_schedule`): a FlowMatchEulerDiscreteScheduler gives "diffusers" with its `shift` (equal to
`set_timesteps`' sigmas bit for bit: tests/test_schedule.py); a scheduler of another class on flow sigmas (SANA's
DPMSolverMultistepScheduler with `use_flow_sigmas`: shifted linspace(1 - 1/N, 0), within 1e-3 of "linspace" for
shifts >= 1) gives "linspace" with its `flow_shift`. FlowMatchEulerDiscreteScheduler options whose sigmas this does
not compute (resolution-dependent shifting, terminal stretching, Karras / exponential / beta sigmas, inverted sigmas,
another num_train_timesteps) are refused rather than approximated.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from .. import _checks as C

SCHEDULES = ("linspace", "diffusers")
# FlowMatchEulerDiscreteScheduler options whose sigmas `timestep_schedule` does not compute, with their neutral value
_UNSUPPORTED = {"use_dynamic_shifting": False, "shift_terminal": None, "use_karras_sigmas": False,
                "use_exponential_sigmas": False, "use_beta_sigmas": False, "invert_sigmas": False}


def timestep_schedule(num_steps: int, shift: float = 1.0, device=None, kind: str = "linspace",
                      num_train_timesteps: int = 1000) -> torch.Tensor:
    """sigmas [num_steps + 1] fp32 from 1 down to 0 (the module docstring's "linspace" or "diffusers" schedule)."""
    f64 = dict(dtype=torch.float64, device=device)
    if kind == "linspace":
        s = torch.linspace(1.0, 0.0, num_steps + 1, **f64)
    elif kind == "diffusers":
        inv_n = 1.0 / num_train_timesteps
        s_min = shift * inv_n / (1.0 + (shift - 1.0) * inv_n)
        s = torch.cat([torch.linspace(1.0, s_min, num_steps, **f64), torch.zeros(1, **f64)])
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    return (shift * s / (1.0 + (shift - 1.0) * s)).float()


def scheduler_config_path(dit_path) -> Path:
    """Where a diffusers pipeline keeps the scheduler of its `transformer/` directory."""
    return Path(dit_path).parent / "scheduler" / "scheduler_config.json"


def pipeline_schedule(dit_path) -> tuple[str, float] | None:
    """(schedule, shift) that the scheduler config beside a DiT directory implies (module docstring), or None when
    there is no config or it is not on flow sigmas. ValueError (naming the file and option) for a config whose sigmas
    this sampler would not reproduce."""
    path = scheduler_config_path(dit_path)
    if not path.is_file():
        return None
    conf = json.loads(path.read_text())
    cls = conf.get("_class_name")
    if cls == "FlowMatchEulerDiscreteScheduler":
        for key, neutral in _UNSUPPORTED.items():
            if conf.get(key, neutral) not in (neutral, False, None):
                raise ValueError(f"{path} sets {key}={conf[key]!r}, which the flow sampler does not reproduce; give "
                                 "--timestep-schedule and --image-shift explicitly")
        if conf.get("num_train_timesteps", 1000) != 1000:
            raise ValueError(f"{path} has num_train_timesteps={conf['num_train_timesteps']!r}; the diffusers schedule "
                             "here assumes 1000: give --timestep-schedule and --image-shift explicitly")
        return "diffusers", float(conf.get("shift", 1.0))
    if conf.get("use_flow_sigmas"):
        return "linspace", float(conf.get("flow_shift", 1.0))
    return None


# --- the rollout's steps: which are stochastic, where the ODE tail is re-spaced, the second-order solver --------------

WINDOWS = ("fixed", "slide", "random")
ODE_SOLVERS = ("euler", "dpm2")


def window_start_at(kind: str, step: int, *, start: int, last: int, every: int = 1, stride: int = 1,
                    seed: int = 0) -> int:
    """The SDE window's first sampler step at RL step `step` (0-based) under a window schedule:
    - "fixed": `start` every step;
    - "slide" (MixGRPO's progressive schedule): `start`, moved `stride` steps later every `every` RL steps, back to
      `start` once it would pass `last` (MixGRPO's roll-back), so from noisy to clean and again;
    - "random" (Flow-GRPO-Fast, TempFlow-GRPO): uniform in [start, last], drawn from (seed, step) alone, so a resumed
      run draws what the uninterrupted one drew and no other random stream moves."""
    if kind == "fixed":
        return start
    if kind == "slide":
        positions = (last - start) // stride + 1
        return start + (step // every) % positions * stride
    if kind == "random":
        return random.Random(seed * 1_000_003 + step).randint(start, last)
    raise ValueError(f"window must be one of {WINDOWS}, got {kind!r}")


def compress_tail(sigmas: list, first: int, ratio: float, shift: float) -> list:
    """sigmas with the ODE steps from index `first` to the end re-spaced into max(1, round(ratio n)) steps (n of
    them before) over the same interval [sigmas[first], 0]: uniform in the unshifted time u (sigma = shift u /
    (1 + (shift - 1) u)), as the schedules themselves are (MixGRPO-Flash's compressed post-window ODE)."""
    n = len(sigmas) - 1 - first
    keep = max(1, int(ratio * n + 0.5))
    if n <= 0 or keep >= n:
        return list(sigmas)
    s0 = sigmas[first]
    u = torch.linspace(s0 / (shift - (shift - 1.0) * s0), 0.0, keep + 1, dtype=torch.float64)[1:]
    tail = (shift * u / (1.0 + (shift - 1.0) * u)).float()
    return list(sigmas[:first + 1]) + C.mark_host_resident(tail).tolist()  # made on the host: no device read


def dpm2_coefficients(sigmas: list, kinds: list) -> list:
    """Per step i, the DPM-Solver++(2M) correction c_i for flow matching (alpha = 1 - sigma, lambda = log(alpha /
    sigma), x0_i = x_i - sigma_i v_i the data prediction): x_{i+1} = Euler step + c_i (x0_i - x0_{i-1}), with
        c_i = 0.5 alpha_{i+1} (1 - exp(-h)) h / h_prev,   h = lambda_{i+1} - lambda_i,  h_prev = lambda_i - lambda_{i-1}
    (the first-order DPM-Solver++ step is exactly Euler for flow matching). c_i = 0 (first order) where there is no
    history on the same ODE path (the first step, the step after a stochastic one, a step from sigma = 1 whose
    lambda is -inf) and for the last step into sigma = 0 (lambda = +inf: diffusers' lower_order_final)."""
    out = [0.0] * len(kinds)
    for i, kind in enumerate(kinds):
        p, s, t = (sigmas[i - 1] if i else 1.0), sigmas[i], sigmas[i + 1]
        if kind != "ode" or i == 0 or kinds[i - 1] != "ode" or p >= 1.0 or t <= 0.0:
            continue
        lam_p, lam_s, lam_t = (math.log((1 - x) / x) for x in (p, s, t))
        h, h_prev = lam_t - lam_s, lam_s - lam_p
        out[i] = 0.5 * (1 - t) * (1 - math.exp(-h)) * h / h_prev
    return out
