"""The full-size benchmarks' dry runs on the tiny preset (CPU): benchmarks/full_size_cpu.py and
benchmarks/gpu_memory.py (every configuration it measures on a GPU), and the meta-device arithmetic
that benchmarks/RESULTS_gpu.md quotes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_full_size_cpu_script_dry_run(tiny_config_path, tmp_path):
    out = tmp_path / "full_cpu.md"
    run = subprocess.run([sys.executable, "benchmarks/full_size_cpu.py", "--model_config", str(tiny_config_path),
                          "--new_tokens", "10", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
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
    """Each configuration in its own process: loads, answers with exactly the asked number of tokens and
    draws the picture; the table has a row per configuration."""
    configs = ["4bit+offload"]                     # quantised LLM and offload hooks: the most moving parts
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        configs = ["bf16"]
    out = tmp_path / "gpu.md"
    run = subprocess.run([sys.executable, "benchmarks/gpu_memory.py", "--device", "cpu", "--model_config",
                          str(tiny_config_path), "--configs", ",".join(configs), "--new_tokens", "12", "--steps", "2",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["config"] for r in results] == configs
    for r in results:
        assert r["new_tokens"] == 12 and r["image"] and r["calls"]["LLM decoder"] == 12 and r["calls"]["UNet"] == 3
    table = out.read_text()
    assert all(f"| {c} |" in table for c in configs)
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
