"""The reward interface: a batch of rolled-out samples in, a score per sample and named parts out.

    reward(batch: RewardBatch) -> RewardResult(scores [B], parts {name: [B]})   (float64)

`RewardBatch` holds, per sample i: `tasks[i]` (prompt, answer, meta, ...: see unirl_fast.tasks), `completions[i]`
(the LM's text, "" when the LM writes nothing), `images[i]` (the drawn image, [3, S, S] in [-1, 1]),
`cycled[i]` (edits: the image edited back with the inverse instruction) and `sources[i]` (edits: the source
image); the image fields are None where the scenario has none.

A user's reward may return any of: a sequence (list, tuple, 1-D tensor or array) of B numbers; a mapping
{"scores": B numbers, "parts": {name: B numbers}} (the reward service's answer reads the same); a RewardResult.
`as_result` checks it: B finite numbers everywhere, or an error naming the reward and the sample.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .._checks import mark_host_resident


class RewardError(RuntimeError):
    """A reward could not score a batch (a bad answer, a service that keeps failing). Never a silent 0."""


@dataclass
class RewardBatch:
    tasks: list
    completions: list
    images: torch.Tensor | None = None  # [B, 3, S, S] in [-1, 1]
    cycled: list | None = None  # per sample [3, S, S] or None (no inverse edit)
    sources: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def prompts(self) -> list:
        return [t.prompt for t in self.tasks]

    @property
    def answers(self) -> list:
        return [t.answer for t in self.tasks]

    @property
    def metas(self) -> list:
        return [t.meta for t in self.tasks]

    def pil_images(self, which: str = "images") -> list:
        """The images of one field ("images", "cycled", "sources") as RGB PIL images (None where missing)."""
        imgs = getattr(self, which)
        if imgs is None:
            return [None] * len(self)
        return [None if im is None else to_pil(im) for im in imgs]

    def subset(self, rows) -> "RewardBatch":
        rows = list(rows)
        pick = (lambda x: None if x is None else [x[i] for i in rows])
        return RewardBatch([self.tasks[i] for i in rows], [self.completions[i] for i in rows],
                           None if self.images is None else self.images[rows],
                           pick(self.cycled), None if self.sources is None else self.sources[rows])


@dataclass
class RewardResult:
    scores: torch.Tensor  # [B] float64 (the trainer's advantages take them in float32)
    parts: dict = field(default_factory=dict)  # name -> [B] float64


def to_pil(img: torch.Tensor):
    """[3, S, S] in [-1, 1] -> an RGB PIL image (rounded to 8 bits)."""
    from PIL import Image

    arr = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), "RGB")


def _vector(values, n: int, what: str, batch: RewardBatch) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().flatten().tolist()  # one device-to-host copy
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(f"{what}: expected {n} numbers, got {type(values).__name__}")
    if len(values) != n:
        raise RewardError(f"{what}: expected {n} numbers (one per sample), got {len(values)}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            prompt = batch.tasks[i].prompt if i < len(batch) else "?"
            raise RewardError(f"{what}: sample {i} (prompt {prompt!r}) got {v!r}, not a finite number")
    return mark_host_resident(torch.tensor(values, dtype=torch.float64))  # host memory wherever the model runs


def as_result(out, batch: RewardBatch, label: str) -> RewardResult:
    """Check and convert what a reward returned (see the module docstring); errors name `label` and the sample."""
    n = len(batch)
    what = f"reward {label!r}"
    if isinstance(out, RewardResult):
        out = {"scores": out.scores, "parts": out.parts}
    if isinstance(out, Mapping):
        if "scores" not in out:
            raise RewardError(f"{what}: a mapping answer needs 'scores' (and optionally 'parts'), got keys "
                              f"{sorted(out)}")
        parts = out.get("parts") or {}
        if not isinstance(parts, Mapping):
            raise RewardError(f"{what}: 'parts' must map names to {n} numbers, got {type(parts).__name__}")
        return RewardResult(_vector(out["scores"], n, what, batch),
                            {str(k): _vector(v, n, f"{what} part {k!r}", batch) for k, v in parts.items()})
    return RewardResult(_vector(out, n, what, batch))


@dataclass
class Term:
    label: str
    weight: float
    fn: object  # callable(RewardBatch) -> see as_result
    spec: str = ""
    user: bool = False  # a user's Python callable: an exception it raises is a RewardError naming it, not our bug


class WeightedReward:
    """The reward a run trains on: sum_k weight_k * reward_k(batch). Parts for logging: with one term, that term's
    own parts (or its score under its label when it has none); with several, each term's unweighted score under its
    label and its parts as "label/part"."""

    def __init__(self, terms: list):
        if not terms:
            raise ValueError("a reward needs at least one term")
        labels = [t.label for t in terms]
        if len(set(labels)) != len(labels):
            raise ValueError(f"reward labels must differ, got {labels}")
        self.terms = terms

    def __call__(self, batch: RewardBatch) -> RewardResult:
        total = mark_host_resident(torch.zeros(len(batch), dtype=torch.float64))
        parts = {}
        for t in self.terms:
            r = as_result(_call_term(t, batch), batch, t.label)
            total += t.weight * r.scores
            if len(self.terms) == 1:
                parts.update(r.parts or {t.label: r.scores})
            else:
                parts[t.label] = r.scores
                parts.update({f"{t.label}/{k}": v for k, v in r.parts.items()})
        return RewardResult(total, parts)

    def close(self) -> None:
        for t in self.terms:
            if hasattr(t.fn, "close"):
                t.fn.close()

    def describe(self) -> str:
        return " + ".join(f"{t.weight:g} x {t.label}" for t in self.terms)


def _call_term(t: Term, batch):
    """A term's answer; a user's callable that raises becomes a RewardError naming it, the exception and where it was
    raised (the traceback stays chained for --debug)."""
    if not t.user:
        return t.fn(batch)
    try:
        return t.fn(batch)
    except RewardError:
        raise
    except Exception as e:
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1]
        raise RewardError(f"reward {t.spec!r} raised {type(e).__name__}: {e} (at {where.filename}:{where.lineno}, in "
                          f"{where.name})") from e
