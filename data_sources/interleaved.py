"""Your own interleaved data, with no code (`--dataset interleaved`; docs/own_data.md): documents or
conversations of text and pictures, from JSON lines or from OBELICS-style Parquet.

JSON lines (`.jsonl`, or any other name), one document or conversation per line:

    {"id": "walk_1", "system": "optional system prompt",
     "turns": [{"role": "user", "segments": [{"text": "Show me the dog, then the cat."}]},
               {"role": "assistant", "segments": [{"text": "The dog:"}, {"image": "pics/dog.jpg", "caption": "a dog"},
                                                  {"text": "and the cat:"}, {"image": "pics/cat.jpg"}]}]}

A turn is `{"role": ..., "segments": [...]}` or just the list of segments; a segment is `{"text": str}`
or `{"image": path, "caption": optional str}`, the path relative to the file's folder, or a member of a
`.tar` beside it (`shard.tar#key.jpg`). Roles are "user" and "assistant": every assistant turn is an
answer (a sample) with the turns before it as context. A line that gives no role at all is a document:
every turn after the first is an answer. `id` (letters, digits, `.`, `-`, `_`) names the samples
(`{id}_{turn}-answer`; default: `line{n}`), `system` defaults to the release's MMDialog system prompt
(null: none).

Parquet (`.parquet`, OBELICS's layout): one document per row, the columns `texts` and `images`, lists of
equal length where each position holds exactly one of a text or an image path (the other null), and an
optional `id`. A row is cut into turns after each picture; every turn after the first is an answer.
The file is read one row group at a time, when indexed and when a sample is read (one row group kept).

An answer may hold several pictures: each is drawn from its own voken group (`Sample` with k target
pictures). Bad rows are counted and skipped with file:line (or row), or stop the run under `--strict`:
malformed JSON, a turn with no segments, an image segment with no path, a role that is not known, a
missing image (or one outside the folder), a Parquet row with lists of unequal length.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import prompts
from constants import RESERVED_TOKENS
from data_problems import OUTSIDE_PATH, BadSample, DataError, resolves_outside, too_long_row, too_long_text
from data_sources.common import DatasetSpec, bounded_lines, json_line
from dataset_base import MiniGPT5Dataset, Sample
from image_transforms import load_rgb
from samples import ROLES, Dialogue, Message, Segment

SPEC = DatasetSpec(
    name="interleaved", folder_keyword=None,
    reader="data_sources.interleaved:InterleavedDataset", shard_reader=None,
    system_prompt=prompts.MMDIALOG_SYSTEM, templates={},
    task_suffixes={"answer": "-answer"}, evaluated=None,
    scorer="metric:score_interleaved", clip_model="ViT-L-14", sentence_bert=False, fid_real="targets",
    prompt_caption=None, val_check_interval=0.5, sd_baseline=False,
)

ROW_PROBLEM = "Parquet row with texts and images of unequal length"
_ID = re.compile(r"[\w.-]{1,100}")
_TAR_MEMBER = "#"          # `shard.tar#member.jpg`


@dataclass(frozen=True)
class _Document:
    """One usable line or row: where it is, its name, system prompt, turns (role or None, segments
    with the picture paths resolved) and the captions given ((turn, segment) -> caption)."""

    where: str
    name: str
    system: str | None
    turns: tuple[tuple[str | None, tuple[Segment, ...]], ...]
    captions: dict[tuple[int, int], str]


class InterleavedDataset(MiniGPT5Dataset):
    """The generic interleaved format (see the module docstring): JSON lines, or Parquet by suffix."""

    dataset_type = "interleaved"

    def _build_index(self) -> None:
        self.is_parquet = self.data_file.suffix.lower() == ".parquet"
        names: set[str] = set()
        # sample -> (where the document is: byte offset of its line / Parquet row (0-based), its line /
        # row number, the answer turn)
        places, numbers, answers = [], [], []
        documents = self._parquet_rows() if self.is_parquet else self._json_lines()
        for place, number, raw in documents:
            where = f"{self.data_file}:{number}"
            try:
                document = self._check(raw, where)
                if document.name in names:
                    raise BadSample("duplicate id", repr(document.name))
            except BadSample as bad:
                self.problems.add(where, bad.reason, bad.detail, skipped="line skipped")
                continue
            names.add(document.name)
            chosen = _answer_turns(document)
            if not chosen:
                self.problems.rule("document or conversation without an answer turn")
            places += [place] * len(chosen)
            numbers += [number] * len(chosen)
            answers += chosen
        self._index = np.array([places, numbers, answers], dtype=np.int64).reshape(3, -1)

    def __len__(self) -> int:
        return self._index.shape[1]

    # ---- reading ---------------------------------------------------------------------------

    def _json_lines(self) -> Iterator[tuple[int, int, Any]]:
        """(byte offset, line number, parsed line) of each well-formed line; the others counted."""
        with open(self.data_file, "rb") as f:
            offset = 0
            for line_no, raw in bounded_lines(f, self.caps.max_row_bytes):
                where = f"{self.data_file}:{line_no}"
                start, offset = offset, f.tell()
                if raw is None:
                    self.problems.add(where, too_long_row(self.caps), skipped="line skipped")
                    continue
                text = raw.decode("utf-8", "surrogateescape")
                if not text.strip():
                    continue
                value, problem = json_line(text, where, self.caps.max_json_depth)
                if problem:
                    self.problems.add(where, *problem, skipped="line skipped")
                    continue
                yield start, line_no, value

    def _line_at(self, offset: int) -> Any:
        with open(self.data_file, "rb") as f:
            f.seek(offset)
            return json.loads(f.readline().decode("utf-8"))

    def _parquet_rows(self) -> Iterator[tuple[int, int, Any]]:
        """(row, row number, row as a dict) of every row, read one row group at a time."""
        parquet = open_parquet(self.data_file)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        self._group_ends = np.cumsum(sizes, dtype=np.int64)
        row = 0
        for group in range(parquet.num_row_groups):
            for value in self._row_group(group):
                row += 1
                yield row - 1, row, value

    def _row_at(self, row: int) -> Any:
        group = int(np.searchsorted(self._group_ends, row, side="right"))
        return self._row_group(group)[row - (int(self._group_ends[group - 1]) if group else 0)]

    def _row_group(self, group: int) -> list[dict]:
        """The rows of one row group as dicts: the only part of the file in memory (the last one read,
        kept for the next sample; each DataLoader worker opens the file itself)."""
        cached = getattr(self, "_group", None)
        if cached is None or cached[0] != group:
            if getattr(self, "_parquet", None) is None:
                self._parquet = open_parquet(self.data_file)
            columns = [c for c in ("id", "texts", "images") if c in self._parquet.schema_arrow.names]
            self._group = cached = (group, self._parquet.read_row_group(group, columns=columns).to_pylist())
        return cached[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parquet": None, "_group": None}     # an open file does not travel

    # ---- checking ----------------------------------------------------------------------------

    def _check(self, value: Any, where: str) -> _Document:
        turns = _parquet_turns(value) if self.is_parquet else _json_turns(value)
        name = value.get("id") if isinstance(value, dict) else None
        name = str(name) if name is not None else f"{'row' if self.is_parquet else 'line'}{where.rsplit(':', 1)[1]}"
        if not _ID.fullmatch(name):
            raise BadSample("malformed id", f"{name[:100]!r}: letters, digits, '.', '-' and '_' only")
        system = value.get("system", SPEC.system_prompt) if isinstance(value, dict) and not self.is_parquet \
            else SPEC.system_prompt
        if system is not None and not isinstance(system, str):      # null: no system prompt
            raise BadSample("malformed line", "'system' is not a string")
        out, captions = [], {}
        for i, (role, segments) in enumerate(turns):
            checked = []
            for k, segment in enumerate(segments):
                if segment.text is not None:
                    self._check_text(segment.text, f"turn {i}")
                    checked.append(segment)
                    continue
                checked.append(Segment(image=self._picture_path(segment.image, f"turn {i}")))
                caption = getattr(segment, "caption", None)
                if caption is not None:
                    self._check_text(caption, f"turn {i} caption")
                    captions[i, k] = caption
            out.append((role, tuple(checked)))
        return _Document(where, name, system, tuple(out), captions)

    def _check_text(self, text: str, what: str) -> None:
        if len(text) > self.caps.max_text_chars:
            raise BadSample(too_long_text(self.caps), f"{what}: {len(text):,} characters")
        if any(token in text for token in RESERVED_TOKENS):
            raise BadSample("reserved token in text", f"{what}: {text[:200]!r}")

    def _picture_path(self, written: str, what: str) -> str:
        """The picture's path (relative paths joined to the folder), checked to be there."""
        archive, _, member = written.partition(_TAR_MEMBER) if ".tar" + _TAR_MEMBER in written else (written, "", "")
        if self.outside(archive):
            raise BadSample(OUTSIDE_PATH, f"{what}: {written!r}")
        path = self.image_path(archive)
        if not os.path.isfile(path):
            raise BadSample("missing image", f"{what}: {path}")
        if member:
            if member not in _tar_members(path):
                raise BadSample("missing image", f"{what}: no member {member!r} in {path}")
            return f"{path}{_TAR_MEMBER}{member}"
        return path

    def open_image(self, path: str):
        """A picture file, or a member of a `.tar` (`shard.tar#member.jpg`), with the base's rule on
        symbolic links leading outside the folder applied to the archive."""
        archive, _, member = path.partition(_TAR_MEMBER) if ".tar" + _TAR_MEMBER in path else (path, "", "")
        if not member:
            return super().open_image(path)
        if not self.allow_outside_paths and resolves_outside(self.image_root, archive):
            raise BadSample(OUTSIDE_PATH, f"{archive} is a symbolic link to {os.path.realpath(archive)}")
        with tarfile.open(archive) as tar:
            data = tar.extractfile(member)
            if data is None:
                raise BadSample("unreadable image", f"{path}: not a file in the archive")
            return load_rgb(io.BytesIO(data.read()))

    # ---- samples -----------------------------------------------------------------------------

    def sample(self, index: int) -> Sample:
        """See `MiniGPT5Dataset.sample`: the answer turn of a document, the turns before it as context
        (the line or row read again, and checked by the same rules as when it was indexed)."""
        place, number, answer = (int(v) for v in self._index[:, index])
        value = self._row_at(place) if self.is_parquet else self._line_at(place)
        return document_sample(self._check(value, f"{self.data_file}:{number}"), answer)


def document_sample(document: _Document, answer: int) -> Sample:
    """The sample whose answer is turn `answer`: the dialogue of the turns up to it (the answer the
    assistant's, the others alternating back from it when the document gives no roles), its text in
    the Vicuna-v0 style (`prompts.render_dialogue`), its pictures and their captions."""
    messages = []
    for i, (role, segments) in enumerate(document.turns[: answer + 1]):
        if role is None:
            role = "assistant" if (answer - i) % 2 == 0 else "user"
        messages.append(Message(role, segments))
    dialogue = Dialogue(document.system, tuple(messages))
    source, target = prompts.render_dialogue(dialogue)
    pictures = dialogue.target_images
    captions = tuple(document.captions.get((answer, k)) for k, s in enumerate(dialogue.answer.segments)
                     if s.image is not None)
    return Sample(SPEC.task_name(document.name, answer, "answer"), source, target, captions[0] if captions else None,
                  dialogue.input_images, pictures[0] if pictures else None, document.where, dialogue=dialogue,
                  more_output_image_paths=pictures[1:], more_captions=captions[1:])


def _answer_turns(document: _Document) -> list[int]:
    """The answers: every assistant turn; in a document without roles every turn after the first."""
    if all(role is None for role, _ in document.turns):
        return list(range(1, len(document.turns)))
    return [i for i, (role, _) in enumerate(document.turns) if role == "assistant"]


@dataclass(frozen=True)
class _Picture(Segment):
    """An image segment as written, with its optional caption (kept out of samples.Segment)."""

    caption: str | None = None


def _json_turns(value: Any) -> list[tuple[str | None, list[Segment]]]:
    """A JSON line's turns as (role or None, segments); BadSample for the bad-row kinds."""
    if not isinstance(value, dict) or not isinstance(value.get("turns"), list):
        raise BadSample("malformed line", "expected an object with a list of 'turns'")
    if not value["turns"]:
        raise BadSample("turn with no segments", "'turns' is empty")
    turns = []
    for i, turn in enumerate(value["turns"]):
        role, segments = None, turn
        if isinstance(turn, dict):
            role, segments = turn.get("role"), turn.get("segments")
        if role is not None and role not in ROLES:
            raise BadSample("unknown role", f"turn {i}: {str(role)[:100]!r} (known: {', '.join(ROLES)})")
        if not isinstance(segments, list) or not segments:
            raise BadSample("turn with no segments", f"turn {i}")
        turns.append((role, [_segment(s, f"turn {i}, segment {k}") for k, s in enumerate(segments)]))
    if any(role is None for role, _ in turns) and any(role is not None for role, _ in turns):
        missing = next(i for i, (role, _) in enumerate(turns) if role is None)
        raise BadSample("unknown role", f"turn {missing} has no role while other turns of the line have one")
    return turns


def _segment(value: Any, what: str) -> Segment:
    if not isinstance(value, dict) or ("text" in value) == ("image" in value):
        raise BadSample("malformed segment", f"{what}: expected {{'text': str}} or {{'image': path}}, "
                                             f"got {str(value)[:100]}")
    if "text" in value:
        if not isinstance(value["text"], str):
            raise BadSample("malformed segment", f"{what}: 'text' is not a string")
        return Segment(text=value["text"])
    if not isinstance(value["image"], str) or not value["image"].strip():
        raise BadSample("image segment with no path", f"{what}: {value['image']!r}")
    caption = value.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise BadSample("malformed segment", f"{what}: 'caption' is not a string")
    return _Picture(image=value["image"], caption=caption)


def _parquet_turns(row: dict) -> list[tuple[None, list[Segment]]]:
    """An OBELICS row's turns: its segments in order, cut after each picture; no roles."""
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        raise BadSample("malformed row", "the columns 'texts' and 'images' must hold lists")
    if len(texts) != len(images):
        raise BadSample(ROW_PROBLEM, f"{len(texts)} texts, {len(images)} images")
    turns, current = [], []
    for k, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise BadSample("malformed segment", f"position {k}: exactly one of text and image must be set")
        if image is not None and not str(image).strip():
            raise BadSample("image segment with no path", f"position {k}")
        current.append(Segment(text=text) if text is not None else Segment(image=str(image)))
        if image is not None:
            turns.append((None, current))
            current = []
    if current:
        turns.append((None, current))
    if not turns:
        raise BadSample("turn with no segments", "an empty row")
    return turns


def open_parquet(path: Path):
    """The Parquet file (pyarrow, not read yet), checked to have OBELICS's `texts` and `images`."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:      # requirements.txt pins pyarrow
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install -r requirements.txt)") from e
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:          # pyarrow's ArrowIOError / ArrowInvalid
        raise DataError(f"{path}: not a readable Parquet file: {type(e).__name__}: {e}") from None
    missing = {"texts", "images"} - set(parquet.schema_arrow.names)
    if missing:
        raise DataError(f"{path}: no column {', '.join(sorted(missing))} (an OBELICS-style file has 'texts' and "
                        f"'images', lists of equal length)")
    return parquet


def _tar_members(path: str) -> frozenset[str]:
    """The files of a .tar (listed once per version of the file)."""
    return _listed_tar_members(path, os.stat(path).st_mtime_ns)


@lru_cache(maxsize=16)
def _listed_tar_members(path: str, version: int) -> frozenset[str]:
    try:
        with tarfile.open(path) as tar:
            return frozenset(m.name for m in tar.getmembers() if m.isfile())
    except (tarfile.TarError, OSError) as e:
        raise BadSample("unreadable image", f"{path}: not a readable .tar: {e}") from None
