"""Every LLM family with every decoder family (config keys `llm_family` x `decoder_family`), on tiny
presets: one stage-1 training step (finite losses, the mapper moves) and one generation (a picture of
the configured size). The LLM families are `llm_families.FAMILY_NAMES`, the decoder families
`decoders.FAMILIES`: a family added to either registry joins the grid."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import decoders
import llm_families
from configuration import load_config
from conftest import CC3M_LIKE, REPO, build, make_batch

pytestmark = pytest.mark.usefixtures("no_data_env")

LLM_FAMILIES = list(llm_families.FAMILY_NAMES)
DECODER_FAMILIES = list(decoders.FAMILIES)


@pytest.fixture(scope="module")
def llm_config(tmp_path_factory, tiny_config):
    """LLM family -> the config of its tiny preset (vicuna: config/tiny.yaml; else config/tiny_<family>.yaml)."""
    from presets import build_tiny

    built = {"vicuna": tiny_config}

    def get(family):
        if family not in built:
            name = f"tiny_{family}"
            path = build_tiny(tmp_path_factory.mktemp(name) / "weights", seed=0, config_path=REPO / "config" / f"{name}.yaml",
                              arch_path=REPO / "config" / f"{name}_arch.yaml", config_name=f"{name}.yaml")
            built[family] = load_config(path)
        return built[family]

    return get


def pairing(llm_cfg, decoder_cfg):
    """The LLM side of one tiny preset with the decoder side (folder, family, picture size, mapper) of another."""
    return llm_cfg.replace(sd_model=decoder_cfg.sd_model, decoder_family=decoder_cfg.decoder_family,
                           sd_image_size=decoder_cfg.sd_image_size,
                           mapper=dataclasses.replace(decoder_cfg.mapper))


@pytest.mark.parametrize("decoder_family", DECODER_FAMILIES)
@pytest.mark.parametrize("llm_family", LLM_FAMILIES)
def test_one_training_step_and_one_generation(llm_family, decoder_family, llm_config, decoder_config):
    cfg = pairing(llm_config(llm_family), decoder_config(decoder_family))
    model = build(cfg, stage=1).train()
    assert model.decoder.family == decoder_family
    # The release's optimiser holds every trainable tensor (the pooled head too); its schedule starts at
    # a learning rate of 0 (warm-up), so the step itself is a plain AdamW's.
    release = model.configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in release.param_groups for p in g["params"]) == model.num_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    mapper = {"fc": model.fc[0].weight, "llm_to_t2i_mapping": model.llm_to_t2i_mapping.decoder.layers[0].linear1.weight,
              "t2i_decoder_prompt": model.t2i_decoder_prompt}
    if model.decoder.condition.pooled is not None:
        mapper["t2i_pooled_mapping"] = model.t2i_pooled_mapping.weight
    before = {name: p.detach().clone() for name, p in mapper.items()}
    batch = make_batch(model.model.llama_tokenizer, CC3M_LIKE, cfg.image_size, cfg.sd_image_size)
    losses = model(batch, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"text_loss", "image_loss", "caption_loss", "loss"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["loss"].backward()
    optimizer.step()
    assert [name for name, p in mapper.items() if torch.equal(p.detach(), before[name])] == []

    model.eval()
    out = model.generate("a picture of a cat ###Assistant:", force_generation=True, seed=1, max_new_tokens=12,
                         num_inference_steps=2)[0]
    assert out.image is not None and out.image.size == (cfg.sd_image_size, cfg.sd_image_size)
