"""Where the model runs: the device flag, CPU offload between uses, the LLM quantised with
bitsandbytes, and the SD text encoder loaded only when used. On the tiny preset, on the CPU (the
offload hooks run, moving nothing; bitsandbytes >= 0.45 quantises on the CPU too)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from model import MiniGPT5_Model
from placement import TakeTurns, resolve_device

REPO = Path(__file__).resolve().parents[1]
PROMPT = "###Human: <Img><ImageHere></Img> what next? ###Assistant:"
FAST = {"max_new_tokens": 12, "num_inference_steps": 2, "force_generation": True}


def _answer(model, picture_tensor, seed=3):
    out = model.generate(PROMPT, [picture_tensor], seed=seed, **FAST)[0]
    return out.token_ids, torch.tensor(list(out.image.getdata()))


@pytest.fixture(scope="module")
def picture_tensor():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_device_defaults_to_the_gpu_when_present():
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            resolve_device("cuda")


def test_from_weights_places_the_model_and_keeps_the_configured_dtypes(tiny_config, tmp_path):
    """On the device asked for, each part keeps its configured dtype (the release's: ViT float16,
    LLM and SD bfloat16, trainable parts and voken rows float32)."""
    from configuration import DtypeConfig, dump_config

    path = tmp_path / "real_dtypes.yaml"
    dump_config(tiny_config.replace(dtypes=DtypeConfig()), path)
    model = MiniGPT5_Model.from_weights(path, device="cpu")
    assert model.device == torch.device("cpu") and not model.training
    m = model.model
    assert m.visual_encoder.embeddings.patch_embedding.weight.dtype == torch.float16
    assert m.llama_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert m.llama_model.get_input_embeddings().frozen_weight.dtype == torch.float32
    assert model.unet.dtype == model.vae.dtype == torch.bfloat16
    assert model.fc[0].weight.dtype == model.t2i_decoder_prompt.dtype == torch.float32


def test_sd_text_encoder_is_loaded_only_when_used(tiny_config, tiny_tokenizer):
    from conftest import VOKEN_TARGET, make_batch

    model = MiniGPT5_Model(tiny_config, stage=1)
    model.train()                                   # mode switches do not load it
    assert "sd_text_encoder" not in model._modules
    batch = make_batch(tiny_tokenizer, [{"source": "a cat", "target": VOKEN_TARGET, "caption": "a cat"}])
    losses = model(batch)                           # the caption loss needs it
    assert "caption_loss" in losses and "sd_text_encoder" in model._modules
    encoder = model.sd_text_encoder
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert model.num_trainable_parameters() == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_offload_gives_the_same_answer_and_takes_turns(tiny_config_path, picture_tensor):
    """With `offload`, the ViT, Q-Former, UNet and VAE sit behind accelerate hooks that move each to the
    device when it runs (on the CPU: a move to where it is); the answer is unchanged."""
    model = MiniGPT5_Model.from_weights(tiny_config_path, device="cpu")
    reference = _answer(model, picture_tensor)
    model.place("cpu", offload=True)
    turns = model._offload
    assert isinstance(turns, TakeTurns) and turns.device == torch.device("cpu")
    parts = [model.model.visual_encoder, model.model.Qformer, model.unet, model.vae]
    assert turns.parts == parts and all(hasattr(p, "_hf_hook") for p in parts)
    tokens, pixels = _answer(model, picture_tensor)
    assert tokens == reference[0] and torch.equal(pixels, reference[1])
    # ViT, Q-Former, then 3 UNet calls (2 PNDM steps) and the VAE decoder: each ran behind its hook.
    assert turns.turns == 1 + 1 + 3 + 1 and turns.moves == 0
    model.sd_baseline(["a cat"], seeds=[0], num_inference_steps=1)     # the text encoder joins the group
    assert turns.parts[-1] is model.sd_text_encoder and hasattr(model.sd_text_encoder, "_hf_hook")
    model.place("cpu")                                                  # without offload: hooks removed
    assert model._offload is None and not hasattr(model.unet, "_hf_hook")
    with pytest.raises(ValueError, match="offload needs a real device"):
        MiniGPT5_Model(model.cfg, offload=True)


def test_take_turns_sends_the_previous_part_back():
    """The turn logic with a device that is not the CPU (meta: moves without data)."""
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    turns = TakeTurns(torch.device("meta"), [a, b])
    turns._make_room(a)
    assert a.weight.is_meta and b.weight.device.type == "cpu" and turns.moves == 1
    turns._make_room(a)                                     # already there: nothing moves
    assert turns.moves == 1 and turns.turns == 2
    a.to_empty(device="cpu")                                # (meta tensors cannot be copied back)
    turns._make_room(b)
    assert b.weight.is_meta and a.weight.device.type == "cpu" and turns.moves == 2


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantised_llm_generates(tiny_config_path, picture_tensor, bits):
    """The LLM's linear layers are bitsandbytes modules; the voken rows stay float32; generation runs
    (vokens forced) and draws the picture."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = MiniGPT5_Model.from_weights(tiny_config_path, device="cpu", llm_quantization=bits)
    layer = model.model.llama_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit)
    assert model.model.llama_model.get_output_embeddings().frozen_weight.dtype == torch.float32
    out = model.generate(PROMPT, [picture_tensor], seed=3, max_new_tokens=9, num_inference_steps=1,
                         force_generation=True)[0]
    assert out.token_ids[:8] == model.model.voken_ids and out.image.size == (32, 32)


def test_quantisation_errors_are_clear(monkeypatch, tiny_config):
    import importlib.util

    from minigpt4 import llm_quantization_config

    assert llm_quantization_config(None) is None
    with pytest.raises(ValueError, match="one of"):
        llm_quantization_config("3bit")
    with pytest.raises(ValueError, match="meta"):
        MiniGPT5_Model(tiny_config, device="meta", llm_quantization="8bit")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match="requirements-quantization.txt"):
        llm_quantization_config("4bit")


def test_playground_refuses_a_missing_gpu_clearly(tiny_config_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    sys.path.insert(0, str(REPO / "examples"))
    import playground

    with pytest.raises(SystemExit, match="no CUDA GPU is available"):
        playground.main(["--model_config", str(tiny_config_path), "--device", "cuda", "--num_samples", "1"])


def test_sd_text_encoder_first_used_in_inference_mode_stays_usable(tiny_config):
    """Lightning validates (and predicts) under inference mode; the text encoder first loaded there
    still holds ordinary tensors, so training can use it afterwards."""
    model = MiniGPT5_Model(tiny_config, stage=1)
    with torch.inference_mode():
        first = model.encode_caption(["a cat"])
    assert not any(p.is_inference() for p in model.sd_text_encoder.parameters())
    assert torch.equal(model.encode_caption(["a cat"]), first.clone())


def test_place_with_offload_moves_everything_but_the_offloaded_parts(tiny_config):
    """`place(device, offload=True)` moves the LLM, mapper and the rest to the device and leaves the
    ViT, Q-Former, UNet and VAE on the CPU (the meta device stands in for a GPU here)."""
    model = MiniGPT5_Model(tiny_config, stage=1)
    model.place("meta", offload=True)
    assert model.device == torch.device("meta")
    for part in (model.model.llama_model, model.fc, model.llm_to_t2i_mapping, model.model.llama_proj):
        assert all(p.is_meta for p in part.parameters())
    assert model.t2i_decoder_prompt.is_meta and model.model.query_tokens.is_meta
    for part in (model.model.visual_encoder, model.model.Qformer, model.unet, model.vae):
        assert all(p.device.type == "cpu" for p in part.parameters())
