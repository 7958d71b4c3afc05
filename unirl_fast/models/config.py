"""Unified-model configuration and named presets.

A `UnifiedConfig` is a frozen dataclass that fully describes the three parts of the model, so a
checkpoint directory (config JSON + safetensors) can be rebuilt without any other file:

- `lm`: a transformers config dict (must carry `model_type`, e.g. "qwen2" or "llama"), or `lm_path`, a
  local directory loaded with `from_pretrained(path, local_files_only=True)`.
- `dit_type` ("sana" | "sd3") and `dit`: a diffusers config dict for `SanaTransformer2DModel` /
  `SD3Transformer2DModel`, or `dit_path`.
- `vae_type` (None = pixel space | "kl" = AutoencoderKL | "dc" = AutoencoderDC) and `vae` / `vae_path`.
- The connector: `num_queries` learnable query tokens and a `connector_layers`-deep transformer projector
  of width `connector_dim` (see `connector.py`).
- `edit`: the DiT also sees the source image's latents, concatenated along channels (so the DiT's
  `in_channels` is twice the latent channels and `out_channels` equals them).

Presets (`preset_config(name)`):

| name | LM | DiT | latent space | purpose |
|---|---|---|---|---|
| tiny | Qwen2, H=64, 2 layers, `CharTokenizer` vocab | Sana, width 32, 2 layers, patch 2 | pixels 3x16x16 | CPU tests |
| tiny-sd3 | same LM | SD3, width 32, 2 layers, patch 2 | pixels 3x16x16 | CPU tests of the SD3 path |
| small | Qwen2, H=256, 4 layers, vocab 4096 | Sana, width 256, 4 layers | AutoencoderKL f8c4, 128 px | GPU smoke |
| bench-1.5b = qwen2.5-1.5b-sana-0.6b | Qwen2.5-1.5B shape (H=1536, 28 layers, GQA 12/2, V 151936) | SANA-600M shape
  (1152 wide, 28 layers) | DC-AE f32c32, 512 px | throughput, sizing |
| bench-vlm-2b | Qwen2-VL-2B shape (bench-1.5b's decoder + a 32-block vision tower) | as bench-1.5b | as bench-1.5b |
  the VLM throughput target |
| unirl-zero-3b-sana-1.6b | Qwen2.5-VL-3B shape (vision tower + 2048 x 36 text) | SANA-1.6B shape (2240 wide, 20
  layers) | DC-AE f32c32, 512 px | sizing (`unirl-fast plan`) |

Expert configs loaded from a path are copied into the config when the model is saved, so a saved
checkpoint never depends on the original directories.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

DIT_TYPES = ("sana", "sd3")
VAE_TYPES = (None, "kl", "dc")
CONFIG_NAME = "unified_config.json"


@dataclass(frozen=True)
class UnifiedConfig:
    lm: dict | None = None
    lm_path: str | None = None
    dit_type: str = "sana"
    dit: dict | None = None
    dit_path: str | None = None
    vae_type: str | None = None
    vae: dict | None = None
    vae_path: str | None = None
    image_size: int = 16
    num_queries: int = 8
    connector_dim: int = 64
    connector_layers: int = 1
    connector_heads: int = 4
    edit: bool = False
    tokenizer: str | None = None

    def __post_init__(self):
        if self.dit_type not in DIT_TYPES:
            raise ValueError(f"dit_type must be one of {DIT_TYPES}, got {self.dit_type!r}")
        if self.vae_type not in VAE_TYPES:
            raise ValueError(f"vae_type must be one of {VAE_TYPES}, got {self.vae_type!r}")
        for part, cfg, path in (("lm", self.lm, self.lm_path), ("dit", self.dit, self.dit_path)):
            if (cfg is None) == (path is None):
                raise ValueError(f"give exactly one of {part} (a config dict) and {part}_path (a local directory)")
        if self.vae_type is not None and (self.vae is None) == (self.vae_path is None):
            raise ValueError(f"vae_type={self.vae_type!r} needs exactly one of vae (a config dict) and vae_path")
        if self.vae_type is None and (self.vae is not None or self.vae_path is not None):
            raise ValueError("vae / vae_path given but vae_type is None (pixel space); set vae_type='kl' or 'dc'")
        if self.tokenizer not in (None, "char", "lm"):
            raise ValueError(f"tokenizer must be None, 'char' or 'lm' (the LM directory's), got {self.tokenizer!r}")
        if self.lm is not None and "model_type" not in self.lm:
            raise ValueError("the lm config dict needs a 'model_type' key (e.g. 'qwen2' or 'llama')")
        for name in ("image_size", "num_queries", "connector_dim", "connector_layers", "connector_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.connector_dim % self.connector_heads:
            raise ValueError(f"connector_dim={self.connector_dim} is not divisible by "
                             f"connector_heads={self.connector_heads}")

    def replace(self, **kw) -> "UnifiedConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, directory) -> "UnifiedConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory!s} is not a unified-model checkpoint: {CONFIG_NAME} is missing")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}")
        return cls(**data)


def _qwen2(vocab, hidden, inter, layers, heads, kv_heads, max_pos, tie=True, rope_theta=1e6):
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_pos, "tie_word_embeddings": tie, "rope_theta": rope_theta,
            "rms_norm_eps": 1e-6, "hidden_act": "silu"}


def _sana(ch_in, ch_out, heads, head_dim, layers, cross_heads, cross_head_dim, caption, sample, patch, mlp=2.5):
    return {"in_channels": ch_in, "out_channels": ch_out, "num_attention_heads": heads,
            "attention_head_dim": head_dim, "num_layers": layers, "num_cross_attention_heads": cross_heads,
            "cross_attention_head_dim": cross_head_dim, "cross_attention_dim": cross_heads * cross_head_dim,
            "caption_channels": caption, "sample_size": sample, "patch_size": patch, "mlp_ratio": mlp}


def _tiny_lm():
    from .tokenizer import CharTokenizer
    return _qwen2(CharTokenizer().vocab_size, 64, 128, 2, 4, 2, 512)


def _tiny():
    return UnifiedConfig(lm=_tiny_lm(), dit_type="sana", dit=_sana(3, 3, 2, 16, 2, 2, 16, 32, 16, 2),
                         image_size=16, num_queries=8, connector_dim=32, connector_layers=1, connector_heads=2,
                         tokenizer="char")


def _tiny_sd3():
    dit = {"sample_size": 16, "patch_size": 2, "in_channels": 3, "out_channels": 3, "num_layers": 2,
           "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
           "caption_projection_dim": 32, "pooled_projection_dim": 32, "pos_embed_max_size": 16}
    return _tiny().replace(dit_type="sd3", dit=dit)


def _small():
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
           "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 32,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "scaling_factor": 0.18215}
    return UnifiedConfig(lm=_qwen2(4096, 256, 688, 4, 4, 2, 2048), dit_type="sana",
                         dit=_sana(4, 4, 8, 32, 4, 8, 32, 256, 16, 1), vae_type="kl", vae=vae, image_size=128,
                         num_queries=32, connector_dim=256, connector_layers=2, connector_heads=4)


def _bench_1p5b():
    # SANA-600M (Sana_600M_img512): 28 blocks of width 36 x 32 = 1152, cross-attention 16 x 72, caption 2304,
    # 32 latent channels at 16 x 16 (512 px through DC-AE f32c32). Qwen2.5-1.5B: 1536 wide, 28 layers, GQA 12/2.
    dc = {"in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
          "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
          "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
          "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
          "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
          "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
          "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
          "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
          "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
          "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407}
    return UnifiedConfig(lm=_qwen2(151936, 1536, 8960, 28, 12, 2, 32768), dit_type="sana",
                         dit=_sana(32, 32, 36, 32, 28, 16, 72, 2304, 16, 1), vae_type="dc", vae=dc,
                         image_size=512, num_queries=64, connector_dim=1024, connector_layers=2, connector_heads=16)


def _unirl_zero_3b():
    # UniRL-Zero's experts: Qwen2.5-VL-3B (text 2048 wide, 36 layers, GQA 16/2, V 151936; vision tower 32 blocks of
    # 1280, merged to 2048) and SANA-1.6B (20 blocks of 70 x 32 = 2240, cross-attention 20 x 112, caption 2304) at
    # 512 px through DC-AE f32c32, joined by 256 queries. The connector's width and depth are our choice (2048, 2).
    text = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "rope_theta": 1e6, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True}
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3, "hidden_act": "silu"}
    lm = {"model_type": "qwen2_5_vl", "text_config": text, "vision_config": vision, "tie_word_embeddings": True,
          "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
          "vision_end_token_id": 151653}
    return _bench_1p5b().replace(lm=lm, dit=_sana(32, 32, 70, 32, 20, 20, 112, 2304, 16, 1), num_queries=256,
                                 connector_dim=2048, connector_layers=2, connector_heads=16)


def _bench_vlm_2b():
    # bench-1.5b with a vision-language LM expert of the same text size: Qwen2-VL-2B's shape (the 1.5B decoder, 1536
    # wide, 28 layers, GQA 12/2, M-RoPE sections 16/24/24; a 32-block vision tower of 1280 merged to 1536).
    text = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rope_theta": 1e6, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
              "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    lm = {"model_type": "qwen2_vl", "text_config": text, "vision_config": vision, "tie_word_embeddings": True,
          "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
          "vision_end_token_id": 151653}
    return _bench_1p5b().replace(lm=lm)


PRESETS = {"tiny": _tiny, "tiny-sd3": _tiny_sd3, "small": _small, "bench-1.5b": _bench_1p5b,
           # real shapes, for sizing a run (`unirl-fast plan`); load real weights with --lm-path / --dit-path
           "qwen2.5-1.5b-sana-0.6b": _bench_1p5b, "unirl-zero-3b-sana-1.6b": _unirl_zero_3b,
           "bench-vlm-2b": _bench_vlm_2b}


def preset_config(name: str) -> UnifiedConfig:
    """The UnifiedConfig of a named preset (see the module table)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
