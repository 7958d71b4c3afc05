"""DeepSpeed scale-out (train/distributed.py) with CPU ranks over gloo.

- One step on 2 ranks (ZeRO-2 with the token-normalised dapo loss, ZeRO-3 with grpo; two accumulated micro-batches
  per rank) gives the plain trainer's gradients and update from the same weights and the same global rollout: the
  test that catches wrong loss / accumulation / rank-averaging scaling.
- `deepspeed --num_gpus 2 -m unirl_fast.cli train` (the real launcher; on a machine without GPUs DeepSpeed picks its
  CPU accelerator and gloo) runs ZeRO-2 and ZeRO-3 to the end: metrics.jsonl written once (rank 0 only), every rank
  ends with the same weights (the trainer all-gathers a checksum and fails otherwise), atomic checkpoints.
- Resume: the run restarted from its step-1 checkpoint (plain env-var launch of the same entry point: RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) reproduces step 2 of the uninterrupted run.
- Bad configs: ZeRO stage not 2/3, prompts_per_step not divisible by the world size, DeepSpeed requested but not
  installed: clear errors, never a silent single-process run.
The ZeRO-3 cases are slow-marked (each launches fresh processes; ~1 min apiece on 2 shared cores): `--runslow`.
The first DeepSpeed process group on a machine JIT-builds DeepSpeed's shared-memory comm op (cached in
~/.cache/torch_extensions; about 2 minutes on 2 cores), so the first test is slower on a fresh machine.
"""
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from unirl_fast.cli import main  # noqa: E402
from unirl_fast.train import PRESETS, TrainConfig, Trainer  # noqa: E402
from unirl_fast.train.checkpoint import read_entry  # noqa: E402
from unirl_fast.train.distributed import check_world, deepspeed_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# smoke-sized 2-rank run: 2 prompts x 2 samples, one prompt (one whole group) per rank, micro-batch 2
RUN = ["train", "--config", "smoke", "--scenario", "reason-generate", "--micro-batch", "2", "--steps", "2",
       "--temperature", "1.5", "--ema-decay", "0.5"]  # the EMA (kept by rank 0) is evaluated, saved and resumed too
# ZeRO-3 with every parameter partitioned (DeepSpeed keeps params below 1e5 elements whole by default, which
# would leave the tiny model unpartitioned and the hooks untested)
Z3_JSON = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")}
    env.update(extra)
    return env


def _stage_args(stage, tmp_path):
    if stage == 2:
        return ["--zero-stage", "2"]
    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps(Z3_JSON))
    return ["--zero-stage", "3", "--deepspeed-config", str(cfg)]


def _launcher(args, timeout=600):
    """The real `deepspeed` launcher (what the `deepspeed` console script runs), 2 local ranks."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()),
           "--module", "unirl_fast.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _env_launch(args, world=2, timeout=600, script=False):
    """The same entry point (or a script) started by hand, as torchrun / any launcher would: one process per rank."""
    port = str(_port())
    cmd = [sys.executable, *([] if script else ["-m", "unirl_fast.cli"]), *args]
    procs = [subprocess.Popen(cmd, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def _lines(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def _close(a, b, tol=1e-5):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


# each case launches fresh processes (~1 min on 2 busy cores): ZeRO-3 runs with --runslow
STAGES = [2, pytest.param(3, marks=pytest.mark.slow)]


def _script_results(script, tmp_path, stage, *args) -> list:
    """Launch tests/<script> on 2 ranks (ZeRO-3 with every parameter partitioned); each rank's RESULT line."""
    argv = [str(ROOT / "tests" / script), str(tmp_path), str(stage), *args]
    if stage == 3:
        (tmp_path / "z3.json").write_text(json.dumps(Z3_JSON))
        argv.append(str(tmp_path / "z3.json"))
    rcs, outs = _env_launch(argv, script=True)
    assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    return [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]) for out in outs]


@pytest.mark.parametrize("stage,loss_type", [(2, "dapo"), pytest.param(3, "grpo", marks=pytest.mark.slow)],
                         ids=["zero2-dapo", "zero3-grpo"])
def test_two_rank_step_matches_the_single_process_trainer(stage, loss_type, tmp_path):
    """Same weights, same global rollout (each rank trains on its rows of it): gradients and update as one process."""
    for res in _script_results("ds_one_step.py", tmp_path, stage, loss_type):
        assert res["n_params"] > 50 and res["moved"] > 0  # the LM, DiT and connector all train; the step moved them
        assert res["grad_rel"] < 1e-4, res  # accumulated, rank-averaged gradients = the single-process ones
        assert res["update_rel"] < 1e-2, res  # AdamW through ZeRO with the per-expert learning rates
        assert _close(res["grad_norm_ds"], res["grad_norm_plain"]), res
        assert _close(res["loss_ds"], res["loss_plain"], 1e-4), res
        if stage == 3:  # the frozen reference (beta_velocity > 0) is partitioned like the weights: no full copy
            assert res["ref_numel"] > 0 and res["ref_local_numel"] == 0, res


@pytest.mark.parametrize("stage", STAGES, ids=["zero2", "zero3"])
def test_fp8_forward_follows_deepspeed_updates(stage, tmp_path):
    """--fp8 under ZeRO-2 / ZeRO-3: after every step the FP8 forward equals the emulation of the current weights."""
    for res in _script_results("ds_fp8_step.py", tmp_path, stage):
        assert res["layers"] > 4 and res["moved"] > 0, res  # FP8 layers in the LM and DiT, and the steps moved them
        assert res["diffs"] == [0.0] * 3, res  # exact: same quantizer and GEMM on the current weights


@pytest.mark.parametrize("stage", STAGES, ids=["zero2", "zero3"])
def test_two_ranks_train_and_resume(stage, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    args = RUN + _stage_args(stage, tmp_path) + ["--save-every", "1", "--keep-checkpoints", "2"]
    p = _launcher(args + ["--run-dir", str(a)])
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    results = [line for line in p.stdout.splitlines() if line.startswith('{"run_dir"')]
    assert len(results) == 1  # only rank 0 reports
    lines = _lines(a)
    assert [(r["phase"], r["step"]) for r in lines] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    ck = a / "checkpoints" / "step-0000002"
    assert (a / "checkpoints" / "latest").read_text() == ck.name
    names = {f.name for f in ck.iterdir()}
    assert {"model.safetensors", "state.json", "state-rank0.json", "state-rank1.json", "ds", "ema.json"} <= names
    assert not [n for n in names if n.endswith(".pt")]  # no pickle of ours (DeepSpeed's own files are under ds/)
    assert (a / "rewards.png").is_file() and (a / "samples_after.png").is_file()

    # restart from the step-1 checkpoint (as if the run had died after it) and compare step 2
    shutil.copytree(a, b)
    (b / "checkpoints" / "latest").write_text("step-0000001")
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:2]))
    rcs, outs = _env_launch(args + ["--run-dir", str(b)])
    assert rcs == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    assert "resumed from" in outs[0] and "at step 1" in outs[0]
    again = _lines(b)
    assert [(r["phase"], r["step"]) for r in again] == [(r["phase"], r["step"]) for r in lines]
    for key in ("reward", "grad_norm", "text_loss", "image_loss", "text_entropy_mean", "image_velocity_mse"):
        assert _close(again[2][key], lines[2][key]), (key, again[2][key], lines[2][key])
    assert _close(again[3]["eval_reward"], lines[3]["eval_reward"])
    wa = read_entry(ck, "model")
    wb = read_entry(b / "checkpoints" / "step-0000002", "model")
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-5

    # one process reads the consolidated model for `unirl-fast eval`, but will not train on without the
    # partitioned optimizer state
    assert main(["eval", str(a)]) == 0
    assert _close(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_reward"],
                  lines[3]["eval_reward"])
    cfg = TrainConfig(**{**json.loads((a / "config.json").read_text()), "zero_stage": None, "steps": 3})
    with pytest.raises(ValueError, match=f"zero_stage {stage} -> None"):  # refused before any work
        Trainer(cfg, log=lambda *_: None)
    saved = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**saved, "zero_stage": None}))  # edited by hand: the checkpoint
    with pytest.raises(ValueError, match="written under DeepSpeed"):  # itself still cannot train on one process
        Trainer(dataclasses.replace(cfg, steps=saved["steps"] + 1), log=lambda *_: None).train()


def test_single_process_path_never_imports_deepspeed():
    code = ("import sys, unirl_fast.cli, unirl_fast.train.trainer; "
            "assert 'deepspeed' not in sys.modules, sorted(m for m in sys.modules if 'deepspeed' in m)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("stage", [0, 1, 4])
def test_zero_stage_must_be_2_or_3(stage, capsys):
    with pytest.raises(ValueError, match="zero_stage must be 2 or 3"):
        dataclasses.replace(PRESETS["smoke"], zero_stage=stage).validate()
    assert main(["train", "--config", "smoke", "--zero-stage", str(stage)]) == 2
    assert "zero_stage must be 2 or 3" in capsys.readouterr().err


def test_batch_split_over_ranks_is_checked():
    cfg = dataclasses.replace(PRESETS["smoke"], prompts_per_step=3, group_size=2, micro_batch=2)
    with pytest.raises(ValueError, match="prompts_per_step 3 is not divisible by the world size 2"):
        check_world(cfg, 2)
    assert check_world(cfg, 3) == 2
    with pytest.raises(ValueError, match="per-rank batch 2 .* not divisible by micro_batch 4"):
        check_world(dataclasses.replace(cfg, prompts_per_step=2, micro_batch=4), 2)


def test_two_rank_launch_rejects_an_odd_prompt_count(tmp_path):
    rcs, outs = _env_launch(["train", "--config", "smoke", "--prompts-per-step", "3", "--micro-batch", "2",
                             "--run-dir", str(tmp_path)], timeout=300)
    assert rcs[0] != 0 and rcs[1] != 0
    assert "prompts_per_step 3 is not divisible by the world size 2" in outs[0]
    assert not (tmp_path / "base").exists()  # rejected before the pretrain stage


def test_deepspeed_config_is_derived_and_merged(tmp_path):
    cfg = dataclasses.replace(PRESETS["smoke"], prompts_per_step=4, group_size=4, micro_batch=2, zero_stage=3,
                              grad_clip=0.5)
    d = deepspeed_config(cfg, 2)
    assert (d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"], d["train_batch_size"]) == (2, 4, 16)
    assert d["gradient_clipping"] == 0.5 and d["zero_optimization"] == {"stage": 3}
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "bf16": {"enabled": True}}))
    d = deepspeed_config(dataclasses.replace(cfg, deepspeed_config=str(f)), 2)
    assert d["zero_optimization"] == {"stage": 3, "overlap_comm": False} and d["bf16"] == {"enabled": True}
    f.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ValueError, match="batch sizes come from"):
        deepspeed_config(dataclasses.replace(cfg, deepspeed_config=str(f)), 2)
    f.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="--zero-stage 3 but .* says stage 2"):
        deepspeed_config(dataclasses.replace(cfg, deepspeed_config=str(f)), 2)
    with pytest.raises(ValueError, match="deepspeed_config .* is not a file"):
        dataclasses.replace(cfg, deepspeed_config=str(tmp_path / "nope.json")).validate()


@pytest.mark.parametrize("how", ["flag", "launcher-env"])
def test_requested_but_missing_deepspeed_is_an_error(how, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    cfg = TrainConfig(**{**dataclasses.asdict(PRESETS["smoke"]), "run_dir": str(tmp_path)})
    if how == "flag":
        cfg = dataclasses.replace(cfg, zero_stage=2)
    else:
        monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match="DeepSpeed was requested.*pip install deepspeed"):
        Trainer(cfg, log=lambda *_: None)
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("stage", STAGES, ids=["zero2", "zero3"])
def test_two_ranks_bf16_with_gradient_checkpointing(stage, tmp_path):
    """--precision bf16 (autocast inside the fp32 engine) with both experts checkpointed, under ZeRO-2 / ZeRO-3."""
    args = RUN + _stage_args(stage, tmp_path) + ["--precision", "bf16", "--grad-ckpt-lm", "--grad-ckpt-dit",
                                                 "--run-dir", str(tmp_path / "a")]
    rcs, outs = _env_launch(args)
    assert rcs == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    train = [r for r in _lines(tmp_path / "a") if r["phase"] == "train"]
    assert len(train) == 2 and all(r["text_loss"] == r["text_loss"] and r["grad_norm"] > 0 for r in train)


@pytest.mark.parametrize("stage", STAGES, ids=["zero2", "zero3"])
def test_two_ranks_train_the_vision_language_expert(stage, tmp_path):
    """understand with `--preset tiny-vlm` (the LM sees the scene through its vision tower) under ZeRO-2 / ZeRO-3."""
    args = ["train", "--config", "smoke", "--scenario", "understand", "--preset", "tiny-vlm", "--micro-batch", "2",
            "--steps", "2", "--run-dir", str(tmp_path / "a"), *_stage_args(stage, tmp_path)]
    rcs, outs = _env_launch(args)
    assert rcs == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    train = [r for r in _lines(tmp_path / "a") if r["phase"] == "train"]
    assert len(train) == 2 and all(r["text_loss"] == r["text_loss"] for r in train)


@pytest.mark.parametrize("stage", STAGES, ids=["zero2", "zero3"])
def test_two_ranks_train_lora_save_only_the_trained_weights_resume_and_export(stage, tmp_path):
    """LoRA on both experts under ZeRO: the reference is the policy with its adapters off (full weights gathered at
    stage 3); checkpoints hold only adapters and connector (model and DeepSpeed's own module states); a restart
    from step 1 gives step 2 again; one process exports the run with the adapters merged."""
    pytest.importorskip("peft")
    run = tmp_path / "a"
    base = ["train", "--config", "smoke", "--scenario", "reason-generate", "--micro-batch", "2", "--beta", "0.02",
            "--lora-lm", "4,8", "--lora-dit", "4,8", "--save-every", "1", "--run-dir", str(run),
            *_stage_args(stage, tmp_path)]
    rcs, outs = _env_launch(base + ["--steps", "2"])
    assert rcs == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    sd = read_entry(run / "checkpoints" / "step-0000002", "model")
    assert sd and all("lora_" in k or k.startswith("connector.") for k in sd)
    lines = _lines(run)
    b = tmp_path / "b"  # restart from the step-1 checkpoint: step 2 again, the same
    shutil.copytree(run, b)
    (b / "checkpoints" / "latest").write_text("step-0000001")
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:2]))
    rcs, outs = _env_launch([a if a != str(run) else str(b) for a in base] + ["--steps", "2"])
    assert rcs == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    assert "resumed from" in outs[0] and "at step 1" in outs[0]
    again = _lines(b)
    for key in ("reward", "grad_norm", "text_loss", "image_loss"):
        assert _close(again[2][key], lines[2][key]), (key, again[2][key], lines[2][key])
    sb = read_entry(b / "checkpoints" / "step-0000002", "model")
    assert set(sb) == set(sd) and max((sd[k] - sb[k]).abs().max().item() for k in sd) < 1e-5
    p = subprocess.run([sys.executable, "-m", "unirl_fast.cli", "export", str(b), str(tmp_path / "out")], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "out" / "lm" / "config.json").is_file() and "merged" in p.stderr
