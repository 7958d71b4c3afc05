"""The six unified-RL scenarios (UniRL-Zero): what the LM is asked, what the DiT is conditioned on, which experts
train. The data is a task source's (unirl_fast.tasks), the reward a reward's (unirl_fast.rewards); the last column is
the embedded world's reward (`--reward world`, the default on its tasks).

| scenario | LM writes | DiT draws from | trains | world reward |
|---|---|---|---|---|
| understand | the answer to a question about a scene | - | LM | exact match |
| generate | - | the prompt | DiT + connector | image score |
| reason-generate | a plain description from a riddle/sum | the LM's text | LM + DiT + connector | image + format |
| refine-prompt | a plain description (DiT frozen) | the LM's text | LM | image score |
| edit | - | instruction + source image | DiT + connector | edit + cycle consistency |
| reason-edit | a plain instruction from a riddle | LM text + source | LM + DiT + connector | edit + cycle + format |

Image score: `world.score_image` (GenEval-style count / colour / position checks). Cycle consistency: the
edited image is edited back with the task's inverse instruction (ODE sampling, no gradient; by the policy, or
with cycle_back="reference" by the frozen reference, so that this part of the reward stays fixed) and
compared with the source in pixels: 1 - mean|cycled - source| / 2. Joint scenarios share one advantage per
sample (UniGRPO).

With a vision-language LM (`models.vlm`) the image-input scenarios (`understand`, `edit`, `reason-edit`) show the
task's image to the LM: `understand` asks about the image instead of a text description of it, and the edits put the
source image before the instruction in the LM's prompt and in the text the DiT is conditioned on (the DiT still gets
its latents too). A text-only LM reads `understand`'s description (`context`) and edits without seeing the image.

With a chat template (an instruct LM, `--chat-template`), every text the LM reads is the user's turn of a
conversation, the assistant's turn after it: the LM's prompt (the instruction spelled out in the user's turn,
`lm_prompt(chat=True)`) and the text the DiT is conditioned on (the query tokens follow the assistant header).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.vlm import IMAGE_MARK


@dataclass(frozen=True)
class Scenario:
    name: str
    lm_writes: bool  # the LM generates text each rollout
    draws: bool  # the DiT generates an image each rollout
    train_lm: bool
    train_dit: bool  # DiT and connector
    edit: bool
    reasoning: bool

    @property
    def image_input(self) -> bool:
        """The task carries an image the model works from (the understood scene, the edited source)."""
        return self.name == "understand" or self.edit

    def lm_prompt(self, task, image: bool = False, chat: bool = False) -> str:
        """What the LM is given: the question after the scene's description (understand), or the drawing / edit
        request. image=True (a vision-language LM, image-input scenarios): the task's image (IMAGE_MARK) takes the
        description's place, or goes before the edit request. chat=True (an LM with a chat template): the user's turn
        of a conversation, with the instruction spelled out (the template's assistant header is the cue) instead of
        the raw `q: ... a: ` / `say: ` cues the tiny presets are trained on."""
        if self.name == "understand":
            if not image and not task.context:
                raise ValueError(f"{task.origin}: scenario 'understand' with an LM that has no vision tower needs the "
                                 "task's 'context' (a description of the image to read); this task has none")
            if chat:
                scene = IMAGE_MARK if image else f"Scene: {task.context}.\n"
                return f"{scene}Question: {task.prompt}\nReply with the answer only."
            return f"{IMAGE_MARK}q: {task.prompt} a: " if image else f"scene: {task.context}. q: {task.prompt} a: "
        if chat:
            what = "the plain edit instruction" if self.edit else "a plain description of the image"
            return (f"{IMAGE_MARK if image else ''}Rewrite this {'edit' if self.edit else 'drawing'} request as "
                    f"{what} it asks for. Reply with that only.\nRequest: {task.prompt}")
        return f"{IMAGE_MARK if image else ''}{'edit' if self.edit else 'draw'}: {task.prompt}\nsay: "

    def dit_text(self, task, completion: str | None, image: bool = False) -> str:
        """The text the DiT is conditioned on: the LM's words when it writes, else the task prompt (after the source
        image's IMAGE_MARK with image=True: a vision-language LM sees the image it is editing)."""
        text = completion if self.lm_writes else task.prompt
        return f"{IMAGE_MARK}{text}" if image else text


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
