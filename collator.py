"""Items -> the model's batch.

Batch (`Collator(tokenizer)(items)`): `input_ids`, `attention_mask`, `labels` (B, T), right
padded (pad = eos, label -100); `input_images` (N_total, 3, S, S) (all samples' input images in
order; (0, 3, S, S) when none); `output_images` (B, 3, SD, SD); `has_output_image` (B,) bool;
`captions`, `task_names`, `sources`, `targets`, `input_image_paths`, `output_image_paths`,
`locations` (lists); `num_dropped` (int); with cached features `input_image_features` and
`output_image_features` (None when the batch has none) instead of the image tensors.
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
        return batch


def _collate_features(items: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
    inputs = [item["input_image_features"] for item in items if item["input_image_features"] is not None]
    outputs = [item["output_image_features"] for item in items]
    present = [o for o in outputs if o is not None]
    stacked = None
    if present:
        zero = torch.zeros_like(present[0])
        stacked = torch.stack([o if o is not None else zero for o in outputs])
    return {"input_image_features": torch.cat(inputs) if inputs else None, "output_image_features": stacked}
