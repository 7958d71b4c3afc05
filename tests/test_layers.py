"""The import graph runs one way: drivers (the command line, profile, report) -> trainer -> profiling -> rewards,
tasks, rollout, models -> ops -> kernels / references. Read statically (every `import` and `from ... import` in the
package's source, function-level ones included), so an arrow back up fails here before it makes a cycle."""
import ast
from pathlib import Path

import unirl_fast

ROOT = Path(unirl_fast.__file__).parent
# layer of each part of the package (the first name under unirl_fast); a module may import its own layer and below
LAYERS = {"_checks": 0, "_stop": 0, "kernels": 0, "reference": 0, "ops": 1, "(init)": 1, "fp8": 1,
          "models": 2, "rollout": 3, "world": 3, "tasks": 3, "rewards": 3, "integrations": 3, "profiling": 4,
          "train": 5, "cli": 6, "info": 6, "profile_run": 6, "report": 6}


def _part(module: str) -> str:
    parts = module.split(".")
    return "(init)" if len(parts) == 1 else parts[1]


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imports(source: str, module: str, package: bool = False):
    """(line, imported unirl_fast module) of every import in the source of `module` (a package's __init__ when
    `package`)."""
    pkg = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            names = [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]
            yield from ((node.lineno, n) for n in names if n.startswith("unirl_fast"))
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("unirl_fast"))


def test_no_import_runs_back_up():
    back = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module(path)
        here = _part(module)
        assert here in LAYERS, f"{path}: a new part of the package; give it a layer in LAYERS"
        for line, target in _imports(path.read_text(), module, path.name == "__init__.py"):
            there = _part(target)
            if LAYERS.get(there, 0) > LAYERS[here]:
                back.append(f"{path.relative_to(ROOT.parent)}:{line} ({here}) imports {target} ({there})")
    assert not back, "\n".join(back)


def test_the_check_sees_an_arrow_back_up():
    """The rule catches what it is for: profiling importing the trainer inside a function (as profile_run did before
    it moved up beside the command line)."""
    found = list(_imports("def f():\n    from ..train import Trainer\n", "unirl_fast.profiling.probe"))
    assert found == [(2, "unirl_fast.train")] and LAYERS[_part(found[0][1])] > LAYERS["profiling"]
    assert list(_imports("from . import rl\n", "unirl_fast.train", package=True)) == [(1, "unirl_fast.train.rl")]
