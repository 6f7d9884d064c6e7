"""Model configuration: the YAML files in `config/` read into a typed, validated object.

Kept apart from `config/` (the data) and from `model.py` (the code that uses it) so that the
dataloader, the weight builder and the CLIs can read a config without importing torch models.

Paths in a YAML file may use `${ENV_VAR}` and `~`; relative paths are resolved against the folder
that holds the YAML file, so a config works from any working directory. `llama_model` and
`sd_model` may also be Hugging Face hub ids (`org/name`); everything else must be a local file.

Also the size caps on input files (`config/limits.yaml`, overridden by the file `MINIGPT5_LIMITS`
names): `limits()`. YAML is read with `yaml.safe_load` only (no Python tags); a file that does not
parse is a `ConfigError` naming the file and line.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm_families import FAMILY_NAMES

REPO = Path(__file__).resolve().parent
LIMITS_FILE = REPO / "config" / "limits.yaml"
LIMITS_ENV = "MINIGPT5_LIMITS"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PATH_KEYS = ("llama_model", "vit_model", "q_former_model", "ckpt", "sd_model")
HUB_ALLOWED_KEYS = ("llama_model", "sd_model")
# The dtypes a config's `dtypes` section may name (torch's names): the one home of these names.
DTYPE_NAMES = ("float32", "float16", "bfloat16")


# Keys that older configs (and MiniGPT-4's) carry but nothing reads: accepted and ignored, with a note.
IGNORED_KEYS = {
    "max_txt_len": "MiniGPT-5's data path never cut text at MiniGPT-4's max_txt_len",
    "prompt_template": "the prompts live in prompts.py",
}
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file that cannot be used as written: names the file, the key and what was expected."""


@dataclass(frozen=True)
class VisionConfig:
    """EVA ViT sizes (LAVIS `eva_vit_g.pth`), built as transformers' `Blip2VisionModel`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    layer_norm_eps: float


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 Q-Former sizes (LAVIS `blip2_pretrained_flant5xxl.pth`), built as `Blip2QFormerModel`."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    cross_attention_frequency: int
    layer_norm_eps: float


@dataclass(frozen=True)
class LoraConfig:
    """Stage-2 LoRA on the LLM (PEFT)."""

    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class MapperConfig:
    """`fc` (LLM hidden -> fc_dim -> d_model) and `llm_to_t2i_mapping` (an `nn.Transformer`)."""

    fc_dim: int
    d_model: int
    nhead: int
    num_encoder_layers: int
    num_decoder_layers: int
    dim_feedforward: int
    num_prompt_tokens: int


@dataclass(frozen=True)
class DtypeConfig:
    """Storage dtypes of the frozen parts; trainable parts are always float32."""

    vision: str = "float16"
    llm: str = "bfloat16"
    sd: str = "bfloat16"


@dataclass(frozen=True)
class ModelConfig:
    """Everything size- or path-related about a MiniGPT-5 model (one YAML file in `config/`)."""

    llama_model: str
    vit_model: str
    q_former_model: str
    ckpt: str
    sd_model: str
    vision: VisionConfig
    qformer: QFormerConfig
    lora: LoraConfig
    mapper: MapperConfig
    # Optional keys: the release's values unless a config says otherwise.
    image_size: int = 224          # the ViT's input
    llm_family: str = "vicuna"     # the LLM's family (llm_families/: vicuna, llama3, qwen2)
    sd_image_size: int = 512       # SD 2.1 base's pictures
    num_query_token: int = 32      # Q-Former queries per image
    end_sym: str = "###"           # where an answer ends
    decoder_family: str = "sd"     # the picture decoder's family (decoders.FAMILIES): sd, sdxl, sd3, flux
    dtypes: DtypeConfig = field(default_factory=DtypeConfig)
    source: str = "<in memory>"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (e.g. weights paths for a test)."""
        return dataclasses.replace(self, **changes)

    def check_paths(self) -> None:
        """Raise `ConfigError` for the first weight path that does not exist (hub ids are allowed
        for `llama_model` and `sd_model`), then `weights.CheckpointError` for the first weight file
        that is not whole (`weights.check_weight_files`: headers and sizes only, nothing loaded), then
        `ConfigError` for an `sd_model` folder of another decoder family (`decoders.check_folder`)."""
        for key in PATH_KEYS:
            value = getattr(self, key)
            if key in HUB_ALLOWED_KEYS and is_hub_id(value):
                continue
            if not Path(value).exists():
                raise ConfigError(
                    f"{self.source}: `{key}` points to {value!r}, which does not exist. "
                    f"Set `{key}` to the local file/folder (build the tiny ones with "
                    f"`python weights.py tiny OUT_DIR`)."
                )
        from decoders import check_folder
        from weights import check_weight_files

        check_weight_files(self)
        check_folder(self)          # `sd_model` is a folder of `decoder_family` (its JSON files only)


def to_dtype(name: str):
    """`"bfloat16"` -> `torch.bfloat16`: a name of `DTYPE_NAMES` (the config's `dtypes` section, the
    presets' file dtypes) as a torch dtype; ValueError naming the known ones otherwise."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def is_hub_id(value: str) -> bool:
    """True for a value that is not a local path and looks like a hub id (`org/name`)."""
    return not Path(value).exists() and bool(HUB_ID.match(value))


_SECTIONS = {
    "vision": VisionConfig,
    "qformer": QFormerConfig,
    "lora": LoraConfig,
    "mapper": MapperConfig,
    "dtypes": DtypeConfig,
}


def check_value(value: Any, kind: Any, key: str, source: str) -> Any:
    """`value` read from YAML for a field of type `kind`, checked (and a whole number given for a
    float made a float); anything else is a `ConfigError` naming the file and the key. Integers
    are sizes and counts, so they must be positive."""
    def fail(expected: str) -> ConfigError:
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
            hint = " (YAML reads a number like 1e-6 as text: write 1.0e-6)"
        return ConfigError(f"{source}: `{key}` must be {expected}, got {value!r} "
                           f"({type(value).__name__}){hint}")

    if kind is int:
        if type(value) is not int or value < 1:
            raise fail("a positive integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str) or not value.strip():
            raise fail("a non-empty string")
        return value
    if typing.get_origin(kind) is tuple:  # tuple[str, ...]: a YAML list of names
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise fail("a list of names, e.g. [q_proj, v_proj]")
        return tuple(value)
    raise TypeError(f"no check for the field type {kind!r} of `{key}`")


def _build_section(cls: type, data: Any, key: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `{key}` must be a mapping with keys {_field_names(cls)}, got {data!r}")
    unknown = sorted(set(data) - set(_field_names(cls)))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'`{key}.{u}`' for u in unknown)}; "
                          f"expected {_field_names(cls)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in data and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(f'`{key}.{m}`' for m in missing)}")
    kinds = typing.get_type_hints(cls)
    values = {name: check_value(value, kinds[name], f"{key}.{name}", source) for name, value in data.items()}
    if cls is DtypeConfig:
        for name, value in values.items():
            if value not in DTYPE_NAMES:
                raise ConfigError(f"{source}: `{key}.{name}` must be one of {', '.join(DTYPE_NAMES)}, got {value!r}")
    return cls(**values)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _resolve_path(value: str, base: Path) -> str:
    expanded = os.path.expanduser(os.path.expandvars(str(value)))
    if "$" in expanded:
        raise ConfigError(f"environment variable in {value!r} is not set")
    if os.path.isabs(expanded) or is_hub_id(expanded) and not (base / expanded).exists():
        return expanded
    return str((base / expanded).resolve())


def load_config(path: str | os.PathLike, check_paths: bool = True) -> ModelConfig:
    """Read a model YAML file into a `ModelConfig`.

    Unknown keys, missing keys, values of the wrong type (see `check_value`; e.g. `target_modules`
    must be a list, not one string) and (with `check_paths`) weight paths that do not exist raise
    `ConfigError` naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config {str(path)!r} does not exist (flag --model_config)")
    data = read_yaml(path)
    source = str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    names = _field_names(ModelConfig)
    ignored = sorted(set(data) & set(IGNORED_KEYS))
    if ignored:
        log.info("%s: ignoring %s (%s)", source, ", ".join(f"`{k}`" for k in ignored),
                 "; ".join(IGNORED_KEYS[k] for k in ignored))
    unknown = sorted(set(data) - set(names) - {"source"} - set(IGNORED_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'`{u}`' for u in unknown)}; "
                          f"expected some of {names[:-1]}")
    values: dict[str, Any] = {}
    kinds = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if f.name == "source":
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing key `{f.name}`")
            continue
        value = data[f.name]
        if f.name in _SECTIONS:
            value = _build_section(_SECTIONS[f.name], value, f.name, source)
        else:
            value = check_value(value, kinds[f.name], f.name, source)
        if f.name in PATH_KEYS:
            try:
                value = _resolve_path(value, path.parent)
            except ConfigError as e:
                raise ConfigError(f"{source}: `{f.name}`: {e}") from None
        values[f.name] = value
    from decoders import FAMILIES

    if values.get("decoder_family", ModelConfig.decoder_family) not in FAMILIES:
        raise ConfigError(f"{source}: `decoder_family` must be one of {', '.join(FAMILIES)}, "
                          f"got {values['decoder_family']!r}")
    cfg = ModelConfig(**values, source=source)
    check_llm_family_keys(cfg)
    if check_paths:
        cfg.check_paths()
    return cfg


def check_llm_family_keys(cfg: ModelConfig) -> None:
    """`llm_family` names a family of llm_families/; `end_sym` (the vicuna prompt style's end symbol)
    is left at its default by the other families, which end answers at their end of turn."""
    if cfg.llm_family not in FAMILY_NAMES:
        raise ConfigError(f"{cfg.source}: `llm_family` must be one of {', '.join(FAMILY_NAMES)}, "
                          f"got {cfg.llm_family!r}")
    if cfg.llm_family != ModelConfig.llm_family and cfg.end_sym != ModelConfig.end_sym:
        raise ConfigError(f"{cfg.source}: `end_sym` is the vicuna prompt style's; llm_family {cfg.llm_family} ends "
                          f"an answer at its chat template's end of turn: remove `end_sym`")


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file read with `yaml.safe_load` (plain data only: a `!!python/...` tag is refused, never
    run). A file that does not parse, or is not UTF-8 text, is a `ConfigError` naming it and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = " ".join(str(part) for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part)
        if isinstance(e, yaml.constructor.ConstructorError) and "tag" in what:
            what += " (Python tags are not allowed in a config file: it is data, never code)"
        raise ConfigError(f"{where}: not valid YAML: {what or type(e).__name__}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


@dataclass(frozen=True)
class Limits:
    """Size caps on input files (config/limits.yaml, which says what each one covers)."""

    max_row_bytes: int
    max_text_chars: int
    max_image_pixels: int
    max_json_depth: int
    max_shared_references: int


def limits() -> Limits:
    """The size caps in force: `config/limits.yaml`, with the keys of the YAML file named by the
    environment variable MINIGPT5_LIMITS (read now) on top. Unknown keys and values that are not
    whole numbers >= 0 are a `ConfigError` naming the file and the key."""
    override = os.environ.get(LIMITS_ENV) or None
    stamps = tuple(_mtime(p) for p in (LIMITS_FILE, override) if p)
    return _read_limits(override, stamps)


def _mtime(path: str | os.PathLike) -> float | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _read_limits(override: str | None, _stamps: tuple) -> Limits:
    names = _field_names(Limits)
    values: dict[str, int] = {}
    for path in (LIMITS_FILE, override):
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError(f"limits file {str(path)!r} does not exist ({LIMITS_ENV})")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of {', '.join(names)}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(f'`{k}`' for k in unknown)}; expected some of {names}")
        for key, value in data.items():
            if type(value) is not int or value < 0:
                raise ConfigError(f"{path}: `{key}` must be a whole number >= 0, got {value!r}")
            values[key] = value
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"{LIMITS_FILE}: missing key(s) {', '.join(f'`{m}`' for m in missing)}")
    return Limits(**values)


def dump_config(cfg: ModelConfig, path: str | os.PathLike) -> None:
    """Write a `ModelConfig` as YAML (the inverse of `load_config`; paths written as given)."""
    data = dataclasses.asdict(cfg)
    data.pop("source")
    data["lora"]["target_modules"] = list(data["lora"]["target_modules"])
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
