"""`convert_to_fp8`: swap eligible nn.Linear layers of a model for FP8Linear, in place.

Eligible: a plain nn.Linear (not already FP8Linear) with in_features and out_features divisible by 128,
that is not the LM head (a module named `lm_head`, the model's output embeddings, or any Linear whose weight
is tied to an nn.Embedding), that does not sit inside a norm or embedding module (by class name: "Norm",
"Embed"; e.g. diffusers' AdaLayerNormZero modulation Linear and the timestep / pooled-text embedders of a
diffusion transformer: conditioning paths with one row per sample, no FP8 speed to gain and error to add) and
that `filter_fn(name, module)` accepts. Embeddings and norms themselves are never nn.Linear; attention
itself (softmax(QK^T)V) stays in the input dtype, only its projections become FP8. The swapped modules
keep the original weight/bias Parameter objects, so an optimizer built before (or after) the conversion
updates the same master weights, and the rollout engine that shares the module objects runs the very
same FP8 forward as the trainer.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .linear import FP8Linear
from .quantize import GROUP


def _head_weights(model: nn.Module) -> set:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if isinstance(out, nn.Module) and getattr(out, "weight", None) is not None:
        ids.add(id(out.weight))
    return ids


def _inside_norm_or_embedding(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        cls = type(model.get_submodule(".".join(parts[:i]))).__name__
        if "Norm" in cls or "Embed" in cls:
            return True
    return False


def convert_to_fp8(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, *,
                   backend: str = "auto", save_fp8_activation: bool = True) -> list:
    """Replace eligible nn.Linear submodules of `model` by FP8Linear (in place); return the converted names.

    filter_fn(name, module) -> bool narrows the choice further (e.g. only the LM expert of a unified model:
    `lambda n, m: n.startswith("language_model.")`). backend / save_fp8_activation go to every FP8Linear.
    """
    head = _head_weights(model)
    targets = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or name.split(".")[-1] == "lm_head" or id(mod.weight) in head:
            continue
        if mod.in_features % GROUP or mod.out_features % GROUP or _inside_norm_or_embedding(model, name):
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            continue
        targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), backend=backend,
                                                     save_fp8_activation=save_fp8_activation))
    return targets
