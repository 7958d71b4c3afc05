"""Batched text rollout with a static KV cache, for RL (log-probs of the sampling distribution and masks).

Per decode step t, for each of B sequences (left-padded prompts, so they all end at column P):

    z     = logits / T                              fp32; T = 0 means greedy (argmax; logp of softmax(logits))
    z     = top-k filter (keep the k largest), then top-p filter (keep the smallest prefix of the sorted
            distribution whose mass reaches p; the top token always stays)   -> filtered entries are -inf
    logp  = log_softmax(z);  y ~ Categorical(exp(logp))   (exponential race: argmax p / E, E ~ Exp(1))
    record y and logp[y]: the log-prob of the distribution that actually sampled y, which is what truncated
    importance sampling (TIS) needs to correct the rollout/trainer mismatch.

The KV cache is a transformers `StaticCache`, one per batch size the engine sees (a trainer's rollout batch and its
evaluation micro-batch), allocated once and reused by every later call; it grows (one new allocation) only when a
call needs more than P + max_new_tokens columns than it holds, and a shorter call uses it with the extra columns
masked. So the decode step has static shapes: on CUDA it is wrapped in `torch.compile(fullgraph=True,
mode="reduce-overhead")` (one graph, CUDA graphs) by default; on a CPU it runs eager (tests/test_compiled_steps.py
traces it with fullgraph under inductor on a CPU). An LM with FP8Linear layers decodes eager (their weight cache
reads storage pointers, which a graph cannot). Attention is PyTorch SDPA (or flash-attn 2 when the LM was built
with it). Positions count only attended tokens, so left padding does not shift them.

Stopping: a sequence is done after it emits an EOS id (the EOS token is kept in the completion and its mask) or
when its decoded completion contains a stop string (the completion is cut after the token that completes the
stop string). Done rows keep being fed a pad token (static shapes) but their outputs are masked: mask = 0,
token = pad, logp = 0; the attention mask is 0 at that pad's position (padding for attention and for
`profiling.counters`, which counts the tokens fed: prompt + completion - 1 per row). Finished batches and stop
strings are checked every `check_every` steps; the finished-batch flag reaches the host through a pinned copy and a
CUDA event that is never waited for (the loop stops a few steps later at most), so decoding never syncs; stop
strings, when given, are read on the host at those checks (one sync each).

Vision-language LMs (Qwen2-VL class, `models.vlm`): `generate(..., vision=VisionInputs)` prefills once from the
prompt embeddings with the image features scattered in and the model's M-RoPE positions (`get_rope_index`, padding
masked), then decodes text at n_valid + rope_delta (+ t) on all three position rows, with the same static cache,
sampler and stopping as text prompts. Extending this engine (rather than calling transformers' `generate` and scoring
the completions afterwards) keeps one sampler for both kinds of LM: the recorded log-probs are those of the
distribution that drew each token (what TIS needs), top-k / top-p / stop strings behave the same, and a VLM rollout
costs no extra scoring forward.

Memory: the cache holds 2 * layers * B * (P + T) * kv_heads * head_dim elements; the per-step logits [B, V] fp32.
Limits: no speculative decoding, no paged attention, one prompt length per batch (left padding).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .. import _checks as C
from .. import _stop
from ..fp8.linear import has_fp8_layers, with_fp8_weight_cache
from ..models.experts import full_sequence_mask, sdpa_or_flash
from ..ops import fused_linear_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_strings: tuple = ()
    eos_token_ids: tuple | None = None
    check_every: int = 16

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        C.check_finite_scalar("temperature", self.temperature, nonneg=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be a tuple of non-empty strings, got {self.stop_strings!r}")
        if self.check_every <= 0:
            raise ValueError(f"check_every must be positive, got {self.check_every!r}")


@dataclass
class TextRolloutOutput:
    """prompt_ids/prompt_mask [B, P] (left-padded), completion_ids [B, T] (pad after the end), logprobs [B, T]
    fp32 (0 where masked), completion_mask [B, T] bool, texts (decoded completions, when a tokenizer was given),
    vision (the prompts' images, `models.vlm.VisionInputs`, for a vision-language LM; else None)."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    logprobs: torch.Tensor
    completion_mask: torch.Tensor
    texts: list | None = None
    vision: object = None


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> log-probs [B, V] fp32 of the processed sampling distribution (-inf where filtered)."""
    z = logits.float()
    if temperature > 0:
        z = z / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, idx = torch.sort(z, dim=-1, descending=True)
        p = torch.softmax(sorted_z, -1)
        drop = (p.cumsum(-1) - p) >= top_p
        drop[..., 0] = False
        z = z.scatter(-1, idx, sorted_z.masked_fill(drop, float("-inf")))
    return torch.log_softmax(z, -1)


def sample_from_logprobs(logp: torch.Tensor, greedy: bool, generator=None) -> torch.Tensor:
    """Token ids [B] from log-probs [B, V]: argmax when greedy, else the exponential race (exact sampling)."""
    if greedy:
        return logp.argmax(-1)
    e = torch.empty_like(logp).exponential_(generator=generator)
    return (logp.exp() / e).argmax(-1)


def _store_in_cache_dtypes(layer) -> None:
    """Under bf16 autocast over fp32 weights the keys leave the rotary embedding in fp32 and the values leave their
    projection in bf16; transformers before ~5.24 allocate a static cache layer's values in the keys' dtype and then
    refuse the bf16 values (index_copy_ dtype mismatch). Each update is cast to the dtypes the layer allocated (bf16 ->
    fp32 is exact; attention casts to bf16 again under autocast); a no-op where they already match."""
    if not all(hasattr(layer, a) for a in ("lazy_initialization", "is_initialized", "update")):
        return
    update = layer.update

    def cast_update(key_states, value_states, *args, **kwargs):
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        return update(key_states.to(layer.keys.dtype), value_states.to(layer.values.dtype), *args, **kwargs)

    layer.update = cast_update


def _set_attention(lm, attn_implementation):
    if attn_implementation is None:
        return
    if attn_implementation == "auto":
        p = next(lm.parameters())
        if not (p.is_cuda and p.dtype in (torch.float16, torch.bfloat16)) or sdpa_or_flash() != "flash_attention_2":
            return
        attn_implementation = "flash_attention_2"
    lm.set_attn_implementation(attn_implementation)


def _eos_ids(lm, params):
    if params.eos_token_ids is not None:
        return tuple(int(i) for i in params.eos_token_ids)
    return _lm_eos_ids(lm)


def _lm_eos_ids(lm) -> tuple:
    """The LM's EOS ids: its generation config's (an int or a list), else its (text) config's."""
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(lm.config.get_text_config(), "eos_token_id", None)  # a VLM keeps it in its text config
    if eos is None:
        return ()
    return tuple(int(i) for i in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def stop_token_ids(tokenizer, lm) -> tuple:
    """Every id that ends a completion: the tokenizer's EOS and each EOS id of the LM's generation config (an
    instruct release ends its turns with <|im_end|> while its tokenizer's EOS may be <|endoftext|>, or the reverse)."""
    return tuple(dict.fromkeys((int(tokenizer.eos_token_id), *_lm_eos_ids(lm))))


class TextEngine:
    """Rollout engine around a transformers causal LM (e.g. `UnifiedModel.lm`).

    Args:
        lm: the causal LM; its weights are used in place (no copy). pad_token_id: fed to finished rows and written
        after the end of completions (default: lm.config.pad_token_id, else 0). compile: wrap the decode forward
        in torch.compile(fullgraph=True; mode="reduce-overhead" on CUDA); None = on when the LM is on CUDA and has
        no FP8Linear layer (True with one is an error). Keep one engine for many calls (a trainer keeps one per
        run): the compiled step and the caches belong to it. tokenizer: for stop strings
        and decoded texts (anything with `decode`). attn_implementation: "auto" switches the LM (in place, so
        the trainer's forward uses it too) to flash_attention_2 when flash-attn is installed and the LM is on CUDA
        in fp16/bf16, and otherwise leaves it as built (SDPA for `UnifiedModel`); None never changes it.
        prompt_bucket: prompts are left-padded (internally) to a multiple of this many columns so that batches
        of different prompt lengths reuse one compiled graph and one cache (a compiled step specialises on
        shapes); None = 64 when compiling, else 1. The returned prompt_ids are the caller's, unpadded.
    Example:
        >>> eng = TextEngine(model.lm, tokenizer=model.tokenizer)
        >>> out = eng.generate(ids, mask, SamplingParams(max_new_tokens=32, temperature=1.0))
    """

    def __init__(self, lm, *, pad_token_id: int | None = None, compile: bool | None = None, tokenizer=None,
                 attn_implementation: str | None = "auto", prompt_bucket: int | None = None):
        self.lm = lm
        _set_attention(lm, attn_implementation)
        self.tokenizer = tokenizer
        pad = pad_token_id if pad_token_id is not None else getattr(lm.config, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        device = next(lm.parameters()).device
        fp8 = has_fp8_layers(lm)
        if compile and fp8:
            raise ValueError("compile=True: this LM has FP8Linear layers, whose weight cache a compiled graph cannot "
                             "hold; use compile=None (eager decode for FP8 LMs) or compile=False")
        self.compile = (device.type == "cuda" and not fp8) if compile is None else bool(compile)
        bucket = (64 if self.compile else 1) if prompt_bucket is None else prompt_bucket
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket <= 0:
            raise ValueError(f"prompt_bucket must be a positive int, got {prompt_bucket!r}")
        self.prompt_bucket = bucket
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` warns, then goes away)
        self._cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self._caches = {}  # (batch, device, dtype) -> (StaticCache, its length)
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs where there is a GPU
        self._decode = torch.compile(self._forward, fullgraph=True, dynamic=False, mode=mode) if self.compile \
            else self._forward

    def _forward(self, ids, pos, cache_pos, mask, cache):
        out = self.lm(input_ids=ids, position_ids=pos, attention_mask=mask, **{self._cache_arg: cache},
                      cache_position=cache_pos, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _prefill_with_images(self, ids, mask, vision, cache):
        """A VLM's prefill: image features in the embeddings, M-RoPE positions. Returns (logits [B, V] fp32, the
        first decode position [3, B, 1])."""
        from ..models import vlm

        vlm._require_vlm(self.lm, "a rollout with images")
        embeds = vlm.embed_with_images(self.lm, ids, vision)
        pos, delta = vlm.rope_positions(self.lm, ids, mask[:, :ids.shape[1]], vision)
        out = self.lm(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, **{self._cache_arg: cache},
                      cache_position=torch.arange(ids.shape[1], device=ids.device), use_cache=True, logits_to_keep=1)
        next_pos = mask[:, :ids.shape[1]].sum(-1, keepdim=True) + delta.to(ids.device)
        return out.logits[:, -1].float(), next_pos.unsqueeze(0).expand(3, -1, -1).contiguous()

    def _static_cache(self, B, needed, device, dtype):
        """(the cache for batch size B, its length >= needed): reused (reset) when it is long enough, else replaced
        by one of length `needed` (a longer request grows it; a shorter one masks the extra columns)."""
        from transformers import StaticCache

        key = (B, device, dtype)
        cache, length = self._caches.get(key, (None, 0))
        if cache is not None and length >= needed:
            cache.reset()
        else:
            cache, length = StaticCache(config=self.lm.config, max_cache_len=needed), needed
            for layer in getattr(cache, "layers", ()):
                _store_in_cache_dtypes(layer)
            self._caches[key] = (cache, length)
        return cache, length

    def _check_inputs(self, input_ids, attention_mask):
        C.check_tensor("input_ids", input_ids, ndim=2, integer=True)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        C.check_tensor("attention_mask", attention_mask, ndim=2)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("prompts must have at least one token")
        if C.value_checks_enabled():
            C.flag(~attention_mask[:, -1].bool(), lambda i: f"prompts must be left-padded: attention_mask[:, -1] "
                                                            f"must be 1 for every row (row {i[0]} is 0)")
        return attention_mask.long()

    @torch.no_grad()
    @with_fp8_weight_cache("lm")  # one FP8 weight quantization per layer per call
    def generate(self, input_ids, attention_mask=None, params: SamplingParams = SamplingParams(), *,
                 generator=None, vision=None) -> TextRolloutOutput:
        """input_ids / attention_mask [B, P] left-padded -> TextRolloutOutput (see the class docstring).
        vision: the prompts' images (`models.vlm.VisionInputs`, one per row) for a vision-language LM; the ids
        then hold their image tokens (`models.vlm.encode_prompts`)."""
        orig_ids, mask = input_ids, self._check_inputs(input_ids, attention_mask)
        orig_mask = mask
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: TextEngine(lm, tokenizer=...)")
        extra = -input_ids.shape[1] % self.prompt_bucket
        if extra:
            input_ids = torch.nn.functional.pad(input_ids, (extra, 0), value=self.pad_token_id)
            mask = torch.nn.functional.pad(mask, (extra, 0), value=0)
        B, P = input_ids.shape
        T, dev = params.max_new_tokens, input_ids.device
        greedy = params.temperature == 0
        eos = torch.tensor(_eos_ids(self.lm, params), dtype=torch.long, device=dev)
        cache, L = self._static_cache(B, P + T, dev, self.lm.dtype)
        full_mask = torch.cat([mask, mask.new_ones(B, T), mask.new_zeros(B, L - P - T)], 1)
        if vision is None:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self._forward(input_ids, pos, torch.arange(P, device=dev), full_mask, cache)
            next_pos = pos[:, -1:] + 1
        else:
            logits, next_pos = self._prefill_with_images(input_ids, full_mask, vision, cache)
        cache_positions = torch.arange(P, P + T, device=dev)  # built once: no host-to-device copy per step
        tokens = torch.full((B, T), self.pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros(B, T, dtype=torch.float32, device=dev)
        valid = torch.zeros(B, T, dtype=torch.bool, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        all_done = _AllDone(dev)
        for t in range(T):
            _stop.check()  # another thread's failure (a reward chunk) stops the decode here
            logp = sampling_logprobs(logits, 1.0 if greedy else params.temperature, params.top_k, params.top_p)
            y = sample_from_logprobs(logp, greedy, generator)
            live = ~done
            tokens[:, t] = torch.where(live, y, self.pad_token_id)
            logprobs[:, t] = torch.where(live, logp.gather(-1, y[:, None])[:, 0], 0.0)
            valid[:, t] = live
            done = done | torch.isin(y, eos)
            if (t + 1) % params.check_every == 0:
                done = self._apply_stop_strings(params, tokens, logprobs, valid, done, t + 1)
                all_done.post(done)
            if t == T - 1 or all_done.seen():
                break
            feed = torch.where(done, self.pad_token_id, y)[:, None]
            full_mask[:, P + t] = (~done).long()  # the pad fed to a finished row is padding, not a token
            with C.paused_in_loop():  # no check work per layer call; the prefill was checked, the outputs are below
                logits = self._decode(feed, next_pos, cache_positions[t:t + 1], full_mask, cache)
            next_pos = next_pos + 1
        if T % params.check_every:  # the last step's stop strings (a multiple of check_every was cut above)
            done = self._apply_stop_strings(params, tokens, logprobs, valid, done, T)
        C.check_finite("the sampled tokens' log-probs (a decode step produced NaN/inf logits; set_checks('full') "
                       "checks every layer call)", logprobs, where=valid)
        texts = None if self.tokenizer is None else [  # one read of the ids and one of the mask for every row
            self.tokenizer.decode([i for i, k in zip(row, keep) if k]) for row, keep in zip(tokens.tolist(),
                                                                                          valid.tolist())]
        return TextRolloutOutput(orig_ids, orig_mask, tokens, logprobs, valid, texts, vision)

    def _apply_stop_strings(self, params, tokens, logprobs, valid, done, n):
        """Cut rows whose completion (first n tokens) contains a stop string; return the updated done flags."""
        if not params.stop_strings:
            return done
        for i in (~done).nonzero().flatten().tolist():
            row = tokens[i, :n].tolist()
            if not any(s in self.tokenizer.decode(row) for s in params.stop_strings):
                continue
            end = next(k for k in range(1, n + 1)
                       if any(s in self.tokenizer.decode(row[:k]) for s in params.stop_strings))
            tokens[i, end:] = self.pad_token_id
            logprobs[i, end:] = 0.0
            valid[i, end:] = False
            done[i] = True
        return done


class _AllDone:
    """Whether every row has finished, learned without a host sync: every `check_every` steps `done.all()` is copied
    to pinned host memory behind a CUDA event, and the loop stops at the first step where such a copy has arrived
    (`Event.query()`, never a wait) and says so. A step decoded after every row finished writes only padding (pad
    id, log-prob 0, mask 0), so the outputs equal an immediate stop's; on a CPU the copy is there at once."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.sent = []  # (host flag, event) oldest first

    def post(self, done):
        if self.cuda:
            host = C.mark_host_resident(torch.empty((), dtype=torch.bool, pin_memory=True))
            host.copy_(done.all(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.sent.append((host, event))
        else:
            self.sent.append((C.mark_host_resident(done.all()), None))

    def seen(self) -> bool:
        while self.sent and (self.sent[0][1] is None or self.sent[0][1].query()):
            if self.sent.pop(0)[0].item():
                return True
        return False


def recompute_logprobs(lm, out: TextRolloutOutput, *, temperature: float = 1.0, impl: str = "auto"):
    """Trainer-side log-probs [B, T] fp32 of a rollout's completions under `lm` (0 where masked), computed
    from the final hidden states with `fused_linear_logprobs` (logits never materialised on the Triton path).
    A rollout with images (out.vision) is scored with them (`models.vlm.hidden_states`)."""
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask.long(), out.completion_mask.long()], 1)
    if out.vision is not None:
        from ..models import vlm

        hidden = vlm.hidden_states(lm, ids, mask, out.vision, prompt_length=out.prompt_ids.shape[1])
    else:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = lm.base_model(input_ids=ids, attention_mask=full_sequence_mask(lm, mask), position_ids=pos,
                               use_cache=False).last_hidden_state
    P = out.prompt_ids.shape[1]
    h = hidden[:, P - 1:-1]
    targets = out.completion_ids.masked_fill(~out.completion_mask, -100)
    head = lm.get_output_embeddings()
    logp, _ = fused_linear_logprobs(h, head.weight, targets, bias=head.bias, temperature=temperature, impl=impl)
    return logp
