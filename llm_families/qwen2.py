"""Qwen2.5 (Qwen2.5-7B; 0.5B / 1.5B / 3B tie their embeddings): a byte-level BPE tokenizer with no BOS,
an embedding padded beyond the tokenizer's 151 665 tokens (151 936 rows, 152 064 at 7B), and ChatML turns
`<|im_start|>role\\n ... <|im_end|>\\n` with Qwen's default system prompt; an answer ends at
`<|im_end|>` (the tokenizer's EOS is set to it, as the instruct models have it)."""
from __future__ import annotations

from pathlib import Path

from llm_families.base import ChatFamily, write_bpe_tokenizer

# The pre-tokenizer's split: Llama 3's, but one digit at a time.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5's 22 special tokens in their order (ids 151643..151664).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                  "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>"]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5's chat template without its tool-call branches; `render` writes the same text.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>'"
    " + '\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


class Qwen2(ChatFamily):
    name = "qwen2"
    model_types = ("qwen2",)
    required_tokens = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    markers = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
    end_of_turn = "<|im_end|>"
    after_turn = "\n"
    default_system = DEFAULT_SYSTEM

    def header(self, role: str) -> str:
        return f"<|im_start|>{role}\n"

    def bos_token_id(self, tokenizer, llm_config=None) -> None:
        """None: Qwen puts nothing before the text (its config's `bos_token_id` is only a name)."""
        return None

    def write_tiny(self, out_dir: Path, arch: dict, seed: int, corpus: list[str] | None = None) -> None:
        """A Qwen2.5 folder: `tokenizer.json` plus `vocab.json` / `merges.txt` (byte-level BPE, Qwen's split
        and special tokens, no BOS), `tokenizer_config.json` with the chat template, a `Qwen2Config` whose
        embedding is padded to a multiple of `pad_vocab_to` rows (tied when `tie_word_embeddings`),
        and random safetensors weights."""

        import torch
        from tokenizers import Tokenizer
        from transformers import Qwen2Config, Qwen2ForCausalLM

        n_tokens = write_bpe_tokenizer(out_dir, arch["vocab_size"], SPECIAL_TOKENS, SPLIT_PATTERN, {
            "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "additional_special_tokens": SPECIAL_TOKENS[1:14],         # <|im_start|> .. <|video_pad|>, as Qwen2.5
            "model_max_length": arch["max_position_embeddings"], "chat_template": CHAT_TEMPLATE,
        }, corpus)
        Tokenizer.from_file(str(out_dir / "tokenizer.json")).model.save(str(out_dir))   # vocab.json, merges.txt
        pad = arch["pad_vocab_to"]
        rows = (n_tokens // pad + 1) * pad            # always some padding rows, as Qwen2.5 has
        end_of_text = n_tokens - len(SPECIAL_TOKENS)
        config = Qwen2Config(
            vocab_size=rows, hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
            num_hidden_layers=arch["num_hidden_layers"], num_attention_heads=arch["num_attention_heads"],
            num_key_value_heads=arch["num_key_value_heads"], max_position_embeddings=arch["max_position_embeddings"],
            rms_norm_eps=arch["rms_norm_eps"], rope_theta=arch.get("rope_theta", 1000000.0),
            bos_token_id=end_of_text, eos_token_id=end_of_text, tie_word_embeddings=arch["tie_word_embeddings"],
            use_sliding_window=False)
        torch.manual_seed(seed)
        Qwen2ForCausalLM(config).save_pretrained(out_dir)


FAMILY = Qwen2()
