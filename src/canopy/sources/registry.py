"""Every kind of model source by its ``source`` value: what the workflow's input functions, its
check at plan time and the lock file go through."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from canopy.sources import finetune, gguf, hub, local, train
from canopy.sources.source import ModelSource

__all__ = ["SOURCES", "source_of"]

#: The kinds, by their ``source`` value, in the order the configuration lists them.
SOURCES: dict[str, ModelSource] = {
    module.SOURCE.kind: module.SOURCE for module in (train, hub, local, gguf, finetune)
}


def source_of(spec: Mapping[str, Any]) -> ModelSource:
    """The kind of source of a variant's (validated) config entry."""
    return SOURCES[spec["source"]]
