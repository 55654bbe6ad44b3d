"""Tests of canopy.power: the planner's resampling and Monte-Carlo summaries, the R script's
new-rows simulation against glmmTMB's own simulate(), and (slow) the planner's power against a
direct Monte-Carlo count on panels simulated with a known slope ratio."""

from __future__ import annotations

import json
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from canopy.config import ConfigError
from canopy.power import (
    fit_outcome,
    median_standard_error,
    plan_power,
    resample_prompts,
    summarise_power,
)
from canopy.stats import StatsSettings, run_r, fit_beta_glmm, fit_beta_glmm_many, prepare_panel
from simulate_panel import PanelTruth, simulate_panel
from support.workflow import REPO, planned_jobs, snakemake

TINY = REPO / "tests" / "configs" / "tiny.yaml"

#: One family (no family effect), length linear: the Gemma run's model, whose generating model
#: the stats tests' simulation lies inside.
ONE_FAMILY = {
    "formula": "D ~ R_sc * variant + invN_sc * variant + task + (1 | prompt_uid)",
    "dispersion": "~ variant + task",
}


# ------------------------------------------------------------------------------ settings


def test_power_settings_defaults_and_checks():
    power = StatsSettings.from_config({}).power
    assert power.prompts == (32, 64, 128, 256, 512) and power.ratio == 3.0
    assert power.interval == "delta"  # the headline's interval
    with pytest.raises(ConfigError, match=r"stats\.power\.prompts"):
        StatsSettings.from_config({"power": {"prompts": [32, 32]}})
    with pytest.raises(ConfigError, match=r"stats\.power\.simulations"):
        StatsSettings.from_config({"power": {"simulations": 5}})


# ------------------------------------------------------------------- resampling and summaries


def test_resample_prompts_copies_whole_prompts_per_task():
    panel = simulate_panel(0, families=("fam_a", "fam_b"), n_prompts=5).panel
    design = resample_prompts(panel, 7, np.random.default_rng(1))
    # 7 prompts per task, each with all four (family, variant) rows of the prompt it copies.
    assert design.groupby("task")["prompt_uid"].nunique().eq(7).all()
    assert len(design) == 7 * 4 * 4
    assert design.groupby("prompt_uid").size().eq(4).all()
    for _, rows in design.groupby("prompt_uid"):
        task = rows["task"].iloc[0]
        source = panel[(panel["task"] == task)].set_index(["family", "variant", "prompt_id"])["R"]
        # The copied prompt's (family, variant) rates match one pilot prompt of the same task.
        ids = source.index.get_level_values("prompt_id").unique()
        assert any(
            np.allclose(
                rows.set_index(["family", "variant"])["R"].sort_index(),
                source.xs(pid, level="prompt_id").sort_index(),
            )
            for pid in ids
        )


def test_median_standard_error_matches_the_normal_theory():
    # For a normal sample the median's SE is sqrt(pi / 2) sigma / sqrt(n).
    values = np.random.default_rng(3).normal(0.0, 2.0, size=4000)
    expected = np.sqrt(np.pi / 2) * 2.0 / np.sqrt(values.size)
    assert median_standard_error(values) == pytest.approx(expected, rel=0.15)


def test_summarise_power_counts_failures_as_not_excluding_one():
    table = pd.DataFrame(
        {
            "prompts": 8,
            "effect": "hypothesised",
            "simulation": range(5),
            "true_ratio": 3.0,
            "ratio": [2.0, 3.0, 1.5, np.nan, 4.0],
            "ci_low": [1.2, 0.8, 1.1, np.nan, 2.0],
            "ci_high": [2.8, 5.2, 1.9, np.nan, 6.0],
            "converged": [True, True, True, False, False],
            "error": ["", "", "", "glmmTMB could not fit", ""],
        }
    )
    row = summarise_power(table).iloc[0]
    # Excluding 1: rows 0 and 2; row 4 excludes it but did not converge; row 3 failed.
    assert row["share_excluding_1"] == pytest.approx(2 / 5)
    assert row["share_excluding_1_se"] == pytest.approx(np.sqrt(0.4 * 0.6 / 5))
    assert (row["failed"], row["not_converged"]) == (1, 2)
    assert row["median_ci_width"] == pytest.approx(1.6)  # widths 1.6, 4.4, 0.8


# -------------------------------------------------------- the R script's new-rows simulation


def test_new_rows_simulation_draws_what_glmmtmb_simulate_draws(tmp_path):
    """At the fitted rows, the planner's draws (predict at new rows, new random intercepts, Beta)
    and glmmTMB's unconditional simulate() have the same per-row mean and variance: the paper's
    model with its splines, a family intercept and the dispersion model."""
    panel = simulate_panel(5, families=("fam_a", "fam_b", "fam_c"), n_prompts=6).panel
    settings = StatsSettings.from_config({"bootstrap": 10})
    fit_beta_glmm(panel, settings, tmp_path / "fit")
    summary = json.loads((tmp_path / "fit" / "summary.json").read_text())
    frame = prepare_panel(panel, settings, standardisation=summary["standardisation"])
    design = tmp_path / "design.tsv"
    frame.to_csv(design, sep="\t", index=False)
    draws = 150
    jobs = [
        {"design": str(design), "out": str(tmp_path / f"d{i}.tsv"), "seed": i} for i in range(draws)
    ]
    model = str(tmp_path / "fit" / "model.rds")
    job = {"model": model, "slope_term": "R_sc", "effects": {"fitted": None}, "designs": jobs}
    run_r("simulate_beta_glmm.R", job, tmp_path, settings.rscript)
    ours = np.stack([pd.read_csv(j["out"], sep="\t")["D_fitted"].to_numpy() for j in jobs])
    diag = {"model": model, "nsim": draws, "seed": 7, "out_dir": str(tmp_path / "sim")}
    run_r("simulate_beta_glmm.R", {**diag, "use_dharma": False}, tmp_path, settings.rscript)
    theirs = np.fromfile(tmp_path / "sim" / "simulated.f64", dtype="<f8").reshape(draws, -1)
    assert ours.shape == theirs.shape
    # Per row, two-sample z statistics of the mean and of the variance; under one model their
    # squares sum to about chi-square with one degree of freedom per row.
    n = draws
    z_mean = (ours.mean(0) - theirs.mean(0)) / np.sqrt(
        (ours.var(0, ddof=1) + theirs.var(0, ddof=1)) / n
    )

    def variance_se(x):
        centred = x - x.mean(0)
        return np.sqrt(((centred**4).mean(0) - centred.var(0) ** 2) / n)

    z_var = (ours.var(0, ddof=1) - theirs.var(0, ddof=1)) / np.sqrt(
        variance_se(ours) ** 2 + variance_se(theirs) ** 2
    )
    rows = ours.shape[1]
    # Draws of one row share the family and prompt intercepts of its draw, so rows are not
    # independent; the bound is loose enough for that and still fails for a wrong model (a
    # missing random intercept or a dispersion off by a factor moves the variances by far more).
    assert sps.chi2.sf(np.sum(z_mean**2), rows) > 1e-4
    assert sps.chi2.sf(np.sum(z_var**2), rows) > 1e-4


def test_new_rows_simulation_refuses_random_slopes(tmp_path):
    panel = simulate_panel(6, families=("fam_a",), n_prompts=10).panel
    settings = StatsSettings.from_config(
        {
            "formula": "D ~ R_sc * variant + invN_sc + task + (1 + invN_sc | prompt_uid)",
            "dispersion": "~ variant",
            "bootstrap": 10,
            "power": {"prompts": [4], "simulations": 10},
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit_beta_glmm(panel, settings, tmp_path / "fit")
    with pytest.raises(RuntimeError, match=r"random intercepts \(1 \| group\) only"):
        plan_power(
            panel,
            tmp_path / "fit",
            settings,
            tmp_path / "power.tsv",
        )


# ------------------------------------------------- the planner against a direct Monte-Carlo count

#: Prompts per (task, variant) at which the direct count's power is near one half (0.25 at 12
#: and 0.9 at 24 in a trial), where a share is most sensitive to a wrong model.
PROMPTS = 16
SIMULATIONS = 40
TRUE_RATIO = PanelTruth().slope_ratio  # 2.8


def _direct_count(settings: StatsSettings, tmp_path: Path) -> pd.DataFrame:
    """Panels drawn from the known generating model with PROMPTS prompts, fitted as the planner
    fits its own, on two R processes."""
    panels = [
        simulate_panel(9000 + i, families=("fam_a",), n_prompts=PROMPTS).panel
        for i in range(SIMULATIONS)
    ]
    dirs = [tmp_path / "direct" / str(i) for i in range(SIMULATIONS)]

    def fit(part):
        return fit_beta_glmm_many(
            [panels[i] for i in part],
            settings,
            [dirs[i] for i in part],
            save_model=False,
            keep_going=True,
        )

    halves = [range(0, SIMULATIONS, 2), range(1, SIMULATIONS, 2)]
    with ThreadPoolExecutor(2) as pool:
        results = dict(
            zip(
                [i for half in halves for i in half],
                [r for rs in pool.map(fit, halves) for r in rs],
            )
        )
    return pd.DataFrame(
        [
            {
                "prompts": PROMPTS,
                "effect": "direct",
                "simulation": i,
                "true_ratio": TRUE_RATIO,
                **fit_outcome(results[i], settings.power.interval),
            }
            for i in range(SIMULATIONS)
        ]
    )


@pytest.mark.slow
def test_planner_power_agrees_with_a_direct_count(tmp_path):
    """The pilot's true ratio is 1; planned at the hypothesised ratio 2.8, the planner's share of
    intervals excluding 1 and their median width agree with a direct count on panels simulated
    with ratio 2.8, within their Monte-Carlo standard errors (two combined SEs). At the fitted
    ratio (about 1) the share is the test's size, about 5 %."""
    settings = StatsSettings.from_config(
        {
            **ONE_FAMILY,
            "bootstrap": 10,
            "power": {"prompts": [PROMPTS], "simulations": SIMULATIONS, "ratio": TRUE_RATIO},
        }
    )
    truth = PanelTruth(slope_finetuned=PanelTruth().slope_base)  # ratio 1
    pilot = simulate_panel(42, families=("fam_a",), n_prompts=300, truth=truth).panel
    fit_beta_glmm(pilot, settings, tmp_path / "pilot")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plan_power(
            pilot,
            tmp_path / "pilot",
            settings,
            tmp_path / "power.tsv",
            tmp_path / "power_simulations.tsv",
            workers=2,
        )
        direct = summarise_power(_direct_count(settings, tmp_path)).iloc[0]
    table = pd.read_csv(tmp_path / "power.tsv", sep="\t").set_index("effect")
    assert len(pd.read_csv(tmp_path / "power_simulations.tsv", sep="\t")) == 2 * SIMULATIONS
    planned = table.loc["hypothesised"]
    assert planned["true_ratio"] == pytest.approx(TRUE_RATIO)
    assert planned["failed"] == 0 and direct["failed"] == 0
    # Agreement of two independent Monte-Carlo estimates: their difference has SE
    # sqrt(se_1^2 + se_2^2).
    for column in ("share_excluding_1", "median_ci_width"):
        se = np.hypot(planned[f"{column}_se"], direct[f"{column}_se"])
        print(
            f"{column}: planned {planned[column]:.3f} +- {planned[f'{column}_se']:.3f}, "
            f"direct {direct[column]:.3f} +- {direct[f'{column}_se']:.3f}"
        )
        assert abs(planned[column] - direct[column]) <= 2 * se, (column, planned, direct)
    # The shares are informative (neither 0 nor 1), so the comparison could fail.
    assert 0.15 < direct["share_excluding_1"] < 0.85
    fitted = table.loc["fitted"]
    assert abs(fitted["true_ratio"] - 1.0) < 0.3
    size_se = np.sqrt(0.05 * 0.95 / SIMULATIONS)
    assert fitted["share_excluding_1"] <= 0.05 + 3 * size_se


# ------------------------------------------------------------------------------------ workflow


@pytest.mark.slow
def test_power_is_an_optional_target_of_the_main_setting(tmp_path):
    """`snakemake power` plans the planner and its figure once, for the main setting; the default
    target plans neither (its refits take minutes)."""
    config = str(shutil.copy(TINY, tmp_path / "tiny.yaml"))
    planned = planned_jobs(snakemake(tmp_path, "power", "-n", "--configfile", config).stdout)
    assert planned["plan_power"] == planned["figure_power"] == planned["fit_glmm"] == 1
    default = planned_jobs(snakemake(tmp_path, "-n", "--configfile", config).stdout)
    assert default and "plan_power" not in default and "figure_power" not in default
