"""LoRA on the experts through peft (transformers' and diffusers' own adapter integration; no adapters of our own).

    spec = parse_lora("32,64", "dit")          # R,ALPHA[,MODULE+MODULE...]; "default" = Flow-GRPO's DiT setting
    add_lora(model, lm=None, dit=spec)         # adapters on the DiT (peft.inject_adapter_in_model); only they train
    with adapters_disabled(model): ...         # the base model (the frozen reference, no second copy)
    merge_lora(model)                          # fold the adapters into the weights and drop them (export)

Defaults: the DiT gets Flow-GRPO's LoRA (r 32, alpha 64 on the attention projections: to_q / to_k / to_v /
to_out.0 and, for SD3's joint blocks, add_q_proj / add_k_proj / add_v_proj / to_add_out); the LM gets its attention
and MLP projections (q / k / v / o, gate / up / down). Module names match by suffix, as peft matches them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

DIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS = {"dit": (32, 64.0, DIT_TARGETS), "lm": (16, 32.0, LM_TARGETS)}


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    targets: tuple


def parse_lora(spec: str, which: str) -> LoraSpec:
    """"R,ALPHA[,MODULE+MODULE...]" or "default" -> LoraSpec (which: "lm" | "dit", for the default modules)."""
    if which not in DEFAULTS:
        raise ValueError(f"which must be 'lm' or 'dit', got {which!r}")
    r, alpha, targets = DEFAULTS[which]
    if spec.strip() == "default":
        return LoraSpec(r, alpha, targets)
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"LoRA spec {spec!r}: expected R,ALPHA[,MODULE+MODULE...] or 'default'")
    try:
        r, alpha = int(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"LoRA spec {spec!r}: R must be an integer and ALPHA a number") from None
    if r < 1 or not alpha > 0:
        raise ValueError(f"LoRA spec {spec!r}: R must be >= 1 and ALPHA > 0")
    if len(parts) == 3:
        targets = tuple(t for t in parts[2].split("+") if t)
        if not targets:
            raise ValueError(f"LoRA spec {spec!r}: no module names after the second comma")
    return LoraSpec(r, alpha, targets)


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft, which is not installed: pip install -e '.[lora]'") from None
    return peft


def add_lora(model, *, lm: LoraSpec | None = None, dit: LoraSpec | None = None) -> dict:
    """Adapters (named "default") on the chosen experts; every other weight of those experts is frozen, the
    adapters' are trainable. Returns {expert: number of adapted modules}."""
    peft = _peft()
    out = {}
    for name, spec in (("lm", lm), ("dit", dit)):
        if spec is None:
            continue
        expert = getattr(model, name)
        cfg = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0,
                              init_lora_weights=True)
        try:  # peft's own injection (what transformers' and diffusers' add_adapter call underneath)
            peft.inject_adapter_in_model(cfg, expert)
        except ValueError as e:  # peft: no module matched
            raise ValueError(f"LoRA on the {name}: {e}") from None
        expert.requires_grad_(False)
        n = 0
        for mod in expert.modules():
            if isinstance(mod, peft.tuners.tuners_utils.BaseTunerLayer):
                n += 1
        for pname, p in expert.named_parameters():
            if "lora_" in pname:
                p.requires_grad_(True)
        out[name] = n
    return out


def has_lora(module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@contextlib.contextmanager
def adapters_disabled(model):
    """The experts' adapters off for the duration (the base model), back on after (also on an error)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for e in (model.lm, model.dit) for m in e.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge_lora(model) -> int:
    """Fold every adapter into its base weight (peft's merge) and put the plain base layers back, so the experts
    save as ordinary transformers / diffusers models. Returns the number of merged layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    n = 0
    for expert in (model.lm, model.dit):
        for name, mod in list(expert.named_modules()):
            if isinstance(mod, BaseTunerLayer):
                mod.merge(safe_merge=True)
                parent_name, _, child = name.rpartition(".")
                setattr(expert.get_submodule(parent_name) if parent_name else expert, child, mod.get_base_layer())
                n += 1
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in expert.__dict__:
                delattr(expert, attr)
        if hasattr(expert, "_hf_peft_config_loaded"):
            expert._hf_peft_config_loaded = False
    return n
