"""CC3M's TSV (`caption<TAB>image_path`, 3.3 M rows) indexed fast and compactly: captions cleaned as
the release cleaned them (`clean_caption`), each block of lines split and cleaned by a few numpy /
C-level bytes operations, and the columns kept as one UTF-8 buffer each (`StringColumn`) instead of a
Python object per row, so forked DataLoader workers share them. Bad rows are reported to a
`data_problems.ProblemLog` with their line number. `dataloader.CC3MDataset` reads its file through
`read_cc3m_tsv`; `scripts/tsv_to_shards.py` too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from configuration import limits
from data_problems import DataError, ProblemLog, path_leaves, too_long_row, too_long_text


def clean_caption(caption: str) -> str:
    """The release's caption cleaning, one string at a time: lower-case; each of . ! " ( ) * # : ; ~
    becomes a space; runs of two or more whitespace characters become one space; strip."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    return caption.rstrip("\n").strip(" ")


# `clean_caption` for many ASCII captions at once, on bytes joined by NUL (neither whitespace nor
# punctuation; rows containing it are rejected): bytes.lower/translate and one regex over the whole
# block. For ASCII text Python's `\s` is exactly these ten characters; when only spaces occur
# (the usual case) a cheaper pattern gives the same result. Captions with non-ASCII bytes are
# recomputed with `clean_caption` itself (Unicode lower-casing and whitespace).
_PUNCT_TO_SPACE = bytes.maketrans(b'.!"()*#:;~', b" " * 10)
_ASCII_SPACE_RUNS = re.compile(rb"[\t\n\x0b\x0c\r\x1c-\x1f ]{2,}")
_SPACE_RUNS = re.compile(rb"  +")
_OTHER_ASCII_SPACE = (b"\t", b"\n", b"\x0b", b"\x0c", b"\r", b"\x1c", b"\x1d", b"\x1e", b"\x1f")


def clean_captions_ascii(joined: bytes) -> bytes:
    """`clean_caption` applied to every part of NUL-joined ASCII captions (non-ASCII parts must be
    redone with `clean_caption`)."""
    text = joined.lower().translate(_PUNCT_TO_SPACE)
    runs = _ASCII_SPACE_RUNS if any(c in text for c in _OTHER_ASCII_SPACE) else _SPACE_RUNS
    text = runs.sub(b" ", text)
    # After collapsing, a part has at most one space at each end.
    return text.replace(b" \x00", b"\x00").replace(b"\x00 ", b"\x00").strip(b" ")


class StringColumn:
    """Many strings in one growing UTF-8 buffer, each followed by a NUL, plus their end offsets:
    about one byte per character and no Python object per string, so 3.3 M captions take ~200 MB
    and forked DataLoader workers share them instead of copying them page by page."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._blocks: list[np.ndarray] = []
        self.ends = np.zeros(0, np.int64)

    def append(self, block: bytes) -> np.ndarray:
        """Add NUL-terminated strings; returns their lengths in bytes."""
        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 0)
        self._blocks.append(ends + len(self.buffer))
        self.buffer += block  # grows in place (no copy of the whole column)
        return np.diff(ends, prepend=-1) - 1

    def finish(self) -> "StringColumn":
        """Call once after the last `append`."""
        self.ends = np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.int64)
        self._blocks = []
        return self

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) + 1 if i > 0 else 0
        return self.buffer[start: int(self.ends[i])].decode("utf-8")


@dataclass
class CC3MTable:
    """The usable rows of a CC3M TSV: cleaned captions, image paths (as written), the row index
    (the release's `i`: data rows, blank lines not counted) and the 1-based line number."""

    captions: StringColumn
    paths: StringColumn
    rows: np.ndarray
    lines: np.ndarray
    valid: np.ndarray  # positions in the columns of rows with a caption and an image path


def read_cc3m_tsv(path: Path, problems: ProblemLog, block_size: int = 1 << 24) -> CC3MTable:
    """Index a CC3M TSV (`caption<TAB>image_path` header; other columns are allowed).

    The file is read in blocks of whole lines; each block is split and cleaned by a handful of
    numpy / C-level bytes operations (no Python code per row, except for the rare rows with
    non-ASCII text). Fields are tab-separated with no quoting: a quote is an ordinary character
    (the release's pandas quoting gives the same cleaned captions on well-formed files, but an
    unbalanced quote there silently swallows the following lines). Bad rows are reported to
    `problems` with their line number and left out.
    """
    caps = limits()
    with open(path, "rb") as f:
        first = f.readline(caps.max_row_bytes + 1)
        if len(first) > caps.max_row_bytes:
            raise DataError(f"{path}:1: the header is longer than max_row_bytes ({caps.max_row_bytes:,} bytes; "
                            f"config/limits.yaml); a CC3M TSV starts with 'caption<TAB>image_path'")
        header = first.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n").split("\t")
        missing = [c for c in ("caption", "image_path") if c not in header]
        if missing:
            raise DataError(f"{path}:1: the header has no column {' or '.join(repr(c) for c in missing)} "
                            f"(found {header}); a CC3M TSV starts with 'caption<TAB>image_path'")
        columns = (len(header), header.index("caption"), header.index("image_path"))
        captions, paths = StringColumn(), StringColumn()
        rows, lines, valid = [], [], []
        next_line, next_row, n_kept, rest = 2, 0, 0, b""
        while True:
            chunk = f.read(block_size)
            data = rest + chunk
            if not data:
                break
            if chunk:
                cut = data.rfind(b"\n") + 1
                if cut == 0 and len(data) > caps.max_row_bytes:   # one row over the cap: skip it unread
                    rest = _skip_line(f, block_size)
                    problems.add_lines(path, {too_long_row(caps): np.array([next_line])})
                    next_line, next_row = next_line + 1, next_row + 1
                    continue
                if cut == 0:  # a line longer than the block: read on
                    rest = data
                    continue
                block, rest = data[:cut], data[cut:]
            else:
                block, rest = data + b"\n", b""  # the last line has no newline
            part = _parse_cc3m_block(path, block, columns, next_line, next_row, captions, paths, problems, caps)
            rows.append(part["rows"])
            lines.append(part["lines"])
            valid.append(part["valid"] + n_kept)
            next_line, next_row = part["next_line"], part["next_row"]
            n_kept += len(part["rows"])
            if not chunk:
                break
    concat = (lambda arrays: np.concatenate(arrays) if arrays else np.zeros(0, np.int64))
    return CC3MTable(captions.finish(), paths.finish(), concat(rows), concat(lines), concat(valid))


def _skip_line(f, block_size: int) -> bytes:
    """Read on to the end of the current line without keeping it; returns what follows its newline."""
    while True:
        chunk = f.read(block_size)
        end = chunk.find(b"\n")
        if not chunk or end >= 0:
            return chunk[end + 1:] if end >= 0 else b""


def _parse_cc3m_block(path: Path, block: bytes, columns: tuple[int, int, int], first_line: int, first_row: int,
                      captions: StringColumn, paths: StringColumn, problems: ProblemLog, caps) -> dict[str, Any]:
    """Split one block of whole lines (ending with a newline), append the cleaned captions and the
    paths of its good rows to the columns, report its bad rows."""
    n_cols, cap_col, path_col = columns
    buf = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(buf == 10)                           # one newline per line
    starts = np.concatenate(([0], ends[:-1] + 1))
    has_cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)   # CRLF line endings
    stops = ends - has_cr
    blank = stops == starts                                     # skipped, as pandas does
    line_no = first_line + np.arange(len(ends))
    row_no = first_row + np.cumsum(~blank) - 1

    def lines_with(byte_positions: np.ndarray) -> np.ndarray:
        flags = np.zeros(len(ends), bool)
        flags[np.searchsorted(ends, byte_positions)] = True
        return flags

    tabs = np.flatnonzero(buf == 9)
    too_long = ~blank & (stops - starts > caps.max_row_bytes)
    wrong_fields = ~blank & ~too_long & (np.searchsorted(tabs, stops) - np.searchsorted(tabs, starts) != n_cols - 1)
    has_nul = lines_with(np.flatnonzero(buf == 0)) & ~blank & ~wrong_fields & ~too_long
    good = ~blank & ~wrong_fields & ~has_nul & ~too_long
    non_ascii = lines_with(np.flatnonzero(buf >= 0x80)) & good
    bad_utf8 = np.zeros(len(ends), bool)
    for i in np.flatnonzero(non_ascii):  # rare: rows with non-ASCII text
        try:
            block[starts[i]:stops[i]].decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8[i] = True
    good &= ~bad_utf8

    if good.all() and not has_cr.any():
        kept = block
    else:
        keep = np.repeat(good, ends - starts + 1)
        keep[(ends - 1)[has_cr & good]] = False
        kept = buf[keep].tobytes()
    fields = kept.replace(b"\t", b"\n").split(b"\n")[:-1]
    raw_captions = fields[cap_col::n_cols]
    cleaned = clean_captions_ascii(b"\x00".join(raw_captions)) + b"\x00" if raw_captions else b""
    redo = np.flatnonzero(non_ascii[good])
    chars = {}                    # caption length in characters where it differs from the bytes (non-ASCII)
    if len(redo):
        parts = cleaned.split(b"\x00")
        for k in redo:
            text = clean_caption(raw_captions[k].decode("utf-8"))
            parts[k], chars[k] = text.encode("utf-8"), len(text)
        cleaned = b"\x00".join(parts)
    cap_len = captions.append(cleaned)
    raw_paths = fields[path_col::n_cols]
    path_len = paths.append(b"\x00".join(raw_paths) + b"\x00" if raw_paths else b"")

    kept_lines = line_no[good]
    no_caption = cap_len == 0
    no_path = (path_len == 0) & ~no_caption
    long_text = cap_len > caps.max_text_chars
    for k in np.flatnonzero(long_text):
        long_text[k] = chars.get(int(k), cap_len[k]) > caps.max_text_chars
    long_text &= ~no_path
    problems.add_lines(path, {
        too_long_row(caps): line_no[too_long],
        f"not {n_cols} tab-separated fields (a missing or extra column)": line_no[wrong_fields],
        "NUL character in the line": line_no[has_nul],
        "not valid UTF-8": line_no[bad_utf8],
        "empty caption": kept_lines[no_caption],
        "empty image_path": kept_lines[no_path],
        too_long_text(caps): kept_lines[long_text],
    })
    return {"rows": row_no[good], "lines": kept_lines, "valid": np.flatnonzero(~no_caption & ~no_path & ~long_text),
            "next_line": first_line + len(ends), "next_row": first_row + int((~blank).sum())}


def outside_rows(paths: StringColumn, root: str, positions: np.ndarray) -> np.ndarray:
    """Of the strings at `positions` of `paths`, those (their positions) that leave `root`. Only
    strings starting with `/` or containing `..` can, and they are found with one scan of the
    buffer, so a 3.3 M-row column costs no Python code per row."""
    buffer, ends = paths.buffer, paths.ends
    if not len(ends):
        return positions[:0]
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts
    first = np.frombuffer(buffer, np.uint8)[np.minimum(starts, len(buffer) - 1)]
    dots = np.array([m.start() for m in re.finditer(rb"\.\.", buffer)], dtype=np.int64)
    candidates = np.union1d(np.flatnonzero((first == ord("/")) & (lengths > 0)), np.searchsorted(ends, dots))
    candidates = candidates[np.isin(candidates, positions)]
    return np.array([p for p in candidates.tolist() if path_leaves(root, paths[p])], dtype=np.int64)
