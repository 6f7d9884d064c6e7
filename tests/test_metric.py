"""metric.py: FID / IS / CLIP sanity, text metrics against NLTK, `rouge` and rouge-score, the
release's definitions by default (character BLEU, `rouge` ROUGE-L, CC3M's real set from
CC3M_FOLDER/val at its own aspect ratio, CLIP-T on the expected-text field), CLIP-F1 and the
per-conversation averaging by hand, VIST story-level FID, batched == one at a time, the fixed-feature
cache, the CLI end to end on hand-built prediction folders of all three datasets, prediction files
that are read without running code and that the release's reading understands, and the clear error
for a missing weight.

The real CLIP and Inception weights are not available offline, so the tests build a tiny OpenCLIP
model from a config registered here (saved and loaded through `--clip_weights`, the real loading
path) and inject a tiny Inception stand-in. Sentence-BERT is the real packaged all-MiniLM-L6-v2.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from nltk.translate import bleu as nltk_bleu
from nltk.translate.bleu_score import sentence_bleu
from PIL import Image
from rouge import Rouge
from rouge_score import rouge_scorer
from torchvision.transforms import ToPILImage
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.transforms.functional import pil_to_tensor

import extractors
import metric
import predictions

VOKENS = "".join(f"[IMG{i}]" for i in range(8))
TINY_CLIP = "tiny-test-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# The tiny random Inception stand-in that `metric.py --tiny_extractors` uses (uint8 images -> 16
# features, 10 logits).
TinyInception = extractors.TinyInception


# ----------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tiny_clip_weights(tmp_path_factory) -> Path:
    """Register the tiny OpenCLIP config and save a random checkpoint for it."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    torch.save(model.state_dict(), folder / "tiny_clip.pt")
    return folder / "tiny_clip.pt"


@pytest.fixture(scope="module")
def sbert():
    return extractors.load_sbert()


@pytest.fixture(scope="module")
def models(tiny_clip_weights, sbert) -> metric.Models:
    clip, preprocess, tokenizer = extractors.load_clip(TINY_CLIP, "openai", str(tiny_clip_weights))
    return metric.Models(clip, preprocess, tokenizer, TinyInception().eval(), sbert)


def random_images(count: int, seed: int, size: int = 32, shift: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, (count, size, size, 3)) + shift
    return [Image.fromarray(p.clip(0, 255).astype(np.uint8)) for p in pixels]


def as_target(image: Image.Image) -> torch.Tensor:
    """An expected image as the predictions store it (the release's layout): C x H x W in [0, 1]."""
    return pil_to_tensor(image).float() / 255


@pytest.fixture(autouse=True)
def cc3m_folder(tmp_path_factory, monkeypatch) -> Path:
    """CC3M_FOLDER with a `val/` set of real images (shard folders as img2dataset writes them, mixed
    aspect ratios), the release's CC3M FID real set."""
    folder = tmp_path_factory.getbasetemp() / "CC3M"
    if not folder.is_dir():
        for k, (w, h) in enumerate([(40, 40), (60, 40), (40, 64), (50, 50), (44, 30)]):
            shard = folder / "val" / f"0000{k % 2}"
            shard.mkdir(parents=True, exist_ok=True)
            random_images(1, 100 + k, size=max(w, h))[0].crop((0, 0, w, h)).save(shard / f"00{k}.jpg")
        (folder / "val" / "00000" / "000.txt").write_text("a caption file, not an image")
        random_images(1, 99)[0].save(folder / "not_val.jpg")
    monkeypatch.setenv("CC3M_FOLDER", str(folder))
    return folder


def save_predictions(folder: Path, items: list[list]) -> Path:
    """Split items over two rank files, as a two-GPU prediction run writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(items[::2], folder / "predictions-0.pt")
    torch.save(items[1::2], folder / "predictions-1.pt")
    return folder


def common_args(tmp_path: Path, tiny_clip_weights: Path, *extra: str) -> list[str]:
    return ["--clip_model", TINY_CLIP, "--clip_weights", str(tiny_clip_weights),
            "--fid_cache_dir", str(tmp_path / "cache"), "--device", "cpu", *extra]


def cc3m_items(count: int = 6) -> list[list]:
    gts, preds, bases = random_images(count, 1), random_images(count, 2), random_images(count, 3, size=48)
    return [[f"caption {i}", VOKENS + " ###", f"a photo of thing {i}", preds[i], bases[i], as_target(gts[i]),
             None, f"cc3m_{i}"] for i in range(count)]


def vist_items() -> list[list]:
    """Story 10 (3 steps), story 20 (one step: skipped), story 30 (2 steps), one understanding sample."""
    steps = [("10", 0), ("10", 1), ("10", 2), ("20", 0), ("30", 0), ("30", 1)]
    gts, preds = random_images(len(steps), 4), random_images(len(steps), 5, size=40)
    items = []
    for (story, step), gt, pred in zip(steps, gts, preds):
        prompt = f"###Human: Generate an image with the scene description: step {step} of {story} ###Assistant:"
        items.append([prompt, VOKENS + " ###", VOKENS + " ###", pred, None, as_target(gt), None,
                      f"{story}_{step}-gen"])
    items.append(["###Human: What happen next? ###Assistant:", "a dog ###", "a cat ###", None, None,
                  torch.zeros(3, 32, 32), None, "10_1-understanding"])
    return items


def mmdialog_items() -> list[list]:
    """Hand-built conversations whose matched pairs are identical (similarity 1) or absent.

    A: (text ok, gt image only) (text ok, predicted image only) (text ok, both images)
    B: (text ok, predicted image only)
    C: (text ok) (gt text, empty prediction)
    D: (predicted text only) (gt image, no predicted image) -> no text scores, CLIP-F1 0
    """
    images = random_images(4, 6)
    same = [metric.tensor_to_image(as_target(im)) for im in images]  # what metric.py sees
    zero = torch.zeros(3, 32, 32)
    return [
        ["ctx", "hello there friend ###", f"hello there friend {VOKENS} ###", None, None, as_target(images[0]), None,
         "A_1-mm"],
        ["ctx", f"nice to meet you {VOKENS} ###", "nice to meet you ###", same[1], None, zero, None, "A_2-mm"],
        ["ctx", f"look at this dog {VOKENS} ###", f"look at this dog {VOKENS} ###", same[2], None,
         as_target(images[2]), None, "A_3-mm"],
        ["ctx", f"good morning everyone {VOKENS} ###", "good morning everyone ###", same[3], None, zero, None, "B_1-mm"],
        ["ctx", "see you later ###", "see you later ###", None, None, zero, None, "C_1-mm"],
        ["ctx", "###", "thanks a lot ###", None, None, zero, None, "C_2-mm"],
        ["ctx", "random words here ###", "!!", None, None, zero, None, "D_1-mm"],
        ["ctx", "###", f"{VOKENS} ###", None, None, as_target(images[1]), None, "D_2-mm"],
    ]


def score(folder: Path, dataset: str, models: metric.Models, *extra: str) -> dict:
    args = metric.parse_args(["--pred_folder", str(folder), "--dataset", dataset, "--device", "cpu",
                              "--fid_cache_dir", str(folder / "cache"), *extra])
    samples = metric.load_predictions(folder)
    return metric.score(dataset, samples, models, args)


# ----------------------------------------------------------------------------------------------
# image metrics


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(models):
    images, shifted = random_images(24, 7), random_images(24, 7, shift=60)
    real, _ = metric.inception_outputs(images, models, 256)
    moved, _ = metric.inception_outputs(shifted, models, 256)
    for n in (24, 6):  # torchmetrics route (n >= feature size) and the low-rank route
        assert metric.frechet_distance(real[:n], real[:n]) == pytest.approx(0, abs=1e-4)
        assert metric.frechet_distance(real[:n], moved[:n]) > 0.5
    assert metric.frechet_distance(real[:1], real[:5]) is None


def test_low_rank_fid_equals_torchmetrics():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(5, 32, generator=generator), torch.randn(7, 32, generator=generator) + 0.3
    reference = FrechetInceptionDistance(feature=extractors._Precomputed(32))
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert metric.frechet_distance(real, fake) == pytest.approx(float(reference.compute()), rel=1e-4)


def test_inception_score_of_identical_images_is_one(models):
    images = random_images(1, 8) * 12
    _, logits = metric.inception_outputs(images, models)
    assert metric.inception_score(logits) == pytest.approx(1.0, abs=1e-5)
    _, varied = metric.inception_outputs(random_images(12, 9), models)
    assert metric.inception_score(varied) > 1.0
    assert metric.inception_score(torch.zeros(0, 10)) is None


def test_clip_similarity_with_itself_is_one(models):
    images = random_images(3, 10)
    features = metric.clip_image_features(images + images, models)
    assert metric.rowwise_cosine(features[:3], features[3:]) == pytest.approx([1.0] * 3, abs=1e-5)
    texts = metric.clip_text_features(["a red car", "a red car", "a blue sky"], models)
    assert float(texts[0] @ texts[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(texts[0] @ texts[2]) < 0.999


def test_batched_and_one_at_a_time_extraction_agree(models, tmp_path):
    images = random_images(5, 11) + random_images(3, 12, size=48)  # two sizes: IS batches split by size
    for size in (None, 256):
        one = metric.inception_outputs(images, models, size, batch_size=1)
        many = metric.inception_outputs(images, models, size, batch_size=4)
        torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metric.clip_image_features(images, models, batch_size=1),
                               metric.clip_image_features(images, models, batch_size=8), rtol=1e-5, atol=1e-6)
    texts = ["one", "two words", "three little words"]
    torch.testing.assert_close(metric.clip_text_features(texts, models, batch_size=1),
                               metric.clip_text_features(texts, models, batch_size=3), rtol=1e-5, atol=1e-6)
    folder = save_predictions(tmp_path / "cc3m", cc3m_items())
    single, _ = score(folder, "CC3M", models, "--batch_size", "1", "--fid_cache_dir", str(tmp_path / "c1"))
    batched, _ = score(folder, "CC3M", models, "--batch_size", "4", "--fid_cache_dir", str(tmp_path / "c4"))
    assert batched == pytest.approx(single, rel=1e-4, abs=1e-5)


def test_real_features_are_cached_by_content(models, tmp_path):
    args = metric.parse_args(["--pred_folder", str(tmp_path), "--fid_cache_dir", str(tmp_path / "cache")])
    images = random_images(4, 13)
    first = metric.real_fid_features(images, models, args)
    assert len(list((tmp_path / "cache").glob("fid_real_*.pt"))) == 1
    torch.testing.assert_close(metric.real_fid_features(images, models, args), first)
    assert len(list((tmp_path / "cache").glob("fid_real_*.pt"))) == 1  # same images: a cache hit
    metric.real_fid_features(random_images(4, 14), models, args)
    assert len(list((tmp_path / "cache").glob("fid_real_*.pt"))) == 2  # other images: a new entry


def test_a_damaged_fid_cache_is_a_miss_with_a_warning(models, tmp_path):
    args = metric.parse_args(["--pred_folder", str(tmp_path), "--fid_cache_dir", str(tmp_path / "cache")])
    images = random_images(3, 13)
    first = metric.real_fid_features(images, models, args)
    cache = next((tmp_path / "cache").glob("fid_real_*.pt"))
    for damage in (cache.read_bytes()[:100], b"", None):
        if damage is None:
            torch.save(torch.zeros(7, 2), cache)                     # readable, but not these images' features
        else:
            cache.write_bytes(damage)
        with pytest.warns(UserWarning, match=rf"ignoring a damaged FID feature cache \({re.escape(str(cache))}"):
            again = metric.real_fid_features(images, models, args)
        torch.testing.assert_close(again, first)
        torch.testing.assert_close(metric.real_fid_features(images, models, args), first)   # rewritten: a hit


def test_vist_story_level_fid_skips_one_step_stories(models, tmp_path):
    items = vist_items()
    results, counts = score(save_predictions(tmp_path / "vist", items), "VIST", models)
    gen = [it for it in items if it[-1].endswith("-gen")]
    gt, _ = metric.inception_outputs([metric.tensor_to_image(it[5]) for it in gen], models, 256)
    fake, _ = metric.inception_outputs([it[3] for it in gen], models, 256)
    # rows 0-2: story 10, row 3: story 20 (one step), rows 4-5: story 30
    expected = (metric.frechet_distance(gt[0:3], fake[0:3]) + metric.frechet_distance(gt[4:6], fake[4:6])) / 2
    assert results["overall_fid_score"] == pytest.approx(expected, rel=1e-6)
    assert results["overall_instance_fid_score"] == pytest.approx(metric.frechet_distance(gt, fake), rel=1e-6)
    assert counts["stories skipped (one step)"] == 1 and counts["stories scored"] == 2
    assert counts["ignored (not -gen)"] == 1
    assert results["overall_basline_fid_score"] is None  # VIST has no SD baseline images here
    assert results["overall_clip_t_similarity"] is not None


def _release_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID written out with scipy's matrix square root (independent of metric.frechet_distance)."""
    from scipy import linalg

    real, fake = real.double().numpy(), fake.double().numpy()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = linalg.sqrtm(cov_r @ cov_f).real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * root))


def vist_items_with_gaps() -> list[list]:
    """Three stories of 4 / 3 / 3 steps with SD baseline pictures; MiniGPT-5 drew nothing for 10_1,
    30_0 and 30_2, and the baseline nothing for 20_2 (the release does not force generation)."""
    steps = [("10", k) for k in range(4)] + [("20", k) for k in range(3)] + [("30", k) for k in range(3)]
    gts, preds = random_images(len(steps), 40), random_images(len(steps), 41, size=40, shift=30)
    bases = random_images(len(steps), 42, size=36, shift=50)
    items = []
    for (story, step), gt, pred, base in zip(steps, gts, preds, bases):
        name = f"{story}_{step}"
        items.append([f"###Human: Generate an image with the scene description: {name} ###Assistant:",
                      VOKENS + " ###", VOKENS + " ###", None if name in ("10_1", "30_0", "30_2") else pred,
                      None if name == "20_2" else base, as_target(gt), None, f"{name}-gen"])
    return items


def test_vist_instance_fid_takes_the_real_set_from_the_rows_that_drew_a_picture(models, tmp_path):
    """The release adds a ground-truth picture to the FID real set only where MiniGPT-5 drew one,
    scores the SD baseline on those rows against that real set, and takes CLIP and IS over them."""
    items = vist_items_with_gaps()
    results, counts = score(save_predictions(tmp_path / "vist", items), "VIST", models)
    drawn = [it for it in items if it[3] is not None]
    assert len(drawn) == 7
    gt, _ = metric.inception_outputs([metric.tensor_to_image(it[5]) for it in drawn], models, 256)
    fake, _ = metric.inception_outputs([it[3] for it in drawn], models, 256)
    base_rows = [it for it in drawn if it[4] is not None]
    base, _ = metric.inception_outputs([it[4] for it in base_rows], models, 256)
    assert results["overall_instance_fid_score"] == pytest.approx(_release_fid(gt, fake), rel=1e-5)
    assert results["overall_instance_basline_fid_score"] == pytest.approx(_release_fid(gt, base), rel=1e-5)
    # every ground truth in the real set would give another number (what metric.py did before)
    all_gt, _ = metric.inception_outputs([metric.tensor_to_image(it[5]) for it in items], models, 256)
    assert _release_fid(all_gt, fake) != pytest.approx(_release_fid(gt, fake), rel=1e-3)
    # CLIP-I and IS over the rows with a generated picture; the baseline over those that also have one
    gt_clip = metric.clip_image_features([metric.tensor_to_image(it[5]) for it in drawn], models)
    fake_clip = metric.clip_image_features([it[3] for it in drawn], models)
    assert results["overall_clip_similarity"] == pytest.approx(float((gt_clip * fake_clip).sum(-1).mean()), abs=1e-6)
    base_clip = metric.clip_image_features([it[4] for it in base_rows], models)
    gt_base_clip = metric.clip_image_features([metric.tensor_to_image(it[5]) for it in base_rows], models)
    assert results["overall_basline_clip_similarity"] == pytest.approx(
        float((gt_base_clip * base_clip).sum(-1).mean()), abs=1e-6)
    _, base_logits = metric.inception_outputs([it[4] for it in base_rows], models)
    assert results["overall_instance_basline_inception_score"] == pytest.approx(metric.inception_score(base_logits))
    assert counts["with generated image"] == 7 and counts["with baseline image"] == 6
    assert counts["real images for FID"] == 7 and counts["without a generated image (not scored)"] == 3
    # story level: each story on its steps with both pictures (10: 3 steps, 20: 3 steps, 30: one -> skipped)
    rows = {name: [k for k, it in enumerate(drawn) if it[-1].startswith(name)] for name in ("10", "20")}
    expected = np.mean([_release_fid(gt[r], fake[r]) for r in rows.values()])
    assert results["overall_fid_score"] == pytest.approx(expected, rel=1e-5)
    assert counts["stories scored"] == 2 and counts["stories skipped (< 2 images)"] == 1


def test_image_rows_all_keeps_every_ground_truth_and_every_baseline_picture(models, tmp_path):
    items = vist_items_with_gaps()
    results, counts = score(save_predictions(tmp_path / "vist", items), "VIST", models, "--image_rows", "all")
    gt, _ = metric.inception_outputs([metric.tensor_to_image(it[5]) for it in items], models, 256)
    fake, _ = metric.inception_outputs([it[3] for it in items if it[3] is not None], models, 256)
    base, _ = metric.inception_outputs([it[4] for it in items if it[4] is not None], models, 256)
    assert results["overall_instance_fid_score"] == pytest.approx(_release_fid(gt, fake), rel=1e-5)
    assert results["overall_instance_basline_fid_score"] == pytest.approx(_release_fid(gt, base), rel=1e-5)
    assert counts["real images for FID"] == 10 and counts["with baseline image"] == 9


def test_cc3m_baseline_is_scored_only_where_minigpt5_drew_a_picture(models, tmp_path, cc3m_folder):
    """CC3M: the release computed every number, the baseline's too, inside `if predicted image`."""
    items = cc3m_items()
    items[1][3] = items[4][3] = None
    results, counts = score(save_predictions(tmp_path / "cc3m", items), "CC3M", models)
    drawn = [it for it in items if it[3] is not None]
    gt_clip = metric.clip_image_features([metric.tensor_to_image(it[5]) for it in drawn], models)
    base_clip = metric.clip_image_features([it[4] for it in drawn], models)
    text_clip = metric.clip_text_features([it[2] for it in drawn], models)
    assert results["overall_basline_clip_similarity"] == pytest.approx(float((gt_clip * base_clip).sum(-1).mean()),
                                                                       abs=1e-6)
    assert results["overall_basline_clip_t_similarity"] == pytest.approx(
        float((text_clip * base_clip).sum(-1).mean()), abs=1e-6)
    reals = sorted(cc3m_folder.glob("val/*/*.jpg"))
    real, _ = metric.inception_outputs(reals, models, 256)
    base, _ = metric.inception_outputs([it[4] for it in drawn], models, 256)
    assert results["overall_basline_fid_score"] == pytest.approx(_release_fid(real, base), rel=1e-5)
    assert counts["with baseline image"] == 4 and counts["real images for FID"] == 5
    # with the samples' own ground truth as the real set, only the rows with a picture count
    own, counts = score(save_predictions(tmp_path / "cc3m2", items), "CC3M", models, "--fid_real", "ground_truth")
    gt, _ = metric.inception_outputs([metric.tensor_to_image(it[5]) for it in drawn], models, 256)
    fake, _ = metric.inception_outputs([it[3] for it in drawn], models, 256)
    assert own["overall_fid_score"] == pytest.approx(_release_fid(gt, fake), rel=1e-5)
    assert counts["real images for FID"] == 4


def test_mmdialog_expects_a_picture_where_the_expected_text_has_the_vokens(models, tmp_path):
    """The release: a turn needs a picture when `[IMG0]` is in its expected text (CLIP-F1's image slot)."""
    images = random_images(2, 8)
    same = [metric.tensor_to_image(as_target(im)) for im in images]
    items = [  # E: text matched; a picture in the record but none asked for in the text, one drawn
        ["ctx", f"a cat {VOKENS} ###", "a cat ###", same[0], None, as_target(images[0]), None, "E_1-mm"],
        # F: text matched; the text asks for a picture and the record has it, none drawn
        ["ctx", "a dog ###", f"a dog {VOKENS} ###", None, None, as_target(images[1]), None, "F_1-mm"]]
    folder = save_predictions(tmp_path / "mm", items)
    results, counts = score(folder, "MMDialog", models)
    # E: text 1 matched, picture 1 extra -> P = 1/2, R = 1 -> 2/3;  F: text matched, picture missing -> 2/3
    assert results["overall_clip_f1"] == pytest.approx(2 / 3, abs=1e-5)
    assert results["overall_clip_i_similarity"] is None
    assert counts["turns with predicted image only"] == 1 and counts["turns with ground-truth image only"] == 1
    ours, _ = score(folder, "MMDialog", models, "--image_rows", "all")
    # ours: E's record has a picture -> both matched (similarity 1) -> F1 1; F as before
    assert ours["overall_clip_f1"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-5)


def test_clip_t_compares_with_the_expected_text_field_as_the_release(models, tmp_path):
    """VIST generation records expect only vokens; the release embedded that text as it is.
    `--clip_t_text caption` uses the scene description from the prompt instead."""
    gen = [it for it in vist_items() if it[-1].endswith("-gen")]
    folder = save_predictions(tmp_path / "vist", vist_items())
    images = metric.clip_image_features([it[3] for it in gen], models)
    for flag, texts in (("release", [it[2] for it in gen]),
                        ("caption", [f"step {it[-1].split('_')[1][0]} of {it[-1].split('_')[0]}" for it in gen])):
        results, _ = score(folder, "VIST", models, "--clip_t_text", flag)
        expected = float((images * metric.clip_text_features(texts, models)).sum(-1).mean())
        assert results["overall_clip_t_similarity"] == pytest.approx(expected, abs=1e-5), flag
    release, _ = score(folder, "VIST", models)
    caption, _ = score(folder, "VIST", models, "--clip_t_text", "caption")
    assert release["overall_clip_t_similarity"] != pytest.approx(caption["overall_clip_t_similarity"], abs=1e-4)


class ShapeSpy(torch.nn.Module):
    """TinyInception that records the (H, W) of every image it is given."""

    def __init__(self):
        super().__init__()
        self.net, self.sizes = TinyInception(), []

    def forward(self, pixels):
        self.sizes += [tuple(pixels.shape[-2:])] * len(pixels)
        return self.net(pixels)


def test_cc3m_fid_real_set_is_every_val_jpg_at_its_own_aspect_ratio(models, tmp_path, cc3m_folder):
    items = cc3m_items()
    folder = save_predictions(tmp_path / "cc3m", items)
    spy = ShapeSpy()
    results, counts = score(folder, "CC3M", metric.Models(models.clip, models.clip_preprocess, models.clip_tokenizer,
                                                          spy, None))
    reals = sorted(cc3m_folder.glob("val/*/*.jpg"))
    assert counts["real images for FID"] == len(reals) == 5
    # shorter side 256, aspect kept (torchvision's Resize(256)): 60 x 40 -> 384 x 256, 40 x 64 -> 256 x 409
    assert {(256, 256), (256, 384), (409, 256), (256, 375)} <= set(spy.sizes)
    real, _ = metric.inception_outputs(reals, metric.Models(inception=TinyInception()), 256)
    fake, _ = metric.inception_outputs([it[3] for it in items], metric.Models(inception=TinyInception()), 256)
    assert results["overall_fid_score"] == pytest.approx(metric.frechet_distance(real, fake), rel=1e-5)
    # ours behind a flag: the evaluated samples' own target images
    ours, counts = score(folder, "CC3M", models, "--fid_real", "ground_truth")
    gt, _ = metric.inception_outputs([metric.tensor_to_image(it[5]) for it in items], models, 256)
    assert counts["real images for FID"] == len(items)
    assert ours["overall_fid_score"] == pytest.approx(metric.frechet_distance(gt, fake), rel=1e-5)


def test_the_release_readme_cc3m_metric_command_runs_on_the_repo_samples(tmp_path, monkeypatch):
    """`export CC3M_FOLDER=datasets/CC3M; python3 metric.py --test_weight stage1_cc3m.ckpt`, as the
    release's README writes it, on this repository's datasets/ (laid out as the release's): the FID
    real set is the three pictures of datasets/CC3M/val/."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    for name, value in (("CC3M_FOLDER", "datasets/CC3M"), ("DATAFOLDER", "datasets/CC3M"),
                        ("OUTPUT_FOLDER", str(tmp_path / "outputs"))):
        monkeypatch.setenv(name, value)
    save_predictions(tmp_path / "outputs" / "stage1_cc3m", cc3m_items(3))
    results = metric.main(["--test_weight", "stage1_cc3m.ckpt", "--tiny_extractors", "--device", "cpu"])
    report = (tmp_path / "outputs" / "stage1_cc3m" / "results.md").read_text()
    assert "| real images for FID | 3 |" in report and results["overall_fid_score"] is not None
    assert [p.resolve() for p in metric.cc3m_real_images()] == sorted((repo / "datasets" / "CC3M" / "val").glob("*.jpg"))


def test_cc3m_without_val_images_is_one_clear_error(tmp_path, tiny_clip_weights, monkeypatch):
    monkeypatch.setenv("CC3M_FOLDER", str(tmp_path / "nowhere"))
    folder = save_predictions(tmp_path / "preds", cc3m_items(2))
    with pytest.raises(SystemExit) as error:
        metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", *common_args(tmp_path, tiny_clip_weights)],
                    models=metric.Models(inception=TinyInception()))
    message = str(error.value.code)
    assert "nowhere/val" in message and "CC3M_FOLDER" in message and "--fid_real ground_truth" in message


# ----------------------------------------------------------------------------------------------
# text metrics


def test_clean_text():
    assert metric.clean_text(f"Hello there! {VOKENS} ###") == "Hello there!"
    assert metric.clean_text(f"{VOKENS} ###") == ""
    assert metric.clean_text("! ? ...") == ""
    assert metric.clean_text("fine thanks ###</s>") == "fine thanks"


PAIRS = (("the cat sat on the mat", "the cat sat on a mat"), ("Hello, how are you today?", "hello how are you"),
         ("a b c d", "d c b a"), ("The dog ran fast. The cat sat down.", "the cat sat down. the dog ran fast"))


@pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts")
def test_bleu_is_the_releases_character_bleu_by_default():
    ref, hyp = PAIRS[0]
    for r, h in PAIRS:  # the release's call: raw strings, so NLTK counts characters
        assert metric.bleu_1_2(r, h) == pytest.approx(tuple(nltk_bleu([r], h, [(1.0,), (0.5, 0.5)])))
    # word level behind --bleu_unit word; by hand: unigram precision 5/6, bigram 3/5, no brevity penalty
    assert metric.bleu_1_2(ref, hyp, unit="word") == pytest.approx((5 / 6, (5 / 6 * 3 / 5) ** 0.5))
    assert metric.bleu_1_2(ref, "the cat", unit="word") == pytest.approx((np.exp(1 - 6 / 2), np.exp(1 - 6 / 2)))
    for r, h in PAIRS[:3]:
        expected = sentence_bleu([r.lower().replace(",", " ,").replace("?", " ?").split()],
                                 h.lower().replace(",", " ,").split(), weights=[(1.0,), (0.5, 0.5)])
        assert metric.bleu_1_2(r, h, unit="word") == pytest.approx(tuple(expected))
    assert metric.bleu_1_2(ref, hyp) != pytest.approx(metric.bleu_1_2(ref, hyp, unit="word"))
    assert metric.bleu_1_2(ref, "") == (0.0, 0.0)
    assert metric.bleu_1_2("", hyp) == (0.0, 0.0)


def test_rouge_l_is_the_rouge_package_by_default():
    for r, h in PAIRS:  # the release: Rouge().get_scores(prediction, reference)[0]["rouge-l"]["f"]
        assert metric.rouge_l(r, h) == pytest.approx(Rouge().get_scores(h, r)[0]["rouge-l"]["f"])
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        assert metric.rouge_l(r, h, "rouge-score") == pytest.approx(scorer.score(r, h)["rougeL"].fmeasure)
    assert metric.rouge_l(*PAIRS[0], "rouge-score") == pytest.approx(5 / 6)  # LCS "the cat sat on mat"
    # the package keeps case and splits sentences, rouge-score does neither: they differ here
    assert metric.rouge_l(*PAIRS[1]) != pytest.approx(metric.rouge_l(*PAIRS[1], "rouge-score"))
    assert metric.rouge_l(*PAIRS[3]) != pytest.approx(metric.rouge_l(*PAIRS[3], "rouge-score"))
    assert metric.rouge_l("...", "a b") == 0.0 and metric.rouge_l("a", "") == 0.0


@pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts")
def test_mmdialog_text_scores_use_the_releases_definitions_unless_flagged(models, tmp_path):
    items = [["ctx", f"{h} ###", f"{r} ###", None, None, torch.zeros(3, 32, 32), None, f"C{k}_1-mm"]
             for k, (r, h) in enumerate(PAIRS)]
    folder = save_predictions(tmp_path / "mm", items)
    release, _ = score(folder, "MMDialog", models)
    ours, _ = score(folder, "MMDialog", models, "--bleu_unit", "word", "--rouge", "rouge-score")
    for results, unit, package in ((release, "char", "rouge"), (ours, "word", "rouge-score")):
        bleu = [metric.bleu_1_2(r, h, unit) for r, h in PAIRS]
        assert results["overall_bleu_score_1"] == pytest.approx(np.mean([b[0] for b in bleu]))
        assert results["overall_bleu_score_2"] == pytest.approx(np.mean([b[1] for b in bleu]))
        rouge = [metric.rouge_l(r, h, package) for r, h in PAIRS]
        assert results["overall_rouge_l_score"] == pytest.approx(np.mean(rouge))
    assert release["overall_bleu_score_1"] != pytest.approx(ours["overall_bleu_score_1"])


def test_sentence_bert_scores_a_paraphrase_above_an_unrelated_pair(models):
    a, b, c = metric.sbert_features(["A man is playing a guitar.", "Someone plays the guitar.",
                                     "The stock market fell sharply today."], models)
    assert float(a @ b) > float(a @ c) + 0.3


def test_clip_f1_by_hand():
    # matched 0.5 and 0.7, one missing (gt only), one extra (prediction only), one empty slot
    slots = [(True, True, 0.5), (True, True, 0.7), (False, True, 0.0), (True, False, 0.0), (False, False, 0.0)]
    precision, recall = 1.2 / 3, 1.2 / 3
    assert metric.clip_f1(slots) == pytest.approx(2 * precision * recall / (precision + recall))
    slots = [(True, True, 0.6), (True, False, 0.0)]  # P = 0.3, R = 0.6
    assert metric.clip_f1(slots) == pytest.approx(2 * 0.3 * 0.6 / 0.9)
    assert metric.clip_f1([(True, False, 0.0), (False, True, 0.0)]) == 0.0
    assert metric.clip_f1([]) == 0.0


def test_mmdialog_per_conversation_averaging_by_hand(models, tmp_path):
    results, counts = score(save_predictions(tmp_path / "mm", mmdialog_items()), "MMDialog", models)
    # A: text slots 3 matched; images 1 matched, 1 missing, 1 extra -> S = 4, P = R = 4/5
    # B: text 1 matched, image 1 extra -> S = 1, P = 1/2, R = 1 -> F1 = 2/3
    # C: text 1 matched, 1 missing -> P = 1, R = 1/2 -> F1 = 2/3;  D: nothing matched -> 0
    assert results["overall_clip_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3 + 0) / 4, abs=1e-5)
    # identical texts score 1, the empty prediction 0: A 1, B 1, C 1/2 (D has no ground-truth text)
    for key in ("overall_bleu_score_1", "overall_bleu_score_2", "overall_rouge_l_score", "overall_sbert_score"):
        assert results[key] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-5), key
    assert results["overall_clip_t_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert results["overall_clip_i_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert results["overall_instance_inception_score"] >= 1.0
    assert counts["conversations"] == 4 and counts["conversations with ground-truth text"] == 3
    assert counts["turns with ground-truth image only"] == 2 and counts["turns with predicted image only"] == 2


# ----------------------------------------------------------------------------------------------
# command line end to end


RELEASE_KEYS = {
    "CC3M": {"overall_clip_similarity", "overall_clip_t_similarity", "overall_basline_clip_similarity",
             "overall_basline_clip_t_similarity", "overall_inception_score", "overall_basline_inception_score",
             "overall_fid_score", "overall_basline_fid_score"},
    "VIST": {"overall_clip_similarity", "overall_clip_t_similarity", "overall_basline_clip_similarity",
             "overall_basline_clip_t_similarity", "overall_fid_score", "overall_basline_fid_score",
             "overall_instance_inception_score", "overall_instance_basline_inception_score",
             "overall_instance_fid_score", "overall_instance_basline_fid_score"},
    "MMDialog": {"overall_bleu_score_1", "overall_bleu_score_2", "overall_rouge_l_score", "overall_sbert_score",
                 "overall_clip_f1", "overall_instance_inception_score"},
}


@pytest.mark.parametrize("dataset,items", [("CC3M", cc3m_items), ("VIST", vist_items), ("MMDialog", mmdialog_items)])
def test_cli_scores_a_prediction_folder(dataset, items, tmp_path, tiny_clip_weights, monkeypatch):
    # environment set after import: main() must read it when it runs
    monkeypatch.setenv("OUTPUT_FOLDER", str(tmp_path / "outputs"))
    monkeypatch.setenv("OUTPUT_SUFFIX", "_eval")
    monkeypatch.setenv("DATAFOLDER", str(tmp_path / "datasets" / dataset))
    folder = save_predictions(tmp_path / "outputs" / "stage2_test_eval", items())
    results = metric.main(["--test_weight", "stage2_test.ckpt", "--batch_size", "3",
                           *common_args(tmp_path, tiny_clip_weights)],
                          models=metric.Models(inception=TinyInception()))
    written = json.loads((folder / "results_dict.json").read_text())
    assert RELEASE_KEYS[dataset] <= set(written)
    assert written == pytest.approx(results)
    report = (folder / "results.md").read_text()
    assert all(key in report for key in RELEASE_KEYS[dataset])
    if dataset == "CC3M":
        assert all(value is not None for value in written.values())
        assert (tmp_path / "outputs" / "fid_cache").is_dir() is False  # --fid_cache_dir was used
        assert list((tmp_path / "cache").glob("fid_real_*.pt"))


def test_cli_real_images_folder(tmp_path, tiny_clip_weights, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    for i, image in enumerate(random_images(5, 15, size=40)):
        image.save(real / f"{i}.png")
    folder = save_predictions(tmp_path / "preds", cc3m_items())
    results = metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", "--real_images", str(real),
                           *common_args(tmp_path, tiny_clip_weights)], models=metric.Models(inception=TinyInception()))
    real_features, _ = metric.inception_outputs(sorted(real.glob("*.png")), metric.Models(inception=TinyInception()), 256)
    fake_features, _ = metric.inception_outputs([it[3] for it in cc3m_items()], metric.Models(inception=TinyInception()), 256)
    assert results["overall_fid_score"] == pytest.approx(metric.frechet_distance(real_features, fake_features), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# missing weights


def test_missing_clip_weights_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = save_predictions(tmp_path / "preds", cc3m_items(2))
    with pytest.raises(SystemExit) as error:
        metric.main(["--pred_folder", str(folder), "--dataset", "MMDialog", "--clip_cache_dir", str(tmp_path / "hub")],
                    models=metric.Models(inception=TinyInception()))
    message = str(error.value.code)
    assert "ViT-B-32" in message and "--clip_weights" in message and "timm/vit_base_patch32_clip_224.openai" in message
    with pytest.raises(metric.MissingWeightError, match="--clip_weights"):
        extractors.load_clip("ViT-L-14", "openai", str(tmp_path / "missing.bin"))


def test_missing_inception_and_sbert_weights_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # treated as "no network": never downloads in tests
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    try:
        with pytest.raises(metric.MissingWeightError, match="--inception_weights") as error:
            extractors.load_inception()
        assert "weights-inception-2015-12-05-6726825d.pth" in str(error.value)
    finally:
        torch.hub.set_dir(hub_dir)
    with pytest.raises(metric.MissingWeightError, match="--inception_weights"):
        extractors.load_inception(str(tmp_path / "nope.pth"))
    with pytest.raises(metric.MissingWeightError, match="--sbert_model"):
        extractors.load_sbert(str(tmp_path / "no-sbert"))


def _inception_state_dict() -> dict[str, torch.Tensor]:
    """A state dict of the FID Inception's names and shapes (values 0.01), without any weight file:
    the network is built on the meta device with its weight loading stubbed."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    shapes = {}
    with torch.device("meta"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(torch.nn.Module, "load_state_dict",
                      lambda self, sd, *a, **k: shapes.update({n: t.shape for n, t in self.state_dict().items()}))
        NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=None)
    return {name: torch.full(shape, 0.01) for name, shape in shapes.items()}


def test_inception_and_clip_weights_go_through_the_loading_rule(tmp_path, tiny_clip_weights, monkeypatch):
    """A crafted `--inception_weights`, torch hub's cached Inception file and a crafted `--clip_weights`
    are refused without running anything (torch-fidelity read them with weights_only=False); a real
    Inception state dict is read by our rule and ends up in the network."""
    from conftest import PlantsAMarker

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "x": PlantsAMarker(marker)}, evil)
    with pytest.raises(metric.CheckpointError, match=rf"refused to load {re.escape(str(evil))}.*exec"):
        extractors.load_inception(str(evil))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    cached = tmp_path / "hub" / "checkpoints" / Path(URL_INCEPTION_V3).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(evil.read_bytes())
    with pytest.raises(metric.CheckpointError, match=rf"refused to load {re.escape(str(cached))}"):
        extractors.load_inception()
    folder = save_predictions(tmp_path / "preds", cc3m_items(2))
    with pytest.raises(SystemExit, match=rf"^error: refused to load {re.escape(str(evil))}"):
        metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", "--fid_real", "ground_truth",
                     *common_args(tmp_path, tiny_clip_weights), "--inception_weights", str(evil)])
    with pytest.raises(SystemExit, match=rf"^error: refused to load {re.escape(str(evil))}"):
        metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", "--fid_real", "ground_truth",
                     *common_args(tmp_path, tiny_clip_weights)[2:], "--clip_model", TINY_CLIP,
                     "--clip_weights", str(evil)], models=metric.Models(inception=TinyInception()))
    assert not marker.exists()

    state = _inception_state_dict()
    torch.save(state, tmp_path / "inception.pth")
    net = extractors.load_inception(str(tmp_path / "inception.pth"))
    assert set(net.net.state_dict()) == set(state)
    assert float(net.net.fc.weight[0, 0]) == pytest.approx(0.01) and float(net.net.Mixed_7c.branch1x1.conv.weight.max()) \
        == pytest.approx(0.01)


def test_missing_predictions_give_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no predictions"):
        metric.main(["--pred_folder", str(tmp_path / "empty"), "--dataset", "CC3M"])


# ----------------------------------------------------------------------------------------------
# prediction files: the release's layout both ways, read without running code


class PlantsAMarker:
    """Unpickling this runs `exec`, which writes a marker file (what a malicious file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_prediction_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    items = cc3m_items(2)
    items[0][6] = PlantsAMarker(marker)
    folder = save_predictions(tmp_path / "evil", items)
    with pytest.raises(SystemExit) as error:
        metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", "--device", "cpu"],
                    models=metric.Models(inception=TinyInception()))
    message = str(error.value.code)
    assert "refused" in message and str(folder / "predictions-0.pt") in message and "exec" in message
    assert "\n" not in message and not marker.exists()


def test_a_pickled_image_with_a_bad_state_is_refused_before_allocating(tmp_path, monkeypatch):
    image = Image.new("RGB", (2, 2))
    with monkeypatch.context() as patch:   # pickled as a 100000 x 100000 image with 1 byte of pixels
        patch.setattr(Image.Image, "__getstate__", lambda self: [{}, "RGB", (100_000, 100_000), None, b"x"])
        torch.save([["a", "b", "c", image, None, None, None, "t_0"]], tmp_path / "predictions-0.pt")
    with pytest.raises(ValueError, match="predictions-0.pt.*100000 x 100000 pixels, more than max_image_pixels"):
        predictions.load(tmp_path / "predictions-0.pt")


def test_pictures_referenced_many_times_are_refused_before_they_are_built(tmp_path, monkeypatch):
    """A small file that refers to one picture (or its pixel bytes) many times would be multiplied in
    memory when read; the references are counted in the pickle before anything is built."""
    built = []
    real_setstate = predictions._CheckedImage.__setstate__
    monkeypatch.setattr(predictions._CheckedImage, "__setstate__",
                        lambda self, state: built.append(1) or real_setstate(self, state))
    picture = random_images(1, 30, size=40)[0]                     # 4.8 kB of pixels
    ours = predictions.save([predictions.PredictionRecord("a", "b", "c", random_images(1, i, size=40)[0], None,
                                                          as_target(picture), f"t_{i}") for i in range(4)],
                            tmp_path / "ours.pt")
    assert predictions.file_references(ours)[0] == 0   # what the writers make
    assert len(predictions.load(ours)) == 4 and len(built) == 4

    built.clear()
    same_object = [["a", "b", "c", picture, None, None, None, f"t_{i}"] for i in range(50)]
    torch.save(same_object, tmp_path / "same.pt")
    with monkeypatch.context() as patch:                        # 50 pictures rebuilt from one pixel buffer
        pixels = picture.tobytes()
        patch.setattr(Image.Image, "__getstate__", lambda self: [{}, "RGB", (40, 40), None, pixels])
        torch.save([["a", "b", "c", Image.new("RGB", (1, 1)), None, None, None, f"t_{i}"] for i in range(50)],
                   tmp_path / "same_pixels.pt")
    for name in ("same.pt", "same_pixels.pt"):
        with pytest.raises(metric.CheckpointError, match=rf"{name}: the file refers 49 time\(s\) to pictures or "
                                                         rf"data it already holds .*max_shared_references \(0"):
            predictions.load(tmp_path / name)
    assert built == []                                          # refused before a single picture was built
    limits = tmp_path / "limits.yaml"
    limits.write_text("max_shared_references: 49\n")
    monkeypatch.setenv("MINIGPT5_LIMITS", str(limits))
    assert len(predictions.load(tmp_path / "same.pt")) == len(predictions.load(tmp_path / "same_pixels.pt")) == 50
    monkeypatch.delenv("MINIGPT5_LIMITS")

    target = as_target(picture)                                 # one target tensor in every record
    torch.save([["a", "b", "c", None, None, target, None, f"t_{i}"] for i in range(3)], tmp_path / "tensor.pt")
    torch.save([["a", "b", "c", None, None, torch.ones(3, 1, 1).expand(3, 4000, 4000), None, "t_0"]],
               tmp_path / "strided.pt")
    for name in ("tensor.pt", "strided.pt"):
        with pytest.raises(metric.CheckpointError, match=rf"{name}: \d+ picture / tensor slot\(s\) reuse"):
            predictions.load(tmp_path / name)


def _max_pixel_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_prediction_files_are_the_releases_layout_both_ways(tmp_path):
    target, generated = random_images(1, 20, size=24)[0], random_images(1, 21, size=24)[0]
    item = {"source": "a red square", "text": f"{VOKENS} ###", "target": f"{VOKENS} ###", "image": generated,
            "baseline": None, "task_name": "cc3m_0", "input_images": [],
            "expected_image": pil_to_tensor(target).float() / 127.5 - 1}   # as the dataset gives it: [-1, 1]
    record = predictions.PredictionRecord.from_item(item)
    assert predictions.PredictionRecord.from_release_list(record.to_release_list()) == record
    path = predictions.save([record], tmp_path / "ours" / "predictions-0.pt")
    # what the release's metric.py does with our file: torch.load (its torch read pickles), ToPILImage
    entry = torch.load(path, weights_only=False)[0]
    assert len(entry) == 8 and entry[:3] == ["a red square", f"{VOKENS} ###", f"{VOKENS} ###"]
    assert type(entry[3]) is Image.Image and entry[4] is None and entry[6] is None and entry[7] == "cc3m_0"
    assert 0 <= float(entry[5].min()) and float(entry[5].max()) <= 1
    assert _max_pixel_difference(ToPILImage()(entry[5]), target) <= 1
    # a file the release wrote (PIL images, ToTensor ground truth in [0, 1]) reads back here weights-only
    from torchvision.transforms import ToTensor

    torch.save([["src", "pred ###", "gt ###", generated, target, ToTensor()(target), None, "12_3-gen"]],
               tmp_path / "release.pt")
    loaded = predictions.load(tmp_path / "release.pt")[0]
    assert type(loaded.predicted_image) is Image.Image and type(loaded.sd_baseline_image) is Image.Image
    assert _max_pixel_difference(loaded.predicted_image, generated) == 0
    assert _max_pixel_difference(loaded.sd_baseline_image, target) == 0
    torch.testing.assert_close(loaded.expected_image, ToTensor()(target))
    assert (loaded.input_text, loaded.predicted_text, loaded.expected_text, loaded.task_name) == (
        "src", "pred ###", "gt ###", "12_3-gen")
    samples = metric.load_predictions(tmp_path / "ours")
    assert _max_pixel_difference(samples[0].gt_image, target) <= 1


def test_tiny_extractors_are_named_as_such_in_the_report(tmp_path, monkeypatch):
    folder = save_predictions(tmp_path / "preds", cc3m_items(3))
    metric.main(["--pred_folder", str(folder), "--dataset", "CC3M", "--tiny_extractors", "--device", "cpu",
                 "--fid_cache_dir", str(tmp_path / "cache")])
    report = (folder / "results.md").read_text()
    assert "random weights (--tiny_extractors)" in report and "ViT-L-14" not in report and "openai" not in report


def test_every_choice_between_the_release_and_ours_is_documented():
    """docs/reproducing.md shows each metric flag that selects our definition instead of the release's."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "reproducing.md").read_text()
    defaults = metric.parse_args(["--pred_folder", "x"])
    for flag, ours in (("--bleu_unit", "word"), ("--rouge", "rouge-score"), ("--fid_real", "ground_truth"),
                       ("--clip_t_text", "caption"), ("--image_rows", "all")):
        assert f"`{flag} {ours}`" in page, flag
        assert getattr(defaults, flag[2:]) != ours
    for figure in ("29.1", "19.5", "12.1", "20.2", "overall_bleu_score_1", "overall_rouge_l_score",
                   "metric.py --test_weight stage2_mmdialog.ckpt"):
        assert figure in page, figure
