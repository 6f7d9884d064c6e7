"""diffusion.py: the frozen Stable Diffusion side. The denoising target and the min-SNR weights
follow the scheduler's prediction_type as diffusers computes them, and another SD folder (here the
tiny one with v-prediction) is a config change for the whole model."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PNDMScheduler
from diffusers.training_utils import compute_snr

import diffusion
from conftest import CC3M_LIKE, batch_for, build


def scheduler_of(cfg, prediction_type: str) -> PNDMScheduler:
    scheduler = PNDMScheduler.from_pretrained(cfg.sd_model, subfolder="scheduler")
    scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


def draws(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g),
            torch.randint(0, 1000, (n,), generator=g))


def test_v_prediction_target_is_diffusers_velocity(tiny_config):
    """The v-prediction target is what diffusers' own `get_velocity` gives for the same noise
    schedule (PNDM, which the release trains with, has none: DDPM's from the same config)."""
    scheduler = scheduler_of(tiny_config, "v_prediction")
    latents, noise, timesteps = draws()
    expected = DDPMScheduler.from_config(scheduler.config).get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(diffusion.denoising_target(scheduler, latents, noise, timesteps), expected)
    assert not torch.allclose(expected, noise) and not torch.allclose(expected, latents)


def test_epsilon_and_sample_targets_and_their_snr_weights(tiny_config):
    latents, noise, timesteps = draws(1)
    snr = compute_snr(scheduler_of(tiny_config, "epsilon"), timesteps)
    alphas = scheduler_of(tiny_config, "epsilon").alphas_cumprod[timesteps]
    torch.testing.assert_close(snr, alphas / (1 - alphas))                      # the release's SNR(t)
    for kind, target, divisor in (("epsilon", noise, snr), ("v_prediction", None, snr + 1),
                                  ("sample", latents, torch.ones_like(snr))):
        scheduler = scheduler_of(tiny_config, kind)
        if target is not None:
            assert torch.equal(diffusion.denoising_target(scheduler, latents, noise, timesteps), target)
        torch.testing.assert_close(diffusion.min_snr_weights(scheduler, timesteps, 5.0),
                                   torch.clamp(snr, max=5.0) / divisor)
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        diffusion.denoising_target(type("S", (), {"config": type("C", (), {"prediction_type": "x0"})})(),
                                   latents, noise, timesteps)


def test_a_v_prediction_sd_folder_is_a_config_change(tiny_config, tmp_path):
    """The tiny SD folder with `prediction_type: v_prediction` in its scheduler config: the model's
    image loss is the UNet's MSE to diffusers' velocity, min-SNR weighted by 1 / (SNR + 1)."""
    sd = tmp_path / "sd"
    shutil.copytree(tiny_config.sd_model, sd)
    config_file = sd / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    model = build(tiny_config.replace(sd_model=str(sd)), stage=1).train()
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    batch = batch_for(model, CC3M_LIKE)
    losses = model(batch)

    # the same loss written out with diffusers' functions
    m = model.model
    with torch.no_grad():
        embeds, mask, labels = m.wrap_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], None)
        hidden, _, _ = m.forward_llm(embeds, mask, labels)
        features, sample = m.voken_features(hidden, labels)
        condition = model.map_vokens(features)
        latents = model.target_latents(batch, sample, batch["latent_noise"][sample])
        noise, timesteps = batch["noise"][sample], batch["timesteps"][sample]
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = model.unet(noisy, timesteps, encoder_hidden_states=condition).sample
        target = DDPMScheduler.from_config(model.noise_scheduler.config).get_velocity(latents, noise, timesteps)
        snr = compute_snr(model.noise_scheduler, timesteps)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        expected = (per_sample * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    torch.testing.assert_close(losses["image_loss"], expected)


def test_sizes_that_do_not_fit_the_sd_folder_name_the_key(tiny_config):
    vae, unet, text_config, _, _ = diffusion.load_parts(tiny_config)
    diffusion.check_sizes(tiny_config, vae, unet, text_config)
    wrong = tiny_config.replace(mapper=dataclasses.replace(tiny_config.mapper, d_model=7))
    with pytest.raises(ValueError, match="`mapper.d_model` is 7 but the UNet"):
        diffusion.check_sizes(wrong, vae, unet, text_config)
