"""The toy world's report: MiniGPT-5's predictions on the toy test sets, scored by the judge.

Predictions come from the unchanged `train_eval.py --is_training False` (the release's evaluation
command) on each test set, for the trained model, its ablations and the untrained reference; every
picture is read back by the judge and compared with the scene the world says it should show.
`metric.py` scores the same prediction folders (its figures are in the report too).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from toyworld import world
from toyworld.build import REPO, Build
from toyworld.judge import CHANCE, accuracy, judge

ATTRIBUTES = tuple(world.ATTRIBUTES)


@dataclass(frozen=True)
class Run:
    """One prediction run: a test set and the checkpoints and flags it is predicted with."""

    name: str
    dataset: str
    test_weight: str
    stage1_weight: str | None = None
    flags: tuple[str, ...] = ()
    test_file: str | None = None        # another test file than the dataset's (TEST_FILES)

    @property
    def stage2(self) -> bool:
        return self.stage1_weight is not None


UNTRAINED = "stage0_untrained.ckpt"     # MiniGPT-5 as built (the build's stage0 step writes it)
RUNS = (
    Run("cc3m_stage1", "CC3M", "stage1_cc3m.ckpt"),
    Run("cc3m_stage1_guidance1", "CC3M", "stage1_cc3m.ckpt", flags=("--guidance_scale", "1")),
    Run("cc3m_no_caption_loss", "CC3M", "stage1_cc3m_no_caption_loss.ckpt"),
    Run("cc3m_untrained", "CC3M", UNTRAINED),
    Run("vist_stage2", "VIST", "stage2_vist.ckpt", "stage1_cc3m.ckpt"),
    Run("vist_stage2_no_context", "VIST", "stage2_vist.ckpt", "stage1_cc3m.ckpt",
        test_file=f"{world.NO_CONTEXT}_cleaned.json"),
    Run("vist_stage1_only", "VIST", "stage1_cc3m.ckpt"),
    Run("vist_no_stage1", "VIST", "stage2_vist_no_stage1.ckpt", UNTRAINED),
    Run("mmdialog_stage2", "MMDialog", "stage2_mmdialog.ckpt", "stage1_cc3m.ckpt"),
)
TEST_FILES = {"CC3M": "cc3m_test.tsv", "VIST": "test_cleaned.json", "MMDialog": "test/test_conversations.txt"}


def predict(build: Build, run: Run) -> Path:
    """`train_eval.py` prediction for `run`; returns the folder with its prediction files (where
    `constants.prediction_folder` puts them for the OUTPUT_FOLDER and OUTPUT_SUFFIX given to it)."""
    from constants import prediction_folder

    output, suffix = build.predictions, f"_{run.name}"
    env = {"IS_STAGE2": str(run.stage2), "WEIGHTFOLDER": str(build.checkpoints),
           "DATAFOLDER": str(build.data / run.dataset), "OUTPUT_FOLDER": str(output), "OUTPUT_SUFFIX": suffix}
    args = ["train_eval.py", "--is_training", "False", "--model_config", str(build.model_config),
            "--test_data_path", _test_file(run), "--test_weight", run.test_weight,
            "--accelerator", "cpu", "--gpus", "0", "--overwrite", "--deterministic", *build.settings["evaluate"]["flags"],
            *run.flags]
    if run.stage1_weight:
        args += ["--stage1_weight", run.stage1_weight]
    build.command(args, env, f"predict_{run.name}")
    return prediction_folder(run.test_weight, output, suffix)


# ---- what each prediction should show ------------------------------------------------------------

def _test_file(run: Run) -> str:
    return run.test_file or TEST_FILES[run.dataset]


def _truth(build: Build, dataset: str, test_file: str | None = None) -> dict[str, dict]:
    """Task name -> the attributes its expected picture shows (pictures of the test split; for VIST,
    of the stories in `test_file`)."""
    folder = build.data / dataset
    if dataset == "CC3M":
        scenes = json.loads((folder / "scenes_test.json").read_text())
        return {f"cc3m_{row}": attributes for row, attributes in enumerate(scenes)}
    if dataset == "VIST":
        scenes = json.loads((folder / "scenes_test.json").read_text())
        stories = json.loads((folder / (test_file or TEST_FILES["VIST"])).read_text())
        return {f"{story}_{step['sequence_index']}-gen": scenes[step["image_id"]]
                for story, steps in stories.items() for step in steps}
    scenes = json.loads((folder / "test" / "scenes.json").read_text())
    truth = {}
    for line in (folder / "test" / "test_conversations.txt").read_text().splitlines():
        conversation = json.loads(line)
        for j, turn in enumerate(conversation["conversation"]):
            media = turn["turn"][1]["__MEDIA__"] if len(turn["turn"]) > 1 else None
            truth[f"{conversation['conversation_id']}_{j}-mm"] = scenes[media] if media else None
    return truth


def _has_vokens(text: str) -> bool:
    return "[IMG0]" in text


@dataclass
class Scored:
    """A run's predictions, judged."""

    run: Run
    tasks: list[str]
    truth: list[dict | None]
    judged: list[dict | None]           # the judge's reading of the generated picture (None: no picture)
    baseline: list[dict | None]         # the same for the SD baseline picture (CC3M)
    emitted: list[bool]                 # whether the answer holds [IMG0]
    folder: Path


def score(build: Build, run: Run, folder: Path) -> Scored:
    from metric import load_predictions

    truth = _truth(build, run.dataset, _test_file(run))
    samples = load_predictions(folder)
    tasks, expected, judged, baseline, emitted = [], [], [], [], []
    for sample in samples:
        tasks.append(sample.task)
        expected.append(truth.get(sample.task))
        judged.append(judge(sample.pred_image) if sample.pred_image is not None else None)
        baseline.append(judge(sample.baseline_image) if sample.baseline_image is not None else None)
        emitted.append(_has_vokens(sample.pred_text))
    return Scored(run, tasks, expected, judged, baseline, emitted, folder)


def _select(scored: Scored, keep, pictures: list | None = None) -> tuple[list, list]:
    """The judged pictures (MiniGPT-5's, or `pictures`, e.g. the SD baseline's) of the tasks `keep`
    selects, with their truth."""
    pictures = scored.judged if pictures is None else pictures
    pairs = [(j, t) for task, j, t in zip(scored.tasks, pictures, scored.truth) if keep(task, t)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _known(task: str, truth) -> bool:
    """A task whose expected picture the test split knows (not a text-only dialogue turn: a picture
    drawn there counts against emission, not accuracy)."""
    return truth is not None


def _later_frame(task: str, truth) -> bool:
    """A story frame after the first (its scene follows from the context only)."""
    return truth is not None and task.endswith("-gen") and not task.rsplit("-", 1)[0].endswith("_0")


def _asked_picture(task: str, truth) -> bool:
    """The dialogue turn where the assistant answers a request for a picture."""
    return truth is not None and task.endswith(f"_{world.ASKED_TURN}-mm")


# ---- the story baselines -------------------------------------------------------------------------

def _reading(known: dict, told: dict) -> dict:
    """What the text alone says of a frame, after the frames before it said `known`: the attributes
    its caption names, and a time moved on from a time named before."""
    known = dict(known)
    if "time_steps" in told and "time" in known:
        known["time"] = world.TIMES[(world.TIMES.index(known["time"]) + told["time_steps"]) % len(world.TIMES)]
    known.update({k: v for k, v in told.items() if k != "time_steps"})
    return known


def _later_frames(folder: Path, split: str):
    """(what the captions so far tell, as a key; what the text alone says; the frame's scene; the
    previous frame's scene) for every story frame after the first of a VIST split."""
    stories = json.loads((folder / f"{split}_cleaned.json").read_text())
    scenes = json.loads((folder / f"scenes_{split}.json").read_text())
    told = json.loads((folder / f"told_{split}.json").read_text())
    for steps in stories.values():
        ids, known = [step["image_id"] for step in steps], {}
        for k, image in enumerate(ids):
            known = _reading(known, told[image])
            if k:
                yield json.dumps([told[i] for i in ids[:k + 1]], sort_keys=True), known, scenes[image], scenes[ids[k - 1]]


def story_baselines(data: Path) -> dict[str, tuple[list, list]]:
    """The two baselines of the next story frame, on the toy VIST test split's frames after the
    first (predicted, expected): `copy_last`, the last context picture copied; `text_only`, the best
    rule that reads the text alone (what the captions name, a named time moved on as they say, and
    for the rest the value most frequent in training's frames with the same told captions, else in
    all of training's later frames)."""
    from collections import Counter

    folder = data / "VIST"
    by_key, overall = {}, {a: Counter() for a in ATTRIBUTES}
    for key, _, scene, _ in _later_frames(folder, "train"):
        counts = by_key.setdefault(key, {a: Counter() for a in ATTRIBUTES})
        for a in ATTRIBUTES:
            counts[a][scene[a]] += 1
            overall[a][scene[a]] += 1
    copy, text, expected = [], [], []
    for key, known, scene, previous in _later_frames(folder, "test"):
        counts = by_key.get(key, overall)
        text.append({a: known.get(a) or (counts[a] or overall[a]).most_common(1)[0][0] for a in ATTRIBUTES})
        copy.append(previous)
        expected.append(scene)
    return {"copy_last": (copy, expected), "text_only": (text, expected)}


# What a later frame's caption changes (`world._changes`), in the order the report lists them.
# The time's two steps apart: "much later" asks the text for the step's size as well as its direction.
ONE_STEP, TWO_STEPS = "the time moves on a step (a little later)", "the time moves on two steps (much later)"
NIGHT_FALLS, NEW_COLOUR, NEW_PLACE = "night falls", "the object's colour", "the object's place"
CHANGES = (ONE_STEP, TWO_STEPS, NIGHT_FALLS, NEW_COLOUR, NEW_PLACE)


def _change(told: dict) -> str:
    if "time_steps" in told:
        return ONE_STEP if told["time_steps"] == 1 else TWO_STEPS
    if "time" in told:
        return NIGHT_FALLS
    return NEW_COLOUR if "colour" in told else NEW_PLACE


def story_changes(data: Path, split: str = "test") -> dict[str, str]:
    """Task name of every frame after the first of a toy VIST split -> what its caption says changes
    (`CHANGES`; in day stories always the time, one step on)."""
    folder = data / "VIST"
    stories = json.loads((folder / f"{split}_cleaned.json").read_text())
    told = json.loads((folder / f"told_{split}.json").read_text())
    return {f"{story}_{step['sequence_index']}-gen": _change(told[step["image_id"]])
            for story, steps in stories.items() for k, step in enumerate(steps) if k}


# ---- the report ----------------------------------------------------------------------------------

def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _row(label: str, acc: dict, n: int, target: str) -> str:
    cells = " | ".join(_pct(acc[a]) for a in (*ATTRIBUTES, "all"))
    return f"| {label} | {n} | {cells} | {target} |"


def report(build: Build, scored: dict[str, Scored], metrics: dict[str, dict], seconds: dict[str, float],
           wall: list[tuple[float, int]] | None = None, baselines: dict[str, tuple[list, list]] | None = None,
           extractors: str = "toy", changes: dict[str, str] | None = None) -> str:
    """TOY_RESULTS.md: the judge's accuracy per model and attribute, voken emission, the story
    baselines (`story_baselines`), the next story frame by what its caption changes (`story_changes`),
    metric.py's figures and the time of every step. Rows whose runs were not made (a shorter build)
    are left out."""
    chance = " | ".join(_pct(CHANCE[a]) for a in ATTRIBUTES)
    lines = [
        "# MiniGPT-5 in the toy world",
        "",
        f"Written by `python -m toyworld build --config {_shown(build.config_path)}` (docs/toyworld.md). "
        "Every number is the judge's reading of a generated picture against the scene the prompt asks for: "
        "per attribute, and `all` = every attribute right. A prediction without a picture counts as wrong.",
        "",
        "## Judge accuracy",
        "",
        "| model | pictures | " + " | ".join(ATTRIBUTES) + " | all | target |",
        "|---|---|" + "---|" * (len(ATTRIBUTES) + 2),
        f"| chance | | {chance} | {_pct(math.prod(CHANCE.values()))} | |",
    ]
    rows = (
        ("cc3m_stage1", "baseline", "toy SD from the caption (the SD baseline), toy CC3M test: held-out combinations, "
         "test word orders",
         ">= 90%"),
        ("cc3m_stage1", "all", "MiniGPT-5 stage 1: caption -> vokens -> picture, same prompts", ">= 85%"),
        ("cc3m_stage1_guidance1", "all", "ablation: stage 1 without classifier-free guidance (scale 1)", ""),
        ("cc3m_no_caption_loss", "all", "ablation: stage 1 trained without the caption loss", ""),
        ("cc3m_untrained", "all", "MiniGPT-5 as built, untrained, same prompts", ""),
        ("vist_stage2", "later", "MiniGPT-5 stage 2: next story frame (toy VIST test: stories never seen in "
         "training, frames 2+, test wording)", ">= 70%, 30 points above both baselines"),
        ("vist_stage2", "copy_last", "baseline: the last context picture, copied (same frames)", ""),
        ("vist_stage2", "text_only", "baseline: the best rule reading the text alone (same frames)", ""),
        ("vist_stage2_no_context", "later", "the same frames, stage 2 without the story's context (the caption alone)",
         "near the text-only baseline"),
        ("vist_stage1_only", "later", "the same prompts, stage-1 model only (no story training)", "near chance"),
        ("vist_no_stage1", "later", "ablation: stage 2 without stage 1 (from the untrained mapper)", ""),
        ("mmdialog_stage2", "asked", "MiniGPT-5 stage 2 on MMDialog: the picture the user asks for (same place, "
         "another time of day; test wording)", ""),
    )
    for name, which, label, target in rows:
        if name not in scored:
            continue
        s = scored[name]
        if which in ("copy_last", "text_only"):
            if not baselines:
                continue
            judged, truth = baselines[which]
        elif which == "baseline":
            judged, truth = _select(s, _known, s.baseline)
        elif which == "later":
            judged, truth = _select(s, _later_frame)
        elif which == "asked":
            judged, truth = _select(s, _asked_picture)
        else:
            judged, truth = _select(s, _known)
        lines.append(_row(label, accuracy(judged, truth), len(truth), target))
    if changes and "vist_stage2" in scored:
        lines += ["", "### The next story frame, by what its caption changes", "",
                  "MiniGPT-5 stage 2 on the same frames, grouped by what the frame's caption says changes; "
                  "everything else must be read from the context pictures (where the time does not change, "
                  "its column is the time read from the last picture).", "",
                  "| the caption changes | frames | " + " | ".join(ATTRIBUTES) + " | all | |",
                  "|---|---|" + "---|" * (len(ATTRIBUTES) + 2)]
        for change in CHANGES:
            judged, truth = _select(scored["vist_stage2"], lambda task, t: _later_frame(task, t)
                                    and changes.get(task) == change)
            if truth:
                lines.append(_row(change, accuracy(judged, truth), len(truth), ""))
    lines += ["", "## Voken emission (no forced generation)", "", "| prompts | n | emitted [IMG0] | target |",
              "|---|---|---|---|"]
    emission = []
    if "vist_stage2" in scored:
        s = scored["vist_stage2"]
        emission.append(("toy VIST: every frame asked for (stage 2)",
                         [e for t, e in zip(s.tasks, s.emitted) if t.endswith("-gen")], ">= 95%"))
    if "mmdialog_stage2" in scored:
        s = scored["mmdialog_stage2"]
        emission.append(("toy MMDialog: the picture the user asks for (stage 2, test wording)",
                         [e for task, e, t in zip(s.tasks, s.emitted, s.truth) if _asked_picture(task, t)], ">= 95%"))
        emission.append(("toy MMDialog: the user's own picture, shared unasked (stage 2; its caption is free text)",
                         [e for task, e, t in zip(s.tasks, s.emitted, s.truth)
                          if t is not None and not _asked_picture(task, t)], ""))
        emission.append(("toy MMDialog: text-only turns (stage 2, test wording)",
                         [e for e, t in zip(s.emitted, s.truth) if t is None], "<= 5%"))
    for name, label in (("cc3m_stage1", "toy CC3M captions (stage 1)"),
                        ("cc3m_untrained", "toy CC3M captions (untrained)")):
        if name in scored:
            emission.append((label, scored[name].emitted, ""))
    for label, values, target in emission:
        rate = sum(values) / len(values) if values else float("nan")
        lines.append(f"| {label} | {len(values)} | {_pct(rate)} | {target} |")
    if metrics:
        lines += metric_tables(scored, metrics, extractors)
    lines += ["", "## Time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {s:.0f} |" for name, s in seconds.items()]
    lines += ["", f"Total: {sum(seconds.values()) / 60:.1f} minutes of steps" + _wall_text(wall or []), ""]
    return "\n".join(lines)


def _wall_text(runs: list[tuple[float, int]]) -> str:
    if not runs:
        return "."
    if len(runs) == 1:
        return f", {runs[0][0] / 60:.1f} minutes of wall clock (steps run side by side)."
    each = "; ".join(f"{wall / 60:.1f} minutes for {made} steps" for wall, made in runs)
    return f"; made by {len(runs)} runs of the build, in the order they ran: {each} (wall clock, steps run side by side)."


# The paper's tables, in the toy world: per dataset, metric.py's columns (its result keys) and the rows
# (the run, whether its SD baseline pictures, which judged pictures go beside them).
TABLES = (
    ("Toy CC3M test: held-out combinations, test word orders (the paper's CC3M table)",
     (("CLIP-I", "clip_similarity"), ("CLIP-T", "clip_t_similarity"), ("IS", "inception_score"), ("FID", "fid_score")),
     (("toy SD from the caption (the SD baseline)", "cc3m_stage1", True, _known),
      ("MiniGPT-5 stage 1", "cc3m_stage1", False, _known))),
    ("Toy VIST test: new stories, test wording (the paper's VIST table)",
     (("CLIP-I", "clip_similarity"), ("CLIP-T", "clip_t_similarity"), ("FID", "fid_score"),
      ("IS (per story)", "instance_inception_score"), ("FID (per story)", "instance_fid_score")),
     (("toy SD from the frame's caption only (the SD baseline, no context)", "vist_stage2", True, _later_frame),
      ("MiniGPT-5 stage 2, without context (the frame's caption alone)", "vist_stage2_no_context", False, _later_frame),
      ("MiniGPT-5 stage 2, with the story's context", "vist_stage2", False, _later_frame))),
    ("Toy MMDialog test: test wording (the paper's MMDialog table)",
     (("BLEU-1", "bleu_score_1"), ("BLEU-2", "bleu_score_2"), ("ROUGE-L", "rouge_l_score"), ("Sentence-BERT", "sbert_score"),
      ("CLIP-F1", "clip_f1"), ("IS (per dialogue)", "instance_inception_score")),
     (("MiniGPT-5 stage 2", "mmdialog_stage2", False, _asked_picture),)),
)


def _metric_value(values: dict, key: str, baseline: bool):
    """metric.py's figure `key` (its SD-baseline counterpart with `baseline`), under the release's names."""
    if baseline:
        head, _, tail = key.partition("instance_")
        key = f"instance_basline_{tail}" if head == "" and tail else f"basline_{key}"
    value = values.get(f"overall_{key}")
    return "n/a" if value is None else f"{value:.4g}"


def metric_tables(scored: dict[str, Scored], metrics: dict[str, dict], extractors: str) -> list[str]:
    """metric.py's figures as the paper's tables, with the judge's accuracy (every attribute right)
    on the same pictures beside them."""
    lines = ["", "## The paper's tables, by metric.py", ""]
    if extractors == "toy":
        lines += ["CLIP-I / CLIP-T use the toy CLIP and FID / IS the toy scene classifier in Inception's place, both "
                  "trained in this build (`extractors` step, `metric.py --toy_extractors`); BLEU, ROUGE-L and "
                  "Sentence-BERT (packaged offline) are real. The judge's column: the share of the same pictures "
                  "with every attribute right.", ""]
    else:
        lines += ["CLIP and Inception are the tiny random stand-ins (`--tiny_extractors`): their figures test the code "
                  "path only. BLEU, ROUGE-L and Sentence-BERT (packaged offline) are real.", ""]
    for title, columns, rows in TABLES:
        # A baseline row needs its pictures: the release's VIST prediction draws none (its spec's sd_baseline).
        present = [row for row in rows if row[1] in metrics and row[1] in scored
                   and (not row[2] or any(b is not None for b in scored[row[1]].baseline))]
        if not present:
            continue
        lines += [f"### {title}", "", "| model | " + " | ".join(c for c, _ in columns) + " | judge: all right | n |",
                  "|---|" + "---|" * (len(columns) + 2)]
        for label, run, baseline, keep in present:
            s = scored[run]
            judged, truth = _select(s, keep, s.baseline if baseline else None)
            cells = " | ".join(_metric_value(metrics[run], key, baseline) for _, key in columns)
            lines.append(f"| {label} | {cells} | {_pct(accuracy(judged, truth)['all'])} | {len(truth)} |")
        lines.append("")
    return lines


def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def extractor_flags(build: Build) -> list[str]:
    """metric.py's extractors for this build: the toy ones its `extractors` step trained, else (a
    build without that step) the tiny random stand-ins."""
    folder = build.out / "extractors"
    if build.record("extractors") is not None and folder.is_dir():
        return ["--toy_extractors", str(folder)]
    return ["--tiny_extractors"]


def run_metric(build: Build, run: Run, folder: Path) -> dict:
    """metric.py on a prediction folder (`extractor_flags`); its figures, under its own names."""
    # FID's real set: the true pictures of the same test prompts (the toy has no separate CC3M val folder)
    real = ["--fid_real", "ground_truth"] if run.dataset == "CC3M" else []
    build.command(["metric.py", "--pred_folder", str(folder), "--dataset", run.dataset, *extractor_flags(build),
                   "--device", "cpu", *real], {"DATAFOLDER": str(build.data / run.dataset)}, f"metric_{run.name}")
    results = json.loads((folder / "results_dict.json").read_text())
    # None: a figure metric.py could not compute (no picture drawn): the tables show n/a.
    return {k: v for k, v in results.items() if v is None or isinstance(v, (int, float))}


METRIC_RUNS = ("cc3m_stage1", "vist_stage2", "vist_stage2_no_context", "mmdialog_stage2")   # metric.py scores these
JUDGED = "judged.json"                  # a prediction folder's judged pictures, for the report


def predict_step(build: Build, run: Run) -> dict:
    """One build step: `run`'s predictions, judged (kept beside them in `judged.json` for the
    report) and, for the runs in `METRIC_RUNS`, scored by metric.py."""
    folder = predict(build, run)
    scored = score(build, run, folder)
    (folder / JUDGED).write_text(json.dumps({"tasks": scored.tasks, "truth": scored.truth, "judged": scored.judged,
                                             "baseline": scored.baseline, "emitted": scored.emitted}))
    metric, extractors = {}, None
    if run.name in METRIC_RUNS and build.settings["evaluate"].get("metric", True):
        extractors = "toy" if "--toy_extractors" in extractor_flags(build) else "tiny"
        metric = run_metric(build, run, folder)
    return {"folder": str(folder.relative_to(build.out)), "accuracy": accuracy(*_select(scored, _known)),
            "emitted": sum(scored.emitted) / max(1, len(scored.emitted)), "metric": metric, "extractors": extractors}


def _load_scored(run: Run, folder: Path) -> Scored:
    saved = json.loads((folder / JUDGED).read_text())
    return Scored(run, saved["tasks"], saved["truth"], saved["judged"], saved["baseline"], saved["emitted"], folder)


def write_report(build: Build) -> dict:
    """The report step: every prediction step's judged pictures and metric.py figures, and every
    step's time -> TOY_RESULTS.md (in the build, and where the settings' `report` says)."""
    from toyworld.build import steps

    plan = steps(build)
    by_name = {f"predict_{run.name}": run for run in RUNS}
    scored, metrics, seconds, extractors = {}, {}, {}, set()
    for step in plan:
        record = build.record(step.name)
        if record is None or step.name == "report":
            continue
        seconds[step.name] = record["seconds"]
        run = by_name.get(step.name)
        if run is not None:
            scored[run.name] = _load_scored(run, build.out / record["summary"]["folder"])
            if record["summary"]["metric"]:
                metrics[run.name] = record["summary"]["metric"]
                extractors.add(record["summary"].get("extractors") or "tiny")
    wall = _wall_clock(build, plan)
    baselines = story_baselines(build.data) if "vist_stage2" in scored else None
    changes = story_changes(build.data) if "vist_stage2" in scored else None
    text = report(build, scored, metrics, seconds, wall, baselines, "tiny" if "tiny" in extractors else "toy",
                  changes)
    text += _extra_sections(build, plan)
    (build.out / "TOY_RESULTS.md").write_text(text)
    target = build.settings.get("report")
    if target:
        path = (build.config_path.parent / target).resolve()
        path.write_text(text)
    summary = {name: {"accuracy": accuracy(*_select(s, _known)), "emitted": sum(s.emitted) / max(1, len(s.emitted))}
               for name, s in scored.items()}
    return {"report": str(build.out / "TOY_RESULTS.md"), "runs": summary}


def _extra_sections(build: Build, plan) -> str:
    """The sections of the optional tasks and pairings whose prediction steps ran (their modules
    write them): the two-picture task, a second pairing's stage 1."""
    from toyworld import pairing, two_pictures

    lines = []
    record = build.record("predict_two_pictures")
    if record is not None and any(step.name == "predict_two_pictures" for step in plan):
        lines += two_pictures.report_lines(record["summary"]["scores"])
    lines += pairing.report_lines(build, plan)
    return "\n".join(lines) + ("\n" if lines else "")


def _wall_clock(build: Build, plan) -> list[tuple[float, int]]:
    """Per run of the build that made the steps, in the order they started: seconds from its first
    step's start to its last one's end, and how many steps it made (one run, when one made them all;
    a later run adds, say, the ablations). Empty when a step was not timed."""
    records = [build.record(step.name) for step in plan if step.name != "report"]
    if not records or any(r is None or "started" not in r for r in records):
        return []
    runs: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["started"]):
        runs.setdefault(record.get("run"), []).append(record)
    return [(max(r["started"] + r["seconds"] for r in made) - made[0]["started"], len(made)) for made in runs.values()]
