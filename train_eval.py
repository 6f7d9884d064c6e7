"""Train MiniGPT-5 (stage 1 or 2) or predict with it, through a Lightning `Trainer`.

The release's command lines work as written, e.g.

    # stage 1 on CC3M
    IS_STAGE2=False WEIGHTFOLDER=weights DATAFOLDER=datasets/CC3M python train_eval.py --is_training True \\
        --train_data_path cc3m_train.tsv --val_data_path cc3m_val.tsv \\
        --model_save_name stage1_cc3m_{epoch}-{step} --gpus 0,1,2,3
    # stage 2 on VIST, from the stage-1 checkpoint
    IS_STAGE2=True WEIGHTFOLDER=weights DATAFOLDER=datasets/VIST python train_eval.py --is_training True \\
        --train_data_path train_cleaned.json --val_data_path val_cleaned.json \\
        --stage1_weight stage1_cc3m.ckpt --model_save_name stage2_vist_{epoch}-{step}
    # prediction (the default; OUTPUT_FOLDER/stage2_vist/predictions-{rank}.pt)
    IS_STAGE2=True WEIGHTFOLDER=weights DATAFOLDER=datasets/VIST OUTPUT_FOLDER=outputs python train_eval.py \\
        --test_data_path val_cleaned.json --test_weight stage2_vist.ckpt --stage1_weight stage1_cc3m.ckpt

plus `--model_config` (default config/minigpt4.yaml; config/tiny.yaml for the tiny preset),
`--accelerator`, `--num_nodes` (several machines, launched by torchrun or SLURM's srun: see the README),
`--strategy` (ddp, fsdp, deepspeed_stage_2), `--precision`, `--max_steps`, `--shuffle`, `--logger` and a
few more. `--train_data_path` may name CC3M WebDataset shards (shards.py) instead of the TSV.
Every flag and every path given by a flag or an environment variable is checked before any model
is loaded.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

import constants
import placement
import predictions
import run_files
from callbacks import FinalCheckpoint, LastCheckpoint, PredictionWriter, SampleGeneration
from dataset_specs import KNOWN as KNOWN_DATASETS
from dataset_specs import dataset_of_data, spec
from resume import OwnHyperParameters, ResumePoint, eval_loader, training_loader
from settings import (FIXED_ON_RESUME, RESUME_SETTINGS, PredictSettings, TrainSettings, describe_differences,
                      environment, read_settings, resume_differences)
from strategies import STRATEGIES, STRATEGY_HELP, RunCheckpointIO, check_strategy, make_strategy

log = logging.getLogger("train_eval")
REPO = Path(__file__).resolve().parent


def str2bool(value: str | bool) -> bool:
    """The release's boolean flags, by the project's one spelling rule (`constants.parse_bool`)."""
    try:
        return constants.parse_bool(value, "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {constants.BOOLEAN_SPELLINGS}, got {value!r}") from None


def device_ids(value: str) -> str:
    """`--gpus`: device ids such as 0 or 0,1,2,3 (kept as given; `devices_of` reads them)."""
    ids = [x.strip() for x in value.split(",") if x.strip() != ""]
    if not ids or not all(x.isdigit() for x in ids) or len(set(map(int, ids))) != len(ids):
        raise argparse.ArgumentTypeError(f"expected device ids such as 0 or 0,1,2,3 (distinct, 0 or more), "
                                         f"got {value!r}")
    return value


DEFAULT_WARMUP_STEPS = 1000
COMPATIBILITY_ONLY = "accepted for compatibility with the release's command lines; no effect here"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The release's flags (same names and defaults) and ours."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # --- the release's flags -----------------------------------------------------------------
    p.add_argument("--is_training", type=str2bool, nargs="?", const=True, default=False,
                   help="train (True; a bare --is_training means True) or predict (False, the default)")
    p.add_argument("--train_data_path", default=None,
                   help="relative to DATAFOLDER; for stage 1 also CC3M WebDataset shards (img2dataset's .tar files): "
                        "'shards/{00000..00331}.tar', a glob or a folder, streamed and split over nodes and workers")
    p.add_argument("--val_data_path", default=None, help="relative to DATAFOLDER")
    p.add_argument("--test_data_path", default=None, help="relative to DATAFOLDER")
    p.add_argument("--test_weight", default=None, help="checkpoint to predict with (relative to WEIGHTFOLDER ok)")
    p.add_argument("--stage1_weight", default=None,
                   help="stage-1 checkpoint (relative to WEIGHTFOLDER ok); required in stage 2, which starts from it")
    p.add_argument("--model_save_name", default="model_{epoch}-{step}",
                   help="checkpoint name pattern (Lightning's {epoch}, {step}); the rolling last checkpoint is "
                        "<name without its {...} fields>-last.ckpt, e.g. stage1_cc3m-last.ckpt")
    p.add_argument("--output_dir", default=None, help="where checkpoints and logs go (default: WEIGHTFOLDER)")
    p.add_argument("--save_total_limit", type=int, default=1,
                   help="how many checkpoints to keep, the best by val_loss (-1: all); the -last one comes on top")
    p.add_argument("--gpus", default=None, type=device_ids,
                   help="device ids, e.g. 0 or 0,1,2,3 (default: every visible GPU -- the release's default was "
                        "0,1,2,3; on a CPU: one process, and --gpus 0,1 runs two (DDP over gloo))")
    p.add_argument("--num_train_epochs", type=int, default=2)
    p.add_argument("--per_device_train_batch_size", type=int, default=2)
    p.add_argument("--per_device_eval_batch_size", type=int, default=2)
    p.add_argument("--real_batch_size", type=int, default=48, help="global batch (gradient accumulation)")
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--warmup_steps", type=int, default=None,
                   help=f"linear warm-up in optimiser steps (default {DEFAULT_WARMUP_STEPS})")
    p.add_argument("--warmup_ratio", type=float, default=None,
                   help="warm-up as a fraction of the planned optimiser steps, instead of --warmup_steps (the "
                        "release accepted it, default 0.03, but its schedule used --warmup_steps only, as ours "
                        "does unless this flag is given)")
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--num_workers", type=int, default=16,
                   help="data-loading processes per device (capped to this machine's CPUs, with a note in the log)")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume training from; 'last': this run's own "
                        "<output_dir>/<model_save_name without {...}>-last.ckpt. Its settings must be this run's "
                        "(stage, data, learning rate, seed, batch sizes, ...; see --resume_allow_changes)")
    p.add_argument("--snr_loss", type=str2bool, default=True)
    p.add_argument("--caption_loss_weight", type=float, default=constants.CAPTION_LOSS_WEIGHT,
                   help="weight of stage 1's caption loss (release: 0.1; 0 turns it off, the paper's ablation)")
    p.add_argument("--cache_dir", default=None, help=f"{COMPATIBILITY_ONLY} (nothing is ever downloaded)")
    p.add_argument("--model_type", default="multimodal_encoder", choices=["multimodal_encoder"],
                   help=f"{COMPATIBILITY_ONLY} (the release's only model type)")
    # --- ours --------------------------------------------------------------------------------
    p.add_argument("--model_config", default=str(REPO / "config" / "minigpt4.yaml"))
    p.add_argument("--accelerator", default="auto", choices=["auto", "gpu", "cpu"])
    p.add_argument("--num_nodes", type=int, default=1,
                   help="machines in the run (each with --gpus devices); launch one process per device on every node "
                        "with torchrun or SLURM's srun, which Lightning detects (see the README)")
    p.add_argument("--strategy", default="auto", choices=list(STRATEGIES), help=STRATEGY_HELP)
    p.add_argument("--precision", default=None,
                   help=f"default {placement.default_precision('gpu')} on GPU, {placement.default_precision('cpu')} on CPU")
    p.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimiser steps")
    p.add_argument("--shuffle", action="store_true",
                   help="shuffle the training samples every epoch (seeded; shards: the shard order, then a 1000-sample "
                        "buffer per worker); default: file order, as the release")
    p.add_argument("--logger", default="csv", choices=["csv", "tensorboard", "wandb"])
    p.add_argument("--val_check_interval", type=float, default=None,
                   help="fraction of an epoch between validations (default 0.25 for CC3M, else 0.5)")
    p.add_argument("--save_every_n_steps", type=int, default=0,
                   help="also keep a checkpoint every N optimiser steps (the latest one), for resuming")
    p.add_argument("--sample_every_n_steps", type=int, default=0,
                   help="save a sample generation (image + text) every N optimiser steps (0: never)")
    p.add_argument("--seed", type=int, default=constants.SEED)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (Lightning's Trainer(deterministic=True)): the same "
                        "machine, threads and seed give the same bytes; some GPU operations get slower")
    p.add_argument("--resume_allow_changes", default=None, metavar="SETTING,...",
                   help="resume although these settings differ from the checkpoint's ('all' for any but the "
                        "stage): this run's values are used and recorded. Settings: "
                        + ", ".join(k for k in RESUME_SETTINGS if k not in FIXED_ON_RESUME))
    p.add_argument("--overwrite", action="store_true",
                   help="training: replace the checkpoints an earlier run left under the same --model_save_name "
                        "in --output_dir (default: this run takes <name>-v1, -v2, ... and says so); prediction: "
                        "replace the earlier predictions in the prediction folder (default: refused)")
    p.add_argument("--dataset", default=None, choices=KNOWN_DATASETS,
                   help="default: the release's rule on DATAFOLDER / the data path; interleaved: docs/own_data.md")
    p.add_argument("--strict", action="store_true", help="stop at the first bad data row instead of skipping it")
    p.add_argument("--allow_outside_paths", action="store_true",
                   help="accept dataset image paths that leave the dataset folder (refused and counted by default)")
    # prediction
    p.add_argument("--predict_batch_size", type=int, default=1, help="prompts per generate call (release: 1)")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens (0: off; default "
                   "50, the release's: its transformers' default)")
    p.add_argument("--scheduler", default="pndm", choices=["pndm", "dpm++"])
    p.add_argument("--decode", default="dynamic", choices=["dynamic", "static", "compiled"],
                   help="dynamic: transformers' generate (the release's path); static / compiled: a static KV cache "
                        "and a decode step captured in a CUDA graph (compiled: torch.compile too); see fast_inference.py")
    p.add_argument("--pictures", default="eager", choices=["eager", "graph", "compiled"],
                   help="eager: the release's SD pipeline; graph / compiled: the UNet channels-last from a CUDA graph, "
                        "or compiled (same pictures up to bf16 rounding); see fast_inference.py")
    return p.parse_args(argv)


def check_numbers(args: argparse.Namespace) -> None:
    """Numeric flags that would make a run fail late or do nothing: exit naming the flag."""
    def bad(flag: str, value, expected: str) -> SystemExit:
        return SystemExit(f"error: {flag} {value}: {expected}")

    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "real_batch_size", "num_train_epochs",
                "predict_batch_size", "num_inference_steps", "max_new_tokens", "num_nodes"]
    for name in positive:
        if getattr(args, name) < 1:
            raise bad(f"--{name}", getattr(args, name), "must be a positive integer")
    for name in ("num_workers", "warmup_steps", "save_every_n_steps", "sample_every_n_steps"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise bad(f"--{name}", value, "must be 0 or more")
    for name in ("learning_rate", "adam_epsilon", "guidance_scale", "warmup_ratio", "val_check_interval",
                 "caption_loss_weight"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise bad(f"--{name}", value, "must be a finite number")
    if args.learning_rate < 0:
        raise bad("--learning_rate", args.learning_rate, "must be 0 or more")
    if args.caption_loss_weight < 0:
        raise bad("--caption_loss_weight", args.caption_loss_weight, "must be 0 or more")
    if args.adam_epsilon <= 0:
        raise bad("--adam_epsilon", args.adam_epsilon, "must be positive")
    if args.warmup_ratio is not None:
        if not 0 <= args.warmup_ratio < 1:
            raise bad("--warmup_ratio", args.warmup_ratio, "must be in [0, 1)")
        if args.warmup_steps is not None:
            raise SystemExit("error: give --warmup_ratio or --warmup_steps, not both")
    if args.val_check_interval is not None and not 0 < args.val_check_interval <= 1:
        raise bad("--val_check_interval", args.val_check_interval, "must be a fraction of an epoch in (0, 1]")
    if args.save_total_limit == 0 or args.save_total_limit < -1:
        raise bad("--save_total_limit", args.save_total_limit, "must be a positive number of checkpoints, or -1 "
                  "for all")
    if args.max_steps == 0 or args.max_steps < -1:
        raise bad("--max_steps", args.max_steps, "give a positive number of optimiser steps, or -1 for no limit")
    if args.resume_allow_changes is not None:
        allowed = allowed_changes(args)
        unknown = sorted(allowed - set(RESUME_SETTINGS) - {"all"})
        if unknown or allowed & set(FIXED_ON_RESUME):
            raise bad("--resume_allow_changes", args.resume_allow_changes,
                      f"{'unknown setting ' + ', '.join(unknown) if unknown else 'the stage cannot change on resume'}"
                      f"; give some of: all, {', '.join(k for k in RESUME_SETTINGS if k not in FIXED_ON_RESUME)}")


def allowed_changes(args: argparse.Namespace) -> set[str]:
    """The settings `--resume_allow_changes` names ({"all"} for all)."""
    return {x.strip() for x in (args.resume_allow_changes or "").split(",") if x.strip()}


def cap_workers(requested: int) -> int:
    """`--num_workers`, at most the CPUs this process may use (the release's default 16 assumed a
    big machine); the log says when it was cut."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:                        # not on Linux
        available = os.cpu_count() or 1
    if requested > available:
        log.info("--num_workers %d capped to %d, the CPUs this machine gives this process", requested, available)
        return available
    return requested


# ----------------------------------------------------------------------------------------------
# Paths: everything is checked before a model is built
# ----------------------------------------------------------------------------------------------

def data_path(flag: str, value: str | None, required: bool, shards_ok: bool = False) -> Path | str | None:
    """A dataset file under DATAFOLDER or as given (`constants.find_data`). CC3M WebDataset shards
    (`--train_data_path` only) stay a spec string, checked to name existing shards."""
    import shards

    if value is None:
        if required:
            raise SystemExit(f"error: {flag} is required for this run")
        return None
    if shards.is_shard_spec(value):
        if not shards_ok:
            raise SystemExit(f"error: {flag} {value!r}: WebDataset shards are read for training only "
                             f"(--train_data_path); give the TSV here")
        try:
            shards.resolve_shards(value)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {flag} {value!r}: {e} (DATAFOLDER={str(constants.data_folder())!r})") from None
        return value
    try:
        return constants.find_data(value, flag)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def weight_path(flag: str, value: str | None) -> Path | None:
    """A checkpoint under WEIGHTFOLDER or as given (`constants.find_weight`)."""
    if value is None:
        return None
    try:
        return constants.find_weight(value, flag)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def output_dir(args: argparse.Namespace) -> Path:
    """`--output_dir`: where checkpoints and logs go (default WEIGHTFOLDER, as the release). The one
    rule for this run's own files: what it writes and what `--resume last` reads (a relative
    `--output_dir` is relative to the working directory, never looked up under WEIGHTFOLDER)."""
    return Path(args.output_dir) if args.output_dir else constants.weight_folder()


def output_dir_flag(args: argparse.Namespace) -> str:
    """What sets `output_dir`, for messages."""
    return "--output_dir" if args.output_dir else "WEIGHTFOLDER"


def check_inputs(args: argparse.Namespace) -> dict:
    """Check every flag and path of this run; exit with a message naming the flag or variable.
    Nothing here loads a model."""
    import checkpoints
    import weights
    from configuration import ConfigError, load_config

    check_numbers(args)
    try:
        stage = 2 if constants.is_stage2() else 1
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        cfg = load_config(args.model_config)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    features = constants.preprocess_feature_folder()
    if features is not None and not features.is_dir():
        raise SystemExit(f"error: PREPROCESS_FEATURE_FOLDER={str(features)!r} is not a folder")
    paths = {"cfg": cfg, "stage": stage}
    if args.is_training:
        paths["train"] = data_path("--train_data_path", args.train_data_path, required=True, shards_ok=True)
        paths["val"] = data_path("--val_data_path", args.val_data_path, required=False)
        paths["stage1"] = weight_path("--stage1_weight", args.stage1_weight)
        if args.resume == "last":
            # This run's own file, by the rule it writes with (output_dir), not a search under WEIGHTFOLDER.
            paths["resume"] = last_checkpoint_path(args)
            if not paths["resume"].exists():
                raise SystemExit(f"error: --resume last: this run's last checkpoint {str(paths['resume'])!r} does not "
                                 f"exist (it is <{output_dir_flag(args)}>/<--model_save_name without its {{...}} "
                                 f"fields>-last.ckpt)")
        elif args.strategy == "deepspeed_stage_2" and args.resume and Path(args.resume).is_dir():
            paths["resume"] = Path(args.resume)          # DeepSpeed's checkpoint folder
        else:
            paths["resume"] = weight_path("--resume", args.resume)
        check_strategy(args, devices_of(args)[0])
        paths["resume_checkpoint"] = read_resume(paths["resume"]) if paths["resume"] is not None else None
    else:
        paths["test"] = data_path("--test_data_path", args.test_data_path, required=True)
        paths["stage1"] = weight_path("--stage1_weight", args.stage1_weight)
        paths["test_weight"] = weight_path("--test_weight", args.test_weight)
        if paths["test_weight"] is None and paths["stage1"] is None:
            raise SystemExit("error: prediction needs --test_weight (or --stage1_weight)")
        if paths["test_weight"] is not None and weights.checkpoint_stage(paths["test_weight"]) == 2:
            stage = paths["stage"] = 2
    try:
        paths["dataset"] = dataset_of_data(paths["train"] if args.is_training else paths["test"], args.dataset)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if stage == 2 and paths["stage1"] is None:
        what = "training" if args.is_training else "prediction"
        raise SystemExit(f"error: stage-2 {what} needs --stage1_weight (e.g. stage1_cc3m.ckpt): `fc` and "
                         f"`t2i_decoder_prompt` come only from the stage-1 checkpoint (a stage-2 checkpoint has "
                         f"neither), and without them every picture would be drawn from random weights")
    for flag, key in (("--stage1_weight", "stage1"), ("--test_weight", "test_weight"), ("--resume", "resume")):
        if paths.get(key) is not None and Path(paths[key]).is_file():   # made for this config's LLM?
            try:
                checkpoints.check_pairing(cfg, paths[key], flag)
            except weights.CheckpointError as e:
                raise SystemExit(f"error: {e}") from None
    # Last: where this run writes, claimed (rank 0 writes), so that nothing is loaded for a run that
    # could not save its result, or would write over another run's.
    if args.is_training and run_files.is_global_rank_zero():
        paths["run"] = run_files.claim_run_name(output_dir(args), args.model_save_name, output_dir_flag(args),
                                                paths["resume"], args.overwrite)
    elif args.is_training:
        paths["run"] = run_files.RunName(output_dir(args), args.model_save_name)
    else:
        paths["predictions"] = constants.prediction_folder(args.test_weight or args.stage1_weight)
        paths["prediction_lock"] = (predictions.claim_folder(paths["predictions"], args.overwrite)
                                    if run_files.is_global_rank_zero() else None)
    return paths


def read_resume(path: Path) -> dict:
    """The checkpoint `--resume` names, read once through the project's loading rule and checked to be
    resumable (`run_files.read_resume`); a DeepSpeed folder is checked file by file and its model
    states file returned (DeepSpeed reads the folder itself)."""
    try:
        return run_files.check_deepspeed_folder(path) if path.is_dir() else run_files.read_resume(path)
    except run_files.RunFileError as e:
        raise SystemExit(f"error: --resume {e}") from None


def check_resume_settings(args: argparse.Namespace, checkpoint: dict, path: Path, settings: TrainSettings) -> None:
    """A run resumed from a checkpoint trained with other settings would not continue that run (and
    Lightning would restore the checkpoint's optimiser settings under this run's record): stop
    naming each difference, unless `--resume_allow_changes` names it."""
    saved = read_settings(checkpoint)
    if saved is None:
        log.warning("--resume %s records no run settings (an older checkpoint): its stage, data and learning rate "
                    "cannot be checked against this run's", path)
        return
    found = resume_differences(saved, settings)
    allowed = allowed_changes(args)
    refused = {k: v for k, v in found.items() if k in FIXED_ON_RESUME or ("all" not in allowed and k not in allowed)}
    if refused:
        changeable = [k for k in refused if k not in FIXED_ON_RESUME]
        how = (f", or --resume_allow_changes {','.join(changeable)} to continue from it with this run's"
               if changeable else "")
        fixed = ("; the stage cannot change on resume (stage 2 starts from a stage-1 checkpoint through "
                 "--stage1_weight)" if "stage" in refused else "")
        raise SystemExit(f"error: --resume {str(path)!r} was trained with other settings than this run's: "
                         f"{describe_differences(refused)}. Give the checkpoint's values to continue that run{how}"
                         f"{fixed}")
    if found:
        log.warning("resuming with changed settings (--resume_allow_changes): %s; this run's values are used and "
                    "recorded", describe_differences(found))


# ----------------------------------------------------------------------------------------------
# Trainer pieces
# ----------------------------------------------------------------------------------------------

def devices_of(args: argparse.Namespace) -> tuple[str, list[int] | int]:
    """(accelerator, devices): `--gpus` ids on a GPU (default: every visible GPU, as the release's
    0,1,2,3 meant on its 4-GPU machines); on a CPU, one process per listed id (default one)."""
    accelerator = placement.accelerator(args.accelerator)
    ids = placement.gpu_ids(args.gpus)
    if accelerator == "gpu":
        return accelerator, ids or list(range(max(1, torch.cuda.device_count())))
    return accelerator, max(1, len(ids))


last_name = run_files.last_name


def last_checkpoint_path(args: argparse.Namespace) -> Path:
    """This run's own last checkpoint, `<output_dir>/<last_name>.ckpt` (what `--resume last` reads)."""
    return run_files.RunName(output_dir(args), args.model_save_name).last_path


def make_logger(args: argparse.Namespace, save_dir: Path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if args.logger == "csv":
        return CSVLogger(save_dir=str(save_dir), name="logs")
    if args.logger == "tensorboard":
        try:
            return TensorBoardLogger(save_dir=str(save_dir), name="tb")
        except ModuleNotFoundError as e:
            raise SystemExit(f"error: --logger tensorboard needs `pip install tensorboard` ({e})") from None
    try:
        import wandb  # noqa: F401
    except ModuleNotFoundError:
        raise SystemExit("error: --logger wandb needs `pip install wandb`") from None
    # Never ask for a login: offline unless the user chose otherwise with WANDB_MODE.
    return WandbLogger(save_dir=str(save_dir), project="minigpt5", offline=os.environ.get("WANDB_MODE") != "online")


def warmup_of(args: argparse.Namespace, planned_steps: int) -> int:
    """Warm-up steps: `--warmup_ratio` x the planned optimiser steps when given, else `--warmup_steps`."""
    if args.warmup_ratio is not None:
        return math.ceil(args.warmup_ratio * planned_steps)
    return DEFAULT_WARMUP_STEPS if args.warmup_steps is None else args.warmup_steps


def warn_if_learning_rate_stays_low(args: argparse.Namespace, warmup: int, run_steps: int) -> None:
    """A run whose learning rate never leaves 0 (or never reaches `--learning_rate`) trains nothing
    (or little) and still looks like a success: say so, and how to fix it. The linear warm-up
    gives optimiser step i (from 0) the rate lr * i / warmup."""
    if args.learning_rate == 0:
        log.warning("--learning_rate 0: the weights will not change in this run")
        return
    if warmup < run_steps:
        return
    flag = "--warmup_ratio" if args.warmup_ratio is not None else "--warmup_steps"
    peak = args.learning_rate * (run_steps - 1) / warmup
    reached = ("stays 0 for the whole run" if peak == 0 else
               f"never gets above {peak:.3g} ({100 * peak / args.learning_rate:.2g}% of --learning_rate "
               f"{args.learning_rate:g})")
    log.warning("the learning rate %s: the linear warm-up is %d optimiser steps (%s) but this run makes %d; for a "
                "short run give --warmup_ratio 0.03 (3%% of the run) or a --warmup_steps below %d",
                reached, warmup, flag, run_steps, run_steps)


def train_settings(args: argparse.Namespace, paths: dict, dataset_type: str, planned_total_steps: int,
                   accumulate: int, world: int) -> TrainSettings:
    """The run's `TrainSettings`, from its flags, checked paths and environment (saved whole with
    every checkpoint)."""
    def text(path) -> str | None:
        return None if path is None else str(path)

    return TrainSettings(
        learning_rate=args.learning_rate, warmup_steps=warmup_of(args, planned_total_steps),
        adam_epsilon=args.adam_epsilon, snr_loss=args.snr_loss, caption_loss_weight=args.caption_loss_weight,
        planned_total_steps=planned_total_steps, seed=args.seed, stage=paths["stage"],
        model_config=paths["cfg"].source, dataset_type=dataset_type, train_data_path=text(paths["train"]),
        val_data_path=text(paths["val"]), stage1_weight=text(paths["stage1"]), resume=text(paths["resume"]),
        num_train_epochs=args.num_train_epochs, per_device_train_batch_size=args.per_device_train_batch_size,
        real_batch_size=args.real_batch_size, accumulate_grad_batches=accumulate, world_size=world,
        num_nodes=args.num_nodes, max_steps=args.max_steps, shuffle=args.shuffle, strategy=args.strategy,
        precision=args.precision, environment=environment())


def predict_settings(args: argparse.Namespace, dataset_type: str) -> PredictSettings:
    """How `predict_step` generates, from the prediction flags and the dataset's spec."""
    return PredictSettings(seed=args.seed, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                           guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                           scheduler=args.scheduler, sd_baseline=spec(dataset_type).sd_baseline,
                           decode=args.decode, pictures=args.pictures)


def train(args: argparse.Namespace, paths: dict) -> None:
    import pytorch_lightning as pl

    import shards
    from checkpoints import CheckpointMismatchError
    from collator import Collator
    from dataloader import make_dataset
    from minigpt4 import load_tokenizer
    from model import MiniGPT5_Model

    cfg, stage = paths["cfg"], paths["stage"]
    accelerator, devices = devices_of(args)
    n_devices = len(devices) if isinstance(devices, list) else devices
    world = n_devices * args.num_nodes                  # processes over all nodes
    workers = cap_workers(args.num_workers)
    from_shards = shards.is_shard_spec(paths["train"])
    # The data first (it needs the tokenizer only): the schedule's length is known before the model is built.
    tokenizer = load_tokenizer(cfg.llama_model, cfg.llm_family)
    kind = paths["dataset"]
    extra = {"shuffle": args.shuffle} if from_shards else {"allow_outside_paths": args.allow_outside_paths}
    train_set = make_dataset(paths["train"], tokenizer, cfg, is_training=True, dataset_type=kind, strict=args.strict,
                             **extra)
    if len(train_set) == 0:
        raise SystemExit(f"error: --train_data_path {args.train_data_path!r}: no usable sample in "
                         f"{str(paths['train'])!r} (the skipped rows are listed above)")
    collate = Collator(tokenizer)
    # The resume state: position in the data, seed key, --max_steps stop. Without an EpochSampler
    # (DDP, shards) it also tells the dataset the epoch.
    point = ResumePoint(args.seed, args.max_steps,
                        dataset=train_set if (world > 1 or from_shards) and hasattr(train_set, "set_epoch") else None)
    if from_shards:
        try:
            batches = shards.ShardBatches(train_set, args.per_device_train_batch_size, collate, workers, world)
        except shards.DataError as e:
            raise SystemExit(f"error: --train_data_path {args.train_data_path!r}: {e}") from None
        train_loader = shards.ShardLoader(batches, workers, done_batches=point.batches_done)
    else:
        train_loader = training_loader(train_set, collate, args.per_device_train_batch_size, workers, args.shuffle,
                                       args.seed, world, point)
    val_loader = None
    if paths["val"] is not None:
        # The release's validation samples are training samples (targets, image and caption losses).
        val_set = make_dataset(paths["val"], tokenizer, cfg, is_training=True, dataset_type=kind, strict=args.strict,
                               allow_outside_paths=args.allow_outside_paths)
        val_loader = eval_loader(val_set, collate, args.per_device_eval_batch_size, workers)

    accumulate = max(1, args.real_batch_size // (args.per_device_train_batch_size * world))
    # The schedule spans the planned epochs; --max_steps only stops early (so resuming is exact).
    per_rank = (len(train_loader) if from_shards
                else math.ceil(math.ceil(len(train_set) / world) / args.per_device_train_batch_size))
    settings = train_settings(args, paths, kind, math.ceil(per_rank / accumulate) * args.num_train_epochs,
                              accumulate, world)
    resumed = paths.pop("resume_checkpoint")           # read once in check_inputs; Lightning gets it below
    if resumed is not None:
        check_resume_settings(args, resumed, paths["resume"], settings)
    run_steps = (min(args.max_steps, settings.planned_total_steps) if args.max_steps > 0
                 else settings.planned_total_steps)
    warn_if_learning_rate_stays_low(args, settings.warmup_steps, run_steps)
    try:
        model = MiniGPT5_Model(cfg, stage=stage, stage1_weight=paths["stage1"], settings=settings)
    except CheckpointMismatchError as e:
        raise SystemExit(f"error: --stage1_weight {e}") from None
    interval = args.val_check_interval or spec(kind).val_check_interval
    if interval * len(train_loader) < 1:
        interval = 1.0
    out_dir, run = output_dir(args), paths["run"]       # the name claimed (maybe -vN): no other run's files
    checkpoint = ModelCheckpoint(dirpath=str(out_dir), filename=run.model_save_name, auto_insert_metric_name=False,
                                 monitor="val_loss" if val_loader is not None else None, mode="min",
                                 save_top_k=args.save_total_limit, enable_version_counter=False)
    last = LastCheckpoint(run.last_path)
    callbacks = [checkpoint, FinalCheckpoint(checkpoint), LearningRateMonitor(logging_interval="step")]
    callbacks += [point, last, OwnHyperParameters()]      # last after point: sees its should_stop
    if args.save_every_n_steps > 0:
        callbacks.append(ModelCheckpoint(dirpath=str(out_dir), every_n_train_steps=args.save_every_n_steps,
                                         filename=run.step_name, auto_insert_metric_name=False, save_top_k=1,
                                         monitor="step", mode="max", enable_version_counter=False))
    if args.sample_every_n_steps > 0:
        callbacks.append(SampleGeneration(args.sample_every_n_steps, constants.output_folder() / "samples",
                                          args.num_inference_steps))
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=args.num_nodes,
        strategy=make_strategy(args.strategy, world, stage),
        precision=args.precision or placement.default_precision(accelerator),
        max_epochs=args.num_train_epochs, accumulate_grad_batches=accumulate,
        val_check_interval=interval if val_loader is not None else None,
        limit_val_batches=None if val_loader is not None else 0,
        logger=make_logger(args, out_dir), callbacks=callbacks, log_every_n_steps=1,
        num_sanity_val_steps=0, enable_progress_bar=True, deterministic=args.deterministic or None,
        plugins=[RunCheckpointIO(paths["resume"], resumed if paths["resume"] and paths["resume"].is_file() else None)])
    del resumed                  # the CheckpointIO hands it to Lightning once; then it is freed
    log.info("stage %d on %s%s: %d node(s) x %d device(s), batch %d x accumulate %d, %s order", stage, kind,
             " shards" if from_shards else "", args.num_nodes, n_devices, args.per_device_train_batch_size, accumulate,
             "shuffled" if args.shuffle else "file")
    if paths["resume"] is not None:
        log.info("resuming training from %s", paths["resume"])
    trainer.fit(model, train_loader, val_loader, ckpt_path=str(paths["resume"]) if paths["resume"] else None)
    if trainer.global_step == last.start_step:
        if paths["resume"] is not None and args.max_steps > 0 and trainer.global_step >= args.max_steps:
            raise SystemExit(f"error: nothing trained: --resume {str(paths['resume'])!r} is at step "
                             f"{trainer.global_step}, which --max_steps {args.max_steps} has already reached")
        raise SystemExit(f"error: the run made 0 optimiser steps: no training batch had a usable sample (every "
                         f"sample of --train_data_path {args.train_data_path!r} was skipped; the reasons are logged "
                         f"above). No checkpoint was written.")
    if trainer.is_global_zero:
        metrics = {k: round(float(v), 5) for k, v in sorted(trainer.callback_metrics.items())}
        print(f"after {trainer.global_step} optimiser steps: {metrics}{peak_memory_note()}")
        print(f"best checkpoint: {checkpoint.best_model_path or last.path}")
        print(f"last checkpoint: {last.path} (step {last.saved_step})")
        run_files.save_json_atomic({"optimiser_steps": trainer.global_step, "metrics": metrics,
                                    "best_checkpoint": str(checkpoint.best_model_path or last.path),
                                    "last_checkpoint": str(last.path)}, run.metrics_path)


def peak_memory_note() -> str:
    """'; peak GPU memory N GiB' on CUDA (this process's allocator high-water mark), else ''."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ""
    return f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------

def predict(args: argparse.Namespace, paths: dict) -> Path:
    import pytorch_lightning as pl

    from checkpoints import CheckpointMismatchError
    from collator import Collator
    from dataloader import make_dataset
    from model import MiniGPT5_Model

    cfg = paths["cfg"]
    accelerator, devices = devices_of(args)
    n_devices = len(devices) if isinstance(devices, list) else devices
    kind = paths["dataset"]
    # stage 2 when IS_STAGE2 or a stage-2 --test_weight
    model = MiniGPT5_Model(cfg, stage=paths["stage"], predict_settings=predict_settings(args, kind))
    given = [(flag, path) for flag, path in (("--stage1_weight", paths["stage1"]), ("--test_weight", paths["test_weight"]))
             if path is not None]
    try:
        model.load_checkpoint_files([path for _, path in given])
    except CheckpointMismatchError as e:       # the message starts with the file's path
        flag = next((flag for flag, path in given if str(e).startswith(str(path))), given[-1][0])
        raise SystemExit(f"error: {flag} {e}") from None
    test_set = make_dataset(paths["test"], model.model.llama_tokenizer, cfg, is_training=False, dataset_type=kind,
                            strict=args.strict, allow_outside_paths=args.allow_outside_paths)
    loader = eval_loader(test_set, Collator(model.model.llama_tokenizer), args.predict_batch_size,
                         cap_workers(args.num_workers))
    out_dir = paths["predictions"]           # claimed in check_inputs: emptied of an earlier run's predictions
    writer = PredictionWriter(out_dir, {
        "checkpoints": {flag: str(path) for flag, path in given}, "llm_family": cfg.llm_family,
        "dataset": {"type": kind, "path": str(paths["test"]), "items": len(test_set)},
        "settings": predict_settings(args, kind).to_dict()})
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=args.num_nodes,
                         strategy="ddp" if n_devices * args.num_nodes > 1 else "auto",
                         precision=args.precision or placement.default_precision(accelerator),
                         logger=False, callbacks=[writer], enable_progress_bar=True,
                         deterministic=args.deterministic or None)
    trainer.predict(model, loader, return_predictions=False)
    if trainer.is_global_zero:
        print(f"predictions written to {out_dir}{peak_memory_note()}")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from weights import CheckpointError

    from configuration import ConfigError
    from data_problems import DataError
    from lavis import LavisCheckpointError

    paths = {}
    try:
        paths = check_inputs(args)
        import pytorch_lightning as pl

        pl.seed_everything(args.seed, workers=True)
        if args.is_training:
            train(args, paths)
        else:
            predict(args, paths)
    # Bad input or output the user can act on: one line naming the file (the messages do).
    except (CheckpointError, LavisCheckpointError, DataError, ConfigError, run_files.RunFileError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    finally:                 # this run's name or prediction folder is free again (the kernel would do it at exit)
        if paths.get("run") is not None:
            paths["run"].release()
        if paths.get("prediction_lock") is not None:
            paths["prediction_lock"].release()


def one_line(error: BaseException) -> str:
    """An error's message on one line. An error raised in a DataLoader worker process arrives with the
    worker's traceback in its message; its last line is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        text = text.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", text) else text
    return " ".join(text.split())


if __name__ == "__main__":
    main(sys.argv[1:])
