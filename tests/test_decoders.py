"""decoders/: the picture-decoder families behind one interface (config key `decoder_family`). Per family,
on its tiny preset: the image loss is finite and reaches the mapper (and the pooled head where the
family reads a pooled embedding), classifier-free guidance runs against the mapped zero features, the
caption loss compares with the family's own text encoders, pictures have the configured size, and a
folder of another family stops the model before any weights load, with an error naming the key."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import decoders
from configuration import ConfigError, load_config
from conftest import CC3M_LIKE, build, make_batch

pytestmark = pytest.mark.usefixtures("no_data_env")
FAMILIES = list(decoders.FAMILIES)
FAST = dict(max_new_tokens=12, num_inference_steps=2)


@pytest.fixture(scope="module")
def models(decoder_config):
    """family -> a stage-1 model of its tiny preset (built once per module)."""
    built = {}

    def get(family):
        if family not in built:
            built[family] = build(decoder_config(family), stage=1)
        return built[family]

    return get


def test_the_release_config_reads_the_sd_family(tiny_config):
    assert tiny_config.decoder_family == "sd"
    assert decoders.folder_family(tiny_config.sd_model)[0] == "sd"


def test_an_unknown_family_names_the_key(tiny_config_path, tmp_path):
    text = tiny_config_path.read_text().replace("decoder_family: sd", "decoder_family: dalle")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match="`decoder_family` must be one of"):
        load_config(bad, check_paths=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_finite_and_reaches_the_mapper(family, models):
    model = models(family).train()
    model.zero_grad()
    spec = model.decoder.condition
    batch = make_batch(model.model.llama_tokenizer, CC3M_LIKE, model.cfg.image_size, model.cfg.sd_image_size)
    losses = model(batch, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(losses[k]) for k in ("image_loss", "caption_loss", "loss"))
    losses["image_loss"].backward()
    assert model.llm_to_t2i_mapping.encoder.layers[0].linear1.weight.grad.abs().sum() > 0
    assert model.fc[0].weight.grad.abs().sum() > 0
    pooled = model._modules.get("t2i_pooled_mapping")
    assert (pooled is None) == (spec.pooled is None)
    if pooled is not None:
        assert pooled.weight.grad.abs().sum() > 0
    # The caption loss's target is the family's own encoding, shaped as the condition.
    target = decoders.as_condition(model.encode_caption(["a red square"]))
    assert target.sequence.shape == (1, spec.tokens, spec.width)
    assert (target.pooled is None) == (spec.pooled is None) and (spec.pooled is None or target.pooled.shape == (1, spec.pooled))


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_runs_against_the_mapped_zero_features(family, models, monkeypatch):
    model = models(family).eval()
    seen = {}
    original = model.decoder.draw

    def spy(cond, negative, *args, **kwargs):
        seen["cond"], seen["negative"] = cond, negative
        return original(cond, negative, *args, **kwargs)

    monkeypatch.setattr(model.decoder, "draw", spy)
    out = model.generate("a picture ###Assistant:", force_generation=True, seed=3, guidance_scale=7.5, **FAST)[0]
    assert out.image is not None and out.image.size == (model.cfg.sd_image_size,) * 2
    hidden = model.model.llama_model.config.hidden_size
    with torch.no_grad():
        zero = model.map_condition(torch.zeros(1, 8, hidden))
    negative = decoders.as_condition(seen["negative"])
    torch.testing.assert_close(negative.sequence, zero.sequence)
    if zero.pooled is not None:
        torch.testing.assert_close(negative.pooled, zero.pooled)
    # guidance 1: no negative at all
    model.generate("a picture ###Assistant:", force_generation=True, seed=3, guidance_scale=1.0, **FAST)
    assert seen["negative"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sd_baseline_draws_from_the_family_text_encoders(family, models):
    model = models(family).eval()
    pictures = model.sd_baseline(["a red square", "a blue circle"], seeds=[0, 1], num_inference_steps=2)
    assert [p.size for p in pictures] == [(model.cfg.sd_image_size,) * 2] * 2
    again = model.sd_baseline(["a red square"], seeds=[0], num_inference_steps=2)
    # A seed draws its picture whatever else is in the batch, up to float rounding: a batch of two and a
    # batch of one may take other matrix kernels (on one CPU one pixel of the SD3 picture moved by one level).
    moved = np.abs(np.asarray(again[0], dtype=int) - np.asarray(pictures[0], dtype=int))
    assert moved.max() <= 1 and (moved > 0).mean() < 0.01, (moved.max(), (moved > 0).sum())
    redrawn = model.sd_baseline(["a red square"], seeds=[0], num_inference_steps=2)
    assert np.array_equal(np.asarray(redrawn[0]), np.asarray(again[0]))      # the same batch: the same bytes


def test_sd3_loss_is_the_rectified_flow_loss(models):
    """With pinned noise and timesteps: (1 - sigma) x latent + sigma x noise into the transformer, MSE to
    noise - latent, the sigma being the folder's FlowMatchEulerDiscreteScheduler's at that index."""
    model = models("sd3")
    decoder = model.decoder
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 16, 16, generator=g)
    noise = torch.randn(2, 16, 16, 16, generator=g)
    cond = decoders.Condition(torch.randn(2, 85, 48, generator=g), torch.randn(2, 32, generator=g))
    index = torch.tensor([10, 900])
    with torch.no_grad():
        got = decoder.loss(latents, cond, noise, index)
        sigma = decoder.noise_scheduler.sigmas[index].view(-1, 1, 1, 1)
        pred = decoder.transformer(hidden_states=(1 - sigma) * latents + sigma * noise,
                                   timestep=decoder.noise_scheduler.timesteps[index], encoder_hidden_states=cond.sequence,
                                   pooled_projections=cond.pooled).sample
    torch.testing.assert_close(got, ((pred - (noise - latents)) ** 2).mean())
    assert 1 > float(sigma[0]) > float(sigma[1]) > 0          # the schedule runs from noise to data


def test_flux_loss_is_the_rectified_flow_loss_on_packed_latents(models):
    """With pinned noise and timesteps: the noisy latent packed into 2 x 2 patches with their position
    ids, the transformer at sigma with FLUX.1-dev's embedded guidance, its output unpacked, MSE to
    noise - latent."""
    from diffusers import FluxPipeline

    from decoders.flux import EMBEDDED_GUIDANCE

    decoder = models("flux").decoder
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 16, 16, generator=g)
    cond = decoders.Condition(torch.randn(2, 16, 48, generator=g), torch.randn(2, 16, generator=g))
    index = torch.tensor([10, 900])
    with torch.no_grad():
        got = decoder.loss(latents, cond, noise, index)
        sigma = decoder.noise_scheduler.sigmas[index].view(-1, 1, 1, 1)
        packed = FluxPipeline._pack_latents((1 - sigma) * latents + sigma * noise, 2, 16, 16, 16)
        pred = decoder.transformer(hidden_states=packed, timestep=decoder.noise_scheduler.timesteps[index] / 1000,
                                   guidance=torch.full((2,), EMBEDDED_GUIDANCE), pooled_projections=cond.pooled,
                                   encoder_hidden_states=cond.sequence, txt_ids=torch.zeros(16, 3),
                                   img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)).sample
        pred = FluxPipeline._unpack_latents(pred, 32, 32, 2)
    torch.testing.assert_close(got, ((pred - (noise - latents)) ** 2).mean())


def test_sdxl_unet_reads_the_pooled_embedding_and_time_ids(models):
    model = models("sdxl")
    ids = model.decoder.time_ids(2, "cpu", torch.float32)
    assert ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    cond = decoders.Condition(torch.randn(1, 77, 32, generator=g), torch.randn(1, 16, generator=g))
    t = torch.tensor([500])
    with torch.no_grad():
        a = model.decoder.loss(latents, cond, noise, t)
        b = model.decoder.loss(latents, decoders.Condition(cond.sequence, cond.pooled + 1), noise, t)
    assert a != b


WRONG = {"sd": "sdxl", "sdxl": "sd3", "sd3": "flux", "flux": "sd"}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_folder_of_another_family_stops_before_any_weights_load(family, decoder_config, monkeypatch):
    """A config of each family pointed at another family's folder: the error names `decoder_family`
    and `sd_model`, and neither the decoder nor the LLM was loaded."""
    import diffusion
    from minigpt4 import MiniGPT4

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the folder was checked")

    monkeypatch.setattr(diffusion, "load_parts", refuse)
    monkeypatch.setattr(MiniGPT4, "from_config", refuse)
    for name in FAMILIES:
        monkeypatch.setattr(decoders.get_family(name), "load", refuse)
    other = decoder_config(WRONG[family])
    cfg = decoder_config(family).replace(sd_model=other.sd_model)
    with pytest.raises(ConfigError, match=f"`decoder_family` is '{family}' but `sd_model` .* is a '{WRONG[family]}'"):
        build(cfg)


def test_a_config_naming_another_family_than_its_folder_fails_when_read(tiny_config_path, tmp_path):
    """load_config (which train_eval.py and the demos run first) already names the mismatch."""
    bad = tmp_path / "sdxl_on_sd.yaml"
    bad.write_text(tiny_config_path.read_text().replace("decoder_family: sd", "decoder_family: sdxl"))
    with pytest.raises(ConfigError, match=r"`decoder_family` is 'sdxl' but `sd_model` .* is a 'sd' folder"):
        load_config(bad)


def test_a_folder_without_model_index_is_read_from_its_denoiser(decoder_config, tmp_path):
    for family in FAMILIES:
        folder = tmp_path / family
        shutil.copytree(decoder_config(family).sd_model, folder)
        (folder / "model_index.json").unlink()
        assert decoders.folder_family(folder)[0] == family
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ConfigError, match="no decoder family folder"):
        decoders.check_folder(decoder_config("sd").replace(sd_model=str(tmp_path / "sd")))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_offload_takes_turns_over_the_family_parts(family, decoder_config):
    """place(offload=True): the family's denoiser and VAE, then each of its text encoders, sit behind
    the offload hooks; the pictures are those of the plain placement."""
    model = build(decoder_config(family), stage=1).place("cpu")
    plain = model.generate("a picture ###Assistant:", force_generation=True, seed=5, **FAST)[0].image
    model.place("cpu", offload=True)
    denoiser = model.decoder.parts["unet" if family == "sdxl" else "transformer"]
    assert model._offload.parts[2:] == [denoiser, model.vae]
    offloaded = model.generate("a picture ###Assistant:", force_generation=True, seed=5, **FAST)[0].image
    assert np.array_equal(np.asarray(plain), np.asarray(offloaded))
    model.sd_baseline(["a cat"], seeds=[0], num_inference_steps=1)
    encoders = list(model.sd_text_encoder.values())
    assert len(encoders) == 2 and model._offload.parts[-2:] == encoders
    assert all(hasattr(e, "_hf_hook") for e in encoders)


def test_full_size_decoders_on_the_meta_device_have_the_real_sizes():
    """config/minigpt4_sdxl.yaml, config/minigpt4_sd3.yaml and config/minigpt4_flux.yaml over the architecture folders build on the
    meta device with the public models' parameter counts (SDXL-base's UNet 2.567 B, SD3-medium's
    transformer 2.028 B, FLUX.1-dev's 11.9 B, CLIP-L, OpenCLIP bigG, T5-XXL's encoder), their mapper sized from the decoder's
    condition; benchmarks/decoder_memory.py's table names every family."""
    import sys

    from conftest import REPO
    from model import MiniGPT5_Model

    count = lambda module: sum(p.numel() for p in module.parameters())
    expected = {
        "sdxl": ("stable-diffusion-xl-base-1.0", {"unet": 2_567_463_684, "vae": 83_653_863},
                 {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}, (77, 2048, 1280)),
        "sd3": ("stable-diffusion-3-medium", {"transformer": 2_028_328_000, "vae": 83_819_683},
                {"text_encoder": 123_650_304, "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656},
                (333, 4096, 2048)),
        "flux": ("flux.1-dev", {"transformer": 11_901_408_320, "vae": 83_819_683},
                 {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656}, (512, 4096, 768)),
    }
    for family, (arch, parts, encoders, spec) in expected.items():
        cfg = load_config(REPO / "config" / f"minigpt4_{family}.yaml", check_paths=False).replace(
            llama_model=str(REPO / "config/arch/vicuna-7b"), sd_model=str(REPO / "config/arch" / arch))
        model = MiniGPT5_Model(cfg, device="meta")
        assert {name: count(p) for name, p in model.decoder.parts.items()} == parts
        assert {name: count(e) for name, e in model.sd_text_encoder.items()} == encoders
        assert model.decoder.condition == decoders.ConditionSpec(*spec)
        assert model.t2i_decoder_prompt.shape == (1, spec[0], spec[1]) and model.t2i_pooled_mapping.out_features == spec[2]
    sys.path.insert(0, str(REPO / "benchmarks"))
    import decoder_memory

    text = decoder_memory.table({"bf16": (None, False), "4bit+offload": ("4bit", True)})
    assert all(f"| `{family}`" in text for family in decoders.FAMILIES)


@pytest.mark.parametrize("saved, loaded, key", [("sd", "sdxl", "t2i_pooled_mapping.weight"),
                                                ("sdxl", "sd", "t2i_pooled_mapping.weight"),
                                                ("sdxl", "sd3", "t2i_decoder_prompt")])
def test_a_checkpoint_of_another_pairing_stops_before_any_weights_load(saved, loaded, key, models, decoder_config,
                                                                        tmp_path, monkeypatch):
    """A stage-1 checkpoint trained with one decoder family, given to a model of another (as
    stage1_weight, or through from_weights): a CheckpointMismatchError naming the file and the key, raised
    before the decoder or the LLM loads."""
    import diffusion
    from minigpt4 import MiniGPT4
    from model import MiniGPT5_Model
    from checkpoints import CheckpointMismatchError

    path = tmp_path / f"{saved}.ckpt"
    torch.save({"state_dict": models(saved).trainable_state_dict()}, path)

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the checkpoint was checked")

    for name in FAMILIES:
        monkeypatch.setattr(decoders.get_family(name), "load", refuse)
    monkeypatch.setattr(diffusion, "load_parts", refuse)
    monkeypatch.setattr(MiniGPT4, "from_config", refuse)
    with pytest.raises(CheckpointMismatchError, match=f"{path.name}.*`{key}`"):
        build(decoder_config(loaded), stage1_weight=path)
    with pytest.raises(CheckpointMismatchError, match="decoder"):
        MiniGPT5_Model.from_weights(decoder_config(loaded).source, stage1_weight=str(path), device="cpu")


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_bfloat16_decoder_trains_and_draws(family, decoder_config):
    """The frozen decoder stored in bfloat16 (`dtypes.sd`, as at full size) while the mapper stays float32:
    the conditions reach the denoiser in its dtype, the loss is float32 and finite, pictures come out."""
    cfg = decoder_config(family)
    model = build(cfg.replace(dtypes=dataclasses.replace(cfg.dtypes, sd="bfloat16")), stage=1).train()
    assert model.decoder.parts["vae"].dtype == torch.bfloat16 and model.fc[0].weight.dtype == torch.float32
    batch = make_batch(model.model.llama_tokenizer, CC3M_LIKE, cfg.image_size, cfg.sd_image_size)
    losses = model(batch, generator=torch.Generator().manual_seed(0))
    assert losses["image_loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    out = model.eval().generate("a picture ###Assistant:", force_generation=True, seed=2, **FAST)[0]
    assert out.image.size == (cfg.sd_image_size,) * 2


def test_cached_caption_features_of_a_pooled_family_are_the_encoded_ones(decoder_config):
    """`cache_caption_features` keeps a pooled family's caption encodings (sequence and pooled, packed
    into one tensor per caption) and gives back what a fresh encoding gives."""
    model = build(decoder_config("sdxl"), stage=1, cache_caption_features=True)
    fresh = model.decoder.encode_captions(["a cat", "", "a cat"], model.sd_text_encoder, model.device)
    cached = model.encode_caption(["a cat", "", "a cat"])
    again = model.encode_caption(["", "a cat"])
    assert len(model.caption_cache.entries) == 2
    torch.testing.assert_close(cached.sequence, fresh.sequence)
    torch.testing.assert_close(cached.pooled, fresh.pooled)
    torch.testing.assert_close(again.pooled, fresh.pooled[[1, 0]])


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_release_commands_run_with_another_decoder(family, decoder_config, tmp_path):
    """The release's four train_eval.py command lines (tests/test_train_eval.py) with the family's tiny
    config: stage 1, stage 2 from it, both predictions (CC3M with the SD baseline drawn by the family's
    own text encoders); the checkpoints hold the pooled head beside the release's keys."""
    import contextlib

    from test_train_eval import RELEASE_COMMANDS, make_tiny_release_data, run_main, split_command

    make_tiny_release_data(tmp_path)
    weights = tmp_path / "WEIGHT_FOLDER"
    with contextlib.chdir(tmp_path):
        for name, command in RELEASE_COMMANDS.items():
            env, argv = split_command(command)
            env = {k: str(tmp_path / v) if k in ("WEIGHTFOLDER", "DATAFOLDER", "OUTPUT_FOLDER") else v
                   for k, v in env.items()}
            log = run_main(argv + ["--model_config", decoder_config(family).source], env)
            if name.startswith("train"):
                assert "after 2 optimiser steps" in log, log[-2000:]
                stem = "stage1_cc3m" if name == "train_stage1" else "stage2_vist"
                shutil.copy(next(weights.glob(f"{stem}_*-*.ckpt")), weights / f"{stem}.ckpt")
    for stem in ("stage1_cc3m", "stage2_vist"):
        state = torch.load(weights / f"{stem}.ckpt", weights_only=True)["state_dict"]
        assert {"t2i_pooled_mapping.weight", "t2i_pooled_mapping.bias"} <= set(state)
    cc3m = torch.load(tmp_path / "outputs" / "stage1_cc3m" / "predictions-0.pt", weights_only=False)
    assert len(cc3m) == 2 and all(r[4] is not None for r in cc3m)          # the SD baseline of CC3M
    vist = torch.load(tmp_path / "outputs" / "stage2_vist" / "predictions-0.pt", weights_only=False)
    assert len(vist) == 2


def test_sd3_stage1_resumes_exactly_and_metric_reads_its_predictions(decoder_config, tmp_path, monkeypatch):
    """The flow-matching family through the commands: stage 1 for 2 steps straight equals 1 step then
    `--resume last` (every draw of the rectified-flow loss, timestep density included, comes from the
    step's generator), prediction on CC3M with the SD baseline, and metric.py scores the folder."""
    import metric
    from test_train_eval import assert_same_state, common, make_tiny_release_data, run_main, state_of

    make_tiny_release_data(tmp_path)
    weights = tmp_path / "weights"
    env = {"IS_STAGE2": "False", "DATAFOLDER": tmp_path / "datasets" / "CC3M", "WEIGHTFOLDER": weights,
           "OUTPUT_FOLDER": tmp_path / "out"}
    stage1 = ["--is_training", "--train_data_path", "cc3m_val.tsv", *common(decoder_config("sd3").source)]
    run_main(stage1 + ["--model_save_name", "straight", "--max_steps", "2"], env)
    run_main(stage1 + ["--model_save_name", "s1", "--max_steps", "1"], env)
    run_main(stage1 + ["--model_save_name", "s1", "--max_steps", "2", "--resume", "last"], env)
    straight, resumed = state_of(weights / "straight-last.ckpt"), state_of(weights / "s1-last.ckpt")
    assert "t2i_pooled_mapping.weight" in straight
    assert_same_state(resumed, straight, "sd3 stage 1 resumed")
    run_main(["--test_data_path", "cc3m_val.tsv", "--test_weight", "s1-last.ckpt",
              *common(decoder_config("sd3").source)], env)
    records = torch.load(tmp_path / "out" / "s1-last" / "predictions-0.pt", weights_only=False)
    assert len(records) == 2 and all(r[4] is not None for r in records)
    monkeypatch.setenv("OUTPUT_FOLDER", str(tmp_path / "out"))
    monkeypatch.setenv("DATAFOLDER", str(tmp_path / "datasets" / "CC3M"))
    scores = metric.main(["--test_weight", "s1-last.ckpt", "--tiny_extractors", "--device", "cpu"])
    assert isinstance(scores, dict) and scores


def test_sd3_with_a_t5_encoder_reads_its_states(decoder_config, tmp_path):
    """An SD3 folder with `text_encoder_3` (a tiny T5 encoder; the tiny LLaMA tokenizer stands in for
    T5's, as AutoTokenizer reads either): the caption encoding's T5 tokens are the encoder's states
    (not zeros), and the model trains and draws."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    cfg = decoder_config("sd3")
    folder = tmp_path / "sd3"
    shutil.copytree(cfg.sd_model, folder)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=600, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                            feed_forward_proj="gated-gelu")).save_pretrained(folder / "text_encoder_3")
    t5_tokenizer = AutoTokenizer.from_pretrained(cfg.llama_model)
    t5_tokenizer.pad_token = t5_tokenizer.unk_token                  # T5's tokenizer pads; this one is told how
    t5_tokenizer.save_pretrained(folder / "tokenizer_3")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "LlamaTokenizerFast"])
    (folder / "model_index.json").write_text(json.dumps(index))
    model = build(cfg.replace(sd_model=str(folder)), stage=1).train()
    assert list(model.sd_text_encoder) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    target = model.encode_caption(["a red square"])
    assert target.sequence.shape == (1, 85, 48) and target.sequence[:, 77:].abs().sum() > 0
    batch = make_batch(model.model.llama_tokenizer, CC3M_LIKE, cfg.image_size, cfg.sd_image_size)
    assert torch.isfinite(model(batch, generator=torch.Generator().manual_seed(0))["loss"])
    out = model.eval().generate("a picture ###Assistant:", force_generation=True, seed=2, **FAST)[0]
    assert out.image.size == (cfg.sd_image_size,) * 2
    assert model.sd_baseline(["a cat"], seeds=[0], num_inference_steps=1)[0].size == (cfg.sd_image_size,) * 2


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_fast_picture_modes_are_refused_before_any_work_for_other_families(family, models, monkeypatch):
    """pictures="graph" / "compiled" wrap the sd family's UNet only: another family's generate says so
    before encoding the prompt (the backbone is never asked)."""
    import generation

    model = models(family)
    monkeypatch.setattr(generation, "prompt_embeddings", lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(ValueError, match=f"pictures='graph'.*the {family} family draws eagerly"):
        model.generate("a picture ###Assistant:", pictures="graph", **FAST)
