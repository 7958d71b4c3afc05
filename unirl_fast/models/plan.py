"""Size a run before renting GPUs: parameter counts of a (meta-device) unified model and a per-GPU memory plan.

    plan = memory_plan(model, train_lm=True, train_dit=True, batch=64, micro_batch=8, ...)
    print(format_plan(plan))

Parameter counts are exact (read off the built model; on the meta device nothing is allocated). Memory per GPU,
per ZeRO stage (0 = one process, the trainer without DeepSpeed; 1 = optimizer states partitioned, 2 = + gradients,
3 = + weights), modelled on what the trainer keeps:

    weights      the trained experts' parameters (and the connector's) in fp32 (4 B): the trainer keeps fp32
                 weights and runs bf16 as autocast over them (`--precision bf16`), so they are their own master
                 copy; the experts the scenario does not train and the autoencoder in `frozen_dtype` (fp32 4 B, or
                 bf16 / fp16 2 B: `--frozen-dtype`); / N GPUs at stage 3
    reference    the frozen reference copy the KL / velocity-MSE needs (the same bytes as the weights); at stage 3
                 it is partitioned too (a ZeRO-3 engine without an optimizer): / N. With LoRA on every trained expert
                 only a copy of the connector (the reference is the base with its adapters off)
    grads        fp32 (4 B) per trainable parameter; / N at stages 2 and 3. Single-process they are freed after the
                 optimizer step (not held during rollout); under DeepSpeed its buffers stay
    optimizer    AdamW's fp32 first and second moments (8 B) per trainable parameter; / N at stages 1-3
    ema          the EMA's fp32 copy of the trained weights (4 B per trainable parameter, `--ema-decay`), whole, on
                 the main rank (the one that evaluates)
    old_policy   nft / awm: the old policy, another fp32 average of the trained weights (4 B per trainable
                 parameter), whole, on every rank; `trained_steps` is then the timesteps trained per sample
    kv_cache     (with `rollout=`, when the LM writes) the rollout engines' static KV caches, kept for the run:
                 2 x layers x rows x (prompt + completion) x the key/value width in the activation dtype, for the
                 rollout batch (batch / N rows) and the evaluation micro-batch
    rollout      (with `rollout=`) an ESTIMATE of what the rollout of one GPU's share of the step's batch keeps
                 through the step: token ids, masks and log-probs; the trained window's latents x and x_next, the
                 final latents, the images and their sources, the reference's velocities. While it runs it also
                 holds two fp32 [B, V] logits buffers per decode step, or one DiT layer's no-grad intermediates
                 (3 h + f per image token, x2 with CFG), whichever is larger (`rollout_transient`)
    activations  an ESTIMATE of what one micro-batch keeps for backward: per token and layer the values autograd
                 saves, (9 h + 2 h_kv + 4 f) for a Qwen2 LM and (20 h + 8 f) for a SANA DiT (h width, h_kv the
                 key/value width, f the MLP width; measured on CPU in fp32 on tiny blocks, see LM_SAVED), in the
                 activation dtype (bf16 2 B, fp32 4 B); with gradient checkpointing, one h per token and layer plus
                 one layer's full set. LM tokens: micro_batch x (prompt + completion) when the LM trains, +
                 micro_batch x (the DiT's text + queries) when the DiT trains (its conditioning's graph goes through
                 the LM); DiT tokens: micro_batch x trained steps x image tokens. The fused LM-head loss never holds
                 [N, V] logits.
    fp8_saved    with `fp8`: every FP8 layer in the training forward keeps its quantized weight (1 B per parameter,
                 the whole weight even at stage 3) until its backward
    gathered     stage 3, rollout and evaluation: the full weights gathered on every rank (one all-gather; the
                 reference phase gathers the reference the same way): the weights x (1 - 1/N) beyond the partition
    largest_layer  stage 3, training: the largest module's weights, gathered whole while it runs (fp32)

The peak (`total`) is the larger of the training phase (persistent + grads + activations + fp8_saved +
largest_layer) and the rollout phase (persistent + gathered + rollout_transient, + grads under DeepSpeed), persistent
being weights + reference + optimizer + ema + old_policy + kv_cache + rollout. `tests/test_plan_peak.py` compares
it with a tiny preset's measured peak.

Not counted: the CUDA context and allocator slack (~1-3 GiB), the rollout unless asked for (`rollout=`), the
autoencoder's activations (it runs without gradients), a VLM's vision-tower activations, communication buckets,
DeepSpeed's prefetch of the next layer at stage 3.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3
STAGES = (0, 1, 2, 3)
FROZEN_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def param_counts(model) -> dict:
    """Exact parameter counts per part: lm (its vision tower separately when it has one), connector, dit, vae."""
    vision = getattr(getattr(model.lm, "model", None), "visual", None) or getattr(model.lm, "visual", None)
    out = {"lm": _count(model.lm) - _count(vision), "lm_vision": _count(vision), "connector": _count(model.connector),
           "dit": _count(model.dit), "vae": _count(model.vae)}
    out["total"] = sum(out.values())
    return out


def _lm_dims(model):
    c = model.lm.config.get_text_config()  # a VLM's text part; a text-only LM's own config
    h = c.hidden_size
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return h, (h // c.num_attention_heads) * kv, c.intermediate_size, c.num_hidden_layers


def _dit_dims(model):
    c = model.dit.config
    if model.config.dit_type == "sana":
        h = c.num_attention_heads * c.attention_head_dim
        return h, int(h * c.mlp_ratio), c.num_layers
    h = c.num_attention_heads * c.attention_head_dim
    return h, 4 * h, c.num_layers


@dataclass
class PlanInputs:
    train_lm: bool
    train_dit: bool
    batch: int
    micro_batch: int
    prompt_len: int
    completion_len: int
    trained_steps: int
    gpus: int
    precision: str  # "bf16" | "fp32"
    frozen_dtype: str  # "fp32" | "bf16" | "fp16": the weights of the experts that do not train
    grad_ckpt_lm: bool
    grad_ckpt_dit: bool
    reference: bool
    trainable: int | None = None  # trainable parameters when not the whole experts (LoRA); None: count them
    rollout: dict | None = None  # _rollout's inputs: lm_writes, draws, guidance (None: not counted)
    ema: bool = False
    fp8: bool = False
    old_policy: bool = False


def memory_plan(model, *, train_lm: bool, train_dit: bool, batch: int = 64, micro_batch: int = 8,
                prompt_len: int = 256, completion_len: int = 512, trained_steps: int = 2, gpus: int = 8,
                precision: str = "bf16", grad_ckpt_lm: bool = True, grad_ckpt_dit: bool = True,
                reference: bool = True, trainable: int | None = None, rollout: dict | None = None,
                frozen_dtype: str = "fp32", ema: bool = False, fp8: bool = False, cond_len: int | None = None,
                old_policy: bool = False) -> dict:
    """Parameter counts and the per-GPU bytes of each part per ZeRO stage (see the module docstring). rollout:
    {"lm_writes": bool, "draws": bool, "guidance": bool} adds the rollout's estimate and the KV caches; frozen_dtype:
    the weights of the experts that do not train (fp32 / bf16 / fp16); `model` as the run has it (with `fp8`, already
    converted: its FP8Linear layers are counted); cond_len: tokens of the text the DiT is conditioned on (default
    prompt_len; the LM's completion where the LM writes the DiT's prompt); old_policy: an nft / awm run's
    old-policy copy of the trained weights."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if frozen_dtype not in FROZEN_BYTES:
        raise ValueError(f"frozen_dtype must be one of {tuple(FROZEN_BYTES)}, got {frozen_dtype!r}")
    for name, v in (("batch", batch), ("micro_batch", micro_batch), ("gpus", gpus)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    counts = param_counts(model)
    if trainable is None:
        trainable = (counts["lm"] + counts["lm_vision"]) * train_lm + (counts["dit"] + counts["connector"]) * train_dit
    wb, opt_b = 4, 8  # fp32 weights and grads (bf16 is autocast), AdamW's two fp32 moments
    ab = 2 if precision == "bf16" else 4  # activations
    frozen = (counts["lm"] + counts["lm_vision"]) * (not train_lm) + counts["dit"] * (not train_dit) + counts["vae"]
    weights = (counts["total"] - frozen) * wb + frozen * FROZEN_BYTES[frozen_dtype]
    act = _activations(model, train_lm, train_dit, micro_batch, prompt_len, completion_len,
                       prompt_len if cond_len is None else cond_len, trained_steps, ab, grad_ckpt_lm, grad_ckpt_dit)
    roll = {"kept": 0.0, "transient": 0.0, "kv_cache": 0.0}
    if rollout is not None:
        roll = _rollout(model, -(-batch // gpus), micro_batch, prompt_len, completion_len, trained_steps, ab,
                        **rollout)
        act["rollout"] = roll
    sizes = dict(weights=weights, reference=weights if reference else counts["connector"] * wb, grads=trainable * wb,
                 optimizer=trainable * opt_b, ema=trainable * wb if ema else 0.0,
                 old_policy=trainable * wb if old_policy else 0.0, kv_cache=roll["kv_cache"],
                 rollout=roll["kept"], rollout_transient=roll["transient"], activations=act["total"],
                 fp8_saved=_fp8_params(model, train_lm, train_dit) if fp8 else 0,
                 largest_layer=_largest_module(model) * wb)
    return {"params": counts, "trainable": trainable, "bytes_per_param": {"weights": wb, "optimizer": opt_b},
            "activations": act, "stages": {z: _stage(z, gpus, **sizes) for z in STAGES}, "frozen": frozen,
            "inputs": PlanInputs(train_lm, train_dit, batch, micro_batch, prompt_len, completion_len, trained_steps,
                                 gpus, precision, frozen_dtype, grad_ckpt_lm, grad_ckpt_dit, reference, trainable,
                                 rollout, ema, fp8, old_policy).__dict__}


def _stage(z, gpus, *, weights, reference, grads, optimizer, ema, old_policy, kv_cache, rollout, rollout_transient,
           activations, fp8_saved, largest_layer):
    """One ZeRO stage's per-GPU bytes by part and its peak (see the module docstring)."""
    n3 = gpus if z >= 3 else 1
    part = {"weights": weights / n3, "reference": reference / n3, "grads": grads / (gpus if z >= 2 else 1),
            "optimizer": optimizer / (gpus if z >= 1 else 1), "ema": ema, "old_policy": old_policy,
            "kv_cache": kv_cache, "rollout": rollout,
            "activations": activations, "fp8_saved": fp8_saved,
            "gathered": weights * (1 - 1 / gpus) if z >= 3 else 0.0, "largest_layer": largest_layer if z >= 3 else 0.0}
    persistent = sum(part[k] for k in ("weights", "reference", "optimizer", "ema", "old_policy", "kv_cache",
                                       "rollout"))
    train = persistent + part["grads"] + part["activations"] + part["fp8_saved"] + part["largest_layer"]
    roll = persistent + part["gathered"] + rollout_transient + (part["grads"] if z >= 1 else 0.0)
    part["peak_phase"] = "training" if train >= roll else "rollout"
    part["total"] = max(train, roll)
    return part


def _rollout(model, B, micro, prompt_len, completion_len, trained_steps, ab, *, lm_writes, draws, guidance):
    """The rollout estimate of B samples on one GPU (module docstring): {"kept", "transient", "kv_cache", ...} in
    bytes; the KV caches are the engines' (kept for the run: the step's B rows and the evaluation's micro-batch)."""
    h, kv, f, layers = _lm_dims(model)
    vocab = model.lm.config.get_text_config().vocab_size
    out = {"kv_cache": 0.0, "text_logits": 0.0, "dit_pass": 0.0, "kept": 0.0}
    if lm_writes:
        seq = prompt_len + completion_len
        out["kv_cache"] = 2 * layers * (B + micro) * seq * kv * ab
        out["text_logits"] = 2 * B * vocab * 4
        out["kept"] += B * seq * 16 + B * completion_len * 8  # int64 ids and masks; rollout and reference log-probs
    if draws:
        c, side, _ = model.latent_shape
        latent = c * side * side * 4
        out["kept"] += B * latent * (3 * trained_steps + 1) + 2 * B * 3 * model.config.image_size ** 2 * 4
        dh, df, _ = _dit_dims(model)
        tokens = (side // model.dit.config.patch_size) ** 2
        out["dit_pass"] = (2 if guidance else 1) * B * tokens * (3 * dh + df) * ab
    out["transient"] = max(out["text_logits"], out["dit_pass"])
    return out


def _fp8_params(model, train_lm: bool, train_dit: bool) -> int:
    """Parameters of the FP8 layers in the training forward: the LM's when it trains or conditions a trained DiT
    (the gradient reaches the queries through it), the DiT's when it trains."""
    from ..fp8.linear import FP8Linear

    experts = ([model.lm] if train_lm or train_dit else []) + ([model.dit] if train_dit else [])
    return sum(m.weight.numel() for e in experts for m in e.modules() if isinstance(m, FP8Linear))


def _largest_module(model) -> int:
    """Parameters of the largest module's own weights (what ZeRO-3 gathers at once while that module runs)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


# values autograd keeps per token and layer, measured on CPU in fp32 (saved_tensors_hooks over one forward of tiny
# Qwen2 / SANA blocks of several widths, fitted by least squares; residuals < 4%): Qwen2 9 h + 2 h_kv + 4 f (h fixed
# at 128 in the fit), SANA 20 h + 8 f. The SD3 DiT keeps the older stated model, 8 h + 4 f (not measured).
LM_SAVED = (9, 2, 4)
DIT_SAVED = {"sana": (20, 8), "sd3": (8, 4)}


def _activations(model, train_lm, train_dit, micro, prompt_len, completion_len, cond_len, steps, ab, ckpt_lm,
                 ckpt_dit):
    """What one micro-batch keeps for backward. The LM runs with a graph for the text loss (prompt + completion
    tokens) when it trains, and for the DiT's conditioning (its text + the query tokens) when the DiT trains: the
    gradient reaches the connector's queries through the LM even when the LM is frozen, so its activations are kept."""
    out = {"lm": 0.0, "dit": 0.0}
    h, kv, f, layers = _lm_dims(model)
    tokens = micro * ((prompt_len + completion_len) * train_lm + (cond_len + model.config.num_queries) * train_dit)
    a, b, c = LM_SAVED
    per_layer = tokens * (a * h + b * kv + c * f) * ab
    out["lm"] = (tokens * h * ab * layers + per_layer) if ckpt_lm else per_layer * layers
    if train_dit:
        h, f, layers = _dit_dims(model)
        c_, side, _ = model.latent_shape
        patch = model.dit.config.patch_size
        tokens = micro * steps * (side // patch) ** 2
        a, b = DIT_SAVED[model.config.dit_type]
        per_layer = tokens * (a * h + b * f) * ab
        out["dit"] = (tokens * h * ab * layers + per_layer) if ckpt_dit else per_layer * layers
    out["total"] = out["lm"] + out["dit"]
    return out


def format_plan(plan: dict, name: str = "") -> str:
    p, i = plan["params"], plan["inputs"]
    lines = [f"model {name}".strip() + ": " + ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in p.items() if v) +
             f"; trainable {plan['trainable'] / 1e6:,.1f} M",
             f"run: {i['gpus']} GPUs, batch {i['batch']} (micro {i['micro_batch']}), prompt {i['prompt_len']} + "
             f"completion {i['completion_len']} tokens, {i['trained_steps']} trained denoising steps, {i['precision']}"
             f" (AdamW {plan['bytes_per_param']['optimizer']} B / trainable parameter; frozen experts "
             f"{plan['frozen'] / 1e6:,.1f} M in {i['frozen_dtype']}), gradient checkpointing LM "
             f"{'on' if i['grad_ckpt_lm'] else 'off'} / DiT {'on' if i['grad_ckpt_dit'] else 'off'}, reference copy "
             f"{'yes' if i['reference'] else 'no'}",
             "GiB per GPU  weights  reference  grads  optimizer  ema"
             + ("  old policy" if i.get("old_policy") else "")
             + "  kv cache  rollout*  activations*  fp8 saved  gathered  largest layer   peak (phase)"]
    cols = (("weights", 7), ("reference", 11), ("grads", 7), ("optimizer", 11), ("ema", 5),
            *((("old_policy", 12),) if i.get("old_policy") else ()), ("kv_cache", 10), ("rollout", 10),
            ("activations", 14), ("fp8_saved", 11), ("gathered", 10), ("largest_layer", 15), ("total", 8))
    for z, s in plan["stages"].items():
        lines.append(f"ZeRO-{z}{'':6s}" + "".join(f"{s[k] / GiB:>{w}.1f}" for k, w in cols) +
                     f" ({s['peak_phase']})")
    lines.append("* an estimate from a stated model (unirl_fast.models.plan), not a measurement; peak = the larger of "
                 "the training and the rollout phase; add 1-3 GiB for the CUDA context and allocator")
    return "\n".join(lines)
