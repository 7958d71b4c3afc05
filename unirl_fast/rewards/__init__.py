"""Rewards: one interface (`RewardBatch` -> score per sample + named parts), built from specs.

`--reward SPEC[=WEIGHT]` (repeatable; weights default to 1, the run's reward is the weighted sum):

    world                 the embedded world's verifier for the scenario (the default on the world's tasks)
    format | format:RE    the LM's text has the expected form (the world's grammar, or a regular expression)
    answer                exact match with the task's answer (the default for `understand` on other data)
    cycle                 edits: the cycle-consistency reward
    clip:DIR              CLIPScore with a local CLIP checkpoint;  pickscore:DIR: PickScore (another CLIP directory)
    http(s)://HOST/PATH   a reward service (unirl_fast.rewards.http; `unirl-fast serve-reward` runs one)
    pkg.module:function   any Python callable taking a RewardBatch (installed, or a module in the working directory)

Each term is logged under a label: the built-in's name, the callable's name, the URL's last path segment (or host),
with _2, _3 ... when two would share one.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
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
    """"pkg.module:attr[.attr]" -> the object (must be callable).

    A module beside the command (`./my_rewards.py` or `./my_pkg/`) is found without installing it, but the working
    directory only ever comes *after* the installed packages: it is appended to sys.path for the import and removed
    again, so it neither shadows an installed module nor stays on the path for the rest of the process. A local
    file named like another installed module (`./json.py`, `./torch.py`) is refused: which of the two an import
    gives would depend on how Python was started."""
    mod_name, _, attr = path.partition(":")
    top = mod_name.split(".", 1)[0]
    cwd = Path.cwd()
    local = next((p for p in (cwd / f"{top}.py", cwd / top) if p.is_file() or (p / "__init__.py").is_file()), None)
    installed = _installed_origin(top, cwd)
    if local is not None and installed is not None and Path(installed).resolve() not in (local, local / "__init__.py"):
        raise ValueError(f"reward {path!r}: {local} has the name of the installed module {top!r} ({installed}): "
                         "rename your file")
    added = local is not None and str(cwd) not in sys.path
    if added:
        sys.path.append(str(cwd))
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        if local is None and installed is None:
            dirs = [str(cwd)] + [p for p in sys.path if p and not _same_dir(p, cwd) and Path(p).exists()]
            raise ValueError(f"reward {path!r}: no module {top!r} in the working directory or on the Python path "
                             f"(searched: {', '.join(dirs)})") from None
        raise ValueError(f"reward {path!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
    finally:
        if added:
            sys.path.remove(str(cwd))
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {path!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} has no "
                             f"attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def _same_dir(entry: str, cwd: Path) -> bool:
    """Whether a sys.path entry is the working directory ('' is, under `python -c` / `python -m`)."""
    try:
        return Path(entry or ".").resolve() == cwd
    except OSError:
        return False


def _installed_origin(top: str, cwd: Path) -> str | None:
    """Where the top-level module `top` comes from with the working directory off the path ('built-in', a file or
    a package folder), or None when nothing else provides it."""
    mod = sys.modules.get(top)
    spec = getattr(mod, "__spec__", None) if mod is not None else None
    if spec is None:
        saved = sys.path[:]
        sys.path[:] = [p for p in saved if not _same_dir(p, cwd)]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        finally:
            sys.path[:] = saved
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", None):
        return spec.origin
    locations = list(spec.submodule_search_locations or [])
    return locations[0] if locations else top


def make_term(spec: str, weight: float = 1.0, *, scenario=None, format_weight: float = 0.2, device=None,
              http_options: dict | None = None) -> Term:
    """One reward term from its spec (see the module docstring). `scenario` is needed by world / format."""
    kind, (name, _, arg) = spec_kind(spec), spec.partition(":")
    if spec in ("world", "format") and scenario is None:
        raise ValueError(f"reward {spec!r} needs a scenario (it is the world's; not available in a reward server)")
    if kind == "world":
        return Term("world", weight, WorldReward(scenario, format_weight), spec)
    if kind == "format":
        return Term("format", weight, FormatReward(scenario, arg or None), spec)
    if kind in ("answer", "cycle"):
        return Term(kind, weight, answer_reward if kind == "answer" else cycle_reward, spec)
    if kind in ("clip", "pickscore"):
        from .clip import ClipReward

        return Term(name, weight, ClipReward(arg, name, device=device), spec)
    if kind == "http":
        from .http import HttpReward

        u = urlparse(spec)
        label = (u.path.rstrip("/").rsplit("/", 1)[-1] or u.hostname or "http").replace(".", "_")
        return Term(label, weight, HttpReward(spec, label=label, **(http_options or {})), spec)
    fn = load_callable(spec)
    return Term(getattr(fn, "__name__", spec.rsplit(":", 1)[-1].rsplit(".", 1)[-1]), weight, fn, spec, user=True)


def spec_kind(spec: str) -> str:
    """What a spec (weight already split off by parse_spec) names: a builtin's name, "format", "clip",
    "pickscore", "http" or "callable"; ValueError (unknown_spec) for anything else. Reads nothing."""
    name, _, arg = spec.partition(":")
    if spec in BUILTINS:
        return spec
    if name == "format" and arg:
        try:
            re.compile(arg)
        except re.error as e:
            raise ValueError(f"reward {spec!r}: the pattern is not a regular expression ({e})") from None
        return "format"
    if name in ("clip", "pickscore") and arg and not spec.startswith(("clip://", "pickscore://")):
        return name
    if spec.startswith(("http://", "https://")):
        return "http"
    if _IMPORT_RE.match(spec):
        return "callable"
    raise unknown_spec(spec)


def unknown_spec(spec: str) -> ValueError:
    import difflib

    hint = ""
    if "=" in spec:
        hint = f" (a weight goes after the last '=' and must be a number, not {spec.rsplit('=', 1)[1]!r})"
    elif near := difflib.get_close_matches(spec, [*BUILTINS, "format:", "clip:", "pickscore:"], n=1, cutoff=0.6):
        hint = f" (did you mean {near[0]!r}?)"
    return ValueError(f"unknown reward {spec!r}{hint}: give one of {', '.join(BUILTINS)}, format:REGEX, clip:DIR, "
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
           "build_reward", "make_term", "parse_spec", "spec_kind", "load_callable", "BUILTINS"]
