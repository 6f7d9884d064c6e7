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

import logging
import os
import warnings
import zlib

import pytorch_lightning as pl
import torch
from torch import nn

import checkpoints
import decoders
import diffusion
import generation
from configuration import ModelConfig
from constants import (CFG_DROPOUT_PROB, IMAGE_LOSS_WEIGHT, IMAGE_PLACEHOLDER, SNR_GAMMA,
                       TEXT_LOSS_WEIGHT)
from collator import row_captions, target_rows
from generation import GenerationOutput
from llm_families import DEFAULT_FAMILY
from minigpt4 import MiniGPT4
from placement import TakeTurns, place, resolve_device
from predictions import prediction_items
from resume import step_randomness, step_seed
from settings import PredictSettings, TrainSettings, hyperparameters, model_settings

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
            target) instead of recomputing it every step (`diffusion.CaptionCache`, at most
            `caption_cache_size` captions, None: no bound); off by default (the release recomputed
            it). The loss is the same either way, up to float rounding (see `encode_caption`).
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
        self.settings = model_settings(settings, stage, cfg.source, learning_rate=learning_rate,
                                       warmup_steps=warmup_steps, adam_epsilon=adam_epsilon, snr_loss=snr_loss,
                                       caption_loss_weight=caption_loss_weight)
        self.predict_settings = predict_settings or PredictSettings()
        self.save_hyperparameters(hyperparameters(self.settings, cfg.source))   # saved with every checkpoint
        self.cfg, self.stage = cfg, stage
        self.snr_loss, self.cfg_dropout_prob = self.settings.snr_loss, cfg_dropout_prob
        self.caption_loss_weight = self.settings.caption_loss_weight
        self.caption_cache = diffusion.CaptionCache(caption_cache_size) if cache_caption_features else None
        meta = str(device) == "meta"
        self._meta = meta
        self._offload: TakeTurns | None = None
        if offload and (device is None or meta):
            raise ValueError("offload needs a real device to offload from (e.g. device='cuda')")
        target = None if device is None or meta else resolve_device(device)

        # The decoder first (decoders/; its folder checked before any weights load, SD's float32 files made
        # bfloat16 while little else is in memory); its frozen parts are submodules under the release's names.
        for path in [stage1_weight] if stage1_weight is not None else []:
            checkpoints.check_pairing(cfg, path, "stage1_weight")   # another pairing's: before any load
        self.decoder = decoders.load_decoder(cfg, device)
        self.model = MiniGPT4.from_config(cfg, device="meta" if meta else target, llm_quantization=llm_quantization)
        for name, part in self.decoder.parts.items():
            setattr(self, name, part)
        self.sd_tokenizer, self.noise_scheduler = self.decoder.tokenizer, self.decoder.noise_scheduler
        self.fc, self.llm_to_t2i_mapping, self.t2i_decoder_prompt, pooled = feature_mapper(
            cfg.mapper, self.model.llama_model.config.hidden_size, "meta" if meta else "cpu", self.decoder.condition)
        if pooled is not None:                  # only for families with a pooled embedding (SDXL, SD3)
            self.t2i_pooled_mapping = pooled

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
        return checkpoints.from_weights(cls, model_config, stage1_weight, test_weight, device, **kwargs)

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
        self.decoder.offloaded = self._offload is not None
        self._device = device              # what LightningModule.to would record: where inputs go
        return self

    def _offloadable(self) -> list[nn.Module]:
        """The large parts used once per answer, which `place(offload=True)` keeps on the CPU."""
        return ([self.model.visual_encoder, self.model.Qformer, *reversed(self.decoder.parts.values())]
                + text_encoder_parts(self._modules.get("sd_text_encoder")))

    @property
    def sd_text_encoder(self) -> nn.Module:
        """The decoder's text encoder(s) (float32), needed only for the caption loss and the SD baseline:
        read from `sd_model` the first time it is used, then kept (a registered submodule, frozen,
        in eval mode, on this model's device or in its offload group)."""
        if self._modules.get("sd_text_encoder") is None:      # (add_module would consult this property)
            self._modules["sd_text_encoder"] = first_text_encoder(self)
        return self._modules["sd_text_encoder"]

    # ---- modes and parameters ----------------------------------------------------------------

    def train(self, mode: bool = True) -> "MiniGPT5_Model":
        """Frozen parts stay in eval mode whatever Lightning asks."""
        super().train(mode)
        for frozen in (*self.decoder.parts.values(), self._modules.get("sd_text_encoder")):
            if frozen is not None:
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
        if self.cfg.llm_family != DEFAULT_FAMILY:    # (the release's layout unchanged: no key means vicuna)
            checkpoint["llm_family"] = self.cfg.llm_family

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

    def map_condition(self, features: torch.Tensor) -> decoders.Condition:
        """`map_vokens` with the pooled embedding of the families that read one (`mapped_condition`)."""
        return mapped_condition(self, self.map_vokens(features))

    def encode_caption(self, captions: list[str]) -> "torch.Tensor | decoders.Condition":
        """The decoder's own text conditioning for captions (the caption loss's target; SD: (N, 77,
        d_model)), no gradient. With `cache_caption_features` each distinct caption is encoded once and
        kept (`diffusion.CaptionCache`; not saved in checkpoints; `clear_caption_cache()` empties it)."""
        encode = lambda texts: self.decoder.encode_captions(texts, self.sd_text_encoder, self.device)
        if self.caption_cache is None:
            return encode(captions)
        return decoders.encode_cached(self.caption_cache, captions, encode, self.decoder.condition).to(self.device)

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
            return self.decoder.latents(moments=batch["output_image_features"][index], latent_noise=latent_noise,
                                        generator=generator)
        return self.decoder.latents(images=batch["output_images"][index], latent_noise=latent_noise,
                                    generator=generator)

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
        # Each voken group draws its own target picture (collator.target_rows: the j-th group of an
        # item its j-th picture; one picture per item: the release's rule, row = item).
        keep, rows = target_rows(batch, sample)
        features, rows = features[keep], rows[keep]
        if features.shape[0] == 0:
            losses["loss"] = TEXT_LOSS_WEIGHT * text_loss
            return losses

        drop = cfg_dropout(batch, rows, generator, self.cfg_dropout_prob)
        features = features * (~drop).to(features.dtype)[:, None, None]
        condition = self.map_condition(features)

        pick = (lambda key: None if batch.get(key) is None else batch[key][rows])
        latents = self.target_latents(batch, rows, pick("latent_noise"), generator)
        # One LDM (and caption) term per picture, averaged over all of the batch's pictures.
        losses["image_loss"] = self.decoder.loss(latents, condition, pick("noise"), pick("timesteps"), generator,
                                                 snr_gamma=SNR_GAMMA if self.snr_loss else None)
        total = TEXT_LOSS_WEIGHT * text_loss + IMAGE_LOSS_WEIGHT * losses["image_loss"]

        captions = row_captions(batch, rows)
        if self.caption_loss_weight and captions is not None:
            chosen = ["" if d else caption for caption, d in zip(captions, drop.tolist())]
            losses["caption_loss"] = decoders.caption_mse(condition, self.encode_caption(chosen))
            total = total + self.caption_loss_weight * losses["caption_loss"]
        losses["loss"] = total
        return losses

    # ---- Lightning hooks ---------------------------------------------------------------------

    def step_seed(self, batch_idx: int) -> int:
        """The seed of one training micro-batch (`resume.step_seed`) from the run's `settings.seed`
        (`--seed`; `resume.ResumePoint` keeps it with each checkpoint)."""
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches) if self._trainer is not None else 0
        return step_seed(int(self.settings.seed), self.global_step, micro, self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step: log every loss term, return the total. Every random draw of the step (noise,
        timesteps, CFG dropout, LoRA dropout) comes from `resume.step_randomness` of this micro-batch's
        seed, so that a resumed run draws exactly what an uninterrupted one would."""
        if batch is None:                       # every sample of this batch was unreadable (logged)
            return None
        with step_randomness(self.step_seed(batch_idx), self.device) as generator:
            losses = self(batch, generator=generator)
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
        images = [list(x) for x in torch.split(batch["input_images"], [s.count(IMAGE_PLACEHOLDER) for s in sources])]
        seeds = [zlib.crc32(f"{opts.seed}:{task}".encode()) for task in batch["task_names"]]
        outs = self.generate(sources, images, seed=seeds, max_new_tokens=opts.max_new_tokens, top_k=opts.top_k,
                             guidance_scale=opts.guidance_scale, num_inference_steps=opts.num_inference_steps,
                             scheduler=opts.scheduler, decode=opts.decode, pictures=opts.pictures)
        baselines = [None] * len(sources)
        captions = batch.get("captions")
        if opts.sd_baseline and captions is not None and all(c is not None for c in captions):
            baselines = self.sd_baseline(list(captions), seeds, opts.guidance_scale, opts.num_inference_steps,
                                         opts.scheduler)
        return prediction_items(batch, outs, baselines, images)

    def planned_steps(self) -> int:
        """Length of the learning-rate schedule in optimiser steps: the settings' `planned_total_steps`
        when given (train_eval.py: planned epochs x steps per epoch, so that `--max_steps` only stops
        early and a resumed run follows the same schedule), else Lightning's estimate."""
        if self.settings.planned_total_steps:
            return self.settings.planned_total_steps
        return max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1

    def configure_optimizers(self):
        """The release's optimiser and schedule (`release_optimizer`)."""
        return release_optimizer(self, self.settings, self.planned_steps())

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: str | list[str], images: list | None = None, **options) -> list[GenerationOutput]:
        """Answer each prompt with text and, when the LLM emits vokens, an image: `generation.generate`
        over the backbone, `map_vokens` and the decoder (options: max_new_tokens, do_sample, temperature,
        top_k, top_p, repetition_penalty, force_generation, guidance_scale, num_inference_steps,
        scheduler, seed, generator, and the speed options decode and pictures of fast_inference.py)."""
        return generation.generate(self.model, self.map_condition, self.decoder, prompts, images, device=self.device,
                                   **options)

    def sd_pipeline(self, scheduler: str = "pndm", with_text_encoder: bool = False):
        """A diffusers `StableDiffusionPipeline` over this model's frozen SD parts (`decoder.pipeline`)."""
        return self.decoder.pipeline(scheduler, self.sd_text_encoder if with_text_encoder else None)

    @torch.no_grad()
    def sd_baseline(self, captions: list[str], seeds: list[int], guidance_scale: float = 7.5,
                    num_inference_steps: int = 50, scheduler: str = "pndm") -> list:
        """Plain Stable Diffusion from the caption text (the release's CC3M "SD baseline")."""
        return self.decoder.draw_captions(captions, seeds, guidance_scale, num_inference_steps, scheduler,
                                          self.sd_text_encoder, self.device)


# ---- the parts of the class above, written out on their own ------------------------------------

def feature_mapper(m, llm_hidden: int, device: str, condition: decoders.ConditionSpec | None = None
                   ) -> tuple[nn.Module, nn.Module, nn.Parameter, nn.Module | None]:
    """MiniGPT-5's trainable feature mapper under the release's names, on `device` ("meta" or "cpu"),
    random in this order: `fc` (llm_hidden -> fc_dim -> d_model), `llm_to_t2i_mapping` (an
    `nn.Transformer`, `src` = the mapped vokens) and `t2i_decoder_prompt` (its `tgt`, one row per
    token of the decoder's condition); `m` is the config's `mapper` section (its `d_model` and
    `num_prompt_tokens` checked against the decoder's `condition` when the decoder loaded). For a
    decoder that reads a pooled embedding, `t2i_pooled_mapping` (d_model -> pooled, over the mean of
    the mapped tokens), else None."""
    with torch.device(device):
        fc = nn.Sequential(nn.Linear(llm_hidden, m.fc_dim), nn.GELU(), nn.Linear(m.fc_dim, m.d_model))
        with warnings.catch_warnings():   # norm_first disables a fast path we do not need
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            mapping = nn.Transformer(
                d_model=m.d_model, nhead=m.nhead, num_encoder_layers=m.num_encoder_layers,
                num_decoder_layers=m.num_decoder_layers, dim_feedforward=m.dim_feedforward,
                dropout=0.0, batch_first=True, norm_first=True)
        prompt = nn.Parameter(torch.randn(1, m.num_prompt_tokens, m.d_model))
        pooled = None if condition is None or condition.pooled is None else nn.Linear(m.d_model, condition.pooled)
    return fc, mapping, prompt, pooled


def mapped_condition(model: MiniGPT5_Model, sequence: torch.Tensor) -> decoders.Condition:
    """The mapper's tokens as the decoder's condition: with the pooled embedding (`t2i_pooled_mapping`
    of the tokens' mean) when the decoder reads one."""
    pooled = model._modules.get("t2i_pooled_mapping")
    return decoders.Condition(sequence, None if pooled is None else pooled(sequence.mean(dim=1)))


def first_text_encoder(model: MiniGPT5_Model) -> nn.Module:
    """The decoder family's text encoder(s) read for their first use (`MiniGPT5_Model.sd_text_encoder`),
    put where the model runs: on its device, or into its offload group."""
    # First use may come inside Lightning's inference mode (validation, prediction): load ordinary
    # tensors, usable in training afterwards.
    with torch.inference_mode(False):
        encoder = decoders.get_family(model.cfg.decoder_family).load_text_encoder(
            model.cfg, "meta" if model._meta else None)
        if model._offload is not None:
            for part in text_encoder_parts(encoder):
                model._offload.add(part)
        elif not model._meta:
            encoder.to(model.device)
    return encoder


def text_encoder_parts(encoder: nn.Module | None) -> list[nn.Module]:
    """The modules of a decoder's text encoder(s) that run on their own (each of a `ModuleDict`)."""
    if encoder is None:
        return []
    return list(encoder.values()) if isinstance(encoder, nn.ModuleDict) else [encoder]


def cfg_dropout(batch: dict, sample: torch.Tensor, generator: torch.Generator | None, prob: float) -> torch.Tensor:
    """Which voken occurrences (of samples `sample`) lose their features for classifier-free guidance
    training: the batch's `cfg_drop` when given (tests pin it), else a draw from `generator` < `prob`."""
    if batch.get("cfg_drop") is not None:
        return batch["cfg_drop"].to(sample.device)[sample].bool()
    drop = torch.rand(sample.shape[0], generator=generator,
                      device=generator.device if generator is not None else sample.device)
    return drop.to(sample.device) < prob


def release_optimizer(model: MiniGPT5_Model, settings: TrainSettings, planned_steps: int) -> dict:
    """AdamW over the trainable parameters; stage 1 gives `fc`, the mapper and the prompt 10x the
    learning rate; linear warm-up then linear decay to zero over `planned_steps`, stepped every
    optimiser step, as the release."""
    from transformers import get_linear_schedule_with_warmup

    lr = settings.learning_rate
    mappers = (model.fc, model.llm_to_t2i_mapping, model._modules.get("t2i_pooled_mapping") or nn.Identity())
    fast_ids = {id(p) for module in mappers for p in module.parameters()}
    fast_ids.add(id(model.t2i_decoder_prompt))
    trainable = [p for p in model.parameters() if p.requires_grad]
    fast = [p for p in trainable if id(p) in fast_ids]
    slow = [p for p in trainable if id(p) not in fast_ids]
    groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * 10 if model.stage == 1 else lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=settings.adam_epsilon)
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, planned_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
