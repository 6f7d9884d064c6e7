"""The release's image transforms, and image loading: what the datasets, the model's `generate`
and the prediction writer share.

    input image  ─► Resize(224, bilinear) ─► CenterCrop ─► [flip in training] ─► ToTensor ─► Normalize(CLIP)
    target image ─► pad to a white square ─► Resize(512, bilinear) ─► CenterCrop ─► ToTensor
                    ─► Normalize([0.5], [0.5])   (range [-1, 1], what the VAE expects)

The release's evaluation and feature-preprocessing paths skipped the target normalisation (range
[0, 1]); here the range is [-1, 1] everywhere, and prediction files store [0, 1] as the release did
(predictions.py).

Every picture a command reads is opened here (`load_rgb`, `check_pixels`): its size is read from
the header and checked against `max_image_pixels` (config/limits.yaml) before anything is decoded.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
from PIL import Image

# EVA-CLIP's (OpenAI CLIP's) normalisation, which the image encoder was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Errors PIL raises for missing, unreadable, truncated or corrupt files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_processor(image_size: int, train: bool = False):
    """The image encoder's input transform: bilinear resize, centre crop, [random flip in training],
    CLIP normalisation. PIL image -> (3, S, S) tensor. (The datasets apply their training flip
    themselves, seeded per sample, and call this with `train=False`.)"""
    from torchvision import transforms as T

    steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(image_size)]
    if train:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


def target_transform(size: int):
    """Target image: pad to a white square (centred) -> Resize(size, bilinear) -> CenterCrop ->
    ToTensor -> Normalize([0.5], [0.5]), i.e. range [-1, 1] (what the VAE expects), in training
    and test mode alike."""
    from torchvision import transforms as T

    # A partial, not a lambda: datasets holding this transform must pickle (spawn / forkserver workers).
    pad = T.Lambda(functools.partial(expand2square, background=(255, 255, 255)))
    return T.Compose([pad, T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize([0.5], [0.5])])


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square of the longer side with `background`, the image centred."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def clip_to_unit_range(images: torch.Tensor) -> list[torch.Tensor]:
    """Model-input images (CLIP-normalised, (N, 3, S, S)) back to [0, 1], float32 on the CPU."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return [(image.cpu().float() * std + mean).clamp(0, 1) for image in images]


def check_pixels(image: Image.Image, where) -> None:
    """Raise `Image.DecompressionBombError` (one of `IMAGE_ERRORS`) naming `where` when the opened,
    not yet decoded `image` has more pixels than `max_image_pixels` allows."""
    from configuration import limits

    cap = limits().max_image_pixels
    width, height = image.size
    if width * height > cap:
        raise Image.DecompressionBombError(
            f"{where}: {width} x {height} = {width * height:,} pixels, more than max_image_pixels ({cap:,}; "
            f"config/limits.yaml, or a file named by MINIGPT5_LIMITS); not decoded")


def load_rgb(path, draft: int | None = None) -> Image.Image:
    """Open an image fully (so that a truncated file fails here) as RGB, after `check_pixels`. With
    `draft`, a JPEG is decoded at the smallest scale whose sides still reach `draft` pixels."""
    with warnings.catch_warnings():       # Pillow's size warning: `check_pixels` is the rule here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    with image:
        if draft:
            image.draft("RGB", (draft, draft))
        check_pixels(image, path if isinstance(path, (str, os.PathLike)) else "image")
        return image.convert("RGB")
