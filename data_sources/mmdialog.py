"""MMDialog (stage 2): multimodal conversations, one JSON object per line
(`{"conversation_id", "conversation": [{"turn": [{"__TEXT__": ...}, {"__MEDIA__": id}?]}, ...]}`,
the pictures `{id}.jpg` beside the file). Every turn after the first is a sample whose source is the
system prompt, a sliding window of earlier turns and the speaker tag, as the release; the release's
stops (an empty / `.jpg` / over-long turn, a missing picture, a known-broken id) end a conversation.
The prompts are the release's, in prompts.py; the scorer is `metric.score_mmdialog`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import prompts
from constants import IMAGE_SLOT, RESERVED_TOKENS
from data_problems import OUTSIDE_PATH, too_long_row, too_long_text
from data_sources.common import DatasetSpec, bounded_lines, json_line
from dataset_base import MiniGPT5Dataset, Sample
from samples import Dialogue, Message, Segment

MMDIALOG_BROKEN_IDS = frozenset({"-3872362534310063124", "3713630103994725971"})
MMDIALOG_MAX_TURN_TOKENS = 50

SPEC = DatasetSpec(
    name="MMDialog", folder_keyword="MMDialog",
    reader="data_sources.mmdialog:MMDialogDataset", shard_reader=None,
    system_prompt=prompts.MMDIALOG_SYSTEM, templates={},
    task_suffixes={"turn": "-mm"}, evaluated=None,
    scorer="metric:score_mmdialog", clip_model="ViT-B-32", sentence_bert=True, fid_real="targets",
    prompt_caption=None, val_check_interval=0.5, sd_baseline=False,
)


@dataclass(frozen=True)
class _Conversation:
    conversation_id: str
    texts: tuple[str, ...]
    images: tuple[str | None, ...]
    line: int


class MMDialogDataset(MiniGPT5Dataset):
    """MMDialog conversations (stage 2), see the module docstring."""

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
        value, problem = json_line(line, where, self.caps.max_json_depth)
        if problem is None and (detail := _mmdialog_problem(value)):
            problem = ("malformed conversation", detail)
        if problem:
            self.problems.add(where, problem[0], problem[1], skipped="line skipped")
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
        parts, inputs = [SPEC.system_prompt], []
        for j in range(window, i):
            parts.append(f"{prompts.speaker(j)} {conv.texts[j]}")
            if conv.images[j] is not None:
                parts.append(IMAGE_SLOT)
                inputs.append(conv.images[j])
        parts.append(prompts.speaker(i))
        text, image = conv.texts[i], conv.images[i]
        target = f"{text} {prompts.VOKEN_TARGET}" if image is not None else prompts.text_target(text)
        # The speaker of the answer is the assistant, the other one the user (samples.py).
        messages = tuple(Message("assistant" if (i - j) % 2 == 0 else "user", _turn(conv, j))
                         for j in range(window, i + 1))
        return Sample(SPEC.task_name(conv.conversation_id, i, "turn"), " ".join(parts), target, None,
                      tuple(inputs), image, f"{self.data_file}:{conv.line}",
                      dialogue=Dialogue(SPEC.system_prompt, messages))


def _turn(conv: _Conversation, j: int) -> tuple[Segment, ...]:
    image = conv.images[j]
    return (Segment(text=conv.texts[j]),) + ((Segment(image=image),) if image is not None else ())


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
