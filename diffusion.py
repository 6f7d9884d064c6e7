"""The frozen Stable Diffusion side of MiniGPT-5: everything that knows about the diffusers model.

    training:   target image ─► VAE moments ─► latent (sampled, x scaling_factor)
                noise, timestep ─► scheduler.add_noise ─► UNet(noisy, t, condition) ─► prediction
                loss = MSE(prediction, target of the scheduler's prediction_type), min-SNR weighted
    caption:    caption ─► SD's tokenizer + text encoder ─► (77, d_model): the caption loss's target
    sampling:   condition (+ negative for classifier-free guidance) ─► diffusers' StableDiffusionPipeline
                over the same VAE and UNet ─► PIL images, one seed per image

`StableDiffusion` (at the end) is the decoder as one object: what the model's losses and `generate` ask
of it. The functions before it are plain and public, for any training loop that needs the same steps
(latent sampling `latents_from_moments`, noising `noisy_latents`, `min_snr_weights`, `denoising_loss`,
caption encoding `encode_captions`). Apart from this module, only `presets.py` (which writes random SD
folders), the other decoder families (decoders/) and the toy world's build (`toyworld/stages.py`,
`toyworld/ship.py`, which make its own SD) import diffusers. Another diffusers UNet with the same interface (a Stable Diffusion folder: `unet/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) is a config change: `sd_model`, `sd_image_size`
and the mapper's `d_model` / `num_prompt_tokens` (checked against the folder by
`check_sizes`); the loss follows the folder's `prediction_type` ("epsilon" as SD 2.1-base,
"v_prediction" as SD 2.1-768, or "sample"). A model with other conditioning is another decoder family
(decoders/: `sdxl.py`, `sd3.py`; `decoders/sd.py` makes this module's decoder the `sd` family).

The loss is written as diffusers' training examples write it (examples/text_to_image/
train_text_to_image.py): the target branches on `noise_scheduler.config.prediction_type`, and
min-SNR-gamma weighting (Hang et al., 2023) uses `diffusers.training_utils.compute_snr`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from configuration import ModelConfig, to_dtype

# Samplers `generate` offers: the release's PNDM (the SD folder's own scheduler), or DPM-Solver++.
SAMPLERS = ("pndm", "dpm++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_parts(cfg: ModelConfig, device: str | torch.device | None = None):
    """VAE, UNet, the text encoder's config, tokenizer and noise scheduler from the diffusers folder
    `sd_model`, the VAE and UNet in the config's SD dtype. With `device="meta"` only the `config.json`
    files are read and nothing is allocated. The text encoder itself is needed only for the caption
    loss and the SD baseline: `load_text_encoder` reads it when it is first used. The noise scheduler
    is the release's PNDM with the folder's scheduler config (for training noise and for sampling)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    sd, dtype = cfg.sd_model, to_dtype(cfg.dtypes.sd)
    scheduler = PNDMScheduler.from_pretrained(sd, subfolder="scheduler")
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{sd}/scheduler: prediction_type {scheduler.config.prediction_type!r} is not one of "
                         f"{PREDICTION_TYPES}")
    text_config = CLIPTextConfig.from_pretrained(sd, subfolder="text_encoder")
    if str(device) == "meta":
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd, subfolder="vae"))
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd, subfolder="unet"))
        # The dtype a load gives. (nn.Module.to: diffusers' own `to` warns about casts that, on empty
        # meta tensors, cannot lose anything.)
        for part in (vae, unet):
            nn.Module.to(part, dtype)
        tokenizer = None
    else:
        vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    for frozen in (vae, unet):
        frozen.requires_grad_(False)
    return vae, unet, text_config, tokenizer, scheduler


def load_text_encoder(cfg: ModelConfig, device: str | torch.device | None = None) -> nn.Module:
    """SD's CLIP text encoder, frozen, in eval mode and in float32 (the caption loss's target); on
    the meta device: empty."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if str(device) == "meta":
        with torch.device("meta"):
            encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg.sd_model, subfolder="text_encoder"))
    else:
        encoder = CLIPTextModel.from_pretrained(cfg.sd_model, subfolder="text_encoder", dtype=torch.float32)
    return encoder.requires_grad_(False).eval()


def check_sizes(cfg: ModelConfig, vae: nn.Module, unet: nn.Module, text_config) -> None:
    """The config's mapper and image sizes must be the SD folder's: a ValueError names the key."""
    unet_config = unet.config
    if cfg.mapper.d_model != unet_config.cross_attention_dim:
        raise ValueError(f"{cfg.source}: `mapper.d_model` is {cfg.mapper.d_model} but the UNet in "
                         f"{cfg.sd_model} has cross_attention_dim {unet_config.cross_attention_dim}")
    check_image_size(cfg, vae, unet_config.sample_size)
    if cfg.mapper.num_prompt_tokens != text_config.max_position_embeddings:
        raise ValueError(f"{cfg.source}: `mapper.num_prompt_tokens` must equal the SD text encoder's "
                         f"{text_config.max_position_embeddings} tokens")


def check_image_size(cfg: ModelConfig, vae: nn.Module, latent_size: int) -> None:
    """`sd_image_size` must be the picture size of the folder's denoiser (its latent `sample_size`
    times the VAE's down-scaling): a ValueError names the key."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.sd_image_size != latent_size * factor:
        raise ValueError(f"{cfg.source}: `sd_image_size` is {cfg.sd_image_size} but {cfg.sd_model} "
                         f"makes {latent_size * factor}-pixel images")


# --------------------------------------------------------------------------------------------
# Training: latents, noise, the denoising loss
# --------------------------------------------------------------------------------------------

def randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn from `generator` (on its device)."""
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


@torch.no_grad()
def vae_moments(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> the VAE encoder's moments (mean and log-variance, (N, 2 x C, h, w)), in
    the VAE's dtype: what the feature cache stores for a target image."""
    return vae.encode(images.to(vae.dtype)).latent_dist.parameters


def latents_from_moments(vae: nn.Module, moments: torch.Tensor, latent_noise: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """A latent sampled from the VAE's diagonal Gaussian (`latent_noise`, or noise drawn from
    `generator`), scaled by the VAE's `scaling_factor`: the clean latent the UNet learns to denoise."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = randn(mean, generator) if latent_noise is None else latent_noise.to(mean)
    return (mean + std * eps) * vae.config.scaling_factor


def velocity(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(a_t) * noise - sqrt(1 - a_t) * latents (a_t: the scheduler's
    `alphas_cumprod`), as diffusers' `DDPMScheduler.get_velocity` computes it; the PNDM scheduler
    the release trains with has no `get_velocity` of its own."""
    alphas = scheduler.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps]
    shape = (-1,) + (1,) * (latents.dim() - 1)
    return alphas.sqrt().view(shape) * noise - (1 - alphas).sqrt().view(shape) * latents


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts under the scheduler's `prediction_type`: the noise ("epsilon"), the
    velocity ("v_prediction") or the clean latent ("sample")."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return velocity(scheduler, latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r}; expected one of {PREDICTION_TYPES}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-gamma loss weights: min(SNR(t), gamma) divided by SNR(t) for epsilon
    prediction, by SNR(t) + 1 for v-prediction, by 1 for sample prediction (diffusers' examples)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return weights / snr
    if kind == "v_prediction":
        return weights / (snr + 1)
    return weights


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor | None = None,
                  timesteps: torch.Tensor | None = None, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward process: noise and uniform timesteps in [0, num_train_timesteps) (given, or drawn
    from `generator`, the noise first), then `scheduler.add_noise`. Returns (noisy latents, noise,
    timesteps)."""
    n = latents.shape[0]
    noise = randn(latents, generator) if noise is None else noise.to(latents)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator,
                                  device=generator.device if generator is not None else latents.device)
    timesteps = timesteps.long().to(latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def denoising_loss(unet: nn.Module, scheduler, latents: torch.Tensor, condition: torch.Tensor,
                   noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, snr_gamma: float | None = None) -> torch.Tensor:
    """The frozen UNet's denoising MSE for clean `latents` under `condition` (the mapped vokens):
    `noisy_latents`, the UNet's prediction against `denoising_target`, min-SNR weighted when
    `snr_gamma` is given (`min_snr_weights`), then the mean."""
    noisy, noise, timesteps = noisy_latents(scheduler, latents, noise, timesteps, generator)
    pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=condition.to(unet.dtype)).sample
    target = denoising_target(scheduler, latents, noise, timesteps)
    mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        mse = mse * min_snr_weights(scheduler, timesteps, snr_gamma)
    return mse.mean()


# --------------------------------------------------------------------------------------------
# Captions: SD's own conditioning, the caption loss's target
# --------------------------------------------------------------------------------------------

def encode_captions(tokenizer, text_encoder: nn.Module, captions: list[str], device: torch.device,
                    batch_size: int | None = None) -> torch.Tensor:
    """SD's text conditioning of captions, (N, 77, d_model) float32, no gradient (`batch_size`
    captions per text-encoder call; all at once by default)."""
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)
    step = batch_size or max(1, len(captions))
    with torch.no_grad():
        return torch.cat([text_encoder(tokens[i:i + step])[0].float() for i in range(0, len(tokens), step)])


class CaptionCache:
    """The caption features of `encode_captions`, each distinct caption encoded once: an LRU of at
    most `size` entries (None: no bound) in CPU memory, per process. The frozen text encoder is
    deterministic, so a cached feature is the one a new encoding would give (up to float rounding
    of differently sized batches). An entry is num_prompt_tokens x d_model float32 values: 77 x
    1024 x 4 B = 315 KB at real sizes."""

    def __init__(self, size: int | None = 4096):
        self.size = size
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, captions: list[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """The features of `captions` (N, T, D) on the CPU: the ones not cached yet are encoded
        together by `encode` (duplicates once); the empty caption of CFG dropout is an entry like
        any other."""
        found = {c: self.entries[c] for c in dict.fromkeys(captions) if c in self.entries}
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            # One copy per caption, so that evicting an entry frees its memory.
            found.update((c, f.clone()) for c, f in zip(missing, encode(missing).cpu()))
        for caption in found:                       # most recently used last
            self.entries[caption] = found[caption]
            self.entries.move_to_end(caption)
        while self.size is not None and len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return torch.stack([found[c] for c in captions])

    def clear(self) -> None:
        self.entries.clear()


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def pipeline(vae: nn.Module, unet: nn.Module, tokenizer, noise_scheduler, sampler: str = "pndm",
             text_encoder: nn.Module | None = None):
    """A diffusers `StableDiffusionPipeline` over the frozen parts, sampling with `sampler` (the
    release's PNDM, or DPM-Solver++ with the same scheduler config).

    Without a text encoder (conditions come as `prompt_embeds`) the pipeline casts them to the
    UNet's dtype. With one, it would cast them to the text encoder's, which is float32 here; so text
    prompts go through `encode_prompt` first (see `text_conditions`)."""
    from diffusers import StableDiffusionPipeline

    steps = sampling_scheduler(noise_scheduler.config, sampler)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=steps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_scheduler(config, sampler: str):
    """The sampler `sampler` (the release's PNDM, or DPM-Solver++) over a noise scheduler's config."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    if sampler not in SAMPLERS:
        raise ValueError(f"scheduler must be one of {SAMPLERS}, got {sampler!r}")
    return (PNDMScheduler.from_config(config) if sampler == "pndm"
            else DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"))


def text_conditions(text_pipe, captions: list[str], device: torch.device,
                    guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain Stable Diffusion's conditions of caption texts (and the empty prompt's, for guidance):
    the "SD baseline" the release drew for CC3M."""
    return text_pipe.encode_prompt(captions, device, 1, guidance_scale > 1)


def draw(pipe, cond: torch.Tensor, negative: torch.Tensor | None, seeds: list[int], guidance_scale: float,
         num_inference_steps: int, image_size: int) -> list:
    """One pipeline call: N conditions (and their negatives, for classifier-free guidance) -> N PIL
    images, each from its own seed; the conditions reach the UNet in its dtype."""
    dtype = pipe.unet.dtype
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    result = pipe(prompt_embeds=cond.to(dtype), negative_prompt_embeds=None if negative is None else negative.to(dtype),
                  guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=generators,
                  height=image_size, width=image_size, output_type="pil")
    return result.images


# --------------------------------------------------------------------------------------------
# The decoder: the frozen SD parts as one object (the seam of a decoder family)
# --------------------------------------------------------------------------------------------

class StableDiffusion:
    """The frozen picture decoder of the release pairing as one object: a Stable Diffusion 1.x / 2.x
    diffusers folder (a VAE, a UNet reading the 77 token states of one CLIP text encoder, the noise
    scheduler). What the rest of the project asks of a decoder, and so what the other decoder families
    implement (decoders/sdxl.py: two text encoders and a pooled embedding; decoders/sd3.py: a
    transformer trained by flow matching):

        latents(images=... | moments=...)      the clean latents a target picture becomes
        loss(latents, condition, ...)          the denoising loss under the mapped vokens
        encode_captions(captions, encoder)     its own text conditioning (the caption loss's target)
        draw(cond, negative, seeds, ...)       pictures from conditions (`generation.generate`)
        draw_captions(captions, ...)           pictures from caption texts (the SD baseline)

    `MiniGPT5_Model` keeps the parts as its frozen submodules under the release's names (`vae`, `unet`,
    `noise_scheduler`, `sd_tokenizer`; `sd_text_encoder`, read when first used, is handed in where it
    is needed) and this object over them as `decoder`. It holds no reference to the model."""

    def __init__(self, vae: nn.Module, unet: nn.Module, tokenizer, noise_scheduler, image_size: int):
        self.vae, self.unet, self.tokenizer, self.noise_scheduler = vae, unet, tokenizer, noise_scheduler
        self.image_size = image_size
        # The parts move between the CPU and the device while it runs (MiniGPT5_Model.place(offload=True)):
        # what fast_inference.py's compiled pictures cannot follow.
        self.offloaded = False

    def latents(self, images: torch.Tensor | None = None, moments: torch.Tensor | None = None,
                latent_noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of target pictures (in [-1, 1]), or of their cached VAE `moments`, sampled
        from the VAE's diagonal Gaussian (`latents_from_moments`)."""
        if moments is None:
            moments = vae_moments(self.vae, images)
        return latents_from_moments(self.vae, moments, latent_noise, generator)

    def loss(self, latents: torch.Tensor, condition: torch.Tensor, noise: torch.Tensor | None = None,
             timesteps: torch.Tensor | None = None, generator: torch.Generator | None = None,
             snr_gamma: float | None = None) -> torch.Tensor:
        """`denoising_loss` of the UNet under `condition`."""
        return denoising_loss(self.unet, self.noise_scheduler, latents, condition, noise, timesteps, generator,
                              snr_gamma)

    def encode_captions(self, captions: list[str], text_encoder: nn.Module, device: torch.device) -> torch.Tensor:
        """`encode_captions` with this folder's tokenizer."""
        return encode_captions(self.tokenizer, text_encoder, captions, device)

    def pipeline(self, sampler: str = "pndm", text_encoder: nn.Module | None = None):
        """A diffusers pipeline over the parts (`pipeline`)."""
        return pipeline(self.vae, self.unet, self.tokenizer, self.noise_scheduler, sampler, text_encoder)

    def draw(self, cond: torch.Tensor, negative: torch.Tensor | None, seeds: list[int], guidance_scale: float,
             num_inference_steps: int, sampler: str = "pndm", pictures: str = "eager") -> list:
        """N conditions -> N PIL images (`draw`); `pictures` other than "eager" runs the UNet from a
        CUDA graph or compiled (fast_inference.py)."""
        if pictures == "eager":
            pipe = self.pipeline(sampler)
        else:
            import fast_inference

            vae, unet = fast_inference.fast_sd_parts(self, pictures)
            pipe = pipeline(vae, unet, self.tokenizer, self.noise_scheduler, sampler)
        return draw(pipe, cond, negative, seeds, guidance_scale, num_inference_steps, self.image_size)

    def draw_captions(self, captions: list[str], seeds: list[int], guidance_scale: float, num_inference_steps: int,
                      sampler: str, text_encoder: nn.Module, device: torch.device) -> list:
        """Plain Stable Diffusion from caption texts (the release's CC3M "SD baseline")."""
        cond, negative = text_conditions(self.pipeline(sampler, text_encoder), captions, device, guidance_scale)
        return draw(self.pipeline(sampler), cond, negative, seeds, guidance_scale, num_inference_steps,
                    self.image_size)
