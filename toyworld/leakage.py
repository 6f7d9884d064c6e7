"""Whether a toy-world build's test items occur in training: the check the build runs on what it
writes (the datasets, and the LLM's pretraining corpus when it makes one) and stops on.

A test item leaks when any of these occurs in a training source (the train and val splits of the
three datasets: validation picks the checkpoint; the LLM's pretraining corpus; the captioned pictures
SD and the image side are pretrained on):

    held-out combination  a training picture shows one, or a corpus document names one in any wording
    wording               a sentence the test wording can make (every caption order, story phrase,
                          request and chit-chat of `world.WORDING["test"]`) or an actual test text
                          occurs in a training text
    scene sequence        a test story's frames up to a predicted one are a training story's beginning
    caption history       a test story's captions up to a predicted one are a training story's beginning
    CC3M test split       holds a combination that is not held out
    unknown words         a word of a test text occurs in no LLM pretraining document (the test
                          wording is new sentences of the words the LLM learnt, not new words)

    problems(data, corpus)   -> one line per kind of leak found (empty: none)
    check(data, corpus, pictures)  -> SystemExit naming them (the build's `datasets` and `preset`
                                      steps, and every pretraining step that reads pictures)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from toyworld import world

TRAINING_SPLITS = ("train", "val")
SHOWN = 3                          # examples per kind of leak in a message


@dataclass
class SplitText:
    """What one split of the three datasets holds: its texts, its pictures' scenes (with where each
    is), and its stories' scene sequences and caption histories from the second frame on."""

    texts: list[str] = field(default_factory=list)
    scenes: list[tuple[str, world.Scene]] = field(default_factory=list)
    sequences: set[tuple] = field(default_factory=set)
    histories: set[tuple] = field(default_factory=set)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_split(data: Path, split: str) -> SplitText:
    """The texts, scenes and stories of `split` in the datasets under `data` (a dataset without
    that split contributes nothing)."""
    found = SplitText()
    tsv = data / "CC3M" / f"cc3m_{split}.tsv"
    if tsv.is_file():
        found.texts += [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:] if line]
        found.scenes += [(str(tsv), world.Scene(**a)) for a in _read_json(data / "CC3M" / f"scenes_{split}.json")]
    stories = _read_json(data / "VIST" / f"{split}_cleaned.json")
    if stories is not None:
        truth = _read_json(data / "VIST" / f"scenes_{split}.json")
        for steps in stories.values():
            captions = tuple(step["caption"] for step in steps)
            scenes = tuple(world.Scene(**truth[step["image_id"]]) for step in steps)
            found.texts += captions + tuple(step["description"] for step in steps if "description" in step)
            found.scenes += [(str(data / "VIST" / f"{split}_cleaned.json"), s) for s in scenes]
            found.sequences.update(scenes[:k + 1] for k in range(1, len(scenes)))
            found.histories.update(captions[:k + 1] for k in range(1, len(captions)))
    dialogues = data / "MMDialog" / split / f"{split}_conversations.txt"
    if dialogues.is_file():
        truth = _read_json(data / "MMDialog" / split / "scenes.json")
        for line in dialogues.read_text().splitlines():
            for turn in json.loads(line)["conversation"]:
                for part in turn["turn"]:
                    if "__TEXT__" in part:
                        found.texts.append(part["__TEXT__"])
                    if "__MEDIA__" in part:
                        found.scenes.append((str(dialogues), world.Scene(**truth[part["__MEDIA__"]])))
    return found


def test_phrases() -> list[str]:
    """Every sentence the test wording can make: each scene in each test word order, the story
    phrases, requests, answers and chit-chat (placeholders filled with every value; a shared
    picture's turn up to its caption)."""
    w = world.TEST
    phrases = [world.caption(s, t, w) for s in world.all_scenes() for t in range(len(w.captions))]
    phrases += [*w.day_later, *w.story_open, *w.later, *w.much_later, *w.dark]
    phrases += [p.format(colour=c) for p in w.recolour for c in world.COLOURS]
    phrases += [p for options in w.move.values() for p in options]
    phrases += [*w.greetings, *w.replies, *w.comment, *w.thanks, *w.welcome]
    phrases += [p.format(time=t) for p in (*w.ask, *w.answer) for t in world.TIME_WORDS.values()]
    phrases += [p.split("{caption}")[0].strip() for p in w.share]
    return sorted(set(phrases))


def held_out_captions() -> list[str]:
    """Every held-out combination in every word order, training's and the test's."""
    return sorted({world.caption(s, t, w) for s in world.all_scenes() if world.is_held_out(s)
                   for w in world.WORDING.values() for t in range(len(w.captions))})


def _occurring(phrases, text: str) -> list[str]:
    """The phrases that occur in `text` as whole words (a plain search first: most do not occur)."""
    return [p for p in phrases if p in text and re.search(r"(?<![\w])" + re.escape(p) + r"(?![\w])", text)]


def _line(what: str, examples: list) -> str:
    shown = "; ".join(str(e) for e in examples[:SHOWN])
    return f"{what}: {len(examples)} (e.g. {shown})"


def problems(data: Path | None, corpus: list[str] | None = None,
             pictures: list[tuple[world.Scene, str]] | None = None) -> list[str]:
    """One line per kind of leak between the test split of the datasets under `data` (if written)
    and the training sources (their train and val splits; `corpus`, the LLM's pretraining documents;
    `pictures`, the captioned pictures SD and the image side are pretrained on; those given)."""
    found = []
    training = [read_split(data, split) for split in TRAINING_SPLITS] if data is not None else []
    test = read_split(data, "test") if data is not None else SplitText()
    held = [f"{where}: {scene}" for split in training for where, scene in split.scenes if world.is_held_out(scene)]
    if held:
        found.append(_line("training pictures showing a held-out combination", held))
    not_held = [f"{where}: {scene}" for where, scene in test.scenes if "CC3M" in where and not world.is_held_out(scene)]
    if not_held:
        found.append(_line("CC3M test pictures of a combination that is not held out", not_held))
    sequences = sorted(str(s) for s in test.sequences & set().union(*(t.sequences for t in training)))
    if sequences:
        found.append(_line("test story scene sequences that occur in training", sequences))
    histories = sorted(str(h) for h in test.histories & set().union(*(t.histories for t in training)))
    if histories:
        found.append(_line("test story caption histories that occur in training", histories))
    texts = "\n".join(text for split in training for text in split.texts)
    wording = _occurring(sorted(set(test_phrases()) | set(test.texts)), texts)
    if wording:
        found.append(_line("test wording that occurs in a training text", [repr(w) for w in wording]))
    if pictures:
        held = [f"{scene}" for scene, _ in pictures if world.is_held_out(scene)]
        if held:
            found.append(_line("pretraining pictures showing a held-out combination", held))
        worded = _occurring(test_phrases(), "\n".join(text for _, text in pictures))
        if worded:
            found.append(_line("test wording in the pretraining pictures' captions", [repr(w) for w in worded]))
    if corpus:
        documents = "\n".join(corpus)
        named = _occurring(held_out_captions(), documents)
        if named:
            found.append(_line("LLM pretraining documents naming a held-out combination", [repr(n) for n in named]))
        worded = _occurring(sorted(set(test_phrases()) | set(test.texts)), documents)
        if worded:
            found.append(_line("test wording in the LLM pretraining documents", [repr(w) for w in worded]))
        unknown = unknown_words(test.texts, corpus)
        if unknown:
            found.append(_line("words of the test texts that no LLM pretraining document holds (a test would "
                               "ask for words the model was never taught)", unknown))
    return found


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def unknown_words(texts: list[str], corpus: list[str]) -> list[str]:
    """The words of `texts` that occur in no document of `corpus`: new wording must be new sentences
    of words the LLM learnt, or the test measures guessing, not generalisation."""
    known = {w for document in corpus for w in words(document)}
    return sorted({w for text in texts for w in words(text)} - known)


def check(data: Path | None, corpus: list[str] | None = None,
          pictures: list[tuple[world.Scene, str]] | None = None) -> None:
    """Stop the build (SystemExit naming every kind of leak) when a test item occurs in training."""
    leaks = problems(data, corpus, pictures)
    if leaks:
        raise SystemExit("error: the toy world's test items occur in training, or use words no training "
                         "text teaches (toyworld/leakage.py):\n- "
                         + "\n- ".join(leaks))
