"""The built-in rewards: the embedded world's verifier and the generic format, exact-answer and cycle rewards.

    world          the synthetic world's reward for each scenario (needs the world's tasks: their spec):
                   understand: exact answer; drawing: `world.score_image` (GenEval-style checks as partial credit);
                   edits: the mean of that and the cycle reward; scenarios where the LM reasons add
                   format_weight x format
    format         the LM's text follows the expected form: on world tasks the world's grammar (a plain description,
                   a plain edit instruction, a non-empty answer); `format:REGEX` a pattern the whole stripped
                   completion must match, for any data
    answer         exact match of the stripped completion with the task's `answer`
    cycle          edits: 1 - mean |cycled - source| / 2 over pixels in [-1, 1] (the edit undone by the inverse
                   instruction should give the source back)
"""
from __future__ import annotations

import re

from .. import world as W
from .base import RewardBatch, RewardError


def _spec(task):
    spec = task.meta.get("spec") if isinstance(task.meta, dict) else None
    if spec is None:
        raise RewardError(f"reward 'world' scores the embedded world's tasks only (they carry the spec an image is "
                          f"checked against); {task.origin} has none: choose another --reward")
    return spec


def world_format_ok(scenario, completion: str) -> bool:
    """The world's grammar for the LM's text in each scenario."""
    if scenario.name == "understand":
        return bool(completion.strip())
    if scenario.edit:
        return W.is_edit_instruction(completion)
    return W.parse_description(completion) is not None


def cycle_score(cycled, source) -> float:
    return 1.0 - float((cycled - source).abs().mean()) / 2.0


class WorldReward:
    """The embedded world's reward for a scenario, with its parts (answer | image, cycle, format)."""

    def __init__(self, scenario, format_weight: float):
        self.scenario, self.format_weight = scenario, float(format_weight)

    def __call__(self, b: RewardBatch) -> dict:
        s = self.scenario
        totals, parts = [], {}
        for i, t in enumerate(b.tasks):
            out = {}
            text = b.completions[i]
            if s.name == "understand":
                out["answer"] = float(text.strip() == t.answer)
                total = out["answer"]
            else:
                out["image"] = W.score_image(b.images[i], _spec(t))
                total = out["image"]
                if s.edit:
                    if b.cycled is None or b.cycled[i] is None:
                        raise RewardError(f"reward 'world': {t.origin} has no cycled-back image (no inverse edit)")
                    out["cycle"] = cycle_score(b.cycled[i], b.sources[i])
                    total = 0.5 * (total + out["cycle"])
                if s.lm_writes:
                    out["format"] = float(world_format_ok(s, text))
                    if s.reasoning:
                        total = total + self.format_weight * out["format"]
            totals.append(total)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {"scores": totals, "parts": parts}


class FormatReward:
    """1.0 when the completion has the expected form (see the module docstring), else 0.0."""

    def __init__(self, scenario, pattern: str | None = None):
        self.scenario = scenario
        try:
            self.pattern = None if pattern is None else re.compile(pattern)
        except re.error as e:
            raise ValueError(f"reward 'format:{pattern}': not a regular expression ({e})") from None

    def __call__(self, b: RewardBatch) -> list:
        if self.pattern is not None:
            return [float(self.pattern.fullmatch(c.strip()) is not None) for c in b.completions]
        for t in b.tasks:
            if not isinstance(t, W.Task):
                raise RewardError(f"reward 'format' without a pattern checks the world's grammar; {t.origin} is not a "
                                  "world task: give the form as format:REGEX")
        return [float(world_format_ok(self.scenario, c)) for c in b.completions]


def answer_reward(b: RewardBatch) -> list:
    for t in b.tasks:
        if not t.answer:
            raise RewardError(f"reward 'answer': {t.origin} has no 'answer' to compare with")
    return [float(c.strip() == t.answer.strip()) for c, t in zip(b.completions, b.tasks)]


def cycle_reward(b: RewardBatch) -> list:
    if b.sources is None:
        raise RewardError("reward 'cycle' needs an edit scenario (a source image and its cycled-back edit)")
    out = []
    for i, t in enumerate(b.tasks):
        if b.cycled is None or b.cycled[i] is None:
            raise RewardError(f"reward 'cycle': {t.origin} has no 'inverse' instruction to edit the result back")
        out.append(cycle_score(b.cycled[i], b.sources[i]))
    return out
