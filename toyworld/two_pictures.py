"""The toy world's two-picture task (issue 27): one answer holds two pictures.

"show me a red ball nearby on the beach at noon, and then the same at night": the user asks for a
scene and for a second picture of it after one stated change (another time of day, or another colour
of the object); the assistant answers with both pictures, in order. Written in the generic
interleaved format (docs/own_data.md), so stage 2 trains on it with the unchanged
`train_eval.py --dataset interleaved`, and every picture of a predicted answer is judged at its place.

    data/interleaved/{train,val,test}.jsonl     one conversation per line (user request, answer); each
                                                training and validation picture with its caption
    data/interleaved/pictures/{split}/...jpg    the two expected pictures of each answer
    data/interleaved/scenes_{split}.json        answer id -> the two scenes, for the judge

The splits as the other toy datasets have them: training and validation pictures show seen
combinations only; every test answer's first picture is a held-out combination (`world.is_held_out`),
and test requests are worded as no training request is (the captions' test word orders and the
phrasings of `WORDING["test"]` below), in words the training requests hold. `check` stops the build
when that does not hold.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from toyworld import leakage, world

FOLDER = "interleaved"          # under the build's data/ (the dataset is the generic interleaved format)
TURN = 1                        # the answer is the conversation's second turn: tasks are `{id}_1-answer`


@dataclass(frozen=True)
class Phrases:
    request: tuple[str, ...]        # {first}: the first scene's caption; {second}: the change
    same_at: tuple[str, ...]        # the second picture: the same scene at {time}
    recolour: tuple[str, ...]       # the second picture: the object in {colour}
    answer: tuple[str, ...]         # the text before the second picture (the answer's, not a prompt)


WORDING = {
    "train": Phrases(
        request=("show me {first}, and then {second}", "i would like to see {first}, and after that {second}",
                 "draw {first}, then {second}"),
        same_at=("the same {time}", "that place again {time}"),
        recolour=("the same with a {colour} one instead", "the same but {colour}"),
        answer=("and then",)),
    "test": Phrases(       # new sentences of the training requests' words (`check`)
        request=("i would like to see {first}, then {second}", "draw {first}, and after that {second}"),
        same_at=("the same place again {time}",),
        recolour=("that place again but with a {colour} one",),
        answer=("and then",)),
}


def wording(split: str) -> Phrases:
    return WORDING["test" if split == "test" else "train"]


def _pair(split: str, rng: random.Random) -> tuple[world.Scene, world.Scene, str, str]:
    """Two scenes and the words of the change between them: the first a held-out combination in the
    test split, seen ones elsewhere (and the second seen too, outside the test split)."""
    test = split == "test"
    while True:
        first = rng.choice([s for s in world.all_scenes() if world.is_held_out(s) == test])
        if rng.random() < 0.5:
            kind, time = "same_at", rng.choice([t for t in world.TIMES if t != first.time])
            second = world.Scene(first.setting, time, first.colour, first.place)
            words = rng.choice(getattr(wording(split), kind)).format(time=world.TIME_WORDS[time])
        else:
            kind, colour = "recolour", rng.choice([c for c in world.COLOURS if c != first.colour])
            second = world.Scene(first.setting, first.time, colour, first.place)
            words = rng.choice(getattr(wording(split), kind)).format(colour=colour)
        if test or not world.is_held_out(second):
            return first, second, kind, words


def write(folder: Path, sizes: dict, image_size: int, seed: int) -> dict[str, Path]:
    """`{split}.jsonl`, the pictures and `scenes_{split}.json` for every split of `sizes` (split ->
    number of answers)."""
    files = {}
    for split, n in sizes.items():
        rng = random.Random(f"{seed}-two-pictures-{split}")
        phrases, captions = wording(split), world.wording(split)
        lines, truth = [], {}
        for i in range(n):
            first, second, _, change = _pair(split, rng)
            request = rng.choice(phrases.request).format(
                first=world.caption(first, rng.randrange(len(captions.captions)), captions), second=change)
            pictures = []
            for k, scene in enumerate((first, second)):
                relative = f"pictures/{split}/{i:06d}_{k}.jpg"
                world.save_image(world.render(scene, image_size, rng), folder / relative)
                # Training pictures carry their caption (the format's optional `caption`): the target
                # of the caption loss, as stage 1's captions are. Test answers carry none.
                pictures.append({"image": relative} if split == "test" else
                                {"image": relative, "caption": world.caption(
                                    scene, rng.randrange(len(captions.captions)), captions)})
            name = f"pair{i:05d}"
            lines.append(json.dumps({"id": name, "turns": [
                {"role": "user", "segments": [{"text": request}]},
                {"role": "assistant", "segments": [{"text": "here it is"}, pictures[0],
                                                   {"text": rng.choice(phrases.answer)}, pictures[1]]}]}))
            truth[task_name(name)] = [first.attributes(), second.attributes()]
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
        (folder / f"scenes_{split}.json").write_text(json.dumps(truth))
    return files


def task_name(name: str) -> str:
    """The prediction task of an answer (the interleaved reader's `{id}_{turn}-answer`)."""
    return f"{name}_{TURN}-answer"


def _requests(folder: Path, split: str) -> list[str]:
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["turns"][0]["segments"][0]["text"] for line in path.read_text().splitlines()]


def check(folder: Path) -> None:
    """The leakage check of the task: no training or validation picture shows a held-out combination,
    every test answer's first picture does, and no test request occurs among the training ones."""
    for split in ("train", "val"):
        path = folder / f"scenes_{split}.json"
        for task, scenes in (json.loads(path.read_text()) if path.is_file() else {}).items():
            if any(world.is_held_out(world.Scene(**s)) for s in scenes):
                raise SystemExit(f"error: leakage: {path}: {task} shows a held-out combination")
    path = folder / "scenes_test.json"
    for task, scenes in (json.loads(path.read_text()) if path.is_file() else {}).items():
        if not world.is_held_out(world.Scene(**scenes[0])):
            raise SystemExit(f"error: {path}: {task}'s first picture is not a held-out combination")
    seen = set(_requests(folder, "train")) | set(_requests(folder, "val"))
    shared = [r for r in _requests(folder, "test") if r in seen]
    if shared:
        raise SystemExit(f"error: leakage: {len(shared)} test request(s) of {folder} occur in training, "
                         f"e.g. {shared[0]!r}")
    unknown = leakage.unknown_words(_requests(folder, "test"), sorted(seen))
    if unknown:
        raise SystemExit(f"error: the test requests of {folder} use words no training request holds: {unknown}")


# ---- judging the predictions ---------------------------------------------------------------------

def judge_folder(data: Path, predictions: Path) -> dict:
    """Every answer of a prediction folder, each picture judged at its place against the scene
    expected there: {"tasks", "truth" (two scenes each), "judged" (the judge's reading of each drawn
    picture, None for a picture not drawn), "drawn" (how many pictures the answer holds)}."""
    from metric import load_predictions
    from toyworld.judge import judge

    truth = json.loads((data / FOLDER / "scenes_test.json").read_text())
    tasks, expected, judged, drawn = [], [], [], []
    for sample in load_predictions(predictions):
        if sample.task not in truth:
            continue
        pictures = sample.pred_images
        tasks.append(sample.task)
        expected.append(truth[sample.task])
        judged.append([judge(pictures[k]) if k < len(pictures) else None for k in range(len(truth[sample.task]))])
        drawn.append(len(pictures))
    return {"tasks": tasks, "truth": expected, "judged": judged, "drawn": drawn}


def scores(judged: dict) -> dict:
    """Per picture place: the judge's accuracy (per attribute and every attribute right); `both`:
    the share of answers with both pictures entirely right; `two_drawn`: with exactly two pictures."""
    from toyworld.judge import accuracy

    n = len(judged["tasks"])
    places = {f"picture_{k + 1}": accuracy([j[k] for j in judged["judged"]], [t[k] for t in judged["truth"]])
              for k in range(2)}
    right = lambda j, t: j is not None and all(j.get(a) == v for a, v in t.items())
    both = sum(all(right(j, t) for j, t in zip(js, ts)) for js, ts in zip(judged["judged"], judged["truth"]))
    return {**places, "both": both / n if n else float("nan"),
            "two_drawn": sum(d == 2 for d in judged["drawn"]) / n if n else float("nan"), "n": n}


TARGET_BOTH = 0.70      # the task's target: both pictures entirely right, on the held-out test answers


def report_lines(result: dict) -> list[str]:
    """The report's section (TOY_RESULTS.md) of the two-picture prediction step's scores."""
    from toyworld.evaluate import ATTRIBUTES, _pct

    n = result["n"]
    lines = ["", "## Two pictures in one answer (toy interleaved test)", "",
             "Stage 2 on the toy two-picture task (`--dataset interleaved`, from stage 1), predicted on the "
             f"test answers: the first picture a held-out combination, requests in the test wording; n = {n} "
             "answers. Each drawn picture is judged against the scene expected at its place (a picture not "
             "drawn counts as wrong).", "",
             "| picture | n | " + " | ".join(ATTRIBUTES) + " | all | target |", "|---|---|" + "---|" * (len(ATTRIBUTES) + 2)]
    for k in (1, 2):
        acc = result[f"picture_{k}"]
        lines.append(f"| picture {k} | {n} | " + " | ".join(_pct(acc[a]) for a in (*ATTRIBUTES, "all")) + " | |")
    lines += ["", "| answers | n | share | target |", "|---|---|---|---|",
              f"| both pictures entirely right | {n} | {_pct(result['both'])} | >= {TARGET_BOTH:.0%} |",
              f"| exactly two pictures drawn | {n} | {_pct(result['two_drawn'])} | |"]
    return lines


# ---- the build's steps (toyworld/stages.py lists them) -------------------------------------------

def enabled(build) -> bool:
    """The task is built when the settings give its sizes (`two_pictures`)."""
    return bool(build.settings.get("two_pictures"))


def data_step(build) -> dict:
    """The data step: `write` under the build's data/interleaved/, then `check` (or no build)."""
    import shutil

    folder = build.data / FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    files = write(folder, build.settings["two_pictures"], build.settings["world"]["image_size"], build.settings["seed"])
    check(folder)
    return {"files": {split: str(path.relative_to(build.out)) for split, path in files.items()}}


def _run():
    from toyworld.evaluate import Run

    # Two voken groups and the words around them need more new tokens than one picture's answer.
    return Run("two_pictures_stage2", FOLDER, "stage2_two_pictures.ckpt", "stage1_cc3m.ckpt",
               flags=("--dataset", "interleaved", "--max_new_tokens", str(MAX_NEW_TOKENS)), test_file="test.jsonl")


MAX_NEW_TOKENS = 64
RUN = _run()
JUDGED = "judged_pictures.json"


def predict_step(build) -> dict:
    """The prediction step: `train_eval.py` on the test answers (evaluate.predict), every picture
    judged at its place (kept in `judged_pictures.json` beside the predictions) and scored."""
    from toyworld.evaluate import predict

    folder = predict(build, RUN)
    judged = judge_folder(build.data, folder)
    (folder / JUDGED).write_text(json.dumps(judged))
    return {"folder": str(folder.relative_to(build.out)), "scores": scores(judged)}
