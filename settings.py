"""Typed run settings: what `train_eval.py` read from its flags and environment variables, built
once when a command starts and handed to the model.

    flags + env vars ─► train_eval.train_settings / predict_settings ─► MiniGPT5_Model(settings=...,
                                                                        predict_settings=...)
                                                  ─► checkpoint["hyper_parameters"]["settings"]

`TrainSettings` goes whole into every checkpoint, as a plain dict (`to_dict`: str, int, float, bool,
None, lists and dicts only, so the weights-only checkpoint reader loads it), and `read_settings`
reads it back: a checkpoint says how it was made. The model configuration (sizes and weight paths)
is `configuration.ModelConfig`; this module holds what a run chooses.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from constants import CAPTION_LOSS_WEIGHT, SEED

# The environment variables this project reads when a command starts (recorded with the settings).
ENVIRONMENT_VARIABLES = ("IS_STAGE2", "WEIGHTFOLDER", "DATAFOLDER", "OUTPUT_FOLDER", "OUTPUT_SUFFIX", "CC3M_FOLDER",
                         "PREPROCESS_FEATURE_FOLDER")


def environment() -> dict[str, str]:
    """The values of `ENVIRONMENT_VARIABLES` that are set."""
    return {name: os.environ[name] for name in ENVIRONMENT_VARIABLES if name in os.environ}


class _Plain:
    """`to_dict` / `from_dict` for a settings dataclass."""

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain Python values (what a checkpoint stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Settings from `to_dict`'s output; keys this version does not know are left out, missing
        ones take their defaults (a checkpoint written by an older or newer version still reads)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class TrainSettings(_Plain):
    """How a model is trained. The defaults are the release's; `train_eval.py` fills every field
    from its flags (same names) and environment."""

    # the optimiser and the losses
    learning_rate: float = 2e-5
    warmup_steps: int = 1000
    adam_epsilon: float = 1e-8
    snr_loss: bool = True                    # min-SNR-5 weighting of the diffusion loss
    caption_loss_weight: float = CAPTION_LOSS_WEIGHT
    # length of the learning-rate schedule in optimiser steps (planned epochs x steps per epoch);
    # None: Lightning's estimate. `--max_steps` only stops early, so a resumed run keeps the schedule.
    planned_total_steps: int | None = None
    seed: int = SEED
    # the run, for the record
    stage: int = 1
    model_config: str | None = None
    dataset_type: str | None = None
    train_data_path: str | None = None
    val_data_path: str | None = None
    stage1_weight: str | None = None
    resume: str | None = None
    num_train_epochs: int = 2
    per_device_train_batch_size: int = 2
    real_batch_size: int = 48
    accumulate_grad_batches: int = 1
    world_size: int = 1                      # processes over all nodes
    num_nodes: int = 1
    max_steps: int = -1
    shuffle: bool = False
    strategy: str = "auto"
    precision: str | None = None
    environment: dict[str, str] = field(default_factory=dict)


def model_settings(settings: TrainSettings | None, stage: int, model_config: str, **given: Any) -> TrainSettings:
    """The settings a model is built with: `settings` (default: the release's), its stage, the values
    given to its constructor (None: not given) over them, and the model config when none is recorded."""
    settings = dataclasses.replace(settings or TrainSettings(), stage=stage,
                                   **{k: v for k, v in given.items() if v is not None})
    if settings.model_config is None:
        settings = dataclasses.replace(settings, model_config=model_config)
    return settings


def hyperparameters(settings: TrainSettings, model_config: str) -> dict[str, Any]:
    """A checkpoint's `hyper_parameters`: the flat keys of earlier versions, and the settings whole
    (`read_settings` reads them back)."""
    return {"model_config": model_config, "stage": settings.stage, "learning_rate": settings.learning_rate,
            "warmup_steps": settings.warmup_steps, "adam_epsilon": settings.adam_epsilon,
            "snr_loss": settings.snr_loss, "caption_loss_weight": settings.caption_loss_weight,
            "settings": settings.to_dict()}


@dataclass(frozen=True)
class PredictSettings(_Plain):
    """How `predict_step` generates (`train_eval.py --is_training False`'s flags)."""

    seed: int = SEED                         # each item's seed is crc32("{seed}:{task name}")
    max_new_tokens: int = 256
    top_k: int = 50
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str = "pndm"
    sd_baseline: bool = False                # also draw plain SD from the caption (CC3M)
    decode: str = "dynamic"                  # fast_inference.py: "static" / "compiled" (captured decode step)
    pictures: str = "eager"                  # fast_inference.py: "graph" / "compiled" (captured / compiled UNet)


def read_settings(checkpoint: dict) -> TrainSettings | None:
    """The `TrainSettings` a checkpoint (a loaded Lightning checkpoint dict) was trained with, or
    None for a checkpoint that does not record them (the release's, or one of ours from before)."""
    data = (checkpoint.get("hyper_parameters") or {}).get("settings")
    return TrainSettings.from_dict(data) if isinstance(data, dict) else None


# What a resumed run must share with its checkpoint, or it would not continue that run: the
# setting, and the flag or variable that sets it. Left out: what only says how the run is carried
# out (strategy, nodes, --max_steps, the file resumed, the environment, which the paths and stage
# already cover). The learning rate and the rest of the optimiser's settings matter twice: Lightning
# restores the optimiser's state from the checkpoint, so a resumed run that changes them must also
# apply them (`resume.OwnHyperParameters`).
RESUME_SETTINGS = {
    "stage": "IS_STAGE2", "dataset_type": "DATAFOLDER", "train_data_path": "--train_data_path",
    "val_data_path": "--val_data_path", "stage1_weight": "--stage1_weight", "model_config": "--model_config",
    "learning_rate": "--learning_rate", "warmup_steps": "--warmup_steps/--warmup_ratio",
    "adam_epsilon": "--adam_epsilon", "snr_loss": "--snr_loss", "caption_loss_weight": "--caption_loss_weight",
    "seed": "--seed", "num_train_epochs": "--num_train_epochs",
    "per_device_train_batch_size": "--per_device_train_batch_size", "real_batch_size": "--real_batch_size",
    "world_size": "--gpus x --num_nodes", "shuffle": "--shuffle", "precision": "--precision",
    # derived: reported only when none of their causes differs (e.g. the training file grew)
    "accumulate_grad_batches": "the gradient accumulation", "planned_total_steps": "the schedule's length",
}
# The derived settings and the settings they follow from.
DERIVED_SETTINGS = {
    "accumulate_grad_batches": ("real_batch_size", "per_device_train_batch_size", "world_size"),
    "planned_total_steps": ("train_data_path", "num_train_epochs", "per_device_train_batch_size", "world_size",
                            "real_batch_size"),
}
# Never changed on resume: a stage-1 checkpoint is not a stage-2 run's state (stage 2 starts from it
# through --stage1_weight).
FIXED_ON_RESUME = ("stage",)
_PATH_SETTINGS = ("train_data_path", "val_data_path", "stage1_weight", "model_config")


def _same(key: str, saved: Any, current: Any) -> bool:
    if key in _PATH_SETTINGS and saved is not None and current is not None:
        return saved == current or os.path.realpath(saved) == os.path.realpath(current)
    if isinstance(saved, float) or isinstance(current, float):
        return saved is not None and current is not None and math.isclose(saved, current, rel_tol=1e-12, abs_tol=0)
    return saved == current


def resume_differences(saved: TrainSettings, current: TrainSettings) -> dict[str, tuple[Any, Any]]:
    """The `RESUME_SETTINGS` in which a checkpoint's settings and a resumed run's differ:
    {setting: (checkpoint's value, this run's)}; a derived one only when none of its causes differs."""
    found = {key: (getattr(saved, key), getattr(current, key)) for key in RESUME_SETTINGS
             if not _same(key, getattr(saved, key), getattr(current, key))}
    for key, causes in DERIVED_SETTINGS.items():
        if key in found and any(cause in found for cause in causes):
            del found[key]
    return found


def describe_differences(found: dict[str, tuple[Any, Any]]) -> str:
    """`setting (flag): checkpoint X, this run Y; ...`"""
    return "; ".join(f"{key} ({RESUME_SETTINGS[key]}): checkpoint {old!r}, this run {new!r}"
                     for key, (old, new) in found.items())
