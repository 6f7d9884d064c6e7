"""The readers of the three datasets of MiniGPT-5 (CC3M, VIST, MMDialog), as the release reads them,
and `make_dataset`, which picks the reader a dataset's spec names (dataset_specs.py).

    data file ──► index (once, at construction): which samples exist, in the release's order
              ──► sample(i): task name, source, target, caption, input/output image paths
                  (`dataset_base.Sample`: pure text; no tokenizer, no image is opened: the dump)
              ──► dataset[i]: + token ids and labels, image tensors (or cached features)
                  (`dataset_base.MiniGPT5Dataset`, which every reader subclasses; the item's keys
                  are listed there)
              ──► collator.Collator: the model's batch (padded ids, labels, stacked images)

The rooms around the readers: `tsv_index.py` (CC3M's TSV, indexed fast), `data_problems.py` (bad input:
counted, logged, or an error), `feature_cache.py` (cached encoder outputs), `collator.py`, `shards.py`
(CC3M from WebDataset shards), `prompts.py` (the wording of every prompt).

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
  feature cache is keyed by the image's absolute path (see `feature_cache.feature_file`).

CLI (data_commands.py; this module builds no model):
    python dataloader.py DATA_FILE [--split train|test] [--limit N] [--strict]
                         [--model_config config/tiny.yaml] [--dataset_type T]   # one JSON per sample
    (DATA_FILE may also be CC3M WebDataset shards: 'cc3m/{00000..00009}.tar', a glob, a folder; shards.py)
    python dataloader.py preprocess DATA_FILE [--out outputs/features] [--split ...] [--batch_size N]
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from collator import Collator  # noqa: F401  (dataloader.Collator, as before)
from configuration import limits
from constants import IMAGE_SLOT, RESERVED_TOKENS, find_data
from data_problems import OUTSIDE_PATH, DataError, too_long_row, too_long_text
from dataset_base import MiniGPT5Dataset, Sample, choose
from dataset_specs import NAMES as DATASET_TYPES  # noqa: F401  (dataloader.DATASET_TYPES, as before)
from dataset_specs import SPECS, is_shard_spec, resolve_dataset_type, shard_reader, spec
# The release's prompts (importable from here too, as before they moved to prompts.py).
from prompts import (CC3M_INSTRUCTION, CC3M_PROMPTS, CC3M_SYSTEM, MMDIALOG_SYSTEM, VIST_GENERATION,  # noqa: F401
                     VIST_MULTIMODAL, VIST_SYSTEM, VIST_UNDERSTANDING, VOKEN_TARGET, speaker, text_target,
                     vist_context)
from tsv_index import outside_rows, read_cc3m_tsv

log = logging.getLogger("dataloader")

CC3M_INSTRUCTION_EVERY = 100
MMDIALOG_BROKEN_IDS = frozenset({"-3872362534310063124", "3713630103994725971"})
MMDIALOG_MAX_TURN_TOKENS = 50


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
        return Sample(name, vist.system_prompt + template.format(context=context), text_target(caption), None,
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
        return too_long_text(caps), f"{len(step['caption']):,} characters"
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
                    self.problems.add(f"{path}:{line_no}", too_long_row(self.caps), skipped="line skipped")
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
                self.problems.add(f"{path}:{line_no} (turn {i})", too_long_text(self.caps),
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
        target = f"{text} {VOKEN_TARGET}" if image is not None else text_target(text)
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
    `resolve_dataset_type`: the reader its spec names. Extra keyword arguments go to the dataset
    class. WebDataset shards (a `.tar`, a brace pattern or glob of them, a folder of them) are
    streamed by the spec's `shard_reader` (`dataset_specs.shard_reader`: `shards.CC3MShards`)."""
    if is_shard_spec(data_file):
        return shard_reader(dataset_type)(data_file, tokenizer=tokenizer, cfg=cfg, is_training=is_training,
                                          strict=strict, dataset_type=dataset_type, **kwargs)
    path = find_data(data_file)
    cls = spec(resolve_dataset_type(path, dataset_type)).reader_class()
    return cls(path, tokenizer=tokenizer, cfg=cfg, is_training=is_training, strict=strict, **kwargs)


def dump_records(dataset: MiniGPT5Dataset, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The dump's JSON objects (what `python dataloader.py DATA_FILE` prints, one per line)."""
    for sample in dataset.samples(limit):
        yield sample.record()


if __name__ == "__main__":      # the data command lines (dump, preprocess) live in data_commands.py
    import data_commands

    sys.exit(data_commands.main())
