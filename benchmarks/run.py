"""Speed and memory of MiniGPT-5's code paths, measured as ratios in one run (issue #8).

    python benchmarks/run.py            # the full run (about 12 minutes on 2 CPU cores)
    python benchmarks/run.py --quick    # a short version (a few minutes)
    python benchmarks/run.py --dry_run  # a tiny workload, one repeat: checks the rows run and report (CI)
    python benchmarks/run.py --rows 1,3 # only some rows
    python benchmarks/run.py --rows 4,5 --device cuda --model_config weights/real_width/real_width.yaml \
        --out benchmarks/RESULTS_gpu.md     # the generation rows on a GPU, any preset

Every figure is a ratio of two things measured side by side in one process (or, for peak memory,
in two fresh child processes), so it means something on any machine; see `benchmarks/harness.py`
for the timing recipe (fixed threads, warm-up, alternating variants, >= 5 repeats, the median of the
per-repeat ratios).
Each row runs in a fresh process of its own, so that no row inherits another's memory state. The
model is the `small` preset (config/small.yaml, built on first use into weights/small/), big
enough that tensor compute rather than Python dominates. The rows:

 1. stage-1 training step time / the sum of its parts run alone          target <= 1.15
 2. batched `MiniGPT4.wrap_inputs` vs a release-style per-sample loop      target >= 5x faster
 3. stage-1 step with cached caption features vs recomputed every step   not slower, equal loss
 4. generating 8 prompts as one batch vs 8 single calls                  target >= 3x throughput
 5. `generate` / (bare KV-cached LLM decode + bare SD pipeline)          target <= 1.10
 6. stage-1 optimiser state bytes vs the release's design, real sizes     target <= 0.35
 7. CC3M index of 3.3 M rows (benchmarks/bench_cc3m_index.py)            target < 30 s, < 2 GB
 8. metric CLIP image features batched vs one image at a time            target >= 3x faster
 9. peak memory of generating 256 tokens vs keeping every layer's states  reported

The table is printed last and written, with the details of each row, to benchmarks/RESULTS.md
(`--out` to write elsewhere).
Rows 4 and 5 live in benchmarks/rows_generation.py; the workload and the model in benchmarks/harness.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")          # no progress bars inside timed code
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from baselines import adam_state_bytes, one_at_a_time_features, release_style_wrap  # noqa: E402
from harness import (Bench, Row, Settings, ensure_small, fmt_s, format_table, run_child, set_threads,  # noqa: E402
                     spread, timed)
from rows_generation import row_batched_generation, row_generate_overhead  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Row 1: a stage-1 step vs the sum of its parts
# ----------------------------------------------------------------------------------------------

def row_step_parts(bench: Bench) -> Row:
    """Stage-1 forward + backward of a batch of 8 CC3M samples, against its parts run alone on the
    same tensors: the LLM (forward + backward through every layer down to the embeddings, as the
    trainable voken rows need), the mapper, the UNet (forward + backward to its condition), the VAE
    encoder and the caption encoder. A ratio near 1 means the step does no work beyond its parts
    (no duplicated passes, no per-sample loops)."""
    import diffusion
    from constants import SNR_GAMMA

    model = bench.model(1).train()
    m = model.model
    batch = bench.cc3m_batch(8)
    with torch.no_grad():
        embeds, mask, labels = m.wrap_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], None)
        hidden, _, _ = m.forward_llm(embeds, mask, labels)
        features, sample = m.voken_features(hidden, labels)
        condition = model.map_vokens(features)
        latents = model.target_latents(batch, sample, batch["latent_noise"][sample])
    captions = [batch["captions"][i] for i in sample.tolist()]

    def step():
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    def llm():
        model.zero_grad(set_to_none=True)
        e = embeds.detach().requires_grad_()
        h, _, text_loss = m.forward_llm(e, mask, labels)
        f, _ = m.voken_features(h, labels)
        (text_loss + f.float().square().mean()).backward()

    def mapper():
        model.zero_grad(set_to_none=True)
        model.map_vokens(features.detach().requires_grad_()).square().mean().backward()

    def unet():
        c = condition.detach().requires_grad_()
        diffusion.denoising_loss(model.unet, model.noise_scheduler, latents, c, batch["noise"][sample],
                                 batch["timesteps"][sample], snr_gamma=SNR_GAMMA).backward()

    def vae():
        with torch.no_grad():
            model.target_latents(batch, sample, batch["latent_noise"][sample])

    def caption():
        model.encode_caption(captions)

    t = timed(bench.settings, {"step": step, "llm": llm, "mapper": mapper, "unet": unet, "vae": vae,
                                "caption": caption})
    names = ["llm", "mapper", "unet", "vae", "caption"]
    stats = t.ratio("step", *names)
    ratio = stats[0]
    model.zero_grad(set_to_none=True)
    return Row(1, "stage-1 step time / sum of its parts alone (batch 8)", "<= 1.15", f"{ratio:.3f}", ratio <= 1.15,
               [f"ratio {spread(stats)}; medians: step (forward + backward) {fmt_s(t['step'])}; parts: " +
                ", ".join(f"{k} {fmt_s(t[k])}" for k in names) + f"; sum {fmt_s(sum(t[k] for k in names))}",
                f"batch: 8 CC3M training samples (sample file, real dataset + collator), "
                f"{tuple(batch['input_ids'].shape)} token ids, 64 x 64 target images, caption loss on"])


# ----------------------------------------------------------------------------------------------
# Row 2: batched input wrapping vs a release-style loop
# ----------------------------------------------------------------------------------------------

def row_wrap(bench: Bench) -> Row:
    """`wrap_inputs` on 16 VIST training samples (0-5 input images each) vs the release-style
    loop (`baselines.release_style_wrap`), with gradients enabled as in training (the voken rows
    are trainable)."""
    from collator import Collator

    model = bench.model(1).train()
    m = model.model
    items = bench.vist_items(train=True)[:16]
    batch = Collator(m.llama_tokenizer)(items)
    n_images = int((batch["input_ids"] == m.image_token_id).sum())
    g = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(n_images, bench.config.num_query_token, m.llama_model.config.hidden_size, generator=g)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], image_embeds)
    ours, theirs = m.wrap_inputs(*args), release_style_wrap(m, *args)
    same = all(torch.equal(a, b) for a, b in zip(ours, theirs))
    calls = 20                                   # per timed sample: one call takes about a millisecond

    def repeat(fn):
        return lambda: [fn() for _ in range(calls)]

    t = timed(bench.settings, {"batched": repeat(lambda: m.wrap_inputs(*args)),
                                "loop": repeat(lambda: release_style_wrap(m, *args))})
    stats = t.ratio("loop", "batched")
    speedup = stats[0]
    return Row(2, "batched `wrap_inputs` vs per-sample loop (batch 16)", ">= 5x faster", f"{speedup:.1f}x faster",
               speedup >= 5 and same,
               [f"speed-up {spread(stats, 1)}; medians per call: batched {fmt_s(t['batched'] / calls)}, "
                f"release-style loop {fmt_s(t['loop'] / calls)} (each timed sample is {calls} calls); outputs "
                f"identical: {same}",
                f"batch: 16 VIST training samples, {n_images} images x {bench.config.num_query_token} queries, "
                f"{tuple(batch['input_ids'].shape)} token ids -> {tuple(ours[0].shape)} embeddings"])


# ----------------------------------------------------------------------------------------------
# Row 3: cached caption features
# ----------------------------------------------------------------------------------------------

def row_caption_cache(bench: Bench) -> Row:
    """A stage-1 step (forward + backward) with `cache_caption_features` on (cache warm: every
    caption seen before, as from the second epoch on) vs off. Random draws come from the same
    seeded generator, CFG dropout included, so both compute the same loss."""
    import diffusion

    model = bench.model(1).train()
    batch = bench.cc3m_batch(8)
    batch.pop("cfg_drop")                        # let CFG dropout draw: the empty caption is cached too

    cache = diffusion.CaptionCache()

    def step(cached: bool, seed: int = 0) -> dict:
        model.caption_cache = cache if cached else None
        model.zero_grad(set_to_none=True)
        losses = model(batch, generator=torch.Generator().manual_seed(seed))
        losses["loss"].backward()
        return {k: float(v) for k, v in losses.items()}

    differences = []
    for seed in range(4):                        # CFG dropout draws "" in some (see the cache entries)
        live, cached = step(False, seed), step(True, seed)
        differences.append(max(abs(live[k] - cached[k]) for k in live))
    entries = len(cache.entries)
    t = timed(bench.settings, {"cached": lambda: step(True), "live": lambda: step(False)})
    model.caption_cache = None
    stats = t.ratio("cached", "live")
    ratio = stats[0]
    equal = max(differences) <= 1e-6 * max(1.0, abs(live["loss"]))
    return Row(3, "stage-1 step with cached caption features / recomputed (batch 8)", "<= 1 (not slower), equal loss",
               f"{ratio:.3f} (loss diff {max(differences):.1e})", ratio <= 1.0 and equal,
               [f"ratio {spread(stats)}; medians: cached {fmt_s(t['cached'])}, recomputed {fmt_s(t['live'])}; "
                f"{entries} cache entries after 4 steps",
                f"largest |loss difference| over 4 seeded steps (every loss term): {max(differences):.2e}"])


# ----------------------------------------------------------------------------------------------
# Row 6: optimiser state at real sizes
# ----------------------------------------------------------------------------------------------

def row_optimizer_state(bench: Bench) -> Row:
    """Stage-1 AdamW state at real sizes (config/minigpt4.yaml with the architecture-only folders,
    built on the meta device) vs the release's design, where the whole input embedding and lm_head
    matrices (float32) are trainable instead of their 9 new rows. The formula is checked against a
    real AdamW step on the small preset."""
    from configuration import load_config
    from minigpt4 import split_row_modules
    from model import MiniGPT5_Model

    cfg = load_config(REPO / "config" / "minigpt4.yaml", check_paths=False).replace(
        llama_model=str(REPO / "config" / "arch" / "vicuna-7b"),
        sd_model=str(REPO / "config" / "arch" / "stable-diffusion-2-1-base"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = MiniGPT5_Model(cfg, stage=1, device="meta")
    ours = [p for p in real.parameters() if p.requires_grad]
    split = split_row_modules(real.model.llama_model)
    # The release: the same trainable set, but each split matrix trainable as a whole (float32).
    release = [p for p in ours if not any(p is m.new_weight for m in split)]
    release += [torch.empty(m.num_old + m.new_weight.shape[0], m.new_weight.shape[1], device="meta") for m in split]
    ours_bytes, release_bytes = adam_state_bytes(ours), adam_state_bytes(release)
    ratio = ours_bytes / release_bytes
    check = _check_state_formula(bench)
    gib = 2 ** 30
    return Row(6, "stage-1 optimiser state bytes / release design (real sizes, meta)", "<= 0.35",
               f"{ratio:.4f}", ratio <= 0.35,
               [f"ours: {sum(p.numel() for p in ours):,} trainable values -> {ours_bytes:,} B "
                f"({ours_bytes / gib:.3f} GiB) of AdamW state; release: {sum(p.numel() for p in release):,} "
                f"-> {release_bytes:,} B ({release_bytes / gib:.3f} GiB); exact ratio {ours_bytes}/{release_bytes} "
                f"= {ratio:.6f}",
                "gradients shrink by the same factor; the frozen 32 000 old rows are stored once, as before",
                check])


def _check_state_formula(bench: Bench) -> str:
    """One real AdamW step of `configure_optimizers` on the small preset: the state it allocates
    must equal `adam_state_bytes` of the trainable parameters."""
    from model import MiniGPT5_Model

    model = MiniGPT5_Model(bench.config, stage=1).train()      # a copy: the step changes its weights
    batch = bench.cc3m_batch(2)
    optimizer = model.configure_optimizers()["optimizer"]
    model.zero_grad(set_to_none=True)
    model(batch)["loss"].backward()
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t))
    predicted = adam_state_bytes([p for p in model.parameters() if p.requires_grad])
    return (f"check on the small preset: a real AdamW step allocated {measured:,} B of state, the formula "
            f"gives {predicted:,} B ({'equal' if measured == predicted else 'DIFFERENT'})")


# ----------------------------------------------------------------------------------------------
# Row 7: CC3M index
# ----------------------------------------------------------------------------------------------

def row_cc3m_index(bench: Bench) -> Row:
    """benchmarks/bench_cc3m_index.py in a subprocess (it writes a synthetic TSV and indexes it in
    a fresh child process, reporting seconds and peak RSS)."""
    rows = bench.settings.cc3m_rows
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cc3m_index.py"), "--rows", str(rows)],
                         capture_output=True, text=True, cwd=REPO, check=True)
    match = re.search(r"index: ([\d.]+) s, peak RSS (\d+) MiB \(of which imports (\d+) MiB\)", out.stdout)
    if match is None:
        raise RuntimeError(f"unexpected output of bench_cc3m_index.py:\n{out.stdout}\n{out.stderr[-2000:]}")
    seconds, peak, imports = float(match.group(1)), int(match.group(2)), int(match.group(3))
    full = rows == 3_300_000
    scale = "" if full else f" (--quick: {rows:,} rows, not 3.3 M; no verdict)"
    return Row(7, f"CC3M index of {rows / 1e6:.2g} M rows: time, peak RSS{scale}", "< 30 s, < 2 GB",
               f"{seconds:.1f} s, {peak} MiB", (seconds < 30 and peak < 2048) if full else None,
               [line for line in out.stdout.strip().splitlines()] + [f"peak RSS includes {imports} MiB of imports"])


# ----------------------------------------------------------------------------------------------
# Row 8: metric features
# ----------------------------------------------------------------------------------------------

WIDER_CLIP = {   # a ViT-B/16-shaped OpenCLIP, narrower and shallower (random weights)
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 256, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def _clip_models(config: dict | None):
    """`metric.tiny_models()` (config None) or a random OpenCLIP of the given config."""
    import open_clip

    import metric

    if config is None:
        models = metric.tiny_models(seed=0)
        models.clip.eval()
        return models
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_clip.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms("bench_clip")
    return metric.Models(clip=clip.eval(), clip_preprocess=preprocess)


def row_metric_features(bench: Bench) -> Row:
    """`metric.clip_image_features` (batches of 32) vs one image at a time, on 64 x 64 images (the
    small preset's output size): headline with `metric.tiny_models()`'s CLIP (config/tiny_clip.json),
    and, for comparison, a wider random OpenCLIP (WIDER_CLIP) whose per-image compute dominates."""
    import numpy as np
    from PIL import Image

    import metric

    rng = np.random.default_rng(0)
    n = bench.settings.clip_images
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]
    results = {}
    for name, config in (("tiny", None), ("wider", WIDER_CLIP)):
        models = _clip_models(config)
        diff = float((metric.clip_image_features(images, models, batch_size=32)
                      - one_at_a_time_features(images, models)).abs().max())
        t = timed(bench.settings, {"batched": lambda: metric.clip_image_features(images, models, batch_size=32),
                                    "single": lambda: one_at_a_time_features(images, models)})
        results[name] = (t.ratio("single", "batched")[0], t, diff)
    speedup, t, diff = results["tiny"]
    wider, t_wider, diff_wider = results["wider"]
    return Row(8, "metric CLIP image features batched vs one at a time (tiny CLIP)", ">= 3x faster",
               f"{speedup:.1f}x faster", speedup >= 3 and diff < 1e-5,
               [f"metric.tiny_models() CLIP (ViT 1 x 32, 32 px): batched {fmt_s(t['batched'])}, one at a time "
                f"{fmt_s(t['single'])} for {n} images; largest feature difference {diff:.1e}",
                f"wider random CLIP (ViT {WIDER_CLIP['vision_cfg']['layers']} x {WIDER_CLIP['vision_cfg']['width']}, "
                f"patch 16, 224 px): {wider:.2f}x (batched {fmt_s(t_wider['batched'])}, one at a time "
                f"{fmt_s(t_wider['single'])}; difference {diff_wider:.1e}) -- on 2 CPU cores a ViT of this size "
                f"is compute-bound already at one image, so batching saves only the per-call overhead; the "
                f"real metric (ViT-L-14 on a GPU) is in the tiny model's regime: one image leaves the device idle"])


# ----------------------------------------------------------------------------------------------
# Row 9: generation memory
# ----------------------------------------------------------------------------------------------

def row_generation_memory(bench: Bench) -> Row:
    """Peak RSS of `generate` over 256 forced new tokens, ours vs the release's approach
    (output_hidden_states=True, return_dict_in_generate=True), each in a fresh child process
    (benchmarks/bench_generate_memory.py)."""
    config = ensure_small()
    tokens = bench.settings.memory_new_tokens
    runs: dict[str, list[dict]] = {"ours": [], "release": []}
    for _ in range(bench.settings.memory_runs):          # alternating, a fresh process each
        for variant in runs:
            runs[variant].append(run_child([str(REPO / "benchmarks" / "bench_generate_memory.py"), "--variant",
                                            variant, "--config", str(config), "--tokens", str(tokens),
                                            "--threads", str(bench.settings.threads)]))
    # The run with the median peak of each variant.
    ours, release = (sorted(r, key=lambda x: x["peak_rss_mb"])[len(r) // 2] for r in runs.values())
    total = ours["peak_rss_mb"] / release["peak_rss_mb"]
    growth = ours["growth_mb"] / release["growth_mb"] if release["growth_mb"] > 0 else float("nan")
    decode = (ours["decode_growth_mb"] / release["decode_growth_mb"] if release["decode_growth_mb"] > 0
              else float("nan"))
    return Row(9, f"peak memory generating {tokens} tokens, ours / release's all-layer states", "report",
               f"{total:.3f} (growth above the model {growth:.2f})", None,
               [f"whole `generate` (decode + 5 SD steps): ours peak RSS {ours['peak_rss_mb']:.0f} MiB = loaded model "
                f"+ {ours['growth_mb']:.1f} MiB; release {release['peak_rss_mb']:.0f} MiB = loaded + "
                f"{release['growth_mb']:.1f} MiB (it kept {release['kept_states_mb']:.1f} MiB of hidden states: "
                f"{release['layers_kept']} layers x {release['positions']} positions x {release['hidden']} values)",
                f"language part only (up to the SD call): ours + {ours['decode_growth_mb']:.1f} MiB, release + "
                f"{release['decode_growth_mb']:.1f} MiB (ratio {decode:.2f})",
                f"median of {bench.settings.memory_runs} fresh processes per variant; peaks of all runs: ours "
                f"{[round(r['peak_rss_mb']) for r in runs['ours']]}, release "
                f"{[round(r['peak_rss_mb']) for r in runs['release']]} MiB",
                f"both generated {ours['new_tokens']} / {release['new_tokens']} tokens with the same seed; voken "
                f"feature checksums {ours['features_sum']:.6g} vs {release['features_sum']:.6g}",
                "at real sizes the kept states would be 33 x 4096 bf16 values = 264 KiB per position per item, "
                "i.e. ~70 MiB per item for a 256-token answer after a 16-position prompt"])


# ----------------------------------------------------------------------------------------------

DEVICE_ROWS = {4, 5}      # rows that run on --device; the others measure CPU code paths
ROWS = {1: row_step_parts, 2: row_wrap, 3: row_caption_cache, 4: row_batched_generation,
        5: row_generate_overhead, 6: row_optimizer_state, 7: row_cc3m_index, 8: row_metric_features,
        9: row_generation_memory}


# What the rows led to (measured once, when the changes were made; kept here so that every
# RESULTS.md carries it). "Before" = the project just before issue #8, run with this same script.
OPTIMISATIONS = """\
## What the benchmarks led to (before -> after)

Measured on the same 2-core machine with this script, "before" on the project as it was before
these changes, "after" right after them (two runs, each row in a fresh process; the machine is
shared, so single figures move by +-10 % from run to run -- compare ratios, not milliseconds).

| row | before | after | cause (profile) and fix |
|---|---|---|---|
| 2 | 2.2x (batched 4.3 ms, loop 9.6 ms) | 6.9x (1.5 ms, 10.2 ms) | torch profiler: 70 % of `wrap_inputs` in copies -- out-of-place `index_put` copied the (16, 369, 512) output twice, and `VokenEmbedding` looked every id of the padded (B, T) batch up in both the old and the new rows and picked with `torch.where`. Now only the real tokens (and BOS) are embedded, in one call, and written in place into the zero-padded output; `VokenEmbedding` looks ids up once and overwrites the few new-token rows. (A release-style loop with plain per-sample concatenation instead of the release's growing `torch.cat` measured 0.7x before the fix.) |
| 5 | 1.164 (--quick: 10 SD steps, 32 tokens); 1.050 full | 1.058-1.090 (--quick); 0.99 full | cProfile: `generate` ran a second forward pass over prompt + answer (`generation.voken_features`) to read the 8 voken states. A forward hook on the decoder (`decoding.VokenStateRecorder`) now keeps just those 8 last-layer states while decoding (the forward pass remains a fallback for an answer cut right after `[IMG6]`); the mapper makes the conditional and the unconditional embedding in one call. `test_voken_features_equal_a_plain_forward_pass` and tests/test_optimisations.py check the states. |
| 8 | 3.3x | 5.7x | with a small CLIP the batched path was dominated by per-image `ToTensor` + `Normalize` (a dozen small tensor ops per image). `extractors.preprocess_batch` runs the PIL steps (resize, crop) per image and `ToTensor` + `Normalize` once on the stacked batch: bit-identical pixels. |
| 9 | 0.994 (language part 0.92-0.99) | 0.993 (language part 0.95) | no second forward pass any more (row 5); at these sizes the release's kept states are only 2.8 MiB, within allocator noise. |
| 3 | -- | 0.92 | new: `MiniGPT5_Model(cache_caption_features=True)` (off by default). |
| 4 | 1.98x, 3/8 answers as single calls | 2.1x, 8/8 answers as single calls | speed: hardware-bound on 2 cores, see below (4.6x on an H200); answers: transformers' repetition penalty skipped padded rows' first tokens, see below. |
| 5 (GPU) | 1.198 on an H200 (real widths, --quick) | 1.113 | `VokenForcing` branched on `rows.any()`, a host sync every decoding step; now branch-free. transformers inspects each logits processor's signature every step: ours run as one `ProcessorChain`. |
| 9 (method) | every variant reported the parent's 1.6 GB | -- | `ru_maxrss` of a fork+exec child starts at the parent's resident size; the child now resets and reads VmHWM. |

**Row 4 (batched generation) misses 3x on this machine, before and after.** Timing the two halves
alone, batch vs single: the KV-cached LLM decode gains only 2.2-2.6x because its prefill runs 8 x 322
left-padded positions for 1403 real ones (prefill alone: 519 ms batched vs 289 ms for the 8 prompts
one by one), and the SD pipeline gains ~2x because on 2 CPU cores the UNet is compute-bound already
at batch 2 (small preset: 32 ms per UNet call at batch 2, 142 ms at batch 16, i.e. 16 vs 9 ms per
image; 40 % of it in oneDNN convolutions, channels-last changes nothing). Batching removes per-call
overhead and idle hardware, which a 2-core CPU at these sizes has little of. On a GPU, where one
prompt leaves most of the device idle, the same row at MiniGPT-5's real widths gives 4.4-4.6x
(benchmarks/RESULTS_gpu.md).

**Row 4 found a bug: batched answers were not those of single calls.** The first runs showed 5 of 8
items diverging after 32-84 tokens, which we first put down to float rounding. Logging the scores
each step showed a difference of 0.01-0.7 from the *second* generated token on, in every left-padded
row and never in the longest (unpadded) one: transformers 5 builds its repetition penalty with
`prompt_ignore_length` = each row's left-padding length, which with `inputs_embeds` (no prompt ids)
exempts a padded row's first generated tokens from the penalty. `generate` now adds its own
`RepetitionPenaltyLogitsProcessor` over all generated tokens (the release's behaviour); batched and
single calls give 8/8 identical answers over 96 tokens, and
`test_padded_rows_see_the_same_scores_as_single_calls` compares the sampler's scores step by step.
On a GPU in bfloat16 a batch and a single call still differ by kernel rounding (8e-2 in the logits),
which flips near-ties of a random model's flat distribution; with the LLM in float32 the GPU run gives
8/8 identical answers too (benchmarks/RESULTS_gpu.md).
"""


def write_results(path: Path, rows: list[Row], settings: Settings, seconds: float) -> None:
    """RESULTS.md: the setting, the table and each row's details."""
    cpu = platform.processor() or platform.machine()
    flags = (" --dry_run" if settings.dry_run else " --quick" if settings.quick else "")
    flags += f" --device {settings.device}" if settings.device != "cpu" else ""
    flags += f" --model_config {settings.model_config}" if settings.model_config else ""
    if settings.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name()} ({settings.device}) for the model rows"
    else:
        where = "No GPU"
    model = ("the `small` preset (config/small.yaml, config/small_arch.yaml; random weights): LLaMA 4 layers x 512 "
             "(8 heads, FFN 1376, ~521-token vocabulary incl. the 9 new rows), ViT 2 x 128 on 64 px + Q-Former 2 x 128 "
             "with 32 queries, mapper d_model 256 (2 + 2 layers, FFN 1024), SD with 64 x 64 images, VAE (32, 64, 64) "
             "-> 4 x 16 x 16 latents, UNet (64, 128, 256) channels, text encoder 4 x 256; all float32."
             if not settings.model_config else f"{settings.model_config} (see the comments at the top of the preset's "
             f"config/*.yaml for its sizes).")
    lines = [
        "# Benchmark results",
        "",
        f"`python benchmarks/run.py{flags}` — {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {settings.threads} torch threads, "
        f"{settings.repeats} alternating repeats (row 4: 5) after {settings.warmup} warm-up, figures are medians of "
        f"the per-repeat ratios; each row in a fresh process; run took "
        f"{seconds / 60:.1f} min. {where}: every figure is a ratio of two things measured in this run.",
        "",
        f"Model: {model}",
        "",
        format_table(rows),
        "",
        "## Details",
        "",
    ]
    for row in sorted(rows, key=lambda r: r.number):
        lines.append(f"**{row.number}. {row.what}** — {row.value} (target {row.target}: {row.verdict})")
        lines.append("")
        lines += [f"- {d}" for d in row.details]
        lines.append("")
    path.write_text("\n".join(lines) + "\n" + (OPTIMISATIONS if path.name == "RESULTS.md" else ""))


def run_row_in_child(number: int, settings: Settings) -> Row:
    """Run one row in a fresh Python process (`run.py --child N`) and return its `Row`.

    One process per row keeps the rows independent of each other: a row that ran before would
    otherwise leave the allocator in a state that changes the next row's timings (after a training
    row, glibc hands freed memory back to the system and every large tensor of the next row pays
    its page faults again: `wrap_inputs` measured 1.1 ms in a fresh process, 3.6 ms after row 1)."""
    args = [str(Path(__file__).resolve()), "--child", str(number), "--threads", str(settings.threads),
            "--repeats", str(settings.repeats), "--device", settings.device] + (["--quick"] if settings.quick else [])
    args += ["--dry_run"] if settings.dry_run else []
    if settings.model_config:
        args += ["--model_config", settings.model_config]
    return Row(**run_child(args))


def main(argv: list[str] | None = None) -> None:
    """Run the selected rows (each in its own process), print the table last, write RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version (smaller workloads, 5 repeats)")
    parser.add_argument("--dry_run", action="store_true",
                        help="tiny workload, one repeat: checks that the rows run and write their report (the "
                             "figures mean nothing; no verdicts)")
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9", help="comma-separated row numbers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (>= 5)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--device", default="cpu", help=f"device of rows {sorted(DEVICE_ROWS)} (e.g. cuda); "
                                                        "the other rows are CPU benchmarks")
    parser.add_argument("--model_config", default=None,
                        help="model config YAML of the model rows (default: the small preset, built on first use)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)   # internal: one row
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    settings = Settings.make(args.quick, args.threads, args.repeats, args.device,
                             str(Path(args.model_config).resolve()) if args.model_config else None, args.dry_run)
    numbers = [args.child] if args.child is not None else sorted(int(n) for n in args.rows.split(","))
    if unknown := [n for n in numbers if n not in ROWS]:
        parser.error(f"--rows: no row {unknown}; the rows are {sorted(ROWS)}")
    if args.device != "cpu" and (cpu_only := [n for n in numbers if n not in DEVICE_ROWS]):
        parser.error(f"--device {args.device}: rows {cpu_only} are CPU benchmarks; only rows {sorted(DEVICE_ROWS)} "
                     f"run on another device (e.g. --rows 4,5)")
    if args.model_config and not Path(args.model_config).is_file():
        parser.error(f"--model_config {args.model_config!r}: no such file")
    if args.child is not None:
        set_threads(settings.threads)
        row = ROWS[args.child](Bench(settings))
        if settings.dry_run:
            row = dataclasses.replace(row, ok=None, details=["dry run (--dry_run): tiny workload, one repeat; it "
                                                             "shows the row runs, its figures mean nothing"] + row.details)
        print(json.dumps(dataclasses.asdict(row)))
        return
    if not args.model_config:
        ensure_small()                           # build the weights once, before the rows
    start = time.perf_counter()
    rows = []
    for number in numbers:
        t = time.perf_counter()
        row = run_row_in_child(number, settings)
        print(f"row {number}: {row.value} (target {row.target}: {row.verdict}) [{time.perf_counter() - t:.0f} s]",
              flush=True)
        for detail in row.details:
            print(f"    {detail}", flush=True)
        rows.append(row)
    seconds = time.perf_counter() - start
    write_results(args.out, rows, settings, seconds)
    print(f"\nwrote {args.out} ({seconds / 60:.1f} min)\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
