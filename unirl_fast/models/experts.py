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
"""
from __future__ import annotations

import importlib
import importlib.util
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


def check_local_dir(path, what: str, needed=("config.json",)) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} directory {str(path)!r} does not exist (only local directories are "
                                "loaded; nothing is downloaded)")
    missing = [n for n in needed if not (p / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} directory {str(path)!r} has no {', '.join(missing)}")
    has_weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or any(p.glob("*.safetensors.index.json"))
    if not has_weights:
        raise FileNotFoundError(f"{what} directory {str(path)!r} has a config but no weight files "
                                "(*.safetensors or *.bin)")
    return p


def _lm_auto_class(model_type: str):
    """AutoModelForImageTextToText for a vision-language LM (Qwen2-VL class: models.vlm), else AutoModelForCausalLM."""
    import transformers

    from .vlm import VLM_MODEL_TYPES

    return transformers.AutoModelForImageTextToText if model_type in VLM_MODEL_TYPES else \
        transformers.AutoModelForCausalLM


def build_lm(config: dict | None, path: str | None, *, attn_implementation: str = "sdpa"):
    """A transformers causal LM (or a Qwen2-VL class vision-language LM) from a config dict (random init) or a local
    directory."""
    from transformers import AutoConfig

    if path is not None:
        check_local_dir(path, "LM")
        auto = _lm_auto_class(AutoConfig.from_pretrained(path, local_files_only=True).model_type)
        return auto.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    try:
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
    except ValueError as e:
        raise ValueError(f"unknown LM model_type {model_type!r}: {e}") from None
    hf_cfg._attn_implementation = attn_implementation
    return _lm_auto_class(model_type).from_config(hf_cfg, attn_implementation=attn_implementation)


def build_dit(dit_type: str, config: dict | None, path: str | None):
    cls = diffusers_class(DIT_CLASSES[dit_type])
    if path is not None:
        check_local_dir(path, f"DiT ({DIT_CLASSES[dit_type]})")
        return cls.from_pretrained(path, local_files_only=True)
    return cls.from_config(dict(config))


def build_vae(vae_type: str | None, config: dict | None, path: str | None):
    if vae_type is None:
        return None
    cls = diffusers_class(VAE_CLASSES[vae_type])
    if path is not None:
        check_local_dir(path, f"autoencoder ({VAE_CLASSES[vae_type]})")
        return cls.from_pretrained(path, local_files_only=True)
    return cls.from_config(dict(config))


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
