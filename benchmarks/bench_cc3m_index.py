"""How long indexing a CC3M-sized TSV takes, and how much memory it needs.

Writes a synthetic `caption<TAB>image_path` file of 3.3 M rows (CC3M's size; captions of 4-25
words with capitals, punctuation and some non-ASCII text) into a temporary folder, then builds
`CC3MDataset(path, is_training=True)` in a fresh Python process and prints the seconds spent,
the peak resident memory of that process (ru_maxrss) and the memory the imports alone take.

Usage: python benchmarks/bench_cc3m_index.py [--rows 3300000] [--keep]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORDS = ("a the man woman dog cat on in with of and beach city park red blue green tree house car sky "
         "sunset people group young old photo image view street portrait actor football player team "
         "mountain river bridge flowers wedding christmas vector illustration background white black "
         "isolated business concept happy smiling girl boy family kitchen food").split()
EXTRA = ["café", "naïve", "Ελλάδα", "東京", "smile 😀", "über"]
PUNCT = [".", " .", "!", ":", " ;", "", "", ""]

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import dataloader
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
ds = dataloader.CC3MDataset({path!r}, is_training=True)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "peak_rss_mb": peak / 1024, "import_rss_mb": base / 1024,
                  "samples": len(ds), "rows": int(len(ds.table.rows)), "problems": ds.problems.total,
                  "first": ds.sample(0).record()}}))
"""


def write_tsv(path: Path, rows: int, seed: int = 0) -> None:
    """A synthetic CC3M TSV: 50 000 distinct captions repeated, written in large blocks."""
    rng = random.Random(seed)
    captions = []
    for i in range(50_000):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 25))]
        if i % 100 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(EXTRA))
        text = " ".join(words)
        captions.append((text.capitalize() if i % 3 else text.upper()) + rng.choice(PUNCT))
    with open(path, "w", encoding="utf-8") as f:
        f.write("caption\timage_path\n")
        step = 100_000
        for start in range(0, rows, step):
            f.write("".join(f"{captions[i % len(captions)]}\ttraining/{i:09d}.jpg\n"
                            for i in range(start, min(rows, start + step))))


def main() -> None:
    """Generate the file, index it in a child process, print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_300_000)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_cc3m_"))
    try:
        path = tmp / "cc3m_train.tsv"
        t = time.perf_counter()
        write_tsv(path, args.rows)
        print(f"wrote {args.rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
        out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), path=str(path))],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"index: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MiB "
              f"(of which imports {result['import_rss_mb']:.0f} MiB), {result['rows']:,} rows, "
              f"{result['samples']:,} samples, {result['problems']} problems")
        print("first sample:", json.dumps(result["first"]))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
