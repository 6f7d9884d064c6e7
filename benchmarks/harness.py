"""Shared helpers of the benchmarks: the `small` preset, robust side-by-side timing, peak memory of a
child process, and the results table.

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
