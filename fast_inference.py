"""Fast inference on one GPU: options of `generation.generate`, off by default (the release's path).

    decode="static" | "compiled"       the LLM's answer
        prompt ─► prefill, eager (transformers' dynamic cache, exactly as `generate` runs it)
               ─► its keys and values copied into a static cache (`StaticCache`, length rounded up)
               ─► a loop of decode steps, each a fixed-shape function of device buffers only:
                  embed the last token, the decoder over the static cache (a 4-D mask marks the
                  filled positions), the voken-state recorder, lm_head, the same logits processors
                  as `generate` (repetition penalty, temperature, top-k, top-p), the seeded sample
                  (the same uniform numbers, drawn ahead in chunks), voken forcing, the stop checks
               ─► on a GPU the step is captured once in a CUDA graph and replayed ("compiled":
                  compiled with torch.compile first); the host looks at the stop flags only every
                  `CHECK_EVERY` steps, so no host-device synchronisation per token
    pictures="graph" | "compiled"      Stable Diffusion
        the UNet channels-last; "graph": each call replayed from a CUDA graph captured for its
        input shapes; "compiled": torch.compile (mode "reduce-overhead": CUDA graphs by torch) and
        the VAE decoder compiled; classifier-free guidance stays one batch of 2N (the pipeline's)

Why our own decode loop rather than `generate(cache_implementation="static")` with a compiled
forward: transformers' loop does per-token Python work (input preparation, the growing id tensor,
stopping criteria with a host read of the finished flags) that costs as much as the GPU work of a
7B step, our seeded sampler draws per-item random numbers on the host each step, and a compiled
forward under CUDA graphs returns tensors that the next replay overwrites (the voken recorder reads
them). Here the whole step -- sampling and recording included -- works in place on buffers that
outlive it, so one graph replays it.

Equality (tests/test_fast_inference.py): the prefill, the processors and the random numbers are the
release path's own, so the tokens are the same up to the rounding of attention over the longer,
masked static cache (float32 on the CPU: identical on the tiny preset). Pictures: identical up to
the rounding of channels-last convolutions and compiled kernels.

Where a mode cannot run it falls back, with the reason logged once: no CUDA graphs on a CPU (the
static loop runs eagerly), 8-bit bitsandbytes layers (their outlier handling synchronises with the
host: the step runs uncaptured), a capture or compilation that fails (uncaptured / uncompiled), CPU
offload with compiled pictures (weights move between calls: a graph is captured per call instead).
"""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from minigpt4 import MiniGPT4

log = logging.getLogger(__name__)

DECODE_MODES = ("dynamic", "static", "compiled")
PICTURE_MODES = ("eager", "graph", "compiled")
CHECK_EVERY = 8           # decode steps between two reads of the stop flags (and per chunk of random numbers)
LENGTH_BUCKET = 64        # static cache and history lengths are rounded up to this: graphs serve similar lengths
DUMMY_ID = 2**30          # history filler: beyond every vocabulary, so no processor or stop check counts it
MAX_DECODERS = 1          # static decoders (cache + graph) kept per model; more would hold more GPU memory
# torch.compile backend of the "compiled" modes: "inductor" (torch's compiler; GPU and CPU). The tests
# set "eager" (dynamo's tracing without code generation) to check the plumbing in seconds.
COMPILE_BACKEND = "inductor"
COMPILE_VAE = True        # pictures="compiled" also compiles the VAE decoder (once per image: a small gain)

_reported: set[str] = set()


def _fallback(reason: str, level: int = logging.WARNING) -> None:
    """Log why a speed option does not apply, once per reason."""
    if reason not in _reported:
        _reported.add(reason)
        log.log(level, "%s", reason)


def check_modes(decode: str, pictures: str) -> None:
    """`generate`'s speed options, checked before any work: a ValueError names the option."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if pictures not in PICTURE_MODES:
        raise ValueError(f"pictures must be one of {PICTURE_MODES}, got {pictures!r}")


def compile_options(mode: str | None = None, fullgraph: bool = False) -> dict:
    """`torch.compile` keyword arguments for `COMPILE_BACKEND` (a mode applies to inductor only)."""
    if COMPILE_BACKEND != "inductor":
        return {"backend": COMPILE_BACKEND, "fullgraph": fullgraph, "dynamic": False}
    return {"mode": mode, "fullgraph": fullgraph, "dynamic": False}


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _fingerprint(module: nn.Module, full: bool = True) -> tuple:
    """Where a module's weights live: a captured graph reads them by address, so a graph made
    before the weights moved (placement, offload) must not be replayed. `full=False` looks at the
    first and last tensors only (a part moved as a whole, cheaply checked on every call)."""
    params = list(module.parameters())
    chosen = params if full else params[:1] + params[-1:]
    return (len(params), str(params[0].device) if params else "") + tuple(p.data_ptr() for p in chosen)


def weights_are_int8(module: nn.Module) -> bool:
    """Whether bitsandbytes' 8-bit linear layers are inside `module`."""
    return any(type(m).__name__ == "Linear8bitLt" for m in module.modules())


# --------------------------------------------------------------------------------------------
# Capturing a CUDA graph
# --------------------------------------------------------------------------------------------

def capture(fn: Callable[[], object], stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `fn()` (which must already have run at least once, on `stream`): its
    kernels are recorded, not run. Raises what the capture raised (e.g. a host synchronisation)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph


# --------------------------------------------------------------------------------------------
# Decoding: a static cache and a captured step
# --------------------------------------------------------------------------------------------

class NoiseSampler:
    """The static decode's `SeededSampler`: the same per-item uniform numbers (each item's generator
    gives V numbers per step, so `CHECK_EVERY` steps drawn at once are the same numbers), held in a
    (B, C, V) device buffer and read at the step counter, so no host work happens inside a step."""

    def __init__(self, noise: torch.Tensor, step: torch.Tensor):
        self.noise, self.step = noise, step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from decoding import gumbel_pick

        index = torch.remainder(self.step, self.noise.shape[1]).view(1)
        return gumbel_pick(scores, self.noise.index_select(1, index).squeeze(1))


def draw_noise(generators: Sequence[torch.Generator], steps: int, vocab: int, pin: bool) -> torch.Tensor:
    """The next `steps` x `vocab` uniform numbers of each item's generator, (B, steps, vocab), on the
    host (pinned memory for an asynchronous copy to the GPU)."""
    out = torch.empty(len(generators), steps, vocab, pin_memory=pin)
    for row, g in zip(out, generators):
        torch.rand(steps * vocab, generator=g, out=row.view(-1))
    return out


class StaticDecoder:
    """Buffers, processors and (on a GPU) the captured step of static-cache decoding for one batch
    size, cache length and set of sampling options. Reused by later calls with the same key, so the
    capture (and compilation) happens once."""

    def __init__(self, backbone: "MiniGPT4", batch: int, cache_length: int, history: int, sampling: dict,
                 end_sym: str, mode: str, device: torch.device):
        from transformers import StaticCache
        from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria

        from decoding import VokenStateRecorder, logits_processors

        # (no reference to `backbone` itself: it is the weak key under which this decoder is kept)
        self.mode, self.device = mode, device
        self.decoder, self.lm_head = backbone.llm_parts()
        config = self.decoder.config
        tok = backbone.llama_tokenizer
        self.pad_id = tok.pad_token_id
        self.vocab = backbone.llama_model.config.vocab_size
        self.cache = StaticCache(config=config, max_cache_len=cache_length)
        long = dict(dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, cache_length, dtype=torch.bool, device=device)
        self.mask = self.key_valid[:, None, None, :]             # what attention reads: (B, 1, 1, cache)
        self.position = torch.zeros(batch, 1, **long)
        self.token = torch.zeros(batch, **long)
        self.history = torch.full((batch, history), DUMMY_ID, **long)   # newest last, as generate's ids
        self.out = torch.zeros(batch, history, **long)
        self.unfinished = torch.ones(batch, **long)
        self.finished_at = torch.full((batch,), history, **long)
        self.alive = torch.ones((), dtype=torch.bool, device=device)
        self.step_index = torch.zeros((), **long)
        self.noise = torch.zeros(batch, CHECK_EVERY, self.vocab, device=device)
        self.recorder = VokenStateRecorder(backbone.voken_ids[0])
        sampler = NoiseSampler(self.noise, self.step_index) if sampling["do_sample"] else None
        self.processors = logits_processors(backbone.voken_ids, None, sampler=sampler, **sampling)
        # generate's stopping criteria (the benchmarks empty the list to decode exactly max_new_tokens)
        self.stops = [StopStringCriteria(tok, [end_sym]), EosTokenCriteria(tok.eos_token_id)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0                 # steps run without the graph (warm-up before the capture)
        self.step_fn = self.step
        self.capture_ok = device.type == "cuda"
        if not self.capture_ok:
            _fallback(f"decode={mode!r} on {device.type}: CUDA graphs need a CUDA GPU; the static-cache "
                      "step runs without one", logging.INFO)
        elif weights_are_int8(backbone.llama_model):
            self.capture_ok = False
            _fallback(f"decode={mode!r}: bitsandbytes 8-bit layers synchronise with the host (their outlier "
                      "handling), so the step cannot be captured in a CUDA graph; it runs uncaptured")
        if mode == "compiled":
            self.step_fn = torch.compile(self.step, **compile_options())
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # ---- the step: device buffers in, device buffers out -------------------------------------

    def select(self, logits: torch.Tensor) -> None:
        """From the last position's logits to the next token, exactly as `generate`'s loop does it
        (processors, greedy pick of the sampled token, padding of finished rows, stop checks), in
        place on the buffers; `step_index` counts the tokens."""
        scores = self.processors(self.history, logits)
        token = scores.argmax(dim=-1)
        token = token * self.unfinished + self.pad_id * (1 - self.unfinished)
        self.history.copy_(torch.cat([self.history[:, 1:], token[:, None]], dim=1))
        still = self.unfinished
        for stop in self.stops:
            still = still & ~stop(self.history, None)
        self.finished_at.copy_(torch.where((self.unfinished > 0) & (still == 0), self.step_index,
                                           self.finished_at))
        self.unfinished.copy_(still)
        self.out.index_copy_(1, self.step_index.view(1), token[:, None])
        self.token.copy_(token)
        self.alive.copy_(still.any())
        self.step_index.add_(1)

    def step(self) -> None:
        """One decoding step: feed the last token at its position, then `select` the next one."""
        ids = self.token[:, None]
        written = self.cache.layers[0].cumulative_length.view(1)       # where this token's keys go
        self.key_valid.index_fill_(1, written, True)
        hidden = self.decoder(input_ids=ids, attention_mask=self.mask, position_ids=self.position,
                              past_key_values=self.cache, use_cache=True).last_hidden_state
        self.position.add_(1)
        self.recorder.observe(ids, hidden, active=self.alive)
        self.select(self.lm_head(hidden[:, -1:])[:, -1].float())

    # ---- the host side ------------------------------------------------------------------------

    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prompt through the decoder as `generate` runs it (dynamic cache; positions from the
        mask; no mask when nothing is padded), its keys and values copied into the static cache and
        the buffers reset for a new answer. Returns the last position's logits (float32)."""
        from transformers import DynamicCache

        B, P = mask.shape
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        dynamic = DynamicCache(config=self.decoder.config)
        out = self.decoder(inputs_embeds=embeds, attention_mask=None if bool(mask.all()) else mask,
                           position_ids=position_ids, past_key_values=dynamic, use_cache=True)
        hidden = out.last_hidden_state
        for static, layer in zip(self.cache.layers, dynamic.layers):
            if not static.is_initialized:
                static.lazy_initialization(layer.keys, layer.values)
            static.keys[:, :, :P].copy_(layer.keys)
            static.values[:, :, :P].copy_(layer.values)
            static.cumulative_length.fill_(P)
        self.key_valid.zero_()
        self.key_valid[:, :P] = mask.bool()
        self.position.copy_(mask.long().sum(dim=1, keepdim=True))
        self.token.zero_(), self.out.zero_(), self.step_index.zero_()
        self.history.fill_(DUMMY_ID), self.unfinished.fill_(1), self.alive.fill_(True)
        self.finished_at.fill_(self.history.shape[1])
        self.recorder.reset(B, hidden.shape[-1], hidden.dtype, hidden.device)
        self.recorder.observe_prompt(hidden)
        return self.lm_head(hidden[:, -1:])[:, -1].float()

    def run_step(self) -> None:
        """One step: replayed from the graph once captured; before that run as it is (the first
        steps are the warm-up: kernels chosen, compiled code built), then captured."""
        if self.graph is not None:
            self.graph.replay()
            return
        warmup = 3 if self.mode == "compiled" else 1
        if self.stream is None:
            self._run_guarded()
            self.eager_steps += 1
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._run_guarded()
            self.eager_steps += 1
            if self.capture_ok and self.eager_steps >= warmup:
                try:
                    self.graph = capture(self.step_fn, self.stream)
                except RuntimeError as e:                   # e.g. an operation that synchronises
                    self.capture_ok = False
                    _fallback(f"decode={self.mode!r}: the decode step could not be captured in a CUDA graph "
                              f"({str(e).splitlines()[0][:200]}); it runs uncaptured")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def _run_guarded(self) -> None:
        """`step_fn()`; a compilation that fails falls back to the plain step (reason logged)."""
        if self.step_fn is self.step:
            self.step()
            return
        try:
            self.step_fn()
        except Exception as e:  # noqa: BLE001 -- torch.compile raises many kinds; the reason is logged
            if self.eager_steps > 0:
                raise
            self.step_fn = self.step
            _fallback(f"decode='compiled': torch.compile of the decode step failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); the step runs uncompiled")
            self.step()

    @torch.no_grad()
    def decode(self, embeds: torch.Tensor, mask: torch.Tensor, generators: list[torch.Generator],
               max_new_tokens: int) -> torch.Tensor:
        """Generated ids (B, N) as `generate` returns them (padded after an item's end, N the step
        at which the last item ended or `max_new_tokens`); the recorder holds the voken states."""
        cuda = self.device.type == "cuda"
        sampled = bool(generators)
        if sampled:
            self.noise.copy_(draw_noise(generators, CHECK_EVERY, self.vocab, cuda), non_blocking=cuda)
        self.select(self.prefill(embeds, mask))
        steps = 1
        while steps < max_new_tokens:
            if steps % CHECK_EVERY == 0:
                # The next chunk of random numbers is drawn while the GPU works; then the one read of
                # the stop flags per chunk (the only synchronisation of the loop).
                upcoming = draw_noise(generators, CHECK_EVERY, self.vocab, cuda) if sampled else None
                if not bool(self.alive):
                    break
                if sampled:
                    self.noise.copy_(upcoming, non_blocking=cuda)
            self.run_step()
            steps += 1
        length = steps if bool(self.alive) else int(self.finished_at.max()) + 1
        return self.out[:, :length].clone()


# One model's static decoders, keyed by what a captured step depends on.
_decoders: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def static_decoder(backbone: "MiniGPT4", batch: int, prompt_length: int, max_new_tokens: int, sampling: dict,
                   end_sym: str, mode: str, device: torch.device) -> StaticDecoder:
    """The `StaticDecoder` for this call: reused when batch size, rounded lengths, sampling options,
    mode and the weights' addresses match (its graph replays as captured), else made anew (the
    oldest beyond `MAX_DECODERS` dropped, with its cache and graph)."""
    context = backbone.llama_model.config.max_position_embeddings
    # (prompt_embeddings cut the prompt so that prompt + new tokens fit the context)
    cache_length = min(_round_up(prompt_length + max_new_tokens, LENGTH_BUCKET), context)
    history = _round_up(max_new_tokens, LENGTH_BUCKET)
    key = (batch, cache_length, history, tuple(sorted(sampling.items())), end_sym, mode, str(device),
           _fingerprint(backbone.llama_model))
    kept = _decoders.setdefault(backbone, OrderedDict())
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    while len(kept) >= MAX_DECODERS:
        kept.popitem(last=False)
    kept[key] = StaticDecoder(backbone, batch, cache_length, history, sampling, end_sym, mode, device)
    return kept[key]


def decode_tokens_static(backbone: "MiniGPT4", embeds: torch.Tensor, mask: torch.Tensor, seeds: list[int],
                         sampling: dict, max_new_tokens: int, end_sym: str, mode: str):
    """`generation.decode_tokens` with a static cache and a captured step: (generated ids, recorder)."""
    decoder = static_decoder(backbone, embeds.shape[0], embeds.shape[1], max_new_tokens, sampling, end_sym, mode,
                             embeds.device)
    generators = [torch.Generator().manual_seed(s) for s in seeds] if sampling["do_sample"] else []
    generated = decoder.decode(embeds, mask, generators, max_new_tokens)
    return generated, decoder.recorder


def merge_lora(backbone: "MiniGPT4") -> bool:
    """Merge a stage-2 LLM's LoRA into its linear weights for inference (PEFT's `merge_adapter`):
    one matrix product per projection instead of three, at the cost of rounding the sum into the
    weights' dtype. Returns whether anything was merged. `unmerge_lora` undoes it (up to that
    rounding): do not train a merged model."""
    if not backbone.is_lora:
        return False
    backbone.llama_model.merge_adapter()
    return True


def unmerge_lora(backbone: "MiniGPT4") -> None:
    """Undo `merge_lora`."""
    if backbone.is_lora:
        backbone.llama_model.unmerge_adapter()


# --------------------------------------------------------------------------------------------
# Pictures: the UNet from a captured graph or compiled, the VAE decoder compiled
# --------------------------------------------------------------------------------------------

class _Wrapped(nn.Module):
    """What a diffusers pipeline reads of a model part (config, dtype, device, an accelerate hook's
    execution device), taken from the wrapped part."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    @property
    def config(self):
        return self.part.config

    @property
    def dtype(self) -> torch.dtype:
        return self.part.dtype

    @property
    def device(self) -> torch.device:
        return self.part.device

    def __getattr__(self, name: str):
        if name == "_hf_hook":                      # offload (accelerate): where the part runs
            return getattr(self._modules["part"], "_hf_hook")
        return super().__getattr__(name)


class GraphedUNet(_Wrapped):
    """The UNet as the pipeline calls it (`unet(sample, t, encoder_hidden_states=..., return_dict=False)`),
    each call on a GPU replayed from a CUDA graph captured for its input shapes: the first call with
    new shapes runs as usual (the warm-up) and captures; later ones copy their inputs in, replay and
    return a copy of the output. Graphs are recaptured when the weights moved (offload). Other
    arguments (IP-adapter, timestep conditions, `return_dict=True`) run the UNet as usual."""

    def __init__(self, unet: nn.Module, offload: bool = False):
        super().__init__(unet)
        self.graphs: dict[tuple, tuple] = {}
        self.stream: torch.cuda.Stream | None = None
        # With offload the UNet comes back to the GPU each call, perhaps partly at the old addresses:
        # check every tensor's (a few hundred pointers per call), else the first and the last.
        self.check_all_weights = offload

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict: bool = True, **kwargs):
        extras = timestep_cond is not None or cross_attention_kwargs or added_cond_kwargs or kwargs
        if sample.device.type != "cuda" or extras or return_dict:
            return self.part(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             timestep_cond=timestep_cond, cross_attention_kwargs=cross_attention_kwargs,
                             added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kwargs)
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        inputs = (sample, timestep.to(sample.device), encoder_hidden_states)
        key = tuple((x.shape, x.dtype, x.device) for x in inputs)
        weights = _fingerprint(self.part, full=self.check_all_weights)
        entry = self.graphs.get(key)
        if entry is not None and entry[3] == weights:
            graph, static_in, static_out, _ = entry
            for buffer, x in zip(static_in, inputs):
                buffer.copy_(x)
            graph.replay()
            out = static_out.clone()
        else:
            out = self._warm_up_and_capture(key, inputs, weights)
        return (out,)

    def _warm_up_and_capture(self, key: tuple, inputs: tuple, weights: tuple) -> torch.Tensor:
        self.graphs = {k: v for k, v in self.graphs.items() if v[3] == weights}     # stale ones go
        static_in = tuple(x.clone() for x in inputs)
        run = lambda: self.part(static_in[0], static_in[1], encoder_hidden_states=static_in[2], return_dict=False)[0]
        self.stream = self.stream or torch.cuda.Stream(inputs[0].device)
        self.stream.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(self.stream):
            out = run().clone()                              # the real call, also the warm-up
            try:
                holder: list = []
                graph = capture(lambda: holder.append(run()), self.stream)
                self.graphs[key] = (graph, static_in, holder[0], weights)
            except RuntimeError as e:
                _fallback(f"pictures='graph': the UNet could not be captured in a CUDA graph "
                          f"({str(e).splitlines()[0][:200]}); it runs without one")
        torch.cuda.current_stream(inputs[0].device).wait_stream(self.stream)
        return out


class CompiledUNet(_Wrapped):
    """The UNet compiled with torch.compile (on a GPU mode "reduce-overhead": torch's CUDA graphs);
    the output is copied before it is handed on, since the next replay overwrites it (the PNDM
    scheduler keeps earlier outputs)."""

    def __init__(self, unet: nn.Module):
        super().__init__(unet)
        cuda = unet.device.type == "cuda"
        self.compiled = torch.compile(unet, **compile_options("reduce-overhead" if cuda else None, fullgraph=True))

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **kwargs):
        if return_dict:                                   # (pipelines ask for a tuple)
            return self.part(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        out = self.compiled(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                            **kwargs)[0]
        return (out.clone(),)


class CompiledVAE(_Wrapped):
    """The VAE whose `decode` (what the pipeline calls once per batch of images) is compiled."""

    def __init__(self, vae: nn.Module):
        super().__init__(vae)
        self._decode = torch.compile(lambda z: vae.decode(z, return_dict=False)[0], **compile_options())

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        if return_dict:                                   # (pipelines ask for a tuple)
            return self.part.decode(z, return_dict=True)
        return (self._decode(z),)


# A decoder's wrapped SD parts per mode, kept so that graphs and compiled code are made once. Keyed weakly
# by the decoder (`diffusion.StableDiffusion`, which its model holds; the wrappers hold its parts, never
# the decoder or the model), so they go with it.
_pictures: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def fast_sd_parts(decoder, mode: str) -> tuple[nn.Module, nn.Module]:
    """The (VAE, UNet) of `decoder` (a `diffusion.StableDiffusion`) to build a pipeline from for
    `pictures=mode`. The UNet (and, compiled, the VAE) is switched to channels-last memory format on
    first use and stays so (same values, other rounding of the convolutions). With CPU offload
    (`decoder.offloaded`) the compiled mode falls back to "graph"."""
    check_modes("dynamic", mode)
    vae, unet, offload = decoder.vae, decoder.unet, decoder.offloaded
    if mode == "eager":
        return vae, unet
    if mode == "compiled" and offload:
        _fallback("pictures='compiled' with CPU offload: the UNet's weights move between calls, which "
                  "compiled CUDA graphs cannot follow; using pictures='graph' (one capture per call)")
        mode = "graph"
    if unet.device.type != "cuda" and mode == "graph":
        _fallback("pictures='graph' on the CPU: CUDA graphs need a CUDA GPU; the UNet runs channels-last "
                  "without one", logging.INFO)
    kept = _pictures.setdefault(decoder, {})
    if mode not in kept or kept[mode][1].part is not unet:
        unet.to(memory_format=torch.channels_last)
        if mode == "graph":
            kept[mode] = (vae, GraphedUNet(unet, offload=offload))
        elif COMPILE_VAE:
            vae.to(memory_format=torch.channels_last)
            kept[mode] = (CompiledVAE(vae), CompiledUNet(unet))
        else:
            kept[mode] = (vae, CompiledUNet(unet))
    if mode == "graph":
        kept[mode][1].check_all_weights = offload          # placement may have changed since
    return kept[mode]
