"""GPU memory and speed of one story turn at full size, in the configurations a smaller GPU needs.

    python benchmarks/gpu_memory.py                      # on a GPU machine: everything, in one short run
    python benchmarks/gpu_memory.py --arithmetic         # no GPU: the expected numbers from the meta device
    python benchmarks/gpu_memory.py --device cpu --model_config weights/tiny/tiny.yaml --out /tmp/x.md  # dry run

One story turn is the playground's prompt (a two-image story), `--new_tokens` (64) generated tokens
with the vokens forced and the stop string off (so every configuration decodes the same number of
tokens), and one picture from `--steps` (50) PNDM steps with classifier-free guidance at 512 x 512.

Measuring (the default): builds the `full` preset into `--preset_dir` with the same command as on any
machine (`python weights.py preset full DIR`) unless it is there already, then runs each configuration
(`--configs`: bf16, 8bit, 4bit, 4bit+offload; also 8bit+offload) in a fresh process: load with
`MiniGPT5_Model.from_weights(device=..., llm_quantization=..., offload=...)`, one warm-up turn of a
few tokens and steps, then the measured turn. Reports per configuration the peak GPU memory
(`torch.cuda.max_memory_allocated`, and reserved; on the CPU, the process's peak resident memory),
the memory after loading, the seconds of loading, of the turn and of its parts (forward hooks,
synchronised), the time per generated token against the memory-bandwidth floor (bytes of weights
read per token / the GPU's bandwidth) and SD's seconds per image. Writes a Markdown table to `--out`
(default benchmarks/RESULTS_gpu_full.md) and one JSON line per configuration to stdout.

`--arithmetic` writes what the meta device says instead (no GPU, no weights): the bytes of each part
in each configuration, what sits on the GPU at the peak of a turn, estimates of activations and the
KV cache, and the bandwidth floors of a few GPUs. It is arithmetic, not a measurement.
"""
from __future__ import annotations

import argparse
import copy
import functools
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

GB = 1e9
CONFIGS = {"bf16": (None, False), "8bit": ("8bit", False), "8bit+offload": ("8bit", True),
           "4bit": ("4bit", False), "4bit+offload": ("4bit", True)}
# Peak memory bandwidth from the vendors' data sheets, GB/s (the floor of a memory-bound decode step),
# keyed by a part of the name `torch.cuda.get_device_name` gives.
BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "RTX 4090": 1008, "RTX 3090": 936, "RTX 4070 Ti": 504,
                 "RTX 3060": 360, "RTX 4060": 272}
# Bytes per parameter of a bitsandbytes linear weight: int8 plus one float32 scale per output row;
# NF4 (4 bits) plus, per 64 weights, one 8-bit absmax (double quantisation) and, per 256 of those,
# one float32 second-level scale.
BNB_BYTES = {"8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}


# ---------------------------------------------------------------------------------------------
# Arithmetic on the meta device
# ---------------------------------------------------------------------------------------------

def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@functools.lru_cache(maxsize=None)
def part_bytes(quantization: str | None) -> dict[str, float]:
    """Bytes of each part of the full-size model (config/minigpt4.yaml's dtypes) with the LLM's
    linear layers (all but the voken-row lm_head) stored as `quantization` would store them."""
    from configuration import load_config
    from model import MiniGPT5_Model

    cfg = load_config(REPO / "config" / "minigpt4.yaml", check_paths=False).replace(
        llama_model=str(REPO / "config/arch/vicuna-7b"), sd_model=str(REPO / "config/arch/stable-diffusion-2-1-base"))
    model = MiniGPT5_Model(cfg, device="meta")
    m = model.model
    decoder, lm_head = m.llm_parts()
    linear = [mod for mod in decoder.modules() if isinstance(mod, torch.nn.Linear)]
    linear_params = sum(mod.weight.numel() for mod in linear)
    rows_scale = sum(mod.weight.shape[0] * 4 for mod in linear) if quantization == "8bit" else 0
    linear_bytes = (linear_params * BNB_BYTES[quantization] + rows_scale) if quantization else \
        sum(mod.weight.numel() * mod.weight.element_size() for mod in linear)
    rest_of_decoder = _bytes(decoder) - sum(mod.weight.numel() * mod.weight.element_size() for mod in linear)
    return {
        "ViT (fp16)": _bytes(m.visual_encoder),
        "Q-Former + query tokens + llama_proj (fp32)": _bytes(m.Qformer) + m.query_tokens.numel() * 4 + _bytes(m.llama_proj),
        "LLM linear layers": linear_bytes,
        "LLM embedding + norms (fp32 voken rows)": rest_of_decoder,
        "lm_head (fp32 voken rows)": _bytes(lm_head),
        "fc + mapper + prompt (fp32)": _bytes(model.fc) + _bytes(model.llm_to_t2i_mapping) + model.t2i_decoder_prompt.numel() * 4,
        "UNet (bf16)": _bytes(model.unet),
        "VAE (bf16)": _bytes(model.vae),
        "_llm_hidden": m.llama_model.config.hidden_size, "_llm_layers": m.llama_model.config.num_hidden_layers,
        "_text_encoder_fp32": sum(p.numel() for p in model.sd_text_encoder.parameters()) * 4,
    }


def activation_estimates(parts: dict, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Rough peaks of the temporary tensors of each phase of a turn (bf16 unless said), bytes."""
    h, layers = parts["_llm_hidden"], parts["_llm_layers"]
    positions = prompt_tokens + new_tokens
    kv = 2 * layers * h * 2 * positions                             # K and V, bf16, every layer
    prefill = prompt_tokens * (4 * h + 2 * 11008) * 2 + 32 * prompt_tokens**2 * 2
    # UNet at 64 x 64 latents, batch 2 (CFG), bf16: the skip connections kept for the up path
    # (4 x 320 ch at 64^2, 3 x 640 at 32^2, 3 x 1280 at 16^2 and 8^2) plus, at 64^2, the attention's
    # q/k/v/out (memory-efficient SDPA keeps no 4096 x 4096 matrix), the GEGLU's 2560 channels and a
    # few 320-channel maps.
    skips = 4 * 320 * 64**2 + 3 * 640 * 32**2 + 3 * 1280 * 16**2 + 3 * 1280 * 8**2
    unet = 2 * 2 * (skips + 64**2 * (4 * 320 + 2560 + 3 * 320))
    # VAE decoder at 512 x 512: a few 128/256-channel maps at full resolution (batch 1).
    vae = 6 * 128 * 512 * 512 * 2
    return {"kv": kv, "llm": kv + prefill, "unet": unet, "vae": vae, "vit": 2 * 257 * (3 * 1408 + 6144) * 2 * 4}


def arithmetic(prompt_tokens: int, new_tokens: int) -> str:
    rows = []
    for name, (quantization, offload) in CONFIGS.items():
        parts = part_bytes(quantization)
        act = activation_estimates(parts, prompt_tokens, new_tokens)
        llm = parts["LLM linear layers"] + parts["LLM embedding + norms (fp32 voken rows)"] + parts["lm_head (fp32 voken rows)"]
        resident = llm + parts["fc + mapper + prompt (fp32)"]
        image_side = parts["ViT (fp16)"] + parts["Q-Former + query tokens + llama_proj (fp32)"]
        if offload:
            # One offloaded part at a time (the Q-Former's llama_proj stays; counted with it here).
            phases = {"image encoder": max(parts["ViT (fp16)"], parts["Q-Former + query tokens + llama_proj (fp32)"]) + act["vit"],
                      "LLM": act["llm"], "UNet": parts["UNet (bf16)"] + act["unet"] + act["kv"],
                      "VAE": parts["VAE (bf16)"] + act["vae"] + act["kv"]}
        else:
            resident += image_side + parts["UNet (bf16)"] + parts["VAE (bf16)"]
            phases = {"image encoder": act["vit"], "LLM": act["llm"], "UNet": act["unet"] + act["kv"],
                      "VAE": act["vae"] + act["kv"]}
        peak_phase = max(phases, key=phases.get)
        read_per_token = parts["LLM linear layers"] + parts["lm_head (fp32 voken rows)"] + act["kv"]
        rows.append((name, llm, resident, peak_phase, resident + phases[peak_phase], read_per_token))
    lines = [
        "| configuration | LLM weights | resident on the GPU through the turn | largest phase | "
        "**peak (weights + estimated activations)** | weights read per token |",
        "|---|---|---|---|---|---|",
    ]
    for name, llm, resident, phase, peak, read in rows:
        lines.append(f"| {name} | {llm / GB:.2f} GB | {resident / GB:.2f} GB | {phase} | **{peak / GB:.1f} GB** | "
                     f"{read / GB:.2f} GB |")
    parts = part_bytes(None)
    lines += ["", "Parts (bytes of parameters, meta device, the release's dtypes):", "",
              "| part | bf16 / as configured | 8-bit LLM | 4-bit LLM |", "|---|---|---|---|"]
    p8, p4 = part_bytes("8bit"), part_bytes("4bit")
    for key in (k for k in parts if not k.startswith("_")):
        lines.append(f"| {key} | {parts[key] / GB:.3f} GB | {p8[key] / GB:.3f} GB | {p4[key] / GB:.3f} GB |")
    lines.append(f"| SD text encoder (fp32; not loaded for generation) | {parts['_text_encoder_fp32'] / GB:.3f} GB | | |")
    act = activation_estimates(parts, prompt_tokens, new_tokens)
    lines += ["", f"Estimates for one turn ({prompt_tokens} prompt positions incl. 2 x 32 image queries, {new_tokens} "
                  f"new tokens): KV cache {act['kv'] / GB:.3f} GB; LLM prefill + cache {act['llm'] / GB:.3f} GB; "
                  f"UNet at 64 x 64 latents, batch 2 (CFG) {act['unet'] / GB:.2f} GB; VAE decoder at 512 px "
                  f"{act['vae'] / GB:.2f} GB. Not included: the CUDA context (about 0.3-0.6 GB, outside PyTorch's "
                  f"allocator) and allocator fragmentation.", "",
              "Memory-bandwidth floor of the time per generated token (weights read per token / peak bandwidth; "
              "real decoding is slower, and bitsandbytes' 8-bit kernels much slower than the floor):", "",
              "| GPU | bandwidth | " + " | ".join(name for name, *_ in rows if "offload" not in name) + " |",
              "|---|---|" + "---|" * sum("offload" not in name for name, *_ in rows)]
    for gpu, gbs in BANDWIDTH_GBS.items():
        cells = [f"{read / (gbs * GB) * 1e3:.1f} ms" for name, _, _, _, _, read in rows if "offload" not in name]
        lines.append(f"| {gpu} | {gbs} GB/s | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Measuring one configuration (a fresh process each)
# ---------------------------------------------------------------------------------------------

def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_one(args: argparse.Namespace) -> dict:
    from PIL import Image

    from model import MiniGPT5_Model
    from playground import DEFAULT_CAPTIONS, DEFAULT_IMAGES, story_prompt

    quantization, offload = CONFIGS[args.one]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    model = MiniGPT5_Model.from_weights(args.model_config, device=device, llm_quantization=quantization,
                                        offload=offload)
    sync()
    result = {"config": args.one, "device": torch.cuda.get_device_name(device) if cuda else "CPU",
              "load_s": time.perf_counter() - start,
              "loaded_bytes": torch.cuda.memory_allocated(device) if cuda else _peak_rss()}
    llm = model.model.llama_model
    original_generate = llm.generate

    def exactly_n_tokens(*a, generation_config, **kw):
        config = copy.deepcopy(generation_config)
        config.stop_strings = None
        config.min_new_tokens = config.max_new_tokens
        return original_generate(*a, generation_config=config, **kw)

    llm.generate = exactly_n_tokens
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    started: dict[str, float] = {}
    m = model.model
    for module, name in ((m.visual_encoder, "ViT"), (m.Qformer, "Q-Former"), (m.llm_parts()[0], "LLM decoder"),
                         (model.llm_to_t2i_mapping, "mapper"), (model.unet, "UNet"), (model.vae.decoder, "VAE decoder")):
        def before(*_, name=name):
            sync()
            started[name] = time.perf_counter()

        def after(*_, name=name):
            sync()
            elapsed = time.perf_counter() - started.pop(name)
            seconds[name] = seconds.get(name, 0.0) + elapsed
            calls[name] = calls.get(name, 0) + 1
            if name == "LLM decoder" and calls[name] == 1:
                seconds["LLM prefill"] = elapsed

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
    images = []
    for path in DEFAULT_IMAGES:
        with Image.open(path) as f:
            images.append(f.convert("RGB"))
    prompt = story_prompt(DEFAULT_CAPTIONS)
    kwargs = {"seed": 0, "force_generation": True}
    model.generate([prompt], [images], max_new_tokens=9, num_inference_steps=2, **kwargs)      # warm-up
    seconds.clear(), calls.clear()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    start = time.perf_counter()
    out = model.generate([prompt], [images], max_new_tokens=args.new_tokens, num_inference_steps=args.steps,
                         **kwargs)[0]
    sync()
    turn = time.perf_counter() - start
    decode_steps = calls["LLM decoder"] - 1
    per_token = (seconds["LLM decoder"] - seconds["LLM prefill"]) / max(1, decode_steps)
    result.update({
        "turn_s": turn, "part_s": seconds, "calls": calls, "new_tokens": len(out.token_ids),
        "decode_s_per_token": per_token, "sd_s_per_image": seconds.get("UNet", 0.0) + seconds.get("VAE decoder", 0.0),
        "image": out.image is not None,
        "peak_allocated": torch.cuda.max_memory_allocated(device) if cuda else _peak_rss(),
        "peak_reserved": torch.cuda.max_memory_reserved(device) if cuda else None,
        "offload_moves": model._offload.moves if model._offload is not None else 0,
    })
    if quantization is None:
        result["llm_read_bytes_per_token"] = sum(
            p.numel() * p.element_size() for n, p in m.llm_parts()[0].named_parameters() if "embed_tokens" not in n
        ) + sum(p.numel() * p.element_size() for p in m.llm_parts()[1].parameters())
    return result


def _markdown(results: list[dict], args: argparse.Namespace) -> str:
    gb = lambda n: "-" if n is None else f"{n / GB:.2f} GB"
    device = results[0]["device"] if results else "?"
    memory = "peak GPU memory allocated (reserved)" if args.device != "cpu" else "peak resident memory (CPU dry run)"
    lines = [f"## One story turn at full size on {device} (`benchmarks/gpu_memory.py`, measured)", "",
             f"Model config `{args.model_config}`; the playground's two-image story prompt, {args.new_tokens} new "
             f"tokens (vokens forced, stop string off), {args.steps} PNDM steps with CFG at the config's image size.", "",
             f"| configuration | {memory} | after loading | load s | turn s | s / token (decode) | "
             "SD s / image | ViT s | LLM prefill s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["part_s"]
        lines.append(f"| {r['config']} | **{gb(r['peak_allocated'])}** ({gb(r['peak_reserved'])}) | "
                     f"{gb(r['loaded_bytes'])} | {r['load_s']:.1f} | {r['turn_s']:.1f} | "
                     f"{r['decode_s_per_token'] * 1e3:.1f} ms | {r['sd_s_per_image']:.2f} | {p.get('ViT', 0):.2f} | "
                     f"{p.get('LLM prefill', 0):.2f} |")
    for r in results:
        if "llm_read_bytes_per_token" in r and args.bandwidth_gbs:
            floor = r["llm_read_bytes_per_token"] / (args.bandwidth_gbs * GB)
            lines += ["", f"bf16 decode: {r['decode_s_per_token'] * 1e3:.1f} ms per token against a memory-bandwidth "
                          f"floor of {floor * 1e3:.2f} ms ({r['llm_read_bytes_per_token'] / GB:.2f} GB of weights read "
                          f"per token at {args.bandwidth_gbs} GB/s): {floor / r['decode_s_per_token']:.0%} of the floor."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arithmetic", action="store_true", help="write the meta-device arithmetic (no GPU)")
    parser.add_argument("--preset_dir", default=str(REPO / "weights" / "full"),
                        help="where the full preset is, or is built (default: %(default)s)")
    parser.add_argument("--model_config", default=None, help="default: PRESET_DIR/full.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default="bf16,8bit,4bit,4bit+offload",
                        help="comma-separated, from " + ", ".join(CONFIGS) + " (default: %(default)s)")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt_positions", type=int, default=180,
                        help="--arithmetic: prompt length in LLM positions (text + 2 x 32 image queries)")
    parser.add_argument("--bandwidth_gbs", type=float, default=None,
                        help="the GPU's memory bandwidth (default: from the device name, for the GPUs listed)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS_gpu_full.md"))
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)     # internal: one configuration
    args = parser.parse_args(argv)

    if args.arithmetic:
        text = ("## Meta-device arithmetic (not measured)\n\n" + arithmetic(args.prompt_positions, args.new_tokens))
        Path(args.out).write_text(text)
        print(text)
        return
    args.model_config = args.model_config or str(Path(args.preset_dir) / "full.yaml")
    if args.one:
        print(json.dumps(measure_one(args)), flush=True)
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if args.new_tokens < 9:
        parser.error("--new_tokens must be at least 9 (the 8 forced vokens and one more)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is available here; use --arithmetic, or --device cpu "
                 "with a small --model_config for a dry run")
    if not Path(args.model_config).is_file():
        print(f"building the full preset into {args.preset_dir} (python weights.py preset full ...)", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "weights.py"), "preset", "full", args.preset_dir], check=True)
        print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    if args.bandwidth_gbs is None and args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
        args.bandwidth_gbs = next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)
    results = []
    for config in configs:
        cmd = [sys.executable, __file__, "--one", config, "--model_config", args.model_config, "--device", args.device,
               "--new_tokens", str(args.new_tokens), "--steps", str(args.steps)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in reversed(done.stdout.splitlines()) if l.startswith("{")), None)
        if done.returncode != 0 or line is None:
            print(f"{config}: FAILED (exit {done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results.append(json.loads(line))
        print(line, flush=True)
    Path(args.out).write_text(_markdown(results, args))
    print(f"wrote {args.out}", file=sys.stderr)
    if len(results) != len(configs):
        sys.exit(1)


if __name__ == "__main__":
    main()
