"""Web demo: an interleaved text-and-image chat with MiniGPT-5 in the browser (Gradio).

    python examples/web_demo.py                         # the toy preset (trained in the toy world), on a CPU
    python examples/web_demo.py --preset tiny           # random weights: every code path, no meaning
    python examples/web_demo.py --model_config config/minigpt4.yaml \\
        --stage1_weight stage1_cc3m.ckpt --test_weight stage2_mmdialog.ckpt
    python examples/web_demo.py --host 0.0.0.0 --port 7860   # reachable from other machines
    python examples/web_demo.py ... --llm_quantization 8bit   # a 12 GB GPU (--device: the GPU when present)

Then open http://127.0.0.1:7860 (the default address; `--host` / `--port` change it). Type a
message, attach zero or more images (the paper-clip button or drag and drop) and press Enter. The
model answers with text and, when it emits vokens, an inline generated picture. Each browser tab
is its own conversation (a `conversation.Conversation` in a `gr.State`), kept across turns and fed
back in the release's format (`###Human: ... <Img><ImageHere></Img> ###Assistant: ...`), the
model's own pictures included. The settings panel holds the guidance scale, the diffusion steps
and sampler, the seed (turn n of a conversation uses seed + n, so a conversation replays exactly),
"force an image" and the token budget; "Download conversation" saves the chat as one
self-contained HTML page.

There is one model: Gradio's queue runs one generation at a time and other users wait their turn.
Nothing is fetched from the internet (analytics off, no share link, no server-side rendering).
Bad input (a file that is not an image, an empty message) gets a notice in the chat; images with
a side longer than `--max_image_side` are downscaled before they reach the model (JPEGs are decoded
at a reduced scale; a picture that would still decode to more than `max_image_pixels`,
config/limits.yaml, is refused unread). Only files uploaded to this server are read: a file path a
client names in a message must lie, symbolic links resolved, inside Gradio's upload folder (one per
server, see below), where uploads are kept under names derived from their contents; any other path
is refused before it is opened, whatever the API call that carried it. Typed
`[IMG0]`..`[IMG7]` / `<ImageHere>` are turned into look-alikes that the model reads as plain text
(they would otherwise become vokens or an image slot without an image), and a message longer than
`--max_message_chars` is cut; both with a notice. Uploads, generated pictures and exports live in
one temporary folder per server (Gradio's upload cache included), removed when the server stops
(Ctrl+C or SIGTERM); a closed tab's files go at once.
"""
from __future__ import annotations

import argparse
import contextlib
import html
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # read by Gradio at import: no telemetry calls

import gradio as gr  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conversation import Conversation, neutralise_reserved_tokens  # noqa: E402
from image_transforms import load_rgb  # noqa: E402
from diffusion import SAMPLERS as SCHEDULERS  # noqa: E402
from prompts import MMDIALOG_SYSTEM  # noqa: E402

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 2048          # uploads with a longer side are downscaled (aspect kept) to this size
MAX_MESSAGE_CHARS = 2000       # longer messages are cut (Vicuna's context is 2048 tokens, history included)
NOTICE = "⚠️ "                 # prefix of the demo's own notices in the chat (never sent to the model)
HTML_NAME = "minigpt5-conversation.html"
# Gradio's chat shows a "Share" button (upload to Hugging Face) under every picture, whatever the
# component's `buttons` say; this demo stays offline, so hide it.
CSS = '#chat button[aria-label="Share"] { display: none !important; }'


class UploadError(ValueError):
    """An uploaded file that cannot be used as an input image."""


class ChatSession:
    """One browser tab's state: the `Conversation` the model sees, the messages the chat shows
    (which also hold the demo's notices) and a private folder for generated pictures and the
    HTML export. Created on the first message; `close` removes the folder."""

    def __init__(self, system: str = MMDIALOG_SYSTEM, root: str | os.PathLike | None = None):
        self.conversation = Conversation(system=system)
        self.messages: list[dict[str, Any]] = []
        self.pending = False            # a Human turn waits for its answer
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="minigpt5-web-", dir=root))
        self._saved = 0

    @property
    def assistant_turns(self) -> int:
        """How many answers the model has given in this conversation."""
        return sum(turn.role == "Assistant" for turn in self.conversation.turns)

    def save_image(self, image: Image.Image, stem: str) -> str:
        """Write `image` as a PNG in the session folder; returns its path (for the chat)."""
        self.folder.mkdir(parents=True, exist_ok=True)       # "new conversation" during a generation removed it
        self._saved += 1
        path = self.folder / f"{self._saved:03d}-{stem}.png"
        image.save(path, format="PNG")
        return str(path)

    def export_html(self) -> str:
        """Write the conversation as a self-contained HTML page; returns its path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / HTML_NAME
        self.conversation.to_html(path, title="MiniGPT-5 chat")
        return str(path)

    def close(self) -> None:
        """Delete the session's files."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _close_session(session: ChatSession | None) -> None:
    """`gr.State` delete callback: called when a tab is closed or reloaded."""
    if session is not None:
        session.close()


def upload_folder() -> Path:
    """Where Gradio keeps the files clients upload (`GRADIO_TEMP_DIR`: one folder per server under
    `main`), resolved."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def check_uploaded(path: str | os.PathLike) -> None:
    """Raise `UploadError` unless `path`, with `..` and symbolic links resolved, is a file inside
    Gradio's upload folder: the demo reads what clients uploaded to this server, nothing else on it."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(upload_folder()) or not real.is_file():
        raise UploadError(f"{Path(path).name!r} is not a file uploaded to this chat; attach images with the "
                          f"paper clip")


def load_image(path: str | os.PathLike, max_side: int = MAX_IMAGE_SIDE) -> tuple[Image.Image, bool]:
    """Open an uploaded file as an RGB image, downscaled so that its longer side is at most
    `max_side`. Returns (image, downscaled); raises `UploadError` with a readable reason when
    the file is not an image PIL can decode, or would decode to more than `max_image_pixels`."""
    name = Path(path).name
    try:
        image = load_rgb(path, draft=max_side)            # JPEG: decode big photos at a reduced size
    except Image.DecompressionBombError as e:
        raise UploadError(f"{name!r} is too large to open safely ({str(e).replace(str(path), name)})") from e
    except UnidentifiedImageError as e:
        raise UploadError(f"{name!r} is not an image (or not in a format this demo reads); "
                          f"attach PNG, JPEG, WebP, GIF or BMP files") from e
    except (OSError, ValueError, SyntaxError) as e:          # truncated or corrupt image data
        reason = str(e).replace(str(path), name)
        raise UploadError(f"{name!r} could not be decoded as an image ({type(e).__name__}: {reason})") from e
    downscaled = max(image.size) > max_side
    if downscaled:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image, downscaled


def prepare_text(text: str, max_chars: int = MAX_MESSAGE_CHARS) -> tuple[str, list[str]]:
    """A typed message as the model will get it, and the notices for the user: reserved tokens
    neutralised (`conversation.neutralise_reserved_tokens`), then cut to `max_chars` characters."""
    notes = []
    text, found = neutralise_reserved_tokens(text)
    if found:
        many = len(found) > 1
        notes.append(f"{', '.join(found)} in your message {'were' if many else 'was'} sent as plain text "
                     f"({'they are' if many else 'it is'} reserved for the model's pictures and your attached images).")
    if len(text) > max_chars:
        notes.append(f"Your message had {len(text):,} characters; only the first {max_chars:,} were sent.")
        text = text[:max_chars].rstrip()
    return text, notes


def _chat_text(text: str) -> str:
    """Text for a chat message, shown literally: the chat renders HTML, and the model's answers
    (and the prompt format) contain tags such as `<Img>` that must stay visible."""
    return html.escape(text, quote=False)


def _chat_image(path: str) -> gr.Image:
    """An image for a chat message, with download and full-screen buttons (see `CSS` for the
    share button Gradio adds anyway)."""
    return gr.Image(path, buttons=["download", "fullscreen"], show_label=False, container=False)


def _file_path(item: Any) -> str:
    """A path from a `MultimodalTextbox` file entry (a path string, or a dict with `path`)."""
    return item if isinstance(item, str) else item["path"]


def build_demo(model, *, system_prompt: str = MMDIALOG_SYSTEM, max_new_tokens: int = 256,
               guidance_scale: float = 7.5, num_inference_steps: int = 50, scheduler: str = "pndm",
               seed: int = 42, force_generation: bool = False, top_k: int = 50,
               max_image_side: int = MAX_IMAGE_SIDE, max_message_chars: int = MAX_MESSAGE_CHARS,
               files_root: str | os.PathLike | None = None, title: str = "MiniGPT-5 chat") -> gr.Blocks:
    """The chat app for `model` (a `MiniGPT5_Model`), not yet launched.

    The keyword arguments are the initial values of the settings panel (and the system prompt
    every conversation starts with); each tab's files go into a folder under `files_root`
    (default: the system's temporary folder). Launch it with `launch(demo, ...)` (or `demo.launch`
    yourself: keep `demo.queue(...)` as set here so generations never run concurrently).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    generate_lock = threading.Lock()    # belt and braces: the queue already runs one generation at a time

    def _box(value: dict | None = None, interactive: bool = True) -> gr.MultimodalTextbox:
        return gr.MultimodalTextbox(value=value or {"text": "", "files": []}, interactive=interactive)

    def accept(message: dict | None, session: ChatSession | None) -> tuple:
        """Step 1 of a turn (not queued, instant): check the message and show it, or show a notice
        and send nothing. An accepted message becomes the conversation's pending Human turn."""
        session = session or ChatSession(system_prompt, files_root)
        message = message or {}
        text, text_notes = prepare_text((message.get("text") or "").strip(), max_message_chars)
        paths = [_file_path(item) for item in message.get("files") or []]

        def notice(note: str, keep: dict | None = None) -> tuple:
            session.messages.append({"role": "assistant", "content": _chat_text(NOTICE + note)})
            return session, session.messages, _box(keep)

        if not text and not paths:
            return notice("Type a message or attach an image first.")
        images, shown, bad, notes = [], [], [], []
        for path in paths:
            try:
                check_uploaded(path)
                image, downscaled = load_image(path, max_image_side)
            except UploadError as e:
                bad.append(str(e))
                continue
            if downscaled:
                notes.append(f"{Path(path).name!r} was downscaled to {image.width} x {image.height} pixels "
                             f"(the limit is {max_image_side} on the longer side).")
                path = session.save_image(image, "upload")
            images.append(image)
            shown.append(path)
        if bad:  # send nothing; keep the text and the good images in the box so the user can fix it and resend
            return notice("Nothing was sent: " + "; ".join(bad) + ".",
                          keep={"text": message.get("text") or "", "files": shown})

        session.messages.append({"role": "user", "content": ([_chat_text(text)] if text else [])
                                 + [_chat_image(p) for p in shown]})
        session.messages.extend({"role": "assistant", "content": _chat_text(NOTICE + n)} for n in text_notes + notes)
        session.conversation.add("Human", text, images)
        session.pending = True
        return session, session.messages + [{"role": "assistant", "content": "…"}], _box(interactive=False)

    def answer(session: ChatSession | None, guidance: float, steps: float, base_seed: float | None, force: bool,
               new_tokens: float, sampler: str, k: float | None) -> tuple:
        """Step 2 of a turn (queued, one at a time over all users): answer the pending Human turn."""
        if session is None or not session.pending:           # a notice instead, or "New conversation" meanwhile
            return session, gr.skip(), gr.skip(), gr.skip()
        session.pending = False
        turn_seed = int(base_seed or 0) + session.assistant_turns
        try:
            with generate_lock:
                out = session.conversation.respond(
                    model, max_new_tokens=int(new_tokens), guidance_scale=float(guidance),
                    num_inference_steps=int(steps), scheduler=sampler, seed=turn_seed, force_generation=bool(force),
                    top_k=int(k or 0))
        except (RuntimeError, ValueError, OSError) as e:       # report it, keep the server and the chat usable
            log.exception("generation failed")
            session.conversation.turns.pop()                  # the Human turn goes with its failed answer
            session.messages.pop()
            session.messages.append({"role": "assistant", "content": _chat_text(
                f"{NOTICE}Generation failed ({type(e).__name__}: {e}). Your message was not kept; "
                f"try other settings or a new conversation.")})
            return session, session.messages, _box(), gr.skip()
        # The answer as it reads: each picture in its place among the text (one picture: after it).
        turn = session.conversation.turns[-1]
        reply: list[Any] = [_chat_text(piece) if isinstance(piece, str)
                            else _chat_image(session.save_image(piece, "generated")) for piece in turn.pieces()]
        session.messages.append({"role": "assistant", "content": reply or "(empty answer)"})
        return session, session.messages, _box(), gr.DownloadButton(value=session.export_html(), interactive=True)

    def new_conversation(session: ChatSession | None) -> tuple:
        _close_session(session)
        return None, [], _box(), gr.DownloadButton(value=None, interactive=False)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        session_state = gr.State(None, delete_callback=_close_session)
        gr.Markdown(f"# {title}\nText and images in, text and images out. Attach images with the "
                    "paper clip; the model may answer with a picture.")
        chatbot = gr.Chatbot(elem_id="chat", label="Conversation", height="68vh", min_height=360, feedback_options=None,
                             group_consecutive_messages=False, buttons=["copy", "copy_all"],
                             render_markdown=False)
        box = gr.MultimodalTextbox(elem_id="message", file_types=["image"], file_count="multiple",
                                   placeholder="Type a message, attach images, press Enter", show_label=False,
                                   sources=["upload"])
        with gr.Row():
            download = gr.DownloadButton("Download conversation (HTML)", elem_id="download", interactive=False)
            clear = gr.Button("New conversation", elem_id="new-conversation")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            with gr.Row():
                force_box = gr.Checkbox(force_generation, label="Force an image", elem_id="force-image",
                                        info="make the model emit vokens (an image) in its answer")
                guidance_slider = gr.Slider(1.0, 20.0, guidance_scale, step=0.5, label="Guidance scale")
                steps_slider = gr.Slider(1, 150, num_inference_steps, step=1, label="Diffusion steps")
            with gr.Row():
                seed_box = gr.Number(seed, precision=0, label="Seed", info="turn n uses seed + n")
                tokens_slider = gr.Slider(1, 1024, max_new_tokens, step=1, label="Max new tokens")
                sampler_box = gr.Dropdown(list(SCHEDULERS), value=scheduler, label="Sampler")
                top_k_box = gr.Number(top_k, precision=0, minimum=0, label="Top-k",
                                      info="sample among the k likeliest tokens (0: off)")

        settings = [guidance_slider, steps_slider, seed_box, force_box, tokens_slider, sampler_box, top_k_box]
        box.submit(accept, [box, session_state], [session_state, chatbot, box], queue=False).then(
            answer, [session_state, *settings], [session_state, chatbot, box, download], concurrency_id="model")
        for event in (clear.click, chatbot.clear):       # the chat's own trash button starts over too
            event(new_conversation, [session_state], [session_state, chatbot, box, download], queue=False)
    demo.queue(default_concurrency_limit=1)     # one model: users wait in line instead of colliding
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True,
           max_file_size: str | int | None = "50mb", quiet: bool = False) -> None:
    """Start the server on `host:port` with the demo's offline settings (no share link, no
    server-side rendering, no run history kept in the browser). With `block=False` it returns once
    the server is up; stop it with `demo.close()`."""
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False,
                prevent_thread_lock=not block, max_file_size=max_file_size, quiet=quiet,
                run_history=False, pwa=False, css=CSS)


@contextlib.contextmanager
def server_files() -> Any:
    """One temporary folder for everything a server writes: Gradio's upload cache
    (`GRADIO_TEMP_DIR` points into it while the block runs) and the chat sessions' folders. It is
    removed when the block ends: the server stopped by Ctrl+C, by SIGTERM (turned into the same
    clean stop) or by an error. Yields the folder."""
    root = Path(tempfile.mkdtemp(prefix="minigpt5-web-server-"))
    saved_env = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    saved_handler = None
    if threading.current_thread() is threading.main_thread():
        saved_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        yield root
    finally:
        if saved_handler is not None:
            signal.signal(signal.SIGTERM, saved_handler)
        if saved_env is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved_env
        shutil.rmtree(root, ignore_errors=True)
        log.info("removed the server's files (%s)", root)


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # Gradio's blocking loop closes the server on it, then `server_files` cleans up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=None, help="model YAML (default: the --preset's)")
    parser.add_argument("--preset", choices=["toy", "tiny"], default="toy",
                        help="without --model_config: toy (default; trained in the toy world, shipped in "
                             "toyworld/pretrained, its MMDialog model) or tiny (random weights)")
    parser.add_argument("--stage1_weight", default=None, help="stage-1 checkpoint (relative to WEIGHTFOLDER ok)")
    parser.add_argument("--test_weight", default=None, help="checkpoint loaded on top (e.g. stage2_mmdialog.ckpt)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    initial = "initial value of the setting (default: %(default)s)"
    parser.add_argument("--max_new_tokens", type=int, default=256, help=initial)
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance (default: the toy preset's own; otherwise 7.5, the "
                             "release's)")
    parser.add_argument("--num_inference_steps", type=int, default=50, help=initial)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="pndm", help=initial)
    parser.add_argument("--seed", type=int, default=42, help=initial + "; turn n uses seed + n")
    parser.add_argument("--top_k", type=int, default=50, help=initial + "; 0 turns it off (50: the release's)")
    parser.add_argument("--force_generation", action=argparse.BooleanOptionalAction, default=None,
                        help="initial state of 'Force an image' (default: on for the tiny preset, whose random "
                             "weights rarely emit vokens by themselves; off otherwise)")
    parser.add_argument("--max_image_side", type=int, default=MAX_IMAGE_SIDE,
                        help="uploads with a longer side are downscaled to this many pixels (default: %(default)s)")
    parser.add_argument("--max_file_size", default="50mb",
                        help="largest upload Gradio accepts, e.g. 20mb (default: %(default)s)")
    parser.add_argument("--max_message_chars", type=int, default=MAX_MESSAGE_CHARS,
                        help="longer messages are cut, with a notice (default: %(default)s)")
    from placement import add_placement_arguments

    add_placement_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_image_side < 1:
        parser.error(f"--max_image_side must be positive, got {args.max_image_side}")
    if args.max_message_chars < 1:
        parser.error(f"--max_message_chars must be positive, got {args.max_message_chars}")
    if args.top_k < 0:
        parser.error(f"--top_k must be 0 (off) or positive, got {args.top_k}")
    from generation import check_generation_arguments

    try:                                        # before any model loads
        check_generation_arguments(["-"], max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0,
                                   top_p=0.9, num_inference_steps=args.num_inference_steps,
                                   guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale)
    except ValueError as e:
        parser.error(f"--{e}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Load the model, build the app and serve it until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # Gradio's own start-up checks on loopback
    from model import MiniGPT5_Model
    from placement import placement_kwargs

    force = args.force_generation if args.force_generation is not None else args.model_config is None
    if args.model_config is None and args.preset == "toy":
        from toyworld.ship import use_shipped

        force = bool(args.force_generation)
        preset = use_shipped(args, "stage2_mmdialog")
        print(f"toy preset: share a toy picture (e.g. {preset.story_images[0]}) saying what it shows, e.g. "
              f"'here is what i saw: {preset.story_captions[0]}', then ask 'can you show me the same place at night'")
    if args.guidance_scale is None:
        from settings import PredictSettings

        args.guidance_scale = PredictSettings.guidance_scale
    try:
        model = MiniGPT5_Model.from_weights(args.model_config, args.stage1_weight, args.test_weight,
                                            **placement_kwargs(args))
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    with server_files() as files:
        demo = build_demo(model, max_new_tokens=args.max_new_tokens, guidance_scale=args.guidance_scale,
                          num_inference_steps=args.num_inference_steps, scheduler=args.scheduler, seed=args.seed,
                          force_generation=force, top_k=args.top_k, max_image_side=args.max_image_side,
                          max_message_chars=args.max_message_chars, files_root=files)
        print(f"MiniGPT-5 chat on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
        launch(demo, args.host, args.port, max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
