"""Paired bootstrap of prompt metrics, base versus fine-tuned.

Each prompt is answered by both variants of a model family, so the natural comparison is paired:
resample *prompts* with replacement (the prompt is the unit that varies between studies), keep
each prompt's base and fine-tuned values together, and read the difference of means
(fine-tuned − base) and their ratio off the resampled distribution. Intervals are percentile
intervals; the two-sided p-value is the smallest level at which the percentile interval of the
difference excludes zero.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from canopy.config import VARIANTS
from canopy.config.analysis import BootstrapSettings

__all__ = [
    "BootstrapSettings",
    "BOOTSTRAP_COLUMNS",
    "estimator_notes",
    "mean_intervals",
    "paired_bootstrap",
]

#: Columns of the table :func:`paired_bootstrap` returns.
BOOTSTRAP_COLUMNS: tuple[str, ...] = (
    "family",
    "task",
    "metric",
    "n_prompts",
    "base_mean",
    "finetuned_mean",
    "difference",
    "ci_low",
    "ci_high",
    "ratio",
    "ratio_ci_low",
    "ratio_ci_high",
    "p_value",
    "resamples",
    "confidence",
    "seed",
)

ALL_TASKS = "all"


def _stream_seed(seed: int, *names: Any) -> np.random.Generator:
    """A generator for one (family, task, metric): reproducible, and independent of which other
    families, tasks or metrics are in the panel (so a subset reproduces the full run's rows)."""
    key = "\x1f".join(str(n) for n in names).encode()
    return np.random.default_rng([int(seed), zlib.crc32(key)])


def _resampled_means(
    values: np.ndarray, strata: np.ndarray, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap means of the rows of ``values`` (shape (n, k)), resampling within each stratum.

    Returns shape (resamples, k). Resampling within strata keeps each task's share of prompts
    fixed in the pooled "all tasks" comparison; with one stratum it is the ordinary bootstrap.
    """
    n = values.shape[0]
    # How often each prompt is drawn in each resample, as a (resamples, n) matrix: the resampled
    # sums are then one matrix product, far cheaper than gathering a (resamples, n, k) array.
    counts = np.zeros((resamples, n))
    rows = np.arange(resamples)[:, None] * n
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        draws = members[rng.integers(0, members.size, size=(resamples, members.size))]
        counts += np.bincount((draws + rows).ravel(), minlength=resamples * n).reshape(resamples, n)
    # Column by column, so identical columns give bitwise identical resampled means.
    totals = np.column_stack([counts @ values[:, j] for j in range(values.shape[1])])
    return totals / n


def _summarise(
    base: np.ndarray,
    finetuned: np.ndarray,
    strata: np.ndarray,
    settings: BootstrapSettings,
    rng: np.random.Generator,
) -> dict[str, float]:
    n = base.size
    base_mean, ft_mean = float(base.mean()), float(finetuned.mean())
    alpha = 1.0 - settings.confidence
    quantiles = [alpha / 2.0, 1.0 - alpha / 2.0]
    means = _resampled_means(np.column_stack([base, finetuned]), strata, settings.resamples, rng)
    diffs = means[:, 1] - means[:, 0]
    ci_low, ci_high = np.quantile(diffs, quantiles)
    # Smallest level at which the percentile interval excludes 0; the +1 keeps p away from an
    # impossible 0 with finitely many resamples.
    below = (np.count_nonzero(diffs <= 0) + 1) / (settings.resamples + 1)
    above = (np.count_nonzero(diffs >= 0) + 1) / (settings.resamples + 1)
    p_value = min(1.0, 2.0 * min(below, above))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = means[:, 1] / means[:, 0]
    if base_mean != 0 and np.isfinite(ratios).all():
        ratio = ft_mean / base_mean
        ratio_low, ratio_high = np.quantile(ratios, quantiles)
    else:
        # A resampled base mean of zero makes the ratio meaningless (e.g. a rate that is 0 on
        # most prompts): report NaN rather than an infinite interval.
        ratio = ratio_low = ratio_high = math.nan
    return {
        "n_prompts": n,
        "base_mean": base_mean,
        "finetuned_mean": ft_mean,
        "difference": ft_mean - base_mean,
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "ratio": float(ratio),
        "ratio_ci_low": float(ratio_low),
        "ratio_ci_high": float(ratio_high),
        "p_value": float(p_value),
    }


def paired_bootstrap(
    panel: pd.DataFrame,
    metrics: Sequence[str],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 42,
) -> pd.DataFrame:
    """Paired prompt bootstrap of fine-tuned − base for every (family, task, metric).

    ``panel`` has columns ``family``, ``variant`` (``"base"`` / ``"finetuned"``), ``task``,
    ``prompt_id`` and the ``metrics`` columns. Rows are paired by ``prompt_id`` within a family
    and task; prompts present in only one variant are dropped with a warning, and so (per
    metric) are pairs where either value is NaN. Each family also gets a ``task = "all"`` row
    per metric that pools its tasks, resampling prompts within each task.

    Returns :data:`BOOTSTRAP_COLUMNS`, one row per (family, task, metric), tasks in panel order
    with ``"all"`` last. Seeded per (family, task, metric): the same ``seed`` gives the same
    table.
    """
    settings = BootstrapSettings(resamples=resamples, confidence=confidence, seed=seed)
    metrics = list(metrics)
    needed = ["family", "variant", "task", "prompt_id", *metrics]
    missing = [c for c in needed if c not in panel.columns]
    if missing:
        raise ValueError(f"panel lacks column(s) {', '.join(missing)}")
    variants = set(panel["variant"].unique())
    unknown = sorted(map(str, variants - set(VARIANTS)))
    if unknown:
        raise ValueError(f"panel variant must be one of {', '.join(VARIANTS)}, found {unknown}")
    key = ["family", "task", "prompt_id", "variant"]
    duplicated = panel.duplicated(key)
    if duplicated.any():
        first = panel.loc[duplicated, key].iloc[0].to_dict()
        raise ValueError(f"panel has more than one row for {first}")

    wide = panel.pivot(index=["family", "task", "prompt_id"], columns="variant", values=metrics)
    # A prompt is paired when both variants have a row; a row's metric values may still be NaN.
    present = (
        panel.groupby(["family", "task", "prompt_id", "variant"], sort=True)
        .size()
        .unstack("variant", fill_value=0)
        .reindex(columns=list(VARIANTS), fill_value=0)
        .reindex(wide.index, fill_value=0)
        > 0
    )
    unpaired = ~(present["base"] & present["finetuned"])
    if unpaired.any():
        lost = present.index[unpaired.to_numpy()]
        shown = ", ".join(f"{f}/{t}/{p}" for f, t, p in lost[:10])
        more = f" and {len(lost) - 10} more" if len(lost) > 10 else ""
        warnings.warn(
            f"paired bootstrap: {len(lost)} prompt(s) present in only one variant dropped: "
            f"{shown}{more}",
            stacklevel=2,
        )
    wide = wide.loc[present.index[~unpaired.to_numpy()]]

    task_order = list(dict.fromkeys(panel["task"]))
    rows: list[dict[str, Any]] = []
    nan_dropped: list[str] = []
    paired_families = set(wide.index.get_level_values("family"))
    for family in dict.fromkeys(panel["family"]):
        if family not in paired_families:
            continue
        fam = wide.xs(family, level="family")
        fam_tasks = fam.index.get_level_values("task").to_numpy()
        for metric in metrics:
            base_all = fam[(metric, "base")].to_numpy(dtype=np.float64)
            ft_all = fam[(metric, "finetuned")].to_numpy(dtype=np.float64)
            valid = np.isfinite(base_all) & np.isfinite(ft_all)
            if not valid.all():
                nan_dropped.append(f"{family}/{metric}: {int((~valid).sum())}")
            groups = [t for t in task_order if t in set(fam_tasks)] + [ALL_TASKS]
            for task in groups:
                mask = valid if task == ALL_TASKS else valid & (fam_tasks == task)
                row: dict[str, Any] = {"family": family, "task": task, "metric": metric}
                if mask.sum() == 0:
                    row.update(n_prompts=0)
                else:
                    rng = _stream_seed(settings.seed, family, task, metric)
                    row.update(
                        _summarise(base_all[mask], ft_all[mask], fam_tasks[mask], settings, rng)
                    )
                rows.append(row)
    if nan_dropped:
        warnings.warn(
            "paired bootstrap: pairs with a NaN value dropped per metric (family/metric: count): "
            + ", ".join(nan_dropped),
            stacklevel=2,
        )
    table = pd.DataFrame(rows, columns=list(BOOTSTRAP_COLUMNS))
    table["resamples"] = settings.resamples
    table["confidence"] = settings.confidence
    table["seed"] = settings.seed
    table["n_prompts"] = table["n_prompts"].astype(np.int64)
    return table


def estimator_notes(table: pd.DataFrame, panel: pd.DataFrame) -> pd.Series:
    """A ``note`` per bootstrap row saying which H(N) estimator H(Y | N) subtracted.

    The metric tables carry it as ``length_entropy_estimator`` (one value per run: it is a
    setting); rows of other metrics get an empty note. A panel without the column (tables from
    before the setting existed) says so rather than guessing.
    """
    if "length_entropy_estimator" in panel.columns:
        names = sorted(set(panel["length_entropy_estimator"].dropna().astype(str)))
        used = "H(N) by " + " and ".join(names)
    else:
        used = "H(N) estimator not recorded"
    text = f"H(Y|N) = CE* - H(N), {used}"
    return table["metric"].map(lambda m: text if m == "conditional_entropy_given_length" else "")


def mean_intervals(
    frame: pd.DataFrame,
    metric: str,
    by: Sequence[str],
    settings: BootstrapSettings | None = None,
) -> pd.DataFrame:
    """Mean of ``metric`` over rows (prompts) per group of ``by``, with a percentile bootstrap
    interval (rows resampled with replacement, NaN rows left out and counted).

    Returns ``by`` columns then ``n_prompts``, ``n_missing``, ``mean``, ``ci_low``, ``ci_high``.
    Seeded per group and metric like :func:`paired_bootstrap`, so a group's interval does not
    depend on which other groups are in the frame.
    """
    settings = settings or BootstrapSettings()
    missing = [c for c in [*by, metric] if c not in frame.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}")
    alpha = 1.0 - settings.confidence
    rows = []
    for group, part in frame.groupby(list(by), sort=False):
        group = group if isinstance(group, tuple) else (group,)
        values = part[metric].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        row = dict(zip(by, group))
        row.update(n_prompts=int(finite.size), n_missing=int(values.size - finite.size))
        if finite.size == 0:
            row.update(mean=math.nan, ci_low=math.nan, ci_high=math.nan)
        else:
            rng = _stream_seed(settings.seed, *group, metric)
            means = _resampled_means(
                finite[:, None], np.zeros(finite.size), settings.resamples, rng
            )[:, 0]
            low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
            row.update(mean=float(finite.mean()), ci_low=float(low), ci_high=float(high))
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, "n_prompts", "n_missing", "mean", "ci_low", "ci_high"])
