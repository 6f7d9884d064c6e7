"""The release's demo: continue a two-image story with text and a generated picture.

    python examples/playground.py                       # the toy preset: MiniGPT-5 trained in the toy world
    python examples/playground.py --preset tiny         # random weights: every code path, no meaning
    python examples/playground.py --model_config config/minigpt4.yaml \\
        --stage1_weight stage1_cc3m.ckpt --test_weight stage2_vist.ckpt
    ... --device cuda --llm_quantization 4bit --offload      # fits an 8 GB GPU

`--device` defaults to the GPU when one is present.

Feeds two story frames with the VIST system prompt and their captions (`--captions`), asks for the
next frame (the one `--caption` describes, or, without it, whatever the model tells next), draws `--num_samples`
answers (one batch, one seed per sample), saves each as a figure titled with the generated text,
and writes an HTML page with all of them, into `outputs/playground/` of this repository wherever it
is run from (`--out` to change it). Prints each answer with `[picture n]` where the model drew
picture n (sample_n.png), and what it wrote. Flags and input pictures are checked before the model
is loaded. With the toy preset (shipped in
`toyworld/pretrained/`, see docs/toyworld.md) the story is a toy-world story and the judge says what
each generated picture shows next to what the story implies; the real weights get the two beach
pictures in `examples/`.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from constants import IMAGE_SLOT  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_OUT = REPO / "outputs" / "playground"        # git-ignored; the same folder from any working directory
DEFAULT_IMAGES = [EXAMPLES / "story_1.jpg", EXAMPLES / "story_2.jpg"]
DEFAULT_CAPTIONS = ["We went to the beach on a sunny day and set up a red umbrella by the sea.",
                    "In the evening the sky turned orange and we built a sandcastle."]


def story_prompt(captions: list[str], llm_family: str = "vicuna", next_caption: str | None = None) -> str:
    """The VIST-format prompt: system prompt, the story so far (each caption followed by its
    image), then the request for the next scene: told by `next_caption` (the training data's first
    "generation" template), else left to the model (the first "multimodal" template); for another
    LLM family, the same story and request in that family's prompt style."""
    from prompts import ASSISTANT, HUMAN, VIST_GENERATION, VIST_MULTIMODAL, VIST_SYSTEM, vist_context

    template = VIST_MULTIMODAL[0] if next_caption is None else VIST_GENERATION[0]
    if llm_family == "vicuna":
        return VIST_SYSTEM + template.format(context=vist_context(captions), caption=next_caption)
    from llm_families import get_family
    from samples import Dialogue, Message, Segment

    request = template.format(context="", caption=next_caption).removeprefix(HUMAN).removesuffix(ASSISTANT).strip()
    story = [s for i, c in enumerate(captions) for s in (Segment(text=c), Segment(image=f"frame {i}"))]
    user = Message("user", tuple(story) + (Segment(text=request),))
    return get_family(llm_family).render(Dialogue(VIST_SYSTEM, (user, Message("assistant", ()))))[0]


def printable_answer(text: str, picture: int | str | list | None, end_sym: str = "###") -> str:
    """An answer as a person reads it: the vokens become `[picture n]` where picture n was drawn
    (dropped when none was; a list names the pictures of an answer's voken groups in order, each
    marked in its place), image slots and the end symbol go, spaces are tidied."""
    from constants import IMAGE_PLACEHOLDER

    marks = picture if isinstance(picture, list) else [] if picture is None else [picture]
    groups = iter(marks)
    text = re.sub(r"\[IMG0\](?:\[IMG[1-7]\])*", lambda _: f" [picture {label}] " if (label := next(groups, None))
                  is not None else " ", text)
    text = re.sub(r"\[IMG\d\]", " ", text)
    for token in (end_sym, IMAGE_PLACEHOLDER, "<Img>", "</Img>"):
        text = text.replace(token, " ")
    return " ".join(text.split())


def save_figure(path: Path, inputs: list, picture, text: str) -> None:
    """Input images and the generated picture (or the list of an answer's pictures, in order) side by
    side, titled with the generated text."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = picture if isinstance(picture, list) and picture else [picture if not isinstance(picture, list) else None]
    panels = list(inputs) + drawn
    labels = [f"input {i + 1}" for i in range(len(inputs))] + (
        ["generated"] if len(drawn) == 1 else [f"generated {j + 1}" for j in range(len(drawn))])
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.6), squeeze=False)
    for ax, image, label in zip(axes[0], panels, labels):
        ax.axis("off")
        ax.set_xlabel(label)
        if image is not None:
            ax.imshow(image, interpolation="nearest")   # toy pictures are 32 pixels wide
        else:
            ax.text(0.5, 0.5, "(no image)", ha="center", va="center")
    printable = "".join(c if c.isprintable() and ord(c) < 0x2E80 else "?" for c in text)  # font has no CJK/control
    fig.suptitle("\n".join(textwrap.wrap(printable or "(empty answer)", 90)[:4]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=None,
                        help="model YAML (default: the --preset's)")
    parser.add_argument("--preset", choices=["toy", "tiny"], default="toy",
                        help="without --model_config: toy (default; trained in the toy world, shipped in "
                             "toyworld/pretrained) or tiny (random weights, built under weights/tiny on first use)")
    parser.add_argument("--stage1_weight", default=None, help="stage-1 checkpoint (relative to WEIGHTFOLDER ok)")
    parser.add_argument("--test_weight", default=None, help="checkpoint loaded on top (e.g. stage2_vist.ckpt)")
    parser.add_argument("--prompt", default=None, help=f"full prompt; one {IMAGE_SLOT} per --images entry")
    parser.add_argument("--images", nargs="*", default=None, help="input images (default: the two story images)")
    parser.add_argument("--captions", nargs="*", default=None,
                        help="the story's captions, one per --images entry (default: the two story captions)")
    parser.add_argument("--caption", default=None,
                        help="the next frame's caption: ask for the frame it describes (default: the toy "
                             "preset's next caption where it ships one; else the model tells the next scene)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for the figures and the HTML page (default: outputs/playground in this repository)")
    parser.add_argument("--num_samples", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42, help="sample i uses seed + i")
    parser.add_argument("--html", default="playground.html", help="HTML file name inside --out ('' to skip)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens (0: off; "
                        "default 50, as the release)")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance (default: the toy preset's own; otherwise 7.5, the "
                             "release's)")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--scheduler", choices=["pndm", "dpm++"], default="pndm")
    parser.add_argument("--force_generation", action=argparse.BooleanOptionalAction, default=None,
                        help="make [IMG0] win until it appears (default: on for the tiny preset, whose random "
                             "weights rarely emit vokens by themselves; off otherwise)")
    parser.add_argument("--pictures", type=int, default=None,
                        help="answer with this many pictures: the model is made to emit this many voken groups "
                             "(each drawn in its place; a model trained on answers of several pictures, "
                             "docs/own_data.md, does so by itself)")
    parser.add_argument("--judge", action=argparse.BooleanOptionalAction, default=None,
                        help="read each generated picture with the toy world's judge (default: with the toy preset)")
    from placement import add_placement_arguments

    add_placement_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the demo; returns the paths written."""
    args = parse_args(argv)
    default_images, captions, expected, next_caption = DEFAULT_IMAGES, DEFAULT_CAPTIONS, None, None
    toy = args.model_config is None and args.preset == "toy"
    if toy:
        from toyworld.ship import use_shipped

        preset = use_shipped(args, "stage2_vist")
        default_images, captions = preset.story_images, preset.story_captions
        own_story = args.images is not None or args.captions is not None or args.caption is not None
        expected = preset.next_scene if not own_story and args.prompt is None else None
        next_caption = None if own_story else preset.next_caption
    captions = args.captions if args.captions is not None else captions
    next_caption = args.caption if args.caption is not None else next_caption
    if args.guidance_scale is None:
        from settings import PredictSettings

        args.guidance_scale = PredictSettings.guidance_scale
    images = [Path(p) for p in (args.images if args.images is not None else default_images)]
    for path in images:                          # fail before loading any model
        if not path.is_file():
            sys.exit(f"error: --images: {str(path)!r} does not exist")
    family = "vicuna"
    if args.model_config is not None:          # the prompt style is the config's LLM family's
        from configuration import ConfigError, load_config

        try:
            family = load_config(args.model_config, check_paths=False).llm_family
        except ConfigError as e:
            sys.exit(f"error: {e}")
    if args.prompt is None and len(captions) < len(images):
        sys.exit(f"error: --captions: {len(captions)} caption(s) for {len(images)} image(s) (one each)")
    prompt = args.prompt if args.prompt is not None else story_prompt(captions[: len(images)], family, next_caption)
    if prompt.count("<ImageHere>") != len(images):
        sys.exit(f"error: --prompt has {prompt.count('<ImageHere>')} <ImageHere> placeholder(s) but "
                 f"{len(images)} image(s) were given with --images")
    if args.num_samples < 1:
        sys.exit("error: --num_samples must be at least 1")
    if args.pictures is not None and args.pictures < 1:
        sys.exit(f"error: --pictures must be at least 1, got {args.pictures}")
    if args.top_k < 0:
        sys.exit(f"error: --top_k must be 0 (off) or positive, got {args.top_k}")
    from generation import check_generation_arguments

    try:
        check_generation_arguments([prompt], max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0,
                                   top_p=0.9, guidance_scale=args.guidance_scale,
                                   num_inference_steps=args.num_inference_steps)
    except ValueError as e:
        sys.exit(f"error: --{e}")
    from image_transforms import IMAGE_ERRORS, load_rgb

    inputs = []
    for path in images:                          # read (size checked from the header) before the model loads
        try:
            inputs.append(load_rgb(path))
        except IMAGE_ERRORS as e:
            sys.exit(f"error: --images: {str(path)!r} is not a readable image ({e})")

    from conversation import Conversation
    from prompts import VIST_SYSTEM
    from model import MiniGPT5_Model
    from placement import placement_kwargs

    try:
        model = MiniGPT5_Model.from_weights(args.model_config, args.stage1_weight, args.test_weight,
                                            **placement_kwargs(args))
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")

    n = args.num_samples
    outputs = model.generate([prompt] * n, [inputs] * n, seed=[args.seed + i for i in range(n)],
                             max_new_tokens=args.max_new_tokens, top_k=args.top_k, guidance_scale=args.guidance_scale,
                             num_inference_steps=args.num_inference_steps, scheduler=args.scheduler,
                             force_generation=args.pictures if args.pictures is not None
                             else args.force_generation if args.force_generation is not None
                             else args.model_config is None)
    judge = None
    if args.judge if args.judge is not None else toy:
        from toyworld.judge import judge
    if expected:
        print("the story implies the next frame shows: " + ", ".join(f"{k} {v}" for k, v in expected.items()))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    page = Conversation(system=VIST_SYSTEM if args.prompt is None else "")
    page.add("Human", prompt.removeprefix(VIST_SYSTEM), inputs)
    from conversation import answer_turn

    for i, out in enumerate(outputs):
        figure = out_dir / f"sample_{i}.png"
        # one picture: "[picture i]"; several: "[picture i.1]", "[picture i.2]", ... each in its place
        labels = [str(i)] if len(out.images) == 1 else [f"{i}.{j + 1}" for j in range(len(out.images))]
        answer = printable_answer(out.text, labels, model.model.end_sym)
        save_figure(figure, inputs, list(out.images), answer)
        written.append(figure)
        turn = answer_turn(out, model.model.end_sym)
        turn.text = f"[sample {i}, seed {args.seed + i}] {turn.text}"
        if turn.segments is not None:
            turn.segments.insert(0, f"[sample {i}, seed {args.seed + i}]")
        page.turns.append(turn)
        seen = ""
        if judge is not None and out.images:            # each picture judged, in order
            seen = " | the judge sees: " + "; ".join(
                (f"picture {j + 1}: " if len(out.images) > 1 else "") + ", ".join(f"{k} {v}" for k, v in judge(p).items())
                for j, p in enumerate(out.images))
        print(f"sample {i}: {answer or '(no text)'}{seen}")
    if args.html:
        html_path = out_dir / args.html
        page.to_html(html_path, title="MiniGPT-5 playground")
        written.append(html_path)
    print(f"wrote {len(outputs)} figures to {out_dir}/sample_*.png" + (f" and {written[-1]}" if args.html else ""))
    return written


if __name__ == "__main__":
    main()
