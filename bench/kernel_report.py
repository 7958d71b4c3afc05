"""Compile report: every Triton kernel launch of the public ops at the standard shapes, compiled for sm_90 on a
machine without a GPU, and read for what decides its speed (method: docs/benchmarks.md, "The compile report").

How a launch is compiled without a GPU: a stand-in Triton driver reports an sm_90 target and the meta device;
the real launchers in `unirl_fast.kernels` are called with meta tensors at the benchmark shapes (no memory; data
pointers are 0, so pointers specialise as 16-byte aligned like fresh CUDA allocations), and `JITFunction.run` is
wrapped to compile with `warmup=True` (the argument specialisation of a real launch: dtypes, integers equal to 1,
divisibility by 16, i32/i64) without launching. Autotuned kernels compile every config. Launchers that ask the
device for its multiprocessor count get the H100's (132). The process must not run the Triton interpreter.

Columns (one row per distinct kernel x constexprs x argument dtypes and unit integers x config x grid):
    dtypes, ones     the tensor arguments' dtypes in order, and the integer arguments equal to 1 (strides Triton
                     compiles as constants): the launches are planned with the dtypes and strides the trainer and
                     FP8Linear pass (fp32 latents with a bf16 or fp32 velocity for the flow kernels; the quantizers'
                     own scale layouts for the FP8 GEMMs; a bf16 head's logits in bf16 and in fp32 for the fused head
                     ops)
    regs, local      registers per thread and local (stack / spill) bytes per thread, from the cubin (cuobjdump)
    spill_st/ld      spill store / load bytes (ptxas -v on the kernel's PTX with the ptxas Triton used)
    smem, smem_dyn   shared memory per program: static (cubin) + dynamic (the launch's `shared`, what Triton's
                     pipelined buffers and reductions use), and the dynamic part alone; occupancy adds the 1 KiB
                     system reserve per program on sm_90
    warps/SM, progs/SM   resident warps and programs per SM on an H100: min over registers (65536 per SM, allocated
                     per warp in units of 256), shared memory (228 KiB per SM, 1 KiB reserved per program),
                     64 warps and 32 programs per SM
    waves            programs of the launch / (programs per SM x 132)
    ld, st           global load / store widths in the PTX, widest first, as bytes-per-thread x count
    prefetch         "reg" (a streaming loop carries its next slice's load in registers), "async" (software
                     pipelined cp.async / TMA copies), "no" (a streaming loop that waits on each slice), "-" (no loop)
    ldg_pos          where the global loads sit in each loop of the final machine code (SASS, after ptxas
                     scheduling): "first-last/length" instruction indices per loop (a register prefetch only hides
                     latency when its loads come before the loop's math, not after it)
    wgmma            Hopper warpgroup MMA in the PTX (yes / no / "mma.sync" for Ampere-style MMA)
    bytes_iter       bytes one program loads per iteration of its streaming loop (whole kernel when it has none)
    traffic          for kernels that read part of their input twice (forward_process_loss at D > 8192): the bytes
                     counted once each way / the bytes the kernel moves when every re-read misses L2 (a worst case;
                     blank: every input is read once, or the plan does not model it). est_bw is multiplied by it.
    est_bw           an ESTIMATE of the share of copy bandwidth, by Little's law: an H100 SM needs about 48 KiB in
                     flight to approach its ~3 TB/s copy rate; in flight ~ programs/SM x bytes_iter x duty, where
                     duty = 1 when a load is always outstanding (prefetch reg / async) and 0.5 when loads and the
                     reductions on them alternate (no prefetch, or no loop); capped at 1. Not a measurement: "-" for
                     tensor-core GEMMs (compute bound).

    python bench/kernel_report.py         # standard shapes -> bench/results/kernel_report-triton-<v>/kernel_report.*
    python bench/kernel_report.py --shapes smoke --check    # what CI runs: exit 1 on a compile error or a spill
    unirl-fast bench --compile-report [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter never compiles; refuse rather than report nonsense
    raise RuntimeError("kernel_report must run without TRITON_INTERPRET=1 (run it in a fresh process)")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "unirl_fast_kernel_report_cache"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

H100 = dict(sms=132, regs=65536, reg_unit=256, smem=228 * 1024, smem_reserved=1024, warps=64, programs=32)
INFLIGHT_TARGET = 48 * 1024
COLUMNS = ["op", "shape", "kernel", "constexprs", "dtypes", "ones", "config", "num_warps", "num_stages", "grid",
           "regs", "local",
           "spill_st", "spill_ld", "smem", "smem_dyn", "warps_per_sm", "progs_per_sm", "waves", "ld", "st", "prefetch",
           "ldg_pos", "wgmma", "bytes_iter", "traffic", "est_bw", "error"]


# ------------------------------------------------------------------------------------------------ compiling

class _Sm90Driver:
    """What Triton asks of the active driver while compiling: an sm_90 target, the meta device, device 0."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        return ty


class Recorder:
    """Wraps JITFunction.run / Autotuner.run: every launch compiles (warmup) and is recorded, nothing runs."""

    def __init__(self):
        self.launches = []  # (kernel name, constexprs, config label, grid tuple, CompiledKernel)
        self._config = None

    @contextlib.contextmanager
    def active(self):
        jit_run, tune_run = JITFunction.run, Autotuner.run
        rec = self

        def run(self, *args, grid, warmup, **kwargs):
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            names = [p.name for p in self.params]
            bound = {**dict(zip(names, args)), **kwargs}
            g = grid(bound) if callable(grid) else grid
            g = tuple(g) + (1,) * (3 - len(g))
            consts = {p.name: bound.get(p.name) for p in self.params if p.is_constexpr and p.name in bound}
            args = _arg_signature([(p.name, bound.get(p.name)) for p in self.params if not p.is_constexpr])
            rec.launches.append((self.fn.__name__, consts, rec._config, g, kernel, args))
            return kernel

        def tune(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args))
            configs = self.prune_configs(kwargs)  # the configs this launch would benchmark, after early pruning
            for i, cfg in enumerate(configs):
                rec._config = f"{i}: " + ", ".join(f"{k}={v}" for k, v in cfg.all_kwargs().items())
                self.fn.run(*args, **{**kwargs, **cfg.all_kwargs()})
            rec._config = None

        old = driver.active if driver._active is not None else None
        driver.set_active(_Sm90Driver())
        JITFunction.run, Autotuner.run = run, tune
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = jit_run, tune_run
            if old is None:
                driver._active = None
            else:
                driver.set_active(old)


def _arg_signature(args) -> dict:
    """What a launch specialises on besides its constexprs: the tensor arguments' dtypes, in order, and the integer
    arguments equal to 1 (Triton compiles those as constants: a unit stride, for one)."""
    dtypes = [str(v.dtype).replace("torch.", "").replace("float", "f")
              for _, v in args if isinstance(v, torch.Tensor)]
    ones = [n for n, v in args if isinstance(v, int) and not isinstance(v, bool) and v == 1]
    return {"dtypes": ",".join(dtypes), "ones": " ".join(ones)}


# ------------------------------------------------------------------------------------------------ launch plans

def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, device="meta", dtype=dtype)


def f32(*shape):
    return meta(*shape, dtype=torch.float32)


LM_SHAPES = {"qwen-1.5b": (8, 1024, 1536, 151936), "qwen-3b": (8, 1024, 2048, 151936),
             "qwen-7b": (16, 1024, 3584, 151936), "long": (1, 65536, 2048, 151936),
             "odd-V50257": (8, 1024, 768, 50257)}  # a vocabulary that is not a multiple of 8 (GPT-2's)
FLOW_SHAPES = {"B32x16x64x64": (32, 16, 64, 64), "B32x32x16x16": (32, 32, 16, 16)}
FP8_SHAPES = {"8192^3": (8192, 8192, 8192), "7b-up M16384": (16384, 18944, 3584),
              "7b-down M16384": (16384, 3584, 18944), "7b-qkv M8192": (8192, 4608, 3584)}
SMOKE = dict(lm={"smoke-V3000": (2, 64, 64, 3000), "smoke-V32001": (1, 16, 64, 32001)},
             flow={"smoke-B4x4x16x16": (4, 4, 16, 16)}, fp8={"smoke-256x384x512": (256, 384, 512)})


def plan_logprobs(B, L, H, V):
    from unirl_fast.kernels import logprobs as K

    N = B * L
    x, y = meta(N, V), meta(N, dtype=torch.int64)
    _, _, lse = K.logprobs_fwd(x, y, 1.0, -100, True)
    K.logprobs_bwd(x, y, lse, f32(N), f32(N), f32(N), 1.0, -100, True, out=x)


def plan_fused_logprobs(B, L, H, V):
    """bf16 hidden states and head, logits in bf16 (the default) and in fp32 (`logits_dtype=torch.float32`: fp32 rows,
    and backward's bf16 dlogits written from them)."""
    from unirl_fast.kernels import fused_linear_logprobs as K

    N = B * L
    h, w, y = meta(N, H), meta(V, H), meta(N, dtype=torch.int64)
    for wide in (False, True):
        _, _, lse = K.fused_linear_logprobs_fwd(h, w, None, y, 1.0, -100, True, fp32_logits=wide)
        K.fused_linear_logprobs_bwd(h, w, None, y, lse, f32(N), f32(N), f32(N), 1.0, -100, True, fp32_logits=wide)


def plan_fused_policy_loss(B, L, H, V):
    from unirl_fast.kernels import fused_linear_policy_loss as K
    from unirl_fast.kernels import policy_loss as KP

    from unirl_fast.ops.fused_linear_policy_loss_triton import chunk_rows

    N = B * L
    tgt = meta(N, dtype=torch.int32)
    vec = dict(w=f32(N), old=f32(N), adv=f32(N), roll=f32(N), ref=f32(N))
    for wide in (False, True):  # a bf16 head's logits in bf16 (the default) and in fp32 (logits_dtype=torch.float32)
        zdt = torch.float32 if wide else torch.bfloat16
        for mode in (K.MODE_TOKEN, K.MODE_LOGP):  # token IS (one pass), and the first pass of sequence IS
            z = meta(chunk_rows(N, V, wide, grads=mode != K.MODE_LOGP), V, dtype=zdt)
            K.flpl_chunk(z, 0, tgt, f32(N), f32(N), mode=mode, temperature=1.0, **vec, tis_cap=2.0, beta=0.04)
        z = meta(chunk_rows(N, V, wide), V, dtype=zdt)
        K.flpl_chunk(z, 0, tgt, f32(N), f32(N), mode=K.MODE_GIVEN, temperature=1.0, g=f32(N), gh=f32(N))
    plan_policy_loss_only(B, L, KP)


def plan_policy_loss_only(B, L, KP=None):
    if KP is None:
        from unirl_fast.kernels import policy_loss as KP
    lp = f32(B, L)
    for seq in (False, True):
        KP.policy_loss_fwd(lp, f32(B, L), f32(B), meta(B, L, dtype=torch.uint8), f32(B), ref=f32(B, L),
                           roll=f32(B, L), ent=f32(B, L), eps_low=0.2, eps_high=0.28, dual_clip=None, tis_cap=2.0,
                           beta=0.04, entropy_coef=0.0, kl="k3", seq_is=seq, write_grad=True)


def plan_advantages(N, G):
    from unirl_fast.kernels import advantages as K

    K.group_advantages_fwd(f32(N), meta(N, dtype=torch.int64), meta(N // G + 1, dtype=torch.int64), f32(),
                           mode="grpo", std="group", unbiased=False, eps=1e-4, clip=5.0)


def plan_flow(B, C, h, w, T=10):
    """The flow kernels at the dtypes the trainer passes: the sampler's latents, noise and stored samples in fp32, the
    DiT's velocity in bf16 (`--precision bf16` autocast) or fp32; the sampler step on B rows, the replay and the loss
    on T x B."""
    from unirl_fast.kernels import flow as K
    from unirl_fast.kernels import flow_loss as KL

    D, sig = C * h * w, f32(B)
    x, xr, sr, lp = f32(B, D), f32(T * B, D), f32(T * B), f32(T, B)
    for vd in (torch.bfloat16, torch.float32):
        v, vr = meta(B, D, dtype=vd), meta(T * B, D, dtype=vd)
        for kind in (K.KIND_SDE, K.KIND_CPS, K.KIND_ODE):  # one sampler step (sigma_max a device scalar for sde)
            K.flow_sde_step_fwd(v, x, f32(B, D), sig, sig, f32() if kind == K.KIND_SDE else None, 0.7, kind, B)
        K.flow_step_logprob_fwd(vr, xr, xr, sr, sr, None, 0.7, K.KIND_CPS, T * B)  # replay
        K.flow_step_logprob_bwd(sr, vr, xr, xr, sr, sr, None, 0.7, K.KIND_CPS, T * B)
        out, dlogp = KL.flow_policy_loss_fwd(lp, lp, f32(B), vr, vr, None, None, None, 1e-4, 0.01, 0.0)  # trainer's
        KL.flow_policy_loss_bwd(f32(1), dlogp, True, vr, vr, None, None, None, 0.01, 0.0)
    vr = meta(T * B, D)  # every term of the op (latent KL too), bf16
    out, dlogp = KL.flow_policy_loss_fwd(lp, lp, f32(B), vr, vr, vr, vr, sr, 1e-4, 0.01, 0.01)
    KL.flow_policy_loss_bwd(f32(1), dlogp, True, vr, vr, vr, vr, sr, 0.01, 0.01)


def plan_forward_loss(B, C, h, w, T=10):
    """DiffusionNFT and AWM on N = T x B rows, all five inputs bf16; -> {kernel: traffic} (see the module doc)."""
    from unirl_fast.kernels import forward_loss as K

    N, D = T * B, C * h * w
    x, r = meta(N, D), f32(N)
    for algo in K.ALGOS:
        K.forward_process_loss_fwd(x, x, x, x, x, r, r, algo=algo, nft_beta=1.0, adv_clip=5.0, awm_power=0.25,
                                   beta_kl=1e-4, beta_old=1.0, write_grad=True)
    H = K.row_plan(D, torch.device("meta"))[2]
    return {"_forward_loss_fwd_kernel": (5 + 1) / (5 * (1 + H / D) + 1)} if H else {}


def plan_fp8(M, N, K):
    """FP8Linear's launches with the operands and scale layouts its forward and backward pass (fp8/linear.py):
    forward x 1x128 (or the fused dual pass in training) x W 128x128, dgrad dy 1x128 x W^T (the transposed FP8
    weight and its scales made contiguous), wgrad dy 128x1 x x 128x1 (the quantizers' [C, R_pad] outputs)."""
    from unirl_fast.kernels import fp8_gemm as KG
    from unirl_fast.kernels import fp8_quant as KQ

    x, dy = meta(M, K), meta(M, N)
    wq, ws = KQ.fp8_quant_fwd(meta(N, K), "128x128")
    xq, xs = KQ.fp8_quant_fwd(x, "1x128")  # rollout forward
    _, _, xtq, xts = KQ.fp8_quant_dual_fwd(x)  # training forward: both layouts of x from one read
    KG.fp8_gemm_fwd(xq, xs, wq, ws)  # forward [M, N]
    dyq, dys, dytq, dyts = KQ.fp8_quant_dual_fwd(dy)
    KG.fp8_gemm_fwd(dyq, dys, wq.t().contiguous(), ws.t().contiguous())  # dgrad [M, K]
    KG.fp8_gemm_fwd(dytq, dyts, xtq, xts)  # wgrad [N, K]
    KQ.fp8_quant_fwd(x, "128x1")  # the wgrad operand when the activation is not saved in FP8


def plans(shapes: str):
    """[(op, shape name, callable)] for the docs/benchmarks.md shapes ("bench") or tiny ones ("smoke")."""
    lm = SMOKE["lm"] if shapes == "smoke" else LM_SHAPES
    flow = SMOKE["flow"] if shapes == "smoke" else FLOW_SHAPES
    fp8 = SMOKE["fp8"] if shapes == "smoke" else FP8_SHAPES
    out = []
    for name, s in lm.items():
        out += [("logprobs", name, lambda s=s: plan_logprobs(*s)),
                ("fused_linear_logprobs", name, lambda s=s: plan_fused_logprobs(*s)),
                ("fused_linear_policy_loss", name, lambda s=s: plan_fused_policy_loss(*s))]
    out.append(("group_advantages", "N8192 G8" if shapes != "smoke" else "N64 G8",
                lambda: plan_advantages(8192 if shapes != "smoke" else 64, 8)))
    for name, s in flow.items():
        out.append(("flow", name, lambda s=s: plan_flow(*s)))
    for name, s in flow.items():
        out.append(("forward_loss", name, lambda s=s: plan_forward_loss(*s)))
    for name, s in fp8.items():
        out.append(("fp8", name, lambda s=s: plan_fp8(*s)))
    return out


# ------------------------------------------------------------------------------------------------ reading

def _tool(name):
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except (ImportError, AttributeError, TypeError):
        return str(_tool("ptxas"))


def _ptxas_flags(kernel) -> list:
    """The flags Triton's own ptxas call used (so -v reports the allocation of the cubin Triton made): line info,
    fmad as compiled, and the register-allocation level Triton >= 3.7 passes to ptxas 13."""
    import triton.backends.nvidia.compiler as nv

    flags = ["-lineinfo", "-v"]
    if not kernel.metadata.enable_fp_fusion:
        flags.append("--fmad=false")
    if "regAllocOptLevel" in Path(nv.__file__).read_text():
        flags.append("--regAllocOptLevel=2")
    return flags


def resources(kernel, workdir: Path) -> dict:
    """Registers / local bytes from the cubin, spill bytes from ptxas -v on the PTX."""
    name = kernel.metadata.name
    cubin, ptx = workdir / f"{name}.cubin", workdir / f"{name}.ptx"
    cubin.write_bytes(kernel.asm["cubin"])
    ptx.write_text(kernel.asm["ptx"])
    usage = subprocess.run([str(_tool("cuobjdump")), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    dyn = kernel.metadata.shared  # requested at launch: Triton's shared buffers are dynamic
    out = dict(regs=int(m.group(1)), local=int(m.group(4)), smem=int(m.group(3)) + dyn) if m else {}
    out["smem_dyn"] = dyn
    sass = subprocess.run([str(_tool("cuobjdump")), "-sass", str(cubin)], capture_output=True, text=True).stdout
    out["ldg_pos"] = " ".join(f"{lo}-{hi}/{n}" for n, lo, hi in sass_loops(sass)) or "-"
    log = subprocess.run([_ptxas(), *_ptxas_flags(kernel), "--gpu-name=sm_90a", str(ptx), "-o",
                          str(workdir / f"{name}.o")], capture_output=True, text=True)
    s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.stderr + log.stdout)
    out["spill_st"], out["spill_ld"] = (int(s.group(1)), int(s.group(2))) if s else (None, None)
    if "regs" not in out:
        r = re.search(r"Used (\d+) registers", log.stderr)
        out["regs"] = int(r.group(1)) if r else None
    out.setdefault("smem", kernel.metadata.shared)
    return out


_SASS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_loops(sass: str) -> list:
    """[(instructions, first LDG index, last LDG index)] of every loop of the SASS that loads from global memory (a
    loop: the instructions from a backward branch's target to the branch)."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS.match, sass.splitlines()) if m]
    at = {a: i for i, (a, _) in enumerate(ins)}
    out = []
    for i, (a, text) in enumerate(ins):
        b = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if not b or int(b.group(1), 16) >= a or int(b.group(1), 16) not in at:
            continue
        body = ins[at[int(b.group(1), 16)]:i + 1]
        ldg = [j for j, (_, t) in enumerate(body) if re.search(r"\bLDG(STS)?\b", t)]
        if ldg:
            out.append((len(body), ldg[0], ldg[-1]))
    return out


def occupancy(regs, smem, num_warps) -> tuple:
    """(resident warps, resident programs) per H100 SM."""
    per_warp = math.ceil(max(regs or 1, 1) * 32 / H100["reg_unit"]) * H100["reg_unit"]
    by_regs = (H100["regs"] // per_warp) // num_warps
    by_smem = H100["smem"] // (max(smem, 0) + H100["smem_reserved"])
    by_warps = H100["warps"] // num_warps
    progs = max(0, min(by_regs, by_smem, by_warps, H100["programs"]))
    return progs * num_warps, progs


_MEM = re.compile(r"\b(ld|st)\.global[.\w:]*?(?:\.v(\d))?\.([bfsu])(\d+)\b")


def widths(ptx: str) -> dict:
    """{"ld": {bytes: count}, "st": {...}} of global accesses per thread."""
    out = {"ld": {}, "st": {}}
    for op, vec, _, bits in _MEM.findall(ptx):
        nbytes = int(vec or 1) * int(bits) // 8
        out[op][nbytes] = out[op].get(nbytes, 0) + 1
    return out


def _fmt_widths(d) -> str:
    return " ".join(f"{b}Bx{n}" for b, n in sorted(d.items(), reverse=True)) or "-"


_ELEM = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "i1": 1,
         "f8E4M3FN": 1, "f8E5M2": 1, "fp8e4nv": 1, "fp8e5": 1}
_LOAD_TYPE = re.compile(r"tensor<([\dx]+)x!tt\.ptr<([\w]+)>")


def _load_bytes(line: str) -> int:
    m = _LOAD_TYPE.search(line)
    if m:
        n = math.prod(int(d) for d in m.group(1).split("x") if d)
        return n * _ELEM.get(m.group(2), 4)
    m = re.search(r"!tt\.ptr<(\w+)>", line)
    return _ELEM.get(m.group(1), 4) if m else 0


def loops(ttgir: str) -> list:
    """Streaming loops of the TTGIR: [{"bytes": loaded per iteration, "prefetch": reg/async/no}] (innermost
    loops that load inputs; a loop is found by its scf.for line and its closing brace at the same indentation)."""
    lines = ttgir.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "scf.for" not in line or not line.rstrip().endswith("{"):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip().startswith("}") and len(nxt) - len(nxt.lstrip()) == indent:
                break
            body.append(nxt)
        if any("scf.for" in b for b in body):
            continue  # not innermost
        # volatile loads read other programs' partial sums (the last program's cross-program reduction), not input
        loads = {m.group(1): b for b in body
                 if (m := re.match(r"\s*(%[\w.]+)(?::\d+)? = tt\.load", b)) and "isVolatile = true" not in b}
        if not loads and not any("async_copy" in b or "async_tma" in b for b in body):
            continue
        yielded = next((b for b in reversed(body) if "scf.yield" in b), "")
        carried = any(re.search(re.escape(name) + r"\b", yielded) for name in loads)
        asynced = any("async_copy_global_to_local" in b or "async_tma_copy" in b for b in body)
        found.append({"bytes": sum(_load_bytes(b) for b in loads.values()) or None,
                      "prefetch": "reg" if carried else "async" if asynced else "no"})
    return found


def analyse(kernel, workdir: Path) -> dict:
    md = kernel.metadata
    res = resources(kernel, workdir)
    warps_sm, progs_sm = occupancy(res.get("regs"), res.get("smem", md.shared), md.num_warps)  # static + dynamic
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    w = widths(ptx)
    lp = loops(ttgir)
    mma = "yes" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "no")
    if lp:  # the weakest streaming loop decides (a kernel with two sweeps waits in the one without prefetch)
        main = min(lp, key=lambda x: (("no", "async", "reg").index(x["prefetch"]), -(x["bytes"] or 0)))
        prefetch, bytes_iter = main["prefetch"], main["bytes"]
    else:
        prefetch = "-"
        bytes_iter = sum(_load_bytes(line) for line in ttgir.splitlines()
                         if " = tt.load" in line and "isVolatile = true" not in line) or None
    est = None
    if mma == "no" and bytes_iter:
        duty = 1.0 if prefetch in ("reg", "async") else 0.5
        est = min(1.0, progs_sm * bytes_iter * duty / INFLIGHT_TARGET)
    return dict(num_warps=md.num_warps, num_stages=md.num_stages, **res, warps_per_sm=warps_sm,
                progs_per_sm=progs_sm, ld=_fmt_widths(w["ld"]), st=_fmt_widths(w["st"]), prefetch=prefetch,
                wgmma=mma, bytes_iter=bytes_iter, est_bw=None if est is None else round(est, 2))


def report(shapes="bench", ops=None, log=print) -> list:
    """Compile every launch of the selected plans; one row per distinct launch (errors become rows too)."""
    rows, seen = [], set()
    rec = Recorder()
    with tempfile.TemporaryDirectory() as tmp, rec.active():
        for op, shape, fn in plans(shapes):
            if ops and op not in ops:
                continue
            start, traffic = len(rec.launches), {}
            try:
                traffic = fn() or {}
            except Exception as e:  # noqa: BLE001 - a compile error is a finding, reported as a row
                rows.append({"op": op, "shape": shape, "kernel": "?", "error": f"{type(e).__name__}: {e}"[:300]})
                log(f"compile error in {op} {shape}:\n{traceback.format_exc()[-2000:]}")
            for name, consts, config, grid, kernel, args in rec.launches[start:]:
                key = (op, shape, name, repr(consts), config, grid, args["dtypes"], args["ones"])
                if key in seen or kernel is None:
                    continue
                seen.add(key)
                row = {"op": op, "shape": shape, "kernel": name,
                       "constexprs": " ".join(f"{k}={v}" for k, v in consts.items()), "config": config or "",
                       "grid": "x".join(map(str, grid)), **args, **analyse(kernel, Path(tmp))}
                row["waves"] = round(math.prod(grid) / max(row["progs_per_sm"] * H100["sms"], 1), 2)
                if name in traffic:
                    row["traffic"] = round(traffic[name], 2)
                    if row["est_bw"] is not None:
                        row["est_bw"] = round(row["est_bw"] * traffic[name], 2)
                rows.append(row)
    return rows


def problems(rows) -> list:
    """What CI fails on: compile errors and spills (any config)."""
    out = []
    for r in rows:
        if r.get("error"):
            out.append(f"{r['op']} {r['shape']} {r['kernel']}: {r['error']}")
        elif (r.get("spill_st") or 0) or (r.get("spill_ld") or 0) or (r.get("local") or 0):
            out.append(f"{r['op']} {r['shape']} {r['kernel']} [{r['constexprs']}] {r['config']}: spills "
                       f"{r.get('spill_st')} B stores / {r.get('spill_ld')} B loads, local {r.get('local')} B")
    return out


def write(rows, out_dir: Path, stem="kernel_report") -> tuple:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    head = (f"Compile report (sm_90, Triton {triton.__version__}, torch {torch.__version__}; no GPU: occupancy for "
            f"an H100, est_bw is an estimate, see bench/kernel_report.py)\n\n")
    cols = [c for c in COLUMNS if c != "error" or any(r.get("error") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    md_path.write_text(head + "\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=("bench", "smoke"), default="bench")
    p.add_argument("--ops", nargs="*", default=None, help="only these ops (logprobs, fused_linear_logprobs, "
                                                          "fused_linear_policy_loss, group_advantages, flow, "
                                                          "forward_loss, fp8)")
    p.add_argument("--out", default=None, help="folder for kernel_report.csv / .md "
                                               "(default bench/results/kernel_report-triton-<version>)")
    p.add_argument("--check", action="store_true", help="exit 1 on a compile error or a spill")
    args = p.parse_args(argv)
    rows = report(args.shapes, args.ops)
    default = Path(__file__).resolve().parent / "results" / f"kernel_report-triton-{triton.__version__}"
    out = Path(args.out) if args.out else default
    stem = "kernel_report" if args.shapes == "bench" else "kernel_report_smoke"
    csv_path, md_path = write(rows, out, stem)
    bad = problems(rows)
    print(f"{len(rows)} launches compiled for sm_90 with Triton {triton.__version__}: {csv_path}, {md_path}")
    for b in bad:
        print("PROBLEM " + b)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
