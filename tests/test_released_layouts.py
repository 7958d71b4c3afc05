"""Checkpoints laid out as they are released (issue 31), on tiny copies: a Qwen2.5-VL-3B-Instruct-like LM directory
(bf16 weights in shards with an index, an instruct tokenizer with its chat template in tokenizer_config.json and in
the processor's chat_template.json, a generation config with two EOS ids, the released preprocessor_config.json) and
a SANA-1.6B-BF16-like pipeline (model_index.json at the root; transformer/ and vae/ holding only
`diffusion_pytorch_model.bf16.safetensors`, an AutoencoderDC with 32 latent channels and a 32x factor).

They train fp32 master weights from bf16 files, export, survive their inputs moving, evaluate and resume; task images
keep their aspect ratio into the VLM and follow a stated rule into the DiT; chat templates reach the model and every
EOS stops it; every bad directory fails before the run directory exists, in one line, exit 2."""
import json
import re
import shutil

import pytest
import torch

from unirl_fast.cli import main
from unirl_fast.train import PRESETS, TrainConfig, Trainer
from unirl_fast.train.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SMOKE = PRESETS["smoke"]
QUIET = dict(log=lambda *_: None)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
# an instruct template of the Qwen2-VL kind (a default system turn, <|im_start|> / <|im_end|> turns, image items)
TEMPLATE = (
    "{%- for m in messages %}{%- if loop.first and m.role != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}"
    "{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_instruct_tokenizer(d, eos="<|im_end|>"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(chars + ["<unk>"])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIALS)  # fixed ids after the characters, whichever is the EOS
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIALS)
    tok.save_pretrained(str(d))
    conf = json.loads((d / "tokenizer_config.json").read_text())  # where the release keeps it (not a .jinja file)
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": TEMPLATE}, indent=2))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))  # the processor's copy
    tok.chat_template = TEMPLATE
    return tok


def build_qwen_vl(d):
    """Qwen2.5-VL-3B-Instruct's layout at toy size: patch 14, merge 2, the released pixel bounds."""
    from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tok = write_instruct_tokenizer(d)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    text = dict(vocab_size=len(tok) + 23, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=1e6,
                rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, out_hidden_size=64,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1])
    cfg = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision, tie_word_embeddings=True,
                               image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                               vision_start_token_id=ids["<|vision_start|>"],
                               vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    lm = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    lm.generation_config = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                                            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True,
                                            temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05)
    lm.save_pretrained(str(d), max_shard_size="300KB")
    (d / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    return ids


def build_sana(root, edit=False):
    """SANA-1.6B BF16's pipeline layout at toy size: DC-AE f32c32, a patch-1 transformer, bf16 variant files only."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    torch.manual_seed(0)
    SanaTransformer2DModel(in_channels=64 if edit else 32, out_channels=32, num_attention_heads=2,
                           attention_head_dim=16, num_layers=2, num_cross_attention_heads=2,
                           cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32, sample_size=2,
                           patch_size=1).to(torch.bfloat16).save_pretrained(str(root / "transformer"), variant="bf16")
    AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=8, encoder_block_types="ResBlock",
                  decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
                  decoder_block_out_channels=(8, 8, 16, 16, 32, 32), encoder_layers_per_block=(1,) * 6,
                  decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 6,
                  decoder_qkv_multiscales=((),) * 6, scaling_factor=0.41407
                  ).to(torch.bfloat16).save_pretrained(str(root / "vae"), variant="bf16")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "SanaPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Gemma2Model"], "tokenizer": ["transformers", "GemmaTokenizerFast"],
        "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"]}))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    d = tmp_path_factory.mktemp("released")
    (d / "qwen").mkdir()
    build_qwen_vl(d / "qwen")
    build_sana(d / "sana")
    return d


def _inputs(released, tmp_path):
    """A private copy of the releases (tests move and break them)."""
    shutil.copytree(released, tmp_path / "inputs")
    return tmp_path / "inputs"


def _tasks(d, n=4, size=(96, 48)):
    """A task file with wide images (2:1) and a split."""
    from PIL import Image

    d.mkdir(exist_ok=True)
    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)][:n]):
        Image.new("RGB", size, colour).save(d / f"{i}.png")
        rows.append({"prompt": f"what colour is it {i}?", "image": f"{i}.png", "answer": "red",
                     "context": "a square", "split": "eval" if i == 0 else "train"})
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "t.jsonl"


def test_the_copies_are_laid_out_like_the_releases(released):
    from unirl_fast.models.experts import file_dtype, resolve_variant, weight_files

    q, s = released / "qwen", released / "sana"
    assert (q / "model.safetensors.index.json").is_file() and len(list(q.glob("model-0000*-of-*.safetensors"))) >= 2
    ids = _ids(q)
    assert json.loads((q / "config.json").read_text())["text_config"]["eos_token_id"] == ids["<|im_end|>"]
    assert json.loads((q / "generation_config.json").read_text())["eos_token_id"] == [ids["<|im_end|>"],
                                                                                     ids["<|endoftext|>"]]
    assert (q / "chat_template.json").is_file() and "chat_template" in (q / "tokenizer_config.json").read_text()
    assert sorted(p.name for p in (s / "transformer").iterdir()) == ["config.json",
                                                                     "diffusion_pytorch_model.bf16.safetensors"]
    assert list(weight_files(s / "vae")) == ["bf16"] and resolve_variant(s / "vae", None, "VAE") == "bf16"
    assert resolve_variant(q, None, "LM") is None
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(q)).chat_template == TEMPLATE
    assert file_dtype(q) == file_dtype(s / "transformer", "bf16") == torch.bfloat16


def _argv(inputs, run, tasks, *extra):
    return ["train", "--config", "smoke", "--scenario", "reason-generate", "--lm-path", str(inputs / "qwen"),
            "--dit-path", str(inputs / "sana" / "transformer"), "--vae-path", str(inputs / "sana" / "vae"),
            "--num-queries", "4", "--connector-dim", "32", "--connector-layers", "1", "--precision", "bf16",
            "--tasks", str(tasks), "--reward", "reward_fns:brightness", "--reward", "reward_fns:completion_length=0.1",
            "--max-new-tokens", "6", "--run-dir", str(run), *extra]


@pytest.mark.parametrize("lora", [False, True])
def test_train_export_move_eval_resume(released, tmp_path, monkeypatch, capsys, lora):
    """The sequence of the issue's check: bf16 shards / variant files / chat template / two EOS ids train (fp32 master
    weights), export, the inputs move away, eval and resume still work from the run directory alone (with LoRA the
    checkpoints hold only the adapters and the connector: the rest comes from the run's copy)."""
    inputs = _inputs(released, tmp_path)
    _tasks(inputs / "data")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths as typed: config.json resolves them
    extra = ["--lora-lm", "4,8", "--lora-dit", "4,8"] if lora else []
    argv = _argv(__import__("pathlib").Path("../inputs"), "run", "../inputs/data/t.jsonl", *extra, "--steps", "1")
    assert main(argv) == 0
    run = work / "run"
    saved = json.loads((run / "config.json").read_text())
    typed = json.loads((run / "config.typed.json").read_text())
    assert saved["lm_path"] == str(inputs / "qwen") and typed["lm_path"] == "../inputs/qwen"
    assert saved["tasks"] == str(inputs / "data" / "t.jsonl") and typed["tasks"] == "../inputs/data/t.jsonl"
    ck = load_checkpoint(latest_checkpoint(run))
    assert all(v.dtype == torch.float32 for k, v in ck["model"].items() if k.startswith(("lm.", "dit.")))
    assert all("lora_" in k or k.startswith("connector.") for k in ck["model"]) == lora
    states = [t for s in ck["optim"]["state"].values() for t in s.values() if t.ndim > 0]
    assert states and all(t.dtype == torch.float32 for t in states)
    copy = run / "base" / "model"
    ids = _ids(inputs / "qwen")
    assert json.loads((copy / "lm" / "generation_config.json").read_text())["eos_token_id"] == [
        ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert (copy / "lm" / "preprocessor_config.json").is_file() and (run / "base" / "tasks" / "tasks.jsonl").is_file()
    assert saved["timestep_schedule"] == "diffusers" and saved["image_shift"] == 3.0  # the pipeline's scheduler
    assert (copy / "scheduler" / "scheduler_config.json").is_file()  # read again on a resume
    from unirl_fast.models.experts import file_dtype

    assert file_dtype(copy / "dit") == torch.bfloat16  # a lossless copy at the files' dtype
    shutil.move(str(inputs), str(tmp_path / "moved"))  # the inputs go away
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["export", str(run), "out"]) == 0
    assert (elsewhere / "out" / "scheduler" / "scheduler_config.json").is_file()  # the pipeline's, beside dit/
    from unirl_fast.train.config import image_schedule

    assert image_schedule(TrainConfig(model_path=str(elsewhere / "out"), run_dir=str(tmp_path / "r2"))) == (
        "diffusers", 3.0)  # a run from the export samples as the release's pipeline does
    from transformers import AutoTokenizer

    out_tok = AutoTokenizer.from_pretrained(str(elsewhere / "out" / "lm"))
    assert out_tok.chat_template == TEMPLATE
    proc = json.loads((elsewhere / "out" / "lm" / "preprocessor_config.json").read_text())  # the release's bounds
    assert proc.get("max_pixels", proc.get("size", {}).get("longest_edge")) == 12845056
    assert main(["eval", str(run)]) == 0
    monkeypatch.chdir(work)
    assert main(argv[:-2] + ["--steps", "2"]) == 0  # the same command: its inputs no longer exist
    err = capsys.readouterr().err
    assert "Traceback" not in err
    steps = [json.loads(x)["step"] for x in open(run / "metrics.jsonl") if '"phase": "train"' in x]
    assert steps == [1, 2]
    resumes = [json.loads(x) for x in open(run / "resumes.jsonl")]
    assert "steps" in resumes[-1]["changes"]
    shutil.move(str(run), str(tmp_path / "run2"))  # the run directory itself may move too
    assert main(["eval", str(tmp_path / "run2")]) == 0


def _ids(qwen) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen))
    return {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}


def test_a_run_made_before_these_options_resumes_and_evaluates_as_it_ran(released, tmp_path, capsys):
    """config.json of an earlier version has no chat_template / image_resize: it ran raw prompts and stretched task
    images, so eval uses those, and a resume with today's defaults is refused naming them."""
    from unirl_fast.train.rundir import saved_config

    run = tmp_path / "run"
    argv = _argv(released, run, _tasks(tmp_path / "data"), "--steps", "1")
    assert main(argv + ["--chat-template", "none", "--image-resize", "stretch"]) == 0
    saved = json.loads((run / "config.json").read_text())
    del saved["chat_template"], saved["image_resize"]
    (run / "config.json").write_text(json.dumps(saved))
    cfg = saved_config(run)
    assert (cfg.chat_template, cfg.image_resize) == ("none", "stretch")
    capsys.readouterr()
    assert main(argv[:-2] + ["--steps", "2"]) == 2
    assert "chat_template 'none' -> 'auto', image_resize 'stretch' -> 'crop'" in capsys.readouterr().err
    assert main(argv[:-2] + ["--steps", "2", "--chat-template", "none", "--image-resize", "stretch"]) == 0


@pytest.mark.parametrize("frozen", ["fp32", "file"])
def test_bf16_files_train_fp32_master_weights(released, tmp_path, frozen):
    """--precision bf16 over bf16 files: every trained parameter and optimizer state is fp32; frozen experts (the
    autoencoder; the LM in `generate`) stay fp32, or with --frozen-dtype file in the files' bf16."""
    q, s = released / "qwen", released / "sana"
    for scenario in ("reason-generate", "generate"):
        cfg = SMOKE.__class__(**{**SMOKE.__dict__, "scenario": scenario, "run_dir": str(tmp_path / scenario),
                                 "lm_path": str(q), "dit_path": str(s / "transformer"), "vae_path": str(s / "vae"),
                                 "num_queries": 4, "connector_dim": 32, "connector_layers": 1, "precision": "bf16",
                                 "frozen_dtype": frozen, "tasks": str(_tasks(tmp_path / "data")),
                                 "reward": ("reward_fns:brightness", "reward_fns:completion_length=0.1"),
                                 "max_new_tokens": 6, "steps": 1})
        t = Trainer(cfg, **QUIET)
        t.train_step()
        trained = [p for p in t.model.parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained)
        states = [v for st in t.opt.state.values() for v in st.values() if v.ndim > 0]
        assert states and all(v.dtype == torch.float32 for v in states)  # AdamW's moments
        frozen_dtype = torch.float32 if frozen == "fp32" else torch.bfloat16
        assert t.model.vae.dtype == frozen_dtype
        assert t.model.lm.dtype == (torch.float32 if scenario == "reason-generate" else frozen_dtype)


def test_frozen_dtype_under_deepspeed_is_refused(tmp_path, capsys):
    argv = ["train", "--config", "smoke", "--zero-stage", "2", "--frozen-dtype", "bf16", "--run-dir"]
    assert main(argv + [str(tmp_path / "r")]) == 2
    assert "--frozen-dtype bf16 under DeepSpeed ZeRO is not supported" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_plan_counts_frozen_experts_at_their_dtype(capsys):
    import torch as _t

    from unirl_fast.models import UnifiedModel, preset_config
    from unirl_fast.models.plan import memory_plan

    with _t.device("meta"):
        m = UnifiedModel(preset_config("unirl-zero-3b-sana-1.6b"))
    full = memory_plan(m, train_lm=False, train_dit=True)
    half = memory_plan(m, train_lm=False, train_dit=True, frozen_dtype="bf16")
    lm = full["params"]["lm"] + full["params"]["lm_vision"] + full["params"]["vae"]
    assert full["frozen"] == half["frozen"] == lm
    assert full["stages"][0]["weights"] - half["stages"][0]["weights"] == 2 * lm
    assert main(["plan", "--preset", "unirl-zero-3b-sana-1.6b", "--scenario", "generate", "--frozen-dtype",
                 "bf16"]) == 0
    assert "in bf16" in capsys.readouterr().out


# images -----------------------------------------------------------------------------------------------------------
def test_vlm_sees_task_images_at_their_aspect_ratio(released, tmp_path):
    from unirl_fast.models import vlm
    from unirl_fast.train.rl import rollout

    tasks = _tasks(tmp_path / "data", size=(224, 112))
    cfg = SMOKE.__class__(**{**SMOKE.__dict__, "scenario": "understand", "run_dir": str(tmp_path / "r"),
                             "lm_path": str(released / "qwen"), "dit_path": str(released / "sana" / "transformer"),
                             "vae_path": str(released / "sana" / "vae"), "num_queries": 4, "connector_dim": 32,
                             "connector_layers": 1, "tasks": str(tasks), "reward": ("answer",), "max_new_tokens": 4})
    for max_pixels, grid in ((None, [1, 8, 16]), (56 * 112, [1, 4, 8])):
        t = Trainer(SMOKE.__class__(**{**cfg.__dict__, "max_image_pixels": max_pixels,
                                       "run_dir": str(tmp_path / f"r{max_pixels}")}), **QUIET)
        b = rollout(t.model, t.scenario, t.cfg, t.train_tasks[:2], torch.zeros(2, dtype=torch.long), t.gen)
        assert b.text.vision.image_grid_thw.tolist() == [grid] * 2  # 2:1 kept (224 x 112 -> 16 x 8 patches)
        assert tuple(b.lm_images[0].shape[1:]) == (112, 224) if max_pixels is None else (56, 112)
        assert int((b.text.prompt_ids == t.model.lm.config.image_token_id).sum(-1)[0]) == grid[1] * grid[2] // 4
        ev = t.evaluate()
        assert tuple(ev["_samples"][0]["source"].shape[1:]) == tuple(b.lm_images[0].shape[1:])  # the sheet's image
    assert vlm.is_vlm(t.model.lm)


def test_the_runs_copy_of_its_tasks_keeps_fields_splits_and_images(tmp_path):
    """base/tasks: JSON rows and image files (a file hard-linked or copied; an image in memory, meta included, as PNG);
    read back after the source is gone, the same tasks with the same pixels; a meta value JSON cannot keep means no
    copy, said in a warning."""
    from PIL import Image

    from unirl_fast.tasks import Task, TaskSet, load_tasks
    from unirl_fast.train.inputs import read_tasks_copy, write_tasks_copy
    from unirl_fast.train.scenarios import get_scenario

    src = load_tasks(str(_tasks(tmp_path / "data", size=(40, 20))), get_scenario("edit"))
    extra = Task("in memory", image=Image.new("RGB", (6, 4), (1, 2, 3)), meta={"mask": Image.new("L", (2, 2), 7),
                                                                              "tags": ["a", 1]}, origin="mem:1")
    ts = TaskSet("t.jsonl", src.train + [extra], src.eval)
    copy = write_tasks_copy(ts, tmp_path / "run")
    pixels = [t.lm_image(32) for t in ts.train + ts.eval]
    shutil.rmtree(tmp_path / "data")  # the source goes
    back = read_tasks_copy(copy, "t.jsonl")
    assert [t.prompt for t in back.train] == [t.prompt for t in ts.train] and len(back.eval) == len(ts.eval)
    for a, b, want in zip(ts.train + ts.eval, back.train + back.eval, pixels):
        assert (a.answer, a.context, a.origin) == (b.answer, b.context, b.origin)
        assert torch.equal(b.lm_image(32), want)
    assert tuple(back.train[0].lm_image(32).shape) == (3, 20, 40) and back.train[-1].meta["tags"] == ["a", 1]
    assert back.train[-1].meta["mask"].getpixel((0, 0)) == 7
    with pytest.warns(UserWarning, match="keeps no copy of its tasks .* type object is not JSON"):
        assert write_tasks_copy(TaskSet("x", [Task("p", meta={"o": object()})], src.eval), tmp_path / "r2") is None
    assert not (tmp_path / "r2" / "base" / "tasks").exists()


def test_dit_resize_rules(tmp_path):
    from PIL import Image

    from unirl_fast.tasks import load_image

    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 16, 32))  # a blue band on the left quarter
    crop, pad, stretch = (load_image(img, 32, resize=r) for r in ("crop", "pad", "stretch"))
    assert crop[0, :, 0].mean() > 0.9 and crop[2, :, 0].mean() < -0.9  # the centre 32 x 32: red only, no band
    assert pad[:, 0].max() == -1 and pad[:, 16].max() == 1  # black bars above and below, the image in the middle
    assert pad[2, 16, 2] > 0.9 and pad[0, 16, 12] > 0.9  # the band: the left quarter, halved too
    assert stretch[2, :, 4].mean() > 0.9 and stretch[0, :, 12].mean() > 0.9  # the band squeezed to 8 columns
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image(img, 32, resize="fit")


# chat templates and EOS ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer_eos, forced", [("<|im_end|>", "<|endoftext|>"), ("<|endoftext|>", "<|im_end|>")])
def test_chat_template_reaches_the_model_and_every_eos_stops(released, tmp_path, tokenizer_eos, forced):
    """The instruct tokenizer's turn markers are in the LM's prompt ids; generation stops at the id the LM emits
    whether the tokenizer or only the generation config names it as an EOS."""
    from unirl_fast.train.rl import rollout

    q = tmp_path / "qwen"
    shutil.copytree(released / "qwen", q)
    tok = write_instruct_tokenizer(q, eos=tokenizer_eos)
    cfg = SMOKE.__class__(**{**SMOKE.__dict__, "scenario": "reason-generate", "run_dir": str(tmp_path / "r"),
                             "lm_path": str(q), "dit_path": str(released / "sana" / "transformer"),
                             "vae_path": str(released / "sana" / "vae"), "num_queries": 4, "connector_dim": 32,
                             "connector_layers": 1, "tasks": str(_tasks(tmp_path / "data")),
                             "reward": ("reward_fns:brightness",), "max_new_tokens": 8})
    t = Trainer(cfg, **QUIET)
    m = t.model
    stop = tok.convert_tokens_to_ids(forced)
    push = torch.zeros(m.lm.config.get_text_config().vocab_size)
    push[stop] = 1e4  # the LM's head says `forced` after anything
    m.lm.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out + push.to(out.dtype))
    b = rollout(m, t.scenario, t.cfg, t.train_tasks[:2], torch.zeros(2, dtype=torch.long), t.gen, eval_mode=True)
    row = tok.decode(b.text.prompt_ids[0][b.text.prompt_mask[0].bool()])
    assert row.startswith("<|im_start|>system\n") and row.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Request: " in row and "<|im_start|>user\n" in row
    assert b.text.completion_mask.sum(-1).tolist() == [1, 1] and b.text.completion_ids[:, 0].tolist() == [stop] * 2
    cond = tok.decode(b.cond_ids[0][b.cond_mask[0].bool()])  # the DiT's text, too, is the user's turn
    assert cond.startswith("<|im_start|>system") and cond.endswith("<|im_start|>assistant\n")
    raw = Trainer(SMOKE.__class__(**{**cfg.__dict__, "chat_template": "none", "run_dir": str(tmp_path / "raw")}),
                  **QUIET)
    b = rollout(raw.model, raw.scenario, raw.cfg, raw.train_tasks[:1], torch.zeros(1, dtype=torch.long), raw.gen)
    assert "<|im_start|>" not in tok.decode(b.text.prompt_ids[0]) and "say: " in tok.decode(b.text.prompt_ids[0])


# bad directories ----------------------------------------------------------------------------------------------------
def _break(inputs, case, tmp_path):
    """(argv tail, the expected message) of one way a released directory can be wrong."""
    q, t, v = inputs / "qwen", inputs / "sana" / "transformer", inputs / "sana" / "vae"
    lm, dit, vae = str(q), str(t), str(v)
    if case == "no tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json"):
            (q / f).unlink(missing_ok=True)
        msg = r"lm_path '.*qwen' has no usable tokenizer \(\d tokens"
    elif case == "tiny tokenizer":
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                eos_token="a", unk_token="<unk>").save_pretrained(str(q))
        msg = r"lm_path '.*qwen' has no usable tokenizer \(2 tokens"
    elif case == "dit is an lm":
        dit = lm
        msg = r"dit_path '.*qwen' holds a transformers model \(Qwen2_5_VLForConditionalGeneration\), not a diffusers"
    elif case == "dit is a pipeline":
        dit = str(inputs / "sana")
        msg = r"dit_path '.*sana' is a diffusers pipeline .* give its transformer folder"
    elif case == "unknown dit":
        c = json.loads((t / "config.json").read_text())
        (t / "config.json").write_text(json.dumps({**c, "_class_name": "FluxTransformer2DModel"}))
        msg = r"holds a FluxTransformer2DModel; supported DiT classes: SanaTransformer2DModel, SD3Transformer2DModel"
    elif case == "unknown vae":
        c = json.loads((v / "config.json").read_text())
        (v / "config.json").write_text(json.dumps({**c, "_class_name": "AutoencoderTiny"}))
        msg = r"vae_path .* holds a AutoencoderTiny; supported autoencoder classes: AutoencoderKL, AutoencoderDC"
    elif case == "vae channels":
        c = json.loads((v / "config.json").read_text())
        (v / "config.json").write_text(json.dumps({**c, "latent_channels": 16}))
        msg = r"takes in_channels=32 and gives out_channels=32, but the autoencoder in .* has 16 latent channels"
    elif case == "no vae":
        vae = None
        msg = r"takes in_channels=32 .* without --vae-path the DiT works in pixels \(3 channels\)"
    elif case == "vlm without processor":
        (q / "preprocessor_config.json").unlink()
        msg = r"is a vision-language LM \(qwen2_5_vl\) without its image processor"
    elif case == "two variants":
        shutil.copy(t / "diffusion_pytorch_model.bf16.safetensors", t / "diffusion_pytorch_model.fp16.safetensors")
        msg = r"holds several weight variants \('bf16', 'fp16'\) and no default: choose one"
    elif case == "missing variant":
        return ["--dit-variant", "fp16"] + _paths(lm, dit, vae), r"has no 'fp16' weight files \(it has: 'bf16'\)"
    else:  # "chat template file"
        return ["--chat-template", str(tmp_path / "none.jinja")] + _paths(lm, dit, vae), r"none.jinja' is not a file"
    return _paths(lm, dit, vae), msg


def _paths(lm, dit, vae):
    return ["--lm-path", lm, "--dit-path", dit] + (["--vae-path", vae] if vae else []) + [
        "--num-queries", "4", "--connector-dim", "32", "--connector-layers", "1"]


BAD = ["no tokenizer", "tiny tokenizer", "dit is an lm", "dit is a pipeline", "unknown dit", "unknown vae",
       "vae channels", "no vae", "vlm without processor", "two variants", "missing variant", "chat template file"]


@pytest.mark.parametrize("case", BAD)
def test_bad_directories_fail_before_the_run_directory(released, tmp_path, capsys, case):
    inputs = _inputs(released, tmp_path)
    tail, msg = _break(inputs, case, tmp_path)
    run = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--scenario", "reason-generate", "--run-dir", str(run), "--tasks",
            str(_tasks(tmp_path / "data")), "--reward", "reward_fns:brightness", *tail]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(msg, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not run.exists()


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)], ids=["zero2", "zero3"])
def test_two_ranks_train_the_released_layouts_and_resume(released, tmp_path, stage):
    """The released layouts (sharded bf16 Qwen2.5-VL with a chat template, a SANA pipeline's bf16 variants) under
    DeepSpeed ZeRO, two ranks: fp32 master weights, the run's copy written once, a checkpoint per step, a resume
    that reads the copy after the inputs are gone, and one process exporting the run."""
    pytest.importorskip("deepspeed")
    from test_distributed import _env_launch, _lines, _stage_args

    inputs = _inputs(released, tmp_path)
    tasks = _tasks(inputs / "data")
    run = tmp_path / "run"
    args = ["train", "--config", "smoke", "--scenario", "reason-generate", "--lm-path", str(inputs / "qwen"),
            "--dit-path", str(inputs / "sana" / "transformer"), "--vae-path", str(inputs / "sana" / "vae"),
            "--num-queries", "4", "--connector-dim", "32", "--connector-layers", "1", "--tasks", str(tasks),
            "--reward", "format:^.+$", "--max-new-tokens", "6", "--micro-batch", "2", "--save-every", "1",
            "--run-dir", str(run), *_stage_args(stage, tmp_path)]
    rcs, outs = _env_launch(args + ["--steps", "1"])
    assert rcs == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    copy = run / "base" / "model"
    assert (copy / "unified_config.json").is_file() and (copy / "scheduler" / "scheduler_config.json").is_file()
    assert not list((run / "base").glob("*.tmp"))  # one rank wrote it, whole
    shutil.move(str(inputs), str(tmp_path / "moved"))  # the resume reads the run's copy
    rcs, outs = _env_launch(args + ["--steps", "2"])
    assert rcs == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    train = [r for r in _lines(run) if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["grad_norm"] > 0 for r in train)
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "lm" / "config.json").is_file() and (tmp_path / "out" / "dit").is_dir()
