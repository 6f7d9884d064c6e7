"""The meta-device arithmetic of benchmarks/gpu_memory.py (`--arithmetic`): no GPU, no weights. The
bytes of each part of the full-size model in each configuration (bf16, 8-bit, 4-bit LLM, with or
without CPU offload), what sits on the GPU at the peak of a story turn, estimates of activations and
the KV cache, the bandwidth floors of a few GPUs, and the same for each LLM family at full size
(`FULL_LLMS`: config/minigpt4.yaml, config/llama3_8b.yaml, config/qwen2.5_7b.yaml). Arithmetic, not a
measurement.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
# Each LLM family at full size: its model config and its LLM's config.json folder, under config/.
FULL_LLMS = {"Vicuna-7B v0": ("minigpt4.yaml", "arch/vicuna-7b"), "Llama-3.1-8B": ("llama3_8b.yaml", "arch/llama-3.1-8b"),
             "Qwen2.5-7B": ("qwen2.5_7b.yaml", "arch/qwen2.5-7b")}


# ---------------------------------------------------------------------------------------------
# Arithmetic on the meta device
# ---------------------------------------------------------------------------------------------

def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@functools.lru_cache(maxsize=None)
def part_bytes(quantization: str | None, llm: str = "Vicuna-7B v0") -> dict[str, float]:
    """Bytes of each part of the full-size model with the LLM `llm` (of `FULL_LLMS`; its config's dtypes)
    with the LLM's linear layers (all but the voken-row lm_head) stored as `quantization` would store
    them. (No tokenizer on the meta device: a padded vocabulary keeps its padding rows here.)"""
    from configuration import load_config
    from model import MiniGPT5_Model

    model_config, arch = FULL_LLMS[llm]
    cfg = load_config(REPO / "config" / model_config, check_paths=False).replace(
        llama_model=str(REPO / "config" / arch), sd_model=str(REPO / "config/arch/stable-diffusion-2-1-base"))
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
        "_llm_hidden": (c := m.llama_model.config).hidden_size, "_llm_layers": c.num_hidden_layers,
        "_kv_width": c.num_key_value_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
        "_intermediate": c.intermediate_size,
        "_text_encoder_fp32": sum(p.numel() for p in model.sd_text_encoder.parameters()) * 4,
    }


def activation_estimates(parts: dict, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Rough peaks of the temporary tensors of each phase of a turn (bf16 unless said), bytes."""
    h, layers = parts["_llm_hidden"], parts["_llm_layers"]
    positions = prompt_tokens + new_tokens
    kv = 2 * layers * parts["_kv_width"] * 2 * positions            # K and V, bf16, every layer
    prefill = prompt_tokens * (4 * h + 2 * parts["_intermediate"]) * 2 + 32 * prompt_tokens**2 * 2
    # UNet at 64 x 64 latents, batch 2 (CFG), bf16: the skip connections kept for the up path
    # (4 x 320 ch at 64^2, 3 x 640 at 32^2, 3 x 1280 at 16^2 and 8^2) plus, at 64^2, the attention's
    # q/k/v/out (memory-efficient SDPA keeps no 4096 x 4096 matrix), the GEGLU's 2560 channels and a
    # few 320-channel maps.
    skips = 4 * 320 * 64**2 + 3 * 640 * 32**2 + 3 * 1280 * 16**2 + 3 * 1280 * 8**2
    unet = 2 * 2 * (skips + 64**2 * (4 * 320 + 2560 + 3 * 320))
    # VAE decoder at 512 x 512: a few 128/256-channel maps at full resolution (batch 1).
    vae = 6 * 128 * 512 * 512 * 2
    return {"kv": kv, "llm": kv + prefill, "unet": unet, "vae": vae, "vit": 2 * 257 * (3 * 1408 + 6144) * 2 * 4}


def config_rows(prompt_tokens: int, new_tokens: int, llm: str = "Vicuna-7B v0") -> list[tuple]:
    """Per configuration: (name, LLM bytes, resident bytes, largest phase, peak bytes, bytes read per token)."""
    rows = []
    for name, (quantization, offload) in CONFIGS.items():
        parts = part_bytes(quantization, llm)
        act = activation_estimates(parts, prompt_tokens, new_tokens)
        llm_bytes = parts["LLM linear layers"] + parts["LLM embedding + norms (fp32 voken rows)"] + parts["lm_head (fp32 voken rows)"]
        resident = llm_bytes + parts["fc + mapper + prompt (fp32)"]
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
        rows.append((name, llm_bytes, resident, peak_phase, resident + phases[peak_phase], read_per_token))
    return rows


def arithmetic(prompt_tokens: int, new_tokens: int) -> str:
    rows = config_rows(prompt_tokens, new_tokens)
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
    lines += ["", "Each LLM family at full size, the rest as the release (meta device): LLM weights / **peak**:", "",
              "| LLM | " + " | ".join(CONFIGS) + " |", "|---|" + "---|" * len(CONFIGS)]
    for llm in FULL_LLMS:
        cells = [f"{row[1] / GB:.2f} / **{row[4] / GB:.1f}** GB" for row in config_rows(prompt_tokens, new_tokens, llm)]
        lines.append(f"| {llm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
