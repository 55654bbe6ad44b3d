"""What every figure shares besides its look: table loading and small helpers (the settings
models are in canopy.config.figures).

Figure functions take plain DataFrames (the concatenation of the per-(family, variant, task)
tables with those three columns added), so a notebook or a test can draw them from synthetic
frames; :func:`read_matrix_tables` builds such a frame from the workflow's files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from matplotlib.figure import Figure

from canopy.config import VARIANTS
from canopy.config.figures import FigureSettings
from canopy.figures.style import save_figure

__all__ = [
    "TableKey",
    "FilePath",
    "TablePaths",
    "Config",
    "settings_for",
    "renderer",
    "FigureSettings",
    "keyed_paths",
    "read_matrix_tables",
    "require_columns",
    "check_variants",
    "ordered_families",
    "ordered_tasks",
    "drawn_matrix",
    "warn_left_out",
    "standard_error",
]

#: (family, variant, task) of one table of the experiment matrix.
TableKey = tuple[str, str, str]
#: A file a figure reads or writes.
FilePath = str | os.PathLike[str]
#: The per-(family, variant, task) tables a figure reads.
TablePaths = Mapping[TableKey, FilePath]
#: A figure's config block (``figures.<name>``), as the workflow passes it.
Config = Mapping[str, Any]

_S = TypeVar("_S", bound=FigureSettings)


def settings_for(cls: type[_S], settings: Config | _S | None) -> _S:
    """``settings`` when it is a ``cls`` already, else ``cls`` built from the config block."""
    return settings if isinstance(settings, cls) else cls.from_config(settings)


def renderer(
    settings_class: type[_S],
    plot: Callable[..., Figure],
    columns: Sequence[str] | Callable[[_S], Sequence[str]],
    what: str,
) -> Callable[..., Figure]:
    """The ``render_<figure>`` function of a figure drawn from the experiment matrix's tables.

    ``render(paths, settings, pdf, png, **options)`` builds the settings from a config block
    (:func:`settings_for`), reads ``columns`` (or ``columns(settings)``) of the tables at
    ``paths`` (:func:`read_matrix_tables`), draws with ``plot(frame, settings, **options)`` and
    writes the PDF and the PNG.
    """

    def render(
        paths: TablePaths, settings: Config | _S, pdf: FilePath, png: FilePath, **options: Any
    ) -> Figure:
        settings = settings_for(settings_class, settings)
        wanted = columns(settings) if callable(columns) else columns
        figure = plot(read_matrix_tables(paths, columns=list(wanted)), settings, **options)
        return save_figure(figure, pdf, png, dpi=settings.dpi)

    render.__name__ = render.__qualname__ = f"render_{settings_class.figure}"
    render.__module__ = plot.__module__
    render.__doc__ = f"Read {what} of the tables, draw the figure and write it as PDF and PNG."
    return render


def keyed_paths(
    matrix: Sequence[Sequence[str]], paths: Sequence[str | os.PathLike[str]]
) -> dict[TableKey, str | os.PathLike[str]]:
    """Pair the rule's ``params.matrix`` (family, variant, task triples) with its input paths."""
    if len(matrix) != len(paths):
        raise ValueError(
            f"{len(matrix)} (family, variant, task) keys but {len(paths)} input files: "
            "the rule's params.matrix and its input list must have the same order and length"
        )
    keyed: dict[TableKey, str | os.PathLike[str]] = {}
    for key, path in zip(matrix, paths):
        family, variant, task = key
        keyed[(str(family), str(variant), str(task))] = path
    return keyed


def read_matrix_tables(
    paths: Mapping[TableKey, str | os.PathLike[str]],
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Concatenate one parquet table per (family, variant, task), adding those three columns.

    Only ``columns`` are read (rollout tables hold per-step lists and text and can be large).
    A table that lacks one of them raises an error naming the file and the missing columns.
    """
    if not paths:
        raise ValueError("no input tables were given")
    frames = []
    for (family, variant, task), path in paths.items():
        if variant not in VARIANTS:
            raise ValueError(f"{path}: variant {variant!r} is not one of {', '.join(VARIANTS)}")
        if columns is not None:
            present = set(pq.read_schema(path).names)
            missing = [c for c in columns if c not in present]
            if missing:
                raise ValueError(
                    f"{path} lacks column(s) {', '.join(missing)} "
                    f"(it has {', '.join(sorted(present))}); "
                    "rebuild it with the current version of the stage that writes it"
                )
        table = pd.read_parquet(path, columns=list(columns) if columns is not None else None)
        table.insert(0, "task", task)
        table.insert(0, "variant", variant)
        table.insert(0, "family", family)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise a clear error when ``frame`` lacks any of ``columns``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"the {what} table lacks column(s) {', '.join(missing)}; "
            f"it has {', '.join(map(str, frame.columns))}"
        )


def check_variants(frame: pd.DataFrame, what: str) -> list[str]:
    """The variants present in ``frame`` in drawing order; unknown variant names raise."""
    present = set(frame["variant"].astype(str))
    unknown = sorted(present - set(VARIANTS))
    if unknown:
        raise ValueError(
            f"the {what} table has variant(s) {', '.join(unknown)}; expected {', '.join(VARIANTS)}"
        )
    return [v for v in VARIANTS if v in present]


def ordered_families(frame: pd.DataFrame) -> list[str]:
    """Families in the order they first appear (the config's order when loaded by the workflow)."""
    return [str(f) for f in pd.unique(frame["family"])]


def ordered_tasks(frame: pd.DataFrame, tasks: Sequence[str] | None, what: str) -> list[str]:
    """The tasks to draw: ``tasks`` in the given order, or all tasks in order of appearance."""
    present = [str(t) for t in pd.unique(frame["task"])]
    if tasks is None:
        return present
    missing = [t for t in tasks if t not in present]
    if missing:
        raise ValueError(
            f"the {what} table has no rows for task(s) {', '.join(missing)} named in the figure's "
            f"'tasks' setting (tasks present: {', '.join(present)})"
        )
    return list(tasks)


def drawn_matrix(
    frame: pd.DataFrame, tasks: Sequence[str] | None, what: str, columns: Sequence[str] = ()
) -> tuple[pd.DataFrame, list[str], list[str], list[str]]:
    """The rows of ``frame`` for the tasks to draw, and the variants, tasks and families in
    drawing order. ``frame`` is a concatenated table with family, variant and task columns and
    ``columns``; ``tasks`` is the figure's setting (None: every task). Raises for a missing column,
    an unknown variant or a named task the table lacks."""
    require_columns(frame, ["family", "variant", "task", *columns], what)
    variants = check_variants(frame, what)
    drawn = ordered_tasks(frame, tasks, what)
    families = ordered_families(frame)
    return frame[frame["task"].isin(drawn)], variants, drawn, families


def warn_left_out(log: logging.Logger, summary: pd.DataFrame, count: str, reason: str) -> None:
    """Warn, in the figure's own log, of each (family, variant, task) row of ``summary`` whose
    ``count`` column says how many prompts were left out for ``reason``."""
    for row in summary.itertuples():
        left_out = getattr(row, count)
        if left_out:
            log.warning(
                "%s/%s/%s: %d prompt(s) with %s left out",
                row.family,
                row.variant,
                row.task,
                left_out,
                reason,
            )


def standard_error(values: np.ndarray | pd.Series) -> float:
    """Standard error of the mean of the finite ``values`` (NaN with fewer than two)."""
    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    if array.size < 2:
        return float("nan")
    return float(array.std(ddof=1) / np.sqrt(array.size))


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a TSV (statistics outputs) or parquet table by its suffix."""
    suffix = Path(path).suffix
    if suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t")
