"""data_sources/: one module per dataset, registered in one place; the release's three datasets give
exactly the samples they gave before they moved there (every sample of every sample file, both
splits: a digest of the dump records, stored in tests/data/golden/release_samples.json)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.usefixtures("no_data_env")

GOLDEN_FILE = REPO / "tests" / "data" / "golden" / "release_samples.json"
UPDATE = os.environ.get("GOLDEN_UPDATE") == "1"
DATASETS = REPO / "datasets"
DATA_FILES = {
    "CC3M": {"train": DATASETS / "CC3M" / "cc3m_train.tsv", "test": DATASETS / "CC3M" / "cc3m_val.tsv"},
    "VIST": {"train": DATASETS / "VIST" / "train_cleaned.json", "test": DATASETS / "VIST" / "val_cleaned.json"},
    "MMDialog": {"train": DATASETS / "MMDialog" / "train" / "train_conversations.txt",
                 "test": DATASETS / "MMDialog" / "test" / "test_conversations.txt"},
}


def _relative(value):
    """Paths in a record relative to the repository (the digest must not depend on where it lives)."""
    if isinstance(value, str) and value.startswith(str(REPO)):
        return os.path.relpath(value, REPO)
    if isinstance(value, list):
        return [_relative(v) for v in value]
    return value


def _digest(dataset) -> dict:
    lines = []
    for sample in dataset.samples():
        record = {key: _relative(value) for key, value in sample.record().items()}
        record["location"] = _relative(sample.location)
        lines.append(json.dumps(record, sort_keys=True))
    return {"count": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


@pytest.mark.parametrize("name", sorted(DATA_FILES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_the_release_datasets_give_every_sample_they_gave(name, split, tiny_tokenizer):
    from dataloader import make_dataset

    dataset = make_dataset(DATA_FILES[name][split], tiny_tokenizer, None, is_training=split == "train",
                           dataset_type=name, feature_folder=False)
    got = _digest(dataset)
    key = f"{name}/{split}"
    if UPDATE:
        stored = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.is_file() else {}
        stored[key] = got
        GOLDEN_FILE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    assert got == json.loads(GOLDEN_FILE.read_text())[key], f"{key}: the samples changed"


@pytest.mark.parametrize("name", sorted(DATA_FILES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_each_sample_says_the_same_in_its_dialogue(name, split, tiny_tokenizer):
    """Readers fill `Sample.dialogue`: its input pictures are the source's, in order, its answer's
    pictures the target's, and an answer with text holds the text of the target."""
    from dataloader import make_dataset

    dataset = make_dataset(DATA_FILES[name][split], tiny_tokenizer, None, is_training=split == "train",
                           dataset_type=name, feature_folder=False)
    for sample in dataset.samples():
        dialogue = sample.dialogue
        assert dialogue is not None and dialogue.answer.role == "assistant", sample.task_name
        assert dialogue.input_images == sample.input_image_paths, sample.task_name
        assert dialogue.target_images == ((sample.output_image_path,) if sample.output_image_path else ())
        texts = [s.text for s in dialogue.answer.segments if s.text is not None]
        assert all(text in sample.target for text in texts), sample.task_name
        roles = [m.role for m in dialogue.messages]
        assert all(a != b for a, b in zip(roles, roles[1:])), roles      # turns alternate


def test_the_registry_is_the_one_place_and_names_its_modules():
    import data_sources
    import dataset_specs

    assert set(data_sources.REGISTRY) >= set(dataset_specs.NAMES)
    for module in data_sources.MODULES:
        spec = module.SPEC
        assert spec.reader.startswith(module.__name__ + ":") and spec.reader_class().dataset_type == spec.name


def test_an_unknown_dataset_is_an_error_naming_the_known_ones(tmp_path, monkeypatch):
    """No silent fallback: a file the release's rule would read as VIST but cannot be VIST, and an
    unknown type, are errors listing every dataset."""
    import dataset_specs
    from dataloader import make_dataset

    data = tmp_path / "my_corpus" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    known = ", ".join(dataset_specs.KNOWN)
    with pytest.raises(ValueError, match=f"cannot tell the dataset of .*train.jsonl.*one of {known}"):
        make_dataset(data, None, None, False)
    monkeypatch.setenv("DATAFOLDER", str(data.parent))
    with pytest.raises(ValueError, match=f"cannot tell the dataset of .*one of {known}"):
        make_dataset("train.jsonl", None, None, False)
    with pytest.raises(ValueError, match=f"unknown dataset type 'COCO'; expected one of {known}"):
        make_dataset(data, None, None, False, dataset_type="COCO")


def test_a_datafolder_without_vist_files_is_not_read_as_vist(tmp_path, monkeypatch):
    """metric.py has no data file: the release's rule on DATAFOLDER falls back to VIST only for a folder
    that names VIST or holds a VIST annotation file; a folder that is not there is an error too."""
    import dataset_specs

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.jsonl").write_text("{}\n")
    monkeypatch.setenv("DATAFOLDER", str(tmp_path / "mine"))
    with pytest.raises(ValueError, match="DATAFOLDER=.*mine.*holds no VIST annotation file.*interleaved"):
        dataset_specs.resolve_dataset_type()
    monkeypatch.setenv("DATAFOLDER", str(tmp_path / "no_such_folder"))
    with pytest.raises(ValueError, match="DATAFOLDER=.*no_such_folder.*there is no such folder.*interleaved"):
        dataset_specs.resolve_dataset_type()
    (tmp_path / "stories").mkdir()
    (tmp_path / "stories" / "test_cleaned.json").write_text("{}")
    monkeypatch.setenv("DATAFOLDER", str(tmp_path / "stories"))
    assert dataset_specs.resolve_dataset_type() == "VIST"            # holds an annotation file
    monkeypatch.setenv("DATAFOLDER", str(tmp_path / "VIST_2024"))
    assert dataset_specs.resolve_dataset_type() == "VIST"            # names VIST (not yet there)
    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "VIST"))
    assert dataset_specs.resolve_dataset_type() == "VIST"
    assert dataset_specs.resolve_dataset_type(dataset_type="interleaved") == "interleaved"


def test_another_prompt_style_renders_each_dialogue(tiny_tokenizer, tiny_config):
    """A dataset given `render` (another LLM family's prompt style) reads each sample's dialogue in it,
    for the model's items and the dump; a test target that is not the answer (CC3M's caption) stays.
    Without it (the release's LLM: `text_style` gives None) the readers' strings are kept."""
    from dataloader import make_dataset
    from dataset_base import text_style

    assert text_style(tiny_config) is None and text_style(None) is None

    def render(dialogue):
        pictures = len(dialogue.target_images)
        return (f"<sys>{dialogue.system}</sys>" + "".join(f"<{m.role}>" for m in dialogue.context),
                " ".join(s.text or "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7]" for s in dialogue.answer.segments)
                + f" <end {pictures}>")

    vist = make_dataset(DATA_FILES["VIST"]["train"], tiny_tokenizer, tiny_config, is_training=True,
                        dataset_type="VIST", feature_folder=False, render=render)
    sample = next(vist.samples())
    assert sample.source == f"<sys>{vist.dataset_spec.system_prompt}</sys><user>"
    assert sample.target.endswith("<end 1>") and "[IMG0]" in sample.target
    item = vist[0]
    assert item["source"] == sample.source and item["target"] == sample.target
    cc3m = make_dataset(DATA_FILES["CC3M"]["test"], tiny_tokenizer, tiny_config, is_training=False,
                        dataset_type="CC3M", feature_folder=False, render=render)
    plain = make_dataset(DATA_FILES["CC3M"]["test"], tiny_tokenizer, tiny_config, is_training=False,
                         dataset_type="CC3M", feature_folder=False)
    for styled, release in zip(cc3m.samples(), plain.samples()):
        assert styled.target == release.target and styled.source == "<sys>None</sys><user>"
