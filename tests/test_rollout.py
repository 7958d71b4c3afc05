"""Rollout engines on the tiny presets: greedy text equals transformers `generate`; sampled log-probs equal a
recompute (fused_linear_logprobs on the hidden states); top-k / top-p processing matches transformers' warpers;
EOS and stop strings; image trajectories replay to the stored log-probs with `flow_step_logprob` (and stop
matching when the velocity changes); CFG on/off; the Flow-GRPO-Fast window; shifted schedules."""
import pytest
import torch

from unirl_fast.models import UnifiedModel
from unirl_fast.rollout import (
    ImageEngine,
    ImageSamplingParams,
    SamplingParams,
    TextEngine,
    recompute_logprobs,
    replay_logprobs,
    replay_velocity,
    sampling_logprobs,
    timestep_schedule,
)

PROMPTS = ["The cat", "a much longer prompt here", "x"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny, launch-bound work: see conftest


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UnifiedModel.from_preset("tiny").eval()
    # Default init (std 0.02) makes greedy decoding repeat one token forever, which would make "equals generate"
    # vacuous; larger weights give varied continuations.
    with torch.no_grad():
        for p in m.lm.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
    return m


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(1)
    return UnifiedModel.from_preset("tiny-sd3").eval()


def _engine(m):
    return TextEngine(m.lm, tokenizer=m.tokenizer, pad_token_id=m.tokenizer.pad_token_id)


def _hf_greedy(m, ids, mask, T, eos):
    g = m.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=False, pad_token_id=0,
                      eos_token_id=eos)
    g = g[:, ids.shape[1]:]
    return torch.nn.functional.pad(g, (0, T - g.shape[1]), value=0)


def test_greedy_equals_transformers_generate(model):
    ids, mask = model.tokenizer(PROMPTS)
    T = 16
    eng = _engine(model)
    free = eng.generate(ids, mask, SamplingParams(max_new_tokens=T, temperature=0, eos_token_ids=()))
    assert len(set(free.completion_ids.flatten().tolist())) > 6, "greedy output too uniform to be a test"
    torch.testing.assert_close(free.completion_ids, _hf_greedy(model, ids, mask, T, None), rtol=0, atol=0)
    eos = int(free.completion_ids[0, 5])  # a token row 0 emits: EOS then ends row 0 early
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=T, temperature=0, eos_token_ids=(eos,)))
    torch.testing.assert_close(out.completion_ids, _hf_greedy(model, ids, mask, T, eos), rtol=0, atol=0)
    for row, f in zip(out.completion_mask, free.completion_ids):
        hits = (f == eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) else T
        assert row[:n].all() and not row[n:].any()


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
def test_sampled_logprobs_equal_recompute(model, temperature):
    ids, mask = model.tokenizer(PROMPTS)
    g = torch.Generator().manual_seed(3)
    out = _engine(model).generate(ids, mask, SamplingParams(max_new_tokens=16, temperature=temperature,
                                                            eos_token_ids=(5,)), generator=g)
    with torch.no_grad():
        lp = recompute_logprobs(model.lm, out, temperature=temperature)
    m = out.completion_mask
    assert m.sum() > 10
    torch.testing.assert_close(lp[m], out.logprobs[m], rtol=1e-4, atol=1e-4)
    bucketed = TextEngine(model.lm, pad_token_id=0, prompt_bucket=16).generate(
        ids, mask, SamplingParams(max_new_tokens=16, temperature=temperature, eos_token_ids=(5,)),
        generator=torch.Generator().manual_seed(3))  # internal left padding to 16 columns changes nothing
    assert torch.equal(bucketed.completion_ids, out.completion_ids) and bucketed.prompt_ids is ids
    torch.testing.assert_close(bucketed.logprobs, out.logprobs, rtol=1e-5, atol=1e-5)
    assert (out.logprobs[~m] == 0).all() and (out.completion_ids[~m] == 0).all()
    with torch.no_grad():
        for p in model.lm.parameters():  # the comparison is not vacuous: other weights give other log-probs
            p.add_(0.05)
        other = recompute_logprobs(model.lm, out, temperature=temperature)
        for p in model.lm.parameters():
            p.sub_(0.05)
    assert (other[m] - out.logprobs[m]).abs().max() > 1e-2


def _full_logits(model, out):
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, out.completion_mask.long()], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return logits[:, out.prompt_ids.shape[1] - 1:-1]


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (7, 0.8)], ids=["k5", "p0.6", "k7-p0.8"])
def test_topk_topp_logprobs_are_of_the_sampling_distribution(model, top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    ids, mask = model.tokenizer(PROMPTS)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=top_k, top_p=top_p, eos_token_ids=())
    out = _engine(model).generate(ids, mask, params, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = _full_logits(model, out).float()
    z = logits.flatten(0, 1) / 0.9
    if top_k:
        z = TopKLogitsWarper(top_k)(None, z)
    if top_p < 1:
        z = TopPLogitsWarper(top_p)(None, z)
    ref = torch.log_softmax(z, -1).view_as(logits)
    torch.testing.assert_close(sampling_logprobs(logits, 0.9, top_k, top_p), ref, rtol=1e-5, atol=1e-5)
    chosen = ref.gather(-1, out.completion_ids[..., None])[..., 0]
    assert torch.isfinite(chosen).all(), "sampled a token the filters removed"
    torch.testing.assert_close(out.logprobs, chosen, rtol=1e-4, atol=1e-4)


def test_stop_strings_cut_after_the_completing_token(model):
    ids, mask = model.tokenizer(PROMPTS)
    eng = _engine(model)
    free = eng.generate(ids, mask, SamplingParams(max_new_tokens=14, temperature=0, eos_token_ids=()))
    stop = free.texts[1][6:8]
    out = eng.generate(ids, mask, SamplingParams(max_new_tokens=14, temperature=0, eos_token_ids=(),
                                                 stop_strings=(stop,), check_every=3))
    for text, full, n in zip(out.texts, free.texts, out.completion_mask.sum(1).tolist()):
        if stop in full:
            assert text == full[:full.index(stop) + len(stop)] and n == len(text)  # one token per char
        else:
            assert text == full and n == 14
    assert any(len(t) < 14 for t in out.texts)


def test_text_input_errors(model):
    ids, mask = model.tokenizer(PROMPTS)
    eng = _engine(model)
    with pytest.raises(ValueError, match="left-padded"):
        eng.generate(ids, mask.flip(1), SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        TextEngine(model.lm).generate(ids, mask, SamplingParams(max_new_tokens=2, stop_strings=("a",)))


def test_schedule_shift():
    s = timestep_schedule(4, 3.0)
    lin = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(s, 3 * lin / (1 + 2 * lin))
    torch.testing.assert_close(timestep_schedule(4, 1.0), lin)


@pytest.mark.parametrize("name, kw", [
    ("tiny", dict()),
    ("tiny", dict(guidance_scale=4.0)),
    ("tiny", dict(sde="cps", window_start=1, window_size=3)),
    ("tiny-sd3", dict(window_start=2, window_size=2, guidance_scale=3.0)),
], ids=["sana-sde", "sana-sde-cfg", "sana-cps-window", "sd3-window-cfg"])
def test_trajectory_replays_to_stored_logprobs(model, sd3, name, kw):
    m = model if name == "tiny" else sd3
    ids, mask = m.tokenizer(PROMPTS)
    p = ImageSamplingParams(num_steps=5, **kw)
    traj = ImageEngine(m).generate(ids, mask, p, generator=torch.Generator().manual_seed(7))
    T, B = 5, len(PROMPTS)
    assert traj.samples.shape == traj.next_samples.shape == (T, B, *m.latent_shape)
    assert traj.sigmas.shape == traj.log_probs.shape == (T, B) and traj.images.shape == (B, 3, 16, 16)
    torch.testing.assert_close(traj.samples[1:], traj.next_samples[:-1], rtol=0, atol=0)
    torch.testing.assert_close(traj.next_samples[-1], traj.latents, rtol=0, atol=0)
    on = traj.trainable
    assert on.tolist() == p.stochastic_steps().tolist() and (traj.log_probs[~on] == 0).all()
    with torch.no_grad():
        lp = replay_logprobs(m, traj)
        torch.testing.assert_close(lp, traj.log_probs[on], rtol=1e-4, atol=1e-4)
        # not vacuous: a different velocity gives different log-probs
        m.dit.proj_out.bias.add_(0.5)
        other = replay_logprobs(m, traj)
        m.dit.proj_out.bias.sub_(0.5)
        assert (other - lp).abs().max() > 1e-2  # 100x the replay tolerance


def test_replay_is_differentiable_in_the_dit(model):
    ids, mask = model.tokenizer(PROMPTS[:2])
    traj = ImageEngine(model).generate(ids, mask, ImageSamplingParams(num_steps=3, window_size=1, decode=False),
                                       generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    lp = replay_logprobs(model, traj, conditioning=model.condition(ids, mask))
    assert lp.shape == (1, 2)
    lp.sum().backward()
    assert model.dit.proj_out.weight.grad.abs().sum() > 0 and model.connector.queries.grad.abs().sum() > 0
    model.zero_grad()


def test_cfg_changes_samples_and_ode_has_no_logprobs(model):
    ids, mask = model.tokenizer(PROMPTS)
    eng = ImageEngine(model)

    def run(**kw):
        return eng.generate(ids, mask, ImageSamplingParams(num_steps=4, decode=False, **kw),
                            generator=torch.Generator().manual_seed(11))

    a, b, c = run(), run(), run(guidance_scale=4.0)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    torch.testing.assert_close(a.samples[0], c.samples[0], rtol=0, atol=0)
    assert (a.latents - c.latents).abs().max() > 1e-3 and a.uncond is None and c.uncond is not None
    ode = run(sde="ode")
    assert not ode.trainable.any() and (ode.log_probs == 0).all()
    with pytest.raises(ValueError, match="no trainable steps|no log-probs"):
        replay_logprobs(model, ode)


@pytest.mark.parametrize("sde, window_start, window_size, expected", [
    ("sde", 0, None, [1, 1, 1, 1, 1, 1]),
    ("sde", 2, 2, [0, 0, 1, 1, 0, 0]),
    ("cps", 0, None, [1, 1, 1, 1, 1, 0]),
    ("cps", 3, 3, [0, 0, 0, 1, 1, 0]),
    ("ode", 0, None, [0, 0, 0, 0, 0, 0]),
], ids=["sde-all", "sde-window", "cps-all", "cps-window-last", "ode"])
def test_window(sde, window_start, window_size, expected):
    p = ImageSamplingParams(num_steps=6, sde=sde, window_start=window_start, window_size=window_size)
    assert p.stochastic_steps().long().tolist() == expected


def test_image_param_errors():
    with pytest.raises(ValueError, match="window_size=5 must be in"):
        ImageSamplingParams(num_steps=6, window_start=2, window_size=5)
    with pytest.raises(ValueError, match="sde must be one of"):
        ImageSamplingParams(sde="ddim")
    with pytest.raises(ValueError, match="needs num_steps >= 2"):
        ImageSamplingParams(num_steps=1)
    with pytest.raises(ValueError, match="noise_level=0"):
        ImageSamplingParams(noise_level=0.0)


@pytest.mark.gpu
def test_compiled_decode_matches_eager_on_gpu():
    m = UnifiedModel.from_preset("small").cuda().to(torch.bfloat16).eval()
    ids = torch.randint(5, 4000, (4, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    params = SamplingParams(max_new_tokens=32, temperature=0, eos_token_ids=())
    eager = TextEngine(m.lm, compile=False).generate(ids, mask, params)
    eng = TextEngine(m.lm, compile=True)
    for _ in range(2):  # the second call reuses the compiled graph and the static cache
        compiled = eng.generate(ids, mask, params)
        assert (compiled.completion_ids == eager.completion_ids).float().mean() > 0.9  # bf16 near-ties may flip


def test_edit_rollout_replays_with_source_latents():
    from test_models import _tiny_edit_kl_config

    m = UnifiedModel(_tiny_edit_kl_config()).eval()
    ids, mask = m.tokenizer(PROMPTS[:2])
    src = torch.rand(2, 3, 16, 16) * 2 - 1
    p = ImageSamplingParams(num_steps=3, window_size=2)
    traj = ImageEngine(m).generate(ids, mask, p, source_images=src, generator=torch.Generator().manual_seed(2))
    assert traj.source_latents.shape == (2, *m.latent_shape) and traj.images.shape == src.shape
    with torch.no_grad():
        torch.testing.assert_close(replay_logprobs(m, traj), traj.log_probs[:2], rtol=1e-4, atol=1e-4)
        traj.source_latents = -traj.source_latents  # the source image conditions the velocity
        assert (replay_logprobs(m, traj) - traj.log_probs[:2]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["edit", "cfg"])
def test_replay_velocity_of_a_row_subset_is_that_slice_of_the_full_replay(model, kind):
    """The trainer replays micro-batches (rows) with their own recomputed conditioning: rows, source latents,
    sigmas and the unconditional branch must all be cut to the same rows."""
    from test_models import _tiny_edit_kl_config

    m = UnifiedModel(_tiny_edit_kl_config()).eval() if kind == "edit" else model
    ids, mask = m.tokenizer(PROMPTS)
    src = torch.rand(3, 3, 16, 16) * 2 - 1 if kind == "edit" else None
    p = ImageSamplingParams(num_steps=4, window_size=2, guidance_scale=3.0 if kind == "cfg" else 1.0, decode=False)
    traj = ImageEngine(m).generate(ids, mask, p, source_images=src, generator=torch.Generator().manual_seed(4))
    steps = traj.trainable.nonzero().flatten()
    rows = torch.tensor([2, 0])
    with torch.no_grad():
        v_all, x_all = replay_velocity(m, traj, steps)
        v, x = replay_velocity(m, traj, steps, rows=rows)
        v_cond, _ = replay_velocity(m, traj, steps, rows=rows, conditioning=m.condition(ids[rows], mask[rows]))
    assert v.shape == x.shape == (2, 2, *m.latent_shape)
    torch.testing.assert_close(x, x_all[:, rows], rtol=0, atol=0)
    torch.testing.assert_close(v, v_all[:, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cond, v, rtol=1e-5, atol=1e-5)  # recomputed conditioning = the stored one
    assert (v_all[:, 1] - v_all[:, 0]).abs().max() > 1e-3  # rows differ: a wrong row pick would show


@pytest.mark.slow
def test_compiled_decode_matches_eager_on_cpu(model):
    """The torch.compile path traces on CPU too (inductor; ~30 s of compile, hence slow)."""
    ids, mask = model.tokenizer(PROMPTS)
    params = SamplingParams(max_new_tokens=12, temperature=0, eos_token_ids=())
    eager = _engine(model).generate(ids, mask, params)
    eng = TextEngine(model.lm, compile=True, pad_token_id=0)
    for _ in range(2):
        assert torch.equal(eng.generate(ids, mask, params).completion_ids, eager.completion_ids)


def test_image_engine_impl_reaches_the_sde_step(model, monkeypatch):
    """`ImageEngine(model, impl=...)` is what the trainer's `--impl reference` relies on for image rollouts."""
    import unirl_fast.rollout.image as image_mod

    seen = []
    real = image_mod.flow_sde_step

    def spy(*a, **kw):
        seen.append(kw.get("impl"))
        return real(*a, **kw)

    monkeypatch.setattr(image_mod, "flow_sde_step", spy)
    ids, mask = model.tokenizer(PROMPTS[:2])
    p = ImageSamplingParams(num_steps=3, window_size=1, decode=False)
    ref = ImageEngine(model, impl="reference").generate(ids, mask, p, generator=torch.Generator().manual_seed(3))
    assert seen == ["reference"] * 3
    auto = ImageEngine(model).generate(ids, mask, p, generator=torch.Generator().manual_seed(3))
    assert seen[3:] == ["auto"] * 3
    torch.testing.assert_close(auto.latents, ref.latents, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="impl"):
        ImageEngine(model, impl="fast")
