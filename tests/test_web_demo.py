"""The web chat demo (examples/web_demo.py), driven in a real headless Chromium through Playwright.

One tiny model and one server for the module, on a free loopback port. The model's `generate` is
wrapped so the tests can check on the server side what each turn sent (prompt, images, settings)
and that generations never overlapped. While the server runs, outbound connections from this
process to anything but loopback are refused and recorded, and the browser's requests to other
hosts are aborted and recorded: the demo must work offline. The browser tests skip only when
Debian's /usr/bin/chromium is missing (`apt-get install chromium`); no browser is ever downloaded.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import web_demo  # noqa: E402
from constants import IMAGE_SLOT, RESERVED_TOKENS  # noqa: E402
from prompts import MMDIALOG_SYSTEM  # noqa: E402
from model import GenerationOutput, MiniGPT5_Model  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACT = REPO / "outputs" / "test-artifacts" / "web_demo.png"
FAST = {"num_inference_steps": 3, "max_new_tokens": 16, "seed": 7}
TIMEOUT_MS = 600_000   # a hang guard only: far above a loaded machine's worst (a chat turn took 4.5 s there)


# --------------------------------------------------------------------------------------------
# fixtures: the model, the offline guard, the server, the browser


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return MiniGPT5_Model(tiny_config, stage=2).eval()


def _is_loopback(host) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def outbound():
    """Refuse (and record) this process's connections and DNS look-ups to anything but loopback."""
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            attempts.append(f"connect {address}")
            raise OSError(f"test_web_demo: outbound connection to {address} refused (the demo must work offline)")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            attempts.append(f"resolve {host}")
            raise socket.gaierror(f"test_web_demo: DNS look-up of {host!r} refused (the demo must work offline)")
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield attempts


class GenerateSpy:
    """Wraps `model.generate`: records every call and the most calls ever running at once."""

    def __init__(self, generate):
        self.generate, self.calls, self.running, self.most_at_once = generate, [], 0, 0
        self.lock = threading.Lock()

    def __call__(self, prompts, images=None, **kwargs):
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(0.2)                     # widen the window in which an overlap would show
            outputs = self.generate(prompts, images, **kwargs)
        finally:
            with self.lock:
                self.running -= 1
        self.calls.append({"prompts": list(prompts), "images": [list(i) for i in images], "kwargs": kwargs,
                           "outputs": outputs})
        return outputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model, outbound):
    """The demo on a free loopback port (small generation settings); yields (url, spy)."""
    spy = GenerateSpy(model.generate)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "generate", spy)
        demo = web_demo.build_demo(model, num_inference_steps=FAST["num_inference_steps"],
                                   max_new_tokens=FAST["max_new_tokens"], seed=FAST["seed"], force_generation=False)
        port = _free_port()
        web_demo.launch(demo, "127.0.0.1", port, block=False, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/", spy
        finally:
            demo.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium: apt-get install chromium)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def foreign_requests() -> list[str]:
    """URLs the pages tried to fetch from hosts other than loopback (they are aborted)."""
    return []


@pytest.fixture
def open_page(browser, server, foreign_requests):
    """`open_page()` -> a fresh page (own browser context = own chat session) showing the demo."""
    url, _ = server
    contexts = []

    def route(route):
        host = re.sub(r"^\w+://([^/:]+|\[[^\]]+\]).*$", r"\1", route.request.url).strip("[]")
        if route.request.url.startswith(("data:", "blob:")) or _is_loopback(host):
            route.continue_()
        else:
            foreign_requests.append(route.request.url)
            route.abort()

    def open_page():
        context = browser.new_context(viewport={"width": 1100, "height": 1500}, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        context.route("**/*", route)
        contexts.append(context)
        page = context.new_page()
        page.goto(url)
        page.locator("#message textarea").wait_for()
        return page

    yield open_page
    for context in contexts:
        context.close()


# --------------------------------------------------------------------------------------------
# helpers to drive the page


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """Test files: two small images, a wide one over the size limit, a text file, a fake PNG."""
    folder = tmp_path_factory.mktemp("uploads")
    red = Image.new("RGB", (64, 48), (200, 30, 30))
    red.paste((250, 250, 0), (10, 10, 30, 30))
    red.save(folder / "red.png")
    Image.new("RGB", (40, 40), (20, 160, 60)).save(folder / "green.png")
    Image.new("RGB", (2500, 600), (40, 40, 200)).save(folder / "wide.png")
    (folder / "notes.txt").write_text("this is not an image\n")
    (folder / "broken.png").write_text("this is not a PNG either\n")
    return {p.stem: p for p in folder.iterdir()}


def attach(page, *files: Path) -> None:
    """Attach files to the message box and wait until the upload is done (thumbnails shown)."""
    before = page.locator('#message [aria-label="File thumbnail"]').count()
    page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
    expect(page.locator('#message [aria-label="File thumbnail"]')).to_have_count(before + len(files))


def send(page, text: str, *files: Path) -> None:
    """Type `text`, attach `files`, press Enter; returns once the message is shown in the chat."""
    if files:
        attach(page, *files)
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")
    expect(user_messages(page).filter(has_text=text)).not_to_have_count(0)


def wait_for_answer(page) -> None:
    """Wait until the pending answer ("…") of the last sent message is replaced by the answer."""
    expect(bot_messages(page).filter(has_text=re.compile(r"^\s*…\s*$"))).to_have_count(0)
    expect(page.locator("#message textarea")).to_be_enabled()


def user_messages(page):
    return page.locator('#chat [data-testid="user"]')


def bot_messages(page):
    return page.locator('#chat [data-testid="bot"]')


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# --------------------------------------------------------------------------------------------
# without a browser


def test_load_image_downscales_and_rejects(pictures):
    image, downscaled = web_demo.load_image(pictures["wide"])
    assert downscaled and image.size == (2048, 492) and image.mode == "RGB"
    image, downscaled = web_demo.load_image(pictures["red"])
    assert not downscaled and image.size == (64, 48)
    for name in ("notes", "broken"):
        with pytest.raises(web_demo.UploadError, match=re.escape(pictures[name].name)):
            web_demo.load_image(pictures[name])


def test_cli_defaults_and_bad_config(tmp_path):
    args = web_demo.parse_args([])
    assert (args.host, args.port, args.model_config, args.force_generation) == ("127.0.0.1", 7860, None, None)
    with pytest.raises(SystemExit, match="does not exist"):
        web_demo.main(["--model_config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="scheduler"):
        web_demo.build_demo(None, scheduler="euler")
    for flags in (["--num_inference_steps", "0"], ["--guidance_scale", "nan"]):
        with pytest.raises(SystemExit):                       # argparse's one-line usage error, no model loaded
            web_demo.parse_args(flags)


def test_main_wires_the_flags(monkeypatch, model):
    """`main` loads the model named by the flags and serves it on --host/--port (launch stubbed)."""
    loaded, placed, launched = [], [], []
    monkeypatch.setattr(MiniGPT5_Model, "from_weights",
                        classmethod(lambda cls, *a, **kw: loaded.append(a) or placed.append(kw) or model))
    monkeypatch.setattr(web_demo, "launch", lambda demo, host, port, **kw: launched.append((demo, host, port)))
    web_demo.main(["--preset", "tiny", "--port", "7999", "--num_inference_steps", "4"])
    assert loaded == [(None, None, None)]
    demo, host, port = launched[0]
    assert (host, port) == ("127.0.0.1", 7999)
    config = demo.get_config_file()
    values = {c["props"].get("label"): c["props"].get("value") for c in config["components"]}
    assert values["Force an image"] is True and values["Diffusion steps"] == 4      # tiny preset: forced by default
    assert values["Top-k"] == 50                                                    # the release's sampling
    assert placed == [{"device": "auto", "llm_quantization": None, "offload": False}]   # the GPU when present
    web_demo.main(["--port", "7999"])                  # the default: the shipped toy preset, its MMDialog model
    config_path, stage1, stage2 = loaded[-1]
    assert Path(config_path) == REPO / "toyworld" / "pretrained" / "toy.yaml"
    assert Path(stage1).name == "stage1_cc3m.ckpt" and Path(stage2).name == "stage2_mmdialog.ckpt"
    values = {c["props"].get("label"): c["props"].get("value") for c in launched[-1][0].get_config_file()["components"]}
    assert values["Force an image"] is False                 # a trained model emits vokens by itself
    web_demo.main(["--model_config", "real.yaml", "--test_weight", "stage2.ckpt", "--device", "cuda:1",
                   "--llm_quantization", "4bit", "--offload"])
    assert loaded[-1] == ("real.yaml", None, "stage2.ckpt")
    assert placed[-1] == {"device": "cuda:1", "llm_quantization": "4bit", "offload": True}
    values = {c["props"].get("label"): c["props"].get("value") for c in launched[-1][0].get_config_file()["components"]}
    assert values["Force an image"] is False


def _handler(demo, name: str):
    """One of the app's event handlers (`accept`: check and show a message; `answer`: generate)."""
    return next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == name)


class FakeModel:
    """Records `generate` calls and answers with a fixed text (for the handlers without a browser)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, images=None, **kwargs):
        self.calls.append({"prompts": list(prompts), "images": images, "kwargs": kwargs})
        return [GenerationOutput(text="fine ###", clean_text="fine", image=None, token_ids=[]) for _ in prompts]


def test_typed_reserved_tokens_are_neutralised_and_long_messages_cut(model, tmp_path):
    demo = web_demo.build_demo(FakeModel(), max_message_chars=80, files_root=tmp_path)
    typed = "draw [IMG0][IMG1] here <ImageHere> and <Img>[IMG7]</Img> " + "x" * 200
    session, messages, _ = _handler(demo, "accept")({"text": typed, "files": []}, None)
    text = session.conversation.turns[0].text
    assert not any(token in text for token in RESERVED_TOKENS) and len(text) <= 80
    assert text.startswith("draw [IMG 0][IMG 1] here <Image Here> and <Img>[IMG 7]</Img> x")
    notices = " ".join(m["content"] for m in messages if isinstance(m["content"], str))
    assert "[IMG0], [IMG1], [IMG7], &lt;ImageHere&gt;" in notices and "only the first 80 were sent" in notices
    # the prompt the model gets has no voken and no image slot without an image
    prompt, images = session.conversation.prompt()
    tokenizer = model.model.llama_tokenizer
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert not set(ids) & set(model.model.voken_ids) and ids.count(model.model.image_token_id) == len(images) == 0
    assert session.folder.parent == tmp_path


def test_answer_passes_the_settings_top_k_included(tmp_path):
    fake = FakeModel()
    demo = web_demo.build_demo(fake, files_root=tmp_path)
    session, _, _ = _handler(demo, "accept")({"text": "hello", "files": []}, None)
    _handler(demo, "answer")(session, 7.5, 3, 7, False, 16, "pndm", 50)
    assert fake.calls[0]["kwargs"]["top_k"] == 50 and fake.calls[0]["kwargs"]["num_inference_steps"] == 3
    assert fake.calls[0]["prompts"] == [MMDIALOG_SYSTEM + "###Human: hello ###Assistant:"]


def test_only_files_uploaded_to_this_server_are_read(tmp_path, monkeypatch, pictures):
    """A message naming a file elsewhere on the server (or a link to one from the upload folder) is
    refused before the file is opened: it is not shown, not sent to the model, not in the export."""
    uploads = tmp_path / "gradio"
    uploads.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    secret = tmp_path / "server" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(secret)
    (uploads / "abc").mkdir()
    shutil.copy(pictures["red"], uploads / "abc" / "red.png")                # what an upload looks like
    (uploads / "abc" / "link.png").symlink_to(secret)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    fake = FakeModel()
    demo = web_demo.build_demo(fake, files_root=tmp_path / "sessions")
    accept = _handler(demo, "accept")
    for path in (secret, uploads / "abc" / "link.png", uploads / "abc" / ".." / ".." / "server" / "secret.png"):
        session, messages, _ = accept({"text": "what is this?", "files": [str(path)]}, None)
        assert session.conversation.turns == [] and not session.pending
        assert f"{path.name!r} is not a file uploaded to this chat" in messages[-1]["content"]
        assert "secret" not in session.export_html()
    assert opened == []                                                       # nothing was even opened
    session, _, _ = accept({"text": "and this one?", "files": [str(uploads / "abc" / "red.png")]}, None)
    assert len(session.conversation.turns[0].images) == 1 and session.pending


def test_the_api_refuses_server_paths_without_copying_them(server, tmp_path):
    """Through the HTTP API (what a script would send): a FileData naming a server file is refused,
    and neither that file nor a non-image is copied into the upload folder."""
    import json
    import urllib.error

    from gradio.utils import get_upload_folder

    url, spy = server
    calls = len(spy.calls)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(secret)
    (tmp_path / "secret.txt").write_text("not for clients\n")
    before = set(Path(get_upload_folder()).rglob("secret*"))
    for path in (secret, tmp_path / "secret.txt"):
        body = {"data": [{"text": "hi", "files": [{"path": str(path), "meta": {"_type": "gradio.FileData"}}]}, None]}
        request = urllib.request.Request(url + "gradio_api/run/accept", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=600)
    assert set(Path(get_upload_folder()).rglob("secret*")) == before and len(spy.calls) == calls


def test_server_files_are_removed_when_the_server_stops(monkeypatch, model, pictures):
    """Uploads (Gradio's cache, GRADIO_TEMP_DIR) and the sessions' folders live in one folder per
    server, removed when it stops, here by SIGTERM (turned into Gradio's Ctrl+C stop)."""
    seen = {}
    monkeypatch.setattr(MiniGPT5_Model, "from_weights", classmethod(lambda cls, *a, **kw: model))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)

    def serve(demo, host, port, **kwargs):           # stands in for Gradio's blocking launch
        uploads = Path(os.environ["GRADIO_TEMP_DIR"])
        uploads.mkdir(parents=True)
        shutil.copy(pictures["red"], uploads / "red.png")  # what an upload leaves behind
        session, _, _ = _handler(demo, "accept")({"text": "hi", "files": [str(uploads / "red.png")]}, None)
        session.save_image(Image.new("RGB", (8, 8)), "generated")
        seen.update(uploads=uploads, session=session.folder)
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:                     # Gradio's loop closes the server on it
            seen["stopped"] = True

    monkeypatch.setattr(web_demo, "launch", serve)
    web_demo.main([])
    assert seen["stopped"] and seen["uploads"].parent == seen["session"].parent
    assert not seen["uploads"].parent.exists()
    assert "GRADIO_TEMP_DIR" not in os.environ and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_server_serves_on_loopback(server):
    url, spy = server
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=600) as response:
        assert response.status == 200 and b"gradio" in response.read().lower()


# --------------------------------------------------------------------------------------------
# in the browser


def test_chat_with_images_keeps_history(open_page, server, pictures, tmp_path):
    """Upload an image, force an answer image, see text and picture; a second turn sees the first."""
    _, spy = server
    page = open_page()
    page.locator("#settings").get_by_text("Settings", exact=True).click()   # open the accordion
    page.locator("#force-image input[type=checkbox]").check()
    first = len(spy.calls)

    send(page, "Describe this picture.", pictures["red"])
    wait_for_answer(page)
    call = spy.calls[first]
    out = call["outputs"][0]
    assert call["kwargs"]["force_generation"] is True
    assert call["kwargs"]["num_inference_steps"] == 3 and call["kwargs"]["max_new_tokens"] == 16
    assert call["prompts"][0] == MMDIALOG_SYSTEM + f"###Human: Describe this picture. {IMAGE_SLOT} ###Assistant:"
    assert len(call["images"][0]) == 1 and _same_pixels(call["images"][0][0], Image.open(pictures["red"]))
    assert out.image is not None
    expect(user_messages(page).locator("img")).to_have_count(1)            # the upload, shown in the chat
    expect(bot_messages(page).locator("img")).to_have_count(1)             # the generated picture
    if out.clean_text:
        expect(bot_messages(page).filter(has_text=out.clean_text)).to_have_count(1)
    shown = bot_messages(page).locator("img").first
    expect(shown).to_have_attribute("src", re.compile(r"generated\.png$"))
    shown.scroll_into_view_if_needed()
    assert shown.evaluate("img => img.decode().then(() => img.naturalWidth)") == out.image.width  # it loads

    send(page, "And what happens next?")
    wait_for_answer(page)
    second = spy.calls[first + 1]
    history = (f"###Human: Describe this picture. {IMAGE_SLOT} ###Assistant: {out.clean_text} {IMAGE_SLOT} "
               f"###Human: And what happens next? ###Assistant:")
    assert second["prompts"][0] == MMDIALOG_SYSTEM + re.sub(" +", " ", history)
    sent = second["images"][0]
    assert len(sent) == 2 and _same_pixels(sent[0], Image.open(pictures["red"])) and _same_pixels(sent[1], out.image)
    assert second["kwargs"]["seed"] == FAST["seed"] + 1                   # turn n uses seed + n
    expect(user_messages(page).filter(has_text="Describe this picture.")).to_have_count(1)
    expect(user_messages(page).filter(has_text="And what happens next?")).to_have_count(1)
    expect(bot_messages(page).locator("img")).to_have_count(2)

    screenshot = tmp_path / "web_demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, ARTIFACT)

    with page.expect_download() as download:
        page.locator("#download").click()
    exported = Path(download.value.path()).read_text(encoding="utf-8")
    assert "Describe this picture." in exported and "And what happens next?" in exported
    assert exported.count('<img alt="Human image"') == 1 and exported.count('<img alt="Assistant image"') == 2


def test_two_clients_at_once_both_get_answers(open_page, server, pictures):
    _, spy = server
    first = len(spy.calls)
    pages = [open_page(), open_page()]
    attach(pages[1], pictures["green"])
    for page, text in zip(pages, ("Hello from client one.", "Hello from client two.")):
        page.locator("#message textarea").fill(text)
    for page in pages:                                   # both submitted before either answer can be back
        page.locator("#message textarea").press("Enter")
    for page, text in zip(pages, ("client one", "client two")):
        expect(user_messages(page).filter(has_text=text)).to_have_count(1)
        wait_for_answer(page)
    assert len(spy.calls) == first + 2
    assert spy.most_at_once == 1                         # the queue ran them one after the other
    prompts = sorted(c["prompts"][0] for c in spy.calls[first:])
    assert prompts == sorted([MMDIALOG_SYSTEM + "###Human: Hello from client one. ###Assistant:",
                              MMDIALOG_SYSTEM + f"###Human: Hello from client two. {IMAGE_SLOT} ###Assistant:"])
    for page, mine, theirs in ((pages[0], "client one", "client two"), (pages[1], "client two", "client one")):
        expect(user_messages(page).filter(has_text=mine)).to_have_count(1)
        expect(user_messages(page).filter(has_text=theirs)).to_have_count(0)   # sessions do not mix
        assert bot_messages(page).count() >= 1


def test_bad_input_shows_a_message_and_the_chat_goes_on(open_page, server, pictures):
    _, spy = server
    page = open_page()
    first = len(spy.calls)

    page.locator("#message textarea").press("Enter")                     # empty message, no image
    expect(bot_messages(page).filter(has_text="Type a message or attach an image first")).to_have_count(1)

    page.locator("#message input[type=file]").set_input_files(str(pictures["notes"]))   # refused by the page
    expect(page.get_by_text(re.compile(r"Invalid file type.*notes\.txt|notes\.txt.*image", re.I)).first).to_be_visible()

    attach(page, pictures["broken"])                                     # an image name, not image data
    page.locator("#message textarea").fill("What is in this file?")
    page.locator("#message textarea").press("Enter")
    expect(bot_messages(page).filter(has_text="'broken.png' is not an image")).to_have_count(1)
    expect(page.locator("#message textarea")).to_have_value("What is in this file?")   # kept for a retry
    assert len(spy.calls) == first                                       # nothing reached the model

    expect(page.locator('#message [aria-label="File thumbnail"]')).to_have_count(0)   # the bad file was dropped
    send(page, "Here is a wide one.", pictures["wide"])                  # over the 2048-pixel limit
    wait_for_answer(page)
    expect(bot_messages(page).filter(has_text="was downscaled to 2048 x 492")).to_have_count(1)
    assert len(spy.calls) == first + 1
    call = spy.calls[first]
    assert call["prompts"][0] == MMDIALOG_SYSTEM + f"###Human: Here is a wide one. {IMAGE_SLOT} ###Assistant:"
    assert [image.size for image in call["images"][0]] == [(2048, 492)]
    expect(bot_messages(page).last).not_to_have_text(re.compile("failed|error", re.I))


def test_nothing_reached_for_the_internet(server, outbound, foreign_requests):
    """Runs last: neither the server process nor the pages tried to reach another host."""
    assert outbound == [], f"the server tried to reach the internet: {outbound}"
    assert foreign_requests == [], f"the page tried to fetch: {foreign_requests}"
