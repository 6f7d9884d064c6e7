"""Golden outputs of the release pairing (Vicuna-v0-style LLaMA + SD 2.1-style decoder + CC3M / VIST /
MMDialog) on the tiny preset: the samples the three datasets give, the losses of a stage-1 and a stage-2
batch, the checkpoint layout, a generation (tokens and picture) and the metrics of fixed prediction
folders. Refactors and new backbone families or data formats must leave every number here unchanged.

The expected values live in `tests/data/golden/release_pairing.json`. When a change is *meant* to move
them (say why in the commit), rewrite the file with `GOLDEN_UPDATE=1 python -m pytest tests/test_golden.py`
and review its diff. Numbers are compared to a tolerance far below any real change (floats of a CPU
run can differ in the last bits between machines); token ids, texts and key layouts exactly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, build, fixed_draws

pytestmark = pytest.mark.usefixtures("no_data_env")

GOLDEN_FILE = REPO / "tests" / "data" / "golden" / "release_pairing.json"
UPDATE = os.environ.get("GOLDEN_UPDATE") == "1"
DATASETS = REPO / "datasets"
DATA_FILES = {
    "CC3M": {"train": DATASETS / "CC3M" / "cc3m_train.tsv", "test": DATASETS / "CC3M" / "cc3m_val.tsv"},
    "VIST": {"train": DATASETS / "VIST" / "train_cleaned.json", "test": DATASETS / "VIST" / "val_cleaned.json"},
    "MMDialog": {"train": DATASETS / "MMDialog" / "train" / "train_conversations.txt",
                 "test": DATASETS / "MMDialog" / "test" / "test_conversations.txt"},
}
MAX_ITEMS = 12          # per dataset and split: the sample files are small; this bounds the cost
REL = 1e-5              # floats: relative tolerance
ABS = 1e-6              # floats: absolute tolerance (values near zero)


def _stats(tensor: torch.Tensor | None) -> list[float] | None:
    """A tensor summarised by numbers any change of its values moves: shape-free mean, std, and the
    mean of its product with a fixed pseudo-random pattern."""
    if tensor is None:
        return None
    flat = tensor.detach().double().flatten()
    pattern = torch.from_numpy(np.random.default_rng(0).standard_normal(flat.numel()))
    return [float(flat.mean()), float(flat.std()) if flat.numel() > 1 else 0.0, float((flat * pattern).mean())]


def _compare(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            _compare(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for k, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{where}[{k}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert got == pytest.approx(want, rel=REL, abs=ABS), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.fixture(scope="module")
def golden():
    """The stored golden values; with GOLDEN_UPDATE=1, a dict the tests fill and that is written at the end."""
    if UPDATE:
        stored = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.is_file() else {}
        yield stored
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_FILE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    if not GOLDEN_FILE.is_file():
        pytest.fail(f"{GOLDEN_FILE} is missing: write it with GOLDEN_UPDATE=1 python -m pytest tests/test_golden.py")
    yield json.loads(GOLDEN_FILE.read_text())


def check(golden: dict, name: str, value) -> None:
    """Compare `value` (JSON-able) with the golden entry `name`, or record it under GOLDEN_UPDATE=1."""
    value = json.loads(json.dumps(value))
    if UPDATE:
        golden[name] = value
        return
    assert name in golden, f"no golden entry {name!r}: rerun with GOLDEN_UPDATE=1 and review the diff"
    _compare(value, golden[name], name)


def _items(dataset) -> list[dict]:
    out = []
    for index in range(min(len(dataset), MAX_ITEMS)):
        item = dataset[index]
        assert item is not None, f"{dataset.data_file}: sample {index} was dropped"
        out.append({
            "task_name": item["task_name"], "source": item["source"], "target": item["target"],
            "caption": item["caption"], "input_ids": item["input_ids"].tolist(), "labels": item["labels"].tolist(),
            "input_images": [Path(p).name for p in item["input_image_paths"]],
            "output_image": Path(item["output_image_path"]).name if item["output_image_path"] else None,
            "input_pixels": [_stats(image) for image in item["input_images"]],
            "output_pixels": _stats(item["output_image"]) if item["has_output_image"] else None,
        })
    return out


@pytest.mark.parametrize("dataset", sorted(DATA_FILES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_the_release_datasets_give_the_same_samples(dataset, split, golden, tiny_config, tiny_tokenizer):
    from dataloader import make_dataset

    data = make_dataset(DATA_FILES[dataset][split], tiny_tokenizer, tiny_config, is_training=split == "train",
                        feature_folder=False)
    check(golden, f"samples/{dataset}/{split}", {"count": len(data), "items": _items(data)})


def _batch(model, dataset: str, split: str, count: int, seed: int = 0) -> dict:
    from dataloader import Collator, make_dataset

    data = make_dataset(DATA_FILES[dataset][split], model.model.llama_tokenizer, model.cfg,
                        is_training=split == "train", feature_folder=False)
    batch = Collator(model.model.llama_tokenizer)([data[i] for i in range(min(count, len(data)))])
    n = batch["input_ids"].shape[0]
    latent = (4, model.unet.config.sample_size, model.unet.config.sample_size)
    batch.update(fixed_draws(n, latent, seed))
    return batch


@pytest.fixture(scope="module")
def stage1(tiny_config):
    return build(tiny_config, stage=1, seed=0).eval()


@pytest.fixture(scope="module")
def stage2(tiny_config):
    return build(tiny_config, stage=2, seed=0).eval()


@pytest.mark.parametrize("stage,dataset", [(1, "CC3M"), (2, "VIST"), (2, "MMDialog")])
def test_the_losses_of_a_batch_are_the_same(stage, dataset, golden, stage1, stage2):
    model = stage1 if stage == 1 else stage2
    batch = _batch(model, dataset, "train", 4)
    with torch.no_grad():
        losses = model(batch)
    check(golden, f"losses/stage{stage}/{dataset}", {name: float(value) for name, value in sorted(losses.items())})


@pytest.mark.parametrize("stage", [1, 2])
def test_the_checkpoint_layout_is_the_same(stage, golden, stage1, stage2):
    model = stage1 if stage == 1 else stage2
    state = model.trainable_state_dict()
    layout = {key: [list(tensor.shape), str(tensor.dtype)] for key, tensor in sorted(state.items())}
    check(golden, f"checkpoint/stage{stage}",
          {"state_dict": layout, "hyper_parameters": sorted(model.hparams), "settings": sorted(model.hparams["settings"])})


def test_a_generation_is_the_same(golden, stage1, stage2):
    from PIL import Image

    story = Image.open(REPO / "examples" / "story_1.jpg")
    prompts = ["###Human: a red ball on the beach ###Assistant:",
               "###Human: <Img><ImageHere></Img> What happens next? ###Assistant:"]
    result = {}
    for name, model in (("stage1", stage1), ("stage2", stage2)):
        outs = model.generate(prompts, [[], [story]], seed=[3, 4], max_new_tokens=12, force_generation=True,
                              num_inference_steps=3)
        result[name] = [{"tokens": out.token_ids, "text": out.text,
                         "picture": _stats(torch.from_numpy(np.asarray(out.image, dtype=np.float64)))
                         if out.image is not None else None} for out in outs]
    check(golden, "generation", result)


def _prediction_folder(tmp_path: Path, dataset: str) -> Path:
    """Fixed prediction items in the release's layout (pictures from a seeded generator)."""
    from PIL import Image

    rng = np.random.default_rng({"CC3M": 1, "VIST": 2, "MMDialog": 3}[dataset])
    vokens = "".join(f"[IMG{i}]" for i in range(8))

    def picture(size=32):
        return Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))

    def target():
        return torch.from_numpy(rng.random((3, 32, 32))).float()

    items = []
    if dataset == "CC3M":
        items = [[f"caption {i}", vokens + " ###", f"a photo of thing {i}", picture(), picture(40), target(), None,
                  f"cc3m_{i}"] for i in range(6)]
    elif dataset == "VIST":
        for story, steps in (("10", 3), ("20", 1), ("30", 2)):
            for step in range(steps):
                items.append([f"###Human: step {step} ###Assistant:", vokens + " ###", vokens + " ###", picture(40),
                              picture(), target(), None, f"{story}_{step}-gen"])
    else:
        texts = [("hello there", "hello there friend", True, True), ("a dog", "a cat", False, True),
                 ("see you", "bye", True, False), ("ok", "", False, False)]
        for conv in range(3):
            for turn, (pred, gt, pred_pic, gt_pic) in enumerate(texts):
                items.append(["ctx", pred + (vokens if pred_pic else "") + " ###", gt + (vokens if gt_pic else "") + " ###",
                              picture() if pred_pic else None, None, target() if gt_pic else None, None,
                              f"{conv}_{turn}-mm"])
    folder = tmp_path / dataset
    folder.mkdir()
    torch.save(items, folder / "predictions-0.pt")
    return folder


@pytest.mark.parametrize("dataset", ["CC3M", "VIST", "MMDialog"])
def test_the_metrics_of_fixed_predictions_are_the_same(dataset, golden, tmp_path):
    import metric

    folder = _prediction_folder(tmp_path, dataset)
    args = ["--pred_folder", str(folder), "--dataset", dataset, "--device", "cpu", "--tiny_extractors",
            "--fid_cache_dir", str(tmp_path / "cache")]
    if dataset == "CC3M":
        args += ["--fid_real", "ground_truth"]
    results = metric.main(args)
    check(golden, f"metrics/{dataset}", results)
