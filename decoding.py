"""What runs at every decoding step of `generate`, for transformers' own loop (generation.py) and
for the static-cache loop (fast_inference.py) alike:

    logits ─► repetition penalty, text tokens only (TextRepetitionPenalty) ─► temperature ─► top-k
           ─► top-p                                                     (the release's settings)
           ─► a seeded Gumbel-max sample per item (SeededSampler)
           ─► voken forcing: [IMG1]..[IMG7] follow [IMG0]              (VokenForcing, last)
    hidden states ─► VokenStateRecorder: the 8 last-layer voken states of each item, nothing else

`logits_processors` builds the chain; `ProcessorChain` hands it to `generate` as one processor.
"""
from __future__ import annotations

import torch
from torch import nn

from constants import VOKEN_COUNT


def logits_processors(voken_ids: list[int], seeds: list[int] | None, *, do_sample: bool, temperature: float,
                      top_k: int | None, top_p: float, repetition_penalty: float,
                      force_generation: bool, sampler=None) -> "ProcessorChain":
    """The sampling of `generate`, as one chain of logits processors run with `do_sample=False`:
    repetition penalty, temperature, top-k, top-p, then a seeded sample per item (`SeededSampler`
    over `seeds`, or the given `sampler`), then voken forcing."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors = []
    if repetition_penalty != 1.0:
        # Our own instance, not `GenerationConfig.repetition_penalty`: transformers 5 exempts the first
        # (left-padding length) tokens of each row from it -- meant for prompt ids, but with
        # `inputs_embeds` there are none, so padded rows skipped the penalty on their first generated
        # tokens and a batch no longer matched its single calls. Penalising every generated token is
        # the release's behaviour (it too generated from embeddings).
        processors.append(TextRepetitionPenalty(float(repetition_penalty), voken_ids))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(int(top_k)))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(sampler if sampler is not None else
                          SeededSampler([torch.Generator().manual_seed(s) for s in seeds]))
    processors.append(VokenForcing(voken_ids, prompt_length=0, force_generation=force_generation))
    return ProcessorChain(processors)


class TextRepetitionPenalty:
    """transformers' repetition penalty on every generated token except the vokens.

    A voken is a control token, not a word: an answer with two pictures repeats `[IMG0]` by design.
    Penalised like text (the release's 2.0 divides its logit by two once one picture is drawn), a
    trained model's second `[IMG0]` lost to the end of the answer: a toy model whose teacher-forced
    probability of the second `[IMG0]` was 0.997 drew it in 15 of 40 test answers. Until an
    answer holds a voken this is the release's penalty exactly; after, only `[IMG0]` differs (the
    other vokens are forced anyway)."""

    def __init__(self, penalty: float, voken_ids: list[int]):
        from transformers import RepetitionPenaltyLogitsProcessor

        self.penalty = RepetitionPenaltyLogitsProcessor(penalty)
        self.voken_ids = torch.tensor(voken_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.voken_ids.device != scores.device:       # once: no host-to-device copy per step
            self.voken_ids = self.voken_ids.to(scores.device)
        penalised = self.penalty(input_ids, scores.clone())
        return penalised.index_copy(-1, self.voken_ids, scores.index_select(-1, self.voken_ids))


class SeededSampler:
    """Per-item reproducible sampling as a logits processor (run with `do_sample=False`).

    transformers samples a whole batch from one random stream, so item i of a batch would not
    match the same prompt generated alone. Here each item has its own `torch.Generator`: the
    (already temperature / top-p processed) scores get Gumbel noise from that generator and
    everything but the winner is set to -inf, so the greedy pick *is* a sample from
    softmax(scores) (the Gumbel-max trick) and a batch equals its items run one by one.
    """

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(scores.device)
        return gumbel_pick(scores, uniform)


def gumbel_pick(scores: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The Gumbel-max sample of softmax(scores) per row, from (B, V) uniform draws in [0, 1): scores
    that are -inf everywhere but 0 at the winner (so the greedy pick that follows takes it). Shared
    by `SeededSampler` and the static decode's sampler (fast_inference.py), which draws the same
    numbers ahead of time."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    winner = (logp + gumbel).argmax(dim=-1, keepdim=True)
    out = torch.full_like(scores, float("-inf"))
    return out.scatter(-1, winner, 0.0)


class VokenForcing:
    """Logits processor: once `[IMG0]` is produced, `[IMG1]`..`[IMG7]` follow, forced rather than
    sampled; with `force_generation`, `[IMG0]` wins every step until it has appeared (a number n: until
    n groups have).

    It must run last, after every sampling processor, so that its choice is final.
    """

    def __init__(self, voken_ids: list[int], prompt_length: int, force_generation: bool = False):
        self.voken_ids = torch.tensor(voken_ids)
        self.prompt_length = prompt_length     # columns of `input_ids` that are not generated
        self.force_generation = force_generation

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if self.voken_ids.device != input_ids.device:     # once: no host-to-device copy per step
            self.voken_ids = self.voken_ids.to(input_ids.device)
        vokens = self.voken_ids
        forced = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
        if generated.shape[1] > 0:
            # If the last token is [IMG_k] with k < 7, the next one is [IMG_k+1].
            last = generated[:, -1]
            position = (last.unsqueeze(1) == vokens[:-1]).float().argmax(dim=1)
            is_open = (last.unsqueeze(1) == vokens[:-1]).any(dim=1)
            forced = torch.where(is_open, vokens[1:][position], forced)
        if self.force_generation:
            # `force_generation` True: one picture; a number n: n voken groups (an answer of n pictures).
            seen = (generated == vokens[0]).sum(dim=1) if generated.shape[1] else torch.zeros_like(forced)
            forced = torch.where((forced < 0) & (seen < int(self.force_generation)), vokens[0], forced)
        # Branch-free (no `.any()`): on a GPU a data-dependent branch would stall every decoding step.
        one_hot = torch.arange(scores.shape[-1], device=scores.device) == forced.unsqueeze(1)
        forced_scores = torch.where(one_hot, 0.0, float("-inf")).to(scores.dtype)
        return torch.where((forced >= 0).unsqueeze(1), forced_scores, scores)


class ProcessorChain:
    """Several logits processors run in order, handed to `generate` as one.

    transformers inspects each processor's signature at every decoding step; one object instead of
    four keeps that per-step Python cost (~0.1 ms each) out of a loop whose GPU work for a short
    model is only a few milliseconds."""

    def __init__(self, processors: list):
        self.processors = list(processors)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for processor in self.processors:
            scores = processor(input_ids, scores)
        return scores


class VokenStateRecorder:
    """Forward hook (`register_forward_hook(recorder, with_kwargs=True)`) on the LLM's decoder stack
    during `generate`: keeps, per item, the last-layer states (after the final norm) of its first
    voken group -- the state that predicted `[IMG0]` and the states of `[IMG0]`..`[IMG6]` -- and
    nothing else: (B, 8, H) however long the answer, instead of every layer's states of every step
    (the release's `output_hidden_states=True`) or a second forward pass over prompt + answer.

    A forward call with `inputs_embeds` (the prompt) only remembers its last position's state
    (`observe_prompt`); a call with `input_ids` (one decoding step per generated token fed back)
    advances each item's group (`observe`). No host-device synchronisation and every update in
    place: everything is `torch.where` on (B, H) tensors written into the same buffers, so the static
    decode (fast_inference.py) records through a captured CUDA graph too. `complete` tells which items
    have all 8 states (an answer cut right after `[IMG6]` never fed `[IMG6]` back, so it lacks that one).
    """

    def __init__(self, img0_id: int, count: int = VOKEN_COUNT):
        self.img0_id, self.count = img0_id, count
        self.states: torch.Tensor | None = None      # (B, count, H)
        self.filled: torch.Tensor | None = None      # (B,) states recorded so far
        self.previous: torch.Tensor | None = None    # (B, H) state of the latest position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            self.observe_prompt(hidden)
        else:
            self.observe(ids, hidden)

    def reset(self, batch: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Empty buffers for a new answer (the same ones again when the sizes match)."""
        if self.states is None or self.states.shape != (batch, self.count, hidden_size) or \
                self.states.dtype != dtype or self.states.device != device:
            self.states = torch.zeros(batch, self.count, hidden_size, dtype=dtype, device=device)
            self.filled = torch.zeros(batch, dtype=torch.long, device=device)
            self.previous = torch.zeros(batch, hidden_size, dtype=dtype, device=device)
        else:
            self.states.zero_(), self.filled.zero_(), self.previous.zero_()

    def observe_prompt(self, hidden: torch.Tensor) -> None:
        """The prompt's forward pass: remember its last position's state."""
        if self.states is None:
            self.reset(hidden.shape[0], hidden.shape[-1], hidden.dtype, hidden.device)
        self.previous.copy_(hidden[:, -1])

    def observe(self, ids: torch.Tensor, hidden: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """A decoding step fed `ids` (B, T) and produced `hidden` (B, T, H). `active` (a 0-d bool
        tensor, optional) leaves everything as it is when False (the static decode's steps after the
        last answer ended)."""
        if self.states is None:
            self.reset(hidden.shape[0], hidden.shape[-1], hidden.dtype, hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        for j in range(ids.shape[1]):
            state = hidden[:, j]
            starting = (self.filled == 0) & (ids[:, j] == self.img0_id)
            going = (self.filled > 0) & (self.filled < self.count)
            if active is not None:
                starting, going = starting & active, going & active
            self.states[:, 0] = torch.where(starting.unsqueeze(1), self.previous, self.states[:, 0])
            self.filled.copy_(torch.where(starting, 1, self.filled))
            going = going | starting
            slot = self.filled.clamp(max=self.count - 1)
            self.states[rows, slot] = torch.where(going.unsqueeze(1), state, self.states[rows, slot])
            self.filled.add_(going.long())
            self.previous.copy_(state if active is None else torch.where(active, state, self.previous))

    def complete(self) -> torch.Tensor:
        """(B,) bool: items whose 8 voken states were all recorded."""
        if self.filled is None:
            return torch.zeros(0, dtype=torch.bool)
        return self.filled == self.count
