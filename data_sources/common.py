"""What the dataset modules of `data_sources/` share beyond `dataset_base.MiniGPT5Dataset`: the
`DatasetSpec` each module declares, the bounded reading of text and JSON files, and the building of a
`samples.Dialogue` from text with image slots.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from configuration import limits
from constants import IMAGE_SLOT
from data_problems import DataError
from samples import Segment


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its reader, prompts, task names, evaluation and training choices."""

    name: str
    # The release's DATAFOLDER rule: a folder whose path contains this word holds this dataset
    # (None: never chosen by its folder).
    folder_keyword: str | None
    # "module:Class" of the reader (a `dataset_base.MiniGPT5Dataset`), and of its WebDataset reader.
    reader: str
    shard_reader: str | None
    system_prompt: str
    # Named prompt sets (templates) the reader draws from.
    templates: dict[str, tuple[str, ...]]
    # Task-name suffix of each kind of sample, and the kinds metric.py scores (all when None).
    task_suffixes: dict[str, str]
    evaluated: tuple[str, ...] | None
    # "module:function" of the scorer, the OpenCLIP architecture of its CLIP numbers, whether it
    # scores texts with Sentence-BERT, and the FID real set of the release ("cc3m_val": every .jpg
    # under CC3M_FOLDER/val; "targets": the evaluated samples' target images).
    scorer: str
    clip_model: str
    sentence_bert: bool
    fid_real: str
    # Where a prompt states the caption (a regex whose group 1 is it), for CLIP-T's
    # `--clip_t_text caption` when the expected text has none; None: the prompt is the caption.
    prompt_caption: str | None
    # Training: validation every this fraction of an epoch (the release's); prediction: whether
    # each item also gets plain Stable Diffusion's picture of its caption (the "SD baseline").
    val_check_interval: float
    sd_baseline: bool
    # The names a data file of this dataset has (a regex on the file name; None: any): when the
    # release's folder rule falls back to this dataset, a data file of another name is an error.
    file_name: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def task_name(self, group: str, step: int | str, kind: str) -> str:
        """`{group}_{step}{suffix}`: the task name of a sample of this kind."""
        return f"{group}_{step}{self.task_suffixes[kind]}"

    def is_evaluated(self, task: str) -> bool:
        """Whether metric.py scores the sample of this task name."""
        if self.evaluated is None:
            return True
        return any(task.endswith(self.task_suffixes[kind]) for kind in self.evaluated)

    def reader_class(self, shards: bool = False) -> type:
        """The reader class (the WebDataset one with `shards`)."""
        if shards and self.shard_reader is None:
            from data_sources import REGISTRY

            raise ValueError(f"{self.name} cannot be read from WebDataset shards (only "
                             f"{', '.join(s.name for s in REGISTRY.values() if s.shard_reader)})")
        return load_reference(self.shard_reader if shards else self.reader)

    def scorer_function(self) -> Callable:
        """metric.py's scorer: (samples, models, args) -> (results, counts)."""
        return load_reference(self.scorer)


def load_reference(reference: str) -> Any:
    """The object a `"module:name"` string names, imported when asked for."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


# ---- dialogues ------------------------------------------------------------------------------------

def slotted(text: str, images: list[str] | tuple[str, ...]) -> list[Segment]:
    """Text holding image slots (`<Img><ImageHere></Img>`) and the images of its slots, in order, as
    segments: text, image, text, ... (empty and blank text pieces left out, the rest stripped)."""
    pieces = text.split(IMAGE_SLOT)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"{len(pieces) - 1} image slots but {len(images)} images in {text[:80]!r}")
    segments: list[Segment] = []
    for k, piece in enumerate(pieces):
        if piece.strip():
            segments.append(Segment(text=piece.strip()))
        if k < len(images):
            segments.append(Segment(image=images[k]))
    return segments


# ---- bounded reading of text and JSON files -------------------------------------------------------

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# Lone surrogates: what `errors="surrogateescape"` makes of bytes that are not valid UTF-8.
SURROGATE = re.compile("[\udc80-\udcff]")


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


def read_json(path: Path, expected: type) -> Any:
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


def json_line(line: str, where: str, max_depth: int) -> tuple[Any, tuple[str, str] | None]:
    """One JSON line read: (value, None), or (None, (reason, detail)) for a line that is not valid
    UTF-8, nested more than `max_depth` or malformed (the reasons the readers count)."""
    if SURROGATE.search(line):
        return None, ("not valid UTF-8", "")
    depth = json_depth_over(line, max_depth)
    if depth is not None:
        return None, (f"JSON nested more than max_json_depth ({max_depth}; config/limits.yaml)", f"{depth} deep")
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, ("malformed JSON line", f"column {e.colno}: {e.msg}")
    except RecursionError:
        return None, ("malformed JSON line", "nested too deeply to read")
