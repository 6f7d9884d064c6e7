"""Your own interleaved data (data_sources/interleaved.py, docs/own_data.md) and answers with several
pictures, end to end: the JSON-lines and Parquet formats, each kind of bad row counted with file:line
(or stopping the run under --strict), Parquet read one row group at a time, a two-picture sample file
that trains (stage 1 and stage 2), predicts and is scored on the tiny preset, and batched generation
of several pictures equal to single generation item by item."""
from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HANG_GUARD_S, REPO, build, fixed_draws

pytestmark = pytest.mark.usefixtures("no_data_env")

EXAMPLE = REPO / "datasets" / "interleaved" / "train.jsonl"
VOKENS = "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7]"


def _reader(path, **kwargs):
    from dataloader import make_dataset

    return make_dataset(path, kwargs.pop("tokenizer", None), kwargs.pop("cfg", None), kwargs.pop("is_training", True),
                        dataset_type="interleaved", feature_folder=False, **kwargs)


@pytest.fixture
def folder(tmp_path):
    """A data folder with two pictures of the example."""
    (tmp_path / "pictures").mkdir()
    for name in ("ball_noon", "ball_night"):
        shutil.copy(EXAMPLE.parent / "pictures" / f"{name}.jpg", tmp_path / "pictures" / f"{name}.jpg")
    return tmp_path


def _line(**value) -> str:
    return json.dumps(value)


GOOD = _line(id="good", turns=[{"role": "user", "segments": [{"text": "two balls please"}]},
                               {"role": "assistant", "segments": [{"text": "noon:"}, {"image": "pictures/ball_noon.jpg"},
                                                                  {"image": "pictures/ball_night.jpg"}]}])


# ---- the format ----------------------------------------------------------------------------------

def test_the_example_file_gives_conversations_documents_and_two_picture_answers():
    data = _reader(EXAMPLE)
    samples = {s.task_name: s for s in data.samples()}
    assert data.problems.total == 0 and len(samples) == 24
    two = samples["ball_day_night_1-answer"]
    assert two.target == f"At noon: {VOKENS} and at night: {VOKENS} ###"
    assert two.source.endswith("###Human: Show me the ball at noon and then at night. ###Assistant:")
    assert [Path(p).name for p in two.output_image_paths] == ["ball_noon.jpg", "ball_night.jpg"]
    assert (two.caption, two.more_captions) == ("a red ball on grass at noon", ("a red ball on grass at night",))
    assert two.dialogue.target_images == two.output_image_paths
    # a conversation gives a sample per assistant turn, the earlier turns as context
    chat = samples["ball_chat_3-answer"]
    assert chat.source.startswith("You draw simple scenes and talk about them. ###Human: Draw a ball. ###Assistant: "
                                  "Here it is: <Img><ImageHere></Img> ###Human: Now the same ball at night.")
    assert [Path(p).name for p in chat.input_image_paths] == ["ball_noon.jpg"]
    # a document (no roles): every turn after the first is an answer
    assert {"ball_story_1-answer", "ball_story_2-answer"} <= set(samples) and "ball_story_0-answer" not in samples
    assert samples["ball_story_2-answer"].target == "The ball waits for the next day. ###"
    assert samples["ball_story_2-answer"].output_image_path is None
    # understanding: pictures in, text out
    assert samples["describe_two_1-answer"].source.count("<ImageHere>") == 2
    lines = sum(1 for _ in open(EXAMPLE))
    assert 18 <= lines <= 25                                 # the ~20-line example of docs/own_data.md


def test_the_dump_lists_every_picture_of_an_answer():
    from dataloader import dump_records

    record = next(r for r in dump_records(_reader(EXAMPLE)) if r["task_name"] == "house_day_night_1-answer")
    assert [Path(p).name for p in record["output_images"]] == ["house.jpg", "house_night.jpg"]
    assert record["captions"] == ["a house on grass by day", "a house on grass at night"]


BAD_ROWS = {
    "missing image": {"turns": [{"role": "user", "segments": [{"text": "hi"}]},
                                {"role": "assistant", "segments": [{"image": "pictures/nope.jpg"}]}]},
    "image segment with no path": {"turns": [[{"text": "a"}], [{"image": ""}]]},
    "turn with no segments": {"turns": [[{"text": "a"}], []]},
    "unknown role": {"turns": [{"role": "user", "segments": [{"text": "a"}]},
                               {"role": "narrator", "segments": [{"text": "b"}]}]},
    "malformed JSON line": None,
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_bad_row_is_counted_with_file_and_line_or_stops_under_strict(reason, folder, caplog):
    path = folder / "data.jsonl"
    bad = json.dumps(BAD_ROWS[reason]) if BAD_ROWS[reason] is not None else '{"turns": [oops'
    path.write_text("\n".join([GOOD, bad, GOOD.replace('"good"', '"good2"')]) + "\n")
    caplog.set_level(logging.WARNING, logger="dataloader")
    data = _reader(path)
    assert data.problems.counts == {reason: 1}
    assert [s.task_name for s in data.samples()] == ["good_1-answer", "good2_1-answer"]
    assert f"{path}:2: {reason}" in caplog.text and "line skipped" in caplog.text
    with pytest.raises(Exception, match=re.escape(f"{path}:2: {reason}")) as stopped:
        _reader(path, strict=True)
    assert type(stopped.value).__name__ == "DataError"


def test_a_line_mixing_turns_with_and_without_roles_is_refused(folder):
    path = folder / "data.jsonl"
    path.write_text(_line(turns=[[{"text": "a"}], {"role": "assistant", "segments": [{"text": "b"}]}]) + "\n")
    data = _reader(path)
    assert data.problems.counts == {"unknown role": 1} and len(data) == 0


def test_pictures_may_be_members_of_a_tar_beside_the_file(folder):
    with tarfile.open(folder / "shard.tar", "w") as tar:
        tar.add(folder / "pictures" / "ball_noon.jpg", arcname="k1.jpg")
    path = folder / "data.jsonl"
    path.write_text(_line(turns=[[{"text": "a ball"}], [{"image": "shard.tar#k1.jpg"}]]) + "\n"
                    + _line(turns=[[{"text": "a ball"}], [{"image": "shard.tar#k2.jpg"}]]) + "\n")
    data = _reader(path)
    assert len(data) == 1 and data.problems.counts == {"missing image": 1}
    picture = data.open_image(data.sample(0).output_image_path)
    assert picture.size == (64, 64)


def test_an_unknown_dataset_name_lists_the_interleaved_one_too():
    import dataset_specs

    assert "interleaved" in dataset_specs.KNOWN
    with pytest.raises(ValueError, match="expected one of CC3M, VIST, MMDialog, interleaved"):
        dataset_specs.spec("obelics")


# ---- Parquet -------------------------------------------------------------------------------------

def _parquet(path: Path, rows: list[dict], group: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [r["id"] for r in rows], "texts": [r["texts"] for r in rows],
                      "images": [r["images"] for r in rows]},
                     schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())),
                                       ("images", pa.list_(pa.string()))]))
    pq.write_table(table, path, row_group_size=group)
    return path


def test_obelics_parquet_is_read_one_row_group_at_a_time(folder, monkeypatch, caplog):
    import pyarrow.parquet as pq

    noon, night = "pictures/ball_noon.jpg", "pictures/ball_night.jpg"
    rows = [{"id": f"doc{i}", "texts": ["a ball", None, "and at night", None], "images": [None, noon, None, night]}
            for i in range(4)]
    rows.insert(2, {"id": "uneven", "texts": ["a", None], "images": [None]})
    path = _parquet(folder / "docs.parquet", rows)
    # never the whole file: only row groups are read
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("the whole Parquet file was read"))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the whole Parquet file was read"))
    groups = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **k: groups.append(g) or real(self, g, **k))
    caplog.set_level(logging.WARNING, logger="dataloader")
    data = _reader(path)
    assert groups == [0, 1, 2]
    assert data.problems.counts == {"Parquet row with texts and images of unequal length": 1}
    assert f"{path}:3: Parquet row with texts and images of unequal length" in caplog.text
    sample = data.sample(len(data) - 1)
    assert sample.task_name == "doc3_1-answer" and sample.target == f"and at night {VOKENS} ###"
    assert sample.source.endswith(f"###Human: a ball <Img><ImageHere></Img> ###Assistant:")
    assert [Path(p).name for p in sample.input_image_paths] == ["ball_noon.jpg"]
    with pytest.raises(Exception, match=re.escape(f"{path}:3: Parquet row")):
        _reader(path, strict=True)


# ---- several pictures in one answer: training ----------------------------------------------------

def _batch(model, names, seed=0):
    """A collated batch of the example's samples `names`, with the random draws of every target row
    pinned per (sample, picture), so that the same picture draws the same noise in any batch."""
    from collator import Collator

    tok = model.model.llama_tokenizer
    data = _reader(EXAMPLE, tokenizer=tok, cfg=model.cfg)
    index = {data.sample(i).task_name: i for i in range(len(data))}
    batch = Collator(tok)([data[index[n]] for n in names])
    latent = (4, model.unet.config.sample_size, model.unet.config.sample_size)
    draws = []
    for n in names:
        k = max(1, len(data.sample(index[n]).output_image_paths))
        for j in range(k):
            draws.append(fixed_draws(1, latent, seed=sum(map(ord, n)) * 10 + j))
    for key in ("noise", "latent_noise", "timesteps"):
        batch[key] = torch.cat([d[key] for d in draws])
    batch["cfg_drop"] = torch.zeros(len(draws), dtype=torch.bool)
    return batch


TWO = ["ball_day_night_1-answer", "what_is_it_1-answer", "tree_1-answer", "house_day_night_1-answer"]


@pytest.mark.parametrize("stage", [1, 2])
def test_each_picture_gets_its_own_voken_group_and_loss_terms(stage, tiny_config, monkeypatch):
    model = build(tiny_config, stage=stage, seed=0).eval()
    batch = _batch(model, TWO)
    # rows: pictures 1 and 2 of the first answer, the zero row of the text answer, the tree, two houses
    assert batch["output_images"].shape[0] == 6
    assert batch["output_image_counts"].tolist() == [2, 0, 1, 2]
    seen = {}
    real_latents = model.target_latents
    monkeypatch.setattr(model, "target_latents",
                        lambda b, index, *a, **k: seen.setdefault("rows", index.tolist()) and real_latents(b, index, *a, **k))
    captions = []
    real_encode = model.encode_caption
    monkeypatch.setattr(model, "encode_caption", lambda texts: captions.extend(texts) or real_encode(texts))
    with torch.no_grad():
        losses = model(batch)
    assert seen["rows"] == [0, 1, 3, 4, 5]            # each voken group draws its own picture, in order
    assert captions == ["a red ball on grass at noon", "a red ball on grass at night", "a green tree on grass",
                        "a house on grass by day", "a house on grass at night"]
    assert all(torch.isfinite(v) for v in losses.values()) and set(losses) >= {"image_loss", "caption_loss"}


def test_the_loss_terms_are_averaged_over_the_pictures(tiny_config):
    """A batch's image and caption losses are the means over all its pictures, as the release's are over
    its one picture per sample: a two-picture answer weighs twice a one-picture answer."""
    model = build(tiny_config, stage=2, seed=0).eval()
    with torch.no_grad():
        both = model(_batch(model, ["ball_day_night_1-answer", "tree_1-answer"]))
        two = model(_batch(model, ["ball_day_night_1-answer"]))
        one = model(_batch(model, ["tree_1-answer"]))
    for name in ("image_loss", "caption_loss"):
        expected = (2 * two[name] + one[name]) / 3
        assert float(both[name]) == pytest.approx(float(expected), rel=1e-4), name


def test_a_two_picture_batch_trains(tiny_config):
    model = build(tiny_config, stage=2, seed=0)
    loss = model(_batch(model, TWO))["loss"]
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.llm_to_t2i_mapping.parameters())


# ---- several pictures in one answer: generation --------------------------------------------------

@pytest.fixture(scope="module")
def stage2(tiny_config):
    return build(tiny_config, stage=2, seed=0).eval()


def test_batched_generation_of_several_pictures_equals_single_generation(stage2):
    from PIL import Image

    story = Image.open(REPO / "examples" / "story_1.jpg")
    prompts = ["###Human: the ball at noon and at night ###Assistant:",
               "###Human: <Img><ImageHere></Img> and then? ###Assistant:", "###Human: hello ###Assistant:"]
    images = [[], [story], []]
    batch = stage2.generate(prompts, images, seed=[5, 6, 7], max_new_tokens=24, force_generation=2,
                            num_inference_steps=2)
    assert [len(out.images) for out in batch] == [2, 2, 2]
    for i, out in enumerate(batch):
        assert out.text.count("[IMG0]") == 2 and out.image is out.images[0]
        single = stage2.generate(prompts[i], images[i], seed=[5 + i], max_new_tokens=24, force_generation=2,
                                 num_inference_steps=2)[0]
        assert single.token_ids == out.token_ids
        for a, b in zip(single.images, out.images):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    # the two pictures of an answer are drawn from their own groups (and seeds)
    assert np.abs(np.asarray(batch[0].images[0], dtype=int) - np.asarray(batch[0].images[1], dtype=int)).max() > 0


def test_answer_segments_put_each_picture_in_place():
    from generation import answer_segments

    text = f"At noon:{VOKENS} and at night: {VOKENS} ###"
    assert answer_segments(text, ["P1", "P2"], "###") == ["At noon:", "P1", "and at night:", "P2"]
    assert answer_segments(f"{VOKENS}{VOKENS}", ["P1"], "###") == ["P1"]      # a group cut short: no picture


# ---- end to end: train (stage 1 and 2), predict, score --------------------------------------------

def test_a_two_picture_file_trains_predicts_and_is_scored(tiny_config_path, tmp_path, monkeypatch):
    """`--dataset interleaved` through train_eval.py (stage 1, then stage 2 from it), prediction (the
    model made to answer with two pictures) and metric.py: every picture is kept in the prediction
    file and its task folder, and scored at its place."""
    import metric
    import predictions
    from constants import prediction_folder
    from model import MiniGPT5_Model
    from test_train_eval import common, run_main

    data = tmp_path / "data"
    shutil.copytree(EXAMPLE.parent, data)
    lines = EXAMPLE.read_text().splitlines()
    (data / "test.jsonl").write_text("\n".join([lines[0], lines[2], lines[8]]) + "\n")   # 2, 2 and 0 pictures
    weights = tmp_path / "weights"
    env = {"DATAFOLDER": data, "WEIGHTFOLDER": weights, "OUTPUT_FOLDER": tmp_path / "out"}
    run = ["--is_training", "--train_data_path", "train.jsonl", "--dataset", "interleaved", "--max_steps", "1",
           *common(tiny_config_path)]
    run_main(run + ["--model_save_name", "s1"], {**env, "IS_STAGE2": "False"})
    run_main(run + ["--model_save_name", "s2", "--stage1_weight", "s1-last.ckpt"], {**env, "IS_STAGE2": "True"})
    assert (weights / "s2-last.ckpt").is_file()

    real_generate = MiniGPT5_Model.generate
    monkeypatch.setattr(MiniGPT5_Model, "generate",
                        lambda self, *a, **k: real_generate(self, *a, **{**k, "force_generation": 2,
                                                                           "max_new_tokens": 20}))
    run_main(["--test_data_path", "test.jsonl", "--dataset", "interleaved", "--test_weight", "s2-last.ckpt",
              "--stage1_weight", "s1-last.ckpt", "--predict_batch_size", "2", *common(tiny_config_path)],
             {**env, "IS_STAGE2": "True"})
    with monkeypatch.context() as m:
        m.setenv("OUTPUT_FOLDER", str(tmp_path / "out"))
        folder = prediction_folder("s2-last.ckpt")
    records = {r.task_name: r for r in predictions.read_folder(folder)[0]}
    assert set(records) == {"ball_day_night_1-answer", "house_day_night_1-answer", "what_is_it_1-answer"}
    two = records["ball_day_night_1-answer"]
    assert len(two.predicted_images) == 2 and len(two.expected_images) == 2
    assert not torch.equal(two.expected_images[0], two.expected_images[1])          # each in its place
    assert len(records["what_is_it_1-answer"].expected_images) == 0
    assert (folder / "ball_day_night_1-answer" / "generated.jpg").is_file()
    results = metric.main(["--pred_folder", str(folder), "--dataset", "interleaved", "--device", "cpu",
                           "--tiny_extractors", "--fid_cache_dir", str(tmp_path / "cache")])
    assert results["overall_picture_count_accuracy"] == pytest.approx(2 / 3)    # the text answer got pictures
    assert results["clip_i_similarity_picture_1"] is not None and results["clip_i_similarity_picture_2"] is not None
    assert results["overall_fid_score"] is not None


# ---- the playground, the HTML export and the web demo keep every picture in place ------------------

def _two_picture_answer():
    from PIL import Image

    from generation import GenerationOutput

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    return GenerationOutput(text=f"At noon:{VOKENS} and at night:{VOKENS} ###", clean_text="At noon: and at night:",
                            image=red, token_ids=[], images=[red, blue])


class _TwoPictureModel:
    """Answers every prompt with two pictures, each after its text (no real model)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, images=None, **kwargs):
        self.calls.append({"prompts": list(prompts), "images": images})
        return [_two_picture_answer() for _ in prompts]


def test_the_html_export_and_the_next_prompt_keep_each_picture_in_place():
    from conversation import Conversation

    chat = Conversation(system="")
    chat.add("Human", "the ball at noon and at night")
    out = chat.respond(_TwoPictureModel())
    answer = chat.turns[-1]
    assert answer.images == out.images and [type(p).__name__ for p in answer.pieces()] == ["str", "Image", "str", "Image"]
    page = chat.to_html()
    assert page.index("At noon:") < page.index("<img") < page.index("and at night:") < page.rindex("<img")
    assert page.count("<img") == 2
    chat.add("Human", "again")
    prompt, images = chat.prompt()
    assert "###Assistant: At noon: <Img><ImageHere></Img> and at night: <Img><ImageHere></Img>" in prompt
    assert images == out.images


def test_the_playground_marks_each_picture_in_place():
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    import playground

    out = _two_picture_answer()
    assert playground.printable_answer(out.text, ["0.1", "0.2"]) == "At noon: [picture 0.1] and at night: [picture 0.2]"
    assert playground.printable_answer(out.text, ["0"]) == "At noon: [picture 0] and at night:"


def test_the_web_demo_shows_each_picture_in_place(tmp_path):
    pytest.importorskip("gradio")
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    import web_demo

    demo = web_demo.build_demo(_TwoPictureModel(), files_root=tmp_path)
    handler = lambda name: next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == name)
    session, _, _ = handler("accept")({"text": "the ball, twice", "files": []}, None)
    _, messages, _, _ = handler("answer")(session, 7.5, 3, 7, False, 16, "pndm", 50)
    reply = messages[-1]["content"]
    assert [type(piece).__name__ for piece in reply] == ["str", "Image", "str", "Image"]
    assert reply[0] == "At noon:" and reply[2] == "and at night:"


def test_cached_features_of_several_pictures_give_the_same_losses(tmp_path, tiny_config):
    """`python dataloader.py preprocess` caches every picture of an answer (a .tar member too), and a
    batch read from the cache gives the losses of the same batch read from the pictures."""
    import data_commands
    from collator import Collator

    model = build(tiny_config, stage=1, seed=0).eval()
    tok = model.model.llama_tokenizer
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(EXAMPLE.parent / "pictures" / "sun.jpg", arcname="sun.jpg")
    shutil.copytree(EXAMPLE.parent / "pictures", tmp_path / "pictures")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(EXAMPLE.read_text().splitlines()[:4]) + "\n"
                    + _line(id="tar", turns=[[{"text": "sun and tree"}], [{"image": "shard.tar#sun.jpg"},
                                                                           {"image": "pictures/tree.jpg"}]]) + "\n")
    images = _reader(path, tokenizer=tok, cfg=tiny_config, is_training=False)
    counts = data_commands.preprocess_features(images, model, tmp_path / "features", device="cpu")
    assert counts["written"] == 6 + 2 and "bad" not in counts        # 6 distinct pictures, the .tar member, the tree
    cached = type(images)(path, tok, tiny_config, is_training=False, feature_folder=tmp_path / "features")
    collate = Collator(tok)
    picks = [0, 3, 4]                       # two pictures, one picture, two pictures from the .tar and a file
    by_images, by_features = collate([images[i] for i in picks]), collate([cached[i] for i in picks])
    assert by_features["output_image_features"].shape[0] == by_images["output_images"].shape[0] == 5
    g = torch.Generator().manual_seed(1)
    latent = (5, 4, tiny_config.sd_image_size // 2, tiny_config.sd_image_size // 2)
    draws = {"latent_noise": torch.randn(latent, generator=g), "noise": torch.randn(latent, generator=g),
             "timesteps": torch.randint(0, 1000, (5,), generator=g), "cfg_drop": torch.zeros(5, dtype=torch.bool)}
    with torch.no_grad():
        a, b = model({**by_images, **draws}), model({**by_features, **draws})
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_a_null_system_prompt_means_none(folder):
    path = folder / "data.jsonl"
    path.write_text(_line(system=None, turns=[[{"text": "a ball"}], [{"image": "pictures/ball_noon.jpg"}]]) + "\n")
    sample = _reader(path).sample(0)
    assert sample.dialogue.system is None and sample.source == "###Human: a ball ###Assistant:"


def test_a_damaged_parquet_file_or_one_without_the_columns_is_an_error(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(Exception, match="bad.parquet: not a readable Parquet file"):
        _reader(folder / "bad.parquet")
    pq.write_table(pa.table({"text": ["a"]}), folder / "other.parquet")
    with pytest.raises(Exception, match="other.parquet: no column images, texts"):
        _reader(folder / "other.parquet")


@pytest.mark.parametrize("family_name", ["llama3", "qwen2"])
def test_another_llm_family_reads_the_conversation_with_its_pictures_in_place(family_name):
    from conversation import Conversation
    from llm_families import get_family

    family = get_family(family_name)
    chat = Conversation(system="")
    chat.add("Human", "the ball at noon and at night")
    out = chat.respond(_TwoPictureModel())
    chat.add("Human", "again")
    prompt, images = chat.prompt(family)
    assert images == out.images and prompt.count("<Img><ImageHere></Img>") == 2
    noon, night = prompt.index("At noon:"), prompt.index("and at night:")
    slots = [m.start() for m in re.finditer(re.escape("<Img><ImageHere></Img>"), prompt)]
    assert noon < slots[0] < night < slots[1] < prompt.index("again")
    assert "###" not in prompt                     # the family's own turns, not the release's tags


def test_another_llm_family_trains_on_answers_of_two_pictures(tmp_path_factory):
    """With a chat-template family (qwen2's tiny preset), the example's dialogues are read in that
    family's prompt style and each picture still gets its own voken group and loss terms."""
    from configuration import load_config
    from llm_families import get_family
    from presets import build_preset

    cfg = load_config(build_preset("tiny_qwen2", tmp_path_factory.mktemp("qwen2") / "weights", seed=0))
    model = build(cfg, stage=2, seed=0).eval()
    batch = _batch(model, TWO)
    family = get_family("qwen2")
    assert all(source.endswith(family.header("assistant")) and "###" not in source for source in batch["sources"])
    assert batch["targets"][0].count(VOKENS) == 2 and batch["targets"][0].endswith(family.end_of_turn)
    assert batch["output_image_counts"].tolist() == [2, 0, 1, 2]
    with torch.no_grad():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()) and set(losses) >= {"image_loss", "caption_loss"}


def test_the_playground_answers_with_the_pictures_asked_for(tmp_path):
    """`--pictures 2`: each answer holds two pictures, marked and judged in place, both in the figure and
    the HTML page."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "examples" / "playground.py"), "--pictures", "2",
                             "--num_samples", "1", "--num_inference_steps", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = next(line for line in result.stdout.splitlines() if line.startswith("sample 0:"))
    assert answer.index("[picture 0.1]") < answer.index("[picture 0.2]")
    assert "picture 1: " in answer and "picture 2: " in answer              # the judge reads each
    assert (tmp_path / "playground.html").read_text().count("<img ") == 2 + 2   # two inputs, two answers
    bad = subprocess.run([sys.executable, str(REPO / "examples" / "playground.py"), "--pictures", "0"],
                         capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)
    assert bad.returncode != 0 and "--pictures must be at least 1, got 0" in bad.stderr


def test_the_example_is_what_the_sample_script_writes(tmp_path):
    """datasets/interleaved is scripts/make_sample_datasets.py's output, byte for byte."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_datasets.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=REPO)
    written = sorted(p.relative_to(tmp_path / "interleaved") for p in (tmp_path / "interleaved").rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(EXAMPLE.parent) for p in EXAMPLE.parent.rglob("*") if p.is_file())
    assert written == shipped
    for relative in written:
        assert (tmp_path / "interleaved" / relative).read_bytes() == (EXAMPLE.parent / relative).read_bytes(), relative
