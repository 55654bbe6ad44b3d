"""``source: hub``: a model downloaded from the hub at a pinned revision by the workflow's
``download_model`` rule; its record is the fetch's (the commit the revision resolved to)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from canopy.config.families import HubSource
from canopy.hub import FETCH_RECORD, HubFetch, download_model, is_commit
from canopy.sources.source import Model, ModelSource

__all__ = ["Hub", "SOURCE", "fetch_entry"]


def fetch_entry(record: HubFetch | Mapping[str, Any]) -> dict[str, Any]:
    """The lock columns of anything fetched from the hub (a model, an embedder, a classifier, a
    prompt data set): repository, revision as configured, commit fetched, whether it was pinned."""
    data = record.to_dict() if isinstance(record, HubFetch) else dict(record)
    return {
        "repository": data["repo_id"],
        "revision": data["revision"],
        "commit": data["commit"],
        "pinned": is_commit(data["revision"]),
        "endpoint": data.get("endpoint"),
    }


class Hub(ModelSource):
    settings = HubSource
    rule = "download_model"
    legacy_records = (FETCH_RECORD,)

    def make(
        self, spec: Mapping[str, Any], out_dir: str | os.PathLike[str], *, config_key: str
    ) -> HubFetch:
        """Fetch the model at its configured revision into ``out_dir`` (the rule's job)."""
        return download_model(spec["id"], spec["revision"], out_dir, config_key=config_key)

    def lock_entry(self, model: Model) -> dict[str, Any]:
        return {
            "name": model.name,
            "source": self.kind,
            **fetch_entry(self.made_record(model)),
        }


SOURCE = Hub()
