"""Bad input in the data layer: what it is and how it is reported. Nothing is ever silently replaced.

    DataError      input that cannot be used: one message naming the file and line (or key)
    ProblemLog     each problem counted per reason and logged with its location (the first 20 per
                   reason one by one), or raised as a DataError in strict mode (`--strict`)
    BadSample      raised while a sample becomes an item; the dataset reports it and drops the sample
    path rules     an image path that leaves the dataset folder (as written: `path_leaves`; with its
                   symbolic links resolved: `resolves_outside`) is bad input (`OUTSIDE_PATH`)
    size caps      the messages of `max_row_bytes` / `max_text_chars` (config/limits.yaml)

Every reader (dataloader.py, shards.py, tsv_index.py) and the feature cache report through these, on
the data layer's one log channel, "dataloader".
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger("dataloader")


class DataError(ValueError):
    """Bad input that cannot be used: names the file and line (or key) and what is wrong."""


class ProblemLog:
    """Counts bad input per reason and logs each case with its location (the first `max_logged`
    per reason one by one, then only in the totals). With `strict`, the first problem raises
    `DataError`. `rules` counts samples the release's own rules leave out (not problems)."""

    def __init__(self, strict: bool = False, max_logged: int = 20):
        self.strict = strict
        self.max_logged = max_logged
        self.counts: Counter[str] = Counter()
        self.rules: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Number of problems met so far."""
        return sum(self.counts.values())

    def add(self, where: str, reason: str, detail: str = "", skipped: str = "sample skipped") -> None:
        """One problem at `where` (e.g. `file:line`)."""
        message = f"{where}: {reason}" + (f": {detail}" if detail else "")
        if self.strict:
            raise DataError(f"{message} (strict mode)")
        self._count(reason, f"{message}; {skipped}")

    def add_lines(self, path: Path, lines_by_reason: dict[str, np.ndarray]) -> None:
        """Problems found by vectorised checks: arrays of 1-based line numbers per reason."""
        found = {reason: lines for reason, lines in lines_by_reason.items() if len(lines)}
        if not found:
            return
        if self.strict:
            reason, line = min(((r, int(lines.min())) for r, lines in found.items()), key=lambda x: x[1])
            raise DataError(f"{path}:{line}: {reason} (strict mode)")
        for reason, lines in found.items():
            logged = lines[: max(0, self.max_logged - self.counts[reason])]
            for line in logged:
                self._count(reason, f"{path}:{int(line)}: {reason}; row skipped")
            self.counts[reason] += len(lines) - len(logged)

    def rule(self, reason: str, n: int = 1) -> None:
        """`n` samples/turns left out by one of the release's rules (counted, not a problem)."""
        self.rules[reason] += n

    def _count(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.max_logged:
            log.warning(message)
        if n == self.max_logged:
            log.warning("further '%s' problems are counted but not logged one by one", reason)

    def log_totals(self, what: str) -> None:
        """Log the totals per reason (after indexing a file)."""
        if self.counts:
            log.warning("%s: skipped because of bad input: %s", what,
                        ", ".join(f"{n} x {reason}" for reason, n in sorted(self.counts.items())))
        if self.rules:
            log.info("%s: left out by the release's rules: %s", what,
                     ", ".join(f"{n} x {reason}" for reason, n in sorted(self.rules.items())))


class BadSample(Exception):
    """Raised while a sample becomes an item, for a sample that cannot be used (the dataset reports
    it through its ProblemLog and drops the sample)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


OUTSIDE_PATH = "image path outside the dataset folder"


def resolves_outside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether the file `path` (as it is opened), with its symbolic links resolved, lies outside
    `root` (resolved too): the rule of `path_leaves`, applied where the file really is."""
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) != root


def path_leaves(root: str | os.PathLike, path: str) -> bool:
    """Whether `path` (relative to `root`, or absolute) names a place outside `root`, judged on the
    text: `..` components and absolute paths are resolved, symbolic links are not followed."""
    root = os.path.abspath(root)
    full = os.path.abspath(os.path.join(root, path))
    return os.path.commonpath([root, full]) != root


def too_long_row(caps) -> str:
    """The problem of a row or line over `max_row_bytes`."""
    return f"row longer than max_row_bytes ({caps.max_row_bytes:,} bytes; config/limits.yaml)"


def too_long_text(caps) -> str:
    """The problem of a caption, step or turn over `max_text_chars`."""
    return f"text longer than max_text_chars ({caps.max_text_chars:,}; config/limits.yaml)"
