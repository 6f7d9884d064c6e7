"""The Lightning strategies a run may use (`--strategy`) and how each writes and reads checkpoints,
so that every checkpoint is one file in the release's key layout (DeepSpeed: a folder whose model
states file holds that layout):

    auto / ddp          Lightning's DDP (stage 2 finds unused parameters, as the release)
    fsdp                `ReleaseLayoutFSDP`: FSDP over the trainable tensors only, single-file checkpoints
                        gathered on rank 0 through the model's own `trainable_state_dict`
    deepspeed_stage_2   `ReleaseLayoutDeepSpeed`: ZeRO-2, the frozen weights left out, folders swapped
                        in atomically (CUDA only; not run in the tests)
    RunCheckpointIO     Lightning's CheckpointIO for every other strategy: atomic writes, reads through
                        the one loading rule (`run_files`)

`make_strategy` picks one for `train_eval.py`; `check_strategy` says before loading a model what a
choice needs.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

import run_files

STRATEGIES = {
    "auto": "DDP when the run has several processes, else one process",
    "ddp": "DDP (stage 2 finds unused parameters, as the release)",
    "fsdp": "FSDP sharding the trainable tensors with their gradients and optimiser state (the frozen models stay "
            "whole on every device, as under DDP); checkpoints are single files in the release's key layout "
            "(gathered on rank 0) and resume exactly; runs on CPUs (gloo) too",
    "deepspeed_stage_2": "DeepSpeed ZeRO-2, CUDA only (pip install deepspeed); a checkpoint is DeepSpeed's folder, "
                         "whose <name>.ckpt/checkpoint/mp_rank_00_model_states.pt holds the release-layout state_dict; "
                         "untested here. Other strategies (ZeRO-3, FSDP's sharded checkpoints) are refused: their "
                         "checkpoints would not be one file in the release's key layout",
}
STRATEGY_HELP = "; ".join(f"{name}: {what}" for name, what in STRATEGIES.items())


class RunCheckpointIO(TorchCheckpointIO):
    """How Lightning writes and reads this run's checkpoints: written atomically
    (`run_files.save_atomic`: a temporary file in the destination folder, renamed over the old one;
    a failure raises `run_files.WriteError` and leaves the old file as it was), read through the
    project's one loading rule (`run_files.read_checkpoint`). The `--resume` file was read and
    checked before the model was built; Lightning gets that dict, once."""

    def __init__(self, resume_path: Path | None = None, resume_checkpoint: dict | None = None):
        super().__init__()
        self._resume = (Path(resume_path), resume_checkpoint) if resume_checkpoint is not None else None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("RunCheckpointIO takes no storage_options")
        run_files.save_atomic(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if self._resume is not None and Path(path) == self._resume[0]:
            checkpoint, self._resume = self._resume[1], None
            return checkpoint
        return run_files.read_checkpoint(path)


def make_strategy(name: str, world: int, stage: int):
    """The Lightning strategy of `--strategy` for a run of `world` processes (all nodes)."""
    from pytorch_lightning.strategies import DDPStrategy

    if name in ("auto", "ddp") and world > 1:
        # Stage 2 batches without vokens leave the mapper unused (the release's setting).
        return DDPStrategy(find_unused_parameters=stage == 2)
    if name == "fsdp":
        return release_layout_fsdp()
    if name == "deepspeed_stage_2":
        return release_layout_deepspeed()
    return name


def check_strategy(args: argparse.Namespace, accelerator: str) -> None:
    """What `--strategy` needs, before a model is loaded."""
    if args.strategy == "deepspeed_stage_2":
        if accelerator != "gpu":
            raise SystemExit("error: --strategy deepspeed_stage_2 runs on CUDA GPUs only (Lightning's DeepSpeed "
                             "strategy); on a CPU use --strategy ddp or fsdp")
        try:
            import deepspeed  # noqa: F401
        except ModuleNotFoundError:
            raise SystemExit("error: --strategy deepspeed_stage_2 needs `pip install deepspeed`") from None


class ReleaseLayoutDeepSpeed(DeepSpeedStrategy):
    """Lightning's DeepSpeed ZeRO stage 2 (CUDA only). DeepSpeed writes a checkpoint as a folder
    (`<name>.ckpt/checkpoint/mp_rank_00_model_states.pt` plus the sharded optimiser state); here
    the frozen weights are left out of it, and the file also holds `state_dict`: the trainable
    tensors in the release's key layout (ZeRO-2 keeps whole parameters on every rank), so
    `--test_weight`, `--stage1_weight` and `MiniGPT5_Model.load_checkpoint_file` read that file as
    they read ours, and `--resume` takes the folder. Written from Lightning's DeepSpeedStrategy
    source; not run in our tests (no GPU in CI)."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Every rank writes its part into `<name>.ckpt.partial/`; then rank 0 swaps that folder
        in for the old one (old -> `.old`, new -> final, old deleted), so a failed or killed
        save never leaves a partial folder under the final name."""
        if storage_options is not None:
            raise TypeError("storage_options is not supported with DeepSpeed")
        final = Path(self.broadcast(str(filepath)))
        partial, old = final.with_name(final.name + ".partial"), final.with_name(final.name + ".old")
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("deepspeed_checkpoint_start")
        # Lightning's version drops `state_dict`; keep it (already the release's layout).
        client_state = {k: v for k, v in checkpoint.items() if k != "optimizer_states"}
        self.deepspeed_engine.save_checkpoint(str(partial), client_state=client_state, tag="checkpoint",
                                              exclude_frozen_parameters=True)
        self.barrier("deepspeed_checkpoint_written")
        if self.is_global_zero:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("deepspeed_checkpoint_done")


def release_layout_deepspeed() -> ReleaseLayoutDeepSpeed:
    """ZeRO stage 2 with the frozen weights left out of its checkpoints."""
    return ReleaseLayoutDeepSpeed(stage=2, exclude_frozen_parameters=True)


class ReleaseLayoutFSDP(FSDPStrategy):
    """Lightning's FSDP over the trainable tensors (see `_setup_model`; `use_orig_params`: the
    frozen and the trainable rows of the embedding share a module) whose checkpoints are single
    files in the release's key layout: the parameters are gathered on rank 0 and saved through the
    model's own `trainable_state_dict` (FSDP's state-dict hooks cannot see the embedding's merged
    `weight` key). On a CPU it runs FSDP over gloo (Lightning allows FSDP on GPUs only; PyTorch
    does both)."""

    def lightning_module_state_dict(self) -> dict:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        sharded = self.world_size > 1         # one process: FSDP does not shard (and cannot offload)
        with FSDP.summon_full_params(self.model, writeback=False, rank0_only=sharded,
                                     offload_to_cpu=sharded and self.root_device.type != "cpu"):
            # Copies: the gathered storage is freed when the context ends.
            state = self.lightning_module.trainable_state_dict() if self.global_rank == 0 else {}
            return {key: value.clone() for key, value in state.items()}

    def optimizer_state(self, optimizer) -> dict:
        """On a CPU, gather the optimiser state without FSDP's offload to CPU: there it makes no
        copy, and every state tensor ends up a view of one reused gather buffer."""
        if self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        optimizer = getattr(optimizer, "_optimizer", optimizer)      # a LightningOptimizer
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self.global_rank == 0:
            state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Our single-file checkpoint: the trainable tensors (release layout) go into the
        gathered parameters through the model's own loading, then the optimiser state."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_file():
            raise SystemExit(f"error: --resume {str(path)!r}: with --strategy fsdp a checkpoint is one file (a "
                             f"folder is the sharded format, which this run does not write)")
        # Through the project's loading rule only, whatever checkpoint_io this strategy was given.
        io = self.checkpoint_io if isinstance(self.checkpoint_io, RunCheckpointIO) else RunCheckpointIO()
        checkpoint = io.load_checkpoint(path)
        with FSDP.summon_full_params(self.model, writeback=True):
            self.lightning_module.load_state_dict(checkpoint.pop("state_dict"), strict=False)
        states = checkpoint.get("optimizer_states")
        if not states or self.lightning_module.trainer.state.fn != "fit":
            return checkpoint
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(),
                                  FullOptimStateDictConfig(rank0_only=False)):
            for optimizer, state in zip(self.optimizers, states):
                if state["state"] and isinstance(next(iter(state["state"])), int):
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, state))
        return checkpoint

    def _setup_model(self, model):
        """FSDP over the trainable parameters only: the frozen ones (ViT, Q-Former, LLM, SD, in
        float16 / bfloat16) are `ignored_states`, kept whole on every device as under DDP. One
        flat parameter cannot mix dtypes, and these need no gradient sync; what FSDP shards is
        the float32 trainable part with its gradients and optimiser state. No FSDP mixed
        precision: the trainable tensors stay float32 (the release's choice; the new embedding
        rows must match the frozen ones) and `--precision bf16-mixed` autocasts as under DDP.
        On a CPU, FSDP needs `device_id` set to the CPU (Lightning passes none)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        frozen = [p for p in model.parameters() if not p.requires_grad]
        model = model.to(self.root_device)
        device_id = self.root_device if self.root_device.type == "cpu" else self.root_device.index
        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, mixed_precision=None,
                                        sharding_strategy=self.sharding_strategy, device_id=device_id,
                                        ignored_states=frozen, **self.kwargs)


def release_layout_fsdp() -> ReleaseLayoutFSDP:
    """FSDP over the trainable tensors, full (single-file) checkpoints."""
    return ReleaseLayoutFSDP(state_dict_type="full")
