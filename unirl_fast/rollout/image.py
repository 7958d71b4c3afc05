"""Flow-matching image rollout with per-step log-probs (Flow-GRPO / Flow-GRPO-Fast / UniGRPO CFG-free).

Schedule (`rollout.schedule`): T steps from sigma = 1 to 0, "linspace" (DanceGRPO: s_i = 1 - i / T) or "diffusers"
(FlowMatchEulerDiscreteScheduler's sigmas), time-shifted as shift s / (1 + (shift - 1) s). Step i goes
sigma_i -> sigma_{i+1} with `flow_sde_step` (FORMULAS.md section 4): "sde", "cps" or "ode". The "sde" kind needs
sigma_max (the schedule's second-largest sigma) where sigma == 1: this engine passes sigma_1.

Flow-GRPO-Fast window: only steps in [window_start, window_start + window_size) are stochastic (and trainable);
the rest are ODE steps (deterministic, no log-prob). Without a window every step is stochastic, except that a
"cps" step into sigma = 0 has zero variance, so with sde="cps" the last step is always ODE.

Guidance: CFG-free by default (one conditional DiT pass per step, UniGRPO). With guidance_scale != 1 the
conditional and unconditional (empty-prompt) branches run as one 2B batch and v = v_u + w (v_c - v_u)
(`cfg_velocity`); that costs about twice the DiT FLOPs per step.

Trajectory record (`ImageTrajectory`): every step in one tensor each, step-major: samples / next_samples
[T, B, C, h, w] fp32, sigmas / sigmas_next [T, B], log_probs [T, B] (0 at ODE steps), trainable [T] bool.
`replay_logprobs` recomputes the log-probs of the trainable steps in one batched DiT call of T_train * B rows
with `flow_step_logprob` on the stored (sample, next_sample) pairs: with unchanged weights it reproduces the
rollout's log-probs (up to float round-off of the batched DiT call).
Memory: 2 T B C h w fp32 for the record (at 512 px, DC-AE: 2 * 10 * 64 * 32 * 16 * 16 * 4 B = 42 MB).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import _checks as C
from ..fp8.linear import has_fp8_layers, with_fp8_weight_cache
from ..models.unified import Conditioning
from ..ops import cfg_velocity, flow_sde_step, flow_step_logprob
from ..ops.flow import LOGPROB_KINDS, check_schedule
from .schedule import SCHEDULES, timestep_schedule

SDE_KINDS = ("sde", "cps", "ode")


@dataclass(frozen=True)
class ImageSamplingParams:
    num_steps: int = 10
    shift: float = 3.0
    sde: str = "sde"
    noise_level: float = 0.7
    window_start: int = 0
    window_size: int | None = None
    guidance_scale: float = 1.0
    decode: bool = True
    logprob: str = "gaussian"  # "flow_grpo": Flow-GRPO's cps step score -(x_next - mean)^2 (FORMULAS.md 4)
    schedule: str = "linspace"  # or "diffusers" (rollout.schedule)

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps <= 0:
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        C.check_finite_scalar("shift", self.shift, positive=True)
        if self.sde not in SDE_KINDS:
            raise ValueError(f"sde must be one of {SDE_KINDS}, got {self.sde!r}")
        C.check_finite_scalar("noise_level", self.noise_level, nonneg=True)
        if self.sde == "sde" and self.noise_level == 0:
            raise ValueError("noise_level=0 makes the 'sde' step deterministic; use sde='ode'")
        if self.sde == "cps" and not 0 < self.noise_level <= 1:
            raise ValueError(f"noise_level for sde='cps' must be in (0, 1], got {self.noise_level!r}")
        if self.sde != "ode" and self.num_steps < 2:
            raise ValueError(f"sde={self.sde!r} needs num_steps >= 2 (its std uses the second-largest sigma)")
        if not 0 <= self.window_start < self.num_steps:
            raise ValueError(f"window_start={self.window_start} must be in [0, num_steps={self.num_steps})")
        if self.window_size is not None and not 0 < self.window_size <= self.num_steps - self.window_start:
            raise ValueError(f"window_size={self.window_size} must be in [1, num_steps - window_start = "
                             f"{self.num_steps - self.window_start}]")
        C.check_finite_scalar("guidance_scale", self.guidance_scale)
        C.check_option("logprob", self.logprob, LOGPROB_KINDS)
        C.check_option("schedule", self.schedule, SCHEDULES)

    @property
    def cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def stochastic_steps(self) -> torch.Tensor:
        """[T] bool: which steps are SDE steps (and so carry a log-prob and are trainable)."""
        T = self.num_steps
        on = torch.zeros(T, dtype=torch.bool)
        if self.sde != "ode":
            end = T if self.window_size is None else self.window_start + self.window_size
            on[self.window_start:end] = True
            if self.sde == "cps":
                on[T - 1] = False
        return C.mark_host_resident(on)


@dataclass
class ImageTrajectory:
    samples: torch.Tensor
    next_samples: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor
    log_probs: torch.Tensor
    trainable: torch.Tensor
    latents: torch.Tensor
    conditioning: Conditioning
    params: ImageSamplingParams
    sigma_max: float
    uncond: Conditioning | None = None
    source_latents: torch.Tensor | None = None
    images: torch.Tensor | None = None
    train_steps: torch.Tensor | None = None  # [S] long on the device: the trainable steps (see trained_steps)

    def trained_steps(self) -> torch.Tensor:
        """[S] long, on the trajectory's device: the trainable steps. The sampler makes it once from its host-side
        schedule (no device read); for a trajectory built without it, `trainable` is read once (one host sync)."""
        if self.train_steps is None:
            self.train_steps = self.trainable.nonzero().flatten()
        return self.train_steps


def guided_velocity(model, x, sigma, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
                    source_latents=None) -> torch.Tensor:
    """v at (x, sigma): one conditional pass, or (with uncond) one 2B pass combined by `cfg_velocity`."""
    if uncond is None:
        return model.velocity(x, sigma, cond, source_latents)
    B = x.shape[0]
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(B)
    src = None if source_latents is None else torch.cat([source_latents, source_latents])
    v = model.velocity(torch.cat([x, x]), torch.cat([sig, sig]), cond.cat(uncond), src)
    return cfg_velocity(v[B:], v[:B], guidance_scale)


class ImageEngine:
    """Image rollouts of a `UnifiedModel` (see the module docstring).

    Example:
        >>> eng = ImageEngine(model)
        >>> traj = eng.generate(ids, mask, ImageSamplingParams(num_steps=10, window_size=2), generator=g)
        >>> logp = replay_logprobs(model, traj)          # [T_train, B], differentiable in the DiT
    """

    def __init__(self, model, *, impl: str = "auto", compile: bool = False):
        """compile: run each sampler step (DiT velocity, guidance and `flow_sde_step`) as one
        torch.compile(fullgraph=True) graph; None = on when the model is on CUDA and has no FP8Linear layer (True
        with one is an error: their weight cache reads storage pointers). Keep a compiling engine for many calls
        (a trainer keeps one per run): its graphs belong to it. The noise is drawn outside the graph, exactly as
        the op draws it, so compiled and eager sampling use the same random numbers."""
        C.check_impl(impl)
        self.model = model
        self.impl = impl  # the SDE step's backend ("reference" = eager PyTorch; "triton" never falls back)
        fp8 = has_fp8_layers(model)
        if compile and fp8:
            raise ValueError("compile=True: this model has FP8Linear layers, whose weight cache a compiled graph "
                             "cannot hold; use compile=None or False")
        self.compile = (model.device.type == "cuda" and not fp8) if compile is None else bool(compile)
        self._step = torch.compile(self.step, fullgraph=True, dynamic=False) if self.compile else self.step

    def step(self, x, s, s_next, noise, sigma_max, cond, uncond, source_latents, params, kind):
        """One sampler step: (next sample, log-prob or None) from x at sigmas s -> s_next ([B] device tensors);
        noise [B, ...] standard normal (None for an ODE step)."""
        v = guided_velocity(self.model, x, s, cond, uncond, params.guidance_scale, source_latents)
        nxt, lp, _, _ = flow_sde_step(v, x, s, s_next, noise=noise, noise_level=params.noise_level, sde=kind,
                                      sigma_max=sigma_max if kind == "sde" else None, impl=self.impl,
                                      logprob=params.logprob)
        return nxt, lp

    @torch.no_grad()
    @with_fp8_weight_cache("model")  # one FP8 weight quantization per layer per call
    def generate(self, input_ids, attention_mask=None, params: ImageSamplingParams = ImageSamplingParams(), *,
                 source_images=None, generator=None, noise=None, vision=None) -> ImageTrajectory:
        """Prompts [B, L] (left-padded) -> ImageTrajectory. noise: optional initial latents [B, C, h, w].
        vision: the images a vision-language LM sees while conditioning (`UnifiedModel.condition`'s `images`)."""
        m = self.model
        cond = m.condition(input_ids, attention_mask, vision)
        B = input_ids.shape[0]
        uncond = m.null_condition(B) if params.cfg else None
        src = m.encode_images(source_images) if source_images is not None else None
        return self.sample(cond, params, uncond=uncond, source_latents=src, generator=generator, noise=noise)

    @torch.no_grad()
    @with_fp8_weight_cache("model")
    def sample(self, cond: Conditioning, params: ImageSamplingParams, *, uncond=None, source_latents=None,
               generator=None, noise=None) -> ImageTrajectory:
        """The sampling loop from precomputed conditioning (cond [B, N, D]; uncond needed when params.cfg)."""
        m = self.model
        if params.cfg and uncond is None:
            raise ValueError(f"guidance_scale={params.guidance_scale} needs the unconditional branch (uncond)")
        B, dev, T = cond.cond.shape[0], cond.cond.device, params.num_steps
        shape = (B, *m.latent_shape)
        if noise is None:
            x = torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
        else:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape}")
            x = noise.float()
        # the schedule and which steps are stochastic are made on the host and copied once: no device read-back
        # (sync) for sigma_max or a step's kind, and the steps take device views (no per-step host-to-device copy)
        sig_host = C.mark_host_resident(timestep_schedule(T, params.shift, kind=params.schedule))
        sig = sig_host.to(dev)
        sigma_max = sig_host.tolist()[1] if T > 1 else 0.0  # unused by ode
        on = params.stochastic_steps()
        kinds = [params.sde if o else "ode" for o in on.tolist()]
        check_schedule(sig_host.tolist(), kinds, sigma_max, params.logprob)  # once, on the host
        samples = torch.empty((T, *shape), device=dev)
        next_samples = torch.empty((T, *shape), device=dev)
        logps = torch.zeros(T, B, device=dev)
        for i in range(T):
            s, s_next = sig[i].expand(B), sig[i + 1].expand(B)
            eps = None if kinds[i] == "ode" else torch.randn(shape, generator=generator, device=dev,
                                                             dtype=torch.float32)  # as flow_sde_step draws it
            with C.paused_in_loop() if i else contextlib.nullcontext():  # step 0 checked: weights, first inputs
                nxt, lp = self._step(x, s, s_next, eps, sig[1], cond, uncond, source_latents, params, kinds[i])
            samples[i], next_samples[i] = x, nxt
            if lp is not None:
                logps[i] = lp
            x = nxt
        C.check_finite("the trajectory's log-probs (a later sampler step produced NaN/inf; set_checks('full') checks "
                       "every step)", logps)
        C.check_finite("the final latents (a sampler step produced NaN/inf; set_checks('full') checks every step)", x)
        images = m.decode_latents(x) if params.decode else None
        return ImageTrajectory(samples, next_samples, sig[:-1, None].expand(T, B).contiguous(),
                               sig[1:, None].expand(T, B).contiguous(), logps, on.to(dev), x, cond.detach(),
                               params, sigma_max, None if uncond is None else uncond.detach(), source_latents,
                               images, train_steps=torch.nonzero(on).flatten().to(dev))


def replay_velocity(model, traj: ImageTrajectory, steps, *, rows=None, conditioning: Conditioning | None = None,
                    uncond: Conditioning | None = None):
    """The model's velocities on the stored samples of `steps` (a 1-D index tensor) for batch rows `rows`
    (default all): one DiT call on len(steps) * len(rows) rows. Returns (v, x), both [S, R, C, h, w].

    `conditioning` / `uncond` are for the selected rows (e.g. recomputed with gradients through the LM and
    connector); by default the trajectory's own, cut to `rows`."""
    p = traj.params
    S = steps.numel()
    r = slice(None) if rows is None else rows

    def pick(c):
        return None if c is None else Conditioning(c.cond[r], None if c.pooled is None else c.pooled[r])

    def rep(c):
        return None if c is None else Conditioning(c.cond.repeat(S, 1, 1),
                                                   None if c.pooled is None else c.pooled.repeat(S, 1))

    cond = pick(traj.conditioning) if conditioning is None else conditioning
    unc = pick(traj.uncond) if uncond is None else uncond
    x, sig = traj.samples[steps][:, r], traj.sigmas[steps][:, r]
    src = None if traj.source_latents is None else traj.source_latents[r].repeat(S, 1, 1, 1)
    v = guided_velocity(model, x.flatten(0, 1), sig.flatten(), rep(cond), rep(unc) if p.cfg else None,
                        p.guidance_scale, src)
    return v.view(x.shape), x


def replay_logprobs(model, traj: ImageTrajectory, *, conditioning: Conditioning | None = None,
                    uncond: Conditioning | None = None, steps=None, impl: str = "auto") -> torch.Tensor:
    """Log-probs [S, B] fp32 of the stored transitions at `steps` (default: the trainable ones, S of them) under
    the model's current weights: one DiT call on S * B rows (`replay_velocity`), then `flow_step_logprob`.
    Differentiable in the DiT (and in `conditioning` / `uncond` when given, e.g. recomputed with gradients
    through the LM and connector)."""
    p = traj.params
    idx = traj.trained_steps() if steps is None else torch.as_tensor(steps, device=traj.samples.device)
    if idx.numel() == 0:
        raise ValueError("no trainable steps to replay (an all-ODE trajectory has no log-probs)")
    if p.sde == "ode":
        raise ValueError("an sde='ode' trajectory has no log-probs to replay")
    v, x = replay_velocity(model, traj, idx, conditioning=conditioning, uncond=uncond)
    return flow_step_logprob(v, x, traj.next_samples[idx], traj.sigmas[idx], traj.sigmas_next[idx],
                             noise_level=p.noise_level, sde=p.sde, sigma_max=traj.sigma_max if p.sde == "sde" else None,
                             impl=impl, logprob=p.logprob)
