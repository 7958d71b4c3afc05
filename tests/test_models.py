"""UnifiedModel: presets, shapes / dtypes / gradients through the whole model, left-padding invariance,
save -> load, loading experts from local directories, and clear errors for bad inputs."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from unirl_fast.models import CharTokenizer, UnifiedConfig, UnifiedModel, preset_config

TINY = ["tiny", "tiny-sd3"]


def _tiny_edit_kl_config():
    """Tiny edit model in a latent space: AutoencoderKL f2c4, DiT sees noisy ++ source latents (8 channels)."""
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
           "block_out_channels": [8, 8], "norm_num_groups": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "scaling_factor": 0.5, "shift_factor": 0.1}
    cfg = preset_config("tiny")
    return cfg.replace(vae_type="kl", vae=vae, edit=True, dit={**cfg.dit, "in_channels": 8, "out_channels": 4})

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny, launch-bound work: see conftest


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: UnifiedModel.from_preset(name).eval() for name in TINY}


def _inputs(model, B=3):
    ids, mask = model.tokenizer(["a red square", "hi", "two blue circles!"][:B])
    return ids, mask, torch.randn(B, *model.latent_shape), torch.rand(B) * 0.9 + 0.05


def test_bench_preset_config_only():
    cfg = preset_config("bench-1.5b")
    lm, dit = cfg.lm, cfg.dit
    assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"], lm["num_key_value_heads"],
            lm["intermediate_size"], lm["vocab_size"]) == (1536, 28, 12, 2, 8960, 151936)
    assert dit["num_attention_heads"] * dit["attention_head_dim"] == 1152 and dit["num_layers"] == 28
    assert (dit["caption_channels"], dit["in_channels"], cfg.vae_type, cfg.vae["latent_channels"]) == \
        (2304, 32, "dc", 32)
    assert cfg.image_size // 2 ** (len(cfg.vae["encoder_block_out_channels"]) - 1) == dit["sample_size"]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        preset_config("huge")


@pytest.mark.parametrize("name", TINY)
def test_shapes_dtypes_and_gradients(models, name):
    m = models[name]
    ids, mask, x, sigma = _inputs(m)
    c = m.condition(ids, mask)
    D = m.dit.config.caption_channels if name == "tiny" else m.dit.config.joint_attention_dim
    assert c.cond.shape == (3, m.config.num_queries, D) and c.cond.dtype == torch.float32
    assert (c.pooled is None) == (name == "tiny")
    if c.pooled is not None:
        assert c.pooled.shape == (3, m.dit.config.pooled_projection_dim)
    v = m(ids, mask, x, sigma)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    m.zero_grad()
    (v * torch.randn_like(v)).sum().backward()
    for part in (m.connector.queries, m.connector.proj_out.weight, m.lm.get_input_embeddings().weight,
                 m.dit.proj_out.weight):
        assert part.grad is not None and part.grad.abs().sum() > 0
    m.zero_grad()


def test_bf16_forward(models):
    m = copy.deepcopy(models["tiny"]).to(torch.bfloat16)
    ids, mask, x, sigma = _inputs(m, B=1)
    with torch.no_grad():
        v = m(ids, mask, x, sigma)
    assert v.dtype == torch.bfloat16 and v.shape == x.shape


def test_left_padding_does_not_change_conditioning(models):
    m = models["tiny"]
    ids, mask = m.tokenizer(["hi", "a much longer prompt"])
    with torch.no_grad():
        batched = m.condition(ids, mask).cond[0]
        alone = m.condition(*m.tokenizer(["hi"])).cond[0]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_save_load_identical(models, name, tmp_path):
    m = models[name]
    ids, mask, x, sigma = _inputs(m)
    m.save_pretrained(tmp_path)
    m2 = UnifiedModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(ids, mask, x, sigma), m(ids, mask, x, sigma), rtol=0, atol=0)
    torch.testing.assert_close(m2.connector.queries, m.connector.queries, rtol=0, atol=0)
    assert m2.lm.get_output_embeddings().weight.data_ptr() == m2.lm.get_input_embeddings().weight.data_ptr()


def test_edit_model_with_autoencoder(tmp_path):
    m = UnifiedModel(_tiny_edit_kl_config()).eval()
    assert m.latent_shape == (4, 8, 8)
    ids, mask = m.tokenizer(["make it red", "flip"])
    src = torch.rand(2, 3, 16, 16) * 2 - 1
    x = torch.randn(2, *m.latent_shape)
    with torch.no_grad():
        v = m(ids, mask, x, 0.5, source_images=src)
        other = m(ids, mask, x, 0.5, source_images=-src)
        assert v.shape == x.shape and not torch.allclose(v, other)
        assert m.decode_latents(m.encode_images(src)).shape == src.shape
    with pytest.raises(ValueError, match="edit=True: pass source_latents"):
        m(ids, mask, x, 0.5)
    m.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(UnifiedModel.from_pretrained(tmp_path)(ids, mask, x, 0.5, source_images=src), v,
                                   rtol=0, atol=0)


def test_experts_from_local_directories(models, tmp_path):
    m = models["tiny-sd3"]
    m.lm.save_pretrained(tmp_path / "lm")
    m.dit.save_pretrained(tmp_path / "dit")
    cfg = m.config.replace(lm=None, lm_path=str(tmp_path / "lm"), dit=None, dit_path=str(tmp_path / "dit"))
    m2 = UnifiedModel(cfg).eval()
    m2.connector.load_state_dict(m.connector.state_dict())
    ids, mask, x, sigma = _inputs(m)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids, mask, x, sigma), m(ids, mask, x, sigma), rtol=1e-5, atol=1e-6)
    resolved = m2.resolved_config()
    assert resolved.lm_path is None and resolved.dit_path is None and resolved.lm["model_type"] == "qwen2"
    m2.save_pretrained(tmp_path / "unified")  # the checkpoint no longer needs the expert directories
    (tmp_path / "lm" / "config.json").unlink()
    with torch.no_grad():
        torch.testing.assert_close(UnifiedModel.from_pretrained(tmp_path / "unified")(ids, mask, x, sigma),
                                   m2(ids, mask, x, sigma), rtol=0, atol=0)


def test_bad_directories(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UnifiedModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="unified_config.json is missing"):
        UnifiedModel.from_pretrained(tmp_path)
    cfg = models["tiny"].config
    with pytest.raises(FileNotFoundError, match="LM directory .* does not exist"):
        UnifiedModel(cfg.replace(lm=None, lm_path=str(tmp_path / "missing")))
    (tmp_path / "lm").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        UnifiedModel(cfg.replace(lm=None, lm_path=str(tmp_path / "lm")))
    models["tiny"].lm.config.save_pretrained(tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        UnifiedModel(cfg.replace(lm=None, lm_path=str(tmp_path / "lm")))
    ck = tmp_path / "ck"
    models["tiny"].save_pretrained(ck)
    (ck / "connector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor connector.safetensors"):
        UnifiedModel.from_pretrained(ck)


def test_split_layout_experts_load_on_their_own_and_the_single_file_layout_still_loads(models, tmp_path):
    from diffusers import SanaTransformer2DModel
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    m = models["tiny"]
    m.save_pretrained(tmp_path / "split")
    assert json.loads((tmp_path / "split" / "unified_config.json").read_text())["lm_path"] == "lm"
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "split" / "lm")
    dit = SanaTransformer2DModel.from_pretrained(tmp_path / "split" / "dit")
    for a, b in ((lm, m.lm), (dit, m.dit)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    old = tmp_path / "old"  # what save_pretrained wrote before the split layout
    old.mkdir()
    m.resolved_config().save(old)
    save_model(m, str(old / "model.safetensors"))
    ids, mask, x, sigma = _inputs(m)
    with torch.no_grad():
        want = m(ids, mask, x, sigma)
        for d in ("split", "old"):
            torch.testing.assert_close(UnifiedModel.from_pretrained(tmp_path / d)(ids, mask, x, sigma), want,
                                       rtol=0, atol=0)


def test_checkpoint_with_mismatched_widths(models, tmp_path):
    models["tiny"].save_pretrained(tmp_path)
    data = json.loads((tmp_path / "unified_config.json").read_text())
    data["connector_dim"] = 48
    (tmp_path / "unified_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match the config's connector"):
        UnifiedModel.from_pretrained(tmp_path)
    data["bogus"] = 1
    (tmp_path / "unified_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        UnifiedModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(dit_in_channels=4), "in_channels=4 but the latent space has 3 channels"),
    (dict(edit=True), "x2 for edit=True"),
    (dict(image_size=17), "not a multiple of the DiT patch_size=2"),
    (dict(connector_dim=33), "not divisible by connector_heads"),
    (dict(dit_type="unet"), "dit_type must be one of"),
    (dict(vae_type="kl"), "needs exactly one of vae"),
    (dict(lm_vocab=50), "vocab_size=50 is smaller than the char tokenizer"),
], ids=["dit-in-channels", "edit-channels", "patch", "connector-heads", "dit-type", "vae-missing", "vocab"])
def test_mismatched_widths(change, match):
    cfg = preset_config("tiny")
    change = dict(change)
    if "dit_in_channels" in change:
        cfg = cfg.replace(dit={**cfg.dit, "in_channels": change.pop("dit_in_channels")})
    if "lm_vocab" in change:
        cfg = cfg.replace(lm={**cfg.lm, "vocab_size": change.pop("lm_vocab")})
    with pytest.raises(ValueError, match=match):
        UnifiedModel(cfg.replace(**change))


def test_config_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of lm"):
        UnifiedConfig(lm=None, dit={})
    with pytest.raises(ValueError, match="model_type"):
        UnifiedConfig(lm={"hidden_size": 8}, dit={})


def test_tokenizer_roundtrip_and_left_padding():
    tok = CharTokenizer()
    text = "Hello, world!\n(1+2)=3"
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    assert tok.decode(tok.encode("é")) == "" and tok.encode("é") == [tok.unk_token_id]
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    ids, mask = tok(["ab", "abcd"])
    assert ids.shape == (2, 5) and mask[0].tolist() == [0, 0, 1, 1, 1] and ids[0, 0] == tok.pad_token_id
    assert mask[:, -1].all() and tok.batch_decode(ids) == ["ab", "abcd"]


def test_models_import_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import unirl_fast.models, unirl_fast.rollout\n"
            "print('OK', sys.modules['diffusers'] is None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK True" in out.stdout


def test_missing_diffusers_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"SanaTransformer2DModel needs diffusers.*\.\[diffusion\]"):
        UnifiedModel.from_preset("tiny")
