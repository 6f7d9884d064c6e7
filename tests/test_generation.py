"""Voken-aware generation on the tiny preset: forcing, features, CFG, batching, stopping, bad input."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

import decoding
import generation
from conversation import Conversation
from decoding import VokenForcing
from model import MiniGPT5_Model
from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
FAST = {"num_inference_steps": 3, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return MiniGPT5_Model(tiny_config, stage=2).eval()


@pytest.fixture(scope="module")
def picture():
    image = Image.new("RGB", (48, 40), (30, 120, 200))
    image.paste((250, 250, 0), (10, 10, 30, 30))
    return image


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_voken_forcing_processor_completes_the_group():
    forcing = VokenForcing(voken_ids=list(range(100, 108)), prompt_length=0)
    ids = torch.tensor([[5, 6, 100], [5, 103, 104], [5, 6, 7], [100, 101, 107]])
    scores = forcing(ids, torch.zeros(4, 120))
    assert scores[0].argmax() == 101 and torch.isinf(scores[0]).sum() == 119
    assert scores[1].argmax() == 105
    assert not torch.isinf(scores[2]).any() and not torch.isinf(scores[3]).any()  # free after [IMG7]
    forced = VokenForcing(voken_ids=list(range(100, 108)), prompt_length=0, force_generation=True)
    scores = forced(ids, torch.zeros(4, 120))
    assert scores[2].argmax() == 100                        # no [IMG0] yet: forced
    assert not torch.isinf(scores[3]).any()                 # [IMG0] already seen: free


def test_repetition_penalty_spares_the_vokens():
    """An answer with two pictures repeats [IMG0]: the release's penalty (2.0) halved its logit after
    the first picture, and trained toy models ended most answers there instead of drawing the second."""
    from decoding import logits_processors

    vokens = list(range(100, 108))
    chain = logits_processors(vokens, None, do_sample=False, temperature=1.0, top_k=None, top_p=1.0,
                              repetition_penalty=2.0, force_generation=False)
    ids = torch.tensor([[5, 6, *vokens, 7]])                # text, a whole voken group, text
    scores = torch.full((1, 120), 3.0)
    out = chain(ids, scores.clone())
    assert out[0, 100] == 3.0 and out[0, 100].item() == out.max().item()    # [IMG0] not penalised
    assert out[0, 5] == out[0, 6] == out[0, 7] == 1.5                       # repeated text is
    assert out[0, 8] == 3.0                                                 # unseen text is not
    assert scores[0, 5] == 3.0                                              # the input is left alone


def test_after_img0_come_img1_to_img7(model):
    out = model.generate("###Human: draw something ###Assistant:", force_generation=True, seed=1, **FAST)[0]
    vokens = model.model.voken_ids
    ids = out.token_ids
    start = ids.index(vokens[0])
    assert ids[start: start + 8] == vokens
    assert out.text.startswith("[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7]")
    assert "[IMG" not in out.clean_text and out.image is not None


def test_voken_features_equal_a_plain_forward_pass(model, monkeypatch, picture):
    """The features given to the mapper are the last-layer states (transformers' own
    `hidden_states[-1]` of a plain forward) at [IMG0]-1 .. [IMG6]."""
    captured = {}
    original = model.map_vokens

    def spy(features):
        captured.setdefault("features", features.detach().clone())
        return original(features)

    monkeypatch.setattr(model, "map_vokens", spy)
    prompt = "###Human: <Img><ImageHere></Img> what next? ###Assistant:"
    out = model.generate(prompt, [picture], force_generation=True, seed=2, **FAST)[0]

    m = model.model
    embeds, mask = generation.prompt_embeddings(model.model, [prompt], [[picture]], FAST["max_new_tokens"])
    ids = torch.tensor([out.token_ids])
    full = torch.cat([embeds, m.embed_tokens(ids)], dim=1)
    with torch.no_grad():
        states = m.llama_model(inputs_embeds=full, output_hidden_states=True).hidden_states[-1]
    img0 = embeds.shape[1] + out.token_ids.index(m.voken_ids[0])
    torch.testing.assert_close(captured["features"][0], states[0, img0 - 1: img0 + 7], atol=1e-5, rtol=1e-5)


def test_guidance_one_equals_no_cfg(model, monkeypatch):
    captured = {}
    original = model.map_vokens
    monkeypatch.setattr(model, "map_vokens",
                        lambda f: captured.setdefault("features", f.detach().clone()) is not None and original(f))
    out = model.generate("a picture ###Assistant:", force_generation=True, seed=4, guidance_scale=1.0, **FAST)[0]
    pipe = model.sd_pipeline()
    with torch.no_grad():
        cond = original(captured["features"])
        plain = pipe(prompt_embeds=cond, guidance_scale=1.0, num_inference_steps=FAST["num_inference_steps"],
                     generator=[torch.Generator().manual_seed(4)], height=32, width=32).images[0]
    assert np.array_equal(_pixels(out.image), _pixels(plain))
    guided = model.generate("a picture ###Assistant:", force_generation=True, seed=4, guidance_scale=7.5, **FAST)[0]
    assert guided.text == out.text
    assert not np.array_equal(_pixels(guided.image), _pixels(out.image))


def test_force_generation_gives_an_image_and_dpm_scheduler_works(model):
    out = model.generate("hello ###Assistant:", force_generation=True, seed=0, scheduler="dpm++", **FAST)[0]
    assert out.image is not None and out.image.size == (32, 32)
    with pytest.raises(ValueError, match="scheduler"):
        model.generate("hello", scheduler="ddim", **FAST)


def test_batch_equals_single_calls(model, picture):
    other = picture.transpose(Image.FLIP_LEFT_RIGHT)
    prompts = ["###Human: tell me a story ###Assistant:",
               "###Human: <Img><ImageHere></Img> what is this? ###Assistant:",
               "###Human: <Img><ImageHere></Img> and <Img><ImageHere></Img> next scene ###Assistant:"]
    images = [[], [picture], [picture, other]]
    seeds = [11, 12, 13]
    kwargs = dict(force_generation=True, **FAST)
    batch = model.generate(prompts, images, seed=seeds, **kwargs)
    for prompt, item_images, seed, got in zip(prompts, images, seeds, batch):
        single = model.generate(prompt, item_images, seed=seed, **kwargs)[0]
        assert got.token_ids == single.token_ids
        assert got.text == single.text
        assert np.abs(_pixels(got.image) - _pixels(single.image)).max() <= 1   # same up to float rounding


def test_padded_rows_see_the_same_scores_as_single_calls(model, picture, monkeypatch):
    """Every step's scores, as the sampler gets them (after repetition penalty and top-p), are those
    of the single call. transformers 5's own repetition penalty exempted the first (left-padding
    length) generated tokens of each padded row; on a real-size random model that changed the
    sampled text of most items of a batch."""
    seen = []
    original = decoding.SeededSampler.__call__

    def record(self, input_ids, scores):
        seen.append(scores.clone())
        return original(self, input_ids, scores)

    monkeypatch.setattr(decoding.SeededSampler, "__call__", record)
    prompts = ["###Human: hi ###Assistant:",
               "###Human: <Img><ImageHere></Img> and <Img><ImageHere></Img> next scene ###Assistant:"]
    images = [[], [picture, picture]]
    kwargs = dict(force_generation=True, num_inference_steps=1, max_new_tokens=12, repetition_penalty=2.0)
    model.generate(prompts, images, seed=[5, 6], **kwargs)
    batched, seen[:] = list(seen), []
    model.generate(prompts[0], images[0], seed=5, **kwargs)
    single = list(seen)
    assert len(single) >= 9                      # the forced vokens and at least one more token
    for step, (b, s) in enumerate(zip(batched, single)):
        torch.testing.assert_close(b[0], s[0], atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")


def test_top_k_50_is_the_default_as_in_the_release(model, monkeypatch):
    """The release sampled with transformers' default top_k=50 on top of top_p=0.9: the sampler
    never sees more than 50 candidates unless top_k is turned off (0)."""
    seen = []
    original = decoding.SeededSampler.__call__

    def record(self, input_ids, scores):
        seen.append(int(torch.isfinite(scores).sum(-1).max()))
        return original(self, input_ids, scores)

    monkeypatch.setattr(decoding.SeededSampler, "__call__", record)
    kwargs = dict(num_inference_steps=1, max_new_tokens=8, seed=3, top_p=1.0)
    default = model.generate("###Human: hi ###Assistant:", **kwargs)[0]
    assert seen and max(seen) <= 50
    assert model.generate("###Human: hi ###Assistant:", top_k=50, **kwargs)[0].token_ids == default.token_ids
    seen.clear()
    model.generate("###Human: hi ###Assistant:", top_k=0, **kwargs)
    assert min(seen) > 50                                  # off: every token of the vocabulary stays a candidate
    seen.clear()
    model.generate("###Human: hi ###Assistant:", top_k=5, **kwargs)
    assert max(seen) <= 5


def test_items_without_vokens_get_no_image(model):
    outs = model.generate(["one ###Assistant:", "two ###Assistant:"], seed=[0, 1], **FAST)
    for out in outs:
        has_vokens = model.model.voken_ids[0] in out.token_ids
        assert (out.image is not None) == has_vokens


def test_stops_at_the_end_symbol(model, monkeypatch):
    """Force the LLM to write "ok ### more": generation must end right after "###"."""
    tok = model.model.llama_tokenizer
    script = tok.encode("ok ### more words here", add_special_tokens=False)
    llm = model.model.llama_model
    original = llm.generate

    def scripted(*args, **kwargs):
        def force(input_ids, scores):
            step = input_ids.shape[1]
            out = torch.full_like(scores, float("-inf"))
            out[:, script[min(step, len(script) - 1)]] = 0
            return out
        kwargs["logits_processor"] = LogitsProcessorList([force])
        return original(*args, **kwargs)

    monkeypatch.setattr(llm, "generate", scripted)
    out = model.generate("say ok ###Assistant:", seed=0, max_new_tokens=20, num_inference_steps=2)[0]
    assert out.text.endswith("###") and "more" not in out.text
    assert out.clean_text == "ok" and out.image is None


def test_max_new_tokens_is_respected(model):
    for n in (1, 5):
        out = model.generate("go on ###Assistant:", seed=3, max_new_tokens=n, repetition_penalty=1.0,
                             num_inference_steps=2)[0]
        assert 1 <= len(out.token_ids) <= n


def test_bad_input_gives_clear_errors(model, tmp_path, picture):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        model.generate("<Img><ImageHere></Img> hi", [str(tmp_path / "nowhere.png")], **FAST)
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg.*not a readable image"):
        model.generate("<Img><ImageHere></Img> hi", [str(text_file)], **FAST)
    with pytest.raises(ValueError, match=r"2 <ImageHere> placeholder\(s\) but 1 image"):
        model.generate("<Img><ImageHere></Img> and <Img><ImageHere></Img>", [picture], **FAST)


def test_long_prompt_is_cut_from_the_left_with_a_warning(model):
    context = model.model.llama_model.config.max_position_embeddings
    prompt = "the scene description " * context + "###Assistant:"
    with pytest.warns(UserWarning, match="cut from the left"):
        embeds, mask = generation.prompt_embeddings(model.model, [prompt, "short"], [[], []], max_new_tokens=8)
    assert embeds.shape[1] == context - 8
    # BOS is kept first; the end of the prompt survives.
    bos = model.model.embed_tokens(torch.tensor([model.model.llama_tokenizer.bos_token_id]))
    torch.testing.assert_close(embeds[0, 0], bos[0])
    end = model.model.embed_tokens(torch.tensor(model.model.llama_tokenizer.encode(
        "###Assistant:", add_special_tokens=False)))
    torch.testing.assert_close(embeds[0, -end.shape[0]:], end)
    with pytest.warns(UserWarning, match="cut from the left"):
        out = model.generate(prompt, seed=0, max_new_tokens=4, num_inference_steps=2)[0]
    assert len(out.token_ids) <= 4


def test_multi_turn_conversation_feeds_generated_images_back(model, picture, tmp_path):
    chat = Conversation()
    chat.add("Human", "look at this", [picture])
    first = chat.respond(model, seed=5, force_generation=True, **FAST)
    assert first.image is not None and chat.turns[-1].images == [first.image]
    chat.add("Human", "and now?")
    prompt, images = chat.prompt()
    assert prompt.count("<ImageHere>") == 2 and images == [picture, first.image]
    assert prompt.endswith("###Human: and now? ###Assistant:")
    chat.respond(model, seed=6, **FAST)
    page = chat.to_html(tmp_path / "chat.html")
    assert (tmp_path / "chat.html").read_text() == page
    assert page.count("<img ") == 2 and page.index("look at this") < page.index("and now?")
    assert page.count('class="turn ') == 4


def test_playground_runs_with_no_arguments(tmp_path):
    """Run from another folder (as the release's `cd examples && python playground.py`), it writes to
    the repository's git-ignored outputs/playground, and prints answers without the raw vokens."""
    result = subprocess.run([sys.executable, str(REPO / "examples" / "playground.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-3000:]
    out = REPO / "outputs" / "playground"
    assert f"wrote 5 figures to {out}/sample_*.png and {out / 'playground.html'}" in result.stdout
    assert list(tmp_path.iterdir()) == []                            # nothing where it was run from
    assert sorted(p.name for p in out.glob("sample_*.png")) == [f"sample_{i}.png" for i in range(5)]
    page = (out / "playground.html").read_text()
    assert page.count("<img ") == 2 + 5          # two inputs, five pictures: the toy model emits vokens itself
    assert "the story implies the next frame shows" in result.stdout and "the judge sees" in result.stdout
    answers = [line for line in result.stdout.splitlines() if line.startswith("sample ")]
    assert len(answers) == 5 and all(f"[picture {i}]" in line for i, line in enumerate(answers))
    assert "[IMG" not in result.stdout and "###" not in result.stdout
    for written in (out / "sample_0.png", REPO / "examples" / "outputs" / "playground" / "sample_0.png"):
        assert subprocess.run(["git", "check-ignore", "-q", str(written)], cwd=REPO).returncode == 0, written


def test_playground_answers_print_a_picture_mark_instead_of_the_vokens():
    sys.path.insert(0, str(REPO / "examples"))
    import playground

    text = "we went home [IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7] ###"
    assert playground.printable_answer(text, 3) == "we went home [picture 3]"
    assert playground.printable_answer(text, None) == "we went home"
    assert playground.printable_answer("[IMG0][IMG1] <ImageHere> ok ###", 0) == "[picture 0] ok"


@pytest.mark.parametrize("flags,expected", [
    (["--num_inference_steps", "0"], "error: --num_inference_steps must be a positive integer, got 0"),
    (["--guidance_scale", "nan"], "error: --guidance_scale must be a finite number, got nan"),
    (["--max_new_tokens", "-1"], "error: --max_new_tokens must be a positive integer, got -1"),
    (["--images", "BOMB"], "error: --images: 'BOMB' is not a readable image (BOMB: 300 x 200 = 60,000 pixels, "
                           "more than max_image_pixels (1,000"),
])
def test_playground_checks_flags_and_pictures_before_loading_the_model(flags, expected, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "examples"))
    import playground

    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (300, 200)).save(bomb)
    limits = tmp_path / "limits.yaml"
    limits.write_text("max_image_pixels: 1000\n")
    monkeypatch.setenv("MINIGPT5_LIMITS", str(limits))
    loaded = []
    monkeypatch.setattr(MiniGPT5_Model, "from_weights", classmethod(lambda cls, *a, **k: loaded.append(a)))
    flags = [str(bomb) if f == "BOMB" else f for f in flags]
    with pytest.raises(SystemExit) as error:
        playground.main(["--preset", "tiny", "--prompt", "<ImageHere>" if "--images" in flags else "hi", *flags]
                        + ([] if "--images" in flags else ["--images"]))
    assert str(error.value.code).startswith(expected.replace("BOMB", str(bomb))) and loaded == []


def test_playground_asks_for_the_frame_the_next_caption_tells(monkeypatch, tmp_path):
    """With the next frame's caption (`--caption`, or the toy preset's shipped one) the request is the
    training data's generation template with that caption; without it, the model tells the next scene
    (the multimodal template). `--captions` names the story's captions, one per picture."""
    sys.path.insert(0, str(REPO / "examples"))
    import playground

    from prompts import VIST_GENERATION, VIST_MULTIMODAL, VIST_SYSTEM, vist_context

    told = playground.story_prompt(["we were here", "now it was red"], next_caption="some time later")
    assert told == VIST_SYSTEM + VIST_GENERATION[0].format(context=vist_context(["we were here", "now it was red"]),
                                                           caption="some time later")
    free = playground.story_prompt(["we were here", "now it was red"])
    assert free == VIST_SYSTEM + VIST_MULTIMODAL[0].format(context=vist_context(["we were here", "now it was red"]))
    assert "some time later" in playground.story_prompt(["a", "b"], "llama3", "some time later")

    prompts = []

    def fake_generate(self, prompt_list, images, **kwargs):
        prompts.append(prompt_list[0])
        raise SystemExit(0)

    monkeypatch.setattr(MiniGPT5_Model, "from_weights", classmethod(lambda cls, *a, **k: cls.__new__(cls)))
    monkeypatch.setattr(MiniGPT5_Model, "generate", fake_generate)
    story = [str(REPO / "examples" / "story_1.jpg"), str(REPO / "examples" / "story_2.jpg")]
    with pytest.raises(SystemExit):
        playground.main(["--images", *story, "--captions", "one", "two", "--caption", "much later", "--out", str(tmp_path)])
    assert prompts[-1] == playground.story_prompt(["one", "two"], next_caption="much later")
    with pytest.raises(SystemExit, match="--captions: 1 caption.s. for 2 image"):
        playground.main(["--images", *story, "--captions", "one"])
    from toyworld.ship import shipped

    with pytest.raises(SystemExit):
        playground.main(["--out", str(tmp_path)])       # the toy preset's own story and, if shipped, next caption
    preset = shipped()
    assert prompts[-1] == playground.story_prompt(preset.story_captions, next_caption=preset.next_caption)


def test_playground_rejects_bad_images(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "playground.py"), "--images",
                             str(tmp_path / "missing.jpg")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "missing.jpg" in result.stderr and "Traceback" not in result.stderr


def test_real_dtypes_train_and_generate(tiny_config, picture):
    """The real preset keeps the frozen parts in bfloat16 / float16 (config `dtypes`) while the
    trainable ones and the SD text encoder stay float32. The tiny preset is float32 throughout, so
    this runs it with the real dtypes: a training step, voken generation and the SD baseline (both
    once failed inside diffusers on a float32 condition meeting a bfloat16 UNet)."""
    from configuration import DtypeConfig

    from conftest import VOKEN_TARGET, fixed_draws, make_batch

    cfg = tiny_config.replace(dtypes=DtypeConfig(vision="float16", llm="bfloat16", sd="bfloat16"))
    torch.manual_seed(0)
    model = MiniGPT5_Model(cfg, stage=1).train()
    assert model.unet.dtype == torch.bfloat16 and model.fc[0].weight.dtype == torch.float32
    batch = make_batch(model.model.llama_tokenizer, [{"source": "a red square", "target": VOKEN_TARGET,
                                                       "caption": "a red square"}], cfg.image_size, cfg.sd_image_size, 0)
    batch.update(fixed_draws(1, (4, model.unet.config.sample_size, model.unet.config.sample_size), 0, False))
    losses = model(batch)
    assert set(losses) == {"text_loss", "image_loss", "caption_loss", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.fc[0].weight.grad is not None

    model.eval()
    out = model.generate("###Human: <Img><ImageHere></Img> next ###Assistant:", [picture], seed=1,
                         force_generation=True, **FAST)[0]
    assert out.image is not None and out.image.size == (cfg.sd_image_size, cfg.sd_image_size)
    baseline = model.sd_baseline(["a red square"], seeds=[1], num_inference_steps=2)
    assert len(baseline) == 1 and baseline[0].size == (cfg.sd_image_size, cfg.sd_image_size)


def test_prediction_samples_with_the_top_k_of_its_flag(model, monkeypatch):
    import train_eval
    from generation import GenerationOutput

    assert train_eval.parse_args([]).top_k == 50 and train_eval.parse_args(["--top_k", "7"]).top_k == 7
    calls = []

    def fake_generate(prompts, images, **kwargs):
        calls.append(kwargs)
        return [GenerationOutput("x ###", "x", None, []) for _ in prompts]

    monkeypatch.setattr(model, "generate", fake_generate)
    size = model.cfg.image_size
    batch = {"sources": ["###Human: hi ###Assistant:"], "input_images": torch.zeros(0, 3, size, size),
             "task_names": ["t_0"], "targets": ["x ###"], "has_output_image": torch.tensor([False]),
             "output_images": torch.zeros(1, 3, 8, 8), "captions": [None]}
    model.predict_step(batch, 0)
    monkeypatch.setattr(model, "predict_settings", dataclasses.replace(model.predict_settings, top_k=7))
    model.predict_step(batch, 1)
    assert [c["top_k"] for c in calls] == [50, 7]
