"""One RL step's pieces: rollout, rewards, and the losses of the two experts.

Rollout (no grad): the LM writes (static-KV-cache engine, sampling log-probs kept for TIS), the DiT draws
(SDE inside a Flow-GRPO-Fast window at the start, ODE after, CFG-free unless guidance_scale != 1).
Losses on a micro-batch, with one shared advantage A_i per sample (UniGRPO):
- text: `fused_linear_policy_loss` from the LM's last hidden states and its head (never the full logits),
  old log-probs = the rollout's (the behaviour policy); KL to the frozen reference when beta > 0.
- image: the trained window's transitions replayed in one batched DiT call, `flow_step_logprob` on the
  stored (x, x_next) pairs, `flow_policy_loss` with the velocity-MSE to the frozen reference (UniGRPO).
  Conditioning is recomputed with gradients, so the connector (and the LM, when it trains) learn from it.
Micro-batch losses are scaled by micro/B so that accumulated gradients equal the full-batch mean.
A vision-language LM (`models.vlm`) sees the task's image in the image-input scenarios: its prompts hold the image
tokens, the rollout keeps the processed images (b.text.vision for the LM's text, b.cond_vision for the DiT's
conditioning) and every later forward of those rows (reference, losses) passes them again.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .. import _checks as C
from .. import flow_policy_loss, flow_step_logprob, fused_linear_logprobs, fused_linear_policy_loss
from ..models import vlm
from ..models.experts import full_sequence_mask
from ..rollout import ImageEngine, ImageSamplingParams, SamplingParams, TextEngine, replay_velocity
from ..rollout.text import stop_token_ids
from .config import image_schedule
from .sampler import train_params


@dataclass
class Batch:
    tasks: list
    group_ids: torch.Tensor
    text: object = None  # TextRolloutOutput
    completions: list = None
    cond_ids: torch.Tensor = None
    cond_mask: torch.Tensor = None
    traj: object = None  # ImageTrajectory
    images: torch.Tensor = None
    sources: torch.Tensor = None
    rewards: torch.Tensor = None
    reward_parts: list = None
    ref_logp: torch.Tensor = None  # [B, T] the frozen reference's completion log-probs (beta > 0)
    ref_velocity: torch.Tensor = None  # [S, B, C, h, w] its velocities on the trained window (beta_velocity > 0)
    fp: object = None  # forward_rl.ForwardBatch: timesteps, noise and frozen velocities of nft / awm
    cond_vision: object = None  # VisionInputs the LM sees while conditioning the DiT (a VLM editing), else None
    lm_images: list = None  # the tasks' images as the VLM got them ([3, h, w] each, own aspect ratio), else None
    cycled: list = None  # edits: each image edited back by the inverse instruction (None where a task has none)
    versions: torch.Tensor = None  # [B] long: the policy version (optimizer steps) that rolled each sample out


def _no_phase(name):
    return nullcontext()


def sees_images(model, scenario) -> bool:
    """Whether the LM sees the tasks' images: a vision-language LM in an image-input scenario."""
    return scenario.image_input and vlm.is_vlm(model.lm)


def lm_images(tasks, size: int, max_pixels: int | None = None) -> list:
    """What a vision-language LM sees of the tasks' images: [3, h, w] in [-1, 1] each, at the image's own aspect
    ratio and at most `max_pixels` pixels (`Task.lm_image`); a task without one is an error naming it."""
    imgs = []
    for t in tasks:
        img = t.lm_image(size, max_pixels)
        if img is None:
            raise ValueError(f"{t.origin}: this scenario shows the task's image to the model, but the task has none")
        imgs.append(img)
    return imgs


def chats(model) -> bool:
    """Whether the LM's texts go through a chat template (an HF tokenizer with one in use)."""
    return getattr(model.tokenizer, "chat_template", None) is not None


def _prompts(model, texts, vision, device):
    """Tokenized left-padded prompts: the tokenizer's, or with images `vlm.encode_prompts`; with a chat template each
    text is rendered as the user's turn first (the template writes any BOS itself)."""
    tok = model.tokenizer
    if chats(model):
        texts = [tok.chat(t) for t in texts]
    if vision is None:
        return tok(texts, add_bos=not chats(model), device=device)
    return vlm.encode_prompts(tok, model.lm, texts, vision, add_bos=not chats(model), device=device)


def _rows(vision, idx):
    return None if vision is None else vision.select(idx)


def image_params(cfg, *, eval_mode=False, step: int = 0) -> ImageSamplingParams:
    """The sampler of a rollout: the Euler ODE at image_steps for evaluation; for training RL step `step`'s
    (train.sampler: the SDE window Flow-GRPO scores where it sits that step, the ODE for the forward-process
    algorithms nft / awm, branching and the ODE solver); one sigma schedule for all (and so for replay)."""
    schedule, shift = image_schedule(cfg)
    if eval_mode:
        return ImageSamplingParams(num_steps=cfg.image_steps, shift=shift, sde="ode", guidance_scale=cfg.guidance_scale,
                                   schedule=schedule)
    return train_params(cfg, step, schedule, shift)


def _branches(group_ids, texts) -> list:
    """Prefix id per row for a branching rollout: the rows of one group with the same DiT prompt share a prefix
    (in the LM-writing scenarios a group's completions may differ, and each distinct one gets its own)."""
    ids = {}
    if group_ids.device.type == "cpu":  # host memory (the trainer makes the ids there): reading it waits for no GPU
        group_ids = C.mark_host_resident(group_ids.clone())
    return [ids.setdefault((g, t), len(ids)) for g, t in zip(group_ids.tolist(), texts)]


@dataclass
class Engines:
    """A run's rollout engines: the trainer makes them once (`rollout_engines`), so the text engine's static KV cache
    is allocated once per batch size and reused every step, and on CUDA the decode step and the image sampler step
    are compiled once (fullgraph; CUDA graphs for the decode)."""
    text: TextEngine
    image: ImageEngine


def rollout_engines(model, cfg, *, compile=None) -> Engines:
    """The engines over `model` (compile: None = on CUDA unless FP8 layers; see TextEngine / ImageEngine)."""
    tok = model.tokenizer
    return Engines(TextEngine(model.lm, pad_token_id=tok.pad_token_id, tokenizer=tok, compile=compile),
                   ImageEngine(model, impl=cfg.impl, compile=compile))


@torch.no_grad()
def rollout(model, scenario, cfg, tasks, group_ids, generator, *, eval_mode=False, phase=_no_phase,
            engines: Engines | None = None, step: int = 0, inverse=None) -> Batch:
    """Text, image, then (edits) cycle-edit rollout; `phase(name)` (a context-manager factory, e.g. PhaseTimer.phase)
    brackets each part as "text_rollout" / "image_rollout" / "cycle_edit". engines: the run's (`rollout_engines`);
    None makes eager ones for this call. step: the RL step (0-based) whose sampler to use (a moving SDE window,
    train.sampler). inverse: who edits back for the cycle reward, a factory of a context yielding that model (None
    in it: the policy; see `cycle_edit`); None: the policy."""
    tok, dev = model.tokenizer, model.device
    engines = engines if engines is not None else rollout_engines(model, cfg, compile=False)
    b = Batch(tasks, group_ids)
    sees = sees_images(model, scenario)
    vision = None
    if sees:
        b.lm_images = lm_images(tasks, model.config.image_size, cfg.max_image_pixels)
        vision = vlm.process_images(model.lm, [im.to(dev) for im in b.lm_images])
    if scenario.lm_writes:
        with phase("text_rollout"):
            ids, mask = _prompts(model, [scenario.lm_prompt(t, image=sees, chat=chats(model)) for t in tasks], vision,
                                 dev)
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens,
                                    temperature=0.0 if eval_mode else cfg.temperature,
                                    eos_token_ids=stop_token_ids(tok, model.lm))
            b.text = engines.text.generate(ids, mask, params, generator=generator, vision=vision)
            b.completions = [c.strip() for c in b.text.texts]
    if scenario.draws:
        with phase("image_rollout"):
            params = image_params(cfg, eval_mode=eval_mode, step=step)
            _image_rollout(model, scenario, cfg, b, generator, engines, params,
                           vision if sees and scenario.edit else None, eval_mode)
    if scenario.edit:
        with phase("cycle_edit"), (inverse or nullcontext)() as inv:
            cycle_edit(model if inv is None else inv, scenario, cfg, b, generator)
    return b


@torch.no_grad()
def cycle_edit(inv, scenario, cfg, b: Batch, generator) -> Batch:
    """The rollout's last stage in edit scenarios: each edited image edited back with its task's inverse instruction
    (ODE, no gradient; tasks without one get None) by `inv`, into b.cycled for the cycle-consistency reward. The
    trainer passes its frozen reference with cycle_back="reference", so that reward is a fixed function of the
    edited image (edited back by the policy itself, every update also changes the inverse edit, which the policy
    gradient does not see)."""
    rows = [i for i, t in enumerate(b.tasks) if t.inverse]
    b.cycled = [None] * len(b.tasks)
    if rows:
        sees = sees_images(inv, scenario)  # a VLM sees the edited image it edits back
        vision = vlm.process_images(inv.lm, b.images[rows]) if sees else None
        ids, mask = _prompts(inv, [(vlm.IMAGE_MARK if sees else "") + b.tasks[i].inverse for i in rows], vision,
                             inv.device)
        back = ImageEngine(inv, impl=cfg.impl).generate(ids, mask, image_params(cfg, eval_mode=True),
                                                        source_images=b.images[rows], generator=generator,
                                                        vision=vision)
        for i, img in zip(rows, back.images):
            b.cycled[i] = img
    return b


def _image_rollout(model, scenario, cfg, b: Batch, generator, engines, params, vision, eval_mode):
    """The DiT part of `rollout`: prompts, source images, initial noise (shared per group with --group-noise, per
    prefix when branching) and the sampler. vision: what a VLM sees while conditioning (an edit), else None."""
    dev, size = model.device, model.config.image_size
    b.cond_vision = vision
    texts = [scenario.dit_text(t, c, image=vision is not None)
             for t, c in zip(b.tasks, b.completions or [None] * len(b.tasks))]
    b.cond_ids, b.cond_mask = _prompts(model, texts, vision, dev)
    if scenario.edit:
        b.sources = torch.stack([t.source_image(size, cfg.image_resize) for t in b.tasks]).to(dev)
    noise, branches = None, None
    if params.branch_at is not None:  # one initial latent and prefix per (group, DiT prompt)
        branches = _branches(b.group_ids, texts)
        noise = torch.randn((max(branches) + 1, *model.latent_shape), generator=generator, device=dev)
    elif cfg.group_noise and not eval_mode:  # one initial latent per group (DanceGRPO's shared noise)
        _, which = torch.unique(b.group_ids, return_inverse=True)
        noise = torch.randn((int(which.max()) + 1, *model.latent_shape), generator=generator, device=dev)
        noise = noise[which.to(dev)]
    b.traj = engines.image.generate(b.cond_ids, b.cond_mask, params, source_images=b.sources, generator=generator,
                                    noise=noise, vision=vision, branches=branches)
    b.images = b.traj.images


def rollout_record(b: Batch) -> dict:
    """The step's sampler, for metrics.jsonl (host values only: no device read): the window's first step and size
    (null without stochastic steps), the branch step, the sampler steps and the DiT rows it ran."""
    if b.traj is None:
        return {}
    p, on = b.traj.params, [k != "ode" for k in b.traj.kinds]
    first = on.index(True) if True in on else None
    return {"window_start": first, "window_size": sum(on), "branch_at": p.branch_at, "rollout_steps": len(on),
            "rollout_dit_rows": b.traj.dit_rows}


@torch.no_grad()
def score(b: Batch, reward) -> Batch:
    """The rewards of a rolled-out batch (b.rewards [B] float32, b.reward_parts: per sample {part: value, "total"}):
    `reward` (a unirl_fast.rewards reward, required) on its tasks, completions, images, cycled images and sources.
    Nothing else: the rollout made everything the reward reads (the cycle edit included)."""
    from ..rewards import RewardBatch

    if reward is None:
        raise ValueError("score needs the run's reward (train.setup builds it from --reward)")
    rb = RewardBatch(b.tasks, b.completions or [""] * len(b.tasks), b.images, b.cycled, b.sources)
    res = reward(rb)
    b.rewards = res.scores.float()
    cols = {k: v.tolist() for k, v in res.parts.items()}  # host tensors, read whole (not one element at a time)
    b.reward_parts = [{**{k: c[i] for k, c in cols.items()}, "total": s} for i, s in enumerate(res.scores.tolist())]
    return b


def _last_hidden(lm, b: Batch, idx, ids, mask, pos):
    """The LM's last hidden states on rows `idx`' prompt + completion (with their images for a VLM rollout)."""
    if b.text.vision is None:
        return lm.base_model(input_ids=ids, attention_mask=full_sequence_mask(lm, mask),
                             position_ids=pos).last_hidden_state
    return vlm.hidden_states(lm, ids, mask, b.text.vision.select(idx), prompt_length=b.text.prompt_ids.shape[1])


def _sequences(b: Batch, idx):
    """Prompt + completion ids, mask and positions of rows `idx` (left-padded prompts)."""
    out = b.text
    ids = torch.cat([out.prompt_ids[idx], out.completion_ids[idx]], 1)
    mask = torch.cat([out.prompt_mask[idx], out.completion_mask[idx].long()], 1)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def reference_outputs(ref, scenario, cfg, b: Batch, micro_batch: int) -> Batch:
    """The frozen reference's outputs the losses need, for the whole batch in micro-batches, before training:
    completion log-probs (text KL, beta > 0) and velocities on the trained window (velocity-MSE,
    beta_velocity > 0). Kept out of the losses so that the reference forwards are their own profiled phase."""
    B = len(b.tasks)
    chunks = [torch.arange(s, min(s + micro_batch, B)) for s in range(0, B, micro_batch)]
    if scenario.train_lm and b.text is not None and cfg.beta > 0:
        P = b.text.prompt_ids.shape[1]
        logps = []
        for idx in chunks:
            ids, mask, pos = _sequences(b, idx)
            rh = _last_hidden(ref.lm, b, idx, ids, mask, pos)
            logp, _ = fused_linear_logprobs(rh[:, P - 1:-1], ref.lm.get_output_embeddings().weight,
                                            b.text.completion_ids[idx], temperature=cfg.temperature, impl=cfg.impl)
            logps.append(logp)
        b.ref_logp = torch.cat(logps)
    if scenario.train_dit and b.fp is not None and cfg.beta_velocity > 0:  # nft / awm: at the drawn (x_t, t)
        from .forward_rl import frozen_velocities

        b.fp.v_ref = frozen_velocities(ref, b, b.fp, micro_batch)
    elif scenario.train_dit and b.traj is not None and cfg.beta_velocity > 0:
        steps = b.traj.trained_steps()
        vs = []
        for idx in chunks:
            cond = ref.condition(b.cond_ids[idx], b.cond_mask[idx], _rows(b.cond_vision, idx))
            vs.append(replay_velocity(ref, b.traj, steps, rows=idx, conditioning=cond)[0])
        b.ref_velocity = torch.cat(vs, 1)
    return b


def text_loss(model, cfg, b: Batch, idx, adv, n_total_tokens):
    """GRPO-family loss on the completions of rows `idx`; returns (loss scaled for accumulation, metrics).
    With beta > 0 the reference log-probs come from `reference_outputs` (b.ref_logp).

    Old log-probs (cfg.old_logp_lm): "rollout" (default) the sampler's (the decode's, with a KV cache); "replay"
    the LM head's on this forward's hidden states, detached (one extra head pass, no extra decoder forward): on the
    reference path they are the bits the loss computes, so the first ratio is exactly 1; the Triton loss and
    log-prob kernels may round differently. Metric (replay) logp_mismatch: max |replay - sampler log-prob|."""
    out = b.text
    P = out.prompt_ids.shape[1]
    ids, mask, pos = _sequences(b, idx)
    hidden = _last_hidden(model.lm, b, idx, ids, mask, pos)
    h = hidden[:, P - 1:-1]
    head = model.lm.get_output_embeddings()
    kw = {}
    if cfg.beta > 0:
        if b.ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs: call reference_outputs(...) first")
        kw["ref_logp"] = b.ref_logp[idx]
    loss_type = "dapo" if cfg.loss_type in ("bnpo", "dapo") else cfg.loss_type
    if loss_type == "dapo":
        kw["num_tokens"] = max(n_total_tokens, 1)
    bias, targets, cmask = getattr(head, "bias", None), out.completion_ids[idx], out.completion_mask[idx]
    old = out.logprobs[idx]
    if cfg.old_logp_lm == "replay":  # the head on these hidden states, as the loss computes it, without the graph
        with torch.no_grad():
            old = fused_linear_logprobs(h.detach(), head.weight, targets, bias=bias, temperature=cfg.temperature,
                                        impl=cfg.impl)[0]
    loss, m = fused_linear_policy_loss(h, head.weight, targets, old, adv, cmask, bias=bias,
                                       temperature=cfg.temperature, loss_type=loss_type, eps_low=cfg.eps_low,
                                       eps_high=cfg.eps_high, beta=cfg.beta, kl="k3",
                                       max_completion_length=cfg.max_new_tokens, impl=cfg.impl, **kw)
    if cfg.old_logp_lm == "replay":  # replay vs sampler on the valid tokens
        gap = torch.where(cmask.bool(), (old.float() - out.logprobs[idx].float()).abs(), 0.0)
        m = {**m, "logp_mismatch": gap.max() if gap.numel() else gap.sum()}
    scale = 1.0 if loss_type == "dapo" else len(idx) / len(b.tasks)
    return loss * scale, m


def replay_window(model, cfg, b: Batch, idx) -> tuple:
    """The trained window of rows `idx` replayed with gradients: (velocities, log-probs [S, B_idx], the velocity-MSE
    keywords of flow_policy_loss: the reference's velocities when beta_velocity > 0, else none)."""
    traj = b.traj
    steps = traj.trained_steps()
    cond = model.condition(b.cond_ids[idx], b.cond_mask[idx], _rows(b.cond_vision, idx))
    v, x = replay_velocity(model, traj, steps, rows=idx, conditioning=cond)
    p = traj.params
    logp = flow_step_logprob(v, x, traj.next_samples[steps][:, idx], traj.sigmas[steps][:, idx],
                             traj.sigmas_next[steps][:, idx], noise_level=p.noise_level, sde=p.sde,
                             sigma_max=traj.sigma_max, impl=cfg.impl, logprob=p.logprob)
    kw = {}
    if cfg.beta_velocity > 0:
        if b.ref_velocity is None:
            raise ValueError("beta_velocity > 0 needs the reference velocities: call reference_outputs(...) first")
        kw = dict(velocity=v, ref_velocity=b.ref_velocity[:, idx], beta_velocity=cfg.beta_velocity)
    return v, logp, kw


def image_loss(model, cfg, b: Batch, idx, adv):
    """Flow-GRPO loss on the trained window of rows `idx`; returns (loss scaled for accumulation, metrics).
    With beta_velocity > 0 the reference velocities come from `reference_outputs` (b.ref_velocity).

    Old log-probs (cfg.old_logp): "replay" takes this replay's own, detached. Every micro-batch of a step runs
    before its one optimizer step, so the policy that sampled is the one replayed here, and a separate no-grad
    replay of the same rows in the same call would compute these very numbers: the ratio is exactly 1 (not
    1 + round-off of the sampler's per-step calls against this batched one), at no extra forward. "rollout" takes
    the sampler's. Metrics ratio_exact = max |ratio - 1| and logp_mismatch = max |replay - sampler log-prob| (a
    numerics gap between the rollout and training paths shows there; the trainer keeps their max over the step)."""
    v, logp, kw = replay_window(model, cfg, b, idx)
    rollout_logp = b.traj.log_probs[b.traj.trained_steps()][:, idx]
    old = logp.detach() if cfg.old_logp == "replay" else rollout_logp
    loss, m = flow_policy_loss(logp, old, adv, clip_range=cfg.flow_clip_range, impl=cfg.impl, **kw)
    lp, old = logp.detach().float(), old.float()
    m = {**m, "ratio_exact": ((lp - old).exp() - 1).abs().max(),  # the ratio as the loss forms it, exp(logp - old)
         "logp_mismatch": (lp - rollout_logp.float()).abs().max()}  # replay vs sampler: round-off or a numerics gap
    return loss * (len(idx) / len(b.tasks)), m
