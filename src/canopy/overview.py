"""The report's opening section, rendered from the run's own results.

The text is ``workflow/report/workflow.rst``, a Jinja template that Snakemake's report also renders
(with ``snakemake.config`` only, before a run has produced anything). Rendered here, it also gets
what the run measured: how each model was made (its record, :mod:`canopy.sources`) and the share of
rollouts that hit ``max_new_tokens`` per model and task, read from the rollout tables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from canopy.io import atomic_path
from canopy.sources.record import LEGACY_RECORD_FILES, read_record

__all__ = ["truncation_rows", "model_rows", "render_intro", "write_intro"]

#: The rollout table column that marks a rollout cut at ``max_new_tokens``.
TRUNCATED = "truncated"


def truncation_rows(
    rollouts: Mapping[tuple[str, str, str], str | os.PathLike[str]],
) -> list[dict[str, Any]]:
    """Per (family, variant, task): rollouts, truncated share and mean length, from the tables."""
    import pyarrow.parquet as pq

    rows = []
    for (family, variant, task), path in rollouts.items():
        table = pq.read_table(path, columns=[TRUNCATED, "n_steps"]).to_pydict()
        n = len(table[TRUNCATED])
        rows.append(
            {
                "family": family,
                "variant": variant,
                "task": task,
                "rollouts": n,
                "truncated": sum(bool(t) for t in table[TRUNCATED]),
                "rate": sum(bool(t) for t in table[TRUNCATED]) / n if n else float("nan"),
                "mean_length": sum(table["n_steps"]) / n if n else float("nan"),
            }
        )
    return rows


def model_rows(
    models: Mapping[tuple[str, str], str | os.PathLike[str]], sources: Mapping[tuple[str, str], str]
) -> list[dict[str, Any]]:
    """Per (family, variant): where the model came from and, for a model trained here, its
    training record (architecture, tokenizer, size, steps, final loss)."""
    rows = []
    for (family, variant), directory in models.items():
        row: dict[str, Any] = {
            "family": family,
            "variant": variant,
            "source": sources[family, variant],
        }
        # The record leaf alone, not the registry: the report's environment has no model
        # libraries, which the registry's fetching and converting kinds import.
        kind = sources[family, variant]
        legacy = [LEGACY_RECORD_FILES[kind]] if kind in LEGACY_RECORD_FILES else []
        record = read_record(directory, source=kind, legacy=legacy)
        # A training run's record names its stage; a fetch's or a conversion's has none to show.
        if record is not None and "stage" in record:
            recipe = record.get("recipe", {})
            steps_key = "pretrain_steps" if record.get("stage") == "pretrain" else "sft_steps"
            row.update(
                stage=record.get("stage"),
                architecture=recipe.get("architecture"),
                tokenizer=recipe.get("tokenizer"),
                parameters=record.get("parameters"),
                vocab_size=record.get("vocab_size"),
                layers=recipe.get("num_layers"),
                hidden=recipe.get("hidden_size"),
                steps=recipe.get(steps_key),
                examples=record.get("documents", record.get("pairs")),
                final_loss=record.get("final_loss"),
                seconds=record.get("seconds"),
            )
        rows.append(row)
    return rows


def render_intro(template: str, config: Mapping[str, Any], **measured: Any) -> str:
    """``template`` rendered with ``snakemake.config`` (as Snakemake's report does) and the
    measured values as further variables."""
    import jinja2

    class _Snakemake:  # the one attribute Snakemake's report passes to the global description
        pass

    _Snakemake.config = dict(config)
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(template).render(snakemake=_Snakemake, **measured)


def write_intro(
    template_path: str | os.PathLike[str],
    config: Mapping[str, Any],
    rollouts: Mapping[tuple[str, str, str], str | os.PathLike[str]],
    models: Mapping[tuple[str, str], str | os.PathLike[str]],
    sources: Mapping[tuple[str, str], str],
    output: str | os.PathLike[str],
    *,
    sampling: str,
) -> dict[str, Any]:
    """Render the report's opening section for one sampling setting and write it atomically;
    returns the measured values it was rendered with."""
    truncation = truncation_rows(rollouts)
    total = sum(row["rollouts"] for row in truncation)
    measured = {
        "sampling_name": sampling,
        "truncation": truncation,
        "truncation_overall": sum(row["truncated"] for row in truncation) / total if total else 0.0,
        "truncation_worst": max(truncation, key=lambda row: row["rate"]) if truncation else None,
        "models": model_rows(models, sources),
    }
    text = render_intro(Path(template_path).read_text(), config, **measured)
    with atomic_path(output) as tmp:
        Path(tmp).write_text(text)
    return measured


def describe_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as aligned plain text (for the job's log)."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(_cell(r.get(k))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(_cell(r.get(k)).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
