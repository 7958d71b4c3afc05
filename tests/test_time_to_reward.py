"""The time-to-reward harness: the compute counters are exact for known call patterns, the target / not-reached /
paired-comparison arithmetic on synthetic curves, and the `--smoke` harness end to end."""
import copy

import pytest
import torch

from unirl_fast.models import UnifiedModel
from unirl_fast.profiling.counters import ComputeCounter, Counts
from unirl_fast.rollout import ImageEngine, ImageSamplingParams, SamplingParams, TextEngine, replay_logprobs
from unirl_fast.rollout.image import replay_velocity
from unirl_fast.rollout.text import recompute_logprobs
from unirl_fast.train.pretrain import world_model_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedModel(world_model_config("tiny", False)).eval()


def _prompts(model, texts=("draw: a red square", "a b", "two blue circles left of a green one")):
    return model.tokenizer(list(texts))


def test_image_rollout_counts_steps_times_rows_and_lm_tokens(model):
    ids, mask = _prompts(model)
    B, T, Q = ids.shape[0], 5, model.config.num_queries
    with ComputeCounter().attach(model) as c:
        ImageEngine(model).generate(ids, mask, ImageSamplingParams(num_steps=T, window_size=2))
    assert c.totals() == Counts(dit_forward=T * B, lm_forward_tokens=int(mask.sum()) + B * Q)
    with ComputeCounter().attach(model) as c:  # CFG: one 2B call per step, and the null prompt's queries
        ImageEngine(model).generate(ids, mask, ImageSamplingParams(num_steps=T, guidance_scale=3.0))
    assert c.totals() == Counts(dit_forward=T * 2 * B, lm_forward_tokens=int(mask.sum()) + 2 * B * Q)


def test_replay_with_backward_counts_rows_forward_and_backward(model):
    ids, mask = _prompts(model)
    traj = ImageEngine(model).generate(ids, mask, ImageSamplingParams(num_steps=6, window_size=3))
    with ComputeCounter().attach(model) as c:
        logp = replay_logprobs(model, traj)  # S = 3 trainable steps on all B rows, with grad
        logp.sum().backward(retain_graph=True)
        assert c.totals() == Counts(dit_forward=3 * 3, dit_backward=3 * 3)
        logp.sum().backward()  # a second backward through the same forward is a second backward
        assert c.totals() == Counts(dit_forward=9, dit_backward=18)
    rows = torch.tensor([0, 2])
    with ComputeCounter().attach(model) as c:
        with torch.no_grad():
            replay_velocity(model, traj, torch.tensor([1, 4]), rows=rows)
        v, _ = replay_velocity(model, traj, torch.tensor([0]), rows=rows)
        assert c.totals() == Counts(dit_forward=2 * 2 + 2)  # nothing has received a gradient yet
        v.sum().backward()
    assert c.totals() == Counts(dit_forward=6, dit_backward=2)


def test_text_rollout_counts_prompt_and_fed_completion_tokens(model):
    """Rows stop at different steps (EOS = a third of the vocabulary): each row feeds its prompt and every completion
    token but the last (sampled, never fed back); a finished row's pad is not counted."""
    ids, mask = _prompts(model)
    eos = tuple(range(0, model.lm.config.vocab_size, 3))
    eng = TextEngine(model.lm, pad_token_id=model.tokenizer.pad_token_id, compile=False)
    with ComputeCounter().attach(model) as c:
        out = eng.generate(ids, mask, SamplingParams(max_new_tokens=8, eos_token_ids=eos),
                           generator=torch.Generator().manual_seed(3))
    lengths = out.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the rows did stop at different steps
    B = ids.shape[0]
    assert c.totals() == Counts(lm_forward_tokens=int(mask.sum()) + int(lengths.sum()) - B)
    with ComputeCounter().attach(model) as c:  # scoring with gradients: prompt + completion, forward and backward
        model.lm.requires_grad_(True)
        recompute_logprobs(model.lm, out).sum().backward()
        model.lm.requires_grad_(False)
    n = int(mask.sum()) + int(lengths.sum())
    assert c.totals() == Counts(lm_forward_tokens=n, lm_backward_tokens=n)


def test_sections_roles_copies_and_detach(model):
    ids, mask = _prompts(model)
    ref = copy.deepcopy(model)
    c = ComputeCounter().attach(model)
    shadow = copy.deepcopy(model)  # a copy made after attaching carries the hooks but is not counted
    params = ImageSamplingParams(num_steps=2, sde="ode")
    ImageEngine(shadow).generate(ids, mask, params)
    assert c.totals() == Counts()
    c.attach(ref, role="reference")
    ImageEngine(model).generate(ids, mask, params)
    with c.section("eval"):
        ImageEngine(ref).generate(ids, mask, params)
    assert c.totals("train", "policy").dit_forward == 6 and c.totals("train", "reference") == Counts()
    assert c.totals("eval", "reference").dit_forward == 6 and c.totals("eval", "policy") == Counts()
    assert c.totals("train").dit_forward == 6 and c.sections() == ["eval", "train"]
    c.detach()
    assert not model.dit._forward_hooks and not model.lm.get_decoder()._forward_hooks  # nothing left behind
    ImageEngine(model).generate(ids, mask, params)
    assert c.totals().dit_forward == 6
    tot = c.totals("eval")
    assert tot.dit_forward_equivalents == 6 and tot.lm_token_equivalents == tot.lm_forward_tokens
    with pytest.raises(ValueError, match="role"):
        ComputeCounter().attach(model, role="critic")
    with pytest.raises(TypeError, match="expert"):
        ComputeCounter().attach(torch.nn.Linear(2, 2))


def test_vlm_decoder_is_counted(model):
    """A vision-language LM's text decoder is hooked: the conditioning pass counts its prompt (image tokens included)
    and queries."""
    from unirl_fast.models import vlm

    torch.manual_seed(0)
    m = UnifiedModel(world_model_config("tiny-vlm", True)).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    vision = vlm.process_images(m.lm, images)
    ids, mask = vlm.encode_prompts(m.tokenizer, m.lm, [vlm.IMAGE_MARK + "edit: x", vlm.IMAGE_MARK + "y"], vision)
    with ComputeCounter().attach(m) as c:
        m.condition(ids, mask, vision)
    assert c.totals() == Counts(lm_forward_tokens=int(mask.sum()) + 2 * m.config.num_queries)
