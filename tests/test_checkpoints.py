"""Checkpoints: only trainable tensors, under the release's key names (REFERENCE §6); the release's
stage-1 and stage-2 files load; save -> load reproduces outputs bit for bit."""
from __future__ import annotations

import re

import torch

from test_model import CC3M_LIKE, STORY_LIKE, batch_for, build


def _mapper_keys(enc: int, dec: int) -> list[str]:
    """`nn.Transformer` parameter names, written out by hand from PyTorch's module layout."""
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    ffn = ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    keys = []
    for i in range(enc):
        p = f"llm_to_t2i_mapping.encoder.layers.{i}."
        keys += [p + "self_attn." + a for a in attn] + [p + f for f in ffn]
        keys += [p + f"norm{j}.{w}" for j in (1, 2) for w in ("weight", "bias")]
    for i in range(dec):
        p = f"llm_to_t2i_mapping.decoder.layers.{i}."
        keys += [p + "self_attn." + a for a in attn] + [p + "multihead_attn." + a for a in attn] + [p + f for f in ffn]
        keys += [p + f"norm{j}.{w}" for j in (1, 2, 3) for w in ("weight", "bias")]
    keys += [f"llm_to_t2i_mapping.{part}.norm.{w}" for part in ("encoder", "decoder") for w in ("weight", "bias")]
    return keys


def release_stage1_keys(cfg, n_layers_unused=None) -> list[str]:
    return (["t2i_decoder_prompt", "fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"]
            + _mapper_keys(cfg.mapper.num_encoder_layers, cfg.mapper.num_decoder_layers)
            + ["model.llama_model.model.embed_tokens.weight", "model.llama_model.lm_head.weight"])


def release_stage2_keys(cfg, n_llm_layers: int) -> list[str]:
    lora = [f"model.llama_model.base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
            for i in range(n_llm_layers) for proj in ("q_proj", "v_proj") for ab in ("A", "B")]
    return (_mapper_keys(cfg.mapper.num_encoder_layers, cfg.mapper.num_decoder_layers) + lora
            + ["model.llama_model.base_model.model.model.embed_tokens.modules_to_save.default.weight",
               "model.llama_model.base_model.model.lm_head.modules_to_save.default.weight"])


def _save_like_lightning(model, path) -> dict:
    checkpoint = {"state_dict": model.state_dict(), "epoch": 0, "global_step": 1}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint["state_dict"]


def _train_steps(model, batch, steps=2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _synthetic(model, keys, seed=123) -> dict[str, torch.Tensor]:
    """Random tensors shaped like the model's own (full vocabulary rows for the matrices)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=g) for k in keys}


def test_stage1_checkpoint_holds_exactly_the_release_keys(tiny_config, tmp_path):
    model = build(tiny_config, stage=1)
    saved = _save_like_lightning(model, tmp_path / "s1.ckpt")
    assert sorted(saved) == sorted(release_stage1_keys(tiny_config))
    embed = saved["model.llama_model.model.embed_tokens.weight"]
    assert embed.shape[0] == len(model.model.llama_tokenizer)           # full matrix, all rows


def test_stage2_checkpoint_holds_exactly_the_release_keys(tiny_config, tmp_path):
    model = build(tiny_config, stage=2)
    saved = _save_like_lightning(model, tmp_path / "s2.ckpt")
    n_layers = model.model.llama_model.config.num_hidden_layers
    assert sorted(saved) == sorted(release_stage2_keys(tiny_config, n_layers))


def test_save_then_load_reproduces_outputs_bit_for_bit(tiny_config, tmp_path):
    trained = build(tiny_config, stage=1, seed=0)
    batch = batch_for(trained, CC3M_LIKE)
    _train_steps(trained, batch)
    _save_like_lightning(trained, tmp_path / "s1.ckpt")
    fresh = build(tiny_config, stage=1, seed=7)
    assert not torch.equal(fresh.t2i_decoder_prompt, trained.t2i_decoder_prompt)
    assert fresh.load_checkpoint_file(tmp_path / "s1.ckpt") == []
    trained.eval(), fresh.eval()
    with torch.no_grad():
        a, b = trained(batch), fresh(batch)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for key, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_release_stage1_file_loads_with_no_missing_trainable_key(tiny_config, tmp_path):
    model = build(tiny_config, stage=1)
    state = _synthetic(model, release_stage1_keys(tiny_config))
    torch.save({"state_dict": state}, tmp_path / "stage1_cc3m.ckpt")
    assert model.load_checkpoint_file(tmp_path / "stage1_cc3m.ckpt") == []
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # The new rows, which are separate parameters, received the file's last 9 rows.
    embed = model.model.llama_model.model.embed_tokens
    assert torch.equal(embed.new_weight, state["model.llama_model.model.embed_tokens.weight"][-9:])


def test_release_stage2_file_loads_on_top_of_stage1(tiny_config, tmp_path):
    """The demo's order: stage-1 file, then the stage-2 file on top, into a stage-2 model."""
    model = build(tiny_config, stage=2)
    n_layers = model.model.llama_model.config.num_hidden_layers
    stage1 = _synthetic(build(tiny_config, stage=1), release_stage1_keys(tiny_config), seed=1)
    stage2 = _synthetic(model, release_stage2_keys(tiny_config, n_layers), seed=2)
    torch.save({"state_dict": stage1}, tmp_path / "stage1_cc3m.ckpt")
    torch.save({"state_dict": stage2}, tmp_path / "stage2_vist.ckpt")
    model.load_checkpoint_file(tmp_path / "stage1_cc3m.ckpt")
    assert model.load_checkpoint_file(tmp_path / "stage2_vist.ckpt") == []
    loaded = model.state_dict()
    for key, value in stage2.items():
        assert torch.equal(loaded[key], value), key
    # fc and the prompt are stage-1 only: they come from the stage-1 file.
    for key in ("fc.0.weight", "t2i_decoder_prompt"):
        assert torch.equal(loaded[key], stage1[key])


def test_stage2_model_built_from_a_stage1_checkpoint(tiny_config, tmp_path):
    stage1 = build(tiny_config, stage=1, seed=0)
    _train_steps(stage1, batch_for(stage1, CC3M_LIKE))
    _save_like_lightning(stage1, tmp_path / "s1.ckpt")
    stage2 = build(tiny_config, stage=2, seed=5, stage1_weight=tmp_path / "s1.ckpt")
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    for key in [k for k in s1 if k.startswith(("fc.", "llm_to_t2i_mapping.", "t2i_decoder_prompt"))]:
        assert torch.equal(s1[key], s2[key]), key
    for name in ("model.embed_tokens", "lm_head"):
        plain = s1[f"model.llama_model.{name}.weight"]
        copy = s2[f"model.llama_model.base_model.model.{name}.modules_to_save.default.weight"]
        assert torch.equal(plain, copy)
    # The trained voken rows differ from their mean initialisation: the copy really came from the file.
    fresh = build(tiny_config, stage=2, seed=5)
    assert not torch.equal(fresh.state_dict()["model.llama_model.base_model.model.lm_head.modules_to_save.default"
                                              ".weight"][-9:], s1["model.llama_model.lm_head.weight"][-9:])
    losses = stage2.train()(batch_for(stage2, STORY_LIKE))
    assert torch.isfinite(losses["loss"])


def test_stage2_file_into_a_stage1_model_uses_plain_names(tiny_config, tmp_path):
    stage2 = build(tiny_config, stage=2, seed=3)
    _save_like_lightning(stage2, tmp_path / "s2.ckpt")
    stage1 = build(tiny_config, stage=1, seed=4)
    stage1.load_checkpoint_file(tmp_path / "s2.ckpt")
    assert torch.equal(
        stage1.state_dict()["model.llama_model.lm_head.weight"],
        stage2.state_dict()["model.llama_model.base_model.model.lm_head.modules_to_save.default.weight"])


def test_checkpoint_keys_follow_the_release_patterns(tiny_config, tmp_path):
    pattern = re.compile(r"^(t2i_decoder_prompt|fc\.[02]\.(weight|bias)|llm_to_t2i_mapping\..+|"
                         r"model\.llama_model\.(model\.embed_tokens|lm_head)\.weight|"
                         r"model\.llama_model\.base_model\.model\.(model\.layers\.\d+\.self_attn\.[qv]_proj\.lora_[AB]"
                         r"\.default\.weight|model\.embed_tokens\.modules_to_save\.default\.weight|"
                         r"lm_head\.modules_to_save\.default\.weight))$")
    for stage in (1, 2):
        saved = _save_like_lightning(build(tiny_config, stage=stage), tmp_path / f"s{stage}.ckpt")
        assert all(pattern.match(k) for k in saved), [k for k in saved if not pattern.match(k)]
