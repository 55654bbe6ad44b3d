"""``source: local``: a transformers directory of the user's, used where it is (no rule makes
it, and it holds no record: the lock names its path)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from canopy.config.families import LocalSource
from canopy.sources.source import ModelSource

__all__ = ["Local", "SOURCE"]


class Local(ModelSource):
    settings = LocalSource

    def directory(self, family: str, variant: str, spec: Mapping[str, Any]) -> str:
        return str(spec["path"])

    def lock_entry(
        self,
        name: str,
        spec: Mapping[str, Any],
        directory: str | os.PathLike[str],
        base_entry: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {"name": name, "source": self.kind, "path": str(spec["path"])}

    def lock_row(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        return {"repository": entry["path"]}


SOURCE = Local()
