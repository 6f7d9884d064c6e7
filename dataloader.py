"""`make_dataset`, which builds the reader a dataset's spec names (dataset_specs.py), and the dump.
The readers live in `data_sources/`, one module per dataset (CC3M, VIST, MMDialog as the release reads
them); their classes and helpers are importable from here too, as before they moved.

    data file ──► index (once, at construction): which samples exist, in the release's order
              ──► sample(i): task name, source, target, caption, input/output image paths
                  (`dataset_base.Sample`: pure text; no tokenizer, no image is opened: the dump)
              ──► dataset[i]: + token ids and labels, image tensors (or cached features)
                  (`dataset_base.MiniGPT5Dataset`, which every reader subclasses; the item's keys
                  are listed there)
              ──► collator.Collator: the model's batch (padded ids, labels, stacked images)

The rooms around the readers: `data_sources/` (one module per dataset, registered in
`data_sources/__init__.py`), `tsv_index.py` (CC3M's TSV, indexed fast), `data_problems.py` (bad input:
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

import os
import sys
from typing import Any, Iterator

from collator import Collator  # noqa: F401  (dataloader.Collator, as before)
from constants import find_data
from data_problems import DataError  # noqa: F401  (dataloader.DataError, as before)
from data_sources.cc3m import CC3M_INSTRUCTION_EVERY, CC3MDataset, cc3m_sample  # noqa: F401
from data_sources.common import bounded_lines, json_depth_over, parse_json  # noqa: F401
from data_sources.mmdialog import MMDIALOG_BROKEN_IDS, MMDIALOG_MAX_TURN_TOKENS, MMDialogDataset  # noqa: F401
from data_sources.vist import VISTDataset  # noqa: F401
from dataset_base import MiniGPT5Dataset, Sample, text_style  # noqa: F401
from dataset_specs import NAMES as DATASET_TYPES  # noqa: F401  (dataloader.DATASET_TYPES, as before)
from dataset_specs import is_shard_spec, resolve_dataset_type, shard_reader, spec  # noqa: F401
# The release's prompts (importable from here too, as before they moved to prompts.py).
from prompts import (CC3M_INSTRUCTION, CC3M_PROMPTS, CC3M_SYSTEM, MMDIALOG_SYSTEM, VIST_GENERATION,  # noqa: F401
                     VIST_MULTIMODAL, VIST_SYSTEM, VIST_UNDERSTANDING, VOKEN_TARGET, speaker, text_target,
                     vist_context)


def make_dataset(data_file: str | os.PathLike, tokenizer: Any, cfg: Any, is_training: bool,
                 dataset_type: str | None = None, strict: bool = False, **kwargs: Any) -> MiniGPT5Dataset:
    """The dataset for `data_file` (resolved under DATAFOLDER if needed), its type chosen by
    `resolve_dataset_type`: the reader its spec names. Extra keyword arguments go to the dataset
    class. WebDataset shards (a `.tar`, a brace pattern or glob of them, a folder of them) are
    streamed by the spec's `shard_reader` (`dataset_specs.shard_reader`: `shards.CC3MShards`)."""
    if is_shard_spec(data_file):
        return shard_reader(dataset_type)(data_file, tokenizer=tokenizer, cfg=cfg, is_training=is_training,
                                          strict=strict, dataset_type=dataset_type,
                                          **{"render": text_style(cfg), **kwargs})
    path = find_data(data_file)
    cls = spec(resolve_dataset_type(path, dataset_type)).reader_class()
    kwargs.setdefault("render", text_style(cfg))        # another LLM family's prompt style, if any
    return cls(path, tokenizer=tokenizer, cfg=cfg, is_training=is_training, strict=strict, **kwargs)


def dump_records(dataset: MiniGPT5Dataset, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The dump's JSON objects (what `python dataloader.py DATA_FILE` prints, one per line)."""
    for sample in dataset.samples(limit):
        yield sample.record()


if __name__ == "__main__":      # the data command lines (dump, preprocess) live in data_commands.py
    import data_commands

    sys.exit(data_commands.main())
