"""The structured form of one training or test sample: a dialogue of messages, each a list of text
and image segments, whose last message is the answer the model learns (training) or writes (test).

    Dialogue(system="...", messages=(
        Message("user", (Segment(text="the story so far"), Segment(image="a.jpg"), Segment(text="what next?"))),
        Message("assistant", (Segment(text="the dog runs"), Segment(image="b.jpg")))))

The data side (the dataset readers) builds it; an LLM family's prompt style renders it into the
model's text (an input picture becomes an image slot `<Img><ImageHere></Img>`, each picture of the
answer becomes the eight vokens), so a dataset is written once for every LLM. The release's
datasets keep their exact prompt strings for the release's LLM (Vicuna-v0) besides.

Roles are the chat-template ones: "user" and "assistant". A dataset where the model speaks for both
sides (the release trains MMDialog on every turn) names, in each sample, the speaker of the answer
"assistant" and the other one "user".
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Segment:
    """A piece of a message: text, or one picture (a path, absolute or relative to the data file's
    folder, or a shard member name)."""

    text: str | None = None
    image: str | None = None

    def __post_init__(self):
        if (self.text is None) == (self.image is None):
            raise ValueError(f"a segment is text or an image, exactly one of them; got text={self.text!r}, "
                             f"image={self.image!r}")


@dataclass(frozen=True)
class Message:
    """One message of a dialogue: who speaks, and the segments in order."""

    role: str
    segments: tuple[Segment, ...]

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"a message's role must be one of {ROLES}, got {self.role!r}")

    @property
    def images(self) -> tuple[str, ...]:
        """The pictures of this message, in order."""
        return tuple(s.image for s in self.segments if s.image is not None)


@dataclass(frozen=True)
class Dialogue:
    """A system prompt (or None) and the messages; the last message is the answer."""

    system: str | None
    messages: tuple[Message, ...]

    @property
    def context(self) -> tuple[Message, ...]:
        """Every message before the answer."""
        return self.messages[:-1]

    @property
    def answer(self) -> Message:
        """The message the model learns or writes."""
        return self.messages[-1]

    @property
    def input_images(self) -> tuple[str, ...]:
        """The pictures the model reads (those of the context), in order."""
        return tuple(image for message in self.context for image in message.images)

    @property
    def target_images(self) -> tuple[str, ...]:
        """The pictures the model draws (those of the answer), in order."""
        return self.answer.images
