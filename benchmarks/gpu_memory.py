"""GPU memory and speed of one story turn at full size, in the configurations a smaller GPU needs and
in the speed modes of fast_inference.py; optionally training throughput; the issue's targets judged.

    python benchmarks/gpu_memory.py                      # on a GPU machine: everything, in one run
    python benchmarks/gpu_memory.py --quick --train      # a short lease (scripts/gpu_bench.sh runs this)
    python benchmarks/gpu_memory.py --arithmetic         # no GPU: the expected numbers from the meta device
    python benchmarks/gpu_memory.py --dry_run            # the tiny preset on the CPU: checks that it all runs

One story turn is the playground's prompt (a two-image story), `--new_tokens` (64) generated tokens
with the vokens forced and the stop string and end token off in every mode (so every mode decodes
the same number of tokens and the modes can be compared token for token), and one picture from
`--steps` (50) PNDM steps with classifier-free guidance at 512 x 512.

Measuring (the default): builds the `full` preset into `--preset_dir` with the same command as on any
machine (`python weights.py preset full DIR`) unless it is there already, then runs each configuration
(`--configs`: bf16, 8bit, 4bit, 4bit+offload; also 8bit+offload) in a fresh process: load with
`MiniGPT5_Model.from_weights(device=..., llm_quantization=..., offload=...)`, then per mode
(`--modes`: release = transformers' generate and the eager SD pipeline, the release's path; graph =
the static-cache decode step and the UNet from CUDA graphs; compiled = both also compiled) a warm-up
turn (which captures / compiles; its seconds are reported) and the measured turn. Reports per
configuration and mode the peak GPU memory (`torch.cuda.max_memory_allocated`, and reserved; on the
CPU, the process's peak resident memory), the seconds of loading, of the turn and of its phases
(prompt, prefill, decode, pictures: each synchronised), the time per decoded token against the
memory-bandwidth floor (bytes of weights read per token / the GPU's bandwidth), SD's seconds per
image, and whether the tokens and the picture equal the release mode's. For bf16 also: one turn with
DPM-Solver++ (`--dpm_steps`, 20) in the fastest mode, reported apart; the plain libraries on the same
weights (transformers `generate`, eager; the diffusers pipeline, eager and with the UNet compiled as
the issue measured it). `--train` adds benchmarks/train_throughput.py (stages 1 and 2). Writes a
Markdown table and the targets' verdicts to `--out` (default benchmarks/RESULTS_gpu_full.md; rewritten
after each part, so a run cut short keeps what it measured) and one JSON line per result to stdout.

`--arithmetic` writes what the meta device says instead (no GPU, no weights): the bytes of each part
in each configuration, what sits on the GPU at the peak of a turn, estimates of activations and the
KV cache, the bandwidth floors of a few GPUs, and each decoder family's weights (decoder_memory.py).
It is arithmetic, not a measurement.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import torch  # noqa: E402

# The meta-device arithmetic (--arithmetic) and the names it shares with the measurements.
from memory_arithmetic import (BANDWIDTH_GBS, CONFIGS, FULL_LLMS, GB, activation_estimates,  # noqa: E402,F401
                               arithmetic, config_rows, part_bytes)


# ---------------------------------------------------------------------------------------------
# Measuring one configuration (a fresh process each)
# ---------------------------------------------------------------------------------------------

# How a turn runs: generate's `decode` and `pictures` options (fast_inference.py). "release" is the
# release's path (transformers' generate, the eager SD pipeline); "graph" captures the decode step and
# the UNet in CUDA graphs; "compiled" also compiles them (and the VAE decoder) with torch.compile.
MODES = {"release": ("dynamic", "eager"), "graph": ("static", "graph"), "compiled": ("compiled", "compiled")}
FULL_MODES = {"bf16": "release,graph,compiled", "8bit": "release,graph", "8bit+offload": "release,graph",
              "4bit": "release,graph,compiled", "4bit+offload": "release,graph"}
QUICK_CONFIGS, QUICK_MODES = "bf16,4bit+offload", {"bf16": "release,graph,compiled", "4bit+offload": "release,graph"}


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class PhaseClock:
    """Seconds of the phases of a turn (synchronised before and after each), by wrapping the
    functions `generate` calls: the prompt (ViT + wrapping), the decode (and inside it the prefill),
    the pictures (mapper + SD). Works the same whether or not the decode step is a graph replay."""

    def __init__(self, sync):
        self.sync, self.seconds = sync, {}

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            clock.sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.sync()
                clock.seconds[phase] = clock.seconds.get(phase, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


def _first_call_seconds(module: torch.nn.Module, sync) -> dict:
    """Time the next forward call of `module` (synchronised), then stop timing: the release path's
    prefill (its decode steps are left unsynchronised, as generate runs them)."""
    out: dict = {}

    def before(*_):
        sync()
        out["start"] = time.perf_counter()

    def after(*_):
        sync()
        out["seconds"] = time.perf_counter() - out.pop("start")
        pre.remove(), post.remove()

    pre, post = module.register_forward_pre_hook(before), module.register_forward_hook(after)
    return out


def _pixels_differ(a, b) -> int | None:
    import numpy as np

    if a is None or b is None:
        return None
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def measure_one(args: argparse.Namespace) -> None:
    """One configuration in this process: load, then each mode of `args.modes` (a warm-up turn that
    also captures / compiles, then the measured turn), then the plain-library baselines. Prints one
    JSON line per result as soon as it is measured (a run cut short keeps what it printed)."""
    from PIL import Image

    import diffusion
    import fast_inference
    import generation
    from model import MiniGPT5_Model
    from playground import DEFAULT_CAPTIONS, DEFAULT_IMAGES, story_prompt

    fast_inference.COMPILE_BACKEND = args.compile_backend
    fast_inference.COMPILE_VAE = not args.no_vae_compile
    quantization, offload = CONFIGS[args.one]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    card = torch.cuda.get_device_name(device) if cuda else "CPU"
    start = time.perf_counter()
    model = MiniGPT5_Model.from_weights(args.model_config, device=device, llm_quantization=quantization,
                                        offload=offload)
    sync()
    load = {"load_s": time.perf_counter() - start,
            "loaded_bytes": torch.cuda.memory_allocated(device) if cuda else _peak_rss()}
    m = model.model
    decoder = m.llm_parts()[0]

    # Exactly `new_tokens` tokens in every mode, with the sampling untouched (so the modes can be
    # compared token for token): no stop string, no end-of-sequence stop.
    llm = m.llama_model
    original_generate = llm.generate

    def no_stops(*a, generation_config, **kw):
        config = copy.deepcopy(generation_config)
        config.stop_strings, config.eos_token_id = None, None
        return original_generate(*a, generation_config=config, **kw)

    llm.generate = no_stops
    original_init = fast_inference.StaticDecoder.__init__

    def init_without_stops(self, *a, **kw):
        original_init(self, *a, **kw)
        self.stops = []

    fast_inference.StaticDecoder.__init__ = init_without_stops
    clock = PhaseClock(sync)
    clock.wrap(generation, "prompt_embeddings", "prompt")
    clock.wrap(generation, "decode_tokens", "decode")
    clock.wrap(fast_inference, "decode_tokens_static", "decode")
    clock.wrap(fast_inference.StaticDecoder, "prefill", "prefill")
    clock.wrap(generation, "images_from_features", "pictures")

    images = []
    for path in DEFAULT_IMAGES:
        with Image.open(path) as f:
            images.append(f.convert("RGB"))
    prompt = story_prompt(DEFAULT_CAPTIONS)
    kwargs = {"seed": 0, "force_generation": True}
    reference = None

    def turn(mode: str, decode: str, pictures: str, scheduler: str = "pndm", steps: int | None = None) -> dict:
        steps = steps or args.steps
        # Warm-up: the release path with a short turn; the fast modes with the measured lengths (their
        # static cache and graphs are keyed by them) and a few SD steps (the UNet's graphs by shapes).
        warm_tokens = 9 if decode == "dynamic" else args.new_tokens
        sync()
        t0 = time.perf_counter()
        model.generate([prompt], [images], max_new_tokens=warm_tokens, num_inference_steps=3, scheduler=scheduler,
                       decode=decode, pictures=pictures, **kwargs)
        sync()
        warmup_s = time.perf_counter() - t0
        clock.seconds.clear()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        prefill = _first_call_seconds(decoder, sync) if decode == "dynamic" else None
        sync()
        t0 = time.perf_counter()
        out = model.generate([prompt], [images], max_new_tokens=args.new_tokens, num_inference_steps=steps,
                             scheduler=scheduler, decode=decode, pictures=pictures, **kwargs)[0]
        sync()
        turn_s = time.perf_counter() - t0
        if prefill is not None:
            clock.seconds["prefill"] = prefill.get("seconds", 0.0)
        n = len(out.token_ids)
        parts = dict(clock.seconds)
        result = {
            "config": args.one, "mode": mode, "decode": decode, "pictures": pictures, "scheduler": scheduler,
            "steps": steps, "device": card, **load, "warmup_s": warmup_s, "turn_s": turn_s, "part_s": parts,
            "new_tokens": n, "decode_s_per_token": (parts.get("decode", 0.0) - parts.get("prefill", 0.0)) / max(1, n - 1),
            "sd_s_per_image": parts.get("pictures", 0.0), "image": out.image is not None,
            "peak_allocated": torch.cuda.max_memory_allocated(device) if cuda else _peak_rss(),
            "peak_reserved": torch.cuda.max_memory_reserved(device) if cuda else None,
            "offload_moves": model._offload.moves if model._offload is not None else 0,
            "token_ids": out.token_ids,
        }
        if reference is not None and scheduler == "pndm" and steps == args.steps:
            same = [a == b for a, b in zip(out.token_ids, reference.token_ids)]
            result["same_tokens_as_release"] = out.token_ids == reference.token_ids
            result["first_difference"] = same.index(False) if False in same else None
            result["max_pixel_difference"] = _pixels_differ(out.image, reference.image)
        if quantization is None:
            result["llm_read_bytes_per_token"] = sum(
                p.numel() * p.element_size() for n_, p in decoder.named_parameters() if "embed_tokens" not in n_
            ) + sum(p.numel() * p.element_size() for p in m.llm_parts()[1].parameters())
        print(json.dumps(result), flush=True)
        return out

    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    for mode in modes:
        decode, pictures = MODES[mode]
        out = turn(mode, decode, pictures)
        if mode == "release":
            reference = out
            if args.baselines:
                _plain_baselines(args, model, prompt, images, sync, card, diffusion, generation)
    fast = [x for x in modes if x != "release"]
    if fast and args.dpm_steps:
        decode, pictures = MODES[fast[-1]]
        turn(f"{fast[-1]}, dpm++ {args.dpm_steps} steps", decode, pictures, "dpm++", args.dpm_steps)
    if args.baselines and "compiled" in modes:
        _plain_compiled_sd(args, model, sync, card)


def _plain_baselines(args, model, prompt, images, sync, card, diffusion, generation) -> None:
    """The plain libraries on the same weights, as the issue measured them: transformers' `generate`
    (eager, dynamic cache, greedy, exactly `new_tokens` tokens) from the same prompt embeddings, and
    the plain diffusers pipeline (eager; PNDM, CFG) from a random condition."""
    m = model.model
    llm = m.llama_model
    with torch.no_grad():
        embeds, mask = generation.prompt_embeddings(model.model, [prompt], [images], args.new_tokens)
        for _ in range(2):                                   # warm-up, then the prefill alone
            sync()
            t0 = time.perf_counter()
            llm(inputs_embeds=embeds, attention_mask=mask)
            sync()
        prefill_s = time.perf_counter() - t0
        config = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=m.llama_tokenizer.pad_token_id)
        # (the class's generate: the instance's is wrapped to turn the stops off)
        type(llm).generate(llm, inputs_embeds=embeds, attention_mask=mask, **{**config, "max_new_tokens": 4,
                                                                            "min_new_tokens": 4})
        sync()
        t0 = time.perf_counter()
        ids = type(llm).generate(llm, inputs_embeds=embeds, attention_mask=mask, **config)
        sync()
        generate_s = time.perf_counter() - t0
        tokens = ids.shape[1]
        pipe = diffusion.pipeline(model.vae, model.unet, model.sd_tokenizer, model.noise_scheduler, "pndm")
        sd_s = _plain_sd_seconds(args, model, pipe, sync)
    print(json.dumps({"config": args.one, "mode": "plain libraries", "device": card,
                      "hf_generate_s": generate_s, "hf_tokens": tokens, "hf_prefill_s": prefill_s,
                      "hf_decode_s_per_token": (generate_s - prefill_s) / max(1, tokens - 1),
                      "plain_sd_eager_s_per_image": sd_s}), flush=True)


def _plain_sd_seconds(args, model, pipe, sync) -> float:
    """Seconds of one plain pipeline call (one image, `args.steps` PNDM steps, CFG 7.5) after a warm-up."""
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, model.cfg.mapper.num_prompt_tokens, model.cfg.mapper.d_model, generator=g)
    cond, negative = cond.to(model.device, model.unet.dtype), torch.zeros_like(cond).to(model.device, model.unet.dtype)
    size = model.cfg.sd_image_size
    call = lambda steps: pipe(prompt_embeds=cond, negative_prompt_embeds=negative, guidance_scale=7.5,
                              num_inference_steps=steps, generator=[torch.Generator().manual_seed(0)], height=size,
                              width=size, output_type="pil")
    call(3)
    sync()
    t0 = time.perf_counter()
    call(args.steps)
    sync()
    return time.perf_counter() - t0


def _plain_compiled_sd(args, model, sync, card) -> None:
    """The plain pipeline with the UNet compiled as the issue measured it (channels-last,
    torch.compile mode "reduce-overhead", fullgraph): the very compiled module of pictures="compiled"."""
    import diffusion
    import fast_inference

    compiled = fast_inference.fast_sd_parts(model.decoder, "compiled")[1].compiled
    pipe = diffusion.pipeline(model.vae, compiled, model.sd_tokenizer, model.noise_scheduler, "pndm")
    with torch.no_grad():
        seconds = _plain_sd_seconds(args, model, pipe, sync)
    print(json.dumps({"config": args.one, "mode": "plain libraries, UNet compiled", "device": card,
                      "plain_sd_compiled_s_per_image": seconds}), flush=True)


def _markdown(results: list[dict], train: list[dict], args: argparse.Namespace) -> str:
    gb = lambda n: "-" if n is None else f"{n / GB:.2f} GB"
    turns = [r for r in results if "turn_s" in r]
    device = (turns or results or train or [{"device": "?"}])[0]["device"]
    memory = "peak GPU memory allocated (reserved)" if args.device != "cpu" else "peak resident memory (CPU dry run)"
    title = (f"## Dry run on the tiny preset on the {device} (`benchmarks/gpu_memory.py --dry_run`): checks that "
             "every measurement runs; the figures mean nothing" if args.dry_run else
             f"## One story turn at full size on {device} (`benchmarks/gpu_memory.py`, measured)")
    lines = [title, "",
             f"Model config `{args.model_config}`; the playground's two-image story prompt, {args.new_tokens} new "
             f"tokens (vokens forced, stop string and end token off, sampling untouched), {args.steps} PNDM steps with "
             f"CFG at the config's image size. Modes: release = transformers' generate + the eager SD pipeline; "
             f"graph = static cache + decode step and UNet from CUDA graphs; compiled = the same compiled with "
             f"torch.compile (fast_inference.py). Each mode after a warm-up turn (captures / compiles; its seconds "
             f"in the last column).", "",
             f"| configuration | mode | {memory} | load s | turn s | decode ms / token | x floor | prefill s | "
             "SD s / image | same tokens as release | max pixel diff | warm-up s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    floors = {}
    for r in turns:
        if "llm_read_bytes_per_token" in r and args.bandwidth_gbs:
            floors[r["config"]] = r["llm_read_bytes_per_token"] / (args.bandwidth_gbs * GB)
    for r in turns:
        p = r["part_s"]
        floor = floors.get(r["config"])
        ratio = f"{r['decode_s_per_token'] / floor:.1f}x" if floor else "-"
        same = r.get("same_tokens_as_release")
        same = "-" if same is None else ("yes" if same else f"no (from token {r['first_difference']})")
        pixels = r.get("max_pixel_difference")
        lines.append(f"| {r['config']} | {r['mode']} | **{gb(r['peak_allocated'])}** ({gb(r['peak_reserved'])}) | "
                     f"{r['load_s']:.1f} | **{r['turn_s']:.2f}** | {r['decode_s_per_token'] * 1e3:.1f} | {ratio} | "
                     f"{p.get('prefill', 0):.3f} | {r['sd_s_per_image']:.2f} | {same} | "
                     f"{'-' if pixels is None else pixels} | {r['warmup_s']:.1f} |")
    if floors:
        bf16 = next((r for r in turns if r["config"] == "bf16"), None)
        floor = floors.get("bf16")
        if bf16 and floor:
            lines += ["", f"Bandwidth floor of a bf16 token: {floor * 1e3:.2f} ms ({bf16['llm_read_bytes_per_token'] / GB:.2f} "
                          f"GB of weights read per token at {args.bandwidth_gbs:.0f} GB/s); arithmetic, not measured."]
    for r in results:
        if r.get("mode") == "plain libraries":
            lines += ["", f"Plain libraries on the same weights ({r['config']}): transformers `generate` (eager, "
                          f"dynamic cache, greedy) {r['hf_decode_s_per_token'] * 1e3:.1f} ms / token "
                          f"(prefill {r['hf_prefill_s']:.3f} s); diffusers pipeline, eager: "
                          f"{r['plain_sd_eager_s_per_image']:.2f} s / image."]
        if r.get("mode") == "plain libraries, UNet compiled":
            lines += ["", f"Plain diffusers pipeline with the UNet compiled (channels-last, mode reduce-overhead; "
                          f"{r['config']}): {r['plain_sd_compiled_s_per_image']:.2f} s / image."]
    if train:
        import train_throughput

        lines += ["", train_throughput.markdown(train, argparse.Namespace(**args.train_args)).strip()]
    lines += ["", verdicts(results, train, floors, judge=not args.dry_run)]
    return "\n".join(lines) + "\n"


def verdicts(results: list[dict], train: list[dict], floors: dict, judge: bool = True) -> str:
    """The issue's targets against this run's numbers (each 'not measured' when its rows are missing;
    no verdicts for a dry run)."""
    def best(config: str, key: str, pndm: bool = True):
        rows = [r for r in results if r.get("config") == config and "turn_s" in r and r["mode"] != "release"
                and (r["scheduler"] == "pndm") == pndm]
        return min((r[key] for r in rows), default=None)

    def line(what: str, target: str, value, ok) -> str:
        shown = "not measured" if value is None else value
        verdict = "-" if value is None else ("dry run" if not judge else ("met" if ok else "MISSED"))
        return f"| {what} | {target} | {shown} | {verdict} |"

    out = ["| target | wanted | this run (fastest mode) | verdict |", "|---|---|---|---|"]
    bf16 = best("bf16", "decode_s_per_token")
    floor = floors.get("bf16")
    out.append(line("bf16 decode", "<= 1.5x the bandwidth floor", None if bf16 is None or not floor else
                    f"{bf16 * 1e3:.2f} ms = {bf16 / floor:.2f}x", bf16 is not None and floor and bf16 <= 1.5 * floor))
    q4 = min((x for x in (best("4bit", "decode_s_per_token"), best("4bit+offload", "decode_s_per_token"))
              if x is not None), default=None)
    out.append(line("4-bit decode", "faster than bf16", None if q4 is None or bf16 is None else
                    f"{q4 * 1e3:.2f} vs {bf16 * 1e3:.2f} ms", q4 is not None and bf16 is not None and q4 < bf16))
    sd = best("bf16", "sd_s_per_image")
    plain = next((r["plain_sd_compiled_s_per_image"] for r in results if "plain_sd_compiled_s_per_image" in r), None)
    out.append(line("SD, 50 PNDM steps + CFG", "<= 0.5 s / image", None if sd is None else f"{sd:.2f} s",
                    sd is not None and sd <= 0.5))
    out.append(line("SD against the compiled plain pipeline", "<= 1.15x", None if sd is None or plain is None else
                    f"{sd / plain:.2f}x ({plain:.2f} s)", sd is not None and plain is not None and sd <= 1.15 * plain))
    turn = best("bf16", "turn_s")
    out.append(line("whole story turn (64 tokens + 1 picture)", "<= 1.0 s", None if turn is None else f"{turn:.2f} s",
                    turn is not None and turn <= 1.0))
    stage1 = max((r for r in train if r["stage"] == 1), key=lambda r: r["samples_per_s"], default=None)
    out.append(line("stage-1 training", ">= 80 samples/s at >= 35% MFU", None if stage1 is None else
                    f"{stage1['samples_per_s']:.1f} samples/s, MFU " +
                    ("-" if stage1["mfu"] is None else f"{stage1['mfu']:.0%}") + f" ({stage1['variant']})",
                    stage1 is not None and stage1["samples_per_s"] >= 80 and (stage1["mfu"] or 0) >= 0.35))
    for config, limit in (("bf16", 20), ("4bit+offload", 8)):
        # The measure: peak allocated (a graph's buffers count while it is captured); reserved shown too.
        rows = [r for r in results if r.get("config") == config and "turn_s" in r]
        peak = max((r["peak_allocated"] for r in rows), default=None)
        reserved = max((r["peak_reserved"] or 0 for r in rows), default=0)
        out.append(line(f"memory, {config} (peak allocated over its modes)", f"<= {limit} GB",
                        None if peak is None else f"{peak / GB:.2f} GB ({reserved / GB:.2f} reserved)",
                        peak is not None and peak <= limit * GB))
    return "\n".join(out)


def _stream(cmd: list[str], timeout: float, label: str) -> tuple[list[dict], int | None, str]:
    """Run `cmd`, echoing and collecting its JSON lines as they come; stop it after `timeout` s."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                lines.append(json.loads(line))
                print(line.rstrip(), flush=True)
        code = proc.wait()
    finally:
        timer.cancel()
    reader.join(timeout=5)
    if code != 0:
        print(f"{label}: FAILED or cut short (exit {code})\n{''.join(err)[-3000:]}", file=sys.stderr, flush=True)
    return lines, code, "".join(err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arithmetic", action="store_true", help="write the meta-device arithmetic (no GPU)")
    parser.add_argument("--preset_dir", default=str(REPO / "weights" / "full"),
                        help="where the full preset is, or is built (default: %(default)s)")
    parser.add_argument("--model_config", default=None, help="default: PRESET_DIR/full.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default=None,
                        help="comma-separated, from " + ", ".join(CONFIGS) + " (default: bf16,8bit,4bit,4bit+offload; "
                             f"--quick: {QUICK_CONFIGS})")
    parser.add_argument("--modes", default=None, help="comma-separated, from " + ", ".join(MODES) +
                        " (default: per configuration, all it can run; --quick: fewer)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short lease: configurations {QUICK_CONFIGS}, compiled modes for bf16 only, fewer "
                             "training steps and variants")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dpm_steps", type=int, default=20, help="also one turn with DPM-Solver++ at this many steps "
                        "in the fastest mode, reported apart (0: off)")
    parser.add_argument("--no_baselines", dest="baselines", action="store_false",
                        help="skip the plain transformers / diffusers baselines (bf16)")
    parser.add_argument("--train", action="store_true", help="also benchmarks/train_throughput.py (stages 1 and 2)")
    parser.add_argument("--train_batch", type=int, default=16)
    parser.add_argument("--child_timeout", type=float, default=600, help="seconds per configuration / training run")
    parser.add_argument("--prompt_positions", type=int, default=180,
                        help="--arithmetic: prompt length in LLM positions (text + 2 x 32 image queries)")
    parser.add_argument("--bandwidth_gbs", type=float, default=None,
                        help="the GPU's memory bandwidth (default: from the device name, for the GPUs listed)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS_gpu_full.md"))
    parser.add_argument("--dry_run", action="store_true",
                        help="the tiny preset on the CPU with tiny workloads (12 tokens, 2 steps, torch.compile's eager "
                             "backend, the training dry run): checks that everything runs; the figures mean nothing")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)     # internal: one configuration
    parser.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--no_vae_compile", action="store_true",
                        help="pictures=compiled without compiling the VAE decoder (--quick: its compilation takes "
                             "longer than it saves in a short run)")
    args = parser.parse_args(argv)

    if args.arithmetic:
        from decoder_memory import table as decoder_table     # the SDXL / SD3 decoder families' rows

        text = ("## Meta-device arithmetic (not measured)\n\n" + arithmetic(args.prompt_positions, args.new_tokens)
                + "\n" + decoder_table(CONFIGS))
        Path(args.out).write_text(text)
        print(text)
        return
    if args.dry_run:
        from presets import ensure_tiny

        args.model_config = args.model_config or str(ensure_tiny())
        args.device, args.new_tokens, args.steps, args.dpm_steps = "cpu", 12, 2, 2
        args.configs, args.compile_backend, args.child_timeout = args.configs or "bf16", "eager", 1800
    args.model_config = args.model_config or str(Path(args.preset_dir) / "full.yaml")
    if args.one:
        measure_one(args)
        return
    configs = [c.strip() for c in (args.configs or (QUICK_CONFIGS if args.quick else "bf16,8bit,4bit,4bit+offload"))
               .split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.modes and any(m.strip() not in MODES for m in args.modes.split(",")):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if args.new_tokens < 9:
        parser.error("--new_tokens must be at least 9 (the 8 forced vokens and one more)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is available here; use --arithmetic, or --dry_run")
    if not Path(args.model_config).is_file():
        print(f"building the full preset into {args.preset_dir} (python weights.py preset full ...)", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "weights.py"), "preset", "full", args.preset_dir], check=True)
        print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    if args.bandwidth_gbs is None and args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
        args.bandwidth_gbs = next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)
    results, train, failed = [], [], []
    for index, config in enumerate(configs):
        if index == 1:
            train = _train(args, failed)           # after the first configuration: a short lease keeps the most
        modes = args.modes or (QUICK_MODES.get(config, "release,graph") if args.quick else FULL_MODES[config])
        cmd = [sys.executable, __file__, "--one", config, "--model_config", args.model_config, "--device", args.device,
               "--new_tokens", str(args.new_tokens), "--steps", str(args.steps), "--modes", modes,
               "--dpm_steps", str(args.dpm_steps if config == "bf16" else 0), "--compile_backend", args.compile_backend]
        if not (args.baselines and config == "bf16"):
            cmd.append("--no_baselines")
        if args.quick or args.no_vae_compile:
            cmd.append("--no_vae_compile")
        lines, code, _ = _stream(cmd, args.child_timeout, config)
        results += lines
        if code != 0:
            failed.append(config)
        Path(args.out).write_text(_markdown(results, train, _train_namespace(args)))
    if len(configs) < 2:
        train = _train(args, failed)
    Path(args.out).write_text(_markdown(results, train, _train_namespace(args)))
    print(f"wrote {args.out}", file=sys.stderr)
    if failed:
        sys.exit(f"failed or cut short: {', '.join(failed)}")


def _train(args: argparse.Namespace, failed: list[str]) -> list[dict]:
    """benchmarks/train_throughput.py (stages 1 and 2) in its own process, when asked (`--train`, or a dry run)."""
    if not (args.train or args.dry_run):
        return []
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--model_config", args.model_config]
    cmd += ["--dry_run", "--variants", "release"] if args.dry_run else ["--device", args.device, "--batch",
                                                                      str(args.train_batch)]
    if args.quick:
        cmd += ["--warmup", "2", "--steps", "6", "--part_repeats", "2"]
    elif not args.dry_run:
        cmd += ["--variants", "release,fused_adamw,cached_features,cached_captions,all"]
    train, code, _ = _stream(cmd, args.child_timeout, "training")
    if code != 0:
        failed.append("training")
    return train


def _train_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """What train_throughput.markdown reads of the training run's settings."""
    quick = args.quick and not args.dry_run
    args.train_args = {"model_config": args.model_config, "batch": 2 if args.dry_run else args.train_batch,
                       "precision": "32" if args.dry_run else "bf16-mixed", "warmup": 1 if args.dry_run else (2 if quick else 3),
                       "steps": 2 if args.dry_run else (6 if quick else 8)}
    return args


if __name__ == "__main__":
    main()
