"""Tests of canopy.robustness: length matching and per-prompt metrics against brute force, the
fixed-effects OLS against a hand-built least-squares fit with cluster-robust errors, the length-
matched table, and (slow) the pymer4 linear mixed model on a simulated panel."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from canopy.robustness import (
    fixed_effects_robustness,
    length_matched,
    lmm_robustness,
    match_lengths,
    matched_prompt_metrics,
    pairwise_dissimilarity,
)
from simulate_panel import simulate_panel, simulate_rollouts
from canopy.stats import BetaGlmmResult, StatsSettings, fit_beta_glmm_many, prepare_panel


def test_match_lengths_gives_identical_bin_histograms():
    rng = np.random.default_rng(0)
    base = np.round(np.exp(rng.normal(5.0, 0.6, 100))) + 1
    ft = np.round(np.exp(rng.normal(4.4, 0.5, 100))) + 1
    ia, ib = match_lengths(base, ft, 10, np.random.default_rng(3))
    assert ia.size == ib.size > 10
    assert len(set(ia)) == ia.size and len(set(ib)) == ib.size
    edges = np.unique(np.quantile(np.log(np.concatenate([base, ft])), np.linspace(0, 1, 11)))[1:-1]
    hist_a = np.bincount(np.searchsorted(edges, np.log(base[ia]), side="right"), minlength=11)
    hist_b = np.bincount(np.searchsorted(edges, np.log(ft[ib]), side="right"), minlength=11)
    np.testing.assert_array_equal(hist_a, hist_b)
    # Matching narrows the gap of mean log length (0.6 unmatched).
    gap = abs(np.log(base[ia]).mean() - np.log(ft[ib]).mean())
    assert gap < 0.15
    again = match_lengths(base, ft, 10, np.random.default_rng(3))
    np.testing.assert_array_equal(again[0], ia)
    np.testing.assert_array_equal(again[1], ib)


def test_match_lengths_without_overlap_is_empty():
    ia, ib = match_lengths(
        np.array([5, 6, 7]), np.array([500, 600, 700]), 2, np.random.default_rng(0)
    )
    assert ia.size == ib.size == 0


def test_pairwise_dissimilarity_matches_double_loop():
    rng = np.random.default_rng(1)
    e = rng.normal(size=(7, 5)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    loop = [
        float(np.dot(e[i].astype(float), e[j].astype(float)))
        for i in range(7)
        for j in range(7)
        if i != j
    ]
    assert pairwise_dissimilarity(e) == pytest.approx(1 - np.mean(loop), abs=1e-12)
    assert np.isnan(pairwise_dissimilarity(e[:1]))


def test_matched_prompt_metrics_direct():
    n = np.array([10.0, 20.0, 40.0, 5.0])
    h = np.array([5.0, 8.0, 12.0, 4.0])
    e = np.eye(4)
    out = matched_prompt_metrics(n, h, e)
    rate = h / n
    assert out["R"] == pytest.approx(rate.mean())
    assert out["N"] == pytest.approx(n.mean())
    assert out["rho"] == pytest.approx(np.corrcoef(n, rate)[0, 1])
    assert out["D"] == pytest.approx(1.0)  # orthogonal vectors


def _cluster_ols(y, x, groups):
    """Least squares with the CR1 cluster-robust covariance (statsmodels' default correction)."""
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    bread = np.linalg.pinv(x.T @ x)
    meat = np.zeros((x.shape[1], x.shape[1]))
    for g in np.unique(groups):
        s = x[groups == g].T @ resid[groups == g]
        meat += np.outer(s, s)
    n, k, g_count = len(y), np.linalg.matrix_rank(x), len(np.unique(groups))
    factor = g_count / (g_count - 1) * (n - 1) / (n - k)
    return beta, factor * bread @ meat @ bread


def test_fixed_effects_slopes_match_hand_built_least_squares(tmp_path):
    panel = simulate_panel(2, n_prompts=15).panel
    settings = StatsSettings()
    table = fixed_effects_robustness(panel, settings, tmp_path / "fe.tsv").set_index("variant")
    written = pd.read_csv(tmp_path / "fe.tsv", sep="\t").set_index("variant")
    np.testing.assert_allclose(written["slope"], table["slope"])

    frame = prepare_panel(panel, settings)
    ft = (frame["variant"] == "finetuned").to_numpy(float)
    r = frame["R_sc"].to_numpy()
    # Columns: R_sc, ft, R_sc*ft, log N, family dummies (drop first), prompt dummies (all:
    # they span the intercept and the task effects).
    fam = pd.get_dummies(frame["family"], drop_first=True).to_numpy(float)
    prompts = pd.get_dummies(frame["prompt_uid"]).to_numpy(float)
    x = np.column_stack([r, ft, r * ft, np.log(frame["N"].to_numpy()), fam, prompts])
    groups = pd.factorize(frame["prompt_uid"])[0]
    beta, cov = _cluster_ols(frame["logit_D"].to_numpy(), x, groups)
    assert table.loc["base", "slope"] == pytest.approx(beta[0], rel=1e-8)
    assert table.loc["finetuned", "slope"] == pytest.approx(beta[0] + beta[2], rel=1e-8)
    assert table.loc["ratio", "slope"] == pytest.approx((beta[0] + beta[2]) / beta[0], rel=1e-8)
    assert table.loc["base", "se"] == pytest.approx(np.sqrt(cov[0, 0]), rel=1e-6)
    se_ft = np.sqrt(cov[0, 0] + cov[2, 2] + 2 * cov[0, 2])
    assert table.loc["finetuned", "se"] == pytest.approx(se_ft, rel=1e-6)
    assert table.loc["base", "n_clusters"] == frame["prompt_uid"].nunique()


def test_length_matched_table(tmp_path):
    rollouts, embeddings = simulate_rollouts(4, n_prompts=10, n_rollouts=30)
    settings = StatsSettings.from_config(
        {
            # A small panel (80 rows): the paper's splines would not be estimable.
            "formula": "D ~ R_sc * variant + invN_sc + task + (1 | prompt_uid) + (1 | family)",
            "dispersion": "~ variant",
            "robustness": {"length_repeats": 3, "length_bins": 5},
        }
    )
    table = length_matched(
        rollouts,
        embeddings,
        settings,
        tmp_path / "lm.tsv",
        prompt_metrics_path=tmp_path / "prompts.tsv",
    )
    assert set(table["analysis"]) == {"unmatched", "matched", "matched_pooled"}
    assert sorted(table.loc[table["analysis"] == "matched", "repeat"].unique()) == [0, 1, 2]
    unmatched = table[table["analysis"] == "unmatched"].set_index("variant")
    pooled = table[table["analysis"] == "matched_pooled"].set_index("variant")
    # Fine-tuned rollouts are shorter by design; matching closes most of the length gap.
    gap_before = unmatched.loc["base", "mean_N"] - unmatched.loc["finetuned", "mean_N"]
    gap_after = abs(pooled.loc["base", "mean_N"] - pooled.loc["finetuned", "mean_N"])
    assert gap_before > 10 and gap_after < gap_before / 3
    # D rises with the rate in the simulation: positive slopes in both analyses.
    assert (table.loc[table["variant"] != "ratio", "slope"] > 0).all()

    # The unmatched per-prompt metrics equal a direct computation from the rollouts.
    prompts = pd.read_csv(tmp_path / "prompts.tsv", sep="\t", dtype={"prompt_id": str})
    key = ("fam_a", "base", "math")
    row = prompts[
        (prompts["repeat"] == -1)
        & (prompts["family"] == "fam_a")
        & (prompts["variant"] == "base")
        & (prompts["task"] == "math")
        & (prompts["prompt_id"] == "p03")
    ].iloc[0]
    ro = rollouts[key]
    mask = (ro["prompt_id"] == "p03").to_numpy()
    emb_mask = embeddings[key]["prompt_id"] == "p03"
    direct = matched_prompt_metrics(
        ro.loc[mask, "n_steps"].to_numpy(),
        ro.loc[mask, "sum_entropy"].to_numpy(),
        embeddings[key]["embeddings"][emb_mask],
    )
    for name in ("R", "N", "rho", "D"):
        assert row[name] == pytest.approx(direct[name], rel=1e-9)

    # Every fit is the Beta GLMM on its matched panel, standardised as the unmatched panel is.
    assert set(table["method"]) == {"wald", "delta", "bootstrap"}
    constants = json.loads(table["standardisation"].iloc[0])
    unmatched_panel = prompts[prompts["repeat"] == -1].drop(columns="repeat")
    assert constants == prepare_panel(unmatched_panel, settings).attrs["standardisation"]
    repeat0 = prompts[prompts["repeat"] == 0].drop(columns="repeat")
    direct = fit_beta_glmm_many(
        [repeat0], settings, [tmp_path / "direct"], save_model=False, standardisation=constants
    )[0].slopes
    got = table[(table["analysis"] == "matched") & (table["repeat"] == 0)]
    np.testing.assert_allclose(got["slope"], direct["slope"], rtol=1e-6)
    own = fit_beta_glmm_many([repeat0], settings, [tmp_path / "own"], save_model=False)[0].slopes
    # Re-standardising per repeat would rescale the slopes by that repeat's own SD of R.
    sd_ratio = repeat0["R"].std(ddof=1) / constants["R"]["sd"]
    np.testing.assert_allclose(
        own["slope"].iloc[:2], direct["slope"].iloc[:2] * sd_ratio, rtol=1e-3
    )

    again = length_matched(rollouts, embeddings, settings, tmp_path / "lm2.tsv")
    pd.testing.assert_frame_equal(table, again)

    # The paper's splines are too rich for this 80-row panel: glmmTMB fails. A refit on a
    # resampled panel may fail like this where the main fit did not; keep_going reports it per
    # panel instead of stopping the whole analysis.
    spline = StatsSettings.from_config({"robustness": {"length_repeats": 1}})
    fits = fit_beta_glmm_many(
        [unmatched_panel, repeat0],
        spline,
        [tmp_path / f"f{i}" for i in range(2)],
        save_model=False,
        keep_going=True,
    )
    assert isinstance(fits[0], str) and "glmmTMB could not fit" in fits[0]
    assert isinstance(fits[1], BetaGlmmResult)  # the next panel is still fitted
    with pytest.raises(RuntimeError, match="glmmTMB could not fit"):
        fit_beta_glmm_many([unmatched_panel], spline, [tmp_path / "f2"], save_model=False)
    with pytest.raises(RuntimeError, match="unmatched panel"):
        length_matched(rollouts, embeddings, spline, tmp_path / "lm3.tsv")

    # Matching that leaves fewer rollouts than min_matched everywhere drops every prompt: the
    # repeats are reported as not estimable, the unmatched analysis still stands.
    strict = StatsSettings.from_config(
        {
            "formula": settings.formula,
            "dispersion": settings.dispersion,
            "robustness": {"length_repeats": 2, "length_bins": 5, "min_matched": 31},
        }
    )
    table = length_matched(rollouts, embeddings, strict, tmp_path / "lm4.tsv")
    matched = table[table["analysis"] == "matched"]
    assert matched["error"].str.startswith("not estimable").all() and matched["slope"].isna().all()
    assert table.loc[table["analysis"] == "unmatched", "slope"].notna().all()


def test_length_matched_rejects_missing_embeddings(tmp_path):
    rollouts, embeddings = simulate_rollouts(4, n_prompts=3, n_rollouts=5)
    key = next(iter(embeddings))
    embeddings[key] = {k: v[1:] for k, v in embeddings[key].items()}
    with pytest.raises(ValueError, match="has no embedding"):
        length_matched(rollouts, embeddings, StatsSettings(), tmp_path / "lm.tsv")


@pytest.mark.slow
def test_lmm_on_logit_d_recovers_the_slopes(tmp_path):
    sim = simulate_panel(21)
    table = lmm_robustness(sim.panel, StatsSettings(), tmp_path / "lmm.tsv").set_index("variant")
    # A linear model on logit(D) is not the Beta model, but its slopes land near the truth.
    assert table.loc["base", "slope"] == pytest.approx(sim.truth.slope_base, abs=0.08)
    assert table.loc["finetuned", "slope"] == pytest.approx(sim.truth.slope_finetuned, abs=0.12)
    assert (
        table.loc["ratio", "ci_low"] < table.loc["ratio", "slope"] < table.loc["ratio", "ci_high"]
    )
    assert (table["n_rows"] == 2400).all()
