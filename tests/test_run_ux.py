"""The run as a user meets it, part 2: one run per directory, one line per user-caused error (Ctrl-C included), a
traceback only with --debug (always for our bugs), no duplicate steps without a checkpoint, a failing evaluation
never costs the step's training, progress bars that never mix with the lines."""
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

import unirl_fast.train.trainer as T
from unirl_fast.cli import main
from unirl_fast.rewards import RewardError
from unirl_fast.train import rundir
from unirl_fast.train.progress import bar, say

SMOKE = ["train", "--config", "smoke"]


def _steps(run):
    return [(r["phase"], r["step"]) for r in map(json.loads, open(run / "metrics.jsonl"))]


# the lock ---------------------------------------------------------------------------------------------
def _holder(run):
    code = textwrap.dedent(f"""
        import sys, time
        from unirl_fast.train.rundir import lock_run_dir
        lock_run_dir({str(run)!r})
        print("held", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_in_a_directory_is_refused_naming_the_first(tmp_path, capsys):
    import socket

    run = tmp_path / "run"
    p = _holder(run)
    try:
        assert main([*SMOKE, "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {p.pid} on {socket.gethostname()}" in err, err
        assert len(err.strip().splitlines()) == 1 and not (run / "config.json").exists()
    finally:
        p.kill()
        p.wait()
    note = rundir.lock_run_dir(run)  # the holder is gone: its lock is taken over
    assert note is not None and f"took over the lock of pid {p.pid}" in note
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    rundir.unlock_run_dir(run)
    assert (run / ".lock").read_text() == ""


# metrics without a checkpoint, save before eval, evaluation resumed --------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_starts_clean(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*SMOKE, "--run-dir", str(run), "--steps", "1"]) == 0
    import shutil

    shutil.rmtree(run / "checkpoints")  # killed after step 1's records, before any checkpoint
    assert main([*SMOKE, "--run-dir", str(run), "--steps", "1"]) == 0
    assert _steps(run) == [("eval", 0), ("train", 1), ("eval", 1)]
    assert "metrics.jsonl: the records of a run stopped before its first checkpoint removed" in capsys.readouterr().out


def test_a_failing_evaluation_keeps_the_steps_training_and_is_made_on_resume(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = T.Trainer.evaluate

    def flaky(self):
        if self.step == 2:
            raise RewardError("the evaluation's reward service is down")
        return real(self)

    monkeypatch.setattr(T.Trainer, "evaluate", flaky)
    assert main([*SMOKE, "--run-dir", str(run), "--steps", "2", "--eval-every", "2", "--save-every", "2"]) == 1
    assert "stopped at step 2" in capsys.readouterr().err
    assert (run / "checkpoints" / "step-0000002").is_dir()  # saved before the evaluation failed
    monkeypatch.setattr(T.Trainer, "evaluate", real)
    monkeypatch.setattr(T.Trainer, "train_step", lambda self: pytest.fail("step 2 is saved: nothing to retrain"))
    assert main([*SMOKE, "--run-dir", str(run), "--steps", "2", "--eval-every", "2", "--save-every", "2"]) == 0
    assert _steps(run) == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]


# one line per user-caused error; tracebacks with --debug and for our bugs ---------------------------------------------
def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real, calls = T.Trainer.train_step, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(T.Trainer, "train_step", interrupted)
    assert main([*SMOKE, "--run-dir", str(run), "--steps", "4", "--save-every", "1"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == ("unirl-fast train: interrupted after step 2 of 4; rerun the same command to resume from "
                           "step 2 (its latest checkpoint)"), err
    monkeypatch.setattr(T.Trainer, "train_step", real)
    assert main([*SMOKE, "--run-dir", str(run), "--steps", "4", "--save-every", "1"]) == 0
    assert [s for p, s in _steps(run) if p == "train"] == [1, 2, 3, 4]


def test_a_raising_reward_callable_is_one_line_and_its_traceback_is_behind_debug(tmp_path, capsys, monkeypatch):
    import reward_fns

    monkeypatch.syspath_prepend(os.path.dirname(reward_fns.__file__))
    monkeypatch.setitem(reward_fns.CALLS, "n", 0)
    monkeypatch.setitem(reward_fns.CALLS, "fail_from", 1)
    argv = [*SMOKE, "--run-dir", str(tmp_path / "run"), "--reward", "reward_fns:counted", "--scenario", "generate"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "reward 'reward_fns:counted' raised RuntimeError: the detector crashed (at " in err
    assert "reward_fns.py:" in err and "in counted)" in err
    with pytest.raises(RewardError) as e:
        main([*argv, "--debug"])
    assert isinstance(e.value.__cause__, RuntimeError)


def test_a_bug_of_ours_always_shows_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(T.Trainer, "train_step", lambda self: {}["missing"])
    with pytest.raises(KeyError):
        main([*SMOKE, "--run-dir", str(tmp_path / "run")])


def test_eval_and_export_say_what_they_loaded_not_resumed(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*SMOKE, "--run-dir", str(run), "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--eval-prompts", "2"]) == 0
    out = capsys.readouterr()
    assert "resumed" not in out.out + out.err and "loaded" in out.out + out.err
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "resumed" not in out.out + out.err and "Setting accelerator" not in out.out + out.err


# progress ---------------------------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_lines_are_written_through_the_bar_and_the_bar_has_an_eta(monkeypatch):
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(sys, "stdout", tty)
    with bar(10, "steps") as b:
        for i in range(3):
            b.update(1)
            say(f"step {i + 1} reward 0.5")
    text = tty.getvalue()
    assert "3/10 [" in text and "<" in text  # elapsed<remaining: the ETA
    for i in range(3):  # each line starts a line of its own: never glued to the end of the bar's
        at = text.index(f"step {i + 1} reward")
        assert at == 0 or text[at - 1] in "\r\n", repr(text[max(0, at - 20):at + 5])


def test_no_bar_off_a_terminal(capsys):
    with bar(5, "steps") as b:
        b.update(5)
    say("a line")
    out = capsys.readouterr()
    assert out.err == "" and out.out == "a line\n"


def test_a_part_equal_to_the_total_is_not_drawn_twice():
    from unirl_fast.train.plots import reward_series

    one_term = [{"phase": "train", "step": s, "reward": r, "reward_score": r} for s, r in ((1, 0.2), (2, 0.4))]
    assert list(reward_series(one_term)) == ["train reward (batch mean)"]
    two = [{**r, "reward_score": r["reward"] / 2, "reward_fmt": r["reward"] / 2} for r in one_term]
    assert list(reward_series(two)) == ["train reward (batch mean)", "train score", "train fmt"]


def test_threads_default_to_one_on_a_cpu_unless_asked(monkeypatch):
    import dataclasses

    import torch

    from unirl_fast.train import PRESETS
    from unirl_fast.train.config import use_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cfg = dataclasses.replace(PRESETS["smoke"], device="cpu")
        assert use_threads(cfg) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert use_threads(cfg) == 2
        assert use_threads(dataclasses.replace(cfg, threads=3)) == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        dataclasses.replace(cfg, threads=0).validate()


def test_a_renamed_task_file_with_the_same_content_resumes(tmp_path, capsys, monkeypatch):
    import reward_fns

    monkeypatch.syspath_prepend(os.path.dirname(reward_fns.__file__))
    rows = "".join(json.dumps({"prompt": f"{n} red squares"}) + "\n" for n in range(1, 9))
    (tmp_path / "a.jsonl").write_text(rows)
    run = tmp_path / "run"
    argv = [*SMOKE, "--run-dir", str(run), "--scenario", "generate", "--reward", "reward_fns:prompt_length"]
    assert main([*argv, "--tasks", str(tmp_path / "a.jsonl"), "--steps", "1"]) == 0
    (tmp_path / "a.jsonl").rename(tmp_path / "b.jsonl")
    assert main([*argv, "--tasks", str(tmp_path / "b.jsonl"), "--steps", "2"]) == 0
    resume = json.loads((run / "resumes.jsonl").read_text().splitlines()[-1])
    assert resume["changes"]["tasks"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    (tmp_path / "c.jsonl").write_text(rows + json.dumps({"prompt": "one more"}) + "\n")
    capsys.readouterr()
    assert main([*argv, "--tasks", str(tmp_path / "c.jsonl"), "--steps", "3"]) == 2
    assert "was created with other tasks" in capsys.readouterr().err
