"""`python -m toyworld`: build the toy world and everything trained in it, or copy a build into the
repository's shipped toy preset.

    python -m toyworld build [--config config/toyworld.yaml] [--out weights/toy] [--force STEP] [--jobs 2]
    python -m toyworld ship [--out weights/toy] [--to toyworld/pretrained] [--config config/toyworld.yaml]
    python -m toyworld probe [--out weights/toy] [--checkpoint stage2_vist.ckpt]
    python -m toyworld sd-probe [--out weights/toy] [--repeats 4]
    python -m toyworld steps
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> None:
    from toyworld import build as build_module
    from toyworld import ship

    parser = argparse.ArgumentParser(prog="python -m toyworld", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="make the world, pretrain the frozen parts, train and evaluate MiniGPT-5")
    b.add_argument("--config", default=str(build_module.DEFAULT_CONFIG), help="world and recipe settings")
    b.add_argument("--out", default=str(build_module.DEFAULT_OUT), help="build folder (the toy preset)")
    b.add_argument("--force", nargs="*", default=[], metavar="STEP", help="redo these steps and all after them")
    b.add_argument("--only", nargs="*", default=None, metavar="STEP", help="run only these steps")
    b.add_argument("--jobs", type=int, default=2, help="steps run side by side when their inputs are ready, each "
                   "in its own process with its share of the CPU threads (default 2; 1: one after another, "
                   "in this process)")
    s = sub.add_parser("ship", help="copy a build's preset and checkpoints, small, into the repository")
    s.add_argument("--out", default=str(build_module.DEFAULT_OUT), help="the build folder to copy from")
    s.add_argument("--to", default=str(ship.SHIPPED), help="where the shipped preset goes")
    s.add_argument("--config", default=str(build_module.DEFAULT_CONFIG),
                   help="the build's settings (the demos take its evaluation guidance scale)")
    p = sub.add_parser("probe", help="linear probes: what a build's stage-2 vokens carry of the picture to draw")
    p.add_argument("--out", default=str(build_module.DEFAULT_OUT), help="the finished build folder")
    p.add_argument("--config", default=str(build_module.DEFAULT_CONFIG), help="the build's settings")
    p.add_argument("--checkpoint", default="stage2_vist.ckpt", help="the stage-2 checkpoint on the stories, "
                   "in the build's checkpoints folder (default stage2_vist.ckpt)")
    d = sub.add_parser("sd-probe", help="what a build's toy SD draws from the caption alone: held-out against seen "
                       "combinations, the test wording against the training wording")
    d.add_argument("--out", default=str(build_module.DEFAULT_OUT), help="the build folder (its sd/)")
    d.add_argument("--repeats", type=int, default=4, help="captions per combination (default 4)")
    sub.add_parser("steps", help="list the build's steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "steps":
        for step in build_module.steps():
            print(f"{step.name:<30} {step.about}")
        return
    if args.command == "ship":
        written = ship.ship(Path(args.out), Path(args.to), ship.evaluation_guidance(Path(args.config)),
                            ship.story_mode(Path(args.config)))
        print(f"shipped toy preset written to {written}")
        return
    if args.command == "sd-probe":
        from toyworld import sd_probe

        written = sd_probe.run(Path(args.out), args.repeats)
        print(written.read_text() + f"\nwritten to {written} (and {written.with_suffix('.json').name})")
        return
    config = Path(args.config)
    if not config.is_file():
        raise SystemExit(f"error: --config {args.config!r} does not exist")
    if args.command == "probe":
        from toyworld import probe

        written = probe.run(build_module.Build(config, Path(args.out)), args.checkpoint)
        print(written.read_text() + f"\nwritten to {written} (and {written.with_suffix('.json').name})")
        return
    jobs = 1 if args.only else args.jobs
    build_module.run(build_module.Build(config, Path(args.out)), only=args.only, force=args.force, jobs=jobs)


if __name__ == "__main__":
    main()
