"""The optimisations benchmarks/run.py measures compute the same thing as the code they replace
(tiny preset, no timings): cached caption features, batched input wrapping and the voken-row
embedding, voken states recorded while decoding, batched metric preprocessing, and the baselines
the benchmarks time against."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.baselines import adam_state_bytes, bare_decode, one_at_a_time_features, release_style_wrap
from conftest import STORY_LIKE, VOKEN_TARGET, fixed_draws, make_batch
import diffusion
from constants import VOKEN_COUNT
import generation
from decoding import VokenStateRecorder
from minigpt4 import VokenEmbedding
from model import MiniGPT5_Model

CAPTIONED = [
    {"source": "a red square on a white wall", "target": VOKEN_TARGET, "caption": "a red square on a white wall"},
    {"source": "a blue circle", "target": VOKEN_TARGET, "caption": "a blue circle"},
    {"source": "a red square on a white wall", "target": VOKEN_TARGET, "caption": "a red square on a white wall"},
]
WITH_IMAGES = STORY_LIKE            # two prompts with images, one without vokens
PROMPTS = ["###Human: tell me a story ###Assistant:", "###Human: a longer prompt, to left-pad the others ###Assistant:",
           "hi"]


def _model(cfg, stage=1, **kwargs) -> MiniGPT5_Model:
    torch.manual_seed(0)
    return MiniGPT5_Model(cfg, stage=stage, **kwargs)


def _batch(model, samples, drop=None):
    cfg = model.cfg
    batch = make_batch(model.model.llama_tokenizer, samples, cfg.image_size, cfg.sd_image_size, seed=0)
    batch.update(fixed_draws(len(samples), (4, model.unet.config.sample_size, model.unet.config.sample_size)))
    if drop is None:
        del batch["cfg_drop"]                     # drawn from the generator
    else:
        batch["cfg_drop"] = torch.tensor(drop)
    return batch


@pytest.fixture(scope="module")
def stage1(tiny_config):
    return _model(tiny_config, stage=1).train()


@pytest.fixture(scope="module")
def stage2(tiny_config):
    return _model(tiny_config, stage=2).eval()


# ---- cached caption features (row 3) -------------------------------------------------------------

@pytest.mark.parametrize("drop", [[False, False, False], [False, True, False]])
def test_cached_caption_features_give_the_same_losses_and_gradients(stage1, drop):
    batch = _batch(stage1, CAPTIONED, drop)
    results, cache = {}, diffusion.CaptionCache()
    for cached in (False, True, True):            # live, cold cache, warm cache
        stage1.caption_cache = cache if cached else None
        stage1.zero_grad(set_to_none=True)
        losses = stage1(batch, generator=torch.Generator().manual_seed(3))
        losses["loss"].backward()
        grads = {n: p.grad.clone() for n, p in stage1.named_parameters() if p.grad is not None}
        results.setdefault(cached, []).append((losses, grads))
    stage1.caption_cache = None
    (live, live_grads), = results[False]
    for losses, grads in results[True]:
        assert set(losses) == set(live) and "caption_loss" in losses
        for key in live:
            torch.testing.assert_close(losses[key], live[key])
        assert set(grads) == set(live_grads)
        for name in grads:
            torch.testing.assert_close(grads[name], live_grads[name])


def test_each_distinct_caption_is_encoded_once(tiny_config, monkeypatch):
    model = _model(tiny_config, stage=1, cache_caption_features=True).train()
    encoded = []
    original = diffusion.encode_captions
    monkeypatch.setattr(diffusion, "encode_captions",
                        lambda tok, enc, captions, device: encoded.extend(captions) or original(tok, enc, captions, device))
    batch = _batch(model, CAPTIONED, [False, True, False])      # the dropped sample's target is ""
    for _ in range(3):
        model(batch)
    assert encoded == ["a red square on a white wall", ""]
    live = original(model.sd_tokenizer, model.sd_text_encoder, ["a blue circle", "", "a blue circle"], model.device)
    torch.testing.assert_close(model.encode_caption(["a blue circle", "", "a blue circle"]), live)
    assert encoded == ["a red square on a white wall", "", "a blue circle"]


def test_caption_cache_is_bounded_least_recently_used_first(tiny_config):
    model = _model(tiny_config, stage=1, cache_caption_features=True, caption_cache_size=2)
    live = diffusion.encode_captions(model.sd_tokenizer, model.sd_text_encoder, ["a", "b", "c"], model.device)
    torch.testing.assert_close(model.encode_caption(["a", "b", "c"]), live)   # more than fit: still right
    assert list(model.caption_cache.entries) == ["b", "c"]
    model.encode_caption(["b"])
    model.encode_caption(["a"])
    assert list(model.caption_cache.entries) == ["b", "a"]
    torch.testing.assert_close(model.encode_caption(["c", "a"]), live[[2, 0]])
    model.clear_caption_cache()
    assert not model.caption_cache.entries


def test_caption_cache_is_off_by_default(stage1):
    assert stage1.caption_cache is None
    stage1.encode_caption(["anything"])
    assert stage1.caption_cache is None


# ---- batched input wrapping (row 2) ------------------------------------------------------------

def test_wrap_inputs_equals_the_release_style_loop_with_gradients(stage1):
    m = stage1.model
    batch = _batch(stage1, WITH_IMAGES + CAPTIONED)
    image_embeds = torch.randn(3, m.cfg.num_query_token, m.llama_model.config.hidden_size)
    outputs = []
    for wrap in (m.wrap_inputs, lambda *a: release_style_wrap(m, *a)):
        stage1.zero_grad(set_to_none=True)
        images = image_embeds.clone().requires_grad_()
        embeds, mask, labels = wrap(batch["input_ids"], batch["attention_mask"], batch["labels"], images)
        weights = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
        (embeds * weights).sum().backward()
        rows = [mod.new_weight.grad.clone() for mod in (m.llm_parts()[0].embed_tokens,)]
        outputs.append((embeds.detach(), mask, labels, images.grad, rows))
    (e1, m1, l1, g1, r1), (e2, m2, l2, g2, r2) = outputs
    assert torch.equal(e1, e2) and torch.equal(m1, m2) and torch.equal(l1, l2)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(r1[0], r2[0])
    assert r1[0].abs().sum() > 0                  # the vokens' rows did get a gradient


def test_voken_embedding_equals_a_lookup_in_the_full_matrix():
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(20, 6, generator=g), torch.randn(3, 6, generator=g)
    embedding = VokenEmbedding(old, new, torch.float32)
    ids = torch.tensor([[0, 21, 5, 22], [20, 19, 3, 3]])
    out = embedding(ids)
    torch.testing.assert_close(out, F.embedding(ids, torch.cat([old, new])), rtol=0, atol=0)
    out.sum().backward()
    assert embedding.frozen_weight.grad is None
    torch.testing.assert_close(embedding.new_weight.grad, torch.tensor([1.0, 1.0, 1.0]).unsqueeze(1).expand(3, 6))
    with torch.no_grad():
        torch.testing.assert_close(embedding(torch.tensor([1, 2])), old[[1, 2]], rtol=0, atol=0)


# ---- voken states recorded while decoding (row 5) ----------------------------------------------

def _generate_recorded(model, prompts, max_new_tokens):
    """`generate` up to the voken features: (embeds, mask, generated, recorder)."""
    captured = {}
    original = generation.voken_features

    def spy(backbone, embeds, mask, generated, recorder=None):
        if not captured:                          # generate's call (not the fallback's inner one)
            captured.update(embeds=embeds, mask=mask, generated=generated, recorder=recorder)
        return original(backbone, embeds, mask, generated, recorder)

    generation.voken_features = spy
    try:
        model.generate(prompts, seed=list(range(len(prompts))), force_generation=True, max_new_tokens=max_new_tokens,
                       num_inference_steps=2)
    finally:
        generation.voken_features = original
    return captured


def test_recorded_voken_states_equal_a_plain_forward_pass(stage2):
    got = _generate_recorded(stage2, PROMPTS, max_new_tokens=12)
    recorder = got["recorder"]
    assert recorder.complete().all()
    recorded, rows = generation.voken_features(stage2.model, got["embeds"], got["mask"], got["generated"], recorder)
    plain, plain_rows = generation.voken_features(stage2.model, got["embeds"], got["mask"], got["generated"])
    assert rows == plain_rows == [0, 1, 2]
    assert recorded.shape == (3, VOKEN_COUNT, stage2.model.llama_model.config.hidden_size)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)


def test_answer_cut_after_img6_falls_back_to_a_forward_pass(stage2):
    """With 7 new tokens the answer is [IMG0]..[IMG6]: [IMG6] was never fed back, so its state is
    not recorded, and the features come from a plain forward pass instead."""
    got = _generate_recorded(stage2, PROMPTS[:2], max_new_tokens=7)
    assert not got["recorder"].complete().any()
    features, rows = generation.voken_features(stage2.model, got["embeds"], got["mask"], got["generated"], got["recorder"])
    plain, _ = generation.voken_features(stage2.model, got["embeds"], got["mask"], got["generated"])
    assert rows == [0, 1]
    torch.testing.assert_close(features, plain, rtol=0, atol=0)


def test_recorder_keeps_only_the_first_group():
    recorder = VokenStateRecorder(img0_id=7, count=3)
    prompt_states = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    recorder(None, (), {"inputs_embeds": None}, (prompt_states,))
    # Row 0 feeds 7 (its [IMG0]) at step 1, row 1 at step 2; a second 7 later is ignored.
    for step, ids in enumerate([[5, 5], [7, 5], [8, 7], [7, 8], [7, 9]]):
        recorder(None, (), {"input_ids": torch.tensor(ids).unsqueeze(1)},
                 (torch.full((2, 1, 1), float(100 + step)) + torch.tensor([[[0.0]], [[0.5]]]),))
    assert recorder.complete().tolist() == [True, True]
    assert recorder.states[0].flatten().tolist() == [100.0, 101.0, 102.0]
    assert recorder.states[1].flatten().tolist() == [101.5, 102.5, 103.5]


def test_bare_decode_gives_generates_logits(stage2):
    """The benchmark's bare decode runs the same forward passes as `generate` (same final logits)."""
    m = stage2.model
    embeds, mask = generation.prompt_embeddings(stage2.model, PROMPTS[:1], [[]], 8)
    tokens = torch.tensor([[m.voken_ids[0], m.voken_ids[1], 9, 10]])
    logits = bare_decode(stage2, embeds, mask, tokens)
    full = torch.cat([embeds, m.embed_tokens(tokens[:, :-1])], dim=1)
    with torch.no_grad():
        plain = m.llama_model(inputs_embeds=full, attention_mask=torch.ones(full.shape[:2], dtype=torch.long)).logits
    torch.testing.assert_close(logits[:, -1], plain[:, -1], atol=1e-4, rtol=1e-4)


# ---- metric features (row 8) and optimiser state (row 6) ---------------------------------------

def test_batched_clip_features_equal_one_image_at_a_time():
    import extractors
    import metric

    models = metric.tiny_models(seed=0)
    models.clip.eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 8 * (i % 3), 48, 3), dtype=np.uint8)) for i in range(7)]
    stacked = torch.stack([models.clip_preprocess(im) for im in images])
    assert torch.equal(extractors.preprocess_batch(models.clip_preprocess, images), stacked)
    batched = metric.clip_image_features(images, models, batch_size=4)
    torch.testing.assert_close(batched, one_at_a_time_features(images, models), atol=1e-6, rtol=1e-5)


def test_preprocess_batch_runs_other_transforms_image_by_image():
    import extractors

    transform = lambda im: torch.tensor(np.asarray(im, dtype=np.float32)).mean(dim=-1)  # noqa: E731
    images = [Image.new("RGB", (4, 3), (i, 0, 0)) for i in range(3)]
    assert torch.equal(extractors.preprocess_batch(transform, images), torch.stack([transform(im) for im in images]))


def test_adam_state_formula_matches_a_real_step(tiny_config):
    model = _model(tiny_config, stage=1).train()
    optimizer = model.configure_optimizers()["optimizer"]
    model(_batch(model, CAPTIONED[:2], [False, False]))["loss"].backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    assert state == adam_state_bytes([p for p in model.parameters() if p.requires_grad])
