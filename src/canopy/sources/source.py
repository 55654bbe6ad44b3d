"""What every kind of model source says about itself: its config block, the rule that makes its
directories, the record it leaves there, its check at plan time and its entry in the lock file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from canopy.config.families import SourceKeys
from canopy.sources.record import read_record

__all__ = ["LOCK_ROW_KEYS", "Model", "ModelSource", "SourceError"]

#: The lock-table columns a model's row fills from its entry (besides kind, name and source).
LOCK_ROW_KEYS: tuple[str, ...] = ("repository", "revision", "commit", "pinned")


@dataclass(frozen=True)
class Model:
    """One model of the experiment as the lock sees it: its config entry and its directory."""

    family: str
    variant: str
    spec: Mapping[str, Any]
    directory: str | os.PathLike[str]
    #: The lock entry of the family's base, for a variant made from it (None for a base).
    base_entry: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.family}/{self.variant}"


class SourceError(ValueError):
    """A model source that cannot be used as configured: the message names the config key and
    the fix."""


class ModelSource:
    """One kind of model source (``families.<family>.<variant>.source``).

    A subclass per kind sets the class attributes and overrides what its kind does differently;
    one instance of it is the kind's entry in :mod:`canopy.sources.registry`.
    """

    #: The config block of the kind (its ``source`` value and keys).
    settings: ClassVar[type[SourceKeys]]
    #: The workflow rule that makes the kind's model directories; None: used where it is.
    rule: ClassVar[str | None] = None
    #: The file name the kind's record had before the one record file (read as its record).
    legacy_records: ClassVar[tuple[str, ...]] = ()

    @property
    def kind(self) -> str:
        """The ``source`` value that selects this kind."""
        return self.settings.kind()

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of a variant this kind reads (its rule's params), besides ``source``."""
        return self.settings.own_keys()

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants this kind can make."""
        return self.settings.variants

    def rule_for(self, variant: str) -> str | None:
        """The rule that makes this kind's ``variant`` (a kind may make its two with two rules)."""
        return self.rule

    def directory(self, family: str, variant: str, spec: Mapping[str, Any]) -> str:
        """The transformers directory of one model of this kind."""
        return f"resources/models/{family}/{variant}"

    def check(
        self, spec: Mapping[str, Any], *, config_key: str, directory: str | os.PathLike[str]
    ) -> None:
        """Raise :class:`SourceError` when the model cannot be made as configured into
        ``directory``. Runs while the workflow is planned, so it must stay light (no model
        library import); a model already made is not checked again."""

    def read_record(self, directory: str | os.PathLike[str]) -> dict[str, Any] | None:
        """The record this kind left in ``directory`` (None: it holds none)."""
        return read_record(directory, source=self.kind, legacy=self.legacy_records)

    def made_record(self, model: Model) -> dict[str, Any]:
        """The record in the model's directory, which this kind's rule made: an error if it
        has none."""
        record = self.read_record(model.directory)
        if record is None:
            raise FileNotFoundError(
                f"{model.directory} has no record of this workflow's "
                f"{self.rule_for(model.variant)} rule, which made it: delete it and rerun to make "
                "it again"
            )
        return record

    def lock_entry(self, model: Model) -> dict[str, Any]:
        """The lock file's entry of one model."""
        raise NotImplementedError

    def lock_row(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """The lock table's columns of a model's entry (repository, revision, commit, pinned)."""
        return {key: entry[key] for key in LOCK_ROW_KEYS}
