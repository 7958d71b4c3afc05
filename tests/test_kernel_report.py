"""The compile report (bench/kernel_report.py): every kernel launch of the public ops compiles for sm_90 without a
GPU, with no spill in any shipped config, and the compiled form meets the report's targets: prefetch in the
logprobs and fused-loss row kernels (the fused loss's second sweep issuing its next slice's loads before its math
in the final SASS), >= 32 resident warps per SM for the dual FP8 quantizer, and the flow replay at T10 x B32 and
the flow loss in one wave on an H100 at the dtypes the trainer passes (fp32 latents, bf16 or fp32 velocity). The
report counts dynamic shared memory and compiles the FP8 GEMMs with FP8Linear's scale layouts.

The report runs in a fresh process without the Triton interpreter (conftest sets TRITON_INTERPRET=1 for this one).
The parsers are also checked on small hand-written inputs.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--check", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "PROBLEM" not in p.stdout
    assert (out / "kernel_report.md").read_text().startswith("Compile report (sm_90")
    return list(csv.DictReader(open(out / "kernel_report.csv")))


def _rows(rows, kernel, **where):
    got = [r for r in rows if r["kernel"] == kernel and all(v in r[k] for k, v in where.items())]
    assert got, (kernel, where)
    return got


def test_every_op_compiles_without_spills(report_rows):
    assert {r["op"] for r in report_rows} == {"logprobs", "fused_linear_logprobs", "fused_linear_policy_loss",
                                             "group_advantages", "flow", "forward_loss", "fp8"}
    assert not [r for r in report_rows if r["error"]]
    assert all(int(r["spill_st"]) == 0 and int(r["spill_ld"]) == 0 for r in report_rows)
    gemm = _rows(report_rows, "_fp8_gemm_kernel")
    assert len({r["config"] for r in gemm}) >= 3 and all(r["wgmma"] == "yes" for r in gemm)


def test_row_kernels_prefetch_and_vectorise_any_vocab(report_rows):
    """bf16 logits and fp32 ones (`logits_dtype=torch.float32`: 4-element rows, backward writing bf16 dlogits, 8 bytes
    per 4-element vector) alike."""
    for kernel in ("_logprobs_fwd_kernel", "_flpl_chunk_kernel"):
        for shape in ("qwen", "odd-V50257"):
            rows = _rows(report_rows, kernel, shape=shape)
            assert {r["dtypes"].split(",")[0] for r in rows} == {"bf16", "f32"}, (kernel, shape)
            for r in rows:
                assert r["prefetch"] == "reg", r
                assert r["ld"].startswith("16B"), r  # 16-byte vector loads of the logits
    for r in _rows(report_rows, "_logprobs_bwd_kernel", shape="odd-V50257"):
        x, dx = r["dtypes"].split(",")[:2]
        assert r["ld"].startswith("16B") and r["st"].startswith("16B" if x == dx else "8B"), r


def test_dual_quantizer_keeps_32_warps_resident(report_rows):
    for r in _rows(report_rows, "_fp8_quant_dual_kernel"):
        assert int(r["warps_per_sm"]) >= 32, r


def test_flow_replay_and_loss_fit_one_wave(report_rows):
    for kernel in ("_flow_step_logprob_fwd_kernel", "_flow_step_logprob_bwd_kernel", "_flow_policy_loss_fwd_kernel",
                   "_flow_policy_loss_bwd_kernel", "_flow_sde_step_fwd_kernel"):
        for r in _rows(report_rows, kernel):
            assert float(r["waves"]) <= 1.0, r


def test_flow_kernels_compiled_at_the_trainers_dtypes(report_rows):
    for kernel, v in (("_flow_sde_step_fwd_kernel", 0), ("_flow_step_logprob_fwd_kernel", 0),
                      ("_flow_step_logprob_bwd_kernel", 1)):  # the velocity's position (the bwd's g comes first)
        dtypes = [r["dtypes"].split(",") for r in _rows(report_rows, kernel)]
        assert {d[v] for d in dtypes} == {"bf16", "f32"}, (kernel, dtypes)  # the velocity bf16 or fp32
        assert all(d[v + 1] == d[v + 2] == "f32" for d in dtypes), (kernel, dtypes)  # the latents always fp32


def test_shared_memory_counts_the_dynamic_part(report_rows):
    for r in _rows(report_rows, "_fp8_gemm_kernel"):
        assert int(r["smem"]) >= int(r["smem_dyn"]) > 64 * 1024, r  # pipelined tiles live in dynamic shared memory
    for r in _rows(report_rows, "_fp8_gemm_kernel", config="BM=64, BN=128"):
        assert int(r["warps_per_sm"]) == 4 and int(r["progs_per_sm"]) == 1, r  # ~123 KB: one 4-warp program per SM


def test_fp8_gemms_compiled_with_fp8linears_scale_layouts(report_rows):
    """The quantizers' outputs feed the GEMMs: activation / gradient scales column-major (stride 1 along rows),
    128x128 weight scales row-major, and in wgrad both operands' 128x1 scales column-major."""
    for r in _rows(report_rows, "_fp8_gemm_kernel", constexprs="B_GROUP_N=128"):
        assert {"stride_sam", "stride_sbk"} <= set(r["ones"].split()), r
    for r in _rows(report_rows, "_fp8_gemm_kernel", constexprs="B_GROUP_N=1 "):
        assert {"stride_sam", "stride_sbn"} <= set(r["ones"].split()) and "stride_sak" not in r["ones"], r


def test_fused_loss_second_sweep_issues_its_loads_before_its_math(report_rows):
    """The gradient sweep of the fused-loss row kernel (its last loop) loads the next slice in the first quarter of
    the loop body in SASS; before the one-slice store pipeline ptxas sank those loads to the end (~660 of ~760)."""
    sweeps = [r for r in _rows(report_rows, "_flpl_chunk_kernel") if r["constexprs"].startswith(("MODE=1", "MODE=2"))]
    assert sweeps
    for r in sweeps:
        lo_hi, n = r["ldg_pos"].split()[-1].split("/")
        assert int(lo_hi.split("-")[1]) < 0.25 * int(n), r


def test_forward_loss_reads_short_rows_once(report_rows):
    """forward_process_loss: rows of D <= 8192 (DC-AE) are held in registers (no streaming loop, read once, estimate
    >= 0.8 of copy); SD3's D = 65536 streams its head with prefetch and is charged for re-reading it (traffic < 1)."""
    for r in _rows(report_rows, "_forward_loss_fwd_kernel", shape="B32x32x16x16"):
        assert r["prefetch"] == "-" and r["traffic"] == "" and float(r["est_bw"]) >= 0.8, r
        assert r["ld"].startswith("16B") and r["st"].startswith("16B"), r
    for r in _rows(report_rows, "_forward_loss_fwd_kernel", shape="B32x16x64x64"):
        assert r["prefetch"] == "reg" and 0 < float(r["traffic"]) < 1, r


def test_policy_loss_uses_the_gpu_at_long_rows(report_rows):
    token_is = _rows(report_rows, "_policy_loss_fwd_kernel", shape="long", constexprs="SEQ_IS=False")
    assert all(int(r["grid"].split("x")[1]) >= 132 for r in token_is)  # B1 x L65536 over more than one program per SM


def test_parsers_on_hand_written_input():
    sys.path.insert(0, str(ROOT / "bench"))
    env_interp = os.environ.pop("TRITON_INTERPRET", None)
    try:
        import kernel_report as R
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
    ptx = ("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n ld.global.b16 %rs1, [%rd2];\n"
           " ld.global.nc.v2.b32 {%r5, %r6}, [%rd3];\n st.global.v4.b32 [%rd4], {%r1, %r2, %r3, %r4};\n")
    assert R.widths(ptx) == {"ld": {16: 1, 2: 1, 8: 1}, "st": {16: 1}}
    carried = """    %b:4 = scf.for %i = %c0 to %n step %c1 iter_args(%m = %c, %x = %b0) -> (f32, tensor<4096xbf16>) {
      %y = tt.load %p, %mask : tensor<4096x!tt.ptr<bf16>, #blk>
      %z = arith.addf %m, %m : f32
      scf.yield %z, %y : f32, tensor<4096xbf16, #blk>
    } {tt.num_stages = 3 : i32}"""
    waiting = carried.replace("scf.yield %z, %y", "scf.yield %z, %x")
    assert R.loops(carried) == [{"bytes": 8192, "prefetch": "reg"}]
    assert R.loops(waiting) == [{"bytes": 8192, "prefetch": "no"}]
    sass = """        /*0100*/                   LDG.E R2, desc[UR14][R2.64] ;
        /*0110*/                   FADD R3, R2, R2 ;
        /*0120*/                   MUFU.EX2 R4, R3 ;
        /*0130*/                   LDG.E.128 R8, desc[UR14][R6.64] ;
        /*0140*/              @!P0 BRA 0x100 ;
        /*0150*/                   EXIT ;"""
    assert R.sass_loops(sass) == [(5, 0, 3)]
    assert R.occupancy(64, 1024, 4) == (32, 8)  # 64 regs: 32 warps by registers
    assert R.occupancy(255, 1024, 8) == (8, 1)
    assert R.occupancy(32, 120 * 1024, 4) == (4, 1)  # shared memory bound
