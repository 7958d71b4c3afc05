"""The synthetic world: rendering, verifiers reading scenes back, tasks and the train/eval split."""
import re

import pytest
import torch

from unirl_fast import world as W


def test_every_single_spec_renders_and_verifies_exactly():
    specs = W.tasks.all_specs(max_objects=2)
    for spec in specs[::7]:
        img = W.render_scene(W.scene_of(spec))
        assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
        checks = W.check_image(img, spec)
        assert checks["exact"], (W.describe(spec), checks, W.detect(img))
        assert W.score_image(img, spec) == 1.0


def test_shapes_are_told_apart():
    for shape in W.SHAPES:
        spec = (W.Req("red", shape, 1, "left"),)
        dets = W.detect(W.render_scene(W.scene_of(spec)))
        assert [d.shape for d in dets] == [shape]


def test_wrong_images_score_lower():
    spec = (W.Req("red", "circle", 2, "left"),)
    wrong_count = W.render_scene(W.scene_of((W.Req("red", "circle", 1, "left"),)))
    wrong_color = W.render_scene(W.scene_of((W.Req("blue", "circle", 2, "left"),)))
    wrong_side = W.render_scene(W.scene_of((W.Req("red", "circle", 2, "right"),)))
    noise = torch.rand(3, 32, 32) * 2 - 1
    for img in (wrong_count, wrong_color, wrong_side, noise):
        assert W.score_image(img, spec) < 1.0
    assert W.score_image(wrong_side, spec) > W.score_image(wrong_color, spec)  # partial credit for the count
    assert not W.check_image(wrong_side, spec)["0:position"]
    assert W.check_image(wrong_side, spec)["0:count"]


def test_split_is_disjoint_and_stable():
    train = {t.canonical for t in W.generation_tasks("train")}
    ev = {t.canonical for t in W.generation_tasks("eval")}
    assert train and ev and not (train & ev)
    assert 0.1 < len(ev) / (len(ev) + len(train)) < 0.3
    reasoned = W.generation_tasks("eval", reasoning=True)
    assert {t.canonical for t in reasoned} == ev
    assert any(t.prompt != t.canonical for t in reasoned)


def test_reasoning_prompts_resolve_to_their_spec():
    n_sums = 0
    for t in W.generation_tasks("train", reasoning=True)[:300]:
        r = t.spec[0]
        m = re.match(r"^(\d+) ([-+]) (\d+) ", t.prompt)
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert (a - b if op == "-" else a + b) == r.count, t  # the sum names the count
            n_sums += 1
        else:
            assert any(riddle in t.prompt for riddle in W.tasks.RIDDLES[r.color]), t
        assert f"on the {r.region}" in t.prompt
    assert n_sums > 50


def test_edit_tasks_have_inverse_back_to_source():
    tasks = W.edit_tasks("train")
    assert tasks
    for t in tasks[:50]:
        src = W.render_scene(t.source)
        assert W.check_image(src, t.inverse_spec)["exact"]
        assert t.inverse and t.spec != t.inverse_spec


def test_understanding_answers_are_exact():
    for t in W.understanding_tasks("eval")[:50]:
        r = t.spec[0]
        assert t.answer in (str(r.count), r.color, r.region)


def test_bad_inputs():
    with pytest.raises(ValueError, match="size"):
        W.render_scene(W.Scene(()), size=8)
    with pytest.raises(ValueError, match="img"):
        W.detect(torch.zeros(32, 32))
