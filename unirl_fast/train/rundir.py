"""The run directory, kept true: what it says is what ran.

    <run_dir>/config.json     the resolved config the run was created with (input paths absolute and resolved);
                              written once, never rewritten; config.typed.json: those paths as typed
    <run_dir>/base/           the run's copies of its inputs (train.inputs): model/ and tasks/
    <run_dir>/tasks.json      the data's fingerprint (source, counts, a hash of the tasks); a resume checks it
    <run_dir>/resumes.jsonl   one line per resume that changed a field allowed to change: {"time", "step", "changes"}
    <run_dir>/metrics.jsonl   one record per step and per evaluation; a resume trims it back to the checkpoint's step
                              first (a run killed at step 13 and resumed from step 10 does not log 11-13 twice)
    <run_dir>/evals.jsonl     `unirl-fast eval` results (evaluation never writes config.json)
    <run_dir>/.lock           who trains in the directory (pid, host, since), held with fcntl.flock by that process

One run per directory: a training process holds `.lock` (flock: the kernel drops it when the process ends, however
it ends), so a second run in the same directory is refused with one line naming the holder, and a lock left by a
killed run (a dead pid) is simply taken over. The lock is per process (a second Trainer in the same process
shares it). flock is local to a machine on most network file systems: give each node's run its own directory.

A resume compares its resolved config with config.json before any work (no model built, no data touched): a change
to what the run is (scenario, model, batch shape, optimizer, sampler, seed, ...) is refused with one line naming
the fields; RESUMABLE fields may change (more steps, evaluation and checkpoint cadence, device, op backend, the
directory's own path after a move or copy) and are recorded in resumes.jsonl.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path

from .checkpoint import latest_checkpoint
from .inputs import config_record, earlier_defaults, movable_fields, same_value, tasks_copy, write_tasks_copy

_HELD: dict = {}  # run directory (resolved) -> the fd of its .lock held by this process

RESUMABLE = ("steps", "eval_every", "eval_prompts", "eval_samples", "save_every", "keep_checkpoints", "device",
             "threads", "impl", "run_dir", "report_to",  # run_dir: a run directory may be moved or copied
             "reward_overlap",  # when the scores arrive, not what they are
             "allow_outside_paths",  # where the task files may point, not what the data is: tasks.json checks that
             "reward_timeout", "reward_retries", "reward_concurrency", "reward_batch_size",
             "reward_token_env", "reward_allow_insecure_token",
             "reward_ca_file",  # how a reward service is reached, not what it computes
             "old_logp", "old_logp_lm")  # the old log-probs: the replay's or the sampler's, equal up to round-off
# what a run made before a sampler option existed sampled with (config.json without the key)
_BEFORE_OPTION = {"timestep_schedule": "linspace", "window": "fixed", "window_start": 0, "window_last": None,
                  "window_every": 25, "window_stride": 1, "branch_at": None, "ode_solver": "euler", "ode_tail": 1.0,
                  "old_logp": "rollout", "old_logp_lm": "rollout"}


def _writable_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_run_dir(cfg) -> dict:
    """Read-only check that cfg can use cfg.run_dir: {"new": bool, "changes": {field: (saved, now)},
    "checkpoint_step": int | None}. Raises ValueError (one line) when it cannot."""
    path = Path(cfg.run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run_dir {cfg.run_dir!r} exists and is not a directory")
    base = _writable_parent(path)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"run_dir {cfg.run_dir!r} cannot be created or written ({base} is not a writable directory)")
    saved_path = path / "config.json"
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    step = int(ckpt.name.split("-")[-1]) if ckpt is not None else None
    if not saved_path.is_file():
        if ckpt is not None:
            raise ValueError(f"run_dir {cfg.run_dir!r} has checkpoints but no config.json: it is not a run directory "
                             "this trainer wrote; pick another --run-dir")
        return {"new": True, "changes": {}, "checkpoint_step": None}
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{saved_path} is not valid JSON ({e}); pick another --run-dir") from None
    for key, value in _BEFORE_OPTION.items():  # what runs made before a sampler option sampled with
        saved.setdefault(key, value)
    saved = {**earlier_defaults(saved), **saved}  # and before the options of released checkpoints
    now = config_record(cfg)[0]  # as config.json holds it (tuples are lists there, input paths resolved)
    changes = {k: (saved.get(k), v) for k, v in now.items() if k in saved and not same_value(k, saved[k], v)}
    allowed = RESUMABLE + movable_fields(path, saved)  # + inputs the run reads from its own copy
    blocked = {k: c for k, c in changes.items() if k not in allowed}
    if blocked:
        diff = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in blocked.items())
        raise ValueError(f"run_dir {cfg.run_dir!r} holds a run with other settings ({diff}); resume it with its "
                         f"own settings (only {', '.join(allowed)} may change) or pick another --run-dir")
    return {"new": False, "changes": changes, "checkpoint_step": step}


def check_tasks_unchanged(run_dir, taskset) -> None:
    """A resumed run's data must be what it was created with: tasks.json's fingerprint against the source's now."""
    saved = Path(run_dir) / "tasks.json"
    if not saved.is_file():
        return
    before, now = json.loads(saved.read_text()), taskset.fingerprint()
    if [before[k] for k in ("train", "eval", "sha1")] != [now[k] for k in ("train", "eval", "sha1")]:
        raise ValueError(f"run_dir {str(run_dir)!r} was created with other tasks ({before['tasks']}: {before['train']} "
                         f"train / {before['eval']} held-out, sha1 {before['sha1'][:12]}; now {now['tasks']}: "
                         f"{now['train']} / {now['eval']}, sha1 {now['sha1'][:12]}): the file changed since; restore "
                         "it or pick another --run-dir")


def create_or_resume(cfg, info: dict) -> None:
    """Write config.json (and tasks.json, the data's fingerprint) for a new run, or record a resume's allowed changes
    (the main process only)."""
    path = Path(cfg.run_dir)
    path.mkdir(parents=True, exist_ok=True)
    if info.get("tasks") is not None and not (path / "tasks.json").is_file():
        (path / "tasks.json").write_text(json.dumps(info["tasks"].fingerprint(), indent=2))
    if info.get("tasks") is not None and tasks_copy(path) is None:
        write_tasks_copy(info["tasks"], path)  # the run's own copy: the task file may move after this
    if info["new"]:
        resolved, typed = config_record(cfg)
        (path / "config.typed.json").write_text(json.dumps(typed, indent=2))
        tmp = path / "config.json.tmp"
        tmp.write_text(json.dumps(resolved, indent=2))
        os.replace(tmp, path / "config.json")
    elif info["changes"]:
        rec = {"time": _now(), "step": info["checkpoint_step"],
               "changes": {k: list(v) for k, v in info["changes"].items()}}
        with open(path / "resumes.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def lock_run_dir(run_dir) -> str | None:
    """Take `<run_dir>/.lock` for this process (creating the directory); ValueError (one line) naming the holder when
    another live process has it. Returns a note when it took over a lock left by a process that is gone."""
    import fcntl
    import socket

    path = Path(run_dir)
    key = str(path.resolve())
    if key in _HELD:
        return None
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    before = _holder(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        who = f"pid {before.get('pid')} on {before.get('host')}, since {before.get('since')}" if before else \
            "another process"
        raise ValueError(f"run_dir {str(run_dir)!r} is in use by another run ({who}): wait for it to end, stop it, "
                         "or pick another --run-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode(), 0)
    _HELD[key] = fd
    if before and before.get("pid") != os.getpid():
        return (f"run_dir {str(run_dir)!r}: took over the lock of pid {before.get('pid')} on {before.get('host')} "
                "(that process is gone)")
    return None


def unlock_run_dir(run_dir) -> None:
    """Release this process's lock on run_dir (the file stays, emptied: removing it could let two runs in)."""
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)


def _holder(fd) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def trim_metrics(path, step: int | None) -> int:
    """Keep only records up to `step` (a resume from that checkpoint writes the later ones again; None: no checkpoint,
    the run starts again from step 0 and keeps none); returns how many were dropped. Atomic: written to a temporary
    file and renamed."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = [] if step is None else [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) == len(lines):
        return 0
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


def saved_config(run_dir, **over):
    """A run directory's config.json as the TrainConfig one process reads it with (`eval`, `export`): zero_stage off,
    `over` applied, validated. ValueError when the directory is not a run directory."""
    from .config import TrainConfig

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} has no config.json (not a run directory)")
    saved = json.loads(path.read_text())
    for key, value in _BEFORE_OPTION.items():  # what runs made before a sampler option sampled with
        saved.setdefault(key, value)
    saved = {**earlier_defaults(saved), **saved}  # and before the options of released checkpoints
    cfg = TrainConfig(**saved)  # run_dir as given now: the directory may have moved
    return dataclasses.replace(cfg, zero_stage=None, run_dir=str(run_dir), **over).validate()


def append_eval(run_dir, record: dict) -> Path:
    path = Path(run_dir) / "evals.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"time": _now(), **record}) + "\n")
    return path


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
