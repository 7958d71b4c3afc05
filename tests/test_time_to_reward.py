"""The time-to-reward harness: the compute counters are exact for known call patterns, the target / not-reached /
paired-comparison arithmetic on synthetic curves, and the `--smoke` harness end to end."""
import copy
import json
from pathlib import Path

import pytest
import torch

from unirl_fast.models import UnifiedModel
from unirl_fast.profiling.counters import ComputeCounter, Counts
from unirl_fast.rollout import ImageEngine, ImageSamplingParams, SamplingParams, TextEngine, replay_logprobs
from unirl_fast.rollout.image import replay_velocity
from unirl_fast.rollout.text import recompute_logprobs
from unirl_fast.train.pretrain import world_model_config

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedModel(world_model_config("tiny", False)).eval()


def _prompts(model, texts=("draw: a red square", "a b", "two blue circles left of a green one")):
    return model.tokenizer(list(texts))


def test_image_rollout_counts_steps_times_rows_and_lm_tokens(model):
    ids, mask = _prompts(model)
    B, T, Q = ids.shape[0], 5, model.config.num_queries
    with ComputeCounter().attach(model) as c:
        ImageEngine(model).generate(ids, mask, ImageSamplingParams(num_steps=T, window_size=2))
    assert c.totals() == Counts(dit_forward=T * B, lm_forward_tokens=int(mask.sum()) + B * Q)
    with ComputeCounter().attach(model) as c:  # CFG: one 2B call per step, and the null prompt's queries
        ImageEngine(model).generate(ids, mask, ImageSamplingParams(num_steps=T, guidance_scale=3.0))
    assert c.totals() == Counts(dit_forward=T * 2 * B, lm_forward_tokens=int(mask.sum()) + 2 * B * Q)


def test_replay_with_backward_counts_rows_forward_and_backward(model):
    ids, mask = _prompts(model)
    traj = ImageEngine(model).generate(ids, mask, ImageSamplingParams(num_steps=6, window_size=3))
    with ComputeCounter().attach(model) as c:
        logp = replay_logprobs(model, traj)  # S = 3 trainable steps on all B rows, with grad
        logp.sum().backward(retain_graph=True)
        assert c.totals() == Counts(dit_forward=3 * 3, dit_backward=3 * 3)
        logp.sum().backward()  # a second backward through the same forward is a second backward
        assert c.totals() == Counts(dit_forward=9, dit_backward=18)
    rows = torch.tensor([0, 2])
    with ComputeCounter().attach(model) as c:
        with torch.no_grad():
            replay_velocity(model, traj, torch.tensor([1, 4]), rows=rows)
        v, _ = replay_velocity(model, traj, torch.tensor([0]), rows=rows)
        assert c.totals() == Counts(dit_forward=2 * 2 + 2)  # nothing has received a gradient yet
        v.sum().backward()
    assert c.totals() == Counts(dit_forward=6, dit_backward=2)


def test_text_rollout_counts_prompt_and_fed_completion_tokens(model):
    """Rows stop at different steps (EOS = a third of the vocabulary): each row feeds its prompt and every completion
    token but the last (sampled, never fed back); a finished row's pad is not counted."""
    ids, mask = _prompts(model)
    eos = tuple(range(0, model.lm.config.vocab_size, 3))
    eng = TextEngine(model.lm, pad_token_id=model.tokenizer.pad_token_id, compile=False)
    with ComputeCounter().attach(model) as c:
        out = eng.generate(ids, mask, SamplingParams(max_new_tokens=8, eos_token_ids=eos),
                           generator=torch.Generator().manual_seed(3))
    lengths = out.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the rows did stop at different steps
    B = ids.shape[0]
    assert c.totals() == Counts(lm_forward_tokens=int(mask.sum()) + int(lengths.sum()) - B)
    with ComputeCounter().attach(model) as c:  # scoring with gradients: prompt + completion, forward and backward
        model.lm.requires_grad_(True)
        recompute_logprobs(model.lm, out).sum().backward()
        model.lm.requires_grad_(False)
    n = int(mask.sum()) + int(lengths.sum())
    assert c.totals() == Counts(lm_forward_tokens=n, lm_backward_tokens=n)


def test_sections_roles_copies_and_detach(model):
    ids, mask = _prompts(model)
    ref = copy.deepcopy(model)
    c = ComputeCounter().attach(model)
    shadow = copy.deepcopy(model)  # a copy made after attaching carries the hooks but is not counted
    params = ImageSamplingParams(num_steps=2, sde="ode")
    ImageEngine(shadow).generate(ids, mask, params)
    assert c.totals() == Counts()
    c.attach(ref, role="reference")
    ImageEngine(model).generate(ids, mask, params)
    with c.section("eval"):
        ImageEngine(ref).generate(ids, mask, params)
    assert c.totals("train", "policy").dit_forward == 6 and c.totals("train", "reference") == Counts()
    assert c.totals("eval", "reference").dit_forward == 6 and c.totals("eval", "policy") == Counts()
    assert c.totals("train").dit_forward == 6 and c.sections() == ["eval", "train"]
    c.detach()
    assert not model.dit._forward_hooks and not model.lm.get_decoder()._forward_hooks  # nothing left behind
    ImageEngine(model).generate(ids, mask, params)
    assert c.totals().dit_forward == 6
    tot = c.totals("eval")
    assert tot.dit_forward_equivalents == 6 and tot.lm_token_equivalents == tot.lm_forward_tokens
    with pytest.raises(ValueError, match="role"):
        ComputeCounter().attach(model, role="critic")
    with pytest.raises(TypeError, match="expert"):
        ComputeCounter().attach(torch.nn.Linear(2, 2))


def test_watch_refuses_an_expert_that_is_not_attached_and_attach_trainer_finds_every_model(model):
    from types import SimpleNamespace

    from bench.time_to_reward import attach_trainer

    ids, mask = _prompts(model)
    params = ImageSamplingParams(num_steps=2, sde="ode")
    old = copy.deepcopy(model)  # e.g. an old policy kept as a copy
    c = ComputeCounter().attach(model)
    with c.watch():
        ImageEngine(model).generate(ids, mask, params)
        with pytest.raises(RuntimeError, match="Qwen2Model that the ComputeCounter is not attached"):
            ImageEngine(old).generate(ids, mask, params)
        with torch.no_grad(), pytest.raises(RuntimeError, match="SanaTransformer2DModel that the ComputeCounter"):
            old.velocity(torch.randn(ids.shape[0], *model.latent_shape), 0.5, model.condition(ids, mask))
    ImageEngine(old).generate(ids, mask, params)  # outside the block: nothing watches
    c.detach()
    ref = copy.deepcopy(model)
    trainer = SimpleNamespace(model=model, ref=ref, old_policy=old, alias=model, connector=model.connector)
    c = attach_trainer(ComputeCounter(), trainer)
    with c.watch():
        for m in (model, ref, old):
            ImageEngine(m).generate(ids, mask, params)
    B = ids.shape[0]
    assert [c.totals(role=r).dit_forward for r in ("policy", "reference", "auxiliary")] == [2 * B] * 3
    c.detach()


def test_vlm_decoder_is_counted(model):
    """A vision-language LM's text decoder is hooked: the conditioning pass counts its prompt (image tokens included)
    and queries."""
    from unirl_fast.models import vlm

    torch.manual_seed(0)
    m = UnifiedModel(world_model_config("tiny-vlm", True)).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    vision = vlm.process_images(m.lm, images)
    ids, mask = vlm.encode_prompts(m.tokenizer, m.lm, [vlm.IMAGE_MARK + "edit: x", vlm.IMAGE_MARK + "y"], vision)
    with ComputeCounter().attach(m) as c:
        m.condition(ids, mask, vision)
    assert c.totals() == Counts(lm_forward_tokens=int(mask.sum()) + 2 * m.config.num_queries)


# the arithmetic on synthetic curves ----------------------------------------------------------------------------------
def _run(config, seed, xs, rewards, tasks=None):
    pts = [{"step": i, "x": x, "wall_s": x / 10, "eval_reward": r} for i, (x, r) in enumerate(zip(xs, rewards))]
    for p, t in zip(pts, tasks or []):
        p["task_rewards"] = t
    return {"config": config, "seed": seed, "points": pts}


def test_target_reach_not_reached_and_paired_comparison():
    from bench.time_to_reward_analysis import first_reach, format_table, reward_at, summarize

    runs = [_run("base", 0, [0, 100, 200], [0.1, 0.2, 0.4]), _run("base", 1, [0, 100, 200], [0.1, 0.3, 0.2]),
            _run("fast", 0, [0, 50, 100, 190], [0.1, 0.35, 0.2, 0.5]),
            _run("fast", 1, [0, 50, 100, 190], [0.1, 0.32, 0.31, 0.25]),
            _run("slow", 0, [0, 150], [0.1, 0.2]), _run("slow", 1, [0, 150], [0.1, 0.31])]
    assert reward_at(runs[2]["points"], 120)["eval_reward"] == 0.2 and reward_at(runs[2]["points"], -1) is None
    assert first_reach(runs[0]["points"], 0.25)["x"] == 200 and first_reach(runs[4]["points"], 0.25) is None
    target, per_seed, per_config = summarize(runs, "base")
    assert target == pytest.approx(0.3)  # the baseline's final rewards 0.4 and 0.2, mean over seeds
    row = {(r["config"], r["seed"]): r for r in per_seed}
    assert row["base", 0]["x_to_target"] == 200
    assert row["base", 1]["x_to_target"] == 100  # 0.3 reaches the mean 0.30000000000000004 (round-off tolerated)
    assert row["base", 0]["x_ratio"] == 1.0
    assert row["fast", 0]["x_to_target"] == 50 and row["fast", 0]["x_ratio"] == pytest.approx(0.25)
    assert row["fast", 0]["wall_ratio"] == pytest.approx(0.25) and row["fast", 0]["wall_to_target_s"] == 5
    assert row["fast", 1]["x_to_target"] == 50 and row["fast", 1]["x_ratio"] == pytest.approx(0.5)
    assert not row["slow", 0]["reached"] and row["slow", 0]["x_to_target"] is None
    assert row["slow", 0]["x_ratio"] is None and row["slow", 0]["x_ratio_upper"] is None
    assert row["slow", 1]["x_ratio"] == pytest.approx(1.5)
    # equal compute: each seed's baseline budget (200); fast's last evaluation at <= 200 is at 190
    assert row["fast", 0]["reward_at_equal_x"] == 0.5 and row["fast", 0]["diff_vs_baseline"] == pytest.approx(0.1)
    assert row["fast", 1]["diff_vs_baseline"] == pytest.approx(0.05)
    agg = {a["config"]: a for a in per_config}
    assert agg["fast"]["x_to_target_mean"] == 50 and agg["fast"]["x_to_target_std"] == 0
    assert agg["fast"]["x_ratio_mean"] == pytest.approx(0.375)
    assert agg["fast"]["diff_mean"] == pytest.approx(0.075)
    assert agg["fast"]["diff_se_seeds"] == pytest.approx(0.025)  # std(0.1, 0.05) / sqrt(2)
    assert agg["slow"]["n_reached"] == 1 and agg["slow"]["x_to_target_mean"] is None  # no mean over a missing seed
    assert agg["base"]["x_to_target_mean"] == 150 and agg["base"]["x_to_target_std"] == pytest.approx(70.71, 1e-3)
    table = format_table(per_seed, per_config, "dit_fe")
    assert "not reached (1 of 2 seeds)" in table and "s0: not reached, s1: 150" in table
    assert "| fast | 2/2 | 50 ± 0 |" in table


def test_ratio_bound_when_only_the_configuration_reaches_and_task_level_z():
    from bench.time_to_reward_analysis import summarize

    tasks_b = [[0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.5]]
    tasks_c = [[0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.5, 1.0]]
    runs = [_run("base", 0, [0, 80], [0.0, 0.25], tasks_b), _run("new", 0, [0, 40, 80], [0.0, 0.75, 0.75],
                                                                  [tasks_c[0], tasks_c[1], tasks_c[1]])]
    target, per_seed, per_config = summarize(runs, "base", target=0.5)
    row = {r["config"]: r for r in per_seed}
    assert not row["base"]["reached"] and row["new"]["x_ratio"] is None
    assert row["new"]["x_ratio_upper"] == pytest.approx(0.5)  # reached at 40, the baseline not within its 80
    agg = {a["config"]: a for a in per_config}["new"]
    assert agg["diff_n_tasks"] == 4 and agg["diff_mean"] == pytest.approx(0.5)
    assert agg["diff_se_tasks"] == pytest.approx(0.0) and agg["diff_z_tasks"] is None  # every task +0.5: no spread
    runs[1]["points"][-1]["task_rewards"] = [0.5, 1.0, 1.0, 1.0]
    agg = {a["config"]: a for a in summarize(runs, "base", target=0.5)[2]}["new"]
    assert agg["diff_se_tasks"] == pytest.approx(0.125) and agg["diff_z_tasks"] == pytest.approx(0.625 / 0.125)
    with pytest.raises(ValueError, match="seed 1"):
        summarize(runs + [_run("new", 1, [0], [0.0])], "base")
    with pytest.raises(ValueError, match="baseline 'nope'"):
        summarize(runs, "nope")


# the harness end to end ----------------------------------------------------------------------------------------------
def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_harness_end_to_end(tmp_path, capsys):
    """`unirl-fast bench --time-to-reward --smoke`: two configurations of generate, one seed, through the CLI. The
    counts in curves.csv are the smoke config's call pattern per RL step (rollout T*B, replay S*B forward and
    backward, reference replay S*B), evaluation counted apart, and the variant stops within the baseline's budget."""
    from unirl_fast.cli import main
    from unirl_fast.train import train_preset

    out = tmp_path / "ttr"
    assert main(["bench", "--time-to-reward", "--smoke", "--out", str(out)]) == 0
    assert {"curves.csv", "summary.csv", "report.md", "runs.json", "time_to_reward.png"} <= {p.name for p in
                                                                                            out.iterdir()}
    c = train_preset("smoke", "generate")
    B, T, E = c.prompts_per_step * c.group_size, c.image_steps, c.eval_prompts
    rows = _csv(out / "curves.csv")
    for name, S in (("flow_grpo", c.sde_window), ("window1", 1)):
        mine = [r for r in rows if r["config"] == name]
        assert mine[0]["step"] == "0" and mine[0]["x"] == "0"
        for i, r in enumerate(mine):
            n = int(r["step"])
            assert int(r["dit_forward"]) == n * (T * B + 2 * S * B)  # policy rollout + replay, reference replay
            assert int(r["dit_backward"]) == n * S * B and int(r["ref_dit_forward"]) == n * S * B
            assert int(r["x"]) == int(r["dit_fe"]) == n * (T * B + 4 * S * B)
            assert int(r["eval_dit_forward"]) == (i + 1) * E * T  # each evaluation: E held-out tasks, T ODE steps
            assert int(r["lm_backward_tokens"]) > 0 if n else int(r["lm_forward_tokens"]) == 0  # the queries train
        if name == "flow_grpo":
            budget = int(mine[-1]["x"])
            assert mine[-1]["step"] == str(c.steps)
        else:
            step_cost = T * B + 4 * B
            assert int(mine[-1]["x"]) <= budget < int(mine[-1]["x"]) + step_cost
    summary = _csv(out / "summary.csv")
    assert [(r["config"], r["seed"]) for r in summary] == [("flow_grpo", "0"), ("window1", "0"),
                                                           ("flow_grpo", "all"), ("window1", "all")]
    base_final = float([r for r in rows if r["config"] == "flow_grpo"][-1]["eval_reward"])
    assert float(summary[0]["target"]) == pytest.approx(base_final) and summary[0]["reached"] == "True"
    report = (out / "report.md").read_text()
    assert "| flow_grpo | 1/1 |" in report and "| window1 |" in report
    assert "results:" in capsys.readouterr().out
    # --resume: window1's run dropped as if interrupted (its directory left behind) and group4 added: only those run
    data = json.loads((out / "runs.json").read_text())
    (out / "runs.json").write_text(json.dumps({**data, "runs": data["runs"][:1]}))
    argv = ["bench", "--time-to-reward", "--smoke", "--out", str(out), "--resume"]
    assert main([*argv, "--config", "window1", "--config", "group4"]) == 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert [r["config"] for r in runs] == ["flow_grpo", "window1", "group4"]
    assert runs[0]["points"] == data["runs"][0]["points"]  # kept as it was
    no_wall = [[_no_times(pt) for pt in r["points"]] for r in (runs[1], data["runs"][1])]
    assert no_wall[0] == no_wall[1]  # redone from step 0: the same counts and rewards (same seed, same base)
    assert "left by an interrupted run, removed" in capsys.readouterr().out
    assert len(_csv(out / "curves.csv")) == sum(len(r["points"]) for r in runs)  # rewritten, not appended
    assert main([*argv, "--steps", "3"]) == 2
    assert "baseline_steps 2 -> 3" in capsys.readouterr().err
    assert main([*argv, "--config", "window1=--sde-window 2"]) == 2
    assert "config 'window1' flags ['--sde-window', '1'] -> ['--sde-window', '2']" in capsys.readouterr().err


def test_smoke_harness_lm_only_scenario_counts_tokens(tmp_path):
    """understand (LM only): LM token-equivalents on the x axis, no DiT anywhere."""
    from unirl_fast.cli import main

    out = tmp_path / "ttr"
    assert main(["bench", "--time-to-reward", "--smoke", "--scenario", "understand", "--out", str(out)]) == 0
    rows = _csv(out / "curves.csv")
    assert {r["config"] for r in rows} == {"grpo", "group4"}
    assert all(r["dit_fe"] == "0" and r["eval_dit_forward"] == "0" for r in rows)
    for name in ("grpo", "group4"):
        xs = [int(r["x"]) for r in rows if r["config"] == name]
        assert xs == sorted(xs) and xs[-1] > 0
        assert all(int(r["x"]) == int(r["lm_forward_tokens"]) + 2 * int(r["lm_backward_tokens"])
                   for r in rows if r["config"] == name)
    settings = json.loads((out / "runs.json").read_text())["settings"]
    assert settings["unit"] == "lm_te" and settings["baseline"] == "grpo"


@pytest.mark.parametrize("argv, message", [
    (["--config", "nope"], "unknown configuration 'nope'"),
    (["--config", "x=--steps 3"], "sets --steps, which the harness owns"),
    (["--config", "x=--eval-prompts 3"], "sets --eval-prompts"),
    (["--config", "x=--sde-windo 3"], "unknown trainer flags --sde-windo"),
    (["--config", "x=--sde-window 99"], "sde_window must be in"),
    (["--common", "--seed 3"], "--common sets --seed"),
    (["--scenario", "nope"], "unknown scenario 'nope'"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--baseline", "zzz", "--config", "window1"], "baseline 'zzz'"),
], ids=["unknown-name", "owned-steps", "owned-eval", "misspelt-flag", "bad-value", "common-owned", "scenario",
        "seeds", "baseline"])
def test_bad_input_fails_before_any_work(tmp_path, capsys, argv, message):
    from unirl_fast.cli import main

    out = tmp_path / "ttr"
    assert main(["bench", "--time-to-reward", "--smoke", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_configurations_from_a_file_and_the_command_line(tmp_path):
    import bench.time_to_reward as ttr

    f = tmp_path / "configs.yaml"
    f.write_text("short: --image-steps 4 --sde-window 2\nlisted: [--group-size, '4']\nmapped: {sde_window: 1, "
                 "group_noise: true}\n")
    args = ttr.parse_args(["--configs-file", str(f), "--config", "window2", "--config", "mine=--lr-dit 1e-4",
                           "--baseline", "flow_grpo"])
    specs = ttr.config_specs(args)
    assert list(specs) == ["flow_grpo", "short", "listed", "mapped", "window2", "mine"]  # the baseline first
    assert specs["mapped"] == ("--sde-window", "1", "--group-noise") and specs["mine"] == ("--lr-dit", "1e-4")
    assert specs["short"] == ("--image-steps", "4", "--sde-window", "2")


def test_merge_reports_seeds_run_as_separate_processes(tmp_path, capsys):
    """Seeds run apart (--first-seed, one base cache) and merged give one report over both seeds; mismatched
    settings or a seed in two folders are refused."""
    from unirl_fast.cli import main

    cache = tmp_path / "base"
    for seed in (0, 1):
        assert main(["bench", "--time-to-reward", "--smoke", "--first-seed", str(seed), "--base-cache", str(cache),
                     "--out", str(tmp_path / f"s{seed}")]) == 0
    assert main(["bench", "--time-to-reward", "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                 str(tmp_path / "all")]) == 0
    summary = _csv(tmp_path / "all" / "summary.csv")
    assert sorted((r["config"], r["seed"]) for r in summary) == sorted(
        [(c, s) for c in ("flow_grpo", "window1") for s in ("0", "1", "all")])
    rows = _csv(tmp_path / "all" / "curves.csv")
    finals = [float([r for r in rows if r["config"] == "flow_grpo" and r["seed"] == s][-1]["eval_reward"])
              for s in ("0", "1")]
    assert float(summary[0]["target"]) == pytest.approx(sum(finals) / 2)
    capsys.readouterr()
    assert main(["bench", "--time-to-reward", "--merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out",
                 str(tmp_path / "dup")]) == 2
    assert "appear in two folders" in capsys.readouterr().err


# wall-clock: a sleeping loopback reward service, configurations side by side ------------------------------------------
def test_the_sleeping_service_answers_zeros_and_stops_by_itself():
    """It answers 0 per sample after its sleep, one request at a time; it stops after --max-requests answers, after
    --idle-exit seconds without a request, and when the process that started it is gone."""
    import http.client
    import os
    import subprocess
    import sys
    import threading
    import time

    from bench import sleep_reward

    ports, done = [], {}
    th = threading.Thread(target=lambda: done.setdefault("n", sleep_reward.serve(
        0.01, max_requests=2, idle_exit=60, announce=lambda line: ports.append(int(line.split()[1])))))
    th.start()
    while not ports:
        time.sleep(0.01)
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=30)
        conn.request("POST", "/", body=json.dumps({"samples": [{"prompt": "a"}, {"prompt": "b"}]}).encode(),
                     headers={"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().read()) == {"scores": [0.0, 0.0], "parts": {}}
        conn.close()
    th.join(30)
    assert not th.is_alive() and done["n"] == 2
    assert sleep_reward.serve(0.01, idle_exit=0.2, announce=lambda line: None) == 0  # nobody came: it stops
    parent = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "from bench.sleep_reward import start; p, port = start(0.01); print(p.pid, flush=True);"
                               " import time; time.sleep(600)", str(HERE.parent)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(300):  # its parent is gone: it stops within a poll (0.1 s), once the kernel reparents it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the service {child} outlived the process that started it")


def _no_times(point) -> dict:
    """An evaluation point without its wall-clock figures (the run's and its steps' mean times)."""
    return {k: v for k, v in point.items() if k != "wall_s" and not k.endswith("_ms")}


def test_side_by_side_wall_clock_against_a_sleeping_service(tmp_path, capsys):
    """--reward-sleep adds the service (weight 0: the same rewards) to every run; --side-by-side trains the seed's
    configurations in turn; serial and overlap then give bitwise the same curves (only wall-clock differs), one step
    off-policy its own, and the report has the wall-clock table."""
    from unirl_fast.cli import main

    out = tmp_path / "ttr"
    assert main(["bench", "--time-to-reward", "--smoke", "--out", str(out), "--reward-sleep", "0.01",
                 "--side-by-side", "--config", "serial", "--config", "overlap", "--config", "off_policy",
                 "--baseline", "serial"]) == 0
    runs = json.loads((out / "runs.json").read_text())
    assert runs["settings"]["side_by_side"] and runs["settings"]["reward_sleep"] == 0.01
    by = {r["config"]: r["points"] for r in runs["runs"]}
    strip = [[_no_times(p) for p in by[n]] for n in ("serial", "overlap")]
    assert strip[0] == strip[1] and [p["step"] for p in by["serial"]] == [0, 1, 2]
    assert by["serial"][-1]["steps_step_ms"] > by["serial"][-1]["steps_reward_call_ms"] > 0
    assert [p["step"] for p in by["off_policy"]] == [0, 1, 2] and by["off_policy"][-1] != by["serial"][-1]
    cfg = json.loads((out / "runs" / "overlap-seed0" / "config.json").read_text())
    assert cfg["reward"][0] == "world" and cfg["reward"][1].endswith("/sleep=0") and cfg["reward_overlap"] == "on"
    assert cfg["rollout_chunks"] == 2
    report = (out / "report.md").read_text()
    assert "RL steps per hour" in report and "side by side" in report and "sleeping 0.01 s per request" in report
    rows = {(r["config"], r["seed"]): r for r in _csv(out / "summary.csv")}
    assert float(rows["overlap", "0"]["speed_ratio"]) > 0
    assert rows["overlap", "0"]["bitwise"] == "True" and rows["off_policy", "0"]["bitwise"] == "False"
    assert rows["overlap", "all"]["bitwise"] == "1/1" and 0 < float(rows["serial", "0"]["reward_call_share"]) < 1
    assert "| overlap |" in report and "| 1/1 |" in report
