"""Atomic checkpoints: a crash mid-save never corrupts the last good checkpoint.

Layout under `<run_dir>/checkpoints/`: `step-<N>/` directories (model.pt, optim.pt, state.pt) and a
`latest` file naming the newest complete one. A save writes `step-<N>.tmp/`, fsyncs the files, renames
the directory into place, then replaces `latest` with os.replace (atomic on POSIX); only then are older
checkpoints beyond `keep` removed. A reader follows `latest`, so a half-written directory is never read.
State holds the step, the RNG states (Python `random`, torch global, the rollout generator) and the
metric history, so a resumed run continues exactly where the uninterrupted one would be.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step: int, payload: dict, *, keep: int = 2) -> Path:
    """payload: name -> object saved with torch.save as <name>.pt. Returns the final directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, obj in payload.items():
        with open(tmp / f"{name}.pt", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
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
    path = Path(path)
    return {p.stem: torch.load(p, map_location="cpu", weights_only=False) for p in sorted(path.glob("*.pt"))}
