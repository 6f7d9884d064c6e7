"""The data command lines, kept out of `dataloader.py` (which builds no model): they read a model
config for the tokenizer, and `preprocess` runs the model's image encoder and VAE.

    python dataloader.py DATA_FILE [--split train|test] [--limit N] [--strict] [--dataset_type T]
                         [--model_config config/tiny.yaml]          # one JSON object per sample
    python dataloader.py preprocess DATA_FILE [--out outputs/features] [--split ...] [--batch_size N]

(`python data_commands.py ...` is the same.) DATA_FILE is looked for under DATAFOLDER, then as given;
for the dump it may also be CC3M WebDataset shards (a .tar, a brace pattern, a glob, a folder).
The dump needs a tokenizer only for MMDialog's training split (its 50-token rule); with the default
`--model_config` the tiny preset is built on first use.

The feature cache (`preprocess_features`): per image, the projected query embeddings of an input
image and the VAE encoder moments of a target image, written under `OUT/<split>/{img,vae}/` in
the layout `feature_cache.feature_file` reads (set PREPROCESS_FEATURE_FOLDER=OUT to train from it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import diffusion
from constants import SEED, find_data
from data_problems import OUTSIDE_PATH, BadSample, resolves_outside
from dataloader import dump_records, make_dataset
from dataset_base import MiniGPT5Dataset
from feature_cache import feature_file, save_feature
from dataset_specs import KNOWN as DATASET_TYPES
from dataset_specs import is_shard_spec, resolve_dataset_type, shard_reader, spec
from image_transforms import IMAGE_ERRORS, image_processor, load_rgb, target_transform
from placement import resolve_device

log = logging.getLogger("dataloader")
REPO = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# Feature preprocessing
# --------------------------------------------------------------------------------------------

class _ImageList(torch.utils.data.Dataset):
    """Images to encode, transformed without flips; unreadable ones come back as None."""

    def __init__(self, paths: list[str], transform, open_image=load_rgb):
        self.paths, self.transform, self.open_image = paths, transform, open_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(self.open_image(self.paths[i])), ""
        except IMAGE_ERRORS as e:
            return i, None, f"{type(e).__name__}: {e}"
        except BadSample as e:
            return i, None, e.detail


def preprocess_features(dataset: MiniGPT5Dataset, model: Any, out: str | os.PathLike, split: str | None = None,
                        batch_size: int = 16, num_workers: int = 0, device: str | torch.device | None = None
                        ) -> dict[str, int]:
    """Encode every image the dataset uses and store it under `out/<split>/{img,vae}/`: input
    images as `model.model.encode_img(images)[0]` (num_query_token x llm_hidden), target images
    as the VAE encoder moments (`diffusion.vae_moments`, 8 x h x w), in
    the dtype the model computes them in. Images already cached are skipped (resumable).
    Unreadable images are reported through `dataset.problems` (an error when strict).
    Returns counts: written, cached (already there), bad."""
    from tqdm import tqdm

    split = split or dataset.feature_split
    device = resolve_device(device)
    cfg = model.cfg
    inputs: dict[str, int] = {}  # image path -> index of the first sample using it
    outputs: dict[str, int] = {}
    for index, sample in enumerate(tqdm(dataset.samples(), total=len(dataset), desc="collecting images",
                                        unit="sample")):
        for path in sample.input_image_paths:
            inputs.setdefault(path, index)
        for path in sample.output_image_paths:          # every picture of the answer
            outputs.setdefault(path, index)
    model.to(device).eval()
    counts = Counter()
    jobs = (("img", inputs, image_processor(cfg.image_size),
             lambda x: model.model.encode_img(x)[0]),
            ("vae", outputs, target_transform(cfg.sd_image_size),
             lambda x: diffusion.vae_moments(model.vae, x)))
    for kind, images, transform, encode in jobs:
        todo = [p for p in images if not feature_file(out, split, kind, p).is_file()]
        counts["cached"] += len(images) - len(todo)
        if not dataset.allow_outside_paths:          # the dataset's symbolic-link rule, as in training
            for path in [p for p in todo if resolves_outside(dataset.image_root, p)]:
                sample = dataset.sample(images[path])
                counts["bad"] += 1
                dataset.problems.add(f"{sample.location} (sample {sample.task_name})", OUTSIDE_PATH,
                                     f"{path} is a symbolic link to {os.path.realpath(path)}", skipped="no feature written")
                todo.remove(path)
        # (the dataset's own opener: a picture may be a member of a .tar, data_sources/interleaved.py)
        loader = torch.utils.data.DataLoader(_ImageList(todo, transform, dataset.open_image), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=list)
        for batch in tqdm(loader, desc=f"{kind} features ({split})", unit="batch"):
            good = [(i, x) for i, x, _ in batch if x is not None]
            for i, _, error in batch:
                if error:
                    sample = dataset.sample(images[todo[i]])
                    counts["bad"] += 1
                    dataset.problems.add(f"{sample.location} (sample {sample.task_name})", "unreadable image",
                                         f"image {todo[i]}: {error}", skipped="no feature written")
            if not good:
                continue
            with torch.no_grad():
                features = encode(torch.stack([x for _, x in good]).to(device))
            for (i, _), feature in zip(good, features):
                save_feature(feature_file(out, split, kind, todo[i]), feature, todo[i])
                counts["written"] += 1
    log.info("features in %s/%s: %d written, %d already cached, %d unreadable images", out, split,
             counts["written"], counts["cached"], counts["bad"])
    return dict(counts)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

DEFAULT_MODEL_CONFIG = REPO / "config" / "tiny.yaml"


def _model_config(model_config: str | os.PathLike, check_paths: bool = True):
    """Read a model config; for the default tiny preset, build its weights first when missing."""
    from configuration import load_config

    cfg = load_config(model_config, check_paths=False)
    if not Path(cfg.llama_model).exists() and Path(model_config).resolve() == DEFAULT_MODEL_CONFIG.resolve():
        import presets

        log.info("building the tiny preset's weights into %s", presets.DEFAULT_TINY_DIR)
        presets.ensure_tiny()
    if check_paths:
        cfg.check_paths()
    return cfg


def _load_tokenizer_for(model_config: str | os.PathLike):
    """The tokenizer named by a model config (only its `llama_model` folder is needed)."""
    from minigpt4 import load_tokenizer

    cfg = _model_config(model_config, check_paths=False)
    if not Path(cfg.llama_model).exists():
        raise FileNotFoundError(f"{model_config}: `llama_model` points to {cfg.llama_model!r}, which does not exist")
    return load_tokenizer(cfg.llama_model, cfg.llm_family)


def main(argv: list[str] | None = None) -> int:
    """`python dataloader.py DATA_FILE [...]` (dump) or `python dataloader.py preprocess DATA_FILE --out DIR`."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if argv and argv[0] == "preprocess":
        return _preprocess_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="dataloader.py", description="Print the samples of a data file, one JSON object per line "
        "(task_name, source, target, caption, input_images, output_image). "
        "`dataloader.py preprocess ...` writes the feature cache instead.")
    _common_args(parser)
    parser.add_argument("--limit", type=int, default=None, help="print only the first N samples")
    args = parser.parse_args(argv)
    is_training = args.split == "train"
    if is_shard_spec(args.data_file):       # CC3M WebDataset shards, streamed in file order
        dataset = shard_reader(args.dataset_type)(args.data_file, is_training=is_training, strict=args.strict,
                                                  seed=args.seed, dataset_type=args.dataset_type)
    else:
        path = find_data(args.data_file)
        reader = spec(resolve_dataset_type(path, args.dataset_type)).reader_class()
        tokenizer = _load_tokenizer_for(args.model_config) if reader.index_needs_tokenizer and is_training else None
        dataset = reader(path, tokenizer=tokenizer, is_training=is_training, strict=args.strict, seed=args.seed,
                         feature_folder=False, allow_outside_paths=args.allow_outside_paths)
    out = sys.stdout
    plain = not (getattr(out, "encoding", None) or "").lower().replace("-", "").startswith("utf8")
    for record in dump_records(dataset, args.limit):
        out.write(json.dumps(record, ensure_ascii=plain) + "\n")
    out.flush()
    return 0


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_file", help="annotation file, looked for under DATAFOLDER, then as given. "
                                          "CC3M WebDataset shards: a .tar, a brace pattern or glob of them "
                                          "('cc3m/{00000..00009}.tar'), or a folder of .tar files")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="the training sample list (default) or the test one")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    parser.add_argument("--model_config", default=str(DEFAULT_MODEL_CONFIG), help="model YAML (tokenizer, sizes)")
    parser.add_argument("--dataset_type", choices=DATASET_TYPES, default=None,
                        help="default: from DATAFOLDER when set, else from the data file's path")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the template choices")
    parser.add_argument("--allow_outside_paths", action="store_true",
                        help="accept image paths that leave the dataset folder (refused and counted by default)")


def _preprocess_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dataloader.py preprocess",
        description="Cache VAE moments of target images and query embeddings of input images.")
    _common_args(parser)
    parser.add_argument("--out", default="outputs/features",
                        help="the feature folder, to set as PREPROCESS_FEATURE_FOLDER (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    from model import MiniGPT5_Model

    model = MiniGPT5_Model(_model_config(args.model_config), stage=1)
    path = find_data(args.data_file)
    dataset = make_dataset(path, model.model.llama_tokenizer, model.cfg, is_training=args.split == "train",
                           dataset_type=args.dataset_type, strict=args.strict, seed=args.seed,
                           feature_folder=False, allow_outside_paths=args.allow_outside_paths)
    preprocess_features(dataset, model, args.out, split=args.split, batch_size=args.batch_size,
                        num_workers=args.num_workers, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
