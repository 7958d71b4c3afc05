"""token_logprobs on Hugging Face causal LMs built from tiny configs (CPU), against log_softmax of the model's logits.

Oracle: the model's own forward in fp64 (a deep copy), log_softmax of its shifted logits / temperature.
Baseline for the tolerance rule: the same computation in fp32. Forward and gradients of every parameter
(tied embeddings included) under random upstream gradients for logp and entropy.
"""
import copy

import pytest
import torch
from tolerance import assert_close_rule
from torch import nn

transformers = pytest.importorskip("transformers")

from unirl_fast.integrations.hf import head_logit_scale, token_logprobs  # noqa: E402

V = 101  # not a multiple of any block size
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _build(arch):
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, tie_word_embeddings=False))
    if arch == "llama_tied":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=True))
    if arch == "cohere_logit_scale":  # tied, logits * 0.3: folded into the temperature
        return transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.3))
    if arch == "granite_logits_scaling":  # logits / 2.5
        return transformers.GraniteForCausalLM(transformers.GraniteConfig(**SMALL, logits_scaling=2.5))
    if arch == "phi_head_bias":
        cfg = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
        return transformers.PhiForCausalLM(transformers.PhiConfig(**cfg))
    raise AssertionError(arch)


def _model(arch):
    model = _build(arch).eval()
    with torch.no_grad():  # random biases so a dropped head bias cannot pass
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(B=3, L=11, pad="left"):
    ids = torch.randint(0, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    lengths = [L, L - 4, L - 1][:B]
    for b, n in enumerate(lengths):
        if pad == "left":
            mask[b, :L - n] = 0
        else:
            mask[b, n:] = 0
    return ids, mask


def _oracle(model, ids, mask, K, temperature):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    L = ids.shape[1]
    logits = logits[:, L - 1 - K:] / temperature
    logp_all = torch.log_softmax(logits, -1)
    tgt = ids[:, L - K:]
    valid = mask[:, L - K:].bool()
    logp = logp_all.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), dtype=logp.dtype)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)


def _grads(model, fn, g, gH):
    model.zero_grad(set_to_none=True)
    logp, ent = fn(model)
    ((logp * g.to(logp.dtype)).sum() + (ent * gH.to(ent.dtype)).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


@pytest.mark.parametrize("arch", ["qwen2", "llama_tied", "cohere_logit_scale", "granite_logits_scaling",
                                  "phi_head_bias"])
@pytest.mark.parametrize("pad,K,temperature", [("left", None, 1.0), ("left", 6, 0.7), ("right", 4, 1.3)],
                         ids=["left-all-T1", "left-keep6-T0.7", "right-keep4-T1.3"])
def test_token_logprobs_matches_model_logits(arch, pad, K, temperature):
    model = _model(arch)
    ids, mask = _batch(pad=pad)
    Kn = ids.shape[1] - 1 if K is None else K
    g, gH = torch.randn(3, Kn), torch.randn(3, Kn)

    def ours(m):
        return token_logprobs(m, ids, mask, logits_to_keep=K, temperature=temperature, return_entropy=True,
                              impl="reference")

    lp, ent, grads = _grads(model, ours, g, gH)
    lp32, ent32, grads32 = _grads(model, lambda m: _oracle(m, ids, mask, Kn, temperature), g, gH)
    model64 = copy.deepcopy(model).double()
    lp64, ent64, grads64 = _grads(model64, lambda m: _oracle(m, ids, mask, Kn, temperature), g, gH)
    assert lp.dtype == torch.float32 and lp.shape == (3, Kn)
    pad_t = mask[:, -Kn:] == 0
    assert (lp[pad_t] == 0).all() and (ent[pad_t] == 0).all()
    assert_close_rule(lp, lp64, lp32, atol=1e-5, name="logp")
    assert_close_rule(ent, ent64, ent32, atol=1e-5, name="entropy")
    assert set(grads) == set(grads64)
    for n in grads64:
        assert_close_rule(grads[n], grads64[n], grads32[n], atol=1e-5, name=f"grad {n}")
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_token_logprobs_without_entropy_and_mask():
    model = _model("qwen2")
    ids, _ = _batch()
    lp, ent = token_logprobs(model, ids, None, impl="reference")
    ref, _ = _oracle(model, ids, torch.ones_like(ids), ids.shape[1] - 1, 1.0)
    assert ent is None
    assert_close_rule(lp.detach(), ref.detach(), atol=1e-5)


def test_logit_scale_values():
    assert head_logit_scale(_build("cohere_logit_scale")) == pytest.approx(0.3)
    assert head_logit_scale(_build("granite_logits_scaling")) == pytest.approx(1 / 2.5)
    assert head_logit_scale(_build("qwen2")) == 1.0


def test_softcapping_raises():
    cfg = transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=30.0)
    model = transformers.Gemma2ForCausalLM(cfg)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        token_logprobs(model, ids, mask)


def test_bad_logit_scale_raises():
    model = _build("cohere_logit_scale")
    model.config.logit_scale = -1.0
    with pytest.raises(ValueError, match="logit_scale=-1.0"):
        token_logprobs(model, *_batch())


def test_non_linear_head_raises():
    class ScaledHead(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = _build("qwen2")
    old = model.lm_head
    model.lm_head = ScaledHead(old.in_features, old.out_features, bias=False)
    with pytest.raises(TypeError, match="ScaledHead, not a plain nn.Linear"):
        token_logprobs(model, *_batch())


@pytest.mark.parametrize("K", [0, 11, 2.0, True])
def test_bad_logits_to_keep_raises(K):
    with pytest.raises(ValueError, match="logits_to_keep"):
        token_logprobs(_build("qwen2"), *_batch(), logits_to_keep=K)


def test_bad_inputs_raise():
    model = _build("qwen2")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        token_logprobs(model, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_logprobs(model, ids[:, :1], mask[:, :1])


def test_all_padding_gives_zeros_and_zero_grad():
    model = _model("qwen2")
    ids, mask = _batch()
    mask[:, 2:] = 0
    lp, ent = token_logprobs(model, ids, mask, logits_to_keep=5, return_entropy=True, impl="reference")
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (3, 5) and (lp == 0).all() and (ent == 0).all()
    assert model.lm_head.weight.grad.abs().sum() == 0
