"""``seed`` and ``tasks.<task>``: where each task's prompts come from (canopy.data reads them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import model_validator

from canopy.config.base import Block
from canopy.config.types import NonEmptyStr, PositiveInt, format_fields

__all__ = ["FewShotSettings", "GENERATOR_NAMES", "SOURCE_REQUIRED", "TaskSettings"]

#: Prompt generators of ``source: generated`` (canopy.data implements each).
GENERATOR_NAMES = ("arithmetic", "stories", "completion")
#: Keys each source needs besides ``source`` and ``n_prompts``.
SOURCE_REQUIRED: dict[str, tuple[str, ...]] = {
    "humaneval": (),
    "generated": ("generator",),
    "jsonl": ("path", "field"),
    "hub": ("dataset", "revision", "split", "field"),
}
#: Keys a source may set beyond its required ones (others are an error: they would be ignored).
_SOURCE_OPTIONAL: dict[str, tuple[str, ...]] = {
    "humaneval": (),
    "generated": (),
    "jsonl": ("id_field",),
    "hub": ("config", "id_field"),
}


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
    generator: Literal["arithmetic", "stories", "completion"] | None = None
    """source: generated — the generator."""
    path: NonEmptyStr | None = None
    """source: jsonl — a local file, one JSON object per line."""
    dataset: NonEmptyStr | None = None
    """source: hub — the data set id."""
    revision: NonEmptyStr | None = None
    """source: hub — a commit hash that pins the data."""
    config: NonEmptyStr | None = None
    """source: hub — the data set configuration name."""
    split: NonEmptyStr | None = None
    """source: hub — the split the prompts come from."""
    field: NonEmptyStr | None = None
    """jsonl/hub — the field holding the prompt text."""
    id_field: NonEmptyStr | None = None
    """jsonl/hub — the field holding a stable prompt id (default: the row number)."""
    template: Annotated[str, format_fields("text")] | None = None
    """A format string with {text}, wrapping each prompt (e.g. the paper's instructions)."""
    few_shot: FewShotSettings | None = None

    @model_validator(mode="after")
    def _source_keys(self) -> TaskSettings:
        missing = [key for key in SOURCE_REQUIRED[self.source] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"source {self.source} needs {', '.join(missing)}")
        allowed = {*SOURCE_REQUIRED[self.source], *_SOURCE_OPTIONAL[self.source]}
        stray = [
            key
            for key in ("generator", "path", "dataset", "revision", "config", "split", "field",
                        "id_field")
            if getattr(self, key) is not None and key not in allowed
        ]  # fmt: skip
        if stray:
            raise ValueError(
                f"{', '.join(stray)} not used by source {self.source} (it reads "
                f"{', '.join(sorted(allowed)) or 'no other key'})"
            )
        return self

    def to_config(self) -> dict:
        # Keys a source does not use stay absent, as in the file.
        return {key: value for key, value in super().to_config().items() if value is not None}
