#!/usr/bin/env bash
# The one script to run when a GPU is lent (about 15 minutes of device time a session): every GPU measurement the
# project needs, in one call, inside 8 minutes, into one results folder.
#
#   bash bench/gpu_suite.sh OUT_DIR            # on the GPU machine (bare device image: torch, triton, pytest)
#   bash bench/gpu_suite.sh OUT_DIR --smoke    # the same steps at tiny shapes on a CPU (interpreter): what CI runs
#
# Steps (each under its own time limit; a failing step is recorded and the next one still runs):
#   1. install   pip install --no-deps --no-build-isolation -e .  (+ any wheel in .whl/, the ignored folder the
#                device tool carries: e.g. liger-kernel for the peer column)
#   2. pytest    python -m pytest -m gpu (the GPU-only tests; on a CPU they all skip)
#   3. report    bench/kernel_report.py on this machine's Triton (registers, spills, occupancy, prefetch)
#   4. bench_*   unirl-fast bench, one step per op bench (policy_loss, logprobs, flow, forward_loss, fp8, checks): ours
#                vs eager vs
#                torch.compile vs peers; time, GB/s or TFLOP/s against ceilings measured in the same run, peak memory
#   5. gpu_checks  bench/gpu_checks.py: decode tokens/s with the compiled (fullgraph + CUDA graphs) vs the eager
#                decode step, and the host syncs of one train step under torch.cuda.set_sync_debug_mode("warn")
#                beside profiling.syncs.HostSyncCounter's count
#   6. profile   unirl-fast profile --compare at bench-1.5b (fast vs reference, per phase, MFU)
# Output: OUT_DIR/{env.txt, steps.csv, SUMMARY.md, <step>.txt, kernel_report.*, bench_<name>/, gpu_checks.json,
# profile/}.
# Commit OUT_DIR under bench/results/ with the device named (the folder name or env.txt says which).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash bench/gpu_suite.sh OUT_DIR [--smoke]}"
SMOKE="${2:-}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
# seconds per step: install, pytest, report, the op benches (policy_loss, logprobs, flow, forward_loss, fp8, checks),
# gpu_checks, profile. On the GPU they sum to 500 s, so the suite stays inside 8.5 minutes; each bench is its own
# step so that one that runs long loses only its own rows. On a CPU (--smoke) nothing is a measurement and the limits
# are loose.
if [ "$SMOKE" = "--smoke" ]; then
  LIMITS=(120 300 300 300 300 300 300 300 300 300 600)
else
  LIMITS=(25 80 40 70 55 40 25 40 25 50 50)
fi
BENCHES=(policy_loss logprobs flow forward_loss fp8 checks)
echo "step,rc,seconds" > "$OUT/steps.csv"

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name,$rc,$(( $(date +%s) - t0 ))" >> "$OUT/steps.csv"
  tail -n 5 "$OUT/$name.txt"
  return 0
}

INSTALL='set -e; "$0" -m pip install --no-deps --no-build-isolation -e .
if ls .whl/*.whl >/dev/null 2>&1; then "$0" -m pip install --no-deps .whl/*.whl; fi'

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1

SHAPES=() ; [ "$SMOKE" = "--smoke" ] && SHAPES=(--smoke)
step install "${LIMITS[0]}" bash -c "$INSTALL" "$PY"
step pytest "${LIMITS[1]}" "$PY" -m pytest -q -m gpu -p no:cacheprovider
if [ "$SMOKE" = "--smoke" ]; then
  step report "${LIMITS[2]}" env -u TRITON_INTERPRET "$PY" bench/kernel_report.py --shapes smoke --out "$OUT"
else
  step report "${LIMITS[2]}" env -u TRITON_INTERPRET "$PY" bench/kernel_report.py --out "$OUT"
fi
for i in "${!BENCHES[@]}"; do
  b=${BENCHES[$i]}
  step "bench_$b" "${LIMITS[$((3 + i))]}" "$PY" -m unirl_fast.cli bench ${SHAPES[@]+"${SHAPES[@]}"} \
    --out "$OUT/bench_$b" "$b"
done
step gpu_checks "${LIMITS[9]}" "$PY" bench/gpu_checks.py ${SHAPES[@]+"${SHAPES[@]}"} --out "$OUT"
if [ "$SMOKE" = "--smoke" ]; then
  step profile "${LIMITS[10]}" "$PY" -m unirl_fast.cli profile --preset tiny --scenario reason-generate --steps 1 \
    --warmup 0 --compare --quiet --out "$OUT/profile"
else
  step profile "${LIMITS[10]}" "$PY" -m unirl_fast.cli profile --preset bench-1.5b --scenario reason-generate \
    --steps 3 --warmup 1 --compare --out "$OUT/profile"
fi

"$PY" - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["# GPU suite", "", "```", (out / "env.txt").read_text().strip(), "```", "", "| step | rc | seconds |",
         "|---|---|---|"]
lines += [f"| {r['step']} | {r['rc']} | {r['seconds']} |" for r in csv.DictReader(open(out / "steps.csv"))]
rows = [r for summary in sorted(out.glob("bench_*/summary.csv")) for r in csv.DictReader(open(summary))
        if r["impl"].startswith("ours")]
if rows:
    lines += ["", "## Ours in the op benches (x_vs_ref / x_vs_compiled > 1: faster)", "",
              "| bench | op | shape | impl | median ms | x_vs_ref | x_vs_compiled | rate | unit | frac ceiling |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    def cell(v):
        try:
            return f"{float(v):.4g}"
        except (TypeError, ValueError):
            return v or ""
    lines += ["| " + " | ".join(cell(r.get(k)) for k in ("bench", "op", "shape", "impl", "median_ms", "x_vs_ref",
                                                         "x_vs_compiled", "rate", "unit", "frac_ceiling")) + " |"
              for r in rows]
checks = out / "gpu_checks.json"
if checks.is_file():
    import json
    res = json.loads(checks.read_text())
    lines += ["", "## gpu_checks (decode compiled vs eager; host syncs per train step)", "", "```",
              json.dumps({k: v for k, v in res.items()}, indent=1)[:3000], "```"]
prof = out / "profile.txt"
if prof.is_file():
    lines += ["", "## profile --compare (tail)", "", "```", *prof.read_text().splitlines()[-30:], "```"]
(out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
print(f"summary: {out / 'SUMMARY.md'}")
EOF
awk -F, 'NR > 1 && $2 != 0 {bad = 1} END {exit bad}' "$OUT/steps.csv"
