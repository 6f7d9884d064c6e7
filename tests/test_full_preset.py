"""The full-size preset's builder (`python weights.py preset full DIR`), run at reduced sizes through
the same code, and lean loading: the model takes the weight files' tensors without copying them."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "config" / "arch"


def _shrink(src: Path, dst: Path, **changes) -> None:
    config = json.loads(src.read_text())
    config.update(changes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(config))


def reduced_full_preset(folder: Path, shard_mb: float = 0.05, vocab_size: int = 700) -> Path:
    """A preset file like config/full_preset.yaml whose model config and config.json files are the
    real ones with smaller numbers (the tiny preset's sizes)."""
    from configuration import DtypeConfig, dump_config, load_config

    # The tiny sizes with the real dtypes (ViT float16, LLM and SD bfloat16), as in config/minigpt4.yaml.
    dump_config(load_config(REPO / "config" / "tiny.yaml", check_paths=False).replace(dtypes=DtypeConfig()),
                folder / "model.yaml")
    _shrink(ARCH / "vicuna-7b/config.json", folder / "arch/llama/config.json", hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab_size,
            max_position_embeddings=1024)
    sd = ARCH / "stable-diffusion-2-1-base"
    _shrink(sd / "unet/config.json", folder / "arch/sd/unet/config.json", block_out_channels=[32, 64],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=[2, 4], layers_per_block=1, norm_num_groups=16, cross_attention_dim=32, sample_size=16)
    _shrink(sd / "vae/config.json", folder / "arch/sd/vae/config.json", block_out_channels=[16, 32],
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
            norm_num_groups=16, sample_size=32)
    _shrink(sd / "text_encoder/config.json", folder / "arch/sd/text_encoder/config.json", hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32, vocab_size=600)
    (folder / "arch/sd/scheduler").mkdir(parents=True)
    shutil.copy(sd / "scheduler/scheduler_config.json", folder / "arch/sd/scheduler/scheduler_config.json")
    spec = yaml.safe_load((REPO / "config" / "full_preset.yaml").read_text())
    spec.update(model_config="model.yaml", llama_arch="arch/llama", sd_arch="arch/sd", llama_shard_size_mb=shard_mb,
                blip2_text={"vocab_size": 50, "max_position_embeddings": 16, "embed_dim": 8, "t5_hidden_size": 12},
                tokenizer_corpus_words=3000, tokenizer_corpus_lines=1500)
    path = folder / "full_preset.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def reduced_full(tmp_path_factory):
    from presets import build_full

    folder = tmp_path_factory.mktemp("reduced_full")
    return build_full(folder / "weights", reduced_full_preset(folder), seed=0), folder


@pytest.fixture(scope="module")
def reduced_model(reduced_full):
    from model import MiniGPT5_Model

    return MiniGPT5_Model.from_weights(reduced_full[0], device="cpu")


def _safetensors_dtypes(path: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def _numels(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _meta_counts(cfg, folder: Path) -> dict[str, int]:
    from model import MiniGPT5_Model

    meta = MiniGPT5_Model(cfg.replace(llama_model=str(folder / "arch/llama"), sd_model=str(folder / "arch/sd")),
                          device="meta")
    return _counts(meta)


def _counts(model) -> dict[str, int]:
    count = lambda module: sum(p.numel() for p in module.parameters())
    m = model.model
    return {"vit": count(m.visual_encoder), "qformer": count(m.Qformer), "llm": count(m.llama_model),
            "unet": count(model.unet), "vae": count(model.vae), "text_encoder": count(model.sd_text_encoder),
            "mapper": count(model.llm_to_t2i_mapping)}


def test_reduced_full_preset_files_have_the_real_layout_and_dtypes(reduced_full):
    import sentencepiece as spm

    config_path, folder = reduced_full
    out = config_path.parent
    llama = out / "llama"
    shards = sorted(llama.glob("model-*-of-*.safetensors"))
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(_safetensors_dtypes(s) == {"BF16"} for s in shards)
    assert index["metadata"]["total_size"] == 2 * sum(_numels(s) for s in shards)      # bytes of bfloat16
    config = json.loads((llama / "config.json").read_text())
    assert config["vocab_size"] == 700 and config["dtype"] == "bfloat16"
    assert spm.SentencePieceProcessor(model_file=str(llama / "tokenizer.model")).get_piece_size() == 700

    vit = torch.load(out / "eva_vit_g.pth", weights_only=True)
    assert {t.dtype for t in vit.values()} == {torch.float16}
    assert {int(k.split(".")[1]) for k in vit if k.startswith("blocks.")} == {0, 1, 2}   # one block more than used
    blip2 = torch.load(out / "blip2_pretrained_flant5xxl.pth", weights_only=True)["model"]
    assert {t.dtype for k, t in blip2.items() if k != "Qformer.bert.embeddings.position_ids"} == {torch.float32}
    assert blip2["Qformer.bert.embeddings.word_embeddings.weight"].shape[0] == 50
    proj = torch.load(out / "prerained_minigpt4_7b.pth", weights_only=True)["model"]
    assert proj["llama_proj.weight"].dtype == torch.float32

    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        assert [p.name for p in (out / "sd" / part).glob("*.safetensors")] == [f"{name}.safetensors"]
        assert _safetensors_dtypes(out / "sd" / part / f"{name}.safetensors") == {"F32"}
        assert json.loads((out / "sd" / part / "config.json").read_text()) == \
            json.loads((folder / "arch/sd" / part / "config.json").read_text())


def test_reduced_full_preset_loads_at_the_architecture_sizes_and_generates(reduced_full, reduced_model):
    """Loaded through the real loading code, every part has the parameter count of the same architecture
    built on the meta device; the SD text encoder is read only when first used."""
    from configuration import load_config

    config_path, folder = reduced_full
    model = reduced_model
    assert "sd_text_encoder" not in model._modules
    assert not any(k.startswith("sd_text_encoder.") for k in model.state_dict())
    assert model.model.visual_encoder.embeddings.patch_embedding.weight.dtype == torch.float16
    assert model.model.llama_model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.unet.dtype == torch.bfloat16
    out = model.generate("###Human: <Img><ImageHere></Img> next ###Assistant:", [torch.zeros(3, 32, 32)], seed=0,
                         max_new_tokens=10, force_generation=True, num_inference_steps=2)[0]
    assert out.token_ids[:8] == model.model.voken_ids[:8] and out.image.size == (32, 32)
    model.sd_baseline(["a red square"], seeds=[0], num_inference_steps=1)
    assert "sd_text_encoder" in model._modules and model.sd_text_encoder.dtype == torch.float32
    assert _counts(model) == _meta_counts(load_config(config_path), folder)


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file mappings (Linux /proc/self/maps)."""
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            maps.append((start, end, parts[5]))
    return maps


def test_loading_keeps_the_weight_files_memory_mapped(reduced_model):
    """Lean loading: where a file's dtype is the part's dtype (LLM bfloat16 safetensors, ViT float16
    .pth), the parameters are views of the memory-mapped files, not copies: loading the full-size
    model never holds two copies of those parts. The voken rows are float32 copies, as the release."""

    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs Linux /proc")
    model = reduced_model
    maps = _mapped_files()

    def mapped_from(tensor) -> str | None:
        ptr = tensor.untyped_storage().data_ptr()
        return next((path for start, end, path in maps if start <= ptr < end), None)

    llm = model.model.llama_model
    for name, param in llm.named_parameters():
        if ".new_weight" in name or ".frozen_weight" in name:
            assert mapped_from(param) is None, name                  # float32 voken rows: copies
        else:
            assert (mapped_from(param) or "").endswith(".safetensors"), name
    for name, param in model.model.visual_encoder.named_parameters():
        # Made, not read: each qkv bias is cat(q_bias, 0, v_bias); ln_vision comes from the float32 BLIP-2 file.
        if "qkv.bias" not in name and "post_layernorm" not in name:
            assert (mapped_from(param) or "").endswith("eva_vit_g.pth"), name


def test_writer_values_depend_on_name_and_seed_only(tmp_path):
    """Sharding does not change the values; the seed does."""
    from safetensors.torch import load_file

    from presets import write_random_safetensors

    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    one = write_random_safetensors(net, tmp_path / "a", "model.safetensors", torch.bfloat16, seed=0)
    many = write_random_safetensors(net, tmp_path / "b", "model.safetensors", torch.bfloat16, seed=0, shard_bytes=64)
    other = write_random_safetensors(net, tmp_path / "c", "model.safetensors", torch.bfloat16, seed=1)
    assert len(one) == 1 and len(many) > 2 and (tmp_path / "b/model.safetensors.index.json").is_file()
    a = load_file(one[0])
    b = {k: v for f in many for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["1.weight"], torch.ones(16, dtype=torch.bfloat16))
    assert not torch.equal(a["0.weight"], load_file(other[0])["0.weight"])


def test_full_preset_writes_exactly_the_real_parameter_counts():
    """The writer's plan for the real architectures (config/arch, on the meta device) has the real
    models' parameter counts: Vicuna-7B and SD 2.1-base's UNet, VAE and text encoder."""
    from presets import _meta_model, _tensor_plan

    counts = {kind: sum(math.prod(shape) for _, shape, _ in _tensor_plan(_meta_model(kind, path)))
              for kind, path in (("llama", ARCH / "vicuna-7b"),
                                 ("unet", ARCH / "stable-diffusion-2-1-base/unet"),
                                 ("vae", ARCH / "stable-diffusion-2-1-base/vae"),
                                 ("text_encoder", ARCH / "stable-diffusion-2-1-base/text_encoder"))}
    assert counts == {"llama": 6_738_415_616, "unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def test_preset_full_cli_names_the_preset(tmp_path):
    out = subprocess.run([sys.executable, "weights.py", "preset", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0 and "full" in out.stdout
