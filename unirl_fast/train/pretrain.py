"""The base model of the embedded default: built from a preset and warmed up on the synthetic world.

`pretrain` runs two short supervised stages on training-split tasks only (held-out specs never seen):
  1. LM warm-up: next-token cross-entropy on (prompt -> answer) pairs of the scenario's text tasks
     (reasoning prompt -> canonical prompt, edit riddle -> plain instruction, question -> answer). A vision-language
     LM (`--preset tiny-vlm`) sees the task's image in the image-input scenarios, as in RL: its vision tower trains
     with the rest of the LM.
  2. DiT flow matching (with the connector, LM frozen): x_sigma = (1 - sigma) x0 + sigma eps, target
     velocity eps - x0, sigma ~ U(0, 1), conditioned on the canonical prompt (and the source image for edits).
The result is imperfect but far from random: RL starts from there. It is cached in
`<run_dir>/base/` keyed by the settings that shape it, so reruns and resumes reuse it.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import world as W
from ..models import Conditioning, UnifiedModel, preset_config, vlm
from ..models.config import _sana
from ..tasks.world import image_pretrain_tasks, lm_target, sft_pairs, world_tasks
from .config import resolve_device
from .progress import bar, say


def world_model_config(preset: str, edit: bool):
    """`tiny` for the world: the `tiny` LM and a 32 px pixel-space Sana DiT (width 64, patch 4) fit for shape
    scenes. `tiny-fp8`: the same geometry at width 128 (LM hidden 128, MLP 256; DiT and connector 128), the
    smallest where the attention and MLP projections are FP8-eligible (features divisible by 128), so `--fp8`
    has layers to convert. `tiny-vlm`: `tiny` with a Qwen2.5-VL LM (the same decoder plus a 2-block vision tower,
    `models.vlm.tiny_vlm_lm`), so the LM sees the scenes it is asked about or edits. Other presets are used as they
    are (edit=True doubles the DiT's input channels)."""
    if preset not in ("tiny", "tiny-fp8", "tiny-vlm"):
        cfg = preset_config(preset)
        return cfg.replace(edit=edit) if edit != cfg.edit else cfg
    base = preset_config("tiny")
    if preset == "tiny-fp8":
        dit = _sana(6 if edit else 3, 3, 4, 32, 3, 4, 32, 128, 32, 4, mlp=2.5)
        lm = {**base.lm, "hidden_size": 128, "intermediate_size": 256}
        return base.replace(lm=lm, dit=dit, image_size=32, num_queries=8, connector_dim=128, connector_layers=1,
                            connector_heads=4, edit=edit)
    dit = _sana(6 if edit else 3, 3, 4, 16, 3, 4, 16, 64, 32, 4, mlp=2.5)
    if preset == "tiny-vlm":
        base = base.replace(lm=vlm.tiny_vlm_lm(base.lm))
    return base.replace(dit=dit, image_size=32, num_queries=8, connector_dim=64, connector_layers=1,
                        connector_heads=4, edit=edit)


def run_lm_has_vision(cfg, scenario) -> bool:
    """Whether the run's LM has a vision tower, without building it: the run's copy of its model (train.inputs), the
    LM directory's, the saved model's (cfg.model_path) or the preset's world model."""
    from ..models.config import UnifiedConfig
    from .inputs import model_copy

    saved = model_copy(cfg.run_dir) if (cfg.lm_path or cfg.model_path) else None
    if cfg.lm_path and saved is None:
        return vlm.config_dict_has_vision(None, cfg.lm_path)
    saved = saved or cfg.model_path
    if saved:
        ucfg = UnifiedConfig.load(saved)
        path = ucfg.lm_path
        if path is not None and not Path(path).is_absolute():
            path = str(Path(saved) / path)
        return vlm.config_dict_has_vision(ucfg.lm, path)
    return vlm.config_dict_has_vision(world_model_config(cfg.preset, scenario.edit).lm, None)


def lm_sft_step(model, tok, pairs, opt, batch, rng):
    """One supervised step: loss only on the answer tokens (and their EOS)."""
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(batch)]
    rows = [(tok.encode(p, add_bos=True), tok.encode(a, add_eos=True)) for p, a in chosen]
    L = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((batch, L), tok.pad_token_id)
    labels = torch.full((batch, L), -100)
    mask = torch.zeros(batch, L, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(a)
        mask[i, :len(seq)] = 1
    dev = model.device
    logits = model.lm(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(dev))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def lm_sft_step_images(model, tok, examples, opt, batch, rng):
    """`lm_sft_step` for a vision-language LM on (prompt with IMAGE_MARK, answer, task) examples: the prompt shows the
    task's image; loss only on the answer tokens (and their EOS)."""
    chosen = [examples[rng.randrange(len(examples))] for _ in range(batch)]
    dev, lm = model.device, model.lm
    vision = vlm.process_images(lm, torch.stack([t.source_image(model.config.image_size) for _, _, t in chosen])
                                .to(dev))
    p_ids, p_mask = vlm.encode_prompts(tok, lm, [p for p, _, _ in chosen], vision, device=dev)
    answers = [tok.encode(a, add_eos=True) for _, a, _ in chosen]
    A = max(len(a) for a in answers)
    a_ids = torch.full((batch, A), tok.pad_token_id)
    a_mask = torch.zeros(batch, A, dtype=torch.long)
    for i, a in enumerate(answers):
        a_ids[i, :len(a)] = torch.tensor(a)
        a_mask[i, :len(a)] = 1
    labels = a_ids.masked_fill(a_mask == 0, -100).to(dev)
    ids, mask = torch.cat([p_ids, a_ids.to(dev)], 1), torch.cat([p_mask, a_mask.to(dev)], 1)
    P = p_ids.shape[1]
    hidden = vlm.hidden_states(lm, ids, mask, vision, prompt_length=P)[:, P - 1:-1]  # each answer token's predictor
    logits = lm.get_output_embeddings()(hidden)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def dit_fm_step(model, tok, items, opt, batch, rng):
    """One flow-matching step on (conditioning text, target spec, source scene | None) items."""
    chosen = [items[rng.randrange(len(items))] for _ in range(batch)]
    dev, size = model.device, model.config.image_size
    x0 = torch.stack([W.render_scene(W.scene_of(spec), size) for _, spec, _ in chosen]).to(dev)
    vision = None
    if model.config.edit and vlm.is_vlm(model.lm):  # the LM sees the source scene it conditions the edit on
        src_images = torch.stack([W.render_scene(s, size) for _, _, s in chosen]).to(dev)
        vision = vlm.process_images(model.lm, src_images)
        ids, mask = vlm.encode_prompts(tok, model.lm, [vlm.IMAGE_MARK + text for text, _, _ in chosen], vision,
                                       device=dev)
    else:
        ids, mask = tok([text for text, _, _ in chosen], device=dev)
    src = None
    if model.config.edit:
        src = model.encode_images(torch.stack([W.render_scene(s, size) for _, _, s in chosen]).to(dev))
    sigma = torch.rand(batch, device=dev)
    eps = torch.randn_like(x0)
    s = sigma.view(-1, 1, 1, 1)
    xs = (1 - s) * x0 + s * eps
    with torch.no_grad():  # the LM stays as the warm-up left it; the connector learns to read it
        h = model.query_hidden(ids, mask, vision)
    cond, pooled = model.connector(h.to(model.connector.proj_in.weight.dtype))
    v = model.velocity(xs, sigma, Conditioning(cond, pooled), src)
    loss = F.mse_loss(v.float(), eps - x0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def base_key(cfg, scenario) -> str:
    """Cache key: the settings and the warm-up data that shape the base model (scenarios whose warm-up data
    match, e.g. reason-generate and refine-prompt, share one base model)."""
    keys = {k: getattr(cfg, k) for k in ("preset", "seed", "pretrain_dit_steps", "pretrain_lm_steps",
                                         "pretrain_batch", "pretrain_lr")}
    keys["edit"] = scenario.edit
    keys["draws"] = scenario.draws
    keys["lm_data"] = hashlib.sha1(json.dumps(sft_pairs(scenario, "train")).encode()).hexdigest()
    keys["image_data"] = hashlib.sha1(repr(image_pretrain_tasks(scenario, "train")).encode()).hexdigest()
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def _stage(name, steps, step_fn, metric, digits, log, show):
    """One warm-up stage: a progress bar with its ETA (on a terminal) and a log line every 100 steps."""
    with bar(steps, f"pretrain {name}", show=show) as progress:
        for i in range(steps):
            loss = f"{step_fn():.{digits}f}"
            progress.update(1)
            progress.set_postfix({metric: loss}, refresh=False)
            if (i + 1) % 100 == 0 or i + 1 == steps:
                log(f"pretrain {name:<3} {i + 1:4d}/{steps}  {metric} {loss}")


def pretrain(cfg, scenario, log=say, show=True) -> UnifiedModel:
    """Build (or load from the run directory's cache) the warmed-up base model for a scenario (`show`: progress bars
    with ETA on a terminal; a log line every 100 steps either way)."""
    edit = scenario.edit
    cache = Path(cfg.run_dir) / "base" / base_key(cfg, scenario)
    if (cache / "unified_config.json").is_file():
        log(f"base model: reusing {cache}")
        return UnifiedModel.from_pretrained(cache, device=resolve_device(cfg))
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = UnifiedModel(world_model_config(cfg.preset, edit)).to(resolve_device(cfg))
    tok = model.tokenizer
    pairs = sft_pairs(scenario, "train")
    step = lm_sft_step
    if scenario.image_input and vlm.is_vlm(model.lm):
        tasks = world_tasks(scenario, "train")[:len(pairs)]  # the same tasks as sft_pairs, with their images
        pairs = [(scenario.lm_prompt(t, image=True), lm_target(scenario, t), t) for t in tasks]
        step = lm_sft_step_images
    opt = torch.optim.AdamW(model.lm.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    _stage("lm", cfg.pretrain_lm_steps, lambda: step(model, tok, pairs, opt, cfg.pretrain_batch, rng), "ce", 3, log,
           show)
    tasks = image_pretrain_tasks(scenario, "train")
    if tasks:
        params = list(model.dit.parameters()) + list(model.connector.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.0)
        _stage("dit", cfg.pretrain_dit_steps, lambda: dit_fm_step(model, tok, tasks, opt, cfg.pretrain_batch, rng),
               "fm", 4, log, show)
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp, layout="single")  # an internal cache (see UnifiedModel.save_pretrained)
    tmp.replace(cache)
    return model
