"""Readers for the two LAVIS weight files of MiniGPT-5's frozen image side.

- `eva_vit_g.pth`: EVA-CLIP ViT-g as a bare state dict (`patch_embed.proj.*`, `cls_token`, `pos_embed`,
  `blocks.{i}.*`), read into transformers' `Blip2VisionModel`.
- `blip2_pretrained_flant5xxl.pth`: the BLIP-2 checkpoint (`{"model": state_dict}`), of which only
  `ln_vision.*` (-> the vision model's `post_layernorm`), the query path of `Qformer.bert.*` and
  `query_tokens` are used, read into transformers' `Blip2QFormerModel` plus a `query_tokens` parameter.

Keys the model does not use (the ViT file's 40th block, the Q-Former's text path and LM head, the other
BLIP-2 heads) are reported by name in one logging warning; a missing key or a wrong shape is an error
that names the file and the key. `write_tiny_lavis` writes small random files in the same key layout for
tests and smoke runs.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

logger = logging.getLogger(__name__)

VIT_FILE_NAME = "eva_vit_g.pth"
BLIP2_FILE_NAME = "blip2_pretrained_flant5xxl.pth"
QFORMER_PREFIX = "Qformer.bert."


class LavisCheckpointError(ValueError):
    """A LAVIS weight file that cannot be read into the model: names the file, the key and the problem."""


class LavisMissingKeyError(LavisCheckpointError, KeyError):
    """A key the model needs is absent from a LAVIS weight file (both a `KeyError` and a `ValueError`)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------------
# Building the empty modules
# ----------------------------------------------------------------------------------------------------


def build_vision_model(vision: Any, image_size: int) -> Blip2VisionModel:
    """An (untrained, eval-mode) `Blip2VisionModel` with the EVA ViT sizes of `vision`.

    `vision` has `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`,
    `patch_size` and `layer_norm_eps` (see `configuration.VisionConfig`). The model's `post_layernorm`
    plays LAVIS/MiniGPT-4's `ln_vision`, so `last_hidden_state` is the ViT output after `ln_vision`.
    Built under `with torch.device("meta"):` it allocates no memory.
    """
    config = Blip2VisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=image_size,
        patch_size=vision.patch_size,
        hidden_act="gelu",
        layer_norm_eps=vision.layer_norm_eps,
        attention_dropout=0.0,
        qkv_bias=True,
    )
    return Blip2VisionModel(config).eval()


def build_qformer(qformer: Any, vision_hidden_size: int,
                  num_query_token: int) -> tuple[Blip2QFormerModel, nn.Parameter]:
    """An (untrained, eval-mode) query-path-only `Blip2QFormerModel` and its `query_tokens` parameter.

    `qformer` has `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`,
    `cross_attention_frequency` and `layer_norm_eps` (see `configuration.QFormerConfig`). The text path
    is left out (`use_qformer_text_input=False`); cross-attention reads `vision_hidden_size`-wide image
    features. Dropout is set to 0: the Q-Former is frozen and the release always runs it in eval mode,
    so this keeps it deterministic even if a parent module is put in training mode.
    Returns `(model, query_tokens)` with `query_tokens` of shape `(1, num_query_token, hidden_size)`.
    """
    config = Blip2QFormerConfig(
        hidden_size=qformer.hidden_size,
        num_hidden_layers=qformer.num_hidden_layers,
        num_attention_heads=qformer.num_attention_heads,
        intermediate_size=qformer.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=qformer.layer_norm_eps,
        cross_attention_frequency=qformer.cross_attention_frequency,
        encoder_hidden_size=vision_hidden_size,
        use_qformer_text_input=False,
    )
    model = Blip2QFormerModel(config).eval()
    query_tokens = nn.Parameter(torch.empty(1, num_query_token, qformer.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
    return model, query_tokens


# ----------------------------------------------------------------------------------------------------
# Key maps: transformers name -> LAVIS name
# ----------------------------------------------------------------------------------------------------


def _vision_key_map(num_layers: int) -> dict[str, str]:
    """`Blip2VisionModel` parameter -> `eva_vit_g.pth` key (the qkv bias is built separately)."""
    mapping = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    }
    pairs = [("layer_norm1", "norm1"), ("self_attn.qkv", "attn.qkv"), ("self_attn.projection", "attn.proj"),
             ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    for i in range(num_layers):
        for ours, theirs in pairs:
            for kind in ("weight", "bias"):
                if ours == "self_attn.qkv" and kind == "bias":
                    continue  # cat(q_bias, 0, v_bias), see _QKV_BIAS
                mapping[f"encoder.layers.{i}.{ours}.{kind}"] = f"blocks.{i}.{theirs}.{kind}"
    return mapping


def _qformer_key_map(num_layers: int, cross_attention_frequency: int) -> dict[str, str]:
    """`Blip2QFormerModel` parameter -> `blip2_pretrained_flant5xxl.pth` key."""
    p = QFORMER_PREFIX
    mapping = {"layernorm.weight": f"{p}embeddings.LayerNorm.weight",
               "layernorm.bias": f"{p}embeddings.LayerNorm.bias"}
    for i in range(num_layers):
        ours, theirs = f"encoder.layer.{i}.", f"{p}encoder.layer.{i}."
        pairs = []
        blocks = ["attention"] + (["crossattention"] if i % cross_attention_frequency == 0 else [])
        for block in blocks:
            pairs += [(f"{block}.attention.{proj}", f"{block}.self.{proj}") for proj in ("query", "key", "value")]
            pairs += [(f"{block}.output.dense", f"{block}.output.dense"),
                      (f"{block}.output.LayerNorm", f"{block}.output.LayerNorm")]
        pairs += [("intermediate_query.dense", "intermediate_query.dense"),
                  ("output_query.dense", "output_query.dense"),
                  ("output_query.LayerNorm", "output_query.LayerNorm")]
        for a, b in pairs:
            for kind in ("weight", "bias"):
                mapping[f"{ours}{a}.{kind}"] = f"{theirs}{b}.{kind}"
    return mapping


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A LAVIS `.pth` file as a flat state dict: accepts `{"model": sd}` and a bare `sd`.

    The file is read by `weights.load_untrusted` (no code from it runs) and memory-mapped: tensors
    are read from disk when used, and a tensor kept in the file's dtype stays a view of the file
    instead of a copy in memory. Files in PyTorch's legacy (pre-1.6) format cannot be mapped and
    are read whole (logged)."""
    from weights import load_untrusted

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAVIS weight file {str(path)!r} does not exist")
    obj = load_untrusted(path, "LAVIS weight file (config key `vit_model` / `q_former_model`)", mmap=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise LavisCheckpointError(f"{path}: expected a state dict (or {{'model': state_dict}}), "
                                   f"found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise LavisCheckpointError(f"{path}: expected a state dict of tensors; entries {bad[:5]!r} are not "
                                   f"name -> tensor (top-level keys: {sorted(map(str, obj))[:10]})")
    return dict(obj)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _require(sd: Mapping[str, torch.Tensor], keys: Iterable[str], path: Path, what: str) -> None:
    missing = sorted({k for k in keys if k not in sd}, key=_natural_key)
    if missing:
        shown = ", ".join(f"`{k}`" for k in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise LavisMissingKeyError(f"{path}: missing key {shown}{more} needed for the {what}; is this the right "
                                   f"file for the configured sizes?")


def _check_shape(tensor: torch.Tensor, expected: torch.Size | tuple[int, ...], path: Path, key: str,
                 target: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise LavisCheckpointError(f"{path}: `{key}` has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
                                   f"(for `{target}`); the configured sizes do not match this file")


# Keys of the BLIP-2 file that MiniGPT-4's Q-Former does not use by design: the text path (word and
# position embeddings, each layer's text FFN `intermediate`/`output`), the BLIP-2 heads, and
# `ln_vision`, which `load_eva_vit` reads.
_QFORMER_UNUSED_BY_DESIGN = re.compile(
    r"^(Qformer\.cls\.|Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)"
    r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|ln_vision\.|vision_proj\.|text_proj\."
    r"|itm_head\.|t5_proj\.|temp$)")


def _report_unused(sd: Mapping[str, torch.Tensor], used: set[str], path: Path, what: str,
                   by_design=lambda key: False) -> list[str]:
    """Log the file's keys that `what` did not read: those unused `by_design` at INFO (they are in
    every real file), any other at WARNING (a file of another layout or version). Returns all."""
    unused = sorted((k for k in sd if k not in used), key=_natural_key)
    expected = [k for k in unused if by_design(k)]
    surprising = [k for k in unused if not by_design(k)]
    if expected:
        logger.info("%s: %d key(s) not used by the %s, as designed: %s", path, len(expected), what,
                    ", ".join(expected))
    if surprising:
        logger.warning("%s: %d key(s) not used by the %s: %s", path, len(surprising), what, ", ".join(surprising))
    return unused


def _assign(module: nn.Module, values: dict[str, torch.Tensor], what: str, dtype: torch.dtype | None) -> None:
    """Fill `module` with `values` (all keys, checked by the caller).

    A module built on the meta device (no memory yet) takes the values themselves, cast to `dtype`
    (else to the module's dtypes): a tensor already in that dtype stays a view of the memory-mapped
    file, so loading makes no second copy. A module with real tensors gets the values copied in,
    then is cast to `dtype`.
    """
    own = module.state_dict()
    if set(own) != set(values):
        # The key maps above are written against transformers' Blip2 layout; this fires if it changes.
        raise RuntimeError(f"internal: the {what} key map does not match the module (module only: "
                           f"{sorted(set(own) - set(values))[:5]}, map only: {sorted(set(values) - set(own))[:5]})")
    if any(t.is_meta for t in own.values()):
        module.load_state_dict({k: v.to(dtype or own[k].dtype) for k, v in values.items()}, strict=True, assign=True)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"internal: the {what} still has meta tensors after loading: {left[:5]}")
        return
    module.load_state_dict(values, strict=True)
    if dtype is not None:
        module.to(dtype=dtype)


def load_eva_vit(model: Blip2VisionModel, vit_path: str | Path, blip2_path: str | Path,
                 dtype: torch.dtype | None = None) -> None:
    """Fill `model` (from `build_vision_model`) from LAVIS's `eva_vit_g.pth` and BLIP-2's `ln_vision`.

    The ViT file's keys have no prefix; each block's qkv bias is `cat(q_bias, zeros, v_bias)` (EVA has no
    key bias). `ln_vision.weight/bias` from the BLIP-2 file go into `post_layernorm`. ViT-file keys that
    are not used (the real file's 40th block) are logged at INFO level, any others in one warning; a missing key raises
    `LavisMissingKeyError` and a wrong shape `LavisCheckpointError`, both naming the file and the key.
    With `dtype`, the model's parameters are cast to it (the release runs the ViT in fp16). A model
    built on the meta device is filled without a second copy of the file (see `_assign`).
    """
    vit_path, blip2_path = Path(vit_path), Path(blip2_path)
    vit_sd = _read_state_dict(vit_path)
    blip2_sd = _read_state_dict(blip2_path)
    config = model.config
    num_layers, hidden = config.num_hidden_layers, config.hidden_size
    targets = model.state_dict()

    key_map = _vision_key_map(num_layers)
    bias_keys = {f"encoder.layers.{i}.self_attn.qkv.bias": (f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias")
                 for i in range(num_layers)}
    ln_map = {"post_layernorm.weight": "ln_vision.weight", "post_layernorm.bias": "ln_vision.bias"}
    _require(vit_sd, [*key_map.values(), *(k for pair in bias_keys.values() for k in pair)], vit_path,
             f"EVA ViT ({num_layers} blocks)")
    _require(blip2_sd, ln_map.values(), blip2_path, "vision model's `ln_vision` (post_layernorm)")

    values: dict[str, torch.Tensor] = {}
    for ours, theirs in key_map.items():
        _check_shape(vit_sd[theirs], targets[ours].shape, vit_path, theirs, ours)
        values[ours] = vit_sd[theirs]
    for ours, (q_key, v_key) in bias_keys.items():
        q_bias, v_bias = vit_sd[q_key], vit_sd[v_key]
        _check_shape(q_bias, (hidden,), vit_path, q_key, ours)
        _check_shape(v_bias, (hidden,), vit_path, v_key, ours)
        values[ours] = torch.cat((q_bias, torch.zeros_like(q_bias), v_bias))
    for ours, theirs in ln_map.items():
        _check_shape(blip2_sd[theirs], targets[ours].shape, blip2_path, theirs, ours)
        values[ours] = blip2_sd[theirs]

    _assign(model, values, "vision model", dtype)
    used = set(key_map.values()) | {k for pair in bias_keys.values() for k in pair}
    # The release drops EVA-CLIP's last block(s): blocks past `num_layers` are unused by design.
    past_depth = re.compile(r"^blocks\.(\d+)\.")
    _report_unused(vit_sd, used, vit_path, f"EVA ViT ({num_layers} blocks)",
                   lambda key: bool(m := past_depth.match(key)) and int(m.group(1)) >= num_layers)


def load_qformer(qformer_model: Blip2QFormerModel, query_tokens: nn.Parameter, blip2_path: str | Path,
                 dtype: torch.dtype | None = None) -> None:
    """Fill `qformer_model` and `query_tokens` (from `build_qformer`) from the BLIP-2 LAVIS file.

    Reads the query path of `Qformer.bert.*` (`embeddings.LayerNorm` -> `layernorm`; per layer
    `attention.self.{query,key,value}` -> `attention.attention.*`, `attention.output.*`, the same for
    `crossattention` on every `cross_attention_frequency`-th layer, `intermediate_query`, `output_query`)
    and `query_tokens`. Everything else in the file (word/position embeddings, the text-path
    `intermediate`/`output`, `Qformer.cls.*`, `ln_vision.*` which `load_eva_vit` reads, the other BLIP-2
    heads) is logged by name at INFO level; any other unused key in one warning. A missing key raises `LavisMissingKeyError`, a wrong shape
    `LavisCheckpointError`, both naming the file and the key. With `dtype`, the Q-Former's parameters and
    `query_tokens` are cast to it. A Q-Former built on the meta device is filled without a second copy
    (see `_assign`); `query_tokens` must be a real tensor (it is filled in place).
    """
    if query_tokens.is_meta:
        raise ValueError("query_tokens is on the meta device; build it on a real device before loading")
    blip2_path = Path(blip2_path)
    sd = _read_state_dict(blip2_path)
    config = qformer_model.config
    key_map = _qformer_key_map(config.num_hidden_layers, config.cross_attention_frequency)
    what = f"Q-Former ({config.num_hidden_layers} layers, cross-attention every {config.cross_attention_frequency})"
    _require(sd, [*key_map.values(), "query_tokens"], blip2_path, what)

    targets = qformer_model.state_dict()
    values: dict[str, torch.Tensor] = {}
    for ours, theirs in key_map.items():
        _check_shape(sd[theirs], targets[ours].shape, blip2_path, theirs, ours)
        values[ours] = sd[theirs]
    _check_shape(sd["query_tokens"], query_tokens.shape, blip2_path, "query_tokens", "query_tokens")

    _assign(qformer_model, values, "Q-Former", dtype)
    with torch.no_grad():
        query_tokens.copy_(sd["query_tokens"])
    _report_unused(sd, set(key_map.values()) | {"query_tokens"}, blip2_path, what,
                   lambda key: bool(_QFORMER_UNUSED_BY_DESIGN.match(key)))
    if dtype is not None:
        query_tokens.data = query_tokens.data.to(dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Tiny files in the real layout
# ----------------------------------------------------------------------------------------------------


class _Random:
    """Deterministic random tensors (std 0.02, LayerNorm weights near 1, non-zero biases), made in
    `dtype` one tensor at a time (so a full-size file never exists in float32 in memory)."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def normal(self, *shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.generator) * std + mean).to(self.dtype)

    def linear(self, sd: dict[str, torch.Tensor], name: str, out_features: int, in_features: int) -> None:
        sd[f"{name}.weight"] = self.normal(out_features, in_features)
        sd[f"{name}.bias"] = self.normal(out_features)

    def layer_norm(self, sd: dict[str, torch.Tensor], name: str, size: int) -> None:
        sd[f"{name}.weight"] = self.normal(size, mean=1.0, std=0.05)
        sd[f"{name}.bias"] = self.normal(size)


@dataclass(frozen=True)
class Blip2TextSizes:
    """Sizes of the BLIP-2 file's parts that MiniGPT-5 never reads (BERT's word and position
    embeddings, the ITC/ITM heads, `t5_proj`). Tiny by default; the real file has BERT-base's."""

    vocab_size: int = 64
    max_position_embeddings: int = 32
    embed_dim: int = 16
    t5_hidden_size: int = 24


def _tiny_vit_state_dict(rng: _Random, vision: Any, image_size: int) -> dict[str, torch.Tensor]:
    h, p = vision.hidden_size, vision.patch_size
    sd: dict[str, torch.Tensor] = {
        "cls_token": rng.normal(1, 1, h),
        "pos_embed": rng.normal(1, (image_size // p) ** 2 + 1, h),
        "patch_embed.proj.weight": rng.normal(h, 3, p, p),
        "patch_embed.proj.bias": rng.normal(h),
    }
    for i in range(vision.num_hidden_layers + 1):  # one block more than used, like the real 40th
        b = f"blocks.{i}."
        rng.layer_norm(sd, b + "norm1", h)
        sd[b + "attn.q_bias"] = rng.normal(h)
        sd[b + "attn.v_bias"] = rng.normal(h)
        sd[b + "attn.qkv.weight"] = rng.normal(3 * h, h)
        rng.linear(sd, b + "attn.proj", h, h)
        rng.layer_norm(sd, b + "norm2", h)
        rng.linear(sd, b + "mlp.fc1", vision.intermediate_size, h)
        rng.linear(sd, b + "mlp.fc2", h, vision.intermediate_size)
    return sd


def _tiny_blip2_state_dict(rng: _Random, vision: Any, qformer: Any, num_query_token: int,
                           text: Blip2TextSizes) -> dict[str, torch.Tensor]:
    h, f, vh = qformer.hidden_size, qformer.intermediate_size, vision.hidden_size
    p = QFORMER_PREFIX
    sd: dict[str, torch.Tensor] = {
        f"{p}embeddings.position_ids": torch.arange(text.max_position_embeddings).unsqueeze(0),
        f"{p}embeddings.word_embeddings.weight": rng.normal(text.vocab_size, h),
        f"{p}embeddings.position_embeddings.weight": rng.normal(text.max_position_embeddings, h),
    }
    rng.layer_norm(sd, f"{p}embeddings.LayerNorm", h)
    for i in range(qformer.num_hidden_layers):
        b = f"{p}encoder.layer.{i}."
        blocks = [("attention", h)]
        if i % qformer.cross_attention_frequency == 0:
            blocks.append(("crossattention", vh))
        for block, kv_width in blocks:
            rng.linear(sd, f"{b}{block}.self.query", h, h)
            rng.linear(sd, f"{b}{block}.self.key", h, kv_width)
            rng.linear(sd, f"{b}{block}.self.value", h, kv_width)
            rng.linear(sd, f"{b}{block}.output.dense", h, h)
            rng.layer_norm(sd, f"{b}{block}.output.LayerNorm", h)
        for path in ("", "_query"):  # text path (unused) and query path
            rng.linear(sd, f"{b}intermediate{path}.dense", f, h)
            rng.linear(sd, f"{b}output{path}.dense", h, f)
            rng.layer_norm(sd, f"{b}output{path}.LayerNorm", h)
    c = "Qformer.cls.predictions."
    sd[c + "bias"] = rng.normal(text.vocab_size)
    rng.linear(sd, c + "transform.dense", h, h)
    rng.layer_norm(sd, c + "transform.LayerNorm", h)
    rng.linear(sd, c + "decoder", text.vocab_size, h)
    sd["query_tokens"] = rng.normal(1, num_query_token, h)
    rng.layer_norm(sd, "ln_vision", vh)
    # Other BLIP-2 heads that MiniGPT-4/5 ignore.
    rng.linear(sd, "vision_proj", text.embed_dim, h)
    rng.linear(sd, "text_proj", text.embed_dim, h)
    rng.linear(sd, "itm_head", 2, h)
    sd["temp"] = torch.tensor(0.07, dtype=rng.dtype)
    rng.linear(sd, "t5_proj", text.t5_hidden_size, h)
    return sd


def write_tiny_lavis(out_dir: str | Path, vision: Any, qformer: Any, num_query_token: int, image_size: int,
                     seed: int = 0, vit_dtype: torch.dtype = torch.float32, blip2_dtype: torch.dtype = torch.float32,
                     text: Blip2TextSizes = Blip2TextSizes()) -> tuple[Path, Path]:
    """Write random `eva_vit_g.pth` and `blip2_pretrained_flant5xxl.pth` in LAVIS's key layout.

    The ViT file is a bare state dict with one block more than `vision.num_hidden_layers` (like the
    real file's 40th block); the BLIP-2 file is `{"model": sd}` with the full `Qformer.bert.*` (text path
    included), `Qformer.cls.*`, `query_tokens`, `ln_vision.*` and a few other BLIP-2 heads. Values are
    deterministic in `seed`: weights and biases ~ N(0, 0.02) (every bias non-zero), LayerNorm weights
    ~ N(1, 0.05), stored in `vit_dtype` / `blip2_dtype` (the real files: float16 / float32). The parts
    MiniGPT-5 never reads have the `text` sizes (tiny by default). Each file is built in its own
    dtype and written before the next is made, so the full-size ViT needs its 2 GB and no more.
    Returns `(vit_path, blip2_path)`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = _Random(seed, vit_dtype)
    vit_path, blip2_path = out_dir / VIT_FILE_NAME, out_dir / BLIP2_FILE_NAME
    torch.save(_tiny_vit_state_dict(rng, vision, image_size), vit_path)
    rng.dtype = blip2_dtype
    torch.save({"model": _tiny_blip2_state_dict(rng, vision, qformer, num_query_token, text)}, blip2_path)
    return vit_path, blip2_path


def save_lavis(model: Blip2VisionModel, qformer_model: Blip2QFormerModel, query_tokens: nn.Parameter,
               vit_path: str | Path, blip2_path: str | Path) -> None:
    """Write trained weights back into existing LAVIS files (the inverse of `load_eva_vit` +
    `load_qformer`): the ViT into `eva_vit_g.pth` (the fused qkv bias split into `q_bias` / `v_bias`;
    its key slice must be zero, as EVA has none), `post_layernorm` into BLIP-2's `ln_vision`, the
    query path and `query_tokens` into `blip2_pretrained_flant5xxl.pth`. Keys the loaders do not read
    (the text path, other heads, the extra block) keep their values. Used by the toy world, whose
    image side is trained (MiniGPT-4's captioning stage)."""
    vit_path, blip2_path = Path(vit_path), Path(blip2_path)
    vit_sd = _read_state_dict(vit_path)
    from weights import load_untrusted

    blip2_file = load_untrusted(blip2_path, "LAVIS weight file (BLIP-2)")
    blip2_sd = blip2_file["model"] if isinstance(blip2_file, Mapping) and "model" in blip2_file else blip2_file
    ours = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    config = model.config
    for name, theirs in _vision_key_map(config.num_hidden_layers).items():
        vit_sd[theirs] = ours[name]
    hidden = config.hidden_size
    for i in range(config.num_hidden_layers):
        bias = ours[f"encoder.layers.{i}.self_attn.qkv.bias"]
        if bias[hidden:2 * hidden].abs().max() > 0:
            raise ValueError(f"layer {i}: the qkv key bias is not zero; an EVA ViT file cannot hold it")
        vit_sd[f"blocks.{i}.attn.q_bias"], vit_sd[f"blocks.{i}.attn.v_bias"] = bias[:hidden], bias[2 * hidden:]
    blip2_sd["ln_vision.weight"], blip2_sd["ln_vision.bias"] = ours["post_layernorm.weight"], ours["post_layernorm.bias"]
    q_ours = {k: v.detach().float().cpu().clone() for k, v in qformer_model.state_dict().items()}
    q_config = qformer_model.config
    for name, theirs in _qformer_key_map(q_config.num_hidden_layers, q_config.cross_attention_frequency).items():
        blip2_sd[theirs] = q_ours[name]
    blip2_sd["query_tokens"] = query_tokens.detach().float().cpu().clone()
    # Into new files, then renamed over the old ones: the loaders map these files into memory, and
    # rewriting a mapped file in place would pull the weights from under a model still using them.
    for obj, path in ((vit_sd, vit_path), ({"model": blip2_sd} if blip2_sd is not blip2_file else blip2_sd, blip2_path)):
        partial = path.with_name(path.name + ".partial")
        torch.save(obj, partial)
        os.replace(partial, path)
