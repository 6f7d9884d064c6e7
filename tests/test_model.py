"""MiniGPT5_Model on the tiny preset: losses, what trains, checkpoints in the release's layout."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import CC3M_LIKE, STORY_LIKE, batch_for, build
from constants import VOKEN_COUNT

def test_stage1_step_has_every_loss_term(tiny_config):
    model = build(tiny_config, stage=1).train()
    losses = model(batch_for(model, CC3M_LIKE))
    assert set(losses) == {"text_loss", "image_loss", "caption_loss", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    expected = 0.01 * losses["text_loss"] + losses["image_loss"] + 0.1 * losses["caption_loss"]
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()


def test_stage2_step_without_captions(tiny_config):
    model = build(tiny_config, stage=2).train()
    losses = model(batch_for(model, STORY_LIKE))
    assert set(losses) == {"text_loss", "image_loss", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], 0.01 * losses["text_loss"] + losses["image_loss"])


def test_described_story_pictures_get_the_caption_loss(tiny_config):
    """VIST steps with a `description`: the pictures drawn carry it, the text-only sample none; the
    caption loss is computed over the pictures drawn (the release's rule counts samples, which would
    turn it off for every story batch with an understanding sample in it)."""
    model = build(tiny_config, stage=2).eval()      # no dropout: the forward pass is recomputed below
    described = [dict(STORY_LIKE[0], caption="a dog on the grass"), dict(STORY_LIKE[1], caption="a cat asleep"),
                 STORY_LIKE[2]]
    batch = batch_for(model, described)
    # The loss's target is each drawn picture's own description, in order.
    import decoders
    m = model.model
    embeds, mask, labels = m.wrap_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         model.image_embeddings(batch))
    condition = model.map_condition(m.voken_features(m.forward_llm(embeds, mask, labels)[0], labels)[0])
    expected_caption_loss = decoders.caption_mse(condition, model.encode_caption(["a dog on the grass", "a cat asleep"]))
    losses = model(batch)
    assert set(losses) == {"text_loss", "image_loss", "caption_loss", "loss"}
    expected = 0.01 * losses["text_loss"] + losses["image_loss"] + 0.1 * losses["caption_loss"]
    torch.testing.assert_close(losses["loss"], expected)
    torch.testing.assert_close(losses["caption_loss"], expected_caption_loss)
    # One drawn picture without a description: no caption loss, as in the release.
    half = batch_for(model, [described[0], STORY_LIKE[1], STORY_LIKE[2]])
    assert "caption_loss" not in model(half)


def test_batch_without_vokens_is_text_only(tiny_config):
    model = build(tiny_config, stage=2).train()
    losses = model(batch_for(model, STORY_LIKE[2:]))
    assert set(losses) == {"text_loss", "loss"}
    torch.testing.assert_close(losses["loss"], 0.01 * losses["text_loss"])


def _grad_names(model):
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_stage1_gradients_reach_exactly_the_trainable_parameters(tiny_config):
    model = build(tiny_config, stage=1).train()
    model(batch_for(model, CC3M_LIKE))["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _grad_names(model) == trainable
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("fc.", "llm_to_t2i_mapping.", "t2i_decoder_prompt"))
                         or n.endswith("new_weight")}
    embed = model.model.llama_model.model.embed_tokens
    head = model.model.llama_model.lm_head
    for rows in (embed, head):
        assert rows.frozen_weight.grad is None and not rows.frozen_weight.requires_grad
        assert rows.new_weight.grad.abs().sum() > 0
    # Only the voken rows that appear in the batch get a gradient on the input side; [IMG0] is supervised.
    img0 = model.model.voken_ids[0] - model.model.num_old_tokens
    assert head.new_weight.grad[img0].abs().sum() > 0


def test_stage1_trainable_count_is_fc_mapper_prompt_and_18_rows(tiny_config):
    model = build(tiny_config, stage=1)
    hidden = model.model.llama_model.config.hidden_size
    count = lambda m: sum(p.numel() for p in m.parameters())
    expected = count(model.fc) + count(model.llm_to_t2i_mapping) + model.t2i_decoder_prompt.numel() + 18 * hidden
    assert model.num_trainable_parameters() == expected


def test_stage2_gradients(tiny_config):
    model = build(tiny_config, stage=2).train()
    model(batch_for(model, STORY_LIKE))["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _grad_names(model) == trainable
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    assert not any(n.startswith(("fc.", "t2i_decoder_prompt")) for n in trainable)
    assert any(n.startswith("llm_to_t2i_mapping.") for n in trainable)
    rows = [n for n in trainable if "modules_to_save" in n]
    assert sorted(rows) == sorted([
        "model.llama_model.base_model.model.model.embed_tokens.modules_to_save.default.new_weight",
        "model.llama_model.base_model.model.lm_head.modules_to_save.default.new_weight"])
    assert not any("frozen_weight" in n or "original_module" in n for n in trainable)


def test_thirty_steps_on_one_batch_lower_the_loss(tiny_config):
    model = build(tiny_config, stage=1).train()
    batch = batch_for(model, CC3M_LIKE)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(30):
        losses = model(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert all(math.isfinite(v) for h in history for v in h.values())
    # The random tiny UNet bounds how far the image term can fall; every term must still fall,
    # and the total clearly.
    assert last["loss"] < 0.9 * first["loss"], (first, last)
    assert last["text_loss"] < 0.7 * first["text_loss"]
    assert last["caption_loss"] < 0.5 * first["caption_loss"]
    assert last["image_loss"] < first["image_loss"]


def test_cfg_dropout_one_feeds_zero_features_and_empty_captions(tiny_config, monkeypatch):
    model = build(tiny_config, stage=1, cfg_dropout_prob=1.0).train()
    batch = batch_for(model, CC3M_LIKE)
    del batch["cfg_drop"]                          # let the model draw with probability 1
    seen = {}

    def record_features(module, args):
        seen["features"] = args[0].detach()

    def record_captions(captions):
        seen["captions"] = captions
        return original(captions)

    model.fc.register_forward_pre_hook(record_features)
    original = model.encode_caption
    monkeypatch.setattr(model, "encode_caption", record_captions)
    model(batch)
    assert seen["features"].shape[1] == VOKEN_COUNT and torch.count_nonzero(seen["features"]) == 0
    assert seen["captions"] == ["", ""]

    model.cfg_dropout_prob = 0.0
    seen.clear()
    model(batch)
    assert torch.count_nonzero(seen["features"]) > 0
    assert seen["captions"] == [s["caption"] for s in CC3M_LIKE]


def test_voken_features_are_the_states_before_and_at_img0_to_img6(tiny_config):
    model = build(tiny_config, stage=1)
    m = model.model
    batch = batch_for(model, STORY_LIKE)
    embeds, mask, labels = m.wrap_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         m.encode_img(batch["input_images"])[0])
    hidden = torch.randn(*labels.shape, 5)
    features, sample = m.voken_features(hidden, labels)
    assert sample.tolist() == [0, 1]
    for row, b in enumerate(sample.tolist()):
        img0 = (labels[b] == m.voken_ids[0]).nonzero().item()
        torch.testing.assert_close(features[row], hidden[b, img0 - 1: img0 + 7])
        # The 8 states end at [IMG6]: [IMG7] (supervised) comes right after them.
        assert labels[b, img0 + 7] == m.voken_ids[7]


def test_wrap_inputs_matches_a_per_sample_reference(tiny_config):
    """The batched scatter equals the release's per-sample concatenation, sample by sample."""
    model = build(tiny_config, stage=1)
    m = model.model
    batch = batch_for(model, STORY_LIKE)
    image_embeds = m.encode_img(batch["input_images"])[0]
    embeds, mask, labels = m.wrap_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], image_embeds)
    bos = m.embed_tokens(torch.tensor([m.llama_tokenizer.bos_token_id]))
    next_image = 0
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        ids, labs = batch["input_ids"][b, :n], batch["labels"][b, :n]
        parts, part_labels = [bos], [torch.tensor([-100])]
        for tok, lab in zip(ids.tolist(), labs.tolist()):
            if tok == m.image_token_id:
                parts.append(image_embeds[next_image])
                part_labels.append(torch.full((image_embeds.shape[1],), -100))
                next_image += 1
            else:
                parts.append(m.embed_tokens(torch.tensor([tok])))
                part_labels.append(torch.tensor([lab]))
        ref, ref_labels = torch.cat(parts), torch.cat(part_labels)
        L = ref.shape[0]
        torch.testing.assert_close(embeds[b, :L], ref, rtol=0, atol=0)
        assert torch.equal(labels[b, :L], ref_labels)
        assert mask[b, :L].all() and not mask[b, L:].any()
        assert (embeds[b, L:] == 0).all() and (labels[b, L:] == -100).all()


def test_more_placeholders_than_images_is_a_clear_error(tiny_config):
    model = build(tiny_config, stage=2)
    batch = batch_for(model, STORY_LIKE)
    batch["input_images"] = batch["input_images"][:2]
    with pytest.raises(ValueError, match=r"3 <ImageHere> placeholder\(s\) but 2 image\(s\)"):
        model(batch)


def test_encode_img_shape_and_mask(tiny_config):
    model = build(tiny_config)
    embeds, atts = model.model.encode_img(torch.randn(3, 3, tiny_config.image_size, tiny_config.image_size))
    assert embeds.shape == (3, tiny_config.num_query_token, model.model.llama_model.config.hidden_size)
    assert atts.shape == (3, tiny_config.num_query_token) and atts.all()
    # Different images give different embeddings (the image actually flows through).
    assert not torch.allclose(embeds[0], embeds[1])
