"""The prediction files `predictions-{rank}.pt`: written by `train_eval.py`, read by `metric.py`.

Its own small module so that the writer and the reader share one definition of the format
without importing each other (metric.py pulls in CLIP, NLTK, ...; train_eval.py the model).

One item is a `PredictionRecord`. On disk the layout is the release's: a list with one entry per
test item, the record as the positional list `PredictionRecord.to_release_list()` writes,

    [input_text, predicted_text, expected_text, predicted_image, sd_baseline_image,
     expected_image, None, task_name]

with the images as PIL images (None when there is none) and `expected_image` a 3 x H x W float
tensor in [0, 1] (the release's test-mode transform: no normalisation), None when the sample has
no target image; the seventh slot is unused (None), as in the release. So the release's `metric.py`
scores our files and ours scores its files. Only `to_release_list` / `from_release_list` know the
positions. An answer with several pictures keeps its first predicted and expected pictures in their
slots and the others, in order, in the seventh: `{"more_predicted_images": [PIL, ...],
"more_expected_images": [tensor, ...]}` (None when there are none, so one-picture files are the
release's byte for byte and the release's `metric.py` still reads the first pictures).

Format and safety: `torch.save`, a pickle in a zip, as the release wrote them (its `metric.py`
needs PIL images in the list). Reading never runs code from the file: `weights.load_untrusted`
(`torch.load` with `weights_only=True`) plus exactly one extra class, `PIL.Image.Image`, rebuilt by
`_CheckedImage`, which checks the pickled state (mode, size within `max_image_pixels`, pixel bytes)
before Pillow allocates anything. A file that needs any other Python object is refused with an error
naming the file. Memory stays proportional to the file: before anything is unpickled, the pickle's
references to objects it already built (pictures, their pixel bytes) are counted, and after it,
pictures and tensors that several slots share; more than `max_shared_references` of them
(config/limits.yaml; our writer and the release's store each picture once) is an error, as is a file
whose references would add more data than the file holds.

The folder: one prediction run's files only. `claim_folder` (train_eval.py, before a model loads)
refuses a folder that holds an earlier run's predictions, or empties it with `--overwrite`, and
locks it while the run writes; the run ends with the manifest `predictions.json` (`write_manifest`:
each rank's file and item count, the checkpoints, the dataset, the settings). `read_folder`
(metric.py) reads exactly the files the manifest lists and checks their counts, so predictions of
two runs (another model, another number of processes) are never mixed; a folder without a
manifest (the release's, or ours from before) is read whole, as it was.
"""
from __future__ import annotations

import json
import logging
import os
import pickletools
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)

_IMAGE_MODES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3,
                "I": 4, "F": 4, "I;16": 2}
WHAT = "prediction file (a list written by train_eval.py or the release)"


class _CheckedImage(Image.Image):
    """Unpickles a `PIL.Image.Image` after checking its state: a known mode, a sane size and
    exactly the pixel bytes that mode and size need. `load` turns it into a plain PIL image."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, (list, tuple)) or len(state) not in (4, 5):
            raise ValueError("a pickled image must be [info, mode, size, (palette,) data]")
        info, mode, size, palette, data = state if len(state) == 5 else (*state[:3], None, state[3])
        if not isinstance(info, dict) or mode not in _IMAGE_MODES:
            raise ValueError(f"unexpected image mode {mode!r}")
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in size)):
            raise ValueError(f"unexpected image size {size!r}")
        if size[0] * size[1] > _max_pixels():
            raise ValueError(f"a picture of {size[0]} x {size[1]} pixels, more than max_image_pixels "
                             f"({_max_pixels():,}; config/limits.yaml)")
        bits = 1 if mode == "1" else 8 * _IMAGE_MODES[mode]
        expected = ((size[0] * bits + 7) // 8) * size[1]
        if not isinstance(data, bytes) or len(data) != expected:
            raise ValueError(f"a {mode} image of {size} needs {expected} bytes of pixels")
        if palette is not None and not isinstance(palette, (list, bytes)):
            raise ValueError("unexpected palette")
        super().__setstate__([info, mode, tuple(size), palette, data])


SAFE_GLOBALS = [(_CheckedImage, "PIL.Image.Image")]


def _max_pixels() -> int:
    from configuration import limits

    return limits().max_image_pixels


# ---- references: what a file reuses instead of storing ------------------------------------------

REFERENCE_BYTES = 1024        # an object this large that the pickle refers to again is a reference
_LITERALS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
             "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"}   # they grow the object below
_MARK = [0]


def pickle_references(data) -> tuple[int, int]:
    """(references, bytes referenced) of a pickle (bytes or a binary stream), read with
    `pickletools.genops` (nothing is built): each memo look-up (GET) of an object of REFERENCE_BYTES or more is a reference, and the
    bytes referenced add up the size of everything looked up again. The sizes are followed on a
    stack as the unpickler would build the objects: a literal weighs its length, a built object what
    went into it (a picture: its pixel bytes)."""
    stack: list[list[int]] = []
    memo: dict[int, list[int]] = {}
    references = referenced = 0
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else [0]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            cell = memo.get(arg, [0])
            references += cell[0] >= REFERENCE_BYTES
            referenced += cell[0]
            stack.append(cell)
        elif name == "MARK":
            stack.append(_MARK)
        else:
            before = op.stack_before[1:] if name in _IN_PLACE else op.stack_before
            weight = 0
            for item in reversed(before):
                if item is pickletools.stackslice:
                    while stack and stack[-1] is not _MARK:
                        weight += stack.pop()[0]
                elif stack:
                    weight += stack.pop()[0] if stack[-1] is not _MARK or item is pickletools.markobject else 0
            if name in _IN_PLACE:
                if stack:
                    stack[-1][0] += weight
            elif op.stack_after:
                if name in _LITERALS:
                    weight = len(arg)
                stack.append([weight])
                stack.extend([0] for _ in op.stack_after[1:])
    return references, referenced


def file_references(path: Path) -> tuple[int, int]:
    """`pickle_references` of the pickle of a torch.save zip archive (`<archive>/data.pkl`), streamed
    from the archive."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(names) != 1:
            raise ValueError("no data.pkl in the archive")
        with archive.open(names[0]) as stream:
            return pickle_references(stream)


def _shared_slots(entries: list) -> int:
    """Picture and tensor slots of the loaded entries that reuse a picture or a tensor's storage of an
    earlier slot, or whose tensor views more elements than its storage holds (a stride trick). An
    all-zero tensor (the release's "no target image") is never copied when read, so it may be shared."""
    seen: set = set()
    shared = 0
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) != len(RELEASE_LAYOUT):
            continue
        more = entry[6] if isinstance(entry[6], dict) else {}
        extra = [v for key in MORE_KEYS for v in (more.get(key) if isinstance(more.get(key), list) else [])]
        for value in (entry[3], entry[4], entry[5], *extra):
            if isinstance(value, Image.Image):
                key = ("image", id(value))
            elif isinstance(value, torch.Tensor):
                if not value.any():
                    continue
                storage = value.untyped_storage()
                key = ("storage", storage.data_ptr(), storage.nbytes())
                shared += value.numel() * value.element_size() > storage.nbytes()
            else:
                continue
            shared += key in seen
            seen.add(key)
    return shared


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """A target image as the dataset gives it ([-1, 1], what the VAE expects) -> [0, 1], float32 on
    the CPU (what prediction files hold)."""
    return ((image.detach().float().cpu() + 1) / 2).clamp(0, 1)


@dataclass
class PredictionRecord:
    """One test item's prediction: what `train_eval.py` writes and `metric.py` reads."""

    input_text: str
    predicted_text: str
    expected_text: str
    predicted_image: Image.Image | None
    sd_baseline_image: Image.Image | None
    expected_image: torch.Tensor | None      # 3 x H x W in [0, 1]; None: the sample has no target image
    task_name: str
    # An answer with several pictures: pictures 2.. of the answer, generated and expected, in order.
    more_predicted_images: list = field(default_factory=list)
    more_expected_images: list = field(default_factory=list)

    @property
    def predicted_images(self) -> list:
        """Every generated picture of the answer, in order."""
        return ([self.predicted_image] if self.predicted_image is not None else []) + list(self.more_predicted_images)

    @property
    def expected_images(self) -> list:
        """Every expected picture of the answer, in order ([0, 1] tensors)."""
        return ([self.expected_image] if self.expected_image is not None else []) + list(self.more_expected_images)

    def to_release_list(self) -> list:
        """The release's positional layout; the seventh slot None, or the pictures after the first."""
        more = None
        if self.more_predicted_images or self.more_expected_images:
            more = {"more_predicted_images": list(self.more_predicted_images),
                    "more_expected_images": list(self.more_expected_images)}
        return [self.input_text, self.predicted_text, self.expected_text, self.predicted_image,
                self.sd_baseline_image, self.expected_image, more, self.task_name]

    @classmethod
    def from_release_list(cls, entry: list | tuple) -> "PredictionRecord":
        """A record from the release's layout (checked: see `load`)."""
        problem = _layout_problem(entry)
        if problem:
            raise ValueError(f"not [{', '.join(RELEASE_LAYOUT)}]: {problem}")
        more = entry[6] or {}
        return cls(*entry[:6], entry[7], list(more.get("more_predicted_images", [])),
                   list(more.get("more_expected_images", [])))

    @classmethod
    def from_item(cls, item: dict) -> "PredictionRecord":
        """The record of one item of `MiniGPT5_Model.predict_step` (its expected pictures in [-1, 1])."""
        expected = item["expected_image"]
        return cls(item["source"], item["text"], item["target"], item["image"], item["baseline"],
                   to_unit_range(expected) if expected is not None else None, item["task_name"],
                   list(item.get("more_images", [])),
                   [to_unit_range(x) for x in item.get("more_expected_images", [])])


def prediction_items(batch: dict, outputs: list, baselines: list, input_images: list[list]) -> list[dict]:
    """What `MiniGPT5_Model.predict_step` returns for a collated test batch: per prompt its source,
    generated text and picture (`generation.GenerationOutput`), expected text and picture (the
    batch's target, None when it has none), the SD baseline (or None), the input pictures and the
    task name; `PredictionRecord.from_item` and the prediction writer read these."""
    items = []
    counts = batch.get("output_image_counts")
    per_item = counts.clamp(min=1) if counts is not None else torch.ones(len(outputs), dtype=torch.long)
    offsets = (torch.cumsum(per_item, 0) - per_item).tolist()     # the collator's target rows
    for i, out in enumerate(outputs):
        k = int(counts[i]) if counts is not None else int(bool(batch["has_output_image"][i]))
        expected = [batch["output_images"][offsets[i] + j].cpu() for j in range(k)]
        items.append({"source": batch["sources"][i], "text": out.text, "target": batch["targets"][i],
                      "image": out.image, "baseline": baselines[i], "task_name": batch["task_names"][i],
                      "expected_image": expected[0] if expected else None, "input_images": input_images[i],
                      "more_images": list(getattr(out, "images", [])[1:]), "more_expected_images": expected[1:]})
    return items


RELEASE_LAYOUT = ("input_text", "predicted_text", "expected_text", "predicted_image", "sd_baseline_image",
                  "expected_image", "None", "task_name")
MORE_KEYS = ("more_predicted_images", "more_expected_images")      # the seventh slot, when it is used


def save(records: list[PredictionRecord], path: str | os.PathLike) -> Path:
    """Write `records` as one prediction file, in the release's layout (atomically)."""
    from run_files import save_atomic

    return save_atomic([record.to_release_list() for record in records], path)


# ----------------------------------------------------------------------------------------------
# The prediction folder: one run's files, and their manifest
# ----------------------------------------------------------------------------------------------

MANIFEST = "predictions.json"
LOCK = ".predictions.lock"
_FILE = re.compile(r"predictions-(\d+)\.pt")
# What a task folder holds (figures.save_task_folder); a folder with anything else is not ours.
TASK_FILES = frozenset({"generated.jpg", "sd_baseline.jpg", "gt.jpg", "input.jpg"})


def file_name(rank: int) -> str:
    """The prediction file of process `rank`."""
    return f"predictions-{rank}.pt"


def prediction_files(folder: Path) -> list[Path]:
    """The `predictions-{rank}.pt` files of `folder`, in rank order."""
    return sorted((p for p in Path(folder).glob("predictions-*.pt") if _FILE.fullmatch(p.name)),
                  key=lambda p: int(_FILE.fullmatch(p.name).group(1)))


def claim_folder(folder: Path, overwrite: bool):
    """Make `folder` this prediction run's (global rank 0, before a model loads): created if needed,
    locked while the run writes (`run_files.FolderLock`, returned; another run writing it now is an
    error), and free of an earlier run's predictions: refused without `overwrite`; with it, the
    earlier prediction files, manifest and task folders are deleted (said on stdout)."""
    from run_files import FolderLock, RunFileError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(folder / LOCK)
        if not lock.acquire():
            raise RunFileError(f"another prediction run ({lock.holder()}) is writing {folder} now; wait for it, or "
                               f"write elsewhere (OUTPUT_SUFFIX or OUTPUT_FOLDER)")
    except OSError as e:
        raise RunFileError(f"the prediction folder {str(folder)!r} (OUTPUT_FOLDER/<--test_weight>) cannot be "
                           f"written: {e.strerror or e}; set OUTPUT_FOLDER to a writable folder (nothing was "
                           f"loaded)") from None
    old = prediction_files(folder) + ([folder / MANIFEST] if (folder / MANIFEST).exists() else [])
    tasks = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.iterdir())
                   and all(f.is_file() and f.name in TASK_FILES for f in p.iterdir()))
    if (old or tasks) and not overwrite:
        lock.release()
        shown = [p.name for p in old] + ([f"{len(tasks)} task folder(s)"] if tasks else [])
        raise RunFileError(f"{folder} already holds an earlier prediction run's files ({', '.join(shown)}); give "
                           f"--overwrite to replace them, or write elsewhere (OUTPUT_SUFFIX or OUTPUT_FOLDER)")
    for path in old:
        path.unlink()
    for path in tasks:
        shutil.rmtree(path)
    if old or tasks:
        print(f"--overwrite: deleted an earlier run's {len(old)} prediction file(s) and {len(tasks)} task folder(s) "
              f"in {folder}")
    return lock


def write_manifest(folder: Path, counts: list[int], **about) -> Path:
    """`predictions.json`: the world size, each rank's file with its item count and size, the total,
    and `about` (checkpoints, dataset, settings). Written last, by rank 0, once every file is there."""
    from run_files import save_json_atomic

    files = [{"file": file_name(rank), "items": int(n), "bytes": (Path(folder) / file_name(rank)).stat().st_size}
             for rank, n in enumerate(counts)]
    manifest = {"world_size": len(counts), "items": sum(f["items"] for f in files), "files": files,
                **about, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    return save_json_atomic(manifest, Path(folder) / MANIFEST)


def llm_family_of(folder: Path) -> str:
    """The LLM family whose text a prediction folder holds: its manifest's `llm_family` (metric.py
    cleans the texts by that family's rule); vicuna for a folder without one (the release's)."""
    from llm_families import DEFAULT_FAMILY

    manifest_path = Path(folder) / MANIFEST
    if not manifest_path.exists():
        return DEFAULT_FAMILY
    return json.loads(manifest_path.read_text()).get("llm_family", DEFAULT_FAMILY)


def read_folder(folder: Path) -> tuple[list[PredictionRecord], int]:
    """Every record of a prediction folder, in rank order, and the number of files read. With a
    manifest: exactly the files it lists, each with the item count and size it records; a file it
    does not list, or a difference, raises `weights.CheckpointError` in one line (another run's
    predictions must not be scored with these). Without one (the release's, or ours from before),
    every `predictions-*.pt`. FileNotFoundError when there is none."""
    from weights import CheckpointError

    folder = Path(folder)
    files = prediction_files(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        if not files:
            raise FileNotFoundError(f"no predictions-*.pt files in {folder}")
        return [record for path in files for record in load(path)], len(files)
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = {entry["file"]: entry for entry in manifest["files"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: not a readable prediction manifest ({type(e).__name__}: {e})") \
            from None
    again = "run the prediction again with --overwrite"
    extra = [p.name for p in files if p.name not in listed]
    if extra:
        raise CheckpointError(f"{folder}: {', '.join(extra)} not listed in {MANIFEST} (left by another prediction "
                              f"run?); remove it or {again}")
    records = []
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name}, listed in {MANIFEST}, is missing; {again}")
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, but {MANIFEST} records {entry['bytes']:,} "
                                  f"(changed since it was written); {again}")
        loaded = load(path)
        if len(loaded) != entry["items"]:
            raise CheckpointError(f"{path}: {len(loaded)} predictions, but {MANIFEST} records {entry['items']}; "
                                  f"{again}")
        records += loaded
    return records, len(listed)


def load(path: str | os.PathLike) -> list[PredictionRecord]:
    """The records of one prediction file (ours or the release's), read without running code from
    it; images as plain PIL images, expected images as [0, 1] tensors. A file in another layout,
    or one that needs other Python objects, raises `weights.CheckpointError` naming it."""
    from configuration import limits
    from weights import CheckpointError, load_untrusted

    path = Path(path)
    cap = limits().max_shared_references
    where = f"max_shared_references ({cap}; config/limits.yaml, or a file named by MINIGPT5_LIMITS)"
    if path.is_file() and path.stat().st_size and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable {WHAT}: not a torch.save zip archive (a prediction file is "
                              f"one, from torch 1.6 on)")
    if path.is_file() and path.stat().st_size:
        try:
            references, referenced = file_references(path)
        except (ValueError, zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: not a readable {WHAT}: {e}") from None
        if references > cap or referenced > max(path.stat().st_size, 1 << 20):
            raise CheckpointError(f"{path}: the file refers {references} time(s) to pictures or data it already "
                                  f"holds ({referenced:,} bytes referenced, from a file of {path.stat().st_size:,}), "
                                  f"more than {where} allows; nothing was unpickled")
    entries = load_untrusted(path, WHAT, SAFE_GLOBALS)
    if not isinstance(entries, list):
        raise CheckpointError(f"{path}: expected a {WHAT}, found a {type(entries).__name__}")
    shared = _shared_slots(entries)
    if shared > cap:
        raise CheckpointError(f"{path}: {shared} picture / tensor slot(s) reuse a picture or tensor of another slot, "
                              f"more than {where} allows (each would be copied when read)")
    records, rescaled = [], 0
    for i, entry in enumerate(entries):
        try:
            record = PredictionRecord.from_release_list(entry)
        except ValueError as e:
            raise CheckpointError(f"{path}: entry {i} is {e}") from None
        for name in ("predicted_image", "sd_baseline_image"):
            if getattr(record, name) is not None:
                setattr(record, name, getattr(record, name).copy())       # a plain PIL image
        record.more_predicted_images = [image.copy() for image in record.more_predicted_images]
        expected = record.expected_image
        if isinstance(expected, torch.Tensor) and expected.numel() and float(expected.min()) < 0:
            record.expected_image = to_unit_range(expected)   # written in [-1, 1] by an earlier version of ours
            rescaled += 1
        records.append(record)
    if rescaled:
        log.warning("%s: %d expected images were in [-1, 1] (an older file of ours); read as [0, 1]", path, rescaled)
    return records


def _layout_problem(entry: Any) -> str | None:
    if not isinstance(entry, (list, tuple)) or len(entry) != len(RELEASE_LAYOUT):
        return f"a {type(entry).__name__} of length {len(entry) if isinstance(entry, (list, tuple)) else '-'}"
    for k, name in ((0, "input_text"), (1, "predicted_text"), (2, "expected_text"), (7, "task_name")):
        if entry[k] is not None and not isinstance(entry[k], str):
            return f"{name} is a {type(entry[k]).__name__}"
    for k, name in ((3, "predicted_image"), (4, "sd_baseline_image")):
        if entry[k] is not None and not isinstance(entry[k], Image.Image):
            return f"{name} is a {type(entry[k]).__name__}, not a PIL image"
    if entry[6] is not None:
        more = entry[6]
        if not isinstance(more, dict) or set(more) != set(MORE_KEYS) or not all(isinstance(more[k], list) for k in MORE_KEYS):
            return f"the seventh slot is neither None nor {{{', '.join(MORE_KEYS)}: lists}}"
        if not all(isinstance(x, Image.Image) for x in more["more_predicted_images"]):
            return "more_predicted_images holds something other than PIL images"
        for tensor in more["more_expected_images"]:
            problem = _expected_problem(tensor)
            if problem:
                return problem
    return _expected_problem(entry[5])


def _expected_problem(tensor: Any) -> str | None:
    if tensor is not None and not isinstance(tensor, torch.Tensor):
        return f"expected_image is a {type(tensor).__name__}, not a tensor"
    if isinstance(tensor, torch.Tensor) and tensor.numel():
        shape = tuple(tensor.shape)
        if not (len(shape) == 3 or len(shape) == 4 and shape[0] == 1) or shape[-3] not in (1, 3, 4):
            return f"expected_image has shape {shape}, not C x H x W"
        if shape[-1] * shape[-2] > _max_pixels():
            return f"expected_image has {shape[-2]} x {shape[-1]} pixels, more than max_image_pixels ({_max_pixels():,})"
    return None
