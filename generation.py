"""Generation: a batch of prompts (text with `<ImageHere>` slots, and their images) -> text and,
when the LLM emits vokens, a picture per item, from three parts:

    backbone    the MiniGPT-4 side (minigpt4.MiniGPT4): tokenizer, image encoder, LLM, voken rows and
                the LLM family's text rules (BOS, end of answer `cfg.end_sym`, decoding)
    map_vokens  voken features (N, 8, llm_hidden) -> the decoder's condition (MiniGPT5_Model.map_condition:
                fc + llm_to_t2i_mapping, + t2i_pooled_mapping for the families with a pooled embedding;
                a bare tensor is a condition without one)
    decoder     the frozen picture decoder of a family in decoders/: `draw(cond, negative, ...)`

    prompts + images ─► prompt_embeddings: input wrapping (minigpt4.py), cut from the left if too
                        long, left-padded
                     ─► transformers' `generate` with the logits processors of decoding.py: repetition
                        penalty, temperature, top-k, top-p (the release's settings), a seeded sampler
                        per item, voken forcing ([IMG1]..[IMG7] follow [IMG0]); a forward hook keeps
                        the 8 last-layer voken states while decoding (VokenStateRecorder)
                        (or fast_inference.py's static-cache loop, the same processors)
                     ─► voken_features ─► map_vokens ─► decoder.draw (classifier-free guidance against
                        the zero-feature condition)
                     ─► GenerationOutput per item (text decoded with special tokens, clean text, image)

`MiniGPT5_Model.generate` is `generate(model.model, model.map_condition, model.decoder, ...)`. Everything
here is batched: each item samples from its own seed, so a batch gives what its items give one at a time.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import diffusion
from constants import IMAGE_PLACEHOLDER, VOKEN_COUNT, VOKENS
from decoders.base import as_condition, check_pictures
from decoding import ProcessorChain, VokenStateRecorder, logits_processors
from image_transforms import IMAGE_ERRORS, image_processor, load_rgb

if TYPE_CHECKING:
    from PIL import Image

    from decoders.base import Condition

    from minigpt4 import MiniGPT4


@dataclass
class GenerationOutput:
    """One generated answer: `text` as decoded with special tokens (as the release), `clean_text`
    without vokens and the stop symbol, the image (the first picture, or None) and the generated token
    ids; `images` holds every picture of the answer in order, one per voken group (`answer_segments`
    puts them in place in the text)."""

    text: str
    clean_text: str
    image: Image.Image | None
    token_ids: list[int]
    images: list = field(default_factory=list)


def check_generation_arguments(prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool, temperature: float,
                               top_p: float, guidance_scale: float, num_inference_steps: int) -> None:
    """`generate`'s arguments, checked before any work: a ValueError names the argument."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_inference_steps", num_inference_steps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("guidance_scale", guidance_scale), ("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature!r}")
    if do_sample and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")

@torch.no_grad()
def generate(backbone: "MiniGPT4", map_vokens: Callable[[torch.Tensor], "Condition | torch.Tensor"],
             decoder, prompts: str | list[str], images: list | None = None, *,
             max_new_tokens: int = 256, do_sample: bool = True, temperature: float = 1.0, top_k: int | None = 50,
             top_p: float = 0.9, repetition_penalty: float = 2.0, force_generation: bool | int = False,
             guidance_scale: float = 7.5, num_inference_steps: int = 50, scheduler: str = "pndm",
             seed: int | Sequence[int] | None = None,
             generator: torch.Generator | Sequence[torch.Generator] | None = None,
             decode: str = "dynamic", pictures: str = "eager",
             device: torch.device | None = None) -> list[GenerationOutput]:
    """Answer each prompt with text and, when the LLM emits vokens, an image.

    `prompts` use `<ImageHere>` once per input image; `images[i]` lists prompt i's images (PIL
    images, paths or tensors). All prompts run as one left-padded batch through transformers'
    `generate` (KV cache; vokens forced after `[IMG0]` by a logits processor; stop at `end_sym`),
    then SD runs once for every item that produced vokens, with classifier-free guidance against
    the zero-feature condition when `guidance_scale > 1`. Each item samples from its own seed
    (`seed`: one int for all items, or one per item), so a batch gives the same results as its
    items generated one at a time.

    Sampling is the release's: repetition penalty, then temperature, top-k (50, the default of the
    release's transformers, which its `generate` call left in place; 0 or None turns it off) and
    top-p, in transformers' order.

    Speed options (fast_inference.py; the defaults are the release's path): `decode="static"` decodes
    with a static KV cache in a loop whose step is captured in a CUDA graph on a GPU (the same tokens,
    up to the rounding of attention over a longer masked cache), `"compiled"` also compiles that step
    with torch.compile; `pictures="graph"` runs SD's UNet channels-last from a captured CUDA graph,
    `"compiled"` compiles the UNet (CUDA graphs included) and the VAE decoder (the same pictures up
    to bf16 rounding). A mode that cannot run where it is asked falls back with a logged reason.
    """
    if isinstance(prompts, str):
        prompts, images = [prompts], [images or []]
    images = images if images is not None else [[] for _ in prompts]
    check_generation_arguments(prompts, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    if scheduler not in diffusion.SAMPLERS:
        raise ValueError(f"scheduler must be one of {diffusion.SAMPLERS}, got {scheduler!r}")
    import fast_inference

    fast_inference.check_modes(decode, pictures)
    check_pictures(decoder, pictures)                   # the fast picture modes are the sd family's
    seeds = item_seeds(len(prompts), seed, generator)
    embeds, mask = prompt_embeddings(backbone, prompts, images, max_new_tokens, device)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, force_generation=force_generation)
    if decode == "dynamic":
        processors = logits_processors(backbone.voken_ids, seeds, **sampling)
        generated, recorder = decode_tokens(backbone, embeds, mask, processors, max_new_tokens, backbone.end_sym)
    else:
        generated, recorder = fast_inference.decode_tokens_static(backbone, embeds, mask, seeds, sampling,
                                                                  max_new_tokens, backbone.end_sym, decode)
    features, rows = voken_features(backbone, embeds, mask, generated, recorder)
    # An answer may hold several voken groups: the later ones (groups 2..) read by one forward pass.
    later, later_rows, later_groups = later_voken_features(backbone, embeds, mask, generated)
    made_pictures: list[list] = [[] for _ in prompts]
    if rows:
        owners = rows + later_rows
        picture_seeds = [seeds[r] for r in rows] + [picture_seed(seeds[r], j) for r, j in zip(later_rows, later_groups)]
        made = images_from_features(map_vokens, decoder, torch.cat([features, later.to(features)]), picture_seeds,
                                    guidance_scale, num_inference_steps, scheduler, pictures)
        for r, picture in zip(owners, made):        # first groups, then the later ones in order
            made_pictures[r].append(picture)
    return [decode_answer(backbone, ids, drawn) for ids, drawn in zip(generated.tolist(), made_pictures)]


def picture_seed(seed: int, group: int) -> int:
    """The seed of the picture of voken group `group` (0-based) of an answer whose seed is `seed`: the
    first picture uses `seed` itself, as with one picture per answer."""
    return seed if group == 0 else (seed + group * 0x9E3779B97F4A7C15) % 2**62


def prepare_images(images: Sequence, image_size: int, device: torch.device) -> torch.Tensor:
    """Images as PIL images, paths or ready (3, S, S) tensors -> a normalised batch tensor."""
    from PIL import Image

    transform = image_processor(image_size)
    out = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"input image {str(path)!r} does not exist")
            try:
                image = load_rgb(path)                  # its size checked (max_image_pixels) before decoding
            except IMAGE_ERRORS as e:
                raise ValueError(f"input image {str(path)!r} is not a readable image: {e}") from None
        if isinstance(image, Image.Image):
            image = transform(image.convert("RGB"))
        if not torch.is_tensor(image) or image.shape != (3, image_size, image_size):
            raise ValueError(f"an input image must be a PIL image, a path or a (3, {image_size}, "
                             f"{image_size}) tensor; got {type(image).__name__}")
        out.append(image)
    return torch.stack(out).to(device) if out else torch.zeros(0, 3, image_size, image_size, device=device)


def prompt_embeddings(backbone: "MiniGPT4", prompts: list[str], images: list[list], max_new_tokens: int,
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap the prompts with their images, cut over-long ones from the left (keeping BOS) and
    left-pad the batch for generation, on `device` (default: the LLM's). Returns (inputs_embeds,
    attention_mask)."""
    m = backbone
    device = device if device is not None else m.device
    tok = m.llama_tokenizer
    for i, (prompt, item_images) in enumerate(zip(prompts, images)):
        n = prompt.count(IMAGE_PLACEHOLDER)
        if n != len(item_images):
            raise ValueError(f"prompt {i} has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(item_images)} "
                             f"image(s) were given: {prompt[:80]!r}")
    encoded = tok(prompts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    flat = [image for item_images in images for image in item_images]
    image_embeds = m.encode_img(prepare_images(flat, m.cfg.image_size, device))[0] if flat else None
    embeds, mask, _ = m.wrap_inputs(encoded.input_ids.to(device), encoded.attention_mask.to(device), None,
                                    image_embeds)
    lengths = mask.sum(dim=1)
    context = m.llama_model.config.max_position_embeddings
    budget = context - max_new_tokens
    if budget < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the LLM's "
                         f"{context}-token context")
    cut = (lengths - budget).clamp(min=0)
    if cut.any():
        warnings.warn(f"prompt(s) {cut.nonzero().flatten().tolist()} exceed the LLM context "
                      f"({context} tokens incl. {max_new_tokens} new); "
                      f"cut from the left by {cut.max().item()} positions (BOS kept)")
    lengths = lengths - cut
    L = int(lengths.max())
    # Left-padded layout: row b holds BOS (for a family that has one) + its last positions, right-aligned.
    lead = 0 if m.bos_token_id is None else 1
    j = torch.arange(L, device=device).unsqueeze(0)
    pad = (L - lengths).unsqueeze(1)
    source = torch.where(j < pad + lead, j - pad, j - pad + cut.unsqueeze(1)).clamp(min=0)
    new_mask = (j >= pad).long()
    gathered = embeds.gather(1, source.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    return gathered * new_mask.unsqueeze(-1).to(gathered.dtype), new_mask


def item_seeds(n: int, seed, generator) -> list[int]:
    """One seed per item: `seed` (the same for every item when an int), or drawn from torch's RNG."""
    if generator is not None:
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * n
        return [int(torch.randint(0, 2**62, (1,), generator=g)) for g in gens]
    if seed is None:
        return torch.randint(0, 2**62, (n,)).tolist()
    if isinstance(seed, int):
        return [seed] * n
    if len(seed) != n:
        raise ValueError(f"got {len(seed)} seeds for {n} prompts")
    return list(seed)


def decode_tokens(backbone: "MiniGPT4", embeds: torch.Tensor, mask: torch.Tensor, processors: "ProcessorChain",
                  max_new_tokens: int, end_sym: str) -> tuple[torch.Tensor, "VokenStateRecorder"]:
    """transformers' `generate` from the prompt embeddings (KV cache, stop at `end_sym`), with a
    `VokenStateRecorder` on the decoder. Returns the generated ids (B, N) and the recorder."""
    from transformers import GenerationConfig, LogitsProcessorList

    tok = backbone.llama_tokenizer
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, stop_strings=[end_sym],
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              bos_token_id=tok.bos_token_id)
    recorder = VokenStateRecorder(backbone.voken_ids[0])
    hook = backbone.llm_parts()[0].register_forward_hook(recorder, with_kwargs=True)
    try:
        generated = backbone.llama_model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config,
                                                  logits_processor=LogitsProcessorList([processors]), tokenizer=tok)
    finally:
        hook.remove()
    return generated, recorder


def voken_features(backbone: "MiniGPT4", embeds: torch.Tensor, mask: torch.Tensor, generated: torch.Tensor,
                   recorder: "VokenStateRecorder | None" = None) -> tuple[torch.Tensor, list[int]]:
    """Voken features of the generated answers, for the items with a complete voken group (first
    group of each item): the last-layer states the `recorder` kept while decoding, else -- without
    a recorder, or for an item whose answer ended right after `[IMG6]` -- one plain forward pass
    over prompt + answer, read with the training code's `voken_features`. Only last-layer states
    are ever kept. Returns the (N, 8, H) features and the N item indices."""
    m = backbone
    img0, img6 = m.voken_ids[0], m.voken_ids[VOKEN_COUNT - 2]
    has = (generated == img0).any(dim=1)
    first = (generated == img0).float().argmax(dim=1)
    complete = has & (first + VOKEN_COUNT - 2 < generated.shape[1])
    complete &= generated.gather(1, (first + VOKEN_COUNT - 2).clamp(max=generated.shape[1] - 1)
                                 .unsqueeze(1)).squeeze(1) == img6
    rows = complete.nonzero().flatten().tolist()
    if not rows:
        return torch.zeros(0, VOKEN_COUNT, m.llama_model.config.hidden_size), []
    if recorder is not None and recorder.states is not None:
        recorded = recorder.complete()[rows]
        if bool(recorded.all()):
            return recorder.states[rows], rows
        features = torch.empty(len(rows), VOKEN_COUNT, recorder.states.shape[-1], dtype=recorder.states.dtype,
                               device=recorder.states.device)
        features[recorded] = recorder.states[rows][recorded]
        missing = (~recorded).nonzero().flatten().tolist()
        items = [rows[i] for i in missing]
        features[missing] = voken_features(m, embeds[items], mask[items], generated[items])[0].to(features)
        return features, rows
    P = embeds.shape[1]
    end = int(first[rows].max()) + VOKEN_COUNT - 1           # up to and including [IMG6]
    ids = generated[rows, :end]
    full = torch.cat([embeds[rows], m.embed_tokens(ids).to(embeds.dtype)], dim=1)
    full_mask = torch.cat([mask[rows], torch.ones_like(ids)], dim=1)
    hidden, _, _ = m.forward_llm(full, full_mask)
    aligned = torch.cat([torch.full((len(rows), P), -1, device=ids.device, dtype=ids.dtype), ids], dim=1)
    aligned[:, P:] = torch.where(torch.arange(ids.shape[1], device=ids.device) > first[rows].unsqueeze(1),
                                 -1, ids)                    # keep only the first [IMG0] of each item
    features, _ = m.voken_features(hidden, aligned)
    return features, rows


def group_starts(backbone: "MiniGPT4", generated: torch.Tensor) -> list[list[int]]:
    """Per item, the positions of its complete voken groups in the generated ids: an `[IMG0]` with
    `[IMG6]` six tokens on (its 8 features are the states before `[IMG0]` and of `[IMG0]`..`[IMG6]`)."""
    img0, img6 = backbone.voken_ids[0], backbone.voken_ids[VOKEN_COUNT - 2]
    n = generated.shape[1]
    starts: list[list[int]] = []
    for row in generated.tolist():
        starts.append([t for t, token in enumerate(row) if token == img0 and t + VOKEN_COUNT - 2 < n
                       and row[t + VOKEN_COUNT - 2] == img6])
    return starts


def later_voken_features(backbone: "MiniGPT4", embeds: torch.Tensor, mask: torch.Tensor,
                         generated: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """The voken features of every complete group after an item's first (an answer with several
    pictures): one forward pass over prompt + answer of the items that have them, read with the
    training code's `voken_features`. Returns the (N, 8, H) features, each one's item and group number
    (1-based: the first picture is group 0), ordered by item, then group."""
    m = backbone
    starts = group_starts(m, generated)
    items = [i for i, s in enumerate(starts) if len(s) > 1]
    if not items:
        return torch.zeros(0, VOKEN_COUNT, m.llama_model.config.hidden_size, device=embeds.device), [], []
    P = embeds.shape[1]
    end = max(starts[i][-1] for i in items) + VOKEN_COUNT - 1      # up to and including the last [IMG6]
    ids = generated[items, :end]
    full = torch.cat([embeds[items], m.embed_tokens(ids).to(embeds.dtype)], dim=1)
    full_mask = torch.cat([mask[items], torch.ones_like(ids)], dim=1)
    hidden, _, _ = m.forward_llm(full, full_mask)
    aligned = torch.full((len(items), P + ids.shape[1]), -1, device=ids.device, dtype=ids.dtype)
    owners, groups = [], []
    for k, i in enumerate(items):
        for j, t in enumerate(starts[i][1:], start=1):       # only the later groups' [IMG0]
            aligned[k, P + t] = m.voken_ids[0]
            owners.append(i)
            groups.append(j)
    features, _ = m.voken_features(hidden, aligned)
    return features, owners, groups


def answer_segments(text: str, images: list, end_sym: str) -> list:
    """An answer as it reads: its text pieces (str) and its pictures in order, each picture where its
    voken group stands; the vokens, the end symbol `end_sym` and `<s>` / `</s>` are left out of the
    text. A group without a picture (cut short) shows none."""
    out: list = []
    for k, piece in enumerate(text.split(VOKENS[0])):
        if 0 < k <= len(images):
            out.append(images[k - 1])
        for token in VOKENS + [end_sym, "</s>", "<s>", IMAGE_PLACEHOLDER]:
            piece = piece.replace(token, "")
        if piece.strip():
            out.append(" ".join(piece.split()))
    return out


def images_from_features(map_vokens: Callable[[torch.Tensor], "Condition | torch.Tensor"], decoder,
                         features: torch.Tensor, seeds: list[int], guidance_scale: float = 7.5,
                         num_inference_steps: int = 50, scheduler: str = "pndm", pictures: str = "eager") -> list:
    """Voken features (N, 8, H) -> N PIL images: `cond = map_vokens(features)`, negative =
    `map_vokens(zeros)`, one `decoder.draw` for all N (classifier-free guidance runs the UNet on both
    halves as one batch); `pictures` chooses how the UNet runs (see `generate`). The same for every
    decoder family: a condition's pooled embedding (SDXL, SD3) follows its rows."""
    negative = None
    if guidance_scale > 1:                  # one mapper call for both (rows are independent)
        both = as_condition(map_vokens(torch.cat([features, torch.zeros_like(features[:1])])))
        cond, negative = both[:-1], both[-1:].expand(features.shape[0])
    else:
        cond = as_condition(map_vokens(features))
    return decoder.draw(cond, negative, seeds, guidance_scale, num_inference_steps, scheduler, pictures)


def decode_answer(backbone: "MiniGPT4", ids: list[int], pictures: list) -> GenerationOutput:
    """An answer's ids as the LLM family decodes them (`MiniGPT4.decode_answer`: up to the
    end-of-sequence token, with special tokens as the release, and clean), with its pictures."""
    ids, text, clean = backbone.decode_answer(ids)
    return GenerationOutput(text=text, clean_text=clean, image=pictures[0] if pictures else None, token_ids=ids,
                            images=list(pictures))
