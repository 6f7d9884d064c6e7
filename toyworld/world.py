"""The toy world: scenes from a small grammar of attributes, drawn as pictures and told as captions,
stories and dialogues, and written as datasets in the release's three formats.

A scene is four attributes:

    setting  beach | forest | city | snow          -> the colour of the ground
    time     morning | noon | evening | night      -> the colour of the sky, the sun's / moon's height
    colour   red | blue | yellow | purple          -> the colour of the one object
    place    in the sky | far away | nearby        -> where the object is (and how big)

Every attribute is symmetric left to right, because MiniGPT-5's training flips pictures at random
(as the release does): a "left" object would be "right" half of the time.

Stories (the toy VIST) come in two modes. "day" (the build before the generalisation splits): the
first caption names the scene and the time moves on one step a frame, so the next picture is a fixed
function of the last one. "pictures": no caption names the scene; each later caption says only what
changes (the time moves on by what it says, night falls, the object becomes another colour or goes
elsewhere), so the next picture needs the context pictures and the text together.
Dialogues (the toy MMDialog) mix text-only turns with picture turns: one speaker shares a scene,
the other answers with the same place at another time of day when asked for it.

The splits test generalisation, not memory:
- held-out combinations (`is_held_out`: 35 of the 192; every pair of attribute values still occurs
  in training) occur in no training source: no CC3M training picture, story frame, dialogue
  picture, pretraining picture or LLM pretraining document; the CC3M test split consists of them;
- test stories start from scenes no training story starts from (`is_test_start`), so their scene
  sequences never occur in training;
- captions, story phrases, requests and chit-chat are worded differently in the test splits
  (`WORDING["test"]`: new word orders and phrasings) than in every training source.
`toyworld/leakage.py` checks all of it on what a build writes and stops the build if a test item
occurs in training.
"""
from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

# ---- the grammar -------------------------------------------------------------------------------

SETTINGS = ("beach", "forest", "city", "snow")
TIMES = ("morning", "noon", "evening", "night")
COLOURS = ("red", "blue", "yellow", "purple")
PLACES = ("sky", "far", "near")
ATTRIBUTES = {"setting": SETTINGS, "time": TIMES, "colour": COLOURS, "place": PLACES}

# What the renderer paints, and what the judge reads back.
GROUND_RGB = {"beach": (230, 205, 140), "forest": (40, 115, 45), "city": (125, 125, 135), "snow": (240, 244, 250)}
SKY_RGB = {"morning": (250, 180, 160), "noon": (100, 170, 240), "evening": (230, 110, 50), "night": (20, 24, 60)}
OBJECT_RGB = {"red": (210, 25, 30), "blue": (30, 60, 210), "yellow": (250, 215, 0), "purple": (150, 40, 190)}
SUN_RGB, MOON_RGB = (255, 240, 140), (225, 225, 200)

# Geometry, as fractions of the picture's side. The horizon splits sky and ground.
HORIZON = 0.5
# Object discs: (centre x, centre y, radius).
PLACE_DISC = {"sky": (0.5, 0.25, 0.10), "far": (0.5, 0.60, 0.07), "near": (0.5, 0.82, 0.14)}
# The sun (or the moon at night) stands off-centre, at a height that depends on the time of day.
SUN_X, SUN_RADIUS = 0.82, 0.08
SUN_Y = {"morning": 0.30, "noon": 0.10, "evening": 0.38, "night": 0.12}

# ---- words ---------------------------------------------------------------------------------------

SETTING_WORDS = {"beach": "on the beach", "forest": "in the forest", "city": "in the city", "snow": "in the snow"}
TIME_WORDS = {"morning": "in the morning", "noon": "at noon", "evening": "in the evening", "night": "at night"}
PLACE_WORDS = {"sky": "in the sky", "far": "far away", "near": "nearby"}
NOUN = {"sky": "balloon", "far": "ball", "near": "ball"}


@dataclass(frozen=True)
class Wording:
    """The phrasings of one side of the split (`WORDING`): training sources use "train", the test
    splits "test" (new word orders, new story and request phrasings, new chit-chat), so that a test
    asks for understanding the language, not for recalling sentences."""

    captions: tuple[str, ...]        # caption templates: the word orders of a scene
    day_later: tuple[str, ...]       # day stories: a later frame (says nothing about the scene)
    story_open: tuple[str, ...]      # picture stories: the first frame (says nothing about the scene)
    later: tuple[str, ...]           # picture stories: one time of day on
    much_later: tuple[str, ...]      # two times of day on
    dark: tuple[str, ...]            # night falls
    recolour: tuple[str, ...]        # another object, of {colour}, in the same place
    move: dict                       # place -> the object moves there
    greetings: tuple[str, ...]
    replies: tuple[str, ...]
    share: tuple[str, ...]           # the human shares a picture: {caption}
    comment: tuple[str, ...]
    ask: tuple[str, ...]             # the human asks for the same place at {time}
    answer: tuple[str, ...]          # the assistant's picture turn: {time}
    thanks: tuple[str, ...]
    welcome: tuple[str, ...]


WORDING = {
    "train": Wording(
        captions=("a {colour} {noun} {place} {setting} {time}",
                  "{time} {setting}, a {colour} {noun} {place}",
                  "there is a {colour} {noun} {place} {setting} {time}",
                  "{setting} {time} with a {colour} {noun} {place}"),
        day_later=("time passes", "a little later", "some time goes by", "the day goes on", "and then"),
        story_open=("this is where we were", "look at this place", "our day began here"),
        later=("a little later", "some time passes"),
        much_later=("much later", "many hours later"),
        dark=("and then it got dark",),
        recolour=("then a {colour} one came instead", "now it was {colour}"),
        move={"sky": ("then it flew up into the sky",), "far": ("then it rolled far away",),
              "near": ("then it came close",)},
        greetings=("hello there", "hi, how are you", "good day to you", "hey, what are you up to"),
        replies=("i am fine, thank you", "not much, just looking around", "all good here", "i am well, and you"),
        share=("look at this picture i took: {caption}", "here is what i saw: {caption}", "i found this: {caption}"),
        comment=("what a lovely view", "nice picture", "that looks great"),
        ask=("can you show me the same place {time}", "what would it look like {time}", "show me it {time} please"),
        answer=("sure, here it is {time}", "of course, this is how it looks {time}", "here you go, {time}"),
        thanks=("thank you, that looks nice", "wow, thanks a lot", "great, thank you"),
        welcome=("you are welcome", "glad you like it", "any time")),
    "test": Wording(
        # New sentences of the training vocabulary: every word of a test phrase occurs in the LLM's
        # pretraining text (leakage.py checks it), no test phrase does. A test asks for the language
        # the model learnt, put together anew, not for words it could not know.
        captions=("{place} {setting} {time}, a {colour} {noun}",
                  "a {colour} {noun} {time} {setting} {place}",
                  "{setting} there is a {colour} {noun} {place} {time}"),
        day_later=("some time later", "a little time passes"),
        story_open=("we were here", "our day began at this place"),
        later=("some time later", "a little time passes"),
        much_later=("much time passes", "many hours go on"),
        dark=("now it was dark",),
        recolour=("then it was {colour}", "now a {colour} one was there"),
        move={"sky": ("then it was up in the sky",), "far": ("now it rolled far away",),
              "near": ("then it came up close",)},
        greetings=("hello, how are you", "hi, good day"),
        replies=("all fine here, thank you", "i am good, and you"),
        share=("here is a picture i took: {caption}", "look what i found: {caption}"),
        comment=("what a nice view", "that picture looks lovely"),
        ask=("can you show me it {time}", "how would the same place look {time}"),
        answer=("sure, this is it {time}", "here you go, this is how it looks {time}"),
        thanks=("thanks a lot, that looks great", "wow, that looks nice"),
        welcome=("any time, glad you like it", "glad to, you are welcome")),
}
TRAIN, TEST = WORDING["train"], WORDING["test"]


def wording(split: str) -> Wording:
    """The phrasings a split is written in: the test split's own, the others (train, val) training's."""
    return TEST if split == "test" else TRAIN


@dataclass(frozen=True, order=True)
class Scene:
    """One picture's content."""

    setting: str
    time: str
    colour: str
    place: str

    def attributes(self) -> dict[str, str]:
        return asdict(self)

    def later(self, steps: int = 1) -> "Scene":
        """The same scene `steps` times of day later (night is followed by morning: in a dialogue
        "the same place in the morning" may be the next day's)."""
        time = TIMES[(TIMES.index(self.time) + steps) % len(TIMES)]
        return Scene(self.setting, time, self.colour, self.place)


def all_scenes() -> list[Scene]:
    return [Scene(*values) for values in itertools.product(SETTINGS, TIMES, COLOURS, PLACES)]


HELD_OUT_EVERY = 6


def is_held_out(scene: Scene) -> bool:
    """Whether a combination never occurs in training: those whose value indices sum to a multiple
    of `HELD_OUT_EVERY` (35 of the 192), spread so that every pair of attribute values still occurs
    in training with other partners (a test of composing what was seen, not of guessing what never was)."""
    index = sum(values.index(getattr(scene, name)) for name, values in ATTRIBUTES.items())
    return index % HELD_OUT_EVERY == 0


def caption(scene: Scene, template: int = 0, words: Wording = TRAIN) -> str:
    """The scene in words, in one of `words`' word orders (lower case, as the release's caption
    cleaning leaves CC3M captions)."""
    return words.captions[template % len(words.captions)].format(
        colour=scene.colour, noun=NOUN[scene.place], place=PLACE_WORDS[scene.place],
        setting=SETTING_WORDS[scene.setting], time=TIME_WORDS[scene.time])


PHRASES = ("object", "place", "setting", "time")      # a caption's four phrases


def _phrase_order(template: str) -> tuple[str, ...]:
    """The order of the four phrases in a caption template ("{colour} {noun}" is the object)."""
    names = [n for n in re.findall(r"\{(\w+)\}", template) if n != "noun"]
    return tuple("object" if n == "colour" else n for n in names)


def caption_templates(orders: str, setting: str = "pretrain.sd_caption_orders") -> tuple[str, ...]:
    """The caption templates a frozen part is pretrained on (`pretrain.sd_caption_orders` for SD's
    text encoder and UNet, `pretrain.llm_caption_orders` for the LLM's corpus): "train", the training
    wording's; "all_but_test", those and the four phrases plainly in every other order the test
    wording does not use (21 of the 24), as a text encoder or an LLM pretrained on the web has read
    every word order. The test wording's orders stay out of every training source."""
    if orders == "train":
        return TRAIN.captions
    if orders != "all_but_test":
        raise ValueError(f"{setting} must be 'train' or 'all_but_test', got {orders!r}")
    phrase = {"object": "a {colour} {noun}", "place": "{place}", "setting": "{setting}", "time": "{time}"}
    test_orders = {_phrase_order(t) for t in TEST.captions}
    plain = [" ".join(phrase[p] for p in order) for order in itertools.permutations(PHRASES)
             if order not in test_orders]
    return TRAIN.captions + tuple(t for t in plain if t not in TRAIN.captions)


# ---- drawing -------------------------------------------------------------------------------------

def _disc(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, side: int, fill) -> None:
    draw.ellipse(((cx - r) * side, (cy - r) * side, (cx + r) * side, (cy + r) * side), fill=fill)


# Variation of one picture to the next (with `render(..., rng=...)`): shifts as fractions of the
# side, the radius as a factor, colours per channel. Small enough that the judge reads every render.
JITTER = {"shift_x": 0.03, "shift_y": 0.015, "radius": 0.1, "sun_x": 0.04, "rgb": 10}


def _vary(rgb: tuple[int, int, int], rng: random.Random | None) -> tuple[int, ...]:
    if rng is None:
        return rgb
    return tuple(min(255, max(0, c + rng.randint(-JITTER["rgb"], JITTER["rgb"]))) for c in rgb)


def render(scene: Scene, size: int, rng: random.Random | None = None, supersample: int = 4) -> Image.Image:
    """Draw the scene as a `size` x `size` RGB picture (drawn `supersample` times larger, then
    reduced, so that edges are smooth). With `rng`, positions, sizes and colours vary a little."""
    side = size * supersample
    u = (lambda scale: rng.uniform(-scale, scale)) if rng is not None else (lambda scale: 0.0)
    image = Image.new("RGB", (side, side), _vary(SKY_RGB[scene.time], rng))
    draw = ImageDraw.Draw(image)
    sun = MOON_RGB if scene.time == "night" else SUN_RGB
    _disc(draw, SUN_X + u(JITTER["sun_x"]), SUN_Y[scene.time], SUN_RADIUS, side, _vary(sun, rng))
    draw.rectangle((0, HORIZON * side, side, side), fill=_vary(GROUND_RGB[scene.setting], rng))
    cx, cy, r = PLACE_DISC[scene.place]
    _disc(draw, cx + u(JITTER["shift_x"]), cy + u(JITTER["shift_y"]), r * (1 + u(JITTER["radius"])), side,
          _vary(OBJECT_RGB[scene.colour], rng))
    return image.reduce(supersample) if supersample > 1 else image


def save_image(image: Image.Image, path: Path) -> None:
    """JPEG as the real datasets, at a quality and without chroma subsampling, so small objects keep
    their colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95, subsampling=0)


# ---- stories and dialogues -----------------------------------------------------------------------

@dataclass(frozen=True)
class Story:
    """A story: its frames' scenes and captions, and what each caption tells of its scene (`told`:
    attribute -> value, and "time_steps" where the text moves the time on without naming it): what
    a reader of the text alone can know, for the text-only baseline."""

    scenes: tuple[Scene, ...]
    captions: tuple[str, ...]
    told: tuple[dict, ...]


# "day": the first caption names the scene and the time moves on one step a frame (the next frame is
# a fixed function of the last); "pictures": no caption names the scene, each later one says only
# what changes, so the next picture needs the context pictures and the text together.
STORY_MODES = ("day", "pictures")


def is_test_start(scene: Scene) -> bool:
    """Whether stories starting with `scene` are test stories. Test and training stories start from
    different scenes, so no test story's scene sequence, nor any beginning of it, occurs in training."""
    index = (SETTINGS.index(scene.setting) * 7 + TIMES.index(scene.time) * 5 + COLOURS.index(scene.colour) * 3
             + PLACES.index(scene.place))
    return index % 4 == 0


def story_starts(length: int, side: str | None = None) -> list[Scene]:
    """The first scenes a day story of `length` frames can start from: its day does not run past
    night, and none of its frames is a held-out combination; with `side` ("train" or "test"), only
    that side's starts (`is_test_start`)."""
    starts = [s for s in all_scenes() if TIMES.index(s.time) + length <= len(TIMES)
              and not any(is_held_out(s.later(k)) for k in range(length))]
    return starts if side is None else [s for s in starts if is_test_start(s) == (side == "test")]


def make_story(first: Scene, length: int, rng: random.Random, words: Wording = TRAIN) -> Story:
    """A day story: the first caption describes `first`, the later ones say only that time passes."""
    captions = [caption(first, rng.randrange(len(words.captions)), words)]
    captions += [rng.choice(words.day_later) for _ in range(length - 1)]
    told = (first.attributes(),) + ({"time_steps": 1},) * (length - 1)
    return Story(tuple(first.later(k) for k in range(length)), tuple(captions), told)


def _changes(scene: Scene, words: Wording) -> dict[str, list[tuple[str, Scene, dict]]]:
    """How a picture story can go on from `scene`, by the attribute that changes: (caption, next
    scene, what the caption tells)."""
    time = [(p, scene.later(1), {"time_steps": 1}) for p in words.later]
    time += [(p, scene.later(2), {"time_steps": 2}) for p in words.much_later]
    if scene.time != "night":
        time += [(p, replace(scene, time="night"), {"time": "night"}) for p in words.dark]
    colour = [(p.format(colour=c), replace(scene, colour=c), {"colour": c})
              for c in COLOURS if c != scene.colour for p in words.recolour]
    place = [(p, replace(scene, place=where), {"place": where})
             for where in PLACES if where != scene.place for p in words.move[where]]
    return {"time": time, "colour": colour, "place": place}


def make_picture_story(first: Scene, length: int, rng: random.Random, words: Wording = TRAIN,
                       allowed=lambda scene: True) -> Story:
    """A picture story: the first caption says nothing about `first`; each later one says what
    changes (the time moves on by what it says, night falls, another colour, another place), so the
    rest of the next picture is in the context pictures only. Every frame passes `allowed`."""
    scenes, captions, told = [first], [rng.choice(words.story_open)], [{}]
    for _ in range(length - 1):
        options = {what: [c for c in changes if allowed(c[1])] for what, changes in _changes(scenes[-1], words).items()}
        what = rng.choice(sorted(w for w, changes in options.items() if changes))
        text, scene, said = rng.choice(options[what])
        scenes.append(scene)
        captions.append(text)
        told.append(said)
    return Story(tuple(scenes), tuple(captions), tuple(told))


def draw_story(mode: str, length: int, rng: random.Random, side: str = "train") -> Story:
    """A story of `side` ("train": training and validation, "test"), in its wording, of seen
    combinations only, starting where only that side's stories start."""
    words = TEST if side == "test" else TRAIN
    if mode == "day":
        return make_story(rng.choice(story_starts(length, side)), length, rng, words)
    if mode != "pictures":
        raise ValueError(f"story mode {mode!r}: expected one of {STORY_MODES}")
    pool = [s for s in all_scenes() if not is_held_out(s) and is_test_start(s) == (side == "test")]
    return make_picture_story(rng.choice(pool), length, rng, words, allowed=lambda scene: not is_held_out(scene))


@dataclass(frozen=True)
class Turn:
    text: str
    scene: Scene | None = None


# The turns of a dialogue that carry a picture: the human's own, and the one the assistant is asked for.
SHARED_TURN, ASKED_TURN = 2, 5


def make_dialogue(scene: Scene, rng: random.Random, words: Wording = TRAIN,
                  allowed=lambda scene: not is_held_out(scene)) -> list[Turn]:
    """Human greets, Assistant replies, Human shares a picture, Assistant comments, Human asks for
    the same place at another time of day, Assistant answers with that picture, Human thanks,
    Assistant answers: turns 2 and 5 carry a picture, the six others are text only. The picture
    asked for passes `allowed` (by default: not a held-out combination)."""
    steps = rng.choice([k for k in range(1, len(TIMES)) if allowed(scene.later(k))])
    other = scene.later(steps)
    time_words = TIME_WORDS[other.time]
    return [
        Turn(rng.choice(words.greetings)),
        Turn(rng.choice(words.replies)),
        Turn(rng.choice(words.share).format(caption=caption(scene, rng.randrange(len(words.captions)), words)), scene),
        Turn(rng.choice(words.comment)),
        Turn(rng.choice(words.ask).format(time=time_words)),
        Turn(rng.choice(words.answer).format(time=time_words), other),
        Turn(rng.choice(words.thanks)),
        Turn(rng.choice(words.welcome)),
    ]


# ---- datasets in the release's formats -----------------------------------------------------------

@dataclass(frozen=True)
class WorldSizes:
    """How much of the world a build writes (config/toyworld*.yaml, `world` section)."""

    image_size: int
    cc3m: dict          # split -> number of captioned pictures
    vist: dict          # split -> number of stories
    mmdialog: dict      # split -> number of conversations
    story_length: int
    seed: int = 0
    story_mode: str = "pictures"    # STORY_MODES
    # The training stories' pictures also described on their own (each step's `description`, the
    # caption loss's target in stage 2; never shown to the model). Test stories have none.
    vist_descriptions: bool = False


def _scenes_for(split: str, n: int, rng: random.Random) -> list[Scene]:
    """`n` scenes for a split: training and validation draw from the seen combinations, test
    (CC3M) from the held-out ones."""
    pool = [s for s in all_scenes() if is_held_out(s) == (split == "test")]
    return [rng.choice(pool) for _ in range(n)]


def write_cc3m(folder: Path, sizes: WorldSizes) -> dict[str, Path]:
    """`cc3m_{split}.tsv` (caption, image_path) + `images/{split}/NNNNNN.jpg`, and
    `scenes_{split}.json` (the attributes of every row, for the judge)."""
    files = {}
    for split, n in sizes.cc3m.items():
        rng = random.Random(f"{sizes.seed}-cc3m-{split}")
        scenes = _scenes_for(split, n, rng)
        rows, truth = ["caption\timage_path"], []
        for i, scene in enumerate(scenes):
            relative = f"images/{split}/{i:06d}.jpg"
            save_image(render(scene, sizes.image_size), folder / relative)
            words = wording(split)
            rows.append(f"{caption(scene, rng.randrange(len(words.captions)), words)}\t{relative}")
            truth.append(scene.attributes())
        files[split] = folder / f"cc3m_{split}.tsv"
        files[split].write_text("\n".join(rows) + "\n")
        (folder / f"scenes_{split}.json").write_text(json.dumps(truth))
    return files


NO_CONTEXT = "test_no_context"        # the VIST test frames after the first, each without its story


def write_vist(folder: Path, sizes: WorldSizes) -> dict[str, Path]:
    """`{split}_cleaned.json` (story id -> steps of caption, image_id, sequence_index, and with
    `sizes.vist_descriptions` in the training splits description),
    `{split}_image_mapping.json` (image id -> path) and `images/{split}/*.jpg`,
    `scenes_{split}.json` (image id -> attributes) and `told_{split}.json` (image id -> what its
    caption tells of its scene, for the text-only baseline)."""
    files = {}
    for split, n in sizes.vist.items():
        rng = random.Random(f"{sizes.seed}-vist-{split}")
        stories, mapping, truth, told = {}, {}, {}, {}
        for k in range(n):
            story = draw_story(sizes.story_mode, sizes.story_length, rng, "test" if split == "test" else "train")
            story_id = str(10_000 + k)
            steps = []
            for j, (text, scene, said) in enumerate(zip(story.captions, story.scenes, story.told)):
                image_id = f"{story_id}{j:02d}"
                relative = f"images/{split}/{image_id}.jpg"
                save_image(render(scene, sizes.image_size), folder / relative)
                steps.append({"caption": text, "image_id": image_id, "sequence_index": j})
                if sizes.vist_descriptions and split != "test":
                    # In the training word orders, taken in turn (no draw: the stories stay as they are).
                    steps[-1]["description"] = caption(scene, k + j, TRAIN)
                mapping[image_id] = relative
                truth[image_id] = scene.attributes()
                told[image_id] = said
            stories[story_id] = steps
        files[split] = folder / f"{split}_cleaned.json"
        files[split].write_text(json.dumps(stories, indent=1))
        (folder / f"{split}_image_mapping.json").write_text(json.dumps(mapping, indent=1))
        if split == "test":
            # The paper's "without context": every later frame alone, its caption the whole prompt.
            alone = {f"{story_id}-{step['sequence_index']}": [step]
                     for story_id, steps in stories.items() for step in steps[1:]}
            (folder / f"{NO_CONTEXT}_cleaned.json").write_text(json.dumps(alone, indent=1))
            (folder / f"{NO_CONTEXT}_image_mapping.json").write_text(json.dumps(mapping, indent=1))
        (folder / f"scenes_{split}.json").write_text(json.dumps(truth))
        (folder / f"told_{split}.json").write_text(json.dumps(told))
    return files


def write_mmdialog(folder: Path, sizes: WorldSizes) -> dict[str, Path]:
    """`{split}/{split}_conversations.txt` (one JSON conversation per line, pictures as
    `__MEDIA__` ids of `{split}/{id}.jpg`) and `{split}/scenes.json` (media id -> attributes)."""
    files = {}
    for split, n in sizes.mmdialog.items():
        rng = random.Random(f"{sizes.seed}-mmdialog-{split}")
        pool = [s for s in all_scenes() if not is_held_out(s)]
        lines, truth = [], {}
        for k in range(n):
            turns = []
            for j, turn in enumerate(make_dialogue(rng.choice(pool), rng, wording(split))):
                parts = [{"__TEXT__": turn.text}]
                if turn.scene is not None:
                    media = str(7_000_000 + 100 * k + j)
                    save_image(render(turn.scene, sizes.image_size), folder / split / f"{media}.jpg")
                    parts.append({"__MEDIA__": media})
                    truth[media] = turn.scene.attributes()
                turns.append({"turn": parts})
            lines.append(json.dumps({"conversation_id": 500 + k, "conversation": turns}))
        files[split] = folder / split / f"{split}_conversations.txt"
        files[split].parent.mkdir(parents=True, exist_ok=True)
        files[split].write_text("\n".join(lines) + "\n")
        (folder / split / "scenes.json").write_text(json.dumps(truth))
    return files


def write_datasets(root: Path, sizes: WorldSizes) -> dict[str, dict[str, Path]]:
    """All three datasets under `root/CC3M`, `root/VIST`, `root/MMDialog` (the folder names select
    the dataset type, as the release's DATAFOLDER does)."""
    return {"CC3M": write_cc3m(root / "CC3M", sizes), "VIST": write_vist(root / "VIST", sizes),
            "MMDialog": write_mmdialog(root / "MMDialog", sizes)}

