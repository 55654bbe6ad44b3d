"""Canopy Entropy estimators and per-prompt metrics from a rollout table.

Input is the rollout table of ``docs/architecture.md`` (one row per rollout). For every prompt we
estimate, from its M rollouts (natural logarithms, nats):

* the Canopy Entropy CE* = H(N, Y | X) by the chain-rule estimator mean_i H_i with H_i the summed
  per-step entropies, and by the surprisal estimator mean_i (-log q(y_i)) (same target, more
  variance), each with its standard error and a Student-t confidence interval;
* the mean length N̄ and mean entropy rate R̄ = mean_i H_i / N_i, with standard errors;
* the sample decomposition CE* = N̄·R̄ + Cov(N, r) (covariance with 1/M: an exact identity);
* Pearson, Spearman and Kendall correlations of (N_i, r_i) with their p-values;
* the length entropy H(N) by three estimators (plug-in, Miller–Madow, Chao–Shen) and
  H(Y | N) = CE* − H(N) with the estimator chosen by ``MetricSettings.length_entropy``
  (Chao–Shen by default: lengths spread over far more values than there are rollouts, where the
  plug-in estimate is capped at ln M and Miller–Madow's first-order correction falls short);
* the branching factor exp(R̄), the generation perplexity exp(CE*/N̄) and the truncation rate.

Degenerate prompts (one rollout, constant length, all rollouts dropped) get NaN where a value is
undefined and say why in ``note``; corrupt input (NaN or negative entropies, lists that disagree
with their sums or lengths) raises a ``ValueError`` that names the prompt and sample.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd

from canopy.config.analysis import LENGTH_ENTROPY_ESTIMATORS, MetricSettings
from canopy.io import write_parquet

__all__ = [
    "MetricSettings",
    "TruncationWarning",
    "PROMPT_METRIC_COLUMNS",
    "EXTRA_METRIC_COLUMNS",
    "prompt_metrics",
    "entropy_trajectory",
    "LENGTH_ENTROPY_ESTIMATORS",
    "chao_shen_entropy",
    "length_entropy",
    "write_metrics",
]


#: The per-prompt columns of the contract in docs/architecture.md, in contract order.
PROMPT_METRIC_COLUMNS: tuple[str, ...] = (
    "prompt_id",
    "n_rollouts",
    "n_truncated",
    "truncation_rate",
    "canopy_entropy",
    "canopy_entropy_se",
    "canopy_entropy_surprisal",
    "canopy_entropy_surprisal_se",
    "mean_length",
    "mean_length_se",
    "mean_rate",
    "mean_rate_se",
    "cov_length_rate",
    "decomposition_product",
    "rho_pearson",
    "rho_pearson_p",
    "rho_spearman",
    "rho_spearman_p",
    "rho_kendall",
    "rho_kendall_p",
    "length_entropy_plugin",
    "length_entropy_miller_madow",
    "conditional_entropy_given_length",
    "branching_factor",
    "generation_perplexity",
    "note",
)

#: Columns added after the contract columns: the rollout count before ``truncated="drop"``, the
#: Chao–Shen estimate of H(N) and the name of the H(N) estimator that
#: ``conditional_entropy_given_length`` subtracts, and Student-t confidence intervals (level ``MetricSettings.confidence``) of the four means.
EXTRA_METRIC_COLUMNS: tuple[str, ...] = (
    "n_rollouts_total",
    "length_entropy_chao_shen",
    "length_entropy_estimator",
    "canopy_entropy_ci_low",
    "canopy_entropy_ci_high",
    "canopy_entropy_surprisal_ci_low",
    "canopy_entropy_surprisal_ci_high",
    "mean_length_ci_low",
    "mean_length_ci_high",
    "mean_rate_ci_low",
    "mean_rate_ci_high",
)

#: H(N) estimators, by the name ``metrics.length_entropy`` uses; each is a column
#: ``length_entropy_<name>`` of the metric table.

_REQUIRED_COLUMNS = ("prompt_id", "sample", "n_steps", "truncated", "sum_entropy", "sum_logprob")

# Tolerances of the consistency checks. Entropies computed in float32 (or by log-sum-exp) can come
# out a hair below zero; a list summed in float32 can differ from a float64 sum by ~1e-7 relative
# per step. Anything beyond these is a corrupt table, not rounding.
_NEGATIVE_TOLERANCE = 1e-6
_SUM_RTOL = 1e-5
_SUM_ATOL = 1e-6


class TruncationWarning(UserWarning):
    """A prompt's share of rollouts that hit ``max_new_tokens`` exceeds the configured limit."""


# --------------------------------------------------------------------------------------------
# Validation and per-rollout arrays


def _flatten_lists(column: pd.Series, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate a list column into one float64 array; also return each row's list length."""
    values = column.to_numpy()
    lengths = np.fromiter(
        (0 if v is None else len(v) for v in values), dtype=np.int64, count=len(values)
    )
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.float64), lengths
    try:
        flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in values if v is not None])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column {name!r} must hold lists of numbers: {exc}") from exc
    return flat, lengths


def _plain(value: Any) -> Any:
    """numpy scalar -> Python scalar, so messages read ``sample 3`` not ``np.int64(3)``."""
    return value.item() if isinstance(value, np.generic) else value


def _row_label(rollouts: pd.DataFrame, row: int) -> str:
    prompt_id = _plain(rollouts["prompt_id"].iloc[row])
    return f"prompt {prompt_id!r}, sample {_plain(rollouts['sample'].iloc[row])!r}"


def _validate(rollouts: pd.DataFrame) -> None:
    """Raise ``ValueError`` naming the first prompt/sample whose rollout data is inconsistent."""
    missing = [c for c in _REQUIRED_COLUMNS if c not in rollouts.columns]
    if missing:
        raise ValueError(
            f"rollout table lacks column(s) {', '.join(missing)}; "
            "expected the rollout table of docs/architecture.md"
        )
    duplicated = rollouts.duplicated(["prompt_id", "sample"])
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise ValueError(f"duplicate rollout: {_row_label(rollouts, row)} appears twice")

    n_steps = rollouts["n_steps"].to_numpy()
    bad = np.flatnonzero(~(n_steps >= 1))
    if bad.size:
        raise ValueError(
            f"{_row_label(rollouts, int(bad[0]))}: n_steps must be >= 1 "
            f"(the EOS step counts), got {_plain(n_steps[bad[0]])}"
        )

    sum_entropy = rollouts["sum_entropy"].to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(sum_entropy) | (sum_entropy < -_NEGATIVE_TOLERANCE))
    if bad.size:
        raise ValueError(
            f"{_row_label(rollouts, int(bad[0]))}: sum_entropy is {_plain(sum_entropy[bad[0]])!r}; "
            "entropies must be finite and non-negative — regenerate this rollout"
        )
    sum_logprob = rollouts["sum_logprob"].to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(sum_logprob) | (sum_logprob > _NEGATIVE_TOLERANCE))
    if bad.size:
        raise ValueError(
            f"{_row_label(rollouts, int(bad[0]))}: sum_logprob is {_plain(sum_logprob[bad[0]])!r}; "
            "a log-probability must be finite and <= 0 — regenerate this rollout"
        )

    for list_col, sum_values, sign in (
        ("step_entropy", sum_entropy, 1.0),
        ("step_logprob", sum_logprob, -1.0),
    ):
        if list_col not in rollouts.columns:
            continue
        flat, lengths = _flatten_lists(rollouts[list_col], list_col)
        bad = np.flatnonzero(lengths != n_steps)
        if bad.size:
            raise ValueError(
                f"{_row_label(rollouts, int(bad[0]))}: {list_col} has {lengths[bad[0]]} values "
                f"but n_steps is {_plain(n_steps[bad[0]])}"
            )
        # sign flips log-probabilities so that both checks read "finite and >= 0".
        bad_value = np.flatnonzero(~np.isfinite(flat) | (sign * flat < -_NEGATIVE_TOLERANCE))
        if bad_value.size:
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            row = int(np.searchsorted(offsets, bad_value[0], side="right") - 1)
            step = int(bad_value[0] - offsets[row]) + 1
            kind = "entropy" if sign > 0 else "log-probability"
            raise ValueError(
                f"{_row_label(rollouts, row)}: {list_col} at step {step} is "
                f"{_plain(flat[bad_value[0]])!r}, not a valid {kind} — regenerate this rollout"
            )
        if flat.size:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            sums = np.add.reduceat(flat, starts)
            scale = np.add.reduceat(np.abs(flat), starts)
            bad = np.flatnonzero(np.abs(sums - sum_values) > _SUM_ATOL + _SUM_RTOL * scale)
            if bad.size:
                summed = "sum_entropy" if sign > 0 else "sum_logprob"
                raise ValueError(
                    f"{_row_label(rollouts, int(bad[0]))}: {list_col} sums to "
                    f"{_plain(sums[bad[0]])!r} but {summed} is {_plain(sum_values[bad[0]])!r}"
                )


# --------------------------------------------------------------------------------------------
# Estimators


def length_entropy(lengths: np.ndarray) -> tuple[float, float]:
    """Plug-in and Miller–Madow estimates of H(N) from observed lengths (nats).

    Miller–Madow adds (K − 1) / (2M) to the plug-in estimate, K the number of distinct observed
    lengths: the first-order correction of the plug-in estimator's downward bias.
    """
    lengths = np.asarray(lengths)
    m = lengths.size
    if m == 0:
        return math.nan, math.nan
    _, counts = np.unique(lengths, return_counts=True)
    p = counts / m
    plugin = float(-(p * np.log(p)).sum())
    return plugin, plugin + (counts.size - 1) / (2.0 * m)


def chao_shen_entropy(values: np.ndarray) -> float:
    """Chao–Shen coverage-adjusted estimate of the entropy (nats) of the values' distribution.

    The sample coverage C = 1 − f1/M (f1 values seen exactly once) estimates the probability
    mass of the values seen; each observed frequency is shrunk to C·p̂, and every term is divided
    by the probability 1 − (1 − C·p̂)^M that its value was seen at all (Horvitz–Thompson), which
    accounts for the mass of unseen values the plug-in estimator ignores. When every value is a
    singleton (C = 0) f1 is taken as M − 1, the usual convention that keeps C positive.
    """
    values = np.asarray(values)
    m = values.size
    if m == 0:
        return math.nan
    _, counts = np.unique(values, return_counts=True)
    singletons = int((counts == 1).sum())
    if singletons == m:
        singletons = m - 1
    coverage = 1.0 - singletons / m
    pa = coverage * counts / m
    inclusion = 1.0 - (1.0 - pa) ** m
    return float(-(pa * np.log(pa) / inclusion).sum())


def _correlations(n: np.ndarray, r: np.ndarray) -> tuple[list[float], str]:
    """Pearson, Spearman, Kendall (each with p-value) of (N, r); NaN with a reason if undefined."""
    if n.size < 2:
        return [math.nan] * 6, "correlations undefined: fewer than 2 rollouts"
    if np.all(n == n[0]):
        return [math.nan] * 6, "correlations undefined: constant length"
    if np.all(r == r[0]):
        return [math.nan] * 6, "correlations undefined: constant entropy rate"
    from scipy import stats  # here, not at module level: scipy.stats costs each job ~1 s to import

    out: list[float] = []
    for test in (stats.pearsonr, stats.spearmanr, stats.kendalltau):
        result = test(n, r)
        out += [float(result.statistic), float(result.pvalue)]
    return out, ""


def _t_interval(mean: float, se: float, m: int, confidence: float) -> tuple[float, float]:
    if m < 2 or not np.isfinite(se):
        return math.nan, math.nan
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=m - 1)) * se
    return mean - half, mean + half


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    if x.size == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size >= 2 else math.nan
    return mean, se


def _one_prompt(
    prompt_id: Any,
    n: np.ndarray,
    h: np.ndarray,
    s: np.ndarray,
    truncated: np.ndarray,
    settings: MetricSettings,
) -> dict[str, Any]:
    notes: list[str] = []
    total = int(n.size)
    n_truncated = int(truncated.sum())
    if settings.truncated == "drop" and n_truncated:
        keep = ~truncated
        n, h, s = n[keep], h[keep], s[keep]
        if n.size == 0:
            notes.append("all rollouts truncated and dropped")
    m = int(n.size)
    n_float = n.astype(np.float64)
    r = h / n_float  # per-rollout entropy rate

    ce, ce_se = _mean_se(h)
    ce_s, ce_s_se = _mean_se(s)
    mean_n, mean_n_se = _mean_se(n_float)
    mean_r, mean_r_se = _mean_se(r)
    if m >= 1:
        cov = float(((n_float - mean_n) * (r - mean_r)).mean())
        product = mean_n * mean_r
    else:
        cov = product = math.nan
    if m == 1:
        notes.append("standard errors undefined: 1 rollout")

    corr, corr_note = _correlations(n_float, r) if m else ([math.nan] * 6, "")
    if corr_note:
        notes.append(corr_note)
    h_plugin, h_mm = length_entropy(n)
    h_cs = chao_shen_entropy(n)
    h_length = {"plugin": h_plugin, "miller_madow": h_mm, "chao_shen": h_cs}[
        settings.length_entropy
    ]

    row: dict[str, Any] = {
        "prompt_id": prompt_id,
        "n_rollouts": m,
        "n_truncated": n_truncated,
        "truncation_rate": n_truncated / total if total else math.nan,
        "canopy_entropy": ce,
        "canopy_entropy_se": ce_se,
        "canopy_entropy_surprisal": ce_s,
        "canopy_entropy_surprisal_se": ce_s_se,
        "mean_length": mean_n,
        "mean_length_se": mean_n_se,
        "mean_rate": mean_r,
        "mean_rate_se": mean_r_se,
        "cov_length_rate": cov,
        "decomposition_product": product,
        "rho_pearson": corr[0],
        "rho_pearson_p": corr[1],
        "rho_spearman": corr[2],
        "rho_spearman_p": corr[3],
        "rho_kendall": corr[4],
        "rho_kendall_p": corr[5],
        "length_entropy_plugin": h_plugin,
        "length_entropy_miller_madow": h_mm,
        "conditional_entropy_given_length": ce - h_length,
        "branching_factor": math.exp(mean_r) if m else math.nan,
        "generation_perplexity": math.exp(ce / mean_n) if m else math.nan,
        "note": "; ".join(notes),
        "n_rollouts_total": total,
        "length_entropy_chao_shen": h_cs,
        "length_entropy_estimator": settings.length_entropy,
    }
    for name, mean, se in (
        ("canopy_entropy", ce, ce_se),
        ("canopy_entropy_surprisal", ce_s, ce_s_se),
        ("mean_length", mean_n, mean_n_se),
        ("mean_rate", mean_r, mean_r_se),
    ):
        row[f"{name}_ci_low"], row[f"{name}_ci_high"] = _t_interval(
            mean, se, m, settings.confidence
        )
    return row


def prompt_metrics(
    rollouts: pd.DataFrame,
    settings: MetricSettings | None = None,
    *,
    label: str = "",
) -> pd.DataFrame:
    """Per-prompt Canopy Entropy metrics: one row per prompt, in order of first appearance.

    Columns: :data:`PROMPT_METRIC_COLUMNS` (the contract) followed by
    :data:`EXTRA_METRIC_COLUMNS`. ``label`` (e.g. ``"llama/finetuned/math"``) names the rollout
    set in the truncation warning. Raises ``ValueError`` naming the prompt and sample when a
    rollout's entropies are NaN or negative, or its lists disagree with its sums or ``n_steps``.
    """
    settings = settings or MetricSettings()
    columns = list(PROMPT_METRIC_COLUMNS) + list(EXTRA_METRIC_COLUMNS)
    if len(rollouts) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    rollouts = rollouts.reset_index(drop=True)
    _validate(rollouts)

    n_all = rollouts["n_steps"].to_numpy(dtype=np.int64)
    h_all = rollouts["sum_entropy"].to_numpy(dtype=np.float64)
    s_all = -rollouts["sum_logprob"].to_numpy(dtype=np.float64)
    truncated_all = rollouts["truncated"].to_numpy(dtype=bool)

    # Group rows by prompt once (stable sort keeps each prompt's rollouts in table order).
    codes, prompt_ids = pd.factorize(rollouts["prompt_id"], sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(prompt_ids)))])

    rows = []
    for k, prompt_id in enumerate(prompt_ids):
        idx = order[bounds[k] : bounds[k + 1]]
        rows.append(
            _one_prompt(prompt_id, n_all[idx], h_all[idx], s_all[idx], truncated_all[idx], settings)
        )
    table = pd.DataFrame(rows, columns=columns)

    flagged = table[table["truncation_rate"] > settings.truncation_warning]
    if len(flagged):
        shown = ", ".join(
            f"{pid!r} ({rate:.0%})"
            for pid, rate in zip(flagged["prompt_id"][:10], flagged["truncation_rate"][:10])
        )
        more = f" and {len(flagged) - 10} more" if len(flagged) > 10 else ""
        message = (
            f"{label or 'rollouts'}: truncation rate above {settings.truncation_warning:.0%} "
            f"(rollouts that hit max_new_tokens) for prompt(s) {shown}{more}; "
            f"CE* then describes the canopy cut at max_new_tokens (metrics.truncated="
            f"{settings.truncated!r}) — consider a larger max_new_tokens"
        )
        # A warning, not also a log record: the workflow's scripts route warnings into the rule's
        # log (script_setup), and a notebook shows it once.
        warnings.warn(message, TruncationWarning, stacklevel=2)
    return table


def entropy_trajectory(rollouts: pd.DataFrame, *, max_positions: int | None = None) -> pd.DataFrame:
    """Mean step entropy by position over all rollouts of the table (the entropy-rate trajectory).

    Returns columns ``position`` (1-based), ``mean_entropy`` (mean h_t over rollouts still running
    at step t), ``se`` (its standard error; NaN with fewer than 2 active rollouts) and
    ``n_active``. ``max_positions`` cuts the trajectory after that many steps.
    """
    if "step_entropy" not in rollouts.columns:
        raise ValueError("entropy_trajectory needs the step_entropy column of the rollout table")
    if max_positions is not None and max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    flat, lengths = _flatten_lists(rollouts["step_entropy"], "step_entropy")
    # Position of every flattened value within its rollout, 0-based.
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.arange(flat.size, dtype=np.int64) - starts
    if max_positions is not None:
        keep = position < max_positions
        flat, position = flat[keep], position[keep]
    size = int(position.max()) + 1 if position.size else 0
    n_active = np.bincount(position, minlength=size)
    mean = np.bincount(position, weights=flat, minlength=size) / np.maximum(n_active, 1)
    # Two passes (mean, then squared deviations) avoid the cancellation of sum-of-squares.
    sq_dev = np.bincount(position, weights=(flat - mean[position]) ** 2, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(n_active >= 2, sq_dev / (n_active - 1), np.nan)
        se = np.sqrt(var / n_active)
    return pd.DataFrame(
        {
            "position": np.arange(1, size + 1, dtype=np.int64),
            "mean_entropy": mean,
            "se": se,
            "n_active": n_active.astype(np.int64),
        }
    )


def write_metrics(
    rollouts_path: str | os.PathLike[str],
    metrics_path: str | os.PathLike[str],
    trajectory_path: str | os.PathLike[str] | None = None,
    settings: MetricSettings | None = None,
    *,
    label: str = "",
    max_positions: int | None = None,
) -> pd.DataFrame:
    """Read a rollout parquet, write its prompt metrics (and trajectory) atomically.

    The one call a workflow script needs; ``label`` defaults to the rollout file's path so that a
    truncation warning says which model and task it is about. Returns the metrics table.
    """
    rollouts = pd.read_parquet(rollouts_path)
    table = prompt_metrics(rollouts, settings, label=label or str(rollouts_path))
    write_parquet(table, metrics_path)
    if trajectory_path is not None:
        write_parquet(entropy_trajectory(rollouts, max_positions=max_positions), trajectory_path)
    return table
