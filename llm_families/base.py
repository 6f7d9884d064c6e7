"""The interface of an LLM family (`LLMFamily`), the chat-template families' common part
(`ChatFamily`) and the tiny byte-level BPE tokenizer their presets carry.

What a family decides, and who asks:
    load_tokenizer(path)      the tokenizer with the 9 new tokens ([IMG0]..[IMG7], <ImageHere>) added
                              after its own ones (minigpt4, the data commands, train_eval)
    bos_token_id(tokenizer)   the token every sequence starts with, or None (MiniGPT4.wrap_inputs)
    end_sym(cfg)              where an answer ends: generation stops there, the scorers cut it off
    clean_text(text)          a text as metric.py compares it
    render(dialogue)          the prompt style: a samples.Dialogue -> (source, target) text, with
                              `<Img><ImageHere></Img>` per input picture and the 8 vokens per answer picture
    write_tiny(out_dir, ...)  the LLM folder of the family's tiny random preset (presets.py)
The voken rows (tied or untied embeddings, padded vocabularies) are the same code for every family
(minigpt4.add_voken_rows): the new rows start at the id the tokenizer gives [IMG0].
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from constants import ALL_VOKENS_TEXT, IMAGE_PLACEHOLDER, IMAGE_SLOT, VOKENS
from samples import Dialogue, Message

# The 9 tokens MiniGPT-5 adds, in the release's order (their ids follow the tokenizer's own ones).
NEW_TOKENS = tuple(VOKENS) + (IMAGE_PLACEHOLDER,)


class LLMFamily:
    """One LLM family's text rules. Subclasses set the class attributes and `render`."""

    name = ""
    # config.json `model_type`s of this family: another one is a wrong pairing (minigpt4 checks it).
    model_types: tuple[str, ...] = ()
    # Tokens every tokenizer of this family has: a tokenizer without them is a wrong pairing.
    required_tokens: tuple[str, ...] = ()
    # Special-token strings that `clean_text` removes (besides everything from [IMG0] on).
    markers: tuple[str, ...] = ()
    # Whether an added token eats the spaces around it: sentencepiece's way, which the release's
    # tokenizer had; a byte-level BPE keeps them so that decode(encode(text)) == text.
    strip_around_new_tokens = False

    def load_tokenizer(self, path: str):
        """The family's tokenizer from an LLM folder, set up (`set_up`) and with the 9 new tokens
        added as special tokens, in the release's order."""
        from tokenizers import AddedToken
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, **self.tokenizer_options())
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.required_tokens if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer of {path} has no {', '.join(missing)}: it is not a {self.name!r} "
                             f"tokenizer (config keys `llm_family` and `llama_model`)")
        self.set_up(tokenizer)
        strip = self.strip_around_new_tokens
        added = [AddedToken(t, lstrip=strip, rstrip=strip, special=True, normalized=False) for t in NEW_TOKENS]
        # (The tokenizer's own extra special tokens, e.g. Qwen's <|im_start|>, stay special.)
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        return tokenizer

    def tokenizer_options(self) -> dict:
        """Keyword arguments of `AutoTokenizer.from_pretrained`."""
        return {}

    def set_up(self, tokenizer) -> None:
        """Family-specific changes to a freshly read tokenizer (end of sequence, padding)."""

    def bos_token_id(self, tokenizer, llm_config=None) -> int | None:
        """The token every sequence starts with, or None for a family without one."""
        if tokenizer is not None:
            return tokenizer.bos_token_id
        return getattr(llm_config, "bos_token_id", None)

    def end_sym(self, cfg) -> str:
        """Where an answer ends (a string the tokenizer reads as one token, or the release's `###`)."""
        raise NotImplementedError

    def clean_text(self, text: str) -> str:
        """A text as the scorers compare it: nothing from `[IMG0]` on, no family markers (end of turn,
        BOS / EOS), stripped; "" if only punctuation."""
        text = text.split(VOKENS[0])[0]
        for token in self.markers:
            text = text.replace(token, "")
        text = text.strip()
        return "" if all(c in string.punctuation or c.isspace() for c in text) else text

    def render(self, dialogue: Dialogue) -> tuple[str, str]:
        """The dialogue as (source, target) text in this family's prompt style (BOS not included:
        the model puts it first)."""
        raise NotImplementedError

    def write_tiny(self, out_dir: Path, arch: dict, seed: int, corpus: list[str] | None = None) -> None:
        """A random LLM folder of this family in the real layout (config, safetensors, tokenizer)."""
        raise NotImplementedError


def message_text(message: Message, picture: str) -> str:
    """A message's segments as one text, each picture written as `picture` (an image slot for an
    input picture, the 8 vokens for an answer's)."""
    return " ".join(s.text if s.image is None else picture for s in message.segments)


class ChatFamily(LLMFamily):
    """A family whose prompt style is its tokenizer's chat template: every turn is `header(role)`,
    the text, `end_of_turn`, `after_turn`; the answer is the text (pictures as vokens) and
    `end_of_turn`, which is also where generation stops (the tokenizer's EOS is set to it)."""

    end_of_turn = ""
    after_turn = ""
    default_system: str | None = None

    def header(self, role: str) -> str:
        raise NotImplementedError

    def turn_text(self, text: str) -> str:
        """A turn's text as the template writes it."""
        return text

    def set_up(self, tokenizer) -> None:
        # Generation stops at EOS and decode_answer cuts there: the end of a turn ends an answer.
        tokenizer.eos_token = self.end_of_turn
        if tokenizer.pad_token is None:
            tokenizer.pad_token = self.end_of_turn

    def end_sym(self, cfg) -> str:
        return self.end_of_turn

    def turn(self, role: str, text: str) -> str:
        return self.header(role) + self.turn_text(text) + self.end_of_turn + self.after_turn

    def render(self, dialogue: Dialogue) -> tuple[str, str]:
        system = dialogue.system if dialogue.system is not None else self.default_system
        parts = [self.turn("system", system)] if system is not None else []
        parts += [self.turn(m.role, message_text(m, IMAGE_SLOT)) for m in dialogue.context]
        source = "".join(parts) + self.header("assistant")
        return source, self.turn_text(message_text(dialogue.answer, ALL_VOKENS_TEXT)) + self.end_of_turn


# ---- the tiny presets' byte-level BPE tokenizer -------------------------------------------------------

def tiny_corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: the prompts' words (from prompts.py) and a little
    English, so that the tokens the project uses get real pieces."""
    from prompts import (ASSISTANT, CC3M_PROMPTS, CC3M_SYSTEM, END_SYM, HUMAN, MMDIALOG_SYSTEM, VIST_GENERATION,
                         VIST_MULTIMODAL, VIST_SYSTEM, VIST_UNDERSTANDING)

    def words(template: str) -> str:           # a template without its slots and speaker tags
        text = template.format(context="", caption="").replace(IMAGE_SLOT, "")
        return " ".join(text.replace(HUMAN, "").replace(ASSISTANT, "").split())

    def bare(template: str) -> str:            # the same with the speaker tags
        return " ".join(template.format(context="", caption="").split())

    return [
        VIST_SYSTEM, MMDIALOG_SYSTEM, bare(VIST_GENERATION[0]),
        f"{bare(VIST_GENERATION[1])} {words(VIST_MULTIMODAL[0])}",
        f"{words(VIST_MULTIMODAL[1])} {words(VIST_MULTIMODAL[2])} {END_SYM}",
        f"{words(VIST_UNDERSTANDING[0])} {words(VIST_UNDERSTANDING[1])}",
        f"{CC3M_SYSTEM} {CC3M_PROMPTS[0]}", " ".join(CC3M_PROMPTS[i] for i in (1, 2, 5)),
        " ".join(CC3M_PROMPTS[i] for i in (4, 6)),
        "a man is walking his dog in the park on a sunny day. the family went to the beach together.",
        "we had a great time at the party and everyone was happy. the view from the top was beautiful.",
        "a photo of a cat sitting on a wooden table next to a window. people are standing in a street.",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,!?:;'\"()[]{}<>/#-_",
    ]


def write_bpe_tokenizer(out_dir: Path, vocab_size: int, special_tokens: list[str], split_pattern: str,
                        config: dict, corpus: list[str] | None = None, bos_token: str | None = None) -> int:
    """A byte-level BPE `tokenizer.json` (GPT-2's byte alphabet, the family's pre-split regex, merges
    trained offline on `corpus` and the project's prompts) with `special_tokens` after the merges,
    and `tokenizer_config.json` = `config`; with `bos_token`, encoding puts it first (Llama 3's
    post-processor). Returns the number of tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(tiny_corpus() * 4 + (corpus or []), trainer)
    tokenizer.add_special_tokens(special_tokens)
    if bos_token is not None:
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size()
