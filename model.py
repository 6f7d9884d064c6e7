"""`MiniGPT5_Model`: the single LightningModule of MiniGPT-5 (REFERENCE §2-§3, §6).

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
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

import weights
from configuration import ModelConfig
from constants import (CAPTION_LOSS_WEIGHT, CFG_DROPOUT_PROB, IMAGE_LOSS_WEIGHT, SNR_GAMMA,
                       TEXT_LOSS_WEIGHT, VOKEN_COUNT)
from minigpt4 import MiniGPT4, _SplitRows, to_dtype

log = logging.getLogger(__name__)


class SDParts(nn.Module):
    """The frozen Stable Diffusion pieces MiniGPT-5 trains against (a plain container)."""

    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.vae, self.unet, self.text_encoder = vae, unet, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler


def load_sd_parts(cfg: ModelConfig, device: str | torch.device | None = None):
    """VAE, UNet, CLIP text encoder, tokenizer and scheduler from the diffusers folder `sd_model`.
    With `device="meta"` only the `config.json` files are read and nothing is allocated."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd, dtype = cfg.sd_model, to_dtype(cfg.dtypes.sd)
    scheduler = PNDMScheduler.from_pretrained(sd, subfolder="scheduler")
    if str(device) == "meta":
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd, subfolder="vae"))
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd, subfolder="unet"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(sd, subfolder="text_encoder"))
        tokenizer = None
    else:
        vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    return vae, unet, text_encoder, tokenizer, scheduler


class MiniGPT5_Model(pl.LightningModule):
    """MiniGPT-5 for training (stage 1 or 2), prediction and checkpoint I/O.

    Args:
        cfg: the model config (`configuration.load_config("config/tiny.yaml")`).
        stage: 1 (vokens + mapper on CC3M) or 2 (LoRA + mapper on VIST / MMDialog).
        stage1_weight: a stage-1 checkpoint to start from (any of the release's layouts).
        learning_rate, warmup_steps, adam_epsilon: optimiser settings (REFERENCE §6).
        snr_loss: min-SNR-5 weighting of the diffusion loss.
        cfg_dropout_prob: probability of replacing a voken's features by zeros (CFG training).
        device: "meta" builds without loading or allocating anything (for counting parameters).
    """

    def __init__(self, cfg: ModelConfig, stage: int = 1, stage1_weight: str | os.PathLike | None = None,
                 learning_rate: float = 2e-5, warmup_steps: int = 1000, adam_epsilon: float = 1e-8,
                 snr_loss: bool = True, cfg_dropout_prob: float = CFG_DROPOUT_PROB,
                 device: str | torch.device | None = None):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.save_hyperparameters({
            "model_config": cfg.source, "stage": stage, "learning_rate": learning_rate,
            "warmup_steps": warmup_steps, "adam_epsilon": adam_epsilon, "snr_loss": snr_loss,
        })
        self.cfg, self.stage = cfg, stage
        self.snr_loss, self.cfg_dropout_prob = snr_loss, cfg_dropout_prob
        meta = str(device) == "meta"

        self.model = MiniGPT4.from_config(cfg, device=device)
        vae, unet, text_encoder, sd_tokenizer, scheduler = load_sd_parts(cfg, device)
        self.vae, self.unet, self.sd_text_encoder = vae, unet, text_encoder
        self.sd_tokenizer, self.noise_scheduler = sd_tokenizer, scheduler
        self._check_sizes()
        for frozen in (self.vae, self.unet, self.sd_text_encoder):
            frozen.requires_grad_(False)

        m, llm_hidden = cfg.mapper, self.model.llama_model.config.hidden_size
        with torch.device("meta" if meta else "cpu"):
            self.fc = nn.Sequential(nn.Linear(llm_hidden, m.fc_dim), nn.GELU(), nn.Linear(m.fc_dim, m.d_model))
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
        log.info("MiniGPT5_Model stage %d: %s trainable parameters", stage, f"{self.num_trainable_parameters():,}")

    def _check_sizes(self) -> None:
        """The config's mapper / image sizes must agree with the SD folder."""
        cfg, unet = self.cfg, self.unet.config
        if cfg.mapper.d_model != unet.cross_attention_dim:
            raise ValueError(f"{cfg.source}: `mapper.d_model` is {cfg.mapper.d_model} but the UNet in "
                             f"{cfg.sd_model} has cross_attention_dim {unet.cross_attention_dim}")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if cfg.sd_image_size != unet.sample_size * factor:
            raise ValueError(f"{cfg.source}: `sd_image_size` is {cfg.sd_image_size} but {cfg.sd_model} "
                             f"makes {unet.sample_size * factor}-pixel images")
        if cfg.mapper.num_prompt_tokens != self.sd_text_encoder.config.max_position_embeddings:
            raise ValueError(f"{cfg.source}: `mapper.num_prompt_tokens` must equal the SD text encoder's "
                             f"{self.sd_text_encoder.config.max_position_embeddings} tokens")

    # ---- modes and parameters ----------------------------------------------------------------

    def train(self, mode: bool = True) -> "MiniGPT5_Model":
        """Frozen parts stay in eval mode whatever Lightning asks."""
        super().train(mode)
        for frozen in (self.vae, self.unet, self.sd_text_encoder):
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
        """Only the trainable parameters go into the `.ckpt` (REFERENCE §6)."""
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def load_checkpoint_file(self, path: str | os.PathLike) -> list[str]:
        """Load a MiniGPT-5 checkpoint (ours or the release's, stage 1 or 2) on top of the model.

        Keys are translated between the plain and the LoRA-wrapped LLM names; keys this model does
        not have are reported and ignored (as the release loaded non-strictly). Returns the
        trainable keys the file did not provide.
        """
        state = weights.translate_llm_keys(weights.read_checkpoint(path), lora=self.model.is_lora)
        result = self.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            log.warning("%s: %d keys this stage-%d model does not use: %s", path, len(result.unexpected_keys),
                        self.stage, sorted(result.unexpected_keys)[:10])
        missing = sorted(self.trainable_keys() - set(state))
        if missing:
            log.warning("%s: %d trainable keys not in the file (kept as initialised): %s", path, len(missing),
                        missing[:10])
        return missing

    # ---- forward -----------------------------------------------------------------------------

    def map_vokens(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 8, llm_hidden) voken features -> (N, num_prompt_tokens, d_model) SD conditioning."""
        src = self.fc(features.float())
        tgt = self.t2i_decoder_prompt.expand(features.shape[0], -1, -1)
        return self.llm_to_t2i_mapping(src=src, tgt=tgt)

    def encode_caption(self, captions: list[str]) -> torch.Tensor:
        """SD's own text conditioning for captions: (N, 77, d_model), no gradient."""
        tokens = self.sd_tokenizer(captions, padding="max_length", max_length=self.sd_tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.sd_text_encoder(tokens)[0].float()

    def image_embeddings(self, batch: dict) -> torch.Tensor | None:
        """Input images as LLM-space embeddings, from cached features when the batch has them."""
        if batch.get("input_image_features") is not None:
            return batch["input_image_features"].to(self.model.llm_dtype)
        images = batch.get("input_images")
        if images is None or images.shape[0] == 0:
            return None
        return self.model.encode_img(images)[0]

    def target_latents(self, batch: dict, index: torch.Tensor, latent_noise: torch.Tensor | None) -> torch.Tensor:
        """Scaled VAE latents of the target images of samples `index` (from cached moments or
        by encoding the images); the latent is sampled from the VAE's diagonal Gaussian."""
        if batch.get("output_image_features") is not None:
            moments = batch["output_image_features"][index].float()
        else:
            images = batch["output_images"][index].to(self.vae.dtype)
            with torch.no_grad():
                moments = self.vae.encode(images).latent_dist.parameters.float()
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn_like(mean) if latent_noise is None else latent_noise.to(mean)
        return (mean + std * eps) * self.vae.config.scaling_factor

    def diffusion_loss(self, latents: torch.Tensor, condition: torch.Tensor, noise: torch.Tensor | None,
                       timesteps: torch.Tensor | None) -> torch.Tensor:
        """Epsilon-prediction MSE of the frozen UNet given the mapped condition, min-SNR weighted."""
        scheduler = self.noise_scheduler
        n = latents.shape[0]
        noise = torch.randn_like(latents) if noise is None else noise.to(latents)
        if timesteps is None:
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=latents.device)
        timesteps = timesteps.long().to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy.to(self.unet.dtype), timesteps,
                         encoder_hidden_states=condition.to(self.unet.dtype)).sample
        mse = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_loss:
            alphas = scheduler.alphas_cumprod.to(latents.device)[timesteps]
            snr = alphas / (1 - alphas)
            mse = mse * torch.clamp(snr, max=SNR_GAMMA) / snr
        return mse.mean()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """All losses of one batch (see the module docstring). The batch is the collator's dict;
        optional per-sample keys `noise`, `latent_noise`, `timesteps`, `cfg_drop` pin the random
        draws (used by tests comparing runs)."""
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
            drop = torch.rand(sample.shape[0], device=sample.device) < self.cfg_dropout_prob
        features = features * (~drop).to(features.dtype)[:, None, None]
        condition = self.map_vokens(features)

        pick = (lambda key: None if batch.get(key) is None else batch[key][sample])
        latents = self.target_latents(batch, sample, pick("latent_noise"))
        losses["image_loss"] = self.diffusion_loss(latents, condition, pick("noise"), pick("timesteps"))
        total = TEXT_LOSS_WEIGHT * text_loss + IMAGE_LOSS_WEIGHT * losses["image_loss"]

        captions = batch.get("captions")
        if captions is not None and all(c is not None for c in captions):
            chosen = ["" if d else captions[i] for i, d in zip(sample.tolist(), drop.tolist())]
            losses["caption_loss"] = F.mse_loss(condition.float(), self.encode_caption(chosen))
            total = total + CAPTION_LOSS_WEIGHT * losses["caption_loss"]
        losses["loss"] = total
        return losses

    # ---- Lightning hooks ---------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step: log every loss term, return the total."""
        losses = self(batch)
        batch_size = batch["input_ids"].shape[0]
        for name, value in losses.items():
            self.log(f"train_{name}" if name == "loss" else name, value, prog_bar=name == "loss",
                     batch_size=batch_size, sync_dist=False)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Validation loss (`val_loss`, the checkpoint monitor)."""
        losses = self(batch)
        self.log("val_loss", losses["loss"], prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return losses["loss"]

    def configure_optimizers(self):
        """AdamW; stage 1 gives `fc`, the mapper and the prompt 10x the learning rate; linear warm-up
        then linear decay to zero, stepped every optimiser step (REFERENCE §6)."""
        from transformers import get_linear_schedule_with_warmup

        lr = self.hparams.learning_rate
        fast_ids = {id(p) for module in (self.fc, self.llm_to_t2i_mapping) for p in module.parameters()}
        fast_ids.add(id(self.t2i_decoder_prompt))
        trainable = [p for p in self.parameters() if p.requires_grad]
        fast = [p for p in trainable if id(p) in fast_ids]
        slow = [p for p in trainable if id(p) not in fast_ids]
        groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * 10 if self.stage == 1 else lr}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=self.hparams.adam_epsilon)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        scheduler = get_linear_schedule_with_warmup(optimizer, self.hparams.warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
