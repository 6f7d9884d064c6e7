"""Samples per second delivered by the CC3M shard loader (shards.py) vs the TSV + folder loader
(dataloader.CC3MDataset), on the same pictures in the same run, and the memory of their workers.

Writes N pictures (256 x 256 JPEGs, img2dataset's default size) with captions as a TSV + folder, converts
them with scripts/tsv_to_shards.py (1000 per shard), then, alternating the two loaders for R repeats:
- the training loaders as train_eval.py builds them (stage-1 items: tokenised text, the target picture
  decoded and transformed to 512 x 512, the collator; K worker processes, batch B), one epoch each;
- the bytes alone (no decoding), one process: opening and reading each picture file vs streaming the
  shards;
- memory per DataLoader worker (RSS and USS, the pages only that worker holds), sampled while it runs.
Both read from the page cache (the files were just written); a network file system or a cold disk,
where many small files cost one request each, is not measured here. Reports medians and the ratio
shards / TSV; writes a Markdown section into benchmarks/RESULTS.md (`--write`) or `--out FILE`.

    python benchmarks/bench_shards.py [--pictures 10000] [--workers 2] [--batch 8] [--repeats 2] [--write]
    python benchmarks/bench_shards.py --dry_run --out /tmp/shards.md     # tiny workload (CI): figures mean nothing
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
SECTION = "## Shard loader vs TSV + folder (CC3M, stage 1)"


def write_pictures(root: Path, n: int, seed: int = 0) -> Path:
    """`root/cc3m.tsv` + `root/images/{row}.jpg`: smooth colour fields with noise (JPEGs of ~15-30 kB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    y, x = np.mgrid[0:256, 0:256] / 255.0
    lines = ["caption\timage_path"]
    for row in range(n):
        a, b, c = rng.random(3)
        base = np.stack([a * x + (1 - a) * y, b * y, c * (1 - x)], axis=-1) * 255
        noise = rng.normal(0, 12, size=base.shape)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(root / "images" / f"{row}.jpg",
                                                                          quality=90)
        lines.append(f"A picture number {row}, colours {a:.2f} {b:.2f} {c:.2f}: test image.\timages/{row}.jpg")
    (root / "cc3m.tsv").write_text("\n".join(lines) + "\n")
    return root / "cc3m.tsv"


class WorkerMemory:
    """Samples the RSS and USS of this process's children (the DataLoader workers) every 0.2 s."""

    def __init__(self):
        import psutil

        self.me, self.rss, self.uss = psutil.Process(), [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for child in self.me.children():
                try:
                    info = child.memory_full_info()
                except psutil.Error:
                    continue
                self.rss.append(info.rss / 2**20)
                self.uss.append(info.uss / 2**20)
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def epoch(loader) -> tuple[int, float, WorkerMemory]:
    with WorkerMemory() as memory:
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["task_names"])
        seconds = time.perf_counter() - start
    return n, seconds, memory


def read_bytes_tsv(dataset) -> int:
    total = 0
    for i in range(len(dataset)):
        with open(dataset.sample(i).output_image_path, "rb") as f:
            total += len(f.read())
    return total


def read_bytes_shards(dataset) -> int:
    return sum(len(raw["jpg"]) for _, raw in dataset._raw_samples(np.arange(len(dataset))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--pictures", type=int, default=10000)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of each loader")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--per_shard", type=int, default=1000)
    p.add_argument("--model_config", default=None,
                   help="the preset whose tokenizer to use (default: build the tiny preset in a temporary folder)")
    p.add_argument("--dry_run", action="store_true", help="64 pictures, 1 repeat, 64 px targets: checks that it runs")
    p.add_argument("--write", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    p.add_argument("--out", default=None, help="write the section to this file instead")
    args = p.parse_args(argv)
    if args.dry_run:
        args.pictures, args.repeats, args.per_shard = 64, 1, 16
    import torch

    import dataloader as D
    import shards as S
    import presets
    from minigpt4 import load_tokenizer
    from tsv_to_shards import convert

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        started = time.perf_counter()
        tsv = write_pictures(work / "CC3M", args.pictures)
        convert(tsv, work / "shards", samples_per_shard=args.per_shard)
        shard_files = sorted((work / "shards").glob("*.tar"))
        if args.model_config:
            from configuration import load_config

            tokenizer = load_tokenizer(load_config(args.model_config).llama_model)
        else:
            tokenizer = load_tokenizer(presets.build_tiny(work / "tiny", seed=0).parent / "llama")
        # The real image sizes (224 input, 512 SD target); the tiny tokenizer.
        cfg = SimpleNamespace(image_size=224, sd_image_size=64 if args.dry_run else 512)
        collate = D.Collator(tokenizer)
        tsv_set = D.CC3MDataset(tsv, tokenizer=tokenizer, cfg=cfg, is_training=True)
        t = time.perf_counter()
        shard_set = S.CC3MShards(shard_files, tokenizer=tokenizer, cfg=cfg, is_training=True)
        index_seconds = time.perf_counter() - t
        assert len(tsv_set) == len(shard_set)

        def tsv_loader():
            from resume import EpochSampler, ResumableLoader

            return ResumableLoader(tsv_set, batch_size=args.batch, sampler=EpochSampler(tsv_set, 0, False),
                                   num_workers=args.workers, collate_fn=collate)

        def shard_loader():
            return S.ShardLoader(S.ShardBatches(shard_set, args.batch, collate, args.workers, 1), args.workers)

        rates = {"tsv": [], "shards": []}
        memory = {"tsv": ([], []), "shards": ([], [])}
        byte_rates = {"tsv": [], "shards": []}
        for _ in range(args.repeats):
            for name, make in (("tsv", tsv_loader), ("shards", shard_loader)):
                n, seconds, mem = epoch(make())
                assert n == len(tsv_set), (name, n)
                rates[name].append(n / seconds)
                memory[name][0].extend(mem.rss)
                memory[name][1].extend(mem.uss)
            for name, read, dataset in (("tsv", read_bytes_tsv, tsv_set), ("shards", read_bytes_shards, shard_set)):
                t = time.perf_counter()
                read(dataset)
                byte_rates[name].append(len(dataset) / (time.perf_counter() - t))
        ratio = statistics.median(s / t for s, t in zip(rates["shards"], rates["tsv"]))
        byte_ratio = statistics.median(s / t for s, t in zip(byte_rates["shards"], byte_rates["tsv"]))
        med = {k: statistics.median(v) for k, v in rates.items()}
        bmed = {k: statistics.median(v) for k, v in byte_rates.items()}
        mem_max = {k: (max(v[0], default=0.0), max(v[1], default=0.0)) for k, v in memory.items()}
        size = sum(f.stat().st_size for f in shard_files) / 2**20
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        lines = [
            SECTION, "",
            f"`python benchmarks/bench_shards.py{' --dry_run' if args.dry_run else ''}` -- {now}, "
            f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
            f"{args.repeats} alternating repeats, medians; run took {(time.perf_counter() - started) / 60:.1f} min."
            + (" DRY RUN: a tiny workload that checks the script runs; the figures mean nothing." if args.dry_run
               else ""), "",
            f"Data: {args.pictures} pictures, 256 x 256 JPEG ({size:.0f} MiB in {len(shard_files)} shards of "
            f"{args.per_shard}), {len(tsv_set)} stage-1 training samples (every 100th row adds its instruction "
            f"sample); both loaders read from the page cache.", "",
            "| measured | TSV + folder | shards | shards / TSV |", "|---|---|---|---|",
            f"| training loader, {args.workers} workers, batch {args.batch} (decode, {cfg.sd_image_size} px target, "
            f"tokenise, collate): samples/s | {med['tsv']:.0f} | {med['shards']:.0f} | {ratio:.2f} |",
            f"| bytes only, one process: samples/s | {bmed['tsv']:.0f} | {bmed['shards']:.0f} | {byte_ratio:.2f} |",
            f"| memory per worker, peak RSS / USS (MiB) | {mem_max['tsv'][0]:.0f} / {mem_max['tsv'][1]:.0f} | "
            f"{mem_max['shards'][0]:.0f} / {mem_max['shards'][1]:.0f} | |",
            f"| index at start (s) | | {index_seconds:.2f} (tar headers of {len(shard_files)} shards) | |", "",
            "USS is what a worker holds alone (its decoded pictures, buffers); RSS also counts the pages it "
            "shares with the main process (torch, the tokenizer, the dataset index).", "",
        ]
        text = "\n".join(lines)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        elif args.write:
            results = REPO / "benchmarks" / "RESULTS.md"
            current = results.read_text()
            if SECTION in current:
                before, rest = current.split(SECTION, 1)
                after = rest[rest.find("\n## "):] if "\n## " in rest else ""
                current = before + text + after
            else:
                current = current.rstrip("\n") + "\n\n" + text
            results.write_text(current)
            print(f"wrote {results}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
