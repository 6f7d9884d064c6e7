"""Write the project's own small sample datasets, in the release's on-disk formats:

    datasets/CC3M/      cc3m_train.tsv, cc3m_val.tsv (caption<TAB>image_path), {train,val}/NNN.jpg + NNN.txt
    datasets/VIST/      {train,val}_cleaned.json + {train,val}_image_mapping.json, {train,val}_images/NNN.jpg
    datasets/MMDialog/  {train,test}/{train,test}_conversations.txt (JSON lines) + <media_id>.jpg

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


def main() -> None:
    """Write (replacing) datasets/CC3M, datasets/VIST and datasets/MMDialog under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "datasets"), help="output folder (default: datasets/)")
    args = parser.parse_args()
    out = Path(args.out)
    for name, write in (("CC3M", write_cc3m), ("VIST", write_vist), ("MMDialog", write_mmdialog)):
        shutil.rmtree(out / name, ignore_errors=True)
        (out / name).mkdir(parents=True)
        write(out / name)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"sample datasets written to {out} ({total / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
