"""samples.py: the structured sample (a dialogue of messages of text and image segments)."""
import pytest

from samples import Dialogue, Message, Segment


def test_a_dialogue_knows_its_context_answer_and_pictures():
    dialogue = Dialogue("sys", (
        Message("user", (Segment(text="so far"), Segment(image="a.jpg"), Segment(text="next?"))),
        Message("assistant", (Segment(text="here"), Segment(image="b.jpg"), Segment(text="and"), Segment(image="c.jpg")))))
    assert dialogue.input_images == ("a.jpg",)
    assert dialogue.target_images == ("b.jpg", "c.jpg")
    assert dialogue.answer.role == "assistant" and len(dialogue.context) == 1


def test_bad_segments_and_roles_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        Segment(text="a", image="b.jpg")
    with pytest.raises(ValueError, match="exactly one"):
        Segment()
    with pytest.raises(ValueError, match="role"):
        Message("system", (Segment(text="x"),))
