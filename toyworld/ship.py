"""The toy preset the repository ships (`toyworld/pretrained/`), so that the quick start and the web
demo show a trained MiniGPT-5 on a fresh clone without the hour-long build.

`python -m toyworld ship` copies a finished build: the frozen parts in float16 (as the real SD and
EVA files are stored; they load into the toy's float32 modules), the three MiniGPT-5 checkpoints
without optimiser state, their weights in float16 too (every shipped file stays under 2 MB: at LoRA
rank 64 a float32 stage-2 checkpoint is 2.8 MB), two frames of a toy story for the demos, the guidance scale the build
evaluates with (the demos' default with this preset), and a `toy.yaml` whose paths are relative to
it. A fresh build followed by `ship` reproduces the folder.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from toyworld import world

SHIPPED = Path(__file__).resolve().parent / "pretrained"
CHECKPOINTS = ("stage1_cc3m.ckpt", "stage2_vist.ckpt", "stage2_mmdialog.ckpt")
STORY_IMAGES = ("story_1.jpg", "story_2.jpg")


def _half(state: dict) -> dict:
    return {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}


def evaluation_guidance(config: Path) -> float | None:
    """The `--guidance_scale` among a build's evaluation flags (config/toyworld.yaml), if any."""
    import yaml

    flags = yaml.safe_load(Path(config).read_text())["evaluate"]["flags"]
    return float(flags[flags.index("--guidance_scale") + 1]) if "--guidance_scale" in flags else None


def story_mode(config: Path) -> str:
    """The story mode a build's stage 2 was trained on (config/toyworld.yaml `world.story_mode`)."""
    import yaml

    return yaml.safe_load(Path(config).read_text())["world"].get("story_mode", "pictures")


def demo_story(mode: str) -> world.Story:
    """The demos' story, of the kind stage 2 was trained on: a day story (the preset shipped before build 19), or
    a test-side picture story (one no training story begins like)."""
    rng = random.Random("shipped-story")
    first = world.Scene("beach", "morning", "red", "near")
    if mode == "day":
        return world.make_story(first, len(STORY_IMAGES) + 1, rng)
    first = next(s for s in world.all_scenes() if world.is_test_start(s) and not world.is_held_out(s))
    return world.make_picture_story(first, len(STORY_IMAGES) + 1, rng, world.TEST,
                                    allowed=lambda scene: not world.is_held_out(scene))


def ship(build_dir: Path, to: Path = SHIPPED, guidance_scale: float | None = None, mode: str = "pictures") -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoModelForCausalLM, CLIPTextModel

    from configuration import dump_config, load_config
    from weights import load_state_dict_file, read_checkpoint

    build_dir = Path(build_dir).resolve()
    cfg = load_config(build_dir / "toy.yaml")
    for name in CHECKPOINTS:
        if not (build_dir / "checkpoints" / name).is_file():
            raise SystemExit(f"error: {build_dir / 'checkpoints' / name} is missing: finish `python -m toyworld build "
                             f"--out {build_dir}` first")
    tmp = to.with_name(to.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    llm = AutoModelForCausalLM.from_pretrained(cfg.llama_model, dtype=torch.float16)
    llm.save_pretrained(tmp / "llama")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(cfg.llama_model) / name).is_file():
            shutil.copy(Path(cfg.llama_model) / name, tmp / "llama" / name)
    sd = Path(cfg.sd_model)
    shutil.copytree(sd, tmp / "sd", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        cls.from_pretrained(sd, subfolder=sub, torch_dtype=torch.float16).save_pretrained(tmp / "sd" / sub)
    CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", dtype=torch.float16).save_pretrained(
        tmp / "sd" / "text_encoder")
    for config in (tmp / "sd").glob("*/config.json"):     # where the build was is no business of the copy
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    vit = load_state_dict_file(cfg.vit_model, "EVA ViT file (`vit_model`)")
    torch.save(_half(vit), tmp / Path(cfg.vit_model).name)
    blip2 = load_state_dict_file(cfg.q_former_model, "BLIP-2 file (`q_former_model`)")
    torch.save({"model": _half(blip2)}, tmp / Path(cfg.q_former_model).name)
    proj = load_state_dict_file(cfg.ckpt, "MiniGPT-4 file (`ckpt`)")
    torch.save({"model": _half(proj)}, tmp / Path(cfg.ckpt).name)
    for name in CHECKPOINTS:
        torch.save({"state_dict": _half(read_checkpoint(build_dir / "checkpoints" / name))}, tmp / name)

    story = demo_story(mode)
    for name, scene in zip(STORY_IMAGES, story.scenes):
        world.save_image(world.render(scene, cfg.sd_image_size, random.Random(name)), tmp / name)
    (tmp / "story.json").write_text(json.dumps({
        "captions": list(story.captions[:len(STORY_IMAGES)]), "images": list(STORY_IMAGES),
        "next_caption": story.captions[len(STORY_IMAGES)], "next_scene": story.scenes[len(STORY_IMAGES)].attributes(),
        "guidance_scale": guidance_scale}, indent=1))

    relative = cfg.replace(llama_model="llama", sd_model="sd", vit_model=Path(cfg.vit_model).name,
                           q_former_model=Path(cfg.q_former_model).name, ckpt=Path(cfg.ckpt).name)
    dump_config(relative, tmp / "toy.yaml")
    if to.exists():
        shutil.rmtree(to)
    tmp.rename(to)
    return to


@dataclass(frozen=True)
class Shipped:
    """The shipped toy preset's files, as the demos use them."""

    config: Path
    stage1: Path
    stage2_vist: Path
    stage2_mmdialog: Path
    story_images: list[Path]
    story_captions: list[str]
    next_scene: dict
    guidance_scale: float | None = None     # what the build evaluated with (None: the usual default)
    # The next frame's caption: a picture story's says what changes, and the demo asks for the frame
    # with it (None, as in presets shipped before it was kept: the demo asks for the next scene freely).
    next_caption: str | None = None


def shipped(folder: Path = SHIPPED) -> Shipped:
    """The shipped toy preset; a clear error when it is missing (a build and `ship` make it)."""
    story = folder / "story.json"
    if not story.is_file():
        raise FileNotFoundError(f"the shipped toy preset is missing ({folder}); make it with `python -m toyworld "
                                f"build` then `python -m toyworld ship`, or use --preset tiny")
    data = json.loads(story.read_text())
    return Shipped(folder / "toy.yaml", folder / CHECKPOINTS[0], folder / CHECKPOINTS[1], folder / CHECKPOINTS[2],
                   [folder / name for name in data["images"]], data["captions"], data["next_scene"],
                   data.get("guidance_scale"), data.get("next_caption"))


def use_shipped(args, stage2: str) -> Shipped:
    """Point a demo's `--model_config` / `--stage1_weight` / `--test_weight` at the shipped toy preset
    (checkpoints the user named win; `stage2` is "stage2_vist" or "stage2_mmdialog") and an unset
    `--guidance_scale` at the preset's. A missing preset ends the command with the error."""
    try:
        preset = shipped()
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    args.model_config = str(preset.config)
    args.stage1_weight = args.stage1_weight or str(preset.stage1)
    args.test_weight = args.test_weight or str(getattr(preset, stage2))
    if getattr(args, "guidance_scale", 0) is None:
        args.guidance_scale = preset.guidance_scale
    return preset
