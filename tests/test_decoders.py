"""decoders/: the picture-decoder families behind one interface (config key `decoder_family`). Per family:
the image loss is finite and reaches the mapper, classifier-free guidance runs against the mapped
zero features, pictures have the configured size, and a folder of another family stops the model
before any weights load, with an error naming the key."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import decoders
from configuration import ConfigError, load_config
from conftest import CC3M_LIKE, batch_for, build

pytestmark = pytest.mark.usefixtures("no_data_env")


def test_the_release_config_reads_the_sd_family(tiny_config):
    assert tiny_config.decoder_family == "sd"
    assert decoders.folder_family(tiny_config.sd_model)[0] == "sd"


def test_an_unknown_family_names_the_key(tiny_config_path, tmp_path):
    text = tiny_config_path.read_text().replace("decoder_family: sd", "decoder_family: dalle")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match="`decoder_family` must be one of"):
        load_config(bad, check_paths=False)


def test_a_folder_of_another_family_stops_before_any_weights_load(tiny_config, tmp_path, monkeypatch):
    """An SD folder whose model_index.json names the SDXL pipeline, read as the sd family: the error
    names `decoder_family` and `sd_model`, and neither the decoder nor the LLM was loaded."""
    folder = tmp_path / "sd"
    shutil.copytree(tiny_config.sd_model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    import diffusion
    from minigpt4 import MiniGPT4

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the folder was checked")

    monkeypatch.setattr(diffusion, "load_parts", refuse)
    monkeypatch.setattr(MiniGPT4, "from_config", refuse)
    with pytest.raises(ConfigError, match="`decoder_family` is 'sd' but `sd_model`"):
        build(tiny_config.replace(sd_model=str(folder)))


def test_sd_loss_reaches_the_mapper_and_guidance_uses_the_zero_features(tiny_config):
    model = build(tiny_config, stage=1).train()
    assert model.decoder.condition == decoders.ConditionSpec(77, tiny_config.mapper.d_model, None)
    assert "t2i_pooled_mapping" not in model._modules
    losses = model(batch_for(model, CC3M_LIKE))
    assert torch.isfinite(losses["image_loss"])
    losses["image_loss"].backward()
    assert model.llm_to_t2i_mapping.encoder.layers[0].linear1.weight.grad.abs().sum() > 0
    condition = model.map_condition(torch.zeros(1, 8, model.model.llama_model.config.hidden_size))
    assert condition.pooled is None and condition.sequence.shape == (1, 77, tiny_config.mapper.d_model)
