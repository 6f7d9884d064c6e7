"""Exact resume: a run resumed from any checkpoint sees the batches, random draws and weights an
uninterrupted run would.

Three things must survive a stop, and this module owns all of them:

- where the data stands: the epoch and the batches done in it. `ResumePoint` (a stateful
  Lightning callback) counts them from the trainer's progress; the training loader
  (`ResumableLoader` over an `EpochSampler`, or `shards.ShardLoader`) saves that position with
  each checkpoint through Lightning's data-loader state and, on resume, skips what was done.
- the seed key: every random draw of a training step comes from seeds of (seed, optimiser step,
  micro-batch, rank) (`step_seed`, `step_randomness`), the seed being the run's
  `TrainSettings.seed`. `ResumePoint` saves it in its callback state and says so when a run
  resumes with another seed (its draws would then differ from the interrupted run's).
- where the run stops: `--max_steps` stops through `should_stop` rather than Lightning's own
  `max_steps` (see `ResumePoint`), and a checkpoint saved at such a stop in mid-epoch records
  the epoch as unfinished.

The epoch also sets the dataset's random flips (`set_epoch`): `EpochSampler` tells the dataset on
one device; under DDP and for shards, where another sampler drives the epochs, `ResumePoint` does.

A resumed run must also be the run its settings say: `train_eval.py` refuses a checkpoint trained
with other settings (`settings.resume_differences`) unless `--resume_allow_changes` names them,
and `OwnHyperParameters` makes the optimiser use this run's learning rate and schedule, not the
ones Lightning restored with the optimiser's state. (Which files a run reads and writes, and how,
is `run_files.py`.) `training_loader` and `eval_loader` are the loaders `train_eval.py` builds.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from pytorch_lightning import Callback

log = logging.getLogger(__name__)


def step_seed(seed: int, global_step: int, micro: int, rank: int) -> int:
    """The seed of one training micro-batch: a function of the run's seed, the optimiser step, the
    micro-batch within the step and the rank only, so that a resumed run draws exactly what an
    uninterrupted one would."""
    key = ((seed * 1_000_003 + global_step) * 1_009 + micro) * 1_009 + rank
    return key % (2**63 - 1)


@contextlib.contextmanager
def step_randomness(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Every random draw of one training micro-batch from its `step_seed`: yields the generator of
    the model's own draws (noise, timesteps, CFG dropout; on `device` when it is a GPU), while torch's
    global RNG, which modules draw from (LoRA dropout in stage 2), is seeded from the same key (by
    another constant: a second stream) inside the block and restored after it (`fork_rng`)."""
    module_seed = (seed * 6_364_136_223_846_793_005 + 1) % (2**63 - 1)
    cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(module_seed)
        if cuda:
            torch.cuda.manual_seed(module_seed)
        yield torch.Generator(device=device if device.type == "cuda" else torch.device("cpu")).manual_seed(seed)


class ResumePoint(Callback):
    """The run's resume state as one Lightning callback: the epoch and the batches done in it, the
    seed key, and the `--max_steps` stop.

    Not Lightning's own `max_steps`: with it set, Lightning treats every resumed run as restarting
    mid-epoch, and a run resumed from an end-of-epoch checkpoint (`<name>-last.ckpt` of a run that
    ended with its epoch) replayed the next epoch's first batch. Stopping through `should_stop`
    keeps training epoch-based, so Lightning resumes such a checkpoint at the next epoch.

    A stop in mid-epoch still runs Lightning's end-of-epoch hooks, and a checkpoint saved there (or
    at the end of training) would record the epoch as finished: resumed, it skipped the rest of the
    epoch. `on_save_checkpoint` records such an epoch as unfinished, as a checkpoint saved right
    after the last batch does, so the resumed run continues with the next batch.

    Args:
        seed: the run's seed (`TrainSettings.seed`), the root of every step's random draws.
        max_steps: stop once this many optimiser steps are done (-1: no limit).
        dataset: a dataset whose `set_epoch` must follow the epochs when no `EpochSampler` tells it
            (DDP's sampler, shards); None otherwise.
    """

    def __init__(self, seed: int, max_steps: int = -1, dataset=None):
        self.seed, self.max_steps, self.dataset = seed, max_steps, dataset
        self._trainer = None

    # ---- the position in the data ------------------------------------------------------------

    def batches_done(self) -> int:
        """Batches of the current epoch the trainer has processed ("processed" counts the batch just
        trained even when a checkpoint is saved in `on_train_batch_end`); 0 before training."""
        if self._trainer is None:
            return 0
        return int(self._trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(trainer.current_epoch)

    # ---- the stop ----------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        if 0 < self.max_steps <= trainer.global_step:     # resumed past the limit: nothing to do
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < self.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.max_steps <= 0:
            return
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if not (trainer.should_stop and 0 < batches < trainer.num_training_batches):
            return
        for progress in checkpoint["loops"]["fit_loop"]["epoch_progress"].values():
            progress["processed"] = progress["completed"] = progress["started"] - 1

    # ---- the callback's own state (saved with every checkpoint) ----------------------------------

    def state_dict(self) -> dict:
        trainer = self._trainer
        return {"seed": int(self.seed), "epoch": int(trainer.current_epoch) if trainer is not None else 0,
                "batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("seed")
        if saved is not None and int(saved) != int(self.seed):
            log.warning("resuming with --seed %d, but the checkpoint was trained with --seed %d: the random draws "
                        "(noise, timesteps, dropout, shuffling) will differ from the interrupted run's",
                        self.seed, saved)


class EpochSampler(torch.utils.data.Sampler):
    """A seeded shuffle per epoch (Lightning calls `set_epoch`) that can resume mid-epoch: after
    `ResumableLoader.load_state_dict`, the first pass skips the samples of the batches already
    trained on."""

    def __init__(self, dataset, seed: int, shuffle: bool):
        self.dataset, self.n, self.seed, self.shuffle = dataset, len(dataset), seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        # The dataset draws its random flips per (epoch, sample): tell it before workers start.
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(self.n))
        skip, self.skip = self.skip, 0
        return iter(order[skip:].tolist())


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader that Lightning can checkpoint (its `state_dict` / `load_state_dict` interface):
    the state is the epoch and the number of batches the trainer has completed in it
    (`done_batches`, normally `ResumePoint.batches_done`), so that a run resumed from any step sees
    exactly the batches an uninterrupted run would."""

    def __init__(self, *args, done_batches: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.done_batches = done_batches or (lambda: 0)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "completed": int(self.done_batches())}

    def load_state_dict(self, state: dict) -> None:
        skip = state["completed"] * self.batch_size
        if skip >= len(self.sampler):          # saved after the epoch's last batch: the next epoch starts
            self.sampler.set_epoch(state["epoch"] + 1)
            self.sampler.skip = 0
        else:
            self.sampler.set_epoch(state["epoch"])
            self.sampler.skip = skip


class OwnHyperParameters(Callback):
    """After Lightning restored a checkpoint's optimiser and scheduler state, put back this run's own
    optimiser settings (learning rates, epsilon, betas, weight decay: what `configure_optimizers`
    set) and its schedule's base rates, and set each group's current rate from this run's schedule
    at the restored step. Lightning restores the param groups whole, so a run resumed with another
    `--learning_rate` trained with the checkpoint's while its new checkpoints recorded the flag's.
    With unchanged settings this changes nothing (the same values, computed the same way)."""

    def __init__(self):
        self._groups: list[list[dict]] = []
        self._base_lrs: list[list[float] | None] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        # After configure_optimizers, before the checkpoint's training state is restored.
        self._groups = [[{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
                        for optimizer in trainer.optimizers]
        self._base_lrs = [list(getattr(config.scheduler, "base_lrs", None) or []) or None
                          for config in trainer.lr_scheduler_configs]

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is None:
            return
        for optimizer, groups in zip(trainer.optimizers, self._groups):
            for group, own in zip(optimizer.param_groups, groups):
                group.update({k: v for k, v in own.items() if k != "lr"})
        for config, base_lrs in zip(trainer.lr_scheduler_configs, self._base_lrs):
            scheduler = config.scheduler
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if base_lrs is None or lambdas is None:
                continue
            scheduler.base_lrs = list(base_lrs)
            rates = [base * rule(scheduler.last_epoch) for base, rule in zip(base_lrs, lambdas)]
            for group, rate in zip(scheduler.optimizer.param_groups, rates):
                group["lr"] = rate
            scheduler._last_lr = rates


def training_loader(dataset, collate, batch_size: int, num_workers: int, shuffle: bool, seed: int, world: int,
                    point: ResumePoint | None = None):
    """Training loader. On one device: the resumable epoch-seeded sampler, whose position `point`
    counts; on several, Lightning swaps in its seeded DistributedSampler."""
    from torch.utils.data import DataLoader

    if world > 1:
        # Lightning swaps in a DistributedSampler (seeded, set_epoch each epoch); flips follow
        # the epoch through ResumePoint.
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                          collate_fn=collate)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=EpochSampler(dataset, seed, shuffle),
                           num_workers=num_workers, collate_fn=collate,
                           done_batches=point.batches_done if point is not None else None)


def eval_loader(dataset, collate, batch_size: int, num_workers: int):
    """Validation / prediction loader: the samples in order (Lightning shards them under DDP). Its
    sampler has no `set_epoch`, so the dataset's random flips stay those of epoch 0 and every
    validation sees the same images: val_loss moves with the weights only."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
