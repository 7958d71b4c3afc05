"""Real runs, part 1 (issue 18) on CPU: your own experts from local directories (a transformers LM with its own
tokenizer, a diffusers DiT and autoencoder, all built from configs and written with save_pretrained), the split
save layout and `unirl-fast export`, LoRA through peft (only adapters and connector train, the reference is the base
with adapters off, checkpoints hold only the trained weights, export merges), bf16 autocast with gradient
checkpointing, and the meta-device memory plan."""
import dataclasses
import json
import re

import pytest
import torch

from unirl_fast.cli import main
from unirl_fast.models import UnifiedModel, preset_config
from unirl_fast.models.plan import memory_plan
from unirl_fast.train import PRESETS, Trainer
from unirl_fast.train.checkpoint import latest_checkpoint, load_checkpoint

SMOKE = PRESETS["smoke"]
QUIET = dict(log=lambda *_: None)
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """lm/ (Qwen2 with a character-level HF tokenizer), dit/ (Sana, 4 latent channels, 8 x 8), vae/ (AutoencoderKL,
    factor 2): a 16 px latent-space unified model from directories."""
    from diffusers import AutoencoderKL, SanaTransformer2DModel
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("experts")
    vocab = ["<pad>", "<eos>", "<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None))
    lm.save_pretrained(d / "lm")
    tok.save_pretrained(d / "lm")
    SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                           num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                           caption_channels=32, sample_size=8, patch_size=2).save_pretrained(d / "dit")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8], layers_per_block=1,
                  norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2).save_pretrained(d / "vae")
    return d


def _paths(experts):
    return ["--lm-path", str(experts / "lm"), "--dit-path", str(experts / "dit"), "--vae-path", str(experts / "vae"),
            "--num-queries", "4", "--connector-dim", "32", "--connector-layers", "1"]


def _prompts(path):
    rows = [{"prompt": f"{c} {s}", "split": "eval" if i == 0 else "train"}
            for i, (c, s) in enumerate([("red", "square"), ("blue", "disc"), ("green", "star"), ("cyan", "dot")])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_generate_with_your_own_experts_then_export(experts, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--config", "smoke", "--scenario", "generate", "--steps", "2", "--run-dir", str(run),
            "--tasks", str(_prompts(tmp_path / "p.jsonl")), "--reward", "reward_fns:brightness", *_paths(experts)]
    assert main(argv) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["lm_path"] == str(experts / "lm") and saved["num_queries"] == 4
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["connector.safetensors", "dit", "lm", "unified_config.json", "vae"]
    from diffusers import SanaTransformer2DModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(out / "lm")  # each expert loads on its own, tokenizer included
    ids = list(range(3, 40))
    want = AutoTokenizer.from_pretrained(experts / "lm").decode(ids)
    assert AutoTokenizer.from_pretrained(out / "lm").decode(ids) == want
    base_dit = SanaTransformer2DModel.from_pretrained(experts / "dit")
    dit = SanaTransformer2DModel.from_pretrained(out / "dit")
    assert any(not torch.equal(a, b) for a, b in zip(dit.state_dict().values(), base_dit.state_dict().values()))
    base_lm = AutoModelForCausalLM.from_pretrained(experts / "lm")  # generate trains the DiT, not the LM
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), base_lm.state_dict().values()))
    # the export is the run's final model: same velocity as the trainer's resumed model
    cfg = dataclasses.replace(SMOKE.__class__(**saved), zero_stage=None)
    t = Trainer(cfg, purpose="eval", **QUIET)
    m2 = UnifiedModel.from_pretrained(out)
    ids, mask = m2.tokenizer(["red square", "blue disc"])
    x = torch.randn(2, *m2.latent_shape)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids, mask, x, 0.5), t.model.eval()(ids, mask, x, 0.5), rtol=0, atol=0)
    # and trains on with --model-path
    argv = ["train", "--config", "smoke", "--scenario", "generate", "--steps", "1", "--run-dir", str(tmp_path / "r2"),
            "--tasks", str(tmp_path / "p.jsonl"), "--reward", "reward_fns:brightness", "--model-path", str(out)]
    assert main(argv) == 0


def test_understand_with_an_hf_tokenizer_lm(experts, tmp_path):
    (tmp_path / "q.csv").write_text("prompt,context,answer,split\nwhat colour?,a red square,red,train\n"
                                    "how many?,two blue discs,two,train\nwhere?,a dot on the left,left,eval\n")
    cfg = dataclasses.replace(SMOKE, scenario="understand", run_dir=str(tmp_path / "u"), tasks=str(tmp_path / "q.csv"),
                              reward=("answer", "reward_fns:completion_length=0.1"), lm_path=str(experts / "lm"),
                              dit_path=str(experts / "dit"), vae_path=str(experts / "vae"), num_queries=4,
                              connector_dim=32, connector_layers=1)
    t = Trainer(cfg, **QUIET)
    before = _state(t.model.lm)
    t.train()
    after = t.model.lm.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert type(t.model.tokenizer).__name__ == "HFTokenizer" and t.model.tokenizer.bos_token_id is None


def test_bad_combinations_are_clear_errors(experts, tmp_path, capsys):
    base = ["train", "--config", "smoke", "--run-dir", str(tmp_path / "r")]
    cases = [
        (["--lm-path", str(experts / "lm")], "--lm-path and --dit-path go together"),
        (["--lm-path", str(experts / "lm"), "--dit-path", str(tmp_path)], "dit_path .* is not a model directory"),
        (["--lora-dit", "4"], r"lora_dit: LoRA spec '4': expected R,ALPHA"),
        (["--attn-implementation", "flash_attention_2"], "needs the flash-attn package and a CUDA device"),
    ]
    for extra, match in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert re.search(match, err), (extra, err)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="does not train that expert"):
        Trainer(dataclasses.replace(SMOKE, scenario="understand", lora_dit="4,8", run_dir=str(tmp_path / "u")), **QUIET)
    with pytest.raises(ValueError, match="takes in_channels=4 .* expected 8 in"):  # a text-to-image DiT cannot edit
        Trainer(dataclasses.replace(SMOKE, scenario="edit", run_dir=str(tmp_path / "e"), lm_path=str(experts / "lm"),
                                    dit_path=str(experts / "dit"), vae_path=str(experts / "vae"), num_queries=4,
                                    connector_dim=32, connector_layers=1, tasks="world"), **QUIET)


# LoRA ------------------------------------------------------------------------------------------------------------
def test_lora_dit_trains_only_adapters_and_connector_reference_is_the_base_export_merges(tmp_path):
    cfg = dataclasses.replace(SMOKE, scenario="generate", run_dir=str(tmp_path / "run"), lora_dit="4,8", steps=2,
                              beta_velocity=0.01)
    t = Trainer(cfg, **QUIET)
    n_adapted = 8 * t.model.dit.config.num_layers  # per block: attn1 and attn2 x to_q / to_k / to_v / to_out.0
    assert t.ref is None and t.lora == {"dit": n_adapted}
    base = _state(t.model)
    ref_conn = _state(t.ref_connector)
    t.train()
    now = t.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], now[k])}
    assert changed and all("lora_" in k or k.startswith("connector.") for k in changed)
    assert any(k.startswith("connector.") for k in changed) and any("lora_B" in k for k in changed)
    # the reference: the base model (adapters off, the base connector), no second copy
    from unirl_fast.models.lora import merge_lora

    plain = UnifiedModel.from_pretrained(next((tmp_path / "run" / "base").iterdir()))
    ids, mask = plain.tokenizer(["two red circles on the left"])
    x = torch.randn(1, *plain.latent_shape)
    with torch.no_grad(), t._reference() as ref:
        torch.testing.assert_close(ref(ids, mask, x, 0.5), plain(ids, mask, x, 0.5), rtol=0, atol=0)
    assert all(torch.equal(v, t.ref_connector.state_dict()[k]) for k, v in ref_conn.items())
    assert t.model.connector is not t.ref_connector  # swapped back
    # the checkpoint holds only the trained weights
    ck = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert set(ck["model"]) == {k for k, p in t.model.named_parameters() if p.requires_grad}
    assert all("lora_" in k or k.startswith("connector.") for k in ck["model"])
    # resume (steps 2 -> 3) restores them; export merges them
    t3 = Trainer(dataclasses.replace(cfg, steps=3), **QUIET)
    assert t3.step == 2 and all(torch.equal(t3.model.state_dict()[k], v) for k, v in ck["model"].items())
    with torch.no_grad():
        want = t.model.eval()(ids, mask, x, 0.5)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    out = UnifiedModel.from_pretrained(tmp_path / "out")
    assert not any("lora_" in k for k in out.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(out(ids, mask, x, 0.5), want, rtol=1e-5, atol=1e-5)
    assert merge_lora(t.model) == n_adapted


def test_lora_lm_on_understand(tmp_path):
    cfg = dataclasses.replace(SMOKE, scenario="understand", run_dir=str(tmp_path), lora_lm="4,8,q_proj+v_proj",
                              beta=0.04, reward=("answer", "reward_fns:completion_length=0.1"))
    t = Trainer(cfg, **QUIET)
    base = _state(t.model)
    t.train()
    now = t.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], now[k])}
    assert changed and all("lora_" in k and (".q_proj." in k or ".v_proj." in k) for k in changed)


# bf16, gradient checkpointing --------------------------------------------------------------------------------------
def _one_step(tmp_path, name, **over):
    cfg = dataclasses.replace(SMOKE, scenario="reason-generate", run_dir=str(tmp_path / name), **over)
    t = Trainer(cfg, **QUIET)
    rec = t.train_step()
    return rec, {k: p.grad for k, p in t.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, precision, tol):
    plain, _ = _one_step(tmp_path, "plain", precision=precision)
    ckpt, _ = _one_step(tmp_path, "ckpt", precision=precision, grad_ckpt_lm=True, grad_ckpt_dit=True)
    for k in ("reward", "text_loss", "image_loss", "grad_norm"):
        assert ckpt[k] == pytest.approx(plain[k], rel=tol, abs=tol), k
    if precision == "bf16":
        fp32, _ = _one_step(tmp_path, "fp32")
        assert fp32["text_loss"] != plain["text_loss"]  # autocast really ran the step in bf16


def test_gradient_checkpointing_is_on_in_both_experts(tmp_path):
    t = Trainer(dataclasses.replace(SMOKE, run_dir=str(tmp_path), grad_ckpt_lm=True, grad_ckpt_dit=True), **QUIET)
    lm = t.model.lm
    assert getattr(lm, "is_activation_checkpointing", None) or lm.is_gradient_checkpointing
    assert t.model.dit.gradient_checkpointing


# the memory plan -------------------------------------------------------------------------------------------------
def test_memory_plan_matches_the_meta_built_model(capsys):
    with torch.device("meta"):
        m = UnifiedModel(preset_config("qwen2.5-1.5b-sana-0.6b"))
    n = sum(p.numel() for p in m.parameters())
    assert all(p.device.type == "meta" for p in m.parameters())
    plan = memory_plan(m, train_lm=False, train_dit=True, gpus=8)
    assert plan["params"]["total"] == n and 1.5e9 < plan["params"]["lm"] < 1.6e9 and 5.5e8 < plan["params"]["dit"] < 6e8
    assert plan["trainable"] == sum(p.numel() for p in (*m.dit.parameters(), *m.connector.parameters()))
    st = plan["stages"]
    assert st[0]["weights"] == n * 4 and st[3]["weights"] == n * 4 / 8
    assert st[1]["optimizer"] == plan["trainable"] * 8 / 8 and st[0]["grads"] == plan["trainable"] * 4
    assert st[0]["total"] > st[1]["total"] > st[2]["total"] > st[3]["total"]
    assert main(["plan", "--preset", "qwen2.5-1.5b-sana-0.6b", "--scenario", "generate", "--lora-dit",
                 "default"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3" in out and "reference copy no" in out and "estimate" in out
    with torch.device("meta"):  # UniRL-Zero's shapes: Qwen2.5-VL-3B (with its vision tower) + SANA-1.6B
        vl = UnifiedModel(preset_config("unirl-zero-3b-sana-1.6b"))
    p = memory_plan(vl, train_lm=True, train_dit=True)["params"]
    assert 3.0e9 < p["lm"] < 3.2e9 and 6.0e8 < p["lm_vision"] < 7.0e8 and 1.55e9 < p["dit"] < 1.65e9


# every combination that makes sense runs; the rest are clear errors ---------------------------------------------------
LORA = {"understand": dict(lora_lm="4,8"), "generate": dict(lora_dit="4,8"), "edit": dict(lora_dit="4,8"),
        "refine-prompt": dict(lora_lm="4,8"), "reason-generate": dict(lora_lm="4,8", lora_dit="4,8"),
        "reason-edit": dict(lora_lm="4,8", lora_dit="4,8")}


@pytest.mark.parametrize("scenario", list(LORA))
@pytest.mark.parametrize("lora, precision", [(False, "bf16"), (True, "fp32"), (True, "bf16")])
def test_scenario_matrix_one_step(tmp_path, scenario, lora, precision):
    cfg = dataclasses.replace(SMOKE, scenario=scenario, run_dir=str(tmp_path), steps=1, precision=precision,
                              beta=0.02, grad_ckpt_lm=True, grad_ckpt_dit=True, **(LORA[scenario] if lora else {}))
    t = Trainer(cfg, **QUIET)
    rec = t.train_step()
    assert all(v == v for k, v in rec.items() if isinstance(v, float) and "loss" in k)  # no NaN losses
    assert (t.ref is None) == lora


def test_fp8_with_bf16_autocast(tmp_path):
    cfg = dataclasses.replace(SMOKE, scenario="reason-generate", preset="tiny-fp8", fp8=True, precision="bf16",
                              run_dir=str(tmp_path), steps=1)
    rec = Trainer(cfg, **QUIET).train_step()
    assert rec["text_loss"] == rec["text_loss"] and rec["image_loss"] == rec["image_loss"]


def test_a_vlm_unified_model_saves_its_image_processor_and_reloads(tmp_path):
    from unirl_fast.train.pretrain import world_model_config
    from unirl_fast.world import Obj, Scene, render_scene

    m = UnifiedModel(world_model_config("tiny-vlm", edit=False)).eval()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "lm" / "preprocessor_config.json").is_file()
    m2 = UnifiedModel.from_pretrained(tmp_path)
    from unirl_fast.models import vlm

    imgs = torch.stack([render_scene(Scene((Obj(c, "square", "left"),)), 32) for c in ("red", "blue")])
    out = []
    for model in (m, m2):
        v = vlm.process_images(model.lm, imgs)
        ids, mask = vlm.encode_prompts(model.tokenizer, model.lm, [vlm.IMAGE_MARK + "what colour?"] * 2, v)
        with torch.no_grad():
            out.append(model.query_hidden(ids, mask, v))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)
    assert (out[0][0] - out[0][1]).abs().max() > 1e-4  # and the two images give different states


VLM_LORA = {"understand": dict(lora_lm="4,8"), "edit": dict(lora_dit="4,8"),
            "reason-edit": dict(lora_lm="4,8", lora_dit="4,8")}


@pytest.mark.parametrize("scenario", list(VLM_LORA))
@pytest.mark.parametrize("lora, precision", [(False, "bf16"), (True, "fp32")])
def test_vlm_scenario_matrix_one_step(tmp_path, scenario, lora, precision):
    """The image scenarios with the vision-language LM expert, in full or with LoRA (its adapters go on the text
    decoder's projections; the vision tower stays as it is), fp32 or bf16, with gradient checkpointing."""
    cfg = dataclasses.replace(SMOKE, scenario=scenario, preset="tiny-vlm", run_dir=str(tmp_path), steps=1,
                              precision=precision, beta=0.02, grad_ckpt_lm=True, grad_ckpt_dit=True,
                              **(VLM_LORA[scenario] if lora else {}))
    t = Trainer(cfg, **QUIET)
    rec = t.train_step()
    assert all(v == v for k, v in rec.items() if isinstance(v, float) and "loss" in k)
    assert (t.ref is None) == lora


@pytest.mark.parametrize("scenario", ["understand", "generate", "reason-generate", "refine-prompt", "edit",
                                      "reason-edit"])
def test_every_scenario_from_local_directories(experts, tmp_path, scenario):
    """Each scenario, two steps, on experts loaded from directories (Qwen2 with an HF tokenizer, Sana, AutoencoderKL;
    for the edit scenarios a Sana built for editing: twice the latent channels in) and a task file of its kind."""
    from diffusers import SanaTransformer2DModel

    from unirl_fast.rewards import to_pil
    from unirl_fast.world import Obj, Scene, render_scene

    dit = experts / "dit"
    if scenario in ("edit", "reason-edit"):
        dit = tmp_path / "dit_edit"
        SanaTransformer2DModel(in_channels=8, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                               num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                               cross_attention_dim=32, caption_channels=32, sample_size=8,
                               patch_size=2).save_pretrained(dit)
        rows = []
        for i, (c, new) in enumerate([("red", "blue"), ("blue", "green"), ("green", "red")]):
            to_pil(render_scene(Scene((Obj(c, "square", "left"),)), 32)).save(tmp_path / f"{i}.png")  # resized to 16
            rows.append({"prompt": f"make the square {new}", "image": f"{i}.png", "inverse": f"make the square {c}",
                         "split": "eval" if i == 2 else "train"})
        tasks = tmp_path / "t.jsonl"
        tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
        reward = ("cycle", "reward_fns:completion_length=0.1")
    elif scenario == "understand":
        tasks = tmp_path / "t.csv"
        tasks.write_text("prompt,context,answer,split\nwhat colour?,a red square,red,train\n"
                         "how many?,two blue discs,two,train\nwhere?,a dot on the left,left,eval\n")
        reward = ("answer", "reward_fns:completion_length=0.1")
    else:
        tasks = _prompts(tmp_path / "t.jsonl")
        reward = ("reward_fns:brightness", "reward_fns:completion_length=0.1")
    cfg = dataclasses.replace(SMOKE, scenario=scenario, run_dir=str(tmp_path / "r"), tasks=str(tasks), reward=reward,
                              lm_path=str(experts / "lm"), dit_path=str(dit), vae_path=str(experts / "vae"),
                              num_queries=4, connector_dim=32, connector_layers=1)
    out = Trainer(cfg, **QUIET).train()
    assert out["final_eval_reward"] is not None


def test_lora_over_fp8_layers(tmp_path):
    """--fp8 with LoRA: peft wraps the FP8 Linear layers (a frozen FP8 base, adapters in full precision, in rollout and
    training alike); only the adapters and the connector change."""
    from unirl_fast.fp8 import FP8Linear

    cfg = dataclasses.replace(SMOKE, scenario="reason-generate", preset="tiny-fp8", fp8=True, run_dir=str(tmp_path),
                              steps=2, lora_lm="4,8", lora_dit="4,8", beta=0.02,
                              reward=("world", "reward_fns:completion_length=0.1"))
    t = Trainer(cfg, **QUIET)
    wrapped = [m.base_layer for m in t.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert wrapped and any(isinstance(b, FP8Linear) for b in wrapped)
    base = _state(t.model)
    t.train()
    now = t.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], now[k])}
    assert any("lora_" in k for k in changed) and all("lora_" in k or k.startswith("connector.") for k in changed)


def test_profile_runs_the_vision_language_expert_and_the_bench_vlm_preset_builds(tmp_path, capsys):
    """`unirl-fast profile` with a VLM expert (tiny-vlm here; bench-vlm-2b, Qwen2-VL-2B + SANA-0.6B, is the GPU
    throughput target and is only built on the meta device on a CPU)."""
    assert main(["profile", "--preset", "tiny-vlm", "--scenario", "reason-edit", "--steps", "1", "--warmup", "0",
                 "--precision", "bf16", "--grad-ckpt-lm", "--grad-ckpt-dit", "--out", str(tmp_path), "--quiet"]) == 0
    assert "step ms" in capsys.readouterr().out
    with torch.device("meta"):
        m = UnifiedModel(preset_config("bench-vlm-2b"))
    p = memory_plan(m, train_lm=True, train_dit=True)["params"]
    assert 1.5e9 < p["lm"] < 1.6e9 and 6.0e8 < p["lm_vision"] < 7.0e8  # Qwen2-VL-2B: 1.54 B + 0.67 B
