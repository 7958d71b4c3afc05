"""Atomic checkpoints that load without running code: a crash mid-save never corrupts the last good checkpoint, and
reading a checkpoint someone else wrote never executes anything from it.

Layout under `<run_dir>/checkpoints/`: `step-<N>/` directories and a `latest` file naming the newest complete one.
A save writes `step-<N>.tmp/`, fsyncs the files, renames the directory into place, then replaces `latest` with
os.replace (atomic on POSIX); only then are older checkpoints beyond `keep` removed. A reader follows `latest`, so a
half-written directory is never read. State holds the step, the RNG states (Python `random`, torch global, the
rollout generator) and the metric history, so a resumed run continues exactly where the uninterrupted one would be.

No pickle: each payload entry `name -> object` is written as `<name>.safetensors` (its tensors) and, unless it is a
plain {name: tensor} mapping (the model's weights), `<name>.json` holding everything else (numbers, strings, None,
lists, dicts: the optimizer's state, the step, the history, the Python RNG state), where a tensor stands as
{"__tensor__": key}, a tuple as {"__tuple__": [...]} and a dict with other than string keys as
{"__items__": [[key, value], ...]}. Reading them parses JSON and safetensors headers, nothing else.

Checkpoints of earlier versions (`<name>.pt`, torch.save) still load, with torch.load(weights_only=True): what they
hold (tensors, numbers, strings, tuples, dicts) is what that loader allows. A .pt file with anything else in its
pickle (a call to a function: the way a malicious file runs code) is refused with one line naming the file and the
call, before any model is built (`check_checkpoint`), and the load itself would refuse it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

_MARKS = ("__tensor__", "__tuple__", "__items__")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely (one line, naming the file); nothing in it was run."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# the pickle-free format ---------------------------------------------------------------------------------------
def _encode(obj, tensors: dict, where: str):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKS for k in obj):
            return {k: _encode(v, tensors, f"{where}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}/{k}")]
                              for k, v in obj.items()]}
    raise TypeError(f"checkpoint entry {where}: a {type(obj).__name__} cannot be saved without pickle")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _storable(tensors: dict) -> dict:
    """CPU, contiguous, and no two sharing memory (safetensors refuses shared storage: tied weights get a copy)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def write_entry(directory, name: str, obj) -> list:
    """`obj` as `<name>.safetensors` (+ `<name>.json`) in `directory`; returns the files written (not fsynced)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    flat = isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())
    tensors = dict(obj) if flat else {}
    tree = None if flat else _encode(obj, tensors, name)
    files = []
    if tensors:
        files.append(directory / f"{name}.safetensors")
        save_file(_storable(tensors), str(files[-1]))
    if tree is not None:
        files.append(directory / f"{name}.json")
        files[-1].write_text(json.dumps(tree))
    return files


ENTRY_SUFFIXES = (".safetensors", ".json", ".pt")  # this version's tensors / everything else, an earlier version's


def has_entry(directory, name: str) -> bool:
    """Whether a checkpoint directory holds entry `name` in any form read_entry reads."""
    return any((Path(directory) / f"{name}{ext}").is_file() for ext in ENTRY_SUFFIXES)


def read_entry(directory, name: str, *, allow=()):
    """What write_entry wrote, or an earlier version's `<name>.pt` (torch.load, weights_only=True, with the classes in
    `allow` permitted). CheckpointError names the file when it cannot be read safely."""
    directory = Path(directory)
    st, js, pt = (directory / f"{name}{ext}" for ext in ENTRY_SUFFIXES)
    if st.is_file() or js.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(st), device="cpu") if st.is_file() else {}
            return _decode(json.loads(js.read_text()), tensors) if js.is_file() else tensors
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint file {js if js.is_file() else st} cannot be read ({e}); "
                                  "it is damaged or was not written by unirl_fast") from None
    if not pt.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {name!r} entry ({name}.safetensors / .json / .pt)")
    return safe_torch_load(pt, allow=allow)


def safe_torch_load(path, *, allow=(), map_location="cpu"):
    """torch.load with weights_only=True (and the classes in `allow`): a pickle that would call anything else is a
    CheckpointError, and nothing from it runs."""
    check_pickle(path, allow=allow)
    try:
        with torch.serialization.safe_globals(list(allow)):  # torch.serialization.load: torch.load may be ours
            return torch.serialization.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, f"a safe load stops at it ({_reason(e)})") from None


@contextlib.contextmanager
def weights_only_loads(allow=()):
    """Within the block every torch.load is safe_torch_load, whatever its caller asks: for libraries (DeepSpeed)
    whose checkpoint readers pass weights_only=False."""
    real = torch.load

    def load(f, map_location=None, *args, **kwargs):
        return safe_torch_load(f, allow=allow, map_location=map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def check_pickle(path, *, allow=()) -> None:
    """Refuse a torch.save file whose pickle names a function or class that a weights_only load does not allow
    (read statically: nothing is unpickled)."""
    names = {c if isinstance(c, str) else f"{c.__module__}.{c.__qualname__}" for c in allow}
    if not zipfile.is_zipfile(path):  # torch's legacy format: no static reading, the weights_only load decides
        return
    try:
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in names]
    except Exception as e:  # a damaged archive: whatever the reader raises, the file is not loaded
        raise _refused(path, f"its pickle cannot be read ({type(e).__name__})") from None
    if unsafe:
        raise _refused(path, f"its pickle calls {', '.join(sorted(unsafe)[:4])}, which a safe load does not allow")


def _reason(e) -> str:
    """The line of torch's weights_only error that names what was refused."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return next((x for x in lines if "Unsupported" in x or "GLOBAL" in x), lines[0] if lines else type(e).__name__)


def _refused(path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file {path} is refused: {why}; nothing in it was run (unirl_fast checkpoints "
                           "hold only tensors, numbers and strings, so something else made this file: take the run "
                           "from a source you trust, or start a new --run-dir)")


def check_checkpoint(path, *, allow=()) -> None:
    """Before any work: every pickle file of the checkpoint directory `path` (recursively) only names what a safe load
    allows (plus `allow`). The pickle-free files need no check: reading them runs nothing."""
    if path is None:
        return
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".pkl"):
            check_pickle(p, allow=allow)


def check_run_files(run_dir) -> None:
    """check_checkpoint on a run directory's latest checkpoint (DeepSpeed's ds/ files may name its few classes:
    `distributed.DEEPSPEED_GLOBALS`), and an earlier version's samples_before.pt."""
    from .distributed import DEEPSPEED_GLOBALS

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    check_checkpoint(latest_checkpoint(run_dir), allow=DEEPSPEED_GLOBALS)
    if (run_dir / "samples_before.pt").is_file():
        check_pickle(run_dir / "samples_before.pt")


# atomic directories -------------------------------------------------------------------------------------------
def save_checkpoint(run_dir, step: int, payload: dict, *, keep: int = 2) -> Path:
    """payload: name -> object, each written by write_entry. Returns the final directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, obj in payload.items():
        write_entry(tmp, name, obj)
    fsync_tree(tmp)
    return publish_checkpoint(tmp, final, keep=keep)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` and the directories themselves (for files written by other code)."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [p for p in Path(path).rglob("*") if p.is_dir()] + [Path(path)]:
        _fsync_dir(d)


def publish_checkpoint(tmp: Path, final: Path, *, keep: int = 2) -> Path:
    """Rename a complete `tmp` directory to `final`, point `latest` at it (atomically), prune old ones."""
    root = final.parent
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist: the checkpoint folder was "
                                "changed by hand")
    return path


def load_checkpoint(path) -> dict:
    """Every entry of a checkpoint directory (this version's files or an earlier version's .pt), loaded safely."""
    path = Path(path)
    names = sorted({p.stem for p in path.iterdir() if p.is_file() and p.suffix in ENTRY_SUFFIXES})
    return {n: read_entry(path, n) for n in names if not n.startswith("state-rank")}
