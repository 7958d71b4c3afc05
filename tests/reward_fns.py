"""Reward callables the reward tests import by path (reward_fns:NAME), as a user's module would be."""
import torch

CALLS = {"n": 0, "fail_from": None}


def brightness(batch):
    """Mean pixel value of each image in [0, 1], with its red part as a named part."""
    imgs = (batch.images.float() + 1) / 2
    return {"scores": imgs.mean(dim=(1, 2, 3)), "parts": {"red": imgs[:, 0].mean(dim=(1, 2))}}


def prompt_length(batch):
    """A text-only reward: the prompt's length / 100 (a plain list of floats)."""
    return [len(p) / 100 for p in batch.prompts]


def counted(batch):
    """brightness, failing (raising) from call number CALLS['fail_from'] on: a reward that breaks mid-run."""
    CALLS["n"] += 1
    if CALLS["fail_from"] is not None and CALLS["n"] >= CALLS["fail_from"]:
        raise RuntimeError("the detector crashed")
    return brightness(batch)


def wrong_length(batch):
    return [0.5] * (len(batch) + 1)


def not_finite(batch):
    return torch.tensor([0.1] * (len(batch) - 1) + [float("nan")])


NOT_CALLABLE = 3


def varied(batch):
    """Completion length / 12 plus image brightness, whichever the scenario has: a reward that differs within a
    group from the first step, so every trained expert gets a gradient."""
    n = len(batch)
    text = torch.tensor([len(c) / 12 for c in batch.completions]) if batch.completions else torch.zeros(n)
    image = brightness(batch)["scores"].cpu() if batch.images is not None else torch.zeros(n)
    return text + image


def completion_length(batch):
    """A text reward that varies from the first step: the completion's length / 10."""
    return [len(c) / 10 for c in batch.completions]


def slow_varied(batch):
    """varied(), marked slow (the trainer scores it beside the rollout by default); records which thread ran it."""
    SLOW["threads"].append(__import__("threading").current_thread().name)
    gate = SLOW["gate"]
    if gate is not None:
        gate(len(SLOW["threads"]))
    return varied(batch)


slow_varied.slow = True
SLOW = {"threads": [], "gate": None}  # gate(call number): run inside each call before it answers (tests set it)
