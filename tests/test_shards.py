"""CC3M from WebDataset shards (shards.py, scripts/tsv_to_shards.py): the same samples, prompts,
targets and tensors as the TSV + folder of pictures for the same data; every sample exactly once
over 2 ranks x 2 DataLoader workers; mid-epoch resume; the dump CLI; training from shards gives
the TSV run's losses and weights.

The shards are written here by hand the way img2dataset writes them (`{key}.jpg`, `{key}.txt`,
`{key}.json`, key = the input row zero-padded to 9 digits, 10000 per shard by default), with
webdataset's own TarWriter, independently of scripts/tsv_to_shards.py (which is tested against them).
"""
from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_commands
import dataloader as D
import shards as S
from collator import Collator
from data_problems import ProblemLog

REPO = Path(__file__).resolve().parents[1]
N_ROWS = 205                     # rows 0, 100 and 200 add instruction samples: 208 training samples


pytestmark = pytest.mark.usefixtures("no_data_env")    # no DATAFOLDER / PREPROCESS_FEATURE_FOLDER from the shell


def write_tsv_dataset(root: Path, n_rows: int = N_ROWS) -> Path:
    """`root/cc3m.tsv` + `root/images/*.jpg`: small random pictures, captions with the punctuation
    and case the cleaning changes; a blank line (not a row) after row 2."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    lines = ["caption\timage_path"]
    for row in range(n_rows):
        colour = tuple(rng.randrange(256) for _ in range(3))
        size = (rng.choice([24, 32, 40]), rng.choice([24, 32]))
        Image.new("RGB", size, colour).save(root / "images" / f"{row}.jpg", quality=90)
        lines.append(f"A Picture, No. {row}: colour {colour}!  (#{row})\timages/{row}.jpg")
        if row == 2:
            lines.append("")
    (root / "cc3m.tsv").write_text("\n".join(lines) + "\n")
    return root / "cc3m.tsv"


def write_img2dataset_shards(tsv: Path, out: Path, per_shard: int) -> list[Path]:
    """Shards as img2dataset writes them: raw captions in .txt, pictures as they are, keys = rows."""
    import webdataset as wds

    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line]
    out.mkdir(parents=True)
    paths = []
    for start in range(0, len(rows), per_shard):
        path = out / f"{start // per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as tar:
            for row in range(start, min(start + per_shard, len(rows))):
                caption, image = rows[row]
                key = f"{row:09d}"
                tar.write({"__key__": key, "jpg": (tsv.parent / image).read_bytes(), "txt": caption,
                           "json": json.dumps({"key": key, "caption": caption, "status": "success"})})
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cc3m")
    tsv = write_tsv_dataset(root / "CC3M")
    shards = write_img2dataset_shards(tsv, root / "shards", per_shard=60)       # 4 shards: 60, 60, 60, 25
    return {"tsv": tsv, "shards": shards, "spec": str(root / "shards" / "{00000..00003}.tar"), "root": root}


def dump(argv: list[str]) -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert data_commands.main(argv) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def without_image(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "output_image"} for r in records]


# ----------------------------------------------------------------------------------------------
# The same samples as the TSV
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_dump_of_shards_is_the_dump_of_the_tsv(data, split):
    """The dump CLI on the shards (brace pattern, glob, folder) prints the TSV's samples: task names
    by row (the blank line is not a row), instruction samples every 100th row, prompts, targets;
    each output image is the picture inside its shard."""
    tsv_records = dump([str(data["tsv"]), "--split", split])
    assert len(tsv_records) == N_ROWS + (3 if split == "train" else 0)
    assert [r["task_name"] for r in tsv_records if r["task_name"].endswith("_instruction")] == \
        (["cc3m_0_instruction", "cc3m_100_instruction", "cc3m_200_instruction"] if split == "train" else [])
    folder = str(data["shards"][0].parent)
    for spec in (data["spec"], folder + "/*.tar", folder):
        records = dump([spec, "--split", split])
        assert without_image(records) == without_image(tsv_records), spec
    row_7 = next(r for r in records if r["task_name"] == "cc3m_7")
    assert row_7["output_image"] == f"{data['shards'][0]}/000000007.jpg"


def test_tsv_to_shards_writes_what_img2dataset_writes(data, tmp_path, capsys):
    """scripts/tsv_to_shards.py: keys are the rows, pictures keep their bytes, and the shards dump
    as the TSV does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tsv_to_shards", REPO / "scripts" / "tsv_to_shards.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(data["tsv"]), str(tmp_path / "out"), "--samples_per_shard", "100"]) == 0
    assert "wrote 205 samples in 3 shards" in capsys.readouterr().out
    written = sorted((tmp_path / "out").glob("*.tar"))
    assert [p.name for p in written] == ["00000.tar", "00001.tar", "00002.tar"]
    import tarfile

    with tarfile.open(written[1]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000100.jpg", "000000100.json", "000000100.txt"]
        assert tar.extractfile("000000100.jpg").read() == (data["tsv"].parent / "images" / "100.jpg").read_bytes()
    assert without_image(dump([str(tmp_path / "out")])) == without_image(dump([str(data["tsv"])]))


def test_shard_items_are_the_tsv_items(data, tiny_tokenizer, tiny_config):
    """Model items (token ids, labels, the target picture with its seeded flip) are identical."""
    tsv = D.CC3MDataset(data["tsv"], tokenizer=tiny_tokenizer, cfg=tiny_config, is_training=True)
    shard = S.CC3MShards(data["spec"], tokenizer=tiny_tokenizer, cfg=tiny_config, is_training=True)
    assert len(shard) == len(tsv) == N_ROWS + 3
    for dataset in (tsv, shard):
        dataset.set_epoch(3)
    expected = {tsv[i]["task_name"]: tsv[i] for i in range(len(tsv))}
    seen = 0
    for item in shard.items(np.arange(0, len(shard), 7)):
        other = expected[item["task_name"]]
        for key in ("source", "target", "caption", "input_ids", "labels", "output_image", "input_images"):
            value = item[key]
            assert torch.equal(value, other[key]) if torch.is_tensor(value) else value == other[key], key
        seen += 1
    assert seen == len(range(0, len(shard), 7))


# ----------------------------------------------------------------------------------------------
# Split over ranks and workers, and resume
# ----------------------------------------------------------------------------------------------

def epoch_batches(dataset, world: int, workers: int, batch_size: int, collate, rank: int) -> list[list[str]]:
    batches = S.ShardBatches(dataset, batch_size, collate, workers, world, rank=rank)
    loader = S.ShardLoader(batches, num_workers=workers)
    return [batch["task_names"] for batch in loader]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_deliver_every_sample_once(data, tiny_tokenizer, tiny_config, shuffle):
    """2 ranks x 2 worker processes, batch 3: every training sample exactly once per epoch, the same
    number of batches on both ranks (DDP would hang otherwise), no batch larger than 3. With
    --shuffle, another order each epoch, the same order for the same epoch."""
    dataset = S.CC3MShards(data["spec"], tokenizer=tiny_tokenizer, cfg=tiny_config, shuffle=shuffle)
    all_names = sorted(s.task_name for s in dataset.samples())
    collate = Collator(tiny_tokenizer)
    orders = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        per_rank = [epoch_batches(dataset, 2, 2, 3, collate, rank) for rank in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == len(S.ShardBatches(dataset, 3, collate, 2, 2))
        assert all(0 < len(b) <= 3 for rank in per_rank for b in rank)
        names = [name for rank in per_rank for batch in rank for name in batch]
        assert sorted(names) == all_names                     # no duplicate, no loss
        orders.append(names)
    dataset.set_epoch(1)
    again = [name for rank in (0, 1) for batch in epoch_batches(dataset, 2, 2, 3, collate, rank) for name in batch]
    assert again == orders[1]
    assert (orders[0] != orders[1]) == shuffle


def test_a_split_that_would_repeat_or_drop_samples_is_refused():
    """Batch 1 with an odd count over 2 ranks cannot give both ranks the same number of batches."""
    with pytest.raises(D.DataError, match="use a batch size of 2 or more"):
        S.make_plan(7, np.arange(7), world=2, workers=1, batch_size=1)
    plan = S.make_plan(7, np.arange(7), world=2, workers=1, batch_size=2)
    assert plan.batches == [[[2, 1]], [[2, 2]]]
    assert S.batch_sizes(10, 3, 4) == [4, 4, 2]


@pytest.mark.parametrize("shuffle", [False, True])
def test_mid_epoch_resume_continues_with_the_next_batch(data, tiny_tokenizer, tiny_config, shuffle):
    """A loader stopped after c batches (its state as Lightning saves it) and a fresh one loaded
    with that state deliver together exactly the uninterrupted epoch, batch by batch, with 3
    workers whose batch counts differ; a state from another worker count is refused."""
    dataset = S.CC3MShards(data["spec"], tokenizer=tiny_tokenizer, cfg=tiny_config, shuffle=shuffle)
    collate = Collator(tiny_tokenizer)
    dataset.set_epoch(2)

    def loader():
        return S.ShardLoader(S.ShardBatches(dataset, 23, collate, 3, 1), num_workers=3)

    full = [b["task_names"] for b in loader()]
    assert S.ShardBatches(dataset, 23, collate, 3, 1).batches_per_worker == [3, 3, 4]
    for stop in (1, 5):
        first = loader()
        done = []
        for batch in first:
            done.append(batch["task_names"])
            if len(done) == stop:
                break
        first.done_batches = lambda: stop
        state = first.state_dict()
        dataset.set_epoch(0)                             # the resumed run's dataset starts elsewhere
        second = loader()
        second.load_state_dict(state)
        assert dataset.epoch == 2
        assert done + [b["task_names"] for b in second] == full, stop
    finished = loader()
    finished.done_batches = lambda: len(full)
    resumed = loader()
    resumed.load_state_dict(finished.state_dict())        # saved at the epoch's end: nothing skipped
    assert [b["task_names"] for b in resumed] == full
    other = S.ShardLoader(S.ShardBatches(dataset, 23, collate, 1, 1), num_workers=0)
    with pytest.raises(D.DataError, match="--num_workers"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Shard specs and bad shards
# ----------------------------------------------------------------------------------------------

def test_shard_specs_and_their_errors(data, tmp_path, monkeypatch):
    folder = data["shards"][0].parent
    assert S.expand_shards(data["spec"]) == data["shards"]
    assert S.expand_shards(f"{folder}/0000[0-1].tar") == data["shards"][:2]
    assert S.expand_shards(folder) == data["shards"]
    monkeypatch.setenv("DATAFOLDER", str(folder.parent))
    assert S.is_shard_spec("shards") and S.resolve_shards("shards/{00002..00003}.tar") == data["shards"][2:]
    assert not S.is_shard_spec(data["tsv"])
    with pytest.raises(FileNotFoundError, match=r"1 of the 5 shards .* do not exist.*00004\.tar"):
        S.expand_shards(str(folder / "{00000..00004}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        S.expand_shards(str(folder / "x*.tar"))


def test_bad_shard_samples(tmp_path, caplog):
    """A key that is not a row number is an error naming shard and key; a sample without caption
    is counted at indexing; an empty caption is skipped and counted when streamed."""
    import webdataset as wds

    jpg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpg, format="JPEG")
    with wds.TarWriter(str(tmp_path / "a.tar")) as tar:
        tar.write({"__key__": "000000000", "jpg": jpg.getvalue(), "txt": "a cat"})
        tar.write({"__key__": "000000001", "jpg": jpg.getvalue()})
        tar.write({"__key__": "000000002", "jpg": jpg.getvalue(), "txt": " ... "})
        tar.write({"__key__": "000000003", "jpg": jpg.getvalue(), "txt": "a dog"})
    dataset = S.CC3MShards(tmp_path / "a.tar", is_training=False)
    assert len(dataset) == 3
    assert [s.task_name for s in dataset.samples()] == ["cc3m_0", "cc3m_3"]
    assert dataset.problems.counts == {"no caption (.txt) in the shard sample": 1, "empty caption": 1}
    with pytest.raises(D.DataError, match="no caption"):
        S.CC3MShards(tmp_path / "a.tar", is_training=False, strict=True)
    with wds.TarWriter(str(tmp_path / "b.tar")) as tar:
        tar.write({"__key__": "cat_7", "jpg": jpg.getvalue(), "txt": "a cat"})
    with pytest.raises(D.DataError, match=r"b\.tar: sample key 'cat_7' is not a row number"):
        S.CC3MShards(tmp_path / "b.tar")


def test_shard_captions_and_pictures_over_the_caps(tmp_path, monkeypatch, tiny_tokenizer, tiny_config):
    """config/limits.yaml applies to shards: an over-long caption file or text is skipped and counted,
    a picture over max_image_pixels is dropped from its batch without being decoded."""
    import webdataset as wds

    limits = tmp_path / "limits.yaml"
    limits.write_text("max_row_bytes: 40\nmax_text_chars: 12\nmax_image_pixels: 100\n")
    monkeypatch.setenv("MINIGPT5_LIMITS", str(limits))
    small, big = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, format="JPEG")
    Image.new("RGB", (16, 16)).save(big, format="JPEG")
    with wds.TarWriter(str(tmp_path / "a.tar")) as tar:
        tar.write({"__key__": "000000000", "jpg": small.getvalue(), "txt": "a cat"})
        tar.write({"__key__": "000000001", "jpg": small.getvalue(), "txt": "x" * 41})
        tar.write({"__key__": "000000002", "jpg": small.getvalue(), "txt": "a very long cat"})
        tar.write({"__key__": "000000003", "jpg": big.getvalue(), "txt": "a big dog"})
    dataset = S.CC3MShards(tmp_path / "a.tar", tiny_tokenizer, tiny_config, is_training=False)
    assert [s.task_name for s in dataset.samples()] == ["cc3m_0", "cc3m_3"]
    items = list(dataset.items(np.arange(len(dataset))))
    assert [item["task_name"] if item else None for item in items] == ["cc3m_0", None, None, None]
    assert dataset.problems.counts["caption (.txt) longer than max_row_bytes (40 bytes; config/limits.yaml)"] == 2
    assert dataset.problems.counts["text longer than max_text_chars (12; config/limits.yaml)"] == 2
    assert dataset.problems.counts["unreadable image"] == 1


# ----------------------------------------------------------------------------------------------
# Training from shards
# ----------------------------------------------------------------------------------------------

def train_run(argv: list[str], env: dict) -> None:
    """`python train_eval.py ARGV` in this process with these environment variables; leaves no
    random state behind."""
    import train_eval

    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        for key in ("IS_STAGE2", "WEIGHTFOLDER", "DATAFOLDER", "OUTPUT_FOLDER", "PREPROCESS_FEATURE_FOLDER"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, str(value))
        mp.setenv("PL_GLOBAL_SEED", "42")
        state = random.getstate(), np.random.get_state()
        try:
            train_eval.main(argv)
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def test_stage1_from_shards_trains_as_from_the_tsv(tiny_config_path, tmp_path):
    """train_eval.py with --train_data_path naming shards (relative to DATAFOLDER, as the release's
    flags) gives the TSV run's losses step by step and its weights, in the release's key layout."""
    import csv
    import importlib.util

    spec = importlib.util.spec_from_file_location("tsv_to_shards", REPO / "scripts" / "tsv_to_shards.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cc3m = REPO / "datasets" / "CC3M"
    script.convert(cc3m / "cc3m_train.tsv", tmp_path / "CC3M" / "shards", samples_per_shard=4)
    argv = ["--is_training", "--model_config", str(tiny_config_path), "--accelerator", "cpu", "--num_workers", "0",
            "--per_device_train_batch_size", "2", "--real_batch_size", "2", "--warmup_steps", "1",
            "--learning_rate", "1e-3", "--max_steps", "3", "--model_save_name", "run"]
    runs = {"tsv": (cc3m, "cc3m_train.tsv"), "shards": (tmp_path / "CC3M", "shards/{00000..00001}.tar")}
    losses, states = {}, {}
    for name, (folder, data) in runs.items():
        out = tmp_path / name
        train_run(argv + ["--train_data_path", data], {"DATAFOLDER": folder, "WEIGHTFOLDER": out})
        with open(next(out.glob("logs/version_*/metrics.csv"))) as f:
            losses[name] = [row["train_loss"] for row in csv.DictReader(f) if row.get("train_loss")]
        states[name] = torch.load(out / "run-last.ckpt", weights_only=False)["state_dict"]
    assert len(losses["tsv"]) == 3 and losses["shards"] == losses["tsv"]
    assert states["shards"].keys() == states["tsv"].keys()
    assert all(torch.equal(states["shards"][k], states["tsv"][k]) for k in states["tsv"])


def test_benchmark_dry_run_writes_its_report(tmp_path, tiny_config_path):
    """benchmarks/bench_shards.py on a tiny workload (CI): it runs both loaders over every sample and
    writes its section (no figure is checked: the dry run's timings mean nothing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_shards", REPO / "benchmarks" / "bench_shards.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry_run", "--model_config", str(tiny_config_path), "--out", str(tmp_path / "section.md")]) == 0
    text = (tmp_path / "section.md").read_text()
    assert text.startswith(bench.SECTION) and "DRY RUN" in text
    assert "samples/s" in text and "memory per worker" in text and "65 stage-1 training samples" in text


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_fast_header_reader_agrees_with_tarfile(tmp_path, fmt):
    """The index's header reader gives tarfile's member names and offsets (pax records, GNU long
    names, ustar prefixes, folders); a compressed shard (no byte offsets to start from) is refused."""
    import tarfile

    formats = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}
    path = tmp_path / "a.tar"
    deep = "d" * 60 + "/" + "e" * 60
    with tarfile.open(path, "w", format=formats[fmt]) as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(["000000001.jpg", "000000001.txt", f"{deep}/000000002.jpg", f"{deep}/000000002.txt"]):
            info = tarfile.TarInfo(name)
            data = bytes([i]) * (700 * i + 3)
            info.size = len(data)
            if fmt == "pax":
                info.pax_headers = {"comment": "é" * 3}
            tar.addfile(info, io.BytesIO(data))
    assert S._plain_members(path) == S._tarfile_members(path)
    assert [name for name, _ in S._plain_members(path)][2].startswith(deep)
    index = S.index_shards([path], ProblemLog())
    assert index.rows.tolist() == [1, 2]
    import gzip

    (tmp_path / "b.tar").write_bytes(gzip.compress(path.read_bytes()))
    assert S._plain_members(tmp_path / "b.tar") is None
    with pytest.raises(D.DataError, match=r"b\.tar: not a readable uncompressed tar file"):
        S.index_shards([tmp_path / "b.tar"], ProblemLog())


def test_tsv_to_shards_refuses_pictures_outside_the_dataset_folder(tmp_path):
    """As the TSV reader: a row whose image path leaves the folder is left out and counted, unless
    allow_outside_paths."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tsv_to_shards", REPO / "scripts" / "tsv_to_shards.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "in.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "out.jpg")
    (tmp_path / "data" / "c.tsv").write_text("caption\timage_path\na cat\tin.jpg\na dog\t../out.jpg\n")
    assert script.convert(tmp_path / "data" / "c.tsv", tmp_path / "s1")["samples"] == 1
    assert script.convert(tmp_path / "data" / "c.tsv", tmp_path / "s2", allow_outside_paths=True)["samples"] == 2
