"""MiniGPT-5 at its full size on a CPU: load the `full` preset and answer one story turn.

    python weights.py preset full weights/full            # once: random weights at the real sizes (~21 GB)
    python benchmarks/full_size_cpu.py                    # weights/full/full.yaml
    python benchmarks/full_size_cpu.py --model_config weights/tiny/tiny.yaml --out /tmp/x.md   # dry run

Loads the model the way the demos do (`MiniGPT5_Model.from_weights`, on the CPU), then answers the
playground's story prompt (two input images) with `--new_tokens` tokens, the vokens forced, and one
picture from `--steps` PNDM steps with classifier-free guidance at the config's size (512 x 512).

Reports, as JSON on stdout and as a Markdown table in `--out`:
- the bytes of the loaded model (every parameter and buffer; SD's text encoder is not loaded for
  generation) against the process's peak resident memory while loading, and how much of what stays
  resident is memory-mapped weight files (RssFile) rather than copies (RssAnon);
- the time of each loading step (SD, ViT, Q-Former, LLM, voken rows) and of each part of the answer
  (ViT, Q-Former, LLM decoding, mapper, UNet, VAE decoder), measured with forward hooks, and the
  peak resident memory while answering.

The resident high-water mark is read from /proc (VmHWM) and reset before answering (writing 5 to
/proc/self/clear_refs), so the loading peak does not hide the answer's. Linux only. Before loading,
the script checks that the machine has memory available for the model's files (it shares the machine
with others) and stops with a clear message when it has not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import torch  # noqa: E402

GiB = 2**30


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Start a new resident-set high-water mark (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def weight_file_bytes(cfg) -> int:
    """Bytes of the weight files generation reads (SD's text encoder excluded)."""
    total = 0
    for path in (cfg.llama_model, cfg.vit_model, cfg.q_former_model, cfg.ckpt):
        p = Path(path)
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    for part in ("unet", "vae"):
        total += sum(f.stat().st_size for f in (Path(cfg.sd_model) / part).glob("*") if f.is_file()) // 2  # fp32 -> bf16
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (each storage once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class StepTimer:
    """Wall time spent in named steps: `wrap` times a function, `hook` a module's forward calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._started: dict[str, float] = {}

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        setattr(owner, attribute, timed)

    def hook(self, module: torch.nn.Module, name: str) -> None:
        def before(*_):
            self._started[name] = time.perf_counter()

        def after(*_):
            self.seconds[name] += time.perf_counter() - self._started.pop(name)
            self.calls[name] += 1

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)


@contextmanager
def elapsed(into: dict, name: str):
    start = time.perf_counter()
    yield
    into[name] = time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    import diffusion
    import lavis
    import minigpt4
    import model as model_module
    from configuration import load_config
    from playground import DEFAULT_CAPTIONS, DEFAULT_IMAGES, story_prompt
    from PIL import Image

    cfg = load_config(args.model_config)
    need, available = weight_file_bytes(cfg), mem_available()
    if need * 1.1 > available:
        sys.exit(f"error: loading {args.model_config} needs about {need / GiB:.1f} GiB of memory but only "
                 f"{available / GiB:.1f} GiB is available now (MemAvailable); free some and retry")
    torch.set_num_threads(args.threads)
    import transformers

    load = StepTimer()
    load.wrap(diffusion, "load_parts", "SD UNet + VAE")
    load.wrap(lavis, "load_eva_vit", "EVA ViT")
    load.wrap(lavis, "load_qformer", "Q-Former")
    load.wrap(transformers.AutoModelForCausalLM, "from_pretrained", "LLM")
    load.wrap(minigpt4, "add_voken_rows", "voken rows (fp32 embedding + lm_head)")
    start_rss = _status("VmRSS")
    reset_peak()
    times: dict[str, float] = {}
    with elapsed(times, "load"):
        model = model_module.MiniGPT5_Model.from_weights(args.model_config, device="cpu")
    loaded = model_bytes(model)
    result = {
        "model_config": str(args.model_config), "threads": args.threads,
        "weight_file_bytes_used": need, "model_bytes": loaded, "rss_before_load": start_rss,
        "peak_rss_load": _status("VmHWM"), "rss_after_load": _status("VmRSS"),
        "rss_anon_after_load": _status("RssAnon"), "rss_file_after_load": _status("RssFile"),
        "text_encoder_loaded": "sd_text_encoder" in model._modules,
        "load_seconds": times["load"], "load_steps": dict(load.seconds),
    }
    result["peak_load_over_model"] = result["peak_rss_load"] / loaded

    answer = StepTimer()
    m = model.model
    answer.hook(m.visual_encoder, "ViT (2 images)")
    answer.hook(m.Qformer, "Q-Former")
    answer.hook(m.llm_parts()[0], "LLM decoder (prefill + steps)")
    answer.hook(m.llm_parts()[1], "lm_head")
    answer.hook(model.llm_to_t2i_mapping, "mapper")
    answer.hook(model.unet, "UNet")
    answer.hook(model.vae.decoder, "VAE decoder")
    images = []
    for path in DEFAULT_IMAGES:
        with Image.open(path) as f:
            images.append(f.convert("RGB"))
    prompt = story_prompt(DEFAULT_CAPTIONS)
    reset_peak()
    with elapsed(times, "answer"):
        out = model.generate([prompt], [images], seed=0, max_new_tokens=args.new_tokens, force_generation=True,
                             num_inference_steps=args.steps)[0]
    result.update({
        "answer_seconds": times["answer"], "answer_steps": dict(answer.seconds), "answer_calls": dict(answer.calls),
        "peak_rss_answer": _status("VmHWM"), "new_tokens": len(out.token_ids), "steps": args.steps,
        "image_size": None if out.image is None else list(out.image.size), "text": out.text,
        "prompt_tokens": len(m.llama_tokenizer(prompt, add_special_tokens=False).input_ids),
    })
    return result


def markdown(r: dict) -> str:
    gib = lambda n: f"{n / GiB:.2f} GiB"
    lines = [
        f"## Full size on the CPU (`benchmarks/full_size_cpu.py`, {r['threads']} threads)", "",
        f"Model config `{r['model_config']}`; one story turn: the playground prompt ({r['prompt_tokens']} text "
        f"tokens + 2 images), {r['new_tokens']} new tokens with the vokens forced, {r['steps']} PNDM steps with "
        f"classifier-free guidance, a {r['image_size'][0] if r['image_size'] else '-'} px picture.", "",
        "| memory | bytes |", "|---|---|",
        f"| loaded model (parameters + buffers; SD text encoder not loaded: {not r['text_encoder_loaded']}) | "
        f"{gib(r['model_bytes'])} |",
        f"| process before loading (Python, torch, libraries) | {gib(r['rss_before_load'])} |",
        f"| **peak resident while loading** | **{gib(r['peak_rss_load'])} = {r['peak_load_over_model']:.3f} x the model** |",
        f"| resident after loading: anonymous (copies) / file-backed (memory-mapped weights) | "
        f"{gib(r['rss_anon_after_load'])} / {gib(r['rss_file_after_load'])} |",
        f"| peak resident while answering (the memory-mapped weights are read in) | {gib(r['peak_rss_answer'])} = "
        f"{r['peak_rss_answer'] / r['model_bytes']:.3f} x the model |", "",
        "| step | seconds |", "|---|---|",
        *[f"| load: {k} | {v:.1f} |" for k, v in r["load_steps"].items()],
        f"| **load, total** | **{r['load_seconds']:.1f}** |",
        *[f"| answer: {k} ({r['answer_calls'][k]} calls) | {v:.1f} |" for k, v in r["answer_steps"].items()],
        f"| **answer, total** (incl. tokenising, sampling, image conversion) | **{r['answer_seconds']:.1f}** |", "",
        f"Answer: `{r['text']}`", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=str(REPO / "weights" / "full" / "full.yaml"))
    parser.add_argument("--new_tokens", type=int, default=12, help="tokens to generate (8 are the forced vokens)")
    parser.add_argument("--steps", type=int, default=2, help="PNDM steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args(argv)
    if not Path(args.model_config).is_file():
        sys.exit(f"error: --model_config {args.model_config!r} does not exist; build the full preset with "
                 f"`python weights.py preset full weights/full`")
    if args.new_tokens < 9:
        sys.exit("error: --new_tokens must be at least 9 (the forced [IMG0]..[IMG7] and one more)")
    result = run(args)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(markdown(result))
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
