"""metric.py: FID / IS / CLIP sanity, text metrics against NLTK and rouge-score, CLIP-F1 and the
per-conversation averaging by hand, VIST story-level FID, batched == one at a time, the fixed-feature
cache, the CLI end to end on hand-built prediction folders of all three datasets, and the clear error
for a missing weight.

The real CLIP and Inception weights are not available offline, so the tests build a tiny OpenCLIP
model from a config registered here (saved and loaded through `--clip_weights`, the real loading
path) and inject a tiny Inception stand-in. Sentence-BERT is the real packaged all-MiniLM-L6-v2.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from nltk.translate.bleu_score import sentence_bleu
from PIL import Image
from rouge_score import rouge_scorer
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.transforms.functional import pil_to_tensor

import metric

VOKENS = "".join(f"[IMG{i}]" for i in range(8))
TINY_CLIP = "tiny-test-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# The tiny random Inception stand-in that `metric.py --tiny_extractors` uses (uint8 images -> 16
# features, 10 logits).
TinyInception = metric.TinyInception


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
    return metric.load_sbert()


@pytest.fixture(scope="module")
def models(tiny_clip_weights, sbert) -> metric.Models:
    clip, preprocess, tokenizer = metric.load_clip(TINY_CLIP, "openai", str(tiny_clip_weights))
    return metric.Models(clip, preprocess, tokenizer, TinyInception().eval(), sbert)


def random_images(count: int, seed: int, size: int = 32, shift: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, (count, size, size, 3)) + shift
    return [Image.fromarray(p.clip(0, 255).astype(np.uint8)) for p in pixels]


def as_target(image: Image.Image) -> torch.Tensor:
    """An expected image as the predictions store it: C x H x W in [-1, 1]."""
    return pil_to_tensor(image).float() / 127.5 - 1


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
        ["ctx", "hello there friend ###", "hello there friend ###", None, None, as_target(images[0]), None, "A_1-mm"],
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
    return metric.SCORERS[dataset](samples, models, args)


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
    reference = FrechetInceptionDistance(feature=metric._Precomputed(32))
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
    # CLIP-T falls back to the scene description in the prompt (the target text is only vokens)
    assert results["overall_clip_t_similarity"] is not None


# ----------------------------------------------------------------------------------------------
# text metrics


def test_clean_text():
    assert metric.clean_text(f"Hello there! {VOKENS} ###") == "Hello there!"
    assert metric.clean_text(f"{VOKENS} ###") == ""
    assert metric.clean_text("! ? ...") == ""
    assert metric.clean_text("fine thanks ###</s>") == "fine thanks"


@pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts")
def test_bleu_and_rouge_equal_reference_values():
    ref, hyp = "the cat sat on the mat", "the cat sat on a mat"
    # by hand: unigram precision 5/6, bigram precision 3/5, same length (no brevity penalty)
    assert metric.bleu_1_2(ref, hyp) == pytest.approx((5 / 6, (5 / 6 * 3 / 5) ** 0.5))
    assert metric.bleu_1_2(ref, "the cat") == pytest.approx((np.exp(1 - 6 / 2), np.exp(1 - 6 / 2)))
    for r, h in ((ref, hyp), ("Hello, how are you today?", "hello how are you"), ("a b c d", "d c b a")):
        expected = sentence_bleu([r.lower().replace(",", " ,").replace("?", " ?").split()],
                                 h.lower().replace(",", " ,").split(), weights=[(1.0,), (0.5, 0.5)])
        assert metric.bleu_1_2(r, h) == pytest.approx(tuple(expected))
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        assert metric.rouge_l(r, h) == pytest.approx(scorer.score(r, h)["rougeL"].fmeasure)
    assert metric.rouge_l(ref, hyp) == pytest.approx(5 / 6)  # LCS "the cat sat on mat"
    assert metric.bleu_1_2(ref, "") == (0.0, 0.0)
    assert metric.bleu_1_2("", hyp) == (0.0, 0.0)
    assert metric.bleu_1_2(ref, hyp, unit="char") == pytest.approx(
        tuple(sentence_bleu([ref], hyp, weights=[(1.0,), (0.5, 0.5)])))  # the release: characters


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
        metric.load_clip("ViT-L-14", "openai", str(tmp_path / "missing.bin"))


def test_missing_inception_and_sbert_weights_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # treated as "no network": never downloads in tests
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    try:
        with pytest.raises(metric.MissingWeightError, match="--inception_weights") as error:
            metric.load_inception()
        assert "weights-inception-2015-12-05-6726825d.pth" in str(error.value)
    finally:
        torch.hub.set_dir(hub_dir)
    with pytest.raises(metric.MissingWeightError, match="--inception_weights"):
        metric.load_inception(str(tmp_path / "nope.pth"))
    with pytest.raises(metric.MissingWeightError, match="--sbert_model"):
        metric.load_sbert(str(tmp_path / "no-sbert"))


def test_missing_predictions_give_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no predictions"):
        metric.main(["--pred_folder", str(tmp_path / "empty"), "--dataset", "CC3M"])
