"""A vision-language LM expert (Qwen2.5-VL class): tiny models built from real configs, saved with save_pretrained and
loaded back, run understand / edit / reason-edit; the LM's log-probs and the DiT's conditioning depend on the image;
the rollout engine's M-RoPE decode matches a full forward; text-only LMs keep today's behaviour and errors."""
import dataclasses
import json

import pytest
import torch

from unirl_fast.models import UnifiedModel, vlm
from unirl_fast.rollout import SamplingParams, TextEngine
from unirl_fast.rollout.text import recompute_logprobs
from unirl_fast.tasks import load_tasks
from unirl_fast.train import PRESETS, Trainer
from unirl_fast.train.pretrain import run_lm_has_vision, world_model_config
from unirl_fast.train.rl import rollout
from unirl_fast.train.scenarios import get_scenario
from unirl_fast.world import understanding_tasks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny, launch-bound work: see conftest
SMOKE = PRESETS["smoke"]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    """The tiny world's VLM (Qwen2.5-VL) and its edit / plain Sana DiTs, each saved by its own library."""
    d = tmp_path_factory.mktemp("experts")
    torch.manual_seed(0)
    base = UnifiedModel(world_model_config("tiny-vlm", edit=True))
    base.lm.save_pretrained(str(d / "lm"))
    base.dit.save_pretrained(str(d / "dit_edit"))
    UnifiedModel(world_model_config("tiny-vlm", edit=False)).dit.save_pretrained(str(d / "dit"))
    return d


def _from_dirs(d, edit: bool) -> UnifiedModel:
    cfg = world_model_config("tiny-vlm", edit).replace(lm=None, lm_path=str(d / "lm"), dit=None,
                                                       dit_path=str(d / ("dit_edit" if edit else "dit")))
    torch.manual_seed(1)
    return UnifiedModel(cfg).eval()


def test_tiny_vlm_preset_is_a_qwen2_5_vl_with_the_char_image_tokens():
    cfg = world_model_config("tiny-vlm", edit=False)
    assert cfg.lm["model_type"] == "qwen2_5_vl" and cfg.tokenizer == "char"
    assert cfg.lm["text_config"]["vocab_size"] == 104 and cfg.lm["image_token_id"] == 102
    assert run_lm_has_vision(dataclasses.replace(SMOKE, preset="tiny-vlm"), get_scenario("understand"))
    assert not run_lm_has_vision(SMOKE, get_scenario("understand"))


def test_loaded_from_directories_same_outputs_and_text_part_widths(expert_dirs):
    m = _from_dirs(expert_dirs, edit=True)
    assert type(m.lm).__name__ == "Qwen2_5_VLForConditionalGeneration" and vlm.is_vlm(m.lm)
    assert m.connector.proj_in.in_features == vlm.text_config(m.lm).hidden_size == 64
    again = _from_dirs(expert_dirs, edit=True)
    imgs = torch.rand(2, 3, 32, 32) * 2 - 1
    v = vlm.process_images(m.lm, imgs)
    ids, mask = vlm.encode_prompts(m.tokenizer, m.lm, [vlm.IMAGE_MARK + "make the circle red", "hi" + vlm.IMAGE_MARK],
                                   v)
    with torch.no_grad():
        assert torch.equal(m.query_hidden(ids, mask, v), again.query_hidden(ids, mask, v))
        # a raw image tensor goes through the same processor
        assert torch.equal(m.query_hidden(ids, mask, imgs), m.query_hidden(ids, mask, v))


def test_processor_and_prompt_layout(expert_dirs):
    m = _from_dirs(expert_dirs, edit=False)
    v = vlm.process_images(m.lm, torch.rand(3, 3, 32, 32) * 2 - 1)
    # 32 px at patch 4: an 8 x 8 patch grid, 2 x 2 merged: 16 image tokens; patches are 3 channels x 2 frames x 4 x 4
    assert v.image_grid_thw.tolist() == [[1, 8, 8]] * 3 and tuple(v.pixel_values.shape) == (192, 96)
    ids, mask = vlm.encode_prompts(m.tokenizer, m.lm, ["a" + vlm.IMAGE_MARK + "bc"] * 3, v)
    row = ids[0][mask[0].bool()].tolist()
    assert row[:3] == [1, m.tokenizer.encode("a")[0], 100] and row[3:19] == [102] * 16 and row[19] == 101
    sub = v.select([2, 0])
    assert torch.equal(sub.pixel_values[:64], v.pixel_values[128:]) and torch.equal(sub.pixel_values[64:],
                                                                                    v.pixel_values[:64])
    with pytest.raises(ValueError, match="has an <image> mark but no image"):
        vlm.encode_prompts(m.tokenizer, m.lm, ["x" + vlm.IMAGE_MARK], None)
    with pytest.raises(ValueError, match="exactly one <image> mark"):
        vlm.encode_prompts(m.tokenizer, m.lm, ["no mark"] * 3, v)
    with pytest.raises(ValueError, match="image tokens per row but the images need"):
        m.query_hidden(ids[:, 5:], mask[:, 5:], v)


def test_processor_settings_come_from_the_lm_directory(expert_dirs, tmp_path):
    import shutil

    from transformers import Qwen2VLImageProcessorPil

    shutil.copytree(expert_dirs / "lm", tmp_path / "lm")
    Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=64 * 64,
                             max_pixels=64 * 64).save_pretrained(str(tmp_path / "lm"))
    cfg = world_model_config("tiny-vlm", False).replace(lm=None, lm_path=str(tmp_path / "lm"))
    m = UnifiedModel(cfg)
    v = vlm.process_images(m.lm, torch.rand(1, 3, 32, 32) * 2 - 1)
    assert v.image_grid_thw.tolist() == [[1, 16, 16]]  # upscaled to the directory's 64 x 64 minimum: 64 tokens
    ids, mask = vlm.encode_prompts(m.tokenizer, m.lm, [vlm.IMAGE_MARK], v)
    assert int((ids == 102).sum()) == 64 and m.condition(ids, mask, v).cond.shape[0] == 1


def test_qwen2_vl_decode_matches_a_full_forward():
    lm = dict(world_model_config("tiny-vlm", False).lm, model_type="qwen2_vl")
    lm["vision_config"] = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                           "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    torch.manual_seed(0)
    m = UnifiedModel(world_model_config("tiny", False).replace(lm=lm)).eval()
    assert type(m.lm).__name__ == "Qwen2VLForConditionalGeneration"
    imgs = torch.rand(2, 3, 32, 32) * 2 - 1
    v = vlm.process_images(m.lm, imgs)
    ids, mask = vlm.encode_prompts(m.tokenizer, m.lm, [vlm.IMAGE_MARK + "q: a: ", "hi " + vlm.IMAGE_MARK], v)
    out = TextEngine(m.lm, tokenizer=m.tokenizer, pad_token_id=0, compile=False).generate(
        ids, mask, SamplingParams(max_new_tokens=8, eos_token_ids=(2,)), generator=torch.Generator().manual_seed(0),
        vision=v)
    with torch.no_grad():
        full = recompute_logprobs(m.lm, out, impl="reference")
        other = recompute_logprobs(m.lm, dataclasses.replace(out, vision=vlm.process_images(m.lm, -imgs)),
                                   impl="reference")
    assert (full - out.logprobs).abs().max() < 1e-4
    assert (other - full)[out.completion_mask].abs().max() > 1e-3


def test_query_hidden_with_images_ignores_left_padding(expert_dirs):
    m = _from_dirs(expert_dirs, edit=True)
    v = vlm.process_images(m.lm, torch.rand(2, 3, 32, 32) * 2 - 1)
    texts = [vlm.IMAGE_MARK + "move the square to the left", "x" + vlm.IMAGE_MARK]
    ids, mask = vlm.encode_prompts(m.tokenizer, m.lm, texts, v)
    with torch.no_grad():
        both = m.query_hidden(ids, mask, v)
        alone = m.query_hidden(*vlm.encode_prompts(m.tokenizer, m.lm, texts[1:], v.select([1])), v.select([1]))
    assert (both[1] - alone[0]).abs().max() < 1e-5


def test_engine_decode_matches_a_full_forward_and_depends_on_the_image(expert_dirs):
    m = _from_dirs(expert_dirs, edit=False)
    imgs = torch.rand(3, 3, 32, 32) * 2 - 1
    v = vlm.process_images(m.lm, imgs)
    ids, mask = vlm.encode_prompts(m.tokenizer, m.lm, ["q: what? a: " + vlm.IMAGE_MARK, vlm.IMAGE_MARK + "hi",
                                                       "a longer prompt " + vlm.IMAGE_MARK + " ok"], v)
    eng = TextEngine(m.lm, tokenizer=m.tokenizer, pad_token_id=0, compile=False)
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=12, eos_token_ids=(2,), temperature=1.3),
                       generator=torch.Generator().manual_seed(0), vision=v)
    assert out.vision is v and out.completion_mask.any()
    with torch.no_grad():
        full = recompute_logprobs(m.lm, out, temperature=1.3, impl="reference")
        other = recompute_logprobs(m.lm, dataclasses.replace(out, vision=vlm.process_images(m.lm, imgs.flip(-1))),
                                   temperature=1.3, impl="reference")
    assert (full - out.logprobs).abs().max() < 1e-4  # prefill + cached decode at rope deltas == one full forward
    assert (other - full)[out.completion_mask].abs().max() > 1e-3  # another image: other log-probs, same tokens


def _pair(tasks, swap):
    """The same questions, each about another task's image (a different scene)."""
    return [dataclasses.replace(t, source=swap[i].source) for i, t in enumerate(tasks)]


def test_understand_rollout_reads_the_image(expert_dirs):
    m, s = _from_dirs(expert_dirs, edit=False), get_scenario("understand")
    tasks = understanding_tasks("train")[:4]
    cfg = dataclasses.replace(SMOKE, scenario="understand")
    b = rollout(m, s, cfg, tasks, torch.arange(4), torch.Generator().manual_seed(0))
    assert b.text.vision is not None and len(b.text.vision) == 4
    assert not any(t.context in m.tokenizer.decode(row) for t, row in zip(tasks, b.text.prompt_ids))
    swapped = rollout(m, s, cfg, _pair(tasks, understanding_tasks("train")[10:14]), torch.arange(4),
                      torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = recompute_logprobs(m.lm, b.text, impl="reference")
        theirs = recompute_logprobs(m.lm, dataclasses.replace(b.text, vision=swapped.text.vision), impl="reference")
    assert (mine - b.text.logprobs).abs().max() < 1e-4
    assert (theirs - mine)[b.text.completion_mask].abs().max() > 1e-3


@pytest.mark.parametrize("scenario", ["edit", "reason-edit"])
def test_edit_conditioning_depends_on_the_source_image(expert_dirs, scenario):
    from unirl_fast.world import edit_tasks

    m, s = _from_dirs(expert_dirs, edit=True), get_scenario(scenario)
    tasks = edit_tasks("train", reasoning=s.reasoning)[:3]
    b = rollout(m, s, dataclasses.replace(SMOKE, scenario=scenario), tasks, torch.arange(3),
                torch.Generator().manual_seed(0))
    assert b.cond_vision is not None and b.sources is not None
    flipped = vlm.process_images(m.lm, b.sources.flip(-1))
    with torch.no_grad():
        same = m.condition(b.cond_ids, b.cond_mask, b.cond_vision).cond
        other = m.condition(b.cond_ids, b.cond_mask, flipped).cond
    assert torch.allclose(same, b.traj.conditioning.cond, atol=1e-5)
    assert (other - same).abs().max() > 1e-3
    if s.lm_writes:
        with torch.no_grad():
            mine = recompute_logprobs(m.lm, b.text, impl="reference")
            theirs = recompute_logprobs(m.lm, dataclasses.replace(b.text, vision=flipped), impl="reference")
        assert (theirs - mine)[b.text.completion_mask].abs().max() > 1e-3


@pytest.mark.parametrize("scenario", ["understand", "edit", "reason-edit"])
def test_scenarios_train_a_vlm_loaded_from_directories(expert_dirs, tmp_path, scenario):
    s = get_scenario(scenario)
    model = _from_dirs(expert_dirs, edit=s.edit)
    before = {k: v.clone() for k, v in model.lm.model.visual.state_dict().items()}
    cfg = dataclasses.replace(SMOKE, scenario=scenario, preset="tiny-vlm", run_dir=str(tmp_path), micro_batch=2,
                              beta=0.01, eval_prompts=2, lr_lm=1e-3, reward=("reward_fns:varied",))
    out = Trainer(cfg, model=model, **QUIET).train()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"phase": "train"' in line]
    assert [r["step"] for r in recs] == [1, 2] and out["final_eval_reward"] is not None
    assert all(torch.isfinite(torch.tensor(r["reward"])) for r in recs)
    moved = any(not torch.equal(v, model.lm.model.visual.state_dict()[k]) for k, v in before.items())
    assert moved == s.train_lm  # the LM's policy gradient reaches its vision tower


def test_text_only_lm_understand_needs_context(tmp_path, capsys):
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(img)
    rows = tmp_path / "q.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"what colour? {i}", "image": "a.png", "answer": "red"})
                              for i in range(6)))
    s = get_scenario("understand")
    with pytest.raises(ValueError, match=r"q.jsonl:1: scenario 'understand' needs a 'context'.*no vision tower"):
        load_tasks(str(rows), s)
    ts = load_tasks(str(rows), s, vision=True)  # a VLM looks at the image instead
    assert len(ts.train) + len(ts.eval) == 6
    with pytest.raises(ValueError, match="q.jsonl:1: scenario 'understand' with an LM that has no vision tower"):
        s.lm_prompt(ts.train[0] if ts.train[0].origin.endswith(":1") else ts.eval[0])
    no_image = tmp_path / "n.jsonl"
    no_image.write_text(json.dumps({"prompt": "what?", "context": "a red square", "split": "train"}) + "\n" +
                        json.dumps({"prompt": "who?", "context": "a red square", "split": "eval"}))
    with pytest.raises(ValueError, match="n.jsonl:1: scenario 'understand' with a vision-language LM asks about"):
        load_tasks(str(no_image), s, vision=True)
    from unirl_fast.cli import main

    # the CLI's preflight: one line naming the row, exit 2, before any model is built or file written
    assert main(["train", "--scenario", "understand", "--config", "smoke", "--tasks", str(rows),
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "q.jsonl:1: scenario 'understand' needs a 'context'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_images_on_a_text_only_lm_are_an_error():
    m = UnifiedModel(world_model_config("tiny", edit=False))
    ids, mask = m.tokenizer(["hi"])
    with pytest.raises(ValueError, match="needs a vision-language LM.*'qwen2'.*no vision tower"):
        m.condition(ids, mask, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="needs a vision-language LM"):
        TextEngine(m.lm, compile=False).generate(ids, mask, SamplingParams(max_new_tokens=2),
                                                 vision=vlm.VisionInputs(torch.zeros(64, 96),
                                                                         torch.tensor([[1, 8, 8]])))

