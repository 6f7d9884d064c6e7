"""The toy world: its pictures, the judge that reads them back, its datasets in the release's formats,
and (on a short build) that MiniGPT-5 trained on it learns."""
from __future__ import annotations

import io
import json
import os
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from toyworld import world
from toyworld.judge import CHANCE, accuracy, judge


def _jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_judge_reads_clean_renders_back():
    """Every attribute of 1,000 varied renders (mirrored half the time, as training flips them, and
    saved as the datasets' JPEGs) is read back right at least 99% of the time, at two sizes."""
    rng = random.Random(0)
    for size in (32, 64):
        truth, judged = [], []
        for _ in range(500):
            scene = rng.choice(world.all_scenes())
            image = world.render(scene, size, rng)
            if rng.random() < 0.5:
                image = ImageOps.mirror(image)
            truth.append(scene.attributes())
            judged.append(judge(_jpeg(image)))
        scores = accuracy(judged, truth)
        assert all(scores[name] >= 0.99 for name in world.ATTRIBUTES), (size, scores)


def test_judge_is_not_fooled_by_noise():
    """Pictures of pure noise are read at about chance level, not at the accuracy of renders."""
    rng = random.Random(1)
    import numpy as np

    noise = np.random.default_rng(1)
    truth, judged = [], []
    for _ in range(200):
        scene = rng.choice(world.all_scenes())
        truth.append(scene.attributes())
        judged.append(judge(Image.fromarray(noise.integers(0, 256, (32, 32, 3), dtype=np.uint8))))
    scores = accuracy(judged, truth)
    assert all(scores[name] < CHANCE[name] + 0.2 for name in world.ATTRIBUTES), scores


def test_accuracy_counts_missing_pictures_as_wrong():
    truth = [{"setting": "beach", "time": "noon", "colour": "red", "place": "near"}] * 2
    scores = accuracy([truth[0], None], truth)
    assert scores["setting"] == 0.5 and scores["all"] == 0.5


def test_a_picture_drawn_on_a_text_only_turn_counts_for_emission_not_accuracy():
    from types import SimpleNamespace

    from toyworld import evaluate

    scene = {"setting": "beach", "time": "noon", "colour": "red", "place": "near"}
    wrong = {**scene, "place": "far"}
    # dialogue turns: the picture asked for (right), another asked for (wrong place), a text-only
    # turn where the model drew anyway (no scene to judge it against)
    tasks = [f"d0_{world.ASKED_TURN}-mm", f"d1_{world.ASKED_TURN}-mm", "d0_1-mm"]
    scored = evaluate.Scored(evaluate.RUNS[-1], tasks, [scene, scene, None], [scene, wrong, wrong],
                             [None] * 3, [True, True, True], None)
    text = evaluate.report(SimpleNamespace(config_path=evaluate.REPO / "config" / "toyworld.yaml"),
                           {"mmdialog_stage2": scored, "cc3m_untrained": scored}, {}, {})
    asked = next(line for line in text.splitlines() if line.startswith("| MiniGPT-5 stage 2 on MMDialog"))
    assert "| 2 | 100.0% | 100.0% | 100.0% | 50.0% | 50.0% |" in asked
    text_only = next(line for line in text.splitlines() if line.startswith("| toy MMDialog: text-only turns"))
    assert "| 1 | 100.0% |" in text_only
    every = next(line for line in text.splitlines() if line.startswith("| MiniGPT-5 as built, untrained"))
    assert "| 2 | 100.0% | 100.0% | 100.0% | 50.0% | 50.0% |" in every     # all pictures with a scene


def test_the_report_sets_stage_2_beside_both_story_baselines():
    from types import SimpleNamespace

    from toyworld import evaluate

    scene = {"setting": "beach", "time": "noon", "colour": "red", "place": "near"}
    later = {**scene, "time": "evening"}
    run = next(r for r in evaluate.RUNS if r.name == "vist_stage2")
    tasks = ["s1_0-gen", "s1_1-gen", "s2_1-gen"]
    scored = evaluate.Scored(run, tasks, [scene, later, later], [scene, later, scene], [None] * 3, [True] * 3, None)
    baselines = {"copy_last": ([scene, scene], [later, later]), "text_only": ([later, scene], [later, later])}
    text = evaluate.report(SimpleNamespace(config_path=evaluate.REPO / "config" / "toyworld.yaml"),
                           {"vist_stage2": scored}, {}, {}, baselines=baselines)
    row = lambda start: next(line for line in text.splitlines() if line.startswith(start))
    assert "| 2 | 100.0% | 50.0% | 100.0% | 100.0% | 50.0% |" in row("| MiniGPT-5 stage 2: next story frame")
    assert "| 2 | 100.0% | 0.0% | 100.0% | 100.0% | 0.0% |" in row("| baseline: the last context picture")
    assert "| 2 | 100.0% | 50.0% | 100.0% | 100.0% | 50.0% |" in row("| baseline: the best rule reading the text")
    assert "by what its caption changes" not in text                  # no changes given: no such table

    changes = {"s1_1-gen": evaluate.ONE_STEP, "s2_1-gen": evaluate.NEW_COLOUR}
    text = evaluate.report(SimpleNamespace(config_path=evaluate.REPO / "config" / "toyworld.yaml"),
                           {"vist_stage2": scored}, {}, {}, baselines=baselines, changes=changes)
    row = lambda start: next(line for line in text.splitlines() if line.startswith(start))
    assert "| 1 | 100.0% | 100.0% | 100.0% | 100.0% | 100.0% |" in row(f"| {evaluate.ONE_STEP} |")
    assert "| 1 | 100.0% | 0.0% | 100.0% | 100.0% | 0.0% |" in row(f"| {evaluate.NEW_COLOUR} |")
    assert not any(line.startswith(f"| {evaluate.NIGHT_FALLS} |") for line in text.splitlines())   # no such frame


def test_metric_py_figures_read_as_the_papers_tables_with_the_judge_beside_them():
    from toyworld import evaluate

    scene = {"setting": "beach", "time": "noon", "colour": "red", "place": "near"}
    wrong = {**scene, "colour": "blue"}
    run = next(r for r in evaluate.RUNS if r.name == "cc3m_stage1")
    scored = evaluate.Scored(run, ["cc3m_0", "cc3m_1"], [scene, scene], [scene, wrong], [wrong, wrong],
                             [True, True], None)
    metrics = {"cc3m_stage1": {"overall_clip_similarity": 0.91, "overall_basline_clip_similarity": 0.5,
                               "overall_fid_score": 1.5}}
    lines = evaluate.metric_tables({"cc3m_stage1": scored}, metrics, "toy")
    assert "| toy SD from the caption (the SD baseline) | 0.5 | n/a | n/a | n/a | 0.0% | 2 |" in lines
    assert "| MiniGPT-5 stage 1 | 0.91 | n/a | n/a | 1.5 | 50.0% | 2 |" in lines
    assert not any("VIST" in line for line in lines)                 # runs not made: no table
    assert any("random stand-ins" in line for line in evaluate.metric_tables({"cc3m_stage1": scored}, metrics, "tiny"))


def test_flags_for_a_step_that_does_not_exist_stop_the_build(tmp_path):
    import yaml

    from toyworld.build import DEFAULT_CONFIG, Build, steps

    settings = yaml.safe_load(DEFAULT_CONFIG.read_text())
    settings["minigpt5"]["stage2_mmdialg"] = ["--num_train_epochs", "4"]     # a typo would be ignored
    config = tmp_path / "toyworld.yaml"
    config.write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit, match=r"unknown step\(s\) \['stage2_mmdialg'\]"):
        steps(Build(config, tmp_path / "build"))
    del settings["minigpt5"]["stage2_mmdialg"]
    config.write_text(yaml.safe_dump(settings))
    assert "stage2_mmdialog" in [s.name for s in steps(Build(config, tmp_path / "build"))]


def test_held_out_combinations_leave_every_pair_seen():
    """A sixth of the combinations is held out, and every pair of attribute values still occurs in
    training (so the test asks for new combinations of seen pairs)."""
    import itertools

    held = [s for s in world.all_scenes() if world.is_held_out(s)]
    seen = [s for s in world.all_scenes() if not world.is_held_out(s)]
    assert len(held) == 35 and len(seen) == 157
    for a, b in itertools.combinations(world.ATTRIBUTES, 2):
        pairs = {(getattr(s, a), getattr(s, b)) for s in seen}
        assert len(pairs) == len(world.ATTRIBUTES[a]) * len(world.ATTRIBUTES[b]), (a, b)


def test_sd_pretrained_in_every_word_order_but_the_tests():
    """`pretrain.sd_caption_orders: all_but_test` captions SD's pretraining pictures in every order
    of the four phrases the test wording does not use, passes the leakage check, and leaves the
    pictures (and the default's captions) as they were."""
    import itertools

    import torch

    from toyworld import leakage, pretrain

    templates = world.caption_templates("all_but_test")
    orders = {world._phrase_order(t) for t in templates}
    test_orders = {world._phrase_order(t) for t in world.TEST.captions}
    assert len(test_orders) == 3 and not orders & test_orders
    assert orders | test_orders == set(itertools.permutations(world.PHRASES))
    assert world.caption_templates("train") == world.TRAIN.captions
    with pytest.raises(ValueError, match="sd_caption_orders"):
        world.caption_templates("every")
    plain, every = pretrain.picture_set(300, 32, seed=1), pretrain.picture_set(300, 32, seed=1, caption_orders="all_but_test")
    assert torch.equal(plain.images, every.images) and plain.scenes == every.scenes
    assert plain.captions == pretrain.picture_set(300, 32, seed=1).captions
    assert len(set(every.captions) - set(plain.captions)) > 100
    for scene, text in zip(every.scenes, every.captions):      # each caption still names its scene
        assert all(word in text for word in (scene.colour, world.SETTING_WORDS[scene.setting],
                                             world.TIME_WORDS[scene.time], world.PLACE_WORDS[scene.place]))
    assert leakage.problems(None, pictures=list(zip(every.scenes, every.captions))) == []
    # the option keys the SD steps it changes; the training wording keeps older builds' keys
    from types import SimpleNamespace

    from toyworld import stages

    def orders_key(section):
        return stages._caption_orders(SimpleNamespace(settings={"pretrain": section}), "sd")

    assert orders_key({}) == orders_key({"sd_caption_orders": "train"}) == []
    assert orders_key({"sd_caption_orders": "all_but_test"}) == ["all_but_test"]
    assert orders_key({"sd_caption_orders": "all_but_test", "sd_train_wording_share": 0.5}) == \
        ["all_but_test", {"train_share": 0.5}]
    # a share of the captions kept in the training wording, the pictures the same
    half = pretrain.picture_set(300, 32, seed=1, caption_orders="all_but_test", train_share=0.5)
    assert torch.equal(plain.images, half.images)
    def in_training_wording(pictures):
        ours = range(len(world.TRAIN.captions))
        return sum(text in {world.caption(s, t) for t in ours} for s, text in zip(pictures.scenes, pictures.captions))

    assert 120 <= in_training_wording(half) <= 180                # about half of 300
    assert in_training_wording(every) < 90                         # 4 of 24 templates: about 50
    assert leakage.problems(None, pictures=list(zip(half.scenes, half.captions))) == []
    with pytest.raises(ValueError, match="sd_train_wording_share"):
        pretrain.picture_set(10, 32, seed=1, train_share=0.5)
    with pytest.raises(ValueError, match="sd_train_wording_share"):
        pretrain.picture_set(10, 32, seed=1, caption_orders="all_but_test", train_share=1.5)



def test_llm_corpus_in_every_word_order_but_the_tests():
    """`pretrain.llm_caption_orders: all_but_test` rewords the LLM corpus's captions into every order
    but the test's: the same documents otherwise, the leakage check passes, and the llm step's key
    changes only where it is set."""
    import dataclasses
    from types import SimpleNamespace

    from toyworld import leakage, stages
    from toyworld.pretrain import llm_corpus

    plain, every = llm_corpus(400, 1), llm_corpus(400, 1, caption_orders="all_but_test")
    half = llm_corpus(400, 1, caption_orders="all_but_test", train_share=0.5)
    assert plain == llm_corpus(400, 1, caption_orders="train")
    assert len(every) == len(plain) and every != plain
    assert [d.count("<Img>") for d in every] == [d.count("<Img>") for d in plain]   # the same documents
    assert [d.endswith("###") for d in every] == [d.endswith("###") for d in plain]
    training = set(world.TRAIN.captions)
    new_orders = [t for t in world.caption_templates("all_but_test") if t not in training]
    scenes = world.all_scenes()
    reworded = {world.caption(s, i, dataclasses.replace(world.TRAIN, captions=tuple(new_orders)))
                for s in scenes for i in range(len(new_orders))}
    used = lambda corpus: sum(any(c in d for c in reworded) for d in corpus)       # noqa: E731
    assert used(plain) == 0 and used(every) > used(half) > 50
    for corpus in (every, half):
        assert leakage.problems(None, corpus) == []

    def key(section):
        return stages._caption_orders(SimpleNamespace(settings={"pretrain": section}), "llm")

    assert key({}) == key({"sd_caption_orders": "all_but_test"}) == []
    assert key({"llm_caption_orders": "all_but_test", "llm_train_wording_share": 0.5}) == ["all_but_test", {"train_share": 0.5}]
    with pytest.raises(ValueError, match="llm_train_wording_share"):
        llm_corpus(10, 1, train_share=0.5)
    with pytest.raises(ValueError, match="llm_caption_orders"):
        llm_corpus(10, 1, caption_orders="every")

def test_day_stories_move_time_on_and_keep_the_rest():
    rng = random.Random(2)
    story = world.make_story(world.Scene("city", "noon", "blue", "sky"), 3, rng)
    assert [s.time for s in story.scenes] == ["noon", "evening", "night"]
    assert {(s.setting, s.colour, s.place) for s in story.scenes} == {("city", "blue", "sky")}
    # Only the first caption says what the scene is.
    assert "blue" in story.captions[0] and all(c in world.TRAIN.day_later for c in story.captions[1:])
    # A story is one day and never shows a held-out combination.
    for first in world.story_starts(3):
        frames = [first.later(k) for k in range(3)]
        assert [world.TIMES.index(f.time) for f in frames] == list(range(world.TIMES.index(first.time), 3 + world.TIMES.index(first.time)))
        assert not any(world.is_held_out(f) for f in frames)
    assert len(world.story_starts(3)) >= 40
    # Test stories start where no training story does.
    assert not set(world.story_starts(3, "train")) & set(world.story_starts(3, "test"))
    assert world.story_starts(3, "test")


def _words_of(scene: world.Scene) -> set[str]:
    return {world.SETTING_WORDS[scene.setting], world.TIME_WORDS[scene.time], scene.colour,
            world.PLACE_WORDS[scene.place], world.NOUN[scene.place]}


def test_picture_stories_name_only_what_changes():
    """A picture story's captions never name the scene: the first says nothing of it, each later one
    only what changes (and that changes exactly one attribute), so the rest of the next picture is
    in the context pictures. The next frame is not a fixed function of the last one."""
    rng = random.Random(3)
    nexts = set()
    for side in ("train", "test"):
        words = world.wording(side)
        for _ in range(200):
            story = world.draw_story("pictures", 3, rng, side)
            assert not any(world.is_held_out(s) for s in story.scenes)
            assert world.is_test_start(story.scenes[0]) == (side == "test")
            assert story.captions[0] in words.story_open and story.told[0] == {}
            for before, after, text, told in zip(story.scenes, story.scenes[1:], story.captions[1:], story.told[1:]):
                changed = [a for a in world.ATTRIBUTES if getattr(before, a) != getattr(after, a)]
                assert len(changed) == 1, (before, after, text)
                # The text names nothing that stays: the setting never, the object's colour and
                # place only when they change (the time words only when night falls).
                kept = _words_of(before) & _words_of(after) - {"ball"}
                assert not any(re.search(rf"\b{w}\b", text) for w in kept), (text, kept)
                if "time_steps" in told:
                    assert after == before.later(told["time_steps"])
                else:
                    assert {a: getattr(after, a) for a in told} == told
            if side == "train":
                nexts.add((story.scenes[0], story.scenes[1]))
    firsts = {}
    for first, second in nexts:
        firsts.setdefault(first, set()).add(second)
    assert max(len(v) for v in firsts.values()) >= 3        # one last frame, several next ones


def test_datasets_are_read_by_the_release_readers(tmp_path, tiny_tokenizer, tiny_config):
    """The three toy datasets load through dataloader.py, with held-out combinations only in the
    CC3M test split, and their truth files name the scene of every picture."""
    from dataloader import make_dataset

    sizes = world.WorldSizes(image_size=32, cc3m={"train": 20, "test": 8}, vist={"train": 3, "test": 2},
                             mmdialog={"train": 3, "test": 2}, story_length=3)
    files = world.write_datasets(tmp_path, sizes)
    train = make_dataset(files["CC3M"]["train"], tiny_tokenizer, tiny_config, is_training=True, dataset_type="CC3M")
    test = make_dataset(files["CC3M"]["test"], tiny_tokenizer, tiny_config, is_training=False, dataset_type="CC3M")
    assert len(test) == 8 and len(train) == 20 + 1              # row 0 adds an instruction sample
    truth = json.loads((tmp_path / "CC3M" / "scenes_test.json").read_text())
    assert all(world.is_held_out(world.Scene(**t)) for t in truth)
    item = test[3]
    assert judge(Image.open(item["output_image_path"])) == truth[3]
    vist = make_dataset(files["VIST"]["train"], tiny_tokenizer, tiny_config, is_training=True, dataset_type="VIST")
    assert len(vist) == 3 * (3 + 2 + 2)              # per story: 3 generation, 2 multimodal, 2 understanding
    # The paper's "without context": the test stories' later frames, each alone with its caption.
    alone = make_dataset(tmp_path / "VIST" / f"{world.NO_CONTEXT}_cleaned.json", tiny_tokenizer, tiny_config,
                         is_training=False, dataset_type="VIST")
    samples = [alone.sample(i) for i in range(len(alone))]
    assert len(samples) == 2 * 2 and all(s.input_image_paths == () for s in samples)
    assert {s.task_name.split("_")[-1] for s in samples} == {"1-gen", "2-gen"}
    dialog = make_dataset(files["MMDialog"]["test"], tiny_tokenizer, tiny_config, is_training=False,
                          dataset_type="MMDialog")
    targets = [dialog.sample(i).target for i in range(len(dialog))]
    assert len(targets) == 2 * 7 and sum("[IMG0]" in t for t in targets) == 2 * 2


def _small_world(tmp_path, mode="pictures", descriptions=False):
    sizes = world.WorldSizes(image_size=32, cc3m={"train": 60, "val": 4, "test": 12}, vist={"train": 30, "test": 10},
                             mmdialog={"train": 20, "test": 6}, story_length=3, story_mode=mode,
                             vist_descriptions=descriptions)
    world.write_datasets(tmp_path, sizes)
    return tmp_path


def test_story_pictures_described_for_training_only(tmp_path):
    """`vist_descriptions`: every training story's picture also described on its own, in the training
    word orders, as its scene is; the stories themselves unchanged; the test stories without."""
    from toyworld import leakage

    plain = json.loads((_small_world(tmp_path / "plain") / "VIST" / "train_cleaned.json").read_text())
    data = _small_world(tmp_path / "described", descriptions=True)
    assert leakage.problems(data) == []
    test = json.loads((data / "VIST" / "test_cleaned.json").read_text())
    assert not any("description" in step for story in test.values() for step in story)
    stories = json.loads((data / "VIST" / "train_cleaned.json").read_text())
    scenes = json.loads((data / "VIST" / "scenes_train.json").read_text())
    assert {k: [{f: v for f, v in step.items() if f != "description"} for step in story]
            for k, story in stories.items()} == plain
    steps = [step for story in stories.values() for step in story]
    assert all(step["description"] in {world.caption(world.Scene(**scenes[step["image_id"]]), t)
                                       for t in range(len(world.TRAIN.captions))} for step in steps)
    assert len({step["description"].split()[0] for step in steps}) > 1    # more than one word order
    # A description is a training text like any other: one in the test wording fails the check.
    steps[0]["description"] = world.caption(world.Scene(**scenes[steps[0]["image_id"]]), 0, world.TEST)
    (data / "VIST" / "train_cleaned.json").write_text(json.dumps(stories))
    assert any("test wording" in line for line in leakage.problems(data))


@pytest.mark.parametrize("mode", world.STORY_MODES)
def test_a_built_world_passes_the_leakage_check(tmp_path, mode):
    from toyworld import leakage
    from toyworld.pretrain import llm_corpus

    data = _small_world(tmp_path, mode)
    assert leakage.problems(data, llm_corpus(300, 0, mode)) == []
    test = json.loads((data / "CC3M" / "scenes_test.json").read_text())
    assert all(world.is_held_out(world.Scene(**t)) for t in test)
    # Every test text is worded as training never words it.
    phrases = set(leakage.test_phrases())
    assert all(line.split("\t")[0] in phrases for line in (data / "CC3M" / "cc3m_test.tsv").read_text().splitlines()[1:])


def test_the_leakage_check_fails_a_leaking_split(tmp_path):
    """Each kind of leak is found in what a build writes, and stops the build's datasets step."""
    from toyworld import leakage

    data = _small_world(tmp_path)
    # a test caption among the training captions
    tsv = data / "CC3M" / "cc3m_train.tsv"
    clean = tsv.read_text()
    leaked = (data / "CC3M" / "cc3m_test.tsv").read_text().splitlines()[1].split("\t")[0]
    tsv.write_text(clean + f"{leaked}\timages/train/000000.jpg\n")
    assert any(p.startswith("test wording that occurs in a training text: 1") for p in leakage.problems(data))
    tsv.write_text(clean)
    # a held-out combination in a training dialogue's pictures (the old make_dialogue's leak)
    scenes_file = data / "MMDialog" / "train" / "scenes.json"
    scenes = json.loads(scenes_file.read_text())
    held = next(s for s in world.all_scenes() if world.is_held_out(s))
    scenes_file.write_text(json.dumps({**scenes, next(iter(scenes)): held.attributes()}))
    assert any(p.startswith("training pictures showing a held-out combination: 1") for p in leakage.problems(data))
    scenes_file.write_text(json.dumps(scenes))
    # a test story told again in training (its scenes and captions)
    test_stories = json.loads((data / "VIST" / "test_cleaned.json").read_text())
    test_truth = json.loads((data / "VIST" / "scenes_test.json").read_text())
    train_stories = json.loads((data / "VIST" / "train_cleaned.json").read_text())
    train_truth = json.loads((data / "VIST" / "scenes_train.json").read_text())
    story_id, steps = next(iter(test_stories.items()))
    (data / "VIST" / "train_cleaned.json").write_text(json.dumps({**train_stories, "copy": steps}))
    (data / "VIST" / "scenes_train.json").write_text(json.dumps({**train_truth, **test_truth}))
    found = leakage.problems(data)
    for kind in ("test story scene sequences", "test story caption histories", "test wording"):
        assert any(p.startswith(kind) for p in found), (kind, found)
    # a pretraining picture of a held-out combination, captioned in a test word order
    seen = next(s for s in world.all_scenes() if not world.is_held_out(s))
    assert leakage.problems(None, pictures=[(seen, world.caption(seen)), (held, world.caption(held, 0, world.TEST))]) == [
        f"pretraining pictures showing a held-out combination: 1 (e.g. {held})",
        f"test wording in the pretraining pictures' captions: 1 (e.g. {world.caption(held, 0, world.TEST)!r})"]
    # test texts with a word the LLM's corpus never holds: the test would ask for a word never taught
    assert leakage.unknown_words(["a zebra at noon", "a ball"], ["a ball at noon"]) == ["zebra"]
    assert any(p.startswith("words of the test texts that no LLM pretraining document holds")
               for p in leakage.problems(data, ["hello there"]))
    # the LLM's corpus naming a held-out combination (in training's own word order)
    assert leakage.problems(None, [f"a story. {world.caption(held)}. the end"]) == [
        f"LLM pretraining documents naming a held-out combination: 1 (e.g. {world.caption(held)!r})"]


def test_a_leaking_split_stops_the_build(tmp_path, monkeypatch):
    """With the test splits worded as training is, the datasets step stops with the leak named."""
    from toyworld import stages
    from toyworld.build import Build

    config = _settings(tmp_path, world={"image_size": 32, "story_length": 3, "cc3m": {"train": 20, "test": 6},
                                        "vist": {"train": 4, "test": 2}, "mmdialog": {"train": 4, "test": 2}})
    monkeypatch.setattr(world, "TEST", world.TRAIN)
    with pytest.raises(SystemExit, match="test wording that occurs in a training text"):
        stages.make_datasets(Build(config, tmp_path / "build"))


def test_picture_stories_beat_both_baselines_only_with_the_pictures(tmp_path):
    """The two baselines of the next story frame: in day stories the text alone tells every frame
    (what the issue found: the pictures were not needed); in picture stories neither the last frame
    copied nor the best text-only rule gets a frame entirely right more than rarely."""
    from toyworld import evaluate

    for mode in world.STORY_MODES:
        data = tmp_path / mode
        world.write_vist(data / "VIST", world.WorldSizes(image_size=32, cc3m={}, vist={"train": 300, "test": 30},
                                                         mmdialog={}, story_length=3, story_mode=mode))
        baselines = {name: accuracy(*pair) for name, pair in evaluate.story_baselines(data).items()}
        assert len(evaluate.story_baselines(data)["copy_last"][1]) == 30 * 2
        assert baselines["copy_last"]["all"] == 0.0                      # something always changes
        changes = evaluate.story_changes(data)
        assert len(changes) == 30 * 2 and set(changes.values()) <= set(evaluate.CHANGES)
        if mode == "day":
            assert set(changes.values()) == {evaluate.ONE_STEP}
        else:
            assert set(changes.values()) == set(evaluate.CHANGES), set(changes.values())
        if mode == "day":
            assert baselines["text_only"]["all"] == 1.0
        else:
            assert baselines["text_only"]["all"] <= 0.1, baselines
            assert baselines["copy_last"]["setting"] == 1.0 and baselines["text_only"]["setting"] < 0.5


def test_toy_extractors_are_trained_and_read_by_metric(tmp_path, monkeypatch):
    """The build's toy CLIP and scene classifier learn the world (above chance on new renders after a
    short training), and `metric.py --toy_extractors` scores with them: pictures of the right scenes
    get a higher CLIP-I and a lower FID than pictures of other scenes."""
    import torch

    import metric
    from toyworld import toy_extractors

    recipe = {"steps": 120, "batch_size": 48, "lr": 2e-3, "warmup": 10}
    section = {"pictures": 576, "clip": {**recipe, "steps": 60, "batch_size": 32}, "classifier": recipe}
    summary = toy_extractors.train(tmp_path / "extractors", section, 32, 0)
    assert summary["clip_loss"] < summary["clip_first_loss"] and summary["classifier_loss"] < summary["classifier_first_loss"]
    chance = 1 / len(world.all_scenes())
    assert summary["classifier_scene_accuracy"] > 5 * chance and summary["clip_caption_retrieval"] > 5 * chance, summary
    rng = random.Random(4)
    scenes = [rng.choice(world.all_scenes()) for _ in range(12)]
    others = [world.Scene(s.setting, world.TIMES[(world.TIMES.index(s.time) + 2) % 4], s.colour, s.place) for s in scenes]
    render = lambda scene: world.render(scene, 32, rng)
    as_target = lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    items = [[f"caption {i}", "[IMG0] ###", world.caption(s), render(s), render(o), as_target(render(s)), None,
              f"cc3m_{i}"] for i, (s, o) in enumerate(zip(scenes, others))]
    folder = tmp_path / "predictions"
    folder.mkdir()
    torch.save(items, folder / "predictions-0.pt")
    monkeypatch.setenv("DATAFOLDER", str(tmp_path / "CC3M"))
    results = metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", "--fid_real", "ground_truth",
                           "--toy_extractors", str(tmp_path / "extractors"), "--device", "cpu"])
    assert results["overall_clip_similarity"] > results["overall_basline_clip_similarity"]
    assert results["overall_fid_score"] < results["overall_basline_fid_score"]
    assert "toy CLIP trained in the toy world" in (folder / "results.md").read_text()
    with pytest.raises(SystemExit, match="not both"):
        metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", "--tiny_extractors",
                     "--toy_extractors", str(tmp_path / "extractors")])
    with pytest.raises(SystemExit, match="toy_classifier.pt missing"):
        metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", "--toy_extractors", str(tmp_path)])


# ---- the build -----------------------------------------------------------------------------------

def _settings(tmp_path, **changes):
    """config/toyworld.yaml with `changes` (top-level sections replaced), written next to it in
    tmp_path with its relative paths made absolute."""
    import yaml

    from toyworld.build import DEFAULT_CONFIG

    settings = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for key in ("model_config", "arch"):
        settings[key] = str(DEFAULT_CONFIG.parent / settings[key])
    settings.pop("report", None)
    settings.update(changes)
    path = tmp_path / "toyworld.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_steps_run_side_by_side_as_they_do_one_after_another(tmp_path, capsys):
    """`--jobs 2`: independent steps run at once, each in its own `python -m toyworld build --only`
    process, and write what the same steps write one after another in this process."""
    from toyworld.build import Build, run

    config = _settings(tmp_path, steps=["datasets", "preset"],
                       world={"image_size": 32, "story_length": 2, "cc3m": {"train": 4}, "vist": {"train": 1},
                              "mmdialog": {"train": 1}}, pretrain={"pictures": 8, "llm": {"documents": 32}})
    run(Build(config, tmp_path / "one"))
    results = run(Build(config, tmp_path / "two"), jobs=2)
    assert set(results) == {"datasets", "preset"}
    shown = capsys.readouterr().out
    threads = max(1, (os.cpu_count() or 1) // 2)                     # --jobs 2: each step half the CPU
    for name in ("datasets", "preset"):
        assert f"(started, {threads} thread{'s' * (threads > 1)}; log logs/step_{name}.log)" in shown, shown
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")
                   if p.is_file() and "steps" not in p.parts and "logs" not in p.parts and p.name != "toy.yaml")
    assert len(files) > 10
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    again = run(Build(config, tmp_path / "two"), jobs=2)                 # done: nothing starts again
    assert "started" not in capsys.readouterr().out and again["preset"]["seconds"] == results["preset"]["seconds"]
    with pytest.raises(SystemExit, match="--jobs"):
        run(Build(config, tmp_path / "two"), jobs=0)


def test_the_longest_chain_gets_the_first_cores(tmp_path):
    """Side by side, ready steps start in the plan's order, and the extractors (which read nothing)
    wait for the UNet: the first two cores after the preset go to CLIP and the VAE, then both to the
    UNet's two processes, which no later ready step takes while it waits for them. The wait is not
    an input: the extractors' key does not change with the UNet's."""
    from toyworld import build as build_module

    build = build_module.Build(_settings(tmp_path), tmp_path / "out")
    plan = build_module.steps(build)
    pending = {s.name for s in plan} - {"datasets", "two_pictures_data", "preset"}
    by_name = {s.name: s for s in plan}

    def start(free, jobs=2, running=()):          # the steps to start with `free` of `jobs` cores free
        waiting = [(i, s) for i, s in enumerate(plan, start=1) if s.name in pending - set(running)]
        return [(s.name, cores) for _, s, cores in build_module.startable(build, waiting, pending, free, jobs)]

    assert start(2) == [("clip", 1), ("vae", 1)]
    assert not build_module.ready(by_name["extractors"], pending)
    pending -= {"clip"}                           # the VAE still runs: one core is free
    assert start(1, running=["vae"]) == [("llm", 1)]
    pending -= {"vae"}                            # the UNet and the LLM are ready, one core is free:
    assert start(1) == []                         # the UNet waits for both, the LLM does not take one
    assert start(2) == [("unet", 2)]
    assert start(1, jobs=1) == [("unet", 1)]      # --jobs 1: one at a time, the UNet's processes alike
    pending -= {"unet"}
    assert build_module.ready(by_name["extractors"], pending)
    keys = {name: build.key(by_name[name]) for name in ("extractors", "stage0")}
    build.record_path("unet").write_text(json.dumps({"key": "another unet"}))
    assert build.key(by_name["extractors"]) == keys["extractors"]
    assert build.key(by_name["stage0"]) != keys["stage0"]                   # stage 0 reads the UNet


def test_the_ablations_are_steps_the_settings_choose(tmp_path):
    """`ablations` names the ablations trained (default: all): each leaves out its training step and
    its prediction, nothing else; a report made by two runs (the ablations added later) says which
    run made what. Stage 1 without the caption loss (as long as stage 1) starts first of them."""
    from toyworld import evaluate
    from toyworld.build import DEFAULT_CONFIG, Build, steps

    def plan(**changes):
        return [s.name for s in steps(Build(_settings(tmp_path, **changes), tmp_path / "out"))]

    everything = plan(ablations=["no_caption_loss", "no_stage1"])
    import yaml

    unsaid = yaml.safe_load(_settings(tmp_path).read_text())
    del unsaid["ablations"]
    (tmp_path / "unsaid.yaml").write_text(yaml.safe_dump(unsaid))
    assert [s.name for s in steps(Build(tmp_path / "unsaid.yaml", tmp_path / "out"))] == everything   # all
    assert set(everything) - set(plan(ablations=["no_caption_loss"])) == {"stage2_vist_no_stage1",
                                                                        "predict_vist_no_stage1"}
    assert set(everything) - set(plan(ablations=[])) == {"stage2_vist_no_stage1", "predict_vist_no_stage1",
                                                       "stage1_cc3m_no_caption_loss", "predict_cc3m_no_caption_loss"}
    for wrong in ("no_stage1", ["no_stage_1"]):
        with pytest.raises(SystemExit, match="`ablations` must be a list of"):
            plan(ablations=wrong)
    # Ready with stage 0, beside stage 1: the ablation as long as stage 1 starts first.
    assert everything.index("stage1_cc3m") < everything.index("stage1_cc3m_no_caption_loss") \
        < everything.index("stage2_vist_no_stage1")
    assert yaml.safe_load(DEFAULT_CONFIG.read_text())["ablations"] == ["no_caption_loss"]
    assert evaluate._wall_text([(2640.0, 24)]) == ", 44.0 minutes of wall clock (steps run side by side)."
    assert evaluate._wall_text([(2640.0, 24), (900.0, 4)]) == (
        "; made by 2 runs of the build, in the order they ran: 44.0 minutes for 24 steps; 15.0 minutes for 4 steps"
        " (wall clock, steps run side by side).")


def test_a_steps_openmp_threads_sleep_while_they_wait(monkeypatch):
    """Spinning OpenMP threads crawl when another process holds a core (the UNet step ran 100x
    slower beside one training run): a step's process gets OMP_WAIT_POLICY=PASSIVE unless set."""
    from toyworld.build import step_environment

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = step_environment(2)
    assert (env["OMP_WAIT_POLICY"], env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]) == ("PASSIVE", "2", "2")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert step_environment(1)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_steps_threads_depend_on_the_step_and_jobs_only():
    """Reproducible builds: a step's CPU threads never depend on what happens to run beside it (a
    float sum split over other threads rounds differently)."""
    from toyworld import stages
    from toyworld.build import step_threads

    cpus = os.cpu_count() or 1
    by_name = {step.name: step for step in stages.STEPS}
    assert step_threads(by_name["unet"], 2) == cpus                    # the long one, mostly alone
    assert step_threads(by_name["stage1_cc3m"], 2) == max(1, cpus // 2)
    assert step_threads(by_name["stage1_cc3m"], 1) == cpus


def test_a_training_step_built_twice_gives_the_same_checkpoint_bytes(tmp_path):
    """Two builds of one MiniGPT-5 training step (the shipped frozen parts, a few optimiser steps of
    stage 1 by train_eval.py --deterministic) write byte-identical checkpoints."""
    import yaml

    from toyworld.build import DEFAULT_CONFIG, Build, run

    quick = DEFAULT_CONFIG.with_name("toyworld_quick.yaml")
    settings = yaml.safe_load(quick.read_text())
    for key in ("model_config", "arch", "frozen_parts"):
        settings[key] = str((quick.parent / settings[key]).resolve())
    settings["steps"] = ["datasets", "preset", "stage0", "stage1_cc3m"]
    settings["world"].update(cc3m={"train": 24, "val": 4, "test": 4}, vist={"train": 1, "test": 1},
                             mmdialog={"train": 1, "test": 1})
    settings["minigpt5"]["stage1"] = ["--learning_rate", "1e-3", "--num_train_epochs", "2", "--max_steps", "3"]
    config = tmp_path / "one_step.yaml"
    config.write_text(yaml.safe_dump(settings))
    written = []
    for name in ("first", "second"):
        results = run(Build(config, tmp_path / name))
        assert results["stage1_cc3m"]["summary"]["optimiser_steps"] == 3
        written.append((tmp_path / name / "checkpoints" / "stage1_cc3m.ckpt").read_bytes())
    assert written[0] == written[1]
    untrained = (tmp_path / "first" / "checkpoints" / "stage0_untrained.ckpt").read_bytes()
    assert written[0] != untrained


def test_pretraining_steps_write_parts_that_the_loaders_read(tmp_path):
    """A few steps of every pretraining recipe: each loss goes down, each part is written in the
    real formats, and MiniGPT-5 is built from the result by the unchanged loading code."""
    from toyworld.build import Build, run

    step = {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup": 2}
    config = _settings(
        tmp_path, steps=["datasets", "preset", "clip", "vae", "unet", "llm", "image_side", "stage0"],
        world={"image_size": 32, "story_length": 2, "cc3m": {"train": 4}, "vist": {"train": 1},
               "mmdialog": {"train": 1}},
        pretrain={"pictures": 48, "clip": step, "vae": {**step, "kl_weight": 1e-6},
                  "unet": {**step, "caption_dropout": 0.1, "snr_gamma": 5.0, "ema_decay": 0.9},
                  "llm": {**step, "documents": 64}, "image_side": step})
    results = run(Build(config, tmp_path / "build"))
    for name in ("clip", "vae", "unet", "llm", "image_side"):
        summary = results[name]["summary"]
        assert summary["loss"] < summary["first_loss"], (name, summary)
    assert (tmp_path / "build" / "checkpoints" / "stage0_untrained.ckpt").is_file()
    again = run(Build(config, tmp_path / "build"))                      # cached: nothing is redone
    assert all(again[name]["seconds"] == results[name]["seconds"] for name in results)
    # Seeded: a second build elsewhere writes the same weights, byte for byte.
    run(Build(config, tmp_path / "second"))
    files = sorted(p.relative_to(tmp_path / "build") for p in (tmp_path / "build").rglob("*")
                   if p.suffix in (".safetensors", ".pth", ".ckpt", ".model", ".json", ".tsv")
                   and "steps" not in p.parts)
    assert len(files) > 20
    for name in files:
        assert (tmp_path / "build" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    # A copied build folder reads its own parts, not those of the folder it was copied from.
    import shutil
    from pathlib import Path

    from configuration import load_config

    shutil.copytree(tmp_path / "build", tmp_path / "copy")
    cfg = load_config(tmp_path / "copy" / "toy.yaml")
    for key in ("llama_model", "sd_model", "vit_model", "q_former_model", "ckpt"):
        assert Path(getattr(cfg, key)).parent == (tmp_path / "copy").resolve(), key


def test_the_unet_trained_by_two_processes_is_the_one_process_unet(tmp_path):
    """`pretrain.unet.processes: 2`: each process trains on its half of every batch (the whole batch's
    noise drawn alike by both) and the gradients are averaged before the update, so the UNet is the
    one a single process trains, up to float rounding: the recipe does not change. The batch must
    split evenly, which the build checks before any step runs."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from toyworld.build import Build, run

    step = {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup": 2}
    unet = {**step, "caption_dropout": 0.25, "snr_gamma": 5.0, "ema_decay": 0.9}

    def settings(name, **unet_changes):
        (tmp_path / f"{name}_settings").mkdir()
        return _settings(tmp_path / f"{name}_settings", steps=["datasets", "preset", "clip", "vae", "unet"],
                         world={"image_size": 32, "story_length": 2, "cc3m": {"train": 4}, "vist": {"train": 1},
                                "mmdialog": {"train": 1}},
                         pretrain={"pictures": 24, "clip": {**step, "steps": 2}, "vae": {**step, "kl_weight": 1e-6},
                                   "unet": {**unet, **unet_changes}, "llm": {"documents": 8}})

    one = run(Build(settings("one"), tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    two = run(Build(settings("two", processes=2), tmp_path / "two"))     # only the UNet is redone
    assert two["vae"]["seconds"] == one["vae"]["seconds"] and two["unet"]["seconds"] != one["unet"]["seconds"]
    weights = [load_file(tmp_path / name / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
               for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    # Up to float rounding, judged over every weight: Adam divides a step by the gradient's own size, so
    # an element whose gradient is near zero may step differently on rounding alone (on an Intel machine
    # 2 of 1,001,828 elements moved apart by more than 1e-4, at most 1.4e-4; mean gap 4.4e-8). Half the
    # batch per step instead (each process on its own half, never averaged) moved 99.7% of them apart by
    # more than 1e-5, mean gap 3.2e-3.
    gaps = torch.cat([(weights[0][k] - weights[1][k]).abs().flatten().double() for k in weights[0]])
    assert gaps.mean().item() < 1e-6, gaps.mean().item()
    assert (gaps > 1e-5).double().mean().item() < 1e-3, (gaps > 1e-5).double().mean().item()
    assert two["unet"]["summary"]["loss"] == pytest.approx(one["unet"]["summary"]["loss"], abs=1e-4)
    for wrong in (3, 0, "2"):
        with pytest.raises(SystemExit, match=r"pretrain.unet.processes is .*divides pretrain.unet.batch_size \(8\)"):
            run(Build(settings(f"wrong{wrong}", processes=wrong), tmp_path / f"never{wrong}"))
        assert not (tmp_path / f"never{wrong}" / "data").exists()


def test_a_training_step_takes_a_core_per_process_its_flags_start(tmp_path):
    """A MiniGPT-5 training step whose flags give `--gpus 0,1` runs as two CPU processes
    (train_eval.py's DDP over gloo), so the build gives it two cores; its stage's other steps and
    the prediction steps keep one. The step's own flags come last and win."""
    from toyworld import stages
    from toyworld.build import Build, steps

    minigpt5 = {"common": ["--gpus", "0"], "stage1": ["--num_train_epochs", "1", "--gpus", "0,1"],
                "stage2": ["--num_train_epochs", "1"], "stage2_mmdialog": ["--gpus", "0,1,2"]}
    build = Build(_settings(tmp_path, minigpt5=minigpt5, ablations=["no_caption_loss"]), tmp_path / "out")
    cores = {s.name: s.cores(build) for s in steps(build)}
    assert (cores["stage1_cc3m"], cores["stage1_cc3m_no_caption_loss"], cores["stage2_vist"],
            cores["stage2_mmdialog"], cores["predict_cc3m_stage1"]) == (2, 2, 1, 3, 1)
    assert stages.training_flags(build, "stage2_mmdialog", 2)[-2:] == ["--gpus", "0,1,2"]
    wrong = Build(_settings(tmp_path, minigpt5={**minigpt5, "stage1": ["--gpus", "0,x"]}), tmp_path / "out")
    with pytest.raises(SystemExit, match=r"`minigpt5` gives stage1_cc3m `--gpus 0,x`; expected device ids"):
        steps(wrong)


def test_each_data_parallel_process_takes_its_own_share_of_the_batch(monkeypatch):
    from toyworld import pretrain

    assert pretrain.data_parallel_rank() == (0, 1) and pretrain.batch_share(32) == slice(0, 32)
    monkeypatch.setattr(pretrain, "data_parallel_rank", lambda: (1, 2))
    assert pretrain.batch_share(32) == slice(16, 32)
    with pytest.raises(ValueError, match="a batch of 7 does not split evenly over 2 processes"):
        pretrain.batch_share(7)


def test_a_short_build_learns(tmp_path):
    """config/toyworld_quick.yaml: the shipped frozen parts, a small toy CC3M and a short MiniGPT-5
    stage 1 (546 steps) by the unchanged train_eval.py. On held-out combinations, captioned in the
    test word orders, the trained model emits vokens for the captions (the untrained one never does,
    so it draws nothing) and the judge reads its pictures above chance, one attribute far above.
    On the day-story build's frozen parts 450 steps were enough (setting 47%, time 81%, colour 19%,
    place 50%; chance 25 / 25 / 25 / 33%); on build 19's (shipped since) 450 steps left every attribute
    14-22 points above chance (at a learning rate of 1e-3; 5e-4 and 2e-3 did no better). On build 22's
    (shipped now) 546 steps read setting / time / colour 53 / 42 / 33 points above chance, 364 steps at most
    8 (config/toyworld_quick.yaml)."""
    import yaml

    from toyworld.build import DEFAULT_CONFIG, Build, run

    quick = DEFAULT_CONFIG.with_name("toyworld_quick.yaml")
    settings = yaml.safe_load(quick.read_text())
    for key in ("model_config", "arch", "frozen_parts"):
        settings[key] = str((quick.parent / settings[key]).resolve())
    for recipe in settings["pairing_recipes"].values():
        for key in ("model_config", "arch"):
            recipe[key] = str((quick.parent / recipe[key]).resolve())
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump(settings))
    build = Build(config, tmp_path / "build")
    results = run(build)
    runs = results["report"]["summary"]["runs"]
    trained, untrained = runs["cc3m_stage1"], runs["cc3m_untrained"]
    assert trained["emitted"] >= 0.9 and untrained["emitted"] == 0.0
    scores = trained["accuracy"]
    assert max(scores[name] - chance for name, chance in CHANCE.items()) >= 0.3, scores   # one far above chance
    assert sum(scores[name] for name in CHANCE) > sum(CHANCE.values()), scores          # above chance overall
    assert sum(scores[name] for name in CHANCE) > sum(untrained["accuracy"][name] for name in CHANCE)
    report = (tmp_path / "build" / "TOY_RESULTS.md").read_text()
    assert "MiniGPT-5 stage 1" in report and "| chance |" in report
    # The two-picture task's code path (one optimiser step of stage 2: no accuracy asked): every
    # test answer predicted and each of its two places judged.
    two = results["predict_two_pictures"]["summary"]["scores"]
    assert two["n"] == settings["two_pictures"]["test"] and set(two) >= {"picture_1", "picture_2", "both"}
    assert "## Two pictures in one answer" in report and "| both pictures entirely right |" in report
    # The second pairing's code path (a few steps of each pretraining and of stage 1): its stage-1
    # checkpoint records its LLM family, and its held-out pictures are judged in the report.
    pairing = results["qwen2_sd3_predict_cc3m_stage1"]["summary"]
    assert pairing["n"] == settings["world"]["cc3m"]["test"]
    from weights import load_untrusted

    ckpt = load_untrusted(tmp_path / "build" / "pairings" / "qwen2_sd3" / "checkpoints" / "stage1_cc3m.ckpt", "test")
    assert ckpt["llm_family"] == "qwen2"
    assert "## A second pairing" in report and "| qwen2_sd3: stage 1" in report
    assert "| qwen2_sd3: its decoder from the caption alone" in report      # the decoder beside stage 1
    assert set(pairing["baseline_accuracy"]) == set(pairing["accuracy"])
    assert "minutes of wall clock" in report                     # every step was timed from its start


def test_demos_take_the_shipped_presets_guidance_unless_told():
    """`python -m toyworld ship` keeps the guidance scale the build evaluates with, and the demos use
    it for the toy preset unless --guidance_scale is given."""
    from argparse import Namespace

    from toyworld import ship
    from toyworld.build import DEFAULT_CONFIG

    preset = ship.shipped()
    assert preset.guidance_scale is not None
    assert preset.guidance_scale == ship.evaluation_guidance(DEFAULT_CONFIG)
    unset = Namespace(model_config=None, stage1_weight=None, test_weight=None, guidance_scale=None)
    ship.use_shipped(unset, "stage2_vist")
    assert unset.guidance_scale == preset.guidance_scale and unset.test_weight == str(preset.stage2_vist)
    told = Namespace(model_config=None, stage1_weight=None, test_weight=None, guidance_scale=7.5)
    ship.use_shipped(told, "stage2_mmdialog")
    assert told.guidance_scale == 7.5


def test_ship_copies_a_build_small_and_loadable(tmp_path):
    """`python -m toyworld ship` on a build folder (here one made of the shipped preset's own parts):
    every file under 2 MB, the checkpoints' weights float16, paths relative to the copy, the demos'
    story in the build's story mode with the next frame's caption, and the copy loads as a model."""
    import torch

    from model import MiniGPT5_Model
    from toyworld import ship

    build = tmp_path / "build"
    build.mkdir()
    for part in ("llama", "sd", "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "prerained_minigpt4_7b.pth", "toy.yaml"):
        (build / part).symlink_to(ship.SHIPPED / part)
    (build / "checkpoints").mkdir()
    for name in ship.CHECKPOINTS:
        (build / "checkpoints" / name).symlink_to(ship.SHIPPED / name)
    copy = ship.ship(build, tmp_path / "shipped", guidance_scale=3.0, mode="pictures")
    assert all(f.stat().st_size < 2 * 2**20 for f in copy.rglob("*") if f.is_file())
    state = torch.load(copy / "stage2_vist.ckpt", weights_only=True)["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert "llama_model: llama" in (copy / "toy.yaml").read_text()
    preset = ship.shipped(copy)
    story = ship.demo_story("pictures")
    assert preset.story_captions == list(story.captions[:2]) and preset.next_caption == story.captions[2]
    assert preset.next_scene == story.scenes[2].attributes() and preset.guidance_scale == 3.0
    model = MiniGPT5_Model.from_weights(preset.config, preset.stage1, preset.stage2_vist, device="cpu")
    assert model.model.llama_model.dtype == torch.float32        # float16 files load into the toy's float32


def test_a_shipped_builds_demo_story_is_of_the_kind_stage_2_learnt():
    """`ship` writes the demos' story in the build's story mode: the shipped preset's is a picture
    story of the test side (no training story begins like it), in the test wording, with the caption
    of the frame to draw; a day story's frames follow from its first caption."""
    from toyworld import ship
    from toyworld.build import DEFAULT_CONFIG

    assert ship.story_mode(DEFAULT_CONFIG) == "pictures"
    preset = ship.shipped()
    pictures = ship.demo_story("pictures")
    assert list(pictures.captions[:len(preset.story_captions)]) == preset.story_captions
    assert preset.next_caption == pictures.captions[len(preset.story_captions)]
    assert pictures.scenes[len(preset.story_captions)].attributes() == preset.next_scene
    assert world.is_test_start(pictures.scenes[0]) and pictures.captions[0] in world.TEST.story_open
    day = ship.demo_story("day")
    assert all(b == a.later(1) for a, b in zip(day.scenes, day.scenes[1:]))


def test_the_two_picture_task_is_written_held_out_and_leak_checked(tmp_path):
    """Each answer holds two pictures (the second after one stated change), training pictures with
    their captions; training shows seen combinations only, every test answer starts from a held-out one in the test wording, and a test
    request put into training stops the build."""
    from toyworld import two_pictures

    folder = tmp_path / "interleaved"
    two_pictures.write(folder, {"train": 40, "val": 2, "test": 8}, 32, seed=0)
    two_pictures.check(folder)
    for split in ("train", "test"):
        truth = json.loads((folder / f"scenes_{split}.json").read_text())
        lines = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        assert len(lines) == len(truth) == {"train": 40, "test": 8}[split]
        for line in lines:
            pictures = [seg for seg in line["turns"][1]["segments"] if "image" in seg]
            images = [seg["image"] for seg in pictures]
            assert len(images) == 2 and all((folder / path).is_file() for path in images)
            first, second = truth[two_pictures.task_name(line["id"])]
            assert sum(first[a] != second[a] for a in first) == 1           # one stated change
            # Training pictures carry their own caption (the caption loss's target); test ones none.
            captions = [seg.get("caption") for seg in pictures]
            if split == "test":
                assert captions == [None, None]
            else:
                words = world.wording("train")
                for caption, scene in zip(captions, (first, second)):
                    assert caption in {world.caption(world.Scene(**scene), k, words) for k in range(len(words.captions))}
            assert world.is_held_out(world.Scene(**first)) == (split == "test")
    judged = [judge(Image.open(folder / "pictures" / "test" / f"000000_{k}.jpg")) for k in (0, 1)]
    assert judged == truth[two_pictures.task_name("pair00000")]           # the judge reads both places
    test_line = (folder / "test.jsonl").read_text().splitlines()[0]
    train_lines = (folder / "train.jsonl").read_text()
    with open(folder / "train.jsonl", "a") as f:
        f.write(test_line.replace("pictures/test/", "pictures/train/") + "\n")
    with pytest.raises(SystemExit, match="test request"):
        two_pictures.check(folder)
    # a test request with a word no training request holds
    (folder / "train.jsonl").write_text(train_lines)
    with open(folder / "test.jsonl", "a") as f:
        f.write(test_line.replace("draw", "paint").replace("i would like", "i would love") + "\n")
    with pytest.raises(SystemExit, match="use words no training request holds"):
        two_pictures.check(folder)


def test_two_picture_answers_are_scored_per_place_and_both():
    from toyworld import two_pictures

    a = {"setting": "beach", "time": "noon", "colour": "red", "place": "near"}
    b = {**a, "time": "night"}
    judged = {"tasks": ["p0", "p1", "p2"], "truth": [[a, b]] * 3, "drawn": [2, 2, 1],
              "judged": [[a, b], [a, a], [a, None]]}
    scores = two_pictures.scores(judged)
    assert scores["picture_1"]["all"] == 1.0 and abs(scores["picture_2"]["all"] - 1 / 3) < 1e-9
    assert abs(scores["both"] - 1 / 3) < 1e-9 and abs(scores["two_drawn"] - 2 / 3) < 1e-9
    lines = two_pictures.report_lines(scores)
    assert "| both pictures entirely right | 3 | 33.3% | >= 70% |" in lines


def test_locked_image_tuning_trains_the_text_side_only():
    """pretrain.train_clip(train_vision=False), the second pairing's text encoders: the ViT keeps every
    weight, the text encoder learns (its own projection too: SD3 reads it as the pooled embedding),
    and the contrastive loss goes down."""
    from pathlib import Path

    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    import lavis
    from configuration import load_config
    from toyworld import pretrain

    shipped = Path(__file__).resolve().parents[1] / "toyworld" / "pretrained"
    cfg = load_config(shipped / "toy.yaml")
    vision = lavis.build_vision_model(cfg.vision, cfg.image_size)
    lavis.load_eva_vit(vision, cfg.vit_model, cfg.q_former_model)
    before = {k: v.clone() for k, v in vision.state_dict().items()}
    tokenizer = CLIPTokenizer.from_pretrained(shipped / "sd", subfolder="tokenizer")
    torch.manual_seed(0)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=32, max_position_embeddings=tokenizer.model_max_length))
    projection = text.text_projection.weight.clone()
    pictures = pretrain.picture_set(64, cfg.image_size, seed=0)
    recipe = pretrain.Recipe(steps=30, batch_size=16, lr=3e-3, warmup=2)
    losses = pretrain.train_clip(text, tokenizer, vision, pictures, recipe, seed=0, train_vision=False)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert all(torch.equal(before[k], v) for k, v in vision.state_dict().items())
    assert not torch.equal(projection, text.text_projection.weight)
    assert not vision.training and not any(p.requires_grad for p in text.parameters())


def test_optional_tasks_and_pairings_follow_the_settings(tmp_path):
    """The default build has the two-picture task but builds no second pairing unless `pairings`
    names it; a named pairing without its recipe stops the build with the key to add."""
    import yaml

    from toyworld.build import DEFAULT_CONFIG, Build, steps
    from toyworld.pairing import PairingView

    names = [s.name for s in steps(Build(DEFAULT_CONFIG, tmp_path / "default"))]
    assert names.index("datasets") < names.index("two_pictures_data") < names.index("stage2_two_pictures")
    assert "predict_two_pictures" in names and not any(n.startswith("qwen2_sd3") for n in names)
    settings = yaml.safe_load(DEFAULT_CONFIG.read_text())
    settings["pairings"] = ["qwen2_sd3"]
    config = tmp_path / "with_pairing.yaml"
    config.write_text(yaml.safe_dump(settings))
    build = Build(config, tmp_path / "pairing")
    names = [s.name for s in steps(build)]
    assert names.index("qwen2_sd3_text_encoders") < names.index("qwen2_sd3_transformer")
    assert names.index("qwen2_sd3_transformer") < names.index("qwen2_sd3_stage1_cc3m") < names.index("report")
    view = PairingView(build, "qwen2_sd3")
    assert view.data == build.data and view.model_config == build.out / "pairings" / "qwen2_sd3" / "toy.yaml"
    settings["pairing_recipes"]["qwen2_sd3"]["evaluate"] = ["--num_inference_steps", "2"]   # after the build's
    config.write_text(yaml.safe_dump(settings))
    view = PairingView(Build(config, tmp_path / "pairing"), "qwen2_sd3")
    assert view.settings["evaluate"]["flags"] == settings["evaluate"]["flags"] + ["--num_inference_steps", "2"]
    assert build.settings["evaluate"]["flags"] == settings["evaluate"]["flags"]          # the build's unchanged
    config.write_text(yaml.safe_dump({**settings, "pairings": ["qwen3_flux"]}))
    with pytest.raises(SystemExit, match=r"unknown pairing\(s\) \['qwen3_flux'\]"):
        steps(Build(config, tmp_path / "pairing"))
    del settings["pairing_recipes"]
    config.write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit, match="pairing_recipes"):
        PairingView(Build(config, tmp_path / "pairing"), "qwen2_sd3")


def test_each_drawn_picture_is_judged_at_its_place(tmp_path, monkeypatch):
    """judge_folder reads a prediction's pictures in order against the scenes expected there: the
    second picture against the second scene; a missing second picture is None (wrong), and a
    prediction of another task is not counted."""
    import metric
    from toyworld import two_pictures

    data = tmp_path / "data"
    two_pictures.write(data / two_pictures.FOLDER, {"test": 2}, 32, seed=0)
    truth = json.loads((data / two_pictures.FOLDER / "scenes_test.json").read_text())
    tasks = list(truth)
    draw = lambda attributes: world.render(world.Scene(**attributes), 32, random.Random(0))
    samples = [metric.Sample("", "", "", draw(truth[tasks[0]][0]), None, None, tasks[0],
                             more_pred_images=[draw(truth[tasks[0]][1])]),
               metric.Sample("", "", "", draw(truth[tasks[1]][1]), None, None, tasks[1]),
               metric.Sample("", "", "", None, None, None, "elsewhere_1-answer")]
    monkeypatch.setattr(metric, "load_predictions", lambda folder: samples)
    judged = two_pictures.judge_folder(data, tmp_path)
    assert judged["tasks"] == tasks and judged["drawn"] == [2, 1]
    assert judged["judged"][0] == truth[tasks[0]] and judged["judged"][1][1] is None
    scores = two_pictures.scores(judged)
    assert scores["both"] == 0.5 and scores["picture_1"]["all"] == 0.5 and scores["picture_2"]["all"] == 0.5


def _frames(n_stories: int, carries, seed: int):
    """Synthetic probe inputs: two frames per story, every fourth a time step of 1 or 2, the rest a
    colour change; the features are one-hot codes of what `carries(frame, last, told)` returns."""
    from toyworld import probe
    from toyworld.evaluate import NEW_COLOUR, ONE_STEP, TWO_STEPS

    rng = random.Random(seed)
    features, answers, stories, changes = [], {q: [] for q, _ in probe.QUESTIONS}, [], []
    for s in range(n_stories):
        for _ in range(2):
            last = world.Scene(rng.choice(world.SETTINGS), rng.choice(world.TIMES), rng.choice(world.COLOURS),
                               rng.choice(world.PLACES))
            if rng.random() < 0.5:
                told = {"time_steps": rng.choice([1, 2])}
                frame, change = last.later(told["time_steps"]), (ONE_STEP, TWO_STEPS)[told["time_steps"] - 1]
            else:
                frame = world.Scene(last.setting, last.time, rng.choice([c for c in world.COLOURS if c != last.colour]),
                                    last.place)
                told, change = {"colour": frame.colour}, NEW_COLOUR
            frame, last = frame.attributes(), last.attributes()
            code = [1.0 if value == option else 0.0 for value, options in carries(frame, last, told)
                    for option in options]
            features.append(np.array(code) + np.random.default_rng(len(features)).normal(0, 0.05, len(code)))
            for question, answer in probe.QUESTIONS:
                answers[question].append(answer(frame, last, told))
            stories.append(str(s))
            changes.append(change)
    X = np.stack(features)
    return probe.Frames({kind: X for kind in probe.READ_FROM}, {q: np.array(a, dtype=object) for q, a in answers.items()},
                        np.array(stories), np.array(changes))


def test_a_probe_reads_what_the_vokens_carry_and_not_a_sum_they_do_not_compute():
    """Features that hold the last picture's time and the told step, one-hot, but not their sum: the
    probe reads both parts right and the moved-on time wrong often (a linear read cannot add them
    round the clock), while features holding the frame's own time read it right."""
    from toyworld import probe
    from toyworld.evaluate import ONE_STEP, TWO_STEPS

    parts = lambda frame, last, told: [(last["time"], world.TIMES), (told.get("time_steps", 0), (0, 1, 2)),
                                       (frame["setting"], world.SETTINGS), (frame["colour"], world.COLOURS),
                                       (frame["place"], world.PLACES)]
    results = probe.probe(_frames(200, parts, 0), _frames(40, parts, 1))
    kind = probe.READ_FROM[0]
    for question in ("the last context picture's time", "the step its caption tells", "its setting", "its colour"):
        assert results[f"{kind}: {question}"]["train_cv"]["accuracy"] > 0.95, question
        assert results[f"{kind}: {question}"]["test"]["accuracy"] > 0.95, question
    time = results[f"{kind}: its time"]
    stepped = [time["train_cv"]["by_change"][c] for c in (ONE_STEP, TWO_STEPS)]
    assert sum(a * n for a, n in stepped) / sum(n for _, n in stepped) < 0.85, stepped
    assert results[f"{kind}: the step its caption tells"]["train_cv"]["n"] == sum(n for _, n in stepped)

    whole = lambda frame, last, told: [(frame["time"], world.TIMES), *parts(frame, last, told)[2:]]
    results = probe.probe(_frames(200, whole, 0), _frames(40, whole, 1))
    assert results[f"{kind}: its time"]["test"]["accuracy"] > 0.95
    assert "| voken features: its time |" in probe.report(results, "x.ckpt")


def test_the_probe_command_reads_a_builds_stage_2_on_its_stories(tmp_path, capsys):
    """`python -m toyworld probe` on a build folder (the shipped preset's parts and checkpoints, a small
    world's stories): one row per feature kind and question, every frame after the first read, and
    what it says written beside the build; a build without its checkpoint stops with the path."""
    from toyworld import probe
    from toyworld.__main__ import main
    from toyworld.ship import SHIPPED

    out = tmp_path / "build"
    out.mkdir()
    for part in ("llama", "sd", "eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "prerained_minigpt4_7b.pth", "toy.yaml"):
        (out / part).symlink_to(SHIPPED / part)
    world.write_vist(out / "data" / "VIST", world.WorldSizes(image_size=32, cc3m={}, vist={"train": 30, "test": 10},
                                                             mmdialog={}, story_length=3))
    with pytest.raises(SystemExit, match="stage1_cc3m.ckpt does not exist"):
        main(["probe", "--out", str(out)])
    (out / "checkpoints").mkdir()
    for name in ("stage1_cc3m.ckpt", "stage2_vist.ckpt"):
        (out / "checkpoints" / name).symlink_to(SHIPPED / name)
    main(["probe", "--out", str(out)])
    assert "written to" in capsys.readouterr().out
    results = json.loads((out / "probe_stage2_vist.json").read_text())
    assert set(results) == {f"{kind}: {q}" for kind in probe.READ_FROM for q, _ in probe.QUESTIONS}
    told = json.loads((out / "data" / "VIST" / "told_test.json").read_text())
    stories = json.loads((out / "data" / "VIST" / "test_cleaned.json").read_text())
    steps = sum("time_steps" in told[step["image_id"]] for s in stories.values() for step in s[1:])
    assert results["voken features: its setting"]["train_cv"]["n"] == 30 * 2
    assert results["voken features: its setting"]["test"]["n"] == 10 * 2
    assert results["SD condition: the step its caption tells"]["test"]["n"] == steps
    assert "| SD condition: its time |" in (out / "probe_stage2_vist.md").read_text()


def test_sd_probe_separates_held_out_combinations_from_new_word_orders(tmp_path):
    """`python -m toyworld sd-probe`: the shipped toy SD draws seen combinations from training-worded
    captions almost always right, and held-out combinations in the test wording less often (the
    figure stage 1 is bounded by); a folder without an SD is an error that names it."""
    from toyworld import sd_probe, ship

    cells = (sd_probe.CELLS[0], sd_probe.CELLS[3])          # held-out / test wording, seen / training
    results = sd_probe.draw_cells(ship.SHIPPED / "sd", repeats=1, cells=cells)
    held, seen = results["held-out, test wording"], results["seen, training wording"]
    assert held["n"] == seen["n"] == 35
    assert seen["all"] >= 90 and held["all"] < seen["all"]
    assert "| held-out, test wording |" in sd_probe.report(results, ship.SHIPPED / "sd")
    with pytest.raises(SystemExit, match="not a diffusers SD folder"):
        sd_probe.run(tmp_path, 1)
    with pytest.raises(SystemExit, match="--repeats"):
        sd_probe.run(ship.SHIPPED, 0)
