"""Atomic file output and small table helpers shared by every stage.

Every file the workflow produces is written to a temporary sibling and renamed into place, so an
interrupted job never leaves a half-written output that a later run could mistake for a result.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "atomic_path",
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
