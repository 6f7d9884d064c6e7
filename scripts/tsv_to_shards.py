"""Convert a CC3M TSV (`caption<TAB>image_path`) and its folder of pictures into WebDataset shards
laid out as `img2dataset --output_format webdataset` writes them, for streamed stage-1 training:

    OUT/00000.tar, OUT/00001.tar, ...   members {key}.jpg (the picture's bytes, unchanged),
                                        {key}.txt (the caption), {key}.json ({"key", "row",
                                        "caption", "image_path", "status"})

The key is the TSV row (`cc3m_{row}`; blank lines are not rows), zero-padded to 9 digits as
img2dataset's keys are, so the shards give the same samples, task names and instruction samples as
the TSV. Captions are written cleaned (cleaning again changes nothing); pictures keep their bytes
and extension (jpg, jpeg, png, webp; others are written as png). Rows the TSV reader skips (bad
fields, empty caption) and pictures that are missing or unreadable are left out, counted and
logged; `--strict` stops at the first instead. Image paths that leave the image folder are refused
unless `--allow_outside_paths`, as the TSV reader does.

    python scripts/tsv_to_shards.py datasets/CC3M/cc3m_train.tsv shards/cc3m_train \\
        [--samples_per_shard 10000] [--image_root FOLDER]
    DATAFOLDER=shards python train_eval.py --is_training True --train_data_path 'cc3m_train/{00000..00009}.tar' ...
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("tsv_to_shards")


def convert(tsv: Path, out: Path, samples_per_shard: int = 10000, image_root: Path | None = None,
            strict: bool = False, allow_outside_paths: bool = False) -> dict[str, int]:
    """Write the shards; returns counts: samples written, shards, rows left out."""
    import numpy as np
    import webdataset as wds

    from data_problems import OUTSIDE_PATH, ProblemLog
    from image_transforms import IMAGE_ERRORS
    from tsv_index import outside_rows, read_cc3m_tsv
    from shards import IMAGE_EXTENSIONS

    problems = ProblemLog(strict)
    table = read_cc3m_tsv(tsv, problems)
    root = image_root or tsv.parent
    if not allow_outside_paths:                   # the TSV reader's rule: pictures stay inside the dataset folder
        bad = outside_rows(table.paths, str(root), table.valid)
        if len(bad):
            problems.add_lines(tsv, {OUTSIDE_PATH: table.lines[bad]})
            table.valid = table.valid[~np.isin(table.valid, bad)]
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=samples_per_shard, verbose=0) as writer:
        for pos in tqdm(table.valid.tolist(), desc=f"writing shards to {out}", unit="sample"):
            row, line = int(table.rows[pos]), int(table.lines[pos])
            relative = table.paths[pos]
            path = root / relative
            ext = path.suffix.lower().lstrip(".")
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    image.load()                          # a truncated file fails here, not in training
                    if ext not in IMAGE_EXTENSIONS:
                        buffer = io.BytesIO()
                        image.convert("RGB").save(buffer, format="PNG")
                        data, ext = buffer.getvalue(), "png"
            except IMAGE_ERRORS as e:
                problems.add(f"{tsv}:{line}", "unreadable image", f"image {path}: {type(e).__name__}: {e}",
                             skipped="row left out of the shards")
                continue
            caption = table.captions[pos]
            key = f"{row:09d}"
            writer.write({"__key__": key, ext: data, "txt": caption,
                          "json": json.dumps({"key": key, "row": row, "caption": caption, "image_path": relative,
                                              "status": "success"})})
            written += 1
        shards = writer.shard if written else 0
    problems.log_totals(str(tsv))
    return {"samples": written, "shards": shards, "left_out": len(table.rows) - written}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("tsv", type=Path, help="the CC3M TSV (caption<TAB>image_path)")
    parser.add_argument("out", type=Path, help="folder for the .tar shards")
    parser.add_argument("--samples_per_shard", type=int, default=10000, help="img2dataset's default: 10000")
    parser.add_argument("--image_root", type=Path, default=None, help="folder the image paths are relative to "
                                                                      "(default: the TSV's folder)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row or picture")
    parser.add_argument("--allow_outside_paths", action="store_true",
                        help="accept image paths that leave the image folder (refused by default, as the TSV reader)")
    args = parser.parse_args(argv)
    if not args.tsv.is_file():
        parser.error(f"TSV {str(args.tsv)!r} does not exist")
    if args.samples_per_shard < 1:
        parser.error("--samples_per_shard must be a positive integer")
    counts = convert(args.tsv, args.out, args.samples_per_shard, args.image_root, args.strict,
                     args.allow_outside_paths)
    if counts["samples"] == 0:
        print(f"error: no usable row in {args.tsv}; nothing written", file=sys.stderr)
        return 1
    last = counts["shards"] - 1
    print(f"wrote {counts['samples']} samples in {counts['shards']} shards to {args.out} "
          f"({args.out}/{{00000..{last:05d}}}.tar); {counts['left_out']} rows left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
