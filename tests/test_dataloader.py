"""Tests for `dataloader.py`: the release's sample lists on the reference files (expectations written
by hand from the release's prompts), tokenization and collation, bad input, DataLoader workers, the feature
cache, and the CLI on the repo's own sample datasets."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import data_commands
import data_problems
import dataloader as D
import feature_cache
import tsv_index
from collator import Collator
from image_transforms import target_transform

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"

# ---- the release's strings, written out here independently of dataloader.py ----------------------

VOKEN_TARGET = "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7] ###"
SLOT = "<Img><ImageHere></Img>"
CC3M_SYSTEM = "You will be able to generate image according to command."
CC3M_PROMPTS = ["generate image with caption:", "can you give me the image with caption:",
                "help me to generate this image:", "generate image with according to caption:",
                "according to caption, generate image:", "an image with caption:",
                "can you visualize this caption:"]
VIST_SYSTEM = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the images "
               "once I provide it to you. Please understanding images and generate story.")
MMDIALOG_SYSTEM = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the "
                   "images once I provide it to you. Please generate conversations with appropriate images.")


def vist_sources(kind: str, context: str, caption: str) -> set[str]:
    """Every source the release's VIST templates produce for one step."""
    if kind == "gen":
        templates = [f"###Human:{context} Generate an image with the scene description: {caption} ###Assistant:",
                     f"###Human:{context} the scene description: {caption} ###Assistant:"]
    elif kind == "multimodal":
        templates = [f"###Human:{context} Tell me the next scene with image. ###Assistant:",
                     f"###Human:{context} Generate the next scene with image. ###Assistant:",
                     f"###Human:{context} What should happen then? ###Assistant:"]
    else:
        templates = [f"###Human:{context} Tell me the next scene description by this image: {SLOT} ###Assistant:",
                     f"###Human:{context} What happen in the next scene image: {SLOT} ###Assistant:"]
    return {VIST_SYSTEM + t for t in templates}


pytestmark = pytest.mark.usefixtures("no_data_env")    # no DATAFOLDER / PREPROCESS_FEATURE_FOLDER from the shell


@pytest.fixture(scope="module")
def ref(release_samples) -> Path:
    return release_samples


def dump(path, split: str, tokenizer=None, **kwargs) -> list[dict]:
    """What the CLI prints, through the same functions."""
    kind = D.resolve_dataset_type(path, kwargs.pop("dataset_type", None))
    dataset = D.spec(kind).reader_class()(path, tokenizer=tokenizer, is_training=split == "train",
                                          feature_folder=False, **kwargs)
    return list(D.dump_records(dataset))


def write_jpeg(path: Path, size=(40, 24), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


# ------------------------------------------------------------------------------------------------
# The reference files: the release's sample lists
# ------------------------------------------------------------------------------------------------

def test_reference_cc3m(ref):
    path = ref / "CC3M" / "cc3m_val.tsv"
    c0 = "burning candle on the background of the aquarium with small fish"
    c1 = "shot of the full tree"
    img0, img1 = ref / "CC3M" / "val" / "000007775.jpg", ref / "CC3M" / "val" / "000009256.jpg"

    train = dump(path, "train")
    assert [r["task_name"] for r in train] == ["cc3m_0", "cc3m_0_instruction", "cc3m_1"]
    assert train[0] == {"task_name": "cc3m_0", "source": c0, "target": VOKEN_TARGET, "caption": c0,
                        "input_images": [], "output_image": train[0]["output_image"]}
    assert train[1]["source"] in {f"{CC3M_SYSTEM}###Human: {p} {c0} ###Assistant:" for p in CC3M_PROMPTS}
    assert (train[1]["target"], train[1]["caption"], train[1]["input_images"]) == (VOKEN_TARGET, c0, [])
    assert (train[2]["source"], train[2]["target"], train[2]["caption"]) == (c1, VOKEN_TARGET, c1)
    assert [Path(r["output_image"]) for r in train] == [img0, img0, img1]

    test = dump(path, "test")  # no instruction sample; the expected output is the caption
    assert [(r["task_name"], r["source"], r["target"], r["caption"], r["input_images"]) for r in test] == [
        ("cc3m_0", c0, c0, c0, []), ("cc3m_1", c1, c1, c1, [])]
    assert [Path(r["output_image"]) for r in test] == [img0, img1]


VIST_CAPTIONS = ["my sister arrived early to help me with the family bar bq .",
                 "every one else arrived soon after .", "dad manned the grill .",
                 "there was so much food and it was all delicious .",
                 "we ended the day shooting off some fireworks ."]
VIST_IMAGES = ["000000005.jpg", "000000007.jpg", "000000003.jpg", "000000004.jpg", "000000000.jpg"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_reference_vist(ref, split):
    folder = ref / "VIST"
    images = [folder / "val_images" / name for name in VIST_IMAGES]
    expected = []  # (task, kind, target, input images, output image)
    for k, caption in enumerate(VIST_CAPTIONS):
        expected.append((f"40470_{k}-gen", "gen", VOKEN_TARGET, images[:k], images[k]))
        if k and split == "train":
            expected.append((f"40470_{k}-multimodal", "multimodal", f"{caption} {VOKEN_TARGET}", images[:k], images[k]))
            expected.append((f"40470_{k}-understanding", "understanding", f"{caption} ###", images[:k + 1], None))
    records = dump(folder / "val_cleaned.json", split)
    assert [r["task_name"] for r in records] == [e[0] for e in expected]
    for record, (name, kind, target, inputs, output) in zip(records, expected):
        k = int(name.split("_")[1].split("-")[0])
        context = "" if k == 0 else SLOT.join(VIST_CAPTIONS[:k]) + SLOT + "\n"
        assert record["source"] in vist_sources(kind, context, VIST_CAPTIONS[k]), name
        assert record["target"] == target and record["caption"] is None
        assert [Path(p) for p in record["input_images"]] == inputs
        assert (Path(record["output_image"]) if record["output_image"] else None) == output
        assert record["source"].count("<ImageHere>") == len(inputs)


def test_reference_mmdialog(ref, tiny_tokenizer):
    path = ref / "MMDialog" / "test" / "test_conversations.txt"
    turns = json.loads(path.read_text())["conversation"]
    texts = [t["turn"][0]["__TEXT__"] for t in turns]
    folder = path.parent
    media = {0: "2682085160072908899", 1: "-5632896413199993329", 2: "3433276376275926389", 3: "-5763052819421198282"}
    image = {i: folder / f"{m}.jpg" for i, m in media.items()}
    # The sliding window by hand: (turn, turns in its history). The window restarts at turn 2 once
    # turn 3 is answered, at turn 4 after turn 5, at turn 6 after turn 7.
    windows = [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [2, 3]), (5, [2, 3, 4]), (6, [4, 5]),
               (7, [4, 5, 6]), (8, [6, 7])]
    records = dump(path, "test")
    assert [r["task_name"] for r in records] == [f"0_{i}-mm" for i, _ in windows]
    for record, (i, history) in zip(records, windows):
        parts = [MMDIALOG_SYSTEM]
        for j in history:
            parts.append(("###Human: " if j % 2 == 0 else "###Assistant: ") + texts[j])
            if j in image:
                parts.append(SLOT)
        parts.append("###Human:" if i % 2 == 0 else "###Assistant:")
        assert record["source"] == " ".join(parts), i
        assert record["target"] == (f"{texts[i]} {VOKEN_TARGET}" if i in image else f"{texts[i]} ###")
        assert record["caption"] is None
        assert [Path(p) for p in record["input_images"]] == [image[j] for j in history if j in image]
        assert (Path(record["output_image"]) if record["output_image"] else None) == image.get(i)
    # One written out in full: the window after the first restart.
    assert records[3]["source"] == (
        MMDIALOG_SYSTEM + " ###Human: Lovely photo Doro! Here's my favourite skyline. "
        ":smiling_face_with_smiling_eyes: HongKong I tag <Img><ImageHere></Img> ###Assistant: Thanks so much for "
        "tagging us in to JAChat! Absolutely love Skyline pics and definitely need to take more... This shot was "
        "taken at a special event I attended in 2015 where Towerbridge lifted and we got to sail through as the sun "
        "was setting :winking_face: <Img><ImageHere></Img> ###Human:")
    # In training the first turn is longer than 50 LLM tokens: the conversation stops at once.
    assert len(tiny_tokenizer(texts[0], add_special_tokens=False).input_ids) > 50
    assert dump(path, "train", tokenizer=tiny_tokenizer) == []


# ------------------------------------------------------------------------------------------------
# Caption cleaning and the vectorised CC3M reader
# ------------------------------------------------------------------------------------------------

TRICKY = ["A Dog.", "  lots   of   space  ", "punct!!!(*)#:;~end", "tab\tinside", "x\x0by", "a \x0b b",
          "\x1c\x1dsep", "trailing .", ".", "", " ", "Ünïcödé CAFÉ.", "ΟΔΟΣ ΑΣ.", "İstanbul",
          "nbsp\xa0here", "double\xa0\xa0nbsp", "wide\u3000\u3000space", "emoji 😀 !!", 'quote "x" y',
          "x  \xa0 y", "end\u00a0"]


def test_clean_caption_release_semantics():
    assert tsv_index.clean_caption("A Dog, on the Beach. (Photo) ") == "a dog, on the beach photo"
    assert tsv_index.clean_caption("burning candle on the background of the aquarium with small fish .") == \
        "burning candle on the background of the aquarium with small fish"
    assert tsv_index.clean_caption("x\x0by") == "x\x0by"  # a single non-space whitespace character stays
    ascii_ = [t for t in TRICKY if t.isascii() and "\t" not in t]
    joined = tsv_index.clean_captions_ascii("\x00".join(ascii_).encode())
    assert joined.decode().split("\x00") == [tsv_index.clean_caption(t) for t in ascii_]


def test_cc3m_reader_matches_a_line_by_line_reading(tmp_path):
    captions = [t for t in TRICKY if "\t" not in t and tsv_index.clean_caption(t)]
    lines = ["caption\timage_path"] + [f"{c}\timg/{i}.jpg" for i, c in enumerate(captions)]
    lines.insert(3, "")  # a blank line: not a row, as in pandas
    path = tmp_path / "cc3m.tsv"
    path.write_bytes("\r\n".join(lines).encode())  # CRLF, and no newline at the end
    table = tsv_index.read_cc3m_tsv(path, data_problems.ProblemLog(strict=True), block_size=32)  # many small blocks
    assert [table.captions[i] for i in table.valid] == [tsv_index.clean_caption(c) for c in captions]
    assert [table.paths[i] for i in table.valid] == [f"img/{i}.jpg" for i in range(len(captions))]
    assert table.rows[table.valid].tolist() == list(range(len(captions)))
    assert table.lines[table.valid].tolist() == [2, 3] + list(range(5, len(captions) + 3))


def test_cc3m_instruction_every_100th_row(tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_text("caption\timage_path\n" + "".join(f"caption {i}\timg/{i}.jpg\n" for i in range(250)))
    train = D.CC3MDataset(path, is_training=True)
    names = [s.task_name for s in train.samples()]
    assert len(names) == 253
    assert names[:3] == ["cc3m_0", "cc3m_0_instruction", "cc3m_1"]
    assert names[101:103] == ["cc3m_100", "cc3m_100_instruction"]
    assert names[-1] == "cc3m_249" and "cc3m_200_instruction" in names
    assert len(D.CC3MDataset(path, is_training=False)) == 250


# ------------------------------------------------------------------------------------------------
# Bad input: skipped and counted (file and line logged), or an error in strict mode
# ------------------------------------------------------------------------------------------------

CC3M_BAD_ROWS = [
    ("no tab here", "not 2 tab-separated fields (a missing or extra column)"),
    ("one\ttoo\tmany", "not 2 tab-separated fields (a missing or extra column)"),
    ("\timg/x.jpg", "empty caption"),
    (" ... !\timg/x.jpg", "empty caption"),
    ("a caption\t", "empty image_path"),
]


@pytest.mark.parametrize("row,reason", CC3M_BAD_ROWS)
def test_cc3m_bad_row(tmp_path, caplog, row, reason):
    path = tmp_path / "cc3m.tsv"
    path.write_text(f"caption\timage_path\nfirst\timg/0.jpg\n{row}\nthird\timg/2.jpg\n")
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        dataset = D.CC3MDataset(path, is_training=False)
    assert [s.task_name for s in dataset.samples()] == ["cc3m_0", "cc3m_2"]  # row numbers stay
    assert dataset.problems.counts == {reason: 1}
    assert f"{path}:3: {reason}" in caplog.text
    with pytest.raises(D.DataError, match=re.escape(f"{path}:3: {reason}")):
        D.CC3MDataset(path, is_training=False, strict=True)


def test_cc3m_bad_bytes(tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_bytes(b"caption\timage_path\nok\ta.jpg\nbad \xff\xfe utf8\tb.jpg\nnul\x00here\tc.jpg\nfine\td.jpg\n")
    dataset = D.CC3MDataset(path, is_training=False)
    assert [s.caption for s in dataset.samples()] == ["ok", "fine"]
    assert dataset.problems.counts == {"not valid UTF-8": 1, "NUL character in the line": 1}
    with pytest.raises(D.DataError, match=rf"{path}:3: not valid UTF-8"):
        D.CC3MDataset(path, is_training=False, strict=True)


def test_cc3m_missing_header_column_is_an_error(tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_text("caption\tpath\nx\ty.jpg\n")
    with pytest.raises(D.DataError, match=rf"{path}:1: .*no column 'image_path'"):
        D.CC3MDataset(path)


def write_vist(tmp_path: Path, steps: list, mapping: dict) -> Path:
    path = tmp_path / "val_cleaned.json"
    path.write_text(json.dumps({"7": steps}))
    (tmp_path / "val_image_mapping.json").write_text(json.dumps(mapping))
    return path


@pytest.mark.parametrize("bad_step,reason", [
    ({"caption": "three .", "image_id": "404", "sequence_index": 2}, "image id not in the mapping file"),
    ({"caption": " ", "image_id": "3", "sequence_index": 2}, "empty caption"),
    ({"caption": "a [IMG0] here", "image_id": "3", "sequence_index": 2}, "reserved token in text"),
    ({"caption": "no image id", "sequence_index": 2}, "malformed step"),
])
def test_vist_bad_step_cuts_the_story(tmp_path, caplog, bad_step, reason):
    steps = [{"caption": "one .", "image_id": "1", "sequence_index": 0},
             {"caption": "two .", "image_id": "2", "sequence_index": 1},
             bad_step,
             {"caption": "four .", "image_id": "3", "sequence_index": 3}]
    path = write_vist(tmp_path, steps, {"1": "a.jpg", "2": "b.jpg", "3": "c.jpg"})
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        dataset = D.VISTDataset(path, is_training=False)
    assert [s.task_name for s in dataset.samples()] == ["7_0-gen", "7_1-gen"]
    assert dataset.problems.counts == {reason: 1}
    assert f"(story 7, step 2): {reason}" in caplog.text
    with pytest.raises(D.DataError, match=re.escape(f"val_cleaned.json (story 7, step 2): {reason}")):
        D.VISTDataset(path, strict=True)


def test_vist_descriptions_are_the_drawn_pictures_captions(tmp_path, caplog):
    """A step's `description` (its picture described on its own) is the caption of the samples that
    draw that picture, and never part of a prompt; steps without one (the release's files) have none."""
    steps = [{"caption": "one .", "image_id": "1", "sequence_index": 0, "description": "a red door"},
             {"caption": "two .", "image_id": "2", "sequence_index": 1, "description": "a blue door"},
             {"caption": "three .", "image_id": "3", "sequence_index": 2}]
    path = write_vist(tmp_path, steps, {"1": "a.jpg", "2": "b.jpg", "3": "c.jpg"})
    captions = {s.task_name: s.caption for s in D.VISTDataset(path, is_training=True).samples()}
    assert captions == {"7_0-gen": "a red door", "7_1-gen": "a blue door", "7_1-multimodal": "a blue door",
                        "7_1-understanding": None, "7_2-gen": None, "7_2-multimodal": None,
                        "7_2-understanding": None}
    assert not any("door" in s.source or "door" in s.target for s in D.VISTDataset(path, is_training=True).samples())
    for bad, reason in [(" ", "empty description"), (3, "empty description"),
                        ("a [IMG0] door", "reserved token in text")]:
        path = write_vist(tmp_path, [dict(steps[0], description=bad)], {"1": "a.jpg"})
        with caplog.at_level(logging.WARNING, logger="dataloader"):
            assert D.VISTDataset(path, is_training=False).problems.counts == {reason: 1}


def test_vist_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "val_cleaned.json"
    path.write_text('{"7": [\n  {"caption": "x", }\n]}')
    (tmp_path / "val_image_mapping.json").write_text("{}")
    with pytest.raises(D.DataError, match=rf"{path}:2:\d+: malformed JSON"):
        D.VISTDataset(path)


def write_conversations(folder: Path, conversations: list, images=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for media in images:
        write_jpeg(folder / f"{media}.jpg")
    path = folder / "test_conversations.txt"
    path.write_text("\n".join(c if isinstance(c, str) else json.dumps(c) for c in conversations) + "\n")
    return path


def conversation(cid, *turns):
    return {"conversation_id": cid,
            "conversation": [{"turn": [{"__TEXT__": t}] + ([{"__MEDIA__": m}] if m else [])} for t, m in turns]}


def test_mmdialog_malformed_lines(tmp_path, caplog):
    good = conversation(1, ("hi", None), ("hello", None))
    path = write_conversations(tmp_path, [good, '{"conversation_id": 2, "conversation": [', {"id": 3}, good])
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        dataset = D.MMDialogDataset(path, is_training=False)
    assert [s.location for s in dataset.samples()] == [f"{path}:1", f"{path}:4"]
    assert dataset.problems.counts == {"malformed JSON line": 1, "malformed conversation": 1}
    assert f"{path}:2: malformed JSON line" in caplog.text and f"{path}:3: malformed conversation" in caplog.text
    with pytest.raises(D.DataError, match=rf"{path}:2: malformed JSON line"):
        D.MMDialogDataset(path, is_training=False, strict=True)


def test_mmdialog_release_rules(tmp_path, tiny_tokenizer):
    long_text = " ".join(["word"] * 60)
    path = write_conversations(tmp_path, [
        conversation(1, ("only one turn", None)),                                   # skipped
        conversation(2, ("a", None), ("b", "-11"), ("c", "404"), ("d", None)),       # 404.jpg missing
        conversation(3, ("a", None), ("b", None), ("see file.jpg", None), ("d", None)),
        conversation(4, ("a", None), ("b", None), ("", "-11"), ("d", None)),
        conversation(5, ("a", None), ("b", "3713630103994725971"), ("c", None)),     # known-broken id
        conversation(6, ("a", None), ("b", None), (long_text, None), ("d", None)),   # long: training only
    ], images=["-11", "3713630103994725971"])
    test = D.MMDialogDataset(path, is_training=False)
    assert [s.task_name for s in test.samples()] == ["2_1-mm", "3_1-mm", "4_1-mm", "6_1-mm", "6_2-mm", "6_3-mm"]
    assert test.problems.counts == {"missing image": 1}
    assert test.problems.rules["conversation with fewer than 2 turns"] == 1
    train = D.MMDialogDataset(path, tokenizer=tiny_tokenizer, is_training=True)
    assert [s.task_name for s in train.samples()] == ["2_1-mm", "3_1-mm", "4_1-mm", "6_1-mm"]
    assert train.sample(0).output_image_path == str(tmp_path / "-11.jpg")
    with pytest.raises(D.DataError, match=rf"{path}:2 \(turn 2\): missing image: .*404.jpg"):
        D.MMDialogDataset(path, is_training=False, strict=True)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        D.MMDialogDataset(path, is_training=True)


@pytest.fixture()
def image_cases(tmp_path):
    """A CC3M file whose second row's image is broken in one of three ways."""
    def make(kind: str) -> Path:
        folder = tmp_path / kind
        write_jpeg(folder / "good.jpg")
        bad = folder / "bad.jpg"
        if kind == "corrupt":
            bad.write_bytes(b"this is not a jpeg at all")
        elif kind == "truncated":
            write_jpeg(bad, size=(64, 64))
            bad.write_bytes(bad.read_bytes()[:200])
        path = folder / "cc3m.tsv"
        path.write_text("caption\timage_path\ngood one\tgood.jpg\nbad one\tbad.jpg\ngood two\tgood.jpg\n")
        return path
    return make


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated"])
def test_bad_image_is_dropped_and_counted(image_cases, tiny_tokenizer, tiny_config, caplog, kind):
    path = image_cases(kind)
    dataset = D.CC3MDataset(path, tiny_tokenizer, tiny_config, is_training=False)
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        items = [dataset[i] for i in range(len(dataset))]
    assert items[1] is None and items[0] is not None and items[2] is not None
    assert dataset.problems.counts == {"unreadable image": 1}
    assert f"{path}:3 (sample cc3m_1): unreadable image: image {path.parent / 'bad.jpg'}" in caplog.text
    collate = Collator(tiny_tokenizer)
    batch = collate(items)
    assert batch["task_names"] == ["cc3m_0", "cc3m_2"] and batch["num_dropped"] == 1
    assert collate([None, None]) is None  # the training step skips a None batch
    strict = D.CC3MDataset(path, tiny_tokenizer, tiny_config, is_training=False, strict=True)
    with pytest.raises(D.DataError, match=rf"{path}:3 \(sample cc3m_1\): unreadable image: image .*bad.jpg"):
        strict[1]


# ------------------------------------------------------------------------------------------------
# Items and batches
# ------------------------------------------------------------------------------------------------

def test_items_and_collated_batch(tiny_tokenizer, tiny_config):
    dataset = D.VISTDataset(DATASETS / "VIST" / "train_cleaned.json", tiny_tokenizer, tiny_config, is_training=True)
    items = [dataset[i] for i in range(6)]
    voken_ids = tiny_tokenizer.convert_tokens_to_ids([f"[IMG{i}]" for i in range(8)])
    image_id = tiny_tokenizer.convert_tokens_to_ids("<ImageHere>")
    S, SD = tiny_config.image_size, tiny_config.sd_image_size
    for item in items:
        n_in = item["source"].count("<ImageHere>")
        assert item["input_images"].shape == (n_in, 3, S, S)
        assert item["output_image"].shape == (3, SD, SD)
        assert item["has_output_image"] == (item["output_image_path"] is not None)
        if item["has_output_image"]:
            assert -1 <= item["output_image"].min() < item["output_image"].max() <= 1
        else:
            assert not item["output_image"].any()
        src = tiny_tokenizer(item["source"], add_special_tokens=False).input_ids
        tgt = tiny_tokenizer(item["target"], add_special_tokens=False).input_ids
        assert item["input_ids"].tolist() == src + tgt
    batch = Collator(tiny_tokenizer)(items)
    B, T = batch["input_ids"].shape
    assert B == 6 and batch["labels"].shape == (B, T) and batch["attention_mask"].shape == (B, T)
    assert batch["input_images"].shape == (sum(i["input_images"].shape[0] for i in items), 3, S, S)
    assert int((batch["input_ids"] == image_id).logical_and(batch["attention_mask"].bool()).sum()) == \
        batch["input_images"].shape[0]
    assert batch["output_images"].shape == (B, 3, SD, SD)
    assert batch["has_output_image"].tolist() == [i["output_image_path"] is not None for i in items]
    assert batch["captions"] == [None] * B and batch["task_names"] == [i["task_name"] for i in items]
    for b, item in enumerate(items):
        n_src = len(tiny_tokenizer(item["source"], add_special_tokens=False).input_ids)
        n = len(item["input_ids"])
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert (ids[n:] == tiny_tokenizer.eos_token_id).all() and (labels[n:] == -100).all()
        expected = ids[:n].clone()
        expected[:n_src] = -100
        expected[torch.isin(expected, torch.tensor(voken_ids[1:7]))] = -100
        assert labels[:n].tolist() == expected.tolist()
        has_vokens = "[IMG0]" in item["target"]
        assert (labels == voken_ids[0]).sum() == has_vokens and (labels == voken_ids[7]).sum() == has_vokens


def test_cc3m_batch_has_captions(tiny_tokenizer, tiny_config):
    dataset = D.CC3MDataset(DATASETS / "CC3M" / "cc3m_train.tsv", tiny_tokenizer, tiny_config)
    batch = Collator(tiny_tokenizer)([dataset[i] for i in range(3)])
    assert batch["captions"] == ["a red circle on a blue background"] * 2 + ["green square on a white background"]
    assert batch["input_images"].shape == (0, 3, tiny_config.image_size, tiny_config.image_size)


def test_truncation_keeps_the_target_and_drops_whole_images(tiny_tokenizer, tiny_config):
    path = DATASETS / "VIST" / "train_cleaned.json"
    full = D.VISTDataset(path, tiny_tokenizer, tiny_config, is_training=False)
    index = 4  # the fifth step: four history images
    item = full[index]
    n_target = len(tiny_tokenizer(item["target"], add_special_tokens=False).input_ids)
    image_id = tiny_tokenizer.convert_tokens_to_ids("<ImageHere>")
    n_cut = int((item["input_ids"] == image_id).nonzero()[1]) + 3  # just past the second image
    limit = len(item["input_ids"]) - n_cut
    cut = D.VISTDataset(path, tiny_tokenizer, tiny_config, is_training=False, max_length=limit)[index]
    assert len(cut["input_ids"]) == limit and cut["num_truncated_tokens"] == n_cut
    assert cut["input_ids"].tolist() == item["input_ids"][n_cut:].tolist()
    assert cut["labels"][-n_target:].tolist() == item["labels"][-n_target:].tolist()
    assert int((cut["input_ids"] == image_id).sum()) == 2 and cut["input_images"].shape[0] == 2
    assert cut["input_image_paths"] == item["input_image_paths"][2:]
    assert torch.equal(cut["input_images"], item["input_images"][2:])
    tiny = D.VISTDataset(path, tiny_tokenizer, tiny_config, is_training=False, max_length=n_target)
    assert tiny[index] is None and tiny.problems.counts == {"text too long": 1}


def test_target_transform_pads_white_and_flips_are_seeded(tmp_path, tiny_tokenizer, tiny_config):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    out = target_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out[:, 0, :], torch.ones(3, 32))  # white padding on top
    assert out[0, 16, 2] > 0.9 and out[1, 16, 2] < -0.9    # red on the left
    path = tmp_path / "cc3m.tsv"
    image.save(tmp_path / "x.png")
    path.write_text("caption\timage_path\n" + "".join(f"c {i}\tx.png\n" for i in range(16)))
    test = D.CC3MDataset(path, tiny_tokenizer, tiny_config, is_training=False)
    train = D.CC3MDataset(path, tiny_tokenizer, tiny_config, is_training=True)
    plain = test[0]["output_image"]
    flipped = [not torch.equal(train[i]["output_image"], plain) for i in range(len(train))]
    assert all(torch.equal(train[i]["output_image"], plain.flip(-1)) for i in range(len(train)) if flipped[i])
    assert 0 < sum(flipped) < len(flipped)
    again = D.CC3MDataset(path, tiny_tokenizer, tiny_config, is_training=True)
    assert [not torch.equal(again[i]["output_image"], plain) for i in range(len(train))] == flipped
    again.set_epoch(1)
    assert [not torch.equal(again[i]["output_image"], plain) for i in range(len(train))] != flipped


def test_templates_are_seeded(tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_text("caption\timage_path\n" + "".join(f"c {i}\tx.jpg\n" for i in range(0, 3000)))
    sources = [s.source for s in D.CC3MDataset(path).samples() if s.task_name.endswith("instruction")]
    assert sources == [s.source for s in D.CC3MDataset(path).samples() if s.task_name.endswith("instruction")]
    assert len({s.split("###Human: ")[1].rsplit(" c ", 1)[0] for s in sources}) > 3  # several templates
    other = [s.source for s in D.CC3MDataset(path, seed=7).samples() if s.task_name.endswith("instruction")]
    assert other != sources


def test_dataloader_workers_give_the_same_samples(tiny_tokenizer, tiny_config):
    dataset = D.VISTDataset(DATASETS / "VIST" / "train_cleaned.json", tiny_tokenizer, tiny_config, is_training=True)
    collate = Collator(tiny_tokenizer)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == (len(dataset) + 3) // 4
    for a, b in zip(batches[0], batches[2]):
        assert a["task_names"] == b["task_names"] and a["sources"] == b["sources"]
        for key in ("input_ids", "labels", "attention_mask", "input_images", "output_images", "has_output_image"):
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------
# Dataset type, DATAFOLDER, CLI
# ------------------------------------------------------------------------------------------------

def test_dataset_type_and_datafolder(monkeypatch):
    assert isinstance(D.make_dataset(DATASETS / "CC3M" / "cc3m_val.tsv", None, None, False), D.CC3MDataset)
    assert isinstance(D.make_dataset(DATASETS / "VIST" / "val_cleaned.json", None, None, False), D.VISTDataset)
    assert isinstance(D.make_dataset(DATASETS / "MMDialog" / "test" / "test_conversations.txt", None, None, False),
                      D.MMDialogDataset)
    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "VIST"))
    dataset = D.make_dataset("val_cleaned.json", None, None, False)  # resolved under DATAFOLDER
    assert isinstance(dataset, D.VISTDataset) and dataset.data_file == DATASETS / "VIST" / "val_cleaned.json"
    assert D.resolve_dataset_type("x/CC3M/y.tsv") == "VIST"  # DATAFOLDER wins, as in the release
    assert D.resolve_dataset_type("x.tsv", "cc3m") == "CC3M"
    with pytest.raises(FileNotFoundError, match=r"'nope.json' not found: looked at .*VIST/nope.json' and 'nope.json'"):
        D.make_dataset("nope.json", None, None, False)


@pytest.mark.parametrize("data_file", ["CC3M/cc3m_train.tsv", "CC3M/cc3m_val.tsv", "VIST/train_cleaned.json",
                                       "VIST/val_cleaned.json", "MMDialog/train/train_conversations.txt",
                                       "MMDialog/test/test_conversations.txt"])
def test_cli_dump_on_repo_datasets(capsys, tiny_config_path, data_file):
    for split in ("train", "test"):
        assert data_commands.main([str(DATASETS / data_file), "--split", split, "--model_config", str(tiny_config_path)]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert records, (data_file, split)
        for r in records:
            assert list(r) == ["task_name", "source", "target", "caption", "input_images", "output_image"]
            assert all(Path(p).is_file() for p in r["input_images"])
            assert r["output_image"] is None or Path(r["output_image"]).is_file()
            assert r["source"].count("<ImageHere>") == len(r["input_images"])


def test_cli_subprocess_with_datafolder(tmp_path):
    env = {"DATAFOLDER": "datasets/MMDialog", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "dataloader.py", "test/test_conversations.txt", "--split", "test",
                          "--limit", "3"], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["task_name"] for r in records] == ["200_1-mm", "200_2-mm", "200_3-mm"]
    assert records[0]["input_images"] == ["datasets/MMDialog/test/-1537700284470129934.jpg"]


# ------------------------------------------------------------------------------------------------
# Feature cache
# ------------------------------------------------------------------------------------------------

def test_cached_features_give_the_same_losses(tmp_path, tiny_config, monkeypatch):
    from model import MiniGPT5_Model

    torch.manual_seed(0)
    model = MiniGPT5_Model(tiny_config, stage=1).eval()
    tokenizer = model.model.llama_tokenizer
    path = DATASETS / "VIST" / "val_cleaned.json"
    images = D.VISTDataset(path, tokenizer, tiny_config, is_training=False, feature_folder=False)
    counts = data_commands.preprocess_features(images, model, tmp_path / "features", batch_size=3, device="cpu")
    assert counts["written"] == 8 + 6 and "bad" not in counts  # 8 outputs, 6 distinct history images
    assert data_commands.preprocess_features(images, model, tmp_path / "features", device="cpu") == {"cached": 14}
    monkeypatch.setenv("PREPROCESS_FEATURE_FOLDER", str(tmp_path / "features"))
    cached = D.VISTDataset(path, tokenizer, tiny_config, is_training=False)  # reads the variable
    assert cached.feature_folder == tmp_path / "features"

    collate = Collator(tokenizer)
    picks = [1, 2, 3, 5]
    batch_images = collate([images[i] for i in picks])
    batch_features = collate([cached[i] for i in picks])
    assert "input_images" not in batch_features
    assert batch_features["input_image_features"].shape[:2] == (1 + 2 + 3 + 0, tiny_config.num_query_token)
    assert batch_features["output_image_features"].shape[1] == 8
    B = len(picks)
    latent = (B, 4, tiny_config.sd_image_size // 2, tiny_config.sd_image_size // 2)
    g = torch.Generator().manual_seed(1)
    draws = {"latent_noise": torch.randn(latent, generator=g), "noise": torch.randn(latent, generator=g),
             "timesteps": torch.randint(0, 1000, (B,), generator=g), "cfg_drop": torch.tensor([0, 1, 0, 0])}
    losses = []
    for batch in (batch_images, batch_features):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(model({**batch, **draws}))
    assert set(losses[0]) == {"text_loss", "image_loss", "loss"}
    for key in losses[0]:
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-5, atol=1e-6)

    # A missing cache entry is a bad sample (counted), not a silent fallback to the image.
    next(iter((tmp_path / "features" / "test" / "vae").iterdir())).unlink()
    assert sum(cached[i] is None for i in range(len(cached))) == 1
    assert cached.problems.counts == {"missing cached feature": 1}


def test_preprocess_writes_under_outputs_by_default(tmp_path, tiny_config_path, monkeypatch):
    """Run from a checkout, `preprocess` without --out writes into the git-ignored outputs/ folder."""
    monkeypatch.chdir(tmp_path)
    data = DATASETS / "CC3M" / "cc3m_val.tsv"
    assert data_commands.main(["preprocess", str(data), "--split", "test", "--model_config", str(tiny_config_path),
                   "--device", "cpu"]) == 0
    assert len(list((tmp_path / "outputs" / "features" / "test" / "vae").iterdir())) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    assert "/outputs/" in (REPO / ".gitignore").read_text().split()


def test_preprocess_cli(tmp_path, tiny_config_path, tiny_tokenizer, tiny_config):
    out = tmp_path / "features"
    data = DATASETS / "CC3M" / "cc3m_val.tsv"
    assert data_commands.main(["preprocess", str(data), "--out", str(out), "--split", "test",
                   "--model_config", str(tiny_config_path), "--batch_size", "2", "--device", "cpu"]) == 0
    files = sorted((out / "test" / "vae").iterdir())
    assert len(files) == 3 and not (out / "test" / "img").exists()  # CC3M has no input images
    cached = D.CC3MDataset(data, tiny_tokenizer, tiny_config, is_training=False, feature_folder=out)
    batch = Collator(tiny_tokenizer)([cached[i] for i in range(3)])
    assert batch["output_image_features"].shape == (3, 8, tiny_config.sd_image_size // 2, tiny_config.sd_image_size // 2)
    assert batch["input_image_features"] is None and "output_images" not in batch


# ------------------------------------------------------------------------------------------------
# Token ids as the release's tokenizer gave them
# ------------------------------------------------------------------------------------------------

def release_token_ids(sp, added: dict[str, int], text: str) -> list[int]:
    """What transformers 4.31's slow `LlamaTokenizer(legacy=True)` gave for `text` (no BOS) with
    the vokens and <ImageHere> added as plain strings, written out from its source: cut the text
    at added tokens, strip the whitespace on both sides of each, encode every remaining non-empty
    piece with sentencepiece (which prefixes each piece with its `▁`)."""
    pieces = re.split("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")", text)
    for i, piece in enumerate(pieces):
        if piece in added:
            if i > 0:
                pieces[i - 1] = pieces[i - 1].rstrip()
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
    ids = []
    for piece in pieces:
        if piece:
            ids += [added[piece]] if piece in added else sp.encode(piece)
    return ids


def test_targets_with_text_before_the_vokens_tokenize_as_the_release(tiny_tokenizer, tiny_config):
    """VIST multimodal targets (`{caption} [IMG0]...`) and MMDialog picture turns (`{text} [IMG0]...`):
    no extra `▁` token between the text and [IMG0]; every id as the release's tokenizer gave it."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(tiny_config.llama_model) / "tokenizer.model"))
    names = [f"[IMG{i}]" for i in range(8)] + ["<ImageHere>"]
    added = dict(zip(names, tiny_tokenizer.convert_tokens_to_ids(names)))
    lone_prefix = sp.piece_to_id("▁")
    vist = D.VISTDataset(DATASETS / "VIST" / "train_cleaned.json", tiny_tokenizer, tiny_config, is_training=True)
    mmdialog = D.MMDialogDataset(DATASETS / "MMDialog" / "train" / "train_conversations.txt", tiny_tokenizer,
                                 tiny_config, is_training=True)
    samples = [s for s in vist.samples() if s.task_name.endswith("-multimodal")]
    samples += [s for s in mmdialog.samples() if s.output_image_path is not None]
    assert len(samples) >= 4 and any(s.task_name.endswith("-mm") for s in samples)
    for dataset, sample in [(vist, s) for s in samples if s.task_name.endswith("-multimodal")] + \
                           [(mmdialog, s) for s in samples if s.task_name.endswith("-mm")]:
        assert re.search(r"\S \[IMG0\]", sample.target), sample.target
        input_ids, labels, _, _ = dataset.tokenize(sample)
        source = release_token_ids(sp, added, sample.source)
        target = release_token_ids(sp, added, sample.target)
        assert input_ids.tolist() == source + target, sample.task_name
        img0 = target.index(added["[IMG0]"])
        assert target[img0 - 1] != lone_prefix, sample.task_name
    # whitespace of every kind around added tokens, and a leading space, as the release
    for text in ["a dog  [IMG0][IMG1] ###", "hi\n[IMG0]\nthere", " leading space [IMG7] ###",
                 "x <Img><ImageHere></Img> y", "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7] ###"]:
        assert tiny_tokenizer(text, add_special_tokens=False).input_ids == release_token_ids(sp, added, text), text


# ------------------------------------------------------------------------------------------------
# Image paths must stay inside the dataset folder
# ------------------------------------------------------------------------------------------------

OUTSIDE = "image path outside the dataset folder"


def test_image_paths_leaving_the_dataset_folder_are_refused_and_counted(tmp_path, caplog):
    data = tmp_path / "CC3M"
    write_jpeg(data / "images" / "a.jpg")
    write_jpeg(tmp_path / "secret.jpg")
    inside_abs = str(data / "images" / "a.jpg")
    rows = ["caption\timage_path", "one\timages/a.jpg", "two\t../secret.jpg", f"three\t{tmp_path / 'secret.jpg'}",
            "four\timages/../images/a.jpg", f"five\t{inside_abs}", "six\timages/x/../../../CC3M-other/b.jpg"]
    (data / "cc3m_val.tsv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        dataset = D.CC3MDataset(data / "cc3m_val.tsv", is_training=False)
    assert [s.caption for s in dataset.samples()] == ["one", "four", "five"]
    assert dataset.problems.counts == {OUTSIDE: 3}
    assert f"cc3m_val.tsv:3: {OUTSIDE}" in caplog.text and f"cc3m_val.tsv:7: {OUTSIDE}" in caplog.text
    with pytest.raises(D.DataError, match=rf"cc3m_val.tsv:3: {OUTSIDE}"):
        D.CC3MDataset(data / "cc3m_val.tsv", is_training=False, strict=True)
    allowed = D.CC3MDataset(data / "cc3m_val.tsv", is_training=False, allow_outside_paths=True)
    assert len(allowed) == 6 and not allowed.problems.counts
    assert allowed.sample(1).output_image_path == str(data / "../secret.jpg")

    steps = [{"caption": "one .", "image_id": "1", "sequence_index": 0},
             {"caption": "two .", "image_id": "2", "sequence_index": 1},
             {"caption": "three .", "image_id": "3", "sequence_index": 2}]
    vist = tmp_path / "VIST"
    vist.mkdir()
    path = write_vist(vist, steps, {"1": "a.jpg", "2": "../../etc/b.jpg", "3": "c.jpg"})
    dataset = D.VISTDataset(path, is_training=False)
    assert [s.task_name for s in dataset.samples()] == ["7_0-gen"] and dataset.problems.counts == {OUTSIDE: 1}
    assert len(D.VISTDataset(path, is_training=False, allow_outside_paths=True)) == 3

    mm = write_conversations(tmp_path / "MMDialog" / "test", [
        conversation(1, ("a", None), ("b", "11"), ("c", "../../secret"), ("d", None))], images=["11"])
    dataset = D.MMDialogDataset(mm, is_training=False)
    assert [s.task_name for s in dataset.samples()] == ["1_1-mm"] and dataset.problems.counts == {OUTSIDE: 1}
    assert len(D.MMDialogDataset(mm, is_training=False, allow_outside_paths=True)) == 3


def test_allow_outside_paths_is_reachable_from_the_command_lines(tmp_path, capsys):
    import train_eval

    assert train_eval.parse_args(["--allow_outside_paths"]).allow_outside_paths is True
    assert train_eval.parse_args([]).allow_outside_paths is False
    data = tmp_path / "CC3M"
    write_jpeg(tmp_path / "secret.jpg")
    (data).mkdir()
    (data / "cc3m_val.tsv").write_text("caption\timage_path\none\t../secret.jpg\n")
    assert data_commands.main([str(data / "cc3m_val.tsv"), "--split", "test"]) == 0
    assert capsys.readouterr().out == ""
    assert data_commands.main([str(data / "cc3m_val.tsv"), "--split", "test", "--allow_outside_paths"]) == 0
    assert json.loads(capsys.readouterr().out)["output_image"] == str(data / "../secret.jpg")


# ------------------------------------------------------------------------------------------------
# Size caps (config/limits.yaml, set small here through MINIGPT5_LIMITS), symbolic links, bad files
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def small_limits(tmp_path, monkeypatch):
    """`small_limits(**caps)`: these caps in force through a MINIGPT5_LIMITS file (the rest as shipped)."""
    def set_caps(**caps):
        path = tmp_path / f"limits-{len(caps)}-{'-'.join(map(str, caps.values()))}.yaml"
        path.write_text("".join(f"{key}: {value}\n" for key, value in caps.items()))
        monkeypatch.setenv("MINIGPT5_LIMITS", str(path))
    return set_caps


def test_limits_file_and_override(tmp_path, monkeypatch, small_limits):
    from configuration import ConfigError, limits

    monkeypatch.delenv("MINIGPT5_LIMITS", raising=False)
    shipped = limits()
    assert shipped.max_image_pixels == 8192 * 8192 and shipped.max_row_bytes == 8 << 20
    small_limits(max_row_bytes=100)
    assert limits().max_row_bytes == 100 and limits().max_image_pixels == shipped.max_image_pixels
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_row_bytes: -1\n")
    monkeypatch.setenv("MINIGPT5_LIMITS", str(bad))
    with pytest.raises(ConfigError, match=r"bad.yaml: `max_row_bytes` must be a whole number >= 0"):
        limits()
    bad.write_text("max_rows: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) `max_rows`"):
        limits()


def test_cc3m_rows_and_captions_over_the_caps_are_skipped_unread(tmp_path, caplog, small_limits):
    small_limits(max_row_bytes=60, max_text_chars=20)
    path = tmp_path / "cc3m.tsv"
    long_row = "x" * 200 + "\timg/1.jpg"          # longer than a 32-byte block too: skipped without being kept
    path.write_text(f"caption\timage_path\nfirst\timg/0.jpg\n{long_row}\na caption of thirty characters\timg/2.jpg\n"
                    f"fourth\timg/3.jpg\n")
    table = tsv_index.read_cc3m_tsv(path, data_problems.ProblemLog(), block_size=32)
    assert [table.captions[i] for i in table.valid] == ["first", "fourth"]
    assert table.rows[table.valid].tolist() == [0, 3]                    # the release's row numbers stay
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        dataset = D.CC3MDataset(path, is_training=False)
    assert [s.task_name for s in dataset.samples()] == ["cc3m_0", "cc3m_3"]
    assert dataset.problems.counts == {"row longer than max_row_bytes (60 bytes; config/limits.yaml)": 1,
                                       "text longer than max_text_chars (20; config/limits.yaml)": 1}
    assert f"{path}:3: row longer than max_row_bytes" in caplog.text and f"{path}:4: text longer" in caplog.text
    with pytest.raises(D.DataError, match=rf"{path}:3: row longer than max_row_bytes"):
        D.CC3MDataset(path, is_training=False, strict=True)


def test_mmdialog_lines_turns_and_nesting_over_the_caps(tmp_path, caplog, small_limits):
    small_limits(max_row_bytes=400, max_text_chars=30, max_json_depth=8)
    good = conversation(1, ("hi", None), ("hello", None))
    deep = '{"conversation_id": 2, "conversation": ' + "[" * 150 + "]" * 150 + "}"     # within the row cap
    path = write_conversations(tmp_path, [
        good, conversation(2, ("a" * 500, None), ("b", None)), deep,
        conversation(4, ("first", None), ("second", None), ("x" * 40, None), ("fourth", None)), good])
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        dataset = D.MMDialogDataset(path, is_training=False)
    assert [s.task_name for s in dataset.samples()] == ["1_1-mm", "4_1-mm", "1_1-mm"]
    assert dataset.problems.counts == {"row longer than max_row_bytes (400 bytes; config/limits.yaml)": 1,
                                       "JSON nested more than max_json_depth (8; config/limits.yaml)": 1,
                                       "text longer than max_text_chars (30; config/limits.yaml)": 1}
    assert f"{path}:2: row longer" in caplog.text and f"{path}:3: JSON nested" in caplog.text
    assert f"{path}:4 (turn 2): text longer" in caplog.text
    with pytest.raises(D.DataError, match=rf"{path}:2: row longer than max_row_bytes"):
        D.MMDialogDataset(path, is_training=False, strict=True)


def test_json_depth_ignores_brackets_in_strings():
    assert D.json_depth_over('{"a": ["[[[[[[[[[[", {"b": "{{{{{{{{"}]}', 3) is None
    assert D.json_depth_over("[" * 10 + "]" * 10, 3) == 10
    assert D.json_depth_over('["\\"[[[[", [[[[1]]]]]', 3) == 5


def test_vist_files_that_used_to_give_tracebacks(tmp_path, small_limits):
    steps = [{"caption": "one .", "image_id": "1", "sequence_index": 0},
             {"caption": "two .", "image_id": "2", "sequence_index": 1}]
    path = write_vist(tmp_path, steps, {"1": "a.jpg", "2": 17})                   # a path that is not a string
    dataset = D.VISTDataset(path, is_training=False)
    assert [s.task_name for s in dataset.samples()] == ["7_0-gen"]
    assert dataset.problems.counts == {"image path in the mapping file is not a string": 1}
    (tmp_path / "val_image_mapping.json").unlink()
    with pytest.raises(D.DataError, match=r"val_image_mapping.json: the image mapping of .*val_cleaned.json does not exist"):
        D.VISTDataset(path)
    write_vist(tmp_path, steps, {"1": "a.jpg", "2": "b.jpg"})
    path.write_text('{"7": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(D.DataError, match=rf"{path}: JSON nested 100001 deep, more than max_json_depth \(32"):
        D.VISTDataset(path)
    small_limits(max_text_chars=4)
    write_vist(tmp_path, steps, {"1": "a.jpg", "2": "b.jpg"})
    dataset = D.VISTDataset(path, is_training=False)
    assert len(dataset) == 0 and dataset.problems.counts == {"text longer than max_text_chars (4; config/limits.yaml)": 1}


def test_symbolic_links_out_of_the_dataset_folder_are_refused(tmp_path, tiny_tokenizer, tiny_config, caplog):
    data = tmp_path / "CC3M"
    write_jpeg(data / "images" / "a.jpg")
    write_jpeg(tmp_path / "secret.jpg", colour=(1, 2, 3))
    (data / "images" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (data / "images" / "inside.jpg").symlink_to(data / "images" / "a.jpg")       # a link inside is fine
    (data / "cc3m_val.tsv").write_text("caption\timage_path\none\timages/a.jpg\ntwo\timages/link.jpg\n"
                                       "three\timages/inside.jpg\n")
    linked = tmp_path / "linked"                         # the dataset folder itself reached through a link
    linked.symlink_to(data)
    for folder in (data, linked):
        dataset = D.CC3MDataset(folder / "cc3m_val.tsv", tiny_tokenizer, tiny_config, is_training=False)
        with caplog.at_level(logging.WARNING, logger="dataloader"):
            items = [dataset[i] for i in range(len(dataset))]
        assert items[1] is None and items[0] is not None and items[2] is not None
        assert dataset.problems.counts == {OUTSIDE: 1}
    assert f"cc3m_val.tsv:3 (sample cc3m_1): {OUTSIDE}: {data / 'images' / 'link.jpg'} is a symbolic link to " \
           f"{tmp_path / 'secret.jpg'}" in caplog.text
    allowed = D.CC3MDataset(data / "cc3m_val.tsv", tiny_tokenizer, tiny_config, is_training=False,
                            allow_outside_paths=True)
    assert allowed[1] is not None
    strict = D.CC3MDataset(data / "cc3m_val.tsv", tiny_tokenizer, tiny_config, is_training=False, strict=True)
    with pytest.raises(D.DataError, match=OUTSIDE):
        strict[1]


def test_pictures_over_the_pixel_cap_are_not_decoded(tmp_path, tiny_tokenizer, tiny_config, small_limits, monkeypatch):
    small_limits(max_image_pixels=40 * 24 - 1)
    write_jpeg(tmp_path / "big.jpg", size=(40, 24))
    write_jpeg(tmp_path / "small.jpg", size=(20, 20))
    (tmp_path / "cc3m.tsv").write_text("caption\timage_path\nbig\tbig.jpg\nsmall\tsmall.jpg\n")
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    dataset = D.CC3MDataset(tmp_path / "cc3m.tsv", tiny_tokenizer, tiny_config, is_training=False)
    assert dataset[0] is None and dataset[1] is not None
    assert (20, 20) in decoded and (40, 24) not in decoded          # the big one was never decoded
    assert dataset.problems.counts == {"unreadable image": 1}
    strict = D.CC3MDataset(tmp_path / "cc3m.tsv", tiny_tokenizer, tiny_config, is_training=False, strict=True)
    with pytest.raises(D.DataError, match=r"40 x 24 = 960 pixels, more than max_image_pixels \(959"):
        strict[0]


def test_corrupt_or_misshapen_cached_features_are_bad_samples(tmp_path, tiny_tokenizer, tiny_config):
    write_jpeg(tmp_path / "a.jpg")
    (tmp_path / "cc3m.tsv").write_text("caption\timage_path\none\ta.jpg\ntwo\ta.jpg\n")
    features = tmp_path / "features"
    dataset = D.CC3MDataset(tmp_path / "cc3m.tsv", tiny_tokenizer, tiny_config, is_training=False,
                            feature_folder=features)
    image = str(tmp_path / "a.jpg")
    channels, size, _ = dataset._feature_shape("vae")
    assert (channels, size) == (8, tiny_config.sd_image_size // 2)
    feature_cache.save_feature(feature_cache.feature_file(features, "test", "vae", image), torch.zeros(channels, size, size), image)
    assert dataset[0] is not None
    feature_cache.save_feature(feature_cache.feature_file(features, "test", "vae", image), torch.zeros(channels, size + 1, size), image)
    assert dataset[0] is None
    feature_cache.feature_file(features, "test", "vae", image).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    assert dataset[1] is None
    assert dataset.problems.counts == {"unreadable cached feature": 2}
    strict = D.CC3MDataset(tmp_path / "cc3m.tsv", tiny_tokenizer, tiny_config, is_training=False,
                           feature_folder=features, strict=True)
    with pytest.raises(D.DataError, match=r"vae/[0-9a-f]+\.safetensors: not a readable cached vae feature of .*a\.jpg"):
        strict[0]
