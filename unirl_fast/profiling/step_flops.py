"""Model FLOPs of one trainer step, per phase, from the FLOP model in `flops.py` and the step's batch.

Per phase (B samples, prompt width P, completion width T (padded: finished rows still run), conditioning width
Lc, Q connector queries, S trained window steps, K denoising steps, c = 2 with CFG else 1):

    text_rollout   prefill B x P + decode B x T (lm_decode_flops)
    image_rollout  conditioning: LM forward over B x (Lc + Q) tokens without the head (+ B x Q for the CFG
                   null branch); K DiT forwards over c*B images
    cycle_edit     edit scenarios only: the inverse edit (its own conditioning + K DiT forwards, ODE), a rollout stage
    ref            text: reference LM forward over B x (P + T) with the head on the T completion tokens (beta > 0);
                   image: reference conditioning + one DiT forward over S x c*B rows (beta_velocity > 0)
    old            nft / awm: the old policy's conditioning + one DiT forward over K x B rows (K drawn timesteps;
                   none when the old policy is the current weights); their train and ref phases count K x B rows
                   where Flow-GRPO's count its S window steps
    train          3x the forward of the trained parts (fwd + 2x bwd): the text policy forward when the LM trains;
                   the DiT replay over S x c*B rows and the conditioning (3x when the LM trains, else 1x: no
                   backward through a frozen LM)

Left out (small next to the rest at every preset, or not a matmul): the connector, the DiT's caption/timestep
embedders, the VAE encode/decode, softmax/norm/elementwise work. Sana's GLUMBConv MLP (1x1 conv d -> 2f,
depthwise 3x3, 1x1 conv f -> d) is 3*d*f MACs per token, counted as a 2-matrix MLP of width 1.5f; Sana's linear
attention is counted as softmax attention (an upper bound on the attention term); SD3's joint attention as
self-attention over the image tokens plus cross-attention to the text tokens.
"""
from __future__ import annotations

from .flops import DiTShape, LMShape, dit_forward_flops, lm_decode_flops, lm_forward_flops


def model_shapes(model):
    """(LMShape, DiTShape, image tokens per sample) of a UnifiedModel."""
    lm = LMShape.from_hf_config(model.lm.config.get_text_config())  # a VLM's decoder (its vision tower not counted)
    dc = model.dit.config
    hidden = dc.num_attention_heads * dc.attention_head_dim
    if model.config.dit_type == "sana":
        inter = int(1.5 * dc.mlp_ratio * hidden)
    else:
        inter = 4 * hidden
    dit = DiTShape(layers=dc.num_layers, hidden=hidden, intermediate=inter, cross_attention=True, cond_dim=hidden)
    _, h, w = model.latent_shape
    return lm, dit, (h // dc.patch_size) * (w // dc.patch_size)


def _lm_seq(lm: LMShape, rows: int, length: int, head_tokens: int) -> float:
    """A causal forward over [rows, length] with the LM head applied to `head_tokens` positions per row."""
    body = lm_forward_flops(lm, rows * length, (length + 1) / 2, with_head=False)
    return body + 2.0 * lm.hidden * lm.vocab * rows * head_tokens


def _condition(lm: LMShape, rows: int, cond_len: int, queries: int, cfg_on: bool) -> float:
    f = _lm_seq(lm, rows, cond_len + queries, 0)
    return f + (_lm_seq(lm, rows, queries, 0) if cfg_on else 0.0)


def step_flops(model, scenario, cfg, b) -> dict:
    """{phase: FLOPs} of one train step over batch `b` (a train.rl.Batch after rollout); see the module docstring."""
    lm, dit, img_tokens = model_shapes(model)
    Q = model.config.num_queries
    out = {"text_rollout": 0.0, "image_rollout": 0.0, "cycle_edit": 0.0, "ref": 0.0, "train": 0.0}
    B = len(b.tasks)
    if b.text is not None:
        P, T = b.text.prompt_ids.shape[1], b.text.completion_ids.shape[1]
        out["text_rollout"] = lm_decode_flops(lm, B, P, T)
        if scenario.train_lm:
            seq = _lm_seq(lm, B, P + T, T)
            out["train"] += 3 * seq
            out["ref"] += seq if cfg.beta > 0 else 0.0
    if b.traj is not None:
        c = 2 if b.traj.params.cfg else 1
        Lc, K = b.cond_ids.shape[1], b.traj.params.num_steps
        cond = _condition(lm, B, Lc, Q, c == 2)
        dit_step = dit_forward_flops(dit, c * B, img_tokens, Q)
        rows = getattr(b.traj, "dit_rows", None) or K * B  # fewer when the group branched
        out["image_rollout"] = cond + rows / B * dit_step
        if scenario.edit:
            out["cycle_edit"] = cond + K * dit_step
        if scenario.train_dit and getattr(b, "fp", None) is not None:  # nft / awm: K drawn timesteps per sample
            Kf, cond1 = b.fp.t.shape[0], _lm_seq(lm, B, Lc + Q, 0)
            out["train"] += (3 if scenario.train_lm else 1) * cond1 + 3 * Kf * dit_step
            out["ref"] += (cond1 + Kf * dit_step) if cfg.beta_velocity > 0 else 0.0
            out["old"] = (cond1 + Kf * dit_step) if b.fp.v_old is not None else 0.0
        elif scenario.train_dit:
            S = b.traj.trained_steps().numel()
            out["train"] += (3 if scenario.train_lm else 1) * _lm_seq(lm, B, Lc + Q, 0) + 3 * S * dit_step
            out["ref"] += (_lm_seq(lm, B, Lc + Q, 0) + S * dit_step) if cfg.beta_velocity > 0 else 0.0
    return out
