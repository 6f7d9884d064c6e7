"""The GPU smoke script and the benchmark runner's argument checks, run on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_smoke_script_dry_run_on_the_tiny_preset(tmp_path):
    """scripts/gpu_smoke.sh with PRESET=tiny DEVICE=cpu: every stage of the GPU smoke test (build the
    preset, stage 1, stage 2 from it, batched prediction, benchmark rows 4 and 5) runs and reports."""
    env = {**os.environ, "PRESET": "tiny", "DEVICE": "cpu", "SMOKE_DIR": str(tmp_path), "PYTHON": sys.executable,
           "STEPS": "2", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_smoke.sh")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").is_file() else ""
    assert out.returncode == 0, summary + out.stdout[-3000:] + out.stderr[-3000:]
    for stage in ("weights", "stage1", "stage2", "predict", "bench"):
        assert f"{stage}: ok" in summary, summary
    assert "stage1: after 2 optimiser steps" in summary and "stage2: after 2 optimiser steps" in summary
    predictions = tmp_path / "predictions" / "stage2_vist_VIST"
    assert sorted(p.name for p in predictions.glob("predictions-*.pt")) == ["predictions-0.pt"]
    results = (tmp_path / "RESULTS_gpu.md").read_text()
    assert "\n| 4 | 8 prompts as one batch" in results and "\n| 5 | `generate`" in results
    assert "same tokens: 8/8 items" in results             # float32 on the CPU: a batch equals its singles


def test_benchmark_runner_rejects_rows_that_cannot_run_on_the_device():
    out = subprocess.run([sys.executable, "benchmarks/run.py", "--rows", "1,4", "--device", "cuda"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "rows [1] are CPU benchmarks" in out.stderr and "--rows 4,5" in out.stderr
    out = subprocess.run([sys.executable, "benchmarks/run.py", "--rows", "12"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "no row [12]" in out.stderr
