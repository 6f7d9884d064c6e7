"""VIST (stage 2): visual stories. Per step a generation sample, and in training, from the second step
on, a multimodal and an understanding sample, as the release. The image mapping file is the
annotation file's name with `cleaned` replaced by `image_mapping`. The prompts are the release's, in
prompts.py; the scorer is `metric.score_vist` (the generation samples only).

A step may also carry `description`: its picture described on its own, as VIST's
descriptions-in-isolation annotations describe each picture apart from the story. It is never shown
to the model; it becomes the caption loss's target for the samples that draw that picture, so
stage 2 keeps the condition in the words SD was trained on. The release's files have none, and the
caption loss stays off for VIST, as in the release.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

import prompts
from constants import RESERVED_TOKENS
from data_problems import OUTSIDE_PATH, DataError, too_long_text
from data_sources.common import DatasetSpec, read_json, slotted
from dataset_base import MiniGPT5Dataset, Sample, choose
from samples import Dialogue, Message, Segment

SPEC = DatasetSpec(
    name="VIST", folder_keyword=None,
    reader="data_sources.vist:VISTDataset", shard_reader=None,
    system_prompt=prompts.VIST_SYSTEM,
    templates={"generation": prompts.VIST_GENERATION, "multimodal": prompts.VIST_MULTIMODAL,
               "understanding": prompts.VIST_UNDERSTANDING},
    task_suffixes={"generation": "-gen", "multimodal": "-multimodal", "understanding": "-understanding"},
    evaluated=("generation",),
    scorer="metric:score_vist", clip_model="ViT-L-14", sentence_bert=False, fid_real="targets",
    prompt_caption=rf"scene description:\s*(.*?)\s*{re.escape(prompts.END_SYM)}", val_check_interval=0.5,
    sd_baseline=False, file_name=r".*cleaned.*\.json",
)


@dataclass(frozen=True)
class _Story:
    story_id: str
    captions: tuple[str, ...]
    images: tuple[str, ...]
    steps: tuple[str, ...]  # the steps' `sequence_index`
    descriptions: tuple[str | None, ...]  # each picture's `description`, None where the step has none


class VISTDataset(MiniGPT5Dataset):
    """VIST stories (stage 2), see the module docstring."""

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
        stories, mapping = read_json(path, dict), read_json(mapping_path, dict)
        self.stories: list[_Story] = []
        story_idx, step_idx, kind_idx = [], [], []
        for story_id, steps in stories.items():
            captions, images, steps_done, descriptions = [], [], [], []
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
                descriptions.append(step.get("description"))
            for k in range(len(captions)):
                kinds = (0, 1, 2) if k > 0 and self.is_training else (0,)
                story_idx += [len(self.stories)] * len(kinds)
                step_idx += [k] * len(kinds)
                kind_idx += list(kinds)
            self.stories.append(_Story(str(story_id), tuple(captions), tuple(images), tuple(steps_done),
                                       tuple(descriptions)))
        self._index = np.array([story_idx, step_idx, kind_idx], dtype=np.int64).reshape(3, -1)

    def __len__(self) -> int:
        return self._index.shape[1]

    def sample(self, index: int) -> Sample:
        """See `MiniGPT5Dataset.sample`."""
        s, k, kind = (int(v) for v in self._index[:, index])
        story = self.stories[s]
        caption = story.captions[k]
        context = prompts.vist_context(story.captions[:k])
        kind_name = self.KINDS[kind]
        name = SPEC.task_name(story.story_id, story.steps[k], kind_name)
        template = choose(SPEC.templates[kind_name], self.seed, name)
        history = story.images[:k]
        location = f"{self.data_file} (story {story.story_id}, step {k})"
        system = SPEC.system_prompt
        if kind_name == "generation":
            dialogue = _dialogue(template, story, k, (Segment(image=story.images[k]),), caption=caption)
            return Sample(name, system + template.format(context=context, caption=caption), prompts.VOKEN_TARGET,
                          story.descriptions[k], history, story.images[k], location, dialogue=dialogue)
        if kind_name == "multimodal":
            dialogue = _dialogue(template, story, k, (Segment(text=caption), Segment(image=story.images[k])))
            return Sample(name, system + template.format(context=context), f"{caption} {prompts.VOKEN_TARGET}",
                          story.descriptions[k], history, story.images[k], location, dialogue=dialogue)
        dialogue = _dialogue(template, story, k, (Segment(text=caption),), shown=story.images[k])
        return Sample(name, system + template.format(context=context), prompts.text_target(caption), None,
                      history + (story.images[k],), None, location, dialogue=dialogue)


def _dialogue(template: str, story: _Story, k: int, answer: tuple[Segment, ...], caption: str = "",
              shown: str | None = None) -> Dialogue:
    """The story so far (each caption, then its picture) and the request of the template as the user's
    message (the picture `shown` at the request's image slot), and the answer."""
    request = template.removeprefix(prompts.HUMAN).removesuffix(prompts.ASSISTANT).replace("{context}", "")
    request = request.format(caption=caption)
    context = [s for c, image in zip(story.captions[:k], story.images[:k])
               for s in (Segment(text=c), Segment(image=image))]
    user = tuple(context + slotted(request, [shown] if shown else []))
    return Dialogue(SPEC.system_prompt, (Message("user", user), Message("assistant", answer)))


def _vist_step_problem(step: Any, mapping: dict, caps) -> tuple[str, str] | None:
    if not isinstance(step, dict) or not {"caption", "image_id", "sequence_index"} <= set(step):
        return "malformed step", f"expected caption, image_id and sequence_index, got {str(step)[:200]}"
    for field in ("caption", "description"):
        if field in step and (problem := _text_problem(step[field], field, caps)):
            return problem
    if str(step["image_id"]) not in mapping:
        return "image id not in the mapping file", repr(step["image_id"])[:200]
    if not isinstance(mapping[str(step["image_id"])], str) or not mapping[str(step["image_id"])]:
        return "image path in the mapping file is not a string", \
            f"{step['image_id']!r}: {mapping[str(step['image_id'])]!r}"[:200]
    return None


def _text_problem(text: Any, field: str, caps) -> tuple[str, str] | None:
    """What is wrong with a step's text `field` (its caption, or its optional description), if anything."""
    where = "" if field == "caption" else f"{field}: "
    if not isinstance(text, str) or not text.strip():
        return f"empty {field}", f"{where}{text!r}"[:200]
    if len(text) > caps.max_text_chars:
        return too_long_text(caps), f"{where}{len(text):,} characters"
    if any(token in text for token in RESERVED_TOKENS):
        return "reserved token in text", f"{where}{text[:200]!r}"
    return None
