"""`unirl-fast info` and the benchmark harness in bench/common.py (CPU smoke mode; no timing asserts)."""
import csv
import json
import sys
from pathlib import Path

import torch

from unirl_fast.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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


def test_bench_ops_smoke_runs(tmp_path):
    from bench import bench_ops

    rows = bench_ops.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    ops = {r["op"] for r in rows}
    assert {"logprobs_from_logits", "fused_linear_policy_loss", "flow_sde_step"} <= ops
    assert all(r["median_ms"] > 0 for r in rows)
