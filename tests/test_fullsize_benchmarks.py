"""The full-size benchmarks' dry runs on the tiny preset (CPU): benchmarks/full_size_cpu.py and
benchmarks/gpu_memory.py (every configuration it measures on a GPU), and the meta-device arithmetic
that benchmarks/RESULTS_gpu.md quotes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

REPO = Path(__file__).resolve().parents[1]


def test_full_size_cpu_script_dry_run(tiny_config_path, tmp_path):
    out = tmp_path / "full_cpu.md"
    run = subprocess.run([sys.executable, "benchmarks/full_size_cpu.py", "--model_config", str(tiny_config_path),
                          "--new_tokens", "10", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["new_tokens"] == 10 and result["image_size"] == [32, 32] and not result["text_encoder_loaded"]
    assert result["model_bytes"] > 0 and result["peak_rss_load"] >= result["rss_before_load"]
    assert set(result["answer_steps"]) == {"ViT (2 images)", "Q-Former", "LLM decoder (prefill + steps)", "lm_head",
                                           "mapper", "UNet", "VAE decoder"}
    assert result["answer_calls"]["UNet"] == 3                    # 2 PNDM steps (PLMS warm-up counts twice)
    assert "peak resident while loading" in out.read_text()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import full_size_cpu

    with pytest.raises(SystemExit, match="weights.py preset full"):
        full_size_cpu.main(["--model_config", str(tmp_path / "no.yaml")])


def test_gpu_memory_script_dry_run_on_the_cpu(tiny_config_path, tmp_path):
    """Each configuration in its own process: loads, answers with exactly the asked number of tokens in
    the release mode and the captured-graph mode (the same tokens: stops off alike in both) and draws
    the picture; the table has a row per configuration and mode. (scripts/gpu_bench.sh's dry run runs
    every mode, the baselines and the training benchmark.)"""
    configs = ["4bit+offload"]                     # quantised LLM and offload hooks: the most moving parts
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        configs = ["bf16"]
    out = tmp_path / "gpu.md"
    run = subprocess.run([sys.executable, "benchmarks/gpu_memory.py", "--device", "cpu", "--model_config",
                          str(tiny_config_path), "--configs", ",".join(configs), "--modes", "release,graph",
                          "--new_tokens", "12", "--steps", "2", "--dpm_steps", "0", "--no_baselines", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [(r["config"], r["mode"]) for r in results] == [(c, m) for c in configs for m in ("release", "graph")]
    for r in results:
        assert r["new_tokens"] == 12 and r["image"] and r["part_s"]["decode"] > 0 and r["part_s"]["prefill"] > 0
    assert results[1]["same_tokens_as_release"] and results[1]["token_ids"] == results[0]["token_ids"]
    table = out.read_text()
    assert all(f"| {c} | {m} |" in table for c in configs for m in ("release", "graph"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_memory

    with pytest.raises(SystemExit) as bad:
        gpu_memory.main(["--device", "cpu", "--configs", "2bit"])
    assert bad.value.code == 2


def test_gpu_memory_arithmetic(tmp_path):
    """The meta-device table: says it is arithmetic; the bf16 LLM is 14.0 GB (12.95 GB of bf16 linear
    layers + 2 x 32009 x 4096 float32 voken rows), 4-bit + offload fits 8 GB."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_memory

    text = gpu_memory.arithmetic(180, 64)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "GB |" in line}
    assert set(gpu_memory.CONFIGS) <= set(rows)
    assert "| 14.00 GB |" in rows["bf16"]
    parts = gpu_memory.part_bytes(None)
    assert parts["lm_head (fp32 voken rows)"] == 32009 * 4096 * 4
    assert parts["ViT (fp16)"] == 985_952_256 * 2 and parts["UNet (bf16)"] == 865_910_724 * 2
    peak = float(rows["4bit+offload"].split("**")[1].split()[0])
    assert peak < 8


def test_train_throughput_dry_run(tiny_config_path, tmp_path):
    """benchmarks/train_throughput.py on the tiny preset: every variant reports samples/s and FLOPs, the
    release variant its parts; caching the VAE moments and caption features and fusing AdamW leave
    the loss as it was (the optimiser runs at the warm-up's learning rate 0, so the weights stay)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_throughput

    out = tmp_path / "train.md"
    results = train_throughput.main(["--dry_run", "--model_config", str(tiny_config_path), "--stages", "1",
                                     "--variants", "release,cached_features,all", "--out", str(out)])
    assert [r["variant"] for r in results] == ["release", "cached_features", "all"]
    for r in results:
        assert r["samples_per_s"] > 0 and r["step_flops"] > 0 and r["mfu"] is None     # no peak known for a CPU
        assert abs(r["final_loss"] - results[0]["final_loss"]) < 1e-5
    assert results[2]["step_flops"] < results[0]["step_flops"]      # no VAE encoder in the step any more
    assert set(results[0]["part_s"]) == {"LLM (forward + backward)", "mapper (forward + backward)",
                                         "UNet (forward + backward to the condition)", "VAE encoder (forward)",
                                         "caption encoder (forward)", "optimiser step"}
    assert results[0]["attention"]["LLM"] == "sdpa"
    assert "| 1 | all |" in out.read_text()
