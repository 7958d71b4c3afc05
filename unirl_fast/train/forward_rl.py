"""Forward-process image RL: DiffusionNFT (`--image-algo nft`) and Advantage Weighted Matching (`awm`).

Flow-GRPO scores the reverse (denoising) steps of an SDE rollout. These two train on the *forward* (noising)
process instead: the rollout can be any sampler (here the CFG-free ODE, with as few steps as the user likes), and
the loss is flow matching on the rollout's clean images x0, weighted by the group advantage:

    per sample i and trained timestep t (fresh noise eps):  x_t = (1 - t) x0_i + t eps,  u = eps - x0_i
    nft: contrast an implicit positive and negative policy built from the current velocity v and the old policy's
         v_old (an EMA of the trained weights); loss = A_max (r l+ + (1 - r) l-) / b, r the advantage mapped to [0, 1]
    awm: the pretraining loss |v - u|^2 with a generalised-Huber weighting, times clip(A) / A_max, plus a KL to an
         EMA policy; its PPO ratio is exactly 1 on-policy, so the gradient is the weighted matching loss's.
Both add beta_velocity * mean (v - v_ref)^2 to the frozen reference (the base, or the base with adapters off under
LoRA). The math and its sources are in `unirl_fast.ops.forward_loss` (the fused op this module calls).

Per step: rollout (ODE) -> rewards -> advantages (std over the whole batch, as both papers' code) -> for every
sample K timesteps and their noise are drawn once -> the old (EMA) policy's velocities ("old" phase, no grad) and
the reference's ("ref" phase) on those (x_t, t) -> per micro-batch one DiT call on K x micro rows with gradients
and the fused loss -> optimizer step -> the old policy moves: o <- d o + (1 - d) w, d = min(rate n, cap) after the
n-th step (NFT: rate 0.001, cap 0.5; AWM: cap 0.3). With cap 0 the old policy is the current weights at the start
of every step, so v_old is the detached current velocity and its forward is skipped (exactly equal: the weights do
not change inside a step).

Timesteps (indices into the rollout's sigma schedule sigma_0 = 1 > ... > sigma_{T-1}, the first
int(T x fraction) of them): "uniform" draws K distinct indices per sample (K = all of them is NFT's setting, which
trains every one of the first 90 %); "stratified" is AWM's `discrete_wo_init`: K equal strata of indices
[1, int(T x fraction)) (t = 1 excluded), one random index in each (AWM draws one set per micro-batch; we draw per
sample, the same marginal).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.unified import Conditioning
from ..rollout.schedule import timestep_schedule
from .ema import ParamEMA

IMAGE_ALGOS = ("flow_grpo", "nft", "awm")
TIMESTEP_SAMPLING = ("uniform", "stratified")


def timestep_range(cfg) -> tuple[int, int]:
    """[start, end) of the schedule indices the trained timesteps come from."""
    end = int(cfg.image_steps * cfg.fp_timestep_fraction)
    return (1 if cfg.fp_timestep_sampling == "stratified" else 0), end


def num_timesteps(cfg) -> int:
    """K, the trained timesteps per sample (fp_timesteps, or every index of the range)."""
    start, end = timestep_range(cfg)
    return cfg.fp_timesteps if cfg.fp_timesteps is not None else max(0, end - start)


def check_config(cfg, scenario) -> None:
    """The forward-process settings a run can use (called by TrainConfig.validate's caller with the scenario)."""
    if cfg.image_algo == "flow_grpo":
        return
    if not (scenario.draws and scenario.train_dit):
        raise ValueError(f"bad config: image_algo {cfg.image_algo!r} trains the DiT and scenario {scenario.name!r} "
                         "does not (use it with generate, edit, reason-generate or reason-edit)")
    start, end = timestep_range(cfg)
    k = num_timesteps(cfg)
    if end - start < 1:
        raise ValueError(f"bad config: no trainable timestep: image_steps {cfg.image_steps} x fp_timestep_fraction "
                         f"{cfg.fp_timestep_fraction} leaves schedule indices [{start}, {end}) "
                         f"({cfg.fp_timestep_sampling} sampling); raise either")
    if not 1 <= k <= end - start:
        raise ValueError(f"bad config: fp_timesteps {cfg.fp_timesteps} must be in [1, {end - start}] (the schedule "
                         f"indices [{start}, {end}) the {cfg.fp_timestep_sampling} sampling draws from)")
    if cfg.zero_stage is not None:
        raise ValueError(f"bad config: image_algo {cfg.image_algo!r} under DeepSpeed (zero_stage {cfg.zero_stage}) is "
                         "not supported yet (its old policy is a per-process copy of the trained weights)")


def draw_timesteps(cfg, B: int, generator, device) -> torch.Tensor:
    """Schedule indices [K, B] of each sample's trained timesteps."""
    start, end = timestep_range(cfg)
    k = num_timesteps(cfg)
    if cfg.fp_timestep_sampling == "uniform":
        order = torch.rand(B, end - start, generator=generator, device=device).argsort(dim=1)
        return order[:, :k].t() + start
    edges = torch.linspace(start, end, k + 1, dtype=torch.float64).long().to(device)
    lo, hi = edges[:-1], edges[1:]
    u = torch.rand(k, B, generator=generator, device=device)
    return lo[:, None] + (u * (hi - lo)[:, None]).long()


@dataclass
class ForwardBatch:
    """What the forward-process loss needs for a step's batch, drawn once before training."""
    t: torch.Tensor  # [K, B] fp32 noise levels (sigmas)
    noise: torch.Tensor  # [K, B, C, h, w] fp32
    x0: torch.Tensor  # [B, C, h, w] fp32, the rollout's clean samples
    v_old: torch.Tensor | None = None  # [K, B, C, h, w] the old (EMA) policy's velocities
    v_ref: torch.Tensor | None = None  # [K, B, C, h, w] the frozen reference's

    def x_t(self, idx) -> torch.Tensor:
        t = self.t[:, idx].view(*self.t[:, idx].shape, *([1] * (self.x0.dim() - 1)))
        return (1 - t) * self.x0[idx] + t * self.noise[:, idx]


def draw(cfg, b, generator) -> ForwardBatch:
    """Timesteps and noise for every sample of the rolled-out batch `b` (b.traj.latents are its clean samples)."""
    x0 = b.traj.latents.float()
    B, dev = x0.shape[0], x0.device
    from .config import image_schedule

    kind, shift = image_schedule(cfg)  # the schedule the evaluation samples with
    sig = timestep_schedule(cfg.image_steps, shift, kind=kind).to(dev)
    t = sig[draw_timesteps(cfg, B, generator, dev)]
    noise = torch.randn((t.shape[0], *x0.shape), generator=generator, device=dev)
    return ForwardBatch(t, noise, x0)


def _repeat(c: Conditioning, k: int) -> Conditioning:
    return Conditioning(c.cond.repeat(k, 1, 1), None if c.pooled is None else c.pooled.repeat(k, 1))


def velocities(model, b, fb: ForwardBatch, idx, cond: Conditioning | None = None) -> torch.Tensor:
    """The model's velocities [K, R, C, h, w] at (x_t, t) for rows `idx`, in one DiT call on K x R rows.
    `cond`: the rows' conditioning (recomputed with gradients by the loss); by default computed here."""
    if cond is None:
        from .rl import _rows

        cond = model.condition(b.cond_ids[idx], b.cond_mask[idx], _rows(b.cond_vision, idx))
    x = fb.x_t(idx)
    k = x.shape[0]
    src = None if b.traj.source_latents is None else b.traj.source_latents[idx].repeat(k, 1, 1, 1)
    v = model.velocity(x.flatten(0, 1), fb.t[:, idx].flatten(), _repeat(cond, k), src)
    return v.view(x.shape)


@torch.no_grad()
def frozen_velocities(model, b, fb: ForwardBatch, micro_batch: int) -> torch.Tensor:
    """A frozen policy's (old or reference) velocities [K, B, C, h, w] for the whole batch, in micro-batches."""
    B = fb.x0.shape[0]
    return torch.cat([velocities(model, b, fb, torch.arange(s, min(s + micro_batch, B)))
                      for s in range(0, B, micro_batch)], 1).float()


def old_is_current(cfg) -> bool:
    """Whether the old policy equals the weights at the start of every step (decay cap 0): no old forward."""
    return cfg.old_decay_max == 0 or cfg.old_decay_rate == 0


def needs_old(cfg) -> bool:
    """Whether the loss reads the old policy's velocities (NFT always; AWM for its EMA KL)."""
    return cfg.image_algo == "nft" or cfg.beta_old > 0


def forward_image_loss(model, cfg, b, idx, adv):
    """The forward-process loss on rows `idx` (b.fp drawn, b.fp.v_old / v_ref filled); returns (loss scaled for
    accumulation over the batch, metrics)."""
    from .. import forward_process_loss
    from .rl import _rows

    fb = b.fp
    cond = model.condition(b.cond_ids[idx], b.cond_mask[idx], _rows(b.cond_vision, idx))
    v = velocities(model, b, fb, idx, cond)
    k = v.shape[0]
    v_old = None
    if needs_old(cfg):
        v_old = v.detach() if fb.v_old is None else fb.v_old[:, idx]
    v_ref = None if fb.v_ref is None else fb.v_ref[:, idx]
    loss, m = forward_process_loss(
        v.flatten(0, 1), None if v_old is None else v_old.flatten(0, 1), fb.x0[idx].repeat(k, 1, 1, 1),
        fb.noise[:, idx].flatten(0, 1), fb.t[:, idx].flatten(), adv.repeat(k), algo=cfg.image_algo,
        v_ref=None if v_ref is None else v_ref.flatten(0, 1), beta_kl=cfg.beta_velocity if v_ref is not None else 0.0,
        nft_beta=cfg.nft_beta, adv_clip=cfg.fp_adv_clip, awm_power=cfg.awm_power, beta_old=cfg.beta_old,
        impl=cfg.impl)
    return loss * (len(idx) / fb.x0.shape[0]), m


class OldPolicy(ParamEMA):
    """The old policy of NFT / AWM: an average of the trained weights that moves once per step. After the n-th
    step (n = 1, 2, ...): o <- d o + (1 - d) w with d = min(rate n, cap) (NFT's decay_type 1: 0.001, 0.5; AWM's
    linear kl_ema decay: 0.001, 0.3). Starts as the weights it is built from."""

    def __init__(self, model, rate: float, cap: float):
        super().__init__(model, cap)
        self.rate = rate

    def decay_now(self) -> float:
        return min(self.rate * self.n, self.decay)

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = self.decay_now()
        for k, p in self.params.items():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rate": self.rate}
