"""Rollout engines: batched text sampling with a static KV cache (`text`) and flow-matching image sampling
with per-step log-probs (`image`)."""
from .image import (
                    ImageEngine,
                    ImageSamplingParams,
                    ImageTrajectory,
                    guided_velocity,
                    replay_logprobs,
                    replay_velocity,
                    timestep_schedule,
)
from .text import SamplingParams, TextEngine, TextRolloutOutput, recompute_logprobs, sampling_logprobs

__all__ = ["SamplingParams", "TextEngine", "TextRolloutOutput", "recompute_logprobs", "sampling_logprobs",
           "ImageEngine", "ImageSamplingParams", "ImageTrajectory", "guided_velocity", "replay_logprobs",
           "replay_velocity", "timestep_schedule"]
