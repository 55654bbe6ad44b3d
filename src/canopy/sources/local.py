"""``source: local``: a transformers directory of the user's, used where it is (no rule makes
it, and it holds no record: the lock names its path)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from canopy.config.families import LocalSource
from canopy.sources.source import Model, ModelSource

__all__ = ["Local", "SOURCE"]


class Local(ModelSource):
    settings = LocalSource

    def directory(self, family: str, variant: str, spec: Mapping[str, Any]) -> str:
        return str(spec["path"])

    def lock_entry(self, model: Model) -> dict[str, Any]:
        return {"name": model.name, "source": self.kind, "path": str(model.spec["path"])}

    def lock_row(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        return {"repository": entry["path"]}


SOURCE = Local()
