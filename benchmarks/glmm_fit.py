"""Fit time of the paper-size Beta GLMM against two peers in the same run.

Panel: 3 families x 2 variants x 4 tasks x 100 prompts (2400 rows), simulated with known
coefficients (benchmarks/simulate_panel.py). Timed, each ``--repeats`` times (median reported):

* canopy.stats.fit_beta_glmm with the full formula (glmmTMB in a fresh Rscript, start-up included;
  the issue asks for <= 60 s on 2 cores),
* peer 1: lme4's lmer on logit(D), same fixed and random effects (canopy.robustness.lmm_robustness
  through pymer4; R already started after the first repeat),
* peer 2: the statsmodels fixed-effects OLS with prompt-clustered errors.

Run: ``OMP_NUM_THREADS=1 python benchmarks/glmm_fit.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from canopy.robustness import fixed_effects_robustness, lmm_robustness
from simulate_panel import simulate_panel
from canopy.stats import StatsSettings, fit_beta_glmm


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sim = simulate_panel(args.seed)
    settings = StatsSettings()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pymer4 on pandas 2.3
            glmm_s, glmm = timed(
                lambda: fit_beta_glmm(sim.panel, settings, out / "glmm"), args.repeats
            )
            lmm_s, lmm = timed(
                lambda: lmm_robustness(sim.panel, settings, out / "lmm.tsv"), args.repeats
            )
            ols_s, ols = timed(
                lambda: fixed_effects_robustness(sim.panel, settings, out / "fe.tsv"), args.repeats
            )
    print(
        f"panel: {len(sim.panel)} rows, {sim.panel['prompt_uid'].nunique()} prompts; "
        f"median of {args.repeats} runs"
    )
    print(
        f"glmmTMB Beta GLMM (full formula, Rscript incl. start-up): {glmm_s:7.2f} s "
        f"(R-side fit {glmm.convergence['fit_seconds']:.2f} s, converged "
        f"{glmm.converged}, issue target <= 60 s)"
    )
    print(
        f"lme4 lmer on logit(D) via pymer4:                        {lmm_s:7.2f} s  "
        f"ratio glmm/lmer = {glmm_s / lmm_s:.2f}"
    )
    print(
        f"statsmodels fixed-effects OLS, clustered SE:             {ols_s:7.2f} s  "
        f"ratio glmm/ols  = {glmm_s / ols_s:.2f}"
    )
    truth = sim.truth
    for name, table in (("glmm", glmm.slopes), ("lmer", lmm), ("ols", ols)):
        rows = table.drop_duplicates("variant").set_index("variant")["slope"]
        print(
            f"  slopes {name:5s}: base {rows['base']:.3f} (truth {truth.slope_base}), "
            f"finetuned {rows['finetuned']:.3f} (truth {truth.slope_finetuned}), "
            f"ratio {rows['ratio']:.2f} (truth {truth.slope_ratio:.2f})"
        )


if __name__ == "__main__":
    main()
