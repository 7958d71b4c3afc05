"""Trainer configuration: one frozen dataclass, named presets, CLI flags derived from the fields.

Every field is a flag (`--prompts-per-step 4`, `--no-cfg` style booleans as `--fp8 / --no-fp8`); a preset
gives the defaults (`--config tiny`), flags override it, and the resolved config is written to
`<run_dir>/config.json`. `validate()` rejects bad configs before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SCENARIOS = ("understand", "generate", "reason-generate", "refine-prompt", "edit", "reason-edit")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the `tiny` preset for the default scenario (reason-generate), tuned on the synthetic world on
    a CPU (seed 0, 48 held-out prompts, 32 px DiT after 600 warm-up steps); measured base -> after 40 RL steps:
    - Flow-GRPO window: sde_window 2, noise_level 1.0, lr 3e-4 for the DiT and connector, 8 prompts x 8 samples.
      With sde_window 4 / noise_level 0.7 (sde) the training reward stayed flat for 36 steps.
    - UniGRPO velocity-MSE kept small: at beta_velocity 0.02 the image reward stays flat (the per-step log-prob
      is a mean over 3x32x32 pixels, so its gradient is small next to the MSE's pull back to the reference); at 0
      the images drift brighter and the reward peaks and falls (image 0.118 -> 0.246 at 20 -> 0.196 at 40
      steps); at 0.005 it rises without the drift (image 0.118 -> 0.214, total 0.193 -> 0.414).
    - `generate` (Flow-GRPO alone, LM frozen) does not learn with these (0.207 -> 0.147); it does with training
      samples like the ODE it is evaluated with: sde_type "cps", noise_level 0.7, sde_window 4, beta_velocity 0
      (0.207 -> 0.281 / 0.182 -> 0.282 / 0.200 -> 0.312 over 3 RL seeds). Those give reason-generate 0.193 ->
      0.376, below 0.414, so they are generate's own defaults (SCENARIO_DEFAULTS below)."""

    scenario: str = "reason-generate"
    preset: str = "tiny"  # model preset; `tiny` is adapted to the 32 px synthetic world (see train.pretrain)
    model_path: str | None = None  # a saved UnifiedModel directory: skips the pretrain stage
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 40
    prompts_per_step: int = 8
    group_size: int = 8
    micro_batch: int = 16
    lr_lm: float = 5e-5
    lr_dit: float = 3e-4
    lr_connector: float = 3e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.0  # > 0: evaluate an exponential moving average of the trained weights (Flow-GRPO's EMA),
    # e <- d e + (1 - d) w after each update with d = min(ema_decay, (1 + n) / (10 + n)); 0: the raw weights
    grad_clip: float = 1.0
    loss_type: str = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0  # text KL to the frozen reference (k3)
    flow_clip_range: float = 1e-3
    beta_velocity: float = 0.005  # UniGRPO velocity-MSE to the frozen reference (see the tuning note above)
    tis_cap: float = 2.0  # truncated importance sampling cap (rollout vs training log-probs)
    temperature: float = 1.0
    max_new_tokens: int = 40
    image_steps: int = 8
    image_shift: float = 1.0
    noise_level: float = 1.0
    sde_type: str = "sde"  # training sampler in the window: "sde" (Flow-GRPO) or "cps" (marginal-preserving)
    sde_window: int = 2  # Flow-GRPO-Fast: stochastic (trained) steps in a window at the start
    group_noise: bool = False  # one initial latent per group (DanceGRPO): in-group reward differences then come
    # from the trained window's noise only (rollouts only; evaluation draws one latent per sample)
    cycle_back: str = "policy"  # edits: who makes the inverse edit of the cycle reward: "policy" or "reference"
    # (the frozen reference: a fixed reward that does not move with the policy it scores)
    guidance_scale: float = 1.0  # 1.0 = CFG-free (UniGRPO)
    format_weight: float = 0.2
    impl: str = "auto"  # "reference" runs every op in eager PyTorch
    fp8: bool = False
    device: str = "auto"  # auto: cuda when available, else cpu; fp32 weights (the tiny world needs no bf16)
    pretrain_dit_steps: int = 600
    pretrain_lm_steps: int = 300
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    eval_every: int = 20
    eval_prompts: int = 48
    eval_samples: int = 1  # images per held-out task, each from its own fixed noise (GenEval draws 4 per prompt);
    # a task's reward is the mean over its samples (text is greedy, so only image rewards vary between samples)
    save_every: int = 20
    keep_checkpoints: int = 2
    zero_stage: int | None = None  # DeepSpeed ZeRO stage (2 or 3); None: single process unless launched distributed
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged over the generated one (see train.distributed)

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    def validate(self) -> "TrainConfig":
        def bad(msg):
            raise ValueError(f"bad config: {msg}")

        if self.scenario not in SCENARIOS:
            bad(f"unknown scenario {self.scenario!r}; choose one of {SCENARIOS}")
        if self.group_size < 2:
            bad(f"group_size must be >= 2 (group advantages of one sample are 0), got {self.group_size}")
        if self.prompts_per_step < 1:
            bad(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.micro_batch < 1 or self.batch_size % self.micro_batch:
            bad(f"batch {self.batch_size} (prompts_per_step x group_size) is not divisible by micro_batch "
                f"{self.micro_batch}")
        if self.micro_batch % self.group_size and self.group_size % self.micro_batch:
            bad(f"micro_batch {self.micro_batch} and group_size {self.group_size}: one must divide the other")
        for name in ("lr_lm", "lr_dit", "lr_connector", "pretrain_lr"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("steps", "max_new_tokens", "image_steps", "eval_prompts", "eval_samples"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.sde_window <= self.image_steps:
            bad(f"sde_window must be in [1, image_steps={self.image_steps}], got {self.sde_window}")
        for name, options in (("sde_type", ("sde", "cps")), ("cycle_back", ("policy", "reference")),
                              ("impl", ("auto", "triton", "reference"))):
            if getattr(self, name) not in options:
                bad(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        if self.model_path is not None and not (Path(self.model_path) / "unified_config.json").is_file():
            bad(f"model_path {self.model_path!r} is not a saved UnifiedModel directory (no unified_config.json)")
        if not (self.device in ("auto", "cpu", "cuda") or _is_cuda_index(self.device)):
            bad(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                bad(f"device {self.device!r} was requested but CUDA is not available")
        if self.zero_stage is not None and self.zero_stage not in (2, 3):
            bad(f"zero_stage must be 2 or 3 (ZeRO-2 / ZeRO-3 under DeepSpeed), got {self.zero_stage}")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            bad(f"deepspeed_config {self.deepspeed_config!r} is not a file")
        if not 0.0 <= self.ema_decay < 1.0:
            bad(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.temperature <= 0:
            bad(f"temperature must be > 0 for sampling, got {self.temperature}")
        return self

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))


PRESETS = {
    # what the README's first command runs: learns on a 2-core CPU in a few minutes
    "tiny": TrainConfig(),
    # the few-steps smoke run the tests use for every scenario
    "smoke": TrainConfig(steps=2, prompts_per_step=2, group_size=2, micro_batch=4, max_new_tokens=12,
                         image_steps=3, sde_window=2, pretrain_dit_steps=3, pretrain_lm_steps=3, pretrain_batch=4,
                         eval_every=2, eval_prompts=4, save_every=1),
    # `unirl-fast profile --preset bench-1.5b`: the measured batch (32 samples, 128 new tokens, 10 steps)
    "bench": TrainConfig(preset="bench-1.5b", steps=6, prompts_per_step=4, group_size=8, micro_batch=8,
                         max_new_tokens=128, image_steps=10, sde_window=2, image_shift=3.0, eval_prompts=32),
}


# Per-scenario defaults on top of the `tiny` preset, measured on the synthetic world (seed 0, 48 held-out tasks;
# numbers in tests/test_learning.py). generate: Flow-GRPO alone learns only with training samples from the
# evaluated distribution (the marginal-preserving "cps" window at noise 0.7), 4 trained steps and no velocity-MSE
# (0.207 -> 0.281 held-out in 40 steps; with the reason-generate defaults 0.207 -> 0.147), and 16 prompts per step:
# on a second base (built with 2 threads: 0.191) 8 prompts gave 0.191 -> 0.222 (z 1.0), 16 gave 0.297 (z 3.1).
# reason-edit: 8 prompts per step gave 0.754 -> 0.799 (z 2.8) on one base and 0.737 -> 0.750 (z 0.8) on another;
# 16 prompts per step 0.737 -> 0.765 (z 2.3).
# edit: cps window and 16 prompts as generate, velocity-MSE kept, inverse edit by the frozen reference, 60 steps,
# the EMA of the weights evaluated (ema_decay 0.9) and 4 images per held-out task: one image per task left the
# comparison to the initial noise (within-task std of the image part 0.19 against gains of ~0.05). Held-out,
# 4 draws per task, base -> EMA after 60 steps (raw weights in brackets), seeds 0-3: 0.555 -> 0.586 (0.584),
# 0.577 -> 0.599 (0.596), 0.601 -> 0.652 (0.644), 0.569 -> 0.595 (0.590); paired z 4.0 / 2.3 / 4.8 / 3.2
# (raw 3.7 / 1.9 / 3.7 / 2.4). At 40 steps the raw weights went up and down (seed 0: z 3.5 at 20, 0.5 at 40).
# Those ran with 1 thread; the slow test (2 threads: other float order) gives seed 0 0.555 -> 0.578 (z 3.3).
SCENARIO_DEFAULTS = {"generate": dict(sde_type="cps", noise_level=0.7, sde_window=4, beta_velocity=0.0,
                                      prompts_per_step=16),
                     "edit": dict(sde_type="cps", noise_level=0.7, sde_window=4, prompts_per_step=16,
                                  cycle_back="reference", steps=60, ema_decay=0.9, eval_samples=4),
                     "reason-edit": dict(prompts_per_step=16)}


def train_preset(name: str, scenario: str | None = None) -> TrainConfig:
    """The named trainer preset for a scenario: `tiny` takes the scenario's measured defaults (SCENARIO_DEFAULTS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown trainer config {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[name]
    scenario = base.scenario if scenario is None else scenario
    extra = SCENARIO_DEFAULTS.get(scenario, {}) if name == "tiny" else {}
    return dataclasses.replace(base, scenario=scenario, **extra)


def add_config_args(parser: argparse.ArgumentParser, exclude=()) -> None:
    """One flag per TrainConfig field (except those in `exclude`, which the caller defines its own way)."""
    parser.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="named trainer defaults")
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=typ, default=None, help=f"default: {f.default}")


def config_from_args(args) -> TrainConfig:
    base = train_preset(args.config, getattr(args, "scenario", None))
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **over).validate()


def _is_cuda_index(device: str) -> bool:
    return device.startswith("cuda:") and device[5:].isdigit()


def resolve_device(cfg):
    """The torch device a single-process run trains on (a DeepSpeed run uses its local rank's device instead)."""
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)
