"""The install as a user meets it: the repository's top-level `kernels/` folder never shadows another distribution's
`kernels` module (Hugging Face's, which transformers >= 5.25 imports), a reward module is found from the repository
root, and the repository stands alone (no file refers to a document outside it)."""
import importlib.util
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ROUND_TRIP = r"""
import sys, tempfile
assert sys.path[0] in ("", {root!r}), sys.path[:2]
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
import kernels, unirl_fast.kernels.logprobs as ours
print("kernels:", getattr(kernels, "__file__", None))
print("ours:", ours.__file__)
cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
m = Qwen2ForCausalLM(cfg)
with tempfile.TemporaryDirectory() as d:
    m.save_pretrained(d)
    back = Qwen2ForCausalLM.from_pretrained(d)
assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
print("round trip ok")
"""


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_transformers_round_trip_from_the_repository_root_with_the_root_first_on_sys_path(tmp_path, how):
    code = ROUND_TRIP.format(root=str(ROOT))
    env = _env()
    if how == "-c":
        argv = [sys.executable, "-c", code]
    else:  # `python -m` puts the working directory first, as `python -m pytest` from the root does
        mod = f"_install_probe_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{mod}.py").write_text(code)
        argv, env["PYTHONPATH"] = [sys.executable, "-m", mod], str(tmp_path)
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "round trip ok" in out.stdout
    assert f"ours: {ROOT / 'kernels' / 'logprobs.py'}" in out.stdout
    hf = importlib.util.find_spec("kernels")
    if hf is not None and hf.origin not in (None, "namespace"):  # Hugging Face's kernels is installed: it wins
        assert f"kernels: {hf.origin}" in out.stdout
    else:  # nothing else provides `kernels`: ours is at most a namespace portion, and transformers saw no kernels
        assert "kernels: None" in out.stdout


def test_the_top_level_kernels_folder_is_not_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert sorted(p.name for p in (ROOT / "kernels").glob("*.py"))  # the kernels themselves are there


def test_train_with_a_reward_module_from_the_repository_root(tmp_path):
    """`unirl-fast train --reward mod:fn` from a clone's root: the module beside the command is found, and the root
    (with its kernels/ folder) is never put in front of installed packages."""
    mod = f"_root_reward_{uuid.uuid4().hex[:8]}"
    path = ROOT / f"{mod}.py"
    path.write_text("def score(batch):\n    return [float(len(c)) / 10 for c in batch.completions]\n")
    try:
        out = subprocess.run([sys.executable, "-m", "unirl_fast.cli", "train", "--config", "smoke", "--steps", "1",
                              "--scenario", "understand", "--reward", f"{mod}:score", "--run-dir",
                              str(tmp_path / "run")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=900)
    finally:
        path.unlink()
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_missing_reward_module_exits_2_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "unirl_fast.cli", "train", "--config", "smoke", "--reward",
                          "no_such_reward_module_xyz:score", "--run-dir", str(tmp_path / "run")], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no module 'no_such_reward_module_xyz' in the working directory or on the Python path (searched: " \
        in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_no_file_refers_to_a_document_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    bad = re.compile(r"\.\./shared|\b(STYLE|BENCH|COMPILE_REPORT)\.md\b")
    hits = []
    for name in tracked:
        p = ROOT / name
        if p.suffix not in (".py", ".md", ".sh", ".txt", ".ini", ".toml", ".yaml", "") or not p.is_file():
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if bad.search(line) and name != "tests/test_install.py":
                hits.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
    for doc in re.findall(r"\]\(([^)#]+\.md)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / doc).is_file(), f"README links {doc}, which is not in the repository"
