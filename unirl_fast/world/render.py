"""Rendering of the synthetic world: small RGB images of coloured shapes at positions and counts.

A scene is a list of objects (colour, shape, region); `render_scene` paints them on a dark canvas as
flat-colour blobs, so the verifiers can read colours, counts and positions back exactly the way
GenEval's checks do with a detector (here: colour segmentation + connected components).
Images are float32 [3, S, S] in [-1, 1] (the diffusion expert's pixel space); S >= 24.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COLORS = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.15),
    "purple": (0.7, 0.2, 0.85),
    "cyan": (0.15, 0.85, 0.9),
}
SHAPES = ("square", "circle", "triangle")
REGIONS = ("left", "right", "top", "bottom")
BACKGROUND = (0.05, 0.05, 0.05)


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    region: str  # one of REGIONS: the half of the canvas the object's centre lies in


@dataclass(frozen=True)
class Scene:
    objects: tuple  # tuple[Obj, ...]


def _slots(region: str, n: int, size: int):
    """Up to 3 non-overlapping centres inside a half of the canvas."""
    q, h = size // 4, size // 2
    across = [size // 6 + i * (size * 2 // 3) // max(n - 1, 1) for i in range(n)] if n > 1 else [h]
    if region == "left":
        return [(q, y) for y in across]
    if region == "right":
        return [(size - q - 1, y) for y in across]
    if region == "top":
        return [(x, q) for x in across]
    return [(x, size - q - 1) for x in across]


def _paint(img: torch.Tensor, shape: str, cx: int, cy: int, r: int, rgb) -> None:
    S = img.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        m = (dx.abs() <= r) & (dy.abs() <= r)
    elif shape == "circle":
        m = dx * dx + dy * dy <= (r + 0.5) ** 2  # the half pixel makes a rounder disc (fill ~0.78)
    else:  # triangle pointing up
        m = (dy <= r) & (dy >= -r) & (dx.abs() * 2 <= (dy + r))
    img[:, m] = torch.tensor(rgb, dtype=img.dtype).unsqueeze(-1)


def render_scene(scene: Scene, size: int = 32) -> torch.Tensor:
    """Paint a scene; objects sharing a region are spread along it. Returns [3, size, size] in [-1, 1]."""
    if size < 24:
        raise ValueError(f"size must be >= 24 so that three objects fit in a half, got {size}")
    img = torch.tensor(BACKGROUND).view(3, 1, 1).repeat(1, size, size)
    by_region: dict = {}
    for o in scene.objects:
        by_region.setdefault(o.region, []).append(o)
    r = size // 8  # objects 2r+1 wide: three fit along a side with a gap
    for region, objs in by_region.items():
        if len(objs) > 3:
            raise ValueError(f"at most 3 objects per region, got {len(objs)} in {region!r}")
        for o, (cx, cy) in zip(objs, _slots(region, len(objs), size)):
            _paint(img, o.shape, cx, cy, r, COLORS[o.color])
    return img * 2.0 - 1.0
