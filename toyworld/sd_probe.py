"""What the frozen toy SD draws from a caption alone: held-out combinations against seen ones, the
test wording against the training wording.

Stage 1 teaches MiniGPT-5 to steer this decoder, so it cannot draw what the decoder cannot draw from
the caption itself. The build's report gives that figure on its 96 toy CC3M test pictures (the SD
baseline: held-out combinations in the test wording). This asks the decoder on every held-out
combination, `repeats` captions each (a random template of the wording, its own noise seed), and
separates the two things the test asks for at once: four cells, (held-out | 35 seen) combinations x
(test | training) wording, each judged (all four attributes right).

    python -m toyworld sd-probe [--out weights/toy] [--repeats 4]
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from toyworld import world
from toyworld.judge import accuracy, judge

# (name, held-out combinations?, wording)
CELLS = (("held-out, test wording", True, "test"), ("held-out, training wording", True, "train"),
         ("seen, test wording", False, "test"), ("seen, training wording", False, "train"))
SEED = 7                    # the captions' templates, the seen combinations asked for, the noise
GUIDANCE, STEPS = 3.0, 25   # the build's evaluation settings (config/toyworld.yaml `evaluate`)


def load(sd: Path):
    """The toy SD folder's parts, float32, eval mode (the text encoder with them)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (sd / "unet").is_dir():
        raise SystemExit(f"error: {sd} is not a diffusers SD folder (no unet/): give a build folder with --out")
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet").eval()
    tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder").eval()
    return vae, unet, tokenizer, text_encoder, PNDMScheduler.from_pretrained(sd, subfolder="scheduler")


def draw_cells(sd: Path, repeats: int = 4, cells=CELLS, image_size: int = 32, steps: int = STEPS) -> dict:
    """cell name -> the judge's accuracy per attribute and `all` (percent) and `n`."""
    import diffusion

    vae, unet, tokenizer, text_encoder, scheduler = load(sd)
    pipe = diffusion.pipeline(vae, unet, tokenizer, scheduler)
    device = torch.device("cpu")
    rng = random.Random(SEED)
    seen = random.Random(SEED).sample([s for s in world.all_scenes() if not world.is_held_out(s)], 35)
    held = [s for s in world.all_scenes() if world.is_held_out(s)]
    results = {}
    for name, held_out, side in cells:
        words = world.wording(side)
        scenes = [s for s in (held if held_out else seen) for _ in range(repeats)]
        captions = [world.caption(s, rng.randrange(len(words.captions)), words) for s in scenes]
        cond = diffusion.encode_captions(tokenizer, text_encoder, captions, device, batch_size=256)
        negative = diffusion.encode_captions(tokenizer, text_encoder, [""], device).expand_as(cond)
        pictures = []
        for i in range(0, len(captions), 64):
            seeds = list(range(i, min(i + 64, len(captions))))
            pictures += diffusion.draw(pipe, cond[i:i + 64], negative[i:i + 64], seeds, GUIDANCE, steps, image_size)
        scores = accuracy([judge(p) for p in pictures], [s.attributes() for s in scenes])
        results[name] = {k: round(100 * v, 1) for k, v in scores.items()} | {"n": len(pictures)}
    return results


def report(results: dict, sd: Path) -> str:
    lines = [f"The toy SD of {sd} from the caption alone (judge; {STEPS} PNDM steps, guidance {GUIDANCE:g})", "",
             "| combinations, wording | all right | setting | time | colour | place | n |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | **{r['all']}%** | {r['setting']}% | {r['time']}% | {r['colour']}% | {r['place']}% | {r['n']} |")
    return "\n".join(lines) + "\n"


def run(out: Path, repeats: int) -> Path:
    """Probe a build's `sd/` and write `sd_probe.md` / `.json` in the build folder."""
    if repeats < 1:
        raise SystemExit(f"error: --repeats must be at least 1, got {repeats}")
    results = draw_cells(out / "sd", repeats)
    (out / "sd_probe.json").write_text(json.dumps(results, indent=1))
    written = out / "sd_probe.md"
    written.write_text(report(results, out / "sd"))
    return written
