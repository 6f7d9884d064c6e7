"""What every dataset reader shares: a sample as text (`Sample`), and `MiniGPT5Dataset`, which turns
samples into model items (token ids and labels, image tensors or cached features).

    reader index ──► sample(i): task name, source, target, caption, input/output image paths
                     (pure text; no tokenizer, no image is opened: this is what the dump prints)
                 ──► dataset[i] / item(sample): + token ids and labels, image tensors (or cached
                     features, feature_cache.py)
                 ──► collator.Collator: the model's batch

Item (`dataset[i]`, a dict): `task_name`, `source`, `target`, `caption` (str or None),
`input_image_paths` (list), `output_image_path` (str or None), `location` (file:line of the
sample), `input_ids` and `labels` (1-D LongTensors: source ids then target ids, tokenized without
special tokens; labels are -100 over the source and over [IMG1]..[IMG6]; BOS is added by the
model), `input_images` (n_in, 3, S, S) with n_in = number of <ImageHere> in the source,
`output_image` (3, SD, SD) in [-1, 1] (zeros when there is none), `has_output_image` (bool),
`num_truncated_tokens` (int). An answer with k > 1 pictures also has `more_output_images`
(k-1, 3, SD, SD), `more_output_image_paths` and `more_captions` (pictures 2..k; the first stays
`output_image`), and one voken group per picture in its target. With a feature cache, `input_images`/`output_image` are None and
`input_image_features` (n_in, num_query_token, llm_hidden) / `output_image_features`
(8, SD/f, SD/f, or None; `more_output_image_features` (k-1, 8, SD/f, SD/f)) are given instead.

A reader (one per dataset module in data_sources/, shards.py's) subclasses `MiniGPT5Dataset`: it builds its index
(`_build_index`), says how many samples there are and describes sample i (`sample(i)`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import torch
from PIL import Image

from configuration import limits
from constants import IMAGE_PLACEHOLDER, SEED, VOKENS, preprocess_feature_folder
from data_problems import OUTSIDE_PATH, BadSample, DataError, ProblemLog, path_leaves, resolves_outside
from feature_cache import load_feature
from image_transforms import IMAGE_ERRORS, image_processor, load_rgb, target_transform
from samples import Dialogue

if TYPE_CHECKING:
    from data_sources.common import DatasetSpec

log = logging.getLogger("dataloader")


@dataclass(frozen=True)
class Sample:
    """One sample as the release defines it, before tokenization and image loading."""

    task_name: str
    source: str
    target: str
    caption: str | None
    input_image_paths: tuple[str, ...]
    output_image_path: str | None
    location: str  # where it comes from: `file:line`, or `file (story ..., step ...)` for VIST
    # The same sample in structured form (samples.py), which an LLM family's prompt style renders.
    dialogue: Dialogue | None = None
    # An answer with several pictures: pictures 2..k (the first is `output_image_path`), in order, and
    # their captions (None where there is none; `caption` is the first picture's).
    more_output_image_paths: tuple[str, ...] = ()
    more_captions: tuple[str | None, ...] = ()

    @property
    def output_image_paths(self) -> tuple[str, ...]:
        """Every picture of the answer, in order (k of them, 0 when it has none)."""
        first = (self.output_image_path,) if self.output_image_path is not None else ()
        return first + self.more_output_image_paths

    def record(self) -> dict[str, Any]:
        """The dump's JSON object (`python dataloader.py DATA_FILE`); an answer with several pictures
        also lists them all (`output_images`) with their captions."""
        record = {"task_name": self.task_name, "source": self.source, "target": self.target,
                  "caption": self.caption, "input_images": list(self.input_image_paths),
                  "output_image": self.output_image_path}
        if self.more_output_image_paths:
            record["output_images"] = list(self.output_image_paths)
            record["captions"] = [self.caption, *self.more_captions]
        return record


def choose(options: tuple[str, ...], seed: int, key: str) -> str:
    """A template drawn with a generator seeded by (seed, key): reproducible and the same in every
    DataLoader worker (a string seed is hashed with SHA-512, independent of PYTHONHASHSEED)."""
    return random.Random(f"{seed}-{key}").choice(options)


class MiniGPT5Dataset(torch.utils.data.Dataset):
    """What the three datasets share. Subclasses build the index (`_build_index`) and describe a
    sample (`sample(i)`); this class turns samples into tensors.

    Args:
        data_file: the annotation file (TSV / JSON / JSON lines).
        tokenizer: the LLaMA tokenizer with vokens (`minigpt4.load_tokenizer`); needed by
            `dataset[i]` and by MMDialog's training index, not by `sample(i)`.
        cfg: the model config (image sizes); needed by `dataset[i]`.
        is_training: the release's training sample list (instruction / multimodal /
            understanding samples, the MMDialog length rule) and random flips; False = test mode.
        strict: raise `DataError` on the first bad input instead of skipping and counting it.
        seed: seeds template choices and flips (with the task name).
        image_root: folder the image paths are relative to (default: the data file's folder).
        feature_folder: cached features to use instead of images; None = `PREPROCESS_FEATURE_FOLDER`
            when set (read now), False = never.
        feature_split: the cache's split folder (default "train" / "test" from `is_training`).
        max_length: limit on source + target text tokens (default: the tokenizer's
            `model_max_length` when it is a real limit, as the release).
        allow_outside_paths: accept image paths that leave `image_root` (refused by default).
        render: the prompt style of another LLM family (`samples.Dialogue` -> (source, target);
            `text_style(cfg)`): each sample's text is its dialogue so rendered; None (the release's
            LLM) keeps the readers' strings, the release's.
    """

    dataset_type = ""           # the name of its spec (data_sources.REGISTRY)
    index_needs_tokenizer = False   # whether the training index is built with the tokenizer

    def __init__(self, data_file: str | os.PathLike, tokenizer: Any = None, cfg: Any = None,
                 is_training: bool = True, strict: bool = False, seed: int = SEED,
                 image_root: str | os.PathLike | None = None,
                 feature_folder: str | os.PathLike | Literal[False] | None = None,
                 feature_split: str | None = None, max_length: int | None = None,
                 allow_outside_paths: bool = False, render: Callable[[Dialogue], tuple[str, str]] | None = None):
        self.data_file = Path(data_file)
        if not self.data_file.is_file():
            raise FileNotFoundError(f"{self.dataset_type} data file {str(self.data_file)!r} does not exist")
        self.tokenizer, self.cfg = tokenizer, cfg
        self.is_training, self.seed = is_training, seed
        self.image_root = str(Path(image_root) if image_root is not None else self.data_file.parent)
        self.problems = ProblemLog(strict)
        if feature_folder is None:
            feature_folder = preprocess_feature_folder()
        self.feature_folder = Path(feature_folder) if feature_folder else None
        self.feature_split = feature_split or ("train" if is_training else "test")
        self.max_length = max_length
        self.allow_outside_paths = allow_outside_paths
        self.render = render
        self.caps = limits()            # config/limits.yaml (MINIGPT5_LIMITS), read when the dataset is made
        self.epoch = 0
        self._transforms = None
        self._build_index()
        self.problems.log_totals(f"{self.dataset_type} {self.data_file}")
        log.info("%s %s (%s): %d samples", self.dataset_type, self.data_file,
                 "train" if is_training else "test", len(self))

    # ---- to be provided by subclasses ----------------------------------------------------------

    def _build_index(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, index: int) -> Sample:
        """The text and image paths of sample `index` (no tokenizer, no image opened)."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------

    @property
    def dataset_spec(self) -> "DatasetSpec":
        """What the project knows about this dataset (its module in data_sources/)."""
        from dataset_specs import spec

        return spec(self.dataset_type)

    @property
    def strict(self) -> bool:
        """Whether bad input raises instead of being skipped."""
        return self.problems.strict

    def samples(self, limit: int | None = None) -> Iterator[Sample]:
        """The samples in order (the first `limit` only, if given)."""
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            yield self.styled(self.sample(i))

    def styled(self, sample: Sample) -> Sample:
        """The sample in the text the model reads: its dialogue rendered by `render` (another LLM
        family's prompt style), or as the reader wrote it (the release's strings). A test target that
        is not the answer (CC3M's caption, the expected text of a picture answer) stays as written."""
        if self.render is None or sample.dialogue is None:
            return sample
        source, target = self.render(sample.dialogue)
        if VOKENS[0] not in sample.target and sample.dialogue.target_images:
            target = sample.target
        return replace(sample, source=source, target=target)

    def set_epoch(self, epoch: int) -> None:
        """Draw new training flips for this epoch (template choices do not change)."""
        self.epoch = epoch

    def image_path(self, relative: str) -> str:
        """An image path from the data file, joined to `image_root` (absolute paths stay)."""
        return os.path.join(self.image_root, relative)

    def outside(self, path: str, root: str | None = None) -> bool:
        """Whether an image path as written leaves `root` (default `image_root`) and is refused:
        False when `allow_outside_paths` is set."""
        return not self.allow_outside_paths and path_leaves(root or self.image_root, path)

    def _need(self, what: str) -> Any:
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"{type(self).__name__} was built without `{what}`; `dataset[i]` needs it "
                             "(sample(i) and the dump do not)")
        return value

    def _token_ids(self) -> dict[str, Any]:
        if not hasattr(self, "_ids"):
            tok = self._need("tokenizer")
            ids = tok.convert_tokens_to_ids(VOKENS + [IMAGE_PLACEHOLDER])
            if tok.unk_token_id in ids:
                raise ValueError("the tokenizer lacks the vokens / <ImageHere>; load it with minigpt4.load_tokenizer")
            limit = self.max_length
            if limit is None and (tok.model_max_length or 0) < 1_000_000:
                limit = int(tok.model_max_length)
            self._ids = {"masked": torch.tensor(ids[1:7]), "image": ids[-1], "limit": limit}
        return self._ids

    def tokenize(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(input_ids, labels, number of source tokens cut from the left, number of leading input
        images dropped with them). Labels: -100 over the source and over [IMG1]..[IMG6]."""
        tok, ids = self._need("tokenizer"), self._token_ids()
        source = tok(sample.source, add_special_tokens=False).input_ids
        target = tok(sample.target, add_special_tokens=False).input_ids
        cut, dropped_images = 0, 0
        limit = ids["limit"]
        if limit is not None and len(source) + len(target) > limit:
            if len(target) >= limit:
                raise BadSample("text too long", f"the target alone has {len(target)} tokens, more than the "
                                                  f"limit of {limit}")
            cut = len(source) + len(target) - limit
            dropped_images = source[:cut].count(ids["image"])
            source = source[cut:]
        if source.count(ids["image"]) != len(sample.input_image_paths) - dropped_images:
            raise DataError(f"{sample.location} (sample {sample.task_name}): the source has "
                            f"{source.count(ids['image'])} {IMAGE_PLACEHOLDER} tokens but "
                            f"{len(sample.input_image_paths) - dropped_images} input images")
        input_ids = torch.tensor(source + target, dtype=torch.long)
        target_t = torch.tensor(target, dtype=torch.long)
        labels = torch.cat([torch.full((len(source),), -100, dtype=torch.long),
                            torch.where(torch.isin(target_t, ids["masked"]), -100, target_t)])
        return input_ids, labels, cut, dropped_images

    def _flip(self, sample: Sample, slot: str) -> bool:
        if not self.is_training:
            return False
        return random.Random(f"{self.seed}-flip-{self.epoch}-{sample.task_name}-{slot}").random() < 0.5

    def _image(self, sample: Sample, path: str, slot: str, kind: str) -> torch.Tensor:
        cfg = self._need("cfg")
        if self._transforms is None:
            self._transforms = {"input": image_processor(cfg.image_size),
                                "target": target_transform(cfg.sd_image_size)}
        try:
            image = self.open_image(path)
        except IMAGE_ERRORS as e:
            raise BadSample("unreadable image", f"image {path}: {type(e).__name__}: {e}") from e
        tensor = self._transforms[kind](image)
        return tensor.flip(-1) if self._flip(sample, slot) else tensor

    def open_image(self, path: str) -> Image.Image:
        """The RGB image of `path` (a hook: the shard reader in shards.py opens in-memory bytes).
        A path whose symbolic links lead outside `image_root` is refused (`allow_outside_paths`)."""
        if not self.allow_outside_paths and resolves_outside(self.image_root, path):
            raise BadSample(OUTSIDE_PATH, f"{path} is a symbolic link to {os.path.realpath(path)}")
        return load_rgb(path)

    def _feature(self, path: str, kind: str) -> torch.Tensor:
        try:
            return load_feature(self.feature_folder, self.feature_split, kind, path, self._feature_shape(kind))
        except FileNotFoundError as e:
            raise BadSample("missing cached feature", str(e)) from e
        except DataError as e:
            raise BadSample("unreadable cached feature", str(e)) from e

    def _feature_shape(self, kind: str) -> tuple[int | None, ...] | None:
        """The shape a cached feature must have for this config (sizes the config does not say --
        the LLM's width, the VAE's scale -- are read from the weight folders' config.json, when there)."""
        if not hasattr(self, "_feature_shapes"):
            cfg = self._need("cfg")
            hidden, channels, size = None, None, None
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                hidden = int(json.loads((Path(cfg.llama_model) / "config.json").read_text())["hidden_size"])
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                vae = json.loads((Path(cfg.sd_model) / "vae" / "config.json").read_text())
                channels = 2 * int(vae["latent_channels"])
                size = cfg.sd_image_size // 2 ** (len(vae["block_out_channels"]) - 1)
            self._feature_shapes = {"img": (cfg.num_query_token, hidden), "vae": (channels, size, size)}
        return self._feature_shapes[kind]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """The model-ready item (see the module docstring), or None when the sample turned out
        to be bad (unreadable image, ...) and `strict` is off; the problem is logged and counted."""
        return self.item(self.sample(index))

    def item(self, sample: Sample) -> dict[str, Any] | None:
        """`dataset[i]` for a given sample (the shard reader in shards.py streams its samples here)."""
        sample = self.styled(sample)
        try:
            input_ids, labels, cut, dropped = self.tokenize(sample)
            if cut and not getattr(self, "_warned_truncation", False):
                self._warned_truncation = True
                log.warning("%s (sample %s): source cut by %d tokens from the left to fit the text limit "
                            "(further cuts are not logged)", sample.location, sample.task_name, cut)
            inputs = sample.input_image_paths[dropped:]
            output, more = sample.output_image_path, sample.more_output_image_paths
            item: dict[str, Any] = {"input_images": None, "output_image": None}
            if self.feature_folder is not None:
                item["input_image_features"] = (torch.stack([self._feature(p, "img") for p in inputs])
                                                if inputs else None)
                item["output_image_features"] = self._feature(output, "vae") if output else None
                if more:
                    item["more_output_image_features"] = torch.stack([self._feature(p, "vae") for p in more])
            else:
                cfg = self._need("cfg")
                size, sd_size = cfg.image_size, cfg.sd_image_size
                images = [self._image(sample, p, f"in{k + dropped}", "input") for k, p in enumerate(inputs)]
                item["input_images"] = torch.stack(images) if images else torch.zeros(0, 3, size, size)
                item["output_image"] = (self._image(sample, output, "out", "target") if output
                                        else torch.zeros(3, sd_size, sd_size))
                if more:    # pictures 2..k; the first keeps the release's flip slot "out"
                    item["more_output_images"] = torch.stack([self._image(sample, p, f"out{j + 1}", "target")
                                                              for j, p in enumerate(more)])
        except BadSample as bad:
            self.problems.add(f"{sample.location} (sample {sample.task_name})", bad.reason, bad.detail,
                              skipped="sample dropped from its batch")
            return None
        item.update({
            "task_name": sample.task_name, "source": sample.source, "target": sample.target,
            "caption": sample.caption, "input_image_paths": list(inputs), "output_image_path": output,
            "location": sample.location, "has_output_image": output is not None,
            "input_ids": input_ids, "labels": labels, "num_truncated_tokens": cut,
        })
        if more:
            item.update({"more_output_image_paths": list(more), "more_captions": list(sample.more_captions)})
        return item


def text_style(cfg: Any) -> Callable[[Dialogue], tuple[str, str]] | None:
    """The `render` of the datasets for a model config: None for the release's LLM family (vicuna: the
    readers' strings, the release's), else the family's prompt style (`llm_families`, its `render`)."""
    from llm_families import DEFAULT_FAMILY, get_family

    name = getattr(cfg, "llm_family", DEFAULT_FAMILY) if cfg is not None else DEFAULT_FAMILY
    if name == DEFAULT_FAMILY:
        return None

    return get_family(name).render
