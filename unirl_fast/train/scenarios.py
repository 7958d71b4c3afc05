"""The six unified-RL scenarios (UniRL-Zero) on the synthetic world: what the LM is asked, what the DiT is
conditioned on, which experts train, and the reward.

| scenario | LM writes | DiT draws from | trains | reward |
|---|---|---|---|---|
| understand | the answer to a question about a scene | - | LM | exact match |
| generate | - | the prompt | DiT + connector | image score |
| reason-generate | a plain description from a riddle/sum | the LM's text | LM + DiT + connector | image + format |
| refine-prompt | a plain description (DiT frozen) | the LM's text | LM | image score |
| edit | - | instruction + source image | DiT + connector | edit + cycle consistency |
| reason-edit | a plain instruction from a riddle | LM text + source | LM + DiT + connector | edit + cycle + format |

Image score: `world.score_image` (GenEval-style count / colour / position checks). Cycle consistency: the
edited image is edited back with the inverse instruction (ODE sampling, no gradient; by the policy, or
with cycle_back="reference" by the frozen reference, so that this part of the reward stays fixed) and
compared with the source in pixels: 1 - mean|cycled - source| / 2. Joint scenarios share one advantage per
sample (UniGRPO).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import world as W


@dataclass(frozen=True)
class Scenario:
    name: str
    lm_writes: bool  # the LM generates text each rollout
    draws: bool  # the DiT generates an image each rollout
    train_lm: bool
    train_dit: bool  # DiT and connector
    edit: bool
    reasoning: bool

    def tasks(self, split: str) -> list:
        if self.name == "understand":
            return W.understanding_tasks(split)
        if self.edit:
            return W.edit_tasks(split, reasoning=self.reasoning)
        return W.generation_tasks(split, reasoning=self.reasoning)

    def lm_prompt(self, task) -> str:
        if self.name == "understand":
            return f"scene: {task.canonical}. q: {task.prompt} a: "
        return f"{'edit' if self.edit else 'draw'}: {task.prompt}\nsay: "

    def lm_target(self, task) -> str:
        """What a perfect LM writes (used by the warm-up)."""
        if self.name == "understand":
            return task.answer
        return task.answer if self.edit else task.canonical

    def dit_text(self, task, completion: str | None) -> str:
        """The text the DiT is conditioned on: the LM's words when it writes, else the task prompt."""
        if self.lm_writes:
            return completion
        return task.prompt

    def sft_pairs(self, split: str) -> list:
        """(LM prompt, target) pairs for the warm-up."""
        pairs = [(self.lm_prompt(t), self.lm_target(t)) for t in self.tasks(split)]
        if self.name in ("generate", "edit"):  # the LM is only a text encoder here: a light warm-up still helps
            pairs = pairs[:64]
        return pairs

    def image_pretrain_tasks(self, split: str) -> list:
        """(conditioning text, target spec, source scene | None) for the DiT warm-up (plain texts)."""
        if not self.draws:
            return []
        if self.edit:
            return [(t.answer, t.spec, t.source) for t in W.edit_tasks(split)]
        return [(t.canonical, t.spec, None) for t in W.generation_tasks(split)]

    def format_ok(self, completion: str) -> bool:
        if self.name == "understand":
            return bool(completion.strip())
        if self.edit:
            return W.is_edit_instruction(completion)
        return W.parse_description(completion) is not None

    def reward(self, task, completion, image, cycled, source, format_weight: float) -> dict:
        """Reward parts and their total for one sample."""
        out = {}
        if self.name == "understand":
            out["answer"] = float(completion.strip() == task.answer)
            out["total"] = out["answer"]
            return out
        out["image"] = W.score_image(image, task.spec)
        total = out["image"]
        if self.edit:
            out["cycle"] = 1.0 - float((cycled - source).abs().mean()) / 2.0
            total = 0.5 * (total + out["cycle"])
        if self.lm_writes:
            out["format"] = float(self.format_ok(completion))
            if self.reasoning:
                total = total + format_weight * out["format"]
        out["total"] = total
        return out


SCENARIOS = {
    "understand": Scenario("understand", True, False, True, False, False, False),
    "generate": Scenario("generate", False, True, False, True, False, False),
    "reason-generate": Scenario("reason-generate", True, True, True, True, False, True),
    "refine-prompt": Scenario("refine-prompt", True, True, True, False, False, True),
    "edit": Scenario("edit", False, True, False, True, True, False),
    "reason-edit": Scenario("reason-edit", True, True, True, True, True, True),
}


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {tuple(SCENARIOS)}")
    return SCENARIOS[name]
