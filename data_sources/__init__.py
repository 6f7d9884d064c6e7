"""The datasets, one module each (its reader, its spec: prompts, task names, scorer, training and
evaluation choices), registered here and nowhere else. (The package is not called `datasets`: that
is the repository's folder of sample data.)

    data_sources/cc3m.py         CC3M captions -> pictures (stage 1; TSV, or WebDataset shards via shards.py)
    data_sources/vist.py         VIST stories (stage 2)
    data_sources/mmdialog.py     MMDialog conversations (stage 2)
    data_sources/interleaved.py  your own data: documents or conversations of text and pictures, from
                                 JSON lines or OBELICS-style Parquet, with no code (docs/own_data.md)
    data_sources/common.py       what they share: DatasetSpec, bounded JSON / line reading, dialogues

A new dataset is one module with a `MiniGPT5Dataset` reader and a `SPEC = DatasetSpec(...)`, plus its
line in `MODULES` below. `dataset_specs.py` reads the registry (the resolver of a run's dataset,
task names); `dataloader.make_dataset` builds the reader a spec names.
"""
from __future__ import annotations

from data_sources import cc3m, interleaved, mmdialog, vist
from data_sources.common import DatasetSpec

# The registration: one line per dataset module. The order of the release's three is the release's
# DATAFOLDER rule (the first folder keyword found wins).
MODULES = (cc3m, mmdialog, vist, interleaved)

REGISTRY: dict[str, DatasetSpec] = {module.SPEC.name: module.SPEC for module in MODULES}

__all__ = ["DatasetSpec", "MODULES", "REGISTRY"]
