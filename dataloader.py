"""The three datasets of MiniGPT-5 (CC3M, VIST, MMDialog), image transforms, the feature cache and
the collator, as the release reads them.

    data file ──► index (once, at construction): which samples exist, in the release's order
              ──► sample(i): task name, source, target, caption, input/output image paths
                  (pure text; no tokenizer, no image is opened: this is what the dump prints)
              ──► dataset[i]: + token ids and labels, image tensors (or cached features)
              ──► Collator: the model's batch (padded ids, labels, stacked images)

Item (`dataset[i]`, a dict): `task_name`, `source`, `target`, `caption` (str or None),
`input_image_paths` (list), `output_image_path` (str or None), `location` (file:line of the
sample), `input_ids` and `labels` (1-D LongTensors: source ids then target ids, tokenized without
special tokens; labels are -100 over the source and over [IMG1]..[IMG6]; BOS is added by the
model), `input_images` (n_in, 3, S, S) with n_in = number of <ImageHere> in the source,
`output_image` (3, SD, SD) in [-1, 1] (zeros when there is none), `has_output_image` (bool),
`num_truncated_tokens` (int). With a feature cache, `input_images`/`output_image` are None and
`input_image_features` (n_in, num_query_token, llm_hidden) / `output_image_features`
(8, SD/f, SD/f, or None) are given instead.

Batch (`Collator(tokenizer)(items)`): `input_ids`, `attention_mask`, `labels` (B, T), right
padded (pad = eos, label -100); `input_images` (N_total, 3, S, S) (all samples' input images in
order; (0, 3, S, S) when none); `output_images` (B, 3, SD, SD); `has_output_image` (B,) bool;
`captions`, `task_names`, `sources`, `targets`, `input_image_paths`, `output_image_paths`,
`locations` (lists); `num_dropped` (int); with cached features `input_image_features` and
`output_image_features` (None when the batch has none) instead of the image tensors.

Choices, and where they differ from the release:
- Template choice and training flips use `random.Random(f"{seed}-...-{task_name}")`, so a
  dataset is reproducible and identical for any number of DataLoader workers. Flips also depend on
  `dataset.set_epoch(epoch)` (call it every epoch for fresh flips). Each image of a sample (every
  input image and the target) draws its own flip, independently, as the release's transforms did.
- Text length: the release tokenized with `truncation=True, max_length=tokenizer.model_max_length`
  (MiniGPT-4's `max_txt_len` is not used by MiniGPT-5's data path). Here the limit is
  `max_length` (default: `tokenizer.model_max_length` when it is a real number) on source + target
  text tokens. The target is never cut; the source is cut from the left, and every <ImageHere>
  cut away takes its image with it (`input_image_paths` lists the images actually used). A target
  that alone exceeds the limit makes the sample bad (see below).
- Bad input never silently changes the data. Malformed rows/lines, empty captions, missing
  columns, image ids without a mapping: the sample is skipped, counted per reason in
  `dataset.problems`, and logged with file and line; totals are logged after indexing. With
  `strict=True` the first problem raises `DataError` naming file and line. Image files are
  checked when loaded (checking 3.3 M files at indexing would take minutes): an unreadable image
  raises `DataError` (strict) or is logged and counted, and `dataset[i]` returns None; the
  Collator drops None items (counted in `num_dropped`) and returns None when nothing is left --
  the training step must skip a None batch. Never is another sample substituted. (Each
  DataLoader worker counts in its own copy of `dataset.problems`; its log lines are the record.)
  Text containing `[IMGk]` or `<ImageHere>` (which would tokenize to vokens / image slots) is
  bad input too.
- MMDialog's release rules (stop a conversation at an empty / `.jpg` / over-long turn, a missing
  image, a known-broken id) are kept. A missing image is also reported as a problem (so `strict`
  raises on it); the other stops are release rules and only counted (`dataset.problems.rules`).
- Image paths in CC3M / VIST files are relative to the data file's folder (the release joined
  them to DATAFOLDER, which is that folder in its layout); pass `image_root` to change it.
- An image path that leaves that folder (`../../x.jpg`, an absolute path elsewhere; MMDialog media
  ids such as `../x`) is bad input: refused, counted and logged like a bad row (the story or
  conversation is cut there), unless `allow_outside_paths=True` (`--allow_outside_paths`). The
  written path is checked when the file is indexed; symbolic links are resolved when the image is
  opened, and one that points outside the folder is refused by the same rule (a sample dropped
  from its batch), so a mounted image store linked into the folder needs `--allow_outside_paths`.
- Size caps (config/limits.yaml, `configuration.limits()`): a row or JSON line longer than
  `max_row_bytes` (read with a bounded reader, never whole), a caption / step / turn longer than
  `max_text_chars`, JSON nested deeper than `max_json_depth`, a picture of more than
  `max_image_pixels` (checked from its header) are bad input like the rest.
- Cached features are computed without flips (as the release's preprocessing), so training from
  the cache has no flip augmentation.
- The release cached its index as a pickle next to the data and read features from
  `PREPROCESS_FEATURE_FOLDER` by file name; nothing is written next to the data here, and the
  feature cache is keyed by the image's absolute path (see `feature_file`).

CLI (data_commands.py; this module builds no model):
    python dataloader.py DATA_FILE [--split train|test] [--limit N] [--strict]
                         [--model_config config/tiny.yaml] [--dataset_type T]   # one JSON per sample
    (DATA_FILE may also be CC3M WebDataset shards: 'cc3m/{00000..00009}.tar', a glob, a folder; shards.py)
    python dataloader.py preprocess DATA_FILE [--out outputs/features] [--split ...] [--batch_size N]
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from PIL import Image

from constants import IMAGE_PLACEHOLDER, IMAGE_SLOT, RESERVED_TOKENS, SEED, VOKENS
from configuration import limits
from constants import find_data, preprocess_feature_folder
from dataset_specs import NAMES as DATASET_TYPES, SPECS, DatasetSpec, resolve_dataset_type, spec  # noqa: F401
from image_transforms import IMAGE_ERRORS, image_processor, load_rgb, target_transform
# The release's prompts (importable from here too, as before they moved to prompts.py).
from prompts import (CC3M_INSTRUCTION, CC3M_PROMPTS, CC3M_SYSTEM, MMDIALOG_SYSTEM, VIST_GENERATION,  # noqa: F401
                     VIST_MULTIMODAL, VIST_SYSTEM, VIST_UNDERSTANDING, VOKEN_TARGET, speaker, vist_context)

log = logging.getLogger("dataloader")

CC3M_INSTRUCTION_EVERY = 100
MMDIALOG_BROKEN_IDS = frozenset({"-3872362534310063124", "3713630103994725971"})
MMDIALOG_MAX_TURN_TOKENS = 50



# --------------------------------------------------------------------------------------------
# Problems: counted, logged with file and line, or raised in strict mode
# --------------------------------------------------------------------------------------------

class DataError(ValueError):
    """Bad input that cannot be used: names the file and line (or key) and what is wrong."""


class ProblemLog:
    """Counts bad input per reason and logs each case with its location (the first `max_logged`
    per reason one by one, then only in the totals). With `strict`, the first problem raises
    `DataError`. `rules` counts samples the release's own rules leave out (not problems)."""

    def __init__(self, strict: bool = False, max_logged: int = 20):
        self.strict = strict
        self.max_logged = max_logged
        self.counts: Counter[str] = Counter()
        self.rules: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Number of problems met so far."""
        return sum(self.counts.values())

    def add(self, where: str, reason: str, detail: str = "", skipped: str = "sample skipped") -> None:
        """One problem at `where` (e.g. `file:line`)."""
        message = f"{where}: {reason}" + (f": {detail}" if detail else "")
        if self.strict:
            raise DataError(f"{message} (strict mode)")
        self._count(reason, f"{message}; {skipped}")

    def add_lines(self, path: Path, lines_by_reason: dict[str, np.ndarray]) -> None:
        """Problems found by vectorised checks: arrays of 1-based line numbers per reason."""
        found = {reason: lines for reason, lines in lines_by_reason.items() if len(lines)}
        if not found:
            return
        if self.strict:
            reason, line = min(((r, int(lines.min())) for r, lines in found.items()), key=lambda x: x[1])
            raise DataError(f"{path}:{line}: {reason} (strict mode)")
        for reason, lines in found.items():
            logged = lines[: max(0, self.max_logged - self.counts[reason])]
            for line in logged:
                self._count(reason, f"{path}:{int(line)}: {reason}; row skipped")
            self.counts[reason] += len(lines) - len(logged)

    def rule(self, reason: str, n: int = 1) -> None:
        """`n` samples/turns left out by one of the release's rules (counted, not a problem)."""
        self.rules[reason] += n

    def _count(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.max_logged:
            log.warning(message)
        if n == self.max_logged:
            log.warning("further '%s' problems are counted but not logged one by one", reason)

    def log_totals(self, what: str) -> None:
        """Log the totals per reason (after indexing a file)."""
        if self.counts:
            log.warning("%s: skipped because of bad input: %s", what,
                        ", ".join(f"{n} x {reason}" for reason, n in sorted(self.counts.items())))
        if self.rules:
            log.info("%s: left out by the release's rules: %s", what,
                     ", ".join(f"{n} x {reason}" for reason, n in sorted(self.rules.items())))


# --------------------------------------------------------------------------------------------
# Samples (text only)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One sample as the release defines it, before tokenization and image loading."""

    task_name: str
    source: str
    target: str
    caption: str | None
    input_image_paths: tuple[str, ...]
    output_image_path: str | None
    location: str  # where it comes from: `file:line`, or `file (story ..., step ...)` for VIST

    def record(self) -> dict[str, Any]:
        """The dump's JSON object (`python dataloader.py DATA_FILE`)."""
        return {"task_name": self.task_name, "source": self.source, "target": self.target,
                "caption": self.caption, "input_images": list(self.input_image_paths),
                "output_image": self.output_image_path}


def choose(options: tuple[str, ...], seed: int, key: str) -> str:
    """A template drawn with a generator seeded by (seed, key): reproducible and the same in every
    DataLoader worker (a string seed is hashed with SHA-512, independent of PYTHONHASHSEED)."""
    return random.Random(f"{seed}-{key}").choice(options)


# --------------------------------------------------------------------------------------------
# CC3M: caption cleaning and a compact, vectorised TSV index
# --------------------------------------------------------------------------------------------

def clean_caption(caption: str) -> str:
    """The release's caption cleaning, one string at a time: lower-case; each of . ! " ( ) * # : ; ~
    becomes a space; runs of two or more whitespace characters become one space; strip."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    return caption.rstrip("\n").strip(" ")


# `clean_caption` for many ASCII captions at once, on bytes joined by NUL (neither whitespace nor
# punctuation; rows containing it are rejected): bytes.lower/translate and one regex over the whole
# block. For ASCII text Python's `\s` is exactly these ten characters; when only spaces occur
# (the usual case) a cheaper pattern gives the same result. Captions with non-ASCII bytes are
# recomputed with `clean_caption` itself (Unicode lower-casing and whitespace).
_PUNCT_TO_SPACE = bytes.maketrans(b'.!"()*#:;~', b" " * 10)
_ASCII_SPACE_RUNS = re.compile(rb"[\t\n\x0b\x0c\r\x1c-\x1f ]{2,}")
_SPACE_RUNS = re.compile(rb"  +")
_OTHER_ASCII_SPACE = (b"\t", b"\n", b"\x0b", b"\x0c", b"\r", b"\x1c", b"\x1d", b"\x1e", b"\x1f")


def clean_captions_ascii(joined: bytes) -> bytes:
    """`clean_caption` applied to every part of NUL-joined ASCII captions (non-ASCII parts must be
    redone with `clean_caption`)."""
    text = joined.lower().translate(_PUNCT_TO_SPACE)
    runs = _ASCII_SPACE_RUNS if any(c in text for c in _OTHER_ASCII_SPACE) else _SPACE_RUNS
    text = runs.sub(b" ", text)
    # After collapsing, a part has at most one space at each end.
    return text.replace(b" \x00", b"\x00").replace(b"\x00 ", b"\x00").strip(b" ")


class StringColumn:
    """Many strings in one growing UTF-8 buffer, each followed by a NUL, plus their end offsets:
    about one byte per character and no Python object per string, so 3.3 M captions take ~200 MB
    and forked DataLoader workers share them instead of copying them page by page."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._blocks: list[np.ndarray] = []
        self.ends = np.zeros(0, np.int64)

    def append(self, block: bytes) -> np.ndarray:
        """Add NUL-terminated strings; returns their lengths in bytes."""
        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 0)
        self._blocks.append(ends + len(self.buffer))
        self.buffer += block  # grows in place (no copy of the whole column)
        return np.diff(ends, prepend=-1) - 1

    def finish(self) -> "StringColumn":
        """Call once after the last `append`."""
        self.ends = np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.int64)
        self._blocks = []
        return self

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) + 1 if i > 0 else 0
        return self.buffer[start: int(self.ends[i])].decode("utf-8")


@dataclass
class CC3MTable:
    """The usable rows of a CC3M TSV: cleaned captions, image paths (as written), the row index
    (the release's `i`: data rows, blank lines not counted) and the 1-based line number."""

    captions: StringColumn
    paths: StringColumn
    rows: np.ndarray
    lines: np.ndarray
    valid: np.ndarray  # positions in the columns of rows with a caption and an image path


def read_cc3m_tsv(path: Path, problems: ProblemLog, block_size: int = 1 << 24) -> CC3MTable:
    """Index a CC3M TSV (`caption<TAB>image_path` header; other columns are allowed).

    The file is read in blocks of whole lines; each block is split and cleaned by a handful of
    numpy / C-level bytes operations (no Python code per row, except for the rare rows with
    non-ASCII text). Fields are tab-separated with no quoting: a quote is an ordinary character
    (the release's pandas quoting gives the same cleaned captions on well-formed files, but an
    unbalanced quote there silently swallows the following lines). Bad rows are reported to
    `problems` with their line number and left out.
    """
    caps = limits()
    with open(path, "rb") as f:
        first = f.readline(caps.max_row_bytes + 1)
        if len(first) > caps.max_row_bytes:
            raise DataError(f"{path}:1: the header is longer than max_row_bytes ({caps.max_row_bytes:,} bytes; "
                            f"config/limits.yaml); a CC3M TSV starts with 'caption<TAB>image_path'")
        header = first.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n").split("\t")
        missing = [c for c in ("caption", "image_path") if c not in header]
        if missing:
            raise DataError(f"{path}:1: the header has no column {' or '.join(repr(c) for c in missing)} "
                            f"(found {header}); a CC3M TSV starts with 'caption<TAB>image_path'")
        columns = (len(header), header.index("caption"), header.index("image_path"))
        captions, paths = StringColumn(), StringColumn()
        rows, lines, valid = [], [], []
        next_line, next_row, n_kept, rest = 2, 0, 0, b""
        while True:
            chunk = f.read(block_size)
            data = rest + chunk
            if not data:
                break
            if chunk:
                cut = data.rfind(b"\n") + 1
                if cut == 0 and len(data) > caps.max_row_bytes:   # one row over the cap: skip it unread
                    rest = _skip_line(f, block_size)
                    problems.add_lines(path, {_too_long_row(caps): np.array([next_line])})
                    next_line, next_row = next_line + 1, next_row + 1
                    continue
                if cut == 0:  # a line longer than the block: read on
                    rest = data
                    continue
                block, rest = data[:cut], data[cut:]
            else:
                block, rest = data + b"\n", b""  # the last line has no newline
            part = _parse_cc3m_block(path, block, columns, next_line, next_row, captions, paths, problems, caps)
            rows.append(part["rows"])
            lines.append(part["lines"])
            valid.append(part["valid"] + n_kept)
            next_line, next_row = part["next_line"], part["next_row"]
            n_kept += len(part["rows"])
            if not chunk:
                break
    concat = (lambda arrays: np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
    return CC3MTable(captions.finish(), paths.finish(), concat(rows), concat(lines), concat(valid))


def _skip_line(f, block_size: int) -> bytes:
    """Read on to the end of the current line without keeping it; returns what follows its newline."""
    while True:
        chunk = f.read(block_size)
        end = chunk.find(b"\n")
        if not chunk or end >= 0:
            return chunk[end + 1:] if end >= 0 else b""


def _too_long_row(caps) -> str:
    return f"row longer than max_row_bytes ({caps.max_row_bytes:,} bytes; config/limits.yaml)"


def _too_long_text(caps) -> str:
    return f"text longer than max_text_chars ({caps.max_text_chars:,}; config/limits.yaml)"


def _parse_cc3m_block(path: Path, block: bytes, columns: tuple[int, int, int], first_line: int, first_row: int,
                      captions: StringColumn, paths: StringColumn, problems: ProblemLog, caps) -> dict[str, Any]:
    """Split one block of whole lines (ending with a newline), append the cleaned captions and the
    paths of its good rows to the columns, report its bad rows."""
    n_cols, cap_col, path_col = columns
    buf = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(buf == 10)                           # one newline per line
    starts = np.concatenate(([0], ends[:-1] + 1))
    has_cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)   # CRLF line endings
    stops = ends - has_cr
    blank = stops == starts                                     # skipped, as pandas does
    line_no = first_line + np.arange(len(ends))
    row_no = first_row + np.cumsum(~blank) - 1

    def lines_with(byte_positions: np.ndarray) -> np.ndarray:
        flags = np.zeros(len(ends), bool)
        flags[np.searchsorted(ends, byte_positions)] = True
        return flags

    tabs = np.flatnonzero(buf == 9)
    too_long = ~blank & (stops - starts > caps.max_row_bytes)
    wrong_fields = ~blank & ~too_long & (np.searchsorted(tabs, stops) - np.searchsorted(tabs, starts) != n_cols - 1)
    has_nul = lines_with(np.flatnonzero(buf == 0)) & ~blank & ~wrong_fields & ~too_long
    good = ~blank & ~wrong_fields & ~has_nul & ~too_long
    non_ascii = lines_with(np.flatnonzero(buf >= 0x80)) & good
    bad_utf8 = np.zeros(len(ends), bool)
    for i in np.flatnonzero(non_ascii):  # rare: rows with non-ASCII text
        try:
            block[starts[i]:stops[i]].decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8[i] = True
    good &= ~bad_utf8

    if good.all() and not has_cr.any():
        kept = block
    else:
        keep = np.repeat(good, ends - starts + 1)
        keep[(ends - 1)[has_cr & good]] = False
        kept = buf[keep].tobytes()
    fields = kept.replace(b"\t", b"\n").split(b"\n")[:-1]
    raw_captions = fields[cap_col::n_cols]
    cleaned = clean_captions_ascii(b"\x00".join(raw_captions)) + b"\x00" if raw_captions else b""
    redo = np.flatnonzero(non_ascii[good])
    chars = {}                    # caption length in characters where it differs from the bytes (non-ASCII)
    if len(redo):
        parts = cleaned.split(b"\x00")
        for k in redo:
            text = clean_caption(raw_captions[k].decode("utf-8"))
            parts[k], chars[k] = text.encode("utf-8"), len(text)
        cleaned = b"\x00".join(parts)
    cap_len = captions.append(cleaned)
    raw_paths = fields[path_col::n_cols]
    path_len = paths.append(b"\x00".join(raw_paths) + b"\x00" if raw_paths else b"")

    kept_lines = line_no[good]
    no_caption = cap_len == 0
    no_path = (path_len == 0) & ~no_caption
    long_text = cap_len > caps.max_text_chars
    for k in np.flatnonzero(long_text):
        long_text[k] = chars.get(int(k), cap_len[k]) > caps.max_text_chars
    long_text &= ~no_path
    problems.add_lines(path, {
        _too_long_row(caps): line_no[too_long],
        f"not {n_cols} tab-separated fields (a missing or extra column)": line_no[wrong_fields],
        "NUL character in the line": line_no[has_nul],
        "not valid UTF-8": line_no[bad_utf8],
        "empty caption": kept_lines[no_caption],
        "empty image_path": kept_lines[no_path],
        _too_long_text(caps): kept_lines[long_text],
    })
    return {"rows": row_no[good], "lines": kept_lines, "valid": np.flatnonzero(~no_caption & ~no_path & ~long_text),
            "next_line": first_line + len(ends), "next_row": first_row + int((~blank).sum())}


# --------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

class MiniGPT5Dataset(torch.utils.data.Dataset):
    """What the three datasets share. Subclasses build the index (`_build_index`) and describe a
    sample (`sample(i)`); this class turns samples into tensors.

    Args:
        data_file: the annotation file (TSV / JSON / JSON lines).
        tokenizer: the LLaMA tokenizer with vokens (`minigpt4.load_tokenizer`); needed by
            `dataset[i]` and by MMDialog's training index, not by `sample(i)`.
        cfg: the model config (image sizes); needed by `dataset[i]`.
        is_training: the release's training sample list (instruction / multimodal /
            understanding samples, the MMDialog length rule) and random flips; False = test mode.
        strict: raise `DataError` on the first bad input instead of skipping and counting it.
        seed: seeds template choices and flips (with the task name).
        image_root: folder the image paths are relative to (default: the data file's folder).
        feature_folder: cached features to use instead of images; None = `PREPROCESS_FEATURE_FOLDER`
            when set (read now), False = never.
        feature_split: the cache's split folder (default "train" / "test" from `is_training`).
        max_length: limit on source + target text tokens (default: the tokenizer's
            `model_max_length` when it is a real limit, as the release).
        allow_outside_paths: accept image paths that leave `image_root` (refused by default).
    """

    dataset_type = ""           # the name of its spec in dataset_specs.SPECS
    index_needs_tokenizer = False   # whether the training index is built with the tokenizer

    def __init__(self, data_file: str | os.PathLike, tokenizer: Any = None, cfg: Any = None,
                 is_training: bool = True, strict: bool = False, seed: int = SEED,
                 image_root: str | os.PathLike | None = None,
                 feature_folder: str | os.PathLike | Literal[False] | None = None,
                 feature_split: str | None = None, max_length: int | None = None,
                 allow_outside_paths: bool = False):
        self.data_file = Path(data_file)
        if not self.data_file.is_file():
            raise FileNotFoundError(f"{self.dataset_type} data file {str(self.data_file)!r} does not exist")
        self.tokenizer, self.cfg = tokenizer, cfg
        self.is_training, self.seed = is_training, seed
        self.image_root = str(Path(image_root) if image_root is not None else self.data_file.parent)
        self.problems = ProblemLog(strict)
        if feature_folder is None:
            feature_folder = preprocess_feature_folder()
        self.feature_folder = Path(feature_folder) if feature_folder else None
        self.feature_split = feature_split or ("train" if is_training else "test")
        self.max_length = max_length
        self.allow_outside_paths = allow_outside_paths
        self.caps = limits()            # config/limits.yaml (MINIGPT5_LIMITS), read when the dataset is made
        self.epoch = 0
        self._transforms = None
        self._build_index()
        self.problems.log_totals(f"{self.dataset_type} {self.data_file}")
        log.info("%s %s (%s): %d samples", self.dataset_type, self.data_file,
                 "train" if is_training else "test", len(self))

    # ---- to be provided by subclasses ----------------------------------------------------------

    def _build_index(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, index: int) -> Sample:
        """The text and image paths of sample `index` (no tokenizer, no image opened)."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------

    @property
    def dataset_spec(self) -> DatasetSpec:
        """What the project knows about this dataset (dataset_specs.py)."""
        return SPECS[self.dataset_type]

    @property
    def strict(self) -> bool:
        """Whether bad input raises instead of being skipped."""
        return self.problems.strict

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        """The samples in order (the first `limit` only, if given)."""
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            yield self.sample(i)

    def set_epoch(self, epoch: int) -> None:
        """Draw new training flips for this epoch (template choices do not change)."""
        self.epoch = epoch

    def image_path(self, relative: str) -> str:
        """An image path from the data file, joined to `image_root` (absolute paths stay)."""
        return os.path.join(self.image_root, relative)

    def outside(self, path: str, root: str | None = None) -> bool:
        """Whether an image path as written leaves `root` (default `image_root`) and is refused:
        False when `allow_outside_paths` is set."""
        return not self.allow_outside_paths and path_leaves(root or self.image_root, path)

    def _need(self, what: str) -> Any:
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"{type(self).__name__} was built without `{what}`; `dataset[i]` needs it "
                             "(sample(i) and the dump do not)")
        return value

    def _token_ids(self) -> dict[str, Any]:
        if not hasattr(self, "_ids"):
            tok = self._need("tokenizer")
            ids = tok.convert_tokens_to_ids(VOKENS + [IMAGE_PLACEHOLDER])
            if tok.unk_token_id in ids:
                raise ValueError("the tokenizer lacks the vokens / <ImageHere>; load it with minigpt4.load_tokenizer")
            limit = self.max_length
            if limit is None and (tok.model_max_length or 0) < 1_000_000:
                limit = int(tok.model_max_length)
            self._ids = {"masked": torch.tensor(ids[1:7]), "image": ids[-1], "limit": limit}
        return self._ids

    def tokenize(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(input_ids, labels, number of source tokens cut from the left, number of leading input
        images dropped with them). Labels: -100 over the source and over [IMG1]..[IMG6]."""
        tok, ids = self._need("tokenizer"), self._token_ids()
        source = tok(sample.source, add_special_tokens=False).input_ids
        target = tok(sample.target, add_special_tokens=False).input_ids
        cut, dropped_images = 0, 0
        limit = ids["limit"]
        if limit is not None and len(source) + len(target) > limit:
            if len(target) >= limit:
                raise _BadSample("text too long", f"the target alone has {len(target)} tokens, more than the "
                                                  f"limit of {limit}")
            cut = len(source) + len(target) - limit
            dropped_images = source[:cut].count(ids["image"])
            source = source[cut:]
        if source.count(ids["image"]) != len(sample.input_image_paths) - dropped_images:
            raise DataError(f"{sample.location} (sample {sample.task_name}): the source has "
                            f"{source.count(ids['image'])} {IMAGE_PLACEHOLDER} tokens but "
                            f"{len(sample.input_image_paths) - dropped_images} input images")
        input_ids = torch.tensor(source + target, dtype=torch.long)
        target_t = torch.tensor(target, dtype=torch.long)
        labels = torch.cat([torch.full((len(source),), -100, dtype=torch.long),
                            torch.where(torch.isin(target_t, ids["masked"]), -100, target_t)])
        return input_ids, labels, cut, dropped_images

    def _flip(self, sample: Sample, slot: str) -> bool:
        if not self.is_training:
            return False
        return random.Random(f"{self.seed}-flip-{self.epoch}-{sample.task_name}-{slot}").random() < 0.5

    def _image(self, sample: Sample, path: str, slot: str, kind: str) -> torch.Tensor:
        cfg = self._need("cfg")
        if self._transforms is None:
            self._transforms = {"input": image_processor(cfg.image_size),
                                "target": target_transform(cfg.sd_image_size)}
        try:
            image = self.open_image(path)
        except IMAGE_ERRORS as e:
            raise _BadSample("unreadable image", f"image {path}: {type(e).__name__}: {e}") from e
        tensor = self._transforms[kind](image)
        return tensor.flip(-1) if self._flip(sample, slot) else tensor

    def open_image(self, path: str) -> Image.Image:
        """The RGB image of `path` (a hook: the shard reader in shards.py opens in-memory bytes).
        A path whose symbolic links lead outside `image_root` is refused (`allow_outside_paths`)."""
        if not self.allow_outside_paths and resolves_outside(self.image_root, path):
            raise _BadSample(OUTSIDE_PATH, f"{path} is a symbolic link to {os.path.realpath(path)}")
        return load_rgb(path)

    def _feature(self, path: str, kind: str) -> torch.Tensor:
        try:
            return load_feature(self.feature_folder, self.feature_split, kind, path, self._feature_shape(kind))
        except FileNotFoundError as e:
            raise _BadSample("missing cached feature", str(e)) from e
        except DataError as e:
            raise _BadSample("unreadable cached feature", str(e)) from e

    def _feature_shape(self, kind: str) -> tuple[int | None, ...] | None:
        """The shape a cached feature must have for this config (sizes the config does not say --
        the LLM's width, the VAE's scale -- are read from the weight folders' config.json, when there)."""
        if not hasattr(self, "_feature_shapes"):
            cfg = self._need("cfg")
            hidden, channels, size = None, None, None
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                hidden = int(json.loads((Path(cfg.llama_model) / "config.json").read_text())["hidden_size"])
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                vae = json.loads((Path(cfg.sd_model) / "vae" / "config.json").read_text())
                channels = 2 * int(vae["latent_channels"])
                size = cfg.sd_image_size // 2 ** (len(vae["block_out_channels"]) - 1)
            self._feature_shapes = {"img": (cfg.num_query_token, hidden), "vae": (channels, size, size)}
        return self._feature_shapes[kind]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """The model-ready item (see the module docstring), or None when the sample turned out
        to be bad (unreadable image, ...) and `strict` is off; the problem is logged and counted."""
        return self.item(self.sample(index))

    def item(self, sample: Sample) -> dict[str, Any] | None:
        """`dataset[i]` for a given sample (the shard reader in shards.py streams its samples here)."""
        try:
            input_ids, labels, cut, dropped = self.tokenize(sample)
            if cut and not getattr(self, "_warned_truncation", False):
                self._warned_truncation = True
                log.warning("%s (sample %s): source cut by %d tokens from the left to fit the text limit "
                            "(further cuts are not logged)", sample.location, sample.task_name, cut)
            inputs = sample.input_image_paths[dropped:]
            output = sample.output_image_path
            item: dict[str, Any] = {"input_images": None, "output_image": None}
            if self.feature_folder is not None:
                item["input_image_features"] = (torch.stack([self._feature(p, "img") for p in inputs])
                                                if inputs else None)
                item["output_image_features"] = self._feature(output, "vae") if output else None
            else:
                cfg = self._need("cfg")
                size, sd_size = cfg.image_size, cfg.sd_image_size
                images = [self._image(sample, p, f"in{k + dropped}", "input") for k, p in enumerate(inputs)]
                item["input_images"] = torch.stack(images) if images else torch.zeros(0, 3, size, size)
                item["output_image"] = (self._image(sample, output, "out", "target") if output
                                        else torch.zeros(3, sd_size, sd_size))
        except _BadSample as bad:
            self.problems.add(f"{sample.location} (sample {sample.task_name})", bad.reason, bad.detail,
                              skipped="sample dropped from its batch")
            return None
        item.update({
            "task_name": sample.task_name, "source": sample.source, "target": sample.target,
            "caption": sample.caption, "input_image_paths": list(inputs), "output_image_path": output,
            "location": sample.location, "has_output_image": output is not None,
            "input_ids": input_ids, "labels": labels, "num_truncated_tokens": cut,
        })
        return item


OUTSIDE_PATH = "image path outside the dataset folder"


def resolves_outside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether the file `path` (as it is opened), with its symbolic links resolved, lies outside
    `root` (resolved too): the rule of `path_leaves`, applied where the file really is."""
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) != root


def path_leaves(root: str | os.PathLike, path: str) -> bool:
    """Whether `path` (relative to `root`, or absolute) names a place outside `root`, judged on the
    text: `..` components and absolute paths are resolved, symbolic links are not followed."""
    root = os.path.abspath(root)
    full = os.path.abspath(os.path.join(root, path))
    return os.path.commonpath([root, full]) != root


def outside_rows(paths: StringColumn, root: str, positions: np.ndarray) -> np.ndarray:
    """Of the strings at `positions` of `paths`, those (their positions) that leave `root`. Only
    strings starting with `/` or containing `..` can, and they are found with one scan of the
    buffer, so a 3.3 M-row column costs no Python code per row."""
    buffer, ends = paths.buffer, paths.ends
    if not len(ends):
        return positions[:0]
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts
    first = np.frombuffer(buffer, np.uint8)[np.minimum(starts, len(buffer) - 1)]
    dots = np.array([m.start() for m in re.finditer(rb"\.\.", buffer)], dtype=np.int64)
    candidates = np.union1d(np.flatnonzero((first == ord("/")) & (lengths > 0)), np.searchsorted(ends, dots))
    candidates = candidates[np.isin(candidates, positions)]
    return np.array([p for p in candidates.tolist() if path_leaves(root, paths[p])], dtype=np.int64)


class _BadSample(Exception):
    """Raised inside `__getitem__` for a sample that cannot be used (reported by ProblemLog)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class CC3MDataset(MiniGPT5Dataset):
    """CC3M captions -> images (stage 1). Each row gives `cc3m_{row}` (source = the cleaned
    caption, target = the vokens, caption = the cleaned caption); in training every 100th row
    also gives `cc3m_{row}_instruction`. In test mode the target is the caption."""

    dataset_type = "CC3M"

    def _build_index(self) -> None:
        self.table = read_cc3m_tsv(self.data_file, self.problems)
        if not self.allow_outside_paths:
            bad = outside_rows(self.table.paths, self.image_root, self.table.valid)
            if len(bad):
                self.problems.add_lines(self.data_file, {OUTSIDE_PATH: self.table.lines[bad]})
                self.table.valid = self.table.valid[~np.isin(self.table.valid, bad)]
        valid = self.table.valid
        # Sample i -> (position in `valid`, instruction or not), in the release's order: each row's
        # plain sample, followed by its instruction sample when it has one.
        instruction = np.zeros(len(valid), bool)
        if self.is_training:
            instruction = self.table.rows[valid] % CC3M_INSTRUCTION_EVERY == 0
        per_row = 1 + instruction.astype(np.int64)
        self._pos = np.repeat(np.arange(len(valid), dtype=np.int64), per_row)
        self._is_instruction = np.zeros(len(self._pos), bool)
        self._is_instruction[np.cumsum(per_row)[instruction] - 1] = True

    def __len__(self) -> int:
        return len(self._pos)

    def sample(self, index: int) -> Sample:
        """See `MiniGPT5Dataset.sample`."""
        pos = int(self.table.valid[self._pos[index]])
        row, line = int(self.table.rows[pos]), int(self.table.lines[pos])
        return cc3m_sample(row, self.table.captions[pos], bool(self._is_instruction[index]), self.is_training,
                           self.seed, self.image_path(self.table.paths[pos]), f"{self.data_file}:{line}")


def cc3m_sample(row: int, caption: str, instruction: bool, is_training: bool, seed: int, image_path: str,
                location: str) -> Sample:
    """The CC3M sample of one row (cleaned caption): `cc3m_{row}`, or its instruction sample
    `cc3m_{row}_instruction`. Shared by the TSV reader and the shard reader (shards.py)."""
    cc3m = SPECS["CC3M"]
    name = cc3m.task_name("cc3m", row, "instruction" if instruction else "caption")
    source = caption
    if instruction:
        prompt = choose(cc3m.templates["instruction"], seed, name)
        source = cc3m.system_prompt + CC3M_INSTRUCTION.format(prompt=prompt, caption=caption)
    target = VOKEN_TARGET if is_training else caption
    return Sample(name, source, target, caption, (), image_path, location)


@dataclass(frozen=True)
class _Story:
    story_id: str
    captions: tuple[str, ...]
    images: tuple[str, ...]
    steps: tuple[str, ...]  # the steps' `sequence_index`


class VISTDataset(MiniGPT5Dataset):
    """VIST stories (stage 2): per step a generation sample, and in training, from the second
    step on, a multimodal and an understanding sample, as the release. The image mapping file is
    the annotation file's name with `cleaned` replaced by `image_mapping`."""

    dataset_type = "VIST"
    KINDS = ("generation", "multimodal", "understanding")

    def _build_index(self) -> None:
        path = self.data_file
        if "cleaned" not in path.name:
            raise DataError(f"{path}: a VIST annotation file name contains 'cleaned' (e.g. val_cleaned.json); "
                            "its image mapping is the same name with 'cleaned' -> 'image_mapping'")
        mapping_path = path.with_name(path.name.replace("cleaned", "image_mapping"))
        if not mapping_path.is_file():
            raise DataError(f"{mapping_path}: the image mapping of {path} does not exist (a VIST annotation file "
                            f"X_cleaned.json needs X_image_mapping.json beside it: {{image_id: image path}})")
        stories, mapping = _read_json(path, dict), _read_json(mapping_path, dict)
        self.stories: list[_Story] = []
        story_idx, step_idx, kind_idx = [], [], []
        for story_id, steps in stories.items():
            captions, images, steps_done = [], [], []
            if not isinstance(steps, list):
                self.problems.add(f"{path} (story {story_id})", "malformed story", "expected a list of steps",
                                  skipped="story skipped")
                continue
            for k, step in enumerate(steps):
                where = f"{path} (story {story_id}, step {k})"
                problem = _vist_step_problem(step, mapping, self.caps)
                if problem is None and self.outside(str(mapping[str(step["image_id"])])):
                    problem = (OUTSIDE_PATH, repr(mapping[str(step["image_id"])]))
                if problem:
                    self.problems.add(where, problem[0], problem[1],
                                      skipped=f"story cut here ({len(steps) - k} of {len(steps)} steps left out)")
                    break
                captions.append(step["caption"])
                images.append(self.image_path(mapping[str(step["image_id"])]))
                steps_done.append(str(step["sequence_index"]))
            for k in range(len(captions)):
                kinds = (0, 1, 2) if k > 0 and self.is_training else (0,)
                story_idx += [len(self.stories)] * len(kinds)
                step_idx += [k] * len(kinds)
                kind_idx += list(kinds)
            self.stories.append(_Story(str(story_id), tuple(captions), tuple(images), tuple(steps_done)))
        self._index = np.array([story_idx, step_idx, kind_idx], dtype=np.int64).reshape(3, -1)

    def __len__(self) -> int:
        return self._index.shape[1]

    def sample(self, index: int) -> Sample:
        """See `MiniGPT5Dataset.sample`."""
        s, k, kind = (int(v) for v in self._index[:, index])
        story = self.stories[s]
        caption = story.captions[k]
        context = vist_context(story.captions[:k])
        vist = self.dataset_spec
        kind_name = self.KINDS[kind]
        name = vist.task_name(story.story_id, story.steps[k], kind_name)
        template = choose(vist.templates[kind_name], self.seed, name)
        history = story.images[:k]
        location = f"{self.data_file} (story {story.story_id}, step {k})"
        if kind_name == "generation":
            return Sample(name, vist.system_prompt + template.format(context=context, caption=caption),
                          VOKEN_TARGET, None, history, story.images[k], location)
        if kind_name == "multimodal":
            return Sample(name, vist.system_prompt + template.format(context=context), f"{caption} {VOKEN_TARGET}",
                          None, history, story.images[k], location)
        return Sample(name, vist.system_prompt + template.format(context=context), f"{caption} ###", None,
                      history + (story.images[k],), None, location)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth_over(text: str, cap: int) -> int | None:
    """How deeply the JSON `text` nests arrays and objects, when that is more than `cap` (None when
    it is not): strings are taken out, then the brackets counted (C-level string and numpy work, no
    parsing). Free when the text has no more than `cap` opening brackets in all."""
    if text.count("[") + text.count("{") <= cap:
        return None
    brackets = np.frombuffer(_NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii"), np.uint8)
    depth = int(np.cumsum(np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)).max(initial=0))
    return depth if depth > cap else None


def parse_json(text: str, where: str) -> Any:
    """`json.loads(text)` after the `max_json_depth` check; DataError naming `where` (and the line
    and column) for JSON that is malformed or nested too deeply."""
    cap = limits().max_json_depth
    depth = json_depth_over(text, cap)
    if depth is not None:
        raise DataError(f"{where}: JSON nested {depth} deep, more than max_json_depth ({cap}; config/limits.yaml)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def _read_json(path: Path, expected: type) -> Any:
    """A whole JSON file; malformed, nested too deeply or of the wrong top-level type -> DataError
    with line/column."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}") from e
    value = parse_json(text, str(path))
    if not isinstance(value, expected):
        raise DataError(f"{path}: expected a JSON {expected.__name__} at the top level, got {type(value).__name__}")
    return value


def _vist_step_problem(step: Any, mapping: dict, caps) -> tuple[str, str] | None:
    if not isinstance(step, dict) or not {"caption", "image_id", "sequence_index"} <= set(step):
        return "malformed step", f"expected caption, image_id and sequence_index, got {str(step)[:200]}"
    if not isinstance(step["caption"], str) or not step["caption"].strip():
        return "empty caption", repr(step["caption"])[:200]
    if len(step["caption"]) > caps.max_text_chars:
        return _too_long_text(caps), f"{len(step['caption']):,} characters"
    if any(token in step["caption"] for token in RESERVED_TOKENS):
        return "reserved token in text", repr(step["caption"][:200])
    if str(step["image_id"]) not in mapping:
        return "image id not in the mapping file", repr(step["image_id"])[:200]
    if not isinstance(mapping[str(step["image_id"])], str) or not mapping[str(step["image_id"])]:
        return "image path in the mapping file is not a string", \
            f"{step['image_id']!r}: {mapping[str(step['image_id'])]!r}"[:200]
    return None


# Lone surrogates: what `errors="surrogateescape"` makes of bytes that are not valid UTF-8.
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class _Conversation:
    conversation_id: str
    texts: tuple[str, ...]
    images: tuple[str | None, ...]
    line: int


class MMDialogDataset(MiniGPT5Dataset):
    """MMDialog conversations (stage 2): every turn after the first is a sample whose source is
    the system prompt, a sliding window of earlier turns and the speaker tag, as the release."""

    dataset_type = "MMDialog"
    index_needs_tokenizer = True    # training: turns longer than MMDIALOG_MAX_TURN_TOKENS end a conversation

    def _build_index(self) -> None:
        path = self.data_file
        if self.is_training and self.tokenizer is None:
            raise ValueError(f"{path}: the MMDialog training index needs the tokenizer (turns longer than "
                             f"{MMDIALOG_MAX_TURN_TOKENS} LLM tokens end a conversation)")
        self.conversations: list[_Conversation] = []
        conv_idx, turn_idx, window_idx = [], [], []
        for line_no, conversation in self._read_lines(path):
            turns = conversation["conversation"]
            if len(turns) < 2:
                self.problems.rule("conversation with fewer than 2 turns")
                continue
            texts, images = self._usable_turns(path, line_no, turns)
            c = len(self.conversations)
            for i, window in _mmdialog_windows(len(texts)):
                conv_idx.append(c)
                turn_idx.append(i)
                window_idx.append(window)
            self.conversations.append(_Conversation(str(conversation["conversation_id"]), tuple(texts),
                                                    tuple(images), line_no))
        self._index = np.array([conv_idx, turn_idx, window_idx], dtype=np.int64).reshape(3, -1)

    def _read_lines(self, path: Path, chunk: int = 4096) -> Iterator[tuple[int, dict]]:
        """Well-formed conversations with their line numbers; malformed lines are reported.
        Reads `chunk` lines at a time so turn lengths are tokenized in one batched call. A line
        longer than `max_row_bytes` is skipped without being read whole."""
        with open(path, "rb") as f:
            batch: list[tuple[int, dict]] = []
            for line_no, raw in bounded_lines(f, self.caps.max_row_bytes):
                if raw is None:
                    self.problems.add(f"{path}:{line_no}", _too_long_row(self.caps), skipped="line skipped")
                    continue
                line = raw.decode("utf-8", "surrogateescape")
                if not line.strip():
                    continue
                conversation = self._parse_line(path, line_no, line)
                if conversation is not None:
                    batch.append((line_no, conversation))
                if len(batch) == chunk:
                    yield from self._with_token_counts(batch)
                    batch = []
            yield from self._with_token_counts(batch)

    def _parse_line(self, path: Path, line_no: int, line: str) -> dict | None:
        where = f"{path}:{line_no}"
        if _SURROGATE.search(line):
            self.problems.add(where, "not valid UTF-8", skipped="line skipped")
            return None
        cap = self.caps.max_json_depth
        depth = json_depth_over(line, cap)
        if depth is not None:
            self.problems.add(where, f"JSON nested more than max_json_depth ({cap}; config/limits.yaml)",
                              f"{depth} deep", skipped="line skipped")
            return None
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            self.problems.add(where, "malformed JSON line", f"column {e.colno}: {e.msg}", skipped="line skipped")
            return None
        except RecursionError:
            self.problems.add(where, "malformed JSON line", "nested too deeply to read", skipped="line skipped")
            return None
        problem = _mmdialog_problem(value)
        if problem:
            self.problems.add(where, "malformed conversation", problem, skipped="line skipped")
            return None
        return value

    def _with_token_counts(self, batch: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        if self.is_training and batch:
            cap = self.caps.max_text_chars    # over-long turns are reported by `_usable_turns`, not tokenized
            texts = [turn["turn"][0]["__TEXT__"] for _, c in batch for turn in c["conversation"]]
            texts = [text if len(text) <= cap else "" for text in texts]
            counts = iter(len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids)
            for _, c in batch:
                for turn in c["conversation"]:
                    turn["n_tokens"] = next(counts)
        yield from batch

    def _usable_turns(self, path: Path, line_no: int, turns: list) -> tuple[list[str], list[str | None]]:
        """The turns before the first one the release's rules stop at."""
        texts, images = [], []
        for i, turn in enumerate(turns):
            text = turn["turn"][0]["__TEXT__"]
            media = str(turn["turn"][1]["__MEDIA__"]) if len(turn["turn"]) > 1 else None
            image = os.path.join(os.path.dirname(path), f"{media}.jpg") if media is not None else None
            stop = None
            if len(text) > self.caps.max_text_chars:
                self.problems.add(f"{path}:{line_no} (turn {i})", _too_long_text(self.caps),
                                  f"{len(text):,} characters", skipped="conversation cut here")
                break
            if not text.strip():
                stop = "empty turn text"
            elif text.endswith(".jpg"):
                stop = "turn text ending with .jpg"
            elif self.is_training and turn["n_tokens"] > MMDIALOG_MAX_TURN_TOKENS:
                stop = f"turn longer than {MMDIALOG_MAX_TURN_TOKENS} tokens (training)"
            elif any(token in text for token in RESERVED_TOKENS):
                self.problems.add(f"{path}:{line_no} (turn {i})", "reserved token in text", repr(text[:200]),
                                  skipped="conversation cut here")
                break
            elif media in MMDIALOG_BROKEN_IDS:
                stop = "known-broken image id"
            elif image is not None and self.outside(f"{media}.jpg", os.path.dirname(path) or "."):
                self.problems.add(f"{path}:{line_no} (turn {i})", OUTSIDE_PATH, repr(media),
                                  skipped="conversation cut here")
                break
            elif image is not None and not os.path.exists(image):
                self.problems.add(f"{path}:{line_no} (turn {i})", "missing image", image,
                                  skipped="conversation cut here, as the release did")
                break
            if stop:
                self.problems.rule(f"conversation stopped: {stop}")
                break
            texts.append(text)
            images.append(image)
        return texts, images

    def __len__(self) -> int:
        return self._index.shape[1]

    def sample(self, index: int) -> Sample:
        """See `MiniGPT5Dataset.sample`."""
        c, i, window = (int(v) for v in self._index[:, index])
        conv = self.conversations[c]
        parts, inputs = [self.dataset_spec.system_prompt], []
        for j in range(window, i):
            parts.append(f"{speaker(j)} {conv.texts[j]}")
            if conv.images[j] is not None:
                parts.append(IMAGE_SLOT)
                inputs.append(conv.images[j])
        parts.append(speaker(i))
        text, image = conv.texts[i], conv.images[i]
        target = f"{text} {VOKEN_TARGET}" if image is not None else f"{text} ###"
        return Sample(self.dataset_spec.task_name(conv.conversation_id, i, "turn"), " ".join(parts), target, None,
                      tuple(inputs), image, f"{self.data_file}:{conv.line}")


def bounded_lines(f, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a binary file, each line read with at most `max_bytes + 1` bytes in
    memory; a longer line is read past in pieces and given as None."""
    line_no = 0
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        line_no += 1
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield line_no, None
        else:
            yield line_no, line


def _mmdialog_windows(n_turns: int) -> Iterator[tuple[int, int]]:
    """(turn, first turn of its history window) for every turn after the first. When a Human turn
    is the second Human turn in the window, the window moves to start at it as soon as the sample
    of the next (Assistant) turn has been built; that Human turn then counts as the window's first."""
    window, humans, pending = 0, 0, None
    for i in range(n_turns):
        if i > 0:
            yield i, window
        if i % 2 == 0:
            humans += 1
            if humans == 2:
                pending = i
        elif pending is not None:
            window, humans, pending = pending, 1, None


def _mmdialog_problem(value: Any) -> str | None:
    if not isinstance(value, dict) or "conversation_id" not in value or "conversation" not in value:
        return "expected an object with conversation_id and conversation"
    if not isinstance(value["conversation"], list):
        return "conversation is not a list"
    for i, turn in enumerate(value["conversation"]):
        parts = turn.get("turn") if isinstance(turn, dict) else None
        if not isinstance(parts, list) or not parts or not isinstance(parts[0], dict) \
                or not isinstance(parts[0].get("__TEXT__"), str):
            return f"turn {i} has no {{'turn': [{{'__TEXT__': str}}, ...]}}"
        if len(parts) > 1 and (not isinstance(parts[1], dict) or "__MEDIA__" not in parts[1]):
            return f"turn {i}: the second part has no __MEDIA__"
    return None


def make_dataset(data_file: str | os.PathLike, tokenizer: Any, cfg: Any, is_training: bool,
                 dataset_type: str | None = None, strict: bool = False, **kwargs: Any) -> MiniGPT5Dataset:
    """The dataset for `data_file` (resolved under DATAFOLDER if needed), its type chosen by
    `resolve_dataset_type`. Extra keyword arguments go to the dataset class. WebDataset shards
    (a `.tar`, a brace pattern or glob of them, a folder of them) give a streamed `shards.CC3MShards`."""
    import shards

    if shards.is_shard_spec(data_file):
        return shards.CC3MShards(data_file, tokenizer=tokenizer, cfg=cfg, is_training=is_training, strict=strict,
                                 dataset_type=dataset_type, **kwargs)
    path = find_data(data_file)
    cls = spec(resolve_dataset_type(path, dataset_type)).reader_class()
    return cls(path, tokenizer=tokenizer, cfg=cfg, is_training=is_training, strict=strict, **kwargs)


def dump_records(dataset: MiniGPT5Dataset, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The dump's JSON objects (what `python dataloader.py DATA_FILE` prints, one per line)."""
    for sample in dataset.samples(limit):
        yield sample.record()


# --------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------

class Collator:
    """Items -> the model's batch (see the module docstring). None items (samples that turned out
    bad in a worker) are dropped and counted in `num_dropped`; if none is left the result is None
    and the training step must skip it."""

    def __init__(self, tokenizer: Any):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.pad_token_id = int(pad)

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        kept = [item for item in items if item is not None]
        dropped = len(items) - len(kept)
        if dropped:
            log.warning("collator: dropped %d of %d samples of this batch (bad input, logged above)",
                        dropped, len(items))
        if not kept:
            return None
        ids = [item["input_ids"] for item in kept]
        lengths = torch.tensor([len(x) for x in ids])
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)
        labels = torch.nn.utils.rnn.pad_sequence([item["labels"] for item in kept], batch_first=True,
                                                 padding_value=-100)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
            "labels": labels,
            "has_output_image": torch.tensor([item["has_output_image"] for item in kept], dtype=torch.bool),
            "captions": [item["caption"] for item in kept],
            "task_names": [item["task_name"] for item in kept],
            "sources": [item["source"] for item in kept],
            "targets": [item["target"] for item in kept],
            "input_image_paths": [item["input_image_paths"] for item in kept],
            "output_image_paths": [item["output_image_path"] for item in kept],
            "locations": [item["location"] for item in kept],
            "num_dropped": dropped,
        }
        with_images = [item["input_images"] is not None for item in kept]
        if all(with_images):
            batch["input_images"] = torch.cat([item["input_images"] for item in kept])
            batch["output_images"] = torch.stack([item["output_image"] for item in kept])
        elif not any(with_images):
            batch.update(_collate_features(kept))
        else:
            raise ValueError("a batch mixes items with images and items with cached features")
        return batch


def _collate_features(items: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
    inputs = [item["input_image_features"] for item in items if item["input_image_features"] is not None]
    outputs = [item["output_image_features"] for item in items]
    present = [o for o in outputs if o is not None]
    stacked = None
    if present:
        zero = torch.zeros_like(present[0])
        stacked = torch.stack([o if o is not None else zero for o in outputs])
    return {"input_image_features": torch.cat(inputs) if inputs else None, "output_image_features": stacked}


# --------------------------------------------------------------------------------------------
# CLI: data_commands.py (it loads a tokenizer, and `preprocess` runs the model's encoders)
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`python dataloader.py DATA_FILE [...]` (dump) or `python dataloader.py preprocess DATA_FILE --out DIR`."""
    import data_commands

    return data_commands.main(argv)


if __name__ == "__main__":
    import dataloader   # the module the dataset specs name (not a second copy run as __main__)

    sys.exit(dataloader.main())
