"""A task: a prompts file in, the rollout table out, resumable through per-prompt shards.

``sample_task`` formats every prompt and checks it against the model's context before any is
sampled (a problem fails in seconds), reuses the valid shards of an interrupted run, hands the
remaining prompts to the configured backend in one continuous batch, writes each prompt's shard as
soon as its last rollout ends, and assembles the table from the shards in prompt order, so a
resumed run equals an uninterrupted one.

Chunks: with ``settings.chunks = K`` a task's prompts are split into K contiguous slices
(``chunk_prompts``), each sampled by its own job into its own table and shard directory
(``{task}.chunks/{k}-of-{K}.parquet``, ``chunk_table_path``); ``gather_rollouts`` concatenates the
K tables in prompt order into the table an unchunked run writes (the draws of a prompt do not
depend on which other prompts are sampled with it).

Changing K keeps the finished work: a job takes every prompt it can from the tables and shards the
task left under another chunking (its fingerprint must match, as for a resumed shard), and samples
only the rest. Once the task's table is written, what other chunkings left is removed. Sampling
again under the same chunking (a forced rerun) reuses nothing but its own interrupted shards.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from canopy.config import VARIANTS
from canopy.modeling import (
    ModelFiles,
    check_chat_options,
    end_of_turn_ids,
    eos_token_ids,
    format_prompt,
    read_model_files,
    resolve_device,
    resolve_dtype,
    tokens_containing,
)
from canopy.prompts import read_prompts
from canopy.sampling.backends import make_backend
from canopy.sampling.batcher import PromptJob
from canopy.sampling.kernel import check_prompt_fits
from canopy.sampling.settings import TOKEN_NEUTRAL_SETTINGS, SamplingSettings
from canopy.sampling.stops import StopSequences, cut_at_stop
from canopy.sampling.shards import (
    ROLLOUT_SCHEMA,
    SHARD_FORMAT_VERSION,
    fingerprint,
    model_identity,
    read_reusable_prompts,
    read_valid_shard,
    rollout_table_stamp,
    shard_dir_for,
    shard_path,
    sibling_dir,
    stamp_of,
    write_rollout_table,
    write_shard,
)

__all__ = [
    "read_prompts",
    "chunk_prompts",
    "chunk_table_path",
    "Framing",
    "PreparedTask",
    "prepare_task",
    "resume_task",
    "run_task",
    "sample_task",
    "gather_rollouts",
]

logger = logging.getLogger(__name__)


def chunk_prompts(prompts: Sequence[Any], chunk: int, chunks: int) -> list[Any]:
    """The ``chunk``-th (0-based) of ``chunks`` contiguous slices of ``prompts`` (sizes differ by
    at most one; a slice is empty when there are more chunks than prompts)."""
    if not 0 <= chunk < chunks:
        raise ValueError(f"chunk {chunk} is not in 0..{chunks - 1}")
    total = len(prompts)
    return list(prompts[chunk * total // chunks : (chunk + 1) * total // chunks])


def chunk_table_path(task_table: str | Path, chunk: int, chunks: int) -> Path:
    """``.../{task}.parquet`` -> ``.../{task}.chunks/{chunk}-of-{chunks}.parquet``: the chunking
    is in the name, so a table of another chunking is never mistaken for one of this."""
    return sibling_dir(task_table, ".chunks") / f"{chunk}-of-{chunks}.parquet"


_CHUNK_NAME = re.compile(r"(\d+)-of-(\d+)\.(?:parquet|shards)")


def _task_table_of(output: Path, chunk: int | None, chunks: int) -> Path:
    """The task's table for a job writing ``output``; a chunk's output must be named as
    ``chunk_table_path`` names it."""
    if chunk is None:
        return output
    chunk_dir = output.parent
    task_table = chunk_dir.with_name(chunk_dir.name.removesuffix(".chunks") + ".parquet")
    if output != chunk_table_path(task_table, chunk, chunks):
        raise ValueError(
            f"chunk {chunk} of {chunks} must be written to {{task}}.chunks/{chunk}-of-{chunks}"
            f".parquet, not {str(output)!r}"
        )
    return task_table


def _other_chunkings(task_table: Path, chunks: int) -> tuple[list[Path], list[Path]]:
    """Rollout tables and shard directories the task left under a chunking other than
    ``chunks``: chunk tables and shards named for another K, the unchunked job's shards, and the
    task table itself when it was sampled in another number of chunks."""
    chunk_dir = sibling_dir(task_table, ".chunks")
    tables: list[Path] = []
    shard_dirs: list[Path] = []
    for path in sorted(chunk_dir.glob("*-of-*")) if chunk_dir.is_dir() else []:
        match = _CHUNK_NAME.fullmatch(path.name)
        if match and int(match.group(2)) != chunks:
            (tables if path.suffix == ".parquet" else shard_dirs).append(path)
    if chunks != 1:
        shard_dirs.append(shard_dir_for(task_table))
    if rollout_table_stamp(task_table)[1] not in (None, chunks):
        tables.append(task_table)
    return tables, shard_dirs


def _remove_other_chunkings(task_table: Path, chunks: int) -> None:
    """Once the task's table is written (stamped with ``chunks``), drop what other chunkings
    left: their prompts are in the table. This chunking's chunk tables stay (they are outputs)."""
    tables, shard_dirs = _other_chunkings(task_table, chunks)
    for path in tables:
        path.unlink(missing_ok=True)
    for path in shard_dirs:
        shutil.rmtree(path, ignore_errors=True)
    chunk_dir = sibling_dir(task_table, ".chunks")
    if chunk_dir.is_dir() and not any(chunk_dir.iterdir()):
        chunk_dir.rmdir()


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Framing(TypedDict, total=False):
    """How a variant's prompts are framed and where its rollouts stop, as the family's and the
    task's config give them (every key optional; see :func:`sample_task`)."""

    chat_template_kwargs: Mapping[str, Any] | None
    system_prompt: str | None
    prompt_template: str | None
    stop_tokens_containing: Sequence[str]
    stop_sequences: Sequence[str]


@dataclass(frozen=True)
class PreparedTask:
    """What a job settles before it samples: its prompts formatted for the model, where their
    rollouts end, and the fingerprint each prompt's shard is written and found with."""

    files: ModelFiles
    prompts: list[dict[str, Any]]
    token_ids: list[list[int]]  # each prompt as the model is sampled from it
    eos_ids: list[int]
    stops: StopSequences | None
    fingerprints: list[str]


def prepare_task(
    model_dir: str | Path,
    prompts_path: str | Path,
    variant: str,
    settings: SamplingSettings,
    *,
    chunk: int | None = None,
    **framing: Unpack[Framing],
) -> PreparedTask:
    """Read the model's small files, format every prompt of the task (or of its ``chunk``) and
    check it fits the context, and fingerprint each one; no weight is loaded (arguments as for
    :func:`sample_task`)."""
    unknown = sorted(set(framing) - Framing.__optional_keys__)
    if unknown:  # a misspelt key would otherwise be dropped without a word
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")

    files = read_model_files(model_dir)
    prompts = [asdict(prompt) for prompt in read_prompts(prompts_path)]
    if chunk is not None:
        prompts = chunk_prompts(prompts, chunk, settings.chunks)
    chat = _chat_options(files, variant, framing)
    eos_ids = _end_ids(files, variant, chat, framing.get("stop_tokens_containing", ()))
    sequences = framing.get("stop_sequences", ())
    stops = StopSequences(files.tokenizer, sequences) if sequences else None
    token_ids: list[list[int]] = []
    for record in prompts:
        ids = format_prompt(
            files.tokenizer,
            record["prompt"],
            variant,
            prompt_id=record["prompt_id"],
            prompt_template=framing.get("prompt_template"),
            document=record.get("document"),
            **chat,
        )
        check_prompt_fits(files, len(ids), settings, record["prompt_id"])
        token_ids.append(ids)

    shared = _shared_fingerprint(files, variant, settings, eos_ids, chat, stops)
    fingerprints = [
        fingerprint(
            {**shared, "prompt_id": r["prompt_id"], "prompt": r["prompt"], "prompt_ids": ids}
        )
        for r, ids in zip(prompts, token_ids)
    ]
    return PreparedTask(files, prompts, token_ids, eos_ids, stops, fingerprints)


def _chat_options(files: ModelFiles, variant: str, framing: Framing) -> dict[str, Any]:
    """The chat options the prompts are formatted with, checked against the chat template of a
    finetuned variant; the base variant, sampled from the raw text, may set none."""
    chat = {
        "chat_template_kwargs": dict(framing.get("chat_template_kwargs") or {}),
        "system_prompt": framing.get("system_prompt"),
    }
    if variant == "finetuned":
        check_chat_options(files.tokenizer, **chat)
    elif chat["chat_template_kwargs"] or chat["system_prompt"] is not None:
        raise ValueError(
            "chat_template_kwargs and system_prompt apply to the finetuned variant only (the base "
            "variant is sampled from the raw prompt text)"
        )
    return chat


def _end_ids(
    files: ModelFiles,
    variant: str,
    chat: Mapping[str, Any],
    stop_tokens_containing: Sequence[str],
) -> list[int]:
    """The token ids that end a rollout: the model's end-of-sequence ids, a chat template's
    end-of-turn token, and every token containing one of ``stop_tokens_containing``."""
    eos_ids = eos_token_ids(files, files.tokenizer)
    if variant == "finetuned":
        # A chat model's answer ends with its template's end-of-turn token, which some
        # generation configs leave out of eos_token_id.
        eos_ids = sorted(set(eos_ids) | set(end_of_turn_ids(files.tokenizer, **chat)))
    if stop_tokens_containing:
        found = tokens_containing(files.tokenizer, stop_tokens_containing)
        eos_ids = sorted(set(eos_ids) | set(found))
    return eos_ids


def _shared_fingerprint(
    files: ModelFiles,
    variant: str,
    settings: SamplingSettings,
    eos_ids: list[int],
    chat: Mapping[str, Any],
    stops: StopSequences | None,
) -> dict[str, Any]:
    """What every prompt's fingerprint holds besides the prompt itself."""
    import transformers

    # Both backends sample on the device and in the dtype these resolve to (the vLLM one asks
    # its engine for them), so the shards' fingerprints name what was really used.
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    shared: dict[str, Any] = {
        "format": SHARD_FORMAT_VERSION,
        "settings": {
            key: value
            for key, value in settings.to_dict().items()
            if key not in TOKEN_NEUTRAL_SETTINGS
        },
        "device_type": device.type,
        "dtype": str(dtype),
        "model": model_identity(files.directory),
        "variant": variant,
        "eos_ids": eos_ids,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if variant == "finetuned":
        shared["chat"] = chat
    if stops is not None:
        # Only when set, so that the fingerprints of runs without stop sequences stay as they were.
        shared["stop_sequences"] = list(stops.sequences)
    return shared


def resume_task(
    task: PreparedTask,
    output: Path,
    task_table: Path,
    chunks: int,
    log: logging.Logger,
) -> list[pa.Table | None]:
    """What is sampled already: per prompt, its rows from this job's valid shard, else from
    what another chunking of the task left, else None (still to sample)."""
    shard_dir = shard_dir_for(output)
    tables: list[pa.Table | None] = [
        read_valid_shard(shard_path(shard_dir, r["prompt_id"]), fp, log)
        for r, fp in zip(task.prompts, task.fingerprints)
    ]
    total = len(task.prompts)
    reused = sum(t is not None for t in tables)
    if reused:
        log.info("resuming: %d/%d prompts already sampled in %s", reused, total, shard_dir)
    if reused < total:
        _reuse_other_chunkings(task_table, chunks, task.prompts, task.fingerprints, tables, log)
    return tables


def run_task(
    task: PreparedTask,
    settings: SamplingSettings,
    tables: list[pa.Table | None],
    shard_dir: Path,
    log: logging.Logger,
) -> None:
    """Sample the prompts that ``tables`` lacks with the configured backend; each prompt's shard
    is written, and its entry of ``tables`` filled, as soon as its last rollout ends."""
    todo = [index for index, table in enumerate(tables) if table is None]
    if not todo:
        return
    backend = make_backend(settings.backend, task.files, settings, task.eos_ids, task.stops)
    total = len(tables)
    reused = total - len(todo)
    started = time.perf_counter()
    counts = {"done": reused, "tokens": 0, "wasted": 0}

    def on_done(position: int, rows: list[dict[str, Any]]) -> None:
        index = todo[position]
        prompt_id = task.prompts[index]["prompt_id"]
        if task.stops is not None:
            _cut_at_stops(rows, task.stops, prompt_id, counts, log)
        for row in rows:
            row["text"] = task.files.tokenizer.decode(row["token_ids"], skip_special_tokens=True)
        tables[index] = write_shard(
            shard_path(shard_dir, prompt_id), rows, task.fingerprints[index], prompt_id
        )
        counts["done"] += 1
        new_tokens = sum(row["n_steps"] for row in rows)
        counts["tokens"] += new_tokens
        seconds = time.perf_counter() - started
        sampled_here = counts["done"] - reused
        log.info(
            "prompt %d/%d (%s) done: %d tokens; %.1f tokens/s overall; ETA %s",
            counts["done"],
            total,
            prompt_id,
            new_tokens,
            counts["tokens"] / seconds if seconds > 0 else float("nan"),
            _format_seconds(seconds / sampled_here * (total - counts["done"])),
        )

    backend.sample_prompts(
        [PromptJob(task.prompts[i]["prompt_id"], task.token_ids[i]) for i in todo], on_done
    )


def _cut_at_stops(
    rows: list[dict[str, Any]],
    stops: StopSequences,
    prompt_id: str,
    counts: dict[str, int],
    log: logging.Logger,
) -> None:
    """Cut ``rows`` in place at their first stop sequence. The canopy backend stopped its rows
    already (nothing is cut); a backend that cannot match text returns them longer, and the
    steps past the stop are wasted."""
    wasted = 0
    for number, row in enumerate(rows):
        rows[number], cut = cut_at_stop(row, stops)
        wasted += cut
    if wasted:
        counts["wasted"] += wasted
        log.info(
            "prompt %s: cut %d steps sampled past a stop sequence (%d so far)",
            prompt_id,
            wasted,
            counts["wasted"],
        )


def sample_task(
    model_dir: str | Path,
    prompts_path: str | Path,
    variant: str,
    settings: SamplingSettings,
    output: str | Path,
    *,
    chunk: int | None = None,
    progress: logging.Logger | None = None,
    **framing: Unpack[Framing],
) -> pd.DataFrame:
    """Sample every prompt of a task (or of its ``chunk``-th of ``settings.chunks`` slices) and
    write the rollout table to ``output`` (atomically): :func:`prepare_task`, then
    :func:`resume_task`, then :func:`run_task` for the rest.

    Resumable: each finished prompt is stored in ``<output>.shards/`` with a fingerprint of its
    settings, model files, variant, chat options and prompt; a rerun reuses the valid shards and
    samples the rest. The shard directory is removed once ``output`` is written. A chunk's
    ``output`` must be ``chunk_table_path(task_table, chunk, settings.chunks)``; prompts the task
    finished under another chunking are taken from what that chunking left (see the module).
    ``chat_template_kwargs`` and ``system_prompt`` shape the finetuned variant's chat template,
    ``prompt_template`` the base variant's document; rollouts also end at every token whose text
    contains one of ``stop_tokens_containing`` (they join the end-of-sequence ids, and with them
    the shards' fingerprints), and at the token that completes one of ``stop_sequences`` in their
    decoded text (:mod:`canopy.sampling.stops`; in the fingerprints when set). A backend that
    cannot stop on text hands back longer rows, cut here at the same token.
    """
    log = progress or logger
    output = Path(output)
    chunks = settings.chunks if chunk is not None else 1
    task_table = _task_table_of(output, chunk, chunks)
    task = prepare_task(model_dir, prompts_path, variant, settings, chunk=chunk, **framing)
    tables = resume_task(task, output, task_table, chunks, log)
    shard_dir = shard_dir_for(output)
    run_task(task, settings, tables, shard_dir, log)

    total = len(task.prompts)
    done = [t for t in tables if t is not None]
    if len(done) != total:
        raise RuntimeError(f"{total - len(done)} prompt(s) were never sampled")
    stamps = dict(zip((r["prompt_id"] for r in task.prompts), task.fingerprints))
    table = write_rollout_table(output, done, stamps, chunks)
    shutil.rmtree(shard_dir, ignore_errors=True)
    if chunk is None:
        _remove_other_chunkings(task_table, chunks)
    log.info("wrote %d rollouts of %d prompts to %s", table.num_rows, total, output)
    return table.to_pandas()


def _reuse_other_chunkings(
    task_table: Path,
    chunks: int,
    prompts: Sequence[Mapping[str, Any]],
    fingerprints: Sequence[str],
    tables: list[pa.Table | None],
    log: logging.Logger,
) -> None:
    """Fill ``tables``' missing prompts from what another chunking of the task left."""
    other_tables, other_shard_dirs = _other_chunkings(task_table, chunks)
    missing = {r["prompt_id"]: index for index, r in enumerate(prompts) if tables[index] is None}
    filled = 0
    for shard_dir in other_shard_dirs:
        for prompt_id, index in list(missing.items()):
            found = read_valid_shard(shard_path(shard_dir, prompt_id), fingerprints[index], log)
            if found is not None:
                tables[index] = found
                del missing[prompt_id]
                filled += 1
    for path in other_tables:
        wanted = {prompt_id: fingerprints[index] for prompt_id, index in missing.items()}
        for prompt_id, found in read_reusable_prompts(path, wanted).items():
            tables[missing.pop(prompt_id)] = found
            filled += 1
    if filled:
        log.info(
            "reusing %d/%d prompts sampled under another chunking of this task (%s); the rest "
            "are sampled",
            filled,
            len(prompts),
            ", ".join(str(p) for p in [*other_shard_dirs, *other_tables] if p.exists()),
        )


def gather_rollouts(
    chunk_paths: Sequence[str | Path],
    prompts_path: str | Path,
    output: str | Path,
    *,
    progress: logging.Logger | None = None,
) -> pd.DataFrame:
    """Concatenate the chunk tables (in chunk order) into the task's rollout table.

    Checks that together they hold exactly the prompts file's prompts in its order, so a chunk
    table left from another prompt set is an error rather than a silently wrong table.
    """
    log = progress or logger
    prompts = [asdict(prompt) for prompt in read_prompts(prompts_path)]
    tables = []
    stamps: dict[str, str] = {}
    for path in chunk_paths:
        table = pq.read_table(path)
        stamps.update(stamp_of(table.schema)[0])
        tables.append(table.replace_schema_metadata(None))
        if tables[-1].schema != ROLLOUT_SCHEMA:
            raise ValueError(f"chunk table {str(path)!r} does not have the rollout table's columns")
    found = list(dict.fromkeys(pid for t in tables for pid in t.column("prompt_id").to_pylist()))
    expected = [record["prompt_id"] for record in prompts]
    if found != expected:
        raise ValueError(
            f"the chunk tables {[str(p) for p in chunk_paths]} hold prompts {found[:5]}... but "
            f"{str(prompts_path)!r} lists {expected[:5]}...: resample the chunks (delete them)"
        )
    table = write_rollout_table(Path(output), tables, stamps, len(tables))
    _remove_other_chunkings(Path(output), len(tables))
    log.info(
        "gathered %d rollouts of %d prompts from %d chunks", table.num_rows, len(found), len(tables)
    )
    return table.to_pandas()
