"""The `sd3` decoder family: Stable Diffusion 3 (an `SD3Transformer2DModel` trained by rectified flow,
reading a joint text sequence `joint_attention_dim` wide, 4096 in SD3-medium, and a pooled embedding,
2048: the two CLIP encoders' projections).

    training:  target image ─► VAE latent ((x - shift_factor) x scaling_factor, 16 channels)
               timestep from the density of `WEIGHTING` (diffusers' compute_density_for_timestep_sampling),
               its sigma from the folder's FlowMatchEulerDiscreteScheduler;
               noisy = (1 - sigma) x latent + sigma x noise ─► transformer(noisy, t, sequence, pooled)
               loss = compute_loss_weighting_for_sd3(sigma) x MSE(prediction, noise - latent)
    caption:   the pipeline's `encode_prompt`: the CLIP states (padded to the joint width) then the T5
               states (zeros when the folder has no `text_encoder_3`), and both CLIP projections pooled
    sampling:  diffusers' StableDiffusion3Pipeline with prompt_embeds / pooled_prompt_embeds and the
               mapped zero features as the negative (classifier-free guidance)

The condition's length is the config's `mapper.num_prompt_tokens`: 77 CLIP tokens + the T5 tokens
(`max_sequence_length` = num_prompt_tokens - 77; SD3's default 256 gives 333). The release's default
sampler name "pndm" draws with the folder's own flow-matching Euler sampler (PNDM has no
flow-matching form); "dpm++" is refused. `snr_gamma` (min-SNR, an epsilon / v-prediction weighting) does
not apply: the flow-matching loss is weighted by `WEIGHTING`'s scheme.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

import diffusion
from configuration import to_dtype
from decoders.base import Condition, check_pictures, ConditionSpec, as_condition, seeded_generators

log = logging.getLogger(__name__)

NAME = "sd3"
PIPELINES = ("StableDiffusion3Pipeline",)
POOLED = True
DENOISER = "transformer"
CLIP_TOKENS = 77
# diffusers' SD3 training examples' defaults (examples/dreambooth/train_dreambooth_sd3.py).
WEIGHTING = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}


def is_denoiser(config: dict) -> bool:
    return config.get("_class_name") == "SD3Transformer2DModel"


class SD3Decoder:
    """SD3's frozen parts as a decoder (see decoders/__init__.py for what a decoder offers)."""

    family = NAME
    fast_pictures = False           # draws eagerly (fast_inference.py wraps the sd family's UNet only)

    def __init__(self, vae, transformer, tokenizers, noise_scheduler, image_size: int, tokens: int):
        self.vae, self.transformer, self.tokenizers = vae, transformer, tokenizers
        self.noise_scheduler, self.tokenizer = noise_scheduler, tokenizers[0]
        self.image_size = image_size
        config = transformer.config
        self.condition = ConditionSpec(tokens=tokens, width=config.joint_attention_dim,
                                       pooled=config.pooled_projection_dim)
        self.offloaded = False

    @property
    def parts(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "transformer": self.transformer}

    def latents(self, images=None, moments=None, latent_noise=None, generator=None) -> torch.Tensor:
        """(sample - shift_factor) x scaling_factor, as SD3's pipeline and training scripts."""
        if moments is None:
            moments = diffusion.vae_moments(self.vae, images)
        config = self.vae.config
        return (diffusion.latents_from_moments(self.vae, moments, latent_noise, generator)
                - (config.shift_factor or 0.0) * config.scaling_factor)

    def sigmas(self, indices: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas shaped for latents of `ndim` dimensions) of training-step `indices`."""
        scheduler = self.noise_scheduler
        timesteps = scheduler.timesteps[indices.cpu()]
        sigmas = scheduler.sigmas[indices.cpu()].view((-1,) + (1,) * (ndim - 1))
        return timesteps, sigmas

    def loss(self, latents, condition, noise=None, timesteps=None, generator=None, snr_gamma=None) -> torch.Tensor:
        """The rectified-flow loss under the mapped condition. `timesteps`, when given, are training-step
        indices in [0, num_train_timesteps) (tests pin them), else drawn from `WEIGHTING`'s density."""
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        condition, dtype, n = as_condition(condition), self.transformer.dtype, latents.shape[0]
        noise = diffusion.randn(latents, generator) if noise is None else noise.to(latents)
        if timesteps is None:
            u = compute_density_for_timestep_sampling(batch_size=n, generator=generator, device=(
                generator.device if generator is not None else "cpu"), **WEIGHTING)
            timesteps = (u.cpu() * self.noise_scheduler.config.num_train_timesteps).long()
        t, sigmas = self.sigmas(timesteps.long(), latents.dim())
        t, sigmas = t.to(latents.device), sigmas.to(latents)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pred = self.transformer(hidden_states=noisy.to(dtype), timestep=t, encoder_hidden_states=condition.sequence.to(dtype),
                                pooled_projections=condition.pooled.to(dtype), return_dict=False)[0]
        weighting = compute_loss_weighting_for_sd3(WEIGHTING["weighting_scheme"], sigmas)
        per_sample = (weighting.float() * (pred.float() - (noise - latents).float()) ** 2).reshape(n, -1).mean(1)
        return per_sample.mean()

    def encode_captions(self, captions: list[str], text_encoder: nn.ModuleDict, device) -> Condition:
        """The pipeline's `encode_prompt` of captions (CLIP + T5 or its zeros, pooled CLIP), float32."""
        with torch.no_grad():
            sequence, _, pooled, _ = self.pipeline(text_encoder=text_encoder).encode_prompt(
                captions, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=self.condition.tokens - CLIP_TOKENS)
        return Condition(sequence.float(), pooled.float())

    def pipeline(self, sampler: str = "pndm", text_encoder: nn.ModuleDict | None = None):
        """diffusers' StableDiffusion3Pipeline over the parts (text encoders only when given)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        if sampler != "pndm":
            raise ValueError(f"scheduler {sampler!r} is not a flow-matching sampler; the sd3 decoder family samples "
                             f"with its folder's FlowMatchEulerDiscreteScheduler (--scheduler pndm, the default)")
        encoders = dict(text_encoder.items()) if text_encoder is not None else {}
        tokenizers = dict(zip(("tokenizer", "tokenizer_2", "tokenizer_3"), self.tokenizers))
        pipe = StableDiffusion3Pipeline(
            transformer=self.transformer, vae=self.vae,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            text_encoder=encoders.get("text_encoder"), text_encoder_2=encoders.get("text_encoder_2"),
            text_encoder_3=encoders.get("text_encoder_3"), **tokenizers)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def draw(self, cond, negative, seeds, guidance_scale, num_inference_steps, sampler="pndm", pictures="eager"):
        """N conditions (and their negatives) -> N PIL images, one seed each."""
        check_pictures(self, pictures)
        cond, dtype = as_condition(cond), self.transformer.dtype
        negative = None if negative is None else as_condition(negative)
        result = self.pipeline(sampler)(
            prompt_embeds=cond.sequence.to(dtype), pooled_prompt_embeds=cond.pooled.to(dtype),
            negative_prompt_embeds=None if negative is None else negative.sequence.to(dtype),
            negative_pooled_prompt_embeds=None if negative is None else negative.pooled.to(dtype),
            guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
            generator=seeded_generators(seeds), height=self.image_size, width=self.image_size, output_type="pil")
        return result.images

    def draw_captions(self, captions, seeds, guidance_scale, num_inference_steps, sampler, text_encoder, device):
        """Plain SD3 from caption texts (the SD baseline), against the empty prompt's encoding."""
        sequence, negative, pooled, negative_pooled = self.pipeline(sampler, text_encoder).encode_prompt(
            captions, None, None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance_scale > 1, max_sequence_length=self.condition.tokens - CLIP_TOKENS)
        return self.draw(Condition(sequence, pooled),
                         None if negative is None else Condition(negative, negative_pooled),
                         seeds, guidance_scale, num_inference_steps, sampler)


def has_t5(folder) -> bool:
    """Whether the SD3 folder (a local folder or a hub id in the cache) has its T5 encoder: what its
    model_index.json says of `text_encoder_3` (null: none, as diffusers allows)."""
    from diffusers import DiffusionPipeline

    entry = DiffusionPipeline.load_config(folder).get("text_encoder_3")
    return bool(entry) and entry[0] is not None


def text_encoder_folders(folder) -> tuple[str, ...]:
    """The folder's text encoders: text_encoder, text_encoder_2 and, when it has one, text_encoder_3 (T5)."""
    return ("text_encoder", "text_encoder_2") + (("text_encoder_3",) if has_t5(folder) else ())


def load(cfg, device=None) -> SD3Decoder:
    """SD3's VAE and transformer (in the config's SD dtype; on the meta device: from their configs
    only), tokenizers and flow-matching schedule from `sd_model`, its sizes checked against the config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTokenizer

    folder, dtype = cfg.sd_model, to_dtype(cfg.dtypes.sd)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    if str(device) == "meta":
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
            transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder, subfolder="transformer"))
        for part in (vae, transformer):
            nn.Module.to(part, dtype)
        tokenizers = (None, None, None)
    else:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)
        t5 = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_3") if has_t5(folder) else None
        tokenizers = tuple(CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2")) + (t5,)
    for frozen in (vae, transformer):
        frozen.requires_grad_(False)
    check_sizes(cfg, vae, transformer)
    log.info("%s: the sd3 image loss is rectified flow weighted by %s (min-SNR, --snr_loss, does not apply)",
             cfg.source, WEIGHTING["weighting_scheme"])
    return SD3Decoder(vae, transformer, tokenizers, scheduler, cfg.sd_image_size, cfg.mapper.num_prompt_tokens)


def check_sizes(cfg, vae, transformer) -> None:
    """The mapper's width and length and the picture size must fit the folder (ValueError naming the key)."""
    diffusion.check_image_size(cfg, vae, transformer.config.sample_size)
    if cfg.mapper.d_model != transformer.config.joint_attention_dim:
        raise ValueError(f"{cfg.source}: `mapper.d_model` is {cfg.mapper.d_model} but the SD3 transformer in "
                         f"{cfg.sd_model} reads {transformer.config.joint_attention_dim}-wide token states")
    if not CLIP_TOKENS < cfg.mapper.num_prompt_tokens <= CLIP_TOKENS + 512:
        raise ValueError(f"{cfg.source}: `mapper.num_prompt_tokens` is {cfg.mapper.num_prompt_tokens}; SD3 reads "
                         f"{CLIP_TOKENS} CLIP tokens + 1 to 512 T5 tokens (SD3-medium: 77 + 256 = 333)")


def load_text_encoder(cfg, device=None) -> nn.ModuleDict:
    """The two CLIP encoders with projections (and the T5 encoder when the folder has one), frozen, float32."""
    from transformers import AutoConfig, CLIPTextModelWithProjection, T5EncoderModel

    encoders = nn.ModuleDict()
    for sub in text_encoder_folders(cfg.sd_model):
        cls = T5EncoderModel if sub == "text_encoder_3" else CLIPTextModelWithProjection
        if str(device) == "meta":
            with torch.device("meta"):
                encoders[sub] = cls(AutoConfig.from_pretrained(cfg.sd_model, subfolder=sub))
        else:
            encoders[sub] = cls.from_pretrained(cfg.sd_model, subfolder=sub, dtype=torch.float32)
    return encoders.requires_grad_(False).eval()


def write_tiny(out_dir: Path, arch: dict, cfg, seed: int, words=()) -> None:
    """A tiny SD3 folder in the real diffusers layout: a 16-channel VAE with SD3's shift and scale, an
    SD3Transformer2DModel (joint width = the config's `mapper.d_model`), two CLIP encoders with
    projections (their projections add up to the pooled width), SD3's flow-matching scheduler config,
    model_index.json. No T5 (`text_encoder_3` null, as diffusers allows: its states are zeros)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from decoders.tiny import clip_text_config, tiny_vae, write_index, write_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = tiny_vae(arch["vae"], cfg.sd_image_size, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    t = arch["transformer"]
    latent = cfg.sd_image_size // 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    pooled = sum(arch[sub]["projection_dim"] for sub in ("text_encoder", "text_encoder_2"))
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=t["patch_size"], in_channels=16, out_channels=16, num_layers=t["num_layers"],
        attention_head_dim=t["attention_head_dim"], num_attention_heads=t["num_attention_heads"],
        joint_attention_dim=cfg.mapper.d_model, caption_projection_dim=t["attention_head_dim"] * t["num_attention_heads"],
        pooled_projection_dim=pooled, pos_embed_max_size=latent // t["patch_size"])
    for sub in ("text_encoder", "text_encoder_2"):
        vocab = write_tokenizer(out_dir / sub.replace("text_encoder", "tokenizer"), words)
        CLIPTextModelWithProjection(clip_text_config(arch[sub], vocab)).save_pretrained(out_dir / sub)
    # SD3-medium's scheduler/scheduler_config.json.
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(out_dir / "scheduler")
    vae.save_pretrained(out_dir / "vae")
    transformer.save_pretrained(out_dir / "transformer")
    write_index(out_dir, "StableDiffusion3Pipeline", {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": [None, None], "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]})
