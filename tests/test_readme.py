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


def test_task_row_and_reward_module_train_as_written(tmp_path, monkeypatch, capsys):
    """The README's example task row and ten-line reward module: a generate run on them, the reward's part logged."""
    import json

    from unirl_fast.cli import main

    text = README.read_text()
    row = json.loads(next(line.strip() for line in text[text.index("A task file row"):].splitlines()
                          if line.strip().startswith('{"prompt"')))
    module = _block_after("A task file row").split("\n", 1)[1]  # the indented block after the row: the module
    assert module.startswith("# my_rewards.py") and len(module.strip().splitlines()) <= 12
    (tmp_path / "my_rewards.py").write_text(module)
    rows = [row] + [{**row, "prompt": f"{n} green triangles", "difficulty": 1} for n in range(2, 9)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "smoke", "--scenario", "generate", "--tasks", "prompts.jsonl", "--reward",
                 "my_rewards:aesthetic", "--run-dir", str(tmp_path / "run"), "--steps", "1"]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = next(r for r in recs if r["phase"] == "train")
    assert 0.0 <= train["reward_saturation"] <= 1.0 and train["reward"] >= train["reward_saturation"]
