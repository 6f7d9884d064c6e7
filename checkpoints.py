"""Putting MiniGPT-5 checkpoints into a model: ours and the release's (`stage1_cc3m.ckpt`,
`stage2_vist.ckpt`, `stage2_mmdialog.ckpt`), stage 1 then stage 2 on top.

    file ─► weights.read_checkpoint (the one loading rule) ─► weights.translate_llm_keys (plain or
         LoRA-wrapped LLM names, whichever the model has) ─► at least one trainable key of the model,
         or `CheckpointMismatchError` ─► shapes against the model (`weights.check_shapes`)
         ─► `load_state_dict(strict=False)`, unused and missing keys reported

`MiniGPT5_Model.load_checkpoint_file(s)` call these; what a checkpoint holds is the model's
`trainable_state_dict` (docs/architecture.md, "What a checkpoint holds").
"""
from __future__ import annotations

import logging
import os

import torch

import weights
from constants import find_weight
from llm_families import DEFAULT_FAMILY
from minigpt4 import split_row_modules
from placement import resolve_device

log = logging.getLogger(__name__)


class CheckpointMismatchError(weights.CheckpointError):
    """A checkpoint that cannot be what the caller meant (no trainable key of the model matched, or
    a stage-2 file without the stage-1 one it builds on)."""


def check_pairing(cfg, path: str | os.PathLike, flag: str) -> None:
    """Stop before any model is built when the checkpoint at `path` (given by `flag`) was made for
    another LLM than the config's: another `llm_family` (a checkpoint of any family but vicuna records it
    under the top-level key `llm_family`; a file without it, as the release's, is vicuna's), or another
    width of the LLM's states than `fc` or the voken rows hold (config key `llama_model`); or for another
    decoder (`check_decoder_pairing`). The file is memory-mapped, not read."""
    from transformers import AutoConfig

    checkpoint = weights.load_untrusted(path, "MiniGPT-5 checkpoint", mmap=True)
    if not isinstance(checkpoint, dict):
        return                                   # not a checkpoint at all: read_checkpoint says so
    family = checkpoint.get("llm_family", DEFAULT_FAMILY)
    if family != cfg.llm_family:
        raise CheckpointMismatchError(
            f"{path} ({flag}) was trained with llm_family {family!r}, but {cfg.source} has `llm_family: "
            f"{cfg.llm_family}`; use the config it was trained with, or a checkpoint of this pairing")
    state = checkpoint.get("state_dict", checkpoint)
    width = AutoConfig.from_pretrained(cfg.llama_model).hidden_size
    rows = [key for key in state if "embed_tokens" in key and key.endswith("weight")]
    for key in ["fc.0.weight"] + rows[:1]:
        tensor = state.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[1] != width:
            raise CheckpointMismatchError(
                f"{path} ({flag}): its `{key}` holds {tensor.shape[1]}-wide LLM states, but the LLM of "
                f"`llama_model` ({cfg.llama_model}, {cfg.source}) is {width} wide; it was trained on another LLM")
    check_decoder_pairing(cfg, state, f"{path} ({flag})")


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of `module`, without building its state dict (a `VokenEmbedding` /
    `VokenLMHead` shows its full matrix as `weight`, as in the checkpoints)."""
    shapes = {name: tuple(t.shape) for name, t in module.named_parameters()}
    shapes.update((name, tuple(t.shape)) for name, t in module.named_buffers())
    split = {id(m) for m in split_row_modules(module)}
    for name, m in module.named_modules():
        if id(m) in split:
            shapes[f"{name}.weight"] = (m.num_old + m.new_weight.shape[0], m.new_weight.shape[1])
    return shapes


def from_weights(model_class, model_config: str | os.PathLike | None = None,
                 stage1_weight: str | os.PathLike | None = None, test_weight: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, **kwargs):
    """`MiniGPT5_Model.from_weights` (`model_class`): the config (default: the tiny preset, built on
    first use), a model of the stage `test_weight` needs on `device`, then `stage1_weight` and
    `test_weight` loaded on top, in eval mode."""
    from configuration import load_config

    if not model_config:
        from presets import ensure_tiny

        model_config = ensure_tiny()
    cfg = load_config(model_config)
    paths = [find_weight(p, flag) for p, flag in ((stage1_weight, "--stage1_weight"),
                                                  (test_weight, "--test_weight")) if p]
    for path, flag in zip(paths, [f for p, f in ((stage1_weight, "stage1_weight"), (test_weight, "test_weight")) if p]):
        check_pairing(cfg, path, flag)
    stage = 2 if test_weight and weights.checkpoint_stage(paths[-1]) == 2 else 1
    if stage == 2 and not stage1_weight:
        raise CheckpointMismatchError(
            f"test_weight {str(test_weight)!r} is a stage-2 checkpoint: it has no `fc` / `t2i_decoder_prompt`, "
            f"which come from the stage-1 checkpoint; give stage1_weight (--stage1_weight), e.g. stage1_cc3m.ckpt")
    model = model_class(cfg, stage=stage, device=resolve_device(device), **kwargs)
    load_checkpoint_files(model, paths)
    return model.eval()


def load_checkpoint_files(model, paths: list[str | os.PathLike]) -> list[str]:
    """Load checkpoints into `model` (a `MiniGPT5_Model`) in order, each on top of the last (a
    stage-1 file, then a stage-2 one), and say once which trainable keys none of them provided (a
    stage-1 file alone has no LoRA keys; the stage-2 file after it does). Returns those keys."""
    missing = None
    for path in paths:
        left = set(load_checkpoint_file(model, path, warn_missing=False))
        missing = left if missing is None else missing & left
    missing = sorted(missing or ())
    if missing:
        log.warning("%d trainable keys in none of %s (kept as initialised): %s", len(missing),
                    ", ".join(str(p) for p in paths), missing[:10])
    return missing


def load_checkpoint_file(model, path: str | os.PathLike, warn_missing: bool = True) -> list[str]:
    """Load a MiniGPT-5 checkpoint (ours or the release's, stage 1 or 2) on top of `model`.

    Keys are translated between the plain and the LoRA-wrapped LLM names; keys the model does not
    have are reported and ignored (as the release loaded non-strictly). Returns the trainable keys
    the file did not provide (and warns about them unless `warn_missing` is off). A file that
    provides none of them raises `CheckpointMismatchError` (it would load nothing).
    """
    state = weights.translate_llm_keys(weights.read_checkpoint(path), lora=model.model.is_lora,
                                       in_place=model.model.tied_rows)
    trainable = model.trainable_keys()
    if not trainable & set(state):
        raise CheckpointMismatchError(
            f"{path}: none of its {len(state)} keys is a trainable tensor of this stage-{model.stage} model "
            f"(expected keys such as {sorted(trainable)[:3]}; the file has e.g. {sorted(state)[:3]}); "
            f"it is not a MiniGPT-5 checkpoint of this kind, and loading it would change nothing")
    weights.check_shapes(state, module_shapes(model), path, model.cfg.source)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        log.warning("%s: %d keys this stage-%d model does not use: %s", path, len(result.unexpected_keys),
                    model.stage, sorted(result.unexpected_keys)[:10])
    missing = sorted(trainable - set(state))
    if missing and warn_missing:
        log.warning("%s: %d trainable keys not in the file (kept as initialised): %s", path, len(missing),
                    missing[:10])
    return missing


def check_decoder_pairing(cfg, state: dict, where: str) -> None:
    """Before any model weights load: a checkpoint's mapper (its `state`, found at `where`) fits `cfg`'s
    decoder (`t2i_pooled_mapping` present exactly when `decoder_family` reads a pooled embedding, the
    mapper's width and length those of `mapper.d_model` / `mapper.num_prompt_tokens`). A checkpoint of
    another pairing is a `CheckpointMismatchError` naming the file, the checkpoint key and the config key."""
    import decoders

    family, m = cfg.decoder_family, cfg.mapper
    pooled = "t2i_pooled_mapping.weight" in state
    if pooled != decoders.get_family(family).POOLED:
        has = ("has `t2i_pooled_mapping.weight` (a decoder family with a pooled embedding)" if pooled else
               "has no `t2i_pooled_mapping.weight` (it was trained for a decoder without a pooled embedding)")
        raise CheckpointMismatchError(f"{where} {has}, but `decoder_family` in {cfg.source} is {family!r}; it was "
                                      f"saved with another decoder family")
    shapes = {"t2i_decoder_prompt": ((1, m.num_prompt_tokens, m.d_model), "`mapper.num_prompt_tokens` x `mapper.d_model`"),
              "llm_to_t2i_mapping.encoder.norm.weight": ((m.d_model,), "`mapper.d_model`")}
    for key, (want, config_key) in shapes.items():
        tensor = state.get(key)
        if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != want:
            raise CheckpointMismatchError(f"{where}: `{key}` is {tuple(tensor.shape)} but {config_key} in "
                                          f"{cfg.source} ({family!r} decoder) makes {want}; it was saved for another "
                                          f"decoder or mapper")
