"""CC3M for stage 1 from WebDataset shards -- what `img2dataset --output_format webdataset` writes:
`.tar` files whose members are `{key}.jpg` (the picture), `{key}.txt` (the caption) and
`{key}.json` -- streamed, as an alternative to the TSV plus a folder of pictures. For the same data
it gives the same samples, prompts, targets and flips as `dataloader.CC3MDataset` (the sample is
built by the same `data_sources.cc3m.cc3m_sample`, the tensors by the same `MiniGPT5Dataset.item`).

    shard spec ──► shard files: a brace pattern (`cc3m/{00000..00331}.tar`), a glob, a folder of
               │   .tar files, or one .tar
               ──► index, once: the tar headers only (no picture is read) -> per sample its row
               │   and the byte offset of its first member
               ──► epoch plan: the epoch's samples in order, cut into one contiguous slice per
               │   (rank, DataLoader worker), with the same number of batches on every rank
               ──► each worker streams its slice from its first byte (webdataset's tar reader)
                   ──► samples ──► items ──► `dataloader.Collator` batches

Rows. The release names CC3M samples by their TSV row (`cc3m_{row}`; in training every 100th row
adds `cc3m_{row}_instruction`). A shard sample's row is its key read as a decimal number:
img2dataset's key is the sample's row in its input file whenever `--number_sample_per_shard` is a
power of ten (its default, 10000), and `scripts/tsv_to_shards.py` writes the TSV row as the key.
A key that is not a number is an error. The `.json` member is not read.

Order and splitting. An epoch is the samples in shard order, each row's sample followed by its
instruction sample (the TSV order when the shards were written in row order); with `shuffle`, the
shard order is drawn per epoch (seeded) and samples pass a seeded shuffle buffer inside each slice.
Every sample of the epoch is delivered exactly once over all ranks and workers: rank r of W gets
the r-th W-th of the epoch, split the same way over its K workers. Under DDP every rank must run
the same number of batches, so a worker's slice is cut into as many batches as the largest slice
of that worker position on any rank needs; a slice one sample shorter then has one batch one
sample smaller (never an empty batch, never a repeated sample). The one split this cannot make
(batch size 1 with a sample count that the ranks do not divide, or fewer samples than ranks x
workers) is refused with an error that says what to change.

Resume. `ShardLoader` is a DataLoader Lightning checkpoints: its state is the epoch and how many
batches each worker position has delivered. Resumed, each worker skips those batches (the skipped
samples are read but not decoded) and the workers take turns from the one whose turn was next, so
the run sees exactly the batches the uninterrupted run would. Resuming with another number of
ranks or workers in mid-epoch is an error (the slices would differ).

Bad input: a sample without picture or caption is counted at indexing; an empty or over-long caption
(config/limits.yaml) or an unreadable or over-large picture is found when streamed and dropped from
its batch, counted and logged (the TSV
reader drops empty captions at indexing instead, so such a row makes the two epochs differ by
that sample). A shard changed after indexing is an error. Cached features
(PREPROCESS_FEATURE_FOLDER) are not supported with shards.
"""
from __future__ import annotations

import glob
import io
import logging
import math
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from webdataset.filters import shuffle as buffer_shuffle
from webdataset.tariterators import group_by_keys, tar_file_iterator

from collator import Collator
from constants import data_folder, search_places
from data_problems import DataError
from data_sources.cc3m import CC3M_INSTRUCTION_EVERY, cc3m_sample
from dataset_base import MiniGPT5Dataset, Sample
from dataset_specs import is_shard_spec  # noqa: F401  (shards.is_shard_spec: the rule lives with the reader choice)
from image_transforms import load_rgb
from tsv_index import clean_caption

log = logging.getLogger("shards")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000      # samples held by each worker's shuffle buffer (with `shuffle`)


# --------------------------------------------------------------------------------------------
# Shard lists
# --------------------------------------------------------------------------------------------

def expand_shards(spec: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Path]:
    """The shard files of a spec, in order: a folder's `*.tar` sorted by name; else the brace
    pattern expanded (`{00000..00009}`, `{a,b}`), each part globbed when it has `*?[`. A relative
    spec is taken under `root` when given. FileNotFoundError names what is missing."""
    from braceexpand import braceexpand

    text = str(spec)
    if root is not None and not Path(text).is_absolute():
        text = str(Path(root) / text)
    if Path(text).is_dir():
        paths = sorted(Path(text).glob("*.tar"))
        if not paths:
            raise FileNotFoundError(f"shard folder {text!r} holds no .tar file")
        return paths
    paths = []
    for part in braceexpand(text):
        if glob.has_magic(part):
            found = sorted(Path(p) for p in glob.glob(part))
            if not found:
                raise FileNotFoundError(f"shard pattern {part!r} (from {str(spec)!r}) matches no file")
            paths += found
        else:
            paths.append(Path(part))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} shards of {str(spec)!r} do not exist, e.g. "
                                f"{missing[:3]}")
    return paths


def resolve_shards(spec: str | os.PathLike) -> list[Path]:
    """The shard files of a spec given to `--train_data_path`, looked for where the release's
    `--*_data_path` flags are (`constants.search_places`: under DATAFOLDER, then as given). When
    neither finds them, the error is the one of the first place."""
    errors = []
    for place in search_places(str(spec), data_folder()):
        try:
            return expand_shards(place)
        except FileNotFoundError as e:
            errors.append(e)
    raise errors[0]


# --------------------------------------------------------------------------------------------
# Index (tar headers only)
# --------------------------------------------------------------------------------------------

@dataclass
class ShardIndex:
    """The usable samples of all shards, in order: shard number, row (the key as a number) and
    byte offset of the sample's first member in its shard."""

    paths: list[Path]
    shard: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray


def _plain_members(path: Path) -> list[tuple[str, int]] | None:
    """(name, header offset) of the regular files of an uncompressed ustar / pax tar (what
    img2dataset and webdataset write), read header by header: ~15x faster than `tarfile`, which
    builds an object per member. Pax records and GNU long names give a member its name and size;
    None when the file holds anything else (sparse files, ...): then `tarfile` reads it.
    The offset is that of the member's first header (its pax header when it has one), where a tar
    stream can start."""
    members: list[tuple[str, int]] = []
    with open(path, "rb") as f:
        fd, offset, end = f.fileno(), 0, os.fstat(f.fileno()).st_size
        start, override = None, {}                        # the member's first header; its pax / long name
        while offset + 512 <= end:
            header = os.pread(fd, 512, offset)
            if header == bytes(512):                         # end of archive
                return members
            if header[257:262] != b"ustar":
                return None
            kind = header[156:157]
            try:
                size = int(header[124:136].strip(b" \0") or b"0", 8)
            except ValueError:
                return None
            data_end = offset + 512 + (size + 511) // 512 * 512
            start = offset if start is None else start
            if kind in (b"x", b"L"):                         # describes the next member
                data = os.pread(fd, size, offset + 512)
                if kind == b"L":
                    override["path"] = data.rstrip(b"\0")
                else:
                    pos = 0
                    while pos < len(data):
                        length = int(data[pos:data.index(b" ", pos)])
                        record_key, _, value = data[pos:pos + length].partition(b" ")[2].partition(b"=")
                        override[record_key.decode()] = value[:-1]        # without the newline
                        pos += length
                offset = data_end
                continue
            if kind == b"g":                                 # a global pax header: nothing we use
                offset, start = data_end, None
                continue
            if kind not in (b"0", b"\0", b"5"):
                return None
            if "size" in override:
                size = int(override["size"])
                data_end = offset + 512 + (size + 511) // 512 * 512
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]
            name = override.get("path", prefix + b"/" + name if prefix else name)
            if kind != b"5":
                members.append((name.decode("utf-8", "surrogateescape"), start))
            offset, start, override = data_end, None, {}
    return members if offset == end else None


def _tarfile_members(path: Path) -> list[tuple[str, int]]:
    members = []
    with tarfile.open(path, "r:") as tar:                      # uncompressed: samples are read from their offset
        for member in tar:
            tar.members = []                                 # keep memory flat on big shards
            if member.isreg():
                members.append((member.name, member.offset))
    return members


def index_shards(paths: list[Path], problems) -> ShardIndex:
    """Read every shard's tar headers (member data is skipped); samples without a picture or a
    caption are reported to `problems` and left out."""
    shard, rows, offsets = [], [], []
    for number, path in enumerate(paths):
        groups: list[list] = []                      # [key, offset, {extensions}] in tar order
        try:
            members = _plain_members(path)
            if members is None:
                members = _tarfile_members(path)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path}: not a readable uncompressed tar file ({type(e).__name__}: {e}); shards are "
                            f"plain .tar files, as img2dataset writes them") from e
        for name, offset in members:
            # webdataset's grouping (`base_plus_ext`): the key is the name up to the first dot of its
            # last path component; `__*` names are metadata.
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if dot <= slash + 1 or name.startswith("__", slash + 1):
                continue
            key, ext = name[:dot], name[dot + 1:].lower()
            if groups and groups[-1][0] == key:
                groups[-1][2].add(ext)
            else:
                groups.append([key, offset, {ext}])
        for key, offset, exts in groups:
            name = key[key.rfind("/") + 1:]
            if not name.isdigit():
                raise DataError(f"{path}: sample key {key!r} is not a row number; CC3M shards need numeric keys (the "
                                f"row, as img2dataset writes them with a power-of-ten --number_sample_per_shard, "
                                f"or as scripts/tsv_to_shards.py writes them)")
            missing = [what for what, ok in (("picture (.jpg/.png/.webp)", exts & set(IMAGE_EXTENSIONS)),
                                             ("caption (.txt)", "txt" in exts)) if not ok]
            if missing:
                problems.add(f"{path}:{key}", f"no {' and no '.join(missing)} in the shard sample")
                continue
            shard.append(number)
            rows.append(int(name))
            offsets.append(offset)
    as_array = lambda x: np.asarray(x, dtype=np.int64)
    return ShardIndex(list(paths), as_array(shard), as_array(rows), as_array(offsets))


# --------------------------------------------------------------------------------------------
# The epoch plan
# --------------------------------------------------------------------------------------------

def batch_sizes(n: int, n_batches: int, batch_size: int) -> list[int]:
    """Cut n samples into exactly `n_batches` non-empty batches of at most `batch_size`, full
    ones first (n=10, 3, 4 -> [4, 4, 2]; n=4, 3, 2 -> [2, 1, 1])."""
    sizes, left = [], n
    for i in range(n_batches):
        size = min(batch_size, left - (n_batches - i - 1))
        sizes.append(size)
        left -= size
    assert left == 0 and all(s > 0 for s in sizes), (n, n_batches, batch_size)
    return sizes


@dataclass(frozen=True)
class Plan:
    """Who reads what in one epoch: `order` (positions of the epoch -> sample entries),
    `bounds[r][k]` = (start, end) in `order` of rank r's worker k, and `batches[r][k]` its batch
    sizes. Every rank has the same number of batches per worker position."""

    order: np.ndarray
    bounds: list[list[tuple[int, int]]]
    batches: list[list[list[int]]]

    def batches_per_worker(self) -> list[int]:
        return [len(b) for b in self.batches[0]]


def split_evenly(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    n = end - start
    return [(start + i * n // parts, start + (i + 1) * n // parts) for i in range(parts)]


def make_plan(n_entries: int, order: np.ndarray, world: int, workers: int, batch_size: int | None) -> Plan:
    """The epoch plan for W ranks x K workers (see the module docstring); raises DataError when
    the ranks cannot get equal batch counts without repeating or leaving out a sample. Without a
    batch size: the slices only (`batches` empty)."""
    bounds = [split_evenly(a, b, workers) for a, b in split_evenly(0, n_entries, world)]
    if batch_size is None:
        return Plan(order, bounds, [])
    sizes = [[b - a for a, b in rank] for rank in bounds]
    per_worker = [max(math.ceil(sizes[r][k] / batch_size) for r in range(world)) for k in range(workers)]
    short = [(r, k) for r in range(world) for k in range(workers) if sizes[r][k] < per_worker[k]]
    if short:
        r, k = short[0]
        raise DataError(
            f"{n_entries} samples cannot be split over {world} ranks x {workers} workers with batches of {batch_size} "
            f"so that every rank runs the same number of batches (rank {r}, worker {k} gets {sizes[r][k]} samples "
            f"for {per_worker[k]} batches) without repeating or leaving out a sample: use a batch size of 2 or more, "
            f"fewer --num_workers, or a sample count that the {world} ranks divide")
    batches = [[batch_sizes(sizes[r][k], per_worker[k], batch_size) for k in range(workers)] for r in range(world)]
    return Plan(order, bounds, batches)


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------

class CC3MShards(MiniGPT5Dataset, torch.utils.data.IterableDataset):
    """CC3M from WebDataset shards (stage 1); see the module docstring.

    Args:
        shards: the shard spec (a brace pattern, a glob, a folder, one .tar) or a list of files.
        tokenizer, cfg, is_training, strict, seed: as `dataloader.MiniGPT5Dataset`.
        shuffle: draw the shard order per epoch and pass samples through a seeded shuffle buffer.
        shuffle_buffer: samples in each worker's shuffle buffer.

    `len(dataset)` is the number of samples of an epoch; `samples()` streams them as text (the
    dump); iterating yields the items of this process's slice (rank and DataLoader worker), and
    `ShardBatches` turns the plan into batches for training.
    """

    dataset_type = "CC3M"

    def __init__(self, shards: str | os.PathLike | list, tokenizer: Any = None, cfg: Any = None,
                 is_training: bool = True, strict: bool = False, seed: int | None = None, shuffle: bool = False,
                 shuffle_buffer: int = SHUFFLE_BUFFER, **kwargs: Any):
        kind = kwargs.pop("dataset_type", None)
        if kind is not None and kind.lower() != self.dataset_type.lower():
            raise DataError(f"WebDataset shards ({shards}) hold {self.dataset_type} captions and pictures, not {kind}")
        if kwargs.get("feature_folder") or (kwargs.get("feature_folder") is None and os.environ.get(
                "PREPROCESS_FEATURE_FOLDER")):
            raise DataError("cached features (PREPROCESS_FEATURE_FOLDER) are not supported when training from shards; "
                            "unset it, or train from the TSV")
        kwargs["feature_folder"] = False
        self.shard_paths = list(shards) if isinstance(shards, (list, tuple)) else resolve_shards(shards)
        self.spec = str(shards) if not isinstance(shards, (list, tuple)) else f"{len(self.shard_paths)} shards"
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self._images: dict[str, bytes] = {}
        if seed is not None:
            kwargs["seed"] = seed
        # The first shard stands for the data file (messages); `_build_index` reads them all.
        super().__init__(self.shard_paths[0], tokenizer=tokenizer, cfg=cfg, is_training=is_training, strict=strict,
                         **kwargs)

    def _build_index(self) -> None:
        self.index = index_shards(self.shard_paths, self.problems)
        instruction = (self.index.rows % CC3M_INSTRUCTION_EVERY == 0) if self.is_training else \
            np.zeros(len(self.index.rows), bool)
        per_sample = 1 + instruction.astype(np.int64)
        # Entry i -> (sample, instruction or not): each row's sample, then its instruction sample.
        self._entry_sample = np.repeat(np.arange(len(per_sample), dtype=np.int64), per_sample)
        self._entry_instruction = np.zeros(len(self._entry_sample), bool)
        self._entry_instruction[np.cumsum(per_sample)[instruction] - 1] = True
        shard_of_entry = self.index.shard[self._entry_sample]
        n_shards = len(self.shard_paths)
        self._shard_start = np.searchsorted(shard_of_entry, np.arange(n_shards), side="left")
        self._shard_end = np.searchsorted(shard_of_entry, np.arange(n_shards), side="right")
        log.info("%s: %d shards, %d rows", self.spec, n_shards, len(self.index.rows))

    def __len__(self) -> int:
        return len(self._entry_sample)

    def sample(self, index: int) -> Sample:
        raise TypeError("CC3MShards is streamed: iterate over it, or over samples(), instead of indexing")

    # ---- the plan --------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Entries in the epoch's order: shard order (drawn per epoch with `shuffle`), then tar order."""
        n_shards = len(self.shard_paths)
        shard_order = (np.random.default_rng([self.seed, epoch]).permutation(n_shards) if self.shuffle
                       else np.arange(n_shards))
        return np.concatenate([np.arange(self._shard_start[s], self._shard_end[s]) for s in shard_order]
                              + [np.zeros(0, np.int64)])

    def plan(self, world: int, workers: int, batch_size: int | None, epoch: int | None = None) -> Plan:
        """The plan of an epoch (default: the current one) for W ranks x K workers."""
        return make_plan(len(self), self.epoch_order(self.epoch if epoch is None else epoch), world, workers,
                         batch_size)

    # ---- streaming -------------------------------------------------------------------------------

    def _raw_samples(self, entries: np.ndarray, images: bool = True) -> Iterator[tuple[int, dict]]:
        """(entry, raw member dict) for each entry in `entries` (positions in the index), in
        order, reading each run of one shard from the offset of its first sample."""
        i, samples = 0, self._entry_sample[entries]
        while i < len(entries):
            shard = int(self.index.shard[samples[i]])
            j = i
            while j < len(entries) and self.index.shard[samples[j]] == shard and \
                    (j == i or samples[j] - samples[j - 1] in (0, 1)):
                j += 1
            yield from self._read_run(shard, entries[i:j], images)
            i = j

    def _read_run(self, shard: int, entries: np.ndarray, images: bool) -> Iterator[tuple[int, dict]]:
        path = self.shard_paths[shard]
        samples = self._entry_sample[entries]
        wanted = iter(zip(entries.tolist(), samples.tolist()))
        entry, sample = next(wanted)
        keep = (lambda name: True) if images else (lambda name: name.endswith(".txt"))
        with open(path, "rb") as f:
            f.seek(int(self.index.offsets[sample]))
            files = ({**member, "__url__": str(path)} for member in tar_file_iterator(f, select_files=keep))
            for raw in group_by_keys(files):
                if int(Path(raw["__key__"]).name) != self.index.rows[sample]:
                    continue                    # a sample left out at indexing (reported then)
                while True:
                    yield entry, raw
                    nxt = next(wanted, None)
                    if nxt is None:
                        return
                    entry, next_sample = nxt
                    if next_sample != sample:
                        sample = next_sample
                        break
        raise DataError(f"{path}: ended before the sample of row {int(self.index.rows[sample])} (offset "
                        f"{int(self.index.offsets[sample])}); the shard changed after it was indexed")

    def _to_sample(self, entry: int, raw: dict) -> Sample | None:
        """The dataloader Sample of one entry, or None (counted) for an empty or undecodable caption."""
        sample = int(self._entry_sample[entry])
        row, path = int(self.index.rows[sample]), self.shard_paths[int(self.index.shard[sample])]
        where = f"{path}:{raw['__key__']}"
        caps = self.caps
        if len(raw["txt"]) > caps.max_row_bytes:
            self.problems.add(where, f"caption (.txt) longer than max_row_bytes ({caps.max_row_bytes:,} bytes; "
                                     f"config/limits.yaml)")
            return None
        try:
            caption = clean_caption(raw["txt"].decode("utf-8"))
        except UnicodeDecodeError:
            self.problems.add(where, "not valid UTF-8", "the caption (.txt)")
            return None
        if not caption:
            self.problems.add(where, "empty caption")
            return None
        if len(caption) > caps.max_text_chars:
            self.problems.add(where, f"text longer than max_text_chars ({caps.max_text_chars:,}; config/limits.yaml)")
            return None
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), IMAGE_EXTENSIONS[0])
        return cc3m_sample(row, caption, bool(self._entry_instruction[entry]), self.is_training, self.seed,
                           f"{path}/{raw['__key__']}.{ext}", where)

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        """The epoch's samples in file order, as text (no picture decoded): what the dump prints."""
        n = len(self) if limit is None else min(limit, len(self))
        for entry, raw in self._raw_samples(np.arange(n), images=False):
            sample = self._to_sample(entry, raw)
            if sample is not None:
                yield sample

    def open_image(self, path: str) -> Image.Image:
        """The picture of the sample being built, from the shard's bytes."""
        return load_rgb(io.BytesIO(self._images[path]))

    def stream(self, entries: np.ndarray, shuffle_seed: int | None = None) -> Iterator[tuple[int, dict]]:
        """(entry, raw shard sample) for these entries, in order, or through a shuffle buffer
        seeded with `shuffle_seed` (webdataset's); nothing is decoded yet."""
        stream: Iterator = self._raw_samples(entries)
        if shuffle_seed is not None:
            stream = buffer_shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), seed=shuffle_seed)(stream)
        return stream

    def items(self, entries: np.ndarray, shuffle_seed: int | None = None) -> Iterator[dict | None]:
        """Model items (as `dataset[i]`) of these entries; None for a bad sample (logged, counted)."""
        for entry, raw in self.stream(entries, shuffle_seed):
            yield self.to_item(entry, raw)

    def to_item(self, entry: int, raw: dict) -> dict | None:
        """The model item of one streamed entry (`MiniGPT5Dataset.item`, the picture from the shard)."""
        sample = self._to_sample(entry, raw)
        if sample is None:
            return None
        ext = sample.output_image_path.rsplit(".", 1)[1]
        self._images = {sample.output_image_path: raw[ext]}
        try:
            return self.item(sample)
        finally:
            self._images = {}

    def __iter__(self) -> Iterator[dict | None]:
        """The items of this process's slice of the epoch (rank and worker; one batch per item)."""
        rank, world = rank_and_world()
        worker, workers = worker_and_workers()
        plan = self.plan(world, workers, None)
        start, end = plan.bounds[rank][worker]
        yield from self.items(plan.order[start:end])


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_and_workers() -> tuple[int, int]:
    """(DataLoader worker id, number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# --------------------------------------------------------------------------------------------
# Batches for training, and a resumable loader
# --------------------------------------------------------------------------------------------

class ShardBatches(torch.utils.data.IterableDataset):
    """The training batches of this rank: each worker position collates its slice into the
    plan's batches. `len()` is the number of batches per rank and epoch (the same on every rank).

    `world` is the number of ranks the run was started with (checked against the process group);
    `rank` can be set to read another rank's batches without one (tests, benchmarks).
    `skip` / `first_worker` (set by `ShardLoader.load_state_dict`) resume in mid-epoch."""

    def __init__(self, dataset: CC3MShards, batch_size: int, collate: Collator, workers: int, world: int = 1,
                 rank: int | None = None):
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.workers, self.world, self.rank = max(1, workers), world, rank
        self.skip: list[int] | None = None
        self.first_worker = 0
        self.process: tuple[int, int] | None = None   # (rank, world), read by the loader in the main process
        self.batches_per_worker = dataset.plan(world, self.workers, batch_size).batches_per_worker()

    def __len__(self) -> int:
        return sum(self.batches_per_worker)

    def __iter__(self) -> Iterator[dict | None]:
        # Read the resume state now (not lazily in the generator): the loader clears it after
        # the iterator (and its worker processes) exist.
        skip = list(self.skip) if self.skip is not None else [0] * self.workers
        return self._batches(skip, self.first_worker)

    def _batches(self, skip: list[int], first_worker: int) -> Iterator[dict | None]:
        rank, world = self.process or rank_and_world()
        if self.rank is not None:
            rank, world = self.rank, self.world
        if world != self.world:
            raise RuntimeError(f"the shard plan was made for {self.world} ranks but the run has {world}")
        physical, workers = worker_and_workers()
        if workers != self.workers:
            raise RuntimeError(f"the shard plan was made for {self.workers} workers but the loader has {workers}")
        worker = (physical + first_worker) % workers
        plan = self.dataset.plan(world, workers, self.batch_size)
        start, end = plan.bounds[rank][worker]
        sizes = plan.batches[rank][worker]
        done = skip[worker]
        seed = None
        if self.dataset.shuffle:
            seed = int(np.random.default_rng([self.dataset.seed, self.dataset.epoch, rank, worker]).integers(2**62))
        stream = self.dataset.stream(plan.order[start:end], seed)
        for _ in range(sum(sizes[:done])):         # resumed: read past what was trained, decode nothing
            next(stream)
        for size in sizes[done:]:
            yield self.collate([self.dataset.to_item(*next(stream)) for _ in range(size)])


def round_robin(remaining: list[int], first: int, n: int) -> tuple[list[int], int]:
    """How the DataLoader takes batches from its workers: in turn from worker `first`, skipping
    exhausted ones. Returns the batches taken from each worker among the next `n`, and the worker
    whose turn comes next."""
    taken, turn = [0] * len(remaining), first
    for _ in range(n):
        while remaining[turn] - taken[turn] == 0:
            turn = (turn + 1) % len(remaining)
        taken[turn] += 1
        turn = (turn + 1) % len(remaining)
    return taken, turn


def _as_is(batch):
    return batch


class ShardLoader(torch.utils.data.DataLoader):
    """The DataLoader of `ShardBatches` (batch_size=None: the batches come made). Lightning saves
    its state with every checkpoint and gives it back on resume: the epoch, the batches taken
    from each worker position this epoch and whose turn is next (see `round_robin`)."""

    def __init__(self, batches: ShardBatches, num_workers: int, done_batches: Callable[[], int] | None = None):
        super().__init__(batches, batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        # The batches the trainer has done this epoch (`resume.ResumePoint.batches_done`).
        self.done_batches = done_batches or (lambda: 0)
        self._start_taken = [0] * batches.workers
        self._start_done = 0

    def __iter__(self):
        batches = self.dataset
        # Rank and world read here, in the main process: worker processes may not see the process group.
        batches.process = rank_and_world()
        it = super().__iter__()                  # workers (and their copy of the resume state) start here
        self._start_taken = list(batches.skip) if batches.skip is not None else [0] * batches.workers
        self._first_worker = batches.first_worker
        batches.skip, batches.first_worker = None, 0
        self._start_done = int(self.done_batches())
        return it

    def state_dict(self) -> dict:
        batches = self.dataset
        first = getattr(self, "_first_worker", 0)
        remaining = [n - t for n, t in zip(batches.batches_per_worker, self._start_taken)]
        # Turns in this run start with physical worker 0, i.e. worker position `first`.
        taken, turn = round_robin(remaining[first:] + remaining[:first], 0,
                                  int(self.done_batches()) - self._start_done)
        taken = taken[-first:] + taken[:-first] if first else taken
        return {"epoch": batches.dataset.epoch, "taken": [a + b for a, b in zip(self._start_taken, taken)],
                "next_worker": (turn + first) % batches.workers, "world": batches.world, "workers": batches.workers}

    def load_state_dict(self, state: dict) -> None:
        batches = self.dataset
        if sum(state["taken"]) >= len(batches):          # saved after the epoch's last batch
            return
        if (state["world"], state["workers"]) != (batches.world, batches.workers):
            raise DataError(
                f"this checkpoint was saved in mid-epoch by a run reading shards with {state['world']} ranks x "
                f"{state['workers']} workers; this run has {batches.world} x {batches.workers}, which would split "
                f"the epoch differently. Resume with the same --gpus / --num_nodes / --num_workers (the workers "
                f"are capped to the CPUs), or from a checkpoint at the end of an epoch")
        batches.dataset.set_epoch(state["epoch"])
        batches.skip = list(state["taken"])
        batches.first_worker = state["next_worker"]
