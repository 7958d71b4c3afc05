"""verl 0.9.1's own unit tests with the drop-in applied (`patch(deep=True)`), skipped without verl.

Run in the verl venv (README): `UNIRL_VERL_SRC=<verl v0.9.1 checkout> python -m pytest tests/test_verl_suite.py`.
verl's test files are not in this repository: they come from `$UNIRL_VERL_SRC`, else from verl's sdist on the
package index (tests/peer_sources.py). The sdist ships tests/trainer but not tests/utils, so the fused-head check
needs the checkout (it is skipped, with that reason, without one).

- tests/trainer (verl's CPU suite) under pytest in a fresh interpreter whose plugin patches verl before collection.
  Only the deep patch reaches verl's rollout-correction tests, which call `compute_policy_loss_vanilla` by name:
  the run counts the calls into our ops and requires some.
- tests/utils/test_linear_cross_entropy.py, a GPU script (its class has an __init__ and runs from __main__): its
  `verify_correctness` on the CPU, every check kept (log-probs, entropies, hidden and head gradients of plain torch
  against verl's logits path, verl's FusedLinearForPPO and verl's kernel: all three ours after the patch), with CPU
  changes only: tensors made on the CPU instead of "cuda", the CUDA timing / memory calls as no-ops (timings are
  printed, never checked), 2 iterations instead of 5, and shapes cut to CPU size (same dtype, bf16; odd vocabularies
  kept). The memory report (`check_storage_all`) prints CUDA peaks only and is not run. Run twice: with our
  reference path, and with our Triton path (under the Triton interpreter on a CPU, TRITON_INTERPRET=1 as
  tests/conftest.py sets it), whose kernel drop-in forms fp32 logits as verl's kernel does; with bf16 logits it
  misses verl's kernel tolerance (log-probs at 3 and 4 of these 5 shapes in two draws).
"""
from __future__ import annotations

import importlib.metadata
import xml.etree.ElementTree as ET

import pytest
from peer_sources import copy_tests, peer_tree, run_python

pytest.importorskip("verl")
import unirl_fast.integrations.verl as uf_verl  # noqa: E402

VERSION = importlib.metadata.version("verl")
pytestmark = pytest.mark.skipif(VERSION != uf_verl.VERL_VERSION,
                                reason=f"the drop-in is checked against verl {uf_verl.VERL_VERSION}, not {VERSION}")

# counts the calls into our ops (the names the drop-in calls them by) and applies the patch before collection
_COUNTER = """
import json, os
import torch
import unirl_fast.integrations.verl as v
CALLS = {}

def _count(name):
    fn = getattr(v, name)

    @torch.compiler.disable  # verl's script compiles the functions that call ours: count outside the graph
    def wrapped(*a, **k):
        CALLS[name] = CALLS.get(name, 0) + 1
        return fn(*a, **k)
    setattr(v, name, wrapped)

for _name in ("policy_loss", "_uf_logprobs", "_uf_linear_logprobs"):
    _count(_name)
v.patch(impl=os.environ["UF_IMPL"], deep=True)
"""

_PYTEST_RUNNER = _COUNTER + """
import sys
import pytest
rc = pytest.main(["-q", "-p", "no:cacheprovider", "--junitxml", sys.argv[1], "tests/trainer"])
print("RESULT " + json.dumps({"rc": int(rc), "calls": CALLS}))
"""

_LCE_RUNNER = _COUNTER + """
import sys, types
PATH = sys.argv[1]
SHAPES = [(97, 56, 1521), (109, 28, 1519), (77, 64, 323), (70, 128, 1024), (410, 128, 1024)]  # (N, H, V) per case


class _Event:  # CUDA timing events: the script prints latencies, never checks them
    def __init__(self, **kw):
        pass

    def record(self):
        pass

    def elapsed_time(self, other):
        return 0.0


torch.cuda.Event = _Event
for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
    setattr(torch.cuda, name, lambda *a, **k: None)
src = open(PATH).read()
n_cuda = src.count('device="cuda"')
mod = types.ModuleType("verl_test_linear_cross_entropy")
exec(compile(src.replace('device="cuda"', 'device="cpu"'), PATH, "exec"), mod.__dict__)


class OnCPU(mod.TestLinearCrossEntropy):
    def generate_hyper(self):
        super().generate_hyper()
        self.num_tokens, self.hidden_size, self.vocab_size = SHAPES[self.test_case_idx]


done = []
for i in range(int(mod.MAX_TEST_CASES)):
    OnCPU(i).verify_correctness(iterations=2)
    done.append(i)
print("RESULT " + json.dumps({"cases": done, "n_cuda": n_cuda, "calls": CALLS}))
"""


@pytest.fixture(scope="module")
def verl_src():
    return peer_tree("verl", VERSION, "UNIRL_VERL_SRC")


def test_verls_trainer_suite_passes_with_the_deep_patch(verl_src, tmp_path):
    copy_tests(verl_src, ["tests/trainer"], tmp_path)
    rc, res, text = run_python(_PYTEST_RUNNER, tmp_path, tmp_path / "junit.xml", env={"UF_IMPL": "reference"})
    assert res is not None, text[-4000:]
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    print(f"verl {VERSION} tests/trainer with patch(deep=True): {counts}, calls into our ops {res['calls']}")
    assert rc == 0 and res["rc"] == 0 and counts["failures"] == counts["errors"] == 0, text[-4000:]
    assert counts["tests"] - counts["skipped"] >= 100  # 153 in 0.9.1: the suite ran, not an empty collection
    assert res["calls"].get("policy_loss", 0) > 0  # verl's own checks of compute_policy_loss_vanilla reached ours


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_verls_linear_cross_entropy_checks_pass_with_the_patch(verl_src, tmp_path, impl):
    path = verl_src / "tests" / "utils" / "test_linear_cross_entropy.py"
    if not path.is_file():
        pytest.skip(f"{verl_src} has no tests/utils/test_linear_cross_entropy.py (verl's sdist does not ship "
                    "tests/utils): set UNIRL_VERL_SRC to a verl v0.9.1 checkout")
    rc, res, text = run_python(_LCE_RUNNER, tmp_path, path, env={"UF_IMPL": impl})
    assert rc == 0 and res is not None, text[-4000:]
    assert res["n_cuda"] == 5  # the file's five CUDA tensor constructions, all moved to the CPU
    assert res["cases"] == [0, 1, 2, 3, 4]
    # per case and iteration: logits path (log-probs, entropy), FusedLinearForPPO and the kernel all went through ours
    assert res["calls"].get("_uf_logprobs", 0) >= 20 and res["calls"].get("_uf_linear_logprobs", 0) >= 20
