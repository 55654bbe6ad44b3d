"""The power planner: how many prompts a question about the slope ratio needs.

From a finished run's panel and its Beta GLMM fit (``glmm/model.rds``), panels with more prompts
per (family, task, variant) are simulated from the fitted model and refitted with the same
formula; per prompt count the planner reports the median width of the slope ratio's confidence
interval and the share of intervals that exclude 1 (the power to tell the ratio from "no
change"), at the fitted ratio and at a hypothesised one (``stats.power.ratio``), each with its
Monte-Carlo standard error.

What a simulated panel is:

* **Prompts.** Each simulated prompt of a task copies the covariates of a pilot prompt of that
  task drawn with replacement: the mean entropy rate R̄ and mean length N̄ of every (family,
  variant) row on it, together, so the pairing of base and fine-tuned covariates on one prompt is
  kept. Its random intercept is drawn anew.
* **Model.** Everything else is the fit's: fixed effects, the dispersion model, the variance of
  each random intercept (family intercepts are drawn anew per panel, as glmmTMB's unconditional
  simulate() does). At the hypothesised ratio only the slope-by-variant interaction changes,
  to (ratio - 1) x the fitted base slope.
* **Rollouts.** D and R̄ of a simulated prompt vary as the pilot's did, so the answer holds for
  the pilot's rollouts per prompt (M); more rollouts make D and R̄ less noisy and need fewer
  prompts, so for a larger M it is conservative.

The draws come from ``canopy/R/simulate_beta_glmm.R`` (its new-rows mode), the refits from
:func:`canopy.stats.fit_beta_glmm_many`, exactly as the workflow fits a real panel (each panel
standardised on its own). Simulations are seeded per (prompt count, simulation), so the result
does not depend on how many workers share them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from canopy.config.analysis import StatsSettings
from canopy.config.formula import SLOPE_TERM
from canopy.io import write_tsv
from canopy.stats import (
    BetaGlmmResult,
    panel_for_r,
    run_r,
    check_r_environment,
    fit_beta_glmm_many,
    prepare_panel,
)

__all__ = [
    "EFFECTS",
    "PowerPlan",
    "fit_outcome",
    "median_standard_error",
    "plan_power",
    "resample_prompts",
    "summarise_power",
]

#: The two effects planned for: the fitted slope ratio and the hypothesised one.
EFFECTS = ("fitted", "hypothesised")
#: Columns of the per-simulation table (power_simulations.tsv).
SIMULATION_COLUMNS = [
    "prompts",
    "effect",
    "simulation",
    "true_ratio",
    "ratio",
    "ci_low",
    "ci_high",
    "converged",
    "error",
]


@dataclass(frozen=True)
class PowerPlan:
    table: pd.DataFrame
    simulations: pd.DataFrame
    seconds: float


def resample_prompts(pilot: pd.DataFrame, prompts: int, rng: np.random.Generator) -> pd.DataFrame:
    """A design of ``prompts`` prompts per task, each a pilot prompt of the task drawn with
    replacement with all its (family, variant) rows; new prompt ids ``sim0000``..."""
    parts = []
    for task, rows in pilot.groupby("task", sort=True):
        ids = np.array(sorted(rows["prompt_id"].unique()))
        drawn = ids[rng.integers(0, len(ids), size=prompts)]
        by_id = {pid: group for pid, group in rows.groupby("prompt_id")}
        for index, pid in enumerate(drawn):
            block = by_id[pid].copy()
            block["prompt_id"] = f"sim{index:04d}"
            block["prompt_uid"] = f"{task}/sim{index:04d}"
            parts.append(block)
    return pd.concat(parts, ignore_index=True)


def fit_outcome(result: BetaGlmmResult | str, interval: str) -> dict[str, Any]:
    """The slope ratio, its ``interval`` bounds and convergence of one refit (or its error)."""
    if isinstance(result, str):
        return {
            "ratio": math.nan,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "converged": False,
            "error": result.splitlines()[0][:200],
        }
    row = result.slope("ratio", interval)
    return {
        "ratio": float(row["slope"]),
        "ci_low": float(row["ci_low"]),
        "ci_high": float(row["ci_high"]),
        "converged": result.converged,
        "error": "",
    }


def median_standard_error(values: np.ndarray) -> float:
    """Monte-Carlo SE of a sample median, from the distribution-free order-statistic 95 %
    interval (binomial ranks n/2 -+ 1.96 sqrt(n)/2) divided by 2 x 1.96: no density estimate."""
    values = np.sort(np.asarray(values, float))
    n = values.size
    if n < 2:
        return math.nan
    z = sps.norm.ppf(0.975)
    low = max(int(math.floor(n / 2 - z * math.sqrt(n) / 2)), 1)
    high = min(int(math.ceil(n / 2 + z * math.sqrt(n) / 2)), n)
    return float((values[high - 1] - values[low - 1]) / (2 * z))


def summarise_power(simulations: pd.DataFrame) -> pd.DataFrame:
    """Per (prompts, effect): the median CI width of the ratio and the share of CIs that exclude
    1, with Monte-Carlo standard errors.

    A refit that failed or did not converge counts as not excluding 1 (a real analysis could not
    claim the effect from it) and gives no width; ``failed`` and ``not_converged`` count them.
    The share's SE is the binomial sqrt(p (1 - p) / n), 0 when every or no interval excludes 1.
    """
    rows = []
    for (prompts, effect), group in simulations.groupby(["prompts", "effect"], sort=False):
        n = len(group)
        usable = (
            group["converged"].astype(bool)
            & np.isfinite(group["ci_low"])
            & np.isfinite(group["ci_high"])
        )
        excludes = usable & ((group["ci_low"] > 1.0) | (group["ci_high"] < 1.0))
        widths = (group.loc[usable, "ci_high"] - group.loc[usable, "ci_low"]).to_numpy(float)
        share = float(excludes.mean())
        rows.append(
            {
                "prompts": int(prompts),
                "effect": effect,
                "true_ratio": float(group["true_ratio"].iloc[0]),
                "simulations": n,
                "failed": int((group["error"].fillna("") != "").sum()),
                "not_converged": int((~group["converged"].astype(bool)).sum()),
                "median_ratio": (
                    float(np.median(group.loc[usable, "ratio"])) if usable.any() else math.nan
                ),
                "median_ci_width": float(np.median(widths)) if widths.size else math.nan,
                "median_ci_width_se": median_standard_error(widths),
                "share_excluding_1": share,
                "share_excluding_1_se": math.sqrt(share * (1.0 - share) / n),
            }
        )
    return pd.DataFrame(rows)


def _effects(summary: Mapping[str, Any], settings: StatsSettings) -> dict[str, dict[str, Any]]:
    """Interaction coefficient (None: the fitted one) and true ratio of each planned effect."""
    base = float(summary["slopes"][settings.reference_variant]["estimate"])
    return {
        "fitted": {"coefficient": None, "ratio": float(summary["slope_ratio"]["estimate"])},
        "hypothesised": {
            "coefficient": (settings.power.ratio - 1.0) * base,
            "ratio": settings.power.ratio,
        },
    }


def _run_chunk(
    items: Sequence[tuple[int, int]],
    raw: pd.DataFrame,
    pilot: pd.DataFrame,
    fit_dir: Path,
    settings: StatsSettings,
    effects: Mapping[str, Mapping[str, Any]],
    work: Path,
) -> list[dict[str, Any]]:
    """Simulate and refit the designs ``items`` ((prompts, simulation) pairs) in two R processes
    (one simulating, one fitting) inside ``work``."""
    power = settings.power
    work.mkdir(parents=True)
    designs, jobs = {}, []
    for prompts, simulation in items:
        # Seeded by (seed, prompts, simulation): the same panel whatever the chunking.
        rng = np.random.default_rng([power.seed, prompts, simulation])
        index = resample_prompts(pilot.assign(_row=np.arange(len(pilot))), prompts, rng)
        design = pilot.iloc[index["_row"].to_numpy()].copy()
        design[["prompt_id", "prompt_uid"]] = index[["prompt_id", "prompt_uid"]].to_numpy()
        name = f"k{prompts}_s{simulation}"
        path = work / f"{name}.design.tsv"
        panel_for_r(design, settings).to_csv(path, sep="\t", index=False, na_rep="NaN")
        designs[(prompts, simulation)] = (design, raw.iloc[index["_row"].to_numpy()])
        jobs.append(
            {
                "design": str(path),
                "out": str(work / f"{name}.simulated.tsv"),
                "seed": int(rng.integers(2**31 - 1)),
            }
        )
    run_r(
        "simulate_beta_glmm.R",
        {
            "model": str(fit_dir / "model.rds"),
            "slope_term": SLOPE_TERM,
            "effects": {name: effect["coefficient"] for name, effect in effects.items()},
            "designs": jobs,
        },
        work,
        settings.rscript,
    )
    panels, out_dirs, keys = [], [], []
    for (prompts, simulation), job in zip(items, jobs):
        design, raw_rows = designs[(prompts, simulation)]
        drawn = pd.read_csv(job["out"], sep="\t")
        for effect in effects:
            panel = raw_rows.reset_index(drop=True).copy()
            panel[["prompt_id", "prompt_uid"]] = design[["prompt_id", "prompt_uid"]].to_numpy()
            panel["D"] = drawn[f"D_{effect}"].to_numpy(float)
            panels.append(panel)
            out_dirs.append(work / f"fit_k{prompts}_s{simulation}_{effect}")
            keys.append((prompts, simulation, effect))
    results = fit_beta_glmm_many(panels, settings, out_dirs, save_model=False, keep_going=True)
    return [
        {
            "prompts": prompts,
            "effect": effect,
            "simulation": simulation,
            "true_ratio": effects[effect]["ratio"],
            **fit_outcome(result, power.interval),
        }
        for (prompts, simulation, effect), result in zip(keys, results)
    ]


def plan_power(
    panel: pd.DataFrame,
    fit_dir: str | os.PathLike[str],
    settings: StatsSettings,
    out: str | os.PathLike[str],
    simulations_out: str | os.PathLike[str] | None = None,
    *,
    workers: int = 1,
) -> PowerPlan:
    """Plan the prompts a slope-ratio question needs from ``panel`` and its fit in ``fit_dir``.

    ``fit_dir`` holds the fit's ``model.rds`` and ``summary.json`` (:func:`canopy.stats.
    fit_beta_glmm`); ``settings`` are the fit's stats settings, ``settings.power`` the planner's.
    Writes the table of :func:`summarise_power` to ``out`` and every refit's ratio and interval to
    ``simulations_out``. ``workers`` R processes run at once (each fits serially).
    """
    fit_dir = Path(fit_dir)
    summary = json.loads((fit_dir / "summary.json").read_text())
    check_r_environment(settings.rscript)
    power = settings.power
    # The fit's own standardisation: the simulation evaluates the fitted model at its covariates.
    pilot = prepare_panel(panel, settings, standardisation=summary["standardisation"])
    raw = panel.loc[:, [c for c in panel.columns if c not in ("D",)]].reset_index(drop=True)
    pilot = pilot.reset_index(drop=True)
    effects = _effects(summary, settings)
    items = [(k, s) for k in sorted(power.prompts) for s in range(power.simulations)]
    # Round-robin over items sorted by size, so each worker gets a like share of the rows.
    chunks = [items[::-1][i :: max(workers, 1)] for i in range(max(workers, 1))]
    chunks = [chunk for chunk in chunks if chunk]
    started = time.perf_counter()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".power-", dir=target.parent) as tmp:
        # Non-converged refits are counted in the table; a warning for each would bury the log.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                done = pool.map(
                    lambda pair: _run_chunk(
                        pair[1], raw, pilot, fit_dir, settings, effects, Path(tmp) / f"w{pair[0]}"
                    ),
                    enumerate(chunks),
                )
                records = [record for chunk in done for record in chunk]
    seconds = time.perf_counter() - started
    simulations = (
        pd.DataFrame(records, columns=SIMULATION_COLUMNS)
        .sort_values(["prompts", "effect", "simulation"], key=_effect_order)
        .reset_index(drop=True)
    )
    table = summarise_power(simulations)
    families = panel["family"].nunique()
    variants = panel["variant"].nunique()
    tasks = panel["task"].nunique()
    table.insert(1, "panel_rows", table["prompts"] * families * variants * tasks)
    table["interval"] = power.interval
    write_tsv(table, target)
    if simulations_out is not None:
        write_tsv(simulations, simulations_out)
    return PowerPlan(table, simulations, seconds)


def _effect_order(column: pd.Series) -> pd.Series:
    if column.name == "effect":
        return column.map({name: i for i, name in enumerate(EFFECTS)})
    return column
