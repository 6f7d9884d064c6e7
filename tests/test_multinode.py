"""train_eval.py on several nodes and with sharded strategies, on CPU processes (gloo):

- two "nodes" of one process each, launched by two `torchrun --nnodes 2 --node_rank k` on the
  loopback, train exactly as one node with two processes (`--gpus 0,1`, Lightning's own launch),
  which tests/test_train_eval.py's DDP test ties to a single process;
- `--strategy fsdp` trains as DDP does, writes single-file checkpoints in the release's key layout
  (stage 1 and stage 2) and resumes from them;
- SLURM's variables are read by Lightning with our flags; flags a run cannot honour are refused
  before a model is loaded.

All runs train stage 1 from CC3M WebDataset shards, so they also check that the shard loader splits
an epoch over the nodes and resumes exactly under DDP.
"""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import HANG_GUARD_S, release_stage1_checkpoint_keys, release_stage2_checkpoint_keys

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK", "GROUP_RANK",
               "LOCAL_WORLD_SIZE", "IS_STAGE2", "WEIGHTFOLDER", "DATAFOLDER", "OUTPUT_FOLDER",
               "PREPROCESS_FEATURE_FOLDER")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(out: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WEIGHTFOLDER": str(out)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_args(config: Path, data: str, *more: str) -> list[str]:
    return ["--is_training", "--train_data_path", data, "--model_config", str(config), "--accelerator", "cpu",
            "--num_workers", "0", "--per_device_train_batch_size", "2", "--real_batch_size", "4",
            "--warmup_steps", "1", "--learning_rate", "1e-3", "--model_save_name", "run", *more]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    # A session of its own: stopping it stops the processes a launcher started too.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop a run and every process it started (torchrun's workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def finish(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every run; the first that fails stops the others and fails the test with its log.
    (Waiting on them in turn, a node whose peer had died waited for it until the hang guard.)"""
    waiting, deadline = list(procs), time.monotonic() + HANG_GUARD_S
    while waiting:
        for proc, log in list(waiting):
            code = proc.poll()
            if code is None:
                continue
            waiting.remove((proc, log))
            if code != 0:
                for other, _ in waiting:
                    stop(other)
                pytest.fail(f"{log.name}: exit {code}; the other runs were stopped. Its log's end:\n"
                            + log.read_text()[-4000:])
        if waiting and time.monotonic() > deadline:
            for proc, _ in waiting:
                stop(proc)
            pytest.fail(f"still running after {HANG_GUARD_S} s (hang guard): {[log.name for _, log in waiting]}")
        time.sleep(0.5)


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def losses(out: Path) -> dict[int, float]:
    rows = []
    for metrics in sorted(out.glob("logs/version_*/metrics.csv")):
        with open(metrics) as f:
            rows += list(csv.DictReader(f))
    return {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config_path):
    """Stage 1 from shards of datasets/CC3M (7 samples, 2 processes x batch 2: 2 steps an epoch),
    3 optimiser steps each: (a) 2 nodes x 1 process by torchrun, each reading its shards in a
    DataLoader worker process, (b) 1 node x 2 processes reading in the main process, (c)
    FSDP on 2 processes stopped after 1 step and resumed to 3, (d) one FSDP stage-2 step on VIST
    from (b)'s checkpoint, with bfloat16 frozen models under bf16-mixed."""
    root = tmp_path_factory.mktemp("multinode")
    sys.path.insert(0, str(REPO / "scripts"))
    from tsv_to_shards import convert

    convert(DATASETS / "CC3M" / "cc3m_train.tsv", root / "CC3M" / "shards", samples_per_shard=3)
    data = "shards/{00000..00001}.tar"                      # relative to DATAFOLDER, as the release's flags
    cc3m = {"DATAFOLDER": root / "CC3M"}
    python = [sys.executable, "train_eval.py"]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    port = free_port()
    nodes = [start(torchrun + ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(k), "--master_addr",
                               "127.0.0.1", "--master_port", str(port), "train_eval.py",
                               *train_args(tiny_config_path, data, "--num_nodes", "2", "--max_steps", "3",
                                           "--num_workers", "1")],
                   env_for(root / "nodes", **cc3m), root / f"node{k}.log") for k in (0, 1)]
    one_node = start(python + train_args(tiny_config_path, data, "--gpus", "0,1", "--max_steps", "3"),
                     env_for(root / "one_node", **cc3m), root / "one_node.log")
    fsdp = train_args(tiny_config_path, data, "--gpus", "0,1", "--strategy", "fsdp")
    fsdp_1 = start(python + fsdp + ["--max_steps", "1"], env_for(root / "fsdp", **cc3m), root / "fsdp1.log")
    finish([(p, root / f"node{k}.log") for k, p in enumerate(nodes)] + [(one_node, root / "one_node.log"),
                                                                         (fsdp_1, root / "fsdp1.log")])
    # Stage 2 with the real configs' mix of dtypes (bfloat16 frozen models, float32 trainable parts).
    mixed = tiny_config_path.with_name("tiny_bf16_frozen.yaml")
    mixed.write_text(tiny_config_path.read_text().replace(": float32", ": bfloat16"))
    stage2 = ["--is_training", "--train_data_path", "train_cleaned.json", "--stage1_weight",
              str(root / "one_node" / "run.ckpt"), "--model_config", str(mixed), "--accelerator", "cpu",
              "--num_workers", "0", "--per_device_train_batch_size", "2", "--warmup_steps", "1",
              "--model_save_name", "s2", "--max_steps", "1", "--strategy", "fsdp", "--precision", "bf16-mixed"]
    finish([(start(python + fsdp + ["--max_steps", "3", "--resume", "last"], env_for(root / "fsdp", **cc3m),
                   root / "fsdp2.log"), root / "fsdp2.log"),
            (start(python + stage2, env_for(root / "stage2", IS_STAGE2="True", DATAFOLDER=DATASETS / "VIST"),
                   root / "stage2.log"), root / "stage2.log")])
    return root


def test_two_nodes_train_exactly_as_one_node_with_two_processes(runs):
    assert "2 node(s) x 1 device(s)" in (runs / "node0.log").read_text()
    assert "1 node(s) x 2 device(s)" in (runs / "one_node.log").read_text()
    assert sorted(losses(runs / "nodes")) == [0, 1, 2]
    assert losses(runs / "nodes") == losses(runs / "one_node")
    nodes, one_node = state_of(runs / "nodes" / "run-last.ckpt"), state_of(runs / "one_node" / "run-last.ckpt")
    assert nodes.keys() == one_node.keys()
    assert all(torch.equal(nodes[k], one_node[k]) for k in nodes)


def test_fsdp_saves_the_release_layout_and_resumes(runs, tiny_config):
    """FSDP's checkpoints are single files with exactly the release's stage-1 / stage-2 keys (the
    stage-2 run mixes bfloat16 frozen models with float32 trainable tensors, which one FSDP flat
    parameter could not hold); the run stopped after 1 step and resumed to 3 ends where DDP's
    uninterrupted run ends (a resume that lost the optimiser state lands ~1e-2 away; FSDP and DDP
    differ only by float summation order)."""
    fsdp = state_of(runs / "fsdp" / "run-last.ckpt")
    assert sorted(fsdp) == sorted(release_stage1_checkpoint_keys(tiny_config))
    assert "resuming training from" in (runs / "fsdp2.log").read_text()
    ddp = state_of(runs / "one_node" / "run-last.ckpt")
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-3, rtol=0, msg=key)
    resumed, straight = losses(runs / "fsdp"), losses(runs / "one_node")
    assert sorted(resumed) == [0, 1, 2]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step
    from configuration import load_config
    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(load_config(tiny_config.source).llama_model).num_hidden_layers
    stage2 = state_of(runs / "stage2" / "s2.ckpt")
    assert sorted(stage2) == sorted(release_stage2_checkpoint_keys(tiny_config, n_layers))
    assert {value.dtype for value in stage2.values()} == {torch.float32}


def test_a_failed_run_stops_the_others_at_once(tmp_path):
    """The runs above start side by side: when one fails, its peers (a node waiting for the dead
    one, say) are stopped (with what they started: each run is a process group), and the test
    fails with the failed run's log, instead of waiting for them until the hang guard."""
    waiter = [sys.executable, "-c", "import time; time.sleep(120)"]
    failer = [sys.executable, "-c", "import sys; print('no rendezvous'); sys.exit(3)"]
    runs = [(start(waiter, os.environ.copy(), tmp_path / "waiter.log"), tmp_path / "waiter.log"),
            (start(failer, os.environ.copy(), tmp_path / "failer.log"), tmp_path / "failer.log")]
    with pytest.raises(pytest.fail.Exception, match=r"(?s)failer.log: exit 3; the other runs were stopped.*no rendezvous"):
        finish(runs)
    assert runs[0][0].returncode == -signal.SIGTERM              # stopped, not waited for


def test_slurm_variables_set_ranks_for_our_flags(monkeypatch):
    """Under `srun` Lightning reads SLURM's variables: with --num_nodes 2 and one process per node,
    the process on the second node is global rank 1 of 2."""
    import lightning_fabric.utilities.rank_zero as fabric_rank_zero
    import pytorch_lightning as pl
    import pytorch_lightning.utilities.rank_zero as pl_rank_zero
    from lightning_fabric.plugins.environments import SLURMEnvironment
    from lightning_utilities.core.rank_zero import rank_zero_only

    import train_eval

    # The Trainer sets the process-wide rank-zero flag (and may set MASTER_*): restore them afterwards,
    # or later in-process runs would think they are rank 1 and write no logs.
    for flag in {id(f): f for f in (rank_zero_only, fabric_rank_zero.rank_zero_only,
                                    pl_rank_zero.rank_zero_only)}.values():
        monkeypatch.setattr(flag, "rank", getattr(flag, "rank", 0), raising=False)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    for key, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "minigpt5",
                       "SLURM_JOB_ID": "1234", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                       "SLURM_NODELIST": "node[1-2]"}.items():
        monkeypatch.setenv(key, value)
    args = train_eval.parse_args(["--accelerator", "cpu", "--num_nodes", "2"])
    accelerator, devices = train_eval.devices_of(args)
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=args.num_nodes,
                         strategy=train_eval.make_strategy(args.strategy, devices * args.num_nodes, 1), logger=False)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.global_rank, trainer.world_size, trainer.node_rank) == (1, 2, 1)


@pytest.mark.parametrize("argv, message", [
    (["--num_nodes", "0"], "--num_nodes 0: must be a positive integer"),
    (["--strategy", "deepspeed_stage_2"], "deepspeed_stage_2 runs on CUDA GPUs only"),
    (["--val_data_path", "shards/{00000..00001}.tar"], "WebDataset shards are read for training only"),
    (["--train_data_path", "shards/{00000..00009}.tar"], r"8 of the 10 shards .* do not exist"),
])
def test_flags_a_run_cannot_honour_fail_before_loading(argv, message, tmp_path, tiny_config_path, monkeypatch):
    import train_eval

    sys.path.insert(0, str(REPO / "scripts"))
    from tsv_to_shards import convert

    convert(DATASETS / "CC3M" / "cc3m_train.tsv", tmp_path / "shards", samples_per_shard=4)
    monkeypatch.setenv("DATAFOLDER", str(tmp_path))
    base = ["--is_training", "--train_data_path", "shards/{00000..00001}.tar", "--model_config",
            str(tiny_config_path), "--accelerator", "cpu"]
    with pytest.raises(SystemExit, match=message):
        train_eval.check_inputs(train_eval.parse_args(base + argv))
    with pytest.raises(SystemExit):
        train_eval.parse_args(["--strategy", "deepspeed_stage_3"])          # not offered: no release layout
