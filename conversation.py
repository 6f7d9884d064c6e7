"""Multi-turn interleaved conversations: a story or a dialogue that goes on for several turns.

Each turn is text plus images. The prompt is written in the release's format:

    {system}###Human: {text} <Img><ImageHere></Img> ###Assistant: {text} <Img><ImageHere></Img> ... ###Assistant:

so the model's own earlier pictures are fed back to it as input images (for another LLM family the
same turns are rendered in that family's prompt style, `LLMFamily.render`); an answer with several
pictures keeps each where it stands among its text (`Turn.segments`), in the prompt and in the page.
`to_html` writes the whole conversation as one self-contained HTML file (images inlined) that opens in
any browser.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from constants import IMAGE_SLOT, RESERVED_TOKENS
from image_transforms import load_rgb
from llm_families import DEFAULT_FAMILY
from prompts import ASSISTANT, END_SYM, HUMAN, MMDIALOG_SYSTEM
from samples import Dialogue, Message, Segment

ROLES = ("Human", "Assistant")
TAGS = {"Human": HUMAN, "Assistant": ASSISTANT}      # the prompt style's speaker tags (prompts.py)


def neutralise_reserved_tokens(text: str) -> tuple[str, list[str]]:
    """Text a person typed, made safe to put in a prompt: every `[IMG0]`..`[IMG7]` and
    `<ImageHere>` in it (which would tokenize to vokens or to an image slot without an image, as
    the datasets refuse them) becomes a look-alike that tokenizes as plain text (`[IMG 0]`,
    `<Image Here>`). Returns the new text and the tokens that were found."""
    found = [token for token in RESERVED_TOKENS if token in text]
    for token in found:
        text = text.replace(token, _LOOK_ALIKES[token])
    return text, found


_LOOK_ALIKES = {token: (token.replace("IMG", "IMG ") if token.startswith("[IMG") else "<Image Here>")
                for token in RESERVED_TOKENS}


@dataclass
class Turn:
    """One turn: who spoke, what they said, which images came with it. `segments`, when given, is the
    turn as it reads: its text pieces (str) and its images in order (an answer of several pictures,
    each where it stands); without it the images follow the text."""

    role: str
    text: str
    images: list[Image.Image] = field(default_factory=list)
    segments: list | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"a turn's role must be one of {ROLES}, got {self.role!r}")

    def pieces(self) -> list:
        """Text pieces and images in order (`segments`, else the text, then the images)."""
        if self.segments is not None:
            return list(self.segments)
        return ([self.text] if self.text else []) + list(self.images)

    def message(self) -> Message:
        """The turn as a `samples.Message` (Human: the user), its pictures in place, named by their
        number in the turn (what an LLM family's prompt style renders as image slots)."""
        pictures = iter(range(len(self.images)))
        return Message("user" if self.role == "Human" else "assistant",
                       tuple(Segment(text=piece) if isinstance(piece, str) else Segment(image=f"picture {next(pictures)}")
                             for piece in self.pieces()))


@dataclass
class Conversation:
    """A conversation with a system prompt; `respond` asks a model for the next Assistant turn."""

    system: str = MMDIALOG_SYSTEM
    turns: list[Turn] = field(default_factory=list)

    def add(self, role: str, text: str, images: list | None = None) -> "Conversation":
        """Append a turn; images may be PIL images or paths."""
        loaded = []
        for image in images or []:
            if isinstance(image, (str, Path)):
                path = Path(image)
                if not path.is_file():
                    raise FileNotFoundError(f"image {str(path)!r} does not exist")
                image = load_rgb(path)              # its size checked (max_image_pixels) before decoding
            loaded.append(image)
        self.turns.append(Turn(role, text, loaded))
        return self

    def prompt(self, family=None) -> tuple[str, list[Image.Image]]:
        """The prompt for the next Assistant turn and its input images, in order: in the release's format,
        or in the prompt style of `family` (an `llm_families` family; vicuna's is the release's)."""
        if family is not None and family.name != DEFAULT_FAMILY:
            messages = tuple(turn.message() for turn in self.turns) + (Message("assistant", ()),)
            images = [piece for turn in self.turns for piece in turn.pieces() if not isinstance(piece, str)]
            return family.render(Dialogue(self.system or None, messages))[0], images
        parts, images = [], []
        for turn in self.turns:
            if turn.segments is None:
                parts.append(" ".join([f"{TAGS[turn.role]} {turn.text}".rstrip()] + [IMAGE_SLOT] * len(turn.images)))
                images.extend(turn.images)
                continue
            pieces = [piece if isinstance(piece, str) else IMAGE_SLOT for piece in turn.segments]
            parts.append(" ".join([TAGS[turn.role]] + pieces))
            images.extend(piece for piece in turn.segments if not isinstance(piece, str))
        return self.system + " ".join(parts) + f" {ASSISTANT}", images

    def respond(self, model, **generate_kwargs):
        """Generate the next Assistant turn with `model.generate`, append it (its clean text and
        image) and return the `GenerationOutput`."""
        return respond_all(model, [self], **generate_kwargs)[0]

    def to_html(self, path: str | Path | None = None, title: str = "MiniGPT-5 conversation") -> str:
        """The conversation as one self-contained HTML page (images inlined as PNG data URIs);
        written to `path` when given."""
        rows = []
        for turn in self.turns:
            if turn.segments is None:
                body = (f'<div class="text">{html.escape(turn.text)}</div>'
                        + "".join(f'<img alt="{turn.role} image" src="{_data_uri(image)}">' for image in turn.images))
            else:       # every picture in its place among the text
                body = "".join(f'<div class="text">{html.escape(piece)}</div>' if isinstance(piece, str)
                               else f'<img alt="{turn.role} image" src="{_data_uri(piece)}">' for piece in turn.segments)
            rows.append(f'<div class="turn {turn.role.lower()}"><div class="role">{turn.role}</div>{body}</div>')
        page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 760px; margin: 2em auto; }}
.turn {{ border-radius: 8px; padding: 0.6em 0.9em; margin: 0.6em 0; }}
.human {{ background: #eef3ff; }} .assistant {{ background: #f3f3f3; }}
.role {{ font-weight: bold; font-size: 0.85em; color: #555; }}
.turn img {{ max-width: 256px; margin: 0.4em 0.4em 0 0; image-rendering: auto; }}
</style></head><body><h1>{html.escape(title)}</h1>
<p class="system">{html.escape(self.system)}</p>
{chr(10).join(rows)}
</body></html>
"""
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page


def respond_all(model, conversations: list[Conversation], **generate_kwargs) -> list:
    """Generate the next Assistant turn of several conversations as one batch."""
    family = getattr(getattr(model, "model", None), "family", None)     # the backbone's LLM family, if any
    prompts, images = zip(*(c.prompt(family) for c in conversations))
    outputs = model.generate(list(prompts), [list(i) for i in images], **generate_kwargs)
    # The model's end symbol (its config's); a stand-in model without a config ends as the default does.
    end_sym = getattr(getattr(model, "cfg", None), "end_sym", END_SYM)
    for conversation, out in zip(conversations, outputs):
        conversation.turns.append(answer_turn(out, end_sym))
    return outputs


def answer_turn(out, end_sym: str) -> Turn:
    """A generated answer (`generation.GenerationOutput`) as an Assistant turn: its clean text, its
    pictures, and with several pictures each in its place (`generation.answer_segments`)."""
    from generation import answer_segments

    images = list(getattr(out, "images", None) or ([out.image] if out.image is not None else []))
    segments = answer_segments(out.text, images, end_sym) if len(images) > 1 else None
    return Turn("Assistant", out.clean_text, images, segments)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
