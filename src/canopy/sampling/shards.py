"""Per-prompt shards: a task's finished prompts, kept across interrupted runs.

Each finished prompt is written atomically to ``<output>.shards/`` (a sibling directory that is not
a Snakemake output, so it survives a killed job) together with a fingerprint of everything that
determines its rows; a rerun reuses only shards whose fingerprint matches. A rollout table keeps
the fingerprints of its prompts (and the number of chunks it was sampled in) in its schema metadata,
so that sampling the task again under another chunking can take its finished prompts from it.

Both are written with Parquet's CRC-32 page checksums and read back verifying them: a kill cannot
leave a half-written shard (writes are atomic), but a damaged disk or a copy cut short can, and a
flipped byte in a Parquet data page otherwise decodes to wrong numbers without any error. A shard
that fails its format or checksum check is named in the log and its prompt sampled again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from canopy.io import atomic_path
from canopy.sources.record import RECORD_FILES

logger = logging.getLogger(__name__)

__all__ = [
    "ROLLOUT_SCHEMA",
    "SHARD_FORMAT_VERSION",
    "sibling_dir",
    "shard_dir_for",
    "model_identity",
    "fingerprint",
    "shard_path",
    "read_valid_shard",
    "write_shard",
    "write_rollout_table",
    "rollout_table_stamp",
    "stamp_of",
    "read_reusable_prompts",
]

#: Bump when the meaning of a shard's rows changes, so that old shards are never reused.
SHARD_FORMAT_VERSION = 1

#: Schema metadata keys of a rollout table: JSON {prompt_id: fingerprint} of the prompts it holds,
#: and the number of chunks it was sampled in (1: one job).
FINGERPRINTS_KEY = b"canopy_fingerprints"
CHUNKS_KEY = b"canopy_chunks"

#: The rollout table of docs/architecture.md, with fixed Arrow types.
ROLLOUT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("n_steps", pa.int64()),
        ("hit_eos", pa.bool_()),
        ("truncated", pa.bool_()),
        ("step_entropy", pa.list_(pa.float64())),
        ("step_logprob", pa.list_(pa.float64())),
        ("sum_entropy", pa.float64()),
        ("sum_logprob", pa.float64()),
        ("token_ids", pa.list_(pa.int64())),
        ("text", pa.string()),
    ]
)


def sibling_dir(table: str | Path, suffix: str) -> Path:
    """``results/.../{task}.parquet`` -> ``results/.../{task}{suffix}``."""
    table = Path(table)
    return table.with_name(table.name.removesuffix(".parquet") + suffix)


def shard_dir_for(output: str | Path) -> Path:
    """``results/.../{task}.parquet`` -> ``results/.../{task}.shards/``."""
    return sibling_dir(output, ".shards")


_SMALL_FILE = 64 * 2**20  # files up to this size are identified by content, larger by size + mtime


def model_identity(model_dir: str | Path) -> str:
    """A hash that changes whenever the model directory's files change.

    Small files (config, tokenizer, chat template, tiny weights) are hashed by content; large
    weight files by name, size and modification time, so that identifying an 8B model is instant.
    The directory's provenance record is left out: it says how the model was made (a training
    record holds wall-clock seconds), not what it computes, so the same weights made twice have
    one identity and their rollout tables the same fingerprints.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if relative.as_posix() in RECORD_FILES:
            continue
        stat = file.stat()
        digest.update(f"{relative.as_posix()}\x00{stat.st_size}\x00".encode())
        if stat.st_size <= _SMALL_FILE:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def fingerprint(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def shard_path(shard_dir: Path, prompt_id: str) -> Path:
    # prompt ids may hold any character; the file name must not.
    return shard_dir / f"{hashlib.sha256(prompt_id.encode()).hexdigest()[:24]}.parquet"


#: How every table of this module is written and read: with Parquet's page checksums (CRC-32 of
#: each data page), which pyarrow neither writes nor checks by default.
_WRITE_CHECKED = {"write_page_checksum": True}
_READ_CHECKED = {"page_checksum_verification": True}
#: The metadata key that says a shard was written with page checksums: a shard without it (from a
#: canopy before them) could hold a damaged page that reads as data, so it is sampled again.
CHECKSUMS_KEY = b"canopy_page_checksums"


def read_valid_shard(
    path: Path, fingerprint: str, log: logging.Logger | None = None
) -> pa.Table | None:
    """The shard's rows if it exists, passes its format and checksum checks and was written for
    exactly this fingerprint, else None. A shard that is there but damaged (truncated, a page
    that fails its checksum, not a rollout shard) is named in ``log``: its prompt is redone."""
    if not path.is_file():
        return None
    log = log or logger
    try:
        table = pq.read_table(path, **_READ_CHECKED)
        problem = _shard_problem(table)
    except (OSError, pa.ArrowException) as error:
        problem = f"unreadable: {error}"
    if problem:
        log.warning(
            "shard %s is damaged (%s): not read, its prompt is sampled again", path, problem
        )
        return None
    metadata = table.schema.metadata or {}
    if metadata.get(b"canopy_fingerprint", b"").decode() != fingerprint:
        return None  # another model, setting or prompt: stale, not damaged
    return _as_written(table)


def _as_written(table: pa.Table) -> pa.Table:
    """A table read back from Parquet with the exact types it was written with: Parquet names a
    list's items "element" where Arrow says "item", and a rollout table assembled from read-back
    shards must be the same bytes as one assembled from fresh ones."""
    return table.replace_schema_metadata(None).cast(ROLLOUT_SCHEMA)


def _shard_problem(table: pa.Table) -> str:
    """Why a table read from a shard file is not a shard write_shard wrote ('' if it is)."""
    metadata = table.schema.metadata or {}
    if metadata.get(CHECKSUMS_KEY) != b"crc32":
        return "written without page checksums"
    if table.schema.remove_metadata() != ROLLOUT_SCHEMA:
        return "not the rollout schema"
    prompt_ids = set(table.column("prompt_id").to_pylist())
    if prompt_ids != {metadata.get(b"prompt_id", b"").decode()}:
        return f"rows of prompts {sorted(prompt_ids)} under the stamp of another"
    return ""


def write_shard(
    path: Path, rows: list[dict[str, Any]], fingerprint: str, prompt_id: str
) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    stamped = table.replace_schema_metadata(
        {"canopy_fingerprint": fingerprint, "prompt_id": prompt_id, CHECKSUMS_KEY: "crc32"}
    )
    with atomic_path(path) as tmp:
        pq.write_table(stamped, tmp, **_WRITE_CHECKED)
    return table


def write_rollout_table(
    path: Path, tables: Sequence[pa.Table], fingerprints: Mapping[str, str], chunks: int
) -> pa.Table:
    """Write the prompts' tables (in order) as one rollout table stamped with their fingerprints
    and the chunking it was sampled in; returns the table without the stamp."""
    table = pa.concat_tables(tables) if tables else ROLLOUT_SCHEMA.empty_table()
    stamped = table.replace_schema_metadata(
        {FINGERPRINTS_KEY: json.dumps(dict(fingerprints)), CHUNKS_KEY: str(chunks)}
    )
    with atomic_path(path) as tmp:
        pq.write_table(stamped, tmp, **_WRITE_CHECKED)
    return table


def rollout_table_stamp(path: Path) -> tuple[dict[str, str], int | None]:
    """The prompts' fingerprints and the chunking a rollout table was written with (empty and
    None for a table without them, or one that is missing or unreadable)."""
    try:
        return stamp_of(pq.read_schema(path))
    except (OSError, pa.ArrowException):
        return {}, None


def stamp_of(schema: pa.Schema) -> tuple[dict[str, str], int | None]:
    """``rollout_table_stamp`` of a table already read."""
    metadata = schema.metadata or {}
    fingerprints = json.loads(metadata[FINGERPRINTS_KEY]) if FINGERPRINTS_KEY in metadata else {}
    chunks = int(metadata[CHUNKS_KEY]) if CHUNKS_KEY in metadata else None
    return fingerprints, chunks


def read_reusable_prompts(path: Path, wanted: Mapping[str, str]) -> dict[str, pa.Table]:
    """The rows of each prompt in ``wanted`` (prompt_id -> fingerprint) that the rollout table at
    ``path`` holds under exactly that fingerprint, one table per prompt. A table that is missing,
    unreadable or unstamped gives nothing (another job may be replacing it)."""
    stamped, _ = rollout_table_stamp(path)
    matching = [pid for pid, fp in wanted.items() if stamped.get(pid) == fp]
    if not matching:
        return {}
    try:
        table = pq.read_table(path, **_READ_CHECKED).replace_schema_metadata(None)
    except (OSError, pa.ArrowException):
        return {}
    if table.schema != ROLLOUT_SCHEMA:
        return {}
    table = _as_written(table)
    ids = table.column("prompt_id")
    return {pid: table.filter(pc.equal(ids, pid)) for pid in matching}
