"""Robustness checks of the entropy-rate slopes.

(a) :func:`lmm_robustness`: a linear mixed model on logit(D) with the Beta GLMM's fixed effects and
    random intercepts, fitted by lme4 through pymer4.
(b) :func:`fixed_effects_robustness`: OLS on logit(D) with log N and fixed effects for family and
    prompt (the prompt effects absorb the task effects), statsmodels, standard errors clustered by
    prompt.
(c) :func:`length_matched`: base and fine-tuned rollouts of each prompt subsampled to the same
    length distribution; per-prompt rate, length, rho(N, r_N) and D recomputed on the subsamples
    and the Beta GLMM refitted (glmmTMB, the main model) on every matched panel, with R and 1/N
    standardised by the constants of the unmatched panel so that every slope is per the same
    unit of R. All fits of one analysis run in one R process.

Every function returns a tidy table and writes it as TSV. Slope rows: ``variant`` (base,
fine-tuned, ``ratio``), ``slope`` (of ``R_sc`` on the logit scale), ``se``, ``ci_low``,
``ci_high`` (Wald; delta method for the ratio), ``method``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from canopy.io import write_tsv
from canopy.stats import SLOPE_TERM, StatsSettings, fit_beta_glmm_many, prepare_panel

__all__ = [
    "fixed_effects_robustness",
    "fixed_effects_slopes",
    "length_matched",
    "lmm_robustness",
    "match_lengths",
    "matched_prompt_metrics",
    "pairwise_dissimilarity",
    "slope_rows",
]

RolloutKey = tuple[str, str, str]


# --------------------------------------------------------------------------------------------
# Shared: slopes per variant and their ratio from coefficients and their covariance


def _interaction(names: list[str], variant_token: str) -> str:
    hits = [n for n in names if set(n.split(":")) == {SLOPE_TERM, variant_token}]
    if len(hits) != 1:
        raise ValueError(
            f"model has no single {SLOPE_TERM} x variant interaction ({variant_token}); "
            f"terms: {names}"
        )
    return hits[0]


def slope_rows(
    beta: pd.Series,
    cov: pd.DataFrame,
    variant_token: str,
    variants: tuple[str, str],
    confidence: float,
    method: str,
) -> pd.DataFrame:
    """Base slope, fine-tuned slope and their ratio (delta method) from a coefficient vector.

    ``variant_token`` is the name the model gives the fine-tuned dummy inside the interaction
    (``variantfinetuned`` in R, ``variant[T.finetuned]`` in patsy).
    """
    names = list(beta.index)
    if SLOPE_TERM not in names:
        raise ValueError(f"model has no {SLOPE_TERM} term; terms: {names}")
    inter = _interaction(names, variant_token)
    b1, b3 = float(beta[SLOPE_TERM]), float(beta[inter])
    v11, v33 = float(cov.loc[SLOPE_TERM, SLOPE_TERM]), float(cov.loc[inter, inter])
    v13 = float(cov.loc[SLOPE_TERM, inter])
    z = sps.norm.ppf(1 - (1 - confidence) / 2)
    slope_ft = b1 + b3
    se_base, se_ft = np.sqrt(v11), np.sqrt(v11 + v33 + 2 * v13)
    ratio = slope_ft / b1
    grad = np.array([-b3 / b1**2, 1 / b1])
    se_ratio = float(np.sqrt(grad @ np.array([[v11, v13], [v13, v33]]) @ grad))
    rows = [
        (variants[0], b1, se_base, method),
        (variants[1], slope_ft, se_ft, method),
        ("ratio", ratio, se_ratio, f"{method}/delta"),
    ]
    return pd.DataFrame(
        [
            {
                "variant": v,
                "slope": s,
                "se": e,
                "ci_low": s - z * e,
                "ci_high": s + z * e,
                "method": m,
            }
            for v, s, e, m in rows
        ]
    )


def _variants(frame: pd.DataFrame, settings: StatsSettings) -> tuple[str, str]:
    other = sorted(set(frame["variant"]) - {settings.reference_variant})
    return settings.reference_variant, other[0]


# --------------------------------------------------------------------------------------------
# (a) linear mixed model through pymer4


def _import_pymer4() -> Any:
    # Starting embedded R, rpy2 prepends R's and the system's library folders to
    # LD_LIBRARY_PATH in os.environ. This process has its libraries loaded already, but a Python
    # started from it afterwards (snakemake, a test) would then load the system's libpython in
    # place of its own and lose its site-packages: put the caller's value back.
    library_path = os.environ.get("LD_LIBRARY_PATH")
    try:
        from pymer4.models import Lmer  # noqa: PLC0415 - optional, heavy (starts R)
    except Exception as error:  # rpy2 raises assorted errors when R or a package is missing
        raise ImportError(
            "the LMM robustness check needs pymer4 and rpy2 (pip install pymer4==0.8.2 "
            "rpy2==3.5.17 'pandas<3', and R with lme4, lmerTest, emmeans: apt-get install "
            f"r-cran-lme4 r-cran-lmertest r-cran-emmeans); import failed: {error!r}"
        ) from error
    finally:
        if library_path is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = library_path
    return Lmer


def lmm_formula(settings: StatsSettings) -> str:
    """The Beta GLMM's right-hand side with logit(D) as response (``ns`` made explicit)."""
    rhs = settings.formula.split("~", 1)[1]
    rhs = re.sub(r"(?<![\w.:])ns\(", "splines::ns(", rhs)
    return f"logit_D ~{rhs}"


def lmm_robustness(
    panel: pd.DataFrame, settings: StatsSettings, out_path: str | os.PathLike[str]
) -> pd.DataFrame:
    """Fit the LMM on logit(D) by REML (lme4 via pymer4) and write its slopes and ratio.

    Wald intervals (normal quantiles) from lme4's ``vcov`` so the ratio's delta method uses the
    same covariance as the slopes.
    """
    Lmer = _import_pymer4()
    import rpy2.robjects as ro  # noqa: PLC0415 - imported by pymer4 already

    frame = prepare_panel(panel, settings)
    variants = _variants(frame, settings)
    tasks = [settings.reference_task, *sorted(set(frame["task"]) - {settings.reference_task})]
    data = frame[
        ["logit_D", SLOPE_TERM, "invN_sc", "N", "variant", "task", "family", "prompt_uid"]
    ].copy()
    model = Lmer(lmm_formula(settings), data=data)
    factors = {"variant": list(variants)}
    if len(tasks) > 1:
        factors["task"] = tasks
    with warnings.catch_warnings():
        # pymer4 0.8.2 calls DataFrame.applymap, deprecated (not broken) in pandas 2.3.
        warnings.filterwarnings("ignore", category=FutureWarning, module="pymer4")
        model.fit(factors=factors, REML=True, summarize=False, verbose=False)
    cov_r = ro.r["vcov"](model.model_obj)
    names = list(ro.r["rownames"](ro.r["as.matrix"](cov_r)))
    cov = pd.DataFrame(np.asarray(ro.r["as.matrix"](cov_r)), index=names, columns=names)
    beta = pd.Series(np.asarray(ro.r("lme4::fixef")(model.model_obj)), index=names)
    # pymer4 sets the level order through an unnamed treatment-contrast matrix, so lme4 calls
    # the fine-tuned dummy "variant1" (reference level first, as listed in ``factors``).
    token = f"variant{variants[1]}"
    if not any(token in name.split(":") for name in names):
        token = "variant1"
    table = slope_rows(beta, cov, token, variants, settings.confidence, "lmm")
    table["formula"] = lmm_formula(settings)
    table["n_rows"] = len(frame)
    write_tsv(table, out_path)
    return table


# --------------------------------------------------------------------------------------------
# (b) fixed-effects OLS with cluster-robust standard errors


def fixed_effects_slopes(
    frame: pd.DataFrame, settings: StatsSettings, method: str = "ols_fe"
) -> pd.DataFrame:
    """OLS of ``settings.robustness.fixed_effects_formula`` on a prepared panel.

    Standard errors are cluster-robust by ``settings.robustness.cluster`` (prompt_uid by
    default): the rows of one prompt (every family and variant) share its unmodelled
    idiosyncrasies beyond the prompt intercept, so they are not independent. The default formula
    omits C(task), which the prompt fixed effects absorb (each prompt belongs to one task); a
    formula that keeps it gives the same slopes (statsmodels' pseudo-inverse) and standard errors
    inflated by about 0.5 % (the redundant columns count in the small-sample correction).
    """
    import statsmodels.formula.api as smf  # noqa: PLC0415 - slow import, used here only

    variants = _variants(frame, settings)
    data = frame.copy()
    data["variant"] = pd.Categorical(data["variant"], categories=list(variants))
    tasks = [settings.reference_task, *sorted(set(data["task"]) - {settings.reference_task})]
    data["task"] = pd.Categorical(
        data["task"], categories=[t for t in tasks if t in set(data["task"])]
    )
    cluster = settings.robustness.cluster
    if cluster not in data.columns:
        raise ValueError(f"stats.robustness.cluster = {cluster!r} is not a panel column")
    groups = pd.factorize(data[cluster])[0]
    with warnings.catch_warnings():
        # Expected rank deficiency (task is nested in prompt), see the docstring.
        warnings.filterwarnings("ignore", message="The design matrix is rank-deficient")
        fit = smf.ols(settings.robustness.fixed_effects_formula, data=data).fit(
            cov_type="cluster", cov_kwds={"groups": groups}
        )
    cov = fit.cov_params()
    table = slope_rows(
        fit.params, cov, f"variant[T.{variants[1]}]", variants, settings.confidence, method
    )
    table["n_rows"] = int(fit.nobs)
    table["n_clusters"] = int(len(np.unique(groups)))
    return table


def fixed_effects_robustness(
    panel: pd.DataFrame, settings: StatsSettings, out_path: str | os.PathLike[str]
) -> pd.DataFrame:
    """Fixed-effects specification (family, task, prompt) with log N; writes the slope table."""
    frame = prepare_panel(panel, settings)
    table = fixed_effects_slopes(frame, settings)
    table["formula"] = settings.robustness.fixed_effects_formula
    write_tsv(table, out_path)
    return table


# --------------------------------------------------------------------------------------------
# (c) length-matched reanalysis


def match_lengths(
    lengths_base: np.ndarray, lengths_finetuned: np.ndarray, bins: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of base and fine-tuned rollouts with identical length-bin histograms.

    Bins are quantiles of the pooled log lengths (ties merge bins). In each bin the larger side
    is subsampled without replacement to the smaller side's count, so both subsamples have the
    same number of rollouts in every bin: the same length distribution up to the bin width.
    """
    a = np.log(np.asarray(lengths_base, float))
    b = np.log(np.asarray(lengths_finetuned, float))
    edges = np.unique(np.quantile(np.concatenate([a, b]), np.linspace(0, 1, bins + 1)))
    inner = edges[1:-1]
    bin_a, bin_b = np.searchsorted(inner, a, side="right"), np.searchsorted(inner, b, side="right")
    keep_a, keep_b = [], []
    for label in np.union1d(bin_a, bin_b):
        ia, ib = np.flatnonzero(bin_a == label), np.flatnonzero(bin_b == label)
        k = min(ia.size, ib.size)
        if k:
            keep_a.append(rng.choice(ia, k, replace=False))
            keep_b.append(rng.choice(ib, k, replace=False))
    if not keep_a:
        return np.array([], dtype=int), np.array([], dtype=int)
    return np.sort(np.concatenate(keep_a)), np.sort(np.concatenate(keep_b))


def pairwise_dissimilarity(vectors: np.ndarray) -> float:
    """1 - mean over i != j of cos(e_i, e_j) for L2-normalised rows (float64 accumulation)."""
    e = np.asarray(vectors, dtype=np.float64)
    m = e.shape[0]
    if m < 2:
        return float("nan")
    total = e.sum(axis=0)
    # sum_{i != j} e_i . e_j = |sum e|^2 - sum |e_i|^2
    off = float(total @ total - np.einsum("ij,ij->", e, e))
    return 1.0 - off / (m * (m - 1))


def matched_prompt_metrics(
    lengths: np.ndarray, entropy_sums: np.ndarray, vectors: np.ndarray
) -> dict[str, float]:
    """Per-prompt R (mean rate), N (mean length), rho(N, r_N) (Pearson) and D of a rollout set."""
    n = np.asarray(lengths, float)
    rate = np.asarray(entropy_sums, float) / n
    rho = (
        float(np.corrcoef(n, rate)[0, 1])
        if n.size > 2 and n.std() > 0 and rate.std() > 0
        else float("nan")
    )
    return {
        "R": float(rate.mean()),
        "N": float(n.mean()),
        "rho": rho,
        "D": pairwise_dissimilarity(vectors),
        "M": int(n.size),
    }


def _prompt_groups(
    rollouts: pd.DataFrame, embeddings: Mapping[str, np.ndarray], key: RolloutKey
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """prompt_id -> (n_steps, sum_entropy, vectors) with the rollouts aligned to their vectors."""
    missing = [c for c in ("prompt_id", "sample", "n_steps", "sum_entropy") if c not in rollouts]
    if missing:
        raise ValueError(f"rollouts of {'/'.join(key)} lack column(s) {missing}")
    vectors = embeddings.get("embeddings", embeddings.get("vectors"))
    if vectors is None or "prompt_id" not in embeddings or "sample" not in embeddings:
        raise ValueError(f"embeddings of {'/'.join(key)} need arrays prompt_id, sample, embeddings")
    index = pd.MultiIndex.from_arrays(
        [
            np.asarray(embeddings["prompt_id"]).astype(str),
            np.asarray(embeddings["sample"], np.int64),
        ]
    )
    lookup = pd.Series(np.arange(len(index)), index=index)
    keys = pd.MultiIndex.from_arrays(
        [rollouts["prompt_id"].astype(str).to_numpy(), rollouts["sample"].to_numpy(np.int64)]
    )
    found = keys.isin(lookup.index)
    if not found.all():
        first = keys[~found][0]
        raise ValueError(
            f"{'/'.join(key)}: rollout (prompt {first[0]}, sample {first[1]}) has no embedding"
        )
    rows = lookup.loc[keys].to_numpy()
    n_steps = rollouts["n_steps"].to_numpy(float)
    if (n_steps <= 0).any():
        raise ValueError(f"{'/'.join(key)}: n_steps must be positive")
    sums = rollouts["sum_entropy"].to_numpy(float)
    vec = np.asarray(vectors)[rows]
    out = {}
    for prompt, positions in rollouts.groupby(rollouts["prompt_id"].astype(str)).indices.items():
        out[prompt] = (n_steps[positions], sums[positions], vec[positions])
    return out


def length_matched(
    rollouts_by_key: Mapping[RolloutKey, pd.DataFrame],
    embeddings_by_key: Mapping[RolloutKey, Mapping[str, np.ndarray]],
    settings: StatsSettings,
    out_path: str | os.PathLike[str],
    *,
    prompt_metrics_path: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Length-matched reanalysis of the slopes, next to the unmatched ones from the same rollouts.

    For every (family, task, prompt), :func:`match_lengths` subsamples the base and fine-tuned
    rollouts to the same length distribution (``settings.robustness.length_bins`` quantile bins,
    seeded by ``settings.seed``, repeated ``length_repeats`` times). R, N, rho and D are recomputed
    per prompt and variant on the subsamples, and the Beta GLMM of :mod:`canopy.stats` (same
    formulas) is refitted on the unmatched panel and on every matched one. R and 1/N of every
    panel are standardised with the unmatched panel's mean and SD: re-standardising per repeat
    would rescale the slope by each subsample's own SD of R and confound the comparison. Prompts
    with fewer than ``min_matched`` matched rollouts per variant are dropped (counted in
    ``n_prompts_dropped``).

    Output rows: ``analysis`` = ``unmatched`` (all rollouts), ``matched`` (one per repeat,
    ``repeat`` = 0..R-1) and ``matched_pooled`` (mean over repeats of the Wald slopes and the
    delta-method ratio; se combines the mean within-repeat variance and the between-repeat
    variance). ``method`` is glmmTMB's (``wald``, ``delta``, ``bootstrap`` for the ratio's
    parametric-bootstrap interval); ``converged`` flags each fit. Per-variant rows also carry the
    mean over prompts of N, R and rho. ``prompt_metrics_path`` optionally receives the per-prompt
    metrics of every repeat.
    """
    rob = settings.robustness
    keys = sorted(rollouts_by_key)
    if set(keys) != set(embeddings_by_key):
        raise ValueError(
            f"rollouts and embeddings cover different keys: "
            f"{sorted(set(keys) ^ set(embeddings_by_key))}"
        )
    groups = {
        key: _prompt_groups(rollouts_by_key[key], embeddings_by_key[key], key) for key in keys
    }
    pairs = sorted({(f, t) for f, _, t in keys})
    variants = (
        settings.reference_variant,
        *sorted({v for _, v, _ in keys} - {settings.reference_variant}),
    )
    if len(variants) != 2:
        raise ValueError(f"length matching needs two variants, got {variants}")
    rng = np.random.default_rng(settings.seed)

    def metrics_rows(repeat: int | None) -> tuple[list[dict[str, Any]], int]:
        rows, dropped = [], 0
        for family, task in pairs:
            base_key, ft_key = (family, variants[0], task), (family, variants[1], task)
            if base_key not in groups or ft_key not in groups:
                raise ValueError(f"{family}/{task}: rollouts of both variants are needed")
            for prompt in sorted(set(groups[base_key]) & set(groups[ft_key])):
                base, ft = groups[base_key][prompt], groups[ft_key][prompt]
                if repeat is None:
                    ia, ib = np.arange(base[0].size), np.arange(ft[0].size)
                else:
                    ia, ib = match_lengths(base[0], ft[0], rob.length_bins, rng)
                    if ia.size < rob.min_matched:
                        dropped += 1
                        continue
                for variant, data, idx in ((variants[0], base, ia), (variants[1], ft, ib)):
                    rows.append(
                        {
                            "family": family,
                            "variant": variant,
                            "task": task,
                            "prompt_id": prompt,
                            "prompt_uid": f"{task}/{prompt}",
                            **matched_prompt_metrics(data[0][idx], data[1][idx], data[2][idx]),
                        }
                    )
        return rows, dropped

    repeats = [None, *range(rob.length_repeats)]
    panels, dropped_counts = [], []
    columns = ["family", "variant", "task", "prompt_id", "prompt_uid", "R", "N", "rho", "D", "M"]
    for repeat in repeats:
        rows, dropped = metrics_rows(repeat)
        metrics = pd.DataFrame(rows, columns=columns)
        metrics["repeat"] = -1 if repeat is None else repeat
        panels.append(metrics)
        dropped_counts.append(dropped)
    # The unmatched panel's constants, for every fit (see the docstring).
    standardisation = prepare_panel(panels[0], settings).attrs["standardisation"]
    # A matched panel can lose so many prompts that the model is no longer estimable (a task or
    # a variant's spread in R gone): that repeat is reported as failed, not fitted.
    fits: list[Any] = []
    for metrics in panels:
        try:
            prepare_panel(metrics, settings, standardisation=standardisation)
            fits.append(None)
        except ValueError as error:
            fits.append(f"not estimable: {error}")
    estimable = [i for i, fit in enumerate(fits) if fit is None]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".length-matched-", dir=Path(out_path).parent) as tmp:
        fitted = fit_beta_glmm_many(
            [panels[i] for i in estimable],
            settings,
            [Path(tmp) / f"fit{i}" for i in estimable],
            save_model=False,
            standardisation=standardisation,
            keep_going=True,
        )
    for i, fit in zip(estimable, fitted):
        fits[i] = fit
    if isinstance(fits[0], str):
        raise RuntimeError(f"the Beta GLMM could not be fitted to the unmatched panel: {fits[0]}")
    tables = []
    for repeat, metrics, dropped, fit in zip(repeats, panels, dropped_counts, fits):
        if isinstance(fit, str):
            # A matched subsample too small or too degenerate for the model: say so in the
            # table and leave the repeat out of the pooled slopes.
            warnings.warn(
                f"length-matched repeat {repeat}: Beta GLMM failed: {fit}",
                RuntimeWarning,
                stacklevel=2,
            )
            slopes = pd.DataFrame(
                {
                    "variant": [*variants, "ratio"],
                    "slope": np.nan,
                    "se": np.nan,
                    "ci_low": np.nan,
                    "ci_high": np.nan,
                    "method": ["wald", "wald", "delta"],
                }
            )
            slopes["error"] = fit
        else:
            slopes = fit.slopes.copy()
            slopes["error"] = ""
        means = metrics.groupby("variant")[["N", "R", "rho"]].mean().reindex(variants)
        for column in ("N", "R", "rho"):
            slopes[f"mean_{column}"] = slopes["variant"].map(means[column])
        slopes.insert(0, "analysis", "unmatched" if repeat is None else "matched")
        slopes.insert(1, "repeat", -1 if repeat is None else repeat)
        slopes["converged"] = not isinstance(fit, str) and fit.converged
        slopes["n_rows"] = len(metrics)
        slopes["n_prompts"] = int(metrics["prompt_uid"].nunique())
        slopes["n_prompts_dropped"] = dropped
        slopes["mean_rollouts"] = float(metrics["M"].mean()) if len(metrics) else np.nan
        tables.append(slopes)
    table = pd.concat(tables, ignore_index=True)
    matched = table[
        (table["analysis"] == "matched")
        & table["method"].isin(["wald", "delta"])
        & (table["error"] == "")
    ]
    z = sps.norm.ppf(1 - (1 - settings.confidence) / 2)
    pooled = []
    for variant, rows in matched.groupby("variant", sort=False):
        mean = float(rows["slope"].mean())
        between = float(rows["slope"].var(ddof=1)) if len(rows) > 1 else 0.0
        se = float(np.sqrt((rows["se"] ** 2).mean() + between))
        pooled.append(
            {
                "analysis": "matched_pooled",
                "repeat": -1,
                "variant": variant,
                "slope": mean,
                "se": se,
                "ci_low": mean - z * se,
                "ci_high": mean + z * se,
                "method": rows["method"].iloc[0],
                "converged": bool(rows["converged"].all()),
                "error": "",
                "n_repeats": int(len(rows)),
                **{
                    c: float(rows[c].mean())
                    for c in (
                        "n_rows",
                        "n_prompts",
                        "mean_N",
                        "mean_R",
                        "mean_rho",
                        "n_prompts_dropped",
                        "mean_rollouts",
                    )
                },
            }
        )
    table = pd.concat([table, pd.DataFrame(pooled)], ignore_index=True)
    table["standardisation"] = json.dumps(standardisation, sort_keys=True)
    write_tsv(table, out_path)
    if prompt_metrics_path is not None:
        write_tsv(pd.concat(panels, ignore_index=True), prompt_metrics_path)
    return table
