"""Pieces the families' tiny random folders share (their `write_tiny`, run by presets.py): a small VAE,
a CLIP text-encoder config over the tiny CLIP tokenizer, and model_index.json."""
from __future__ import annotations

import json
from pathlib import Path


def tiny_vae(vae_arch: dict, image_size: int, latent_channels: int, scaling_factor: float,
             shift_factor: float | None = None):
    """An AutoencoderKL with `vae_arch`'s blocks (`block_out_channels`, `layers_per_block`,
    `norm_num_groups`), made on torch's current RNG."""
    from diffusers import AutoencoderKL

    n = len(vae_arch["block_out_channels"])
    extra = {} if shift_factor is None else {"shift_factor": shift_factor, "use_quant_conv": False,
                                             "use_post_quant_conv": False}
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(vae_arch["block_out_channels"]), layers_per_block=vae_arch["layers_per_block"],
        norm_num_groups=vae_arch["norm_num_groups"], sample_size=image_size, scaling_factor=scaling_factor, **extra)


def clip_text_config(text_arch: dict, vocab: dict[str, int]):
    """A CLIPTextConfig of `text_arch`'s sizes (77 positions; `projection_dim` when given, else the
    width) over the tiny CLIP vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_arch["hidden_size"], intermediate_size=text_arch["intermediate_size"],
        num_hidden_layers=text_arch["num_hidden_layers"], num_attention_heads=text_arch["num_attention_heads"],
        max_position_embeddings=77, hidden_act="gelu",
        projection_dim=text_arch.get("projection_dim", text_arch["hidden_size"]),
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["!"])


def write_tokenizer(tok_dir: Path, words=()) -> dict[str, int]:
    """The tiny CLIP tokenizer folder (presets.write_clip_tokenizer); returns its vocabulary."""
    from presets import write_clip_tokenizer

    return write_clip_tokenizer(tok_dir, words)


def write_index(out_dir: Path, pipeline: str, components: dict) -> None:
    """A diffusers model_index.json: the pipeline class a folder is read by, and its components."""
    (out_dir / "model_index.json").write_text(json.dumps(
        {"_class_name": pipeline, "_diffusers_version": "0.42.1", **components}, indent=2))


def write_t5_tokenizer(tok_dir: Path, vocab_size: int) -> int:
    """A T5 tokenizer folder (`T5TokenizerFast`'s tokenizer.json) over a small sentencepiece unigram
    vocabulary in T5's id layout (pad 0, eos 1, unk 2, no BOS), trained offline on a little English;
    returns its vocabulary size."""
    import io

    import sentencepiece as spm
    from transformers import T5TokenizerFast

    corpus = ["a man is walking his dog in the park on a sunny day", "a red square on a white wall",
              "a blue circle next to a green triangle", "the family went to the beach together",
              "a photo of a cat sitting on a wooden table next to a window", "people are standing in a street",
              "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,!?:;'\"()[]{}<>/#-_"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 8), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        input_sentence_size=0, num_threads=1, minloglevel=2)          # one thread: deterministic
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(tok_dir)
    return len(tokenizer)
