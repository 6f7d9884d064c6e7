"""Shared fixtures: the tiny preset is built once per test session into a temporary folder, through
the same `presets.build_tiny` a user runs, and loaded through the real loading code."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The release's own sample files (its CC3M / VIST / MMDialog examples, which we do not redistribute):
# a folder holding CC3M/, VIST/ and MMDialog/ as the release laid them out. The tests that read them
# (tests/test_dataloader.py, "reference files") skip when MINIGPT5_RELEASE_SAMPLES is not set.
RELEASE_SAMPLES = os.environ.get("MINIGPT5_RELEASE_SAMPLES")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch thread per test process (TEST_TORCH_THREADS to change it): the tiny models gain nothing from
# more, and on a CI machine shared with another heavy job two threads per process on two cores made the
# training tests several times slower (threads waiting for each other). Subprocesses get the same
# setting through OMP_NUM_THREADS.
TEST_TORCH_THREADS = int(os.environ.get("TEST_TORCH_THREADS", "1"))
torch.set_num_threads(TEST_TORCH_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_TORCH_THREADS))

# The test files that take most of the suite's time, longest first (seconds of one worker on a 2-core
# CI machine: about 350, 190, 75 and 65 of some 930). pytest-xdist (`--dist loadfile`) hands each
# worker whole files, two at a time, in collection order (pytest.ini turns off its own order, most
# tests first); collected first, these start at once on different workers and the short files fill in
# around them. In xdist's order the 4-test scripts file started late and ran alone for 110 s after the
# other worker had finished: 527 s in all, against 464 s in this order (the workers end 12 s apart).
LONGEST_FILES = ("test_toyworld.py", "test_scripts.py", "test_multinode.py", "test_train_eval.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (`LONGEST_FILES`); the others after them in pytest's order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    """Path of the tiny preset's config YAML (weights written once per session)."""
    from presets import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "weights", seed=0)


@pytest.fixture(scope="session")
def tiny_config(tiny_config_path):
    """The tiny preset's `ModelConfig`."""
    from configuration import load_config

    return load_config(tiny_config_path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_config):
    """The tiny LLaMA tokenizer with the vokens and <ImageHere> added."""
    from minigpt4 import load_tokenizer

    return load_tokenizer(tiny_config.llama_model)


@pytest.fixture(scope="session")
def decoder_config(tmp_path_factory, tiny_config):
    """Decoder family -> the `ModelConfig` of its tiny preset (config/tiny_<family>.yaml and _arch.yaml;
    sd: the tiny preset), each built once per session on first use."""
    from configuration import load_config
    from presets import build_tiny

    built = {"sd": tiny_config}

    def get(family: str):
        if family not in built:
            name = f"tiny_{family}"
            path = build_tiny(tmp_path_factory.mktemp(name) / "weights", seed=0, config_path=REPO / "config" / f"{name}.yaml",
                              arch_path=REPO / "config" / f"{name}_arch.yaml", config_name=f"{name}.yaml")
            built[family] = load_config(path)
        return built[family]

    return get


@pytest.fixture
def no_data_env(monkeypatch):
    """No DATAFOLDER / PREPROCESS_FEATURE_FOLDER from the caller's shell (modules that read datasets
    use it for every test: `pytestmark = pytest.mark.usefixtures("no_data_env")`)."""
    monkeypatch.delenv("DATAFOLDER", raising=False)
    monkeypatch.delenv("PREPROCESS_FEATURE_FOLDER", raising=False)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is built."""
    import model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the flags and paths were checked")

    monkeypatch.setattr(model.MiniGPT5_Model, "__init__", refuse)


@pytest.fixture(scope="session")
def release_samples() -> Path:
    """The folder of the release's sample files (`MINIGPT5_RELEASE_SAMPLES`); skips when not given."""
    if not RELEASE_SAMPLES or not Path(RELEASE_SAMPLES).is_dir():
        pytest.skip("MINIGPT5_RELEASE_SAMPLES (a folder of the release's CC3M / VIST / MMDialog samples) is not set")
    return Path(RELEASE_SAMPLES)


VOKEN_TARGET = "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7] ###"


def make_batch(tokenizer, samples: list[dict], image_size: int = 32, sd_image_size: int = 32,
               seed: int = 0) -> dict:
    """A model batch built by hand (independent of dataloader.py): each sample is a dict with
    `source`, `target`, optional `n_images` (input images) and `caption`. Labels are -100 over
    the source and over [IMG1]..[IMG6], as the release built them."""
    g = torch.Generator().manual_seed(seed)
    masked = set(tokenizer.convert_tokens_to_ids([f"[IMG{i}]" for i in range(1, 7)]))
    ids, labels = [], []
    for s in samples:
        src = tokenizer(s["source"], add_special_tokens=False).input_ids
        tgt = tokenizer(s["target"], add_special_tokens=False).input_ids
        ids.append(src + tgt)
        labels.append([-100] * len(src) + [-100 if t in masked else t for t in tgt])
    T = max(map(len, ids))
    pad = tokenizer.pad_token_id
    n_images = sum(s.get("n_images", 0) for s in samples)
    has_out = torch.tensor(["[IMG0]" in s["target"] for s in samples])
    return {
        "input_ids": torch.tensor([x + [pad] * (T - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (T - len(x)) for x in labels]),
        "input_images": torch.randn(n_images, 3, image_size, image_size, generator=g),
        "output_images": (torch.rand(len(samples), 3, sd_image_size, sd_image_size, generator=g) * 2 - 1)
        * has_out[:, None, None, None],
        "has_output_image": has_out,
        "captions": [s.get("caption") for s in samples],
    }


# Batches of the tests of model.py and its neighbours: captioned (CC3M-like) and story-like samples.
CC3M_LIKE = [
    {"source": "a red square on a white wall", "target": VOKEN_TARGET, "caption": "a red square on a white wall"},
    {"source": "a blue circle", "target": VOKEN_TARGET, "caption": "a blue circle"},
]
STORY_LIKE = [
    {"source": "###Human:<Img><ImageHere></Img> the scene description: a dog ###Assistant:",
     "target": VOKEN_TARGET, "n_images": 1},
    {"source": "###Human: a cat <Img><ImageHere></Img> then <Img><ImageHere></Img> What should happen then? "
               "###Assistant:", "target": "the cat sleeps [IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7] ###",
     "n_images": 2},
    {"source": "###Human: tell me about it ###Assistant:", "target": "it is a park ###"},
]


def build(cfg, stage=1, seed=0, **kwargs):
    """A `MiniGPT5_Model` of the tiny preset, its random parts drawn from `seed`."""
    from model import MiniGPT5_Model

    torch.manual_seed(seed)
    return MiniGPT5_Model(cfg, stage=stage, **kwargs)


def batch_for(model, samples, seed=0, drop=False):
    """`make_batch` for `model`'s sizes, with the random draws of the forward pass pinned."""
    cfg = model.cfg
    batch = make_batch(model.model.llama_tokenizer, samples, cfg.image_size, cfg.sd_image_size, seed)
    latent = (4, model.unet.config.sample_size, model.unet.config.sample_size)
    batch.update(fixed_draws(len(samples), latent, seed, drop))
    return batch


def fixed_draws(batch_size: int, latent_shape: tuple[int, ...], seed: int = 0, drop: bool = False) -> dict:
    """Per-sample noise, latent noise, timesteps and CFG draws that pin a forward pass's randomness."""
    g = torch.Generator().manual_seed(seed)
    return {
        "noise": torch.randn(batch_size, *latent_shape, generator=g),
        "latent_noise": torch.randn(batch_size, *latent_shape, generator=g),
        "timesteps": torch.randint(0, 1000, (batch_size,), generator=g),
        "cfg_drop": torch.full((batch_size,), drop),
    }


def mapper_keys(enc: int, dec: int) -> list[str]:
    """`nn.Transformer` parameter names of the feature mapper, written out from PyTorch's layout."""
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    ffn = ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    keys = []
    for i in range(enc):
        p = f"llm_to_t2i_mapping.encoder.layers.{i}."
        keys += [p + "self_attn." + a for a in attn] + [p + f for f in ffn]
        keys += [p + f"norm{j}.{w}" for j in (1, 2) for w in ("weight", "bias")]
    for i in range(dec):
        p = f"llm_to_t2i_mapping.decoder.layers.{i}."
        keys += [p + "self_attn." + a for a in attn] + [p + "multihead_attn." + a for a in attn] + [p + f for f in ffn]
        keys += [p + f"norm{j}.{w}" for j in (1, 2, 3) for w in ("weight", "bias")]
    keys += [f"llm_to_t2i_mapping.{part}.norm.{w}" for part in ("encoder", "decoder") for w in ("weight", "bias")]
    return keys


def release_stage1_checkpoint_keys(cfg) -> list[str]:
    """The keys of the release's stage-1 checkpoint (stage1_cc3m.ckpt), for a config's mapper sizes."""
    return (["t2i_decoder_prompt", "fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"]
            + mapper_keys(cfg.mapper.num_encoder_layers, cfg.mapper.num_decoder_layers)
            + ["model.llama_model.model.embed_tokens.weight", "model.llama_model.lm_head.weight"])


def release_stage2_checkpoint_keys(cfg, n_llm_layers: int) -> list[str]:
    """The keys of the release's stage-2 checkpoints (stage2_vist.ckpt, stage2_mmdialog.ckpt)."""
    lora = [f"model.llama_model.base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.default.weight"
            for i in range(n_llm_layers) for proj in ("q_proj", "v_proj") for ab in ("A", "B")]
    return (mapper_keys(cfg.mapper.num_encoder_layers, cfg.mapper.num_decoder_layers) + lora
            + ["model.llama_model.base_model.model.model.embed_tokens.modules_to_save.default.weight",
               "model.llama_model.base_model.model.lm_head.modules_to_save.default.weight"])


# A generous guard against a hung subprocess only: far above any run's time on a loaded machine, so it
# never fails a correct run (no test depends on wall-clock time).
HANG_GUARD_S = 3600


class PlantsAMarker:
    """Unpickling this runs `exec`, which writes a marker file (what a malicious file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))
