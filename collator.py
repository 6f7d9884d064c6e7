"""Items -> the model's batch.

Batch (`Collator(tokenizer)(items)`): `input_ids`, `attention_mask`, `labels` (B, T), right
padded (pad = eos, label -100); `input_images` (N_total, 3, S, S) (all samples' input images in
order; (0, 3, S, S) when none); `output_images` (B, 3, SD, SD); `has_output_image` (B,) bool;
`captions`, `task_names`, `sources`, `targets`, `input_image_paths`, `output_image_paths`,
`locations` (lists); `num_dropped` (int); with cached features `input_image_features` and
`output_image_features` (None when the batch has none) instead of the image tensors.

Answers with several pictures: when an item has k > 1 target pictures, the batch's target rows
are every item's pictures in order, an item without any keeping its one zero row:
`output_images` (M, 3, SD, SD) with M = sum of max(k_i, 1) (M = B when no item has more than one,
the layout above), `output_image_counts` (B,) the k_i, `output_image_paths` / `captions` the first
picture's as above and `more_output_image_paths` / `more_captions` the others'. `target_rows` maps
the model's voken groups to these rows.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("dataloader")


class Collator:
    """Items -> the model's batch (see the module docstring). None items (samples that turned out
    bad in a worker) are dropped and counted in `num_dropped`; if none is left the result is None
    and the training step must skip it."""

    def __init__(self, tokenizer: Any):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.pad_token_id = int(pad)

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        kept = [item for item in items if item is not None]
        dropped = len(items) - len(kept)
        if dropped:
            log.warning("collator: dropped %d of %d samples of this batch (bad input, logged above)",
                        dropped, len(items))
        if not kept:
            return None
        ids = [item["input_ids"] for item in kept]
        lengths = torch.tensor([len(x) for x in ids])
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)
        labels = torch.nn.utils.rnn.pad_sequence([item["labels"] for item in kept], batch_first=True,
                                                 padding_value=-100)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
            "labels": labels,
            "has_output_image": torch.tensor([item["has_output_image"] for item in kept], dtype=torch.bool),
            "captions": [item["caption"] for item in kept],
            "task_names": [item["task_name"] for item in kept],
            "sources": [item["source"] for item in kept],
            "targets": [item["target"] for item in kept],
            "input_image_paths": [item["input_image_paths"] for item in kept],
            "output_image_paths": [item["output_image_path"] for item in kept],
            "locations": [item["location"] for item in kept],
            "num_dropped": dropped,
        }
        with_images = [item["input_images"] is not None for item in kept]
        if all(with_images):
            batch["input_images"] = torch.cat([item["input_images"] for item in kept])
            batch["output_images"] = torch.stack([item["output_image"] for item in kept])
        elif not any(with_images):
            batch.update(_collate_features(kept))
        else:
            raise ValueError("a batch mixes items with images and items with cached features")
        if any(item.get("more_output_image_paths") for item in kept):
            batch.update(_more_pictures(kept, batch))
        return batch


def _more_pictures(items: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
    """The target rows of a batch with answers of several pictures (see the module docstring)."""
    key, more_key = (("output_images", "more_output_images") if "output_images" in batch
                     else ("output_image_features", "more_output_image_features"))
    rows = []
    for i, item in enumerate(items):
        first = batch[key][i] if batch[key] is not None else None
        rows.append(first[None] if first is not None else None)
        if item.get(more_key) is not None:
            rows.append(item[more_key])
    present = next(r for r in rows if r is not None)
    rows = [r if r is not None else torch.zeros_like(present[:1]) for r in rows]
    return {key: torch.cat(rows),
            "output_image_counts": torch.tensor([int(item["has_output_image"]) + len(item.get(more_key, ()))
                                                 for item in items]),
            "more_output_image_paths": [item.get("more_output_image_paths", []) for item in items],
            "more_captions": [item.get("more_captions", []) for item in items]}


def target_rows(batch: dict[str, Any], sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the voken groups of a batch (`sample`: the (N,) item of each group, in order, as
    `MiniGPT4.voken_features` gives them): (which groups have a target picture, the target row of
    each). The j-th group of item b draws picture j of b; groups beyond an item's pictures have none.
    A batch without `output_image_counts` (one picture at most per item) keeps the release's rule:
    every group of an item with a target draws that target (row = item)."""
    if batch.get("output_image_counts") is None:
        has = batch.get("has_output_image")
        keep = torch.ones_like(sample, dtype=torch.bool) if has is None else has.to(sample.device)[sample]
        return keep, sample
    counts = batch["output_image_counts"].to(sample.device)
    group = torch.arange(len(sample), device=sample.device) - torch.searchsorted(sample, sample)
    per_item = counts.clamp(min=1)
    offsets = torch.cumsum(per_item, 0) - per_item
    return group < counts[sample], offsets[sample] + group


def _collate_features(items: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
    inputs = [item["input_image_features"] for item in items if item["input_image_features"] is not None]
    outputs = [item["output_image_features"] for item in items]
    present = [o for o in outputs if o is not None]
    stacked = None
    if present:
        zero = torch.zeros_like(present[0])
        stacked = torch.stack([o if o is not None else zero for o in outputs])
    return {"input_image_features": torch.cat(inputs) if inputs else None, "output_image_features": stacked}


def row_captions(batch: dict[str, Any], rows: torch.Tensor) -> list[str] | None:
    """The captions of the target rows `rows` (`target_rows`), or None when the caption loss has no
    target: some picture drawn in this batch has no caption. The release's rule ("every sample of the
    batch has a caption", so CC3M only) over the pictures drawn, not the samples: samples that draw
    nothing (VIST's understanding samples) need no caption. On the release's files the two agree
    (every CC3M sample draws a captioned picture; VIST and MMDialog have no captions)."""
    captions = batch.get("captions")
    if captions is None:
        return None
    if batch.get("output_image_counts") is None:
        chosen = [captions[i] for i in rows.tolist()]
        return chosen if all(c is not None for c in chosen) else None
    flat: list[str | None] = []
    for caption, more in zip(captions, batch["more_captions"]):
        flat += [caption, *more]
    chosen = [flat[i] for i in rows.tolist()]
    return chosen if all(c is not None for c in chosen) else None
