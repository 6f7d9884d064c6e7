"""Vicuna-v0 / LLaMA, the release's LLM: a sentencepiece tokenizer (BOS `<s>`, EOS `</s>`), untied
embeddings, and the `###Human: ... ###Assistant:` prompt style, whose strings live in prompts.py.
Its outputs are the release's (tests/test_golden.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import prompts
from llm_families.base import LLMFamily, tiny_corpus
from samples import Dialogue


class Vicuna(LLMFamily):
    name = "vicuna"
    model_types = ("llama",)
    required_tokens = ("<s>", "</s>")
    markers = (prompts.END_SYM, "</s>", "<s>")
    strip_around_new_tokens = True

    def tokenizer_options(self) -> dict:
        return {"legacy": True}

    def set_up(self, tokenizer) -> None:
        """`pad = eos`, and sentencepiece's handling of the pieces between added tokens.

        The release used transformers 4.31's slow sentencepiece `LlamaTokenizer(legacy=True)`. It cut
        the text at added tokens, stripped the whitespace on both sides of each added token (it was
        added as a plain string: "strip left and right by default"), and encoded every remaining piece
        with sentencepiece, which puts its `▁` dummy prefix in front of each piece. So
        `"a dog [IMG0]...[IMG7] ###"` gave `▁a ▁dog [IMG0] ... [IMG7] ▁###`, with no `▁` token of
        its own before `[IMG0]`. Today's fast tokenizer does the same once (1) the added tokens strip
        the whitespace around them (`strip_around_new_tokens`) and (2) each piece gets the `▁` prefix
        in the normalizer (`Prepend("▁")` + spaces to `▁`), as sentencepiece did, instead of the
        Metaspace pre-tokenizer, which skips the prefix when a piece already starts with a space."""
        from tokenizers import normalizers

        tokenizer.pad_token = tokenizer.eos_token
        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None

    def end_sym(self, cfg) -> str:
        return cfg.end_sym

    def render(self, dialogue: Dialogue) -> tuple[str, str]:
        """The release's dialogue layout (MMDialog's), written by prompts.py (`render_dialogue`)."""
        return prompts.render_dialogue(dialogue)

    def write_tiny(self, out_dir: Path, arch: dict, seed: int, corpus: list[str] | None = None) -> None:
        write_tiny_llama(out_dir, arch, seed, corpus)


FAMILY = Vicuna()


# ---- the tiny preset's LLaMA folder ---------------------------------------------------------------

def train_llama_tokenizer(vocab_size: int, corpus: list[str] | None = None, exact: bool = False) -> bytes:
    """A byte-fallback BPE sentencepiece model in LLaMA's layout (<unk>, <s>, </s>, 256 byte pieces,
    then merges), trained on the project's prompts and a little English, or on `corpus`; with
    `exact`, it has exactly `vocab_size` pieces (else at most)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus() * 4 + (corpus or [])), model_writer=buffer, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        hard_vocab_limit=exact, input_sentence_size=0, num_threads=1, minloglevel=2,
    )
    return buffer.getvalue()


def write_tiny_llama(out_dir: Path, arch: dict, seed: int, corpus: list[str] | None = None) -> None:
    """A Hugging Face LLaMA folder: config, safetensors weights and a sentencepiece tokenizer
    (trained on `corpus`, by default the project's prompts and a little English)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    sp_model = train_llama_tokenizer(arch["vocab_size"], corpus)
    write_tokenizer_files(out_dir, sp_model, arch["max_position_embeddings"])
    vocab_size = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_key_value_heads"],
        max_position_embeddings=arch["max_position_embeddings"], rms_norm_eps=arch["rms_norm_eps"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)


def write_tokenizer_files(out_dir: Path, sp_model: bytes, max_length: int) -> None:
    """LLaMA's sentencepiece tokenizer files: `tokenizer.model` and `tokenizer_config.json`."""
    (out_dir / "tokenizer.model").write_bytes(sp_model)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": max_length,
    }, indent=2))
