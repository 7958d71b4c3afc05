"""`patch()`: verl's actor computes its policy loss, log-probs and entropy through unirl_fast.

Tested against verl==0.9.1 (torch 2.13, CPU). One call, before the trainer builds its workers:

    import unirl_fast.integrations.verl as uf_verl
    uf_verl.patch()           # impl="auto": Triton on CUDA tensors, the reference on CPU

verl runs its actor inside Ray worker processes and the patch acts on the process that calls it, so it has to run
there: Ray's `runtime_env={"worker_process_setup_hook": "unirl_fast.integrations.verl.patch"}` does that for every
worker (not exercised by the tests here, which run verl's loss path in-process on a CPU).

After it, in this process:
- verl's policy-loss registry (`verl.trainer.ppo.core_algos.get_policy_loss_fn`) returns ours for
  `policy_loss.loss_mode` "vanilla" (PPO/GRPO clip with dual clip) and "gspo"; every other loss mode stays verl's.
  Ours is one `policy_loss` call (one fused kernel on CUDA) with the options that reproduce verl's conventions
  (docs/conventions.md): the token log-ratio clamped to +-20 and the dual clip at clip_ratio_c (vanilla), the
  sequence log-ratio capped at 10 (gspo), empty sequences left out of the seq-mean denominators, and the given
  rollout_is_weights multiplied into the policy term.
- `verl.utils.torch_functional.logprobs_from_logits`, `entropy_from_logits` and `entropy_from_logits_with_chunking`
  (and the names verl's engines, rollout and prefix grouper imported) are our `logprobs_from_logits` op: computed
  in fp32, returned in the dtype and shape verl's own function returns (log-probs in the logits' dtype, fp32 where
  verl's flash-attn cross-entropy would run; entropy in the logits' dtype; the chunked entropy in fp32).
- verl's fused head, which its actor uses with `use_fused_kernels` (log-probs and entropy from the last hidden
  states and the head weight, no logits): `verl.utils.kernel.linear_cross_entropy` (the "triton" backend: fp32
  [N] outputs for any input rank, logits kept in fp32 as verl's kernel keeps them) and
  `verl.utils.experimental.torch_functional.FusedLinearForPPO` (the "torch" / "liger" backends: outputs shaped like
  the labels, entropy in the hidden states' dtype, logits in the hidden states' dtype as verl's torch backend forms
  them) are our `fused_linear_logprobs`. Without `use_fused_kernels` verl's model forward still builds the logits.
- every actor update (`verl.workers.engine.base.BaseEngine.train_batch`: zero grad, forward/backward over the
  micro-batches, optimizer step) reads the deferred value checks of its op calls once, between the last backward
  and the optimizer step (`check_pending_all_ranks`: one host sync and, across data-parallel ranks, one all-reduce
  of a flag): a NaN or a bad id flagged by an op raises there with the op's message on every rank, and the
  optimizer step is skipped.
- with `patch(deep=True)`, also `core_algos.compute_policy_loss_vanilla` / `compute_policy_loss_gspo` themselves,
  for code that calls them by name (verl's own unit tests: tests/test_verl_suite.py runs them so).

`patch()` imports every module it swaps a name in before swapping any, so `unpatch()` gives every one of them verl's
function back. The KL term is not ours: verl's actor computes it with its own `kl_penalty` / `agg_loss` (an unknown
kl_loss_type raises verl's error); `kl_options` maps verl's KL names onto our options for use outside verl.

verl's aggregation modes map onto ours as (the loss is then rescaled by local / global counts when verl passes
global_batch_info: loss x n_local x dp_size / n_global, which is exactly verl's normaliser):

    token-mean                bnpo                                        n = valid tokens
    seq-mean-token-mean       grpo,    empty_seqs="skip"                  n = sequences with a valid token
    seq-mean-token-sum        seq_sum, empty_seqs="skip"                  n = sequences with a valid token
    seq-mean-token-sum-norm   dr_grpo, empty_seqs="skip", max_completion_length = loss_scale_factor or L

Raises ValueError (never changes the objective silently) for: loss_agg_mode "token-sum", clip_ratio_c <= 1, and
gspo with advantages or rollout_is_weights that vary along a sequence (verl's GSPO-token gradient, with a
per-token ratio factor, then differs from the exact sequence-level gradient ours computes).
Metrics are verl's keys and definitions: actor/pg_clipfrac, actor/ppo_kl, actor/pg_clipfrac_lower.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

from .._checks import check_pending_all_ranks
from ..ops import fused_linear_logprobs as _uf_linear_logprobs
from ..ops import logprobs_from_logits as _uf_logprobs
from ..ops import policy_loss

VERL_VERSION = "0.9.1"  # the release these mappings are checked against (tests/test_verl.py)
LOSS_MODES = ("vanilla", "gspo")
AGG_MODES = {
    "token-mean": dict(loss_type="bnpo"),
    "seq-mean-token-mean": dict(loss_type="grpo", empty_seqs="skip"),
    "seq-mean-token-sum": dict(loss_type="seq_sum", empty_seqs="skip"),
    "seq-mean-token-sum-norm": dict(loss_type="dr_grpo", empty_seqs="skip"),
}
VANILLA_LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi / pi_old) to +-20 before exp
GSPO_LOG_RATIO_CAP = 10.0  # verl caps the sequence log-ratio at 10
KL_TYPES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
K3_CLAMP = 10.0  # verl clamps its k3 estimate to +-10 (after clamping ref - logp to +-20, which never binds then)
_STATE: dict = {}


def _unsupported(option, value, why):
    raise ValueError(f"unirl_fast verl drop-in: {option}={value!r} is not supported: {why}")


def kl_options(kl_loss_type: str) -> dict:
    """verl's `kl_loss_type` -> our (kl, kl_clamp); a trailing '+' is verl's straight-through k2 gradient."""
    st = kl_loss_type.endswith("+")
    base = kl_loss_type[:-1] if st else kl_loss_type
    if base not in KL_TYPES:
        _unsupported("kl_loss_type", kl_loss_type, f"supported are {sorted(KL_TYPES)} with an optional '+'")
    kind = KL_TYPES[base]
    if kind == "k2":
        st = False  # verl: "k2+" / "mse+" are plain k2
    return dict(kl=kind + ("+" if st else ""), kl_clamp=K3_CLAMP if kind == "k3" else None)


def _global_factor(loss_agg_mode, mask, info):
    """verl's global normaliser over ours (local counts): 1 without global_batch_info."""
    dp = info.get("dp_size") or 1
    if loss_agg_mode == "token-mean":
        total = info.get("batch_num_tokens")
        local = mask.sum()
    else:
        total = info.get("global_batch_size")
        local = (mask.sum(-1) > 0).sum()
    if total is None:
        if dp > 1:
            _unsupported("dp_size", dp, "verl needs the global batch counts with dp_size > 1 and none were given")
        return None
    return local.clamp(min=1).float() * dp / float(total)


def _check_constant_along_sequences(name, x, mask):
    if x is None or x.ndim == 1 or x.shape[-1] == 1:
        return
    big = torch.finfo(torch.float32).max
    hi = torch.where(mask, x.float(), -big).amax(-1)
    lo = torch.where(mask, x.float(), big).amin(-1)
    if bool(((hi > lo) & mask.any(-1)).any()):
        _unsupported(name, "per-token values", "with loss_mode='gspo' verl's GSPO-token gradient differs from the "
                     "sequence-level one unless it is constant along each sequence")


def _clip(config, key):
    v = getattr(config, key, None)
    return config.clip_ratio if v is None else v


def _policy_loss(loss_mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights):
    if loss_agg_mode not in AGG_MODES:
        _unsupported("loss_agg_mode", loss_agg_mode, f"supported are {sorted(AGG_MODES)}")
    mask = response_mask.bool()
    info = dict(getattr(config, "global_batch_info", None) or {})
    kw = dict(AGG_MODES[loss_agg_mode], eps_low=_clip(config, "clip_ratio_low"),
              eps_high=_clip(config, "clip_ratio_high"), impl=_STATE.get("impl", "auto"))
    if loss_agg_mode == "seq-mean-token-sum-norm":
        lsf = info.get("loss_scale_factor")
        kw["max_completion_length"] = int(lsf) if lsf is not None else mask.shape[-1]
    if loss_mode == "gspo":
        _check_constant_along_sequences("advantages", advantages, mask)
        _check_constant_along_sequences("rollout_is_weights", rollout_is_weights, mask)
        kw.update(importance_sampling="sequence", log_ratio_max=GSPO_LOG_RATIO_CAP)
    else:
        c = config.get("clip_ratio_c", 3.0) if hasattr(config, "get") else getattr(config, "clip_ratio_c", 3.0)
        if not c > 1.0:
            _unsupported("clip_ratio_c", c, "the dual-clip bound must be > 1 (verl asserts the same)")
        kw.update(dual_clip=float(c), log_ratio_min=-VANILLA_LOG_RATIO_CLAMP, log_ratio_max=VANILLA_LOG_RATIO_CLAMP)
    adv = advantages
    if loss_mode == "gspo" and adv.ndim == 2:  # constant along each valid stretch (checked): one value per sequence
        adv = torch.where(mask, adv, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    loss, m = policy_loss(log_prob, old_log_prob, adv, mask, tis_weights=rollout_is_weights, **kw)
    factor = _global_factor(loss_agg_mode, mask, info)
    if factor is not None:
        loss = loss * factor
    with torch.no_grad():
        lr = (log_prob.detach() - old_log_prob).float()
        if loss_mode != "gspo":
            lr = lr.clamp(-VANILLA_LOG_RATIO_CLAMP, VANILLA_LOG_RATIO_CLAMP)
        ppo_kl = -(torch.where(mask, lr, 0.0).sum() / mask.sum().clamp(min=1))
        lower = m["dual_clip_frac"] if "dual_clip_frac" in m else torch.zeros(())
        metrics = {"actor/pg_clipfrac": (m["clip_frac_low"] + m["clip_frac_high"]).item(),
                   "actor/ppo_kl": ppo_kl.item(), "actor/pg_clipfrac_lower": lower.item()}
    return loss, metrics


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's "vanilla" policy loss (same signature and metrics) through `policy_loss`."""
    return _policy_loss("vanilla", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                             config=None, rollout_is_weights=None):
    """verl's "gspo" policy loss (same signature and metrics) through `policy_loss` at sequence level."""
    return _policy_loss("gspo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


def _labels_like(logits, labels):
    """labels shaped like logits[..., 0]; verl's flash-attn path flattens both, so any shape with that many elements
    is accepted there and here."""
    want = logits.shape[:-1]
    if labels.shape != want and labels.numel() == want.numel():
        return labels.reshape(want)
    return labels


def _verl_logprob_dtype(logits):
    """The dtype verl's own logprobs_from_logits returns: fp32 from flash-attn's cross-entropy (its path when
    flash-attn is installed and VERL_DISABLE_FLASH_ATTN_CE is not 1), else the logits' (its log_softmax paths)."""
    fn = sys.modules.get("verl.utils.torch_functional")
    flash = getattr(fn, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)  # verl's own spelling
    if flash and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1":
        return torch.float32
    return logits.dtype


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's `logprobs_from_logits` through our op: log-probs shaped logits.shape[:-1], computed in fp32 and returned
    in the dtype verl's own function returns (`_verl_logprob_dtype`)."""
    logp, _ = _uf_logprobs(logits, _labels_like(logits, labels), impl=_STATE.get("impl", "auto"),
                           inplace_backward=bool(inplace_backward))
    return logp.to(_verl_logprob_dtype(logits))


def _entropy(logits):
    """Entropy [*logits.shape[:-1]] fp32 through our op (one pass; the log-prob of a dummy target is discarded)."""
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return _uf_logprobs(logits, targets, return_entropy=True, impl=_STATE.get("impl", "auto"))[1]


def entropy_from_logits(logits):
    """verl's `entropy_from_logits` through our op: computed in fp32, returned in the logits' dtype as verl's."""
    return _entropy(logits).to(logits.dtype)


def entropy_from_logits_with_chunking(logits, chunk_size: int = 2048):
    """verl's `entropy_from_logits_with_chunking`: fp32 entropy, `chunk_size` rows per call of our op (bounding the
    reference path's fp32 working copy as verl's chunks do; the Triton kernel streams the rows either way)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    flat = logits.reshape(-1, logits.shape[-1])
    parts = [_entropy(flat[i:i + chunk_size]) for i in range(0, flat.shape[0], chunk_size)]
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(logits.shape[:-1])


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's fused head (`verl.utils.kernel.linear_cross_entropy`, its actor's `use_fused_kernels` path): per-token
    (log-probs, entropy) of `labels` from the hidden states and the head weight, through our fused_linear_logprobs
    (on CUDA the [N, V] logits are never materialised). As verl's kernel: hidden [..., H] and labels flattened to N
    tokens, both outputs fp32 [N] whatever the input rank, the logits formed in fp32 from bf16 hidden states and head
    (`logits_dtype=torch.float32`; its backward GEMMs take bf16 dlogits, as verl's)."""
    if reduction != "none":
        _unsupported("reduction", reduction, "verl's actor asks for per-token values ('none'); ours has no other")
    if dist_process_group is not None:
        _unsupported("dist_process_group", dist_process_group, "a vocabulary-parallel head is not supported")
    return _uf_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1).to(torch.int64),
                               temperature=float(temperature), return_entropy=True, impl=_STATE.get("impl", "auto"),
                               logits_dtype=torch.float32)


class FusedLinearForPPO(torch.nn.Module):
    """verl's `FusedLinearForPPO` (the same fused path with its "torch" / "liger" backends) through ours; as verl's
    torch backend: hidden [T, H] or [B, T, H], outputs shaped like input_ids, log-probs fp32, entropy in the hidden
    states' dtype, logits in the hidden states' dtype (the default `logits_dtype`)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if hidden_states.ndim not in (2, 3):
            raise ValueError(f"hidden_states must be 2-D or 3-D (as verl's), got shape {tuple(hidden_states.shape)}")
        logp, ent = _uf_linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                        temperature=float(temperature), return_entropy=True,
                                        impl=_STATE.get("impl", "auto"))
        return logp, ent.to(hidden_states.dtype)


_FUNCTIONAL = {"logprobs_from_logits": logprobs_from_logits, "entropy_from_logits": entropy_from_logits,
               "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking}
# modules that bind verl's log-prob / entropy functions by name at import ("from ... import logprobs_from_logits")
_BY_NAME = ("verl.workers.engine.fsdp.transformer_impl", "verl.workers.engine.automodel.transformer_impl",
            "verl.workers.engine.torchtitan.transformer_impl", "verl.trainer.ppo.prefix_grouper_utils",
            "verl.workers.rollout.naive.naive_rollout")
_FUSED_SITES = (("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", linear_cross_entropy),
                ("verl.models.mcore.model_forward_fused", "linear_cross_entropy", linear_cross_entropy),
                ("verl.models.mcore.model_forward_1f1b_overlap", "linear_cross_entropy", linear_cross_entropy),
                ("verl.utils.experimental.torch_functional", "FusedLinearForPPO", FusedLinearForPPO))
_DEEP = (("verl.trainer.ppo.core_algos", "compute_policy_loss_vanilla", compute_policy_loss_vanilla),
         ("verl.trainer.ppo.core_algos", "compute_policy_loss_gspo", compute_policy_loss_gspo))


def _checked_train_batch(train_batch):
    """verl's `BaseEngine.train_batch` with the deferred value checks read before its optimizer step (for this call,
    the engine's own `optimizer_step` runs behind `check_pending_all_ranks`)."""
    @functools.wraps(train_batch)
    def checked(self, *args, **kwargs):
        step = self.optimizer_step

        def checked_step(*a, **k):
            check_pending_all_ranks()
            return step(*a, **k)
        self.optimizer_step = checked_step
        try:
            return train_batch(self, *args, **kwargs)
        finally:
            del self.optimizer_step
    return checked


def _sites(deep):
    """(module, attribute, ours) for every module-level name patch() swaps."""
    sites = [("verl.utils.torch_functional", a, fn) for a, fn in _FUNCTIONAL.items()]
    sites += [(m, a, fn) for m in _BY_NAME for a, fn in _FUNCTIONAL.items()]
    sites += list(_FUSED_SITES)
    return sites + list(_DEEP) if deep else sites


def _import_all(names):
    """Import every module patch() will touch before touching any: a module first imported after a swap would bind
    ours by name and unpatch() could not give it verl's back. Modules whose own dependencies are missing (engines
    not installed) are not used in this process and are skipped; Megatron's only when that engine is loaded."""
    import importlib

    mods = {}
    for name in dict.fromkeys(names):
        if name.startswith("verl.models.mcore") and name not in sys.modules:
            continue
        try:
            mods[name] = importlib.import_module(name)
        except ImportError:
            continue
    return mods


def patch(*, impl="auto", deep=False):
    """Switch verl (this process) to unirl_fast's policy losses, log-probs and entropy. Idempotent; `unpatch()`
    restores verl's own functions. deep=True also rebinds core_algos' module-level `compute_policy_loss_vanilla` /
    `compute_policy_loss_gspo` (what code calling them by name, such as verl's own unit tests, reaches; modules that
    imported them by name before the call keep verl's). Raises ImportError without verl, ValueError for a bad impl."""
    from verl.trainer.ppo import core_algos

    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if not isinstance(deep, bool):
        raise ValueError(f"deep must be True or False, got {deep!r}")
    _STATE["impl"] = impl
    if _STATE.get("patched"):
        if _STATE["deep"] == deep:
            return
        unpatch()
    sites = _sites(deep)
    mods = _import_all(m for m, _, _ in sites)
    try:
        from verl.workers.engine.base import BaseEngine
    except ImportError:  # an older verl without the engine API: its actor is not covered
        BaseEngine = None
    saved = _STATE["saved"] = []
    ours = {"vanilla": compute_policy_loss_vanilla, "gspo": compute_policy_loss_gspo}
    for name in LOSS_MODES:
        saved.append((core_algos.POLICY_LOSS_REGISTRY, name, core_algos.POLICY_LOSS_REGISTRY.get(name)))
        core_algos.POLICY_LOSS_REGISTRY[name] = ours[name]
    for mod_name, attr, fn in sites:
        mod = mods.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            saved.append((vars(mod), attr, getattr(mod, attr)))
            setattr(mod, attr, fn)
    if BaseEngine is not None:
        saved.append((BaseEngine, "train_batch", BaseEngine.train_batch))
        BaseEngine.train_batch = _checked_train_batch(BaseEngine.train_batch)
    _STATE.update(patched=True, deep=deep)


def unpatch():
    """Undo `patch()`."""
    for table, key, value in reversed(_STATE.pop("saved", [])):
        if isinstance(table, type):
            setattr(table, key, value)
        elif value is None:
            table.pop(key, None)
        else:
            table[key] = value
    _STATE["patched"] = False
