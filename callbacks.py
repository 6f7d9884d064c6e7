"""The Lightning callbacks of a run besides `resume.ResumePoint` and `resume.OwnHyperParameters`:

    LastCheckpoint     `<name>-last.ckpt`: the latest state after every validation, epoch end and stop
    FinalCheckpoint    one checkpoint under `--model_save_name` when a run ended before any was kept
    SampleGeneration   every N optimiser steps a picture and its text under OUTPUT_FOLDER/samples
    PredictionWriter   a prediction run's files: task folders (figures.py), `predictions-{rank}.pt`
                       and the manifest `predictions.json` (predictions.py)
"""
from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint

import predictions
from constants import IMAGE_PLACEHOLDER
from figures import save_task_folder, to_pil
from image_transforms import clip_to_unit_range

class LastCheckpoint(Callback):
    """`<name>-last.ckpt`: the run's latest state, whatever `val_loss` did -- written after every
    validation, at the end of every epoch and when training stops (once per optimiser step)."""

    def __init__(self, path: Path):
        self.path, self.saved_step, self.start_step = path, None, None

    def save(self, trainer) -> None:
        if trainer.sanity_checking or trainer.global_step in (self.saved_step, self.start_step):
            return                              # already saved at this step, or nothing trained yet
        trainer.save_checkpoint(self.path, weights_only=False)   # with optimiser state: resumable
        self.saved_step = trainer.global_step

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_validation_end(self, trainer, pl_module):
        self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)


class FinalCheckpoint(Callback):
    """When a run ends before any checkpoint was kept (e.g. `--max_steps` stops it before the first
    validation), save one under `--model_save_name` anyway."""

    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint = checkpoint

    def on_train_end(self, trainer, pl_module):
        if self.checkpoint.best_model_path or trainer.global_step == 0:
            return
        metrics = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
        path = self.checkpoint.format_checkpoint_name(metrics)
        trainer.save_checkpoint(path, weights_only=False)
        self.checkpoint.best_model_path = path


class SampleGeneration(Callback):
    """Every N optimiser steps, generate from the first prompt of the current batch and save the
    picture with its text under `out_dir` (rank 0 only)."""

    def __init__(self, every_n_steps: int, out_dir: Path, num_inference_steps: int):
        self.every_n_steps, self.out_dir, self.num_inference_steps = every_n_steps, out_dir, num_inference_steps
        self.last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if batch is None or step == 0 or step % self.every_n_steps or step == self.last_step:
            return
        self.last_step = step
        if not trainer.is_global_zero:
            return
        n_images = batch["sources"][0].count(IMAGE_PLACEHOLDER)
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.generate(batch["sources"][:1], [list(batch["input_images"][:n_images])], seed=step,
                                 max_new_tokens=64, num_inference_steps=self.num_inference_steps)[0]
        pl_module.train(was_training)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"step_{step:07d}.txt").write_text(f"{batch['sources'][0]}\n---\n{out.text}\n")
        for j, picture in enumerate(out.images or ([out.image] if out.image is not None else [])):
            picture.save(self.out_dir / (f"step_{step:07d}.png" if j == 0 else f"step_{step:07d}_{j + 1}.png"))


class PredictionWriter(BasePredictionWriter):
    """Per batch, writes the task folders of the items `predict_step` generated; at the end,
    `predictions-{rank}.pt` with one list per item (the release's layout), and on rank 0 the
    folder's manifest `predictions.json` listing every rank's file and item count (`manifest`
    holds the rest: checkpoints, dataset, settings), which metric.py checks."""

    def __init__(self, out_dir: Path, manifest: dict | None = None):
        super().__init__(write_interval="batch")
        self.out_dir, self.records, self.manifest = out_dir, [], manifest or {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for item in prediction:
            gt = item["expected_image"]
            save_task_folder(self.out_dir / item["task_name"], item["image"], item["text"], item["baseline"],
                             to_pil(predictions.to_unit_range(gt)) if gt is not None else None,
                             [to_pil(x) for x in clip_to_unit_range(item["input_images"])],
                             item.get("more_images", []),
                             [to_pil(predictions.to_unit_range(x)) for x in item.get("more_expected_images", [])],
                             pl_module.cfg.end_sym)
            self.records.append(predictions.PredictionRecord.from_item(item))

    def on_predict_epoch_end(self, trainer, pl_module):
        predictions.save(self.records, self.out_dir / predictions.file_name(trainer.global_rank))
        # Every rank's count (also the barrier after which every rank's file is there).
        counts = trainer.strategy.all_gather(torch.tensor([len(self.records)])).reshape(-1).tolist()
        if trainer.is_global_zero:
            predictions.write_manifest(self.out_dir, counts, **self.manifest)
