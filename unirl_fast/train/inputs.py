"""A run's inputs (your experts' directories or a saved model, the task file and its images, a chat template) and
the run directory's own copies of them, so that the run directory is self-contained after its start.

    <run_dir>/base/model/   the model the run started from, in the split layout (`UnifiedModel.save_pretrained`):
                            lm/ with its tokenizer (and the chat template in use), generation config and image
                            processor, dit/, vae/, the initial connector; each expert's weights in the dtype its input
                            files had (a bf16 release stays bf16 on disk: a lossless copy at half the fp32 size);
                            scheduler/ when the DiT came from a pipeline (its sampling-schedule default)
    <run_dir>/base/tasks/   tasks.jsonl (every task's fields and split, as JSON) and images/ (each task image file
                            hard-linked or copied; an image held in memory saved as PNG)

Both are written when the run is created; resume, `eval` and `export` build the model from base/model and read the
tasks from base/tasks when their source no longer exists (a source still there is compared with tasks.json and a
changed one refused, as before), so moving or deleting the inputs after the start breaks nothing. Runs built from a
preset need no copy: their warmed-up base is already cached under base/. Reward models (`clip:DIR`) and services are
not copied: they score, they are not what trains.

config.json holds every input path absolute and resolved (so `eval` / `export` work from any directory; it still
reads as `TrainConfig(**json)`), config.typed.json beside it the forms typed on the command line; a resume compares
paths by what they resolve to, and an input path of a run that holds its copy may change (a moved directory),
recorded in resumes.jsonl like the other allowed changes.

Checks (`check_inputs`, in preflight, before the run directory exists): models.dirs on the expert directories, a
saved model's unified_config.json, the chat-template file; skipped on a resume that reads the run's copy.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

MODEL_COPY = ("base", "model")
TASKS_COPY = ("base", "tasks")
MODEL_FIELDS = ("lm_path", "dit_path", "vae_path", "model_path", "lm_variant", "dit_variant", "vae_variant")
PATH_FIELDS = ("lm_path", "dit_path", "vae_path", "model_path", "tasks", "chat_template", "deepspeed_config")
FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "file": "file"}


def model_copy(run_dir) -> Path | None:
    """The run's copy of the model it started from, when it has one."""
    path = Path(run_dir).joinpath(*MODEL_COPY)
    return path if (path / "unified_config.json").is_file() else None


def tasks_copy(run_dir) -> Path | None:
    path = Path(run_dir).joinpath(*TASKS_COPY)
    return path if (path / "tasks.jsonl").is_file() else None


def _is_path(field: str, value) -> bool:
    if value is None:
        return False
    return not ((field == "tasks" and value == "world") or (field == "chat_template" and value in ("auto", "none")))


def resolve(value: str) -> str:
    return str(Path(value).expanduser().resolve())


def _resolve_reward(spec: str) -> str:
    """clip:DIR / pickscore:DIR with DIR resolved (the weight kept); any other spec as it is."""
    from ..rewards import parse_spec

    target, _ = parse_spec(spec)
    name, _, directory = target.partition(":")
    if name not in ("clip", "pickscore") or not directory:
        return spec
    return f"{name}:{resolve(directory)}{spec.strip()[len(target):]}"  # the "=WEIGHT" suffix, when given, kept


def config_record(cfg) -> tuple[dict, dict]:
    """(what config.json holds: the config with every input path absolute and resolved, what config.typed.json holds:
    the form each such path was given in)."""
    rec = json.loads(json.dumps(dataclasses.asdict(cfg)))
    typed = {}
    for field in PATH_FIELDS:
        value = rec.get(field)
        if _is_path(field, value) and resolve(value) != value:
            typed[field], rec[field] = value, resolve(value)
    rewards = [_resolve_reward(r) for r in rec.get("reward", [])]
    if rewards != rec.get("reward", []):
        typed["reward"], rec["reward"] = rec["reward"], rewards
    return rec, typed


def same_value(field: str, saved, now) -> bool:
    """Whether a config.json value and a resolved one name the same thing (an older run's relative paths are
    resolved against the working directory)."""
    if saved == now:
        return True
    if field in PATH_FIELDS and _is_path(field, saved) and _is_path(field, now):
        return resolve(saved) == now
    if field == "reward" and isinstance(saved, list):
        return [_resolve_reward(r) for r in saved] == now
    return False


def earlier_defaults(saved: dict) -> dict:
    """What a run made before these options did, where today's default would do otherwise: raw prompts for an HF
    tokenizer (chat_template "none"), task images stretched into the DiT's square (image_resize "stretch"). A resume
    then compares with those, and `eval` evaluates as the run trained."""
    out = {}
    if saved.get("lm_path") or saved.get("model_path"):
        out["chat_template"] = "none"
    if saved.get("tasks", "world") != "world":
        out["image_resize"] = "stretch"
    return out


def movable_fields(run_dir, saved: dict) -> tuple:
    """Fields a resume may change because the run reads its own copy of that input, not the input."""
    out = ()
    if model_copy(run_dir) is not None:
        out += MODEL_FIELDS
        if _is_path("chat_template", saved.get("chat_template")):
            out += ("chat_template",)  # the template is in the copy's tokenizer; "auto" / "none" are choices
    if tasks_copy(run_dir) is not None:
        out += ("tasks",)  # its content is still compared with tasks.json when the new source exists
    return out


# checks ------------------------------------------------------------------------------------------------------------
def check_inputs(cfg, scenario) -> None:
    """Every input directory and file checked before any work (ValueError, one line); nothing to check when the run
    already holds its copy of the model (a resume reads that)."""
    from .distributed import requested

    if cfg.frozen_dtype != "fp32" and requested(cfg):
        raise ValueError(f"bad config: --frozen-dtype {cfg.frozen_dtype} under DeepSpeed ZeRO is not supported (ZeRO "
                         "here is tested with fp32 weights only): use --frozen-dtype fp32")
    if model_copy(cfg.run_dir) is not None:
        return
    if cfg.model_path is not None and not (Path(cfg.model_path) / "unified_config.json").is_file():
        raise ValueError(f"bad config: model_path {cfg.model_path!r} is not a saved UnifiedModel directory (no "
                         "unified_config.json)")
    if cfg.lm_path is not None:
        from ..models.dirs import check_expert_dirs

        try:
            check_expert_dirs(cfg.lm_path, cfg.dit_path, cfg.vae_path, edit=scenario.edit, variants=_variants(cfg))
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"bad config: {e}") from None
    if _is_path("chat_template", cfg.chat_template):
        from ..models.tokenizer import read_chat_template

        if not run_has_hf_tokenizer(cfg):
            raise ValueError(f"bad config: chat_template {cfg.chat_template!r}: preset {cfg.preset!r} uses the "
                             "character tokenizer, which has no chat format (give an LM with --lm-path)")
        try:
            read_chat_template(cfg.chat_template)
        except ValueError as e:
            raise ValueError(f"bad config: {e}") from None


def run_has_hf_tokenizer(cfg) -> bool:
    if cfg.lm_path is not None:
        return True
    if cfg.model_path is not None:
        from ..models.config import UnifiedConfig

        return UnifiedConfig.load(cfg.model_path).tokenizer == "lm"
    return False


def _variants(cfg) -> dict:
    return {k: getattr(cfg, f"{k}_variant") for k in ("lm", "dit", "vae") if getattr(cfg, f"{k}_variant")}


# the model ---------------------------------------------------------------------------------------------------------
def expert_dtypes(cfg, scenario) -> dict:
    """The experts' weight dtypes: fp32 for an expert that trains (its fp32 weights are the master copy; also its
    LoRA base), --frozen-dtype for one that does not and for the autoencoder."""
    frozen = FROZEN_DTYPES[cfg.frozen_dtype]
    return {"lm": torch.float32 if scenario.train_lm else frozen,
            "dit": torch.float32 if scenario.train_dit else frozen, "vae": frozen}


def cast_frozen(model, cfg, scenario) -> None:
    """Frozen experts of a model built in fp32 (a preset's) into --frozen-dtype (bf16 / fp16; "file": as built)."""
    for name, dtype in expert_dtypes(cfg, scenario).items():
        module = getattr(model, name)
        if module is not None and isinstance(dtype, torch.dtype) and dtype != torch.float32:
            module.to(dtype)


def load_run_model(cfg, scenario, *, attn: str, device, log, write_copy: bool):
    """The model a run trains from its inputs (--lm-path / --dit-path / --vae-path, or --model-path): from the run's
    copy when it has one, else from the inputs, then (write_copy: a new run's main process) copied into the run."""
    from ..models import UnifiedModel
    from ..models.tokenizer import HFTokenizer

    dtypes = expert_dtypes(cfg, scenario)
    copy = model_copy(cfg.run_dir)
    template = cfg.chat_template
    if copy is not None:
        model = UnifiedModel.from_pretrained(copy, device=device, attn_implementation=attn, dtypes=dtypes)
        log(f"model: the run's copy of its inputs ({copy})")
        template = "auto" if _is_path("chat_template", template) else template  # the copy's tokenizer holds it
    elif cfg.model_path:
        model = UnifiedModel.from_pretrained(cfg.model_path, device=device, attn_implementation=attn, dtypes=dtypes)
    else:
        kw = {k: getattr(cfg, k) for k in ("num_queries", "connector_dim", "connector_layers", "image_size")
              if getattr(cfg, k) is not None}
        model = UnifiedModel.from_experts(cfg.lm_path, cfg.dit_path, cfg.vae_path, edit=scenario.edit,
                                          attn_implementation=attn, dtypes=dtypes, variants=_variants(cfg),
                                          **kw).to(device)
        log(f"model: LM {cfg.lm_path}, DiT {cfg.dit_path}" + (f", autoencoder {cfg.vae_path}" if cfg.vae_path
                                                               else "") + " (new queries and connector)")
    if isinstance(model.tokenizer, HFTokenizer):
        model.tokenizer.use_chat_template(template)
    if copy is None and write_copy:
        write_model_copy(model, cfg.run_dir, log, input_dit_dir(cfg))
    return model


def input_dit_dir(cfg) -> str | None:
    """The DiT directory of the run's inputs, whose pipeline's scheduler config (scheduler/ beside it) gives the
    default sampling schedule: --dit-path, or the dit/ of a --model-path saved in the split layout (`unirl-fast
    export` writes the run's scheduler/ beside it)."""
    if cfg.dit_path is not None:
        return cfg.dit_path
    if cfg.model_path is not None and (Path(cfg.model_path) / "dit").is_dir():
        return str(Path(cfg.model_path) / "dit")
    return None


def copy_scheduler_config(dit_dir, root) -> None:
    """The scheduler config of the pipeline `dit_dir` belongs to (scheduler/ beside it), where it has one, copied
    beside `root`/dit as a pipeline keeps it: a model directory's sampling-schedule default."""
    from ..rollout.schedule import scheduler_config_path

    src, dst = scheduler_config_path(dit_dir), scheduler_config_path(Path(root) / "dit")
    if src.is_file():
        dst.parent.mkdir()
        shutil.copy2(src, dst)


def write_model_copy(model, run_dir, log, dit_path=None) -> Path:
    """base/model: the model as it starts, each expert in its input files' dtype, and the scheduler config of the DiT's
    pipeline where it has one (scheduler/ beside dit/, as in the pipeline: the sampling schedule's default); written to
    a temporary directory and renamed, so a crash leaves no half copy."""
    from ..models.vlm import is_vlm

    final = Path(run_dir).joinpath(*MODEL_COPY)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtypes = {k: v for k, v in model.file_dtypes.items() if v is not None}
    # a model with no HF tokenizer, image processor or dtype to keep (a preset's, or a --model-path saved by this
    # trainer) is copied in the single-file layout: no library save path, so a single-process run does not import
    # DeepSpeed through transformers' save (accelerate imports it when installed); real experts keep their layouts
    single = not dtypes and model.config.tokenizer != "lm" and not is_vlm(model.lm)
    model.save_pretrained(tmp, layout="single" if single else "split", dtypes=dtypes)
    if dit_path is not None:
        copy_scheduler_config(dit_path, tmp)
    os.replace(tmp, final)
    log(f"model: copied into {final} (export, eval and resume read it; the inputs may move)")
    return final


# the tasks ---------------------------------------------------------------------------------------------------------
def run_tasks(cfg, scenario, vision: bool):
    """(TaskSet, "source" | "copy"): the task source, or the run's copy of it when the source no longer exists."""
    from ..tasks import load_tasks

    copy = tasks_copy(cfg.run_dir)
    if cfg.tasks == "world" or Path(cfg.tasks).exists() or copy is None:
        return load_tasks(cfg.tasks, scenario, eval_fraction=cfg.eval_fraction, split_seed=cfg.split_seed,
                          allow_outside_paths=cfg.allow_outside_paths, vision=vision), "source"
    return read_tasks_copy(copy, cfg.tasks), "copy"


def write_tasks_copy(taskset, run_dir) -> Path | None:
    """base/tasks: tasks.jsonl (every task of a file / dataset source with its split; JSON, nothing that could run code
    on reading) and images/ (each image file hard-linked or copied once; an image held in memory, a dataset's cell
    or a meta value, saved as PNG). None for the world, and for a source whose meta holds a value JSON cannot keep
    (a warning says so: resume and eval then need the source itself)."""
    if taskset.name == "world":
        return None
    final = Path(run_dir).joinpath(*TASKS_COPY)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    lines, copied = [], {}
    try:
        for split, tasks in (("train", taskset.train), ("eval", taskset.eval)):
            for t in tasks:
                row = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
                if isinstance(t.image, str):  # one copy per file, however many tasks show it
                    if t.image not in copied:
                        copied[t.image] = f"images/{len(copied)}{Path(t.image).suffix}"
                        _link_or_copy(t.image, tmp / copied[t.image])
                    row["image"] = copied[t.image]
                lines.append(json.dumps({"split": split, **_to_json(row, tmp)}))
    except TypeError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"the run keeps no copy of its tasks {taskset.name!r} ({e}): resume and eval read the source",
                      stacklevel=2)
        return None
    (tmp / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    os.replace(tmp, final)
    return final


def _to_json(value, tmp: Path):
    """A task field as JSON: images in memory saved as PNG under images/ and written as {"$image": path}."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, tmp) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json(v, tmp) for k, v in value.items()}
    from PIL import Image

    from ..tasks.base import DatasetImage

    if isinstance(value, (Image.Image, DatasetImage)):
        name = f"images/mem-{sum(1 for _ in (tmp / 'images').iterdir())}.png"
        (value if isinstance(value, Image.Image) else value.open()).save(tmp / name)
        return {"$image": name}
    raise TypeError(f"a value of type {type(value).__name__} is not JSON")


def _from_json(value, copy: Path):
    if isinstance(value, list):
        return [_from_json(v, copy) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$image"}:
            from PIL import Image

            with Image.open(copy / value["$image"]) as im:
                im.load()
                return im.copy()
        return {k: _from_json(v, copy) for k, v in value.items()}
    return value


def _link_or_copy(src, dst) -> None:
    """A hard link when the file system allows (no space used; survives the original's removal), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_tasks_copy(copy: Path, name: str):
    from ..tasks import Task, TaskSet

    sides = {"train": [], "eval": []}
    for line in (copy / "tasks.jsonl").read_text().splitlines():
        row = json.loads(line)
        split = row.pop("split")
        image = row["image"]
        row = _from_json(row, copy)
        if isinstance(image, str):
            row["image"] = str(copy / image)
        sides[split].append(Task(**row))
    return TaskSet(f"{name} (the run's copy, {copy})", sides["train"], sides["eval"])
