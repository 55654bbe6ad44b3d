"""Atomic file output, JSON lines and small table helpers shared by every stage.

Every file the workflow produces is written to a temporary sibling and renamed into place, so an
interrupted job never leaves a half-written output that a later run could mistake for a result:
:func:`atomic_path` for a file, :func:`atomic_dir` for a directory (a model). Where the output
cannot be written (a full disk, a read-only file system, a file where its folder should be) they
raise :class:`OutputNotWritable`, naming the path and what to do, and leave nothing behind: no
temporary file, and any earlier output at the path untouched. JSON lines files (the
prompts and the training corpus) are written by :func:`write_jsonl` and read by
:func:`iter_jsonl`, which names the file and line of a malformed record.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "OutputNotWritable",
    "atomic_path",
    "atomic_dir",
    "write_jsonl",
    "iter_jsonl",
    "write_parquet",
    "write_tsv",
    "write_json",
    "read_json",
]


class OutputNotWritable(OSError):
    """An output cannot be written where it belongs; the message names the path and what to do.

    Keeps the ``errno`` of the underlying error (``ENOSPC`` for a full disk)."""

    #: What the user can do, by the errno of what failed.
    _ADVICE = {
        errno.ENOSPC: "the disk holding it is full: free space there, or run the workflow in a "
        "directory on a larger disk (snakemake --directory)",
        errno.EDQUOT: "you are over your disk quota there: free space, or run the workflow in a "
        "directory with quota to spare (snakemake --directory)",
        errno.EROFS: "it is on a read-only file system: run the workflow in a writable directory "
        "(snakemake --directory)",
        errno.EACCES: "you may not write there: fix the folder's permissions, or run the workflow "
        "in a directory you own (snakemake --directory)",
        errno.ENOTDIR: "a file stands where one of its folders should be: move that file aside",
        errno.EEXIST: "a file stands where one of its folders should be: move that file aside",
        errno.EISDIR: "a folder stands at that path: move it aside",
        errno.EFBIG: "the file is larger than its file system allows: run the workflow on "
        "another (snakemake --directory)",
    }
    _ADVICE[errno.EPERM] = _ADVICE[errno.EACCES]
    #: Errors of writing a file's contents that are about where it is written, not what: only
    #: these are reported as an unwritable output when they come from inside the caller's block.
    WHILE_WRITING = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

    @classmethod
    def of(cls, path: Path, error: OSError) -> OutputNotWritable:
        """The error for ``path`` that ``error`` stopped (OSError's own constructor is kept, so
        that the error pickles like any OSError)."""
        advice = cls._ADVICE.get(error.errno, "check that its folder exists and can be written")
        return cls(
            error.errno,
            f"cannot write {path} ({error.strerror or error}): {advice}. Nothing was written "
            "there (the temporary file was removed; an earlier file at that path is untouched)",
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so that the final ``os.replace`` is atomic on
    POSIX file systems. On an exception the temporary file is removed and ``path`` is untouched;
    a folder that cannot be made or written, or a disk that fills up during the block, raises
    :class:`OutputNotWritable`.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise OutputNotWritable.of(target, error) from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _unwritable_as(target):
            yield tmp
        try:
            os.replace(tmp, target)
        except OSError as error:
            raise OutputNotWritable.of(target, error) from error
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` (a previous
    directory there is moved aside first and removed after the rename). Raises
    :class:`OutputNotWritable` as :func:`atomic_path` does."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as error:
        raise OutputNotWritable.of(target, error) from error
    try:
        with _unwritable_as(target):
            yield tmp
        old = None
        try:
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
        except OSError as error:
            if old is not None and not target.exists():
                os.replace(old, target)  # the earlier directory back where it was
            raise OutputNotWritable.of(target, error) from error
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


#: Free space below which a failed write is taken for a full disk: the failed write's temporary
#: file is still there, so a disk that filled up has (next to) nothing free.
_FULL_BELOW = 2**20


@contextlib.contextmanager
def _unwritable_as(target: Path) -> Iterator[None]:
    """Report a full disk (or read-only one) met while writing ``target``'s temporary file as
    :class:`OutputNotWritable`; other errors of the block (a bad input, a bug) pass unchanged.

    Writers do not all say ENOSPC: numpy reports a short write as an OSError without errno,
    torch.save and safetensors raise their own errors. Those count as a full disk when the disk
    is full, measured after the failure."""
    try:
        yield
    except OutputNotWritable:
        raise
    except Exception as error:
        reported = error if isinstance(error, OSError) and error.errno is not None else None
        if reported is None and _free_bytes(target.parent) < _FULL_BELOW:
            reported = OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}; the writer: {error}")
        if reported is not None and reported.errno in OutputNotWritable.WHILE_WRITING:
            raise OutputNotWritable.of(target, reported) from error
        raise


def _free_bytes(folder: Path) -> int:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return _FULL_BELOW  # cannot tell: not taken for a full disk
    return stats.f_bavail * stats.f_frsize


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
