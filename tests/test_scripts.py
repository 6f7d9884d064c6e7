"""The scripts under scripts/ and the benchmark runner's checks, run on the CPU with the tiny preset
and tiny workloads (no test here measures or depends on time)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, env: dict) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(["bash", str(REPO / "scripts" / script)], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def test_tiny_pipeline_trains_predicts_and_scores(tmp_path):
    """scripts/tiny_pipeline.sh: stage 1 -> stage 2 -> predictions on CC3M, VIST, MMDialog -> metrics."""
    result = run_script("tiny_pipeline.sh", {"OUT": str(tmp_path), "STEPS": "2"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    assert torch.load(tmp_path / "weights" / "stage2_vist-last.ckpt", weights_only=False)["global_step"] == 2
    for name in ("stage1_cc3m", "stage2_vist_VIST", "stage2_vist_MMDialog"):
        folder = tmp_path / "predictions" / name
        records = torch.load(folder / "predictions-0.pt", weights_only=False)
        assert records, name
        for record in records:
            assert len(record) == 8 and isinstance(record[1], str) and isinstance(record[7], str)
            assert (folder / record[7]).is_dir()
        assert (folder / "results_dict.json").is_file() and (folder / "results.md").is_file(), name
    cc3m = torch.load(tmp_path / "predictions" / "stage1_cc3m" / "predictions-0.pt", weights_only=False)
    assert all(r[4] is not None for r in cc3m)                     # SD baseline drawn for CC3M
    assert any((tmp_path / "predictions" / "stage1_cc3m" / r[7] / "gt.jpg").is_file() for r in cc3m)


def test_gpu_smoke_script_dry_run(tmp_path):
    """scripts/gpu_smoke.sh with DRY_RUN=1: every stage of the GPU smoke test (build the preset,
    stage 1, stage 2 from it, batched prediction, benchmark rows 4 and 5 with `--dry_run`) runs on
    the tiny preset on the CPU and reports."""
    out = run_script("gpu_smoke.sh", {"DRY_RUN": "1", "SMOKE_DIR": str(tmp_path)})
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").is_file() else ""
    assert out.returncode == 0, summary + out.stdout[-3000:] + out.stderr[-3000:]
    for stage in ("weights", "stage1", "stage2", "predict", "bench"):
        assert f"{stage}: ok" in summary, summary
    assert "stage1: after 1 optimiser steps" in summary and "stage2: after 1 optimiser steps" in summary
    predictions = tmp_path / "predictions" / "stage2_vist_VIST"
    assert sorted(p.name for p in predictions.glob("predictions-*.pt")) == ["predictions-0.pt"]
    results = (tmp_path / "RESULTS_gpu.md").read_text()
    assert "`python benchmarks/run.py --dry_run" in results
    assert "\n| 4 | 8 prompts as one batch" in results and "\n| 5 | `generate`" in results
    assert "same tokens: 8/8 items" in results             # float32 on the CPU: a batch equals its singles
    assert "| reported |" in results and "| met |" not in results and "MISSED" not in results   # no verdicts


def test_benchmark_runner_rejects_rows_that_cannot_run_on_the_device():
    run = lambda *args: subprocess.run([sys.executable, "benchmarks/run.py", *args], cwd=REPO, capture_output=True,
                                       text=True, timeout=HANG_GUARD_S)
    out = run("--rows", "1,4", "--device", "cuda")
    assert out.returncode == 2
    assert "rows [1] are CPU benchmarks" in out.stderr and "--rows 4,5" in out.stderr
    out = run("--rows", "12")
    assert out.returncode == 2 and "no row [12]" in out.stderr


def test_gpu_bench_script_dry_run(tmp_path):
    """scripts/gpu_bench.sh with DRY_RUN=1: the one device script of issue #29 runs gpu_memory.py's dry run
    (every mode, the plain baselines, DPM-Solver++, the training benchmark) on the tiny preset on the
    CPU and writes its results file with the targets' table and no verdicts."""
    out = run_script("gpu_bench.sh", {"DRY_RUN": "1", "BENCH_DIR": str(tmp_path)})
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").is_file() else ""
    assert out.returncode == 0, summary + out.stdout[-3000:] + out.stderr[-3000:]
    assert "bench: ok" in summary
    results = (tmp_path / "RESULTS_gpu_full.md").read_text()
    for mode in ("release", "graph", "compiled", "compiled, dpm++ 2 steps"):
        assert f"| bf16 | {mode} |" in results, mode
    # float32 CPU: the release's tokens, and its picture up to one level of float rounding (a kernel may
    # block a batch differently: one CI run saw a non-zero difference here)
    graph = next(line for line in results.splitlines() if line.startswith("| bf16 | graph |")).split("|")
    assert graph[10].strip() == "yes" and int(graph[11]) <= 1, graph
    assert "Plain libraries on the same weights" in results and "UNet compiled" in results
    assert "| 1 | release |" in results and "| 2 | release |" in results
    assert "| dry run |" in results and "| met |" not in results and "MISSED" not in results
