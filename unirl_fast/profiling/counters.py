"""Compute counters: the experts' forward and backward passes, counted as they happen by hooks on their modules.

    counter = ComputeCounter().attach(trainer.model).attach(trainer.ref, role="reference")
    ... train ...
    with counter.section("eval"):
        ... evaluate ...                      # counted apart from training
    counter.totals("train")                   # Counts(dit_forward, dit_backward, lm_forward_tokens, ...)
    counter.detach()

What is counted (per section and per role):
    dit_forward         rows through the DiT: a call on latents [R, C, h, w] counts R (a CFG call on 2B rows
                        counts 2B; a replay of S steps on R rows, S x R)
    dit_backward        rows of a DiT call whose output received a gradient, once per backward pass that reached
                        it (a tensor hook on the output)
    lm_forward_tokens   non-padding tokens through the LM's text decoder: the ones of the 2-D attention mask over
                        the positions this call feeds (with a KV cache, `cache_position`'s columns: a decode step
                        counts one token per live row; a whole-sequence 4-D causal mask counts its last row's
                        attended tokens); B x L when there is no such mask
    lm_backward_tokens  the tokens of a decoder call whose output received a gradient
A text rollout thus counts prompt + completion - 1 tokens per row: the last sampled token is never fed back.

Where: a forward hook on `model.dit` and one on `model.lm.get_decoder()` (a causal LM's body, a VLM's language
model), so the counts do not depend on which code path called them (`UnifiedModel.velocity` / `condition`,
the rollout engines, the trainer's losses, the reference). The conditioning pass of the LM counts its prompt
tokens plus the N query tokens of each row.
Not counted: the connector, the autoencoder, a VLM's vision tower, the LM head, and recomputation under gradient
checkpointing (it happens inside the hooked module, which runs once per logical forward). "Forward-equivalents"
weigh a backward as 2 forwards (`Counts.dit_forward_equivalents`, `lm_token_equivalents`).

Cost: none when not attached (no hook exists). Attached: shape reads, and for the LM one sum of a mask slice
accumulated on the device (no host sync per call; `totals` reads the accumulators, one sync).
Copies: a hook counts only the module it was attached to, so a `copy.deepcopy` of an attached model (which copies
the hooks) counts nothing; attach the copy itself, e.g. the trainer's frozen reference with role="reference".
`watch()` turns a forward of an expert that is not attached into an error, so no copy goes uncounted unnoticed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from dataclasses import dataclass

import torch

FIELDS = ("dit_forward", "dit_backward", "lm_forward_tokens", "lm_backward_tokens")
ROLES = ("policy", "reference", "auxiliary")  # auxiliary: any other copy, e.g. an old policy kept as a module


@dataclass(frozen=True)
class Counts:
    dit_forward: int = 0
    dit_backward: int = 0
    lm_forward_tokens: int = 0
    lm_backward_tokens: int = 0

    @property
    def dit_forward_equivalents(self) -> int:
        """DiT forwards + 2 x DiT backwards."""
        return self.dit_forward + 2 * self.dit_backward

    @property
    def lm_token_equivalents(self) -> int:
        """LM forward tokens + 2 x LM backward tokens."""
        return self.lm_forward_tokens + 2 * self.lm_backward_tokens

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(getattr(self, f) + getattr(other, f) for f in FIELDS))

    def __sub__(self, other: "Counts") -> "Counts":
        return Counts(*(getattr(self, f) - getattr(other, f) for f in FIELDS))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "dit_forward_equivalents": self.dit_forward_equivalents,
                "lm_token_equivalents": self.lm_token_equivalents}


def _first_tensor(out):
    """The main output tensor of a DiT (tuple, `.sample`) or LM decoder (`.last_hidden_state`, tuple) call."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("last_hidden_state", "sample"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class ComputeCounter:
    """Counts DiT rows and LM tokens, forward and backward, of the models attached to it (see the module docstring).
    Counts go to the current section ("train" unless inside `section(name)`) and to the role given at `attach`."""

    def __init__(self):
        self._section = "train"
        self._host: dict = {}  # (section, role, field) -> int
        self._device: dict = {}  # (section, role, field) -> 0-dim tensor (mask sums, never synced per call)
        self._handles: list = []
        self._experts: dict = {}  # id(module) -> module: every attached DiT and LM decoder (for `watch`)
        self._lock = threading.Lock()  # hooks fire on any thread (a one-step-off rollout runs beside the losses)

    # attaching --------------------------------------------------------------------------------------------------
    def attach(self, model, role: str = "policy") -> "ComputeCounter":
        """Hook `model.dit` and `model.lm`'s text decoder (whichever the model has; a UnifiedModel has both)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        dit, lm = getattr(model, "dit", None), getattr(model, "lm", None)
        if dit is None and lm is None:
            raise TypeError(f"attach needs a model with a .dit or an .lm expert, got {type(model).__name__}")
        if dit is not None:
            self._handles.append(dit.register_forward_hook(self._dit_hook(dit, role), with_kwargs=True))
            self._experts[id(dit)] = dit
        if lm is not None:
            decoder = lm.get_decoder()
            hook = self._lm_hook(decoder, role, inspect.signature(decoder.forward))
            self._handles.append(decoder.register_forward_hook(hook, with_kwargs=True))
            self._experts[id(decoder)] = decoder
        return self

    @contextlib.contextmanager
    def watch(self):
        """Within the block, a forward of a module of an attached expert's class (the DiT's, the LM decoder's) that
        is not attached raises a RuntimeError: its compute would otherwise go uncounted (e.g. an old policy kept as a
        copy of the model). One global forward pre-hook for the block (a type check per module call)."""
        classes = {type(m) for m in self._experts.values()}

        def check(module, args):
            if type(module) in classes and self._experts.get(id(module)) is not module:
                raise RuntimeError(f"a {type(module).__name__} that the ComputeCounter is not attached to ran: its "
                                   "compute would go uncounted; attach its model (ComputeCounter.attach(model, "
                                   "role='auxiliary'))")
        handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
        try:
            yield self
        finally:
            handle.remove()

    def detach(self) -> None:
        """Remove every hook (the counts stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles, self._experts = [], {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    @contextlib.contextmanager
    def section(self, name: str):
        """Route the counts of the block (and of the backward passes of forwards made in it) to section `name`."""
        prev, self._section = self._section, name
        try:
            yield self
        finally:
            self._section = prev

    # reading ----------------------------------------------------------------------------------------------------
    def totals(self, section: str = "train", role: str | None = None) -> Counts:
        """The counts of a section, for one role or (None) all roles together."""
        roles = ROLES if role is None else (role,)
        vals = []
        for f in FIELDS:
            n = sum(self._host.get((section, r, f), 0) for r in roles)
            n += sum(int(self._device[(section, r, f)]) for r in roles if (section, r, f) in self._device)
            vals.append(n)
        return Counts(*vals)

    def sections(self) -> list:
        return sorted({k[0] for k in (*self._host, *self._device)})

    # hooks ------------------------------------------------------------------------------------------------------
    def _add(self, section, role, field, n):
        key = (section, role, field)
        if isinstance(n, torch.Tensor):
            n = n.detach().to(torch.int64)
            with self._lock:
                prev = self._device.get(key)
                self._device[key] = n if prev is None else prev + n
        else:
            with self._lock:
                self._host[key] = self._host.get(key, 0) + int(n)

    def _on_backward(self, out, section, role, field, n):
        """Count n once per backward pass whose gradient reaches `out`."""
        if isinstance(out, torch.Tensor) and out.requires_grad:
            def hook(grad):
                self._add(section, role, field, n)
            out.register_hook(hook)

    def _dit_hook(self, target, role):
        def hook(module, args, kwargs, output):
            if module is not target:  # a deepcopy of the attached module: not ours to count
                return
            x = args[0] if args else kwargs.get("hidden_states")
            rows = int(x.shape[0])
            section = self._section
            self._add(section, role, "dit_forward", rows)
            self._on_backward(_first_tensor(output), section, role, "dit_backward", rows)
        return hook

    def _lm_hook(self, target, role, signature):
        def hook(module, args, kwargs, output):
            if module is not target:
                return
            n = _lm_tokens({**kwargs, **signature.bind_partial(*args).arguments})
            section = self._section
            self._add(section, role, "lm_forward_tokens", n)
            self._on_backward(_first_tensor(output), section, role, "lm_backward_tokens", n)
        return hook


def _lm_tokens(a: dict):
    """Non-padding tokens fed by one decoder call (an int, or a 0-dim tensor when read from a mask)."""
    x = a.get("input_ids")
    if x is None:
        x = a.get("inputs_embeds")
    B, L = x.shape[:2]
    mask = a.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-2:] == (L, L):
        last = mask[:, 0, -1]  # a whole-sequence causal mask (models.experts.full_sequence_mask): the last query
        return (last if last.dtype == torch.bool else last == 0).sum()  # row attends every non-padding token
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return B * L
    if mask.shape[1] == L:
        return mask.sum()
    pos = a.get("cache_position")
    cols = pos if pos is not None else torch.arange(mask.shape[1] - L, mask.shape[1], device=mask.device)
    return mask[:, cols].sum()
