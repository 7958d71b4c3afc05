"""unirl_fast: fused GPU ops and a lean trainer for RL on unified (LM + diffusion) models.

Every op takes `impl="auto" | "triton" | "reference"`; see `unirl_fast.ops` and FORMULAS.md. Value checks:
`set_checks("cheap" | "full" | "off")` ("cheap", the default, is O(output) and sync-free; see `_checks`).
"""
import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _attach_kernels():
    """Make `unirl_fast.kernels` importable in a source checkout.

    The Triton kernels live in the repository's top-level `kernels/` folder, which has no `__init__.py` on purpose:
    whenever the repository root is on sys.path (`python -m pytest` or `python -m unirl_fast.cli` from the root), a
    folder without `__init__.py` can only ever be a namespace portion, which Python considers after every regular
    module or package of that name on the whole path. So it never shadows another distribution's `kernels` (Hugging
    Face's, which transformers >= 5.25 imports). A wheel installs the folder as `unirl_fast/kernels/`, found below
    this file; an editable install or a checkout on PYTHONPATH does not (setuptools' editable finder skips a mapped
    folder without `__init__.py`), so the package is attached here from `<checkout>/kernels`, recognised by its
    files, never by its name alone.
    """
    name = __name__ + ".kernels"
    if name in _sys.modules or _util.find_spec(name) is not None:
        return
    src = _Path(__file__).resolve().parent.parent / "kernels"
    if not (src / "_rows.py").is_file() or (src / "__init__.py").exists():
        raise ImportError(f"{name}: no Triton kernels below {_Path(__file__).parent} nor in {src}: reinstall")
    spec = _machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(src)]
    _sys.modules[name] = globals()["kernels"] = _util.module_from_spec(spec)


_attach_kernels()

from ._checks import (  # noqa: E402
    DeferredCheckError,
    check_pending,
    check_pending_all_ranks,
    checks,
    get_checks,
    set_checks,
)
from .ops import (  # noqa: E402
    cfg_velocity,
    flow_policy_loss,
    flow_sde_step,
    flow_step_logprob,
    forward_process_loss,
    fused_linear_logprobs,
    fused_linear_policy_loss,
    group_advantages,
    logprobs_from_logits,
    policy_loss,
)

__version__ = "0.1.0"

__all__ = [
    "logprobs_from_logits", "fused_linear_logprobs", "policy_loss", "fused_linear_policy_loss", "group_advantages",
    "flow_sde_step", "flow_step_logprob", "flow_policy_loss", "cfg_velocity", "forward_process_loss", "set_checks",
    "get_checks", "checks", "check_pending", "check_pending_all_ranks", "DeferredCheckError", "__version__",
]
