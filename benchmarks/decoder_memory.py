"""Meta-device arithmetic of the picture-decoder families at full size (no GPU, no weights): the bytes
of each family's parts and the GPU memory the weights of each pairing (each LLM of
memory_arithmetic.FULL_LLMS with each decoder family) need in gpu_memory.py's configurations (bf16 /
8-bit / 4-bit LLM, with or without offload).

    python benchmarks/decoder_memory.py          # prints the Markdown tables

Sizes come from the architecture folders in config/arch (config.json files of the public releases) and
the full-size model configs config/minigpt4.yaml (SD 2.1-base), config/minigpt4_sdxl.yaml (SDXL-base),
config/minigpt4_sd3.yaml (SD3-medium) and config/minigpt4_flux.yaml (FLUX.1-dev). `python benchmarks/gpu_memory.py --arithmetic` appends
these tables. Weights only: activations (larger at SDXL's and SD3's 1024 px than at SD 2.1's 512 px)
and the CUDA context are not included. It is arithmetic, not a measurement.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

GB = 1e9
# family -> (full-size model config, architecture folder, what it is)
FULL_SIZE = {
    "sd": ("config/minigpt4.yaml", "config/arch/stable-diffusion-2-1-base", "SD 2.1-base (the release)"),
    "sdxl": ("config/minigpt4_sdxl.yaml", "config/arch/stable-diffusion-xl-base-1.0", "SDXL-base 1.0"),
    "sd3": ("config/minigpt4_sd3.yaml", "config/arch/stable-diffusion-3-medium", "SD3-medium"),
    "flux": ("config/minigpt4_flux.yaml", "config/arch/flux.1-dev", "FLUX.1-dev"),
}


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@functools.lru_cache(maxsize=None)
def decoder_bytes(family: str) -> dict[str, int]:
    """Bytes of a family's parts at full size on the meta device: the denoiser and the VAE (the
    config's SD dtype, bfloat16), the text encoders (float32; the caption loss and the SD baseline
    only), the trainable mapper (float32: fc, llm_to_t2i_mapping, t2i_decoder_prompt, the pooled head)."""
    from configuration import load_config
    from model import MiniGPT5_Model

    config, arch, _ = FULL_SIZE[family]
    cfg = load_config(REPO / config, check_paths=False).replace(
        llama_model=str(REPO / "config/arch/vicuna-7b"), sd_model=str(REPO / arch))
    model = MiniGPT5_Model(cfg, device="meta")
    parts = model.decoder.parts
    mapper = [model.fc, model.llm_to_t2i_mapping, model._modules.get("t2i_pooled_mapping") or torch.nn.Identity()]
    return {
        "denoiser": sum(_bytes(p) for name, p in parts.items() if name != "vae"), "vae": _bytes(parts["vae"]),
        "text_encoders": _bytes(model.sd_text_encoder),
        "mapper": sum(_bytes(m) for m in mapper) + model.t2i_decoder_prompt.numel() * 4,
        "image_size": cfg.sd_image_size,
    }


def pairing_weights(family: str, quantization: str | None, offload: bool, llm: str = "Vicuna-7B v0") -> float:
    """Bytes of weights on the GPU at the peak of a turn: the LLM side of `llm` (memory_arithmetic.part_bytes:
    ViT, Q-Former, the LLM in `quantization`) with `family`'s decoder and mapper (the mapper as sized
    for the release's LLM width: `fc`'s input differs by a few MB between LLMs); with `offload`, the
    image encoder, denoiser and VAE take turns (the largest of them counts)."""
    from memory_arithmetic import part_bytes

    llm_side = part_bytes(quantization, llm)
    dec = decoder_bytes(family)
    llm = (llm_side["LLM linear layers"] + llm_side["LLM embedding + norms (fp32 voken rows)"]
           + llm_side["lm_head (fp32 voken rows)"])
    vit = llm_side["ViT (fp16)"]
    qformer = llm_side["Q-Former + query tokens + llama_proj (fp32)"]
    resident = llm + dec["mapper"]
    if offload:
        return resident + max(vit, qformer, dec["denoiser"], dec["vae"])
    return resident + vit + qformer + dec["denoiser"] + dec["vae"]


def table(configs: dict | None = None) -> str:
    """The Markdown tables: parts per family, then weights on the GPU per pairing and configuration."""
    from memory_arithmetic import FULL_LLMS

    if configs is None:
        from memory_arithmetic import CONFIGS as configs
    lines = ["Decoder families at full size (meta device; bytes of parameters):", "",
             "| decoder family | pictures | denoiser (bf16) | VAE (bf16) | text encoders (fp32; caption loss, "
             "SD baseline) | mapper (fp32, trained) |", "|---|---|---|---|---|---|"]
    for family, (_, _, name) in FULL_SIZE.items():
        b = decoder_bytes(family)
        lines.append(f"| `{family}`: {name} | {b['image_size']} px | {b['denoiser'] / GB:.2f} GB | {b['vae'] / GB:.3f} GB "
                     f"| {b['text_encoders'] / GB:.2f} GB | {b['mapper'] / GB:.2f} GB |")
    lines += ["", "Weights on the GPU at the peak of a turn, each LLM (with EVA ViT-g and the Q-Former) with each "
                  "decoder (weights only; add activations and the CUDA context):", "",
              "| LLM | decoder family | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
    for llm in FULL_LLMS:
        for family in FULL_SIZE:
            cells = [f"{pairing_weights(family, q, off, llm) / GB:.1f} GB" for q, off in configs.values()]
            lines.append(f"| {llm} | `{family}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table())
