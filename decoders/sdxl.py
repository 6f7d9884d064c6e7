"""The `sdxl` decoder family: Stable Diffusion XL (a UNet reading 77 x 2048 token states, the two CLIP
text encoders' concatenated penultimate layers, plus a 1280-wide pooled embedding and the
`add_time_ids` micro-conditioning: original size, crop corner, target size).

    training:  target image ─► VAE latent (x scaling_factor) ─► noise at a uniform timestep
               ─► UNet(noisy, t, sequence, added_cond_kwargs={text_embeds: pooled, time_ids})
               loss = MSE to the scheduler's prediction_type target, min-SNR weighted (as `sd`)
    caption:   the pipeline's `encode_prompt` over both text encoders ─► (sequence, pooled)
    sampling:  diffusers' StableDiffusionXLPipeline with prompt_embeds / pooled_prompt_embeds and the
               mapped zero features as the negative (classifier-free guidance)

The `time_ids` are those of a picture drawn whole at `sd_image_size` ([size, size, 0, 0, size, size]),
as training targets are resized, not cropped (image_transforms.py) and as the pipeline draws.
The noise schedule is the folder's (DDPMScheduler over its scheduler config, as diffusers' SDXL
training script); samplers are the same names as `sd`: "pndm" and "dpm++".
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import diffusion
from configuration import to_dtype
from decoders.base import Condition, check_pictures, ConditionSpec, as_condition, seeded_generators

NAME = "sdxl"
PIPELINES = ("StableDiffusionXLPipeline",)
POOLED = True
DENOISER = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TIME_IDS = 6                         # original (h, w), crop (top, left), target (h, w)


def is_denoiser(config: dict) -> bool:
    """A UNet with SDXL's text-time embedding."""
    return config.get("_class_name") == "UNet2DConditionModel" and config.get("addition_embed_type") == "text_time"


def pooled_width(unet_config) -> int:
    """The pooled embedding's width the UNet reads: its class-embedding input less the time ids'."""
    return unet_config.projection_class_embeddings_input_dim - TIME_IDS * unet_config.addition_time_embed_dim


class SDXLDecoder:
    """SDXL's frozen parts as a decoder (see decoders/__init__.py for what a decoder offers)."""

    family = NAME
    fast_pictures = False           # draws eagerly (fast_inference.py wraps the sd family's UNet only)

    def __init__(self, vae, unet, tokenizers, noise_scheduler, image_size: int, tokens: int):
        self.vae, self.unet, self.tokenizers, self.noise_scheduler = vae, unet, tokenizers, noise_scheduler
        self.tokenizer = tokenizers[0]
        self.image_size = image_size
        self.condition = ConditionSpec(tokens=tokens, width=unet.config.cross_attention_dim,
                                       pooled=pooled_width(unet.config))
        self.offloaded = False

    @property
    def parts(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "unet": self.unet}

    @property
    def sampling_config(self) -> dict:
        """The folder's scheduler config for the samplers, PNDM's steps as the release's SD folder runs
        them (`skip_prk_steps`: PLMS steps only; SDXL's Euler config does not set it)."""
        return {**self.noise_scheduler.config, "skip_prk_steps": True}

    def latents(self, images=None, moments=None, latent_noise=None, generator=None) -> torch.Tensor:
        if moments is None:
            moments = diffusion.vae_moments(self.vae, images)
        return diffusion.latents_from_moments(self.vae, moments, latent_noise, generator)

    def time_ids(self, n: int, device, dtype) -> torch.Tensor:
        size = self.image_size
        return torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).expand(n, -1)

    def loss(self, latents, condition, noise=None, timesteps=None, generator=None, snr_gamma=None) -> torch.Tensor:
        """The denoising MSE under the mapped sequence and pooled embedding (min-SNR weighted with
        `snr_gamma`), as `diffusion.denoising_loss` for SD."""
        condition = as_condition(condition)
        scheduler, dtype = self.noise_scheduler, self.unet.dtype
        noisy, noise, timesteps = diffusion.noisy_latents(scheduler, latents, noise, timesteps, generator)
        added = {"text_embeds": condition.pooled.to(dtype), "time_ids": self.time_ids(len(latents), latents.device, dtype)}
        pred = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=condition.sequence.to(dtype),
                         added_cond_kwargs=added).sample
        target = diffusion.denoising_target(scheduler, latents, noise, timesteps)
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma is not None:
            mse = mse * diffusion.min_snr_weights(scheduler, timesteps, snr_gamma)
        return mse.mean()

    def encode_captions(self, captions: list[str], text_encoder: nn.ModuleDict, device) -> Condition:
        """Both CLIP encoders' conditioning of captions (the pipeline's `encode_prompt`), float32."""
        with torch.no_grad():
            sequence, _, pooled, _ = self.pipeline(text_encoder=text_encoder).encode_prompt(
                captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Condition(sequence.float(), pooled.float())

    def pipeline(self, sampler: str = "pndm", text_encoder: nn.ModuleDict | None = None):
        """diffusers' StableDiffusionXLPipeline over the parts (text encoders only when given)."""
        from diffusers import StableDiffusionXLPipeline

        encoders = dict(text_encoder.items()) if text_encoder is not None else {}
        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=encoders.get("text_encoder"), text_encoder_2=encoders.get("text_encoder_2"),
            tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet,
            scheduler=diffusion.sampling_scheduler(self.sampling_config, sampler), add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def draw(self, cond, negative, seeds, guidance_scale, num_inference_steps, sampler="pndm", pictures="eager"):
        """N conditions (and their negatives) -> N PIL images, one seed each."""
        check_pictures(self, pictures)
        cond, dtype = as_condition(cond), self.unet.dtype
        negative = None if negative is None else as_condition(negative)
        result = self.pipeline(sampler)(
            prompt_embeds=cond.sequence.to(dtype), pooled_prompt_embeds=cond.pooled.to(dtype),
            negative_prompt_embeds=None if negative is None else negative.sequence.to(dtype),
            negative_pooled_prompt_embeds=None if negative is None else negative.pooled.to(dtype),
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
            generator=seeded_generators(seeds), height=self.image_size, width=self.image_size, output_type="pil")
        return result.images

    def draw_captions(self, captions, seeds, guidance_scale, num_inference_steps, sampler, text_encoder, device):
        """Plain SDXL from caption texts (the SD baseline), its negative the empty prompt's (zeros, as
        SDXL's `force_zeros_for_empty_prompt`)."""
        sequence, negative, pooled, negative_pooled = self.pipeline(sampler, text_encoder).encode_prompt(
            captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance_scale > 1)
        return self.draw(Condition(sequence, pooled),
                         None if negative is None else Condition(negative, negative_pooled),
                         seeds, guidance_scale, num_inference_steps, sampler)


def load(cfg, device=None) -> SDXLDecoder:
    """SDXL's VAE and UNet (in the config's SD dtype; on the meta device: from their configs only),
    tokenizers and noise schedule from `sd_model`, its sizes checked against the config."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder, dtype = cfg.sd_model, to_dtype(cfg.dtypes.sd)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    if str(device) == "meta":
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        for part in (vae, unet):
            nn.Module.to(part, dtype)
        tokenizers = (None, None)
    else:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        tokenizers = tuple(CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2"))
    for frozen in (vae, unet):
        frozen.requires_grad_(False)
    check_sizes(cfg, vae, unet)
    return SDXLDecoder(vae, unet, tokenizers, scheduler, cfg.sd_image_size, cfg.mapper.num_prompt_tokens)


def check_sizes(cfg, vae, unet) -> None:
    """The mapper's width and length and the picture size must be the folder's (ValueError naming the key)."""
    from transformers import CLIPTextConfig

    diffusion.check_image_size(cfg, vae, unet.config.sample_size)
    if cfg.mapper.d_model != unet.config.cross_attention_dim:
        raise ValueError(f"{cfg.source}: `mapper.d_model` is {cfg.mapper.d_model} but the SDXL UNet in {cfg.sd_model} "
                         f"reads {unet.config.cross_attention_dim}-wide token states (both text encoders' widths)")
    tokens = CLIPTextConfig.from_pretrained(cfg.sd_model, subfolder="text_encoder").max_position_embeddings
    if cfg.mapper.num_prompt_tokens != tokens:
        raise ValueError(f"{cfg.source}: `mapper.num_prompt_tokens` must equal the SDXL text encoders' {tokens} tokens")


def load_text_encoder(cfg, device=None) -> nn.ModuleDict:
    """Both CLIP text encoders (CLIPTextModel, CLIPTextModelWithProjection), frozen, float32."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = nn.ModuleDict()
    for sub, cls in zip(TEXT_ENCODERS, (CLIPTextModel, CLIPTextModelWithProjection)):
        if str(device) == "meta":
            with torch.device("meta"):
                encoders[sub] = cls(CLIPTextConfig.from_pretrained(cfg.sd_model, subfolder=sub))
        else:
            encoders[sub] = cls.from_pretrained(cfg.sd_model, subfolder=sub, dtype=torch.float32)
    return encoders.requires_grad_(False).eval()


def write_tiny(out_dir: Path, arch: dict, cfg, seed: int, words=()) -> None:
    """A tiny SDXL folder in the real diffusers layout: VAE, UNet with the text-time embedding, two
    CLIP text encoders (the second with a projection: the pooled width) and tokenizers, SDXL-base's
    Euler scheduler config, model_index.json. Widths from `arch` (the two encoders' widths add up to
    the config's `mapper.d_model`)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from decoders.tiny import clip_text_config, tiny_vae, write_index, write_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = tiny_vae(arch["vae"], cfg.sd_image_size, latent_channels=4, scaling_factor=0.13025)
    unet_arch = arch["unet"]
    n = len(unet_arch["block_out_channels"])
    unet = UNet2DConditionModel(
        sample_size=cfg.sd_image_size // 2 ** (len(arch["vae"]["block_out_channels"]) - 1), in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=tuple(unet_arch["block_out_channels"]), layers_per_block=unet_arch["layers_per_block"],
        attention_head_dim=tuple(unet_arch["attention_head_dim"]), norm_num_groups=unet_arch["norm_num_groups"],
        cross_attention_dim=cfg.mapper.d_model, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=unet_arch["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=TIME_IDS * unet_arch["addition_time_embed_dim"]
        + arch["text_encoder_2"]["projection_dim"])
    for sub, cls in zip(TEXT_ENCODERS, (CLIPTextModel, CLIPTextModelWithProjection)):
        vocab = write_tokenizer(out_dir / sub.replace("text_encoder", "tokenizer"), words)
        cls(clip_text_config(arch[sub], vocab)).save_pretrained(out_dir / sub)
    # SDXL-base's scheduler/scheduler_config.json.
    EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                           prediction_type="epsilon").save_pretrained(out_dir / "scheduler")
    vae.save_pretrained(out_dir / "vae")
    unet.save_pretrained(out_dir / "unet")
    write_index(out_dir, "StableDiffusionXLPipeline", {
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "force_zeros_for_empty_prompt": True, "image_encoder": [None, None], "feature_extractor": [None, None]})
