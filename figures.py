"""The pictures a prediction run writes per task, as the release did: `generated.jpg` (titled with
the generated text, through matplotlib), `sd_baseline.jpg`, `gt.jpg` and `input.jpg` (the input
pictures side by side). `callbacks.PredictionWriter` calls `save_task_folder` for every item.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch


def to_pil(tensor01: torch.Tensor):
    """A (3, H, W) tensor in [0, 1] as a PIL image."""
    from PIL import Image

    array = (tensor01.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def save_task_folder(folder: Path, generated, text: str, baseline, gt, inputs: list) -> None:
    """generated.jpg (titled with the generated text), sd_baseline.jpg, gt.jpg, input.jpg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    if generated is not None:
        fig, ax = plt.subplots(figsize=(5, 5.6))
        ax.imshow(generated)
        ax.axis("off")
        printable = "".join(c if c.isprintable() and ord(c) < 0x2E80 else "?" for c in text)
        ax.set_title("\n".join(textwrap.wrap(printable, 60)[:5]), fontsize=8)
        fig.savefig(folder / "generated.jpg", dpi=100)
        plt.close(fig)
    if baseline is not None:
        baseline.save(folder / "sd_baseline.jpg")
    if gt is not None:
        gt.save(folder / "gt.jpg")
    if inputs:
        from PIL import Image

        width = sum(i.width for i in inputs)
        strip = Image.new("RGB", (width, max(i.height for i in inputs)), "white")
        x = 0
        for image in inputs:
            strip.paste(image, (x, 0))
            x += image.width
        strip.save(folder / "input.jpg")
