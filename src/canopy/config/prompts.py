"""``seed`` and ``tasks.<task>``: where each task's prompts come from (canopy.prompts reads them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from canopy.config.base import Block
from canopy.config.types import NonEmptyStr, PositiveInt, format_fields

__all__ = ["FewShotSettings", "GENERATOR_NAMES", "SOURCES", "SOURCE_KEYS", "TaskSettings"]

#: Prompt generators of ``source: generated`` (canopy.prompts.generators implements each).
GENERATOR_NAMES = ("arithmetic", "stories", "completion")
#: For each source: (required keys, optional keys), besides ``source``, ``n_prompts``,
#: ``template`` and ``few_shot``; any other key is an error (it would be ignored).
SOURCE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "humaneval": ((), ()),
    "generated": (("generator",), ()),
    "jsonl": (("path", "field"), ("id_field",)),
    "hub": (("dataset", "revision", "split", "field"), ("config", "id_field")),
}
SOURCES: tuple[str, ...] = tuple(SOURCE_KEYS)
_SOURCE_SPECIFIC = (
    "generator",
    "path",
    "dataset",
    "revision",
    "config",
    "split",
    "field",
    "id_field",
)


class FewShotSettings(Block):
    """``tasks.<task>.few_shot``: k worked examples, drawn reproducibly from the data set's train
    split (never one of the task's prompts), before every prompt. Give it its own task entry
    (e.g. math_fewshot) so that it is a sweep point of its own."""

    where = "tasks.<task>.few_shot"

    k: PositiveInt
    """Examples before each prompt."""
    seed: int | None = None
    """Seed of the draw (null: the global seed)."""
    split: NonEmptyStr = "train"
    """source: hub — the split the examples come from."""
    answer_field: NonEmptyStr | None = None
    """source: hub — the column with each example's worked answer."""
    example: Annotated[str, format_fields("question", "answer")] = (
        "Question: {question}\nAnswer: {answer}"
    )
    """Format of one example, with {question} and {answer}."""
    query: Annotated[str, format_fields("text")] = "Question: {text}\nAnswer:"
    """Format of the prompt after the examples, with {text}."""


class TaskSettings(Block):
    """``tasks.<task>``: one prompt set; the key is the task name."""

    where = "tasks.<task>"

    source: Literal["humaneval", "generated", "jsonl", "hub"]
    """humaneval (packaged), generated (by a generator), jsonl (a local file) or hub (a data set
    pinned to a revision)."""
    n_prompts: PositiveInt
    generator: Literal["arithmetic", "stories", "completion"] | None = Field(
        default=None, validate_default=True
    )
    """source: generated — the generator."""
    path: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: jsonl — a local file, one JSON object per line."""
    dataset: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: hub — the data set id."""
    revision: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: hub — a commit hash that pins the data."""
    config: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: hub — the data set configuration name."""
    split: NonEmptyStr | None = Field(default=None, validate_default=True)
    """source: hub — the split the prompts come from."""
    field: NonEmptyStr | None = Field(default=None, validate_default=True)
    """jsonl/hub — the field holding the prompt text."""
    id_field: NonEmptyStr | None = Field(default=None, validate_default=True)
    """jsonl/hub — the field holding a stable prompt id (default: the row number)."""
    template: Annotated[str, format_fields("text")] | None = None
    """A format string with {text}, wrapping each prompt (e.g. the paper's instructions)."""
    few_shot: FewShotSettings | None = None

    @field_validator(*_SOURCE_SPECIFIC)
    @classmethod
    def _fits_source(cls, value: object, info: ValidationInfo) -> object:
        source = info.data.get("source")
        if source is None:
            return value  # an invalid source is reported on its own
        required, optional = SOURCE_KEYS[source]
        if value is None and info.field_name in required:
            raise ValueError(f"required by source {source}")
        if value is not None and info.field_name not in (*required, *optional):
            reads = ", ".join((*required, *optional)) or "none of the source keys"
            raise ValueError(f"not used by source {source} (it reads {reads}): remove it")
        return value

    def to_config(self) -> dict:
        # Keys a source does not use stay absent, as in the file.
        return {key: value for key, value in super().to_config().items() if value is not None}
