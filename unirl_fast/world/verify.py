"""Verifiers for the synthetic world: read objects back from an image and score it against a spec,
the way GenEval scores a generated image (object present, count, colour, position), with colour
segmentation + connected components standing in for the detector.

    detect(img)             -> list of Detection(color, shape, cx, cy, area)
    check_image(img, spec)  -> per-requirement booleans (colour / count / position), no extra objects, `exact`
    score_image(img, spec)  -> mean of those checks in [0, 1] (the RL reward: GenEval's checks as partial credit)

Per requirement: `color` (some object has the colour, any shape: GenEval's colour check, and the part a small
DiT gets right first), `count` (exactly `count` objects of that colour and shape), `position` (all of them in
the region). A 32 px DiT draws blobs long before it draws crisp shapes, so the shape-agnostic colour check is
what gives early RL a gradient; `exact` still needs every check.

A pixel belongs to a palette colour when it is closer to it than to any other palette colour and
the background, within `tol`; components smaller than `min_area` pixels are noise, not objects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .render import BACKGROUND, COLORS


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    cx: float
    cy: float
    area: int


def _labels(mask: np.ndarray):
    """4-connected components of a boolean image (iterative flood fill; images are tiny)."""
    lab = np.zeros(mask.shape, dtype=np.int32)
    n = 0
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if lab[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        lab[y0, x0] = n
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not lab[yy, xx]:
                    lab[yy, xx] = n
                    stack.append((yy, xx))
    return lab, n


def _shape_of(comp: np.ndarray) -> str:
    ys, xs = np.nonzero(comp)
    fill = comp.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    if fill > 0.93:  # square 1.0, disc ~0.75-0.8, triangle ~0.5
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def detect(img: torch.Tensor, *, tol: float = 0.35, min_area: int = 4) -> list:
    """img [3, S, S] in [-1, 1] -> detections sorted by (color, cx, cy)."""
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"img must be [3, S, S], got shape {tuple(img.shape)}")
    rgb = ((img.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    names = list(COLORS) + ["_bg"]
    palette = np.array(list(COLORS.values()) + [BACKGROUND], dtype=np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)
    close = dist.min(-1) < tol
    out = []
    for ci, name in enumerate(names[:-1]):
        lab, n = _labels((nearest == ci) & close)
        for k in range(1, n + 1):
            comp = lab == k
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            out.append(Detection(name, _shape_of(comp), float(xs.mean()), float(ys.mean()), area))
    return sorted(out, key=lambda d: (d.color, d.cx, d.cy))


def _region_ok(d: Detection, region, size: int) -> bool:
    h = (size - 1) / 2
    return {"left": d.cx < h, "right": d.cx > h, "top": d.cy < h, "bottom": d.cy > h, None: True}[region]


def check_image(img: torch.Tensor, spec) -> dict:
    """spec: tuple of Req(color, shape, count, region). Returns {check name: bool} plus 'exact'."""
    dets = detect(img)
    size = img.shape[-1]
    checks = {}
    for i, req in enumerate(spec):
        same = [d for d in dets if d.color == req.color and (req.shape is None or d.shape == req.shape)]
        checks[f"{i}:color"] = any(d.color == req.color for d in dets)  # an object of that colour, any shape
        checks[f"{i}:count"] = len(same) == req.count
        if req.region is not None and req.count > 0:
            checks[f"{i}:position"] = len(same) > 0 and all(_region_ok(d, req.region, size) for d in same)
    wanted = sum(r.count for r in spec)
    checks["no_extra_objects"] = len(dets) == wanted
    checks["exact"] = all(checks.values())
    return checks


def score_image(img: torch.Tensor, spec) -> float:
    """Mean of the requirement checks (GenEval-style partial credit), in [0, 1]."""
    c = check_image(img, spec)
    parts = [v for k, v in c.items() if k != "exact"]
    return float(sum(parts)) / len(parts)
