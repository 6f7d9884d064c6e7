"""What every decoder family shares: the condition the mapper yields, its description, and reading a
diffusers folder's index before any weights load.

    ConditionSpec   what a decoder needs: `tokens` x `width` token states, and a pooled vector of
                    `pooled` values or none (SD 1.x/2.x: none; SDXL: 1280; SD3: 2048)
    Condition       what the mapper gives and a decoder reads: `sequence` (N, tokens, width) and
                    `pooled` (N, pooled) or None; row-indexable like a tensor, so that the generate
                    walk and classifier-free guidance treat every family alike
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConditionSpec:
    """The condition a decoder reads, from which the mapper is sized: `tokens` x `width` token
    states (the mapper's `num_prompt_tokens` x `d_model`) and a pooled vector of `pooled` values
    (None: the family reads no pooled embedding)."""

    tokens: int
    width: int
    pooled: int | None = None


@dataclass
class Condition:
    """A batch of decoder conditions: token states (N, T, D) and the pooled embedding (N, P) or None."""

    sequence: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def __getitem__(self, rows) -> "Condition":
        return Condition(self.sequence[rows], None if self.pooled is None else self.pooled[rows])

    def expand(self, n: int) -> "Condition":
        """One condition (a batch of 1) repeated `n` times (a view)."""
        return Condition(self.sequence.expand(n, -1, -1), None if self.pooled is None else self.pooled.expand(n, -1))

    def to(self, *args, **kwargs) -> "Condition":
        return Condition(self.sequence.to(*args, **kwargs),
                         None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def pack(self) -> torch.Tensor:
        """One tensor per row, (N, T x D + P), for a cache of plain tensors (`unpack` reverses it); a
        condition without a pooled part is its sequence unchanged."""
        if self.pooled is None:
            return self.sequence
        return torch.cat([self.sequence.flatten(1), self.pooled], dim=1)

    @staticmethod
    def unpack(packed: torch.Tensor, spec: ConditionSpec) -> "Condition":
        if spec.pooled is None:
            return Condition(packed)
        n = spec.tokens * spec.width
        return Condition(packed[:, :n].reshape(-1, spec.tokens, spec.width), packed[:, n:])


def as_condition(value: "Condition | torch.Tensor") -> Condition:
    """A condition from a mapper's output: a bare tensor is a sequence without a pooled part (what
    `MiniGPT5_Model.map_vokens` gives, as the release's mapper did)."""
    return value if isinstance(value, Condition) else Condition(value)


def caption_mse(condition: Condition, target: "Condition | torch.Tensor") -> torch.Tensor:
    """The caption loss: MSE of the mapped sequence to the family's own caption encoding, plus the
    MSE of the pooled embeddings when the family has them (SD 1.x/2.x: the release's loss exactly)."""
    target = as_condition(target)
    loss = F.mse_loss(condition.sequence.float(), target.sequence)
    if condition.pooled is not None:
        loss = loss + F.mse_loss(condition.pooled.float(), target.pooled)
    return loss


def encode_cached(cache, captions: list[str], encode, spec: ConditionSpec) -> "Condition | torch.Tensor":
    """`encode(captions)` through a `diffusion.CaptionCache` of plain tensors (a condition with a pooled
    part is cached packed, `Condition.pack`); the same type `encode` gives."""
    packed = cache(captions, lambda texts: as_condition(encode(texts)).pack())
    return packed if spec.pooled is None else Condition.unpack(packed, spec)


def check_pictures(decoder, pictures: str) -> None:
    """`pictures` other than "eager" (fast_inference.py's graph / compiled denoiser) only for a decoder
    that offers them (`decoder.fast_pictures`: the sd family's UNet); a ValueError naming the option
    otherwise, which `generation.generate` raises before any work."""
    if pictures != "eager" and not decoder.fast_pictures:
        raise ValueError(f"pictures={pictures!r} (fast_inference.py) is for the sd decoder family; the "
                         f"{decoder.family} family draws eagerly (pictures='eager')")


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per picture (the pipelines draw each picture's noise from its own)."""
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def read_json(path: Path) -> dict | None:
    """A folder's JSON file (model_index.json, a part's config.json), or None when it is missing."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    return data if isinstance(data, dict) else None
