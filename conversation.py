"""Multi-turn interleaved conversations: a story or a dialogue that goes on for several turns.

Each turn is text plus images. The prompt is written in the release's format:

    {system}###Human: {text} <Img><ImageHere></Img> ###Assistant: {text} <Img><ImageHere></Img> ... ###Assistant:

so the model's own earlier pictures are fed back to it as input images. `to_html` writes the
whole conversation as one self-contained HTML file (images inlined) that opens in any browser.
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
from prompts import ASSISTANT, HUMAN, MMDIALOG_SYSTEM

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
    """One turn: who spoke, what they said, which images came with it."""

    role: str
    text: str
    images: list[Image.Image] = field(default_factory=list)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"a turn's role must be one of {ROLES}, got {self.role!r}")


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

    def prompt(self) -> tuple[str, list[Image.Image]]:
        """The prompt for the next Assistant turn and its input images, in order."""
        parts, images = [], []
        for turn in self.turns:
            parts.append(" ".join([f"{TAGS[turn.role]} {turn.text}".rstrip()] + [IMAGE_SLOT] * len(turn.images)))
            images.extend(turn.images)
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
            pictures = "".join(f'<img alt="{turn.role} image" src="{_data_uri(image)}">' for image in turn.images)
            rows.append(f'<div class="turn {turn.role.lower()}"><div class="role">{turn.role}</div>'
                        f'<div class="text">{html.escape(turn.text)}</div>{pictures}</div>')
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
    prompts, images = zip(*(c.prompt() for c in conversations))
    outputs = model.generate(list(prompts), [list(i) for i in images], **generate_kwargs)
    for conversation, out in zip(conversations, outputs):
        conversation.turns.append(Turn("Assistant", out.clean_text, [out.image] if out.image is not None else []))
    return outputs


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
