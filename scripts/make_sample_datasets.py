"""Write the project's own small sample datasets, in the release's on-disk formats:

    datasets/CC3M/      cc3m_train.tsv, cc3m_val.tsv (caption<TAB>image_path), {train,val}/NNN.jpg + NNN.txt
    datasets/VIST/      {train,val}_cleaned.json + {train,val}_image_mapping.json, {train,val}_images/NNN.jpg
    datasets/MMDialog/  {train,test}/{train,test}_conversations.txt (JSON lines) + <media_id>.jpg
    datasets/interleaved/  train.jsonl, test.jsonl (the generic interleaved format, docs/own_data.md) + pictures/

The layout is the release's (its datasets/ folder): CC3M's pictures of a split in a folder of that
name, each with its caption beside it in a .txt (as img2dataset writes them), so that
`CC3M_FOLDER=datasets/CC3M python metric.py ...` finds the FID real set, every .jpg under `val/`;
VIST's in `{split}_images/`.

Images are 64 x 64 JPEGs drawn with PIL (a coloured shape on a coloured background) and the
captions describe them. Everything is deterministic; the whole folder is a few tens of kB.
Paths match the release's train_eval flags, e.g.

    DATAFOLDER=datasets/CC3M     --train_data_path cc3m_train.tsv      --val_data_path cc3m_val.tsv
    DATAFOLDER=datasets/VIST     --train_data_path train_cleaned.json  --val_data_path val_cleaned.json
    DATAFOLDER=datasets/MMDialog --train_data_path train/train_conversations.txt
                                 --test_data_path test/test_conversations.txt

Usage: python scripts/make_sample_datasets.py [--out datasets]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: str, background: str, size: int = 40, x: int = 32, y: int = 32) -> Image.Image:
    """A `colour` `shape` of width `size` centred at (x, y) on a `background` square."""
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[background])
    pen = ImageDraw.Draw(image)
    half = size // 2
    box = (x - half, y - half, x + half, y + half)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=COLOURS[colour])
    return image


def save(image: Image.Image, path: Path) -> None:
    """A small, deterministic JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=85)


# ---- CC3M -------------------------------------------------------------------------------------

CC3M_ROWS = {
    "train": [
        ("circle", "red", "blue", "A red circle on a blue background."),
        ("square", "green", "white", "green square on a white background ."),
        ("triangle", "yellow", "black", "A YELLOW triangle : on a black background !"),
        ("circle", "purple", "yellow", "purple circle on a yellow background ."),
        ("square", "orange", "blue", "an orange square (small) on a blue background ."),
        ("triangle", "white", "green", "white triangle on a green background ."),
    ],
    "val": [
        ("square", "red", "yellow", "red square on a yellow background ."),
        ("circle", "black", "white", "a black circle on a white background ."),
        ("triangle", "blue", "orange", "Blue triangle on an orange background."),
    ],
}


def write_cc3m(root: Path) -> None:
    """`cc3m_{train,val}.tsv` with paths relative to `root`, images under `root/{train,val}/`, each
    with its caption in a `.txt` beside it."""
    index = 0
    for split, rows in CC3M_ROWS.items():
        lines = ["caption\timage_path"]
        for shape, colour, background, caption in rows:
            relative = f"{split}/{index:09d}.jpg"
            save(draw(shape, colour, background), root / relative)
            (root / relative).with_suffix(".txt").write_text(caption)
            lines.append(f"{caption}\t{relative}")
            index += 1
        (root / f"cc3m_{split}.tsv").write_text("\n".join(lines) + "\n")


# ---- VIST -------------------------------------------------------------------------------------

# Each story: (story id, [(shape, colour, background, size, x, y, caption), ...]).
VIST_STORIES = {
    "train": [
        ("1001", [
            ("circle", "yellow", "blue", 16, 32, 52, "the sun was rising over the blue sky ."),
            ("circle", "yellow", "blue", 24, 32, 36, "it climbed higher and got bigger ."),
            ("circle", "orange", "blue", 32, 32, 24, "at noon it was orange and bright ."),
            ("circle", "red", "purple", 24, 32, 44, "in the evening the sky turned purple ."),
            ("circle", "red", "black", 12, 32, 58, "then the red sun was gone and it was night ."),
        ]),
        ("1002", [
            ("square", "green", "white", 20, 20, 20, "we built a small green box ."),
            ("square", "green", "white", 40, 32, 32, "then we made it much bigger ."),
            ("triangle", "red", "white", 40, 32, 32, "we put a red roof on top ."),
            ("triangle", "red", "green", 48, 32, 32, "our little house was finished in the garden ."),
        ]),
        ("1003", [
            ("triangle", "grey", "blue", 40, 32, 40, "we saw a grey mountain by the lake ."),
            ("triangle", "white", "blue", 30, 32, 36, "snow covered the top ."),
            ("circle", "yellow", "blue", 14, 50, 14, "the sun came out behind it ."),
        ]),
    ],
    "val": [
        ("2001", [
            ("square", "blue", "yellow", 20, 16, 32, "a blue car drove onto the yellow road ."),
            ("square", "blue", "yellow", 20, 32, 32, "it kept going down the road ."),
            ("square", "blue", "yellow", 20, 48, 32, "soon it was almost out of sight ."),
            ("square", "red", "yellow", 20, 32, 32, "then a red car came along ."),
            ("square", "purple", "yellow", 40, 32, 32, "at the end a big purple truck arrived ."),
        ]),
        ("2002", [
            ("circle", "white", "black", 20, 32, 32, "the moon was out that night ."),
            ("circle", "white", "black", 30, 32, 32, "it looked bigger than ever ."),
            ("circle", "grey", "black", 30, 32, 32, "clouds made it grey for a while ."),
        ]),
    ],
}


def write_vist(root: Path) -> None:
    """`{train,val}_cleaned.json` and `{train,val}_image_mapping.json`, images under `root/{train,val}_images/`."""
    index = 0
    for split, stories in VIST_STORIES.items():
        annotations, mapping = {}, {}
        for story_id, steps in stories:
            annotations[story_id] = []
            for k, (shape, colour, background, size, x, y, caption) in enumerate(steps):
                image_id = str(5000000 + index)
                relative = f"{split}_images/{index:09d}.jpg"
                save(draw(shape, colour, background, size, x, y), root / relative)
                annotations[story_id].append({"caption": caption, "image_id": image_id, "sequence_index": k})
                mapping[image_id] = relative
                index += 1
        (root / f"{split}_cleaned.json").write_text(json.dumps(annotations, indent=4) + "\n")
        (root / f"{split}_image_mapping.json").write_text(json.dumps(mapping, indent=4) + "\n")


# ---- MMDialog ---------------------------------------------------------------------------------

LONG_TURN = ("Let me tell you everything about my trip, because it was long and there is a lot to say: "
             "we started early in the morning, drove for many hours through the hills, stopped at a "
             "small town for lunch, walked along the river, took photos of every bridge we could find, "
             "met some very friendly people at the market, and only got back home long after midnight, "
             "tired but very happy with all the pictures we took along the way.")

# Each conversation: (id, [(text, media) ...]); media = (media id, shape, colour, background) or None.
MMDIALOG_CONVERSATIONS = {
    "train": [
        (100, [
            ("Look at the red ball I found today!", ("7310542291065782301", "circle", "red", "green")),
            ("Nice! Mine is a blue box.", ("-2954016637204112853", "square", "blue", "white")),
            ("Is it heavy?", None),
            ("Not at all, it is empty. Here it is from the top.", ("4417720183651204577", "square", "blue", "grey")),
            ("Cool, thanks for sharing.", None),
        ]),
        (101, [("Only one turn here, so the release skips this conversation.", None)]),
        (102, [
            ("How was your trip?", None),
            ("Great, here is the sunset we saw.", ("-6632019287733015560", "circle", "orange", "purple")),
            (LONG_TURN, None),
            ("Sounds wonderful.", None),
        ]),
        (103, [
            ("What are you drawing?", None),
            ("A yellow triangle, look.", ("1184506672931905542", "triangle", "yellow", "black")),
            ("", ("-8012734002461389771", "triangle", "yellow", "white")),
            ("That one has no text, so the release stops here.", None),
        ]),
    ],
    "test": [
        (200, [
            ("Guess what I painted.", ("-1537700284470129934", "circle", "green", "yellow")),
            ("A green apple?", None),
            ("Yes! And here is a pear.", ("5520318890715529216", "triangle", "green", "yellow")),
            ("Both look tasty.", None),
        ]),
        (201, [
            ("Which colour should the door be?", None),
            ("I would paint it purple.", ("3361870021987654321", "square", "purple", "white")),
            ("Good idea, like this?", ("-4429918273645546372", "square", "purple", "grey")),
            ("Exactly like that.", None),
            ("Then it is decided.", None),
            ("Send me a photo when it is done.", None),
        ]),
    ],
}


def write_mmdialog(root: Path) -> None:
    """`{train,test}/{train,test}_conversations.txt` (JSON lines) with `<media_id>.jpg` beside them."""
    for split, conversations in MMDIALOG_CONVERSATIONS.items():
        folder = root / split
        lines = []
        for conversation_id, turns in conversations:
            conversation = []
            for text, media in turns:
                turn = [{"__TEXT__": text}]
                if media is not None:
                    media_id, shape, colour, background = media
                    save(draw(shape, colour, background), folder / f"{media_id}.jpg")
                    turn.append({"__MEDIA__": media_id})
                conversation.append({"turn": turn})
            lines.append(json.dumps({
                "conversation_id": conversation_id, "conversation": conversation,
                # The real files also carry retrieval candidates; MiniGPT-5 ignores them.
                "negative_candidate_media_keys": ["-1000000000000000001", "1000000000000000002"],
                "negative_candidate_texts": ["an unrelated reply", "another unrelated reply"],
            }))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}_conversations.txt").write_text("\n".join(lines) + "\n")


def scene(shape: str, noon: bool, colour: tuple[int, int, int]) -> Image.Image:
    """A 64 x 64 picture of the interleaved example: a shape on grass, under a day or a night sky."""
    image = Image.new("RGB", (64, 64), (135, 200, 250) if noon else (15, 20, 60))
    pen = ImageDraw.Draw(image)
    pen.rectangle([0, 44, 63, 63], fill=(60, 160, 60) if noon else (20, 60, 25))
    if shape == "ball":
        pen.ellipse([22, 26, 42, 46], fill=colour)
    elif shape == "box":
        pen.rectangle([20, 24, 44, 46], fill=colour)
    elif shape == "tree":
        pen.rectangle([29, 30, 35, 46], fill=(110, 70, 30))
        pen.ellipse([18, 8, 46, 36], fill=colour)
    elif shape == "house":
        pen.rectangle([18, 26, 46, 46], fill=colour)
        pen.polygon([(14, 26), (32, 10), (50, 26)], fill=(150, 40, 40))
    elif shape == "sun":
        pen.ellipse([40, 4, 58, 22], fill=colour)
    return image


INTERLEAVED_PICTURES = {
    "ball_noon": ("ball", True, (220, 30, 30)), "ball_night": ("ball", False, (120, 20, 20)),
    "box_noon": ("box", True, (40, 60, 220)), "box_night": ("box", False, (20, 30, 100)),
    "tree": ("tree", True, (30, 130, 40)), "house": ("house", True, (230, 220, 180)),
    "house_night": ("house", False, (90, 85, 60)), "sun": ("sun", True, (250, 220, 40)),
}
CAPTIONS = {"ball_noon": "a red ball on grass at noon", "ball_night": "a red ball on grass at night",
            "box_noon": "a blue box on grass at noon", "box_night": "a blue box on grass at night",
            "tree": "a green tree on grass", "house": "a house on grass by day",
            "house_night": "a house on grass at night", "sun": "the sun over grass"}


def write_interleaved(root: Path) -> None:
    """The generic interleaved format's example (docs/own_data.md): train.jsonl (20 lines:
    conversations, documents without roles, answers of one and of two pictures, questions about
    pictures) and test.jsonl (4 lines), the pictures in pictures/."""
    (root / "pictures").mkdir()
    for name, (shape, noon, colour) in INTERLEAVED_PICTURES.items():
        scene(shape, noon, colour).save(root / "pictures" / f"{name}.jpg", quality=90)

    def img(name: str, caption: bool = False) -> dict:
        return {"image": f"pictures/{name}.jpg", **({"caption": CAPTIONS[name]} if caption else {})}

    def text(value: str) -> dict:
        return {"text": value}

    def user(*segments) -> dict:
        return {"role": "user", "segments": list(segments)}

    def assistant(*segments) -> dict:
        return {"role": "assistant", "segments": list(segments)}

    def ask(id_: str, request: str, *answer) -> dict:
        return {"id": id_, "turns": [user(text(request)), assistant(*answer)]}

    def story(id_: str, *turns) -> dict:
        return {"id": id_, "turns": [list(turn) for turn in turns]}

    train = [
        ask("ball_day_night", "Show me the ball at noon and then at night.", text("At noon:"), img("ball_noon", True),
            text("and at night:"), img("ball_night", True)),
        ask("box_day_night", "Show me the box at noon and then at night.", text("At noon:"), img("box_noon", True),
            text("and at night:"), img("box_night", True)),
        ask("house_day_night", "Draw the house by day, then by night.", img("house", True), img("house_night", True)),
        ask("ball_noon", "Draw a red ball on the grass at noon.", img("ball_noon", True)),
        ask("ball_night", "Draw a red ball on the grass at night.", img("ball_night", True)),
        ask("box_noon", "Draw a blue box on the grass at noon.", img("box_noon", True)),
        ask("tree", "Can you paint a tree?", text("Here is a tree:"), img("tree", True)),
        ask("sun", "A sunny day, please.", text("The sun is out:"), img("sun", True)),
        {"id": "what_is_it", "turns": [user(img("tree"), text("What is in this picture?")),
                                       assistant(text("A green tree standing on the grass."))]},
        {"id": "night_or_day", "turns": [user(img("ball_night"), text("Is it day or night here?")),
                                         assistant(text("It is night: the sky is dark."))]},
        {"id": "ball_chat", "system": "You draw simple scenes and talk about them.",
         "turns": [user(text("Draw a ball.")), assistant(text("Here it is:"), img("ball_noon")),
                   user(text("Now the same ball at night.")), assistant(text("At night:"), img("ball_night"))]},
        {"id": "box_chat", "turns": [user(text("Draw a box at noon.")), assistant(img("box_noon")),
                                     user(text("What colour is it?")), assistant(text("It is blue."))]},
        story("house_story", [text("A small house stands on the grass."), img("house")],
              [text("Night falls and the house grows dark."), img("house_night")]),
        story("ball_story", [text("In the morning a red ball lies on the grass."), img("ball_noon")],
              [text("Then evening comes."), img("ball_night")], [text("The ball waits for the next day.")]),
        story("garden_story", [text("The garden has a tree."), img("tree")], [text("Next to it the sun shines."),
              img("sun")], [text("And a house stands close by."), img("house")]),
        story("box_story", [text("A blue box sits in the sun."), img("box_noon")],
              [text("At night it is hard to see."), img("box_night")]),
        ask("tree_and_house", "Show me a tree and then a house.", text("A tree:"), img("tree", True),
            text("and a house:"), img("house", True)),
        ask("sun_and_ball", "First the sun, then the ball.", img("sun", True), img("ball_noon", True)),
        {"id": "describe_two", "turns": [user(img("box_noon"), img("box_night"),
                                              text("What changed between these two pictures?")),
                                         assistant(text("Night fell: the sky and the box turned dark."))]},
        ask("house_night", "Draw the house at night.", img("house_night", True)),
    ]
    test = [
        ask("box_then_house", "Show me the box at noon and then the house at night.", text("The box:"),
            img("box_noon", True), text("and the house:"), img("house_night", True)),
        ask("tree_then_sun", "A tree, then the sun.", img("tree", True), img("sun", True)),
        ask("box_night", "Draw a blue box on the grass at night.", img("box_night", True)),
        {"id": "what_house", "turns": [user(img("house"), text("What is in this picture?")),
                                       assistant(text("A house standing on the grass."))]},
    ]
    for name, lines in (("train.jsonl", train), ("test.jsonl", test)):
        (root / name).write_text("".join(json.dumps(line) + "\n" for line in lines))


def main() -> None:
    """Write (replacing) datasets/CC3M, datasets/VIST, datasets/MMDialog and datasets/interleaved under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "datasets"), help="output folder (default: datasets/)")
    args = parser.parse_args()
    out = Path(args.out)
    for name, write in (("CC3M", write_cc3m), ("VIST", write_vist), ("MMDialog", write_mmdialog),
                        ("interleaved", write_interleaved)):
        shutil.rmtree(out / name, ignore_errors=True)
        (out / name).mkdir(parents=True)
        write(out / name)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"sample datasets written to {out} ({total / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
