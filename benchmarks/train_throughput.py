"""Training throughput on one device: steady-state samples/s and MFU of stage 1 and stage 2.

    python benchmarks/train_throughput.py --model_config weights/full/full.yaml --stage 1 --batch 16
    python benchmarks/train_throughput.py --dry_run            # the tiny preset on the CPU: checks that it runs

One training step is what Lightning runs for `train_eval.py --is_training True` (precision
bf16-mixed on a GPU): `MiniGPT5_Model.forward` under autocast (the losses of the release), backward,
the model's own optimiser (`configure_optimizers`: AdamW, two learning rates, at the schedule's first
value: 0 in warm-up, so the optimiser does all its work but every variant sees the same weights) and
`zero_grad`. The
batch is `--batch` samples of the repository's sample data (datasets/CC3M for stage 1, datasets/VIST
for stage 2: generation, multimodal and understanding samples with their input images), through the
real dataset and collator, moved to the device once: data loading is not measured (Lightning's
workers overlap it with the steps). `--warmup` steps are run first and not counted; then `--steps`
steps are timed one by one (synchronised), and the figure is the batch size over the median step.

Variants (`--variants`), each on the same model and batch, each with a fresh optimiser:
  release          the release's step: the ViT / Q-Former, the VAE encoder and SD's text encoder run
                   every step; AdamW as `configure_optimizers` makes it
  fused_adamw      AdamW(fused=True): one kernel for the whole update instead of a loop over tensors
  cached_features  the VAE moments of the target images and the input images' LLM-space embeddings
                   computed once (what PREPROCESS_FEATURE_FOLDER holds), so no VAE encoder / ViT per step
  cached_captions  SD's text-encoder output of each caption kept (`cache_caption_features`), stage 1
  all              the three together
Per variant: samples/s, the median and spread of the step, peak GPU memory, FLOPs of the variant's
step (torch.utils.flop_counter: matrix products, convolutions and attention, forward and backward) and the
MFU: those FLOPs per second over the card's dense bf16 peak (`--peak_tflops`, default from the
device name; the datasheet figure, as MFU is usually quoted). For the release variant, the parts
alone on the same tensors (forward, and backward where the step backpropagates through them): ViT +
Q-Former, LLM, mapper, UNet, VAE encoder, caption encoder, optimiser; their sum against the step.
Prints one JSON line per (stage, variant) and writes a Markdown table to `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

VARIANTS = ("release", "fused_adamw", "cached_features", "cached_captions", "all")
# Dense bf16 matrix throughput from the vendors' data sheets, TFLOP/s (no sparsity), keyed by a part of
# the name `torch.cuda.get_device_name` gives. KINDS.md of the lending workplace measured 769-798 on an H200.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "A6000": 154.8, "L40S": 362.0, "RTX 4090": 165.2}
DATA = {1: REPO / "datasets" / "CC3M" / "cc3m_train.tsv", 2: REPO / "datasets" / "VIST" / "train_cleaned.json"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(config: str, stage: int, device: torch.device):
    from configuration import load_config
    from model import MiniGPT5_Model

    torch.manual_seed(0)
    cfg = load_config(config)
    model = MiniGPT5_Model(cfg, stage=stage, device=device)
    return model.train()


def build_batch(model, stage: int, batch_size: int, device: torch.device) -> dict:
    """`batch_size` samples of the sample data through the real dataset and collator, on `device`,
    with the forward pass's random draws pinned (noise, timesteps, latent noise; no CFG dropout)."""
    from collator import Collator
    from dataloader import make_dataset

    tok = model.model.llama_tokenizer
    ds = make_dataset(DATA[stage], tok, model.cfg, is_training=True, feature_folder=False)
    items = [ds[i % len(ds)] for i in range(batch_size)]
    batch = Collator(tok)(items)
    unet = model.unet.config
    latent = (unet.in_channels, unet.sample_size, unet.sample_size)
    g = torch.Generator().manual_seed(0)
    batch.update(noise=torch.randn(batch_size, *latent, generator=g),
                 latent_noise=torch.randn(batch_size, *latent, generator=g),
                 timesteps=torch.randint(0, 1000, (batch_size,), generator=g),
                 cfg_drop=torch.zeros(batch_size, dtype=torch.bool))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_optimizer(model, fused: bool) -> torch.optim.Optimizer:
    """The model's own AdamW (its parameter groups and settings), optionally fused."""
    made = model.configure_optimizers()["optimizer"]
    if not fused:
        return made
    groups = [{k: v for k, v in g.items() if k != "initial_lr"} for g in made.param_groups]
    return torch.optim.AdamW(groups, lr=made.defaults["lr"], eps=made.defaults["eps"],
                             weight_decay=made.defaults["weight_decay"], fused=True)


def with_cached_features(model, batch: dict) -> dict:
    """The batch with the VAE moments of its target images and its input images' LLM-space
    embeddings computed once (as PREPROCESS_FEATURE_FOLDER provides them)."""
    import diffusion

    cached = dict(batch)
    with torch.no_grad(), _autocast(batch["input_ids"].device, "bf16-mixed" if batch["input_ids"].is_cuda else "32"):
        cached["output_image_features"] = diffusion.vae_moments(model.vae, batch["output_images"])
        images = batch.get("input_images")
        cached["input_image_features"] = (model.model.encode_img(images)[0]
                                          if images is not None and images.shape[0] else None)
    return cached


def train_step(model, batch: dict, optimizer, precision: str, step: int) -> float:
    device = batch["input_ids"].device
    generator = torch.Generator(device=device).manual_seed(step)
    with _autocast(device, precision):
        loss = model(batch, generator=generator)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_flops(model, batch: dict, precision: str) -> int:
    """FLOPs of one forward + backward (torch's flop counter: matrix products, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    device = batch["input_ids"].device
    with counter:                                   # (entering the counter again would reset it)
        with _autocast(device, precision):
            loss = model(batch, generator=torch.Generator(device=device).manual_seed(0))["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def part_times(model, batch: dict, optimizer, precision: str, repeats: int) -> dict[str, float]:
    """Median seconds of each part of a step run alone on the step's own tensors (see the docstring)."""
    import diffusion
    from constants import SNR_GAMMA

    device = batch["input_ids"].device
    m = model.model
    with torch.no_grad(), _autocast(device, precision):
        images = batch.get("input_images")
        image_embeds = m.encode_img(images)[0] if images is not None and images.shape[0] else None
        embeds, mask, labels = m.wrap_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                             image_embeds)
        hidden, _, _ = m.forward_llm(embeds, mask, labels)
        features, sample = m.voken_features(hidden, labels)
        condition = model.map_vokens(features) if features.shape[0] else None
        latents = model.target_latents(batch, sample, batch["latent_noise"][sample]) if features.shape[0] else None
    captions = batch.get("captions") or []
    chosen = [captions[i] for i in sample.tolist()] if captions and all(c is not None for c in captions) else []

    def llm():
        e = embeds.detach().requires_grad_()
        h, _, text_loss = m.forward_llm(e, mask, labels)
        f, _ = m.voken_features(h, labels)
        (text_loss + f.float().square().mean()).backward()

    parts = {"LLM (forward + backward)": llm}
    if image_embeds is not None:
        parts["ViT + Q-Former (forward)"] = lambda: m.encode_img(images)
    if condition is not None:
        parts["mapper (forward + backward)"] = lambda: model.map_vokens(
            features.detach().requires_grad_()).square().mean().backward()
        parts["UNet (forward + backward to the condition)"] = lambda: diffusion.denoising_loss(
            model.unet, model.noise_scheduler, latents, condition.detach().requires_grad_(), batch["noise"][sample],
            batch["timesteps"][sample], snr_gamma=SNR_GAMMA).backward()
        parts["VAE encoder (forward)"] = lambda: model.target_latents(batch, sample, batch["latent_noise"][sample])
    if chosen:
        parts["caption encoder (forward)"] = lambda: model.encode_caption(chosen)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats + 1):                       # the first round is a warm-up
        for name, fn in parts.items():
            _sync(device)
            start = time.perf_counter()
            grad = name.endswith("backward)") or name.endswith("condition)")
            with torch.set_grad_enabled(grad), _autocast(device, precision):
                fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=False)
    # The optimiser alone: after a real backward, so every trainable tensor has its gradient.
    with _autocast(device, precision):
        model(batch, generator=torch.Generator(device=device).manual_seed(0))["loss"].backward()
    opt = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        opt.append(time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    result = {name: statistics.median(t[1:]) for name, t in times.items()}
    result["optimiser step"] = statistics.median(opt[1:])
    return result


def attention_kinds(model) -> dict[str, str]:
    """Which attention each part runs (SDPA everywhere is one of the checks)."""
    m = model.model
    processors = {type(p).__name__ for p in model.unet.attn_processors.values()}
    return {"LLM": m.llama_model.config._attn_implementation,
            "ViT": m.visual_encoder.config._attn_implementation,
            "Q-Former": m.Qformer.config._attn_implementation,
            "UNet": ", ".join(sorted(processors)),
            "mapper": "torch.nn.Transformer (SDPA inside nn.MultiheadAttention)"}


def measure_stage(args: argparse.Namespace, stage: int) -> list[dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    model = build_model(args.model_config, stage, device)
    load_s = time.perf_counter() - start
    batch = build_batch(model, stage, args.batch, device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = []
    for variant in args.variants:
        if variant == "cached_captions" and stage == 2:
            continue                                   # no captions in stage 2 (VIST)
        fused = variant in ("fused_adamw", "all")
        cached = variant in ("cached_features", "all")
        model.caption_cache = None
        if variant in ("cached_captions", "all") and stage == 1:
            import diffusion

            model.caption_cache = diffusion.CaptionCache(None)
        data = with_cached_features(model, batch) if cached else batch
        optimizer = make_optimizer(model, fused)
        for i in range(args.warmup):
            train_step(model, data, optimizer, args.precision, i)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for i in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            losses.append(train_step(model, data, optimizer, args.precision, args.warmup + i))
            _sync(device)
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        result = {"stage": stage, "variant": variant, "device": name, "batch": args.batch, "precision": args.precision,
                  "load_s": load_s, "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times),
                  "samples_per_s": args.batch / step_s, "final_loss": losses[-1],
                  "peak_allocated": torch.cuda.max_memory_allocated(device) if cuda else None,
                  "trainable_parameters": model.num_trainable_parameters(), "peak_tflops": peak}
        flops = step_flops(model, data, args.precision)          # this variant's own step
        result["step_flops"] = flops
        result["mfu"] = flops / step_s / (peak * 1e12) if peak else None
        if variant == "release" and not args.no_parts:
            result["part_s"] = part_times(model, data, optimizer, args.precision, args.part_repeats)
            result["attention"] = attention_kinds(model)
        results.append(result)
        print(json.dumps(result), flush=True)
        del optimizer
    return results


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    device = results[0]["device"] if results else "?"
    lines = [f"## Training throughput on {device} (`benchmarks/train_throughput.py`, measured)", "",
             f"Model config `{args.model_config}`; batch {args.batch}, precision {args.precision}; {args.warmup} warm-up "
             f"steps, then the median of {args.steps} timed steps (forward + backward + optimiser); data loading not "
             "included. MFU: the step's FLOPs (torch's flop counter) per second over the card's dense bf16 "
             "datasheet peak.", "",
             "| stage | variant | samples/s | step (min-max) | MFU | peak memory | TFLOP / step |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "-" if r["peak_allocated"] is None else f"{r['peak_allocated'] / 2**30:.1f} GiB"
        lines.append(f"| {r['stage']} | {r['variant']} | **{r['samples_per_s']:.1f}** | {r['step_s'] * 1e3:.0f} ms "
                     f"({r['step_s_min'] * 1e3:.0f}-{r['step_s_max'] * 1e3:.0f}) | {mfu} | {mem} | "
                     f"{r['step_flops'] / 1e12:.3g} |")
    for r in results:
        if "part_s" in r:
            parts = "; ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["part_s"].items())
            total = sum(r["part_s"].values())
            lines += ["", f"Stage {r['stage']}, the parts of a release step alone: {parts}; sum {total * 1e3:.0f} ms "
                          f"against the step's {r['step_s'] * 1e3:.0f} ms. Attention: " +
                      ", ".join(f"{k} {v}" for k, v in r["attention"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=None, help="default: weights/full/full.yaml (the tiny preset "
                                                               "with --dry_run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stages", default="1,2", help="comma-separated: 1, 2 (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", default=None, choices=["bf16-mixed", "32"],
                        help="default: bf16-mixed on a GPU (train_eval.py's default there), 32 on the CPU")
    parser.add_argument("--variants", default="release,all", help="comma-separated, from " + ", ".join(VARIANTS))
    parser.add_argument("--part_repeats", type=int, default=3)
    parser.add_argument("--no_parts", action="store_true", help="skip the parts-alone timing")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--out", default=None, help="Markdown table (default: print only)")
    parser.add_argument("--dry_run", action="store_true",
                        help="the tiny preset on the CPU, batch 2, 1 warm-up and 2 steps: checks that everything runs; "
                             "the figures mean nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        from presets import ensure_tiny

        args.model_config = args.model_config or str(ensure_tiny())
        args.device, args.batch, args.warmup, args.steps, args.part_repeats = "cpu", 2, 1, 2, 1
    args.model_config = args.model_config or str(REPO / "weights" / "full" / "full.yaml")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    if any(s not in (1, 2) for s in stages):
        parser.error(f"--stages: 1 and/or 2, got {args.stages!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is available here; use --dry_run (or --device cpu)")
    if not Path(args.model_config).is_file():
        sys.exit(f"error: --model_config {args.model_config} does not exist (build the full preset with "
                 f"`python weights.py preset full weights/full`)")
    args.precision = args.precision or ("bf16-mixed" if args.device.startswith("cuda") else "32")
    results = [r for stage in stages for r in measure_stage(args, stage)]
    text = markdown(results, args)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
