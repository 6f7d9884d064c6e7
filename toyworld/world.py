"""The toy world: scenes from a small grammar of attributes, drawn as pictures and told as captions,
stories and dialogues, and written as datasets in the release's three formats.

A scene is four attributes:

    setting  beach | forest | city | snow          -> the colour of the ground
    time     morning | noon | evening | night      -> the colour of the sky, the sun's / moon's height
    colour   red | blue | yellow | purple          -> the colour of the one object
    place    in the sky | far away | nearby        -> where the object is (and how big)

Every attribute is symmetric left to right, because MiniGPT-5's training flips pictures at random
(as the release does): a "left" object would be "right" half of the time.

Stories (the toy VIST) are one day each: they keep the setting and the object and move the time on
one step per frame (morning -> noon -> evening -> night, never back). Only the first frame's caption
describes the scene; later ones say only that time passes, so the next picture follows from the
context alone.
Dialogues (the toy MMDialog) mix text-only turns with picture turns: one speaker shares a scene,
the other answers with the same place at another time of day when asked for it.

Held-out combinations: one in six of the 192 combinations never occurs in training (every pair of
attribute values still does); the CC3M test split consists of them only.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass
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
CAPTION_TEMPLATES = (
    "a {colour} {noun} {place} {setting} {time}",
    "{time} {setting}, a {colour} {noun} {place}",
    "there is a {colour} {noun} {place} {setting} {time}",
    "{setting} {time} with a {colour} {noun} {place}",
)
# Later frames of a story say nothing about the scene: what the next picture shows must come from
# what came before.
STORY_LATER = ("time passes", "a little later", "some time goes by", "the day goes on", "and then")


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
    """Whether a combination never occurs in training: one in `HELD_OUT_EVERY` of them, spread so
    that every pair of attribute values still occurs in training with other partners (a test of
    composing what was seen, not of guessing what never was)."""
    index = sum(values.index(getattr(scene, name)) for name, values in ATTRIBUTES.items())
    return index % HELD_OUT_EVERY == 0


def caption(scene: Scene, template: int = 0) -> str:
    """The scene in words (lower case, as the release's caption cleaning leaves CC3M captions)."""
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(
        colour=scene.colour, noun=NOUN[scene.place], place=PLACE_WORDS[scene.place],
        setting=SETTING_WORDS[scene.setting], time=TIME_WORDS[scene.time])


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
    """A story: the first scene, and the captions of its frames (frame k shows `first.later(k)`)."""

    first: Scene
    captions: tuple[str, ...]

    @property
    def scenes(self) -> list[Scene]:
        return [self.first.later(k) for k in range(len(self.captions))]


def story_starts(length: int) -> list[Scene]:
    """The first scenes a story of `length` frames can start from: its day does not run past night,
    and none of its frames is a held-out combination."""
    return [s for s in all_scenes() if TIMES.index(s.time) + length <= len(TIMES)
            and not any(is_held_out(s.later(k)) for k in range(length))]


def make_story(first: Scene, length: int, rng: random.Random) -> Story:
    captions = [caption(first, rng.randrange(len(CAPTION_TEMPLATES)))]
    captions += [rng.choice(STORY_LATER) for _ in range(length - 1)]
    return Story(first, tuple(captions))


@dataclass(frozen=True)
class Turn:
    text: str
    scene: Scene | None = None


GREETINGS = ("hello there", "hi, how are you", "good day to you", "hey, what are you up to")
REPLIES = ("i am fine, thank you", "not much, just looking around", "all good here", "i am well, and you")
SHARE = ("look at this picture i took: {caption}", "here is what i saw: {caption}", "i found this: {caption}")
ASK = ("can you show me the same place {time}", "what would it look like {time}", "show me it {time} please")
ANSWER = ("sure, here it is {time}", "of course, this is how it looks {time}", "here you go, {time}")
THANKS = ("thank you, that looks nice", "wow, thanks a lot", "great, thank you")
WELCOME = ("you are welcome", "glad you like it", "any time")


# The turns of a dialogue that carry a picture: the human's own, and the one the assistant is asked for.
SHARED_TURN, ASKED_TURN = 2, 5


def make_dialogue(scene: Scene, rng: random.Random) -> list[Turn]:
    """Human greets, Assistant replies, Human shares a picture, Assistant comments, Human asks for
    the same place at another time of day, Assistant answers with that picture, Human thanks,
    Assistant answers: turns 2 and 5 carry a picture, the six others are text only."""
    steps = rng.randrange(1, len(TIMES))
    other = scene.later(steps)
    time_words = TIME_WORDS[other.time]
    return [
        Turn(rng.choice(GREETINGS)),
        Turn(rng.choice(REPLIES)),
        Turn(rng.choice(SHARE).format(caption=caption(scene, rng.randrange(len(CAPTION_TEMPLATES)))), scene),
        Turn(rng.choice(("what a lovely view", "nice picture", "that looks great"))),
        Turn(rng.choice(ASK).format(time=time_words)),
        Turn(rng.choice(ANSWER).format(time=time_words), other),
        Turn(rng.choice(THANKS)),
        Turn(rng.choice(WELCOME)),
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
            rows.append(f"{caption(scene, rng.randrange(len(CAPTION_TEMPLATES)))}\t{relative}")
            truth.append(scene.attributes())
        files[split] = folder / f"cc3m_{split}.tsv"
        files[split].write_text("\n".join(rows) + "\n")
        (folder / f"scenes_{split}.json").write_text(json.dumps(truth))
    return files


def write_vist(folder: Path, sizes: WorldSizes) -> dict[str, Path]:
    """`{split}_cleaned.json` (story id -> steps of caption, image_id, sequence_index),
    `{split}_image_mapping.json` (image id -> path) and `images/{split}/*.jpg`, and
    `scenes_{split}.json` (image id -> attributes)."""
    files = {}
    for split, n in sizes.vist.items():
        rng = random.Random(f"{sizes.seed}-vist-{split}")
        pool = story_starts(sizes.story_length)
        stories, mapping, truth = {}, {}, {}
        for k in range(n):
            story = make_story(rng.choice(pool), sizes.story_length, rng)
            story_id = str(10_000 + k)
            steps = []
            for j, (text, scene) in enumerate(zip(story.captions, story.scenes)):
                image_id = f"{story_id}{j:02d}"
                relative = f"images/{split}/{image_id}.jpg"
                save_image(render(scene, sizes.image_size), folder / relative)
                steps.append({"caption": text, "image_id": image_id, "sequence_index": j})
                mapping[image_id] = relative
                truth[image_id] = scene.attributes()
            stories[story_id] = steps
        files[split] = folder / f"{split}_cleaned.json"
        files[split].write_text(json.dumps(stories, indent=1))
        (folder / f"{split}_image_mapping.json").write_text(json.dumps(mapping, indent=1))
        (folder / f"scenes_{split}.json").write_text(json.dumps(truth))
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
            for j, turn in enumerate(make_dialogue(rng.choice(pool), rng)):
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

