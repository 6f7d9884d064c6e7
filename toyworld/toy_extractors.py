"""The toy world's feature extractors for metric.py, trained in the build (`extractors` step), so
that metric.py's CLIP-I, CLIP-T, FID and IS mean something in the toy world, as the real CLIP and
Inception do on real pictures:

    toy CLIP        OpenCLIP of the architecture config/toy_clip.json, trained with CLIP's
                    symmetric contrastive loss between renders and captions
    toy classifier  `extractors.ToyClassifier`, trained to name a render's scene (192 classes): its
                    features stand in for Inception's pool3 (FID), its posteriors for Inception's
                    classes (IS)

They are evaluators, like the real CLIP and Inception, not MiniGPT-5's training sources: they see
every combination (held-out ones too) and both wordings, so that they score a held-out picture as
well as a seen one. `extractors.toy_models` loads what `train` writes.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageOps

from toyworld import world
from toyworld.pretrain import Recipe, _fit

CONFIG = Path(__file__).resolve().parents[1] / "config" / "toy_clip.json"


def _renders(n: int, size: int, seed: int) -> tuple[list, list[world.Scene], list[str]]:
    """`n` varied renders of every combination (half mirrored), each with a caption in either wording."""
    rng = random.Random(f"{seed}-extractor-pictures")
    scenes = world.all_scenes()
    images, chosen, captions = [], [], []
    for i in range(n):
        scene = scenes[i % len(scenes)]
        image = world.render(scene, size, rng)
        images.append(ImageOps.mirror(image) if rng.random() < 0.5 else image)
        words = world.WORDING[rng.choice(sorted(world.WORDING))]
        captions.append(world.caption(scene, rng.randrange(len(words.captions)), words))
        chosen.append(scene)
    return images, chosen, captions


def train_clip(images, scenes, captions, recipe: Recipe, seed: int):
    """A toy CLIP, trained contrastively; batches hold distinct scenes (two pictures of one scene
    would be false negatives). Returns the model and its losses."""
    import open_clip

    from extractors import TOY_CLIP, preprocess_batch

    torch.manual_seed(seed)
    open_clip.add_model_config(CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP)
    pixels = preprocess_batch(preprocess, images)
    tokens = open_clip.get_tokenizer(TOY_CLIP)(captions)
    by_scene: dict[world.Scene, list[int]] = {}
    for i, scene in enumerate(scenes):
        by_scene.setdefault(scene, []).append(i)
    kinds = list(by_scene)
    g = torch.Generator().manual_seed(seed)
    model.train()

    def step(_: int) -> torch.Tensor:
        chosen = torch.randperm(len(kinds), generator=g)[: recipe.batch_size].tolist()
        index = [by_scene[kinds[c]][int(torch.randint(len(by_scene[kinds[c]]), (1,), generator=g))] for c in chosen]
        image = F.normalize(model.encode_image(pixels[index]), dim=-1)
        text = F.normalize(model.encode_text(tokens[index]), dim=-1)
        logits = model.logit_scale.clamp(max=np.log(100)).exp() * image @ text.T
        labels = torch.arange(len(index))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    losses = _fit(list(model.parameters()), recipe, step, "toy CLIP")
    return model.eval(), losses


def train_classifier(images, scenes, recipe: Recipe, seed: int, width: int = 64):
    """A `ToyClassifier` trained to name each render's scene (cross-entropy over the 192 scenes).
    Returns the model, its constructor's arguments and its losses."""
    from extractors import ToyClassifier

    torch.manual_seed(seed)
    every = world.all_scenes()
    arguments = {"classes": len(every), "width": width, "size": images[0].size[0]}
    model = ToyClassifier(**arguments)
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    labels = torch.tensor([every.index(s) for s in scenes])
    g = torch.Generator().manual_seed(seed)
    model.train()

    def step(_: int) -> torch.Tensor:
        index = torch.randint(len(pixels), (recipe.batch_size,), generator=g)
        return F.cross_entropy(model(pixels[index])[1], labels[index])

    losses = _fit(list(model.parameters()), recipe, step, "toy classifier")
    return model.eval(), arguments, losses


@torch.no_grad()
def held_out_scores(clip_model, classifier, size: int, seed: int, n: int = 192) -> dict[str, float]:
    """How well the extractors read new renders: the classifier's scene accuracy, and how often the
    toy CLIP ranks a render's own caption (test wording) first among every scene's."""
    import open_clip

    from extractors import TOY_CLIP, preprocess_batch

    rng = random.Random(f"{seed}-extractor-check")
    every = world.all_scenes()
    scenes = [every[i % len(every)] for i in range(n)]
    images = [world.render(s, size, rng) for s in scenes]
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    predicted = classifier(pixels)[1].argmax(-1)
    classifier_accuracy = float((predicted == torch.tensor([every.index(s) for s in scenes])).float().mean())
    _, _, preprocess = open_clip.create_model_and_transforms(TOY_CLIP)
    image = F.normalize(clip_model.encode_image(preprocess_batch(preprocess, images)), dim=-1)
    texts = [world.caption(s, 0, world.TEST) for s in every]
    text = F.normalize(clip_model.encode_text(open_clip.get_tokenizer(TOY_CLIP)(texts)), dim=-1)
    retrieved = (image @ text.T).argmax(-1)
    clip_accuracy = float((retrieved == torch.tensor([every.index(s) for s in scenes])).float().mean())
    return {"classifier_scene_accuracy": round(classifier_accuracy, 4),
            "clip_caption_retrieval": round(clip_accuracy, 4)}


def train(folder: Path, section: dict, size: int, seed: int) -> dict:
    """Train both extractors (settings: config/toyworld*.yaml `extractors`) and write them to
    `folder` in the files `extractors.toy_models` reads; returns their losses and held-out scores."""
    from extractors import TOY_CLASSIFIER, TOY_CLIP
    from run_files import save_atomic

    images, scenes, captions = _renders(section["pictures"], size, seed)
    clip_model, clip_losses = train_clip(images, scenes, captions, Recipe(**section["clip"]), seed)
    classifier, arguments, classifier_losses = train_classifier(images, scenes, Recipe(**section["classifier"]), seed)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIG, folder / f"{TOY_CLIP}.json")
    save_atomic(clip_model.state_dict(), folder / f"{TOY_CLIP}.pt")
    (folder / f"{TOY_CLASSIFIER}.json").write_text(json.dumps(arguments))
    save_atomic(classifier.state_dict(), folder / f"{TOY_CLASSIFIER}.pt")
    first = lambda losses: round(float(np.mean(losses[:10])), 4)
    last = lambda losses: round(float(np.mean(losses[-10:])), 4)
    return {"clip_first_loss": first(clip_losses), "clip_loss": last(clip_losses),
            "classifier_first_loss": first(classifier_losses), "classifier_loss": last(classifier_losses),
            **held_out_scores(clip_model, classifier, size, seed)}
