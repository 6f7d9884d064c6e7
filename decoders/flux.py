"""The `flux` decoder family: FLUX.1 (a `FluxTransformer2DModel` trained by rectified flow on packed 2 x 2
latent patches, reading T5 states `joint_attention_dim` wide, 4096, and CLIP's pooled embedding, 768).

    training:  target image ─► VAE latent ((x - shift_factor) x scaling_factor, 16 channels)
               sigma as the `sd3` family draws it (`decoders.sd3.WEIGHTING`); noisy = (1 - sigma) x latent
               + sigma x noise, packed into 2 x 2 patches with their position ids ─► transformer(noisy,
               sigma, T5 sequence, pooled, the embedded guidance when the model has one) ─► unpacked
               loss = weighting x MSE(prediction, noise - latent)
    caption:   the pipeline's `encode_prompt`: T5 states (`max_sequence_length` = `mapper.num_prompt_tokens`)
               and CLIP's pooled output
    sampling:  diffusers' FluxPipeline with prompt_embeds / pooled_prompt_embeds; classifier-free guidance
               is the release's (the mapped zero features as the negative, `true_cfg_scale` =
               guidance_scale), and a guidance-distilled model (FLUX.1-dev) also gets `EMBEDDED_GUIDANCE`

The release's default sampler name "pndm" draws with the folder's flow-matching Euler sampler; "dpm++"
is refused, as for `sd3`. Min-SNR (`snr_gamma`) does not apply.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import diffusion
from configuration import to_dtype
from decoders.base import Condition, check_pictures, as_condition, seeded_generators
from decoders.sd3 import WEIGHTING, SD3Decoder

NAME = "flux"
PIPELINES = ("FluxPipeline",)
POOLED = True
DENOISER = "transformer"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")         # CLIP (pooled), T5 (the sequence)
# The guidance a guidance-distilled FLUX (dev) reads as an input, in training and sampling (diffusers'
# FLUX training examples' and pipeline's default).
EMBEDDED_GUIDANCE = 3.5


def is_denoiser(config: dict) -> bool:
    return config.get("_class_name") == "FluxTransformer2DModel"


class FluxDecoder(SD3Decoder):
    """FLUX's frozen parts as a decoder: SD3's latents and flow-matching sigmas (`SD3Decoder`), FLUX's
    packing, conditioning and pipeline."""

    family = NAME

    def guidance(self, n: int, device) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full((n,), EMBEDDED_GUIDANCE, device=device, dtype=torch.float32)

    def loss(self, latents, condition, noise=None, timesteps=None, generator=None, snr_gamma=None) -> torch.Tensor:
        """The rectified-flow loss on packed latents under the mapped condition (`timesteps` as in `sd3`)."""
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        condition, dtype = as_condition(condition), self.transformer.dtype
        n, c, h, w = latents.shape
        noise = diffusion.randn(latents, generator) if noise is None else noise.to(latents)
        if timesteps is None:
            u = compute_density_for_timestep_sampling(batch_size=n, generator=generator, device=(
                generator.device if generator is not None else "cpu"), **WEIGHTING)
            timesteps = (u.cpu() * self.noise_scheduler.config.num_train_timesteps).long()
        t, sigmas = self.sigmas(timesteps.long(), latents.dim())
        t, sigmas = t.to(latents.device), sigmas.to(latents)
        noisy = FluxPipeline._pack_latents((1.0 - sigmas) * latents + sigmas * noise, n, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, latents.device, dtype)
        text_ids = torch.zeros(condition.sequence.shape[1], 3, device=latents.device, dtype=dtype)
        pred = self.transformer(hidden_states=noisy.to(dtype), timestep=t / 1000, guidance=self.guidance(n, latents.device),
                                pooled_projections=condition.pooled.to(dtype),
                                encoder_hidden_states=condition.sequence.to(dtype), txt_ids=text_ids, img_ids=image_ids,
                                return_dict=False)[0]
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        pred = FluxPipeline._unpack_latents(pred, h * factor, w * factor, factor)
        weighting = compute_loss_weighting_for_sd3(WEIGHTING["weighting_scheme"], sigmas)
        per_sample = (weighting.float() * (pred.float() - (noise - latents).float()) ** 2).reshape(n, -1).mean(1)
        return per_sample.mean()

    def encode_captions(self, captions: list[str], text_encoder: nn.ModuleDict, device) -> Condition:
        """The pipeline's `encode_prompt` of captions (T5 states, CLIP pooled), float32."""
        with torch.no_grad():
            sequence, pooled, _ = self.pipeline(text_encoder=text_encoder).encode_prompt(
                captions, None, device=device, num_images_per_prompt=1, max_sequence_length=self.condition.tokens)
        return Condition(sequence.float(), pooled.float())

    def pipeline(self, sampler: str = "pndm", text_encoder: nn.ModuleDict | None = None):
        """diffusers' FluxPipeline over the parts (text encoders only when given)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        if sampler != "pndm":
            raise ValueError(f"scheduler {sampler!r} is not a flow-matching sampler; the flux decoder family samples "
                             f"with its folder's FlowMatchEulerDiscreteScheduler (--scheduler pndm, the default)")
        encoders = dict(text_encoder.items()) if text_encoder is not None else {}
        pipe = FluxPipeline(
            transformer=self.transformer, vae=self.vae,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            text_encoder=encoders.get("text_encoder"), text_encoder_2=encoders.get("text_encoder_2"),
            tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def draw(self, cond, negative, seeds, guidance_scale, num_inference_steps, sampler="pndm", pictures="eager"):
        """N conditions (and their negatives: true classifier-free guidance at `guidance_scale`) -> N images."""
        check_pictures(self, pictures)
        cond, dtype = as_condition(cond), self.transformer.dtype
        negative = None if negative is None else as_condition(negative)
        result = self.pipeline(sampler)(
            prompt_embeds=cond.sequence.to(dtype), pooled_prompt_embeds=cond.pooled.to(dtype),
            negative_prompt_embeds=None if negative is None else negative.sequence.to(dtype),
            negative_pooled_prompt_embeds=None if negative is None else negative.pooled.to(dtype),
            true_cfg_scale=guidance_scale if negative is not None else 1.0, guidance_scale=EMBEDDED_GUIDANCE,
            num_inference_steps=num_inference_steps, generator=seeded_generators(seeds), height=self.image_size,
            width=self.image_size, max_sequence_length=self.condition.tokens, output_type="pil")
        return result.images

    def draw_captions(self, captions, seeds, guidance_scale, num_inference_steps, sampler, text_encoder, device):
        """Plain FLUX from caption texts (the SD baseline), against the empty prompt's encoding."""
        cond = self.encode_captions(captions, text_encoder, device)
        negative = self.encode_captions([""] * len(captions), text_encoder, device) if guidance_scale > 1 else None
        return self.draw(cond, negative, seeds, guidance_scale, num_inference_steps, sampler)


def load(cfg, device=None) -> FluxDecoder:
    """FLUX's VAE and transformer (in the config's SD dtype; on the meta device: from their configs
    only), tokenizers and flow-matching schedule from `sd_model`, its sizes checked against the config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTokenizer

    folder, dtype = cfg.sd_model, to_dtype(cfg.dtypes.sd)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    if str(device) == "meta":
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
            transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder, subfolder="transformer"))
        for part in (vae, transformer):
            nn.Module.to(part, dtype)
        tokenizers = (None, None)
    else:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
        tokenizers = (CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                      AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
    for frozen in (vae, transformer):
        frozen.requires_grad_(False)
    check_sizes(cfg, vae, transformer)
    return FluxDecoder(vae, transformer, tokenizers, scheduler, cfg.sd_image_size, cfg.mapper.num_prompt_tokens)


def check_sizes(cfg, vae, transformer) -> None:
    """The mapper's width and length and the picture size must fit the folder (ValueError naming the key)."""
    step = 2 ** (len(vae.config.block_out_channels) - 1) * 2            # the VAE's scale x the 2 x 2 packing
    if cfg.sd_image_size % step:
        raise ValueError(f"{cfg.source}: `sd_image_size` is {cfg.sd_image_size}; FLUX in {cfg.sd_model} needs a "
                         f"multiple of {step}")
    if cfg.mapper.d_model != transformer.config.joint_attention_dim:
        raise ValueError(f"{cfg.source}: `mapper.d_model` is {cfg.mapper.d_model} but the FLUX transformer in "
                         f"{cfg.sd_model} reads {transformer.config.joint_attention_dim}-wide T5 states")
    if not 1 <= cfg.mapper.num_prompt_tokens <= 512:
        raise ValueError(f"{cfg.source}: `mapper.num_prompt_tokens` is {cfg.mapper.num_prompt_tokens}; FLUX reads "
                         f"1 to 512 T5 tokens (FLUX.1-dev: 512)")


def load_text_encoder(cfg, device=None) -> nn.ModuleDict:
    """CLIP (its pooled output) and T5 (the sequence), frozen, float32."""
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    encoders = nn.ModuleDict()
    for sub, cls in zip(TEXT_ENCODERS, (CLIPTextModel, T5EncoderModel)):
        if str(device) == "meta":
            with torch.device("meta"):
                encoders[sub] = cls(AutoConfig.from_pretrained(cfg.sd_model, subfolder=sub))
        else:
            encoders[sub] = cls.from_pretrained(cfg.sd_model, subfolder=sub, dtype=torch.float32)
    return encoders.requires_grad_(False).eval()


def write_tiny(out_dir: Path, arch: dict, cfg, seed: int, words=()) -> None:
    """A tiny FLUX folder in the real diffusers layout: a 16-channel VAE with FLUX's shift and scale, a
    FluxTransformer2DModel (T5 width = the config's `mapper.d_model`, pooled = CLIP's width, guidance
    embedded as FLUX.1-dev), CLIP and a tiny T5 encoder with a sentencepiece T5 tokenizer trained
    offline, FLUX.1-dev's scheduler config, model_index.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from decoders.tiny import clip_text_config, tiny_vae, write_index, write_t5_tokenizer, write_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = tiny_vae(arch["vae"], cfg.sd_image_size, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    t = arch["transformer"]
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=t["num_layers"], num_single_layers=t["num_single_layers"],
        attention_head_dim=t["attention_head_dim"], num_attention_heads=t["num_attention_heads"],
        joint_attention_dim=cfg.mapper.d_model, pooled_projection_dim=arch["text_encoder"]["hidden_size"],
        guidance_embeds=True, axes_dims_rope=tuple(t["axes_dims_rope"]))
    vocab = write_tokenizer(out_dir / "tokenizer", words)
    CLIPTextModel(clip_text_config(arch["text_encoder"], vocab)).save_pretrained(out_dir / "text_encoder")
    t5 = arch["text_encoder_2"]
    t5_vocab = write_t5_tokenizer(out_dir / "tokenizer_2", t5["vocab_size"])
    T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=cfg.mapper.d_model, d_kv=t5["d_kv"], d_ff=t5["d_ff"],
                            num_layers=t5["num_layers"], num_heads=t5["num_heads"], feed_forward_proj="gated-gelu",
                            dense_act_fn="gelu_new", is_gated_act=True)).save_pretrained(out_dir / "text_encoder_2")
    # FLUX.1-dev's scheduler/scheduler_config.json.
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                    max_shift=1.15, base_image_seq_len=256,
                                    max_image_seq_len=4096).save_pretrained(out_dir / "scheduler")
    vae.save_pretrained(out_dir / "vae")
    transformer.save_pretrained(out_dir / "transformer")
    write_index(out_dir, "FluxPipeline", {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]})
