"""Atomic file output, JSON lines and small table helpers shared by every stage.

Every file the workflow produces is written to a temporary sibling and renamed into place, so an
interrupted job never leaves a half-written output that a later run could mistake for a result:
:func:`atomic_path` for a file, :func:`atomic_dir` for a directory (a model). JSON lines files (the
prompts and the training corpus) are written by :func:`write_jsonl` and read by
:func:`iter_jsonl`, which names the file and line of a malformed record.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "atomic_path",
    "atomic_dir",
    "write_jsonl",
    "iter_jsonl",
    "write_parquet",
    "write_tsv",
    "write_json",
    "read_json",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so that the final ``os.replace`` is atomic on
    POSIX file systems. On an exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` (a previous
    directory there is moved aside first and removed after the rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write one JSON object per line (UTF-8, not ASCII-escaped), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def iter_jsonl(
    path: str | os.PathLike[str],
    *,
    error: type[Exception] = ValueError,
    where: str = "",
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON lines file, lazily.

    A line that is not JSON, or not a JSON object, raises ``error`` naming ``path:line`` followed
    by ``where`` (e.g. the config key the file belongs to).
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as problem:
                raise error(f"{path}:{number}{where} is not valid JSON ({problem})") from problem
            if not isinstance(record, dict):
                raise error(f"{path}:{number}{where} is not a JSON object")
            yield number, record


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write ``frame`` to parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_tsv(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write ``frame`` as tab-separated text atomically (no index)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays appear in every stats dictionary; JSON has no NaN, so keep null.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def write_json(data: Any, path: str | os.PathLike[str]) -> None:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())
