"""Experiment trackers (`--report-to`): what a run writes to metrics.jsonl and its sample sheets, mirrored live.

    --report-to tensorboard|wandb|mlflow|trackio|none   (repeatable; none: the default, metrics.jsonl only)

Every metrics.jsonl record goes to each tracker as scalars at the record's step, named `<phase>/<key>` (train/reward,
train/phase/reward_ms, eval/eval_reward, ...; non-numbers are left out), each sample sheet (samples_before.png,
samples_after.png, samples.png) as an image, and the resolved config once, when the run starts. Each tracker is an
optional extra (`pip install 'unirl-fast[tensorboard]'`, `[wandb]`, `[mlflow]`, `[trackio]`); a missing package is
one line in preflight, before any work. Where the data goes:

    tensorboard   <run_dir>/tensorboard/ (event files; `tensorboard --logdir <run_dir>/tensorboard`). A resume purges
                  the events after its checkpoint's step, so no step shows twice.
    wandb         wandb's own settings (WANDB_MODE=offline keeps it local, under <run_dir>/wandb/); the run id is kept
                  in <run_dir>/trackers.json so a resume continues the same W&B run (wandb drops points at steps it
                  has already seen: the steps redone after a resume from an earlier checkpoint keep their first values
                  there).
    mlflow        MLFLOW_TRACKING_URI, else a file store in <run_dir>/mlruns (MLflow 3 wants
                  MLFLOW_ALLOW_FILE_STORE=true for that: set unless you set it); experiment MLFLOW_EXPERIMENT_NAME or
                  "unirl-fast"; the run id is kept in trackers.json for resumes; the config as params (on creation)
                  and as config.json; the sheets as artifacts; keys keep their first '/' (train/flops.lm: a file
                  store cannot hold both train/flops and train/flops/lm).
    trackio       trackio's local store (TRACKIO_DIR); project "unirl-fast" (TRACKIO_PROJECT), the run named after the
                  run directory, resumed by name.

Trackers are written by the main process only. A tracker that fails while the run trains stops it like any other
error (a silent gap in the curves would look like a finished run).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_installed(names) -> None:
    """Before any work: every tracker of --report-to can be imported (one line naming the extra otherwise)."""
    for n in names:
        if n != "none" and importlib.util.find_spec(_PACKAGE[n]) is None:
            raise ValueError(f"--report-to {n}: the {_PACKAGE[n]} package is not installed (pip install "
                             f"'unirl-fast[{n}]')")


def scalars(record: dict) -> tuple[int, dict]:
    """(step, {"<phase>/<key>": float}) of a metrics.jsonl record: its finite numbers."""
    phase = record.get("phase", "train")
    out = {}
    for k, v in record.items():
        if k in ("step", "phase") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[f"{phase}/{k}"] = float(v)
    return int(record.get("step", 0)), out


class Trackers:
    """The run's trackers: log(record), image(name, path, step), close(). Empty (does nothing) without --report-to."""

    def __init__(self, names, run_dir, config: dict, step: int):
        self.run_dir = Path(run_dir)
        self._state_path = self.run_dir / "trackers.json"
        self._state = json.loads(self._state_path.read_text()) if self._state_path.is_file() else {}
        self.backends = [_OPEN[n](self, config, step) for n in names if n != "none"]
        if self.backends:
            self._state_path.write_text(json.dumps(self._state, indent=2))

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        for b in self.backends:
            b.log(values, step)

    def image(self, name: str, path, step: int) -> None:
        for b in self.backends:
            b.image(name, Path(path), step)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


class _TensorBoard:
    def __init__(self, t, config, step):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(t.run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        if not step:
            self.w.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, values, step):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def image(self, name, path, step):
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.w.add_image(name, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.w.flush()

    def close(self):
        self.w.close()


class _Wandb:
    def __init__(self, t, config, step):
        import wandb

        self.wandb = wandb
        run_id = t._state.setdefault("wandb_id", uuid.uuid4().hex[:8])
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "unirl-fast"), id=run_id, resume="allow",
                              name=t.run_dir.name, dir=str(t.run_dir), config=config)

    def log(self, values, step):
        self.run.log(values, step=step)

    def image(self, name, path, step):
        self.run.log({f"samples/{name}": self.wandb.Image(str(path))}, step=step)

    def close(self):
        self.run.finish()


class _Mlflow:
    def __init__(self, t, config, step):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the run's own file store (MLflow 3 keeps it, in maintenance mode, behind this switch)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (t.run_dir / "mlruns").absolute().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "unirl-fast"))
        new = "mlflow_run_id" not in t._state
        run = mlflow.start_run(run_id=t._state.get("mlflow_run_id"), run_name=t.run_dir.name)
        t._state["mlflow_run_id"] = run.info.run_id
        if new:  # params are immutable in MLflow: logged once, with the run
            mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
                               for k, v in config.items()})
            mlflow.log_dict(config, "config.json")

    def log(self, values, step):
        self.mlflow.log_metrics({"/".join(_split1(k)): v for k, v in values.items()}, step=step)

    def image(self, name, path, step):
        self.mlflow.log_artifact(str(path), artifact_path=f"samples/step-{step}")

    def close(self):
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, t, config, step):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "unirl-fast"), name=t.run_dir.name,
                                config=config, resume="allow", embed=False)

    def log(self, values, step):
        self.trackio.log(values, step=step)

    def image(self, name, path, step):
        self.trackio.log({f"samples/{name}": self.trackio.Image(str(path))}, step=step)

    def close(self):
        self.trackio.finish()


def _split1(key: str) -> tuple:
    phase, _, rest = key.partition("/")
    return phase, rest.replace("/", ".")


_OPEN = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow, "trackio": _Trackio}
