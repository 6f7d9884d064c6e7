"""Checkpoints: only trainable tensors, under the release's key names; the release's
stage-1 and stage-2 files load, Lightning metadata included, without running code from the file; a
file that would run code is refused; damaged, foreign or mismatched files give one line naming the
file; save -> load reproduces outputs bit for bit."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning.utilities.parsing import AttributeDict

import weights

from conftest import (CC3M_LIKE, HANG_GUARD_S, STORY_LIKE, PlantsAMarker, batch_for, build,
                      release_stage1_checkpoint_keys, release_stage2_checkpoint_keys)


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
    assert sorted(saved) == sorted(release_stage1_checkpoint_keys(tiny_config))
    embed = saved["model.llama_model.model.embed_tokens.weight"]
    assert embed.shape[0] == len(model.model.llama_tokenizer)           # full matrix, all rows


def test_stage2_checkpoint_holds_exactly_the_release_keys(tiny_config, tmp_path):
    model = build(tiny_config, stage=2)
    saved = _save_like_lightning(model, tmp_path / "s2.ckpt")
    n_layers = model.model.llama_model.config.num_hidden_layers
    assert sorted(saved) == sorted(release_stage2_checkpoint_keys(tiny_config, n_layers))


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
    state = _synthetic(model, release_stage1_checkpoint_keys(tiny_config))
    torch.save({"state_dict": state}, tmp_path / "stage1_cc3m.ckpt")
    assert model.load_checkpoint_file(tmp_path / "stage1_cc3m.ckpt") == []
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # The new rows, which are separate parameters, received the file's last 9 rows.
    embed = model.model.llama_model.model.embed_tokens
    assert torch.equal(embed.new_weight, state["model.llama_model.model.embed_tokens.weight"][-9:])


def _release_pair(tiny_config, tmp_path):
    """A stage-2 model, and synthetic release-layout `stage1_cc3m.ckpt` / `stage2_vist.ckpt` files
    for it in tmp_path; returns (model, stage-1 state, stage-2 state)."""
    model = build(tiny_config, stage=2)
    n_layers = model.model.llama_model.config.num_hidden_layers
    stage1 = _synthetic(build(tiny_config, stage=1), release_stage1_checkpoint_keys(tiny_config), seed=1)
    stage2 = _synthetic(model, release_stage2_checkpoint_keys(tiny_config, n_layers), seed=2)
    torch.save({"state_dict": stage1}, tmp_path / "stage1_cc3m.ckpt")
    torch.save({"state_dict": stage2}, tmp_path / "stage2_vist.ckpt")
    return model, stage1, stage2


def test_keys_are_called_missing_only_when_no_file_provides_them(tiny_config, tmp_path, caplog):
    """A stage-1 file has no LoRA keys; loaded before the stage-2 file that has them, nothing is
    missing and nothing is said. The stage-1 file alone leaves the LoRA keys missing, and says so."""
    model, stage1, stage2 = _release_pair(tiny_config, tmp_path)
    with caplog.at_level("WARNING", logger="checkpoints"):
        assert model.load_checkpoint_files([tmp_path / "stage1_cc3m.ckpt", tmp_path / "stage2_vist.ckpt"]) == []
    assert "kept as initialised" not in caplog.text
    with caplog.at_level("WARNING", logger="checkpoints"):
        missing = model.load_checkpoint_files([tmp_path / "stage1_cc3m.ckpt"])
    assert missing and all("lora" in key for key in missing)
    assert f"{len(missing)} trainable keys in none of" in caplog.text and "stage1_cc3m.ckpt" in caplog.text


def test_release_stage2_file_loads_on_top_of_stage1(tiny_config, tmp_path):
    """The demo's order: stage-1 file, then the stage-2 file on top, into a stage-2 model."""
    model, stage1, stage2 = _release_pair(tiny_config, tmp_path)
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


# ----------------------------------------------------------------------------------------------
# Reading files from anywhere: weights only, clear refusals and one-line errors


@dataclasses.dataclass
class TrainingArguments:
    """The release's `train_eval.py` argument dataclass (a script: pickled as `__main__.TrainingArguments`)."""

    output_dir: str = "weights"
    num_train_epochs: int = 2
    learning_rate: float = 2e-5
    gpus: list = dataclasses.field(default_factory=lambda: [0, 1, 2, 3])
    is_training: bool = True
    resume: str | None = None


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup)


def release_layout(state: dict, monkeypatch) -> dict:
    """A Lightning 2.0 `.ckpt` as the release's trainer wrote it: the state dict and Lightning's
    metadata (loops, ModelCheckpoint state, AdamW state, LambdaLR state, hyper-parameters holding an
    AttributeDict, an argparse Namespace and the release's argument dataclass)."""
    monkeypatch.setattr(TrainingArguments, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "TrainingArguments", TrainingArguments, raising=False)
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=2e-5, eps=1e-8)
    param.grad = torch.ones(3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_warmup, warmup=1000))
    score = torch.tensor(0.4321)
    return {
        "epoch": 1, "global_step": 1234, "pytorch-lightning_version": "2.0.2", "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 1234},
                               "epoch_progress": {"total": {"ready": 2, "completed": 1}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
                      "'every_n_epochs': 1, 'train_time_interval': None}": {
                          "monitor": "val_loss", "best_model_score": score, "best_model_path": "/w/stage1.ckpt",
                          "current_score": score, "dirpath": "/w", "best_k_models": {"/w/stage1.ckpt": score},
                          "kth_best_model_path": "/w/stage1.ckpt", "kth_value": score, "last_model_path": ""}},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(learning_rate=2e-5, gpus=[0, 1, 2, 3],
                                          args=argparse.Namespace(model_type="multimodal_encoder", snr_loss=True),
                                          training_args=TrainingArguments()),
    }


def test_release_checkpoint_with_lightning_metadata_loads_weights_only(tiny_config, tmp_path, monkeypatch):
    model = build(tiny_config, stage=1)
    state = _synthetic(model, release_stage1_checkpoint_keys(tiny_config))
    path = tmp_path / "stage1_cc3m.ckpt"
    torch.save(release_layout(state, monkeypatch), path)
    with pytest.raises(pickle.UnpicklingError):   # the metadata really needs more than torch's defaults
        torch.load(path, weights_only=True)
    read = weights.read_checkpoint(path)
    assert sorted(read) == sorted(state) and all(torch.equal(read[k], state[k]) for k in state)
    assert model.load_checkpoint_file(path) == []
    metadata = weights.load_untrusted(path, "checkpoint")
    assert metadata["hyper_parameters"]["training_args"].learning_rate == 2e-5
    assert metadata["hyper_parameters"]["args"].model_type == "multimodal_encoder"


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tiny_config_path, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"fc.0.bias": torch.zeros(2)}, "hyper_parameters": {"x": PlantsAMarker(marker)}}, path)
    for read in (weights.read_checkpoint, weights.checkpoint_stage):
        with pytest.raises(weights.UnsafeCheckpointError) as error:
            read(path)
        message = str(error.value)
        assert message.startswith(f"refused to load {path}") and "exec" in message and "\n" not in message
    result = subprocess.run([sys.executable, "examples/playground.py", "--model_config", str(tiny_config_path),
                             "--test_weight", str(path), "--out", str(tmp_path / "out")],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=HANG_GUARD_S)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: refused to load {path}")
    assert not marker.exists()


def test_damaged_or_foreign_files_give_one_line_naming_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"fc.0.weight": torch.randn(64, 64)}}, good)
    cases = {"empty.ckpt": b"", "truncated.ckpt": good.read_bytes()[: good.stat().st_size // 2],
             "notes.ckpt": b"this is a text file\n", "picture.ckpt": b"\xff\xd8\xff\xe0JFIF" + bytes(100)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    torch.save({"state_dict": {"fc.0.weight": "not a tensor"}}, tmp_path / "strings.ckpt")
    for name in [*cases, "tensor.ckpt", "strings.ckpt"]:
        with pytest.raises(weights.CheckpointError) as error:
            weights.read_checkpoint(tmp_path / name)
        message = str(error.value)
        assert message.startswith(str(tmp_path / name)) and "\n" not in message, message
        assert "MiniGPT-5 checkpoint" in message or "checkpoint" in message
    assert weights.read_checkpoint(good).keys() == {"fc.0.weight"}


def test_a_checkpoint_from_another_config_gives_one_line(tiny_config, tmp_path):
    model = build(tiny_config, stage=1)
    state = model.trainable_state_dict()
    state["fc.0.weight"] = torch.zeros(state["fc.0.weight"].shape[0] + 1, state["fc.0.weight"].shape[1])
    torch.save({"state_dict": state}, tmp_path / "other.ckpt")
    before = model.fc[0].weight.detach().clone()
    with pytest.raises(weights.CheckpointError) as error:
        model.load_checkpoint_file(tmp_path / "other.ckpt")
    message = str(error.value)
    assert str(tmp_path / "other.ckpt") in message and "`fc.0.weight`" in message and "\n" not in message
    assert tiny_config.source in message
    assert torch.equal(model.fc[0].weight, before)                     # nothing was loaded
