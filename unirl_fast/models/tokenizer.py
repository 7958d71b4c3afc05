"""A character-level tokenizer built in code, for the `tiny` presets and synthetic worlds (no downloads).

Ids: 0 = pad, 1 = bos, 2 = eos, 3 = unk, then one id per printable ASCII character (32..126) and newline.
Anything else maps to unk. `decode(encode(s)) == s` for printable ASCII text. Batches are left-padded
(what the rollout engine expects: every prompt ends at the same column).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


def left_pad(rows, pad_token_id: int, device=None):
    """Token id lists -> (input_ids [B, L] int64 left-padded with pad_token_id, attention_mask [B, L] int64)."""
    L = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = 1
    return ids.to(device), mask.to(device)


class _Batching:
    """What both tokenizers share: batch decoding and left-padded batch encoding over their own encode / decode."""

    def batch_decode(self, batch, *, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    def __call__(self, texts, *, add_bos: bool = True, device=None):
        """Left-padded batch -> (input_ids [B, L] int64, attention_mask [B, L] int64)."""
        if isinstance(texts, str):
            texts = [texts]
        return left_pad([self.encode(t, add_bos=add_bos) for t in texts], self.pad_token_id, device)


class CharTokenizer(_Batching):
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 3
    chat_template = None  # raw prompts: the tiny presets are trained on them

    def __init__(self):
        self._to_id = {c: i + len(_SPECIALS) for i, c in enumerate(_CHARS)}
        self._to_char = {i: c for c, i in self._to_id.items()}

    @property
    def vocab_size(self) -> int:
        return len(_SPECIALS) + len(_CHARS)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self._to_id.get(c, self.unk_token_id) for c in text]
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i in self._to_char:
                out.append(self._to_char[i])
            elif not skip_special_tokens:
                out.append(_SPECIALS[i] if 0 <= i < len(_SPECIALS) else _SPECIALS[self.unk_token_id])
        return "".join(out)



CHAT_CHOICES = ("auto", "none")  # or a path to a Jinja template (a .jinja / text file, or a JSON with "chat_template")


def read_chat_template(path) -> str:
    """A chat template from a file: a Jinja text file, or a JSON file holding {"chat_template": ...} (the layout of a
    processor's chat_template.json)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"chat template {str(path)!r} is not a file (give auto, none or a Jinja template file)")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"chat template {str(path)!r} is a .json file without a 'chat_template' string") from None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"chat template {str(path)!r} is empty")
    return text


def directory_chat_template(hf_tokenizer, directory) -> str | None:
    """The template a released LM directory carries: the tokenizer's own, else chat_template.jinja or the
    processor's chat_template.json beside it (Qwen2-VL class releases keep it there)."""
    if getattr(hf_tokenizer, "chat_template", None):
        return hf_tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        if (Path(directory) / name).is_file():
            return read_chat_template(Path(directory) / name)
    return None


class HFTokenizer(_Batching):
    """A Hugging Face tokenizer (from the LM's directory) behind the CharTokenizer interface the rollouts and the
    trainer use: left-padded batches, encode / decode, pad / bos / eos ids. A tokenizer without a pad token pads
    with its EOS token (masked out anyway); one without a BOS token gets none (`add_bos` is then a no-op, as for
    Qwen2's tokenizer).

    chat_template: the template prompts are rendered with (`chat`), None for raw text; chosen by
    `use_chat_template` ("auto": the directory's, "none", or a template file). What ends a completion is
    `rollout.text.stop_token_ids`: this EOS and every EOS id of the LM's generation config."""

    def __init__(self, directory, chat_template: str = "auto"):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.directory = str(directory)
        eos = self.hf.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer in {self.directory} has no EOS token: completions could never end")
        self.eos_token_id = int(eos)
        self.pad_token_id = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else eos)
        self.bos_token_id = None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)
        self.chat_template = None
        self.use_chat_template(chat_template)

    def use_chat_template(self, choice: str) -> "HFTokenizer":
        """choice: "auto" (the directory's template when it has one, else raw prompts), "none" (raw prompts), or a
        template file (kept on the tokenizer, so a saved copy carries it)."""
        if choice == "none":
            self.chat_template = None
        elif choice == "auto":
            self.chat_template = directory_chat_template(self.hf, self.directory)
        else:
            self.chat_template = read_chat_template(choice)
        if self.chat_template is not None:
            self.hf.chat_template = self.chat_template
        return self

    def chat(self, text: str) -> str:
        """`text` as the user's turn of a conversation, ending where the assistant's reply begins (the template
        writes BOS and the turn markers itself); `text` unchanged without a template."""
        if self.chat_template is None:
            return text
        return self.hf.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True, chat_template=self.chat_template)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.hf.encode(text, add_special_tokens=False)
        bos = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        return bos + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory) -> None:
        self.hf.save_pretrained(str(directory))
