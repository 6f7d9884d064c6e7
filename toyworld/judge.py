"""The judge: reads a toy-world picture back into its attributes, from pixel statistics of the
regions the renderer paints. Analytic, and independent of every trained model, so it can score
whatever MiniGPT-5 or the toy Stable Diffusion draws.

    sky     median colour of the sky columns that neither the object nor the sun (on either side,
            since training flips pictures) can cover          -> nearest sky colour   -> time
    ground  median colour of the ground beside the object      -> nearest ground colour -> setting
    object  for each place, the share of the disc's pixels that stand out from the background
            there (sky or ground, as measured above); the place where most do wins, and the median
            colour of those pixels gives the nearest object colour
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from toyworld.world import (ATTRIBUTES, GROUND_RGB, HORIZON, OBJECT_RGB, PLACE_DISC, SKY_RGB, SUN_RADIUS, SUN_X,
                            Scene)

# How far (RGB distance) a pixel must be from the background to count as part of an object.
STANDS_OUT = 60.0
# Margins around the horizon and the painted shapes, as fractions of the side.
MARGIN = 0.04


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], float) - colour, axis=1)
    return names[int(distances.argmin())]


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres as fractions of the picture's side: (Y, X), each (H, W)."""
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    return np.meshgrid(ys, xs, indexing="ij")


def judge(image: Image.Image) -> dict[str, str]:
    """The attributes a picture shows: `{"setting", "time", "colour", "place"}`."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    Y, X = _grid(*pixels.shape[:2])
    object_cx = PLACE_DISC["sky"][0]
    widest = max(r for _, _, r in PLACE_DISC.values())

    sun_columns = (np.abs(X - SUN_X) < SUN_RADIUS + MARGIN) | (np.abs(X - (1 - SUN_X)) < SUN_RADIUS + MARGIN)
    sky_region = (Y < HORIZON - MARGIN) & ~sun_columns & (np.abs(X - object_cx) > PLACE_DISC["sky"][2] + MARGIN)
    ground_region = (Y > HORIZON + MARGIN) & (np.abs(X - object_cx) > widest + MARGIN)
    sky = np.median(pixels[sky_region], axis=0)
    ground = np.median(pixels[ground_region], axis=0)

    best_place, best_share, best_pixels = None, -1.0, None
    for place, (cx, cy, r) in PLACE_DISC.items():
        inside = (X - cx) ** 2 + (Y - cy) ** 2 <= (0.75 * r) ** 2
        if not inside.any():                       # a very small picture: take the centre pixel
            inside = (X - cx) ** 2 + (Y - cy) ** 2 <= ((X - cx) ** 2 + (Y - cy) ** 2).min()
        background = sky if place == "sky" else ground
        region = pixels[inside]
        stands_out = np.linalg.norm(region - background, axis=1) > STANDS_OUT
        share = float(stands_out.mean())
        if share > best_share:
            best_place, best_share = place, share
            best_pixels = region[stands_out] if stands_out.any() else region
    return {"setting": _nearest(ground, GROUND_RGB), "time": _nearest(sky, SKY_RGB),
            "colour": _nearest(np.median(best_pixels, axis=0), OBJECT_RGB), "place": best_place}


def accuracy(judged: Iterable[dict[str, str]], truth: Iterable[dict[str, str]],
             attributes: Sequence[str] = tuple(ATTRIBUTES)) -> dict[str, float]:
    """Share of pictures whose judged attribute equals the truth, per attribute, and `all` (every
    listed attribute right). Missing pictures (None) count as wrong."""
    pairs = list(zip(judged, truth))
    if not pairs:
        return {name: float("nan") for name in (*attributes, "all")}
    right = {name: 0 for name in attributes}
    everything = 0
    for seen, expected in pairs:
        ok = [seen is not None and seen[name] == expected[name] for name in attributes]
        for name, good in zip(attributes, ok):
            right[name] += good
        everything += all(ok)
    result = {name: right[name] / len(pairs) for name in attributes}
    result["all"] = everything / len(pairs)
    return result


CHANCE = {name: 1 / len(values) for name, values in ATTRIBUTES.items()}


def scene_of(attributes: dict[str, str]) -> Scene:
    return Scene(**attributes)
