"""``source: gguf``: a GGUF file (a path, or a Python package that ships one) converted once into
a transformers directory by the workflow's ``convert_gguf`` rule (:mod:`canopy.checkpoints`). Its
record is the conversion's: the whole file's sha256 and the package and version it came from.

:mod:`canopy.checkpoints` is imported where it is used, not with this module: the registry is
read while the workflow is planned, and a config without a GGUF model needs none of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from canopy.config.families import GgufSource
from canopy.sources.source import Model, ModelSource, SourceError

__all__ = ["Gguf", "SOURCE"]

log = logging.getLogger(__name__)


class Gguf(ModelSource):
    settings = GgufSource
    rule = "convert_gguf"

    def check(
        self, spec: Mapping[str, Any], *, config_key: str, directory: str | os.PathLike[str]
    ) -> None:
        """The file can be found (its package and part packages installed) and starts with a
        GGUF header naming an architecture. Whether transformers reads that architecture is
        checked by the conversion job, which imports transformers anyway. A finished conversion
        is not checked: uninstalling the package it came from loses nothing."""
        from canopy.checkpoints import GgufSourceError, gguf_architecture, locate_gguf

        if self.read_record(directory) is not None:
            return
        try:
            found = locate_gguf(spec["gguf"], config_key=config_key, sha256=spec.get("sha256"))
            gguf_architecture(found.parts)
        except GgufSourceError as error:
            raise SourceError(str(error)) from None
        except (ValueError, EOFError) as error:
            raise SourceError(f"{config_key}.gguf = {spec['gguf']!r}: {error}") from None

    def make(
        self, spec: Mapping[str, Any], out_dir: str | os.PathLike[str], *, config_key: str
    ) -> dict[str, Any]:
        """Convert the file into a transformers directory at ``out_dir`` (the rule's job); return
        the conversion's record."""
        from canopy.checkpoints import convert_gguf, locate_gguf

        found = locate_gguf(spec["gguf"], config_key=config_key, sha256=spec.get("sha256"))
        log.info(
            "converting %s (%d part(s), %.0f MB)", found.name, len(found.parts), found.size / 1e6
        )
        return convert_gguf(found, out_dir, dtype=spec.get("dtype"), config_key=config_key)

    def read_record(self, directory: str | os.PathLike[str]) -> dict[str, Any] | None:
        from canopy.checkpoints import read_conversion_record

        return read_conversion_record(directory)

    def lock_entry(self, model: Model) -> dict[str, Any]:
        record = self.made_record(model)
        return {
            "name": model.name,
            "source": self.kind,
            "repository": (
                f"{record['package']}=={record['version']}" if record["package"] else record["spec"]
            ),
            "revision": record["file"],
            "commit": f"sha256:{record['sha256']}",
            "pinned": True,
            "dtype": record["dtype"],
            "path": str(model.directory),
        }


SOURCE = Gguf()
