"""CC3M (stage 1): captions -> pictures, from the release's TSV (`caption`, `image_path`), or from
WebDataset shards (`shards.CC3MShards`, which builds its samples with `cc3m_sample` here).

Each row gives `cc3m_{row}` (source = the cleaned caption, target = the vokens, caption = the cleaned
caption); in training every 100th row also gives `cc3m_{row}_instruction` (the system prompt and one of
the release's instruction templates, drawn per task name). In test mode the target is the caption.
The prompts are the release's, in prompts.py; the scorer is `metric.score_cc3m`.
"""
from __future__ import annotations

import numpy as np

import prompts
from data_problems import OUTSIDE_PATH
from data_sources.common import DatasetSpec
from dataset_base import MiniGPT5Dataset, Sample, choose
from samples import Dialogue, Message, Segment
from tsv_index import outside_rows, read_cc3m_tsv

CC3M_INSTRUCTION_EVERY = 100

SPEC = DatasetSpec(
    name="CC3M", folder_keyword="CC3M",
    reader="data_sources.cc3m:CC3MDataset", shard_reader="shards:CC3MShards",
    system_prompt=prompts.CC3M_SYSTEM, templates={"instruction": prompts.CC3M_PROMPTS},
    task_suffixes={"caption": "", "instruction": "_instruction"}, evaluated=None,
    scorer="metric:score_cc3m", clip_model="ViT-L-14", sentence_bert=False, fid_real="cc3m_val",
    prompt_caption=None, val_check_interval=0.25, sd_baseline=True,
)


class CC3MDataset(MiniGPT5Dataset):
    """CC3M captions -> images (stage 1), see the module docstring."""

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
    name = SPEC.task_name("cc3m", row, "instruction" if instruction else "caption")
    source, system, request = caption, None, caption
    if instruction:
        prompt = choose(SPEC.templates["instruction"], seed, name)
        source = SPEC.system_prompt + prompts.CC3M_INSTRUCTION.format(prompt=prompt, caption=caption)
        system, request = SPEC.system_prompt, f"{prompt} {caption}"
    target = prompts.VOKEN_TARGET if is_training else caption
    dialogue = Dialogue(system, (Message("user", (Segment(text=request),)),
                                 Message("assistant", (Segment(image=image_path),))))
    return Sample(name, source, target, caption, (), image_path, location, dialogue=dialogue)
