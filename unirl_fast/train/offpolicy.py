"""One-step-off training (`--off-policy 1`): the rollout of step k + 1 runs, with step k's weights, while step k trains.

Timeline of step k (after the first, whose batch is rolled out in place):

    its batch: rolled out during step k - 1, its chunks scored on the scorer thread since (train.pipeline)
    forward-process draws, old policy, reference  ->  wait for the scores, advantages
    launch: sample step k + 1's tasks, start its rollout on a thread (its chunks scored as they finish)
    losses (forward / backward) of step k          |  rollout of step k + 1 (same weights: nothing has moved yet)
    join the rollout (the weights it reads must not move under it)  ->  optimizer step  ->  next step
So per step the rollout and the reward's latency hide behind the losses (and the scores of step k + 1 behind the
optimizer step and step k + 1's reference pass). The last step launches nothing (no rollout would be used; a run
extended later with a higher --steps rolls its next batch out in place, on-policy).

Staleness: `Batch.versions` holds, per sample, the policy version that rolled it out (optimizer steps applied before
the rollout). Step k trains version k - 1 weights on samples of version k - 2: staleness 1 (the first step 0).
Logged per step: staleness_mean / staleness_max.

Objective: decoupled PPO (AReaL, "Decoupled PPO objective") with the proximal policy = the weights at the start of
the step, and one update per batch. Then the PPO ratio pi_theta / pi_prox is exactly 1 in the forward and its clip
never acts, and what corrects for the stale rollout is the behaviour importance weight, detached and truncated:
    text (per token):             w_t = min(pi_prox(y_t) / pi_behav(y_t), tis_cap)
    image (per trajectory, Flow-GRPO): w = min(exp(sum over the trained window (log pi_prox - log pi_behav)), tis_cap)
    loss = policy loss with advantage A scaled by w (the KL to the reference and the velocity-MSE unchanged)
pi_prox's log-probs are the training forward's own, detached (no extra forward: it is the same weights), so this is
truncated importance sampling as verl and TRL apply it to their rollout engines' log-probs (cap default 2), with the
behaviour policy one step old. The image weight is per trajectory because `flow_policy_loss` takes one advantage per
sample, and uses the per-step log-probs the ratio of Flow-GRPO uses (means over pixels). nft / awm: the loss is flow
matching on the rollout's clean images weighted by the advantage, with no behaviour density in it; it runs as is.
Logged: text_tis_weight_mean, text_tis_capped_frac, image_is_weight_mean, image_is_capped_frac.

Exact resume: a checkpoint holds the batch prefetched for the next step, scored (`batch_state`: tensors, strings,
numbers; the tasks as their indices), so a resumed run trains on the very batch the uninterrupted one would; the
RNG states saved are those after its rollout.

Refused before any work (one line): DeepSpeed (ZeRO-3 gathers the weights inside forwards, and the ranks' collectives
would interleave between the two threads), FP8 (its weight cache is shared state), gradient checkpointing of the LM
(transformers turns the KV cache off in training mode with it, and the rollout decodes while the model is in
training mode), an edit scenario's inverse edit by a LoRA reference (the adapters are switched off on the shared
model), and a model with active dropout (the rollout would run it in training mode). On CUDA the rollout thread
runs on a side stream whose work the step's optimizer step waits for (untested: no GPU here).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import torch

from .. import _stop, flow_policy_loss, fused_linear_logprobs, policy_loss
from ..models.unified import Conditioning
from ..models.vlm import VisionInputs
from ..rollout import ImageSamplingParams
from ..rollout.image import ImageTrajectory
from ..rollout.text import TextRolloutOutput
from .rl import Batch, _last_hidden, _sequences, replay_window


def check_config(cfg, scenario) -> None:
    """What --off-policy 1 cannot run with, refused before any work (one line)."""
    if not cfg.off_policy:
        return
    why = None
    if cfg.zero_stage is not None or _launched_distributed():
        why = "DeepSpeed (ZeRO gathers weights inside forwards; two threads' collectives would interleave)"
    elif cfg.fp8:
        why = "--fp8 (the FP8 weight cache is shared by the rollout and the losses)"
    elif cfg.grad_ckpt_lm:
        why = ("--grad-ckpt-lm (transformers turns the KV cache off in training mode with gradient checkpointing, "
               "and the rollout decodes while the model trains)")
    elif scenario.edit and cfg.cycle_back == "reference" and (cfg.lora_lm or cfg.lora_dit):
        why = ("LoRA with cycle_back 'reference' (the inverse edit switches the adapters off on the model the losses "
               "are training); use --cycle-back policy or full training")
    if why:
        raise ValueError(f"bad config: --off-policy 1 cannot run with {why}")


def _launched_distributed() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_model(model) -> None:
    """Active dropout would make the rollout (which runs while the model is in training mode) stochastic in a way
    the behaviour log-probs do not record."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Dropout) and mod.p > 0:
            raise ValueError(f"bad config: --off-policy 1 with dropout: {name} has p={mod.p} (the next step's rollout "
                             "runs while the model is in training mode)")


class Prefetch:
    """The next step's rollout on its own thread (and, on CUDA, its own stream); `join` returns its pending batch."""

    def __init__(self, roll, flag: _stop.StopFlag, device):
        self.roll, self.flag, self.pending, self.seconds = roll, flag, None, 0.0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread = threading.Thread(target=self._run, name="rollout-prefetch")
        self.thread.start()

    def _run(self):
        t0 = time.perf_counter()
        try:
            with _stop.watching(self.flag), torch.no_grad(), \
                    torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                self.pending = self.roll()
        except BaseException as e:  # the run's error: the training thread raises it at its next check
            self.flag.set(e)
        self.seconds = time.perf_counter() - t0

    def join(self):
        """Wait for the rollout (not its scores); on CUDA the current stream then waits for the side stream."""
        while self.thread.is_alive():
            self.thread.join(0.05)
            _stop.check()  # the training thread's own failure paths stay responsive
        self.flag.raise_if_set()
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            _record_stream(self.pending.batch, torch.cuda.current_stream(self.stream.device))
        return self.pending


def _record_stream(obj, stream) -> None:
    """Mark every CUDA tensor of a batch as used by `stream` (their memory came from the side stream's pool)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _record_stream(getattr(obj, f.name), stream)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _record_stream(x, stream)


def staleness(b: Batch, version: int) -> dict:
    """staleness_mean / staleness_max of a batch trained at policy version `version` (host data: no sync)."""
    ages = [version - v for v in b.versions.tolist()]
    return {"staleness_mean": sum(ages) / len(ages), "staleness_max": max(ages)}


# the losses -----------------------------------------------------------------------------------------------------
def text_loss(model, cfg, b: Batch, idx, adv, n_total_tokens):
    """The GRPO-family text loss with the behaviour correction (module docstring): the training forward's log-probs
    (pi_theta, differentiable; detached they are pi_prox), the rollout's (pi_behav) through token-level TIS."""
    out = b.text
    P = out.prompt_ids.shape[1]
    ids, mask, pos = _sequences(b, idx)
    h = _last_hidden(model.lm, b, idx, ids, mask, pos)[:, P - 1:-1]
    head = model.lm.get_output_embeddings()
    logp, ent = fused_linear_logprobs(h, head.weight, out.completion_ids[idx], bias=getattr(head, "bias", None),
                                      temperature=cfg.temperature, return_entropy=True, impl=cfg.impl)
    kw = {"ref_logp": b.ref_logp[idx]} if cfg.beta > 0 else {}
    loss_type = "dapo" if cfg.loss_type in ("bnpo", "dapo") else cfg.loss_type
    if loss_type == "dapo":
        kw["num_tokens"] = max(n_total_tokens, 1)
    loss, m = policy_loss(logp, logp.detach(), adv, out.completion_mask[idx], loss_type=loss_type,
                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, kl="k3",
                          rollout_logp=out.logprobs[idx], tis_cap=cfg.tis_cap, entropy=ent,
                          max_completion_length=cfg.max_new_tokens, impl=cfg.impl, **kw)
    scale = 1.0 if loss_type == "dapo" else len(idx) / len(b.tasks)
    return loss * scale, m


def image_loss(model, cfg, b: Batch, idx, adv):
    """Flow-GRPO's loss with the behaviour correction (module docstring): one truncated importance weight per
    trajectory, from the replay's log-probs (pi_prox, detached) and the rollout's (pi_behav), scaling the advantage."""
    _, logp, kw = replay_window(model, cfg, b, idx)
    log_w = (logp.detach() - b.traj.log_probs[b.traj.trained_steps()][:, idx]).sum(0)
    w = log_w.exp().clamp(max=cfg.tis_cap)
    loss, m = flow_policy_loss(logp, logp.detach(), adv * w, clip_range=cfg.flow_clip_range, impl=cfg.impl, **kw)
    m = {**m, "is_weight_mean": w.mean(), "is_capped_frac": (log_w.exp() > cfg.tis_cap).float().mean()}
    return loss * (len(idx) / len(b.tasks)), m


# checkpoints ----------------------------------------------------------------------------------------------------
_TYPES = {c.__name__: c for c in (TextRolloutOutput, ImageTrajectory, Conditioning, VisionInputs,
                                  ImageSamplingParams)}
_AFTER_ROLLOUT = ("ref_logp", "ref_velocity", "fp")  # computed by the step that trains the batch


def _enc(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        name = type(x).__name__
        if name not in _TYPES:
            raise TypeError(f"off-policy checkpoint: a {name} in the prefetched batch has no encoding")
        return {"__dataclass__": name, **{f.name: _enc(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, (list, tuple)):
        return type(x)(_enc(v) for v in x)
    if isinstance(x, dict):
        return {k: _enc(v) for k, v in x.items()}
    return x


def _dec(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict) and "__dataclass__" in x:
        cls = _TYPES[x["__dataclass__"]]  # a name outside the allow-list is a KeyError: nothing else is built
        return cls(**{k: _dec(v, device) for k, v in x.items() if k != "__dataclass__"})
    if isinstance(x, (list, tuple)):
        return type(x)(_dec(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _dec(v, device) for k, v in x.items()}
    return x


def batch_state(b: Batch, task_ids: list) -> dict:
    """A scored, rolled-out batch as tensors, strings and numbers (train.checkpoint's format); the tasks as indices."""
    if any(getattr(b, n) is not None for n in _AFTER_ROLLOUT) or b.rewards is None:
        raise ValueError("batch_state: only a scored batch that no step has started on is saved")
    fields = {f.name: _enc(getattr(b, f.name)) for f in dataclasses.fields(b)
              if f.name not in ("tasks", *_AFTER_ROLLOUT)}
    return {"task_ids": list(task_ids), "fields": fields}


def batch_from_state(state: dict, tasks: list, device) -> tuple:
    """(Batch, task ids) from batch_state's dict, the tasks looked up in `tasks` (the run's train tasks)."""
    ids = [int(i) for i in state["task_ids"]]
    b = Batch([tasks[i] for i in ids], None)
    for name, value in state["fields"].items():
        setattr(b, name, _dec(value, device))
    b.group_ids = b.group_ids.cpu()
    b.versions = b.versions.cpu()
    if b.rewards is not None:
        b.rewards = b.rewards.cpu()
    return b, ids
