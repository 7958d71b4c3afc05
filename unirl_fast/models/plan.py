"""Size a run before renting GPUs: parameter counts of a (meta-device) unified model and a per-GPU memory plan.

    plan = memory_plan(model, train_lm=True, train_dit=True, batch=64, micro_batch=8, ...)
    print(format_plan(plan))

Parameter counts are exact (read off the built model; on the meta device nothing is allocated). Memory per GPU,
per ZeRO stage (0 = plain data parallel, 1 = optimizer states partitioned, 2 = + gradients, 3 = + weights):

    weights      the trained experts' parameters (and the connector's) in fp32 (4 B): the trainer keeps fp32
                 weights and runs bf16 as autocast over them (`--precision bf16`), so they are their own master
                 copy; the experts the scenario does not train and the autoencoder in `frozen_dtype` (fp32 4 B, or
                 bf16 / fp16 2 B: `--frozen-dtype`); / N GPUs at stage 3
    reference    the frozen reference copy the KL / velocity-MSE needs (the same bytes as the weights; / N at stage
                 3); none with LoRA on every trained expert (the reference is the base with its adapters off)
    grads        fp32 (4 B) per trainable parameter; / N at stages 2 and 3
    optimizer    AdamW's fp32 first and second moments (8 B) per trainable parameter; / N at stages 1-3
    activations  an ESTIMATE of what one micro-batch keeps for backward (not a measurement): per token and layer
                 the saved inputs of the norms, projections and MLP, (6 h + 2 h_kv + 4 f) values for the LM and
                 (8 h + 4 f) for the DiT (h width, h_kv the key/value width, f the MLP width), in the activation
                 dtype (bf16 2 B, fp32 4 B), with memory-efficient attention (no score matrices); with gradient
                 checkpointing, one h per token and layer plus one layer's full set. LM tokens: micro_batch x
                 (prompt + completion); DiT tokens: micro_batch x trained steps x image tokens. The fused LM-head
                 loss never holds [N, V] logits.

    rollout      an ESTIMATE of the rollout of one GPU's share of the step's batch (batch / GPUs samples, all at once):
                 kept through the step (token ids, masks and log-probs; the trained window's latents x and x_next,
                 the final latents, the images and their sources, the reference's velocities) plus what the rollout
                 holds only while it runs beyond the training activations: the text KV cache 2 x layers x B x
                 (prompt + completion) x kv width in the activation dtype and two fp32 [B, V] logits buffers per
                 decode step, or one DiT layer's no-grad intermediates (3 h + f per image token, x2 with CFG),
                 whichever is larger. Only with `rollout=` (the trainer's preflight and `unirl-fast plan`).

Not counted: the CUDA context and allocator slack (~1-3 GiB), the rollout unless asked for (`rollout=`), the
autoencoder's activations (it runs without gradients), a VLM's vision-tower activations, communication buckets.
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


def memory_plan(model, *, train_lm: bool, train_dit: bool, batch: int = 64, micro_batch: int = 8,
                prompt_len: int = 256, completion_len: int = 512, trained_steps: int = 2, gpus: int = 8,
                precision: str = "bf16", grad_ckpt_lm: bool = True, grad_ckpt_dit: bool = True,
                reference: bool = True, trainable: int | None = None, rollout: dict | None = None,
                frozen_dtype: str = "fp32") -> dict:
    """Parameter counts and the per-GPU bytes of each part per ZeRO stage (see the module docstring). rollout:
    {"lm_writes": bool, "draws": bool, "guidance": bool} adds the rollout's estimate; frozen_dtype: the weights of the
    experts that do not train (fp32 / bf16 / fp16)."""
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
    act = _activations(model, train_lm, train_dit, micro_batch, prompt_len, completion_len, trained_steps, ab,
                       grad_ckpt_lm, grad_ckpt_dit)
    roll = None
    if rollout is not None:
        roll = _rollout(model, -(-batch // gpus), prompt_len, completion_len, trained_steps, ab, **rollout)
        act["rollout"] = roll
    stages = {}
    for z in STAGES:
        part = {"weights": weights / (gpus if z >= 3 else 1),
                "reference": (weights / (gpus if z >= 3 else 1)) if reference else 0.0,
                "grads": trainable * wb / (gpus if z >= 2 else 1),
                "optimizer": trainable * opt_b / (gpus if z >= 1 else 1),
                "activations": act["total"]}
        if roll is not None:  # kept through the step, plus what the rollout alone holds beyond the activations
            part["rollout"] = roll["kept"] + max(0.0, roll["transient"] - act["total"])
        part["total"] = sum(part.values())
        stages[z] = part
    return {"params": counts, "trainable": trainable, "bytes_per_param": {"weights": wb, "optimizer": opt_b},
            "activations": act, "stages": stages,
            "frozen": frozen,
            "inputs": PlanInputs(train_lm, train_dit, batch, micro_batch, prompt_len, completion_len, trained_steps,
                                 gpus, precision, frozen_dtype, grad_ckpt_lm, grad_ckpt_dit, reference, trainable,
                                 rollout).__dict__}


def _rollout(model, B, prompt_len, completion_len, trained_steps, ab, *, lm_writes, draws, guidance):
    """The rollout estimate of B samples on one GPU (module docstring): {"kept", "transient", ...} in bytes."""
    h, kv, f, layers = _lm_dims(model)
    vocab = model.lm.config.get_text_config().vocab_size
    out = {"text_cache": 0.0, "text_logits": 0.0, "dit_pass": 0.0, "kept": 0.0}
    if lm_writes:
        seq = prompt_len + completion_len
        out["text_cache"] = 2 * layers * B * seq * kv * ab
        out["text_logits"] = 2 * B * vocab * 4
        out["kept"] += B * seq * 16 + B * completion_len * 8  # int64 ids and masks; rollout and reference log-probs
    if draws:
        c, side, _ = model.latent_shape
        latent = c * side * side * 4
        out["kept"] += B * latent * (3 * trained_steps + 1) + 2 * B * 3 * model.config.image_size ** 2 * 4
        dh, df, _ = _dit_dims(model)
        tokens = (side // model.dit.config.patch_size) ** 2
        out["dit_pass"] = (2 if guidance else 1) * B * tokens * (3 * dh + df) * ab
    out["transient"] = max(out["text_cache"] + out["text_logits"], out["dit_pass"])
    return out


def _activations(model, train_lm, train_dit, micro, prompt_len, completion_len, steps, ab, ckpt_lm, ckpt_dit):
    out = {"lm": 0.0, "dit": 0.0}
    if train_lm or train_dit:  # the DiT's conditioning goes through the LM (queries) whenever the connector trains
        h, kv, f, layers = _lm_dims(model)
        tokens = micro * ((prompt_len + completion_len) if train_lm else (prompt_len + model.config.num_queries))
        per_layer = tokens * (6 * h + 2 * kv + 4 * f) * ab
        out["lm"] = (tokens * h * ab * layers + per_layer) if ckpt_lm else per_layer * layers
        if not train_lm:
            out["lm"] = 0.0  # frozen LM: its forward keeps nothing for backward beyond the query states
    if train_dit:
        h, f, layers = _dit_dims(model)
        c, side, _ = model.latent_shape
        patch = model.dit.config.patch_size
        tokens = micro * steps * (side // patch) ** 2
        per_layer = tokens * (8 * h + 4 * f) * ab
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
             "GiB per GPU      weights  reference  grads  optimizer  activations*" +
             ("  rollout*" if i.get("rollout") else "") + "  total"]
    cols = (("weights", 7), ("reference", 11), ("grads", 7), ("optimizer", 11), ("activations", 14)) + \
        ((("rollout", 10),) if i.get("rollout") else ()) + (("total", 7),)
    for z, s in plan["stages"].items():
        lines.append(f"ZeRO-{z}{'':10s}" + "".join(f"{s[k] / GiB:>{w}.1f}" for k, w in cols))
    lines.append("* an estimate from a stated model (unirl_fast.models.plan), not a measurement; add 1-3 GiB for the "
                 "CUDA context and allocator")
    return "\n".join(lines)
