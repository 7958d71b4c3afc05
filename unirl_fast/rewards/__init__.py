"""Rewards: one interface (`RewardBatch` -> score per sample + named parts), built from specs.

`--reward SPEC[=WEIGHT]` (repeatable; weights default to 1, the run's reward is the weighted sum):

    world                 the embedded world's verifier for the scenario (the default on the world's tasks)
    format | format:RE    the LM's text has the expected form (the world's grammar, or a regular expression)
    answer                exact match with the task's answer (the default for `understand` on other data)
    cycle                 edits: the cycle-consistency reward
    clip:DIR              CLIPScore with a local CLIP checkpoint;  pickscore:DIR: PickScore (another CLIP directory)
    http(s)://HOST/PATH   a reward service (unirl_fast.rewards.http; `unirl-fast serve-reward` runs one)
    pkg.module:function   any Python callable taking a RewardBatch (imported with the working directory on the path)

Each term is logged under a label: the built-in's name, the callable's name, the URL's last path segment (or host),
with _2, _3 ... when two would share one.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from urllib.parse import urlparse

from .base import RewardBatch, RewardError, RewardResult, Term, WeightedReward, as_result, to_pil
from .world import FormatReward, WorldReward, answer_reward, cycle_reward

BUILTINS = ("world", "format", "answer", "cycle")
_IMPORT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def parse_spec(text: str) -> tuple:
    """"SPEC[=WEIGHT]" -> (spec, weight). The weight is what follows the last '=' when it reads as a number."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {text!r}")
    spec, weight = text.strip(), 1.0
    if "=" in spec:
        head, tail = spec.rsplit("=", 1)
        try:
            weight = float(tail)
            spec = head
        except ValueError:
            pass
    if not spec:
        raise ValueError(f"reward {text!r}: no reward before the weight")
    if weight != weight or weight in (float("inf"), float("-inf")):
        raise ValueError(f"reward {text!r}: the weight must be a finite number, got {weight}")
    return spec, weight


def load_callable(path: str):
    """"pkg.module:attr[.attr]" -> the object (must be callable). The working directory is put on sys.path first,
    so a reward module beside the run's command imports without installing it."""
    mod_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} has no "
                             f"attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def make_term(spec: str, weight: float = 1.0, *, scenario=None, format_weight: float = 0.2, device=None,
              http_options: dict | None = None) -> Term:
    """One reward term from its spec (see the module docstring). `scenario` is needed by world / format."""
    name, _, arg = spec.partition(":")
    if spec in ("world", "format") and scenario is None:
        raise ValueError(f"reward {spec!r} needs a scenario (it is the world's; not available in a reward server)")
    if spec == "world":
        return Term("world", weight, WorldReward(scenario, format_weight), spec)
    if spec == "format" or name == "format" and arg:
        if scenario is None and not arg:
            raise ValueError("reward 'format' needs a pattern here: format:REGEX")
        return Term("format", weight, FormatReward(scenario, arg or None), spec)
    if spec == "answer":
        return Term("answer", weight, answer_reward, spec)
    if spec == "cycle":
        return Term("cycle", weight, cycle_reward, spec)
    if name in ("clip", "pickscore") and arg and not spec.startswith(("clip://", "pickscore://")):
        from .clip import ClipReward

        return Term(name, weight, ClipReward(arg, name, device=device), spec)
    if spec.startswith(("http://", "https://")):
        from .http import HttpReward

        u = urlparse(spec)
        label = (u.path.rstrip("/").rsplit("/", 1)[-1] or u.hostname or "http").replace(".", "_")
        return Term(label, weight, HttpReward(spec, label=label, **(http_options or {})), spec)
    if _IMPORT_RE.match(spec):
        fn = load_callable(spec)
        return Term(getattr(fn, "__name__", spec.rsplit(":", 1)[-1].rsplit(".", 1)[-1]), weight, fn, spec)
    raise ValueError(f"unknown reward {spec!r}: give one of {', '.join(BUILTINS)}, format:REGEX, clip:DIR, "
                     "pickscore:DIR, an http(s):// URL or a Python callable as pkg.module:function")


def build_reward(specs, **kw) -> WeightedReward:
    """The weighted sum of the terms of `specs` ("SPEC[=WEIGHT]" strings); keyword arguments go to make_term."""
    terms = []
    for text in specs:
        spec, weight = parse_spec(text)
        term = make_term(spec, weight, **kw)
        base, n = term.label, 2
        while term.label in {t.label for t in terms}:
            term.label, n = f"{base}_{n}", n + 1
        if hasattr(term.fn, "label"):
            term.fn.label = term.label
        terms.append(term)
    return WeightedReward(terms)


__all__ = ["RewardBatch", "RewardError", "RewardResult", "Term", "WeightedReward", "as_result", "to_pil",
           "build_reward", "make_term", "parse_spec", "load_callable", "BUILTINS"]
