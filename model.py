"""`MiniGPT5_Model`: the single LightningModule of MiniGPT-5 (docs/architecture.md maps the modules).

    batch ─► MiniGPT4 (minigpt4.py): encode input images, wrap them into the text, run the LLM
          ─► text_loss, last-layer hidden states
          ─► 8 voken states per [IMG0] ─► fc ─► llm_to_t2i_mapping(tgt=t2i_decoder_prompt)
          ─► (N, 77, 1024) conditioning ─► frozen SD UNet denoising loss (min-SNR)  = image_loss
                                         ─► MSE to SD's own caption encoding       = caption_loss
    loss = 0.01 * text_loss + image_loss + 0.1 * caption_loss

Stage 1 trains `fc`, the mapper, the prompt and the 9 new token rows; stage 2 wraps the LLM with
LoRA and trains LoRA, the new rows and the mapper. Everything else is frozen and in eval mode.
Checkpoints hold only the trainable tensors, under the release's key names.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
import zlib
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import checkpoints
import diffusion
import generation
import weights
from checkpoints import CheckpointMismatchError
from configuration import ModelConfig
from constants import find_weight
from constants import (CFG_DROPOUT_PROB, IMAGE_LOSS_WEIGHT, IMAGE_PLACEHOLDER, SNR_GAMMA,
                       TEXT_LOSS_WEIGHT)
from generation import GenerationOutput
from minigpt4 import MiniGPT4
from placement import TakeTurns, place, resolve_device
from settings import PredictSettings, TrainSettings

log = logging.getLogger(__name__)


class MiniGPT5_Model(pl.LightningModule):
    """MiniGPT-5 for training (stage 1 or 2), prediction and checkpoint I/O.

    Args:
        cfg: the model config (`configuration.load_config("config/tiny.yaml")`).
        stage: 1 (vokens + mapper on CC3M) or 2 (LoRA + mapper on VIST / MMDialog).
        stage1_weight: a stage-1 checkpoint to start from (any of the release's layouts).
        learning_rate, warmup_steps, adam_epsilon, snr_loss, caption_loss_weight: training settings
            (`settings.TrainSettings`, the release's defaults); given here, they replace those of
            `settings`. `caption_loss_weight` 0 turns the caption loss off (the paper's ablation)
            and skips the SD text encoder in training.
        settings: the run's `TrainSettings` (train_eval.py builds them from its flags), saved whole
            with every checkpoint under `hyper_parameters["settings"]`.
        predict_settings: how `predict_step` generates (`settings.PredictSettings`).
        cfg_dropout_prob: probability of replacing a voken's features by zeros (CFG training).
        device: "meta" builds without loading or allocating anything (for counting parameters);
            a real device ("cuda", "cpu") loads the LLM straight onto it and puts the whole model
            there (`place`); None builds on the CPU and leaves the placing to the caller (Lightning).
        llm_quantization: "8bit" or "4bit" loads the LLM's linear layers quantised with
            bitsandbytes (an optional extra; see `minigpt4.llm_quantization_config`).
        offload: with a real `device`, keep the image encoder and SD's parts on the CPU between
            uses (see `place`).
        cache_caption_features: keep SD's text-encoder output of each caption (the caption-loss
            target) instead of recomputing it every step; off by default (the release recomputed
            it). The frozen text encoder is deterministic, so the loss is the same either way (up
            to float rounding of differently sized batches). See `encode_caption`.
        caption_cache_size: most captions kept (least recently used dropped first); None = no
            bound. An entry is num_prompt_tokens x d_model float32 values in CPU memory: 77 x 1024
            x 4 B = 315 KB at real sizes, so the default 4096 entries take up to 1.3 GB.
    """

    def __init__(self, cfg: ModelConfig, stage: int = 1, stage1_weight: str | os.PathLike | None = None,
                 learning_rate: float | None = None, warmup_steps: int | None = None,
                 adam_epsilon: float | None = None, snr_loss: bool | None = None,
                 caption_loss_weight: float | None = None, cfg_dropout_prob: float = CFG_DROPOUT_PROB,
                 device: str | torch.device | None = None, cache_caption_features: bool = False,
                 caption_cache_size: int | None = 4096, llm_quantization: str | None = None, offload: bool = False,
                 settings: TrainSettings | None = None, predict_settings: PredictSettings | None = None):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        given = {"learning_rate": learning_rate, "warmup_steps": warmup_steps, "adam_epsilon": adam_epsilon,
                 "snr_loss": snr_loss, "caption_loss_weight": caption_loss_weight}
        settings = dataclasses.replace(settings or TrainSettings(), stage=stage,
                                       **{k: v for k, v in given.items() if v is not None})
        if settings.model_config is None:
            settings = dataclasses.replace(settings, model_config=cfg.source)
        self.settings = settings
        self.predict_settings = predict_settings or PredictSettings()
        # Saved whole with every checkpoint (`settings.read_settings`); the flat keys as before.
        self.save_hyperparameters({
            "model_config": cfg.source, "stage": stage, "learning_rate": settings.learning_rate,
            "warmup_steps": settings.warmup_steps, "adam_epsilon": settings.adam_epsilon,
            "snr_loss": settings.snr_loss, "caption_loss_weight": settings.caption_loss_weight,
            "settings": settings.to_dict(),
        })
        self.cfg, self.stage = cfg, stage
        self.snr_loss, self.cfg_dropout_prob = settings.snr_loss, cfg_dropout_prob
        self.caption_loss_weight = settings.caption_loss_weight
        self.caption_cache = diffusion.CaptionCache(caption_cache_size) if cache_caption_features else None
        meta = str(device) == "meta"
        self._meta = meta
        self._offload: TakeTurns | None = None
        if offload and (device is None or meta):
            raise ValueError("offload needs a real device to offload from (e.g. device='cuda')")
        target = None if device is None or meta else resolve_device(device)

        # SD first: its float32 files are converted to bfloat16 while little else is in memory yet.
        vae, unet, sd_text_config, sd_tokenizer, scheduler = diffusion.load_parts(cfg, device)
        diffusion.check_sizes(cfg, vae, unet, sd_text_config)
        self.model = MiniGPT4.from_config(cfg, device="meta" if meta else target, llm_quantization=llm_quantization)
        self.vae, self.unet = vae, unet
        self.sd_tokenizer, self.noise_scheduler = sd_tokenizer, scheduler

        m, llm_hidden = cfg.mapper, self.model.llama_model.config.hidden_size
        with torch.device("meta" if meta else "cpu"):
            self.fc = nn.Sequential(nn.Linear(llm_hidden, m.fc_dim), nn.GELU(), nn.Linear(m.fc_dim, m.d_model))
            with warnings.catch_warnings():   # norm_first disables a fast path we do not need
                warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
                self.llm_to_t2i_mapping = nn.Transformer(
                    d_model=m.d_model, nhead=m.nhead, num_encoder_layers=m.num_encoder_layers,
                    num_decoder_layers=m.num_decoder_layers, dim_feedforward=m.dim_feedforward,
                    dropout=0.0, batch_first=True, norm_first=True)
            self.t2i_decoder_prompt = nn.Parameter(torch.randn(1, m.num_prompt_tokens, m.d_model))

        if stage == 2:
            self.model.add_lora()
            self.fc.requires_grad_(False)
            self.t2i_decoder_prompt.requires_grad_(False)
        if stage1_weight is not None:
            self.load_checkpoint_file(stage1_weight)
        # Lightning restores our partial checkpoints into the full model.
        self.strict_loading = False
        if target is not None:
            self.place(target, offload=offload)
        log.info("MiniGPT5_Model stage %d: %s trainable parameters", stage, f"{self.num_trainable_parameters():,}")

    @classmethod
    def from_weights(cls, model_config: str | os.PathLike | None = None,
                     stage1_weight: str | os.PathLike | None = None,
                     test_weight: str | os.PathLike | None = None, device: str | torch.device | None = None,
                     **kwargs) -> "MiniGPT5_Model":
        """A model ready to generate, as the release's demo loads it: the config (default: the tiny
        preset, built on first use), then `stage1_weight`, then `test_weight` on top. The stage is
        2 when `test_weight` holds LoRA weights; a stage-2 `test_weight` needs `stage1_weight` (its
        `fc` and `t2i_decoder_prompt` live there only). Checkpoint paths may be relative to WEIGHTFOLDER.
        `device` (default: the GPU when present, else the CPU) is where it runs; `llm_quantization`
        and `offload` (keyword arguments of the constructor) fit it on smaller GPUs."""
        from configuration import load_config

        if not model_config:
            from presets import ensure_tiny

            model_config = ensure_tiny()
        config_path = Path(model_config)
        cfg = load_config(config_path)
        paths = [find_weight(p, flag) for p, flag in ((stage1_weight, "--stage1_weight"),
                                                      (test_weight, "--test_weight")) if p]
        stage = 2 if test_weight and weights.checkpoint_stage(paths[-1]) == 2 else 1
        if stage == 2 and not stage1_weight:
            raise CheckpointMismatchError(
                f"test_weight {str(test_weight)!r} is a stage-2 checkpoint: it has no `fc` / `t2i_decoder_prompt`, "
                f"which come from the stage-1 checkpoint; give stage1_weight (--stage1_weight), e.g. stage1_cc3m.ckpt")
        model = cls(cfg, stage=stage, device=resolve_device(device), **kwargs)
        model.load_checkpoint_files(paths)
        return model.eval()

    # ---- placement: device, CPU offload, lazily loaded parts --------------------------------------

    def place(self, device: str | torch.device | None = None, offload: bool = False) -> "MiniGPT5_Model":
        """Put the model on `device` (default: the GPU when present) for generation.

        Plain: every part moves there (a quantised LLM was loaded there already and stays). With
        `offload`, the image encoder (ViT, Q-Former) and SD's UNet, VAE and text encoder stay on the
        CPU and take turns on the device: accelerate hooks move each to the device when it runs and
        send the one that ran before back (`TakeTurns`), so the device holds the LLM, the mapper and
        one of those parts at a time, at the cost of copying each over once per use.
        """
        device = resolve_device(device)
        if self._offload is not None:
            self._offload.remove()
            self._offload = None
        self._offload = place(self, device, self._offloadable() if offload else [])
        self._device = device              # what LightningModule.to would record: where inputs go
        return self

    def _offloadable(self) -> list[nn.Module]:
        """The large parts used once per answer, which `place(offload=True)` keeps on the CPU."""
        parts = [self.model.visual_encoder, self.model.Qformer, self.unet, self.vae]
        if "sd_text_encoder" in self._modules:
            parts.append(self._modules["sd_text_encoder"])
        return parts

    @property
    def sd_text_encoder(self) -> nn.Module:
        """SD's CLIP text encoder (float32), needed only for the caption loss and the SD baseline:
        read from `sd_model` the first time it is used, then kept (a registered submodule, frozen,
        in eval mode, on this model's device or in its offload group)."""
        encoder = self._modules.get("sd_text_encoder")
        if encoder is None:
            # First use may come inside Lightning's inference mode (validation, prediction): load
            # ordinary tensors, usable in training afterwards.
            with torch.inference_mode(False):
                encoder = diffusion.load_text_encoder(self.cfg, "meta" if self._meta else None)
                if self._offload is not None:
                    self._offload.add(encoder)
                elif not self._meta:
                    encoder.to(self.device)
            self._modules["sd_text_encoder"] = encoder      # (add_module would consult this property)
        return encoder

    def _frozen_sd_modules(self) -> list[nn.Module]:
        """VAE, UNet and (when loaded) the SD text encoder."""
        return [self.vae, self.unet] + ([self._modules["sd_text_encoder"]] if "sd_text_encoder" in self._modules else [])

    # ---- modes and parameters ----------------------------------------------------------------

    def train(self, mode: bool = True) -> "MiniGPT5_Model":
        """Frozen parts stay in eval mode whatever Lightning asks."""
        super().train(mode)
        for frozen in self._frozen_sd_modules():
            frozen.eval()
        self.model.train(mode)
        return self

    def num_trainable_parameters(self) -> int:
        """Number of parameter values that receive gradients."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_keys(self) -> set[str]:
        """State-dict keys of the trainable tensors (a split embedding counts as its `weight`)."""
        keys = set()
        for name, param in self.named_parameters():
            if param.requires_grad:
                keys.add(name.replace(".new_weight", ".weight"))
        return keys

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the trainable tensors under the release's key names."""
        keep = self.trainable_keys()
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k in keep}

    # ---- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Only the trainable parameters go into the `.ckpt`, under the release's key names."""
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def load_checkpoint_files(self, paths: list[str | os.PathLike]) -> list[str]:
        """Load checkpoints in order, each on top of the last (`checkpoints.load_checkpoint_files`)."""
        return checkpoints.load_checkpoint_files(self, paths)

    def load_checkpoint_file(self, path: str | os.PathLike, warn_missing: bool = True) -> list[str]:
        """Load a MiniGPT-5 checkpoint, ours or the release's (`checkpoints.load_checkpoint_file`)."""
        return checkpoints.load_checkpoint_file(self, path, warn_missing)

    # ---- forward -----------------------------------------------------------------------------

    def map_vokens(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 8, llm_hidden) voken features -> (N, num_prompt_tokens, d_model) SD conditioning."""
        src = self.fc(features.float())
        tgt = self.t2i_decoder_prompt.expand(features.shape[0], -1, -1)
        return self.llm_to_t2i_mapping(src=src, tgt=tgt)

    def encode_caption(self, captions: list[str]) -> torch.Tensor:
        """SD's own text conditioning for captions (the caption loss's target): (N, 77, d_model), no
        gradient. With `cache_caption_features` each distinct caption is encoded once and kept
        (`diffusion.CaptionCache`; not saved in checkpoints; `clear_caption_cache()` empties it)."""
        encode = lambda texts: diffusion.encode_captions(self.sd_tokenizer, self.sd_text_encoder, texts, self.device)
        if self.caption_cache is None:
            return encode(captions)
        return self.caption_cache(captions, encode).to(self.device)

    def clear_caption_cache(self) -> None:
        """Forget every cached caption feature (see `encode_caption`)."""
        if self.caption_cache is not None:
            self.caption_cache.clear()

    def image_embeddings(self, batch: dict) -> torch.Tensor | None:
        """Input images as LLM-space embeddings, from cached features when the batch has them."""
        if batch.get("input_image_features") is not None:
            return batch["input_image_features"].to(self.model.llm_dtype)
        images = batch.get("input_images")
        if images is None or images.shape[0] == 0:
            return None
        return self.model.encode_img(images)[0]

    def target_latents(self, batch: dict, index: torch.Tensor, latent_noise: torch.Tensor | None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of the target images of samples `index`, sampled from the VAE's
        diagonal Gaussian: from the batch's cached moments, or by encoding its images."""
        if batch.get("output_image_features") is not None:
            moments = batch["output_image_features"][index]
        else:
            moments = diffusion.vae_moments(self.vae, batch["output_images"][index])
        return diffusion.latents_from_moments(self.vae, moments, latent_noise, generator)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """All losses of one batch (see the module docstring). The batch is the collator's dict.

        Random draws (CFG dropout, latent sampling, noise, timesteps) come from `generator` (torch's
        global RNG when None); optional per-sample batch keys `noise`, `latent_noise`, `timesteps`,
        `cfg_drop` pin them instead (used by tests comparing runs)."""
        m = self.model
        embeds, mask, labels = m.wrap_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             self.image_embeddings(batch))
        hidden, _, text_loss = m.forward_llm(embeds, mask, labels)
        losses = {"text_loss": text_loss}
        features, sample = m.voken_features(hidden, labels)
        has_target = batch.get("has_output_image")
        if has_target is not None:
            keep = has_target.to(sample.device)[sample]
            features, sample = features[keep], sample[keep]
        if features.shape[0] == 0:
            losses["loss"] = TEXT_LOSS_WEIGHT * text_loss
            return losses

        if batch.get("cfg_drop") is not None:
            drop = batch["cfg_drop"].to(sample.device)[sample].bool()
        else:
            drop = torch.rand(sample.shape[0], generator=generator,
                              device=generator.device if generator is not None else sample.device)
            drop = drop.to(sample.device) < self.cfg_dropout_prob
        features = features * (~drop).to(features.dtype)[:, None, None]
        condition = self.map_vokens(features)

        pick = (lambda key: None if batch.get(key) is None else batch[key][sample])
        latents = self.target_latents(batch, sample, pick("latent_noise"), generator)
        losses["image_loss"] = diffusion.denoising_loss(self.unet, self.noise_scheduler, latents, condition,
                                                         pick("noise"), pick("timesteps"), generator,
                                                         snr_gamma=SNR_GAMMA if self.snr_loss else None)
        total = TEXT_LOSS_WEIGHT * text_loss + IMAGE_LOSS_WEIGHT * losses["image_loss"]

        captions = batch.get("captions")
        if self.caption_loss_weight and captions is not None and all(c is not None for c in captions):
            chosen = ["" if d else captions[i] for i, d in zip(sample.tolist(), drop.tolist())]
            losses["caption_loss"] = F.mse_loss(condition.float(), self.encode_caption(chosen))
            total = total + self.caption_loss_weight * losses["caption_loss"]
        losses["loss"] = total
        return losses

    # ---- Lightning hooks ---------------------------------------------------------------------

    def step_seed(self, batch_idx: int) -> int:
        """The seed of one training micro-batch, a function of (seed, optimiser step, micro-batch
        within the step, rank) only, so that a resumed run draws exactly what an uninterrupted one
        would. The seed is the run's `settings.seed` (`--seed`; `resume.ResumePoint` keeps it with
        each checkpoint)."""
        seed = int(self.settings.seed)
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches) if self._trainer is not None else 0
        key = ((seed * 1_000_003 + self.global_step) * 1_009 + micro) * 1_009 + self.global_rank
        return key % (2**63 - 1)

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """The random stream of the model's own draws in one training micro-batch (`step_seed`)."""
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        return torch.Generator(device=device).manual_seed(self.step_seed(batch_idx))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step: log every loss term, return the total.

        Every random draw of the step is a function of (seed, optimiser step, micro-batch, rank):
        the model's own draws (noise, timesteps, CFG dropout) come from `step_generator`, and the
        ones drawn from torch's global RNG inside the modules (LoRA dropout in stage 2) from that
        RNG seeded from the same key for this micro-batch only (`fork_rng` restores it after), so
        that a resumed run draws exactly what an uninterrupted one would."""
        if batch is None:                       # every sample of this batch was unreadable (logged)
            return None
        # A second stream for the modules, distinct from the generator's (same key, other constant).
        module_seed = (self.step_seed(batch_idx) * 6_364_136_223_846_793_005 + 1) % (2**63 - 1)
        cuda = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(module_seed)
            if cuda:
                torch.cuda.manual_seed(module_seed)
            losses = self(batch, generator=self.step_generator(batch_idx))
        batch_size = batch["input_ids"].shape[0]
        for name, value in losses.items():
            self.log(f"train_{name}" if name == "loss" else name, value, prog_bar=name == "loss",
                     batch_size=batch_size, sync_dist=False)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Validation losses, with fixed random draws per batch: `val_loss` (the checkpoint monitor)
        and each term (`val_text_loss`, `val_image_loss`, `val_caption_loss`), as the release logged."""
        if batch is None:
            return None
        generator = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(batch_idx)
        losses = self(batch, generator=generator)
        batch_size = batch["input_ids"].shape[0]
        for name, value in losses.items():
            self.log(f"val_{name}", value, prog_bar=name == "loss", batch_size=batch_size, sync_dist=True)
        return losses["loss"]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Generate for every prompt of a collated test batch: one dict per item with
        source, generated text and image, expected text and image, the SD baseline (CC3M) and the
        input images. Each item's seed comes from its task name, so results do not depend on the
        batch size or the process that ran it."""
        if batch is None:
            return []
        opts = self.predict_settings
        sources = batch["sources"]
        counts = [s.count(IMAGE_PLACEHOLDER) for s in sources]
        images = [list(x) for x in torch.split(batch["input_images"], counts)]
        seeds = [zlib.crc32(f"{opts.seed}:{task}".encode()) for task in batch["task_names"]]
        outs = self.generate(sources, images, seed=seeds, max_new_tokens=opts.max_new_tokens, top_k=opts.top_k,
                             guidance_scale=opts.guidance_scale, num_inference_steps=opts.num_inference_steps,
                             scheduler=opts.scheduler, decode=opts.decode, pictures=opts.pictures)
        baselines = [None] * len(sources)
        captions = batch.get("captions")
        if opts.sd_baseline and captions is not None and all(c is not None for c in captions):
            baselines = self.sd_baseline(list(captions), seeds, opts.guidance_scale, opts.num_inference_steps,
                                         opts.scheduler)
        items = []
        for i, out in enumerate(outs):
            has_target = bool(batch["has_output_image"][i])
            items.append({"source": sources[i], "text": out.text, "target": batch["targets"][i], "image": out.image,
                          "baseline": baselines[i], "task_name": batch["task_names"][i],
                          "expected_image": batch["output_images"][i].cpu() if has_target else None,
                          "input_images": images[i]})
        return items

    def planned_steps(self) -> int:
        """Length of the learning-rate schedule in optimiser steps: the settings' `planned_total_steps`
        when given (train_eval.py: planned epochs x steps per epoch, so that `--max_steps` only stops
        early and a resumed run follows the same schedule), else Lightning's estimate."""
        if self.settings.planned_total_steps:
            return self.settings.planned_total_steps
        return max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1

    def configure_optimizers(self):
        """AdamW; stage 1 gives `fc`, the mapper and the prompt 10x the learning rate; linear warm-up
        then linear decay to zero, stepped every optimiser step, as the release."""
        from transformers import get_linear_schedule_with_warmup

        lr = self.settings.learning_rate
        fast_ids = {id(p) for module in (self.fc, self.llm_to_t2i_mapping) for p in module.parameters()}
        fast_ids.add(id(self.t2i_decoder_prompt))
        trainable = [p for p in self.parameters() if p.requires_grad]
        fast = [p for p in trainable if id(p) in fast_ids]
        slow = [p for p in trainable if id(p) not in fast_ids]
        groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * 10 if self.stage == 1 else lr}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=self.settings.adam_epsilon)
        scheduler = get_linear_schedule_with_warmup(optimizer, self.settings.warmup_steps, self.planned_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: str | list[str], images: list | None = None, **options) -> list[GenerationOutput]:
        """Answer each prompt with text and, when the LLM emits vokens, an image: `generation.generate`
        (options: max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
        force_generation, guidance_scale, num_inference_steps, scheduler, seed, generator, and the
        speed options decode and pictures of fast_inference.py)."""
        return generation.generate(self, prompts, images, **options)

    def sd_pipeline(self, scheduler: str = "pndm", with_text_encoder: bool = False):
        """A diffusers `StableDiffusionPipeline` over this model's frozen SD parts (`diffusion.pipeline`)."""
        return diffusion.pipeline(self.vae, self.unet, self.sd_tokenizer, self.noise_scheduler, scheduler,
                                  self.sd_text_encoder if with_text_encoder else None)

    @torch.no_grad()
    def sd_baseline(self, captions: list[str], seeds: list[int], guidance_scale: float = 7.5,
                    num_inference_steps: int = 50, scheduler: str = "pndm") -> list:
        """Plain Stable Diffusion from the caption text (the release's CC3M "SD baseline")."""
        cond, negative = diffusion.text_conditions(self.sd_pipeline(scheduler, with_text_encoder=True), captions,
                                                   self.device, guidance_scale)
        return diffusion.draw(self.sd_pipeline(scheduler), cond, negative, seeds, guidance_scale, num_inference_steps,
                              self.cfg.sd_image_size)
