"""Picture-decoder families: one module per family, registered in `FAMILIES` (the config key
`decoder_family`; default `sd`, the release's Stable Diffusion 1.x / 2.x).

A family module declares
    NAME, PIPELINES         its name and the diffusers pipeline classes its folders' model_index.json names
    DENOISER, is_denoiser(config)   the denoiser's subfolder, and whether its config.json is this family's
    POOLED                  whether it reads a pooled embedding (the mapper then has `t2i_pooled_mapping`)
    load(cfg, device)       the decoder object, its sizes checked against the config (ValueError naming the key)
    load_text_encoder(cfg, device)   its text encoder(s), frozen, float32 (one module)
    write_tiny(out_dir, arch, cfg, seed)   a random folder in the real diffusers layout (presets)

and the decoder object offers what the model, `generate`, the SD baseline and offload ask:
    condition (a `ConditionSpec`), parts (frozen modules by name), image_size, noise_scheduler, tokenizer,
    latents, loss, encode_captions, pipeline, draw, draw_captions, offloaded, fast_pictures, family.
docs/architecture.md says how to add a family.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from configuration import ConfigError
from decoders.base import Condition, ConditionSpec, as_condition, caption_mse, encode_cached, read_json

# family name -> module: the one place a family is registered.
FAMILIES = {"sd": "decoders.sd", "sdxl": "decoders.sdxl", "sd3": "decoders.sd3", "flux": "decoders.flux"}

__all__ = ["FAMILIES", "Condition", "ConditionSpec", "as_condition", "caption_mse", "check_folder", "encode_cached",
           "folder_family", "get_family", "load_decoder"]


def get_family(name: str) -> ModuleType:
    """The module of decoder family `name`; ValueError naming `decoder_family` otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown `decoder_family` {name!r}; expected one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def folder_family(folder: str | Path) -> tuple[str | None, str]:
    """(family, evidence) of a local diffusers folder, read from its JSON files only: model_index.json's
    pipeline class, else the denoiser's config (each family's `is_denoiser`); (None, why) when
    neither says."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    if index is not None and "_class_name" in index:
        name = index["_class_name"]
        for family in FAMILIES:
            if name in get_family(family).PIPELINES:
                return family, f"{folder / 'model_index.json'} names {name}"
        return None, f"{folder / 'model_index.json'} names {name}, which no decoder family reads"
    for family in FAMILIES:
        module = get_family(family)
        config = read_json(folder / module.DENOISER / "config.json")
        if config is not None and module.is_denoiser(config):
            return family, f"{folder / module.DENOISER / 'config.json'} is a {family} denoiser"
    return None, f"{folder} has no model_index.json and no denoiser config.json a decoder family reads"


def check_folder(cfg) -> None:
    """Before any weights load: the folder `sd_model` is one of `decoder_family`'s (a hub id is left to
    the library). A folder of another family is a `ConfigError` naming both keys."""
    folder = Path(cfg.sd_model)
    if not folder.is_dir():
        return
    found, evidence = folder_family(folder)
    if found != cfg.decoder_family:
        fix = (f"set `decoder_family: {found}` or point `sd_model` at a {cfg.decoder_family} folder" if found
               else f"point `sd_model` at a {cfg.decoder_family} folder")
        raise ConfigError(f"{cfg.source}: `decoder_family` is {cfg.decoder_family!r} but `sd_model` {str(folder)!r} is "
                          f"{f'a {found!r} folder' if found else 'no decoder family folder'} ({evidence}); {fix}")


def load_decoder(cfg, device=None):
    """The decoder of `cfg` (`decoder_family`, `sd_model`): the folder checked first (`check_folder`),
    then its parts loaded (on the meta device: configs only) and its sizes checked against the config."""
    check_folder(cfg)
    return get_family(cfg.decoder_family).load(cfg, device)
