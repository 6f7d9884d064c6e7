"""Shared fixtures: the tiny preset is built once per test session into a temporary folder, through
the same `weights.build_tiny` a user runs, and loaded through the real loading code."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    """Path of the tiny preset's config YAML (weights written once per session)."""
    from weights import build_tiny

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
def shared_dir() -> Path:
    """`../shared` (reference datasets and keys); tests that need it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not available")
    return SHARED
