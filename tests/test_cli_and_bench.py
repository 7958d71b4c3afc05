"""`unirl-fast info`, `unirl-fast bench` (bench/suite.py) and the benchmark harness in bench/common.py (CPU smoke
mode; no timing asserts)."""
import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from unirl_fast.cli import main

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after installed packages: never shadows them
from bench import common  # noqa: E402


def test_info_reports_versions_device_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["backends"]) >= {"triton", "flash-attn", "deepspeed", "diffusers", "liger", "fp8-gemm"}
    assert info["device"]["cuda"] == torch.cuda.is_available()
    assert main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out


def test_time_fn_quantiles_are_ordered():
    t = common.time_fn(lambda: torch.randn(64, 64) @ torch.randn(64, 64), warmup=1, rep=7)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms


def test_ceilings_smoke_are_positive():
    c = common.measure_ceilings("cpu", smoke=True)
    assert c["copy_GBps"] > 0 and c["gemm_TFLOPs"] > 0 and c["fp8_gemm_TFLOPs"] is None


def test_append_rows_writes_env_columns(tmp_path):
    env = common.env_columns("cpu")
    assert {"device", "torch", "triton", "commit"} <= set(env)
    rows = [{"op": "x", "median_ms": 1.0, **env}, {"op": "y", "median_ms": 2.0, **env}]
    p = common.append_rows("t.csv", rows, tmp_path)
    common.append_rows("t.csv", rows, tmp_path)
    got = list(csv.DictReader(open(p)))
    assert len(got) == 4 and got[0]["torch"] == torch.__version__
    assert common.ratio(4.0, 2.0) == 2.0 and common.ratio(None, 1.0) is None
    assert "median_ms" in common.format_table(rows, ["op", "median_ms"])


def test_peak_memory_is_none_on_cpu():
    assert common.peak_extra_memory_bytes(lambda: torch.ones(10), "cpu") is None


def test_cli_bench_ops_writes_csv_png_and_summary(tmp_path, capsys):
    """`unirl-fast bench --smoke --out DIR ops` in-process: bench_ops's CSV, the summary CSV and PNG, the table."""
    assert main(["bench", "--smoke", "--out", str(tmp_path), "ops"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "ops_overview.csv")))
    assert {"logprobs_from_logits", "fused_linear_policy_loss", "flow_sde_step"} <= {r["op"] for r in rows}
    assert all(float(r["median_ms"]) > 0 and r["shape"] for r in rows)
    summary = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert len(summary) == len(rows) and {s["bench"] for s in summary} == {"ops"}
    for s in summary:  # x_vs_ref is the eager reference's median over this row's, within the same op and shape
        ref = next(r for r in rows if r["op"] == s["op"] and r["impl"] == "eager_ref")
        assert s["ref"] == "eager_ref" and abs(float(s["x_vs_ref"]) - float(ref["median_ms"]) / float(
            s["median_ms"])) < 1e-6 * float(s["x_vs_ref"])
    png = tmp_path / "ops_summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = out[out.index("summary ("):]
    assert "x_vs_ref" in table and "flow_sde_step" in table and str(tmp_path) in table


def test_cli_bench_list_and_unknown_names(capsys):
    from bench import suite

    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    scripts = sorted(p.stem[len("bench_"):] for p in (Path(suite.__file__).parent).glob("bench_*.py"))
    assert listed == scripts and {"ops", "logprobs", "policy_loss", "flow", "fp8", "rollout"} <= set(listed)
    assert main(["bench", "ops", "no_such_op"]) == 2
    err = capsys.readouterr().err
    assert "'no_such_op'" in err and all(n in err for n in scripts)


def test_cli_bench_without_a_source_checkout_says_so(tmp_path, monkeypatch, capsys):
    import unirl_fast.cli as cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "unirl_fast" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--list"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_cli_bench_reruns_itself_under_the_interpreter_on_cpu(monkeypatch):
    """Kernels are defined at `import unirl_fast`: on a CPU without TRITON_INTERPRET=1 the command re-runs in a
    child that has it (checked here without running the child)."""
    import subprocess

    import unirl_fast.cli as cli

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, env: calls.append((cmd, env)) or
                        subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(cli, "_needs_interpreter", lambda device: True)
    assert main(["bench", "flow", "--smoke", "--out", "/tmp/x", "--device", "cpu"]) == 0
    (cmd, env), = calls
    assert cmd[1:] == ["-m", "unirl_fast.cli", "bench", "flow", "--smoke", "--out", "/tmp/x", "--device", "cpu"]
    assert env["TRITON_INTERPRET"] == "1"
    monkeypatch.undo()
    from unirl_fast.ops._dispatch import triton_installed

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli._needs_interpreter("cpu") == triton_installed() and not cli._needs_interpreter("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not cli._needs_interpreter("cpu")


def test_suite_keeps_going_past_a_failing_bench(tmp_path, monkeypatch):
    from bench import suite

    def fake_run_one(name, out_dir, smoke, device=None):
        if name == "flow":
            raise RuntimeError("kernel exploded")
        times = (("ours", 2.0), ("eager_ref", 5.0), ("compiled_ref", 4.0))
        return [{"op": "x", "shape": "s", "impl": i, "median_ms": ms, "GBps": 10 / ms, "frac_copy": 0.1 / ms,
                 "device": "cpu", "smoke": True} for i, ms in times]

    monkeypatch.setattr(suite, "run_one", fake_run_one)
    res = suite.run(["flow", "ops"], out_dir=tmp_path, smoke=True, log=lambda *_: None)
    assert set(res["failed"]) == {"flow"} and "kernel exploded" in res["failed"]["flow"]
    ours = next(s for s in res["summary"] if s["impl"] == "ours")
    assert ours["x_vs_ref"] == 2.5 and ours["x_vs_compiled"] == 2.0 and ours["unit"] == "GB/s"
    assert ours["rate"] == 5.0 and ours["frac_ceiling"] == 0.05 and ours["op"] == "x"
    assert (tmp_path / "ops_summary.png").is_file() and not (tmp_path / "flow_summary.png").exists()
    assert len(list(csv.DictReader(open(tmp_path / "summary.csv")))) == 3
    with pytest.raises(ValueError, match="valid names: .*ops"):
        suite.run(["nope"], out_dir=tmp_path)


def test_suite_isolation_restores_env_and_threads(monkeypatch):
    from bench import suite

    monkeypatch.setenv("UNIRL_FAST_VALUE_CHECKS", "1")
    n = torch.get_num_threads()
    with suite._isolated():
        os.environ["UNIRL_FAST_VALUE_CHECKS"] = "0"
        torch.set_num_threads(1)
    assert os.environ["UNIRL_FAST_VALUE_CHECKS"] == "1" and torch.get_num_threads() == n


def test_summary_rows_read_every_scripts_columns():
    from bench import suite

    rows = [  # the column sets of bench_policy_loss, bench_rollout and bench_fp8 (as CSV strings)
        {"shape": "smoke", "impl": "ours", "median_ms": "2", "TFLOPs_6NHV": "3.0", "frac_gemm": "0.5"},
        {"shape": "smoke", "impl": "eager_ref", "median_ms": "6", "TFLOPs_6NHV": "1.0", "frac_gemm": ""},
        {"bench": "text", "impl": "ours (static cache)", "batch": "4", "new_tokens": "16", "median_ms": "10",
         "throughput": "6400", "unit": "tokens/s"},
        {"bench": "text", "impl": "transformers generate", "batch": "4", "new_tokens": "16", "median_ms": "30",
         "throughput": "2133", "unit": "tokens/s"},
        {"part": "mismatch", "impl": "(a)", "k3": "0.0"},  # no time: CSV only
    ]
    got = suite.summary_rows("mix", rows)
    assert len(got) == 4
    assert got[0]["op"] == "mix" and got[0]["x_vs_ref"] == 3.0 and got[0]["unit"] == "TFLOP/s 6NHV"
    assert got[0]["frac_ceiling"] == 0.5 and got[1]["frac_ceiling"] is None
    assert got[2]["op"] == "text" and got[2]["shape"] == "batch4 new_tokens16" and got[2]["unit"] == "tokens/s"
    assert got[2]["ref"] == "transformers generate" and got[2]["x_vs_ref"] == 3.0
    ours_only = suite.format_summary(got).splitlines()[1:]  # the baselines' own rows are left out
    assert len(ours_only) == 2 and "  ours  " in ours_only[0] and "  ours (static cache)  " in ours_only[1]
    assert len(suite.format_summary(got, baselines=True).splitlines()) == 5


def test_summary_groups_by_name_and_sizes():
    """bench_fp8's two smoke GEMMs are both named "smoke": each is compared with its own bf16 layer."""
    from bench import suite

    rows = [{"part": "gemm", "shape": "smoke", "M": m, "N": n, "K": 256, "impl": i, "median_ms": ms}
            for m, n, i, ms in ((256, 384, "bf16_linear", 1.0), (256, 384, "fp8_triton", 0.5),
                                (256, 256, "bf16_linear", 4.0), (256, 256, "fp8_triton", 1.0))]
    got = suite.summary_rows("fp8", rows)
    assert [s["shape"] for s in got[:2]] == ["smoke (M256 N384 K256)"] * 2
    assert [s["x_vs_ref"] for s in got] == [1.0, 2.0, 1.0, 4.0]


def test_gpu_suite_smoke_runs_every_step(tmp_path):
    """bench/gpu_suite.sh --smoke: the GPU suite's steps at tiny shapes on a CPU, so the script keeps working between
    the rare sessions with a GPU (install, pytest -m gpu, compile report, op benches, gpu_checks, profile --compare)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "suite"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run(["bash", str(root / "bench" / "gpu_suite.sh"), str(out), "--smoke"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=1500)
    steps = list(csv.DictReader(open(out / "steps.csv")))
    benches = ["bench_policy_loss", "bench_logprobs", "bench_flow", "bench_forward_loss", "bench_fp8", "bench_checks"]
    assert [s["step"] for s in steps] == ["install", "pytest", "report", *benches, "gpu_checks", "profile"]
    assert p.returncode == 0 and all(s["rc"] == "0" for s in steps), (steps, p.stdout[-3000:], p.stderr[-3000:])
    assert (out / "kernel_report_smoke.csv").is_file()
    assert all((out / b / "summary.csv").is_file() for b in benches)
    assert (out / "profile" / "profile.json").is_file()
    checks = json.loads((out / "gpu_checks.json").read_text())
    assert checks["decode"]["compiled_tokens_per_s"] > 0 and checks["train_step_syncs"]["host_sync_counter"] > 0
    summary = (out / "SUMMARY.md").read_text()
    assert "| report | 0 |" in summary and "## Ours in the op benches" in summary
