"""What the project knows about each dataset, in one registry: `SPECS`.

Every part that treats datasets differently reads its spec here, never a dataset name of its own:
`dataloader.py` (which reader, which prompts, how task names are written), `train_eval.py` (how often
to validate, whether prediction draws the SD baseline), `metric.py` (which scorer, which CLIP model,
which samples are scored) and `shards.py` (which dataset its shards hold). Adding a dataset is a
reader class in `dataloader.py`, a scorer in `metric.py` and one `DatasetSpec` here.

The dataset of a run is chosen by `resolve_dataset_type`: an explicit type (`--dataset_type`,
`metric.py --dataset`), else the release's rule on `DATAFOLDER` (its path contains "CC3M" ->
CC3M, "MMDialog" -> MMDialog, else VIST), else the same rule on the data file's path. The log says
which rule chose it.

Task names are `{group}_{step}{suffix}`: the story, conversation or "cc3m", the step in it (for
CC3M the TSV row), and a suffix per kind of sample (`TaskKinds`). metric.py groups stories and
conversations by `split_task`, the inverse, and scores only a spec's `evaluated` kinds.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import prompts
from constants import data_folder, search_places

log = logging.getLogger("dataset_specs")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its reader, prompts, task names, evaluation and training choices."""

    name: str
    # The release's DATAFOLDER rule: a folder whose path contains this word holds this dataset
    # (None: the dataset of every other folder).
    folder_keyword: str | None
    # "module:Class" of the reader (a `dataloader.MiniGPT5Dataset`), and of its WebDataset reader.
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
            raise ValueError(f"{self.name} cannot be read from WebDataset shards (only "
                             f"{', '.join(s.name for s in SPECS.values() if s.shard_reader)})")
        return _load(self.shard_reader if shards else self.reader)

    def scorer_function(self) -> Callable:
        """metric.py's scorer: (samples, models, args) -> (results, counts)."""
        return _load(self.scorer)


def _load(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec(
        name="CC3M", folder_keyword="CC3M",
        reader="dataloader:CC3MDataset", shard_reader="shards:CC3MShards",
        system_prompt=prompts.CC3M_SYSTEM, templates={"instruction": prompts.CC3M_PROMPTS},
        task_suffixes={"caption": "", "instruction": "_instruction"}, evaluated=None,
        scorer="metric:score_cc3m", clip_model="ViT-L-14", sentence_bert=False, fid_real="cc3m_val",
        prompt_caption=None, val_check_interval=0.25, sd_baseline=True,
    ),
    DatasetSpec(
        name="MMDialog", folder_keyword="MMDialog",
        reader="dataloader:MMDialogDataset", shard_reader=None,
        system_prompt=prompts.MMDIALOG_SYSTEM, templates={},
        task_suffixes={"turn": "-mm"}, evaluated=None,
        scorer="metric:score_mmdialog", clip_model="ViT-B-32", sentence_bert=True, fid_real="targets",
        prompt_caption=None, val_check_interval=0.5, sd_baseline=False,
    ),
    DatasetSpec(
        name="VIST", folder_keyword=None,
        reader="dataloader:VISTDataset", shard_reader=None,
        system_prompt=prompts.VIST_SYSTEM,
        templates={"generation": prompts.VIST_GENERATION, "multimodal": prompts.VIST_MULTIMODAL,
                   "understanding": prompts.VIST_UNDERSTANDING},
        task_suffixes={"generation": "-gen", "multimodal": "-multimodal", "understanding": "-understanding"},
        evaluated=("generation",),
        scorer="metric:score_vist", clip_model="ViT-L-14", sentence_bert=False, fid_real="targets",
        prompt_caption=rf"scene description:\s*(.*?)\s*{re.escape(prompts.END_SYM)}", val_check_interval=0.5,
        sd_baseline=False,
    ),
)}
# The order CC3M, MMDialog, VIST is the release's DATAFOLDER rule: the first keyword found wins.
NAMES = ("CC3M", "VIST", "MMDialog")          # as the command lines list them


def spec(name: str) -> DatasetSpec:
    """The spec of a dataset type (any case); ValueError naming the known ones for anything else."""
    for known in SPECS.values():
        if name.lower() == known.name.lower():
            return known
    raise ValueError(f"unknown dataset type {name!r}; expected one of {', '.join(NAMES)}")


def dataset_of_path(path: str | os.PathLike) -> tuple[str, str]:
    """The release's rule on a folder or file path: (dataset type, why)."""
    text = str(path)
    for known in SPECS.values():
        if known.folder_keyword is not None and known.folder_keyword in text:
            return known.name, f"{text!r} contains {known.folder_keyword!r}"
    fallback = next(s for s in SPECS.values() if s.folder_keyword is None)
    keywords = " nor ".join(repr(s.folder_keyword) for s in SPECS.values() if s.folder_keyword)
    return fallback.name, f"{text!r} contains neither {keywords}"


def choose_dataset_type(data_file: str | os.PathLike | None = None,
                        dataset_type: str | None = None) -> tuple[str, str]:
    """(dataset type, which rule chose it): `dataset_type` if given (any case; an unknown one is an
    error), else the release's rule on DATAFOLDER when it is set, else on `data_file`'s path, else on
    the default DATAFOLDER."""
    if dataset_type is not None:
        return spec(dataset_type).name, "given explicitly"
    if os.environ.get("DATAFOLDER"):
        name, why = dataset_of_path(os.environ["DATAFOLDER"])
        source = "DATAFOLDER"
    elif data_file is not None:
        name, why = dataset_of_path(data_file)
        source = "the data file's path (DATAFOLDER is not set)"
    else:
        name, why = dataset_of_path(data_folder())
        source = "the default DATAFOLDER"
    return name, (f"from {source}: {why} (the release's rule: CC3M / MMDialog in the path, else VIST; "
                  f"--dataset_type / --dataset to choose)")


def resolve_dataset_type(data_file: str | os.PathLike | None = None, dataset_type: str | None = None) -> str:
    """`choose_dataset_type`'s dataset type; the log says which rule chose it."""
    name, why = choose_dataset_type(data_file, dataset_type)
    log.info("dataset type %s, %s", name, why)
    return name


def is_shard_spec(value: str | os.PathLike) -> bool:
    """Whether a data path names shards: it ends with `.tar` (a file, a brace pattern or a glob),
    or it is a folder holding .tar files (under DATAFOLDER or as given)."""
    text = str(value)
    if text.endswith(".tar"):
        return True
    return any(f.is_dir() and any(f.glob("*.tar")) for f in search_places(text, data_folder()))


def shard_reader(dataset_type: str | None = None) -> type:
    """The reader of WebDataset shards (`make_dataset`, the dump): the `shard_reader` of
    `dataset_type`'s spec, else that of the dataset whose spec names one (CC3M's `shards.CC3MShards`,
    which refuses a `dataset_type` it does not hold)."""
    if dataset_type is not None and spec(dataset_type).shard_reader:
        return spec(dataset_type).reader_class(shards=True)
    return next(s for s in SPECS.values() if s.shard_reader).reader_class(shards=True)


_SUFFIXES = sorted({s for known in SPECS.values() for s in known.task_suffixes.values() if s}, key=len, reverse=True)


def split_task(task: str) -> tuple[str, int]:
    """`{group}_{step}{suffix}` -> (group, step): the story / conversation and the step in it
    ((task, 0) for a name of another form). A suffix of no spec is taken when it is `-word`."""
    stem = next((task[: -len(s)] for s in _SUFFIXES if task.endswith(s)), task)
    match = re.fullmatch(r"(.+)_(\d+)(?:-\w+)?", stem)
    return (match.group(1), int(match.group(2))) if match else (task, 0)
