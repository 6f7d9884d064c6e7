"""Llama 3.x (Llama-3.1-8B): a byte-level BPE tokenizer (128 256 tokens: 128 000 merges, then 256
special ones), grouped-query attention, untied embeddings, BOS `<|begin_of_text|>`, and its chat
template's turns `<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>`; an answer ends at
`<|eot_id|>` (the tokenizer's EOS is set to it, as the instruct models have it)."""
from __future__ import annotations

from pathlib import Path

from llm_families.base import ChatFamily, write_bpe_tokenizer

# The pre-tokenizer's split (tiktoken's cl100k pattern, which Llama 3 uses).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.1's first special tokens in their order (ids 128000..128010; the rest are reserved ones).
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# Meta-Llama-3-8B-Instruct's chat template (3.1's adds a knowledge-date preamble to the system turn and
# tool calls, which MiniGPT-5 does not use); `render` writes the same text without the leading BOS.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


class Llama3(ChatFamily):
    name = "llama3"
    model_types = ("llama",)
    required_tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    markers = ("<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>")
    end_of_turn = "<|eot_id|>"

    def header(self, role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def turn_text(self, text: str) -> str:
        return text.strip()                    # the template's `| trim`

    def write_tiny(self, out_dir: Path, arch: dict, seed: int, corpus: list[str] | None = None) -> None:
        """A Llama 3 folder: `tokenizer.json` (byte-level BPE with Llama 3's split, special tokens and
        BOS post-processor), `tokenizer_config.json` with the chat template, a GQA `LlamaConfig`
        (rope_theta 500 000, untied) and random safetensors weights."""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        n_special = arch.get("num_special_tokens", len(SPECIAL_TOKENS))
        special = SPECIAL_TOKENS + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + n_special - len(SPECIAL_TOKENS))]
        vocab_size = write_bpe_tokenizer(out_dir, arch["vocab_size"], special, SPLIT_PATTERN, {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": arch["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
        }, corpus, bos_token="<|begin_of_text|>")
        first_special = vocab_size - len(special)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
            num_hidden_layers=arch["num_hidden_layers"], num_attention_heads=arch["num_attention_heads"],
            num_key_value_heads=arch["num_key_value_heads"], max_position_embeddings=arch["max_position_embeddings"],
            rms_norm_eps=arch["rms_norm_eps"], rope_theta=arch.get("rope_theta", 500000.0),
            bos_token_id=first_special, eos_token_id=first_special + 1, tie_word_embeddings=False)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out_dir)


FAMILY = Llama3()
