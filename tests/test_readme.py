"""The README's code that should run as written does: the plain-PyTorch snippet defines every name it uses."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    lines, seen = [], False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("    "):
            lines.append(line[4:])
            seen = True
        elif seen and line.strip():
            break
    return "\n".join(lines)


def test_plain_pytorch_snippet_runs_as_written():
    code = _block_after("Plain PyTorch: pass the last hidden states")
    assert "loss.backward()" in code
    scope = {}
    exec(compile(code, "README plain-PyTorch snippet", "exec"), scope)
    assert scope["loss"].ndim == 0 and scope["lm_head"].weight.grad is not None
    assert scope["backbone"][0].weight.grad is not None


def test_trl_snippet_defines_its_names_and_runs_on_a_cpu():
    code = _block_after("TRL: one call makes `GRPOTrainer`")
    for name in ("model", "ds", "reward_fn", "args", "trainer"):
        assert re.search(rf"^(def )?{name}\b", code, re.M), name
    assert "use_cpu=True, bf16=False" in code
