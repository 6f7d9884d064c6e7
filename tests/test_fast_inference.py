"""fast_inference.py on the tiny preset (CPU, float32): the static-cache decode gives the release
path's tokens, voken features and pictures (batched, padded, LoRA unmerged and merged, sampled and
greedy, stopped by the end symbol); the compiled step and the fast pictures agree with the eager
ones. The CUDA-graph capture itself runs only on a GPU (scripts/gpu_bench.sh checks it there)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import decoding
import fast_inference
import generation
from model import MiniGPT5_Model

# MINIGPT5_TEST_DEVICE=cuda runs these checks on a GPU, where the decode step and the UNet are captured
# in CUDA graphs (scripts/gpu_bench.sh does); CI runs them on the CPU.
DEVICE = os.environ.get("MINIGPT5_TEST_DEVICE", "cpu")
PROMPTS = ["###Human: tell me a story ###Assistant:",
           "###Human: <Img><ImageHere></Img> what is this? ###Assistant:",
           "###Human: <Img><ImageHere></Img> and <Img><ImageHere></Img> next scene ###Assistant:"]


@pytest.fixture(scope="module")
def model(tiny_config):
    """A stage-2 model whose LoRA matters (PEFT starts B at zero, which would hide a LoRA bug)."""
    torch.manual_seed(0)
    m = MiniGPT5_Model(tiny_config, stage=2).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.place(DEVICE) if DEVICE != "cpu" else m


@pytest.fixture(scope="module")
def images():
    picture = Image.new("RGB", (48, 40), (30, 120, 200))
    picture.paste((250, 250, 0), (10, 10, 30, 30))
    return [[], [picture], [picture, picture.transpose(Image.FLIP_LEFT_RIGHT)]]


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _spy_features(model, monkeypatch) -> list:
    seen = []
    original = model.map_vokens

    def spy(features):
        seen.append(features.detach().clone())
        return original(features)

    monkeypatch.setattr(model, "map_vokens", spy)
    return seen


@pytest.mark.parametrize("options", [
    dict(force_generation=True, max_new_tokens=40),              # several chunks of random numbers and stop checks
    dict(force_generation=False, max_new_tokens=20, do_sample=False, repetition_penalty=1.3),   # greedy
])
def test_static_decode_gives_the_release_paths_answers(model, images, monkeypatch, options):
    """Same token ids, texts, voken features and pictures as transformers' `generate` (the default
    path), for a padded batch with input images and LoRA."""
    features = _spy_features(model, monkeypatch)
    kwargs = dict(seed=[11, 12, 13], num_inference_steps=2, **options)
    release = model.generate(PROMPTS, images, **kwargs)
    release_features = list(features)
    features.clear()
    static = model.generate(PROMPTS, images, decode="static", **kwargs)
    assert [o.token_ids for o in static] == [o.token_ids for o in release]
    assert [o.text for o in static] == [o.text for o in release]
    assert len(features) == len(release_features)
    for a, b in zip(features, release_features):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(static, release):
        assert (a.image is None) == (b.image is None)
        if a.image is not None:       # on a GPU the attention over the longer cache rounds the features apart
            assert np.abs(_pixels(a.image) - _pixels(b.image)).max() <= (0 if DEVICE == "cpu" else 1)
    if options["force_generation"]:
        assert all(o.image is not None for o in static)


def test_static_decode_stops_where_the_release_path_stops(model, monkeypatch):
    """Scripted answers ("ok ### more", with the end symbol at another step for each item): both paths
    end each item right after "###", pad it while the others go on, and return the same ids."""
    tok = model.model.llama_tokenizer
    scripts = [tok.encode(text, add_special_tokens=False) for text in
               ("ok ### more words here", "a longer answer then ### and more", "x ### y z w v u")]
    original = decoding.VokenForcing.__call__

    def scripted(self, input_ids, scores):
        step = int((input_ids != fast_inference.DUMMY_ID).sum(dim=1)[0])     # tokens generated so far
        out = torch.full_like(scores, float("-inf"))
        for row, script in enumerate(scripts):
            out[row, script[min(step, len(script) - 1)]] = 0
        return original(self, input_ids, out)

    monkeypatch.setattr(decoding.VokenForcing, "__call__", scripted)
    kwargs = dict(seed=[1, 2, 3], max_new_tokens=30, num_inference_steps=1)
    prompts = ["say ok ###Assistant:"] * 3
    release = model.generate(prompts, **kwargs)
    static = model.generate(prompts, decode="static", **kwargs)
    assert [o.token_ids for o in static] == [o.token_ids for o in release]
    assert [o.clean_text for o in static] == ["ok", "a longer answer then", "x"]
    assert all(o.text.endswith("###") for o in static)


def test_static_decoder_is_kept_for_calls_with_the_same_shapes(model):
    """The decoder (its cache, buffers and, on a GPU, its captured graph) is reused by a call with the
    same batch size and rounded lengths; another batch size replaces it (at most MAX_DECODERS kept);
    the recorder's buffers stay where they are (a graph reads them by address)."""
    kwargs = dict(seed=0, max_new_tokens=12, num_inference_steps=1, force_generation=True)
    model.generate(PROMPTS[:1], decode="static", **kwargs)
    kept = fast_inference._decoders[model.model]
    first = next(iter(kept.values()))
    states = first.recorder.states.data_ptr()
    model.generate(["###Human: another prompt of about the same length ###Assistant:"], decode="static", **kwargs)
    assert list(kept.values()) == [first] and first.recorder.states.data_ptr() == states
    assert (first.graph is not None) == (DEVICE == "cuda")          # captured on a GPU only
    model.generate([PROMPTS[0], PROMPTS[0]], decode="static", **kwargs)
    assert len(kept) == fast_inference.MAX_DECODERS and first not in kept.values()


def test_compiled_step_and_merged_lora_give_the_same_tokens(model, images, monkeypatch):
    """decode="compiled" (torch.compile of the step; dynamo with the eager backend here, to stay
    cheap) and a LoRA merged into the weights for inference answer as the release path does."""
    monkeypatch.setattr(fast_inference, "COMPILE_BACKEND", "eager")
    kwargs = dict(seed=[5, 6], max_new_tokens=20, num_inference_steps=1, force_generation=True)
    release = model.generate(PROMPTS[:2], images[:2], **kwargs)
    compiled = model.generate(PROMPTS[:2], images[:2], decode="compiled", **kwargs)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in release]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "q_proj.base_layer" in n}
    assert fast_inference.merge_lora(model.model)
    try:
        merged = model.generate(PROMPTS[:2], images[:2], decode="static", **kwargs)
    finally:
        fast_inference.unmerge_lora(model.model)
    assert [o.token_ids for o in merged] == [o.token_ids for o in release]
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], atol=1e-6, rtol=1e-5)


def test_fast_pictures_equal_the_eager_ones(model, monkeypatch):
    """pictures="graph" (on the CPU: the UNet channels-last, no graph) and "compiled" (dynamo, eager
    backend) draw the eager pipeline's pictures up to one level of rounding; the wrapped parts are
    made once per mode."""
    monkeypatch.setattr(fast_inference, "COMPILE_BACKEND", "eager")
    features = torch.randn(2, 8, model.model.llama_model.config.hidden_size,
                           generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        eager = generation.images_from_features(model.map_vokens, model.decoder, features, [3, 4], 7.5, 3, "pndm")
        for mode in ("graph", "compiled"):
            fast = generation.images_from_features(model.map_vokens, model.decoder, features, [3, 4], 7.5, 3, "pndm", pictures=mode)
            for a, b in zip(fast, eager):      # (on a GPU the convolutions round in TF32, by other algorithms)
                assert np.abs(_pixels(a) - _pixels(b)).max() <= (1 if DEVICE == "cpu" else 3), mode
        again = fast_inference.fast_sd_parts(model.decoder, "compiled")
        assert again is fast_inference.fast_sd_parts(model.decoder, "compiled")
        graphed = fast_inference.fast_sd_parts(model.decoder, "graph")[1]
        assert bool(graphed.graphs) == (DEVICE == "cuda")
        dpm = generation.images_from_features(model.map_vokens, model.decoder, features, [3, 4], 7.5, 3, "dpm++", pictures="graph")
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.size == (model.cfg.sd_image_size,) * 2 for p in dpm)


def test_offloaded_compiled_pictures_fall_back_to_graphs_with_a_reason(model, caplog, monkeypatch):
    fast_inference._reported.clear()
    monkeypatch.setattr(model.decoder, "offloaded", True)      # what place(offload=True) sets
    with caplog.at_level(logging.WARNING, logger="fast_inference"):
        vae, unet = fast_inference.fast_sd_parts(model.decoder, "compiled")
    assert isinstance(unet, fast_inference.GraphedUNet) and unet.check_all_weights and vae is model.vae
    assert "CPU offload" in caplog.text and "pictures='graph'" in caplog.text


def test_fast_parts_go_with_their_model(tiny_config):
    """The kept decoders and SD wrappers hold the model's parts but not the model: once the model is
    gone, so are they (a web demo that reloads models does not keep the old ones)."""
    import gc

    torch.manual_seed(0)
    m = MiniGPT5_Model(tiny_config, stage=1).eval()
    m.generate("###Human: hi ###Assistant:", seed=0, max_new_tokens=10, num_inference_steps=1, force_generation=True,
               decode="static", pictures="graph")
    assert m.model in fast_inference._decoders and m.decoder in fast_inference._pictures
    before = len(fast_inference._pictures), len(fast_inference._decoders)
    del m
    gc.collect()
    assert (len(fast_inference._pictures), len(fast_inference._decoders)) == (before[0] - 1, before[1] - 1)


def test_chunked_random_numbers_are_the_per_step_ones():
    """The static decode draws CHECK_EVERY steps of uniform numbers at once; they must be the numbers
    SeededSampler draws one step at a time from the same seed."""
    vocab, steps = 37, 5
    chunk = fast_inference.draw_noise([torch.Generator().manual_seed(9)], steps, vocab, pin=False)[0]
    g = torch.Generator().manual_seed(9)
    assert torch.equal(chunk, torch.stack([torch.rand(vocab, generator=g) for _ in range(steps)]))


def test_bad_speed_options_are_named(model):
    with pytest.raises(ValueError, match="decode must be one of"):
        model.generate("hi", decode="fast", max_new_tokens=2, num_inference_steps=1)
    with pytest.raises(ValueError, match="pictures must be one of"):
        model.generate("hi", pictures="turbo", max_new_tokens=2, num_inference_steps=1)


def test_prediction_flags_choose_the_speed_options(model, monkeypatch):
    """train_eval.py --decode / --pictures reach `generate` through PredictSettings; the defaults
    are the release's path."""
    import dataclasses

    import train_eval
    from generation import GenerationOutput

    args = train_eval.parse_args([])
    assert (args.decode, args.pictures) == ("dynamic", "eager")
    settings = train_eval.predict_settings(train_eval.parse_args(["--decode", "static", "--pictures", "graph"]),
                                           "VIST")
    assert (settings.decode, settings.pictures) == ("static", "graph")
    calls = []
    monkeypatch.setattr(model, "generate", lambda prompts, images, **kw: calls.append(kw) or
                        [GenerationOutput("x ###", "x", None, []) for _ in prompts])
    monkeypatch.setattr(model, "predict_settings", dataclasses.replace(model.predict_settings, decode="compiled",
                                                                       pictures="compiled"))
    size = model.cfg.image_size
    batch = {"sources": ["###Human: hi ###Assistant:"], "input_images": torch.zeros(0, 3, size, size),
             "task_names": ["t_0"], "targets": ["x ###"], "has_output_image": torch.tensor([False]),
             "output_images": torch.zeros(1, 3, 8, 8), "captions": [None]}
    model.predict_step(batch, 0)
    assert (calls[0]["decode"], calls[0]["pictures"]) == ("compiled", "compiled")
