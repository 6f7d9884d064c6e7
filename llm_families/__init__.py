"""LLM families: everything that differs between the LLMs MiniGPT-5 can sit on, one module per family.

    vicuna  Vicuna-v0 / LLaMA: the release (sentencepiece, `###Human: ... ###Assistant:`, BOS `<s>`)
    llama3  Llama 3.x: byte-level BPE (128k vocabulary), GQA, the tokenizer's own chat template
    qwen2   Qwen2.5: byte-level BPE, no BOS, tied embeddings at small sizes, a padded vocabulary

The model config names its family (`llm_family`, default vicuna); `get_family(name)` gives the family
object (`base.LLMFamily`: tokenizer set-up, BOS, the end of an answer, the clean text of an answer,
the prompt style `render`, the tiny preset's LLM folder). The model code asks the family and never
tests its name. Adding a family: docs/architecture.md, "Adding an LLM family".

Importing this package is light (no torch, no transformers): configuration.py checks the key with
`FAMILY_NAMES` alone.
"""
from __future__ import annotations

import importlib

DEFAULT_FAMILY = "vicuna"
# name -> module of this package that defines `FAMILY` (an `LLMFamily`).
_MODULES = {"vicuna": "vicuna", "llama3": "llama3", "qwen2": "qwen2"}
FAMILY_NAMES = tuple(_MODULES)


class UnknownFamilyError(ValueError):
    """A family name that no module of this package defines."""


def get_family(name: str):
    """The `LLMFamily` called `name`; `UnknownFamilyError` listing the known names otherwise."""
    if name not in _MODULES:
        raise UnknownFamilyError(f"unknown LLM family {name!r} (config key `llm_family`); known: "
                                 f"{', '.join(FAMILY_NAMES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").FAMILY
