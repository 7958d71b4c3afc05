"""Trainer configuration: one frozen dataclass, named presets, CLI flags derived from the fields.

Every field is a flag (`--prompts-per-step 4`, `--no-cfg` style booleans as `--fp8 / --no-fp8`); a preset
gives the defaults (`--config tiny`), flags override it, and the resolved config is written to
`<run_dir>/config.json`. `validate()` rejects bad configs before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..models.config import PRESETS as _MODEL_PRESETS
from ..ops.policy_loss import LOSS_TYPES

SCENARIOS = ("understand", "generate", "reason-generate", "refine-prompt", "edit", "reason-edit")
# tiny-fp8: train.pretrain's FP8-eligible tiny world model; tiny-vlm: its world model with a vision-language LM
MODEL_PRESETS = ("tiny-fp8", "tiny-vlm", *sorted(_MODEL_PRESETS))


def _f(default, help: str, choices=None, int_ok=False):
    """A TrainConfig field with its --help text (and choices): documented once, here. int_ok: a str field whose
    config-file value may be an int (read as its string, e.g. branch_at: 3)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "int_ok": int_ok})



@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the `tiny` preset for the default scenario (reason-generate), tuned on the synthetic world on
    a CPU (seed 0, 48 held-out prompts, 32 px DiT after 600 warm-up steps); measured base -> after 40 RL steps:
    - Flow-GRPO window: sde_window 2, noise_level 1.0, lr 3e-4 for the DiT and connector, 8 prompts x 8 samples.
      With sde_window 4 / noise_level 0.7 (sde) the training reward stayed flat for 36 steps.
    - UniGRPO velocity-MSE kept small: at beta_velocity 0.02 the image reward stays flat (the per-step log-prob
      is a mean over 3x32x32 pixels, so its gradient is small next to the MSE's pull back to the reference); at 0
      the images drift brighter and the reward peaks and falls (image 0.118 -> 0.246 at 20 -> 0.196 at 40
      steps); at 0.005 it rises without the drift (image 0.118 -> 0.214, total 0.193 -> 0.414).
    - `generate` (Flow-GRPO alone, LM frozen) does not learn with these (0.207 -> 0.147); it does with training
      samples like the ODE it is evaluated with: sde_type "cps", noise_level 0.7, sde_window 4, beta_velocity 0
      (0.207 -> 0.281 / 0.182 -> 0.282 / 0.200 -> 0.312 over 3 RL seeds). Those give reason-generate 0.193 ->
      0.376, below 0.414, so they are generate's own defaults (SCENARIO_DEFAULTS below)."""

    scenario: str = _f("reason-generate", "what is trained: understand (GRPO on the LM, exact-answer reward), generate "
                       "(Flow-GRPO on the DiT and connector), reason-generate (LM and DiT with one shared advantage), "
                       "refine-prompt (the LM rewrites for a frozen DiT), edit (Flow-GRPO on editing), reason-edit "
                       "(the LM decides the edit, both trained)", SCENARIOS)
    preset: str = _f("tiny", "MODEL preset (the network's size): tiny (the synthetic world's 32 px model), tiny-fp8 "
                     "(the same at width 128, so --fp8 has layers to convert), tiny-vlm (tiny with a vision-language "
                     "LM expert that sees the images), or a unirl_fast.models preset; not the same thing as --config, "
                     "which picks the trainer's defaults", MODEL_PRESETS)
    model_path: str | None = _f(None, "a saved UnifiedModel directory to train instead of pretraining --preset")
    lm_path: str | None = _f(None, "your own LM expert: a transformers save_pretrained directory (with its tokenizer); "
                             "with --dit-path the run trains that model instead of pretraining --preset")
    dit_path: str | None = _f(None, "your own DiT: a diffusers SanaTransformer2DModel / SD3Transformer2DModel "
                              "directory")
    vae_path: str | None = _f(None, "its autoencoder: a diffusers AutoencoderKL / AutoencoderDC directory (none: the "
                              "DiT works in pixels)")
    num_queries: int | None = _f(None, "query tokens joining the LM to the DiT (default: 64 with --lm-path, else the "
                                 "preset's)")
    connector_dim: int | None = _f(None, "width of the query connector (default: 1024 with --lm-path)")
    connector_layers: int | None = _f(None, "transformer layers of the query connector (default: 2 with --lm-path)")
    image_size: int | None = _f(None, "pixels per side (default with --dit-path: the DiT's sample_size x the "
                                "autoencoder's factor)")
    lm_variant: str | None = _f(None, "weight-file variant of --lm-path to read (model.VARIANT.safetensors, e.g. "
                                "bf16); default: the default file names, else the only variant there")
    dit_variant: str | None = _f(None, "weight-file variant of --dit-path (diffusion_pytorch_model.VARIANT."
                                 "safetensors, e.g. bf16 in SANA's releases); default: the default names, else the "
                                 "only variant")
    vae_variant: str | None = _f(None, "weight-file variant of --vae-path; default as --dit-variant")
    frozen_dtype: str = _f("fp32", "weights of the experts this scenario does not train (and of the autoencoder): "
                           "fp32, bf16, fp16, or file (the dtype their files store); trained weights are always "
                           "fp32 (their own master copy)", ("fp32", "bf16", "fp16", "file"))
    chat_template: str = _f("auto", "how the LM's texts are written: auto (as the user's turn of the tokenizer's chat "
                            "template when the LM directory has one, else raw), none (raw text), or a template file")
    max_image_pixels: int | None = _f(None, "a vision-language LM sees each task image at its own aspect ratio, scaled "
                                      "down to at most this many pixels (default: only its image processor's "
                                      "min / max pixel bounds)")
    image_resize: str = _f("crop", "how a task image becomes the DiT's square: crop (short side to the size, centre "
                           "kept), pad (long side to the size, centred on black), stretch (aspect ratio lost)",
                           ("crop", "pad", "stretch"))
    precision: str = _f("fp32", "fp32, or bf16: bf16 autocast over fp32 weights in rollout, reward, reference and "
                        "training alike (the fp32 weights are the master weights; optimizer states fp32)",
                        ("fp32", "bf16"))
    grad_ckpt_lm: bool = _f(False, "gradient checkpointing in the LM (recompute its layers in backward)")
    grad_ckpt_dit: bool = _f(False, "gradient checkpointing in the DiT")
    attn_implementation: str = _f("auto", "the LM's attention: auto (flash_attention_2 when flash-attn and CUDA are "
                                  "there, else sdpa), sdpa, eager, flash_attention_2",
                                  ("auto", "sdpa", "eager", "flash_attention_2"))
    lora_lm: str | None = _f(None, "LoRA on the LM instead of full training: R,ALPHA[,MODULE+MODULE...] (peft; default "
                             "modules: the attention and MLP projections)")
    lora_dit: str | None = _f(None, "LoRA on the DiT instead of full training: R,ALPHA[,MODULE+MODULE...], or "
                              "'default' (Flow-GRPO's: 32,64 on the attention projections)")
    tasks: str = _f("world", "the prompts: world (the embedded world's tasks and split), a .jsonl / .json / .csv file "
                    "(image paths relative to it) or a Hugging Face datasets directory; see unirl_fast.tasks")
    reward: tuple[str, ...] = _f(("world",), "reward SPEC[=WEIGHT], repeatable (the run's reward is the weighted sum): "
                                 "world (the embedded world's verifier), format[:REGEX], answer (exact match), cycle "
                                 "(edits), clip:DIR, pickscore:DIR, an http(s):// reward service, or "
                                 "pkg.module:function; see unirl_fast.rewards")
    allow_outside_paths: bool = _f(False, "let a task file name images outside its own directory (an absolute path, "
                                   "'..' or a link out of it); refused without this flag")
    eval_fraction: float = _f(0.2, "held-out share of a task file whose rows give no split (a seeded hash of the "
                              "prompt decides)")
    split_seed: int = _f(0, "seed of that derived split")
    reward_timeout: float = _f(60.0, "reward services: seconds per request before it counts as failed")
    reward_retries: int = _f(3, "reward services: retries of a failed request (exponential backoff) before the run "
                             "stops")
    reward_concurrency: int = _f(4, "reward services: requests in flight at once")
    reward_batch_size: int = _f(32, "reward services: samples per request")
    reward_token_env: str = _f("UNIRL_REWARD_TOKEN", "reward services: the environment variable holding a bearer "
                               "token (sent when set, only to https:// or loopback http:// services)")
    reward_allow_insecure_token: bool = _f(False, "reward services: also send the token to a plain http:// service "
                                           "on another machine (in clear text; refused without this flag)")
    reward_ca_file: str | None = _f(None, "reward services: a PEM file of the CA that signed the https:// services' "
                                    "certificates (a private CA; certificates are always verified)")
    report_to: tuple[str, ...] = _f((), "experiment trackers, repeatable: tensorboard, wandb, mlflow, trackio, none "
                                    "(each an optional extra; every metrics.jsonl record, the sample sheets and the "
                                    "config; see unirl_fast.train.trackers)")
    run_dir: str = _f("runs/default", "run directory (config, metrics, checkpoints, plots); rerunning the same "
                      "command with it resumes from its latest checkpoint")
    seed: int = _f(0, "seed of the pretraining, the task draws and the rollouts")
    steps: int = _f(40, "RL steps in all (a resume may raise it to train on)")
    prompts_per_step: int = _f(8, "prompts per RL step")
    group_size: int = _f(8, "samples per prompt (the GRPO group)")
    micro_batch: int = _f(16, "samples per forward/backward (gradient accumulation over the step's batch)")
    lr_lm: float = _f(5e-5, "AdamW learning rate of the LM")
    lr_dit: float = _f(3e-4, "AdamW learning rate of the DiT")
    lr_connector: float = _f(3e-4, "AdamW learning rate of the query connector")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    ema_decay: float = _f(0.0, "> 0: evaluate (and checkpoint) an exponential moving average of the trained weights, "
                          "e <- d e + (1 - d) w with d = min(ema_decay, (1 + n) / (10 + n)) (Flow-GRPO); 0: off")
    grad_clip: float = _f(1.0, "gradient-norm clip")
    loss_type: str = _f("grpo", "text loss aggregation: grpo (seq-mean-token-mean), bnpo / dapo (token mean), "
                        "dr_grpo (sum / (B x max length)), seq_sum", LOSS_TYPES)
    eps_low: float = _f(0.2, "PPO clip range below 1 (text)")
    eps_high: float = _f(0.28, "PPO clip range above 1 (text; DAPO's clip-higher)")
    beta: float = _f(0.0, "weight of the k3 KL of the text policy to the frozen reference (0: no reference pass)")
    flow_clip_range: float = _f(1e-3, "PPO clip range of the Flow-GRPO step ratio")
    beta_velocity: float = _f(0.005, "UniGRPO velocity-MSE weight to the frozen reference DiT (0: off)")
    tis_cap: float = _f(2.0, "--off-policy 1: cap of the truncated importance weight min(pi_prox / pi_behaviour, cap) "
                        "(per token for text, per image trajectory for Flow-GRPO; verl's and TRL's default 2)")
    temperature: float = _f(1.0, "sampling temperature of the text rollouts (and of the scored log-probs)")
    max_new_tokens: int = _f(40, "longest completion")
    image_steps: int = _f(8, "sampler steps per image (evaluation; training rollouts too unless --rollout-steps)")
    rollout_steps: int | None = _f(None, "sampler steps of the training rollouts (default: image_steps); nft / awm "
                                   "draw their trained timesteps from the image_steps schedule whatever this is")
    timestep_schedule: str = _f("auto", "sigma schedule of rollout, replay and eval: linspace (DanceGRPO's shifted "
                                "linspace(1, 0)), diffusers (FlowMatchEulerDiscreteScheduler's sigmas: Flow-GRPO, SD3 "
                                "pipelines), auto (what the --dit-path pipeline's scheduler config implies, else "
                                "linspace); docs/conventions.md", ("auto", "linspace", "diffusers"))
    image_shift: float | None = _f(None, "time shift of the sigma schedule (SD3 / SANA; 1 = none; default: the "
                                   "--dit-path pipeline's scheduler config's, else 1)")
    noise_level: float = _f(1.0, "noise level a of the stochastic sampler steps")
    sde_type: str = _f("sde", "sampler of the trained steps: sde (Flow-GRPO) or cps (coefficients-preserving)",
                       ("sde", "cps"))
    flow_logprob: str = _f("gaussian", "score of a trained denoising step: gaussian (the step's exact log-density) or "
                           "flow_grpo (Flow-GRPO's cps score -(x_next - mean)^2, its clip range's scale; same as "
                           "gaussian for sde); docs/conventions.md", ("gaussian", "flow_grpo"))
    sde_window: int = _f(2, "stochastic (trained) steps of flow_grpo's rollout, a window starting at --window-start "
                         "(Flow-GRPO-Fast); --window moves it during training")
    window: str = _f("fixed", "flow_grpo: where the SDE window sits each RL step: fixed (at --window-start), slide "
                     "(MixGRPO: from --window-start, --window-stride steps later every --window-every RL steps, back "
                     "to --window-start after --window-last) or random (a start drawn each step from [--window-start, "
                     "--window-last]); the trained and the stochastic steps are the window's; metrics.jsonl records "
                     "it per step", ("fixed", "slide", "random"))
    window_start: int = _f(0, "flow_grpo: the SDE window's first sampler step (slide: where it starts; random: the "
                           "earliest)")
    window_last: int | None = _f(None, "slide / random: the latest window start (default: the last that fits, "
                                 "rollout steps - sde_window)")
    window_every: int = _f(25, "slide: RL steps between moves of the window (MixGRPO: 25)")
    window_stride: int = _f(1, "slide: sampler steps the window moves by (MixGRPO: 1)")
    branch_at: str | None = _f(None, "K (a sampler step) or 'window' (each step's window start): one trajectory per "
                               "prompt for the first K steps (ODE from one initial noise, or just the noise at K = 0), "
                               "branched into the group's samples at step K: DiT forwards per group K + G (T - K) "
                               "instead of G T. flow_grpo: K <= the window start; nft / awm (an ODE rollout): step K "
                               "is made stochastic (--sde-type, --noise-level) so the branches differ", int_ok=True)
    ode_solver: str = _f("euler", "solver of the training rollout's ODE steps: euler, or dpm2 (DPM-Solver++(2M), "
                         "second order, one DiT call per step like Euler); the SDE steps and evaluation are unchanged",
                         ("euler", "dpm2"))
    ode_tail: float = _f(1.0, "(0, 1]: the ODE steps after the rollout's last stochastic step are re-spaced into "
                         "max(1, round(ode_tail x n)) over the same interval (MixGRPO-Flash's compressed tail; pair "
                         "with --ode-solver dpm2); 1: unchanged")
    old_logp: str = _f("replay", "the DiT window's old log-probs: replay (the training replay's own, detached: the "
                       "first update's ratio is exactly 1, no extra forward) or rollout (the sampler's, equal up to "
                       "float round-off)", ("replay", "rollout"))
    old_logp_lm: str = _f("rollout", "the LM tokens' old log-probs: rollout (the sampler's, from the decode) or replay "
                          "(the LM head on the training forward's hidden states, detached: one extra head pass; the "
                          "first ratio is exactly 1 on the reference path)", ("rollout", "replay"))
    group_noise: bool = _f(False, "one initial latent per group (DanceGRPO): in-group differences come from the "
                           "trained window only")
    cycle_back: str = _f("policy", "edit scenarios: who makes the inverse edit of the cycle reward, the policy or the "
                         "frozen reference (a fixed reward)", ("policy", "reference"))
    guidance_scale: float = _f(1.0, "classifier-free guidance scale (1 = CFG-free, UniGRPO)")
    image_algo: str = _f("flow_grpo", "RL of the image expert: flow_grpo (log-probs of SDE denoising steps), nft "
                         "(DiffusionNFT) or awm (Advantage Weighted Matching): flow matching on the forward (noising) "
                         "process of ODE rollouts; each brings its published defaults (ALGO_DEFAULTS), flags override",
                         ("flow_grpo", "nft", "awm"))
    adv_std: str = _f("group", "advantage scale: group (each prompt group's reward std, GRPO) or global (the batch's, "
                      "as Flow-GRPO, DiffusionNFT and AWM); the LM and the DiT share the advantage",
                      ("group", "global"))
    fp_timesteps: int | None = _f(None, "nft / awm: trained timesteps per sample (default: every index of the range "
                                  "below)")
    fp_timestep_fraction: float = _f(0.9, "nft / awm: the trained timesteps are drawn from the first "
                                     "int(image_steps x fraction) sigmas of the schedule (from the noisy end)")
    fp_timestep_sampling: str = _f("uniform", "nft / awm: uniform (K distinct indices per sample; DiffusionNFT) or "
                                   "stratified (one per equal stratum, t = 1 left out; AWM)", ("uniform", "stratified"))
    fp_adv_clip: float = _f(5.0, "nft / awm: advantages clipped to +-this (A_max); nft maps them to [0, 1], awm "
                            "divides by it")
    nft_beta: float = _f(1.0, "nft: how far the implicit positive / negative policies step from the old one (b)")
    awm_power: float = _f(0.25, "awm: power p of the generalised-Huber weighting ((m + 1e-10)^p - 1e-10^p) t / p")
    beta_old: float = _f(0.0, "awm: weight of mean (v - v_old)^2, the KL to the old (EMA) policy (AWM: 1)")
    old_decay_rate: float = _f(0.001, "nft / awm: the old policy o <- d o + (1 - d) w after step n, d = "
                               "min(old_decay_rate x n, old_decay_max)")
    old_decay_max: float = _f(0.5, "nft / awm: cap of that decay (NFT 0.5, AWM 0.3; 0: the old policy is the weights "
                              "at the start of each step and costs no forward)")
    format_weight: float = _f(0.2, "weight of the format part of the reward")
    rollout_chunks: int | None = _f(None, "pieces the step's rollout is cut into, each of whole prompt groups, rolled "
                                    "out in turn (each scored as it finishes; see --reward-overlap); default: 4 (at "
                                    "most prompts_per_step) when the reward is a service or a callable marked slow, "
                                    "else 1")
    reward_overlap: str = _f("auto", "score each rollout chunk on a thread while the next one rolls out (and the last "
                             "while the reference runs): on, off, or auto (on when the reward is a service or a "
                             "callable marked slow). Changes no number: metrics and weights are bitwise those of off",
                             ("auto", "on", "off"))
    off_policy: int = _f(0, "1: the rollout of step k + 1 runs (with step k's weights) while step k trains, and the "
                         "losses take the behaviour log-probs through a truncated importance weight (decoupled PPO "
                         "with one update per batch: see train.offpolicy); 0: on-policy", (0, 1))
    impl: str = _f("auto", "op backend: auto (Triton kernels on CUDA, PyTorch elsewhere), triton (never falls back; "
                   "needs CUDA), reference (eager PyTorch everywhere)", ("auto", "triton", "reference"))
    fp8: bool = _f(False, "FP8 unified precision flow: eligible Linear layers run in FP8 in rollout and training "
                   "(needs a preset with 128-divisible widths, e.g. tiny-fp8)")
    device: str = _f("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    threads: int | None = _f(None, "CPU threads per process for PyTorch's ops (torch.set_num_threads); default: "
                             "$OMP_NUM_THREADS when set, else 1 on a CPU device (2 threads on a shared 2-core machine "
                             "ran up to 50x slower: README), PyTorch's own on CUDA")
    pretrain_dit_steps: int = _f(600, "flow-matching warm-up steps of the DiT and connector (cached per settings)")
    pretrain_lm_steps: int = _f(300, "supervised warm-up steps of the LM")
    pretrain_batch: int = _f(32, "warm-up batch")
    pretrain_lr: float = _f(2e-3, "warm-up learning rate")
    eval_every: int = _f(20, "RL steps between held-out evaluations")
    eval_prompts: int = _f(48, "held-out tasks per evaluation")
    eval_samples: int = _f(1, "images per held-out task, each from its own fixed noise (GenEval draws 4); a task "
                           "scores the mean")
    save_every: int = _f(20, "RL steps between checkpoints")
    keep_checkpoints: int = _f(2, "checkpoints kept")
    zero_stage: int | None = _f(None, "DeepSpeed ZeRO stage (2 or 3); default: single process unless launched "
                                "distributed")
    deepspeed_config: str | None = _f(None, "a DeepSpeed JSON merged over the generated one")

    def __post_init__(self):
        for name in ("reward", "report_to"):
            value = getattr(self, name)
            if isinstance(value, str):  # one entry, e.g. from a config file
                object.__setattr__(self, name, (value,))
            elif isinstance(value, list):  # read back from JSON
                object.__setattr__(self, name, tuple(value))

    @property
    def train_rollout_steps(self) -> int:
        return self.image_steps if self.rollout_steps is None else self.rollout_steps

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    def validate(self) -> "TrainConfig":
        def bad(msg):
            raise ValueError(f"bad config: {msg}")

        if self.group_size < 2:
            bad(f"group_size must be >= 2 (group advantages of one sample are 0), got {self.group_size}")
        if self.prompts_per_step < 1:
            bad(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.micro_batch < 1 or self.batch_size % self.micro_batch:
            bad(f"batch {self.batch_size} (prompts_per_step x group_size) is not divisible by micro_batch "
                f"{self.micro_batch}")
        if self.micro_batch % self.group_size and self.group_size % self.micro_batch:
            bad(f"micro_batch {self.micro_batch} and group_size {self.group_size}: one must divide the other")
        for name in ("lr_lm", "lr_dit", "lr_connector", "pretrain_lr"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("steps", "max_new_tokens", "image_steps", "eval_prompts", "eval_samples", "eval_every",
                     "save_every", "pretrain_batch"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pretrain_dit_steps", "pretrain_lm_steps", "keep_checkpoints"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_shift is not None and not self.image_shift > 0:
            bad(f"image_shift must be > 0, got {self.image_shift}")
        try:
            image_schedule(self)
        except ValueError as e:
            bad(str(e))
        if self.rollout_steps is not None and self.rollout_steps < 1:
            bad(f"rollout_steps must be >= 1, got {self.rollout_steps}")
        if not 1 <= self.sde_window <= self.train_rollout_steps:
            bad(f"sde_window must be in [1, {self.train_rollout_steps}] (the training rollout's steps), got "
                f"{self.sde_window}")
        for f in dataclasses.fields(self):
            options = f.metadata.get("choices")
            if options and getattr(self, f.name) not in options:
                bad(f"{f.name} must be one of {options}, got {getattr(self, f.name)!r}")
        from .sampler import check_sampler

        try:
            check_sampler(self)
        except ValueError as e:
            bad(str(e))
        if not (self.device in ("auto", "cpu", "cuda") or _is_cuda_index(self.device)):
            bad(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                bad(f"device {self.device!r} was requested but CUDA is not available")
        if self.threads is not None and self.threads < 1:
            bad(f"threads must be >= 1, got {self.threads}")
        if self.zero_stage is not None and self.zero_stage not in (2, 3):
            bad(f"zero_stage must be 2 or 3 (ZeRO-2 / ZeRO-3 under DeepSpeed), got {self.zero_stage}")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            bad(f"deepspeed_config {self.deepspeed_config!r} is not a file")
        if not 0.0 <= self.ema_decay < 1.0:
            bad(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if not isinstance(self.reward, tuple) or not all(isinstance(r, str) for r in self.reward):
            bad(f"reward must be a list of SPEC[=WEIGHT] strings, got {self.reward!r}")
        from ..rewards import parse_spec

        for r in self.reward:
            try:
                parse_spec(r)
            except ValueError as e:
                bad(str(e))
        from .trackers import TRACKERS

        if not isinstance(self.report_to, tuple) or any(n not in (*TRACKERS, "none") for n in self.report_to):
            bad(f"report_to must name trackers among {', '.join(TRACKERS)} or none, got {self.report_to!r}")
        if "none" in self.report_to and len(self.report_to) > 1:
            bad(f"report_to 'none' with other trackers {self.report_to!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            bad(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.reward_ca_file is not None and not Path(self.reward_ca_file).is_file():
            bad(f"reward_ca_file {self.reward_ca_file!r} is not a file")
        if not self.reward_timeout > 0:
            bad(f"reward_timeout must be > 0 seconds, got {self.reward_timeout}")
        for name, lo in (("reward_retries", 0), ("reward_concurrency", 1), ("reward_batch_size", 1)):
            if getattr(self, name) < lo:
                bad(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if (self.lm_path is None) != (self.dit_path is None):
            bad("--lm-path and --dit-path go together (your own LM expert and DiT); got only "
                f"{'lm_path' if self.lm_path else 'dit_path'}")
        if self.vae_path is not None and self.dit_path is None:
            bad("--vae-path needs --lm-path and --dit-path")
        if self.lm_path is not None and self.model_path is not None:
            bad("give either --model-path (a saved unified model) or --lm-path / --dit-path, not both")
        for name in ("lm_variant", "dit_variant", "vae_variant"):  # the directories themselves: train.inputs
            if getattr(self, name) is not None and getattr(self, name.replace("variant", "path")) is None:
                bad(f"--{name.replace('_', '-')} needs --{name.replace('_variant', '-path')}")
        for name in ("num_queries", "connector_dim", "connector_layers", "image_size", "max_image_pixels"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(f"{name} must be >= 1, got {v}")
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            import torch

            if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
                bad("attn_implementation 'flash_attention_2' needs the flash-attn package and a CUDA device "
                    "(pip install -e '.[flash]'); use sdpa")
        for name in ("lora_lm", "lora_dit"):
            if getattr(self, name) is not None:
                from ..models.lora import parse_lora

                try:
                    parse_lora(getattr(self, name), "dit" if name == "lora_dit" else "lm")
                except ValueError as e:
                    bad(f"{name}: {e}")
        if self.temperature <= 0:
            bad(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0.0 < self.fp_timestep_fraction <= 1.0:
            bad(f"fp_timestep_fraction must be in (0, 1], got {self.fp_timestep_fraction}")
        for name in ("fp_adv_clip", "nft_beta", "awm_power"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("beta_old", "old_decay_rate", "beta_velocity"):
            if not getattr(self, name) >= 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.old_decay_max < 1.0:
            bad(f"old_decay_max must be in [0, 1), got {self.old_decay_max}")
        if self.rollout_chunks is not None and self.rollout_chunks < 1:
            bad(f"rollout_chunks must be >= 1, got {self.rollout_chunks}")
        if self.fp_timesteps is not None and self.fp_timesteps < 1:
            bad(f"fp_timesteps must be >= 1, got {self.fp_timesteps}")
        if self.impl == "triton":
            from ..ops._dispatch import choose

            try:  # the same rule every op applies: explicit Triton needs CUDA (or the interpreter), never falls back
                choose("fused_linear_logprobs", "triton", resolve_device(self))
            except (ValueError, RuntimeError, NotImplementedError) as e:
                bad(str(e))
        return self

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))


PRESETS = {
    # what the README's first command runs: learns on a 2-core CPU in a few minutes
    "tiny": TrainConfig(),
    # the few-steps smoke run the tests use for every scenario
    "smoke": TrainConfig(steps=2, prompts_per_step=2, group_size=2, micro_batch=4, max_new_tokens=12,
                         image_steps=3, sde_window=2, pretrain_dit_steps=3, pretrain_lm_steps=3, pretrain_batch=4,
                         eval_every=2, eval_prompts=4, save_every=1),
    # `unirl-fast profile --preset bench-1.5b`: the measured batch (32 samples, 128 new tokens, 10 steps)
    "bench": TrainConfig(preset="bench-1.5b", steps=6, prompts_per_step=4, group_size=8, micro_batch=8,
                         max_new_tokens=128, image_steps=10, sde_window=2, image_shift=3.0, eval_prompts=32),
}


# Per-scenario defaults on top of the `tiny` preset, measured on the synthetic world (seed 0, 48 held-out tasks;
# numbers in tests/test_learning.py). generate: Flow-GRPO alone learns only with training samples from the
# evaluated distribution (the marginal-preserving "cps" window at noise 0.7), 4 trained steps and no velocity-MSE
# (0.207 -> 0.281 held-out in 40 steps; with the reason-generate defaults 0.207 -> 0.147), and 16 prompts per step:
# on a second base (built with 2 threads: 0.191) 8 prompts gave 0.191 -> 0.222 (z 1.0), 16 gave 0.297 (z 3.1).
# reason-edit: 8 prompts per step gave 0.754 -> 0.799 (z 2.8) on one base and 0.737 -> 0.750 (z 0.8) on another;
# 16 prompts per step 0.737 -> 0.765 (z 2.3).
# edit: cps window and 16 prompts as generate, velocity-MSE kept, inverse edit by the frozen reference, 60 steps,
# the EMA of the weights evaluated (ema_decay 0.9) and 4 images per held-out task: one image per task left the
# comparison to the initial noise (within-task std of the image part 0.19 against gains of ~0.05). Held-out,
# 4 draws per task, base -> EMA after 60 steps (raw weights in brackets), seeds 0-3: 0.555 -> 0.586 (0.584),
# 0.577 -> 0.599 (0.596), 0.601 -> 0.652 (0.644), 0.569 -> 0.595 (0.590); paired z 4.0 / 2.3 / 4.8 / 3.2
# (raw 3.7 / 1.9 / 3.7 / 2.4). At 40 steps the raw weights went up and down (seed 0: z 3.5 at 20, 0.5 at 40).
# Those ran with 1 thread; the slow test (2 threads: other float order) gives seed 0 0.555 -> 0.578 (z 3.3).
SCENARIO_DEFAULTS = {"generate": dict(sde_type="cps", noise_level=0.7, sde_window=4, beta_velocity=0.0,
                                      prompts_per_step=16),
                     "edit": dict(sde_type="cps", noise_level=0.7, sde_window=4, prompts_per_step=16,
                                  cycle_back="reference", steps=60, ema_decay=0.9, eval_samples=4),
                     "reason-edit": dict(prompts_per_step=16)}


# The forward-process algorithms' published settings (DiffusionNFT: config/nft.py and base.py; AWM:
# config/dgx_awm.py), on top of the preset and the scenario's defaults; flags still override them. Both normalise
# the advantages by the std of the whole batch, train 90 % of the schedule's timesteps, clip advantages at 5 and keep
# the old policy as a slow average of the trained weights. beta_velocity is their weight of mean (v - v_ref)^2.
ALGO_DEFAULTS = {"nft": dict(image_algo="nft", adv_std="global", beta_velocity=1e-4, nft_beta=1.0,
                             fp_timestep_sampling="uniform", fp_timestep_fraction=0.9, old_decay_max=0.5),
                 "awm": dict(image_algo="awm", adv_std="global", beta_velocity=1e-3, beta_old=1.0, awm_power=0.25,
                             fp_timestep_sampling="stratified", fp_timestep_fraction=0.9, old_decay_max=0.3)}


def train_preset(name: str, scenario: str | None = None, image_algo: str | None = None) -> TrainConfig:
    """The named trainer preset for a scenario: `tiny` takes the scenario's measured defaults (SCENARIO_DEFAULTS);
    an image algorithm other than flow_grpo brings its published settings (ALGO_DEFAULTS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown trainer config {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[name]
    scenario = base.scenario if scenario is None else scenario
    extra = SCENARIO_DEFAULTS.get(scenario, {}) if name == "tiny" else {}
    if image_algo not in (None, "flow_grpo"):
        if image_algo not in ALGO_DEFAULTS:
            raise ValueError(f"bad config: image_algo must be one of flow_grpo, {', '.join(ALGO_DEFAULTS)}; got "
                             f"{image_algo!r}")
        extra = {**extra, **ALGO_DEFAULTS[image_algo]}
    return dataclasses.replace(base, scenario=scenario, **extra)


def reward_specs(cfg) -> tuple:
    """The run's reward specs (--reward, "world" by default)."""
    if not cfg.reward:
        raise ValueError("bad config: reward is empty: give at least one --reward SPEC[=WEIGHT]")
    return cfg.reward


def check_reward_specs(cfg, scenario) -> None:
    """What can be checked of the reward before any model is built: each spec parses and names something that
    exists (a module and callable, a CLIP directory, a URL), and the world's rewards only meet the world's tasks."""
    from urllib.parse import urlparse

    from ..rewards import load_callable, parse_spec, spec_kind

    for text in reward_specs(cfg):
        spec, _ = parse_spec(text)
        try:
            kind = spec_kind(spec)  # an unknown name (a typo, a weight that is not a number), a bad pattern
        except ValueError as e:
            raise ValueError(f"bad config: {e}") from None
        name, _, arg = spec.partition(":")
        if spec in ("world", "format") and cfg.tasks != "world":
            hint = "give the form as format:REGEX" if spec == "format" else \
                "give --reward (e.g. clip:DIR, answer, my_pkg.rewards:score or http://HOST:PORT/score)"
            raise ValueError(f"bad config: reward {spec!r} is the embedded world's (it checks the world's tasks) and "
                             f"--tasks is {cfg.tasks!r}: {hint}")
        if spec == "cycle" and not scenario.edit:
            raise ValueError(f"bad config: reward 'cycle' needs an edit scenario, not {scenario.name!r}")
        if name in ("clip", "pickscore") and arg and not (Path(arg) / "config.json").is_file():
            raise ValueError(f"bad config: reward {spec!r}: {arg!r} is not a transformers model directory "
                             "(no config.json)")
        if spec.startswith(("http://", "https://")):
            if not urlparse(spec).hostname:
                raise ValueError(f"bad config: reward {spec!r}: no host in the URL")
            from ..rewards.http import check_service

            token = cfg.reward_token_env if cfg.reward_token_env and os.environ.get(cfg.reward_token_env) else None
            check_service(spec, token_env=token, allow_insecure_token=cfg.reward_allow_insecure_token,
                          ca_file=cfg.reward_ca_file)
        if kind == "callable":
            load_callable(spec)
        if name in ("clip", "pickscore") and not scenario.draws:
            raise ValueError(f"bad config: reward {spec!r} scores images and scenario {scenario.name!r} draws none")


def add_config_args(parser: argparse.ArgumentParser, exclude=(), defaults: TrainConfig | None = None) -> None:
    """One flag per TrainConfig field (except those in `exclude`, which the caller defines its own way), with the
    field's help text and choices; `defaults` (the effective config for the chosen --config / --scenario) is what
    the help shows as each flag's default (flags left out keep it)."""
    defaults = defaults or TrainConfig()
    parser.add_argument("--config", default=None, choices=sorted(PRESETS),
                        help="TRAINER defaults (batch, steps, lengths...): tiny (the default run; each scenario adds "
                             "its measured defaults), smoke (a seconds-long run), bench (the profiling batch). Not "
                             "the model: that is --preset. Flags given on the command line override it (default: "
                             "tiny, or the config file's `config`)")
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="a YAML or JSON file of settings (every flag below as a key, e.g. `prompts_per_step: 4`, "
                             "`reward: [clip:/models/clip, format:^.+$=0.2]`); flags on the command line win")
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)})".replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif str(f.type).startswith("tuple"):  # repeatable: --reward a --reward b
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=text,
                                metavar=f.name.upper())
        else:
            typ = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=typ, default=None, help=text,
                                choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else
                                f.name.upper())


def read_config_file(path) -> dict:
    """A run's settings from a YAML (.yaml / .yml) or JSON file: {flag name: value} with every TrainConfig field as a
    key (dashes or underscores), plus `config` (the trainer preset). Unknown keys and values of the wrong type are
    errors naming the file and the key."""
    import difflib

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {str(path)!r}: unknown type {path.suffix!r} (.yaml, .yml or .json)")
    except (json.JSONDecodeError, ImportError) as e:
        raise ValueError(f"config file {str(path)!r}: {e}") from None
    except Exception as e:  # yaml.YAMLError
        if type(e).__module__.startswith("yaml"):  # one line: the problem and where (PyYAML's text spans lines)
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {what}{where}") from None
        raise
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "config":
            if value not in PRESETS:
                raise ValueError(f"config file {str(path)!r}: config {value!r} is not a trainer preset "
                                 f"({', '.join(sorted(PRESETS))})")
            out[name] = value
            continue
        if name not in fields:
            near = difflib.get_close_matches(name, list(fields), n=1)
            raise ValueError(f"config file {str(path)!r}: unknown setting {key!r}"
                             + (f" (did you mean {near[0]!r}?)" if near else ""))
        out[name] = _typed(fields[name], value, f"config file {str(path)!r}: {key!r}")
    return out


def _typed(field, value, where: str):
    """A config file's value checked against the field's type (ints are fine for floats, and so is a string that
    reads as a number: YAML takes `1e-4` for a string)."""
    t = str(field.type)
    if value is None:
        if "None" in t:
            return None
        raise ValueError(f"{where} may not be empty")
    if t.startswith("tuple"):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a string or a list of strings, got {value!r}")
        return tuple(value)
    if field.metadata.get("int_ok") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if t.startswith("float") and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(t.replace(" | None", ""),
                                                                                         lambda v: isinstance(v, str))
    if not ok(value):
        kind = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(t.replace(" | None", ""),
                                                                                     "a string")
        raise ValueError(f"{where} must be {kind}, got {value!r}")
    return float(value) if t.startswith("float") else value


def config_from_args(args) -> TrainConfig:
    """The resolved config: the trainer preset (--config, else the file's `config`, else tiny) with the scenario's
    defaults, then the --config-file's settings, then the flags given on the command line (which win)."""
    from_file = read_config_file(args.config_file) if getattr(args, "config_file", None) else {}
    preset = args.config or from_file.pop("config", None) or "tiny"
    from_file.pop("config", None)
    scenario = getattr(args, "scenario", None) or from_file.get("scenario")
    base = train_preset(preset, scenario, getattr(args, "image_algo", None) or from_file.get("image_algo"))
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None}
    for name in ("reward", "report_to"):
        if isinstance(over.get(name), list):
            over[name] = tuple(over[name])
    try:
        cfg = dataclasses.replace(base, **{**from_file, **over})
    except TypeError as e:
        raise ValueError(f"bad config: {e}") from None
    return with_pipeline(with_image_schedule(cfg.validate()))


def slow_reward(cfg) -> bool:
    """Whether the run's reward is slow enough to score on a thread while the rollout goes on: a service (an
    http(s):// term), or a Python callable marked slow (an attribute `slow = True` on the function or object)."""
    from ..rewards import load_callable, parse_spec, spec_kind

    for text in reward_specs(cfg):
        try:
            spec, _ = parse_spec(text)
            kind = spec_kind(spec)
            if kind == "http" or (kind == "callable" and getattr(load_callable(spec), "slow", False) is True):
                return True
        except ValueError as e:  # an unknown name, a module that does not import: as preflight says it
            raise ValueError(f"bad config: {e}") from None
    return False


def with_pipeline(cfg):
    """cfg with the step's pipeline resolved, so config.json says what ran: rollout_chunks (default 4, at most
    prompts_per_step, for a slow reward, else 1) and reward_overlap (auto: on for a slow reward)."""
    if cfg.rollout_chunks is not None and cfg.reward_overlap != "auto":
        return cfg
    slow = slow_reward(cfg)
    chunks = cfg.rollout_chunks if cfg.rollout_chunks is not None else min(4, cfg.prompts_per_step) if slow else 1
    overlap = cfg.reward_overlap if cfg.reward_overlap != "auto" else "on" if slow else "off"
    return dataclasses.replace(cfg, rollout_chunks=chunks, reward_overlap=overlap)


def image_schedule(cfg) -> tuple[str, float]:
    """(schedule, shift) the run samples with: the ones given, else what the scheduler config of the --dit-path
    pipeline (or of a split-layout --model-path) implies (rollout.schedule.pipeline_schedule), else linspace and 1
    (the embedded world's, which its measured learning runs used)."""
    from ..rollout.schedule import pipeline_schedule
    from .inputs import input_dit_dir, model_copy

    given = cfg.timestep_schedule != "auto" and cfg.image_shift is not None
    dit = input_dit_dir(cfg)
    if dit is not None:  # a resumed run reads its own copy of the pipeline (train.inputs): the inputs may have moved
        copy = model_copy(cfg.run_dir)
        dit = dit if copy is None else copy / "dit"
    implied = pipeline_schedule(dit) if dit is not None and not given else None
    kind = cfg.timestep_schedule if cfg.timestep_schedule != "auto" else implied[0] if implied else "linspace"
    shift = cfg.image_shift if cfg.image_shift is not None else implied[1] if implied else 1.0
    return kind, shift


def with_image_schedule(cfg):
    """cfg with the schedule resolved (image_schedule), so config.json says what the run samples with."""
    kind, shift = image_schedule(cfg)
    return dataclasses.replace(cfg, timestep_schedule=kind, image_shift=shift)


def _is_cuda_index(device: str) -> bool:
    return device.startswith("cuda:") and device[5:].isdigit()


def resolve_device(cfg):
    """The torch device a single-process run trains on (a DeepSpeed run uses its local rank's device instead)."""
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def use_threads(cfg) -> int:
    """The run's intra-op CPU threads: --threads, else $OMP_NUM_THREADS when set, else 1 on a CPU device (PyTorch's
    default of one per core spins OpenMP threads that collapse when other work shares the cores: measured in the
    README), else PyTorch's own."""
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "")
    n = cfg.threads if cfg.threads is not None else int(env) if env.isdigit() and int(env) > 0 else \
        1 if resolve_device(cfg).type == "cpu" else None
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def use_device(cfg):
    """resolve_device, made the current CUDA device when it names one (`--device cuda:1`): allocations without a
    device, CUDA events and streams, and anything launched outside the ops' launch guard then go to that GPU too."""
    import torch

    dev = resolve_device(cfg)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev
