"""A vision-language LM expert (Qwen2-VL / Qwen2.5-VL class): what the LM sees of an image, and its forward.

A VLM expert is a transformers `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (config
`model_type` "qwen2_vl" / "qwen2_5_vl"): a vision tower, a text decoder and an LM head. Everything the unified model
reads from an LM (hidden size, vocab, input embeddings, the head) is read through the text part.

How an image reaches the LM:

    images [B, 3, H, W] (or a list of [3, H_i, W_i]: a task's image keeps its aspect ratio, `Task.lm_image`) in [-1, 1]
    --uint8 HWC--> the model's own image processor (Qwen2VLImageProcessorPil: resize to a multiple of patch * merge
    within its min / max pixels, keeping the aspect ratio; CLIP mean / std, patchify)
    --> VisionInputs: pixel_values [sum_i t_i h_i w_i, 3 * T_p * P * P] fp32, image_grid_thw [B, 3] int64
    prompt "...<image>..." --> ids: text, <|vision_start|>, (t h w / merge^2) x <|image_pad|>, <|vision_end|>, text
    embeddings: the <|image_pad|> rows replaced (in order) by the vision tower's merged features
    positions: the model's own `get_rope_index` (M-RoPE: 3 position rows, image tokens laid out on a (t, h, w) grid,
    text after an image continues from max(h, w) / merge); padding excluded through the attention mask, so left
    and right padding both work. Decoding after a prompt goes on at n_valid + rope_delta (`rope_deltas`).

One image per row: every row of a batch that carries images has exactly one `IMAGE_MARK` in its text. The PIL
variant of the image processor is used because it needs no torchvision (the plain `Qwen2VLImageProcessor` of
transformers 5.x does), from transformers 5.5 on (5.4's PIL variant still requires it); under 5.5.0-5.5.3 the decode
at the rope deltas differs from a full forward by ~1e-3 (tests/test_vlm.py), so 5.5.4 is the oldest that works.
Images keep their size when it is a multiple of patch * merge (min_pixels = (patch * merge)^2), so the tiny world's
32 px scenes become 16 image tokens; an LM directory with a preprocessor_config.json (a released checkpoint) uses its
settings instead.

The tiny world's VLM (`tiny_vlm_lm`) extends the char tokenizer's vocabulary by four special tokens after its 100
ids: <|vision_start|> 100, <|vision_end|> 101, <|image_pad|> 102, <|video_pad|> 103 (the last only because the
config needs one). Their ids live in the LM's config (`image_token_id`, ...), which is where this module reads them,
so a Hugging Face tokenizer's ids work the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_MARK = "<image>"  # where a prompt's image goes; only scenarios built for a VLM write it
VLM_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# the char tokenizer's image special tokens (after its 100 ids), in the tiny VLM's config
CHAR_VISION_TOKENS = {"vision_start_token_id": 100, "vision_end_token_id": 101, "image_token_id": 102,
                      "video_token_id": 103}


def is_vlm(lm) -> bool:
    """True when the LM has a vision tower that this module drives (a Qwen2-VL class model)."""
    return getattr(lm.config, "model_type", None) in VLM_MODEL_TYPES


def text_config(lm):
    """The config of the LM's text part (the LM's own config for a text-only LM)."""
    return lm.config.get_text_config()


def config_dict_has_vision(lm: dict | None, lm_path: str | None) -> bool:
    """Whether an LM given as a config dict or a local directory (UnifiedConfig.lm / lm_path) is a VLM, without
    building it (the trainer's task checks run before any model exists)."""
    if lm is not None:
        return lm.get("model_type") in VLM_MODEL_TYPES
    cfg = Path(lm_path) / "config.json"
    if not cfg.is_file():
        return False
    return json.loads(cfg.read_text()).get("model_type") in VLM_MODEL_TYPES


def tiny_vlm_lm(text: dict) -> dict:
    """A Qwen2.5-VL config dict around a tiny Qwen2 text config (`text`: the `_qwen2` dict of a preset): the same
    decoder plus a 2-block vision tower (width 32, patch 4, merge 2, one 32-pixel window, full attention) whose merged
    features have the LM's width, and the char tokenizer's vocabulary with the four image special tokens."""
    heads = text["num_attention_heads"]
    half = text["hidden_size"] // heads // 2  # M-RoPE splits each head's rotary half into (t, h, w) sections
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    t = {k: v for k, v in text.items() if k not in ("model_type", "tie_word_embeddings")}
    t.update(vocab_size=max(CHAR_VISION_TOKENS.values()) + 1, rope_scaling={"type": "mrope", "mrope_section": section},
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_channels": 3,
              "out_hidden_size": text["hidden_size"], "patch_size": 4, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 32, "fullatt_block_indexes": [1]}
    return {"model_type": "qwen2_5_vl", "text_config": t, "vision_config": vision, **CHAR_VISION_TOKENS,
            "tie_word_embeddings": text.get("tie_word_embeddings", True)}


@dataclass
class VisionInputs:
    """One image per batch row, as the VLM's vision tower takes it: pixel_values [sum_i t_i h_i w_i, D] fp32 (the
    rows' patches in row order, D = 3 * temporal_patch * patch^2) and image_grid_thw [B, 3] int64 (patch grid)."""
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_grid_thw.shape[0])

    def select(self, rows) -> "VisionInputs":
        """The images of batch rows `rows` (a list or an index tensor), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
        n = self.image_grid_thw.prod(-1).cpu()
        start = torch.cat([n.new_zeros(1), n.cumsum(0)[:-1]])
        idx = torch.cat([torch.arange(int(start[r]), int(start[r] + n[r])) for r in rows.tolist()])
        return VisionInputs(self.pixel_values[idx.to(self.pixel_values.device)],
                            self.image_grid_thw[rows.to(self.image_grid_thw.device)])

    def to(self, device) -> "VisionInputs":
        return VisionInputs(self.pixel_values.to(device), self.image_grid_thw.to(device))


def _require_vlm(lm, what: str):
    if not is_vlm(lm):
        raise ValueError(f"{what} needs a vision-language LM (model_type one of {VLM_MODEL_TYPES}); this LM is "
                         f"{getattr(lm.config, 'model_type', type(lm).__name__)!r} and has no vision tower")


def image_processor(lm):
    """The LM's image processor (transformers' Qwen2-VL one, PIL backend): the settings of the LM directory's
    preprocessor_config.json when it has one (a released checkpoint's pixel bounds, mean and std), else the vision
    config's patch sizes with CLIP mean / std and min_pixels (patch * merge)^2."""
    _require_vlm(lm, "an image processor")
    cached = getattr(lm, "_unirl_image_processor", None)
    if cached is not None:
        return cached
    from transformers import Qwen2VLImageProcessorPil

    source = getattr(lm.config, "_name_or_path", "") or ""
    if source and (Path(source) / "preprocessor_config.json").is_file():
        proc = Qwen2VLImageProcessorPil.from_pretrained(source, local_files_only=True)
    else:
        v = lm.config.vision_config
        factor = v.patch_size * v.spatial_merge_size
        proc = Qwen2VLImageProcessorPil(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                        merge_size=v.spatial_merge_size, min_pixels=factor * factor,
                                        max_pixels=28 * 28 * 1280)
    lm._unirl_image_processor = proc
    return proc


def process_images(lm, images) -> VisionInputs:
    """images [B, 3, H, W] in [-1, 1], or a list of [3, H_i, W_i] (each at its own size and aspect ratio) ->
    VisionInputs on the images' device (through the LM's image processor, which fits each image to its patch grid
    within its min / max pixel bounds, keeping the aspect ratio)."""
    _require_vlm(lm, "images for the LM")
    ok = isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3
    ok = ok or (isinstance(images, (list, tuple)) and len(images) > 0 and all(
        isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[0] == 3 for x in images))
    if not ok:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor or a list of [3, H, W] tensors in [-1, 1], got {shape}")
    u8 = [((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8) for x in images]
    out = image_processor(lm)(images=[x.permute(1, 2, 0).numpy() for x in u8], return_tensors="pt")
    return VisionInputs(out["pixel_values"].float(), out["image_grid_thw"].long()).to(images[0].device)


def as_vision(lm, images) -> VisionInputs | None:
    """None, VisionInputs (as they are) or an image tensor [B, 3, H, W] (processed) -> VisionInputs or None."""
    if images is None or isinstance(images, VisionInputs):
        if images is not None:
            _require_vlm(lm, "images for the LM")
        return images
    return process_images(lm, images)


def tokens_per_image(lm, vision: VisionInputs) -> list:
    """How many <|image_pad|> tokens each image takes in a prompt: t h w / merge^2."""
    merge = lm.config.vision_config.spatial_merge_size
    return (vision.image_grid_thw.prod(-1) // (merge * merge)).tolist()


def encode_prompts(tok, lm, texts, vision: VisionInputs | None, *, add_bos: bool = True, device=None):
    """Prompts (each with at most one IMAGE_MARK; with `vision`, exactly one, row i showing image i) -> left-padded
    ids [B, L] and attention mask [B, L] int64, the mark expanded to vision_start, image pads, vision_end."""
    if isinstance(texts, str):
        texts = [texts]
    counts = [None] * len(texts) if vision is None else tokens_per_image(lm, vision)
    if vision is not None and len(vision) != len(texts):
        raise ValueError(f"{len(texts)} prompts but {len(vision)} images: one image per prompt")
    rows = []
    for i, (text, n) in enumerate(zip(texts, counts)):
        parts = text.split(IMAGE_MARK)
        if n is None:
            if len(parts) != 1:
                raise ValueError(f"prompt {i} {text!r} has an {IMAGE_MARK} mark but no image was given")
            rows.append(tok.encode(text, add_bos=add_bos))
            continue
        if len(parts) != 2:
            raise ValueError(f"prompt {i} {text!r} must hold exactly one {IMAGE_MARK} mark (one image per prompt), "
                             f"has {len(parts) - 1}")
        c = lm.config
        image = [c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id]
        rows.append(tok.encode(parts[0], add_bos=add_bos) + image + tok.encode(parts[1]))
    from .tokenizer import left_pad

    return left_pad(rows, tok.pad_token_id, device)


def image_features(lm, vision: VisionInputs) -> torch.Tensor:
    """The vision tower's merged features of every image, concatenated in row order: [sum_i t_i h_i w_i / m^2, H]."""
    out = lm.base_model.get_image_features(vision.pixel_values, vision.image_grid_thw)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats


def image_slots(lm, input_ids, prompt_length: int | None = None) -> torch.Tensor:
    """[B, L] bool: the <|image_pad|> tokens that stand for an image, those in the first `prompt_length` columns (a
    completion may sample the id; there it is only a text token, as it was when it was decoded)."""
    slots = input_ids == lm.config.image_token_id
    if prompt_length is not None:
        slots[:, prompt_length:] = False
    return slots


def rope_positions(lm, input_ids, attention_mask, vision: VisionInputs, prompt_length: int | None = None):
    """M-RoPE positions [3, B, L] and the decode deltas [B, 1] of ids that hold image tokens (the model's own
    get_rope_index; padding is skipped through the attention mask)."""
    mm_types = image_slots(lm, input_ids, prompt_length).int()
    return lm.base_model.get_rope_index(input_ids, mm_types, image_grid_thw=vision.image_grid_thw,
                                        attention_mask=attention_mask)


def embed_with_images(lm, input_ids, vision: VisionInputs, prompt_length: int | None = None) -> torch.Tensor:
    """Token embeddings [B, L, H] with the prompt's <|image_pad|> rows replaced by the images' features
    (differentiable in the vision tower and the embeddings)."""
    emb = lm.get_input_embeddings()(input_ids)
    slots = image_slots(lm, input_ids, prompt_length)
    want = tokens_per_image(lm, vision)
    have = slots.sum(-1).tolist()
    if have != want:
        raise ValueError(f"the prompts hold {have} image tokens per row but the images need {want} (build the ids "
                         "with unirl_fast.models.vlm.encode_prompts from the same images)")
    feats = image_features(lm, vision).to(emb.dtype)
    return emb.masked_scatter(slots.unsqueeze(-1), feats)


def hidden_states(lm, input_ids, attention_mask, vision: VisionInputs, *, extra_embeds=None,
                  prompt_length: int | None = None) -> torch.Tensor:
    """Last (final-normed) hidden states [B, L (+ N), H] of a VLM on ids that hold one image per row, optionally
    followed by N extra input embeddings per row (the unified model's query tokens, text positions after the
    prompt). prompt_length: image tokens after it are text (a sampled completion's). Differentiable in the LM
    (vision tower included) and in `extra_embeds`."""
    embeds = embed_with_images(lm, input_ids, vision, prompt_length)
    if prompt_length is None:
        prompt_length = input_ids.shape[1]
    ids, mask = input_ids, attention_mask
    if extra_embeds is not None:
        B, N = extra_embeds.shape[:2]
        embeds = torch.cat([embeds, extra_embeds.to(embeds.dtype)], 1)
        ids = torch.cat([ids, ids.new_zeros(B, N)], 1)  # any id that is not the image token: text positions
        mask = torch.cat([mask.long(), mask.new_ones(B, N).long()], 1)
    pos, _ = rope_positions(lm, ids, mask, vision, prompt_length)
    return lm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                         use_cache=False).last_hidden_state
