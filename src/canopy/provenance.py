"""The lock file of a run: which commit of every model, data set and embedder it used, and with
which versions of the key packages.

Made and fetched resources carry their own record (:mod:`canopy.sources.record` in a model,
embedder or classifier directory, ``resources/prompts/{task}.source.json`` beside a prompt set);
this module gathers them, each model's through its source (:mod:`canopy.sources`), into one
table, ``results/provenance/lock.yaml`` and its ``lock.tsv`` view in the report. It reaches no
network: :func:`check_revisions` is the one function here that asks the hub anything, and only
the workflow's ``check_hub_revisions`` rule calls it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from canopy.hub import HubFetch, is_commit, moved_revisions, read_fetch_record
from canopy.sources.hub import fetch_entry
from canopy.sources.registry import SOURCES, source_of
from canopy.sources.source import LOCK_ROW_KEYS, Model

__all__ = [
    "LOCK_COLUMNS",
    "PACKAGES",
    "RevisionsMovedError",
    "build_lock",
    "check_revisions",
    "classifier_entry",
    "embedder_entry",
    "fetched_records",
    "lock_table",
    "model_entry",
    "package_versions",
]

#: Python packages whose versions the lock names (the R side comes from the GLMM fits).
PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "huggingface_hub",
    "sentence-transformers",
    "snakemake",
)

#: Columns of the lock's table view, one row per resource.
LOCK_COLUMNS: tuple[str, ...] = (
    "kind",
    "name",
    "source",
    "repository",
    "revision",
    "commit",
    "pinned",
)



class RevisionsMovedError(RuntimeError):
    """A branch or tag a run fetched points to another commit on the hub today."""


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None where it is not installed in this environment)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def model_entry(
    family: str,
    variant: str,
    spec: Mapping[str, Any],
    directory: str | os.PathLike[str],
    base_entry: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Lock entry of one model, as its source gives it (:mod:`canopy.sources`): the fetch record
    (hub), the recipe (trained here), the conversion record (gguf: the file's sha256 and the
    package it came from), the path (local), or for a fine-tune made here from the family's base
    (``base_entry``, that base's own lock entry) the recipe it was trained with and the base's
    commit or checksum."""
    return source_of(spec).lock_entry(Model(family, variant, spec, directory, base_entry))


def embedder_entry(
    name: str, spec: Mapping[str, Any], directory: str | os.PathLike[str] | None
) -> dict[str, Any]:
    """Lock entry of one embedder: fetch record (hub), package and version, or path."""
    model = spec["model"]
    if model.startswith("package:"):
        module = model.split(":", 1)[1].strip()
        distribution = module.replace("_", "-")
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            version = None
        return {"name": name, "source": "package", "package": distribution, "version": version}
    record = read_fetch_record(directory) if directory is not None else None
    if record is not None:
        return {"name": name, "source": "hub", **fetch_entry(record)}
    return {"name": name, "source": "local", "path": str(model)}


def classifier_entry(name: str, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Lock entry of a fetched sequence classifier (a reward or NLI model)."""
    record = read_fetch_record(directory)
    if record is None:
        raise FileNotFoundError(
            f"{directory} has no record of this workflow's download_classifier rule, which made "
            "it: delete it and rerun to make it again"
        )
    return {"name": name, "source": "hub", **fetch_entry(record)}


def build_lock(
    *,
    models: Iterable[Mapping[str, Any]],
    prompts: Iterable[Mapping[str, Any]],
    embedders: Iterable[Mapping[str, Any]],
    classifiers: Iterable[Mapping[str, Any]] = (),
    r_versions: Mapping[str, Any] | None = None,
    packages: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """The lock document: every resource of the run and the software that processed it."""
    return {
        "models": [dict(entry) for entry in models],
        "prompts": [dict(entry) for entry in prompts],
        "embedders": [dict(entry) for entry in embedders],
        "classifiers": [dict(entry) for entry in classifiers],
        "software": {
            **(dict(packages) if packages is not None else package_versions()),
            **(
                {"R": r_versions.get("R_version"), "glmmTMB": r_versions.get("glmmTMB_version")}
                if r_versions
                else {}
            ),
        },
    }


def _prompt_row(entry: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": "prompts", "name": entry["task"], "source": entry["source"]}
    if entry["source"] == "hub":
        row.update(fetch_entry(entry))
    elif entry["source"] == "jsonl":
        row.update(repository=entry["path"], commit=f"sha256:{entry['sha256']}", pinned=True)
    elif entry["source"] == "humaneval":
        row.update(repository=entry["package"], revision=entry["version"], pinned=True)
    else:
        row.update(repository=f"generator {entry.get('generator')}", pinned=True)
    return row


def lock_table(lock: Mapping[str, Any]) -> pd.DataFrame:
    """One row per resource (models, prompt sets, embedders) with repository, revision, commit
    and whether the configured revision was a commit (pinned) rather than a branch or tag."""
    rows: list[dict[str, Any]] = []
    for entry in lock["models"]:
        row = {"kind": "model", "name": entry["name"], "source": entry["source"]}
        row.update(SOURCES[entry["source"]].lock_row(entry))
        rows.append(row)
    rows += [_prompt_row(entry) for entry in lock["prompts"]]
    for entry in lock["embedders"]:
        row = {"kind": "embedder", "name": entry["name"], "source": entry["source"]}
        if entry["source"] == "hub":
            row.update({k: entry[k] for k in LOCK_ROW_KEYS})
        elif entry["source"] == "package":
            row.update(repository=entry["package"], revision=entry["version"], pinned=True)
        else:
            row.update(repository=entry["path"])
        rows.append(row)
    for entry in lock.get("classifiers", []):
        row = {"kind": "classifier", "name": entry["name"], "source": entry["source"]}
        row.update({k: entry[k] for k in LOCK_ROW_KEYS})
        rows.append(row)
    for name, version in lock["software"].items():
        rows.append({"kind": "software", "name": name, "source": "installed", "revision": version})
    return pd.DataFrame(rows).reindex(columns=list(LOCK_COLUMNS))


def fetched_records(
    directories: Iterable[str | os.PathLike[str]],
    prompt_records: Iterable[str | os.PathLike[str]] = (),
) -> list[HubFetch]:
    """The hub fetches behind a run: records in fetched directories and hub prompt sets."""
    records = [r for d in directories if (r := read_fetch_record(d)) is not None]
    for path in prompt_records:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("source") != "hub":
            continue
        records.append(
            HubFetch(
                kind="dataset",
                repo_id=data["repo_id"],
                repo_type="dataset",
                revision=data["revision"],
                commit=data["commit"],
                endpoint=data.get("endpoint", ""),
                fetched_at=data.get("fetched_at", ""),
            )
        )
    return records


def check_revisions(records: Sequence[HubFetch]) -> list[dict[str, str]]:
    """Ask the hub where every fetched branch or tag points now.

    Returns one row per record that is not pinned to a commit (``repository``, ``revision``,
    ``fetched``, ``now``); raises :class:`RevisionsMovedError` naming each that moved and what to
    do, since results computed from the old commit would otherwise be mixed with new ones.
    """
    moved = {(r.repo_id, r.revision, r.commit): now for r, now in moved_revisions(records)}
    rows = [
        {
            "repository": r.repo_id,
            "revision": r.revision,
            "fetched": r.commit,
            "now": moved.get((r.repo_id, r.revision, r.commit), r.commit),
        }
        for r in records
        if not is_commit(r.revision)
    ]
    changed = [row for row in rows if row["now"] != row["fetched"]]
    if changed:
        lines = "\n".join(
            f"  {row['repository']}@{row['revision']}: fetched {row['fetched']}, now {row['now']}"
            for row in changed
        )
        raise RevisionsMovedError(
            f"{len(changed)} fetched revision(s) moved on the hub since this run fetched them:\n"
            f"{lines}\nNothing changes unless you act: the run keeps using the fetched copies, and "
            "its results stay consistent with the commits in results/provenance/lock.yaml. To move "
            "to the new commits, set each revision in the config to the new commit SHA: Snakemake "
            "then fetches exactly those resources again and reruns everything computed from them."
        )
    return rows
