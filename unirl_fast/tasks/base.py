"""What every task source yields: one `Task` per prompt, and a `TaskSet` with its train / held-out split.

A task is what a scenario needs from a data row, whatever the source:
    prompt       what the model is given (the instruction for edits, the question for understanding)
    answer       the reference answer, if any (exact-match rewards; what a perfect LM writes)
    image        the source image (edits; the image an understanding question is about): a path or a PIL image,
                 decoded on use by `source_image(size)` -> float32 [3, size, size] in [-1, 1]
    context      text the LM reads before an understanding question (a description of the image), when the LM
                 has no vision tower; a vision-language LM looks at `image` instead
    inverse      the instruction that undoes an edit (the cycle-consistency reward edits the result back with it)
    meta         everything else in the row, free for the reward (GenEval's tag / include / exclude, ...)
    origin       where the row came from ("prompts.jsonl:12"), named by every error about it

The embedded world's tasks (`unirl_fast.world.Task`) offer the same attributes, so the trainer reads any source the
same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str = ""
    image: Any = None  # str path (absolute) | PIL.Image.Image | None
    context: str = ""
    inverse: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    origin: str = ""

    def source_image(self, size: int) -> torch.Tensor | None:
        return None if self.image is None else load_image(self.image, size, origin=self.origin)


@dataclass(frozen=True)
class TaskSet:
    """A source's tasks split into training and held-out lists (never the same prompt in both)."""
    name: str
    train: list
    eval: list

    def fingerprint(self) -> dict:
        """What a run directory records of its data (tasks.json): the counts and a hash of every task's text fields,
        image path and meta, in order, so a resume notices a changed file (image contents are not hashed)."""
        import hashlib
        import json

        h = hashlib.sha1()
        for side in (self.train, self.eval):
            for t in side:
                row = [t.prompt, t.answer, t.image if isinstance(t.image, str) else repr(t.image), t.context,
                       t.inverse, repr(sorted(t.meta.items(), key=lambda kv: str(kv[0])))]
                h.update(json.dumps(row).encode())
            h.update(b"|")
        return {"tasks": self.name, "train": len(self.train), "eval": len(self.eval), "sha1": h.hexdigest()}

    def __post_init__(self):
        if not self.train:
            raise ValueError(f"task source {self.name!r} has no training tasks")
        if not self.eval:
            raise ValueError(f"task source {self.name!r} has no held-out tasks (give rows a split, or raise "
                             "--eval-fraction)")


def load_image(image, size: int, *, origin: str = "") -> torch.Tensor:
    """A path or a PIL image -> float32 [3, size, size] in [-1, 1] (RGB; resized with bicubic filtering when the
    size differs). Errors name the task's origin and the file."""
    from PIL import Image, UnidentifiedImageError

    where = f"{origin}: " if origin else ""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                pil = im.convert("RGB")
        except FileNotFoundError:
            raise ValueError(f"{where}image {str(image)!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where}image {str(image)!r} cannot be read as an image ({e})") from None
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        raise ValueError(f"{where}image must be a path or a PIL image, got {type(image).__name__}")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BICUBIC)
    return pil_to_tensor(pil)


def pil_to_tensor(pil) -> torch.Tensor:
    """An RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    w, h = pil.size
    arr = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)
