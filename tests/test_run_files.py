"""A run's own files (run_files.py, predictions.py's folder, train_eval.py's checks):

- every resume file is read through the project's one loading rule, whatever the strategy and the
  environment (a crafted pickle never runs);
- every checkpoint write is atomic: a failed write leaves the previous file byte for byte, and says
  so in one line;
- a run never writes into another run's files unless asked (`--overwrite`), concurrent or one after
  another; `--resume last` finds this run's own file by the rule it writes with;
- a resumed run has the checkpoint's settings, or says which differ (`--resume_allow_changes`), and
  then trains with the values it records;
- a prediction folder holds one run's predictions, listed in its manifest, which metric.py checks;
- bad input gives one line naming the file, variable or flag, before any model loads.

Most checks stop before a model is built (`no_model`); the few runs are one optimiser step each on
the tiny preset.
"""
from __future__ import annotations

import csv
import errno
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import predictions
import run_files
from test_train_eval import DATASETS, common, run_main

pytestmark = pytest.mark.usefixtures("no_data_env")


def train_argv(config: Path, *more: str) -> list[str]:
    return ["--is_training", "--train_data_path", "cc3m_train.tsv", "--model_config", str(config),
            "--accelerator", "cpu", *more]


def resumable(path: Path, **settings) -> Path:
    """A file with what a resumable Lightning checkpoint holds (no tensors), and `settings` recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "optimizer_states": [], "lr_schedulers": [], "loops": {}, "global_step": 1,
                "hyper_parameters": {"settings": settings} if settings else {}}, path)
    return path


class PlantsAMarker:
    """Unpickling this runs `exec`, which writes a marker file (what a malicious file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "optimizer_states": [], "lr_schedulers": [], "loops": {}, "global_step": 1,
                "hyper_parameters": {"x": PlantsAMarker(marker)}}, path)
    return path


# ----------------------------------------------------------------------------------------------
# Resume files: one loading rule
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("force_pickle", [False, True])
@pytest.mark.parametrize("strategy", ["auto", "fsdp"])
def test_a_crafted_resume_file_never_runs(strategy, force_pickle, tiny_config_path, tmp_path, no_model, monkeypatch):
    """With TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 torch unpickles anything a caller does not explicitly
    refuse: the resume file is read once, explicitly weights-only, and refused before a model loads."""
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "CC3M"))
    monkeypatch.setenv("WEIGHTFOLDER", str(tmp_path / "w"))
    if force_pickle:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import train_eval

    with pytest.raises(SystemExit) as error:
        train_eval.main(train_argv(tiny_config_path, "--strategy", strategy, "--resume", str(evil)))
    message = str(error.value)
    assert message.startswith("error: --resume refused to load") and str(evil) in message and "exec" in message
    assert "\n" not in message and not marker.exists()


@pytest.mark.parametrize("force_pickle", [False, True])
def test_fsdp_strategy_loads_through_the_one_rule(force_pickle, tmp_path, monkeypatch):
    """The FSDP strategy's own `load_checkpoint` (which Lightning calls with the resume path) reads
    through the same rule, whatever checkpoint_io it was given."""
    import strategies

    if force_pickle:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    strategy = strategies.release_layout_fsdp()
    with pytest.raises(run_files.RunFileError, match="refused to load"):
        strategy.load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (b"", "the file is empty"),
    (None, "truncated or damaged"),
    ("weights only", "not a checkpoint training can resume from .* --stage1_weight"),
])
def test_a_bad_resume_file_is_one_line_naming_it(content, message, tiny_config_path, tmp_path, no_model, monkeypatch):
    import train_eval

    path = tmp_path / "bad.ckpt"
    if content is None:                       # a real checkpoint cut in half
        resumable(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "weights only":
        torch.save({"state_dict": {"fc.0.weight": torch.zeros(2)}}, path)
    else:
        path.write_bytes(content)
    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "CC3M"))
    with pytest.raises(SystemExit, match=message) as error:
        train_eval.main(train_argv(tiny_config_path, "--output_dir", str(tmp_path / "out"), "--resume", str(path)))
    assert str(error.value).startswith(f"error: --resume {path}") and "\n" not in str(error.value)


def test_resume_last_is_this_runs_own_file(tiny_config_path, tmp_path, monkeypatch):
    """`--resume last` reads `<output_dir>/<name>-last.ckpt` by the rule the run writes with: another
    run's newer file of the same prefix is not taken, a missing one is an error naming the expected
    file, and a relative --output_dir is the working directory's, not a folder under WEIGHTFOLDER
    (it once resumed another run's file there, and the run then wrote over its own)."""
    import train_eval

    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "CC3M"))
    monkeypatch.setenv("WEIGHTFOLDER", str(tmp_path / "weights"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run_other-last.ckpt").write_bytes(b"another run")
    (tmp_path / "runs" / "run_0-3.ckpt").write_bytes(b"this run's best")
    argv = train_argv(tiny_config_path, "--model_save_name", "run_{epoch}-{step}", "--output_dir", "runs",
                      "--resume", "last")
    with pytest.raises(SystemExit, match=r"runs/run-last\.ckpt' does not exist"):
        train_eval.check_inputs(train_eval.parse_args(argv))
    resumable(tmp_path / "weights" / "runs" / "run-last.ckpt")        # another run's, under WEIGHTFOLDER
    with pytest.raises(SystemExit, match=r"runs/run-last\.ckpt' does not exist"):
        train_eval.check_inputs(train_eval.parse_args(argv))
    resumable(tmp_path / "runs" / "run-last.ckpt")
    paths = train_eval.check_inputs(train_eval.parse_args(argv))
    assert paths["resume"] == Path("runs") / "run-last.ckpt"
    assert paths["run"].model_save_name == "run_{epoch}-{step}"         # continues its own name
    paths["run"].release()


# ----------------------------------------------------------------------------------------------
# Run names: never another run's files
# ----------------------------------------------------------------------------------------------

def test_a_name_another_run_wrote_or_holds_gets_a_version(tiny_config_path, tmp_path, no_model, monkeypatch, capsys):
    """Checked before a model loads: a name whose checkpoints an earlier run left gets `-v1` (said on
    stdout, with how to resume it); a name a running run holds (its lock) does too, even before that
    run wrote anything; `--overwrite` deletes the earlier run's checkpoints of the name and takes it,
    but never a running run's; other names' files (even `-v1`'s) are not touched."""
    import train_eval

    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "CC3M"))
    out = tmp_path / "out"
    argv = train_argv(tiny_config_path, "--model_save_name", "run_{epoch}-{step}", "--output_dir", str(out))
    claim = lambda *more: train_eval.check_inputs(train_eval.parse_args(argv + list(more)))["run"]

    first = claim()
    assert first.model_save_name == "run_{epoch}-{step}"
    second = claim()                                     # the first still runs (holds the name): concurrent
    assert second.model_save_name == "run_{epoch}-{step}-v1"
    assert second.last_path == out / "run-v1-last.ckpt" and second.step_name == "run-v1-step{step}"
    with pytest.raises(SystemExit, match="another run .* is writing the checkpoints 'run_{epoch}-{step}'"):
        train_eval.main(argv + ["--overwrite"])
    first.release(), second.release()

    for name in ("run_0-4.ckpt", "run-last.ckpt", "run-step4.ckpt", "run_0-2-v1.ckpt", "run-v1-last.ckpt",
                 "run_other-last.ckpt"):
        (out / name).write_bytes(name.encode())
    capsys.readouterr()
    third = claim()                                      # one after another: run's and run-v1's files are there
    assert third.model_save_name == "run_{epoch}-{step}-v2"
    said = capsys.readouterr().out
    assert "this run writes as 'run_{epoch}-{step}-v2'" in said and "--model_save_name 'run_{epoch}-{step}-v2' " \
        "--resume last" in said
    third.release()

    overwriting = claim("--overwrite")
    assert overwriting.model_save_name == "run_{epoch}-{step}"
    assert "deleted the 3 checkpoint(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["run-v1-last.ckpt", "run_0-2-v1.ckpt",
                                                          "run_other-last.ckpt"]
    overwriting.release()


def test_an_output_dir_that_cannot_be_written_fails_before_loading(tiny_config_path, tmp_path, no_model,
                                                                   monkeypatch):
    import train_eval

    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "CC3M"))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match=r"--output_dir '.*a_file/out' cannot be written"):
        train_eval.main(train_argv(tiny_config_path, "--output_dir", str(tmp_path / "a_file" / "out")))


def test_only_global_rank_zero_claims(monkeypatch):
    for name in run_files.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert run_files.is_global_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "0")
    assert run_files.is_global_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")                # Lightning's launch of the second process
    assert not run_files.is_global_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not run_files.is_global_rank_zero()


# ----------------------------------------------------------------------------------------------
# Atomic checkpoint writes
# ----------------------------------------------------------------------------------------------

def fail_half_way(monkeypatch, code: int = errno.ENOSPC) -> None:
    """Every write of a checkpoint gets half its bytes to the disk, then the disk is full."""
    real = run_files._Writer.write

    def half(self, data):
        real(self, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Permission denied")

    monkeypatch.setattr(run_files._Writer, "write", half)


@pytest.mark.parametrize("code,advice", [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "is not writable")])
def test_a_failed_checkpoint_write_leaves_the_previous_file(code, advice, tiny_model, tmp_path, monkeypatch):
    """Through Lightning: `trainer.save_checkpoint` with the run's CheckpointIO. A write that fails
    half-way leaves the previous checkpoint byte for byte, no partial file beside it, and one line
    naming the file and what to do."""
    import pytorch_lightning as pl

    import train_eval

    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_progress_bar=False,
                         plugins=[train_eval.RunCheckpointIO()])
    trainer.strategy.connect(tiny_model)
    path = tmp_path / "run-last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    fail_half_way(monkeypatch, code)
    with pytest.raises(run_files.WriteError) as error:
        trainer.save_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"could not write {path}: ") and advice in message and "unchanged" in message
    assert "\n" not in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["run-last.ckpt"]


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    from model import MiniGPT5_Model

    return MiniGPT5_Model(tiny_config, stage=1).eval()


# ----------------------------------------------------------------------------------------------
# Resuming with other settings; a run of the same name after another; a full disk in a run
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, tiny_config_path):
    """One stage-1 step on the CC3M samples (learning rate 1e-4, seed 42), name "r"."""
    root = tmp_path_factory.mktemp("one_step")
    env = {"DATAFOLDER": DATASETS / "CC3M", "WEIGHTFOLDER": root / "w", "OUTPUT_FOLDER": root / "o"}
    base = ["--is_training", "--train_data_path", "cc3m_train.tsv", "--model_save_name", "r",
            *common(tiny_config_path)]
    run_main(base + ["--max_steps", "1"], env)
    return root, env, base


@pytest.mark.parametrize("change,env_change,differences", [
    (["--learning_rate", "1e-3", "--seed", "7"], {}, ["learning_rate (--learning_rate): checkpoint 0.0001, this run "
                                                       "0.001", "seed (--seed): checkpoint 42, this run 7"]),
    (["--train_data_path", "cc3m_val.tsv"], {}, ["train_data_path (--train_data_path)"]),
    (["--stage1_weight", "r-last.ckpt"], {"IS_STAGE2": "True"}, ["stage (IS_STAGE2): checkpoint 1, this run 2"]),
    (["--num_train_epochs", "3"], {}, ["num_train_epochs (--num_train_epochs): checkpoint 2, this run 3"]),
])
def test_resuming_with_other_settings_is_refused_before_loading(one_step_run, change, env_change, differences,
                                                                no_model):
    root, env, base = one_step_run
    argv = base + ["--max_steps", "2", "--resume", "last"]
    for flag in change[::2]:
        if flag in argv:
            at = argv.index(flag)
            del argv[at:at + 2]
    with pytest.raises(SystemExit, match="was trained with other settings than this run's") as error:
        run_main(argv + change, {**env, **env_change})
    message = str(error.value)
    assert "\n" not in message and all(d in message for d in differences), message
    assert ("the stage cannot change on resume" in message) == ("IS_STAGE2" in env_change)


def test_allowed_changes_are_used_and_recorded_and_a_full_disk_keeps_the_last_checkpoint(one_step_run, monkeypatch):
    """`--resume_allow_changes learning_rate,seed`: the resumed step trains with the new learning
    rate (Lightning restored the checkpoint's with the optimiser state), which the new checkpoint
    records in its settings and its optimiser state; the log says the seed changed. Every file the
    run loads goes through the weights-only reader. Then a resumed run whose checkpoint write fails
    (a full disk) ends with one line, and the last checkpoint is byte for byte the previous one."""
    from settings import read_settings

    import weights

    root, env, base = one_step_run
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    argv = [a for a in base if a not in ("--learning_rate", "1e-4")]   # common() gives 1e-4
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", recording_load)
        log = run_main(argv + ["--learning_rate", "1e-3", "--seed", "7", "--max_steps", "2", "--resume", "last",
                               "--resume_allow_changes", "learning_rate,seed"], env)
    assert loads and all(w is True for w in loads), loads
    assert "resuming with changed settings (--resume_allow_changes)" in log
    assert "resuming with --seed 7, but the checkpoint was trained with --seed 42" in log
    last = root / "w" / "r-last.ckpt"
    checkpoint = weights.load_untrusted(last, "checkpoint")
    assert checkpoint["global_step"] == 2
    settings = read_settings(checkpoint)
    assert (settings.learning_rate, settings.seed) == (1e-3, 7)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([1e-3, 1e-2])   # stage 1: fc & mapper at 10x
    # The learning rates of the resumed step as the run logged them: after the 1-step warm-up, the full
    # new rates (the checkpoint's would be 1e-4 and 1e-3).
    rows = [r for metrics in sorted((root / "w").glob("logs/version_*/metrics.csv"))
            for r in csv.DictReader(open(metrics)) if r.get("lr-AdamW/pg1")]
    assert (int(rows[-1]["step"]), float(rows[-1]["lr-AdamW/pg1"]), float(rows[-1]["lr-AdamW/pg2"])) == \
        (1, pytest.approx(1e-3), pytest.approx(1e-2))

    before = last.read_bytes()
    fail_half_way(monkeypatch)
    with pytest.raises(SystemExit) as error:
        run_main(argv + ["--learning_rate", "1e-3", "--seed", "7", "--max_steps", "3", "--resume", "last"], env)
    message = str(error.value)
    assert message.startswith(f"error: could not write {last}: No space left on device; the disk is full")
    assert "\n" not in message and last.read_bytes() == before
    assert not list((root / "w").glob(".*.partial"))


def test_a_second_run_of_the_same_name_keeps_the_first_runs_checkpoints(one_step_run):
    """One run after another with the same --output_dir and --model_save_name: both exit 0 and both
    runs' checkpoints are there (the second as r-v1)."""
    root, env, base = one_step_run
    folder = root / "w"
    before = {p.name: p.read_bytes() for p in folder.glob("r*.ckpt")}
    log = run_main(base + ["--max_steps", "1", "--seed", "3"], env)
    assert "this run writes as 'r-v1'" in log and f"last checkpoint: {folder / 'r-v1-last.ckpt'}" in log
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert (folder / "r-v1.ckpt").is_file() and (folder / "r-v1-last.ckpt").is_file()


# ----------------------------------------------------------------------------------------------
# One-line errors before a model loads
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["ture", "on", "2", "y", "Treu"])
def test_is_stage2_is_parsed_strictly(value, tiny_config_path, no_model, monkeypatch):
    import train_eval

    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "CC3M"))
    monkeypatch.setenv("IS_STAGE2", value)
    with pytest.raises(SystemExit) as error:
        train_eval.main(train_argv(tiny_config_path))
    assert str(error.value) == f"error: IS_STAGE2={value!r}: expected True/False, yes/no or 1/0 (any case)"


def test_boolean_spellings_are_one_rule(monkeypatch):
    import constants
    import train_eval

    for value, expected in (("True", True), ("TRUE", True), ("yes", True), ("1", True), ("False", False),
                            ("no", False), ("0", False), (" true ", True), ("", False)):
        monkeypatch.setenv("IS_STAGE2", value)
        assert constants.is_stage2() is expected, value
    monkeypatch.delenv("IS_STAGE2")
    assert constants.is_stage2() is False
    assert train_eval.parse_args(["--snr_loss", "no"]).snr_loss is False
    with pytest.raises(SystemExit):
        train_eval.parse_args(["--snr_loss", "ture"])


@pytest.mark.parametrize("value", ["abc", "0,x", "-1", "0,0", ""])
def test_gpus_must_be_device_ids(value, capsys):
    import train_eval

    with pytest.raises(SystemExit):
        train_eval.parse_args(["--gpus", value])
    assert f"argument --gpus: expected device ids such as 0 or 0,1,2,3" in capsys.readouterr().err


def test_a_bad_tsv_header_is_one_line_naming_the_file(tiny_config_path, tmp_path, no_model, monkeypatch):
    import train_eval

    (tmp_path / "CC3M").mkdir()
    (tmp_path / "CC3M" / "bad.tsv").write_text("text\tpicture\na cat\timages/0.jpg\n")
    monkeypatch.setenv("DATAFOLDER", str(tmp_path / "CC3M"))
    with pytest.raises(SystemExit) as error:
        train_eval.main(["--is_training", "--train_data_path", "bad.tsv", "--model_config", str(tiny_config_path),
                         "--output_dir", str(tmp_path / "out")])
    message = str(error.value)
    assert message.startswith(f"error: {tmp_path / 'CC3M' / 'bad.tsv'}:1: the header has no column"), message
    assert "\n" not in message


def test_a_truncated_shard_is_one_line_naming_it(tiny_config_path, tmp_path, no_model, monkeypatch):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    from tsv_to_shards import convert

    import train_eval

    convert(DATASETS / "CC3M" / "cc3m_train.tsv", tmp_path / "shards", samples_per_shard=4)
    shard = tmp_path / "shards" / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(tarfile.TarError):
        tarfile.open(shard).getmembers()
    monkeypatch.setenv("DATAFOLDER", str(tmp_path))
    with pytest.raises(SystemExit) as error:
        train_eval.main(["--is_training", "--train_data_path", "shards/{00000..00001}.tar", "--model_config",
                         str(tiny_config_path), "--output_dir", str(tmp_path / "out"), "--num_workers", "0"])
    message = str(error.value)
    assert message.startswith(f"error: {shard}: not a readable uncompressed tar file") and "\n" not in message


def test_an_error_from_a_loader_worker_is_its_own_last_line():
    import train_eval

    wrapped = ValueError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\ndataloader.DataError: /d/s.tar: ended before row 3")
    assert train_eval.one_line(wrapped) == "/d/s.tar: ended before row 3"


# ----------------------------------------------------------------------------------------------
# Prediction folders: one run's files, listed in a manifest that metric.py checks
# ----------------------------------------------------------------------------------------------

def records(n: int, prefix: str = "cc3m") -> list:
    return [predictions.PredictionRecord(f"in {i}", f"out {i}", f"gt {i}", None, None, None, f"{prefix}_{i}")
            for i in range(n)]


def test_a_prediction_folder_with_an_earlier_runs_files_is_refused_or_overwritten(tmp_path, capsys):
    folder = tmp_path / "pred"
    predictions.save(records(2), folder / "predictions-0.pt")
    predictions.save(records(2), folder / "predictions-1.pt")
    (folder / "cc3m_0").mkdir()
    (folder / "cc3m_0" / "generated.jpg").write_bytes(b"jpg")
    (folder / "mine").mkdir()
    (folder / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(run_files.RunFileError, match=r"already holds an earlier prediction run's files "
                                                     r"\(predictions-0.pt, predictions-1.pt, 1 task folder\(s\)\); "
                                                     r"give --overwrite"):
        predictions.claim_folder(folder, overwrite=False)
    lock = predictions.claim_folder(folder, overwrite=True)
    assert "deleted an earlier run's 2 prediction file(s) and 1 task folder(s)" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == [".predictions.lock", "mine"]
    with pytest.raises(run_files.RunFileError, match="another prediction run .* is writing"):
        predictions.claim_folder(folder, overwrite=True)            # held while the first one runs
    lock.release()


def test_a_second_prediction_run_into_the_same_folder_is_refused_before_loading(tiny_config_path, tmp_path,
                                                                                no_model, monkeypatch):
    import train_eval

    (tmp_path / "w").mkdir()
    torch.save({"state_dict": {"fc.0.weight": torch.zeros(2)}}, tmp_path / "w" / "stage1.ckpt")
    predictions.save(records(4), tmp_path / "out" / "stage1" / "predictions-0.pt")
    for key, value in {"DATAFOLDER": DATASETS / "CC3M", "WEIGHTFOLDER": tmp_path / "w",
                       "OUTPUT_FOLDER": tmp_path / "out"}.items():
        monkeypatch.setenv(key, str(value))
    argv = ["--test_data_path", "cc3m_val.tsv", "--test_weight", "stage1.ckpt", "--model_config", str(tiny_config_path)]
    with pytest.raises(SystemExit, match=r"error: .*stage1 already holds .*predictions-0.pt.*--overwrite"):
        train_eval.main(argv)


def test_metric_reads_exactly_the_files_the_manifest_lists(tmp_path, capsys):
    import metric
    from weights import CheckpointError

    folder = tmp_path / "pred"
    predictions.save(records(2), folder / "predictions-0.pt")
    predictions.save(records(1, "cc3m_b"), folder / "predictions-1.pt")
    predictions.write_manifest(folder, [2, 1], dataset={"type": "CC3M", "items": 3})
    manifest = json.loads((folder / "predictions.json").read_text())
    assert (manifest["world_size"], manifest["items"]) == (2, 3)
    assert [f["file"] for f in manifest["files"]] == ["predictions-0.pt", "predictions-1.pt"]
    assert len(metric.load_predictions(folder)) == 3

    predictions.save(records(1, "stale"), folder / "predictions-2.pt")    # an earlier run on 3 processes
    with pytest.raises(CheckpointError, match=r"predictions-2.pt not listed in predictions.json"):
        metric.load_predictions(folder)
    (folder / "predictions-2.pt").unlink()
    predictions.save(records(2, "other"), folder / "predictions-1.pt")   # replaced by another model's
    with pytest.raises(CheckpointError, match=r"predictions-1.pt: .* bytes, but predictions.json records"):
        metric.load_predictions(folder)
    predictions.write_manifest(folder, [2, 1])
    with pytest.raises(CheckpointError, match=r"predictions-1.pt: 2 predictions, but predictions.json records 1"):
        metric.load_predictions(folder)
    with pytest.raises(SystemExit) as error:             # metric.py's command line: one line
        metric.main(["--pred_folder", str(folder), "--dataset", "CC3M"])
    assert "\n" not in str(error.value)

    (folder / "predictions.json").unlink()               # the release's layout: every file, as before
    assert len(metric.load_predictions(folder)) == 4
