"""CLIP-style image-text rewards from a local transformers checkpoint (a `CLIPModel` directory with its tokenizer).

    clip:DIR        CLIPScore (Hessel et al. 2021): 2.5 x max(cos(image, text), 0)
    pickscore:DIR   PickScore (Kirstain et al. 2023, a CLIP-H fine-tuned on human preferences): exp(logit_scale) x cos

The text is the task's prompt. Images go in as the checkpoint expects them: resized (bicubic) to the vision tower's
image_size and normalised with the directory's preprocessor_config.json mean / std (OpenAI CLIP's when it has none).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import RewardBatch, RewardError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
KINDS = ("clip", "pickscore")


class ClipReward:
    def __init__(self, path, kind: str = "clip", *, device=None, batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{kind}:{path}: not a transformers model directory (no config.json)")
        self.kind, self.batch_size = kind, batch_size
        self.device = torch.device(device or "cpu")
        self.model = CLIPModel.from_pretrained(str(path)).eval().requires_grad_(False).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        pre = path / "preprocessor_config.json"
        conf = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = torch.tensor(conf.get("image_mean", OPENAI_MEAN), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(conf.get("image_std", OPENAI_STD), device=self.device).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        self.max_len = int(self.model.config.text_config.max_position_embeddings)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> the vision tower's normalised input [B, 3, size, size]."""
        x = (images.float().to(self.device) + 1) / 2
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, b: RewardBatch) -> torch.Tensor:
        if b.images is None:
            raise RewardError(f"reward {self.kind!r} scores images; this scenario draws none")
        out = []
        for s in range(0, len(b), self.batch_size):
            rows = range(s, min(s + self.batch_size, len(b)))
            text = self.tokenizer([b.tasks[i].prompt for i in rows], padding=True, truncation=True,
                                  max_length=self.max_len, return_tensors="pt").to(self.device)
            o = self.model(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"),
                           pixel_values=self.pixels(b.images[s:s + len(rows)]))
            cos = (F.normalize(o.image_embeds.float(), dim=-1) * F.normalize(o.text_embeds.float(), dim=-1)).sum(-1)
            out.append(2.5 * cos.clamp(min=0) if self.kind == "clip" else self.model.logit_scale.exp().float() * cos)
        return torch.cat(out).cpu()
