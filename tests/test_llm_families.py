"""LLM families (llm_families/): each family's tokenizer, voken rows, BOS, prompt style and clean text,
on its tiny preset built by the preset machinery (`python weights.py preset tiny_llama3 / tiny_qwen2`)."""
from __future__ import annotations

import pytest
import torch

from constants import ALL_VOKENS_TEXT, IMAGE_PLACEHOLDER, IMAGE_SLOT, VOKENS
from llm_families import FAMILY_NAMES, UnknownFamilyError, get_family
from samples import Dialogue, Message, Segment

FAMILY_PRESETS = {"llama3": "tiny_llama3", "qwen2": "tiny_qwen2"}


@pytest.fixture(scope="session")
def family_config_paths(tmp_path_factory, tiny_config_path):
    """Config paths of the tiny preset of every family (vicuna: the release's tiny preset)."""
    from presets import build_preset

    paths = {"vicuna": tiny_config_path}
    for family, preset in FAMILY_PRESETS.items():
        paths[family] = build_preset(preset, tmp_path_factory.mktemp(preset) / "weights", seed=0)
    return paths


@pytest.fixture(scope="session")
def family_configs(family_config_paths):
    from configuration import load_config

    return {family: load_config(path) for family, path in family_config_paths.items()}


@pytest.fixture(scope="session")
def family_models(family_configs):
    """A stage-1 model per family, built once (read-only use)."""
    from model import MiniGPT5_Model

    torch.manual_seed(0)
    return {family: MiniGPT5_Model(cfg, stage=1) for family, cfg in family_configs.items()}


def story() -> Dialogue:
    return Dialogue(system="Tell a story.", messages=(
        Message("user", (Segment(text="the dog runs"), Segment(image="a.jpg"), Segment(text="what next?"))),
        Message("assistant", (Segment(text="it jumps"), Segment(image="b.jpg")))))


def test_get_family_names_the_known_ones():
    assert FAMILY_NAMES == ("vicuna", "llama3", "qwen2")
    assert [get_family(n).name for n in FAMILY_NAMES] == list(FAMILY_NAMES)
    with pytest.raises(UnknownFamilyError, match="llm_family.*vicuna, llama3, qwen2"):
        get_family("llama2")


def test_the_config_key_defaults_to_vicuna_and_is_checked(tiny_config, tmp_path):
    from configuration import ConfigError, load_config

    assert tiny_config.llm_family == "vicuna"
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(tiny_config.source).read() + "llm_family: mistral\n")
    with pytest.raises(ConfigError, match="`llm_family` must be one of vicuna, llama3, qwen2, got 'mistral'"):
        load_config(bad, check_paths=False)


def test_vicuna_renders_the_release_strings():
    """The release's dialogue layout (MMDialog's reader writes the same strings)."""
    source, target = get_family("vicuna").render(story())
    assert source == f"Tell a story. ###Human: the dog runs {IMAGE_SLOT} what next? ###Assistant:"
    assert target == f"it jumps {ALL_VOKENS_TEXT} ###"
    no_picture = Dialogue(None, (Message("user", (Segment(text="hi"),)), Message("assistant", (Segment(text="hello"),))))
    assert get_family("vicuna").render(no_picture) == ("###Human: hi ###Assistant:", "hello ###")


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_render_is_the_tokenizers_chat_template(family, family_models):
    """The family's prompt style writes what its tokenizer's own chat template writes (without BOS)."""
    tok = family_models[family].model.llama_tokenizer
    fam = get_family(family)
    source, target = fam.render(story())
    messages = [{"role": "system", "content": "Tell a story."},
                {"role": "user", "content": f"the dog runs {IMAGE_SLOT} what next?"}]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = expected.removeprefix(tok.bos_token or "")
    assert source == expected
    assert target == f"it jumps {ALL_VOKENS_TEXT}{fam.end_of_turn}"
    # The whole answer turn as the template writes it, too.
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": f"it jumps {ALL_VOKENS_TEXT}"}],
                                   tokenize=False).removeprefix(tok.bos_token or "")
    assert full.startswith(source + target)


def test_qwen2_default_system_prompt():
    source, _ = get_family("qwen2").render(Dialogue(None, (Message("user", (Segment(text="hi"),)),
                                                           Message("assistant", (Segment(text="yo"),)))))
    assert source.startswith("<|im_start|>system\nYou are Qwen") and source.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family", ["vicuna", "llama3", "qwen2"])
def test_tokenizer_round_trip_and_voken_rows(family, family_models):
    """The 9 new tokens get the ids right after the tokenizer's own ones, those ids are the new rows
    of the embedding and the lm_head (tied or not, padded vocabulary or not), and a text with vokens
    and image slots comes back from its ids (byte-level BPE: exactly)."""
    m = family_models[family].model
    tok = m.llama_tokenizer
    ids = tok.convert_tokens_to_ids(VOKENS + [IMAGE_PLACEHOLDER])
    first = m.num_old_tokens
    assert ids == list(range(first, first + 9)) and m.voken_ids == ids[:8] and m.image_token_id == ids[8]
    assert len(tok) == first + 9 == m.llama_model.config.vocab_size
    embed, head = m.llm_parts()[0].embed_tokens, m.llm_parts()[1]
    assert embed.weight.shape[0] == head.weight.shape[0] == first + 9
    text = f"a dog {IMAGE_SLOT} runs {ALL_VOKENS_TEXT}{m.end_sym}"
    encoded = tok(text, add_special_tokens=False).input_ids
    assert encoded.count(m.image_token_id) == 1 and [i for i in encoded if i in m.voken_ids] == m.voken_ids
    assert tok.convert_tokens_to_ids(m.end_sym) in encoded or family == "vicuna"
    if family != "vicuna":     # sentencepiece's added tokens eat the spaces around them (the release's way)
        assert tok.decode(encoded) == text
    # The new rows are where the ids point: the logits of the ids' rows come from the new weights.
    hidden = torch.randn(1, 1, embed.weight.shape[1])
    logits = head(hidden)
    assert logits.shape[-1] == first + 9
    torch.testing.assert_close(logits[0, 0, first:], hidden[0, 0] @ head.new_weight.T)


def test_qwen2_rows_are_tied_and_its_padding_rows_dropped(family_models, family_configs):
    from transformers import AutoConfig

    m = family_models["qwen2"].model
    padded_rows = AutoConfig.from_pretrained(family_configs["qwen2"].llama_model).vocab_size
    assert padded_rows > m.num_old_tokens                       # the preset's vocabulary is padded
    embed, head = m.llm_parts()[0].embed_tokens, m.llm_parts()[1]
    assert m.tied_rows and head.new_weight is embed.new_weight and head.frozen_weight is embed.frozen_weight
    assert not family_models["llama3"].model.tied_rows and not family_models["vicuna"].model.tied_rows


def test_bos_per_family(family_models):
    """Vicuna and Llama 3 start every sequence with their BOS; Qwen2.5 with nothing."""
    bos = {f: m.model.bos_token_id for f, m in family_models.items()}
    tok = {f: m.model.llama_tokenizer for f, m in family_models.items()}
    assert bos["vicuna"] == tok["vicuna"].convert_tokens_to_ids("<s>") == 1
    assert bos["llama3"] == tok["llama3"].convert_tokens_to_ids("<|begin_of_text|>")
    assert bos["qwen2"] is None
    for family, model in family_models.items():
        m = model.model
        ids = torch.tensor([tok[family]("a dog", add_special_tokens=False).input_ids])
        embeds, mask, _ = m.wrap_inputs(ids, torch.ones_like(ids), None, None)
        lead = 0 if bos[family] is None else 1
        assert embeds.shape[1] == ids.shape[1] + lead
        expected = m.embed_tokens(ids[0] if lead == 0 else torch.cat([torch.tensor([bos[family]]), ids[0]]))
        torch.testing.assert_close(embeds[0], expected)


@pytest.mark.parametrize("family, text, clean", [
    ("vicuna", f"Hello there! {ALL_VOKENS_TEXT} ###", "Hello there!"),
    ("vicuna", "fine thanks ###</s>", "fine thanks"),
    ("llama3", f"Hello there! {ALL_VOKENS_TEXT}<|eot_id|>", "Hello there!"),
    ("llama3", "fine thanks<|eot_id|><|end_of_text|>", "fine thanks"),
    ("qwen2", "fine thanks<|im_end|>", "fine thanks"),
    ("qwen2", "### is kept<|im_end|>", "### is kept"),
    ("qwen2", "! ?<|im_end|>", ""),
])
def test_clean_text(family, text, clean):
    import metric

    assert metric.clean_text(text, family) == clean


def test_a_tokenizer_of_another_family_stops_before_the_llm_loads(family_configs, monkeypatch):
    """llm_family: llama3 over the vicuna preset's LLaMA folder (same model_type): the tokenizer check
    stops it, naming the keys, before transformers reads any weight."""
    from transformers import AutoModelForCausalLM

    from minigpt4 import MiniGPT4

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the LLM's weights were read"))
    cfg = family_configs["vicuna"].replace(llm_family="llama3")
    with pytest.raises(ValueError, match=r"no <\|begin_of_text\|>.*not a 'llama3' tokenizer.*`llm_family`"):
        MiniGPT4.from_config(cfg)
    cfg = family_configs["qwen2"].replace(llm_family="vicuna")
    with pytest.raises(ValueError, match="`llm_family` is 'vicuna'.*'qwen2' model"):
        MiniGPT4.from_config(cfg)
