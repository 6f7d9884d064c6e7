"""Every prompt string of MiniGPT-5, as the release wrote them: one home for the wording.

The datasets (`dataloader.py`), the conversations and demos (`conversation.py`, `examples/`), the
scorers (`metric.py`) and the tiny tokenizer's corpus (`presets.py`) all read them from here. Which
dataset uses which is said by its spec in `dataset_specs.py`. The strings are the release's byte for
byte (its typos included): a model trained on them expects exactly these.

The prompt style is Vicuna v0's, the release's LLM: `###Human: ... ###Assistant: ...`, an answer ending
with the end symbol, which is also the separator before each speaker tag. Another LLM family (Llama 3,
Qwen2.5) would bring its own style here.
"""
from __future__ import annotations

from configuration import ModelConfig
from constants import ALL_VOKENS_TEXT, IMAGE_SLOT

# Where an answer ends: the model config's `end_sym` (its default, the release's "###"); generation
# stops there (`MiniGPT4.end_sym`) and the scorers cut it off (`metric.clean_text`).
END_SYM = ModelConfig.end_sym

# The answer that asks for a picture: the eight vokens, then the end symbol.
VOKEN_TARGET = f"{ALL_VOKENS_TEXT} {END_SYM}"

HUMAN, ASSISTANT = f"{END_SYM}Human:", f"{END_SYM}Assistant:"

# ---- CC3M (stage 1) ---------------------------------------------------------------------------------
# Every 100th training row adds an instruction-style sample: the system prompt, then CC3M_INSTRUCTION
# with one of CC3M_PROMPTS.
CC3M_SYSTEM = "You will be able to generate image according to command."
CC3M_PROMPTS = (
    "generate image with caption:",
    "can you give me the image with caption:",
    "help me to generate this image:",
    "generate image with according to caption:",
    "according to caption, generate image:",
    "an image with caption:",
    "can you visualize this caption:",
)
CC3M_INSTRUCTION = "###Human: {prompt} {caption} ###Assistant:"

# ---- VIST (stage 2) ---------------------------------------------------------------------------------
VIST_SYSTEM = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the "
               "images once I provide it to you. Please understanding images and generate story.")
VIST_GENERATION = (
    "###Human:{context} Generate an image with the scene description: {caption} ###Assistant:",
    "###Human:{context} the scene description: {caption} ###Assistant:",
)
VIST_MULTIMODAL = (
    "###Human:{context} Tell me the next scene with image. ###Assistant:",
    "###Human:{context} Generate the next scene with image. ###Assistant:",
    "###Human:{context} What should happen then? ###Assistant:",
)
VIST_UNDERSTANDING = (
    "###Human:{context} Tell me the next scene description by this image: <Img><ImageHere></Img> ###Assistant:",
    "###Human:{context} What happen in the next scene image: <Img><ImageHere></Img> ###Assistant:",
)

# ---- MMDialog (stage 2) -----------------------------------------------------------------------------
MMDIALOG_SYSTEM = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the "
                   "images once I provide it to you. Please generate conversations with appropriate images.")


def vist_context(captions) -> str:
    """The story so far in a VIST prompt: the earlier captions, each followed by its image slot, and a
    newline after the last slot (empty for the first step)."""
    captions = list(captions)
    return IMAGE_SLOT.join(captions) + (IMAGE_SLOT + "\n" if captions else "")


def text_target(text: str) -> str:
    """An answer without a picture as a training target: the text, then the end symbol."""
    return f"{text} {END_SYM}"


def speaker(turn: int) -> str:
    """MMDialog's speaker tag of a turn: Human on even turns, Assistant on odd ones."""
    return HUMAN if turn % 2 == 0 else ASSISTANT


def render_dialogue(dialogue) -> tuple[str, str]:
    """A `samples.Dialogue` in the Vicuna-v0 style of the release's MMDialog prompts: (source, target).
    The source is the system prompt, then each earlier message after its speaker tag (`HUMAN` for the
    user, `ASSISTANT` for the assistant) with an image slot for each picture, then the answer's tag;
    the target is the answer's text with the eight vokens for each of its pictures, then `END_SYM`
    (a one-picture answer "text [IMG0]..[IMG7] ###", as the release's targets)."""
    parts = [dialogue.system] if dialogue.system else []
    for message in dialogue.context:
        parts.append(HUMAN if message.role == "user" else ASSISTANT)
        parts += [s.text if s.text is not None else IMAGE_SLOT for s in message.segments]
    parts.append(ASSISTANT)
    answer = [s.text if s.text is not None else ALL_VOKENS_TEXT for s in dialogue.answer.segments]
    return " ".join(parts), " ".join(answer + [END_SYM])
