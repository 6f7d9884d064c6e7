"""`python -m toyworld build`: the whole toy world, from nothing to a trained MiniGPT-5 and its report.

    datasets       the world's pictures and texts in the release's three formats (data/)
    preset         a random toy preset in the real file formats (toy.yaml + weight files)
    sd             VAE, CLIP text encoder, UNet trained on the world's captioned pictures (sd/)
    llm            tokenizer and LLaMA trained on the world's text (llama/)
    image_side     EVA-ViT + Q-Former + llama_proj trained to caption pictures (the LAVIS / MiniGPT-4 files)
    stage0         MiniGPT-5's trainable parts as built, untrained (the "no training" reference)
    stage1 ...     MiniGPT-5 trained by the unchanged train_eval.py: stage 1 on the toy CC3M, stage 2
                   on the toy VIST and MMDialog from it, and the ablations (checkpoints/)
    two_pictures_data, stage2_two_pictures, predict_two_pictures
                   the two-picture task (toyworld/two_pictures.py), when the settings' `two_pictures` sizes it
    <pairing>_*    a second pairing's pretraining, stage 1 and prediction (toyworld/pairing.py), for
                   each pairing the settings' `pairings` list names
    extractors     metric.py's toy CLIP and toy scene classifier (in Inception's place)
    predict_*      predictions of each test set by a model or an ablation, judged (and metric.py)
    report         the judge's scores, metric.py's figures, the times -> TOY_RESULTS.md

Every step records what it made in `steps/<name>.json`, keyed by its settings and those of the
steps it depends on: a second run skips what is done (an interrupted step starts again), and a
changed setting redoes that step and everything after it. `--force STEP` redoes one step onward.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "config" / "toyworld.yaml"
DEFAULT_OUT = REPO / "weights" / "toy"
# Environment of the steps `--jobs` starts side by side: the build run they belong to (for the
# report's wall clock).
RUN_ID = "TOYWORLD_BUILD_RUN"


@dataclass
class Step:
    name: str
    run: Callable[["Build"], dict]
    depends: tuple[str, ...] = ()
    settings: Callable[["Build"], object] = lambda build: None
    about: str = ""
    # CPU threads of the step when steps run side by side: "share" (the CPU's threads / --jobs) or
    # "all" (a long step that mostly runs alone). Fixed by the step and --jobs, never by what happens
    # to run beside it: a float sum split over other threads rounds differently, and a build must give
    # the same bytes every time.
    threads: str = "share"
    # The cores the step takes when steps run side by side (a data-parallel step's processes, each
    # with one thread); it starts when that many are free, and no later step takes one meanwhile.
    cores: Callable[["Build"], int] = lambda build: 1
    # Whether the settings ask for this step (an optional task or pairing, e.g. `pairings:`).
    enabled: Callable[["Build"], bool] = lambda build: True
    # Steps this one waits for when steps run side by side, though it reads nothing of theirs: for
    # the order only, so not part of its key (a step with no inputs would otherwise take a core
    # before the build's longest chain can start).
    starts_after: tuple[str, ...] = ()


@dataclass
class Build:
    """One build: its settings (`config/toyworld*.yaml`), its output folder, and what is done."""

    config_path: Path
    out: Path
    python: str = sys.executable
    settings: dict = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.config_path, self.out = Path(self.config_path).resolve(), Path(self.out).resolve()
        with open(self.config_path) as f:
            self.settings = yaml.safe_load(f)
        (self.out / "steps").mkdir(parents=True, exist_ok=True)

    # ---- paths -------------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def model_config(self) -> Path:
        return self.out / "toy.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def predictions(self) -> Path:
        return self.out / "predictions"

    def config_file(self, key: str) -> Path:
        return (self.config_path.parent / self.settings[key]).resolve()

    # ---- running another command of the project ----------------------------------------------
    def command(self, args: list[str], env: dict[str, str], what: str) -> None:
        """Run `python args...` from the repository root with `env` added; its output goes to
        `logs/<what>.log`; a failure stops the build and shows the log's end."""
        log_path = self.out / "logs" / f"{what}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        with open(log_path, "w") as log_file:
            log_file.write(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join([self.python, *args]) + "\n")
            log_file.flush()
            done = subprocess.run([self.python, *args], cwd=REPO, env=full_env, stdout=log_file,
                                  stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = log_path.read_text().splitlines()[-25:]
            raise SystemExit(f"error: {what} failed (exit {done.returncode}); the end of {log_path}:\n"
                             + "\n".join(tail))

    # ---- the steps' records ------------------------------------------------------------------
    def record_path(self, name: str) -> Path:
        return self.out / "steps" / f"{name}.json"

    def record(self, name: str) -> dict | None:
        path = self.record_path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def key(self, step: Step) -> str:
        upstream = [self.record(d)["key"] for d in step.depends if self.record(d) is not None]
        text = json.dumps([step.name, step.settings(self), upstream], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def steps(build: Build | None = None) -> list[Step]:
    """The build's steps, in order (see the module docstring): all of them, or those the settings'
    `steps` list names. With `frozen_parts` (a shipped toy preset) the frozen parts are copied from
    there instead of being pretrained."""
    from toyworld import stages

    plan = stages.STEPS
    if build is None:
        return plan
    if build.settings.get("frozen_parts"):
        plan = [s for s in plan if s.name not in stages.PRETRAINING]
    from toyworld.pairing import PAIRINGS

    unknown = sorted(set(build.settings.get("pairings") or []) - set(PAIRINGS))
    if unknown:
        raise SystemExit(f"error: {build.config_path}: `pairings` names unknown pairing(s) {unknown}; known: "
                         f"{list(PAIRINGS)}")
    plan = [s for s in plan if s.enabled(build)]
    names = {s.name for s in stages.STEPS}
    unknown = sorted(set(build.settings.get("minigpt5") or {}) - {"common", "stage1", "stage2"} - names)
    if unknown:
        raise SystemExit(f"error: {build.config_path}: `minigpt5` has flags for unknown step(s) {unknown} "
                         "(its keys: common, stage1, stage2, or a training step's name, e.g. stage2_mmdialog)")
    wanted = build.settings.get("steps")
    if wanted:
        unknown = sorted(set(wanted) - names)
        if unknown:
            raise SystemExit(f"error: {build.config_path}: `steps` names unknown step(s) {unknown}")
        plan = [s for s in plan if s.name in wanted]
    for step in plan:                             # a bad `processes` setting stops the build before it starts
        step.cores(build)
    return plan


def run(build: Build, only: list[str] | None = None, force: list[str] | None = None, jobs: int = 1) -> dict[str, dict]:
    """Run every step that is not done (or all from a forced one on); print a progress report.
    With `jobs` > 1, steps whose inputs are ready run side by side, each in its own process with
    its share of the CPU's threads (the small models here use two single-threaded processes
    better than one process with two threads)."""
    plan = steps(build)
    names = [s.name for s in plan]
    for name in (only or []) + (force or []):
        if name not in names:
            raise SystemExit(f"error: no build step {name!r}; the steps are {', '.join(names)}")
    if jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1, got {jobs}")
    forced_from = min((names.index(f) for f in force or []), default=len(names))
    results, started = {}, time.time()
    if not (only and RUN_ID in os.environ):     # a step started side by side belongs to its parent's run
        os.environ[RUN_ID] = f"{os.getpid()}-{started:.0f}"
    print(f"toy world build: {build.out} (settings {build.config_path})")
    todo = []
    for i, step in enumerate(plan, start=1):
        if only and step.name not in only:
            if build.record(step.name) is not None:
                results[step.name] = build.record(step.name)
            continue
        if only:
            queued = {s.name for _, s in todo}
            missing = [d for d in step.depends if d in names and d not in queued and build.record(d) is None]
            if missing:
                raise SystemExit(f"error: step {step.name!r} needs {', '.join(missing)} first (run the build "
                                 f"without --only)")
        todo.append((i, step))
    progress = _Progress(len(plan))
    if jobs == 1:
        for i, step in todo:
            results[step.name] = _run_here(build, i, step, i - 1 >= forced_from, progress)
    else:
        results.update(_run_side_by_side(build, todo, forced_from, jobs, progress))
    total = sum(r["seconds"] for r in results.values())
    print(f"toy world build finished: {time.time() - started:.0f} s this run, {total:.0f} s of steps in all; "
          f"preset {build.model_config}")
    return results


@dataclass
class _Progress:
    steps: int

    def say(self, i: int, name: str, text: str) -> None:
        print(f"[{i:2d}/{self.steps}] {name:<18} {text}", flush=True)

    def done(self, i: int, name: str, record: dict) -> None:
        shown = ", ".join(f"{k} {v}" for k, v in (record.get("summary") or {}).items()
                          if not isinstance(v, (dict, list)))
        self.say(i, name, f"done in {record['seconds']:.0f} s" + (f": {shown}" if shown else ""))


def _up_to_date(build: Build, step: Step, forced: bool) -> dict | None:
    record = build.record(step.name)
    return record if record is not None and record["key"] == build.key(step) and not forced else None


def _run_here(build: Build, i: int, step: Step, forced: bool, progress: _Progress) -> dict:
    """Run one step in this process (unless it is done) and record it."""
    record = _up_to_date(build, step, forced)
    if record is not None:
        progress.say(i, step.name, f"done before ({record['seconds']:.0f} s)")
        return record
    progress.say(i, step.name, step.about)
    import torch

    key = build.key(step)
    t0 = time.time()
    build.record_path(step.name).unlink(missing_ok=True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)      # the same bytes every time (train_eval.py: --deterministic)
    try:
        summary = step.run(build)
    finally:                                      # the caller's setting again (a test session, say)
        torch.use_deterministic_algorithms(before)
    # Which `python -m toyworld build` ran it (a step run side by side is that build's too): the
    # report gives a wall clock only when one run made every step.
    record = {"key": key, "run": os.environ[RUN_ID], "started": round(t0, 1), "seconds": round(time.time() - t0, 1),
              "summary": summary}
    build.record_path(step.name).write_text(json.dumps(record, indent=1, default=str))
    progress.done(i, step.name, record)
    return record


def _run_side_by_side(build: Build, todo: list[tuple[int, Step]], forced_from: int, jobs: int,
                      progress: _Progress) -> dict[str, dict]:
    """Run the steps in `todo` as separate `python -m toyworld build --only STEP` processes, at most
    `jobs` at a time, each as soon as the steps it depends on are done."""
    results, running = {}, {}
    waiting = list(todo)
    pending = {step.name for _, step in todo}
    (build.out / "logs").mkdir(parents=True, exist_ok=True)

    while waiting or running:
        free = jobs - sum(cores for *_, cores in running.values())
        chosen = startable(build, waiting, pending, free, jobs)
        for i, step, cores in chosen:
            waiting.remove((i, step))
            record = _up_to_date(build, step, i - 1 >= forced_from)
            if record is not None:
                progress.say(i, step.name, f"done before ({record['seconds']:.0f} s)")
                results[step.name] = record
                pending.discard(step.name)
                continue
            build.record_path(step.name).unlink(missing_ok=True)
            threads = step_threads(step, jobs)
            env = step_environment(threads)
            log = open(build.out / "logs" / f"step_{step.name}.log", "w")
            command = [build.python, "-m", "toyworld", "build", "--config", str(build.config_path),
                       "--out", str(build.out), "--only", step.name]
            running[step.name] = (i, step, subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                                            stderr=subprocess.STDOUT), log, cores)
            how = f"{cores} processes" if cores > 1 else f"{threads} thread{'s' * (threads > 1)}"
            progress.say(i, step.name, f"{step.about} (started, {how}; log logs/step_{step.name}.log)")
        if not running:
            if not waiting:
                break
            if not chosen:
                raise SystemExit(f"error: steps {[s.name for _, s in waiting]} wait on steps that did not run")
            continue                              # only steps done before: look again at once
        time.sleep(1)
        for name, (i, step, process, log, _) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            record = build.record(name)
            if process.returncode != 0 or record is None:
                for other in running.values():
                    other[2].terminate()
                tail = (build.out / "logs" / f"step_{name}.log").read_text().splitlines()[-25:]
                raise SystemExit(f"error: step {name} failed (exit {process.returncode}); the end of its log:\n"
                                 + "\n".join(tail))
            results[name] = record
            pending.discard(name)
            progress.done(i, name, record)
    return results


def startable(build: Build, waiting: list[tuple[int, Step]], pending: set[str], free: int,
              jobs: int) -> list[tuple[int, Step, int]]:
    """The waiting steps to start now, with the cores each takes: ready ones in the plan's order
    while cores are free. A ready step that needs more cores than are free waits for them, and no
    later step takes one meanwhile (else the build's longest step could wait behind shorter ones)."""
    chosen = []
    for i, step in waiting:
        if free <= 0:
            break
        if not ready(step, pending):
            continue
        cores = min(step.cores(build), jobs)
        if cores > free:
            break
        chosen.append((i, step, cores))
        free -= cores
    return chosen


def ready(step: Step, pending: set[str]) -> bool:
    """Whether `step` may start side by side: none of the steps it reads from, or starts after, is
    still to run (`pending`)."""
    return not any(d in pending for d in step.depends + step.starts_after)


def step_environment(threads: int) -> dict[str, str]:
    """The environment of a step's process: its threads, and OpenMP threads that sleep while they
    wait (unless OMP_WAIT_POLICY is set). OpenMP's threads spin by default; when any other process
    holds a core, a step's threads spin on a barrier while the thread they wait for is not running.
    Measured on 2 cores beside two busy processes: a small conv net's training steps on 2 threads ran
    3.7x faster with PASSIVE (43.8 against 11.8 steps/s), and the UNet step crawled at 0.1 steps/s
    beside one other training process instead of 10."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def step_threads(step: Step, jobs: int) -> int:
    """The CPU threads a step started side by side runs with: all of them for a step marked "all",
    else the CPU's threads / `jobs`. A function of the step, --jobs and the machine only."""
    cpus = os.cpu_count() or 1
    return cpus if step.threads == "all" else max(1, cpus // jobs)
