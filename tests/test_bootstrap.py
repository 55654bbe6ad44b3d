"""Paired prompt bootstrap: reproducibility, coverage on simulated panels, and edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from canopy.bootstrap import (
    BOOTSTRAP_COLUMNS,
    BootstrapSettings,
    estimator_notes,
    paired_bootstrap,
)


def simulated_panel(
    families: int,
    tasks: tuple[str, ...] = ("coding", "math"),
    prompts: int = 100,
    shift: float = 0.3,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired prompt metrics with a known population difference ``shift`` (fine-tuned − base).

    The base metric is skewed (gamma, mean 4) and the fine-tuned one shares each prompt's base
    value, so pairing matters: the paired difference has SD 0.5 while each variant has SD 2.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for family in range(families):
        for task in tasks:
            base = rng.gamma(4.0, 1.0, size=prompts)
            finetuned = base + shift + rng.normal(0.0, 0.5, size=prompts)
            ids = [f"{task}-{i}" for i in range(prompts)]
            for variant, values in (("base", base), ("finetuned", finetuned)):
                frames.append(
                    pd.DataFrame(
                        {
                            "family": f"f{family}",
                            "variant": variant,
                            "task": task,
                            "prompt_id": ids,
                            "CE": values,
                            "R": values / 10,
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def test_table_shape_and_point_estimates():
    panel = simulated_panel(2, tasks=("coding", "math", "stories"), prompts=30)
    table = paired_bootstrap(panel, ["CE", "R"], resamples=300)
    assert list(table.columns) == list(BOOTSTRAP_COLUMNS)
    # per family: 3 tasks + "all", for each of 2 metrics
    assert len(table) == 2 * 2 * 4
    assert list(table["task"][:4]) == ["coding", "math", "stories", "all"]
    row = table.query("family == 'f1' and task == 'math' and metric == 'CE'").iloc[0]
    sub = panel.query("family == 'f1' and task == 'math'")
    base = sub.query("variant == 'base'")["CE"].mean()
    finetuned = sub.query("variant == 'finetuned'")["CE"].mean()
    assert row["n_prompts"] == 30
    assert row["base_mean"] == pytest.approx(base, rel=1e-12)
    assert row["difference"] == pytest.approx(finetuned - base, rel=1e-12)
    assert row["ratio"] == pytest.approx(finetuned / base, rel=1e-12)
    assert row["ci_low"] < row["difference"] < row["ci_high"]
    assert row["ratio_ci_low"] < row["ratio"] < row["ratio_ci_high"]
    pooled = table.query("family == 'f1' and task == 'all' and metric == 'CE'").iloc[0]
    fam = panel.query("family == 'f1'")
    assert pooled["n_prompts"] == 90
    assert pooled["difference"] == pytest.approx(
        fam.query("variant == 'finetuned'")["CE"].mean()
        - fam.query("variant == 'base'")["CE"].mean()
    )
    assert (table["resamples"] == 300).all() and (table["seed"] == 42).all()


def test_reproducible_for_a_seed_and_independent_of_other_groups():
    panel = simulated_panel(3, prompts=40)
    first = paired_bootstrap(panel, ["CE", "R"], resamples=500, seed=7)
    again = paired_bootstrap(panel, ["CE", "R"], resamples=500, seed=7)
    pd.testing.assert_frame_equal(first, again)
    other = paired_bootstrap(panel, ["CE", "R"], resamples=500, seed=8)
    assert not np.allclose(first["ci_low"], other["ci_low"])
    np.testing.assert_array_equal(first["difference"], other["difference"])
    # a single family and metric reproduce their rows of the full run exactly
    alone = paired_bootstrap(panel[panel["family"] == "f1"], ["R"], resamples=500, seed=7)
    expected = first[(first["family"] == "f1") & (first["metric"] == "R")].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, expected)


def test_identical_variants_give_zero_difference():
    panel = simulated_panel(1, prompts=50)
    base = panel[panel["variant"] == "base"]
    panel = pd.concat([base, base.assign(variant="finetuned")], ignore_index=True)
    table = paired_bootstrap(panel, ["CE"], resamples=400)
    assert (table["difference"] == 0).all()
    assert (table["ci_low"] == 0).all() and (table["ci_high"] == 0).all()
    assert (table["ratio"] == 1).all() and (table["ratio_ci_low"] == 1).all()
    assert (table["p_value"] == 1).all()


def test_difference_interval_covers_at_nominal_rate():
    """200 independent families (one task of 100 paired prompts each), true difference 0.3.

    The percentile interval of a mean of 100 skewed values covers with probability about
    0.935-0.95. With p = 0.93, P(covered < 171 of 200) = 7e-5; with p = 0.95, P(all 200
    covered) = 4e-5: a correct implementation passes both checks (difference and ratio) with
    probability > 0.999. An unpaired bootstrap (intervals 4x too wide here) covers every time
    and fails the upper bound; resampling pairs with one index per variant breaks the pairing
    in the same way.
    """
    panel = simulated_panel(200, tasks=("math",), prompts=100, shift=0.3, seed=1)
    table = paired_bootstrap(panel, ["CE"], resamples=1000, seed=3)
    rows = table[table["task"] == "math"]
    assert len(rows) == 200
    covered = int(((rows["ci_low"] <= 0.3) & (0.3 <= rows["ci_high"])).sum())
    assert 171 <= covered <= 199, covered
    true_ratio = (4.0 + 0.3) / 4.0
    covered_ratio = int(
        ((rows["ratio_ci_low"] <= true_ratio) & (true_ratio <= rows["ratio_ci_high"])).sum()
    )
    assert 171 <= covered_ratio <= 199, covered_ratio
    # width: the percentile interval spans about 2 * 1.96 * 0.5 / sqrt(100) = 0.196
    width = (rows["ci_high"] - rows["ci_low"]).mean()
    assert 0.17 < width < 0.22, width
    # the "all" row is the same single task here, resampled from its own seed stream
    pooled = table[table["task"] == "all"]
    np.testing.assert_allclose(pooled["difference"].to_numpy(), rows["difference"].to_numpy())


def test_p_value_is_calibrated_under_the_null_and_small_under_an_effect():
    null = paired_bootstrap(
        simulated_panel(200, tasks=("math",), prompts=100, shift=0.0, seed=2),
        ["CE"],
        resamples=1000,
    )
    null = null[null["task"] == "math"]
    rejected = int((null["p_value"] < 0.05).sum())
    # about 10 expected; P(>= 24 | p = 0.05) = 7e-5
    assert rejected < 24, rejected
    assert null["p_value"].median() > 0.3
    effect = paired_bootstrap(
        simulated_panel(5, tasks=("math",), prompts=100, shift=0.5, seed=4), ["CE"], resamples=1000
    )
    assert (effect["p_value"] < 0.01).all()
    assert (effect["p_value"] >= 1 / 1001).all()


def test_unpaired_prompts_and_nan_values_are_dropped_with_a_warning():
    panel = simulated_panel(1, prompts=20)
    panel = panel.drop(
        index=panel.index[(panel["variant"] == "finetuned") & (panel["prompt_id"] == "math-3")]
    )
    panel.loc[(panel["variant"] == "base") & (panel["prompt_id"] == "coding-0"), "R"] = np.nan
    with pytest.warns(UserWarning) as record:
        table = paired_bootstrap(panel, ["CE", "R"], resamples=200)
    messages = " ".join(str(w.message) for w in record)
    assert "f0/math/math-3" in messages
    assert "f0/R: 1" in messages
    counts = table.set_index(["task", "metric"])["n_prompts"]
    assert counts[("math", "CE")] == 19 and counts[("coding", "CE")] == 20
    assert counts[("coding", "R")] == 19 and counts[("all", "R")] == 38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paired_bootstrap(simulated_panel(1, prompts=20), ["CE"], resamples=50)


def test_bad_panels_are_rejected():
    panel = simulated_panel(1, prompts=5)
    with pytest.raises(ValueError, match="lacks column"):
        paired_bootstrap(panel, ["missing_metric"])
    with pytest.raises(ValueError, match="'instruct'"):
        paired_bootstrap(panel.replace({"variant": {"finetuned": "instruct"}}), ["CE"])
    with pytest.raises(ValueError, match="more than one row"):
        paired_bootstrap(pd.concat([panel, panel.iloc[:1]]), ["CE"])


def test_settings_from_config():
    assert BootstrapSettings.from_config({"resamples": 500, "seed": 1}) == BootstrapSettings(
        resamples=500, confidence=0.95, seed=1
    )
    assert BootstrapSettings.from_config(None) == BootstrapSettings()
    with pytest.raises(ValueError, match="resample"):
        BootstrapSettings.from_config({"resample": 500})
    with pytest.raises(ValueError, match="confidence"):
        BootstrapSettings(confidence=1.5)
    with pytest.raises(ValueError, match="resamples"):
        BootstrapSettings(resamples=0)


def test_estimator_notes_name_the_length_estimator():
    table = pd.DataFrame({"metric": ["canopy_entropy", "conditional_entropy_given_length"]})
    panel = pd.DataFrame({"length_entropy_estimator": ["chao_shen", "chao_shen"]})
    notes = estimator_notes(table, panel)
    assert notes.tolist() == ["", "H(Y|N) = CE* - H(N), H(N) by chao_shen"]
    assert (
        "not recorded" in estimator_notes(table, panel.drop(columns="length_entropy_estimator"))[1]
    )
