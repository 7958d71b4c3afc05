"""The embedded synthetic world as a task source: its task families per scenario (fixed train / held-out split by a
stable hash of the spec), and the warm-up data the base model is pretrained on (training split only)."""
from __future__ import annotations

from .. import world as W


def world_tasks(scenario, split: str) -> list:
    """The world's tasks of one split for a scenario: questions about a scene (understand), edits of a source scene
    (edit, reason-edit; riddled instructions when reasoning), prompts to draw (the rest; riddled when reasoning)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if scenario.name == "understand":
        return W.understanding_tasks(split)
    if scenario.edit:
        return W.edit_tasks(split, reasoning=scenario.reasoning)
    return W.generation_tasks(split, reasoning=scenario.reasoning)


def lm_target(scenario, task) -> str:
    """What a perfect LM writes for a world task (the warm-up's target)."""
    if scenario.name == "understand":
        return task.answer
    return task.answer if scenario.edit else task.canonical


def sft_pairs(scenario, split: str) -> list:
    """(LM prompt, target) pairs for the LM warm-up."""
    pairs = [(scenario.lm_prompt(t), lm_target(scenario, t)) for t in world_tasks(scenario, split)]
    if scenario.name in ("generate", "edit"):  # the LM is only a text encoder here: a light warm-up still helps
        pairs = pairs[:64]
    return pairs


def image_pretrain_tasks(scenario, split: str) -> list:
    """(conditioning text, target spec, source scene | None) for the DiT warm-up (plain texts)."""
    if not scenario.draws:
        return []
    if scenario.edit:
        return [(t.answer, t.spec, t.source) for t in W.edit_tasks(split)]
    return [(t.canonical, t.spec, None) for t in W.generation_tasks(split)]
