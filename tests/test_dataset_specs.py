"""dataset_specs.py: one registry that every consumer reads, one resolver of the dataset type, task
names that the readers write and metric.py reads back by the same rules."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

import dataloader
import dataset_base
import dataset_specs as S
import metric
import shards

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
TEST_FILES = {"CC3M": DATASETS / "CC3M" / "cc3m_val.tsv", "VIST": DATASETS / "VIST" / "val_cleaned.json",
              "MMDialog": DATASETS / "MMDialog" / "test" / "test_conversations.txt"}


pytestmark = pytest.mark.usefixtures("no_data_env")    # no DATAFOLDER / PREPROCESS_FEATURE_FOLDER from the shell


def test_every_spec_names_a_reader_and_a_scorer_of_its_own_dataset():
    assert set(S.SPECS) == set(S.NAMES) == {"CC3M", "VIST", "MMDialog"}
    for name, spec in S.SPECS.items():
        reader = spec.reader_class()
        assert issubclass(reader, dataset_base.MiniGPT5Dataset) and reader.dataset_type == name
        assert spec.scorer_function().__module__ == "metric"
        assert spec.fid_real in ("cc3m_val", "targets") and 0 < spec.val_check_interval <= 1
        assert set(spec.evaluated or ()) <= set(spec.task_suffixes)
    assert S.spec("CC3M").reader_class(shards=True) is shards.CC3MShards
    with pytest.raises(ValueError, match="cannot be read from WebDataset shards"):
        S.spec("VIST").reader_class(shards=True)


@pytest.mark.parametrize("split", ["train", "test"])
def test_readers_write_task_names_of_their_spec_and_split_task_reads_them(split, tiny_tokenizer):
    """Each sample's task name is `{group}_{step}{suffix}` with a suffix of its spec, and
    `split_task` (metric.py's grouping) gives back the group and step."""
    for name, path in TEST_FILES.items():
        spec = S.spec(name)
        dataset = spec.reader_class()(path, tokenizer=tiny_tokenizer, is_training=split == "train",
                                      feature_folder=False)
        kinds = set()
        for sample in dataset.samples():
            kind = max((k for k, s in spec.task_suffixes.items() if sample.task_name.endswith(s)),
                       key=lambda k: len(spec.task_suffixes[k]))
            kinds.add(kind)
            group, step = S.split_task(sample.task_name)
            assert spec.task_name(group, step, kind) == sample.task_name
        assert kinds == (set(spec.task_suffixes) if split == "train" or name == "MMDialog"
                         else {"caption"} if name == "CC3M" else {"generation"}), name
        # metric.py scores the kinds the spec says (VIST: the generation samples only)
        evaluated = {k for k in kinds if spec.is_evaluated(spec.task_name("g", 1, k))}
        assert evaluated == (set(spec.evaluated) & kinds if spec.evaluated else kinds)


def test_resolver_rules_and_their_log(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dataset_specs")
    assert S.resolve_dataset_type("x.tsv", "mmdialog") == "MMDialog"            # explicit, any case
    with pytest.raises(ValueError, match="unknown dataset type 'COCO'; expected one of CC3M, VIST, MMDialog"):
        S.resolve_dataset_type("x/CC3M/y.tsv", "COCO")
    assert S.resolve_dataset_type("data/MMDialog/test.txt") == "MMDialog"       # the data file's path
    assert "from the data file's path (DATAFOLDER is not set)" in caplog.text
    monkeypatch.setenv("DATAFOLDER", "/data/VIST_stories")
    caplog.clear()
    assert S.resolve_dataset_type("/data/CC3M/y.tsv") == "VIST"                # DATAFOLDER wins, as the release
    assert "from DATAFOLDER: '/data/VIST_stories' contains neither 'CC3M' nor 'MMDialog'" in caplog.text
    monkeypatch.setenv("DATAFOLDER", "/data/my_stories")        # the release read it as VIST; no sign of VIST here
    with pytest.raises(ValueError, match="cannot tell the dataset of '/data/CC3M/y.tsv'.*one of CC3M, VIST"):
        S.resolve_dataset_type("/data/CC3M/y.tsv")
    with pytest.raises(ValueError, match="DATAFOLDER='/data/my_stories'.*there is no such folder"):
        S.resolve_dataset_type()
    monkeypatch.setenv("DATAFOLDER", "/data/CC3M_MMDialog")
    assert S.resolve_dataset_type() == "CC3M"                                   # the release's order
    monkeypatch.delenv("DATAFOLDER")
    assert S.resolve_dataset_type() == "CC3M"                                   # the default DATAFOLDER


def test_dataloader_and_metric_cli_use_the_same_names():
    parsed = metric.parse_args(["--pred_folder", "x", "--dataset", "MMDialog"])
    assert parsed.dataset == "MMDialog"
    assert dataloader.DATASET_TYPES == metric.DATASETS == S.NAMES
    with pytest.raises(SystemExit):
        metric.parse_args(["--pred_folder", "x", "--dataset", "COCO"])


def test_one_rule_for_paths_given_to_flags(tmp_path, monkeypatch):
    """Data files, shards and checkpoints are all looked for under their folder (DATAFOLDER /
    WEIGHTFOLDER, as the release joined them), then as given; absolute paths are themselves."""
    import constants

    folder, here = tmp_path / "folder", tmp_path / "cwd"
    for root in (folder, here):
        (root / "shards").mkdir(parents=True)
        (root / "both.json").write_text("{}")
        (root / "shards" / "00000.tar").write_bytes(b"")
    (here / "only_here.json").write_text("{}")
    monkeypatch.chdir(here)
    monkeypatch.setenv("DATAFOLDER", str(folder))
    monkeypatch.setenv("WEIGHTFOLDER", str(folder))
    assert constants.find_data("both.json") == folder / "both.json"            # the folder first
    assert constants.find_data("only_here.json") == Path("only_here.json")      # then as given
    assert constants.find_weight("both.json") == folder / "both.json"
    assert constants.find_data(here / "both.json") == here / "both.json"        # absolute: itself
    assert shards.resolve_shards("shards/{00000..00000}.tar") == [folder / "shards" / "00000.tar"]
    assert shards.is_shard_spec("shards")
    with pytest.raises(FileNotFoundError, match=r"--test_weight 'x.ckpt' not found: looked at '.*folder/x.ckpt' and "
                                                r"'x.ckpt' \(WEIGHTFOLDER="):
        constants.find_weight("x.ckpt", "--test_weight")


def test_the_data_layer_builds_no_model():
    """Importing the data layer and reading a dataset loads no model code: the datasets need a
    tokenizer and transforms only (the feature cache, which runs the encoders, is data_commands.py)."""
    import subprocess
    import sys

    code = ("import sys, dataloader, shards, dataset_specs, prompts, image_transforms\n"
            "dataloader.make_dataset(sys.argv[1], None, None, False)\n"
            "print(sorted(m for m in ('model', 'weights', 'minigpt4', 'lavis', 'diffusers', 'transformers', "
            "'data_commands') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(TEST_FILES["VIST"])], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
