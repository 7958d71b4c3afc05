"""The run's set-up: what the trainer, `unirl-fast eval` and `unirl-fast export` build before any step, from the
config, each thing once.

    parts = build(cfg, purpose="train")   # "eval": no optimizer, old policy, reference (unless it edits back);
                                          # "export": no reward or tasks either
    trainer = Trainer(parts)              # Trainer(cfg) builds them itself

In order (train): the config resolved (the image schedule, the step's pipeline: config.with_*) -> `preflight`, every
check that needs no model and writes nothing (the CLI runs it first and passes its answer on) -> the device and
threads, or the DeepSpeed runtime -> the run directory locked -> the model (given; your expert directories or the
run's copy of them; or the pretrained world model), its frozen dtype, FP8, gradient checkpointing, LoRA -> the
frozen reference (the base with its adapters off when every trained expert is LoRA-adapted, else a frozen copy) ->
what trains -> the EMA, the old policy (nft / awm), the optimizer -> the tasks and the reward -> config.json (the run
exists from here: a set-up that failed left none).

`Capabilities` are computed once from the config: whether the LM sees images (read from the model's config files:
no model is built for it), FP8, which experts carry LoRA, the device, and whether the run is distributed; the tasks
and the reward are built from them rather than each asking the modules that know.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from . import forward_rl, offpolicy
from .checkpoint import check_run_files
from .config import (
    check_reward_specs,
    resolve_device,
    reward_specs,
    use_device,
    use_threads,
    with_image_schedule,
    with_pipeline,
)
from .distributed import requested as distributed_requested
from .ema import ParamEMA
from .inputs import cast_frozen, check_inputs, load_run_model, run_tasks
from .preflight_checks import run_checks
from .pretrain import pretrain, run_lm_has_vision, world_model_config
from .rundir import check_run_dir, check_tasks_unchanged, create_or_resume, lock_run_dir
from .scenarios import get_scenario

PURPOSES = ("train", "eval", "export")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the run can do, from its config alone (no model built)."""
    vision: bool  # the LM has a vision tower (a VLM: it sees the tasks' images in the image-input scenarios)
    fp8: bool
    lora: tuple  # the experts with LoRA adapters ("lm", "dit")
    device: torch.device  # a single-process run's (a DeepSpeed run uses its local rank's)
    distributed: bool

    @classmethod
    def of(cls, cfg, scenario) -> "Capabilities":
        return cls(run_lm_has_vision(cfg, scenario), bool(cfg.fp8),
                   tuple(k for k in ("lm", "dit") if getattr(cfg, f"lora_{k}")), resolve_device(cfg),
                   distributed_requested(cfg))


@dataclasses.dataclass
class RunParts:
    """What `build` made; None where the purpose needs none (see the module docstring)."""
    cfg: object
    scenario: object
    caps: Capabilities
    purpose: str
    log: object
    dist: object = None  # train.distributed.DeepSpeedRuntime, or None: one process (deepspeed never imported)
    model: object = None
    lora: dict = dataclasses.field(default_factory=dict)  # {expert: adapted modules}
    ref: object = None  # the frozen copy, or None with LoRA (then ref_connector: the base's connector)
    ref_connector: object = None
    ema: object = None  # the averaged weights evaluation uses (ema_decay > 0), kept by the process that evaluates
    old: object = None  # nft / awm: the old policy (forward_rl.OldPolicy)
    opt: object = None
    train_tasks: list = dataclasses.field(default_factory=list)
    eval_tasks: list = dataclasses.field(default_factory=list)
    reward: object = None

    @property
    def is_main(self) -> bool:
        """The process that logs, writes metrics and plots (every process when not distributed)."""
        return self.dist is None or self.dist.is_main

    @property
    def readonly(self) -> bool:
        """eval / export: the run directory is read, never written (its config.json is not checked either)."""
        return self.purpose != "train"


def build(cfg, *, purpose: str = "train", log=print, model=None, run_info=None) -> RunParts:
    """The run's parts for `purpose` (module docstring). model: an already built UnifiedModel to train instead of the
    pretrained world model (the profiler passes a random-init preset model). run_info: preflight(cfg)'s answer when
    the caller already ran it (the CLI); else it runs here (train)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    cfg = with_pipeline(with_image_schedule(cfg))  # config.json records what ran: the schedule, the chunks
    readonly = purpose != "train"
    if not readonly and run_info is None:
        run_info = preflight(cfg)  # before any model is built or file written (validates cfg)
    cfg = cfg.validate() if readonly else cfg
    scenario = get_scenario(cfg.scenario)
    caps = run_info["caps"] if run_info is not None and "caps" in run_info else Capabilities.of(cfg, scenario)
    p = RunParts(cfg, scenario, caps, purpose, log)
    _runtime(p)
    if readonly:  # eval / export: a checkpoint whose pickle would run code is refused before any work
        check_run_files(cfg.run_dir)
    elif p.is_main:
        for note in [lock_run_dir(cfg.run_dir), *run_info.get("notes", ())]:
            if note:
                p.log(note)
    torch.manual_seed(cfg.seed)
    p.model = _model(p, model)
    p.lora = _add_lora(p)
    if purpose == "train" or (purpose == "eval" and scenario.edit and cfg.cycle_back == "reference"):
        p.ref, p.ref_connector = _reference(p)  # evaluation: who edits back for the cycle reward
    set_trainable(p.model, scenario, p.lora)
    if cfg.off_policy:
        offpolicy.check_model(p.model)
    if cfg.ema_decay > 0 and p.is_main:
        p.ema = ParamEMA(p.model, cfg.ema_decay)
    if purpose == "train":
        if cfg.image_algo != "flow_grpo" and forward_rl.needs_old(cfg) and not forward_rl.old_is_current(cfg):
            p.old = forward_rl.OldPolicy(p.model, cfg.old_decay_rate, cfg.old_decay_max)
        p.opt = torch.optim.AdamW(param_groups(p.model, cfg, scenario), weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.99))
    if purpose != "export":
        _tasks_and_reward(p, run_info)
    if p.is_main and not readonly:
        create_or_resume(cfg, run_info)  # the run exists from here: what failed before left no config.json
    return p


def _runtime(p: RunParts) -> None:
    """The device and intra-op threads, or the DeepSpeed runtime (which sets its local rank's device); a rank other
    than the main one logs nothing."""
    if p.caps.distributed:
        from .distributed import DeepSpeedRuntime

        p.dist = DeepSpeedRuntime(p.cfg)
        if not p.dist.is_main:
            p.log = lambda *a, **k: None
    else:
        use_device(p.cfg)
    use_threads(p.cfg)


def _model(p: RunParts, model):
    """The policy: given, loaded (your directories, or the run's copy of them), or the pretrained world model; then
    its frozen experts' dtype, FP8 (rollout and training share the converted modules) and gradient checkpointing.
    Under DeepSpeed rank 0 builds and caches the base first, then the others read it."""
    cfg, scenario, log = p.cfg, p.scenario, p.log
    if p.dist is not None:
        p.dist.main_first_enter()
    attn = cfg.attn_implementation if cfg.attn_implementation != "auto" else _auto_attention()
    if model is None and (cfg.model_path or cfg.lm_path):  # your model: from the run's copy once there is one
        model = load_run_model(cfg, scenario, attn=attn, device=p.caps.device, log=log,
                               write_copy=p.is_main and not p.readonly)
    elif model is None:
        model = pretrain(cfg, scenario, log=log, show=p.is_main)
    cast_frozen(model, cfg, scenario)  # --frozen-dtype (a loaded model already has it)
    if cfg.fp8:
        from ..fp8 import convert_to_fp8

        names = convert_to_fp8(model)
        if not names:
            raise ValueError(f"--fp8 was requested but no Linear of preset {cfg.preset!r} is eligible (in/out "
                             "features divisible by 128): nothing would run in FP8")
        log(f"fp8: {len(names)} Linear layers converted (rollout and training share them)")
    if p.dist is not None:
        model = p.dist.main_first_exit(model)
    _memory_options(model, cfg)
    return model


def _memory_options(model, cfg) -> None:
    if cfg.grad_ckpt_lm:  # newer transformers name it activation checkpointing (the old name warns there)
        if hasattr(model.lm, "activation_checkpointing_enable"):
            model.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.grad_ckpt_dit:
        model.dit.enable_gradient_checkpointing()


def _add_lora(p: RunParts) -> dict:
    """LoRA adapters from --lora-lm / --lora-dit (peft); {expert: adapted modules}."""
    c = p.cfg
    if not p.caps.lora:
        return {}
    from ..models.lora import add_lora, parse_lora

    out = add_lora(p.model, lm=parse_lora(c.lora_lm, "lm") if c.lora_lm else None,
                   dit=parse_lora(c.lora_dit, "dit") if c.lora_dit else None)
    n = sum(q.numel() for q in p.model.parameters() if q.requires_grad)
    p.log(f"lora: {', '.join(f'{k} {v} layers' for k, v in out.items())} ({n / 1e6:.2f} M adapter weights)")
    return out


def _reference(p: RunParts) -> tuple:
    """(ref, ref_connector): the base with adapters disabled when every trained expert is LoRA-adapted (only the
    small connector is copied), else a frozen copy of the whole model."""
    s = p.scenario
    if p.lora and all(p.lora.get(k) for k, t in (("lm", s.train_lm), ("dit", s.train_dit)) if t):
        return None, copy.deepcopy(p.model.connector).eval().requires_grad_(False)
    return copy.deepcopy(p.model).eval().requires_grad_(False), None


def set_trainable(model, scenario, lora: dict) -> None:
    """The scenario's experts train (the DiT with the connector); an expert with LoRA adapters trains only them."""
    model.requires_grad_(False)
    for name, on in (("lm", scenario.train_lm), ("dit", scenario.train_dit)):
        expert = getattr(model, name)
        if lora.get(name):
            for pname, q in expert.named_parameters():
                q.requires_grad_(on and "lora_" in pname)
        else:
            expert.requires_grad_(on)
    model.connector.requires_grad_(scenario.train_dit)


def param_groups(model, cfg, scenario) -> list:
    """AdamW's groups: one learning rate per expert (LM / DiT / connector), trained parameters only."""
    groups = [("lm", model.lm, cfg.lr_lm), ("dit", model.dit, cfg.lr_dit), ("connector", model.connector,
                                                                            cfg.lr_connector)]
    out = []
    for name, mod, lr in groups:
        params = [q for q in mod.parameters() if q.requires_grad]
        if params:
            out.append({"params": params, "lr": lr, "name": name})
    if not out:
        raise ValueError(f"scenario {scenario.name!r} trains nothing")
    return out


def _tasks_and_reward(p: RunParts, run_info) -> None:
    cfg = p.cfg
    taskset = run_info["tasks"] if run_info is not None else load_run_tasks(cfg, p.scenario, p.caps)
    p.train_tasks, p.eval_tasks = taskset.train, taskset.eval[: cfg.eval_prompts]
    p.reward = build_run_reward(cfg, p.scenario, p.caps.device if p.dist is None else p.model.device)
    p.log(f"tasks: {taskset.name} ({len(taskset.train)} train, {len(taskset.eval)} held-out); reward: "
          f"{p.reward.describe()}")


def preflight(cfg) -> dict:
    """Every check that needs no model and writes nothing, run before any work (the CLI calls it too, to fail in a
    second with one line): the config, the run directory (usable; a resume only changes what may change), the task
    rows, the reward specs, preflight_checks.run_checks (LoRA vs scenario, reward services' /health, task images,
    the step's memory) and, with --fp8, that the preset has FP8-eligible layers (found on a meta-device build: no
    memory, no weights). Returns check_run_dir's answer with "caps" (Capabilities), "tasks" and "notes" (lines for
    the log)."""
    cfg.validate()
    info = check_run_dir(cfg)
    check_run_files(cfg.run_dir)  # a checkpoint whose pickle would run code: refused here, read by nothing
    scenario = get_scenario(cfg.scenario)
    check_inputs(cfg, scenario)  # the expert directories, a saved model, a chat template (not on a resume's copy)
    info["caps"] = caps = Capabilities.of(cfg, scenario)
    info["tasks"], source = run_tasks(cfg, scenario, caps.vision)  # a bad row: its file and line
    if source == "source":
        check_tasks_unchanged(cfg.run_dir, info["tasks"])
    check_reward_specs(cfg, scenario)  # imports a callable, looks for a CLIP directory: loads no model
    forward_rl.check_config(cfg, scenario)
    offpolicy.check_config(cfg, scenario)
    info["notes"] = run_checks(cfg, scenario, info["tasks"])  # LoRA, services, images, memory (preflight_checks)
    if caps.fp8 and cfg.model_path is None and cfg.lm_path is None:
        _check_fp8_preset(cfg, scenario)
    return info


def _check_fp8_preset(cfg, scenario) -> None:
    from ..fp8 import convert_to_fp8
    from ..models import UnifiedModel

    with torch.device("meta"):
        model = UnifiedModel(world_model_config(cfg.preset, scenario.edit))
    eligible = []
    convert_to_fp8(model, lambda name, mod: eligible.append(name) and False)
    if not eligible:
        raise ValueError(f"--fp8 was requested but no Linear of preset {cfg.preset!r} is eligible (in/out features "
                         "divisible by 128): nothing would run in FP8; use --preset tiny-fp8")


def load_run_tasks(cfg, scenario, caps: Capabilities | None = None):
    """The run's tasks: its source, or the run's copy of it when the source has gone."""
    caps = caps or Capabilities.of(cfg, scenario)
    return run_tasks(cfg, scenario, caps.vision)[0]


def build_run_reward(cfg, scenario, device):
    """The run's reward: the weighted sum of its --reward terms."""
    from ..rewards import build_reward

    http = dict(timeout=cfg.reward_timeout, retries=cfg.reward_retries, concurrency=cfg.reward_concurrency,
                batch_size=cfg.reward_batch_size, token_env=cfg.reward_token_env,
                allow_insecure_token=cfg.reward_allow_insecure_token, ca_file=cfg.reward_ca_file)
    return build_reward(reward_specs(cfg), scenario=scenario, format_weight=cfg.format_weight, device=device,
                        http_options=http)


def _auto_attention() -> str:
    from ..models.experts import sdpa_or_flash

    return sdpa_or_flash()


