"""Pretraining the frozen parts MiniGPT-5 builds on, for the toy world, each with its field's usual
recipe, written in the real file formats and read back by the project's unchanged loaders.

    stable diffusion  sd/       1. VAE: reconstruction (+ a tiny KL term), as an autoencoder
                                2. CLIP text encoder: contrastive against a small image tower (CLIP)
                                3. UNet: epsilon-prediction denoising on VAE latents, conditioned
                                   on the frozen text encoder, captions dropped 10% (for CFG),
                                   min-SNR-5 weighting, SD 2.1-base's noise schedule
    language model    llama/    sentencepiece tokenizer + LLaMA, next-token prediction on the
                                world's text in the release's prompt formats
    image side        eva_vit_g.pth, blip2_pretrained_flant5xxl.pth, prerained_minigpt4_7b.pth:
                                EVA-ViT + Q-Former + llama_proj trained together to caption
                                pictures through the frozen LLM (MiniGPT-4's captioning stage,
                                BLIP-2's generative step, from scratch)

Each function starts from the random preset folder that `weights.py` writes (so the files have the
real layouts), trains, and writes the trained weights back into that folder.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageOps
from torch import nn
from tqdm.auto import tqdm

from toyworld import world


@dataclass(frozen=True)
class Recipe:
    """Optimiser settings of one pretraining step (config/toyworld*.yaml)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 0
    weight_decay: float = 0.0


def _schedule(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(params: Sequence[nn.Parameter], recipe: Recipe, loss_of_step: Callable[[int], torch.Tensor],
         desc: str, after_step: Callable[[], None] | None = None) -> list[float]:
    """AdamW over `params` for `recipe.steps` steps (then `after_step()`); returns the loss of
    every step. Run by data-parallel processes (`in_processes`), each one's `loss_of_step` is its
    share of the batch, and the gradients and the loss are averaged over them before the update."""
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = _schedule(optimizer, recipe)
    losses = []
    rank, processes = data_parallel_rank()
    bar = tqdm(range(recipe.steps), desc=desc, unit="step", leave=False, disable=rank > 0)
    for step in bar:
        loss = loss_of_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if processes > 1:
            loss = _average_over_processes(params, loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses


# ---- data parallelism: one batch split over single-threaded processes -----------------------------
# The small models here gain nothing from a second thread in one process (a toy UNet step of batch 32:
# 263 ms on one thread, 267 ms on two), but two processes of half the batch each, averaging their
# gradients, run a step nearly twice as fast. The recipe does not change: every process draws the
# whole batch's randomness from the same generator and keeps its rows, so the averaged gradient is
# the one of the whole batch, up to float rounding.

def data_parallel_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside `in_processes`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_share(batch_size: int) -> slice:
    """The rows of a batch this process trains on: an equal share each."""
    rank, processes = data_parallel_rank()
    if batch_size % processes:
        raise ValueError(f"a batch of {batch_size} does not split evenly over {processes} processes")
    share = batch_size // processes
    return slice(rank * share, (rank + 1) * share)


def _average_over_processes(params: Sequence[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Average the gradients (and the loss, for the log) over the processes: one all-reduce of one
    flat tensor, which costs less than one per parameter on a CPU. Returns the averaged loss."""
    import torch.distributed as dist

    trained = [p for p in params if p.grad is not None]      # the same parameters in every process
    flat = torch.cat([p.grad.reshape(-1) for p in trained] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in trained:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return flat[-1]


def in_processes(processes: int, fn: Callable, *args):
    """`fn(*args)` in `processes` single-threaded processes joined in one gloo group; returns what
    process 0 returned (JSON-like). A process that fails stops the others and raises here."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="toyworld-dp-") as folder:
        mp.spawn(_process_main, args=(processes, folder, fn, args), nprocs=processes, join=True)
        return json.loads((Path(folder) / "result.json").read_text())


def _process_main(rank: int, processes: int, folder: str, fn: Callable, args: tuple) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)       # as the build's steps run (build.py)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=processes)
    try:
        result = fn(*args)
        if rank == 0:
            (Path(folder) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


# ---- the pictures and captions pretraining sees --------------------------------------------------

@dataclass
class PictureSet:
    """Rendered training pictures (N, 3, S, S) in [-1, 1], their scenes and one caption each."""

    images: torch.Tensor
    scenes: list[world.Scene]
    captions: list[str]


def picture_set(n: int, size: int, seed: int, caption_orders: str = "train",
                train_share: float | None = None) -> PictureSet:
    """`n` renders of seen combinations (random variations, half of them mirrored as MiniGPT-5's
    training does), with a caption each: in the training wording, or with `caption_orders`
    "all_but_test" in one of `world.caption_templates`' (drawn apart, so that the pictures are
    the same either way): all of them alike, or with `train_share` that share of the captions in
    the training wording's templates and the rest in the other orders."""
    rng = random.Random(f"{seed}-pretrain-pictures")
    pool = [s for s in world.all_scenes() if not world.is_held_out(s)]
    scenes, captions, images = [], [], []
    for _ in range(n):
        scene = rng.choice(pool)
        image = world.render(scene, size, rng)
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        scenes.append(scene)
        captions.append(world.caption(scene, rng.randrange(len(world.TRAIN.captions))))
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    if caption_orders != "train" or train_share is not None:
        words, template = caption_draw(caption_orders, train_share, random.Random(f"{seed}-pretrain-captions"), "sd")
        captions = [world.caption(s, template(), words) for s in scenes]
    return PictureSet(torch.stack(images), scenes, captions)


def caption_draw(orders: str, train_share: float | None, draw: random.Random, part: str):
    """The wording of a part's pretraining captions (`pretrain.{part}_caption_orders`, with
    `pretrain.{part}_train_wording_share`) and a function that draws a template of it from `draw`:
    every template alike, or the training wording's with probability `train_share`."""
    words = dataclasses.replace(world.TRAIN, captions=world.caption_templates(orders, f"pretrain.{part}_caption_orders"))
    if train_share is None:
        return words, lambda: draw.randrange(len(words.captions))
    if orders == "train":
        raise ValueError(f"pretrain.{part}_train_wording_share needs pretrain.{part}_caption_orders: all_but_test "
                         "(with the training wording's orders alone every caption is in them)")
    if not 0.0 <= train_share <= 1.0:
        raise ValueError(f"pretrain.{part}_train_wording_share must be in [0, 1], got {train_share!r}")
    ours, others = len(world.TRAIN.captions), len(words.captions) - len(world.TRAIN.captions)
    return words, lambda: draw.randrange(ours) if draw.random() < train_share else ours + draw.randrange(others)


def world_words() -> list[str]:
    """Every word of the world's captions, in the training and the test word orders (the SD
    tokenizer gives each its own token: the test wording is new word orders, not new words)."""
    words = set()
    for scene in world.all_scenes():
        for wording in world.WORDING.values():
            for template in range(len(wording.captions)):
                words.update(world.caption(scene, template, wording).replace(",", " ").split())
    return sorted(words)


# ---- Stable Diffusion ----------------------------------------------------------------------------

def train_vae(vae, pictures: PictureSet, recipe: Recipe, kl_weight: float, seed: int) -> list[float]:
    """Autoencoder training: L1 + MSE reconstruction of a sampled latent, plus `kl_weight` x KL
    (SD's VAE adds a perceptual and an adversarial term, which flat toy pictures do not need).
    Sets the VAE's `scaling_factor` to 1 / the latents' standard deviation."""
    g = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)

    def step(_: int) -> torch.Tensor:
        x = pictures.images[torch.randint(len(pictures.images), (recipe.batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()

    losses = _fit(list(vae.parameters()), recipe, step, "sd: vae")
    vae.eval().requires_grad_(False)
    # The latent diffusion recipe: scale latents to unit variance (SD's 0.18215 is that number for
    # SD's own VAE; the UNet's noise schedule assumes it).
    with torch.no_grad():
        sample = vae.encode(pictures.images[:512]).latent_dist.sample(generator=g)
    vae.register_to_config(scaling_factor=round(1.0 / float(sample.std()), 5))
    return losses


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Pictures in [-1, 1] -> the image encoder's input (CLIP's normalisation, as
    `minigpt4.image_processor`)."""
    from minigpt4 import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def train_clip(text_encoder, tokenizer, vision_model, pictures: PictureSet, recipe: Recipe, seed: int,
               train_vision: bool = True) -> list[float]:
    """CLIP's recipe for both frozen encoders at once: symmetric InfoNCE with a learned temperature
    between SD's text encoder (pooled output, projected) and the EVA ViT (`Blip2VisionModel`:
    class token after `post_layernorm`, projected), as EVA-CLIP and OpenCLIP were trained. The
    projections are thrown away: SD reads the text encoder's token states, the Q-Former the ViT's
    patch states. Batches hold distinct scenes (two pictures of one scene would be false negatives).

    With `train_vision=False` the ViT stays as it is and only the text side learns (LiT, "locked-image
    tuning"): a second text encoder aligned to an image encoder trained before. A text encoder with
    its own projection (`CLIPTextModelWithProjection`, SD3's) is read at that projection
    (`text_embeds`, the pooled embedding SD3 reads), which then learns too."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    projected = hasattr(text_encoder, "text_projection")
    width = text_encoder.config.projection_dim if projected else text_encoder.config.hidden_size
    text_proj = nn.Linear(width, width, bias=False)
    image_proj = nn.Linear(vision_model.config.hidden_size, width, bias=False)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    by_scene: dict[world.Scene, list[int]] = {}
    for i, scene in enumerate(pictures.scenes):
        by_scene.setdefault(scene, []).append(i)
    scenes = list(by_scene)
    tokens = tokenizer(pictures.captions, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    pixels = clip_pixels(pictures.images)
    trained = (text_encoder, vision_model) if train_vision else (text_encoder,)
    for model in trained:
        model.train().requires_grad_(True)
    if not train_vision:
        vision_model.eval().requires_grad_(False)
    hooks = _keep_key_bias_zero(vision_model) if train_vision else []

    def text_features(index: list[int]) -> torch.Tensor:
        out = text_encoder(tokens[index])
        return out.text_embeds if projected else out.pooler_output

    def step(_: int) -> torch.Tensor:
        chosen = torch.randperm(len(scenes), generator=g)[: recipe.batch_size].tolist()
        index = [by_scene[scenes[c]][int(torch.randint(len(by_scene[scenes[c]]), (1,), generator=g))] for c in chosen]
        text = F.normalize(text_proj(text_features(index)), dim=-1)
        with torch.set_grad_enabled(train_vision):
            pooled = vision_model(pixels[index]).pooler_output
        image = F.normalize(image_proj(pooled), dim=-1)
        logits = log_scale.clamp(max=math.log(100)).exp() * text @ image.T
        labels = torch.arange(len(index))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    params = [p for model in trained for p in model.parameters()]
    params += [*text_proj.parameters(), *image_proj.parameters(), log_scale]
    losses = _fit(params, recipe, step, "clip: text encoder + vit" if train_vision else "clip: text encoder (vit locked)")
    for hook in hooks:
        hook.remove()
    for model in (text_encoder, vision_model):
        model.eval().requires_grad_(False)
    return losses


def _keep_key_bias_zero(vision_model) -> list:
    """EVA's attention has a query and a value bias but no key bias, so the LAVIS file has nowhere
    to keep one: the key slice of transformers' fused qkv bias gets no gradient (it starts at 0)."""
    hidden = vision_model.config.hidden_size

    def no_key(grad: torch.Tensor) -> torch.Tensor:
        return torch.cat([grad[:hidden], torch.zeros_like(grad[hidden:2 * hidden]), grad[2 * hidden:]])

    return [layer.self_attn.qkv.bias.register_hook(no_key) for layer in vision_model.encoder.layers]


def train_unet(unet, vae, text_encoder, tokenizer, scheduler, pictures: PictureSet, recipe: Recipe,
               caption_dropout: float, snr_gamma: float | None, seed: int, ema_decay: float = 0.0) -> list[float]:
    """Latent diffusion with the steps MiniGPT-5's own training takes (diffusion.py): VAE latents
    sampled from cached moments x scaling factor, noise at a uniform timestep, the denoising MSE
    under the scheduler's prediction type (epsilon for SD 2.1-base), min-SNR weighted; the caption
    replaced by "" with probability `caption_dropout` so that classifier-free guidance works; with
    `ema_decay`, the weights kept are an exponential moving average of the trained ones. Run by
    data-parallel processes (`in_processes`), each takes its share of every batch."""
    import diffusion

    g = torch.Generator().manual_seed(seed)
    moments = torch.cat([diffusion.vae_moments(vae, pictures.images[i:i + 256])
                         for i in range(0, len(pictures.images), 256)])
    texts = sorted(set(pictures.captions)) + [""]
    encoded = diffusion.encode_captions(tokenizer, text_encoder, texts, torch.device("cpu"), batch_size=256)
    caption_index = torch.tensor([texts.index(c) for c in pictures.captions])
    empty = len(texts) - 1
    unet.train().requires_grad_(True)
    share = batch_share(recipe.batch_size)

    def step(_: int) -> torch.Tensor:
        # Drawn from `g` in this order: samples, latent noise, diffusion noise, timesteps, dropout
        # (the whole batch's, by every process alike; each trains on its share).
        index = torch.randint(len(moments), (recipe.batch_size,), generator=g)
        latents = diffusion.latents_from_moments(vae, moments[index], generator=g)
        noise = diffusion.randn(latents, g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=g)
        drop = torch.rand(recipe.batch_size, generator=g) < caption_dropout
        condition = encoded[torch.where(drop, empty, caption_index[index])]
        return diffusion.denoising_loss(unet, scheduler, latents[share], condition[share], noise[share], t[share],
                                        snr_gamma=snr_gamma or None)

    average = torch.optim.swa_utils.AveragedModel(
        unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay)) if ema_decay else None
    losses = _fit(list(unet.parameters()), recipe, step, "sd: unet",
                  after_step=(lambda: average.update_parameters(unet)) if average else None)
    if average is not None:                     # sample with the exponential moving average, as SD does
        unet.load_state_dict(average.module.state_dict())
    unet.eval().requires_grad_(False)
    return losses


# ---- the language model --------------------------------------------------------------------------

def llm_corpus(n: int, seed: int, story_mode: str = "pictures", caption_orders: str = "train",
               train_share: float | None = None) -> list[str]:
    """`n` documents of the world's text, in the release's prompt formats: captions, CC3M
    instructions, stories told frame by frame, VIST prompts answered with the scene they ask for,
    and dialogues. The LLM never sees pixels: where MiniGPT-5 will put a picture's embeddings
    (`<Img>...</Img>`), the picture is described in words, or left empty. A training source like
    any other: seen combinations, training stories and the training wording only (leakage.py checks).
    With `caption_orders` "all_but_test" (and `train_share`, as `picture_set`) its captions are in
    every word order but the test's, drawn apart: the same documents, only the captions reworded."""
    from dataloader import CC3M_PROMPTS, CC3M_SYSTEM, MMDIALOG_SYSTEM, VIST_GENERATION, VIST_MULTIMODAL, VIST_SYSTEM

    rng = random.Random(f"{seed}-llm-corpus")
    pool = [s for s in world.all_scenes() if not world.is_held_out(s)]
    templates = len(world.TRAIN.captions)
    slot = "<Img></Img>"

    words, template = world.TRAIN, None
    if caption_orders != "train" or train_share is not None:
        words, template = caption_draw(caption_orders, train_share, random.Random(f"{seed}-llm-corpus-captions"), "llm")

    def describe(scene: world.Scene) -> str:
        drawn = rng.randrange(templates)             # drawn either way: the documents stay the same
        return world.caption(scene, drawn if template is None else template(), words)

    def document(kind: int) -> str:
        scene = rng.choice(pool)
        if kind == 0:                                            # a caption
            return describe(scene)
        if kind == 1:                                            # a CC3M instruction
            return f"{CC3M_SYSTEM}###Human: {rng.choice(CC3M_PROMPTS)} {describe(scene)} ###Assistant: {slot} ###"
        length = rng.randint(2, len(world.TIMES))
        story = world.draw_story(story_mode, length, rng, "train")
        if kind == 2:                                            # a story, every frame described
            parts = []
            for text, frame in zip(story.captions, story.scenes):
                parts += [text, describe(frame)]
            return ". ".join(parts)
        if kind == 3:                                            # a VIST prompt and the scene it asks for
            k = len(story.captions) - 1
            # Where MiniGPT-5 will put each frame's picture, the picture in words: the next scene
            # then follows from the last one and the caption (what it says changes, the rest stays).
            frames = [f"{text}<Img>{describe(frame)}</Img>" for text, frame in zip(story.captions[:k], story.scenes)]
            context = "".join(frames) + ("\n" if k else "")
            if rng.random() < 0.5:
                prompt = rng.choice(VIST_GENERATION).format(context=context, caption=story.captions[k])
            else:
                prompt = rng.choice(VIST_MULTIMODAL).format(context=context)
            return f"{VIST_SYSTEM}{prompt} {describe(story.scenes[k])} ###"
        turns = world.make_dialogue(scene, rng)                 # a dialogue
        parts = [MMDIALOG_SYSTEM]
        for i, turn in enumerate(turns):
            speaker = "###Human:" if i % 2 == 0 else "###Assistant:"
            parts.append(f"{speaker} {turn.text}")
            if turn.scene is not None:
                parts.append(f"<Img>{describe(turn.scene)}</Img>")
        return " ".join(parts) + " ###"

    return [document(rng.randrange(5)) for _ in range(n)]


def train_llm(llm, tokenizer, documents: list[str], recipe: Recipe, seed: int) -> list[float]:
    """Next-token prediction on `documents` (BOS + text + EOS, padded batches, pad positions
    ignored)."""
    g = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(d, add_special_tokens=False).input_ids for d in documents]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    limit = llm.config.max_position_embeddings
    start = [] if bos is None else [bos]         # a family without BOS (Qwen2) starts with the text
    sequences = [(start + ids + [eos])[:limit] for ids in encoded]
    llm.train().requires_grad_(True)

    def step(_: int) -> torch.Tensor:
        chosen = [sequences[i] for i in torch.randint(len(sequences), (recipe.batch_size,), generator=g).tolist()]
        length = max(map(len, chosen))
        ids = torch.tensor([s + [eos] * (length - len(s)) for s in chosen])
        mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in chosen])
        labels = ids.masked_fill(mask == 0, -100)
        return llm(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = _fit([p for p in llm.parameters()], recipe, step, "llm")
    llm.eval().requires_grad_(False)
    return losses


# ---- the image side (MiniGPT-4's captioning stage) -----------------------------------------------

CAPTION_PROMPT = "###Human: <Img><ImageHere></Img> Describe this image. ###Assistant:"


def train_image_side(backbone, pictures: PictureSet, recipe: Recipe, seed: int) -> list[float]:
    """BLIP-2's generative step / MiniGPT-4's captioning stage, on a `minigpt4.MiniGPT4` whose ViT
    (CLIP-trained) and LLM stay frozen: the Q-Former, its query tokens and `llama_proj` learn to
    turn a picture into embeddings from which the LLM says its caption (`CAPTION_PROMPT`, the
    loss on the caption tokens only)."""
    g = torch.Generator().manual_seed(seed)
    tok = backbone.llama_tokenizer
    images = clip_pixels(pictures.images)
    prompt = tok(CAPTION_PROMPT, add_special_tokens=False).input_ids
    targets = [tok(f" {c} {backbone.cfg.end_sym}", add_special_tokens=False).input_ids for c in pictures.captions]
    trained = [backbone.Qformer, backbone.llama_proj]
    for module in trained:
        module.train().requires_grad_(True)
    backbone.query_tokens.requires_grad_(True)

    def step(_: int) -> torch.Tensor:
        index = torch.randint(len(images), (recipe.batch_size,), generator=g).tolist()
        rows = [prompt + targets[i] for i in index]
        length = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (length - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        labels = torch.tensor([[-100] * len(prompt) + targets[i] + [-100] * (length - len(prompt) - len(targets[i]))
                               for i in index])
        embeds, mask, labels = backbone.wrap_inputs(ids, mask, labels, backbone.project_images(images[index]))
        return backbone.forward_llm(embeds, mask, labels)[2]

    params = [p for m in trained for p in m.parameters()] + [backbone.query_tokens]
    losses = _fit(params, recipe, step, "image side (captioning)")
    for module in trained:
        module.eval().requires_grad_(False)
    backbone.query_tokens.requires_grad_(False)
    return losses
