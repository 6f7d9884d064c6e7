"""The toy world build's steps (the order and the caching are in build.py).

The frozen parts are pretrained in this process (toyworld/pretrain.py); MiniGPT-5 itself is trained
and run by the unchanged `train_eval.py`, in subprocesses, with the release's environment variables
and flags, exactly as a user trains the real model.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
import yaml

from toyworld import world
from toyworld import evaluate, pairing
from toyworld.build import Build, Step


def _sizes(build: Build) -> world.WorldSizes:
    w = build.settings["world"]
    return world.WorldSizes(image_size=w["image_size"], cc3m=w["cc3m"], vist=w["vist"], mmdialog=w["mmdialog"],
                            story_length=w["story_length"], seed=build.settings["seed"],
                            story_mode=_story_mode(build), vist_descriptions=bool(w.get("vist_descriptions", False)))


def _story_mode(build: Build) -> str:
    mode = build.settings["world"].get("story_mode", "pictures")
    if mode not in world.STORY_MODES:
        raise SystemExit(f"error: {build.config_path}: world.story_mode is {mode!r}; expected one of {world.STORY_MODES}")
    return mode


def _recipe(section: dict):
    from toyworld.pretrain import Recipe

    return Recipe(**{k: section[k] for k in ("steps", "batch_size", "lr", "warmup") if k in section})


def _seed(build: Build, what: str) -> int:
    return random.Random(f"{build.settings['seed']}-{what}").randrange(2**31)


# ---- world and preset ----------------------------------------------------------------------------

def make_datasets(build: Build) -> dict:
    from toyworld import leakage

    shutil.rmtree(build.data, ignore_errors=True)
    files = world.write_datasets(build.data, _sizes(build))
    leakage.check(build.data)                      # no test item occurs in training, or no build
    return {"files": {kind: {split: str(path.relative_to(build.out)) for split, path in splits.items()}
                      for kind, splits in files.items()}}


def make_preset(build: Build) -> dict:
    """The toy preset's files with random weights in the real formats (like `weights.py tiny`), the
    LLM tokenizer trained on the world's text and every caption word one SD token; or, with
    `frozen_parts`, the frozen parts of a shipped toy preset (already pretrained)."""
    from configuration import dump_config, load_config
    from toyworld.pretrain import llm_corpus, world_words
    from presets import preset_config, write_preset_files

    cfg = load_config(build.config_file("model_config"), check_paths=False)
    with open(build.config_file("arch")) as f:
        arch = yaml.safe_load(f)
    for part in ("llama", "sd"):
        shutil.rmtree(build.out / part, ignore_errors=True)
    if build.settings.get("frozen_parts"):
        shipped = load_config(build.config_file("frozen_parts") / "toy.yaml")
        for key in ("llama_model", "sd_model", "vit_model", "q_former_model", "ckpt"):
            source = Path(getattr(shipped, key))
            copy = shutil.copytree if source.is_dir() else shutil.copy
            copy(source, build.out / source.name)
        dump_config(preset_config(shipped, build.out, relative=True), build.model_config)
        return {"config": str(build.model_config), "frozen_parts": str(build.config_file("frozen_parts"))}
    from toyworld import leakage

    corpus = llm_corpus(build.settings["pretrain"]["llm"]["documents"], build.settings["seed"], _story_mode(build))
    leakage.check(None, corpus)                    # the corpus is a training source like the datasets
    write_preset_files(build.out, cfg, arch, build.settings["seed"], llm_corpus=corpus, sd_words=world_words())
    dump_config(preset_config(cfg, build.out, relative=True), build.model_config)
    return {"config": str(build.model_config)}


# ---- pretraining the frozen parts ----------------------------------------------------------------

def _pictures(build: Build, for_sd: bool = False):
    """The captioned pictures of the pretraining steps; `for_sd` (SD's text encoder and UNet): with
    their captions in `pretrain.sd_caption_orders`' word orders."""
    from toyworld import leakage
    from toyworld.pretrain import picture_set

    settings = build.settings["pretrain"]
    orders = settings.get("sd_caption_orders", "train") if for_sd else "train"
    share = settings.get("sd_train_wording_share") if for_sd else None
    pictures = picture_set(settings["pictures"], build.settings["world"]["image_size"],
                           build.settings["seed"], orders, share)
    leakage.check(None, pictures=list(zip(pictures.scenes, pictures.captions)))
    return pictures


def _caption_orders(build: Build, part: str) -> list:
    """`pretrain.{part}_caption_orders` (and `{part}_train_wording_share`, where set; part "sd" or
    "llm") in the keys of the steps they change, unless the orders are the training wording's (so that
    the keys of builds made before either existed stay what they were)."""
    settings = build.settings["pretrain"]
    orders = settings.get(f"{part}_caption_orders", "train")
    share = settings.get(f"{part}_train_wording_share")
    return [] if orders == "train" and share is None else [orders] + ([] if share is None else [{"train_share": share}])


def _sd_part(build: Build, name: str, fresh: bool = False):
    """One part of the toy SD folder in float32: as saved, or (`fresh`) newly initialised from its
    config with torch's current seed -- a pretraining step starts from there, never from the
    weights a previous run of it left, so that a step run twice gives the same result."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd = build.out / "sd"
    if name == "text_encoder":
        if fresh:
            return CLIPTextModel(CLIPTextConfig.from_pretrained(sd, subfolder=name))
        return CLIPTextModel.from_pretrained(sd, subfolder=name, dtype=torch.float32)
    if name == "tokenizer":
        return CLIPTokenizer.from_pretrained(sd, subfolder=name)
    cls = {"vae": AutoencoderKL, "unet": UNet2DConditionModel, "scheduler": PNDMScheduler}[name]
    if fresh:
        return cls.from_config(cls.load_config(sd, subfolder=name))
    return cls.from_pretrained(sd, subfolder=name)


def _image_encoder(build: Build):
    """A newly initialised EVA ViT (CLIP trains it), and the preset's Q-Former and query tokens as
    its LAVIS file holds them (written back unchanged beside the ViT)."""
    import lavis
    from configuration import load_config

    cfg = load_config(build.model_config)
    vision = lavis.build_vision_model(cfg.vision, cfg.image_size)
    qformer, query_tokens = lavis.build_qformer(cfg.qformer, cfg.vision.hidden_size, cfg.num_query_token)
    lavis.load_qformer(qformer, query_tokens, cfg.q_former_model)
    return cfg, vision, qformer, query_tokens


def pretrain_clip(build: Build) -> dict:
    """SD's text encoder and the EVA ViT, trained together with CLIP's contrastive recipe."""
    import lavis
    from toyworld import pretrain

    torch.manual_seed(_seed(build, "clip"))
    text_encoder, tokenizer = _sd_part(build, "text_encoder", fresh=True), _sd_part(build, "tokenizer")
    cfg, vision, qformer, query_tokens = _image_encoder(build)
    losses = pretrain.train_clip(text_encoder, tokenizer, vision, _pictures(build, for_sd=True),
                                 _recipe(build.settings["pretrain"]["clip"]), _seed(build, "clip-train"))
    _save(text_encoder, build.out / "sd" / "text_encoder")
    lavis.save_lavis(vision, qformer, query_tokens, cfg.vit_model, cfg.q_former_model)
    return _losses(losses)


def pretrain_vae(build: Build) -> dict:
    from toyworld import pretrain

    section = build.settings["pretrain"]["vae"]
    torch.manual_seed(_seed(build, "vae"))
    vae = _sd_part(build, "vae", fresh=True)
    losses = pretrain.train_vae(vae, _pictures(build), _recipe(section), section["kl_weight"], _seed(build, "vae-train"))
    _save(vae, build.out / "sd" / "vae")
    return {**_losses(losses), "scaling_factor": vae.config.scaling_factor}


def unet_processes(build: Build) -> int:
    """The UNet's data-parallel processes (`pretrain.unet.processes`, default 1): each trains on an
    equal share of every batch with one thread (toyworld/pretrain.py: `in_processes`)."""
    section = build.settings["pretrain"]["unet"]
    processes = section.get("processes", 1)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1 \
            or section["batch_size"] % processes:
        raise SystemExit(f"error: {build.config_path}: pretrain.unet.processes is {processes!r}; expected a "
                         f"positive whole number that divides pretrain.unet.batch_size ({section['batch_size']})")
    return processes


def pretrain_unet(build: Build) -> dict:
    processes = unet_processes(build)
    if processes == 1:
        return _train_unet(build)
    from toyworld import pretrain

    return pretrain.in_processes(processes, _train_unet, build)


def _train_unet(build: Build) -> dict:
    from toyworld import pretrain

    section = build.settings["pretrain"]["unet"]
    torch.manual_seed(_seed(build, "unet"))       # the same initial weights in every process
    unet = _sd_part(build, "unet", fresh=True)
    losses = pretrain.train_unet(unet, _sd_part(build, "vae"), _sd_part(build, "text_encoder"),
                                 _sd_part(build, "tokenizer"), _sd_part(build, "scheduler"), _pictures(build, for_sd=True),
                                 _recipe(section), section["caption_dropout"], section["snr_gamma"],
                                 _seed(build, "unet-train"), ema_decay=section.get("ema_decay", 0.0))
    if pretrain.data_parallel_rank()[0] == 0:     # every process holds the same weights
        _save(unet, build.out / "sd" / "unet")
    return _losses(losses, 100)


def pretrain_llm(build: Build) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from configuration import load_config
    from minigpt4 import load_tokenizer
    from toyworld import leakage, pretrain

    section = build.settings["pretrain"]["llm"]
    torch.manual_seed(_seed(build, "llm"))
    folder = build.out / "llama"
    llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    tokenizer = load_tokenizer(str(folder), load_config(build.model_config, check_paths=False).llm_family)
    settings = build.settings["pretrain"]
    documents = pretrain.llm_corpus(section["documents"], build.settings["seed"], _story_mode(build),
                                    settings.get("llm_caption_orders", "train"), settings.get("llm_train_wording_share"))
    leakage.check(None, documents)               # reworded captions are a training source too
    losses = pretrain.train_llm(llm, tokenizer, documents, _recipe(section), _seed(build, "llm-train"))
    _save(llm, folder)
    return _losses(losses)


def pretrain_image_side(build: Build) -> dict:
    """Q-Former + query tokens + llama_proj trained by captioning through the frozen LLM."""
    import lavis
    from configuration import load_config
    from minigpt4 import MiniGPT4
    from toyworld import pretrain

    cfg = load_config(build.model_config)
    backbone = MiniGPT4.from_config(cfg)
    torch.manual_seed(_seed(build, "image-side"))       # what this step trains starts anew
    backbone.Qformer, backbone.query_tokens = lavis.build_qformer(cfg.qformer, cfg.vision.hidden_size,
                                                                  cfg.num_query_token)
    backbone.llama_proj = torch.nn.Linear(cfg.qformer.hidden_size, backbone.llama_model.config.hidden_size)
    losses = pretrain.train_image_side(backbone, _pictures(build), _recipe(build.settings["pretrain"]["image_side"]),
                                       _seed(build, "image-side-train"))
    lavis.save_lavis(backbone.visual_encoder, backbone.Qformer, backbone.query_tokens, cfg.vit_model,
                     cfg.q_former_model)
    proj = backbone.llama_proj
    partial = Path(cfg.ckpt + ".partial")
    torch.save({"model": {"llama_proj.weight": proj.weight.detach().clone(),
                          "llama_proj.bias": proj.bias.detach().clone()}}, partial)
    partial.replace(cfg.ckpt)
    return _losses(losses)


def train_extractors(build: Build) -> dict:
    """metric.py's toy CLIP and scene classifier (toyworld/toy_extractors.py), in `extractors/`."""
    from toyworld import toy_extractors

    folder = build.out / "extractors"
    shutil.rmtree(folder, ignore_errors=True)
    return toy_extractors.train(folder, build.settings["extractors"], build.settings["world"]["image_size"],
                                _seed(build, "extractors"))


def _save(model, folder: Path) -> None:
    """`model.save_pretrained(folder)`, written beside it and swapped in: the loaders map weight
    files into memory, and rewriting a mapped file in place would pull the weights from under the
    model still using them."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    for extra in folder.iterdir():               # tokenizer files and the like stay
        if not (partial / extra.name).exists():
            shutil.copy2(extra, partial / extra.name) if extra.is_file() else shutil.copytree(extra, partial / extra.name)
    shutil.rmtree(folder)
    partial.rename(folder)


def _losses(losses: list[float], n: int = 20) -> dict:
    """The loss at the start and at the end (the mean of the first and of the last `n` steps, at
    most a quarter of them each)."""
    n = max(1, min(n, len(losses) // 4))
    mean = lambda values: round(sum(values) / len(values), 4)
    return {"first_loss": mean(losses[:n]), "loss": mean(losses[-n:])}


# ---- MiniGPT-5 -----------------------------------------------------------------------------------

def save_stage0(build: Build) -> dict:
    """MiniGPT-5's trainable parts exactly as built (mapper, prompt, voken rows at their initial
    values), in a stage-1 checkpoint: the untrained reference of the report, and the starting
    point of "stage 2 without stage 1"."""
    from configuration import load_config
    from model import MiniGPT5_Model

    torch.manual_seed(build.settings["seed"])
    model = MiniGPT5_Model(load_config(build.model_config), stage=1)
    build.checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.trainable_state_dict()}, build.checkpoints / evaluate.UNTRAINED)
    return {"checkpoint": evaluate.UNTRAINED}


def train_stage(build: Build, name: str, dataset: str, stage: int, stage1_weight: str | None,
                extra: list[str] = ()) -> dict:
    """`train_eval.py --is_training True` on the toy dataset, as the release's README runs it;
    the best checkpoint by val_loss becomes `checkpoints/<name>.ckpt`."""
    files = {"CC3M": ("cc3m_train.tsv", "cc3m_val.tsv"), "VIST": ("train_cleaned.json", "val_cleaned.json"),
             "MMDialog": ("train/train_conversations.txt", "val/val_conversations.txt"),
             "interleaved": ("train.jsonl", "val.jsonl")}[dataset]
    run_dir = build.out / "runs" / name          # this run's checkpoints and logs (runs may go side by side)
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["train_eval.py", "--is_training", "True", "--model_config", str(build.model_config),
            "--train_data_path", files[0], "--val_data_path", files[1], "--model_save_name", name,
            "--output_dir", str(run_dir),
            "--accelerator", "cpu", "--gpus", "0", "--seed", str(build.settings["seed"]), "--deterministic",
            *training_flags(build, name, stage, extra)]
    if stage1_weight:
        args += ["--stage1_weight", stage1_weight]
    env = {"IS_STAGE2": str(stage == 2), "WEIGHTFOLDER": str(build.checkpoints),
           "DATAFOLDER": str(build.data / dataset), "OUTPUT_FOLDER": str(build.out / "outputs")}
    build.command(args, env, name)
    best = run_dir / f"{name}.ckpt"
    if not best.is_file():
        raise SystemExit(f"error: {name}: train_eval.py wrote no {best}")
    # The best by val_loss, where the next steps read it: its weights only (the run's folder keeps
    # Lightning's checkpoints for resuming; their paths and times would make two builds' bytes differ).
    from run_files import save_atomic
    from weights import load_untrusted, read_checkpoint

    build.checkpoints.mkdir(parents=True, exist_ok=True)
    # A pairing's LLM family, when the checkpoint records one (checkpoints.check_pairing reads it).
    family = {k: v for k, v in load_untrusted(best, "MiniGPT-5 checkpoint", mmap=True).items() if k == "llm_family"}
    save_atomic({"state_dict": read_checkpoint(best), **family}, build.checkpoints / best.name)
    best.unlink()
    return {"checkpoint": best.name, **_run_metrics(run_dir, name)}


def training_flags(build: Build, name: str, stage: int, extra=()) -> list[str]:
    """A training step's train_eval.py flags from the settings: `minigpt5`'s common ones, its stage's,
    its own (if the recipe names the step), then the step's fixed ones (an ablation's)."""
    flags = build.settings["minigpt5"]
    return [*flags["common"], *flags[f"stage{stage}"], *flags.get(name, ()), *extra]


def training_processes(build: Build, name: str, stage: int, extra=()) -> int:
    """The processes a training step runs on: one per id its flags give `--gpus` (train_eval.py
    starts one CPU process per id; DDP over gloo), one without."""
    import placement

    flags = training_flags(build, name, stage, extra)
    given = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--gpus"]
    try:
        return max(1, len(placement.gpu_ids(given[-1] if given else None)))
    except ValueError:
        raise SystemExit(f"error: {build.config_path}: `minigpt5` gives {name} `--gpus {given[-1]}`; expected "
                         "device ids such as 0 or 0,1") from None


def _run_metrics(run_dir: Path, name: str) -> dict:
    """What the run ended with, from the metrics file train_eval.py writes beside its checkpoints
    (`run_files.RunName.metrics_path`): its optimiser steps and final losses."""
    import json

    from run_files import RunName

    path = RunName(run_dir, name).metrics_path
    if not path.is_file():
        raise SystemExit(f"error: {name}: train_eval.py wrote no {path}")
    ended = json.loads(path.read_text())
    return {"optimiser_steps": ended["optimiser_steps"],
            **{k: v for k, v in ended["metrics"].items() if k in ("val_loss", "train_loss", "image_loss")}}


def _stage(name: str, dataset: str, stage: int, stage1: str | None, extra: tuple[str, ...] = (),
           depends: tuple[str, ...] = ("datasets", "image_side", "unet", "stage0"), about: str = "") -> Step:
    # Keyed by the flags it trains with (common + its stage's + its own, if the recipe names the step):
    # a changed stage-2 recipe keeps stage 1.
    return Step(name, lambda b: train_stage(b, name, dataset, stage, stage1, list(extra)), depends,
                lambda b: [b.settings["minigpt5"]["common"], b.settings["minigpt5"][f"stage{stage}"],
                           b.settings["minigpt5"].get(name), extra, stage1],
                about, cores=lambda b: training_processes(b, name, stage, extra))


def _checkpoint_step(checkpoint: str) -> str:
    """The step that writes a checkpoint (`checkpoints/<step>.ckpt`; stage 0's is stage0_untrained)."""
    return "stage0" if checkpoint == evaluate.UNTRAINED else checkpoint.removesuffix(".ckpt")


def _predict(run: evaluate.Run) -> Step:
    weights = [w for w in (run.test_weight, run.stage1_weight) if w]
    scorer = ("extractors",) if run.name in evaluate.METRIC_RUNS else ()     # metric.py's toy extractors
    trained_by = tuple(dict.fromkeys(_checkpoint_step(w) for w in weights))
    step = Step(f"predict_{run.name}", lambda b: evaluate.predict_step(b, run), ("datasets", *trained_by, *scorer),
                lambda b: [b.settings["evaluate"], run], f"predict {run.dataset} with {' + '.join(weights)}, judge it")
    ablation = [name for name in trained_by if name in ABLATIONS.values()]
    return _ablation(step, ablation[0]) if ablation else step


# The paper's ablations that need a training run of their own, by the name the settings' `ablations`
# list gives them: the step that trains each (its prediction step follows it in or out). Without the
# key, all of them; config/toyworld.yaml names the one that costs the build's wall clock nothing (it
# trains beside stage 1, on a core that would wait); add `no_stage1` and build again to add it to a
# finished build (only it, its prediction and the report run).
ABLATIONS = {"no_caption_loss": "stage1_cc3m_no_caption_loss", "no_stage1": "stage2_vist_no_stage1"}


def wanted_ablations(build) -> set[str]:
    """The training steps of the ablations the settings ask for (`ablations`, default: all)."""
    names = build.settings.get("ablations", list(ABLATIONS))
    if not isinstance(names, list) or set(names) - set(ABLATIONS):
        raise SystemExit(f"error: {build.config_path}: `ablations` must be a list of {list(ABLATIONS)}, got {names!r}")
    return {ABLATIONS[name] for name in names}


def _ablation(step: Step, trains: str | None = None) -> Step:
    """`step`, in the build when the settings ask for the ablation whose training step is `trains`
    (the step itself, when it is that training step)."""
    trains = trains or step.name
    step.enabled = lambda build: trains in wanted_ablations(build)
    return step


def two_pictures_steps() -> list[Step]:
    """The two-picture task (toyworld/two_pictures.py), when the settings' `two_pictures` gives its
    sizes: its data, stage 2 on it from stage 1 (`--dataset interleaved`), and its prediction, each
    picture judged."""
    from toyworld import two_pictures

    # Its data is a step of its own after `datasets` (which clears data/): a build made before the
    # task keeps its datasets and everything trained on them.
    data = Step("two_pictures_data", two_pictures.data_step, ("datasets",),
                lambda b: [b.settings.get("two_pictures"), b.settings["world"]["image_size"], b.settings["seed"]],
                "write the toy two-picture answers (interleaved format), leak-checked", enabled=two_pictures.enabled)
    train = _stage("stage2_two_pictures", "interleaved", 2, "stage1_cc3m.ckpt", ("--dataset", "interleaved"),
                   depends=("two_pictures_data", "stage1_cc3m"), about="MiniGPT-5 stage 2 on the toy two-picture answers")
    train.enabled = two_pictures.enabled
    predict = Step("predict_two_pictures", two_pictures.predict_step,
                   ("two_pictures_data", "stage1_cc3m", "stage2_two_pictures"),
                   lambda b: [b.settings["evaluate"], two_pictures.RUN],
                   "predict the two-picture answers, judge each picture at its place", enabled=two_pictures.enabled)
    return [data, train, predict]


def pairing_steps() -> list[Step]:
    """A second pairing's pretraining, stage 1 and prediction (toyworld/pairing.py), each step
    enabled when the settings' `pairings` list names its pairing."""
    from toyworld import pairing

    return pairing.steps(Step)


PAIRING_PREDICTIONS = pairing.PREDICTIONS
PRETRAINING = ("clip", "vae", "unet", "llm", "image_side")
STEPS = [
    Step("datasets", make_datasets, (), lambda b: [b.settings["world"], b.settings["seed"]],
         "write the toy CC3M, VIST and MMDialog"),
    Step("preset", make_preset, (),
         lambda b: [b.settings["pretrain"]["llm"]["documents"], Path(b.config_file("model_config")).read_text(),
                    Path(b.config_file("arch")).read_text(), b.settings.get("frozen_parts"),
                    b.settings["world"].get("story_mode")],
         "the toy preset's files in the real formats"),
    Step("clip", pretrain_clip, ("preset",), lambda b: [b.settings["pretrain"][k] for k in ("pictures", "clip")] + _caption_orders(b, "sd"),
         "train SD's text encoder and the EVA ViT together (CLIP)"),
    Step("vae", pretrain_vae, ("preset",), lambda b: [b.settings["pretrain"][k] for k in ("pictures", "vae")],
         "train SD's VAE (autoencoder)"),
    # The build's longest step: with `processes`, it takes that many cores (one thread each).
    Step("unet", pretrain_unet, ("clip", "vae"), lambda b: [b.settings["pretrain"][k] for k in ("pictures", "unet")] + _caption_orders(b, "sd"),
         "train SD's UNet (latent diffusion, text-conditioned)", threads="all", cores=unet_processes),
    Step("llm", pretrain_llm, ("preset",), lambda b: [b.settings["pretrain"]["llm"], b.settings["world"].get("story_mode")]
         + _caption_orders(b, "llm"),
         "train the LLM on the world's text"),
    Step("image_side", pretrain_image_side, ("clip", "llm"),
         lambda b: [b.settings["pretrain"]["pictures"], b.settings["pretrain"]["image_side"]],
         "train Q-Former + llama_proj by captioning through the LLM"),
    Step("stage0", save_stage0, ("image_side", "unet"), about="MiniGPT-5 as built, untrained"),
    _stage("stage1_cc3m", "CC3M", 1, None, about="MiniGPT-5 stage 1 on the toy CC3M"),
    _stage("stage2_vist", "VIST", 2, "stage1_cc3m.ckpt", depends=("datasets", "stage1_cc3m"),
           about="MiniGPT-5 stage 2 on the toy VIST"),
    _stage("stage2_mmdialog", "MMDialog", 2, "stage1_cc3m.ckpt", depends=("datasets", "stage1_cc3m"),
           about="MiniGPT-5 stage 2 on the toy MMDialog"),
    *two_pictures_steps(),          # a long training step, ready with stage 1 (its prediction waits for it)
    # Side by side, ready steps start in this order. The ablations are ready with stage 0, beside
    # stage 1, which everything else waits for: stage 1 without the caption loss (as long as stage 1)
    # first, on the core that would otherwise wait; the long runs before the short predictions, so
    # that these fill the end and no core idles there.
    _ablation(_stage("stage1_cc3m_no_caption_loss", "CC3M", 1, None, ("--caption_loss_weight", "0"),
                     about="ablation: stage 1 without the caption loss")),
    _ablation(_stage("stage2_vist_no_stage1", "VIST", 2, evaluate.UNTRAINED,
                     about="ablation: stage 2 from the untrained mapper")),
    # It needs nothing, but starts after the UNet: the first cores go to CLIP and the VAE, then both to
    # the UNet (the build's longest chain; started at once, the extractors held the VAE back 43 s, and
    # beside the LLM and the image side, the UNet 27 s); it runs beside stage 1 instead.
    Step("extractors", train_extractors, (),
         lambda b: [b.settings.get("extractors"), b.settings["world"]["image_size"], b.settings["seed"]],
         "train metric.py's toy CLIP and toy scene classifier (in Inception's place)", starts_after=("unet",)),
    # Each prediction run is a step of its own, so that it starts as soon as its checkpoints exist.
    *(_predict(run) for run in evaluate.RUNS),
    *pairing_steps(),
    Step("report", evaluate.write_report, tuple(f"predict_{run.name}" for run in evaluate.RUNS)
         + ("predict_two_pictures",) + PAIRING_PREDICTIONS,
         lambda b: b.settings.get("report"), "the judge's scores, metric.py's figures and the times -> TOY_RESULTS.md"),
]
