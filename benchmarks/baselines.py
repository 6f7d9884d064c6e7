"""The baselines the benchmarks compare against, kept apart from benchmarks/run.py so that the
tests (tests/test_optimisations.py) can check that they compute the same thing as the project's
code: the release's per-sample input wrapping, one-image-at-a-time CLIP features, the bare KV-cached
LLM decode that `generate` is timed against, and the AdamW state formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def release_style_wrap(m, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input wrapping the way the release did it (its `input_warp`, called once per sample from
    `forward`), written for this benchmark: per sample, the sequence grows by concatenation --
    BOS, then for each `<ImageHere>` the embedded text before it and the image's queries, then the
    rest of the text -- with the attention mask and the labels grown alongside; then every sample is
    padded with zeros to the longest and the samples are concatenated.

    One deliberate difference: the release kept each row's right padding inside the wrapped
    sequence (masked, then padded again); here a row's padding is dropped first, so that the result
    is exactly `MiniGPT4.wrap_inputs`'s (tests/test_optimisations.py checks it)."""
    bos_id = m.llama_tokenizer.bos_token_id
    device = input_ids.device
    n_query = image_embeds.shape[1]
    all_embeds, all_masks, all_labels = [], [], []
    next_image = 0
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, mask, lab = input_ids[b:b + 1, keep], attention_mask[b:b + 1, keep], labels[b:b + 1, keep]
        embeds = m.embed_tokens(torch.full((1, 1), bos_id, dtype=ids.dtype, device=device))
        wrapped_mask = torch.ones(1, 1, dtype=mask.dtype, device=device)
        wrapped_labels = torch.full((1, 1), -100, dtype=lab.dtype, device=device)
        places = (ids == m.image_token_id).nonzero(as_tuple=True)[1]
        start = 0
        for place in places.tolist():
            image = image_embeds[next_image:next_image + 1].to(embeds.dtype)
            next_image += 1
            embeds = torch.cat([embeds, m.embed_tokens(ids[:, start:place]), image], dim=1)
            wrapped_mask = torch.cat([wrapped_mask, mask[:, start:place],
                                      torch.ones(1, n_query, dtype=mask.dtype, device=device)], dim=1)
            wrapped_labels = torch.cat([wrapped_labels, lab[:, start:place],
                                        torch.full((1, n_query), -100, dtype=lab.dtype, device=device)], dim=1)
            start = place + 1
        embeds = torch.cat([embeds, m.embed_tokens(ids[:, start:])], dim=1)
        all_embeds.append(embeds)
        all_masks.append(torch.cat([wrapped_mask, mask[:, start:]], dim=1))
        all_labels.append(torch.cat([wrapped_labels, lab[:, start:]], dim=1))
    length = max(e.shape[1] for e in all_embeds)
    for i, embeds in enumerate(all_embeds):
        pad = length - embeds.shape[1]
        if pad:
            all_embeds[i] = torch.cat([embeds, torch.zeros(1, pad, embeds.shape[2], dtype=embeds.dtype,
                                                            device=device)], dim=1)
            all_masks[i] = torch.cat([all_masks[i], torch.zeros(1, pad, dtype=all_masks[i].dtype, device=device)],
                                     dim=1)
            all_labels[i] = torch.cat([all_labels[i], torch.full((1, pad), -100, dtype=all_labels[i].dtype,
                                                                 device=device)], dim=1)
    return torch.cat(all_embeds), torch.cat(all_masks).long(), torch.cat(all_labels)


def one_at_a_time_features(images, models) -> torch.Tensor:
    """CLIP image features the release's way: preprocess, encode and normalise one image per call."""
    out = []
    with torch.no_grad():
        for image in images:
            pixels = models.clip_preprocess(image.convert("RGB")).unsqueeze(0)
            out.append(F.normalize(models.clip.encode_image(pixels).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def bare_decode(model, embeds: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The LLM work of generating `tokens` (B, N) after the prompt `embeds`, and nothing else: one
    prefill forward, then one KV-cached forward per token fed back (N forwards in all, as
    `generate` makes to produce N tokens); logits only for the last position. Returns the last
    logits."""
    from transformers import DynamicCache

    llm = model.model.llama_model
    cache = DynamicCache(config=llm.config)
    position = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    for i in range(tokens.shape[1] - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position[:, -1:] + 1
        out = llm(input_ids=tokens[:, i:i + 1], attention_mask=mask, position_ids=position,
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits


def adam_state_bytes(params) -> int:
    """Bytes of AdamW's state for these parameters: `exp_avg` and `exp_avg_sq` in each parameter's
    dtype plus a float32 `step` scalar each (torch's default, non-capturable AdamW)."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)
