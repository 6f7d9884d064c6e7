"""Random-weight presets written in exactly the real file formats, so that tests, the quick start
and the GPU smoke test run the same loading code as the real weights (`weights.py`, `lavis.py`,
transformers and diffusers read them back).

    python weights.py tiny OUT_DIR                          # (or python presets.py tiny OUT_DIR)
    python weights.py preset {tiny,small,real_width,full} [OUT_DIR]

A preset is a Hugging Face LLaMA folder with a sentencepiece tokenizer, LAVIS `.pth` files for the
ViT and the Q-Former, MiniGPT-4's `.pth` with `llama_proj`, a diffusers Stable Diffusion folder, and
a config YAML pointing at them. Sizes come from `config/<name>.yaml` + `config/<name>_arch.yaml`;
`full` (config/full_preset.yaml) writes MiniGPT-5's real sizes in the real files' dtypes (about
21 GB), tensor by tensor, so that building it needs little memory.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from configuration import dump_config, load_config
from llm_families import DEFAULT_FAMILY, get_family
from llm_families.vicuna import train_llama_tokenizer, write_tokenizer_files

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent
TINY_CONFIG = REPO / "config" / "tiny.yaml"
TINY_ARCH = REPO / "config" / "tiny_arch.yaml"
DEFAULT_TINY_DIR = REPO / "weights" / "tiny"


# --------------------------------------------------------------------------------------------
# The tiny preset (its LLM folder is written by the LLM family: llm_families/)
# --------------------------------------------------------------------------------------------

def _clip_bpe_vocab(words: Sequence[str] = ()) -> tuple[dict[str, int], list[str]]:
    """A byte-level CLIP BPE vocabulary (every byte, with and without `</w>`), a few merges, and
    the merges that make each of `words` one token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "a n", "i n", "e r", "o n"]
    for word in words:                       # "red" -> "r e", "re d</w>": one token "red</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces[1:]:
            pair = f"{pieces[0]} {piece}"
            if pair not in merges:
                merges.append(pair)
            pieces[0] += piece
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tiny_sd(out_dir: Path, arch: dict, image_size: int, cross_attention_dim: int, seed: int,
                  words: Sequence[str] = ()) -> None:
    """A diffusers Stable Diffusion folder (unet, vae, text_encoder, tokenizer, scheduler) with
    SD 2.1-base's scheduler settings and epsilon prediction; `words` become single tokens."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae_arch, unet_arch, text_arch = arch["vae"], arch["unet"], arch["text_encoder"]
    n_vae = len(vae_arch["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=tuple(vae_arch["block_out_channels"]),
        layers_per_block=vae_arch["layers_per_block"], norm_num_groups=vae_arch["norm_num_groups"],
        sample_size=image_size, scaling_factor=0.18215,
    )
    latent_size = image_size // 2 ** (n_vae - 1)
    n_unet = len(unet_arch["block_out_channels"])
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4,
        # SD's layout (cross-attention in every block but the lowest-resolution one) unless the
        # architecture names its own blocks.
        down_block_types=tuple(unet_arch.get("down_block_types",
                                             ("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",))),
        up_block_types=tuple(unet_arch.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1))),
        block_out_channels=tuple(unet_arch["block_out_channels"]),
        layers_per_block=unet_arch["layers_per_block"],
        attention_head_dim=tuple(unet_arch["attention_head_dim"]),
        norm_num_groups=unet_arch["norm_num_groups"], cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
    )
    vocab = write_clip_tokenizer(out_dir / "tokenizer", words)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_arch["hidden_size"],
        intermediate_size=text_arch["intermediate_size"],
        num_hidden_layers=text_arch["num_hidden_layers"],
        num_attention_heads=text_arch["num_attention_heads"], max_position_embeddings=77,
        hidden_act="gelu", projection_dim=text_arch["hidden_size"],
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"],
    ))
    # SD 2.1-base's scheduler/scheduler_config.json.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    vae.save_pretrained(out_dir / "vae")
    unet.save_pretrained(out_dir / "unet")
    text_encoder.save_pretrained(out_dir / "text_encoder")
    scheduler.save_pretrained(out_dir / "scheduler")
    _write_model_index(out_dir)


def write_clip_tokenizer(tok_dir: Path, words: Sequence[str] = ()) -> dict[str, int]:
    """SD's tokenizer folder (CLIP BPE files) with a small byte-level vocabulary (`words` one token
    each); returns the vocabulary."""
    vocab, merges = _clip_bpe_vocab(words)
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "!",
    }, indent=2))
    return vocab


def _write_model_index(out_dir: Path) -> None:
    """The diffusers pipeline index of an SD 2.1-base folder (no safety checker)."""
    (out_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))


def write_tiny_minigpt4(path: Path, qformer_hidden: int, llm_hidden: int, seed: int,
                        dtype: torch.dtype = torch.float32) -> None:
    """MiniGPT-4's `.pth`: `{"model": {"llama_proj.weight", "llama_proj.bias"}}`."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "llama_proj.weight": (torch.randn(llm_hidden, qformer_hidden, generator=g) * 0.02).to(dtype),
        "llama_proj.bias": (torch.randn(llm_hidden, generator=g) * 0.02).to(dtype),
    }
    torch.save({"model": state}, path)


def build_tiny(out_dir: str | os.PathLike = DEFAULT_TINY_DIR, seed: int = 0,
               config_path: str | os.PathLike = TINY_CONFIG,
               arch_path: str | os.PathLike = TINY_ARCH, config_name: str = "tiny.yaml") -> Path:
    """Write a random-weight preset (default: the tiny one) into `out_dir` and return the path of
    its config YAML (`out_dir/<config_name>`, the sizes of `config_path`, paths pointing into
    `out_dir`). Deterministic for a given seed; the tiny preset takes a few seconds."""
    out_dir = Path(out_dir).resolve()
    cfg = load_config(config_path, check_paths=False)
    with open(arch_path) as f:
        arch = yaml.safe_load(f)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_preset_files(tmp, cfg, arch, seed)
    # Replace atomically so an interrupted build never looks complete.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    dump_config(preset_config(cfg, out_dir), out_dir / config_name)
    log.info("preset written to %s", out_dir)
    return out_dir / config_name


def write_preset_files(out_dir: Path, cfg, arch: dict, seed: int, llm_corpus: list[str] | None = None,
                       sd_words: Sequence[str] = ()) -> None:
    """The weight files of a random preset with `cfg`'s sizes and `arch`'s LLM / SD architectures
    into `out_dir` (names as `preset_config` expects); the LLM tokenizer is trained on
    `llm_corpus` and `sd_words` become single SD tokens (see the toy world)."""
    from lavis import write_tiny_lavis

    get_family(cfg.llm_family).write_tiny(out_dir / "llama", arch["llama"], seed, corpus=llm_corpus)
    write_tiny_lavis(out_dir, cfg.vision, cfg.qformer, cfg.num_query_token, cfg.image_size, seed=seed)
    write_tiny_minigpt4(out_dir / "prerained_minigpt4_7b.pth", cfg.qformer.hidden_size,
                        arch["llama"]["hidden_size"], seed)
    import decoders

    # The picture decoder's folder in its family's layout (decoders/<family>.py: write_tiny).
    decoders.get_family(cfg.decoder_family).write_tiny(out_dir / "sd", arch, cfg, seed, words=sd_words)


def preset_config(cfg, out_dir: Path, relative: bool = False):
    """`cfg` with its weight paths pointing at the files `write_preset_files` wrote to `out_dir`; with
    `relative`, as names inside it (for a config written into `out_dir` itself: the folder can then
    be copied or moved and its config still reads its own files, never the folder it came from)."""
    from lavis import BLIP2_FILE_NAME, VIT_FILE_NAME

    if relative:
        out_dir = Path()
    return cfg.replace(llama_model=str(out_dir / "llama"), vit_model=str(out_dir / VIT_FILE_NAME),
                       q_former_model=str(out_dir / BLIP2_FILE_NAME),
                       ckpt=str(out_dir / "prerained_minigpt4_7b.pth"), sd_model=str(out_dir / "sd"))


def tiny_llm_arch(llm_family: str) -> dict:
    """The tiny LLM architecture of a family (the `llama` section of config/tiny_<family>_arch.yaml;
    vicuna's is config/tiny_arch.yaml's), to pair with another decoder's architecture in
    `write_preset_files`."""
    get_family(llm_family)                       # an unknown name is an error naming the known ones
    name = "tiny_arch.yaml" if llm_family == DEFAULT_FAMILY else f"tiny_{llm_family}_arch.yaml"
    return yaml.safe_load((REPO / "config" / name).read_text())["llama"]


# --------------------------------------------------------------------------------------------
# The full preset: real sizes, real file formats and dtypes, written tensor by tensor
# --------------------------------------------------------------------------------------------

FULL_PRESET = REPO / "config" / "full_preset.yaml"
_SAFETENSORS_METADATA = {"format": "pt"}


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """One deterministic random tensor: its values depend on (seed, name) only, not on the order of
    writing or the sharding. `kind`: "ones" (norm scales), else N(0, 0.02) (weights and biases)."""
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)


def _tensor_plan(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """(state-dict name, shape, kind) for every tensor of a model built on the meta device. Norm
    layers' scales get ones, everything else small random values."""
    plan = []
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or type(module).__name__.endswith("RMSNorm")
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            plan.append((full, tuple(param.shape), "ones" if is_norm and name == "weight" else "normal"))
    expected = set(model.state_dict())
    if {name for name, _, _ in plan} != expected:
        raise RuntimeError(f"internal: {type(model).__name__} has state-dict entries that are not parameters: "
                           f"{sorted(expected - {n for n, _, _ in plan})[:5]}")
    return plan


def write_random_safetensors(model: torch.nn.Module, out_dir: Path, file_name: str, dtype: torch.dtype,
                             seed: int, shard_bytes: int | None = None, progress=None) -> list[Path]:
    """Write random weights for `model` (built on the meta device) as safetensors in `out_dir`.

    One tensor is made at a time and a shard is written as soon as it reaches `shard_bytes`, so the
    writer holds at most one shard in memory whatever the model's size. Without `shard_bytes`, or
    when everything fits in one shard, it writes `file_name` (diffusers' and transformers' single-
    file layout); else `stem-0000i-of-0000n.safetensors` plus `<file_name>.index.json` (the
    Hugging Face sharded layout). Returns the files written.
    """
    from safetensors.torch import save_file

    plan = _tensor_plan(model)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[1]) * itemsize
        if shard_bytes and groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    stem = file_name.removesuffix(".safetensors")
    names = ([file_name] if len(groups) == 1
             else [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, total, written = {}, 0, []
    # A shard's tensors are made in parallel (torch's generators release the GIL; each tensor has its
    # own, so the values do not depend on the threads).
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for group, name in zip(groups, names):
            made = pool.map(lambda entry: _random_tensor(entry[0], entry[1], dtype, entry[2], seed), group)
            tensors = {entry[0]: tensor for entry, tensor in zip(group, made)}
            for tensor_name, tensor in tensors.items():
                weight_map[tensor_name] = name
                total += tensor.nbytes
            save_file(tensors, out_dir / name, metadata=_SAFETENSORS_METADATA)
            written.append(out_dir / name)
            del tensors
            if progress is not None:
                progress.update(sum(math.prod(shape) for _, shape, _ in group))
    if len(groups) > 1:
        (out_dir / f"{file_name}.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return written


_SYLLABLE_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
                    "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr")
_SYLLABLE_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "y")
_SYLLABLE_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "ng", "ck", "st", "nd")


def _synthetic_corpus(n_words: int, n_lines: int, seed: int) -> list[str]:
    """Made-up text with a Zipf-like word distribution: enough distinct, frequent character pairs
    for a BPE vocabulary of tens of thousands of pieces, deterministic in `seed`, no download."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(_SYLLABLE_ONSETS) + rng.choice(_SYLLABLE_VOWELS) + rng.choice(_SYLLABLE_CODAS)
                       for _ in range(rng.choice((1, 1, 2, 2, 3))))

    lexicon = list(dict.fromkeys(word() for _ in range(n_words)))
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    return [" ".join(rng.choices(lexicon, weights, k=12)) for _ in range(n_lines)]


def _meta_model(kind: str, config_dir: Path):
    """A model of the given kind built on the meta device from its folder's config.json."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        if kind == "llama":
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
        if kind == "text_encoder":
            return CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir))
        cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[kind]
        return cls.from_config(cls.load_config(config_dir))


def _human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_full(out_dir: str | os.PathLike, preset_path: str | os.PathLike = FULL_PRESET, seed: int = 0) -> Path:
    """Write the `full` preset (described by `preset_path`, default config/full_preset.yaml) into
    `out_dir`; return the path of its config YAML, `out_dir/full.yaml`.

    Every file is in the real layout and dtype: the LLM as a Hugging Face folder of sharded
    bfloat16 safetensors with a sentencepiece tokenizer of exactly the config's vocabulary size,
    LAVIS `eva_vit_g.pth` (float16) and `blip2_pretrained_flant5xxl.pth`, MiniGPT-4's `.pth`, and a
    diffusers Stable Diffusion folder (float32 safetensors). Sizes come from the preset's model
    config and the architecture folders' config.json files, so a reduced preset file (as the tests
    use) goes through exactly this code. Memory: one LLM shard, or the largest single file (the SD
    UNet, 3.5 GB in float32), at a time.
    """
    from tqdm.auto import tqdm

    from lavis import Blip2TextSizes, write_tiny_lavis
    from configuration import to_dtype

    preset_path = Path(preset_path).resolve()
    spec = yaml.safe_load(preset_path.read_text())
    base = preset_path.parent
    cfg = load_config(base / spec["model_config"], check_paths=False)
    llama_arch, sd_arch = base / spec["llama_arch"], base / spec["sd_arch"]
    dtypes = {k: to_dtype(v) for k, v in spec["file_dtypes"].items()}
    out_dir = Path(out_dir).resolve()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "llama").mkdir(parents=True)
    start = time.perf_counter()

    # The LLM: config, tokenizer, sharded weights.
    llama = _meta_model("llama", llama_arch)
    llama.config.dtype = dtypes["llama"]
    llama.config.save_pretrained(tmp / "llama")
    hidden = llama.config.hidden_size
    log.info("training a %d-piece sentencepiece tokenizer", llama.config.vocab_size)
    corpus = _synthetic_corpus(spec["tokenizer_corpus_words"], spec["tokenizer_corpus_lines"], seed)
    write_tokenizer_files(tmp / "llama", train_llama_tokenizer(llama.config.vocab_size, corpus, exact=True),
                           llama.config.max_position_embeddings)
    sd_kinds = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
    sd_models = {kind: _meta_model(kind, sd_arch / kind) for kind in sd_kinds}
    total = sum(p.numel() for m in (llama, *sd_models.values()) for p in m.parameters())
    with tqdm(total=total, unit="param", unit_scale=True, desc="random weights (LLM, SD)") as bar:
        write_random_safetensors(llama, tmp / "llama", "model.safetensors", dtypes["llama"], seed,
                                 int(float(spec["llama_shard_size_mb"]) * 2**20), bar)
        del llama
        # Stable Diffusion: one folder per part, configs copied from the architecture folder.
        sd_dir = tmp / "sd"
        for kind, file_name in sd_kinds.items():
            (sd_dir / kind).mkdir(parents=True)
            shutil.copy(sd_arch / kind / "config.json", sd_dir / kind / "config.json")
            write_random_safetensors(sd_models.pop(kind), sd_dir / kind, file_name, dtypes["sd"], seed, None, bar)
    (sd_dir / "scheduler").mkdir()
    shutil.copy(sd_arch / "scheduler" / "scheduler_config.json", sd_dir / "scheduler" / "scheduler_config.json")
    write_clip_tokenizer(sd_dir / "tokenizer")
    _write_model_index(sd_dir)

    log.info("writing the LAVIS files and MiniGPT-4's projection")
    vit_path, blip2_path = write_tiny_lavis(tmp, cfg.vision, cfg.qformer, cfg.num_query_token, cfg.image_size,
                                            seed=seed, vit_dtype=dtypes["vit"], blip2_dtype=dtypes["blip2"],
                                            text=Blip2TextSizes(**spec["blip2_text"]))
    write_tiny_minigpt4(tmp / "prerained_minigpt4_7b.pth", cfg.qformer.hidden_size, hidden, seed,
                        dtype=dtypes["minigpt4"])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    full = cfg.replace(
        llama_model=str(out_dir / "llama"), vit_model=str(out_dir / Path(vit_path).name),
        q_former_model=str(out_dir / Path(blip2_path).name),
        ckpt=str(out_dir / "prerained_minigpt4_7b.pth"), sd_model=str(out_dir / "sd"),
    )
    dump_config(full, out_dir / "full.yaml")
    log.info("full preset written to %s: %s on disk in %.0f s", out_dir, _human_bytes(_folder_bytes(out_dir)),
             time.perf_counter() - start)
    return out_dir / "full.yaml"


PRESETS = ("tiny", "small", "real_width", "tiny_llama3", "tiny_qwen2")
# Tiny presets of the other decoder families (config/tiny_<family>.yaml + _arch.yaml; decoders/).
DECODER_PRESETS = ("tiny_sdxl", "tiny_sd3", "tiny_flux")


def build_preset(name: str, out_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Write the named random-weight preset (`config/<name>.yaml` + `config/<name>_arch.yaml`, or
    `config/full_preset.yaml` for "full") into `out_dir` (default `weights/<name>`); return the path
    of its config YAML, `out_dir/<name>.yaml`."""
    if name not in PRESETS + DECODER_PRESETS + ("full",):
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS + DECODER_PRESETS + ('full',))}")
    out_dir = Path(out_dir) if out_dir else REPO / "weights" / name
    if name == "full":
        return build_full(out_dir, seed=seed)
    return build_tiny(out_dir, seed=seed, config_path=REPO / "config" / f"{name}.yaml",
                      arch_path=REPO / "config" / f"{name}_arch.yaml", config_name=f"{name}.yaml")


def ensure_tiny(out_dir: str | os.PathLike = DEFAULT_TINY_DIR) -> Path:
    """Build the tiny preset if `out_dir/tiny.yaml` is missing; return the config path."""
    path = Path(out_dir) / "tiny.yaml"
    if not path.is_file():
        build_tiny(out_dir)
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI: `python weights.py tiny [OUT_DIR] [--seed N]`, or `python weights.py preset NAME [OUT_DIR]`
    for any preset in `PRESETS`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write the tiny preset (random weights in the real formats)")
    tiny.add_argument("out_dir", nargs="?", default=str(DEFAULT_TINY_DIR))
    tiny.add_argument("--seed", type=int, default=0)
    preset = sub.add_parser("preset", help="write a named preset: tiny (tests), small (benchmarks), "
                                           "real_width (real widths at reduced depth: GPU smoke test), "
                                           "full (the real sizes, about 21 GB of disk)")
    preset.add_argument("name", choices=PRESETS + DECODER_PRESETS + ("full",))
    preset.add_argument("out_dir", nargs="?", default=None, help="default: weights/NAME")
    preset.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "tiny":
        path = build_tiny(args.out_dir, seed=args.seed)
        print(f"tiny preset written; config: {path}")
    else:
        path = build_preset(args.name, args.out_dir, seed=args.seed)
        print(f"{args.name} preset written; config: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
