"""A prompt, the prompt file every task writes, and the seeded random streams of the sources.

``resources/prompts/{task}.jsonl`` holds one JSON object per line with ``prompt_id`` (unique within
the task), ``task``, ``prompt`` (the text as the models see it before any chat template) and
``source`` (where it came from, e.g. ``generated:arithmetic+2shot``). :func:`read_prompts` is the
one reader of these files: the sampling stage and the filters read them through it too.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from canopy.io import iter_jsonl, write_jsonl

__all__ = ["Prompt", "PromptSourceError", "write_prompts", "read_prompts", "derived_rng"]


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task; ``prompt_id`` is unique within the task."""

    prompt_id: str
    task: str
    prompt: str
    source: str
    #: The same problem as a document a base model continues, where the source has one
    #: (HumanEval: its code prompt); a base's prompt_template reads it as {document}.
    document: str | None = None


class PromptSourceError(ValueError):
    """A task's prompt source is misconfigured or cannot be read (the message says what to do)."""


def write_prompts(prompts: Iterable[Prompt], path: str | os.PathLike[str]) -> None:
    """Write prompts as JSON lines (``prompt_id``, ``task``, ``prompt``, ``source``, and
    ``document`` where there is one), atomically."""
    records = []
    for prompt in prompts:
        record = asdict(prompt)
        if record["document"] is None:
            del record["document"]
        records.append(record)
    write_jsonl(records, path)


def read_prompts(path: str | os.PathLike[str]) -> list[Prompt]:
    """The prompts of a prompt file, in file order.

    Each line needs ``prompt_id`` and ``prompt``; ``task`` defaults to the file's stem and
    ``source`` to ``""`` (hand-written files may leave them out). A missing file, a malformed line,
    a duplicate id or an empty file raise an error naming the file (and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist: run the data stage first"
        )
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for number, record in iter_jsonl(path, error=PromptSourceError):
        missing = [key for key in ("prompt_id", "prompt") if key not in record]
        if missing:
            raise PromptSourceError(f"{path}:{number} lacks {', '.join(missing)}")
        prompt_id = str(record["prompt_id"])
        if prompt_id in seen:
            raise PromptSourceError(f"{path}:{number}: duplicate prompt_id {prompt_id!r}")
        seen.add(prompt_id)
        prompts.append(
            Prompt(
                prompt_id=prompt_id,
                task=str(record.get("task", path.stem)),
                prompt=str(record["prompt"]),
                source=str(record.get("source", "")),
                document=None if record.get("document") is None else str(record["document"]),
            )
        )
    if not prompts:
        raise PromptSourceError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def derived_rng(seed: int, *labels: str) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and labels through SHA-256 (stable across runs and
    Python versions, unlike ``hash``)."""
    text = "\x00".join(["canopy", str(int(seed)), *labels])
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))
