"""Peers' own test files, taken at test time from their released source distributions (never copied into this
repository), and a runner that executes them in a fresh interpreter with one of our drop-ins applied.

`peer_tree(package, version, env_var)`: a directory holding that release's source tree. `$env_var` when set (a
checkout of the release tag, or an unpacked sdist: also the way to run offline), else the sdist fetched with pip from
the package index (`pip download PKG==VERSION --no-deps --no-binary :all:`), unpacked once into
`$UNIRL_PEER_CACHE` (default ~/.cache/unirl_fast/peers). When neither is available the calling test is skipped
with the reason, never failed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cache() -> Path:
    return Path(os.environ.get("UNIRL_PEER_CACHE", Path.home() / ".cache" / "unirl_fast" / "peers"))


def peer_tree(package: str, version: str, env_var: str) -> Path:
    if os.environ.get(env_var):
        path = Path(os.environ[env_var])
        if not path.is_dir():
            pytest.fail(f"{env_var}={path} is not a directory")
        return path
    dest = _cache() / f"{package}-{version}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--no-binary", ":all:",
               "-d", tmp, "-q"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if out.returncode != 0 or len(archives) != 1:
            pytest.skip(f"{package} {version}'s sdist could not be fetched ({out.stderr.strip()[-300:]}); set "
                        f"{env_var} to its source tree")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        top = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(top) != 1:
            pytest.fail(f"{archives[0].name}: expected one top-level folder, got {[p.name for p in top]}")
        try:
            top[0].rename(dest)
        except OSError:  # another process unpacked it meanwhile
            if not dest.is_dir():
                raise
    return dest


def copy_tests(tree: Path, parts, into: Path) -> Path:
    """Copy the peer's test files (paths relative to `tree`, with the __init__.py files above them) under `into`,
    away from the peer's own package folder, so that the installed release is what they import."""
    for rel in parts:
        src = tree / rel
        if not src.exists():
            pytest.skip(f"{tree} has no {rel} (the sdist may not ship it: point the env variable at a checkout)")
        dst = into / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        for parent in Path(rel).parents:
            init = tree / parent / "__init__.py"
            if parent != Path(".") and init.is_file():
                shutil.copy(init, into / parent / "__init__.py")
    return into


def run_python(code: str, cwd: Path, *args, timeout: int = 1500, env: dict | None = None, paths=()):
    """Run `code` in a fresh interpreter in `cwd`, with `paths` and this repository first on its path; returns
    (returncode, the JSON object on the last line starting with "RESULT ", stdout + stderr)."""
    script = cwd / "_peer_runner.py"
    script.write_text(code)
    path = os.pathsep.join([*map(str, paths), str(REPO), os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    out = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env=full_env)
    text = out.stdout + out.stderr
    found = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    return out.returncode, (json.loads(found[-1]) if found else None), text
