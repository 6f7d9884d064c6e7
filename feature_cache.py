"""The feature cache (`PREPROCESS_FEATURE_FOLDER`): per image, the projected query embeddings of an
input image (`img`) and the VAE encoder moments of a target image (`vae`), one safetensors file each,
keyed by the image's absolute path, so training can skip the ViT and the VAE encoder.
`data_commands.preprocess_features` (`python dataloader.py preprocess`) writes it; the datasets read
it (`dataset_base.MiniGPT5Dataset`). Nothing is written next to the data (the release cached its
features there by file name). Cached features are computed without flips, as the release's were.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from data_problems import DataError


FEATURE_KINDS = {"img": "input image: projected query embeddings (num_query_token x llm_hidden)",
                 "vae": "target image: VAE encoder moments, mean and logvar (8 x h x w)"}


def feature_file(folder: str | os.PathLike, split: str, kind: str, image_path: str) -> Path:
    """Where the cached feature of one image lives: `<folder>/<split>/<kind>/<sha1>.safetensors`,
    keyed by the image's absolute path (the file also records that path, checked on reading)."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"feature kind must be one of {sorted(FEATURE_KINDS)}, got {kind!r}")
    key = hashlib.sha1(os.path.abspath(image_path).encode("utf-8")).hexdigest()
    return Path(folder) / split / kind / f"{key}.safetensors"


def save_feature(path: Path, feature: torch.Tensor, image_path: str) -> None:
    """Write one feature atomically (a killed run never leaves a half-written file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"feature": feature.detach().cpu().contiguous()}, str(tmp),
              metadata={"image_path": os.path.abspath(image_path)})
    os.replace(tmp, path)


def load_feature(folder: str | os.PathLike, split: str, kind: str, image_path: str,
                 shape: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """Read one cached feature; FileNotFoundError / DataError name the image and the file. A file
    that is not a readable safetensors file, or whose feature is not a float tensor of `shape`
    (None: any size on that axis), is a DataError."""
    from safetensors import SafetensorError, safe_open

    path = feature_file(folder, split, kind, image_path)
    if not path.is_file():
        raise FileNotFoundError(f"no cached {kind} feature for {image_path} (expected {path}); run "
                                f"`python dataloader.py preprocess DATA_FILE --out {folder} --split {split}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("image_path")
            if stored != os.path.abspath(image_path):
                raise DataError(f"{path} holds the feature of {stored!r}, not of {os.path.abspath(image_path)!r}")
            feature = f.get_tensor("feature")
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable cached {kind} feature of {image_path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); delete it and run preprocess again") from None
    if shape is not None and (not feature.is_floating_point() or feature.dim() != len(shape) or any(
            want is not None and got != want for got, want in zip(feature.shape, shape))):
        want = " x ".join("any" if d is None else str(d) for d in shape)
        raise DataError(f"{path}: the cached {kind} feature of {image_path} is a {feature.dtype} tensor of shape "
                        f"{tuple(feature.shape)}, expected float {want} (made for another config?); run "
                        f"preprocess again")
    return feature
