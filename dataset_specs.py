"""What the project knows about each dataset, read from the one registry (`data_sources.REGISTRY`,
each dataset's module declares its `DatasetSpec`): the resolver of a run's dataset, task names, shards.

Every part that treats datasets differently reads its spec here, never a dataset name of its own:
`dataloader.py` (which reader), `train_eval.py` (how often to validate, whether prediction draws the
SD baseline), `metric.py` (which scorer, which CLIP model, which samples are scored) and `shards.py`
(which dataset its shards hold). Adding a dataset is one module in `data_sources/` and its line in
`data_sources.MODULES` (or no code at all: the `interleaved` format).

`SPECS` / `NAMES` are the release's three datasets (CC3M, VIST, MMDialog); `REGISTRY` / `KNOWN` every
dataset the flags accept.

The dataset of a run is chosen by `resolve_dataset_type`: an explicit type (`--dataset`,
`--dataset_type`), else the release's rule on `DATAFOLDER` (its path contains "CC3M" -> CC3M,
"MMDialog" -> MMDialog, else VIST), else the same rule on the data file's path. The log says which
rule chose it. The rule's fallback is checked: a path that does not name VIST and holds or is no VIST annotation
file (a folder that does not exist included) is an error listing the known datasets, never read as VIST.

Task names are `{group}_{step}{suffix}`: the story, conversation or "cc3m", the step in it (for
CC3M the TSV row), and a suffix per kind of sample. metric.py groups stories and conversations by
`split_task`, the inverse, and scores only a spec's `evaluated` kinds.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import data_sources
from constants import data_folder, search_places
from data_sources.common import DatasetSpec

log = logging.getLogger("dataset_specs")


# Every dataset, from the one registry (data_sources/__init__.py), and the release's three among them.
REGISTRY = data_sources.REGISTRY
NAMES = ("CC3M", "VIST", "MMDialog")          # the release's, as the command lines list them
SPECS: dict[str, DatasetSpec] = {name: spec for name, spec in REGISTRY.items() if name in NAMES}
KNOWN = NAMES + tuple(name for name in REGISTRY if name not in NAMES)   # every dataset a flag accepts
# What the release's DATAFOLDER rule gives a folder without any dataset's keyword.
FALLBACK = "VIST"


def spec(name: str) -> DatasetSpec:
    """The spec of a dataset type (any case); ValueError naming the known ones for anything else."""
    for known in REGISTRY.values():
        if name.lower() == known.name.lower():
            return known
    raise ValueError(f"unknown dataset type {name!r}; expected one of {', '.join(KNOWN)}")


def dataset_of_path(path: str | os.PathLike) -> tuple[str, str]:
    """The release's rule on a folder or file path: (dataset type, why)."""
    text = str(path)
    for known in REGISTRY.values():
        if known.folder_keyword is not None and known.folder_keyword in text:
            return known.name, f"{text!r} contains {known.folder_keyword!r}"
    keywords = " nor ".join(repr(s.folder_keyword) for s in SPECS.values() if s.folder_keyword)
    return FALLBACK, f"{text!r} contains neither {keywords}"


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
    rule = "the release's rule: CC3M / MMDialog in the path, else VIST; --dataset_type / --dataset to choose"
    if name == FALLBACK:
        check_fallback(data_file, os.environ.get("DATAFOLDER"), f"from {source}: {why}; {rule}")
    return name, f"from {source}: {why} ({rule})"


def check_fallback(data_file: str | os.PathLike | None, folder: str | os.PathLike | None, why: str) -> None:
    """The release's rule falls back to VIST for any path. Here the fallback needs a sign of VIST: the
    path names VIST, or the data file is a VIST annotation file (its spec's `file_name`), or, without a
    data file (metric.py), DATAFOLDER holds one. Anything else (a file of another kind, a folder that
    holds no annotation file or does not exist) is an error naming the known datasets, never read as VIST."""
    pattern = SPECS[FALLBACK].file_name
    if pattern is None:
        return
    if any(FALLBACK in str(path) for path in (data_file, folder) if path):
        return
    if data_file is not None:
        if re.fullmatch(pattern, Path(data_file).name):
            return
        what = f"{str(data_file)!r}: {why}, but it is not a VIST annotation file (X_cleaned.json)"
    elif not folder:
        return                                  # the default DATAFOLDER (datasets/CC3M) is not VIST's
    elif not Path(folder).is_dir():
        what = f"DATAFOLDER={str(folder)!r}: {why}, but there is no such folder"
    elif not any(re.fullmatch(pattern, f.name) for f in Path(folder).iterdir()):
        what = f"DATAFOLDER={str(folder)!r}: {why}, but it holds no VIST annotation file (X_cleaned.json)"
    else:
        return
    raise ValueError(f"cannot tell the dataset of {what}; give its type: --dataset (train_eval.py, metric.py) or "
                     f"--dataset_type (dataloader.py), one of {', '.join(KNOWN)}")


def resolve_dataset_type(data_file: str | os.PathLike | None = None, dataset_type: str | None = None) -> str:
    """`choose_dataset_type`'s dataset type; the log says which rule chose it."""
    name, why = choose_dataset_type(data_file, dataset_type)
    log.info("dataset type %s, %s", name, why)
    return name


def dataset_of_data(data: str | os.PathLike, dataset_type: str | None = None) -> str:
    """The dataset a run's data holds: `dataset_type` (`--dataset`), else the release's rule
    (`resolve_dataset_type`); WebDataset shards hold what their reader reads (CC3M's)."""
    if is_shard_spec(data):
        return shard_reader(dataset_type).dataset_type
    return resolve_dataset_type(data, dataset_type)


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
    return next(s for s in REGISTRY.values() if s.shard_reader).reader_class(shards=True)


_SUFFIXES = sorted({s for known in REGISTRY.values() for s in known.task_suffixes.values() if s}, key=len, reverse=True)


def split_task(task: str) -> tuple[str, int]:
    """`{group}_{step}{suffix}` -> (group, step): the story / conversation and the step in it
    ((task, 0) for a name of another form). A suffix of no spec is taken when it is `-word`."""
    stem = next((task[: -len(s)] for s in _SUFFIXES if task.endswith(s)), task)
    match = re.fullmatch(r"(.+)_(\d+)(?:-\w+)?", stem)
    return (match.group(1), int(match.group(2))) if match else (task, 0)
