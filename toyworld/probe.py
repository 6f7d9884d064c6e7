"""What the vokens carry: linear probes on a trained stage-2 model's voken features.

For every story frame after the first, MiniGPT-5 reads the story so far (captions and pictures) and
the frame's caption, and emits eight vokens; the LLM's last-layer states at them (what `fc` reads)
are mapped to the SD condition that draws the frame. A probe is a logistic regression from one of the
two to one fact about the frame; its accuracy says whether that fact is there to be read linearly.
Besides the attributes of the picture to draw, it asks for the two things a moved-on time is made
of: the time of the last context picture, and the step the caption tells ("a little later" = 1,
"much later" = 2). When those two read right and their sum does not, the model has the parts of the
answer and has not learnt to put them together.

Features come from teacher forcing: the training code's forward pass on the stories' generation
samples (the release's prompts, the answer's vokens given). Probes are fitted on the training
stories and read (a) on held-out training stories (5 folds by story: what the model learnt where it
was trained) and (b) on the test stories (new stories, the test wording).

    python -m toyworld probe [--out weights/toy] [--checkpoint stage2_vist.ckpt]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toyworld import world
from toyworld.build import Build
from toyworld.evaluate import CHANGES, story_changes

FOLDS = 5
# The facts a probe is asked for, per frame: (name, function of (frame, last context frame, told)).
QUESTIONS = (
    *((f"its {a}", lambda frame, last, told, a=a: frame[a]) for a in world.ATTRIBUTES),
    ("the last context picture's time", lambda frame, last, told: last["time"]),
    ("the step its caption tells", lambda frame, last, told: told.get("time_steps")),
)
READ_FROM = ("voken features", "SD condition")


@dataclass
class Frames:
    """The frames after the first of one VIST split: features read from the model and the facts."""

    features: dict[str, np.ndarray]      # READ_FROM -> (N, D)
    answers: dict[str, np.ndarray]       # question -> (N,) (None where the question does not apply)
    stories: np.ndarray                  # (N,) story ids (the folds)
    changes: np.ndarray                  # (N,) CHANGES


def read_frames(model, data: Path, split: str, batch_size: int = 32) -> Frames:
    """Teacher-forced voken features and SD conditions of the generation samples of `split`'s frames
    after the first (toy VIST under `data`), with each frame's facts."""
    import torch

    from collator import Collator
    from data_sources.vist import SPEC
    from dataloader import make_dataset

    folder = data / "VIST"
    dataset = make_dataset(folder / f"{split}_cleaned.json", model.model.llama_tokenizer, model.cfg,
                           is_training=True, dataset_type="VIST")
    stories = json.loads((folder / f"{split}_cleaned.json").read_text())
    # Task name (the reader's own rule) of each frame after the first -> (story, its step, the one before).
    later = {SPEC.task_name(story, step["sequence_index"], "generation"): (story, step, steps[k - 1])
             for story, steps in stories.items() for k, step in enumerate(steps) if k}
    chosen = [i for i in range(len(dataset)) if dataset.sample(i).task_name in later]
    collate, states, conditions, names = Collator(model.model.llama_tokenizer), [], [], []
    m = model.model
    with torch.no_grad():
        for start in range(0, len(chosen), batch_size):
            batch = collate([dataset[i] for i in chosen[start:start + batch_size]])
            embeds, mask, labels = m.wrap_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 model.image_embeddings(batch))
            hidden, _, _ = m.forward_llm(embeds, mask, labels)
            features, rows = m.voken_features(hidden, labels)
            states.append(features.float().flatten(1).cpu().numpy())
            conditions.append(model.map_vokens(features).float().flatten(1).cpu().numpy())
            names += [batch["task_names"][int(r)] for r in rows]
    scenes = json.loads((folder / f"scenes_{split}.json").read_text())
    told = json.loads((folder / f"told_{split}.json").read_text())
    changes = story_changes(data, split)
    answers = {q: [] for q, _ in QUESTIONS}
    story_of = []
    for name in names:
        story, step, before = later[name]
        image, last = step["image_id"], before["image_id"]
        for question, answer in QUESTIONS:
            answers[question].append(answer(scenes[image], scenes[last], told[image]))
        story_of.append(story)
    return Frames({READ_FROM[0]: np.concatenate(states), READ_FROM[1]: np.concatenate(conditions)},
                  {q: np.array(a, dtype=object) for q, a in answers.items()}, np.array(story_of),
                  np.array([changes[n] for n in names]))


def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))


def probe(train: Frames, test: Frames) -> dict:
    """Per feature kind and question: accuracy on held-out training stories (folds by story) and on the
    test stories, overall and by what the frame's caption changes; with the number of frames."""
    from sklearn.model_selection import GroupKFold, cross_val_predict

    results = {}
    for kind in READ_FROM:
        for question, _ in QUESTIONS:
            keep_train = np.array([a is not None for a in train.answers[question]])
            keep_test = np.array([a is not None for a in test.answers[question]])
            y, groups = train.answers[question][keep_train].astype(str), train.stories[keep_train]
            X = train.features[kind][keep_train]
            seen = cross_val_predict(_probe(), X, y, groups=groups, cv=GroupKFold(FOLDS))
            new = _probe().fit(X, y).predict(test.features[kind][keep_test])
            truth = test.answers[question][keep_test].astype(str)
            row = {"train_cv": _acc(seen, y, train.changes[keep_train]), "test": _acc(new, truth, test.changes[keep_test])}
            results[f"{kind}: {question}"] = row
    return results


def _acc(predicted: np.ndarray, truth: np.ndarray, changes: np.ndarray) -> dict:
    right = predicted == truth
    by_change = {c: [float(right[changes == c].mean()), int((changes == c).sum())] for c in CHANGES if (changes == c).any()}
    return {"accuracy": float(right.mean()), "n": int(len(right)), "by_change": by_change}


def report(results: dict, checkpoint: str) -> str:
    """The probe's tables, in markdown."""
    lines = [f"# What the vokens carry ({checkpoint})", "",
             "Linear probes (logistic regression on standardised features) fitted on the training stories' "
             f"frames after the first; read on held-out training stories ({FOLDS} folds by story) and on the "
             "test stories (new stories, test wording). n = frames the question applies to.", "",
             "| read from: asked for | training stories, held out | test stories |", "|---|---|---|"]
    for name, row in results.items():
        cells = [f"{100 * row[s]['accuracy']:.1f}% (n={row[s]['n']})" for s in ("train_cv", "test")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "The frame's time, by what its caption changes (held-out training stories / test stories):", "",
              "| read from | " + " | ".join(CHANGES) + " |", "|---|" + "---|" * len(CHANGES)]
    for kind in READ_FROM:
        row = results[f"{kind}: its time"]
        cells = []
        for change in CHANGES:
            parts = [row[s]["by_change"].get(change) for s in ("train_cv", "test")]
            cells.append(" / ".join("-" if p is None else f"{100 * p[0]:.0f}% ({p[1]})" for p in parts))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(build: Build, checkpoint: str = "stage2_vist.ckpt") -> Path:
    """Probe the build's stage-2 `checkpoint` (on its stage-1 checkpoint) on its toy VIST; writes
    `probe_{checkpoint stem}.md` and `.json` into the build folder and returns the markdown's path."""
    import torch

    from model import MiniGPT5_Model

    weights = [build.checkpoints / "stage1_cc3m.ckpt", build.checkpoints / checkpoint]
    for path in [build.model_config, *weights, build.data / "VIST" / "train_cleaned.json"]:
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist: probe a finished build's stage 2 (--out, --checkpoint)")
    torch.manual_seed(0)                     # the training reader's picture flips
    model = MiniGPT5_Model.from_weights(build.model_config, *weights, device="cpu").eval()
    results = probe(read_frames(model, build.data, "train"), read_frames(model, build.data, "test"))
    stem = build.out / f"probe_{Path(checkpoint).stem}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(report(results, checkpoint))
    return stem.with_suffix(".md")
