"""Preflight: the checks of a training run that need no weights, run before anything is written or trained.

`setup.preflight` runs the cheap ones (the config, the run directory, the task rows, the reward specs parsed and
imported, FP8 eligibility) and then `run_checks` here, which looks further without building the model:

    trackers           every --report-to package importable
    LoRA vs scenario   --lora-lm / --lora-dit only on an expert the scenario trains
    reward services    every http(s):// reward answers GET /health within --reward-timeout, with the client's TLS and
                       token rules (rewards.http.probe_health); a service without that route (404 / 405 / 501) is
                       reachable and passes with a note
    task images        every distinct image of the task set decoded once (the run's own loader), or, when their
                       files add up to more than IMAGE_DECODE_BYTES (a datasets directory: more than
                       IMAGE_DECODE_COUNT images), opened to the header (a truncated or corrupt
                       body then still fails when first used, naming the task)
    memory             the step's estimated peak (models.plan.memory_plan with the rollout: weights, reference,
                       gradients, AdamW states, activations, the rollout of the whole batch) against the device's free
                       memory (a CUDA device) or the RAM available (a CPU); a config that cannot fit is refused,
                       naming the flag that lowers its largest part

Each failure is one ValueError line; nothing is written. A check that cannot be made (the model cannot be built on
the meta device, the available memory cannot be read) says so in a note instead of passing silently.
"""
from __future__ import annotations

import os
from pathlib import Path

IMAGE_DECODE_BYTES = 256 << 20  # decode every image up to this much file data; past it read the headers only
IMAGE_DECODE_COUNT = 4096  # likewise for the images of a datasets directory (their size is not known up front)
GiB = 1024 ** 3


def run_checks(cfg, scenario, tasks) -> list:
    """The checks above, in order (cheapest first); returns notes (lines) for the log."""
    from .trackers import check_installed

    notes = []
    check_installed(cfg.report_to)
    check_lora(cfg, scenario)
    notes += check_reward_services(cfg)
    notes += check_task_images(tasks)
    notes += check_memory(cfg, scenario, tasks)
    return notes


def check_lora(cfg, scenario) -> None:
    for flag, spec, trains in (("--lora-lm", cfg.lora_lm, scenario.train_lm),
                               ("--lora-dit", cfg.lora_dit, scenario.train_dit)):
        if spec and not trains:
            raise ValueError(f"bad config: {flag} was given but scenario {scenario.name!r} does not train that expert "
                             f"({'the LM' if flag == '--lora-lm' else 'the DiT'} stays frozen)")


def check_reward_services(cfg) -> list:
    from ..rewards import parse_spec
    from ..rewards.http import probe_health

    notes = []
    for text in cfg.reward:
        spec, _ = parse_spec(text)
        if spec.startswith(("http://", "https://")):
            note = probe_health(spec, timeout=cfg.reward_timeout, token_env=cfg.reward_token_env,
                                allow_insecure_token=cfg.reward_allow_insecure_token, ca_file=cfg.reward_ca_file)
            notes += [note] if note else []
    return notes


def check_task_images(tasks) -> list:
    """Every distinct task image decoded once (or its header read, for big sets); errors name the task and file."""
    from PIL import Image, UnidentifiedImageError

    if tasks.name == "world":  # drawn by the world's renderer, not read from files
        return []
    seen, paths, others = set(), [], []
    for t in [*tasks.train, *tasks.eval]:
        if t.image is None:
            continue
        key = t.image if isinstance(t.image, str) else getattr(t.image, "digest", None) or id(t.image)
        if key not in seen:
            seen.add(key)
            (paths if isinstance(t.image, str) else others).append(t)
    if not paths and not others:
        return []
    size = sum(os.path.getsize(t.image) for t in paths if os.path.isfile(t.image))
    decode = size <= IMAGE_DECODE_BYTES
    for t in paths if decode else []:
        t.source_image(8)
    decode_others = len(others) <= IMAGE_DECODE_COUNT
    for t in others if decode_others else []:  # a datasets Image cell (or an image in memory): as the run reads it
        t.source_image(8)
    lazy = [t for t in others if hasattr(t.image, "open")]  # datasets cells; a PIL image in memory is decoded
    for t in ([] if decode else paths) + ([] if decode_others else lazy):
        try:
            with (Image.open(t.image) if isinstance(t.image, str) else t.image.open()) as im:
                im.size  # noqa: B018 (the header, parsed by open)
        except FileNotFoundError:
            raise ValueError(f"{t.origin}: image {t.image!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{t.origin}: image {t.image!r} cannot be read as an image ({e})") from None
    n = len(paths) + len(others)
    decode = decode and decode_others
    how = "decoded" if decode else f"headers read ({size / 2 ** 20:.0f} MB of files, {len(others)} dataset images: "\
        f"over the {IMAGE_DECODE_BYTES >> 20} MB / {IMAGE_DECODE_COUNT} decoded up front; a corrupt body fails when "\
        "first used)"
    return [f"task images: {n} checked, {how}"]


# memory -----------------------------------------------------------------------------------------------------------
def check_memory(cfg, scenario, tasks) -> list:
    """The step's estimated peak against the memory the run may use; ValueError when it cannot fit."""
    import torch

    from ..models.plan import memory_plan
    from . import forward_rl
    from .config import resolve_device
    from .distributed import requested

    try:
        model, char_tokens = _meta_model(cfg, scenario)
    except Exception as e:  # noqa: BLE001 (any failure of a meta build: the real build reports it properly)
        return [f"memory bound not checked: the model could not be built on the meta device ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]})"]
    dev = resolve_device(cfg)
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    stage = cfg.zero_stage or (2 if requested(cfg) else 0)
    longest = max(len(t.prompt) + len(getattr(t, "context", "") or "") for t in [*tasks.train, *tasks.eval])
    prompt_len = 32 + (longest if char_tokens else longest // 4)  # + the scenario's template; ~4 chars per BPE token
    fp = cfg.image_algo != "flow_grpo"  # nft / awm: K timesteps per sample trained, and their old policy's copy
    trained = forward_rl.num_timesteps(cfg) if fp else cfg.sde_window
    old = fp and forward_rl.needs_old(cfg) and not forward_rl.old_is_current(cfg)
    plan = memory_plan(model, train_lm=scenario.train_lm, train_dit=scenario.train_dit, batch=cfg.batch_size,
                       micro_batch=cfg.micro_batch, prompt_len=prompt_len, completion_len=cfg.max_new_tokens,
                       trained_steps=trained, gpus=gpus, precision=cfg.precision,
                       frozen_dtype="fp32" if cfg.frozen_dtype == "file" else cfg.frozen_dtype,  # file: an upper bound
                       grad_ckpt_lm=cfg.grad_ckpt_lm, grad_ckpt_dit=cfg.grad_ckpt_dit,
                       reference=not lora_reference(cfg.lora_lm, cfg.lora_dit, scenario),
                       trainable=lora_trainable(model, scenario, cfg.lora_lm, cfg.lora_dit),
                       rollout={"lm_writes": scenario.lm_writes, "draws": scenario.draws,
                                "guidance": cfg.guidance_scale != 1.0}, ema=cfg.ema_decay > 0, old_policy=old)
    need = plan["stages"][stage]
    have, where = _available(dev, torch)
    if have is None:
        return [f"memory bound not checked: {where}"]
    if need["total"] > have:
        raise ValueError(_too_big(need, have, where))
    return []


def _too_big(need: dict, have: float, where: str) -> str:
    parts = {k: v for k, v in need.items() if k not in ("total", "peak_phase")}
    big = max(parts, key=parts.get)
    whole_batch = "--group-size or --prompts-per-step (the rollout holds the step's whole batch at once)"
    lower = {"rollout": whole_batch, "kv_cache": whole_batch,
             "activations": "--micro-batch (or turn on --grad-ckpt-lm / --grad-ckpt-dit)"}.get(
        big, "the model: a smaller --preset, LoRA (--lora-lm / --lora-dit), or --zero-stage 3 on more GPUs")
    shown = ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items() if v)
    return (f"bad config: one step needs about {need['total'] / GiB:.1f} GiB (an estimate, unirl_fast.models.plan: "
            f"{shown} GiB) but {where} has {have / GiB:.1f} GiB: lower {lower}")


def _available(dev, torch) -> tuple:
    """(bytes the run may use, what they are) or (None, why not)."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free, f"{dev} ({torch.cuda.get_device_name(dev)}) free memory"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "this machine's available RAM"
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "this machine's free RAM"
        except (ValueError, OSError, AttributeError):
            return None, "the available RAM cannot be read on this system"


def _meta_model(cfg, scenario):
    """(the run's UnifiedModel on the meta device: shapes only, no weights read, whether it tokenizes by character)."""
    import torch

    from ..models import UnifiedModel
    from ..models.config import UnifiedConfig
    from .inputs import model_copy
    from .pretrain import world_model_config

    copy = model_copy(cfg.run_dir) if (cfg.lm_path or cfg.model_path) else None
    if copy is not None:  # a resume builds from the run's copy (its inputs may have moved)
        ucfg = _inline(UnifiedConfig.load(copy), copy)
    elif cfg.lm_path is not None:
        ucfg = _experts_config(cfg, scenario)
    elif cfg.model_path is not None:
        ucfg = UnifiedConfig.load(cfg.model_path)
        ucfg = _inline(ucfg, cfg.model_path)
    else:
        ucfg = world_model_config(cfg.preset, scenario.edit)
    char = ucfg.tokenizer == "char"
    if ucfg.tokenizer == "lm":
        ucfg = ucfg.replace(tokenizer=None)  # the tokenizer is files, not shapes
    with torch.device("meta"):
        return UnifiedModel(ucfg), char


def _inline(ucfg, root=None):
    """ucfg with every expert's directory replaced by the config it holds (no weights read)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from ..models.experts import DIT_CLASSES, VAE_CLASSES, diffusers_class, diffusers_config_dict, lm_config_dict

    def local(p):
        return str(Path(root) / p) if root is not None and p is not None and not Path(p).is_absolute() else p

    over = {}
    if ucfg.lm_path is not None:
        conf = AutoConfig.from_pretrained(local(ucfg.lm_path), local_files_only=True)
        over.update(lm=lm_config_dict(SimpleNamespace(config=conf)), lm_path=None)
    for key, classes, kind in (("dit", DIT_CLASSES, ucfg.dit_type), ("vae", VAE_CLASSES, ucfg.vae_type)):
        path = getattr(ucfg, f"{key}_path")
        if path is not None:
            d = diffusers_class(classes[kind]).load_config(local(path), local_files_only=True)
            over.update({key: diffusers_config_dict(SimpleNamespace(config=d)), f"{key}_path": None})
    return ucfg.replace(**over)


def _experts_config(cfg, scenario):
    """The UnifiedConfig of --lm-path / --dit-path / --vae-path (as `UnifiedModel.from_experts` builds it), inlined."""
    from ..models import UnifiedModel

    kw = {k: getattr(cfg, k) for k in ("num_queries", "connector_dim", "connector_layers", "image_size")
          if getattr(cfg, k) is not None}
    return _inline(UnifiedModel.experts_config(cfg.lm_path, cfg.dit_path, cfg.vae_path, edit=scenario.edit, **kw))


def lora_reference(lora_lm, lora_dit, scenario) -> bool:
    """Whether the reference is the base with adapters off (no copy): LoRA on every trained expert."""
    return bool(lora_lm or lora_dit) and (not scenario.train_lm or bool(lora_lm)) and \
        (not scenario.train_dit or bool(lora_dit))


def lora_trainable(model, scenario, lora_lm, lora_dit):
    """Adds the adapters of --lora-lm / --lora-dit to a meta-device `model` and counts what trains: the adapters of an
    adapted expert, all of an unadapted trained one, the connector when the DiT trains. None without LoRA."""
    if not (lora_lm or lora_dit):
        return None
    from ..models.lora import add_lora, parse_lora

    add_lora(model, lm=parse_lora(lora_lm, "lm") if lora_lm else None,
             dit=parse_lora(lora_dit, "dit") if lora_dit else None)
    n = 0
    for expert, trains, lora in ((model.lm, scenario.train_lm, lora_lm), (model.dit, scenario.train_dit, lora_dit)):
        n += sum(p.numel() for k, p in expert.named_parameters() if trains and ("lora_" in k or not lora))
    return n + (sum(p.numel() for p in model.connector.parameters()) if scenario.train_dit else 0)
