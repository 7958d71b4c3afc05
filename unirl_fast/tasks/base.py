"""What every task source yields: one `Task` per prompt, and a `TaskSet` with its train / held-out split.

A task is what a scenario needs from a data row, whatever the source:
    prompt       what the model is given (the instruction for edits, the question for understanding)
    answer       the reference answer, if any (exact-match rewards; what a perfect LM writes)
    image        the source image (edits; the image an understanding question is about): a path or a PIL image,
                 decoded on use: `source_image(size, resize)` -> float32 [3, size, size] in [-1, 1], what the DiT
                 sees (RESIZE_RULES), and `lm_image(size, max_pixels)` -> [3, h, w] at the image's own aspect
                 ratio, what a vision-language LM sees (its image processor then fits it to its patch grid)
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
    image: Any = None  # str path (absolute) | DatasetImage | PIL.Image.Image | None
    context: str = ""
    inverse: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    origin: str = ""

    def source_image(self, size: int, resize: str = "crop") -> torch.Tensor | None:
        return None if self.image is None else load_image(self.image, size, resize=resize, origin=self.origin)

    def lm_image(self, size: int, max_pixels: int | None = None) -> torch.Tensor | None:
        """The image at its own aspect ratio, scaled down to at most `max_pixels` pixels (size: unused here; the
        embedded world renders its scenes at it)."""
        return None if self.image is None else load_image_native(self.image, max_pixels, origin=self.origin)


@dataclass(frozen=True)
class TaskSet:
    """A source's tasks split into training and held-out lists (never the same prompt in both)."""
    name: str
    train: list
    eval: list

    def fingerprint(self) -> dict:
        """What a run directory records of its data (tasks.json): the counts and a hash of every task's text fields,
        image and meta, in order, so a resume notices a changed file. An image file counts by its path, an image
        of a `datasets` directory (or any image in memory, a meta value included) by a hash of its content: the
        same data gives the same fingerprint in every process."""
        import hashlib
        import json

        h = hashlib.sha1()
        for side in (self.train, self.eval):
            for t in side:
                meta = sorted(((k, _stable(v)) for k, v in t.meta.items()), key=lambda kv: str(kv[0]))
                image = t.image if isinstance(t.image, str) else _stable(t.image)
                image = image if isinstance(image, str) else repr(image)  # as earlier versions hashed it (None too)
                row = [t.prompt, t.answer, image, t.context, t.inverse, repr(meta)]
                h.update(json.dumps(row).encode())
            h.update(b"|")
        return {"tasks": self.name, "train": len(self.train), "eval": len(self.eval), "sha1": h.hexdigest()}

    def __post_init__(self):
        if not self.train:
            raise ValueError(f"task source {self.name!r} has no training tasks")
        if not self.eval:
            raise ValueError(f"task source {self.name!r} has no held-out tasks (give rows a split, or raise "
                             "--eval-fraction)")


class DatasetImage:
    """An image cell of a `datasets` directory, decoded when used: the (memory-mapped) dataset, the row and the
    column, and `digest`, the sha1 of the encoded bytes, for the fingerprint. Tasks hold these instead of decoded
    images, so a dataset larger than RAM works."""

    __slots__ = ("dataset", "row", "column", "digest")

    def __init__(self, dataset, row: int, column: str, digest: str):
        self.dataset, self.row, self.column, self.digest = dataset, row, column, digest

    def open(self):
        """The image, decoded now (a PIL image)."""
        import io

        from PIL import Image

        return Image.open(io.BytesIO(self.dataset[self.row][self.column]["bytes"]))

    def __repr__(self) -> str:
        return f"DatasetImage(row {self.row}, sha1 {self.digest[:12]})"


def _stable(value):
    """A value as the fingerprint hashes it: images by their content (a PIL image's repr holds a memory address)."""
    import hashlib

    if isinstance(value, DatasetImage):
        return f"sha1:{value.digest}"
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        return f"pil:{value.mode}:{value.size}:{hashlib.sha1(value.tobytes()).hexdigest()}"
    if isinstance(value, (bytes, bytearray)):
        return f"bytes:{hashlib.sha1(value).hexdigest()}"
    return value


# How a task image becomes the DiT's square: crop (scale the short side to the size, keep the centre), pad (scale the
# long side to the size, centre it on black), stretch (scale each side to the size: the aspect ratio is lost).
RESIZE_RULES = ("crop", "pad", "stretch")


def _open_rgb(image, origin: str):
    """A path, a PIL image or a DatasetImage -> an RGB PIL image; errors name the task's origin and the file."""
    from PIL import Image, UnidentifiedImageError

    where = f"{origin}: " if origin else ""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError:
            raise ValueError(f"{where}image {str(image)!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where}image {str(image)!r} cannot be read as an image ({e})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, DatasetImage):
        try:
            with image.open() as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where}image {image!r} cannot be read as an image ({e})") from None
    raise ValueError(f"{where}image must be a path or a PIL image, got {type(image).__name__}")


def load_image(image, size: int, *, resize: str = "crop", origin: str = "") -> torch.Tensor:
    """A path or a PIL image -> float32 [3, size, size] in [-1, 1] (RGB; bicubic, by the RESIZE_RULES rule `resize`
    when it is not already size x size). Errors name the task's origin and the file."""
    from PIL import Image, ImageOps

    if resize not in RESIZE_RULES:
        raise ValueError(f"resize must be one of {RESIZE_RULES}, got {resize!r}")
    pil = _open_rgb(image, origin)
    if pil.size != (size, size):
        if resize == "crop":
            pil = ImageOps.fit(pil, (size, size), Image.BICUBIC)
        elif resize == "pad":
            pil = ImageOps.pad(pil, (size, size), Image.BICUBIC, color=(0, 0, 0))
        else:
            pil = pil.resize((size, size), Image.BICUBIC)
    return pil_to_tensor(pil)


def load_image_native(image, max_pixels: int | None = None, *, origin: str = "") -> torch.Tensor:
    """A path or a PIL image -> float32 [3, h, w] in [-1, 1] at its own aspect ratio, scaled down (bicubic) so that
    h * w <= max_pixels when it is larger."""
    from PIL import Image

    pil = _open_rgb(image, origin)
    w, h = pil.size
    if max_pixels is not None and w * h > max_pixels:
        scale = (max_pixels / (w * h)) ** 0.5
        pil = pil.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BICUBIC)
    return pil_to_tensor(pil)


def pil_to_tensor(pil) -> torch.Tensor:
    """An RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    w, h = pil.size
    arr = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)
