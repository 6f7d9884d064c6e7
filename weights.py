"""Reading weight files at run time: the one loading rule for every pickled file, and the release's
checkpoint layouts.

    load_untrusted(path)      torch.load(weights_only=True) with a short allow-list of Lightning
                              metadata: every .pth / .ckpt / .pt any command reads goes through it
    load_state_dict_file      a flat name -> tensor dict from .safetensors or a pickled file
    check_weight_files(cfg)   every weight file of a config whole, from headers and sizes (before loading)
    load_llama_proj           MiniGPT-4's `prerained_minigpt4_7b.pth` -> `llama_proj`
    read_checkpoint           a MiniGPT-5 `.ckpt` (stage1_cc3m.ckpt, stage2_*.ckpt, ours) -> state_dict
    translate_llm_keys        the embedding / lm_head matrices between plain and LoRA-wrapped names

The LAVIS ViT / Q-Former readers live in `lavis.py`; putting a checkpoint into a model (key checks,
stage 1 then stage 2) in `checkpoints.py`. Writing random weights in these formats (the tiny,
small, real_width and full presets) is `presets.py`; `python weights.py tiny OUT_DIR` and
`python weights.py preset NAME` still run its command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# MiniGPT-4 projection
# --------------------------------------------------------------------------------------------

def load_llama_proj(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read `llama_proj.weight` / `llama_proj.bias` from MiniGPT-4's `prerained_minigpt4_7b.pth`
    (a dict whose `model` entry holds them), through `load_untrusted`. Returns `{"weight", "bias"}`."""
    what = "MiniGPT-4 checkpoint (config key `ckpt`)"
    checkpoint = load_untrusted(path, what)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' entry ({what}), found a "
                              f"{type(checkpoint).__name__}")
    missing = [k for k in ("llama_proj.weight", "llama_proj.bias") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing {missing} ({what}); found {sorted(map(str, state))[:10]}")
    if not all(isinstance(state[k], torch.Tensor) for k in ("llama_proj.weight", "llama_proj.bias")):
        raise CheckpointError(f"{path}: `llama_proj.weight` / `llama_proj.bias` are not tensors ({what})")
    unused = sorted(k for k in state if not k.startswith("llama_proj."))
    if unused:
        log.info("%s: %d keys not used by MiniGPT-5: %s", path, len(unused), unused[:20])
    return {"weight": state["llama_proj.weight"], "bias": state["llama_proj.bias"]}


# --------------------------------------------------------------------------------------------
# MiniGPT-5 checkpoints (the release's key layout)
# --------------------------------------------------------------------------------------------

PLAIN_PREFIX = "model.llama_model."
LORA_PREFIX = "model.llama_model.base_model.model."
_SHARED_MATRICES = ("model.embed_tokens", "lm_head")


class CheckpointError(ValueError):
    """A weight file that cannot be used: one line naming the file and what was expected."""


class UnsafeCheckpointError(CheckpointError):
    """A file that needs Python objects no MiniGPT-5 file holds (loading it could run code)."""


class SavedArguments:
    """Inert stand-in for argument dataclasses pickled into a checkpoint's Lightning metadata
    (the release's `ModelArguments` / `DataArguments` / `TrainingArguments`, saved from its
    `train_eval.py` run as a script): their fields become attributes, nothing else happens."""

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:      # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise TypeError(f"SavedArguments expects a dict of fields, got {type(state).__name__}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"SavedArguments({self.__dict__!r})"


# What a Lightning `.ckpt` may hold besides tensors, numbers, strings, lists, tuples and dicts
# (which `torch.load(weights_only=True)` reads by itself): Lightning metadata. `hyper_parameters`
# of a module saved with `save_hyperparameters` may hold argparse namespaces, Lightning's
# `AttributeDict` (read as a plain dict) and the release's argument dataclasses (read as
# `SavedArguments`). Anything else is refused. Entries are classes, or (stand-in, "module.Name").
_ATTRIBUTE_DICTS = ("lightning.fabric.utilities.data.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
                    "lightning.pytorch.utilities.parsing.AttributeDict",
                    "pytorch_lightning.utilities.parsing.AttributeDict")
_RELEASE_ARGUMENTS = tuple(f"{module}.{name}" for module in ("__main__", "train_eval")
                           for name in ("ModelArguments", "DataArguments", "TrainingArguments"))
CHECKPOINT_GLOBALS: list = ([argparse.Namespace] + [(dict, name) for name in _ATTRIBUTE_DICTS]
                            + [(SavedArguments, name) for name in _RELEASE_ARGUMENTS])


def _global_name(entry) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def _file_kind_problem(path: Path) -> str | None:
    """Why `path` cannot be a `torch.save` file, judged from its first bytes (None if it can)."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return f"the zip archive is truncated or damaged ({size:,} bytes)"
        return None
    if head[:1] == b"\x80":  # a pickle: torch's legacy (pre-1.6) format
        return None
    return f"it is neither a torch.save zip archive nor a legacy torch pickle (it starts with {head!r})"


def load_untrusted(path: str | os.PathLike, what: str, allowed: list | None = None, mmap: bool = False):
    """`torch.load(path, weights_only=True)` for a file from anywhere: tensors and plain Python
    containers, plus the classes in `allowed` (default `CHECKPOINT_GLOBALS`); never runs code from
    the file. A file that needs anything else raises `UnsafeCheckpointError` naming it; an empty,
    truncated or foreign file raises `CheckpointError` ("{path}: not a readable {what}: why").

    This is the project's one rule for pickled files: every `.pth` / `.ckpt` / `.pt` any command
    reads goes through it (tests/test_config_and_weights.py checks that no other `torch.load` or
    `pickle.load` exists). With `mmap`, tensors stay in the file until used (a legacy, pre-1.6
    file cannot be mapped and is read whole)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    problem = _file_kind_problem(path)
    if problem:
        raise CheckpointError(f"{path}: not a readable {what}: {problem}")
    allowed = CHECKPOINT_GLOBALS if allowed is None else allowed
    if mmap and not zipfile.is_zipfile(path):
        log.info("%s: legacy torch.save format, read into memory (no mmap)", path)
        mmap = False
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path, allowed, str(exc))
        if names:
            raise UnsafeCheckpointError(
                f"refused to load {path}: it needs {', '.join(names)}, which no {what} contains "
                f"(unpickling it could run code from the file); nothing from it was used") from None
        raise CheckpointError(f"{path}: not a readable {what}: {_first_line(exc)}") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable {what} (truncated or damaged?): "
                              f"{type(exc).__name__}: {_first_line(exc)}") from None


def load_state_dict_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a `.safetensors` file (data only by its format) or a pickled
    torch file (through `load_untrusted`), unwrapping a `state_dict` / `model` entry. Anything else is
    a `CheckpointError` naming the file and `what`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        problem = safetensors_problem(path)
        if problem:
            raise CheckpointError(f"{path}: not a readable {what}: {problem}")
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable {what}: {_first_line(e)}") from None
    else:
        state = load_untrusted(path, what)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a {what} (a dict of named tensors), found "
                              f"{type(state).__name__ if not isinstance(state, dict) else 'other entries'}")
    return state


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a whole safetensors file, judged from its header and size (None if it is):
    an 8-byte header length, a JSON header, and tensors that end exactly at the end of the file.
    Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"the file is {'empty' if size == 0 else 'truncated'} ({size} bytes)"
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > min(size - 8, 100 << 20):
            return f"the header claims {header_size:,} bytes but the file has {size:,} (truncated or not safetensors)"
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return "the header is not JSON (truncated or not safetensors)"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "the header's tensor entries have no data_offsets"
    if 8 + header_size + end != size:
        return f"the tensors end at byte {8 + header_size + end:,} but the file has {size:,} (truncated?)"
    return None


def check_weight_files(cfg) -> None:
    """Before any model is built: every weight file the config names is a whole file of its kind
    (the LLM's and SD's safetensors by their headers and sizes, the `.pth` files by their first
    bytes), so a damaged download is one `CheckpointError` naming the file and the config key
    instead of a library's traceback in the middle of loading."""
    source = getattr(cfg, "source", "the model config")
    for key in ("llama_model", "sd_model"):
        folder = Path(getattr(cfg, key))
        if not folder.is_dir():
            continue                                    # a hub id: the library checks its own cache
        # The LLM folder itself; each part of a diffusers folder (unet/ or transformer/, vae/, text_encoder*/).
        sub = ("",) if key == "llama_model" else tuple(p.name for p in sorted(folder.iterdir()) if p.is_dir())
        for part in sub:
            index = sorted((folder / part).glob("*.safetensors.index.json"))
            files = sorted((folder / part).glob("*.safetensors"))
            for index_file in index:
                try:
                    names = set(json.loads(index_file.read_text())["weight_map"].values())
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    raise CheckpointError(f"{index_file}: not a readable safetensors index (config key `{key}` in "
                                          f"{source})") from None
                missing = sorted(n for n in names if not (index_file.parent / n).is_file())
                if missing:
                    raise CheckpointError(f"{index_file} lists {missing[:3]}, which {'is' if len(missing) == 1 else 'are'} "
                                          f"missing (config key `{key}` in {source})")
            for file in files:
                problem = safetensors_problem(file)
                if problem:
                    raise CheckpointError(f"{file}: not a readable safetensors file: {problem} (config key `{key}` "
                                          f"in {source}); download it again")
    for key in ("vit_model", "q_former_model", "ckpt"):
        path = Path(getattr(cfg, key))
        if path.is_file():
            problem = _file_kind_problem(path)
            if problem:
                raise CheckpointError(f"{path}: not a readable weight file: {problem} (config key `{key}` in "
                                      f"{source})")


def _unsafe_globals(path: Path, allowed: list, message: str) -> list[str]:
    """The Python globals `path` refers to beyond torch's safe set and `allowed`."""
    names = re.findall(r"GLOBAL (\S+)", message) + re.findall(r"unrecognized function (\S+)", message)
    try:
        with torch.serialization.safe_globals(allowed):
            names += torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError):   # a legacy-format file: the error message is all there is
        pass
    return sorted(set(names) - {_global_name(entry) for entry in allowed})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text and text[0] else type(exc).__name__


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `state_dict` of a MiniGPT-5 `.ckpt` (Lightning) or a bare state dict file, loaded
    without running code from the file (see `load_untrusted`). Anything else is a
    `CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    what = "MiniGPT-5 checkpoint (a Lightning .ckpt or a state dict saved with torch.save)"
    checkpoint = load_untrusted(path, what)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a {what}, found a {type(checkpoint).__name__}")
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: expected a {what}; entries {not_tensors[:5]!r} are not named tensors")
    if not checkpoint:
        raise CheckpointError(f"{path}: the checkpoint's state_dict is empty")
    return checkpoint


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: str | os.PathLike,
                 config: str) -> None:
    """A checkpoint made for another config: one `CheckpointError` naming the file, the first keys
    whose shapes differ, and the config the model was built from."""
    wrong = [(k, tuple(v.shape), tuple(expected[k])) for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k])]
    if wrong:
        shown = "; ".join(f"`{k}` is {found}, expected {want}" for k, found, want in wrong[:3])
        raise CheckpointError(f"{path}: {len(wrong)} tensor(s) do not fit the model built from {config} "
                              f"({shown}); was it saved with another config?")


def checkpoint_stage(path: str | os.PathLike) -> int:
    """2 if the checkpoint holds LoRA weights (a stage-2 file), else 1."""
    return 2 if any(".lora_" in key for key in read_checkpoint(path)) else 1


def translate_llm_keys(state: dict[str, torch.Tensor], lora: bool, in_place: bool = False) -> dict[str, torch.Tensor]:
    """Copy `embed_tokens` / `lm_head` matrices between the plain and the LoRA-wrapped names.

    The release's stage-1 file has `model.llama_model.model.embed_tokens.weight`; its stage-2 files
    have `model.llama_model.base_model.model.model.embed_tokens.modules_to_save.default.weight`.
    A model of either kind receives the matrix it needs from a file of either kind. A LoRA model
    whose rows train `in_place` (tied embeddings: no PEFT copies) has them under
    `model.llama_model.base_model.model.model.embed_tokens.weight`.
    """
    out = dict(state)
    for name in _SHARED_MATRICES:
        plain = f"{PLAIN_PREFIX}{name}.weight"
        saved = f"{LORA_PREFIX}{name}.modules_to_save.default.weight"
        original = f"{LORA_PREFIX}{name}.original_module.weight"
        wrapped = f"{LORA_PREFIX}{name}.weight"
        if lora and plain in state:
            for key in (wrapped,) if in_place else (saved, original):
                out.setdefault(key, state[plain])
            del out[plain]
        elif not lora and (saved in state or wrapped in state):
            out.setdefault(plain, state[saved] if saved in state else state[wrapped])
            for key in (saved, original, wrapped):
                out.pop(key, None)
    return out


if __name__ == "__main__":          # the preset builder's command line, where the README always had it
    import presets

    presets.main(sys.argv[1:])
