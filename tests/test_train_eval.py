"""train_eval.py end to end on the tiny preset: the release's command lines, two stages, DDP on CPU,
resume, prediction on several processes, fast failures on wrong paths."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_checkpoints import release_stage1_keys, release_stage2_keys

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"


def run(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def common(config: Path) -> list[str]:
    return ["--model_config", str(config), "--accelerator", "cpu", "--num_workers", "0",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--real_batch_size", "2",
            "--warmup_steps", "1", "--learning_rate", "1e-4", "--num_inference_steps", "3", "--max_new_tokens", "16"]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_config_path):
    """Run scripts/tiny_pipeline.sh once (stage 1 -> stage 2 -> predictions -> metrics)."""
    out = tmp_path_factory.mktemp("pipeline")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "STEPS": "3", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "tiny_pipeline.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return out


def test_tiny_pipeline_checkpoints_hold_exactly_the_trainable_keys(pipeline, tiny_config):
    s1 = state_of(pipeline / "weights" / "stage1_cc3m.ckpt")
    s2 = state_of(pipeline / "weights" / "stage2_vist.ckpt")
    assert sorted(s1) == sorted(release_stage1_keys(tiny_config))
    n_layers = 2
    assert sorted(s2) == sorted(release_stage2_keys(tiny_config, n_layers))
    # Lightning's own bookkeeping is there too, so training can resume.
    checkpoint = torch.load(pipeline / "weights" / "stage1_cc3m.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3 and checkpoint["optimizer_states"]


def test_tiny_pipeline_predictions_and_metrics(pipeline):
    for name, data in [("stage1_cc3m", "CC3M"), ("stage2_vist_VIST", "VIST"), ("stage2_vist_MMDialog", "MMDialog")]:
        folder = pipeline / "predictions" / name
        records = torch.load(folder / "predictions-0.pt", weights_only=False)
        assert records, name
        for record in records:
            assert len(record) == 8 and isinstance(record[1], str) and isinstance(record[7], str)
            assert (folder / record[7]).is_dir()
        assert (folder / "results_dict.json").is_file() and (folder / "results.md").is_file(), name
    cc3m = torch.load(pipeline / "predictions" / "stage1_cc3m" / "predictions-0.pt", weights_only=False)
    assert all(r[4] is not None for r in cc3m)                     # SD baseline drawn for CC3M
    assert any((pipeline / "predictions" / "stage1_cc3m" / r[7] / "gt.jpg").is_file() for r in cc3m)


def test_stage2_starts_from_stage1_mapper_and_voken_rows(pipeline, tiny_config_path, tmp_path):
    """A stage-2 run with learning rate 0 saves exactly what it started from: stage 1's values."""
    env = {"IS_STAGE2": "True", "DATAFOLDER": str(DATASETS / "VIST"), "WEIGHTFOLDER": str(tmp_path),
           "OUTPUT_FOLDER": str(tmp_path / "out")}
    args = ["train_eval.py", "--train_data_path", "train_cleaned.json", "--stage1_weight",
            str(pipeline / "weights" / "stage1_cc3m.ckpt"), "--model_save_name", "s2", "--max_steps", "1",
            *common(tiny_config_path), "--learning_rate", "0"]
    result = run(args, env)
    assert result.returncode == 0, result.stderr[-4000:]
    s1 = state_of(pipeline / "weights" / "stage1_cc3m.ckpt")
    s2 = state_of(tmp_path / "s2.ckpt")
    mapper = [k for k in s1 if k.startswith("llm_to_t2i_mapping.")]
    assert mapper and all(torch.equal(s1[k], s2[k]) for k in mapper)
    for name in ("model.embed_tokens", "lm_head"):
        plain = s1[f"model.llama_model.{name}.weight"]
        lora = s2[f"model.llama_model.base_model.model.{name}.modules_to_save.default.weight"]
        assert torch.equal(plain[-9:], lora[-9:])


def test_ddp_on_two_cpu_processes_matches_one_process(tiny_config_path, tmp_path):
    script = str(REPO / "tests" / "ddp_check.py")
    for n in (1, 2):
        result = run([script, str(tiny_config_path), str(tmp_path / f"n{n}"), str(n), "1"], {})
        assert result.returncode == 0, result.stderr[-4000:]
    one, rank0, rank1 = (torch.load(tmp_path / p) for p in ("n1/rank0.pt", "n2/rank0.pt", "n2/rank1.pt"))
    initial = torch.load(tmp_path / "n1" / "initial0.pt")
    for key in one:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], one[key], atol=1e-5, rtol=0)
    assert max((one[k] - initial[k]).abs().max() for k in one) > 1e-3    # the step really moved the weights


def test_ddp_ranks_stay_identical_over_several_steps(tiny_config_path, tmp_path):
    result = run([str(REPO / "tests" / "ddp_check.py"), str(tiny_config_path), str(tmp_path), "2", "3"], {})
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def _losses(log_root: Path) -> dict[int, float]:
    losses = {}
    for metrics in sorted(log_root.glob("logs/version_*/metrics.csv")):
        with open(metrics) as f:
            for row in csv.DictReader(f):
                if row.get("train_loss"):
                    losses[int(row["step"])] = float(row["train_loss"])
    return losses


def test_resume_continues_exactly(tiny_config_path, tmp_path):
    """Stop after k steps (mid-epoch and on an epoch boundary), resume from the checkpoint the run
    kept, continue to 8: the same losses and the same weights as 8 steps straight. The checkpoints:
    `--save_every_n_steps` ones (saved after a batch) and `<name>-last.ckpt` of a run that ended with
    its epoch (saved at the epoch's end; Lightning's own `max_steps` made that one replay a batch)."""
    base = ["train_eval.py", "--train_data_path", "cc3m_train.tsv", "--model_save_name", "run",
            "--num_train_epochs", "6", *common(tiny_config_path)]     # 7 samples, batch 2: 4 steps an epoch
    env = lambda w: {"DATAFOLDER": str(DATASETS / "CC3M"), "WEIGHTFOLDER": str(w), "OUTPUT_FOLDER": str(w / "o")}
    straight = tmp_path / "straight"
    result = run(base + ["--max_steps", "8"], env(straight))
    assert result.returncode == 0, result.stderr[-4000:]
    expected_losses, expected_state = _losses(straight), state_of(straight / "run-last.ckpt")
    assert sorted(expected_losses) == list(range(8))
    for stop, every in ((3, True), (4, True), (4, False)):
        split = tmp_path / f"split{stop}{every}"
        first = run(base + ["--max_steps", str(stop)] + (["--save_every_n_steps", str(stop)] if every else []),
                    env(split))
        assert first.returncode == 0, first.stderr[-4000:]
        kept = split / (f"run-step{stop}.ckpt" if every else "run-last.ckpt")
        second = run(base + ["--max_steps", "8", "--resume", str(kept)], env(split))
        assert second.returncode == 0, second.stderr[-4000:]
        losses, state = _losses(split), state_of(split / "run-last.ckpt")
        assert losses == expected_losses, (kept.name, losses, expected_losses)
        assert state.keys() == expected_state.keys()
        assert all(torch.equal(state[k], expected_state[k]) for k in state), kept.name


def test_prediction_on_two_processes_writes_every_item_once(pipeline, tmp_path):
    from configuration import load_config
    from dataloader import make_dataset
    from minigpt4 import load_tokenizer

    config = pipeline / "tiny_weights" / "tiny.yaml"
    env = {"IS_STAGE2": "True", "DATAFOLDER": str(DATASETS / "VIST"), "WEIGHTFOLDER": str(pipeline / "weights"),
           "OUTPUT_FOLDER": str(tmp_path)}
    result = run(["train_eval.py", "--is_training", "False", "--test_data_path", "val_cleaned.json",
                  "--test_weight", "stage2_vist.ckpt", "--gpus", "0,1", *common(config)], env)
    assert result.returncode == 0, result.stderr[-4000:]
    folder = tmp_path / "stage2_vist"
    names = [r[7] for rank in (0, 1) for r in torch.load(folder / f"predictions-{rank}.pt", weights_only=False)]
    cfg = load_config(config)
    dataset = make_dataset(DATASETS / "VIST" / "val_cleaned.json", load_tokenizer(cfg.llama_model), cfg,
                           is_training=False, dataset_type="VIST")
    expected = [dataset.sample(i).task_name for i in range(len(dataset))]
    assert sorted(names) == sorted(expected) and len(set(names)) == len(names)


@pytest.mark.parametrize("flag,value,env_key", [
    ("--train_data_path", "missing.tsv", None),
    ("--stage1_weight", "nowhere.ckpt", None),
    ("--model_config", "config/absent.yaml", None),
    ("--resume", "nothing.ckpt", None),
    ("--max_steps", "0", None),
])
def test_wrong_paths_fail_fast_naming_them(flag, value, env_key, tiny_config_path, monkeypatch, capsys):
    import model
    import train_eval

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the paths were checked")

    monkeypatch.setattr(model.MiniGPT5_Model, "__init__", no_model)
    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "CC3M"))
    monkeypatch.setenv("WEIGHTFOLDER", str(REPO / "weights-that-do-not-exist"))
    args = {"--train_data_path": "cc3m_train.tsv", "--model_config": str(tiny_config_path)}
    args[flag] = value
    argv = [x for kv in args.items() for x in kv]
    with pytest.raises(SystemExit) as exit_info:
        train_eval.main(argv)
    message = str(exit_info.value)
    assert value in message, message


def test_wrong_datafolder_and_feature_folder_fail_fast(tiny_config_path, monkeypatch):
    import train_eval

    monkeypatch.setenv("DATAFOLDER", "/no/such/CC3M")
    with pytest.raises(SystemExit, match="DATAFOLDER='/no/such/CC3M'"):
        train_eval.main(["--train_data_path", "cc3m_train.tsv", "--model_config", str(tiny_config_path)])
    monkeypatch.setenv("DATAFOLDER", str(DATASETS / "CC3M"))
    monkeypatch.setenv("PREPROCESS_FEATURE_FOLDER", "/no/features")
    with pytest.raises(SystemExit, match="PREPROCESS_FEATURE_FOLDER='/no/features'"):
        train_eval.main(["--train_data_path", "cc3m_train.tsv", "--model_config", str(tiny_config_path)])
    monkeypatch.delenv("PREPROCESS_FEATURE_FOLDER")
    with pytest.raises(SystemExit, match="--test_weight"):
        train_eval.main(["--is_training", "False", "--test_data_path", "cc3m_val.tsv", "--model_config",
                         str(tiny_config_path)])


def test_interrupted_checkpoint_save_leaves_no_file(tiny_config, tmp_path, monkeypatch):
    """Lightning writes checkpoints through a transaction: a save that fails half-way never leaves
    a file under the final name."""
    import pytorch_lightning as pl

    from model import MiniGPT5_Model

    model = MiniGPT5_Model(tiny_config, stage=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    from fsspec.implementations.local import LocalFileOpener

    real_write = LocalFileOpener.write

    def half_write(self, data):
        real_write(self, bytes(data)[: len(data) // 2])      # half the bytes reach the disk ...
        raise OSError("disk full (simulated)")               # ... then the save dies

    monkeypatch.setattr(LocalFileOpener, "write", half_write)
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(tmp_path / "final.ckpt")
    assert not (tmp_path / "final.ckpt").exists()


def test_sample_generation_every_n_steps(tiny_config_path, tmp_path):
    env = {"DATAFOLDER": str(DATASETS / "CC3M"), "WEIGHTFOLDER": str(tmp_path / "w"), "OUTPUT_FOLDER": str(tmp_path)}
    result = run(["train_eval.py", "--train_data_path", "cc3m_train.tsv", "--max_steps", "2",
                  "--sample_every_n_steps", "1", *common(tiny_config_path)], env)
    assert result.returncode == 0, result.stderr[-4000:]
    texts = sorted((tmp_path / "samples").glob("step_*.txt"))
    assert [t.name for t in texts] == ["step_0000001.txt", "step_0000002.txt"]
    assert "---" in texts[0].read_text()
