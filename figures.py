"""The pictures a prediction run writes per task, as the release did: `generated.jpg` (titled with
the generated text, through matplotlib; an answer of several pictures shows them in order, each under
its text), `sd_baseline.jpg`, `gt.jpg` (the expected pictures side by side) and `input.jpg` (the input
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


def _printable(text: str, width: int = 60, lines: int = 5) -> str:
    printable = "".join(c if c.isprintable() and ord(c) < 0x2E80 else "?" for c in text)
    return "\n".join(textwrap.wrap(printable, width)[:lines])


def save_task_folder(folder: Path, generated, text: str, baseline, gt, inputs: list, more_generated: list = (),
                     more_gt: list = (), end_sym: str = "###") -> None:
    """generated.jpg (titled with the generated text), sd_baseline.jpg, gt.jpg, input.jpg. An answer
    with several pictures (`more_generated`, `more_gt`: pictures 2..k) shows them side by side in
    generated.jpg, each under the text that comes before it (`generation.answer_segments`), and its
    expected pictures side by side in gt.jpg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    if generated is not None and more_generated:
        from generation import answer_segments

        pictures = [generated, *more_generated]
        titles, pending = [], []
        for piece in answer_segments(text, pictures, end_sym):
            if isinstance(piece, str):
                pending.append(piece)
            else:
                titles.append(" ".join(pending))
                pending = []
        fig, axes = plt.subplots(1, len(pictures), figsize=(3.2 * len(pictures), 4), squeeze=False)
        for ax, picture, title in zip(axes[0], pictures, titles):
            ax.imshow(picture)
            ax.axis("off")
            ax.set_title(_printable(title, 30), fontsize=8)
        if pending:
            fig.text(0.5, 0.02, _printable(" ".join(pending), 100, 2), ha="center", fontsize=8)
        fig.savefig(folder / "generated.jpg", dpi=100)
        plt.close(fig)
    elif generated is not None:
        fig, ax = plt.subplots(figsize=(5, 5.6))
        ax.imshow(generated)
        ax.axis("off")
        ax.set_title(_printable(text), fontsize=8)
        fig.savefig(folder / "generated.jpg", dpi=100)
        plt.close(fig)
    if baseline is not None:
        baseline.save(folder / "sd_baseline.jpg")
    if gt is not None:
        strip([gt, *more_gt]).save(folder / "gt.jpg")
    if inputs:
        strip(inputs).save(folder / "input.jpg")


def strip(images: list):
    """Pictures side by side (one picture: itself)."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out
