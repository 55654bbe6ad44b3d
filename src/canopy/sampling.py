"""Rollouts with the exact entropy of every sampling step (resumable, batch-independent).

For every prompt we draw M rollouts from a causal LM and record, at every step t of every rollout,
the entropy h_t of the distribution q_t the token was actually drawn from (after temperature,
top-k and top-p, renormalised) and log q_t(y_t) of the drawn token (DESIGN.md section 1).

How the loop works (``sample_prompt``):

* The prompt prefix is run once with batch size 1; its KV cache is expanded to the rollouts of a
  batch (all M, or ``max_batch_rows`` at a time). All rows share the prompt, so no padding is ever
  needed and position ids follow from the cache length.
* Only the last position's logits are computed (``logits_to_keep=1``), and the processed
  distribution is built per step from a [rows, vocab] slice: nothing of size vocab x steps is kept.
* A rollout that draws an EOS id (several are supported) leaves the batch: its cache rows are
  dropped, so finished rollouts stop costing compute.
* Randomness: a per-prompt seed is derived from (seed, prompt_id) with SHA-256 (stable across
  processes, unlike ``hash()``), and at step t one uniform per rollout is drawn for all M rollouts
  from a generator seeded by (prompt seed, t). Rollout i uses the i-th uniform and samples by
  inverse CDF, so its random number depends only on (prompt seed, i, t): compaction, batch size
  and the order or subset of prompts do not change which token it draws. (The model's own kernels
  may round differently for different batch shapes, at the 1e-7 level on CPU; tokens then agree
  except when a uniform lands within that distance of a CDF boundary, and entropies agree to
  about 1e-6. A rerun with the same settings is bit-for-bit identical.)

Context length: a prompt must leave room for ``max_new_tokens`` (prompt tokens + max_new_tokens
<= the model's ``max_position_embeddings``). We raise instead of capping max_new_tokens for that
prompt, because a silently lower cap would change what "truncated" means for some prompts only.
``sample_task`` checks every prompt before sampling any, so such a problem fails in seconds.

``sample_task`` writes each finished prompt as an atomic shard into ``<output>.shards/`` (a sibling
directory that is not a Snakemake output, so it survives a killed job) together with a fingerprint
of everything that determines its rows; a rerun reuses only shards whose fingerprint matches and
assembles the final table from the shards, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from canopy.io import atomic_path
from canopy.modeling import (
    VARIANTS,
    LoadedModel,
    check_model_dir,
    context_length,
    eos_token_ids,
    format_prompt,
    load_model,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "SamplingSettings",
    "NonFiniteLogitsError",
    "PromptTooLongError",
    "ROLLOUT_SCHEMA",
    "processed_distribution",
    "processed_log_distribution",
    "prompt_seed",
    "step_uniforms",
    "sample_prompt",
    "read_prompts",
    "shard_dir_for",
    "sample_task",
]

logger = logging.getLogger(__name__)

#: Bump when the meaning of a shard's rows changes, so that old shards are never reused.
SHARD_FORMAT_VERSION = 1

BACKENDS: tuple[str, ...] = ("canopy", "vllm")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or +inf logits (usually fp16 overflow)."""


class PromptTooLongError(ValueError):
    """A prompt leaves no room for max_new_tokens within the model's context."""


@dataclass(frozen=True)
class SamplingSettings:
    """One ``sampling.<name>`` entry of config.yaml (the paper's defaults)."""

    rollouts: int = 100
    temperature: float = 1.0
    top_k: int = 100  # 0 turns top-k off
    top_p: float = 1.0
    max_new_tokens: int = 4000
    seed: int = 42
    backend: str = "canopy"
    device: str = "auto"
    dtype: str = "auto"
    max_batch_rows: int = 0  # 0: all rollouts of a prompt in one batch

    def __post_init__(self) -> None:
        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"sampling setting {name} must be an integer >= {minimum}, got {value!r}"
                )

        def number(name: str) -> float:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"sampling setting {name} must be a finite number, got {value!r}")
            return float(value)

        integer("rollouts", 1)
        integer("top_k", 0)
        integer("max_new_tokens", 1)
        integer("seed", -(2**63))
        integer("max_batch_rows", 0)
        # Store floats as floats: YAML's `temperature: 1` must fingerprint like 1.0.
        object.__setattr__(self, "temperature", number("temperature"))
        object.__setattr__(self, "top_p", number("top_p"))
        if number("temperature") <= 0:
            raise ValueError(f"sampling setting temperature must be > 0, got {self.temperature!r}")
        top_p = number("top_p")
        if not 0 < top_p <= 1:
            raise ValueError(f"sampling setting top_p must be in (0, 1], got {self.top_p!r}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"sampling setting backend must be one of {BACKENDS}, got {self.backend!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"sampling setting dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"sampling setting device must be auto, cpu or cuda[:i], got {self.device!r}"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SamplingSettings:
        """Settings from a config mapping; unknown keys are an error that names them."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"unknown sampling setting(s) {', '.join(unknown)}; known keys are "
                f"{', '.join(sorted(known))}"
            )
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# The distribution actually sampled from


def processed_log_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [B, K] (float32, -inf where dropped) and token ids [B, K] of the processed
    distribution: temperature, then top-k, then top-p (nucleus), renormalised.

    With top-k on, K = top_k and the candidates come sorted by decreasing probability; with both
    filters off, K = vocab and the ids are simply 0..V-1. Top-p keeps the smallest prefix of the
    sorted candidates whose mass reaches ``top_p`` (the token that crosses it is kept).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    if top_k == 0 and top_p >= 1.0:
        ids = torch.arange(vocab, device=scaled.device).expand_as(scaled)
        return torch.log_softmax(scaled, dim=-1), ids
    if 0 < top_k < vocab:
        values, ids = torch.topk(scaled, top_k, dim=-1, sorted=True)
    else:
        values, ids = torch.sort(scaled, dim=-1, descending=True)
    log_q = torch.log_softmax(values, dim=-1)
    if top_p < 1.0:
        q = log_q.exp()
        mass_before = torch.cumsum(q, dim=-1) - q
        values = values.masked_fill(mass_before >= top_p, float("-inf"))
        log_q = torch.log_softmax(values, dim=-1)
    return log_q, ids


def processed_distribution(
    logits: torch.Tensor, settings: SamplingSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [B, K] (float32, rows sum to one, zeros where top-p dropped a candidate) and
    the token ids [B, K] they belong to: the distribution each rollout actually samples from."""
    log_q, ids = processed_log_distribution(
        logits, settings.temperature, settings.top_k, settings.top_p
    )
    return log_q.exp(), ids


def _entropy_from_log(log_q: torch.Tensor) -> torch.Tensor:
    """-sum q log q per row, with 0 log 0 = 0 (dropped candidates carry -inf)."""
    q = log_q.exp()
    return -torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(dim=-1)


def _inverse_cdf(q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column index drawn from each row of ``q`` by inverse CDF with the given uniforms in [0, 1).

    The cumulative sum is taken in float64; searching with ``right=True`` never lands on a
    zero-probability column, and the clamp guards the case where rounding puts u * total on the
    total itself.
    """
    cdf = torch.cumsum(q.double(), dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    positive = q > 0
    last_positive = q.shape[-1] - 1 - torch.argmax(positive.flip(-1).to(torch.int8), dim=-1)
    return torch.minimum(choice, last_positive)


# --------------------------------------------------------------------------------------------
# Randomness that depends only on (seed, prompt_id, rollout, step)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A 63-bit seed for one prompt, stable across processes and machines (SHA-256)."""
    digest = hashlib.sha256(f"canopy-sampling\x00{int(seed)}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_uniforms(seed_of_prompt: int, step: int, rollouts: int) -> np.ndarray:
    """The uniforms in [0, 1) of all M rollouts at step ``step`` (0-based), float64.

    Drawn for all M rollouts from a generator seeded by (prompt seed, step), so rollout i's number
    at step t is the same however the rollouts are batched or which of them are still running.
    """
    return np.random.default_rng([seed_of_prompt, step]).random(rollouts)


# --------------------------------------------------------------------------------------------
# One prompt


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


def _output_cache(output: Any) -> Any:
    # transformers 5 names the returned cache `cache`; 4.x called it `past_key_values`.
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    if cache is None:
        raise RuntimeError("the model returned no KV cache; it cannot be sampled incrementally")
    return cache


def check_prompt_fits(
    model: Any, prompt_length: int, settings: SamplingSettings, prompt_id: str
) -> None:
    """Raise :class:`PromptTooLongError` if the prompt leaves no room for max_new_tokens.

    ``model`` is anything with a transformers ``config`` attribute (a model or a light holder).
    """
    limit = context_length(model)
    if limit is not None and prompt_length + settings.max_new_tokens > limit:
        raise PromptTooLongError(
            f"prompt {prompt_id!r} has {prompt_length} tokens, which with max_new_tokens="
            f"{settings.max_new_tokens} exceeds the model's context of {limit} tokens "
            "(max_position_embeddings). Shorten or drop the prompt, or lower max_new_tokens."
        )


def sample_prompt(
    loaded: LoadedModel,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    prompt_id: str,
    eos_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Draw ``settings.rollouts`` rollouts of one formatted prompt.

    Returns one dict per rollout with the rollout-table columns (``text`` left empty: the caller
    decodes), ordered by ``sample``.
    """
    if len(prompt_ids) == 0:
        raise ValueError(f"prompt {prompt_id!r} has no tokens")
    if not eos_ids:
        raise ValueError(f"prompt {prompt_id!r}: no EOS ids given")
    model = loaded.model
    check_prompt_fits(model, len(prompt_ids), settings, prompt_id)
    rollouts = settings.rollouts
    rows_per_batch = settings.max_batch_rows or rollouts
    seed_of_prompt = prompt_seed(settings.seed, prompt_id)
    eos_tensor = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long)

    tokens: list[list[int]] = [[] for _ in range(rollouts)]
    entropies: list[list[float]] = [[] for _ in range(rollouts)]
    logprobs: list[list[float]] = [[] for _ in range(rollouts)]
    hit_eos = [False] * rollouts

    with torch.inference_mode():
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=loaded.device)
        prefill = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill_cache = _output_cache(prefill)
        prefill_logits = prefill.logits[:, -1, :]
        starts = list(range(0, rollouts, rows_per_batch))
        for batch_number, start in enumerate(starts):
            samples = np.arange(start, min(start + rows_per_batch, rollouts))
            # The last batch may consume the prefill cache itself; earlier ones work on copies.
            cache = (
                prefill_cache if batch_number == len(starts) - 1 else copy.deepcopy(prefill_cache)
            )
            cache.batch_repeat_interleave(len(samples))
            logits = prefill_logits.expand(len(samples), -1)
            for step in range(settings.max_new_tokens):
                log_q, ids = processed_log_distribution(
                    logits, settings.temperature, settings.top_k, settings.top_p
                )
                uniforms = torch.from_numpy(step_uniforms(seed_of_prompt, step, rollouts)[samples])
                choice = _inverse_cdf(log_q.exp(), uniforms.to(log_q.device)).unsqueeze(-1)
                drawn = ids.gather(-1, choice).squeeze(-1)
                drawn_log_q = log_q.gather(-1, choice).squeeze(-1)
                h = _entropy_from_log(log_q)
                bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)
                bad |= ~torch.isfinite(h) | ~torch.isfinite(drawn_log_q)
                # One transfer per step: tokens, entropies, log-probs and the sanity flags.
                drawn_cpu = drawn.cpu()
                h_cpu = h.double().cpu().numpy()
                lq_cpu = drawn_log_q.double().cpu().numpy()
                if bool(bad.any()):
                    bad_samples = samples[bad.cpu().numpy()].tolist()
                    raise NonFiniteLogitsError(
                        f"prompt {prompt_id!r}: non-finite logits (NaN or +inf) at step {step + 1} "
                        f"for rollout(s) {bad_samples[:10]}. This usually means float16 overflow: "
                        "try dtype bfloat16 or float32."
                    )
                finished = torch.isin(drawn_cpu, eos_tensor).numpy()
                for row, sample in enumerate(samples.tolist()):
                    tokens[sample].append(int(drawn_cpu[row]))
                    entropies[sample].append(float(h_cpu[row]))
                    logprobs[sample].append(float(lq_cpu[row]))
                    if finished[row]:
                        hit_eos[sample] = True
                if step + 1 == settings.max_new_tokens or finished.all():
                    break
                next_tokens = drawn
                if finished.any():
                    keep = np.flatnonzero(~finished)
                    keep_index = torch.from_numpy(keep).to(loaded.device)
                    cache.batch_select_indices(keep_index)
                    next_tokens = drawn.index_select(0, keep_index)
                    samples = samples[keep]
                output = model(
                    input_ids=next_tokens.unsqueeze(-1),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = _output_cache(output)
                logits = output.logits[:, -1, :]
            del cache

    rows = []
    for sample in range(rollouts):
        rows.append(
            {
                "prompt_id": prompt_id,
                "sample": sample,
                "prompt_tokens": len(prompt_ids),
                "n_steps": len(tokens[sample]),
                "hit_eos": hit_eos[sample],
                "truncated": not hit_eos[sample],
                "step_entropy": entropies[sample],
                "step_logprob": logprobs[sample],
                "sum_entropy": float(math.fsum(entropies[sample])),
                "sum_logprob": float(math.fsum(logprobs[sample])),
                "token_ids": tokens[sample],
                "text": "",
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# A task: prompts file in, rollout table out, resumable through shards


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompts of ``resources/prompts/{task}.jsonl``: one JSON object per line with at least
    ``prompt_id`` and ``prompt``; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist: run the data stage first"
        )
    prompts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
        if not isinstance(record, dict) or "prompt_id" not in record or "prompt" not in record:
            raise ValueError(f"{path}:{number}: each line needs the fields prompt_id and prompt")
        record["prompt_id"] = str(record["prompt_id"])
        if record["prompt_id"] in seen:
            raise ValueError(f"{path}:{number}: duplicate prompt_id {record['prompt_id']!r}")
        seen.add(record["prompt_id"])
        prompts.append(record)
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def shard_dir_for(output: str | Path) -> Path:
    """``results/.../{task}.parquet`` -> ``results/.../{task}.shards/``."""
    output = Path(output)
    stem = output.name[: -len(".parquet")] if output.name.endswith(".parquet") else output.name
    return output.with_name(stem + ".shards")


_SMALL_FILE = 64 * 2**20  # files up to this size are identified by content, larger by size + mtime


def model_identity(model_dir: str | Path) -> str:
    """A hash that changes whenever the model directory's files change.

    Small files (config, tokenizer, chat template, tiny weights) are hashed by content; large
    weight files by name, size and modification time, so that identifying an 8B model is instant.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        stat = file.stat()
        digest.update(f"{relative.as_posix()}\x00{stat.st_size}\x00".encode())
        if stat.st_size <= _SMALL_FILE:
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def _fingerprint(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _shard_path(shard_dir: Path, prompt_id: str) -> Path:
    # prompt ids may hold any character; the file name must not.
    return shard_dir / f"{hashlib.sha256(prompt_id.encode()).hexdigest()[:24]}.parquet"


def _read_valid_shard(path: Path, fingerprint: str) -> pa.Table | None:
    """The shard's rows if it exists and was written for exactly this fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None  # unreadable: resample (atomic writes make this very unlikely)
    metadata = table.schema.metadata or {}
    if metadata.get(b"canopy_fingerprint", b"").decode() != fingerprint:
        return None
    return table.replace_schema_metadata(None)


def _write_shard(
    path: Path, rows: list[dict[str, Any]], fingerprint: str, prompt_id: str
) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    stamped = table.replace_schema_metadata(
        {"canopy_fingerprint": fingerprint, "prompt_id": prompt_id}
    )
    with atomic_path(path) as tmp:
        pq.write_table(stamped, tmp)
    return table


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _lightweight_model_info(model_dir: Path) -> SimpleNamespace:
    """Config and generation config without the weights: enough for EOS ids and context length."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:  # no generation_config.json: the model config's eos is used
        generation_config = None
    return SimpleNamespace(config=config, generation_config=generation_config)


def sample_task(
    model_dir: str | Path,
    prompts_path: str | Path,
    variant: str,
    settings: SamplingSettings,
    output: str | Path,
    *,
    progress: logging.Logger | None = None,
) -> pd.DataFrame:
    """Sample every prompt of a task and write the rollout table to ``output`` (atomically).

    Resumable: each finished prompt is stored in ``<output>.shards/`` with a fingerprint of its
    settings, model files, variant and prompt; a rerun reuses the valid shards and samples the
    rest. The shard directory is removed once ``output`` is written. Every prompt is formatted and
    checked against the model's context before any is sampled.
    """
    import transformers
    from transformers import AutoTokenizer

    log = progress or logger
    model_dir = Path(model_dir)
    output = Path(output)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    check_model_dir(model_dir)
    prompts = read_prompts(prompts_path)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    info = _lightweight_model_info(model_dir)
    eos_ids = eos_token_ids(info, tokenizer)
    formatted: list[list[int]] = []
    for record in prompts:
        ids = format_prompt(tokenizer, record["prompt"], variant, prompt_id=record["prompt_id"])
        check_prompt_fits(info, len(ids), settings, record["prompt_id"])
        formatted.append(ids)

    if settings.backend == "canopy":
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
    else:
        device, dtype = torch.device("cuda"), settings.dtype

    shared = {
        "format": SHARD_FORMAT_VERSION,
        # max_batch_rows is left out on purpose: it does not change which tokens are drawn, and a
        # rerun after running out of memory should keep the prompts already done.
        "settings": {
            key: value
            for key, value in settings.to_dict().items()
            if key not in ("max_batch_rows", "device", "dtype")
        },
        "device_type": device.type,
        "dtype": str(dtype),
        "model": model_identity(model_dir),
        "variant": variant,
        "eos_ids": eos_ids,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    fingerprints = [
        _fingerprint(
            {**shared, "prompt_id": r["prompt_id"], "prompt": r["prompt"], "prompt_ids": ids}
        )
        for r, ids in zip(prompts, formatted)
    ]

    shard_dir = shard_dir_for(output)
    tables: list[pa.Table | None] = [
        _read_valid_shard(_shard_path(shard_dir, r["prompt_id"]), fp)
        for r, fp in zip(prompts, fingerprints)
    ]
    total = len(prompts)
    reused = sum(t is not None for t in tables)
    if reused:
        log.info("resuming: %d/%d prompts already sampled in %s", reused, total, shard_dir)

    sampler: Callable[[list[int], str], list[dict[str, Any]]] | None = None
    done, tokens_generated, seconds = reused, 0, 0.0
    for index, record in enumerate(prompts):
        if tables[index] is not None:
            continue
        if sampler is None:
            sampler = _make_sampler(model_dir, settings, eos_ids)
        prompt_id = record["prompt_id"]
        started = time.perf_counter()
        rows = sampler(formatted[index], prompt_id)
        for row in rows:
            row["text"] = tokenizer.decode(row["token_ids"], skip_special_tokens=True)
        tables[index] = _write_shard(
            _shard_path(shard_dir, prompt_id), rows, fingerprints[index], prompt_id
        )
        elapsed = time.perf_counter() - started
        done += 1
        seconds += elapsed
        new_tokens = sum(row["n_steps"] for row in rows)
        tokens_generated += new_tokens
        sampled_here = done - reused
        eta = seconds / sampled_here * (total - done)
        log.info(
            "prompt %d/%d (%s) done: %d tokens in %.1f s; %.1f tokens/s overall; ETA %s",
            done,
            total,
            prompt_id,
            new_tokens,
            elapsed,
            tokens_generated / seconds if seconds > 0 else float("nan"),
            _format_seconds(eta),
        )

    table = pa.concat_tables([t for t in tables if t is not None])
    with atomic_path(output) as tmp:
        pq.write_table(table, tmp)
    shutil.rmtree(shard_dir, ignore_errors=True)
    log.info("wrote %d rollouts of %d prompts to %s", table.num_rows, total, output)
    return table.to_pandas()


def _make_sampler(
    model_dir: Path, settings: SamplingSettings, eos_ids: list[int]
) -> Callable[[list[int], str], list[dict[str, Any]]]:
    """The per-prompt sampling function of the configured backend (the model is loaded here)."""
    if settings.backend == "vllm":
        from canopy.vllm_backend import VllmSampler

        return VllmSampler(model_dir, settings, eos_ids).sample_prompt
    loaded = load_model(model_dir, device=settings.device, dtype=settings.dtype)

    def sample(prompt_ids: list[int], prompt_id: str) -> list[dict[str, Any]]:
        return sample_prompt(loaded, prompt_ids, settings, prompt_id=prompt_id, eos_ids=eos_ids)

    return sample
