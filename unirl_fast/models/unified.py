"""`UnifiedModel`: LM expert + connector + diffusion expert (+ optional autoencoder), saved as one checkpoint.

Data flow for one text-to-image (or edit) velocity evaluation:

    prompt ids [B, L] (left-padded) --embed--> [B, L, H_lm] ++ queries [N, H_lm] --LM--> query states [B, N, H_lm]
    --connector--> cond [B, N, D_cond] (+ pooled [B, D_pool] for SD3)
    latents x_sigma [B, C, h, w] (++ source latents [B, C, h, w] along channels when editing)
    --DiT(timestep = 1000 sigma, cond)--> velocity [B, C, h, w]

Editing: the source image is encoded with the same autoencoder (or kept in pixels) and concatenated to the noisy
latents along channels, so the DiT is built with in_channels = 2C and out_channels = C (InstructPix2Pix-style).
Channel concatenation keeps the DiT's token count (and attention cost) unchanged, unlike extra source tokens.

Latent space: pixels in [-1, 1] when there is no autoencoder (the tiny presets); otherwise
AutoencoderKL: (mean(E(x)) - shift) * scale, AutoencoderDC: E(x) * scale. The encoder mean (not a sample) is used
so that encoding is deterministic.

Checkpoint layout (`save_pretrained`): `unified_config.json`, `lm/` (transformers), `dit/` and `vae/` (diffusers),
each loadable by its library on its own, and `connector.safetensors` (queries and connector). `from_pretrained` also
reads the older single-file layout (`model.safetensors` with every expert's config inlined in the JSON).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import UnifiedConfig, preset_config
from .connector import QueryConnector
from .experts import (
    build_dit,
    build_lm,
    build_vae,
    check_local_dir,
    diffusers_config_dict,
    dit_widths,
    file_dtype,
    full_sequence_mask,
    lm_config_dict,
    vae_geometry,
)
from .tokenizer import CharTokenizer, HFTokenizer

WEIGHTS_NAME = "model.safetensors"  # the single-file layout (read for older checkpoints)
CONNECTOR_NAME = "connector.safetensors"


@contextlib.contextmanager
def _quiet_progress():
    """transformers' per-file progress bars off while a unified model is written or read (the trainer's logs stay
    one line per event), restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _class_kind(path, kinds: dict, what: str) -> str:
    """The diffusers class a directory holds (config.json's _class_name), mapped to our name for it."""
    conf = Path(path) / "config.json"
    if not conf.is_file():
        raise FileNotFoundError(f"{what} directory {str(path)!r} has no config.json")
    name = json.loads(conf.read_text()).get("_class_name")
    if name not in kinds:
        raise ValueError(f"{what} directory {str(path)!r} holds a {name!r}; supported: {', '.join(kinds)}")
    return kinds[name]


def load_tokenizer(config: UnifiedConfig):
    """The model's tokenizer: "char" (the tiny presets' CharTokenizer), "lm" (the LM directory's Hugging Face
    tokenizer), None (none: callers tokenize themselves)."""
    if config.tokenizer == "char":
        return CharTokenizer()
    if config.tokenizer == "lm":
        if config.lm_path is None:
            raise ValueError("tokenizer 'lm' reads the LM directory's tokenizer, but the LM is built from a config "
                             "dict (no lm_path)")
        return HFTokenizer(config.lm_path)
    return None


def _cast_state(module, dtype) -> dict:
    """The module's state as `dtype` (floating tensors only), on the CPU: what gets written, not what trains."""
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
            for k, v in module.state_dict().items()}


def _save_diffusers(module, directory: Path, dtype=None) -> None:
    """diffusers' save_pretrained, or with `dtype` its config and a cast copy of the weights under the default name
    (diffusers' own save takes no state dict)."""
    if dtype is None:
        module.save_pretrained(str(directory))
        return
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    module.save_config(str(directory))
    state = {k: v.contiguous() for k, v in _cast_state(module, dtype).items()}
    save_file(state, str(directory / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


@dataclass
class Conditioning:
    """What the DiT is conditioned on: cond [B, N, D_cond], pooled [B, D_pool] (SD3) or None."""
    cond: torch.Tensor
    pooled: torch.Tensor | None = None

    def cat(self, other: "Conditioning") -> "Conditioning":
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return Conditioning(torch.cat([self.cond, other.cond]), pooled)

    def detach(self) -> "Conditioning":
        return Conditioning(self.cond.detach(), None if self.pooled is None else self.pooled.detach())


EXPERTS = ("lm", "dit", "vae")


def _dtype_of(spec, path, variant, what):
    """A torch dtype, or "file": the dtype the expert's weight files store (fp32 for an expert built from a config)."""
    if spec != "file":
        return spec
    return torch.float32 if path is None else file_dtype(path, check_local_dir(path, what, variant=variant))


class UnifiedModel(nn.Module):
    def __init__(self, config: UnifiedConfig, *, attn_implementation: str = "sdpa", dtypes: dict | None = None,
                 variants: dict | None = None):
        """dtypes: {"lm" / "dit" / "vae": a torch dtype or "file" (what the expert's files store)} for the experts'
        weights, fp32 where not given (trained weights are their own fp32 master copy whatever the files hold);
        variants: {"lm" / "dit" / "vae": the weight-file variant to read, e.g. "bf16"} (default: the default file
        names, else the only variant in the directory: `experts.resolve_variant`)."""
        super().__init__()
        if not isinstance(config, UnifiedConfig):
            raise TypeError(f"config must be a UnifiedConfig, got {type(config).__name__}")
        self.config = config
        dtypes, variants = dtypes or {}, variants or {}
        unknown = sorted(set(dtypes) - set(EXPERTS)) + sorted(set(variants) - set(EXPERTS))
        if unknown:
            raise ValueError(f"dtypes / variants name experts {unknown}; the experts are {EXPERTS}")
        paths = {"lm": config.lm_path, "dit": config.dit_path, "vae": config.vae_path}
        # the dtype each expert's files store (None: built from a config): what a faithful copy of the inputs keeps
        self.file_dtypes = {k: None if paths[k] is None else _dtype_of("file", paths[k], variants.get(k), k.upper())
                            for k in EXPERTS if k != "vae" or config.vae_type is not None}
        want = {k: _dtype_of(dtypes.get(k, torch.float32), paths[k], variants.get(k), k.upper()) for k in EXPERTS}
        self.lm = build_lm(config.lm, config.lm_path, attn_implementation=attn_implementation, dtype=want["lm"],
                           variant=variants.get("lm"))
        self.dit = build_dit(config.dit_type, config.dit, config.dit_path, dtype=want["dit"],
                             variant=variants.get("dit"))
        self.vae = build_vae(config.vae_type, config.vae, config.vae_path, dtype=want["vae"],
                             variant=variants.get("vae"))
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.latent_channels, self.vae_factor = vae_geometry(config.vae_type, self.vae)
        cond_width, pooled_width = dit_widths(config.dit_type, self.dit)
        self._check_geometry()
        lm_text = self.lm.config.get_text_config()  # a VLM's text part; a text-only LM's own config
        self.connector = QueryConnector(lm_text.hidden_size, cond_width, num_queries=config.num_queries,
                                        dim=config.connector_dim, layers=config.connector_layers,
                                        heads=config.connector_heads, pooled_width=pooled_width)
        self.tokenizer = load_tokenizer(config)
        if self.tokenizer is not None and lm_text.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"LM vocab_size={lm_text.vocab_size} is smaller than the char tokenizer's "
                             f"{self.tokenizer.vocab_size}")

    def _check_geometry(self):
        cfg, dc = self.config, self.dit.config
        C = self.latent_channels
        want_in = 2 * C if cfg.edit else C
        if dc.in_channels != want_in:
            raise ValueError(f"DiT in_channels={dc.in_channels} but the latent space has {C} channels"
                             f"{' (x2 for edit=True: source latents are concatenated)' if cfg.edit else ''}: "
                             f"expected {want_in}")
        out = dc.out_channels or dc.in_channels
        if out != C:
            raise ValueError(f"DiT out_channels={out} but the latent space has {C} channels")
        if cfg.image_size % self.vae_factor:
            raise ValueError(f"image_size={cfg.image_size} is not a multiple of the autoencoder factor "
                             f"{self.vae_factor}")
        side = cfg.image_size // self.vae_factor
        if side % dc.patch_size:
            raise ValueError(f"latent side {side} (image_size {cfg.image_size} / {self.vae_factor}) is not a "
                             f"multiple of the DiT patch_size={dc.patch_size}")
        if cfg.dit_type == "sd3" and side // dc.patch_size > dc.pos_embed_max_size:
            raise ValueError(f"latent side {side} / patch {dc.patch_size} exceeds SD3 pos_embed_max_size="
                             f"{dc.pos_embed_max_size}")

    # construction / persistence -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UnifiedModel":
        """Random-init model (train mode) of a named preset (`tiny`, `tiny-sd3`, `small`, `bench-1.5b`).

        `overrides` replace UnifiedConfig fields."""
        cfg = preset_config(name)
        return cls(cfg.replace(**overrides) if overrides else cfg)

    def resolved_config(self) -> UnifiedConfig:
        """The config with every expert's config inlined (no paths): what `save_pretrained` writes."""
        vae = diffusers_config_dict(self.vae) if self.vae is not None else None
        return self.config.replace(lm=lm_config_dict(self.lm), lm_path=None, dit=diffusers_config_dict(self.dit),
                                   dit_path=None, vae=vae, vae_path=None)

    def save_pretrained(self, directory, *, layout: str = "split", dtypes: dict | None = None) -> Path:
        """layout "split" (default): every expert in its library's own layout, loadable on its own.
        dtypes: {"lm" / "dit" / "vae": torch dtype} to write an expert's weights in (a cast copy; the model is not
        changed), e.g. the dtype its input files had; default: as the weights are.

            directory/unified_config.json   UnifiedConfig with lm_path "lm", dit_path "dit" (vae_path "vae")
            directory/lm/                   transformers `save_pretrained` (with the tokenizer when it is an HF one)
            directory/dit/                  diffusers `save_pretrained`
            directory/vae/                  diffusers `save_pretrained` (latent-space models)
            directory/connector.safetensors the query tokens and the connector

        layout "single": unified_config.json with every expert's config inlined and one model.safetensors (the
        trainer's base-model cache: no library save path, so a single-process run never imports what
        transformers' save path imports, e.g. DeepSpeed through accelerate when it is installed).
        """
        from safetensors.torch import save_file, save_model

        if layout not in ("split", "single"):
            raise ValueError(f"layout must be 'split' or 'single', got {layout!r}")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if layout == "single":
            if self.config.tokenizer == "lm":
                raise ValueError("the single-file layout cannot hold the LM directory's tokenizer: use layout='split'")
            self.resolved_config().save(d)
            save_model(self, str(d / WEIGHTS_NAME))
            return d
        dtypes = dtypes or {}
        with _quiet_progress():
            cast = dtypes.get("lm")
            self.lm.save_pretrained(str(d / "lm"), state_dict=None if cast is None else _cast_state(self.lm, cast))
        if isinstance(self.tokenizer, HFTokenizer):
            self.tokenizer.save_pretrained(d / "lm")
        from .vlm import image_processor, is_vlm

        if is_vlm(self.lm):  # its pixel settings travel with it (a released checkpoint's, or the ones in use)
            image_processor(self.lm).save_pretrained(str(d / "lm"))
        for name in ("dit", "vae"):
            module = getattr(self, name)
            if module is not None:
                _save_diffusers(module, d / name, dtypes.get(name))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.connector.state_dict().items()},
                  str(d / CONNECTOR_NAME))
        self.config.replace(lm=None, lm_path="lm", dit=None, dit_path="dit", vae=None,
                            vae_path="vae" if self.vae is not None else None).save(d)
        return d

    @classmethod
    def from_pretrained(cls, directory, *, device=None, dtype=None, attn_implementation: str = "sdpa",
                        dtypes: dict | None = None) -> "UnifiedModel":
        """A saved unified model: the split layout (`save_pretrained`), or the older single-file layout
        (model.safetensors with every expert's config inlined). dtypes: as in `UnifiedModel` (the experts' weights;
        fp32 where not given); dtype: cast the whole model after loading."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, load_model

        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
        cfg = UnifiedConfig.load(d)
        weights = d / WEIGHTS_NAME
        if weights.is_file():  # the single-file layout
            model = cls(cfg, attn_implementation=attn_implementation, dtypes=dtypes)
            try:
                load_model(model, str(weights), strict=True, device="cpu")
            except (RuntimeError, SafetensorError) as e:
                raise ValueError(f"{weights} does not match its config (wrong widths or a different model): "
                                 f"{str(e)[:800]}") from None
            return model.to(device=device, dtype=dtype).eval()
        if not (d / CONNECTOR_NAME).is_file():
            raise FileNotFoundError(f"{str(directory)!r} has a config but neither {WEIGHTS_NAME} nor {CONNECTOR_NAME}")
        local = {k: str(d / v) if v is not None and not Path(v).is_absolute() else v
                 for k, v in (("lm_path", cfg.lm_path), ("dit_path", cfg.dit_path), ("vae_path", cfg.vae_path))}
        with _quiet_progress():
            model = cls(cfg.replace(**local), attn_implementation=attn_implementation, dtypes=dtypes)
        state = load_file(str(d / CONNECTOR_NAME))
        try:
            model.connector.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{d / CONNECTOR_NAME} does not match the config's connector: {str(e)[:800]}") from None
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_experts(cls, lm_path, dit_path, vae_path=None, *, num_queries: int = 64, connector_dim: int = 1024,
                     connector_layers: int = 2, connector_heads: int | None = None, image_size: int | None = None,
                     edit: bool = False, attn_implementation: str = "sdpa", dtypes: dict | None = None,
                     variants: dict | None = None) -> "UnifiedModel":
        """A unified model from your experts' own directories: a transformers LM (its tokenizer beside it), a
        diffusers DiT (`_class_name` SanaTransformer2DModel or SD3Transformer2DModel) and optionally its diffusers
        autoencoder (AutoencoderKL / AutoencoderDC; none: the DiT works in pixels). The queries and the connector
        are new (random init): train them (any scenario that trains the DiT does). image_size defaults to the DiT's
        sample_size times the autoencoder's down-sampling factor. dtypes / variants: as in `UnifiedModel`."""
        cfg = cls.experts_config(lm_path, dit_path, vae_path, num_queries=num_queries, connector_dim=connector_dim,
                                 connector_layers=connector_layers, connector_heads=connector_heads,
                                 image_size=image_size, edit=edit)
        return cls(cfg, attn_implementation=attn_implementation, dtypes=dtypes, variants=variants)

    @staticmethod
    def experts_config(lm_path, dit_path, vae_path=None, *, num_queries: int = 64, connector_dim: int = 1024,
                       connector_layers: int = 2, connector_heads: int | None = None, image_size: int | None = None,
                       edit: bool = False) -> UnifiedConfig:
        """The UnifiedConfig `from_experts` builds (the directories' config files read, no weights)."""
        from .dirs import DIT_KINDS, VAE_KINDS

        dit_type = _class_kind(dit_path, DIT_KINDS, "DiT")
        vae_type = None if vae_path is None else _class_kind(vae_path, VAE_KINDS, "autoencoder")
        if image_size is None:
            dit_conf = json.loads((Path(dit_path) / "config.json").read_text())
            factor = 1
            if vae_path is not None:
                vc = json.loads((Path(vae_path) / "config.json").read_text())
                blocks = vc["block_out_channels"] if vae_type == "kl" else vc["encoder_block_out_channels"]
                factor = 2 ** (len(blocks) - 1)
            image_size = int(dit_conf["sample_size"]) * factor
        heads = connector_heads or max(1, connector_dim // 64)
        return UnifiedConfig(lm_path=str(lm_path), dit_type=dit_type, dit_path=str(dit_path), vae_type=vae_type,
                            vae_path=None if vae_path is None else str(vae_path), image_size=image_size,
                            num_queries=num_queries, connector_dim=connector_dim, connector_layers=connector_layers,
                            connector_heads=heads, edit=edit, tokenizer="lm")

    # geometry -------------------------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.config.image_size // self.vae_factor
        return (self.latent_channels, side, side)

    @property
    def device(self) -> torch.device:
        return self.connector.queries.device

    @property
    def dtype(self) -> torch.dtype:
        return self.connector.queries.dtype

    # LM side --------------------------------------------------------------------------------------------------
    def query_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     images=None) -> torch.Tensor:
        """Left-padded prompts [B, L] (L may be 0) -> the queries' last LM hidden states [B, N, H_lm].

        The N queries go after the prompt; positions count only attended tokens, so left padding does not shift
        the queries' positions. Differentiable in the LM parameters and the queries.
        images: for a vision-language LM (`models.vlm`), one image per row that the LM sees through its vision tower:
        a `VisionInputs`, or images [B, 3, H, W] in [-1, 1]; the ids must then hold each row's image tokens (build
        them with `models.vlm.encode_prompts`). Positions are then the model's M-RoPE ones.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, L)}")
        emb = self.lm.get_input_embeddings()
        q = self.connector.queries.to(emb.weight.dtype).unsqueeze(0).expand(B, -1, -1)
        if images is not None:
            from . import vlm

            vision = vlm.as_vision(self.lm, images)
            return vlm.hidden_states(self.lm, input_ids, attention_mask, vision, extra_embeds=q)[:, L:]
        embeds = torch.cat([emb(input_ids), q], 1)
        mask = torch.cat([attention_mask.long(), attention_mask.new_ones(B, self.config.num_queries).long()], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm.base_model(inputs_embeds=embeds, attention_mask=full_sequence_mask(self.lm, mask),
                                 position_ids=pos, use_cache=False)
        return out.last_hidden_state[:, L:]

    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  images=None) -> Conditioning:
        """Left-padded prompts [B, L] (L may be 0: the unconditional branch) -> Conditioning: `query_hidden`
        through the connector (with `images` the LM sees, for a vision-language LM). Differentiable in the LM and
        connector parameters."""
        hidden = self.query_hidden(input_ids, attention_mask, images)
        cond, pooled = self.connector(hidden.to(self.connector.proj_in.weight.dtype))
        return Conditioning(cond, pooled)

    def null_condition(self, batch_size: int) -> Conditioning:
        """The unconditional branch for CFG: an empty prompt (only the queries)."""
        ids = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        return self.condition(ids, torch.zeros_like(ids))

    # DiT side -------------------------------------------------------------------------------------------------
    def velocity(self, latents: torch.Tensor, sigma, conditioning: Conditioning,
                 source_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching velocity v [B, C, h, w] (DiT dtype) at noise level sigma (float or [B]).

        The DiT sees timestep = 1000 sigma (the diffusers flow-matching convention of SANA and SD3)."""
        B = latents.shape[0]
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [B, "
                             f"{', '.join(map(str, self.latent_shape))}]")
        if conditioning.cond.shape[0] != B:
            raise ValueError(f"conditioning batch {conditioning.cond.shape[0]} != latents batch {B}")
        x = latents
        if self.config.edit:
            if source_latents is None:
                raise ValueError("this model was built with edit=True: pass source_latents (encode_images(source))")
            if source_latents.shape != latents.shape:
                raise ValueError(f"source_latents shape {tuple(source_latents.shape)} != latents "
                                 f"{tuple(latents.shape)}")
            x = torch.cat([latents, source_latents.to(latents.dtype)], 1)
        elif source_latents is not None:
            raise ValueError("source_latents given but the model was built with edit=False")
        dtype = self.dit.dtype
        t = (torch.as_tensor(sigma, dtype=torch.float32, device=latents.device) * 1000.0).expand(B).to(dtype)
        cond = conditioning.cond.to(dtype)
        if self.config.dit_type == "sd3":
            out = self.dit(x.to(dtype), encoder_hidden_states=cond, pooled_projections=conditioning.pooled.to(dtype),
                           timestep=t, return_dict=False)[0]
        else:
            out = self.dit(x.to(dtype), encoder_hidden_states=cond, timestep=t, return_dict=False)[0]
        return out

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, C, h, w] (deterministic: the encoder mean)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.config.image_size \
                or images.shape[-2] != self.config.image_size:
            raise ValueError(f"images have shape {tuple(images.shape)}; expected [B, 3, {self.config.image_size}, "
                             f"{self.config.image_size}]")
        if self.vae is None:
            return images.to(self.dtype)
        c = self.vae.config
        x = images.to(self.vae.dtype)
        if self.config.vae_type == "kl":
            z = self.vae.encode(x).latent_dist.mean
            return ((z - (c.shift_factor or 0.0)) * c.scaling_factor).float()
        return (self.vae.encode(x).latent * c.scaling_factor).float()  # fp32 latents whatever the VAE's dtype

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W], clamped to [-1, 1]."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        c = self.vae.config
        z = latents.to(self.vae.dtype) / c.scaling_factor
        if self.config.vae_type == "kl":
            z = z + (c.shift_factor or 0.0)
        return self.vae.decode(z).sample.clamp(-1, 1).float()

    def forward(self, input_ids, attention_mask, latents, sigma, source_images=None):
        """Whole path: prompts -> conditioning -> velocity at (latents, sigma). Returns v [B, C, h, w]."""
        src = self.encode_images(source_images) if source_images is not None else None
        return self.velocity(latents, sigma, self.condition(input_ids, attention_mask), src)
