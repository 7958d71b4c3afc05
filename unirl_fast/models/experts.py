"""Building the experts: a transformers causal LM, a diffusers flow-matching DiT, an optional autoencoder.

Each part comes from a config dict or from a local directory (`from_pretrained(path, local_files_only=True)`,
nothing is ever downloaded). diffusers is imported lazily: `unirl_fast.models` imports without it, and the
first call that needs it raises an ImportError naming the `.[diffusion]` extra.

What the unified model reads from each expert:
- LM: `config.hidden_size` (connector input width; a VLM's text config), `get_input_embeddings()`, the base
  model's last (final-normed) hidden state, `lm_head` for log-probs; a Qwen2-VL class LM also its vision tower
  (`models.vlm`).
- DiT: conditioning width (Sana `caption_channels`; SD3 `joint_attention_dim` and `pooled_projection_dim`),
  `in_channels` / `out_channels`, `patch_size`.
- VAE: `latent_channels`, the spatial factor (KL: 2^(len(block_out_channels) - 1); DC: 2^(len(encoder
  block_out_channels) - 1)), `scaling_factor` and (KL) `shift_factor`.

Released checkpoints. Weights are read in the dtype the caller asks for (`dtype`, fp32 by default: an expert whose
weights train keeps fp32 master weights however the files store them; transformers 5 would otherwise keep a bf16
file's bf16). Files may be sharded with an index (both libraries read that) and may carry a variant in their names
(`diffusion_pytorch_model.bf16.safetensors`, `model.safetensors.index.bf16.json`, ...): `resolve_variant` picks the
requested one, else the default names when present, else the only variant there is; two variants and no default
is an error asking to choose. `file_dtype` reads the floating dtype the chosen files store from the safetensors
headers (no weights are read), for experts kept in their file's dtype.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import torch

DIT_CLASSES = {"sana": "SanaTransformer2DModel", "sd3": "SD3Transformer2DModel"}
VAE_CLASSES = {"kl": "AutoencoderKL", "dc": "AutoencoderDC"}


def diffusers_class(name: str):
    """`diffusers.<name>`, or an ImportError naming the extra to install."""
    try:
        module = importlib.import_module("diffusers")
    except ImportError:
        raise ImportError(f"{name} needs diffusers, which is not installed; install the diffusion extra: "
                          "pip install -e '.[diffusion]'") from None
    return getattr(module, name)


_STEMS = r"(?P<stem>model|diffusion_pytorch_model|pytorch_model)"
# model.safetensors, model-00001-of-00002.safetensors, model.bf16.safetensors, model.bf16-00001-of-00002.safetensors,
# model-00001-of-00002.bf16.safetensors (older diffusers), and the .bin forms
_WEIGHT_RE = re.compile(_STEMS + r"(?:\.(?P<v1>\w+?))?(?:-\d+-of-\d+)?(?:\.(?P<v2>\w+?))?\.(?:safetensors|bin)$")
_INDEX_RE = re.compile(_STEMS + r"\.(?:safetensors|bin)\.index(?:\.(?P<v>\w+))?\.json$")


def weight_files(path) -> dict:
    """A model directory's weight files by variant: {None (the default names) | "bf16" | ...: [files]}."""
    out = {}
    for f in sorted(Path(path).iterdir()):
        m = _WEIGHT_RE.match(f.name) or _INDEX_RE.match(f.name)
        if m is None or not f.is_file():
            continue
        g = m.groupdict()
        out.setdefault(g.get("v1") or g.get("v2") or g.get("v"), []).append(f)
    return out


def resolve_variant(path, variant: str | None, what: str) -> str | None:
    """The weight variant to read from `path`: `variant` when given (it must be there), else None when the default
    file names are there, else the only variant present. ValueError (one line, naming the files) otherwise;
    FileNotFoundError without any weight file."""
    files = weight_files(path)
    have = ", ".join("default" if v is None else repr(v) for v in files)
    if variant is not None:
        if variant not in files:
            raise ValueError(f"{what} directory {str(path)!r} has no {variant!r} weight files (it has: "
                             f"{have or 'none'})")
        return variant
    if None in files:
        return None
    if len(files) == 1:
        return next(iter(files))
    if not files:
        raise FileNotFoundError(f"{what} directory {str(path)!r} has a config but no weight files (*.safetensors or "
                                "*.bin, optionally sharded with an index)")
    raise ValueError(f"{what} directory {str(path)!r} holds several weight variants ({have}) and no default: choose "
                     "one with the variant flag (e.g. --dit-variant bf16)")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def file_dtype(path, variant: str | None = None) -> torch.dtype:
    """The floating dtype most of the chosen weight files' tensors are stored in (read from the safetensors headers,
    no weights loaded); fp32 for .bin files (their headers tell nothing without unpickling)."""
    counts = Counter()
    for f in weight_files(path).get(variant, []):
        if f.suffix != ".safetensors":
            continue
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        counts.update(v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"] in
                      _SAFETENSORS_DTYPES)
    return _SAFETENSORS_DTYPES[counts.most_common(1)[0][0]] if counts else torch.float32


def check_local_dir(path, what: str, needed=("config.json",), variant: str | None = None) -> str | None:
    """A local model directory with its config and weights; returns the weight variant to read (resolve_variant)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} directory {str(path)!r} does not exist (only local directories are "
                                "loaded; nothing is downloaded)")
    missing = [n for n in needed if not (p / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} directory {str(path)!r} has no {', '.join(missing)}")
    return resolve_variant(p, variant, what)


def _lm_auto_class(model_type: str):
    """AutoModelForImageTextToText for a vision-language LM (Qwen2-VL class: models.vlm), else AutoModelForCausalLM."""
    import transformers

    from .vlm import VLM_MODEL_TYPES

    return transformers.AutoModelForImageTextToText if model_type in VLM_MODEL_TYPES else \
        transformers.AutoModelForCausalLM


def build_lm(config: dict | None, path: str | None, *, attn_implementation: str = "sdpa",
             dtype: torch.dtype = torch.float32, variant: str | None = None):
    """A transformers causal LM (or a Qwen2-VL class vision-language LM) from a config dict (random init) or a local
    directory, its weights in `dtype` whatever the files store (`variant`: see resolve_variant)."""
    from transformers import AutoConfig

    if path is not None:
        variant = check_local_dir(path, "LM", variant=variant)
        auto = _lm_auto_class(AutoConfig.from_pretrained(path, local_files_only=True).model_type)
        return auto.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation,
                                    dtype=dtype, variant=variant)
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    try:
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
    except ValueError as e:
        raise ValueError(f"unknown LM model_type {model_type!r}: {e}") from None
    hf_cfg._attn_implementation = attn_implementation
    return _cast(_lm_auto_class(model_type).from_config(hf_cfg, attn_implementation=attn_implementation), dtype)


def _cast(module, dtype):
    """A random-init expert in `dtype` (built in fp32; cast only when asked for another dtype)."""
    return module if dtype == torch.float32 else module.to(dtype)


def _build_diffusers(cls, what: str, config, path, dtype, variant):
    if path is not None:
        variant = check_local_dir(path, f"{what} ({cls.__name__})", variant=variant)
        return cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype, variant=variant)
    return _cast(cls.from_config(dict(config)), dtype)


def build_dit(dit_type: str, config: dict | None, path: str | None, *, dtype: torch.dtype = torch.float32,
              variant: str | None = None):
    return _build_diffusers(diffusers_class(DIT_CLASSES[dit_type]), "DiT", config, path, dtype, variant)


def build_vae(vae_type: str | None, config: dict | None, path: str | None, *, dtype: torch.dtype = torch.float32,
              variant: str | None = None):
    if vae_type is None:
        return None
    return _build_diffusers(diffusers_class(VAE_CLASSES[vae_type]), "autoencoder", config, path, dtype, variant)


def dit_widths(dit_type: str, dit) -> tuple[int, int | None]:
    """(conditioning token width, pooled projection width or None) the DiT expects."""
    c = dit.config
    if dit_type == "sana":
        return int(c.caption_channels), None
    return int(c.joint_attention_dim), int(c.pooled_projection_dim)


def vae_geometry(vae_type: str | None, vae) -> tuple[int, int]:
    """(latent channels, spatial down-sampling factor); pixel space is (3, 1)."""
    if vae is None:
        return 3, 1
    c = vae.config
    blocks = c.block_out_channels if vae_type == "kl" else c.encoder_block_out_channels
    return int(c.latent_channels), 2 ** (len(blocks) - 1)


def lm_config_dict(lm) -> dict:
    """The LM's config as a plain dict that `build_lm` can rebuild (model_type included)."""
    d = lm.config.to_diff_dict() if hasattr(lm.config, "to_diff_dict") else lm.config.to_dict()
    d = {k: v for k, v in d.items() if k not in ("_name_or_path", "transformers_version", "architectures",
                                                  "_attn_implementation_autoset", "dtype", "torch_dtype")}
    d["model_type"] = lm.config.model_type
    return d


def diffusers_config_dict(module) -> dict:
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def sdpa_or_flash() -> str:
    """flash_attention_2 when flash-attn is installed and CUDA is present, otherwise PyTorch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def full_sequence_mask(lm, mask: torch.Tensor):
    """The [B, 1, L, L] causal + padding mask of a whole-sequence LM forward (no cache) from the [B, L] 0/1 mask,
    in the form the LM's attention takes: bool for SDPA, additive (0 / dtype min) for eager; flash-attention and
    other kernels get the [B, L] mask back. transformers uses a 4-D mask as given; from a 2-D one it first reads the
    padding mask on the host to see whether it may drop the mask, one device sync per forward."""
    impl = getattr(lm.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return mask
    L = mask.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    keep = causal[None, None] & mask.bool()[:, None, None, :]
    if impl == "sdpa":
        return keep
    dtype = lm.get_input_embeddings().weight.dtype
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)
