"""Expert directories checked before anything is built: every way a directory can be wrong fails here, in one line
naming the flag, the directory and what is wrong (the trainer's preflight runs this before the run directory exists,
so a bad directory costs seconds and leaves nothing behind).

LM (`--lm-path`): a transformers config (not a diffusers one, not a pipeline root) that transformers can read; weight
files (`experts.resolve_variant`: default names, or the one variant there is, or the one asked for); a usable
tokenizer: it loads, its vocabulary is not tiny and a probe sentence encodes to known tokens (transformers 5 quietly
builds an empty tokenizer from a directory without tokenizer files), it has an EOS, and its ids fit the LM's
embeddings; a vision-language LM (Qwen2-VL class) also its image processor (preprocessor_config.json).
DiT (`--dit-path`) and autoencoder (`--vae-path`): a diffusers config naming a supported class (an LM or a pipeline
root is named as such), weight files; the autoencoder's latent channels match the DiT's input and output channels
(an edit DiT reads twice as many: the noisy and the source latents; no autoencoder means 3 pixel channels).
"""
from __future__ import annotations

import json
from pathlib import Path

from .experts import DIT_CLASSES, VAE_CLASSES, resolve_variant
from .vlm import VLM_MODEL_TYPES

DIT_KINDS = {v: k for k, v in DIT_CLASSES.items()}  # diffusers class name -> our dit_type
VAE_KINDS = {v: k for k, v in VAE_CLASSES.items()}
MIN_VOCAB = 32  # fewer tokens than this is no tokenizer for a real LM (an empty one has 0 or 1)
PROBE = "Draw two red squares on the left."


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def read_config(path, flag: str) -> dict:
    """config.json of a model directory; a pipeline root (model_index.json) is named as such."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{flag} {str(path)!r} does not exist (only local directories are read; nothing is "
                         "downloaded)")
    conf = p / "config.json"
    if not conf.is_file():
        index = p / "model_index.json"
        if index.is_file():
            parts = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list)]
            raise ValueError(f"{flag} {str(path)!r} is a diffusers pipeline ({', '.join(parts)}), not one model: give "
                             f"its transformer folder as --dit-path and its vae folder as --vae-path")
        raise ValueError(f"{flag} {str(path)!r} is not a model directory (no config.json)")
    try:
        return json.loads(conf.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {str(path)!r}: config.json is not valid JSON ({e})") from None


def diffusers_kind(path, flag: str, kinds: dict, what: str, variant: str | None = None) -> tuple[str, dict]:
    """(our name for the class, config) of a diffusers model directory holding one of `kinds`, with weights."""
    c = read_config(path, flag)
    name = c.get("_class_name")
    supported = ", ".join(kinds)
    if name is None:
        held = (c.get("architectures") or [None])[0] or c.get("model_type")
        if held:
            raise ValueError(f"{flag} {str(path)!r} holds a transformers model ({held}), not a diffusers {what} "
                             f"({supported})")
        raise ValueError(f"{flag} {str(path)!r}: config.json names no diffusers class (_class_name); supported "
                         f"{what} classes: {supported}")
    if name not in kinds:
        raise ValueError(f"{flag} {str(path)!r} holds a {name}; supported {what} classes: {supported}")
    resolve_variant(path, variant, f"{flag}: {what}")
    return kinds[name], c


def check_tokenizer(path, flag: str, vocab_size: int):
    """The LM directory's Hugging Face tokenizer, checked to be a real one; returns it."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # any library error: one line naming the directory
        raise ValueError(f"{flag} {str(path)!r}: its tokenizer does not load ({_first_line(e)})") from None
    ids = tok.encode(PROBE, add_special_tokens=False)
    known = [i for i in ids if i != tok.unk_token_id]
    if len(tok) < MIN_VOCAB or not known:
        raise ValueError(f"{flag} {str(path)!r} has no usable tokenizer ({len(tok)} tokens in its vocabulary; "
                         f"{PROBE!r} encodes to {ids[:8]}): save the LM's tokenizer beside it "
                         "(tokenizer.save_pretrained(DIR))")
    if tok.eos_token_id is None:
        raise ValueError(f"{flag} {str(path)!r}: its tokenizer has no EOS token (completions could never end)")
    if len(tok) > vocab_size:
        raise ValueError(f"{flag} {str(path)!r}: its tokenizer has {len(tok)} tokens but the LM's vocabulary holds "
                         f"{vocab_size} (ids past it would index outside the embeddings)")
    return tok


def check_lm_dir(path, variant: str | None = None, flag: str = "lm_path") -> dict:
    """A transformers LM directory fit to train (see the module docstring); returns its config."""
    c = read_config(path, flag)
    if "_class_name" in c:
        raise ValueError(f"{flag} {str(path)!r} holds a diffusers {c['_class_name']}, not a transformers LM")
    if "model_type" not in c:
        raise ValueError(f"{flag} {str(path)!r}: config.json has no model_type (not a transformers model)")
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ValueError(f"{flag} {str(path)!r}: transformers cannot read its config ({_first_line(e)})") from None
    resolve_variant(path, variant, f"{flag}: LM")
    check_tokenizer(path, flag, hf.get_text_config().vocab_size)
    if c["model_type"] in VLM_MODEL_TYPES:
        if not (Path(path) / "preprocessor_config.json").is_file():
            raise ValueError(f"{flag} {str(path)!r} is a vision-language LM ({c['model_type']}) without its image "
                             "processor (no preprocessor_config.json): copy it from the release")
        from transformers import Qwen2VLImageProcessorPil

        try:
            Qwen2VLImageProcessorPil.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise ValueError(f"{flag} {str(path)!r}: its image processor does not load ({_first_line(e)})") from None
    return c


def check_expert_dirs(lm_path, dit_path, vae_path=None, *, edit: bool = False, variants: dict | None = None) -> None:
    """Every check of the module docstring on --lm-path / --dit-path / --vae-path; ValueError (one line) on the first
    problem."""
    variants = variants or {}
    check_lm_dir(lm_path, variants.get("lm"))
    _, dc = diffusers_kind(dit_path, "dit_path", DIT_KINDS, "DiT", variants.get("dit"))
    channels, source = 3, "without --vae-path the DiT works in pixels (3 channels)"
    if vae_path is not None:
        _, vc = diffusers_kind(vae_path, "vae_path", VAE_KINDS, "autoencoder", variants.get("vae"))
        channels = int(vc["latent_channels"])
        source = f"the autoencoder in {str(vae_path)!r} has {channels} latent channels"
    want_in = 2 * channels if edit else channels
    out = dc.get("out_channels") or dc["in_channels"]
    if dc["in_channels"] != want_in or out != channels:
        edit_note = " (an edit DiT reads the noisy and the source latents: twice the channels in)" if edit else ""
        raise ValueError(f"dit_path {str(dit_path)!r} takes in_channels={dc['in_channels']} and gives "
                         f"out_channels={out}, but {source}: expected {want_in} in and {channels} out{edit_note}")
