"""Task sources: `load_tasks(spec, scenario)` -> TaskSet, whatever the data.

    world                 the embedded synthetic world (its own fixed train / held-out split)
    prompts.jsonl         one JSON object per line (a .json file holding a list of objects reads the same)
    prompts.csv           a header row, then one row per task
    DIR                   a Hugging Face `datasets` directory (`save_to_disk`), read with `datasets.load_from_disk`

Rows (JSON keys, CSV columns, dataset columns): `prompt` (required), `image` (a path relative to the file or
directory, inside it unless `allow_outside_paths`; a dataset's Image column works too, its cells kept encoded and
decoded when a step uses them, fingerprinted by a hash of their bytes), `answer`, `context`, `inverse`, `split`
("train", or "eval" / "test" / "validation" for held-out); every other key goes to the task's `meta` for the
reward. GenEval's `evaluation_metadata.jsonl` reads as it is: its `tag`, `include` and `exclude` land in `meta`
(checked for GenEval's shape: include is a list of {"class": str, "count": int, ...}).

Split: as given (a `split` key on every row, or a dataset's splits); when the rows give none, derived from a
seeded hash of the prompt: a prompt lands in the held-out split when crc32(f"{split_seed}:{prompt}") falls in the
lowest `eval_fraction` of the range, so the split is stable across runs and machines and a repeated prompt never
sits on both sides. A bad row is an error naming the file and the line (or the dataset row).
"""
from __future__ import annotations

import csv
import hashlib
import json
import zlib
from pathlib import Path

from .base import DatasetImage, Task, TaskSet

EVAL_SPLITS = ("eval", "test", "validation", "valid", "held-out", "heldout")
KNOWN_KEYS = ("prompt", "answer", "image", "context", "inverse", "split")


def load_tasks(spec: str, scenario, *, eval_fraction: float = 0.2, split_seed: int = 0,
               vision: bool = False, allow_outside_paths: bool = False) -> TaskSet:
    """Tasks of `spec` ("world", a .jsonl / .json / .csv file or a datasets directory) for `scenario`, checked
    for what the scenario needs (edits need a source image on every task; understanding a context to read, or with
    vision=True, a run whose LM has a vision tower, an image to look at). An image path that leaves the file's
    directory (absolute, or through '..' or a link) is refused unless allow_outside_paths."""
    if spec == "world":
        from .world import world_tasks

        return TaskSet("world", world_tasks(scenario, "train"), world_tasks(scenario, "eval"))
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"tasks {spec!r}: no such file or directory (give 'world', a .jsonl / .csv file or a "
                         "datasets directory)")
    if path.is_dir():
        rows = _dataset_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
    elif path.suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise ValueError(f"tasks {spec!r}: unknown file type {path.suffix!r} (.jsonl, .json, .csv, or a datasets "
                         "directory)")
    tasks = [(_task(row, where, base, allow_outside_paths), row.get("split") if split is None else split)
             for row, where, base, split in rows]
    if not tasks:
        raise ValueError(f"tasks {spec!r} holds no rows")
    for t, _ in tasks:
        _check_for_scenario(t, scenario, vision)
    return _split(spec, tasks, eval_fraction, split_seed)


# readers: each yields (row dict, "file:line", base directory for relative paths, split or None) ------------------
def _json_rows(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        for i, row in enumerate(data):
            yield _check_row(row, f"{path}[{i}]"), f"{path}[{i}]", path.parent, None
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
        yield _check_row(row, where), where, path.parent, None


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise ValueError(f"{path}:1: the header has no 'prompt' column (columns: {reader.fieldnames})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise ValueError(f"{where}: more fields than the header's {len(reader.fieldnames)}")
            yield {k: v for k, v in row.items() if v not in ("", None)}, where, path.parent, None


def _dataset_rows(path: Path):
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise ValueError(f"tasks {str(path)!r} is a directory but not a Hugging Face datasets directory (no "
                         "dataset_dict.json or state.json: write it with Dataset(Dict).save_to_disk)")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"tasks {str(path)!r} is a datasets directory: install the `datasets` package "
                         "(pip install 'unirl-fast[data]')") from None
    data = datasets.load_from_disk(str(path))
    parts = data.items() if isinstance(data, datasets.DatasetDict) else [(None, data)]
    for name, ds in parts:
        split = None if name is None else ("eval" if name in EVAL_SPLITS else "train")
        if name is not None and name not in EVAL_SPLITS and name != "train":
            raise ValueError(f"tasks {str(path)!r}: split {name!r} is neither train nor held-out "
                             f"({', '.join(EVAL_SPLITS)})")
        if "prompt" not in ds.column_names:
            raise ValueError(f"tasks {str(path)!r}{'' if name is None else f' split {name!r}'}: no 'prompt' column "
                             f"(columns: {ds.column_names})")
        if isinstance(ds.features.get("image"), datasets.Image):  # cells stay encoded: decoded when a step uses one
            ds = ds.cast_column("image", datasets.Image(decode=False))
        for i, row in enumerate(ds):
            where = f"{path}[{name + ':' if name else ''}{i}]"
            row = _check_row(dict(row), where)
            cell = row.get("image")
            if isinstance(cell, dict) and set(cell) == {"bytes", "path"}:
                row["image"] = DatasetImage(ds, i, "image", hashlib.sha1(cell["bytes"]).hexdigest()) \
                    if cell["bytes"] is not None else cell["path"]  # a path-only cell: a file, checked as one
            yield row, where, path, split


def _check_row(row, where):
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a task must be a JSON object, got {type(row).__name__}")
    return row


# one row -> Task ------------------------------------------------------------------------------------------------
def _task(row: dict, where: str, base: Path, allow_outside: bool = False) -> Task:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    text = {}
    for key in ("answer", "context", "inverse"):
        v = row.get(key, "")
        if v is None:
            v = ""
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ValueError(f"{where}: {key!r} must be a string, got {v!r}")
        text[key] = str(v)
    image = row.get("image")
    if image is not None and not _is_pil(image) and not isinstance(image, DatasetImage):
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: 'image' must be a path (relative to {base}), got {image!r}")
        p = Path(image) if Path(image).is_absolute() else base / image
        if not allow_outside and not p.resolve().is_relative_to(base.resolve()):
            raise ValueError(f"{where}: image {image!r} is outside the data directory {base} (an absolute path, "
                             "'..' or a link out of it): a task file names files beside it; pass "
                             "--allow-outside-paths if you mean it")
        if not p.is_file():
            raise ValueError(f"{where}: image {image!r} does not exist (looked for {p})")
        image = str(p.resolve())
    meta = {k: v for k, v in row.items() if k not in KNOWN_KEYS}
    if "tag" in meta and "include" in meta:
        _check_geneval(meta, where)
    return Task(prompt, text["answer"], image, text["context"], text["inverse"], meta, where)


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(x, Image.Image)


def _check_geneval(meta: dict, where: str) -> None:
    """GenEval metadata: include (and exclude) are lists of {"class": str, "count": int >= 0, "color": str,
    "position": [relation, index]}, the optional keys as GenEval's evaluator reads them."""
    for key in ("include", "exclude"):
        items = meta.get(key, [])
        if not isinstance(items, list):
            raise ValueError(f"{where}: GenEval {key!r} must be a list, got {items!r}")
        for j, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("class"), str):
                raise ValueError(f"{where}: GenEval {key}[{j}] needs a 'class' string, got {it!r}")
            count = it.get("count", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"{where}: GenEval {key}[{j}] 'count' must be an integer >= 0, got {count!r}")
            pos = it.get("position")
            if pos is not None and not (isinstance(pos, list) and len(pos) == 2 and isinstance(pos[0], str)
                                        and isinstance(pos[1], int)):
                raise ValueError(f"{where}: GenEval {key}[{j}] 'position' must be [relation, index], got {pos!r}")


def _check_for_scenario(t: Task, scenario, vision: bool = False) -> None:
    if scenario.edit and t.image is None:
        raise ValueError(f"{t.origin}: scenario {scenario.name!r} edits a source image, but this task has no 'image'")
    if scenario.name == "understand":
        if vision and t.image is None:
            raise ValueError(f"{t.origin}: scenario 'understand' with a vision-language LM asks about the task's "
                             "'image', but this task has none")
        if not vision and not t.context:
            raise ValueError(f"{t.origin}: scenario 'understand' needs a 'context' (the LM expert of this run has "
                             "no vision tower: it reads a description of the image)")


# split ------------------------------------------------------------------------------------------------------------
def _split(name, tasks, eval_fraction, split_seed) -> TaskSet:
    rows_split = [s for _, s in tasks]
    explicit = [r for r in rows_split if r is not None]
    if explicit and len(explicit) != len(tasks):
        missing = next(t for (t, _), r in zip(tasks, rows_split) if r is None)
        raise ValueError(f"{missing.origin}: no 'split' although other rows give one (give every row a split, or "
                         "none to derive it)")
    if explicit:
        out = {"train": [], "eval": []}
        for (t, _), r in zip(tasks, rows_split):
            if r not in ("train", *EVAL_SPLITS):
                raise ValueError(f"{t.origin}: split {r!r} is neither 'train' nor held-out ({', '.join(EVAL_SPLITS)})")
            out["train" if r == "train" else "eval"].append(t)
        return TaskSet(name, out["train"], out["eval"])
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1) to derive a held-out split, got {eval_fraction}")
    keys = {t.prompt: zlib.crc32(f"{split_seed}:{t.prompt}".encode()) for t, _ in tasks}
    cut = eval_fraction * 2 ** 32
    held = {p for p, k in keys.items() if k < cut}
    if not held and len(keys) > 1:  # a small file: the prompt with the lowest hash is held out (still seeded)
        held = {min(keys, key=keys.get)}
    return TaskSet(name, [t for t, _ in tasks if t.prompt not in held], [t for t, _ in tasks if t.prompt in held])
