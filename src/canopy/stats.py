"""Beta mixed-effects regression of semantic dissimilarity on entropy rate.

The model (glmmTMB, Beta family, logit link) with the paper's defaults::

    D ~ R_sc * variant + ns(invN_sc, 4) * variant + task + (1 | prompt_uid) + (1 | family)
    dispersion ~ variant * task + ns(invN_sc, 3) + R_sc * variant + family

``D`` is clipped to ``[clip, 1 - clip]``; ``R_sc`` is the standardised mean entropy rate and
``invN_sc`` the standardised inverse mean length, both standardised over the whole panel (sample
SD). The headline is the slope of ``R_sc`` in each variant (logit scale) and their ratio
fine-tuned / base, with a delta-method interval and a parametric-bootstrap percentile interval.

R is called as a subprocess (``Rscript`` on the files in ``canopy/R/``), not through rpy2: each fit
runs in a fresh R process with ``TZ=UTC``, a crash or a stuck optimiser cannot take the Python
process down, rpy2's version coupling to R (NOTES: 3.6 fails on R 4.2) stays out of the main
path, and the exchanged files (TSV/JSON/RDS) can be inspected and rerun by hand.

Diagnostics follow DHARMa: DHARMa itself when R can load it, otherwise our implementation on
glmmTMB's ``simulate()`` (scaled quantile residuals, KS uniformity, dispersion and outlier tests).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from canopy.config.analysis import (
    DEFAULT_DISPERSION,
    DEFAULT_FORMULA,
    RobustnessSettings,
    StatsSettings,
)
from canopy.config.formula import SLOPE_TERM
from canopy.io import atomic_path, write_json, write_tsv

__all__ = [
    "DEFAULT_FORMULA",
    "DEFAULT_DISPERSION",
    "BetaGlmmResult",
    "DiagnosticsResult",
    "REnvironmentError",
    "RobustnessSettings",
    "StatsSettings",
    "check_r_environment",
    "diagnose",
    "dispersion_test",
    "fit_beta_glmm",
    "fit_beta_glmm_many",
    "outlier_test",
    "panel_for_r",
    "prepare_panel",
    "run_r",
    "scaled_residuals",
    "uniformity_test",
]

#: Converged means: optimiser code 0, positive-definite Hessian, and max scaled gradient below this
#: (lme4's default tolerance for its scaled-gradient check).
GRADIENT_TOLERANCE = 0.002
#: How far D may stray outside [0, 1] by round-off alone: D = 1 - mean cosine of float32 unit
#: vectors, whose squared norms miss 1 by up to ~1e-6 at a few thousand dimensions, so a prompt
#: whose rollouts embed identically gives D a hair below 0. Such values are clipped to [0, 1];
#: anything further out is a corrupt diversity table and stops the regression.
D_ROUNDOFF = 1e-5
FIT_FILES = ("coefficients.tsv", "slopes.tsv", "variance_components.tsv", "convergence.json")
INSTALL_HINT = (
    "install R and glmmTMB: Debian/Ubuntu `apt-get install r-base-core r-cran-glmmtmb`; "
    "conda `conda install -c conda-forge r-base r-glmmtmb`"
)


class REnvironmentError(RuntimeError):
    """Rscript or an R package the statistics stage needs is missing."""


# --------------------------------------------------------------------------------------------
# Settings (the StatsSettings model is defined with the other config blocks in canopy.config)


def _job_settings(settings: StatsSettings) -> dict[str, Any]:
    """The settings the R scripts read."""
    return {
        "formula": settings.formula,
        "dispersion": settings.dispersion,
        "reference_variant": settings.reference_variant,
        "reference_task": settings.reference_task,
        "slope_term": SLOPE_TERM,
        "confidence": settings.confidence,
        "bootstrap": settings.bootstrap,
        "seed": settings.seed,
        "gradient_tolerance": GRADIENT_TOLERANCE,
    }


# --------------------------------------------------------------------------------------------
# R subprocess


def r_script_path(name: str) -> Path:
    """Path of an R file shipped in ``canopy/R/``."""
    return Path(str(resources.files("canopy") / "R" / name))


def _r_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TZ"] = "UTC"  # R warns and guesses without it (no systemd here)
    return env


def check_r_environment(rscript: str = "Rscript") -> dict[str, Any]:
    """Check that ``rscript`` runs and loads jsonlite, splines and glmmTMB.

    Returns ``{"R_version", "glmmTMB_version", "dharma"}``; raises :class:`REnvironmentError`
    naming the missing piece and the install command.
    """
    executable = shutil.which(rscript)
    if executable is None:
        raise REnvironmentError(
            f"Rscript not found (stats.rscript = {rscript!r}); the Beta GLMM needs R: {INSTALL_HINT}"
        )
    try:
        done = subprocess.run(
            [executable, "--vanilla", str(r_script_path("check_env.R"))],
            capture_output=True,
            text=True,
            env=_r_env(),
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise REnvironmentError(f"could not run {executable}: {error}; {INSTALL_HINT}") from error
    if done.returncode != 0:
        raise REnvironmentError(
            f"{executable} failed to start ({done.stderr.strip()[-500:]}); {INSTALL_HINT}"
        )
    report: dict[str, Any] = {"rscript": executable, "dharma": False}
    missing = []
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "MISSING":
            missing.append(value)
        elif key == "DHARMA":
            report["dharma"] = value == "TRUE"
        elif key == "R_VERSION":
            report["R_version"] = value
        elif key == "GLMMTMB_VERSION":
            report["glmmTMB_version"] = value
    if missing:
        hints = {
            "glmmTMB": INSTALL_HINT,
            "jsonlite": "Debian `apt-get install r-cran-jsonlite`; conda `conda install -c conda-forge r-jsonlite`",
            "splines": "splines ships with R itself: reinstall r-base-core (conda: r-base)",
        }
        details = "; ".join(f"{name}: {hints.get(name, INSTALL_HINT)}" for name in missing)
        raise REnvironmentError(
            f"R at {executable} cannot load the package(s) {', '.join(missing)} needed by the "
            f"Beta GLMM ({details})"
        )
    return report


def run_r(script: str, job: Mapping[str, Any], workdir: Path, rscript: str) -> None:
    """Run one of the package's R scripts (canopy/R/) on a job written as JSON into ``workdir``,
    raising with R's own message when it fails."""
    job_path = workdir / f"{Path(script).stem}.job.json"
    job_path.write_text(json.dumps(job, indent=2))
    executable = shutil.which(rscript) or rscript
    done = subprocess.run(
        [executable, "--vanilla", str(r_script_path(script)), str(job_path)],
        capture_output=True,
        text=True,
        env=_r_env(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"R script {script} failed (exit {done.returncode}):\n{done.stderr.strip()[-3000:]}"
        )


# --------------------------------------------------------------------------------------------
# Panel preparation and checks

ID_COLUMNS = ("family", "variant", "task", "prompt_id", "prompt_uid")


def _formula_variables(text: str, columns: Sequence[str]) -> list[str]:
    return [c for c in columns if re.search(rf"(?<![\w.]){re.escape(c)}(?![\w.])", text)]


def prepare_panel(
    panel: pd.DataFrame,
    settings: StatsSettings,
    *,
    standardisation: Mapping[str, Mapping[str, float]] | None = None,
) -> pd.DataFrame:
    """Validate the panel and add the model's columns (``D`` clipped, ``R_sc``, ``invN_sc``).

    ``D`` within :data:`D_ROUNDOFF` of [0, 1] is round-off and is first clipped to [0, 1]; further
    out it raises, naming the prompts. The dissimilarity before the ``clip`` margin is kept as
    ``D_raw``.

    ``standardisation`` (``{"R": {"mean", "sd"}, "invN": {"mean", "sd"}}``, as in a fit's
    ``summary.json``) standardises with given constants instead of this panel's own, so that a
    refit on a subset or resample of the data (the length-matched reanalysis) reports its slopes
    per the same unit of R as the original fit. The constants used are in
    ``frame.attrs["standardisation"]``. Raises ``ValueError`` naming the offending
    column, rows (``prompt_uid``) or control that cannot be estimated.
    """
    required = [*ID_COLUMNS, "D", "R", "N"]
    missing = [c for c in required if c not in panel.columns]
    if missing:
        raise ValueError(
            f"panel lacks column(s) {missing}; expected the panel of docs/architecture.md"
        )
    if len(panel) == 0:
        raise ValueError("panel is empty")
    frame = panel.copy()
    for column in ID_COLUMNS:
        frame[column] = frame[column].astype(str)
        bad = frame[column].str.contains(r"[\t\n\r]", regex=True)
        if bad.any():
            raise ValueError(
                f"panel column {column} holds tabs/newlines, e.g. {frame.loc[bad, column].iloc[0]!r}"
            )
    duplicated = frame.duplicated(["family", "variant", "task", "prompt_id"], keep=False)
    if duplicated.any():
        example = frame.loc[duplicated, ["family", "variant", "prompt_uid"]].iloc[0].tolist()
        raise ValueError(f"panel has duplicate rows for (family, variant, prompt) {example}")
    for column in ("D", "R", "N"):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(float))
        if column == "D":
            bad |= (values < -D_ROUNDOFF).to_numpy() | (values > 1 + D_ROUNDOFF).to_numpy()
            values = values.clip(0.0, 1.0)
        if column == "N":
            bad |= (values <= 0).to_numpy()
        if bad.any():
            rows = frame.loc[bad, ["family", "variant", "prompt_uid"]].head(5).to_dict("records")
            raise ValueError(
                f"panel column {column} has {int(bad.sum())} missing or out-of-range value(s), "
                f"e.g. {rows}; fix or drop these prompts before the regression"
            )
        frame[column] = values.astype(float)
    check_estimable(frame, settings)
    frame["D_raw"] = frame["D"]
    frame["D"] = frame["D"].clip(settings.clip, 1.0 - settings.clip)
    inv_n = 1.0 / frame["N"]
    if standardisation is None:
        standardisation = {"R": _moments(frame["R"], "R"), "invN": _moments(inv_n, "1/N")}
    frame["R_sc"] = _standardise(frame["R"], standardisation["R"])
    frame["invN_sc"] = _standardise(inv_n, standardisation["invN"])
    frame.attrs["standardisation"] = {
        name: {"mean": float(values["mean"]), "sd": float(values["sd"])}
        for name, values in standardisation.items()
    }
    frame["logit_D"] = np.log(frame["D"] / (1.0 - frame["D"]))
    return frame


def _moments(values: pd.Series, name: str) -> dict[str, float]:
    """Mean and sample SD of a covariate over the panel (its standardisation constants)."""
    sd = float(values.std(ddof=1))
    if not np.isfinite(sd) or sd == 0:
        raise ValueError(f"{name} is constant over the panel: its slope cannot be estimated")
    return {"mean": float(values.mean()), "sd": sd}


def _standardise(values: pd.Series, moments: Mapping[str, float]) -> np.ndarray:
    return ((values - moments["mean"]) / moments["sd"]).to_numpy()


def check_estimable(panel: pd.DataFrame, settings: StatsSettings) -> None:
    """Raise ``ValueError`` explaining which control the panel cannot support."""
    model_text = settings.formula + " " + settings.dispersion
    variants = sorted(panel["variant"].unique())
    if settings.reference_variant not in variants:
        raise ValueError(
            f"reference variant {settings.reference_variant!r} (stats.reference_variant) is not in "
            f"the panel (variants: {variants})"
        )
    if len(variants) != 2:
        raise ValueError(
            f"the panel has variant(s) {variants}: the {SLOPE_TERM} x variant interaction (the slope "
            "ratio fine-tuned/base) needs exactly two variants, base and fine-tuned"
        )
    families = sorted(panel["family"].unique())
    if len(families) < 2 and "family" in _formula_variables(model_text, ["family"]):
        raise ValueError(
            f"the panel has one family ({families[0]!r}): the family random effect (1 | family) "
            "and the dispersion's family term cannot be estimated; add a family or remove them "
            "from stats.formula and stats.dispersion"
        )
    tasks = sorted(panel["task"].unique())
    if "task" in _formula_variables(model_text, ["task"]):
        if settings.reference_task not in tasks:
            raise ValueError(
                f"reference task {settings.reference_task!r} (stats.reference_task) is not in the "
                f"panel (tasks: {tasks})"
            )
        if len(tasks) < 2:
            raise ValueError(
                f"the panel has one task ({tasks[0]!r}): the task effects cannot be estimated; "
                "remove task from stats.formula and stats.dispersion"
            )
    if panel["prompt_uid"].nunique() == len(panel) and "prompt_uid" in model_text:
        raise ValueError(
            "every prompt_uid occurs once: the prompt random effect (1 | prompt_uid) is "
            "confounded with the residual; the panel needs several models per prompt"
        )
    # Every variant needs spread in R within it, or its slope is not identified.
    for variant, group in panel.groupby("variant"):
        if group["R"].nunique() < 3:
            raise ValueError(f"variant {variant!r} has fewer than 3 distinct R values: no slope")


# --------------------------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True)
class BetaGlmmResult:
    out_dir: Path
    coefficients: pd.DataFrame
    slopes: pd.DataFrame
    variance_components: pd.DataFrame
    convergence: dict[str, Any]
    summary: dict[str, Any]

    @property
    def converged(self) -> bool:
        return bool(self.convergence.get("converged"))

    def slope(self, variant: str, method: str | None = None) -> pd.Series:
        rows = self.slopes[self.slopes["variant"] == variant]
        if method is not None:
            rows = rows[rows["method"] == method]
        return rows.iloc[0]


def panel_for_r(frame: pd.DataFrame, settings: StatsSettings) -> pd.DataFrame:
    """The panel columns the R fit reads: identifiers, the response, the slope term, the length
    control and whatever else the formula and dispersion name."""
    extra = _formula_variables(settings.formula + " " + settings.dispersion, list(frame.columns))
    columns = list(dict.fromkeys([*ID_COLUMNS, "D", SLOPE_TERM, "invN_sc", *extra]))
    return frame[columns]


def _summary(
    frame: pd.DataFrame,
    settings: StatsSettings,
    slopes: pd.DataFrame,
    convergence: Mapping[str, Any],
    r_env: Mapping[str, Any],
) -> dict[str, Any]:
    def row(variant: str, method: str) -> dict[str, float]:
        r = slopes[(slopes["variant"] == variant) & (slopes["method"] == method)].iloc[0]
        return {
            "estimate": float(r["slope"]),
            "se": float(r["se"]),
            "ci_low": float(r["ci_low"]),
            "ci_high": float(r["ci_high"]),
        }

    variants = [
        settings.reference_variant,
        *sorted(set(frame["variant"]) - {settings.reference_variant}),
    ]
    return {
        "n_rows": int(len(frame)),
        "n_prompts": int(frame["prompt_uid"].nunique()),
        "families": sorted(frame["family"].unique()),
        "tasks": sorted(frame["task"].unique()),
        "variants": variants,
        "formula": settings.formula,
        "dispersion": settings.dispersion,
        "family": "beta (logit link), glmmTMB",
        "reference_variant": settings.reference_variant,
        "reference_task": settings.reference_task,
        "clip": settings.clip,
        "n_clipped": int((frame["D"] != frame["D_raw"]).sum()),
        "standardisation": frame.attrs["standardisation"],
        "confidence": settings.confidence,
        "slopes": {variants[0]: row(variants[0], "wald"), variants[1]: row(variants[1], "wald")},
        "slope_ratio": {
            "estimate": row("ratio", "delta")["estimate"],
            "delta": row("ratio", "delta"),
            "bootstrap": {**row("ratio", "bootstrap"), "draws": settings.bootstrap},
        },
        "convergence": dict(convergence),
        "R": dict(r_env),
    }


def fit_beta_glmm_many(
    panels: Sequence[pd.DataFrame],
    settings: StatsSettings,
    out_dirs: Sequence[str | os.PathLike[str]],
    *,
    save_model: bool = True,
    standardisation: Mapping[str, Mapping[str, float]] | None = None,
    keep_going: bool = False,
) -> list[BetaGlmmResult | str]:
    """Fit the Beta GLMM to several panels in one R process (one result per panel).

    Each ``out_dirs[i]`` receives the files of :func:`fit_beta_glmm`; each file is moved into
    place atomically and ``summary.json`` is written last, so its presence marks a complete fit.
    ``standardisation`` is passed to :func:`prepare_panel` for every panel (None: each panel's own).
    With ``keep_going`` a panel glmmTMB cannot fit gives its error message (a ``str``) in place
    of a result, and the other panels are still fitted.
    """
    if len(panels) != len(out_dirs):
        raise ValueError("panels and out_dirs differ in length")
    r_env = check_r_environment(settings.rscript)
    frames = [prepare_panel(panel, settings, standardisation=standardisation) for panel in panels]
    targets = [Path(d) for d in out_dirs]
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".glmm-", dir=targets[0]) as tmp:
        work = Path(tmp)
        jobs = []
        for index, frame in enumerate(frames):
            panel_path = work / f"panel{index}.tsv"
            panel_for_r(frame, settings).to_csv(panel_path, sep="\t", index=False, na_rep="NaN")
            jobs.append({"panel": str(panel_path), "out_dir": str(work / f"fit{index}")})
        run_r(
            "fit_beta_glmm.R",
            {
                **_job_settings(settings),
                "jobs": jobs,
                "save_model": save_model,
                "keep_going": keep_going,
            },
            work,
            settings.rscript,
        )
        results: list[BetaGlmmResult | str] = []
        for index, (frame, target) in enumerate(zip(frames, targets)):
            staged = work / f"fit{index}"
            if (staged / "error.txt").exists():
                results.append((staged / "error.txt").read_text().strip())
                continue
            (target / "summary.json").unlink(missing_ok=True)
            names = [*FIT_FILES, "model.rds"] if save_model else list(FIT_FILES)
            for name in names:
                # Copied next to the target first: the temporary directory may be elsewhere.
                with atomic_path(target / name) as tmp:
                    shutil.copyfile(staged / name, tmp)
            results.append(_collect(frame, settings, target, r_env))
    return results


def _collect(
    frame: pd.DataFrame, settings: StatsSettings, target: Path, r_env: Mapping[str, Any]
) -> BetaGlmmResult:
    coefficients = pd.read_csv(target / "coefficients.tsv", sep="\t")
    slopes = pd.read_csv(target / "slopes.tsv", sep="\t")
    variance = pd.read_csv(target / "variance_components.tsv", sep="\t")
    convergence = json.loads((target / "convergence.json").read_text())
    summary = _summary(frame, settings, slopes, convergence, r_env)
    write_json(summary, target / "summary.json")
    if not convergence.get("converged"):
        warnings.warn(
            f"Beta GLMM in {target} did not converge cleanly (pdHess={convergence.get('pdHess')}, "
            f"max scaled gradient={convergence.get('max_scaled_gradient')}, "
            f"warnings={convergence.get('warnings')}); see convergence.json",
            RuntimeWarning,
            stacklevel=3,
        )
    return BetaGlmmResult(target, coefficients, slopes, variance, convergence, summary)


def fit_beta_glmm(
    panel: pd.DataFrame, settings: StatsSettings, out_dir: str | os.PathLike[str]
) -> BetaGlmmResult:
    """Fit the Beta GLMM to ``panel`` and write its tables into ``out_dir``.

    Files: ``coefficients.tsv`` (component, term, estimate, se, z, p, ci_low, ci_high),
    ``slopes.tsv`` (variant, slope, se, ci_low, ci_high, method), ``variance_components.tsv``
    (group, variance, sd), ``convergence.json``, ``summary.json`` and ``model.rds``.
    A fit that does not converge cleanly is still written, flagged in ``convergence.json`` and
    announced with a ``RuntimeWarning``.
    """
    result = fit_beta_glmm_many([panel], settings, [out_dir], save_model=True)[0]
    assert isinstance(result, BetaGlmmResult)  # without keep_going a failure raises
    return result


# --------------------------------------------------------------------------------------------
# Diagnostics (DHARMa's scaled residuals and tests)


def scaled_residuals(
    observed: np.ndarray, simulated: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """DHARMa's scaled (quantile) residuals.

    ``simulated`` has shape (nsim, n). For each observation the residual is the share of
    simulated values below the observed one; ties (share below < share at-or-below) are broken
    by a uniform draw between the two shares, so a correct model gives Uniform(0, 1) residuals.
    """
    observed = np.asarray(observed, dtype=float)
    simulated = np.asarray(simulated, dtype=float)
    if simulated.ndim != 2 or simulated.shape[1] != observed.shape[0]:
        raise ValueError(f"simulated must be (nsim, {observed.shape[0]}), got {simulated.shape}")
    below = (simulated < observed[None, :]).mean(axis=0)
    at_or_below = (simulated <= observed[None, :]).mean(axis=0)
    draw = rng.uniform(size=observed.shape[0])
    return np.where(at_or_below > below, below + draw * (at_or_below - below), below)


def uniformity_test(residuals: np.ndarray) -> dict[str, float]:
    """One-sample Kolmogorov–Smirnov test of the residuals against Uniform(0, 1)."""
    result = sps.kstest(np.asarray(residuals, float), "uniform")
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue)}


def dispersion_test(
    observed: np.ndarray, predicted: np.ndarray, simulated: np.ndarray
) -> dict[str, float]:
    """DHARMa's simulation-based dispersion test (two-sided).

    Statistic: var(observed - predicted) / mean over simulations of var(simulated - predicted);
    p: twice the smaller tail share of simulated spreads beyond the observed one, with the
    observed spread counted among the simulations ((k + 1) / (nsim + 1)), capped at 1.
    """
    predicted = np.asarray(predicted, float)
    observed_spread = float(np.var(np.asarray(observed, float) - predicted, ddof=1))
    simulated_spread = np.var(np.asarray(simulated, float) - predicted[None, :], axis=1, ddof=1)
    nsim = simulated_spread.shape[0]
    low = (np.sum(simulated_spread <= observed_spread) + 1) / (nsim + 1)
    high = (np.sum(simulated_spread >= observed_spread) + 1) / (nsim + 1)
    return {
        "statistic": observed_spread / float(simulated_spread.mean()),
        "p_value": float(min(1.0, 2 * min(low, high))),
        "observed_spread": observed_spread,
        "mean_simulated_spread": float(simulated_spread.mean()),
    }


def outlier_test(residuals: np.ndarray, nsim: int) -> dict[str, float]:
    """Binomial test of residuals at exactly 0 or 1 (outside every simulation).

    Under the model each observation falls below (or above) all ``nsim`` simulations with
    probability 1 / (nsim + 1), so outliers occur with probability 2 / (nsim + 1).
    """
    residuals = np.asarray(residuals, float)
    count = int(np.sum((residuals == 0.0) | (residuals == 1.0)))
    expected = 2.0 / (nsim + 1)
    result = sps.binomtest(count, residuals.size, expected, alternative="two-sided")
    return {
        "statistic": count / (residuals.size * expected),
        "p_value": float(result.pvalue),
        "outliers": count,
        "expected_outliers": residuals.size * expected,
    }


@dataclass(frozen=True)
class DiagnosticsResult:
    out_dir: Path
    residuals: pd.DataFrame
    tests: dict[str, Any]


def diagnose(
    fit_dir: str | os.PathLike[str], settings: StatsSettings, diag_dir: str | os.PathLike[str]
) -> DiagnosticsResult:
    """Simulation-based residual diagnostics of the model saved in ``fit_dir/model.rds``.

    Writes ``residuals.tsv`` (prompt_uid, family, variant, task, observed, predicted,
    scaled_residual), ``tests.json`` and ``tests.tsv`` into ``diag_dir``. Uses R's DHARMa when
    ``settings.use_dharma`` and DHARMa loads, else :func:`scaled_residuals` and the tests here on
    ``simulate(fit, nsim = settings.simulations)`` (seeded with ``settings.seed``).

    All tests use glmmTMB's unconditional simulations (new random effects in every simulation:
    DHARMa's default for glmmTMB). The dispersion test centres observed and simulated responses
    on the population-level predictions (random effects at zero), which the unconditional draws
    are exchangeable with. Centred instead on fitted values that include the estimated random
    effects (DHARMa's ``fittedPredictedResponse``), a correctly specified paper-size simulated
    panel gave a ratio of 0.33 (p = 0.002) with unconditional draws and still 0.87 (p = 0.002)
    with draws conditional on the fitted random effects, because 400 prompt effects fitted to
    2400 rows absorb part of the residual variance: a spurious "underdispersion".
    """
    fit_dir, diag_dir = Path(fit_dir), Path(diag_dir)
    model = fit_dir / "model.rds"
    if not model.exists():
        raise FileNotFoundError(f"{model} not found: run fit_beta_glmm first")
    check_r_environment(settings.rscript)
    diag_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".diag-", dir=diag_dir) as tmp:
        work = Path(tmp)
        job = {
            "model": str(model),
            "nsim": settings.simulations,
            "seed": settings.seed,
            "out_dir": str(work / "sim"),
            "use_dharma": settings.use_dharma,
        }
        run_r("simulate_beta_glmm.R", job, work, settings.rscript)
        sim_dir = work / "sim"
        fitted = pd.read_csv(
            sim_dir / "fitted.tsv",
            sep="\t",
            keep_default_na=False,
            dtype={"prompt_uid": str, "family": str, "variant": str, "task": str},
        )
        info = json.loads((sim_dir / "info.json").read_text())
        n, nsim = int(info["n"]), int(info["nsim"])
        simulated = np.fromfile(sim_dir / "simulated.f64", dtype="<f8").reshape(nsim, n)
        observed = fitted["observed"].to_numpy(float)
        predicted = fitted["predicted"].to_numpy(float)
        if info["engine"] == "DHARMa":
            dharma = pd.read_csv(sim_dir / "dharma_residuals.tsv", sep="\t")
            residuals = dharma["scaled_residual"].to_numpy(float)
            dharma_tests = json.loads((sim_dir / "dharma_tests.json").read_text())
            tests = {name: dharma_tests[name] for name in ("uniformity", "dispersion", "outliers")}
        else:
            rng = np.random.default_rng(settings.seed)
            residuals = scaled_residuals(observed, simulated, rng)
            tests = {
                "uniformity": uniformity_test(residuals),
                # Centred on population-level predictions, matching the unconditional draws.
                "dispersion": dispersion_test(
                    observed, fitted["predicted_population"].to_numpy(float), simulated
                ),
                "outliers": outlier_test(residuals, nsim),
            }
    table = fitted[["prompt_uid", "family", "variant", "task"]].copy()
    table["observed"] = observed
    table["predicted"] = predicted
    table["scaled_residual"] = residuals
    names = {
        "uniformity": "KS D vs Uniform(0,1)",
        "dispersion": "var(obs - fitted) / mean var(sim - fitted)",
        "outliers": "outlier frequency / expected 2/(nsim+1)",
    }
    tests_table = pd.DataFrame(
        [
            {
                "test": name,
                "statistic": values["statistic"],
                "p_value": values["p_value"],
                "statistic_meaning": names[name],
            }
            for name, values in tests.items()
        ]
    )
    payload = {
        "engine": info["engine"],
        "n": n,
        "nsim": nsim,
        "seed": settings.seed,
        "simulation": {
            "residuals": "unconditional: glmmTMB simulate() draws new random effects",
            "dispersion": "unconditional, centred on population-level predictions",
        },
        **tests,
    }
    write_tsv(table, diag_dir / "residuals.tsv")
    write_tsv(tests_table, diag_dir / "tests.tsv")
    write_json(payload, diag_dir / "tests.json")
    return DiagnosticsResult(diag_dir, table, payload)
