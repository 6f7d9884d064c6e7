"""The `sd` decoder family: Stable Diffusion 1.x / 2.x (epsilon or v-prediction), the release's
decoder. Everything it does is `diffusion.py`'s (unchanged: the release pairing's losses, pictures
and checkpoint keys); this module adds what every family declares: its folder, its condition
(77 x cross_attention_dim, no pooled embedding) and its tiny preset.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import diffusion
from decoders.base import ConditionSpec, as_condition

NAME = "sd"
PIPELINES = ("StableDiffusionPipeline",)          # model_index.json `_class_name` of its folders
POOLED = False
DENOISER = "unet"


def is_denoiser(config: dict) -> bool:
    """A UNet without SDXL's text-time embedding (SD 1.x / 2.x)."""
    return config.get("_class_name") == "UNet2DConditionModel" and config.get("addition_embed_type") != "text_time"


class SDDecoder(diffusion.StableDiffusion):
    """`diffusion.StableDiffusion` as a decoder family: the same parts and steps, reading a
    `Condition` (its sequence; the family has no pooled embedding)."""

    family = NAME
    fast_pictures = True            # fast_inference.py's graph / compiled UNet (pictures="graph" / "compiled")

    def __init__(self, vae, unet, tokenizer, noise_scheduler, image_size: int, tokens: int):
        super().__init__(vae, unet, tokenizer, noise_scheduler, image_size)
        self.condition = ConditionSpec(tokens=tokens, width=unet.config.cross_attention_dim)

    @property
    def parts(self) -> dict[str, nn.Module]:
        """The frozen modules, under the names the model registers them (the release's)."""
        return {"vae": self.vae, "unet": self.unet}

    def loss(self, latents, condition, noise=None, timesteps=None, generator=None, snr_gamma=None) -> torch.Tensor:
        return super().loss(latents, as_condition(condition).sequence, noise, timesteps, generator, snr_gamma)

    def draw(self, cond, negative, seeds, guidance_scale, num_inference_steps, sampler="pndm", pictures="eager"):
        return super().draw(as_condition(cond).sequence, None if negative is None else as_condition(negative).sequence,
                            seeds, guidance_scale, num_inference_steps, sampler, pictures)


def load(cfg, device=None) -> SDDecoder:
    """The decoder of `cfg.sd_model` (`diffusion.load_parts`), its sizes checked against the config."""
    vae, unet, text_config, tokenizer, scheduler = diffusion.load_parts(cfg, device)
    diffusion.check_sizes(cfg, vae, unet, text_config)
    return SDDecoder(vae, unet, tokenizer, scheduler, cfg.sd_image_size, cfg.mapper.num_prompt_tokens)


def load_text_encoder(cfg, device=None) -> nn.Module:
    """The CLIP text encoder (float32), for the caption loss and the SD baseline."""
    return diffusion.load_text_encoder(cfg, device)


def write_tiny(out_dir: Path, arch: dict, cfg, seed: int, words=()) -> None:
    """The tiny SD 2.1-base-like folder (`presets.write_tiny_sd`)."""
    from presets import write_tiny_sd

    write_tiny_sd(out_dir, arch, cfg.sd_image_size, cfg.mapper.d_model, seed, words=words)
