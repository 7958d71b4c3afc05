"""Flow-matching image rollout with per-step log-probs (Flow-GRPO / Flow-GRPO-Fast / UniGRPO CFG-free).

Schedule (`rollout.schedule`): T steps from sigma = 1 to 0, "linspace" (DanceGRPO: s_i = 1 - i / T) or "diffusers"
(FlowMatchEulerDiscreteScheduler's sigmas), time-shifted as shift s / (1 + (shift - 1) s). Step i goes
sigma_i -> sigma_{i+1} with `flow_sde_step` (FORMULAS.md section 4): "sde", "cps" or "ode". The "sde" kind needs
sigma_max (the schedule's second-largest sigma) where sigma == 1: this engine passes sigma_1.

Flow-GRPO-Fast window: only steps in [window_start, window_start + window_size) are stochastic (and trainable);
the rest are ODE steps (deterministic, no log-prob). Without a window every step is stochastic, except that a
"cps" step into sigma = 0 has zero variance, so with sde="cps" the last step is always ODE.

Shared prefixes (`branch_at` with `sample(branches=...)`): the first K steps run once per prefix (rows with one
prompt), then every row continues from its prefix's sample: K P + (T - K) B DiT rows instead of T B, the recorded
prefixes bit-identical copies. ODE solver (`ode_solver`): "euler", or "dpm2", DPM-Solver++(2M) as the Euler step plus
c_i (x0_i - x0_{i-1}) with host-side coefficients (`rollout.schedule.dpm2_coefficients`, FORMULAS.md section 4); the
stochastic steps never change. `ode_tail` < 1 re-spaces the ODE steps after the last stochastic one into fewer, so a
trajectory may hold fewer than num_steps steps (`ImageSamplingParams.plan`).

Guidance: CFG-free by default (one conditional DiT pass per step, UniGRPO). With guidance_scale != 1 the
conditional and unconditional (empty-prompt) branches run as one 2B batch and v = v_u + w (v_c - v_u)
(`cfg_velocity`); that costs about twice the DiT FLOPs per step.

Trajectory record (`ImageTrajectory`): every step in one tensor each, step-major: samples / next_samples
[T, B, C, h, w] fp32, sigmas / sigmas_next [T, B], log_probs [T, B] (0 at ODE steps), trainable [T] bool.
`replay_logprobs` recomputes the log-probs of the trainable steps in one batched DiT call of T_train * B rows
with `flow_step_logprob` on the stored (sample, next_sample) pairs: with unchanged weights it reproduces the
rollout's log-probs up to float round-off of the batched DiT call (the trainer's `--old-logp replay` takes the
training replay's own log-probs as the old ones, so its first ratio is exactly 1).
Memory: 2 T B C h w fp32 for the record (at 512 px, DC-AE: 2 * 10 * 64 * 32 * 16 * 16 * 4 B = 42 MB).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import _checks as C
from .. import _stop
from ..fp8.linear import has_fp8_layers, with_fp8_weight_cache
from ..models.unified import Conditioning
from ..ops import cfg_velocity, flow_sde_step, flow_step_logprob
from ..ops.flow import LOGPROB_KINDS, check_schedule
from .schedule import ODE_SOLVERS, SCHEDULES, compress_tail, dpm2_coefficients, timestep_schedule

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
    branch_at: int | None = None  # K: the first K steps run once per prefix (see `ImageEngine.sample`'s branches)
    ode_solver: str = "euler"  # or "dpm2": DPM-Solver++(2M) on the ODE steps (rollout.schedule.dpm2_coefficients)
    ode_tail: float = 1.0  # < 1: the ODE steps after the last stochastic one re-spaced into fewer (compress_tail)

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
        C.check_option("ode_solver", self.ode_solver, ODE_SOLVERS)
        C.check_finite_scalar("ode_tail", self.ode_tail, positive=True)
        if self.ode_tail > 1:
            raise ValueError(f"ode_tail must be in (0, 1] (the share of the ODE tail steps kept), got {self.ode_tail}")
        if self.ode_tail < 1 and self.sde == "ode":
            raise ValueError(f"ode_tail={self.ode_tail} re-spaces the ODE steps after the last stochastic one, and an "
                             "sde='ode' rollout has none: give fewer num_steps instead")
        self._check_branch()

    def _check_branch(self):
        K, on = self.branch_at, self.stochastic_steps().tolist()
        if K is None:
            return
        if isinstance(K, bool) or not isinstance(K, int) or not 0 <= K < self.num_steps:
            raise ValueError(f"branch_at must be an int in [0, num_steps={self.num_steps}), got {K!r}")
        if True not in on:
            raise ValueError(f"branch_at={K}: the rollout has no stochastic step (sde={self.sde!r}, window "
                             f"{self.window_start}+{self.window_size}), so every branch would be the same sample")
        if K > on.index(True):
            raise ValueError(f"branch_at={K} is after the window start {on.index(True)}: the shared prefix may hold "
                             "no stochastic (trained) step")

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

    def plan(self) -> tuple[list, list, list]:
        """The rollout's steps, on the host: sigmas [T' + 1], kinds [T'] ("ode" or the sde kind) and the solver's
        per-step correction coefficients [T'] (all 0 for Euler). T' = num_steps unless ode_tail < 1 re-spaces the
        ODE steps after the last stochastic one."""
        sig = C.mark_host_resident(timestep_schedule(self.num_steps, self.shift, kind=self.schedule)).tolist()
        on = self.stochastic_steps().tolist()
        if self.ode_tail < 1 and True in on:
            last = len(on) - 1 - on[::-1].index(True)
            sig = compress_tail(sig, last + 1, self.ode_tail, self.shift)
            on = on[:last + 1] + [False] * (len(sig) - 2 - last)
        kinds = [self.sde if o else "ode" for o in on]
        coef = dpm2_coefficients(sig, kinds) if self.ode_solver == "dpm2" else [0.0] * len(kinds)
        return sig, kinds, coef


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
    dit_rows: int | None = None  # rows the sampler's DiT calls ran (per guidance branch): T B, less with branching
    kinds: list | None = None  # [T] each step's kind ("ode" or the sde kind), on the host

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
        """One sampler step: (next sample, log-prob or None, velocity) from x at sigmas s -> s_next ([B] device
        tensors); noise [B, ...] standard normal (None for an ODE step)."""
        v = guided_velocity(self.model, x, s, cond, uncond, params.guidance_scale, source_latents)
        nxt, lp, _, _ = flow_sde_step(v, x, s, s_next, noise=noise, noise_level=params.noise_level, sde=kind,
                                      sigma_max=sigma_max if kind == "sde" else None, impl=self.impl,
                                      logprob=params.logprob)
        return nxt, lp, v

    @torch.no_grad()
    @with_fp8_weight_cache("model")  # one FP8 weight quantization per layer per call
    def generate(self, input_ids, attention_mask=None, params: ImageSamplingParams = ImageSamplingParams(), *,
                 source_images=None, generator=None, noise=None, vision=None, branches=None) -> ImageTrajectory:
        """Prompts [B, L] (left-padded) -> ImageTrajectory. noise: optional initial latents [B, C, h, w] ([P, ...]
        with `branches`, see `sample`). vision: the images a vision-language LM sees while conditioning
        (`UnifiedModel.condition`'s `images`)."""
        m = self.model
        cond = m.condition(input_ids, attention_mask, vision)
        B = input_ids.shape[0]
        uncond = m.null_condition(B) if params.cfg else None
        src = m.encode_images(source_images) if source_images is not None else None
        return self.sample(cond, params, uncond=uncond, source_latents=src, generator=generator, noise=noise,
                           branches=branches)

    @torch.no_grad()
    @with_fp8_weight_cache("model")
    def sample(self, cond: Conditioning, params: ImageSamplingParams, *, uncond=None, source_latents=None,
               generator=None, noise=None, branches=None) -> ImageTrajectory:
        """The sampling loop from precomputed conditioning (cond [B, N, D]; uncond needed when params.cfg).

        Branching (params.branch_at = K with `branches`, a host [B] long tensor or list of prefix ids 0..P-1): the
        rows of one prefix id must have the same conditioning (one prompt); the first K steps run on P rows (the
        first row of each prefix, from P initial latents: `noise` is then [P, C, h, w]) and at step K every row
        takes its prefix's sample, so the DiT runs K P + (T - K) B rows instead of T B and the branches' recorded
        prefixes are bit-identical copies."""
        m = self.model
        if params.cfg and uncond is None:
            raise ValueError(f"guidance_scale={params.guidance_scale} needs the unconditional branch (uncond)")
        B, dev = cond.cond.shape[0], cond.cond.device
        pre = _prefix_rows(branches, params.branch_at, B)  # (first row of each prefix, row -> prefix) or None
        P = B if pre is None else len(pre[0])
        x = _initial_latents(noise, (P, *m.latent_shape), generator, dev)
        # the schedule, each step's kind and the solver's coefficients are made on the host and copied once: no
        # device read-back (sync) for sigma_max or a step's kind, and the steps take device views (no per-step copy)
        sig_list, kinds, coef = params.plan()
        T, sig = len(kinds), torch.tensor(sig_list, dtype=torch.float32, device=dev)
        sigma_max = sig_list[1] if len(sig_list) > 2 else 0.0  # unused by ode
        check_schedule(sig_list, kinds, sigma_max, params.logprob)  # once, on the host
        shape = (B, *m.latent_shape)
        samples, next_samples = torch.empty((T, *shape), device=dev), torch.empty((T, *shape), device=dev)
        logps = torch.zeros(T, B, device=dev)
        K, to_rows = (0, None) if pre is None else (params.branch_at, pre[1].to(dev))  # row -> its prefix row
        args = _rows_of((cond, uncond, source_latents), None if pre is None else pre[0])
        x0_prev = None
        for i in range(T):
            _stop.check()  # another thread's failure (a reward chunk) stops the sampler here
            if i == K and pre is not None:  # branch: every row continues from its prefix's sample
                x, x0_prev = _expand(x, to_rows), _expand(x0_prev, to_rows)
                args = (cond, uncond, source_latents)
            n = x.shape[0]
            s, s_next = sig[i].expand(n), sig[i + 1].expand(n)
            eps = None if kinds[i] == "ode" else torch.randn(x.shape, generator=generator, device=dev,
                                                             dtype=torch.float32)  # as flow_sde_step draws it
            with C.paused_in_loop() if i else contextlib.nullcontext():  # step 0 checked: weights, first inputs
                nxt, lp, v = self._step(x, s, s_next, eps, sig[1], *args, params, kinds[i])
            if coef[i]:  # DPM-Solver++(2M): Euler + c (x0_i - x0_{i-1}), x0 = x - sigma v the data prediction
                nxt = nxt + coef[i] * ((x - sig[i] * v) - x0_prev)
            x0_prev = x - sig[i] * v if params.ode_solver == "dpm2" else None
            rows = None if i >= K else to_rows  # prefix steps: recorded for every branch (bit-identical copies)
            samples[i], next_samples[i] = _expand(x, rows), _expand(nxt, rows)
            if lp is not None:
                logps[i] = lp
            x = nxt
        C.check_finite("the trajectory's log-probs (a later sampler step produced NaN/inf; set_checks('full') checks "
                       "every step)", logps)
        C.check_finite("the final latents (a sampler step produced NaN/inf; set_checks('full') checks every step)", x)
        images = m.decode_latents(x) if params.decode else None
        on = C.mark_host_resident(torch.tensor([k != "ode" for k in kinds]))
        return ImageTrajectory(samples, next_samples, sig[:-1, None].expand(T, B).contiguous(),
                               sig[1:, None].expand(T, B).contiguous(), logps, on.to(dev), x, cond.detach(),
                               params, sigma_max, None if uncond is None else uncond.detach(), source_latents,
                               images, train_steps=torch.nonzero(on).flatten().to(dev), dit_rows=K * P + (T - K) * B,
                               kinds=kinds)


def _initial_latents(noise, shape, generator, dev):
    if noise is None:
        return torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {tuple(shape)}")
    return noise.float()


def _prefix_rows(branches, K, B):
    """(each prefix's first row [P] (a list), row -> prefix id [B] (a long tensor)) from `branches`, or None
    when the rollout does not branch. Both or neither of branches / branch_at must be given."""
    if (branches is None) != (K is None):
        raise ValueError(f"branching needs both params.branch_at (got {K!r}) and branches (got "
                         f"{'None' if branches is None else 'a [B] index'})")
    if branches is None:
        return None
    if isinstance(branches, torch.Tensor) and branches.device.type != "cpu":
        raise ValueError(f"branches must be on the host (a list or a CPU tensor), got a tensor on {branches.device}")
    ids = C.mark_host_resident(branches).tolist() if isinstance(branches, torch.Tensor) else list(branches)
    if len(ids) != B:
        raise ValueError(f"branches must give a prefix id for each of the B={B} rows, got {len(ids)}")
    P = max(ids) + 1
    first = [ids.index(p) if p in ids else -1 for p in range(P)]
    if min(ids) < 0 or -1 in first:
        raise ValueError(f"branches must number the prefixes 0..P-1, each used; got {sorted(set(ids))}")
    return first, torch.tensor(ids)


def _rows_of(items, rows):
    """The sampler's per-row inputs (cond, uncond, source latents) cut to `rows` (None: unchanged)."""
    if rows is None:
        return items
    def cut(v):
        if v is None:
            return None
        if isinstance(v, Conditioning):
            return Conditioning(cut(v.cond), cut(v.pooled))
        return v[torch.tensor(rows, device=v.device)]
    return tuple(cut(v) for v in items)


def _expand(x, index):
    """Rows of the prefix batch for every branch (index [B] long on x's device), or x itself when index is None."""
    if x is None or index is None:
        return x
    return x.index_select(0, index)


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
