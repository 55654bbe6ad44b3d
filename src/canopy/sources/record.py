"""The one record of a model directory made by this workflow: which source made it and that
source's own details (the commit a fetch resolved, the checksum of a converted file, the recipe
and loss curve of a training run).

A record is a JSON object, ``{"source": <kind>, ...details}``, in :data:`RECORD_FILE` inside the
directory, written into the directory while it is staged so that it appears with the model.
Directories made before the record had one file name for all kinds keep their older file (a
fetch's ``canopy_fetch.json``, a conversion's ``canopy_gguf.json``, a training run's
``training_log.json``): :func:`read_record` reads it when told its name, so that no finished
model has to be made again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LEGACY_RECORD_FILES", "RECORD_FILE", "RECORD_FILES", "read_record", "write_record"]

#: The record a finished model directory (or fetched embedder or classifier) holds.
RECORD_FILE = "canopy_source.json"
#: The file each source wrote its record to before :data:`RECORD_FILE`, by source.
LEGACY_RECORD_FILES = {
    "hub": "canopy_fetch.json",
    "gguf": "canopy_gguf.json",
    "train": "training_log.json",
    "finetune": "training_log.json",
}
#: Every name a record file has had: what a directory says about how it was made, not part of the
#: model (a model's identity leaves them out: a training record holds wall-clock seconds).
RECORD_FILES = frozenset({RECORD_FILE, *LEGACY_RECORD_FILES.values()})


def write_record(
    directory: str | os.PathLike[str], source: str, details: Mapping[str, Any]
) -> dict[str, Any]:
    """Write the record of ``source`` with its ``details`` into ``directory``; return it."""
    record = {"source": source, **{k: v for k, v in details.items() if k != "source"}}
    # Written into a directory that is staged and renamed whole, so it needs no atomic write of
    # its own (and this module stays free of the I/O module's table libraries).
    (Path(directory) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_record(
    directory: str | os.PathLike[str], *, source: str, legacy: Sequence[str] = ()
) -> dict[str, Any] | None:
    """The record in ``directory``, or None if it holds none.

    ``legacy``: the file names ``source`` wrote its record under before :data:`RECORD_FILE`, read
    as a record of ``source`` where the directory holds no :data:`RECORD_FILE`.
    """
    record = Path(directory) / RECORD_FILE
    if record.is_file():
        return dict(json.loads(record.read_text(encoding="utf-8")))
    for name in legacy:
        path = Path(directory) / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return {"source": source, **{k: v for k, v in data.items() if k != "source"}}
    return None
