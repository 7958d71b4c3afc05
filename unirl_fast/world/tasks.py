"""Tasks of the synthetic world, one family per scenario, with a fixed train / held-out split.

A spec is a tuple of `Req(color, shape, count, region)`: what an image must show. Every task carries
its spec and the plain description of it (`canonical`), which is what a refined prompt should say.

- generation prompts: the canonical text itself ("two red circles on the left").
- reasoning prompts: the same spec behind a small sum or a riddle ("5 - 3 red circles on the left",
  "one circle the colour of a ripe tomato on the right"): the LM must resolve it into the canonical text.
- edit tasks: (source scene, instruction, target spec, inverse instruction) for cycle consistency; the
  reasoning variant hides the instruction behind a riddle ("make the circle the colour of a lemon").
- understanding questions: (scene, question, exact answer).

The split is by a stable hash of the canonical text: a held-out spec never appears in training, in
any phrasing (`split="train" | "eval"`, about 20% held out).
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from .render import COLORS, SHAPES, Obj, Scene

NUMBERS = {1: "one", 2: "two", 3: "three"}
RIDDLES = {
    "red": ["the colour of a ripe tomato", "the colour of a stop sign"],
    "green": ["the colour of fresh grass", "the mix of blue and yellow"],
    "blue": ["the colour of a clear sky", "the colour of deep sea water"],
    "yellow": ["the colour of a lemon", "the colour of a banana"],
    "purple": ["the mix of red and blue", "the colour of a grape"],
    "cyan": ["the mix of green and blue", "the colour of a tropical lagoon"],
}
AXES = (("left", "right"), ("top", "bottom"))


@dataclass(frozen=True)
class Req:
    color: str
    shape: str
    count: int
    region: str


@dataclass(frozen=True)
class Task:
    prompt: str  # what the model is given
    canonical: str  # the plain description of the spec
    spec: tuple  # tuple[Req, ...]
    answer: str = ""  # exact answer for understanding tasks
    source: Scene | None = None  # the source scene for edit / understanding tasks
    inverse: str = ""  # the inverse edit instruction (cycle consistency)
    inverse_spec: tuple = ()

    # the attributes every task source offers (unirl_fast.tasks.Task), so the trainer reads this world like any data
    @property
    def context(self) -> str:
        """What the LM reads about the scene an understanding question asks about (its plain description)."""
        return self.canonical

    @property
    def image(self):
        return self.source

    @property
    def meta(self) -> dict:
        """For rewards: the spec the image must satisfy (`score_image`) and its plain description."""
        return {"spec": self.spec, "canonical": self.canonical}

    @property
    def origin(self) -> str:
        return f"world task {self.prompt!r}"

    def source_image(self, size: int, resize: str = "crop"):
        """The source scene rendered [3, size, size] in [-1, 1], or None (rendered square: `resize` has nothing to
        do)."""
        from .render import render_scene

        return None if self.source is None else render_scene(self.source, size)

    def lm_image(self, size: int, max_pixels: int | None = None):
        """What a vision-language LM sees of the scene: the same square render, smaller when size^2 > max_pixels."""
        if max_pixels is not None and size * size > max_pixels:
            size = max(1, int(max_pixels ** 0.5))
        return self.source_image(size)


def describe(spec) -> str:
    parts = []
    for r in spec:
        noun = r.shape + ("s" if r.count > 1 else "")
        parts.append(f"{NUMBERS[r.count]} {r.color} {noun} on the {r.region}")
    return " and ".join(parts)


def scene_of(spec) -> Scene:
    return Scene(tuple(Obj(r.color, r.shape, r.region) for r in spec for _ in range(r.count)))


def split_of(canonical: str, eval_fraction: float = 0.2) -> str:
    return "eval" if (zlib.crc32(canonical.encode()) % 1000) < eval_fraction * 1000 else "train"


def all_specs(max_objects: int = 2) -> list:
    """Every one- or two-requirement spec on one axis (objects of two requirements on opposite sides)."""
    out = []
    colors = list(COLORS)
    for axis in AXES:
        for c in colors:
            for s in SHAPES:
                for n in (1, 2, 3):
                    for reg in axis:
                        out.append((Req(c, s, n, reg),))
        if max_objects >= 2:
            for c1 in colors:
                for s1 in SHAPES:
                    for c2 in colors:
                        for s2 in SHAPES:
                            if (c1, s1) != (c2, s2):
                                out.append((Req(c1, s1, 1, axis[0]), Req(c2, s2, 1, axis[1])))
    return out


def _reasoned(spec, rng: random.Random) -> str:
    r = spec[0]
    kind = rng.choice(["sum", "riddle"])
    if kind == "sum":
        a = rng.randint(r.count, r.count + 4)
        count = f"{a} - {a - r.count}" if rng.random() < 0.5 else f"{r.count - 1} + 1"
        head = f"{count} {r.color} {r.shape}s on the {r.region}"
    else:
        head = f"{NUMBERS[r.count]} {r.shape}{'s' if r.count > 1 else ''} in {rng.choice(RIDDLES[r.color])} " \
               f"on the {r.region}"
    return " and ".join([head] + [describe((q,)) for q in spec[1:]])


def generation_tasks(split: str, *, reasoning: bool = False, seed: int = 0) -> list:
    """Prompt -> image tasks of one split; with reasoning=True the prompts hide the spec behind a sum/riddle."""
    rng = random.Random(seed)
    tasks = []
    for spec in all_specs():
        canon = describe(spec)
        if split_of(canon) != split:
            continue
        tasks.append(Task(_reasoned(spec, rng) if reasoning else canon, canon, spec))
    return tasks


def _edit(spec, rng: random.Random):
    """One edit of a single-requirement spec: recolour or move.

    Returns (plain instruction, reasoned instruction, target spec, inverse instruction)."""
    r = spec[0]
    noun = r.shape + ("s" if r.count > 1 else "")
    if rng.random() < 0.5:
        new = rng.choice([c for c in COLORS if c != r.color])
        tgt = (Req(new, r.shape, r.count, r.region),)
        return (f"make the {noun} {new}", f"make the {noun} {rng.choice(RIDDLES[new])}", tgt,
                f"make the {noun} {r.color}")
    axis = next(a for a in AXES if r.region in a)
    other = axis[1 - axis.index(r.region)]
    tgt = (Req(r.color, r.shape, r.count, other),)
    return (f"move the {noun} to the {other}", f"move the {noun} away from the {r.region}", tgt,
            f"move the {noun} to the {r.region}")


def edit_tasks(split: str, *, reasoning: bool = False, seed: int = 0) -> list:
    """(source scene, instruction) -> target tasks; `answer` is the plain instruction (what a reasoning LM
    should write), `inverse` the instruction that undoes the edit (cycle consistency)."""
    rng = random.Random(seed)
    tasks = []
    for spec in all_specs(max_objects=1):
        canon = describe(spec)
        if split_of(canon) != split:
            continue
        plain, reasoned, tgt, inv = _edit(spec, rng)
        tasks.append(Task(reasoned if reasoning else plain, describe(tgt), tgt, answer=plain, source=scene_of(spec),
                          inverse=inv, inverse_spec=spec))
    return tasks


def understanding_tasks(split: str, *, seed: int = 0) -> list:
    """Questions about a rendered scene with one exact answer (a number, a colour or a side)."""
    rng = random.Random(seed)
    tasks = []
    for spec in all_specs(max_objects=1):
        canon = describe(spec)
        if split_of(canon) != split:
            continue
        r = spec[0]
        q, a = rng.choice([(f"how many {r.color} shapes are there?", str(r.count)),
                           (f"what colour is the {r.shape}?", r.color),
                           (f"where is the {r.shape}?", r.region)])
        tasks.append(Task(q, canon, spec, answer=a, source=scene_of(spec)))
    return tasks


_NUM = "|".join(NUMBERS.values())
_COL = "|".join(COLORS)
_SHP = "|".join(SHAPES)
_DESC_ONE = rf"({_NUM}) ({_COL}) ({_SHP})s? on the (left|right|top|bottom)"
_DESC_RE = re.compile(rf"^{_DESC_ONE}( and {_DESC_ONE})*$")
_EDIT_RE = re.compile(rf"^(make the ({_SHP})s? ({_COL})|move the ({_SHP})s? to the (left|right|top|bottom))$")


def parse_description(text: str):
    """A canonical description ("two red circles on the left and ...") -> spec tuple, or None if malformed."""
    text = text.strip()
    if not _DESC_RE.match(text):
        return None
    words = {v: k for k, v in NUMBERS.items()}
    return tuple(Req(c, s, words[n], reg) for n, c, s, reg in re.findall(_DESC_ONE, text))


def is_edit_instruction(text: str) -> bool:
    return bool(_EDIT_RE.match(text.strip()))
