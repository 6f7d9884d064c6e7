"""Shared helpers of the benchmarks: the `small` preset, robust side-by-side timing, peak memory of a
child process, the results table, and benchmarks/run.py's workload (`Settings`) and model (`Bench`).

Every figure the benchmarks report is a *ratio* of two things measured in the same process run, so
that it means something on any machine (this project is benchmarked on a 2-core CPU without a
GPU). Timings follow one recipe (`time_side_by_side`): a fixed torch thread count, warm-up calls,
then repeats in which every variant runs once, in an order that rotates from repeat to repeat (so
that slow drifts of the machine hit every variant alike); a figure is the median over the repeats
of the ratio within each repeat (`Timings.ratio`), reported with its smallest and largest value.
Peak memory is the resident-set high-water mark (VmHWM, reset after loading) of a fresh child
process per variant: `tracemalloc` does not see torch's allocations (see
benchmarks/bench_generate_memory.py for why not `ru_maxrss`).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SMALL_CONFIG = REPO / "config" / "small.yaml"
SMALL_ARCH = REPO / "config" / "small_arch.yaml"
SMALL_DIR = REPO / "weights" / "small"          # git-ignored, like weights/tiny
_STAMP = ".preset_stamp"


def set_threads(n: int) -> None:
    """Fix torch's intra-op thread count (and one inter-op thread) for stable timings."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:            # already set in this process (only allowed before any parallel work)
        pass


def ensure_small(out_dir: Path = SMALL_DIR) -> Path:
    """Build the `small` preset's random weights into `out_dir` (via `presets.build_tiny` with
    config/small.yaml + config/small_arch.yaml) unless an up-to-date build is there; return the path
    of the built config YAML. A build is reused when it was made from the same two YAML files."""
    from presets import build_tiny

    stamp = hashlib.sha256(SMALL_CONFIG.read_bytes() + SMALL_ARCH.read_bytes()).hexdigest()
    config = out_dir / "tiny.yaml"               # build_tiny's name for the config it writes
    stamp_file = out_dir / _STAMP
    if config.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return config
    config = build_tiny(out_dir, seed=0, config_path=SMALL_CONFIG, arch_path=SMALL_ARCH)
    stamp_file.write_text(stamp)
    return config


def time_side_by_side(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                      sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall-clock seconds of each variant, measured alternately.

    Each variant is called `warmup` times first (not recorded); then, `repeats` times, every
    variant runs once, in an order rotated by one place per repeat. `sync` (e.g.
    `torch.cuda.synchronize`) is called before each clock read. Returns the list of seconds per
    variant; use `median` on it.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if sync:
                sync()
            start = time.perf_counter()
            variants[name]()
            if sync:
                sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    """The median (of repeat timings)."""
    return statistics.median(values)


@dataclass
class Timings:
    """Seconds per variant and repeat, as `time_side_by_side` measured them."""

    raw: dict[str, list[float]]

    def __getitem__(self, name: str) -> float:
        """The median seconds of one variant."""
        return median(self.raw[name])

    def ratio(self, numerator: str, *denominator: str) -> tuple[float, float, float]:
        """Median over the repeats of `numerator / sum(denominator)`, with the smallest and the
        largest per-repeat value. Within a repeat the variants ran back to back, so a slow spell of
        a shared machine slows both sides of most ratios alike; the spread shows how noisy it was."""
        values = [self.raw[numerator][r] / sum(self.raw[d][r] for d in denominator)
                  for r in range(len(self.raw[numerator]))]
        return median(values), min(values), max(values)


def run_child(args: list[str], timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run `python ARGS` in a fresh process and return the JSON object on its last stdout line.

    Raises `RuntimeError` with the child's stderr when it fails."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=REPO, env=full_env)
    if out.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"child {' '.join(args)} printed nothing:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])


@dataclass
class Row:
    """One line of the results table: what was measured, the figure, the target and the verdict.

    `value` is the figure as shown (e.g. "1.04" or "7.9x faster"); `ok` is True/False against the
    target, or None where the issue only asks to report the number; `details` are extra lines for
    RESULTS.md (the raw medians, what was checked for equality, the workload)."""

    number: int
    what: str
    target: str
    value: str
    ok: bool | None
    details: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "reported"}[self.ok]


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (number, measurement, result, target, verdict)."""
    lines = ["| # | measured | result | target | verdict |", "|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: r.number):
        lines.append(f"| {row.number} | {row.what} | {row.value} | {row.target} | {row.verdict} |")
    return "\n".join(lines)


def fmt_s(seconds: float) -> str:
    """Seconds as a short human string (ms below one second)."""
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ----------------------------------------------------------------------------------------------
# The workload of a benchmarks/run.py run, and the model it measures
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """Workload sizes of one run (`--quick` shrinks the slow rows, never the repeats below 5)."""

    quick: bool
    threads: int
    repeats: int
    warmup: int = 1
    gen_new_tokens: int = 96          # row 4: tokens per answer (the model may stop earlier)
    gen_sd_steps: int = 50            # rows 4, 5: PNDM steps (the release's default)
    single_new_tokens: int = 64       # row 5
    clip_images: int = 32             # row 8
    cc3m_rows: int = 3_300_000        # row 7
    memory_new_tokens: int = 256      # row 9
    memory_runs: int = 3              # row 9: fresh processes per variant
    device: str = "cpu"               # rows 4, 5 may run elsewhere (--device)
    model_config: str | None = None   # default: the small preset (--model_config)
    dry_run: bool = False             # --dry_run: tiny workload, one repeat, no verdicts

    @classmethod
    def make(cls, quick: bool, threads: int, repeats: int | None, device: str = "cpu",
             model_config: str | None = None, dry_run: bool = False) -> "Settings":
        """The full, the quick or the dry-run workload."""
        where = dict(device=device, model_config=model_config)
        if dry_run:
            return cls(quick=True, threads=threads, repeats=1, warmup=0, gen_new_tokens=8, gen_sd_steps=1,
                       single_new_tokens=8, clip_images=4, cc3m_rows=10_000, memory_new_tokens=16, memory_runs=1,
                       dry_run=True, **where)
        if quick:
            return cls(quick=True, threads=threads, repeats=max(5, repeats or 5), gen_new_tokens=32,
                       gen_sd_steps=10, single_new_tokens=32, clip_images=16, cc3m_rows=330_000, memory_runs=1,
                       **where)
        return cls(quick=False, threads=threads, repeats=max(5, repeats or 7), **where)

    def sync(self) -> None:
        """Wait for the device's queued work (before and after each timed call)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class Bench:
    """The small preset and its sample data, built lazily for the row running in this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._config = None
        self._models: dict[int, object] = {}

    @property
    def config(self):
        """The small preset's `ModelConfig` (weights built on first use)."""
        if self._config is None:
            from configuration import load_config

            path = self.settings.model_config or ensure_small()
            self._config = load_config(path)
        return self._config

    def model(self, stage: int = 1):
        """A `MiniGPT5_Model` of the small preset (stage 1 for training rows, 2 for generation);
        the same random mapper weights in both."""
        if stage not in self._models:
            from model import MiniGPT5_Model

            torch.manual_seed(0)
            self._models[stage] = MiniGPT5_Model(self.config, stage=stage).to(self.settings.device)
        return self._models[stage]

    def cc3m_batch(self, batch_size: int = 8) -> dict:
        """A stage-1 batch from the sample CC3M training file, through the real dataset and
        collator, with pinned random draws (noise, latent noise, timesteps; no CFG dropout)."""
        from collator import Collator
        from dataloader import make_dataset

        model = self.model(1)
        tok = model.model.llama_tokenizer
        ds = make_dataset(REPO / "datasets" / "CC3M" / "cc3m_train.tsv", tok, self.config, is_training=True,
                          feature_folder=False)
        batch = Collator(tok)([ds[i % len(ds)] for i in range(batch_size)])
        latent = self.latent_shape
        g = torch.Generator().manual_seed(0)
        batch.update(noise=torch.randn(batch_size, *latent, generator=g),
                     latent_noise=torch.randn(batch_size, *latent, generator=g),
                     timesteps=torch.randint(0, 1000, (batch_size,), generator=g),
                     cfg_drop=torch.zeros(batch_size, dtype=torch.bool))
        return batch

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(4, h, w) of the small preset's VAE latents."""
        unet = self.model(1).unet.config
        return (unet.in_channels, unet.sample_size, unet.sample_size)

    def vist_items(self, train: bool) -> list[dict]:
        """All items of the sample VIST file (train: 30 samples of every kind; val: the 8
        generation samples), tokenized, with their input images."""
        from dataloader import make_dataset

        tok = self.model(1).model.llama_tokenizer
        name = "train_cleaned.json" if train else "val_cleaned.json"
        ds = make_dataset(REPO / "datasets" / "VIST" / name, tok, self.config, is_training=train,
                          feature_folder=False)
        return [ds[i] for i in range(len(ds))]


def timed(settings: Settings, variants: dict, repeats: int | None = None) -> Timings:
    """Seconds per variant and repeat (alternating, with warm-up; see `harness.time_side_by_side`);
    index it for a variant's median, `.ratio(...)` for a per-repeat ratio. `repeats` overrides the
    settings' count (never below 5, except in a dry run: one)."""
    count = settings.repeats if settings.dry_run else max(5, repeats or settings.repeats)
    return Timings(time_side_by_side(variants, repeats=count, warmup=settings.warmup, sync=settings.sync))


def spread(ratio: tuple[float, float, float], digits: int = 3) -> str:
    """'median (per-repeat min-max)' of a `Timings.ratio`."""
    value, low, high = ratio
    return f"{value:.{digits}f} (per-repeat {low:.{digits}f}-{high:.{digits}f})"
