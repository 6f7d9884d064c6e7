"""Tests for `lavis.py`: LAVIS EVA ViT / BLIP-2 Q-Former files read into transformers' Blip2 modules.

The numerical tests write their own LAVIS-layout files (not via `write_tiny_lavis`) and compare the
loaded transformers modules with a direct re-implementation of the EVA block and the Q-Former query path.
"""
from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # plain `pytest` from the repo root does not put it on sys.path
    sys.path.insert(0, str(REPO_ROOT))

import lavis  # noqa: E402
from configuration import QFormerConfig, VisionConfig  # noqa: E402

LAVIS_KEYS = Path(__file__).resolve().parent / "data" / "lavis_keys"   # the real files' key names (README there)

IMAGE = 32
NUM_QUERY = 4
# Vision width differs from the Q-Former width so that a cross-attention key/value mix-up shows.
VISION = VisionConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                      patch_size=8, layer_norm_eps=1e-6)
QFORMER = QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        cross_attention_frequency=2, layer_norm_eps=1e-12)


# ------------------------------------------------------------------------------------------------------
# Test-local writer (independent of lavis.write_tiny_lavis); larger scales so every term matters.
# ------------------------------------------------------------------------------------------------------


class Gen:
    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * std + mean

    def lin(self, sd: dict, name: str, out_f: int, in_f: int) -> None:
        sd[name + ".weight"] = self(out_f, in_f, std=1.0 / math.sqrt(in_f))
        sd[name + ".bias"] = self(out_f, std=0.3)

    def ln(self, sd: dict, name: str, n: int) -> None:
        sd[name + ".weight"] = self(n, mean=1.0, std=0.3)
        sd[name + ".bias"] = self(n, std=0.3)


def local_vit_sd(seed: int = 1, blocks: int | None = None) -> dict[str, torch.Tensor]:
    r, h, p = Gen(seed), VISION.hidden_size, VISION.patch_size
    sd = {"cls_token": r(1, 1, h), "pos_embed": r(1, (IMAGE // p) ** 2 + 1, h, std=0.5),
          "patch_embed.proj.weight": r(h, 3, p, p, std=1.0 / math.sqrt(3 * p * p)),
          "patch_embed.proj.bias": r(h, std=0.3)}
    for i in range(VISION.num_hidden_layers + 1 if blocks is None else blocks):
        b = f"blocks.{i}."
        r.ln(sd, b + "norm1", h)
        sd[b + "attn.qkv.weight"] = r(3 * h, h, std=1.0 / math.sqrt(h))
        sd[b + "attn.q_bias"] = r(h, std=0.3)
        sd[b + "attn.v_bias"] = r(h, std=0.3)
        r.lin(sd, b + "attn.proj", h, h)
        r.ln(sd, b + "norm2", h)
        r.lin(sd, b + "mlp.fc1", VISION.intermediate_size, h)
        r.lin(sd, b + "mlp.fc2", h, VISION.intermediate_size)
    return sd


def local_blip2_sd(seed: int = 2) -> dict[str, torch.Tensor]:
    r, h, f, vh = Gen(seed), QFORMER.hidden_size, QFORMER.intermediate_size, VISION.hidden_size
    p = "Qformer.bert."
    sd = {p + "embeddings.word_embeddings.weight": r(10, h), p + "embeddings.position_embeddings.weight": r(8, h),
          "query_tokens": r(1, NUM_QUERY, h), "vision_proj.weight": r(8, h), "temp": torch.tensor(0.07)}
    r.ln(sd, p + "embeddings.LayerNorm", h)
    r.ln(sd, "ln_vision", vh)
    for i in range(QFORMER.num_hidden_layers):
        b = f"{p}encoder.layer.{i}."
        for block, kv in [("attention", h)] + ([("crossattention", vh)] if i % 2 == 0 else []):
            r.lin(sd, f"{b}{block}.self.query", h, h)
            r.lin(sd, f"{b}{block}.self.key", h, kv)
            r.lin(sd, f"{b}{block}.self.value", h, kv)
            r.lin(sd, f"{b}{block}.output.dense", h, h)
            r.ln(sd, f"{b}{block}.output.LayerNorm", h)
        for suffix in ("", "_query"):
            r.lin(sd, f"{b}intermediate{suffix}.dense", f, h)
            r.lin(sd, f"{b}output{suffix}.dense", h, f)
            r.ln(sd, f"{b}output{suffix}.LayerNorm", h)
    r.lin(sd, "Qformer.cls.predictions.decoder", 10, h)
    return sd


@pytest.fixture
def local_files(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    vit_sd, blip2_sd = local_vit_sd(), local_blip2_sd()
    vit_path, blip2_path = tmp_path / "eva_vit_g.pth", tmp_path / "blip2.pth"
    torch.save(vit_sd, vit_path)
    torch.save({"model": blip2_sd}, blip2_path)
    return vit_path, blip2_path, vit_sd, blip2_sd


# ------------------------------------------------------------------------------------------------------
# Direct re-implementations
# ------------------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = q.shape
    m = k.shape[1]
    q = q.view(b, n, heads, d // heads).transpose(1, 2)
    k = k.view(b, m, heads, d // heads).transpose(1, 2)
    v = v.view(b, m, heads, d // heads).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, d)


def eva_forward(sd: dict, pixels: torch.Tensor, ln_vision: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    h, eps = VISION.hidden_size, VISION.layer_norm_eps
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=VISION.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(VISION.num_hidden_layers):
        b = f"blocks.{i}."
        y = F.layer_norm(x, (h,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        w = sd[b + "attn.qkv.weight"]
        q = y @ w[:h].T + sd[b + "attn.q_bias"]
        k = y @ w[h:2 * h].T  # no key bias
        v = y @ w[2 * h:].T + sd[b + "attn.v_bias"]
        a = attention(q, k, v, VISION.num_attention_heads)
        x = x + F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.layer_norm(x, (h,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        y = F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(y, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (h,), ln_vision[0], ln_vision[1], eps)


def qformer_forward(sd: dict, image_feats: torch.Tensor) -> torch.Tensor:
    h, eps, p = QFORMER.hidden_size, QFORMER.layer_norm_eps, "Qformer.bert."

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (h,), sd[name + ".weight"], sd[name + ".bias"], eps)

    def bert_attention(x: torch.Tensor, context: torch.Tensor, name: str) -> torch.Tensor:
        a = attention(lin(x, name + ".self.query"), lin(context, name + ".self.key"),
                      lin(context, name + ".self.value"), QFORMER.num_attention_heads)
        return ln(lin(a, name + ".output.dense") + x, name + ".output.LayerNorm")  # post-LN

    x = ln(sd["query_tokens"].expand(image_feats.shape[0], -1, -1), p + "embeddings.LayerNorm")
    for i in range(QFORMER.num_hidden_layers):
        b = f"{p}encoder.layer.{i}."
        x = bert_attention(x, x, b + "attention")
        if i % QFORMER.cross_attention_frequency == 0:
            x = bert_attention(x, image_feats, b + "crossattention")
        y = F.gelu(lin(x, b + "intermediate_query.dense"))
        x = ln(lin(y, b + "output_query.dense") + x, b + "output_query.LayerNorm")
    return x


# ------------------------------------------------------------------------------------------------------
# 1-2. Numerical equivalence
# ------------------------------------------------------------------------------------------------------


def test_eva_vit_matches_direct_implementation(local_files) -> None:
    vit_path, blip2_path, vit_sd, blip2_sd = local_files
    torch.manual_seed(0)
    model = lavis.build_vision_model(VISION, IMAGE)
    lavis.load_eva_vit(model, vit_path, blip2_path)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    want = eva_forward(vit_sd, pixels, (blip2_sd["ln_vision.weight"], blip2_sd["ln_vision.bias"]))
    assert got.shape == (2, (IMAGE // VISION.patch_size) ** 2 + 1, VISION.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The k third of the fused bias is zero; q and v thirds are the file's biases.
    bias = model.encoder.layers[1].self_attn.qkv.bias
    h = VISION.hidden_size
    assert torch.equal(bias[h:2 * h], torch.zeros(h))
    assert torch.equal(bias[:h], vit_sd["blocks.1.attn.q_bias"])
    assert torch.equal(bias[2 * h:], vit_sd["blocks.1.attn.v_bias"])


def test_qformer_matches_direct_implementation(local_files) -> None:
    _, blip2_path, _, blip2_sd = local_files
    model, query_tokens = lavis.build_qformer(QFORMER, VISION.hidden_size, NUM_QUERY)
    lavis.load_qformer(model, query_tokens, blip2_path)
    assert query_tokens.shape == (1, NUM_QUERY, QFORMER.hidden_size)
    assert torch.equal(query_tokens.detach(), blip2_sd["query_tokens"])
    image_feats = torch.randn(2, 17, VISION.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=image_feats).last_hidden_state
    want = qformer_forward(blip2_sd, image_feats)
    assert got.shape == (2, NUM_QUERY, QFORMER.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Dropout is off, so training mode gives the same result.
    model.train()
    with torch.no_grad():
        again = model(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=image_feats)
    torch.testing.assert_close(again.last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_dtype_cast_and_bare_state_dict(tmp_path: Path) -> None:
    vit_path, blip2_path = tmp_path / "vit.pth", tmp_path / "blip2.pth"
    torch.save(local_vit_sd(), vit_path)
    blip2_sd = local_blip2_sd()
    torch.save(blip2_sd, blip2_path)  # bare state dict, no "model" wrapper
    model = lavis.build_vision_model(VISION, IMAGE)
    lavis.load_eva_vit(model, vit_path, blip2_path, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert torch.equal(model.post_layernorm.weight, blip2_sd["ln_vision.weight"].half())
    qformer, query_tokens = lavis.build_qformer(QFORMER, VISION.hidden_size, NUM_QUERY)
    lavis.load_qformer(qformer, query_tokens, blip2_path, dtype=torch.bfloat16)
    assert {p.dtype for p in qformer.parameters()} == {torch.bfloat16}
    assert query_tokens.dtype == torch.bfloat16 and isinstance(query_tokens, torch.nn.Parameter)
    assert torch.equal(query_tokens.detach(), blip2_sd["query_tokens"].bfloat16())


# ------------------------------------------------------------------------------------------------------
# 3. Errors and warnings
# ------------------------------------------------------------------------------------------------------


def test_missing_vit_key_names_file_and_key(tmp_path: Path) -> None:
    sd = local_vit_sd()
    del sd["blocks.1.attn.v_bias"]
    vit_path, blip2_path = tmp_path / "eva_vit_g.pth", tmp_path / "blip2.pth"
    torch.save(sd, vit_path)
    torch.save({"model": local_blip2_sd()}, blip2_path)
    with pytest.raises(KeyError) as info:
        lavis.load_eva_vit(lavis.build_vision_model(VISION, IMAGE), vit_path, blip2_path)
    assert isinstance(info.value, ValueError)
    assert "blocks.1.attn.v_bias" in str(info.value) and str(vit_path) in str(info.value)


def test_missing_ln_vision_and_qformer_keys(tmp_path: Path) -> None:
    vit_path, blip2_path = tmp_path / "eva_vit_g.pth", tmp_path / "blip2.pth"
    torch.save(local_vit_sd(), vit_path)
    sd = local_blip2_sd()
    del sd["ln_vision.bias"], sd["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"]
    torch.save({"model": sd}, blip2_path)
    with pytest.raises(KeyError, match=r"ln_vision\.bias") as info:
        lavis.load_eva_vit(lavis.build_vision_model(VISION, IMAGE), vit_path, blip2_path)
    assert str(blip2_path) in str(info.value)
    model, query_tokens = lavis.build_qformer(QFORMER, VISION.hidden_size, NUM_QUERY)
    with pytest.raises(KeyError, match=r"encoder\.layer\.2\.crossattention\.self\.key\.weight") as info:
        lavis.load_qformer(model, query_tokens, blip2_path)
    assert str(blip2_path) in str(info.value)


def test_fewer_blocks_than_configured_is_missing(tmp_path: Path) -> None:
    vit_path, blip2_path = tmp_path / "eva_vit_g.pth", tmp_path / "blip2.pth"
    torch.save(local_vit_sd(blocks=1), vit_path)
    torch.save({"model": local_blip2_sd()}, blip2_path)
    with pytest.raises(KeyError, match=r"blocks\.1\.norm1\.weight"):
        lavis.load_eva_vit(lavis.build_vision_model(VISION, IMAGE), vit_path, blip2_path)


def test_shape_mismatch_names_file_key_and_shapes(local_files) -> None:
    vit_path, blip2_path, _, _ = local_files
    other = VisionConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                         patch_size=8, layer_norm_eps=1e-6)
    with pytest.raises(ValueError) as info:
        lavis.load_eva_vit(lavis.build_vision_model(other, IMAGE), vit_path, blip2_path)
    message = str(info.value)
    assert str(vit_path) in message and "blocks.0.mlp.fc1.weight" in message
    assert "(96, 48)" in message and "(80, 48)" in message
    model, query_tokens = lavis.build_qformer(QFORMER, 40, NUM_QUERY)  # wrong image width
    with pytest.raises(ValueError, match=r"crossattention\.self\.key\.weight.*\(32, 48\).*\(32, 40\)"):
        lavis.load_qformer(model, query_tokens, blip2_path)


def _messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_unused_keys_are_reported(local_files, caplog) -> None:
    """Keys every real file has but MiniGPT-4 does not read (the dropped last ViT block, BLIP-2's
    text path and heads) are listed at INFO; only other unused keys are a warning."""
    vit_path, blip2_path, _, _ = local_files
    with caplog.at_level(logging.INFO, logger="lavis"):
        lavis.load_eva_vit(lavis.build_vision_model(VISION, IMAGE), vit_path, blip2_path)
    assert _messages(caplog, logging.WARNING) == []
    (vit_info,) = _messages(caplog, logging.INFO)
    assert str(vit_path) in vit_info and "as designed" in vit_info
    assert "blocks.2.attn.qkv.weight" in vit_info and "blocks.2.mlp.fc2.bias" in vit_info
    assert "blocks.1." not in vit_info

    caplog.clear()
    model, query_tokens = lavis.build_qformer(QFORMER, VISION.hidden_size, NUM_QUERY)
    with caplog.at_level(logging.INFO, logger="lavis"):
        lavis.load_qformer(model, query_tokens, blip2_path)
    assert _messages(caplog, logging.WARNING) == []
    (info,) = _messages(caplog, logging.INFO)
    listed = set(info.split(": ")[-1].split(", "))
    expected = {k for k in local_blip2_sd() if k.startswith(("Qformer.cls.", "ln_vision", "vision_proj", "temp"))
                or "embeddings.word_" in k or "embeddings.position_" in k
                or re.search(r"layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.", k)}
    assert listed == expected


def test_surprising_unused_keys_are_a_warning(tmp_path: Path, caplog) -> None:
    vit_path, blip2_path = tmp_path / "eva_vit_g.pth", tmp_path / "blip2.pth"
    vit_sd = local_vit_sd()
    vit_sd["pos_embed_extra"] = torch.zeros(3)
    torch.save(vit_sd, vit_path)
    blip2_sd = local_blip2_sd()
    blip2_sd["Qformer.bert.encoder.layer.0.adapter.weight"] = torch.zeros(3)
    torch.save({"model": blip2_sd}, blip2_path)
    with caplog.at_level(logging.INFO, logger="lavis"):
        lavis.load_eva_vit(lavis.build_vision_model(VISION, IMAGE), vit_path, blip2_path)
        lavis.load_qformer(*lavis.build_qformer(QFORMER, VISION.hidden_size, NUM_QUERY), blip2_path)
    vit_warning, qformer_warning = _messages(caplog, logging.WARNING)
    assert str(vit_path) in vit_warning and vit_warning.endswith(": pos_embed_extra")
    assert qformer_warning.endswith(": Qformer.bert.encoder.layer.0.adapter.weight")


# ------------------------------------------------------------------------------------------------------
# 4. write_tiny_lavis
# ------------------------------------------------------------------------------------------------------


def test_write_tiny_lavis_loads_and_is_deterministic(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lavis")
    vit_path, blip2_path = lavis.write_tiny_lavis(tmp_path / "a", VISION, QFORMER, NUM_QUERY, IMAGE, seed=5)
    assert (vit_path.name, blip2_path.name) == ("eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth")
    vit_sd = torch.load(vit_path, weights_only=True)
    blip2 = torch.load(blip2_path, weights_only=True)
    assert set(blip2) == {"model"}
    for key, value in {**vit_sd, **blip2["model"]}.items():
        assert torch.isfinite(value.float()).all(), key
        if key.endswith(("bias", "q_bias", "v_bias")):
            assert (value != 0).all(), key

    vision = lavis.build_vision_model(VISION, IMAGE)
    qformer, query_tokens = lavis.build_qformer(QFORMER, VISION.hidden_size, NUM_QUERY)
    lavis.load_eva_vit(vision, vit_path, blip2_path)
    lavis.load_qformer(qformer, query_tokens, blip2_path)
    with torch.no_grad():
        feats = vision(pixel_values=torch.randn(1, 3, IMAGE, IMAGE)).last_hidden_state
        out = qformer(query_embeds=query_tokens.expand(1, -1, -1), encoder_hidden_states=feats).last_hidden_state
    assert torch.isfinite(out).all() and out.shape == (1, NUM_QUERY, QFORMER.hidden_size)
    vit_note = next(r.getMessage() for r in caplog.records if str(vit_path) in r.getMessage())
    assert f"blocks.{VISION.num_hidden_layers}.attn.qkv.weight" in vit_note  # the extra "40th" block

    again, _ = lavis.write_tiny_lavis(tmp_path / "b", VISION, QFORMER, NUM_QUERY, IMAGE, seed=5)
    other, _ = lavis.write_tiny_lavis(tmp_path / "c", VISION, QFORMER, NUM_QUERY, IMAGE, seed=6)
    same, different = torch.load(again, weights_only=True), torch.load(other, weights_only=True)
    assert all(torch.equal(vit_sd[k], same[k]) for k in vit_sd)
    assert not torch.equal(vit_sd["blocks.0.attn.qkv.weight"], different["blocks.0.attn.qkv.weight"])


def _normalise(keys) -> set[str]:
    return {re.sub(r"\b(blocks|layer)\.\d+\.", r"\1.N.", k) for k in keys}


def test_write_tiny_lavis_matches_reference_key_names(tmp_path: Path) -> None:
    vit_path, blip2_path = lavis.write_tiny_lavis(tmp_path, VISION, QFORMER, NUM_QUERY, IMAGE)
    vit_sd = torch.load(vit_path, weights_only=True)
    blip2_sd = torch.load(blip2_path, weights_only=True)["model"]
    ref_vit = json.loads((LAVIS_KEYS / "eva_vit_g_keys.json").read_text())
    ref_qformer = json.loads((LAVIS_KEYS / "blip2_qformer_keys.json").read_text())

    assert _normalise(vit_sd) == _normalise(ref_vit)
    ours_qformer = {k for k in blip2_sd if k.startswith("Qformer.") or k == "query_tokens"}
    assert _normalise(ours_qformer) == _normalise(ref_qformer)
    assert {"ln_vision.weight", "ln_vision.bias"} <= set(blip2_sd)
    # Same rank for every shared name; layer-independent sizes match the tiny config's.
    for ours, ref in ((vit_sd, ref_vit), (blip2_sd, ref_qformer)):
        ref_by_name = {_normalise([k]).pop(): shape for k, shape in ref.items()}
        for key, value in ours.items():
            name = _normalise([key]).pop()
            if name in ref_by_name:
                assert value.dim() == len(ref_by_name[name]), key
    # The real files' cross-attention layers are the even ones (frequency 2), as in the tiny file.
    ref_cross = {int(m.group(1)) for k in ref_qformer if (m := re.search(r"layer\.(\d+)\.crossattention", k))}
    assert ref_cross == set(range(0, 12, 2))


# ------------------------------------------------------------------------------------------------------
# 5. Real sizes on the meta device
# ------------------------------------------------------------------------------------------------------


def test_real_size_parameter_counts_on_meta() -> None:
    vision = VisionConfig(hidden_size=1408, num_hidden_layers=39, num_attention_heads=16, intermediate_size=6144,
                          patch_size=14, layer_norm_eps=1e-6)
    qformer = QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            cross_attention_frequency=2, layer_norm_eps=1e-12)
    with torch.device("meta"):
        vision_model = lavis.build_vision_model(vision, 224)
        qformer_model, query_tokens = lavis.build_qformer(qformer, vision.hidden_size, 32)
    params = [*vision_model.parameters(), *qformer_model.parameters(), query_tokens]
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in vision_model.parameters()) == 985_952_256
    assert sum(p.numel() for p in qformer_model.parameters()) == 105_137_664
    assert query_tokens.numel() == 24_576
    assert vision_model.embeddings.position_embedding.shape == (1, 257, 1408)
    with pytest.raises(ValueError, match="meta"):
        lavis.load_qformer(qformer_model, query_tokens, "unused.pth")
