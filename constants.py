"""Names shared by every part of the project, and the release's environment interface.

Environment variables are read by functions, when a command starts, never frozen at import time:
tests and launchers may set them after this module was imported.
"""
from __future__ import annotations

import os
from pathlib import Path

# The eight generative vokens, and the placeholder that marks where an input image goes.
VOKEN_COUNT = 8
VOKENS = [f"[IMG{i}]" for i in range(VOKEN_COUNT)]
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_SLOT = "<Img><ImageHere></Img>"
ALL_VOKENS_TEXT = "".join(VOKENS)
# Text that tokenizes to vokens or image slots: data and user text must not contain it, or the
# number of images would no longer match the number of <ImageHere> tokens.
RESERVED_TOKENS = tuple(VOKENS) + (IMAGE_PLACEHOLDER,)

# Loss weights and training constants the release used (docs/architecture.md, "The losses").
TEXT_LOSS_WEIGHT = 0.01
IMAGE_LOSS_WEIGHT = 1.0
CAPTION_LOSS_WEIGHT = 0.1
CFG_DROPOUT_PROB = 0.1
SNR_GAMMA = 5.0
SEED = 42

# The one spelling rule for yes/no values (IS_STAGE2, --is_training, --snr_loss), any case: anything
# else is an error naming the variable or flag, never a silent False ("ture" once trained stage 1).
TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")
BOOLEAN_SPELLINGS = "True/False, yes/no or 1/0 (any case)"


def parse_bool(value: str | bool, name: str) -> bool:
    """`value` by the one spelling rule; ValueError naming `name` (a variable or flag) otherwise."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name}={value!r}: expected {BOOLEAN_SPELLINGS}")


def is_stage2() -> bool:
    """`IS_STAGE2`: "True" selects stage 2, "False" (or unset, or empty) stage 1, as the release read it;
    also yes/no, 1/0, any case. Any other value raises ValueError naming the variable."""
    value = os.environ.get("IS_STAGE2", "")
    return False if value.strip() == "" else parse_bool(value, "IS_STAGE2")


def weight_folder() -> Path:
    """`WEIGHTFOLDER`: where checkpoints are written and `--stage1_weight`/`--test_weight` are found."""
    return Path(os.environ.get("WEIGHTFOLDER", "weights"))


def data_folder() -> Path:
    """`DATAFOLDER`: the dataset folder (relative data paths are under it); its name selects the
    dataset (`dataset_specs.resolve_dataset_type`)."""
    return Path(os.environ.get("DATAFOLDER", "datasets/CC3M"))


def search_places(path: str | os.PathLike, folder: Path) -> list[Path]:
    """Where a path given to a flag is looked for, in order: under `folder` (DATAFOLDER for data,
    WEIGHTFOLDER for checkpoints: the release joined every such path to its folder), then as given
    (relative to the working directory). An absolute path is only itself."""
    path = Path(path)
    return [path] if path.is_absolute() else [folder / path, path]


def find_path(path: str | os.PathLike, folder: Path, variable: str, what: str, exists=Path.exists) -> Path:
    """The first of `search_places(path, folder)` that `exists`; FileNotFoundError naming `what`
    (e.g. the flag), the places looked at and the folder variable otherwise."""
    places = search_places(path, folder)
    for place in places:
        if exists(place):
            return place
    looked = " and ".join(repr(str(p)) for p in dict.fromkeys(places))
    raise FileNotFoundError(f"{what} {str(path)!r} not found: looked at {looked} ({variable}={str(folder)!r})")


def find_data(path: str | os.PathLike, what: str = "data file") -> Path:
    """A dataset file given as the release's `--*_data_path` flags take it (see `find_path`)."""
    return find_path(path, data_folder(), "DATAFOLDER", what)


def find_weight(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """A checkpoint given as the release's `--stage1_weight` / `--test_weight` take it (see `find_path`)."""
    return find_path(path, weight_folder(), "WEIGHTFOLDER", what, Path.is_file)


def output_folder() -> Path:
    """`OUTPUT_FOLDER`: where predictions go (default `outputs`)."""
    return Path(os.environ.get("OUTPUT_FOLDER", "outputs"))


def output_suffix() -> str:
    """`OUTPUT_SUFFIX`: appended to the prediction folder name."""
    return os.environ.get("OUTPUT_SUFFIX", "")


def prediction_folder(test_weight: str | os.PathLike, output: str | os.PathLike | None = None,
                      suffix: str | None = None) -> Path:
    """Where the predictions of `--test_weight` go (train_eval.py) and are read from (metric.py, the
    toy world's build): `OUTPUT_FOLDER/<test_weight as given, without its extension><OUTPUT_SUFFIX>`
    (`output` and `suffix`, when given, stand for the two variables of a run started elsewhere).

    A relative path keeps its folders, as the release did (`runs/a/x.ckpt` -> `OUTPUT_FOLDER/runs/a/x`);
    an absolute path, or one that climbs out with `..`, keeps only its file name (`/tmp/x.ckpt` ->
    `OUTPUT_FOLDER/x`), so that predictions always land inside `OUTPUT_FOLDER`."""
    path = Path(test_weight)
    if path.is_absolute() or ".." in path.parts:
        path = Path(path.name)
    output = output_folder() if output is None else Path(output)
    return output / (str(path.with_suffix("")) + (output_suffix() if suffix is None else suffix))


def cc3m_folder() -> Path:
    """`CC3M_FOLDER`: the CC3M folder whose `val/` images are metric.py's FID real set (default
    `datasets/CC3M`, as the release)."""
    return Path(os.environ.get("CC3M_FOLDER") or "datasets/CC3M")


def preprocess_feature_folder() -> Path | None:
    """`PREPROCESS_FEATURE_FOLDER`: cached VAE moments / image embeddings, if set."""
    value = os.environ.get("PREPROCESS_FEATURE_FOLDER")
    return Path(value) if value else None
