"""The paper's figures: drawn from synthetic but realistic frames, checked number by number.

Every figure must draw what the data says (bar heights are the means of the frame, histogram
heights the shares of rollouts, box medians the medians of the within-prompt variances, ...),
name the variants "Base" and "Fine-tuned", label its axes with units, reject unknown settings by
name and write non-empty PDF and PNG files atomically. A slow test runs the figure rules through
Snakemake and checks that editing one figure's settings reruns only that figure.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from canopy.figures import (
    SETTINGS_CLASSES,
    DecompositionSettings,
    ForestSettings,
    RhoSettings,
    LengthsSettings,
    ResidualsSettings,
    SlopesSettings,
    TrajectorySettings,
    VarianceSettings,
    decomposition_summary,
    diagnostic_p_values,
    keyed_paths,
    plot_decomposition,
    plot_forest,
    plot_lengths,
    plot_residuals,
    plot_rho,
    plot_slopes,
    plot_trajectory,
    plot_variance,
    read_matrix_tables,
    render_decomposition,
    render_forest,
    render_lengths,
    render_residuals,
    render_rho,
    rho_summary,
    render_slopes,
    render_trajectory,
    render_variance,
    save_figure,
    within_prompt_variances,
)
from canopy.figures.lengths import infer_length_cap, length_bins
from canopy.figures.residuals import binned_quantiles, uniform_qq
from canopy.io import write_json, write_parquet, write_tsv
from support.workflow import snakemake as run_snakemake

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("tinygpt", "tinyllama")
TASKS = ("math", "completion")
VARIANTS = ("base", "finetuned")
CAP = 48
# Small figures at low resolution: the tests check content, not print quality.
SMALL = {"width": 4.0, "dpi": 60}


# --------------------------------------------------------------------------- synthetic data


def make_rollouts(prompts: int = 6, m: int = 8, seed: int = 0) -> pd.DataFrame:
    """Rollout rows like the sampling stage writes: base models run longer at a higher rate and
    sometimes hit the cap; fine-tuned models stop earlier with a lower, steadier rate."""
    rng = np.random.default_rng(seed)
    rows = []
    for family in FAMILIES:
        for variant in VARIANTS:
            for task in TASKS:
                for p in range(prompts):
                    scale = 30.0 if variant == "base" else 14.0
                    rate = (1.8 if variant == "base" else 0.6) * np.exp(rng.normal(0, 0.2))
                    lengths = np.clip(np.round(rng.gamma(3.0, scale / 3.0, m)), 1, CAP)
                    for s, n in enumerate(lengths.astype(int)):
                        r = rate * np.exp(rng.normal(0, 0.15))
                        rows.append(
                            {
                                "family": family,
                                "variant": variant,
                                "task": task,
                                "prompt_id": f"{task}-{p:02d}",
                                "sample": s,
                                "n_steps": int(n),
                                "hit_eos": bool(n < CAP),
                                "sum_entropy": float(n * r),
                            }
                        )
    return pd.DataFrame(rows)


def make_metrics(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per-prompt metric rows from the rollouts, with CE* = mean(N)·mean(r) + Cov(N, r)."""
    rows = []
    keys = ["family", "variant", "task", "prompt_id"]
    for key, group in rollouts.groupby(keys, sort=False):
        n = group["n_steps"].to_numpy(float)
        h = group["sum_entropy"].to_numpy(float)
        r = h / n
        rows.append(
            dict(
                zip(keys, key),
                canopy_entropy=h.mean(),
                canopy_entropy_se=h.std(ddof=1) / np.sqrt(h.size),
                mean_length=n.mean(),
                mean_rate=r.mean(),
                cov_length_rate=np.mean(n * r) - n.mean() * r.mean(),
                decomposition_product=n.mean() * r.mean(),
                rho_pearson=np.corrcoef(n, r)[0, 1],
            )
        )
    return pd.DataFrame(rows)


def make_trajectory(positions: int = 40) -> pd.DataFrame:
    t = np.arange(1, positions + 1)
    frames = []
    for family in FAMILIES:
        for variant in VARIANTS:
            for task in TASKS:
                base = variant == "base"
                mean = (2.0 + np.exp(-t / 10)) if base else (0.5 + 1.5 * np.exp(-t / 4))
                n_active = np.maximum(0, 60 - t * (1 if base else 2))
                se = np.where(n_active >= 2, 0.5 / np.sqrt(np.maximum(n_active, 1)), np.nan)
                frames.append(
                    pd.DataFrame(
                        {
                            "family": family,
                            "variant": variant,
                            "task": task,
                            "position": t,
                            "mean_entropy": mean,
                            "se": se,
                            "n_active": n_active,
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)


def make_slopes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "variant": ["base", "finetuned", "ratio", "ratio"],
            "slope": [0.12, 0.33, 2.75, 2.8],
            "se": [0.02, 0.03, 0.4, 0.45],
            "ci_low": [0.08, 0.27, 1.97, 2.05],
            "ci_high": [0.16, 0.39, 3.53, 3.9],
            "method": ["wald", "wald", "delta", "bootstrap"],
        }
    )


def make_panel(n: int = 40, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for variant, centre in (("base", 1.8), ("finetuned", 0.6)):
        rate = centre * np.exp(rng.normal(0, 0.3, n))
        frames.append(
            pd.DataFrame(
                {
                    "family": "tinygpt",
                    "variant": variant,
                    "task": "math",
                    "prompt_id": [f"p{i}" for i in range(n)],
                    "D": 1 / (1 + np.exp(-(rate - 1) + rng.normal(0, 0.3, n))),
                    "R": rate,
                    "N": 20.0,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def make_residuals(n: int = 200, seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    predicted = rng.beta(2, 5, n)
    return pd.DataFrame(
        {
            "prompt_uid": [f"math/p{i}" for i in range(n)],
            "family": "tinygpt",
            "variant": np.where(np.arange(n) % 2 == 0, "base", "finetuned"),
            "task": "math",
            "observed": predicted,
            "predicted": predicted,
            "scaled_residual": rng.uniform(0, 1, n),
        }
    )


def make_ablation() -> pd.DataFrame:
    """An ablation table of three sweep points (the main one first)."""
    return pd.DataFrame(
        {
            "sampling": ["default", "topk1000", "default"],
            "embedder": ["minilm", "minilm", "minilm_prefix"],
            "slope_ratio": [2.7, 2.2, 3.1],
            "slope_ratio_ci_low": [1.9, 1.5, 2.0],
            "slope_ratio_ci_high": [3.5, 2.9, 4.2],
            "slope_ratio_boot_ci_low": [2.0, 1.6, 2.1],
            "slope_ratio_boot_ci_high": [3.7, 3.0, 4.5],
            "rho_difference": [0.21, 0.15, 0.21],
            "rho_difference_ci_low": [0.1, 0.02, 0.1],
            "rho_difference_ci_high": [0.3, 0.27, 0.3],
        }
    )


TESTS_JSON = {"ks_p": 0.431, "dispersion_p": 0.87, "outlier_p": 1.0, "n_simulations": 1000}


@pytest.fixture(scope="module")
def rollouts() -> pd.DataFrame:
    return make_rollouts()


@pytest.fixture(scope="module")
def metrics(rollouts: pd.DataFrame) -> pd.DataFrame:
    return make_metrics(rollouts)


# --------------------------------------------------------------------------- helpers


def by_gid(figure: Figure, gid: str) -> list:
    return figure.findobj(lambda artist: artist.get_gid() == gid)


def legend_labels(figure: Figure) -> list[str]:
    legends = list(figure.legends) + [ax.get_legend() for ax in figure.axes if ax.get_legend()]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


def label_clashes(figure: Figure) -> list[tuple[str, str]]:
    """Pairs of visible labels of one axis (major and minor ticks, and the axes' annotations)
    whose boxes overlap, and labels that stick out of the figure."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    page = figure.bbox
    clashes = []
    for ax in figure.axes:
        for axis, coordinate in ((ax.xaxis, 0), (ax.yaxis, 1)):
            ticks = axis.get_major_ticks() + axis.get_minor_ticks()
            low, high = sorted(axis.get_view_interval())
            labels = [
                t.label1
                for t in ticks
                if t.label1.get_visible()
                and t.label1.get_text()
                and low <= t.label1.get_position()[coordinate] <= high
            ]
            if axis is ax.xaxis:
                labels += list(ax.texts)
            boxes = [(label.get_text(), label.get_window_extent(renderer)) for label in labels]
            for i, (text_a, box_a) in enumerate(boxes):
                for text_b, box_b in boxes[i + 1 :]:
                    if box_a.overlaps(box_b):
                        clashes.append((text_a, text_b))
        for label in (ax.xaxis.label, ax.yaxis.label, ax.title):
            box = label.get_window_extent(renderer)
            if label.get_text() and (box.x0 < page.x0 - 1 or box.x1 > page.x1 + 1):
                clashes.append((label.get_text(), "figure edge"))
    return clashes


def assert_written(pdf: Path, png: Path) -> None:
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    # Atomic writes leave no temporary siblings behind.
    assert not [p for p in pdf.parent.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("name", sorted(SETTINGS_CLASSES))
def test_settings_reject_unknown_keys_by_name(name: str) -> None:
    cls = SETTINGS_CLASSES[name]
    assert cls.from_config(None) == cls() == cls.from_config({})
    with pytest.raises(ValueError, match=rf"figures\.{name}\.colour.*allowed here: width"):
        cls.from_config({"width": 3.4, "colour": "red"})
    with pytest.raises(ValueError, match=rf"figures\.{name}\.width"):
        cls.from_config({"width": -1})
    with pytest.raises(ValueError, match=rf"figures\.{name}\.dpi"):
        cls.from_config({"dpi": 72.5})


def test_settings_freeze_task_lists() -> None:
    settings = TrajectorySettings.from_config({"tasks": ["math"], "max_positions": 10})
    assert settings.tasks == ("math",) and hash(settings)


@pytest.mark.parametrize(
    "cls, config, message",
    [
        (TrajectorySettings, {"max_positions": 0}, r"figures\.trajectory\.max_positions"),
        (LengthsSettings, {"log_scale": "yes"}, r"figures\.lengths\.log_scale"),
        (DecompositionSettings, {"error_bars": "bootstrap"}, r"figures\.decomposition\.error_bars"),
        (VarianceSettings, {"tasks": "math"}, r"figures\.variance\.tasks"),
        (SlopesSettings, ["width"], r"figures\.slopes must be a mapping"),
        # An opacity of 0 would draw nothing: refused here, as when the whole config is validated.
        (
            SlopesSettings,
            {"scatter_alpha": 0},
            r"figures\.slopes\.scatter_alpha = 0: .*greater than 0",
        ),
    ],
)
def test_settings_refuse_bad_values_by_name(cls: type, config: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls.from_config(config)


# --------------------------------------------------------------------------- decomposition


def test_decomposition_summary_is_the_mean_over_prompts(metrics: pd.DataFrame) -> None:
    summary = decomposition_summary(metrics)
    assert len(summary) == len(FAMILIES) * len(VARIANTS) * len(TASKS)
    for row in summary.itertuples():
        group = metrics[
            (metrics.family == row.family)
            & (metrics.variant == row.variant)
            & (metrics.task == row.task)
        ]
        assert row.product == pytest.approx(group["decomposition_product"].mean(), rel=1e-12)
        assert row.covariance == pytest.approx(group["cov_length_rate"].mean(), rel=1e-12)
        # The identity holds per prompt, so it holds for the means drawn.
        assert row.total == pytest.approx(row.product + row.covariance, rel=1e-12)
        ce = group["canopy_entropy"].to_numpy()
        assert row.total_se == pytest.approx(ce.std(ddof=1) / np.sqrt(ce.size), rel=1e-12)
    pooled = decomposition_summary(metrics, error_bars="rollouts")
    first = (metrics.family == "tinygpt") & (metrics.variant == "base") & (metrics.task == "math")
    group = metrics[first]
    expected = np.sqrt((group["canopy_entropy_se"] ** 2).sum()) / len(group)
    assert pooled.iloc[0]["total_se"] == pytest.approx(expected, rel=1e-12)


def test_decomposition_summary_drops_prompts_with_a_missing_term(metrics: pd.DataFrame) -> None:
    broken = metrics.copy()
    broken.loc[0, "canopy_entropy"] = np.nan
    row = decomposition_summary(broken).iloc[0]
    assert row["n_dropped"] == 1 and row["n_prompts"] == 5
    assert row["total"] == pytest.approx(row["product"] + row["covariance"], rel=1e-12)


def test_decomposition_bars_equal_the_data(metrics: pd.DataFrame) -> None:
    figure = plot_decomposition(metrics, DecompositionSettings(**SMALL))
    summary = decomposition_summary(metrics)
    for family in FAMILIES:
        for variant in VARIANTS:
            expected = summary[(summary.family == family) & (summary.variant == variant)]
            expected = expected.set_index("task").loc[list(TASKS)]
            product = by_gid(figure, f"product/{family}/{variant}")
            covariance = by_gid(figure, f"covariance/{family}/{variant}")
            np.testing.assert_allclose([b.get_height() for b in product], expected["product"])
            # The covariance segment sits on top of the product term.
            np.testing.assert_allclose([b.get_y() for b in covariance], expected["product"])
            np.testing.assert_allclose([b.get_height() for b in covariance], expected["covariance"])
            totals = by_gid(figure, f"total/{family}/{variant}")
            (total,) = [a for a in totals if isinstance(a, Line2D)]
            np.testing.assert_allclose(total.get_ydata(), expected["total"])
    labels = legend_labels(figure)
    assert "Base" in labels and "Fine-tuned" in labels
    assert "(nats)" in figure.axes[0].get_ylabel()
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == list(FAMILIES)
    assert [t.get_text() for t in figure.axes[1].get_xticklabels()] == list(TASKS)


def test_decomposition_tasks_setting_selects_and_orders(metrics: pd.DataFrame) -> None:
    settings = DecompositionSettings(tasks=("completion",), show_covariance_panel=False, **SMALL)
    figure = plot_decomposition(metrics, settings)
    assert len(figure.axes) == len(FAMILIES)
    assert len(by_gid(figure, "product/tinygpt/base")) == 1
    with pytest.raises(ValueError, match="stories"):
        plot_decomposition(metrics, DecompositionSettings(tasks=("stories",), **SMALL))


# --------------------------------------------------------------------------- trajectory


def test_trajectory_lines_follow_the_table() -> None:
    trajectory = make_trajectory()
    settings = TrajectorySettings(max_positions=30, min_active=10, **SMALL)
    figure = plot_trajectory(trajectory, settings)
    for variant in VARIANTS:
        (line,) = by_gid(figure, f"line/tinyllama/{variant}/completion")
        rows = trajectory[
            (trajectory.family == "tinyllama")
            & (trajectory.variant == variant)
            & (trajectory.task == "completion")
            & (trajectory.position <= 30)
            & (trajectory.n_active >= 10)
        ]
        np.testing.assert_array_equal(line.get_xdata(), rows["position"])
        np.testing.assert_allclose(line.get_ydata(), rows["mean_entropy"])
    # Fine-tuned rollouts run out sooner: fewer than 10 remain after step 25.
    (finetuned,) = by_gid(figure, "line/tinygpt/finetuned/math")
    assert finetuned.get_xdata().max() == 25
    assert len(figure.axes) == len(FAMILIES) * len(TASKS)
    assert "nats/token" in figure.axes[0].get_ylabel()
    assert "tokens" in figure.axes[-1].get_xlabel()
    labels = legend_labels(figure)
    assert labels[:2] == ["Base", "Fine-tuned"] and "SE" in labels[2]


def test_trajectory_rows_show_every_task_unclipped() -> None:
    # A later task with much higher entropy must still fit the row's shared axis.
    trajectory = make_trajectory()
    trajectory.loc[trajectory.task == TASKS[-1], "mean_entropy"] += 3.0
    figure = plot_trajectory(trajectory, TrajectorySettings(**SMALL))
    for family in FAMILIES:
        for variant in VARIANTS:
            for task in TASKS:
                (line,) = by_gid(figure, f"line/{family}/{variant}/{task}")
                low, high = line.axes.get_ylim()
                assert low == 0.0
                assert line.get_ydata().max() <= high, (family, variant, task)


# --------------------------------------------------------------------------- lengths


def test_length_histograms_are_shares_of_rollouts(rollouts: pd.DataFrame) -> None:
    figure = plot_lengths(rollouts, LengthsSettings(bins=12, **SMALL), max_new_tokens=CAP)
    panel = rollouts[(rollouts.family == "tinygpt") & (rollouts.task == "math")]
    edges = length_bins(np.append(panel["n_steps"].to_numpy(float), CAP), 12, False)
    for variant in VARIANTS:
        values = panel.loc[panel.variant == variant, "n_steps"].to_numpy(float)
        expected, _ = np.histogram(values, bins=edges)
        (outline,) = by_gid(figure, f"hist/tinygpt/{variant}/math")
        # A step outline visits each bin's height twice (left and right edge).
        heights = outline.get_xy()[1:-1:2, 1]
        np.testing.assert_allclose(heights, expected / values.size)
    caps = by_gid(figure, "cap")
    assert len(caps) == len(FAMILIES) * len(TASKS)
    assert all(line.get_xdata()[0] == CAP for line in caps)
    labels = legend_labels(figure)
    assert labels == ["Base", "Fine-tuned", f"max_new_tokens = {CAP}"]
    assert "tokens" in figure.axes[-1].get_xlabel()


def test_length_cap_is_inferred_from_truncated_rollouts(rollouts: pd.DataFrame) -> None:
    assert infer_length_cap(rollouts) == CAP
    assert infer_length_cap(rollouts[rollouts.hit_eos]) is None
    figure = plot_lengths(rollouts[rollouts.hit_eos], LengthsSettings(log_scale=True, **SMALL))
    assert not by_gid(figure, "cap")
    assert figure.axes[0].get_xscale() == "log"
    bad = rollouts.copy()
    bad.loc[3, "n_steps"] = 0
    with pytest.raises(ValueError, match="n_steps"):
        plot_lengths(bad, LengthsSettings(**SMALL))


def test_length_bins_cover_every_length() -> None:
    lengths = np.array([1, 2, 2, 5, 9])
    edges = length_bins(lengths, 30, False)
    np.testing.assert_array_equal(edges, np.arange(0.5, 10.0, 1.0))  # one bin per length
    wide = length_bins(np.array([1, 4000]), 30, True)
    assert wide[0] <= 1 and wide[-1] >= 4000 and len(wide) == 31


# --------------------------------------------------------------------------- variance


def test_within_prompt_variances_match_numpy(rollouts: pd.DataFrame) -> None:
    variances = within_prompt_variances(rollouts)
    assert len(variances) == rollouts.groupby(["family", "variant", "task", "prompt_id"]).ngroups
    for row in variances.sample(5, random_state=0).itertuples():
        group = rollouts[
            (rollouts.family == row.family)
            & (rollouts.variant == row.variant)
            & (rollouts.task == row.task)
            & (rollouts.prompt_id == row.prompt_id)
        ]
        n = group["n_steps"].to_numpy(float)
        h = group["sum_entropy"].to_numpy(float)
        assert row.n_rollouts == len(group)
        assert row.var_entropy == pytest.approx(np.var(h, ddof=1), rel=1e-10)
        assert row.var_length == pytest.approx(np.var(n, ddof=1), rel=1e-10)
        assert row.var_rate == pytest.approx(np.var(h / n, ddof=1), rel=1e-10)


def test_variance_boxes_show_the_medians(rollouts: pd.DataFrame) -> None:
    figure = plot_variance(rollouts, VarianceSettings(**SMALL))
    variances = within_prompt_variances(rollouts)
    for variant in VARIANTS:
        for quantity in ("var_entropy", "var_length", "var_rate"):
            (median,) = by_gid(figure, f"median/tinyllama/{variant}/math/{quantity}")
            values = variances.loc[
                (variances.family == "tinyllama")
                & (variances.variant == variant)
                & (variances.task == "math"),
                quantity,
            ]
            assert median.get_ydata()[0] == pytest.approx(np.median(values), rel=1e-12)
    units = [ax.get_ylabel() for ax in figure.axes[:3]]
    assert "nats$^2$" in units[0] and "tokens$^2$" in units[1] and "nats/token" in units[2]
    assert legend_labels(figure) == ["Base", "Fine-tuned"]
    assert figure.axes[0].get_yscale() == "log"


@pytest.mark.parametrize("spread", [0.3, 1.0, 4.0])
def test_variance_log_axis_labels_do_not_collide(rollouts: pd.DataFrame, spread: float) -> None:
    # At the paper's full width the panels are short: matplotlib's default minor labels
    # (2, 3, 4, 6 x 10^k) stacked on each other when the variances spanned one to two decades.
    scaled = rollouts.copy()
    rng = np.random.default_rng(1)
    factor = np.exp(spread * rng.standard_normal(len(scaled)))
    scaled["sum_entropy"] = scaled["sum_entropy"] * factor
    figure = plot_variance(scaled, VarianceSettings(width=7.0, dpi=100))
    assert label_clashes(figure) == []
    assert all(ax.get_yticklabels() for ax in figure.axes)


def test_variance_counts_zero_variances_on_a_log_axis(rollouts: pd.DataFrame) -> None:
    flat = rollouts.copy()
    # Every rollout of one prompt truncated at the cap: its length variance is exactly zero.
    chosen = (flat.family == "tinygpt") & (flat.variant == "base") & (flat.prompt_id == "math-00")
    flat.loc[chosen, "n_steps"] = CAP
    figure = plot_variance(flat, VarianceSettings(**SMALL))
    length_axes = figure.axes[1]
    assert "1 zero" in [t.get_text() for t in length_axes.texts]


# --------------------------------------------------------------------------- slopes


def test_slopes_points_and_intervals_come_from_the_table() -> None:
    slopes, panel = make_slopes(), make_panel()
    figure = plot_slopes(slopes, SlopesSettings(**SMALL), panel)
    for row in slopes.itertuples():
        gid = f"slope/{row.variant}" if row.variant != "ratio" else f"ratio/{row.method}"
        (point,) = [a for a in by_gid(figure, gid) if isinstance(a, Line2D)]
        assert point.get_ydata()[0] == pytest.approx(row.slope)
    ax_slope, ax_ratio, ax_scatter = figure.axes
    assert [t.get_text() for t in ax_slope.get_xticklabels()] == ["Base", "Fine-tuned"]
    assert [t.get_text() for t in ax_ratio.get_xticklabels()] == ["delta", "bootstrap"]
    # The whiskers span the confidence interval.
    ci = np.concatenate(
        [c.get_segments()[0][:, 1] for c in ax_slope.collections if c.get_segments()]
    )
    np.testing.assert_allclose(np.sort(ci), np.sort([0.08, 0.16, 0.27, 0.39]))
    for variant in VARIANTS:
        (scatter,) = by_gid(figure, f"scatter/{variant}")
        part = panel[panel.variant == variant]
        np.testing.assert_allclose(scatter.get_offsets(), part[["R", "D"]].to_numpy())
    assert "nats/token" in ax_scatter.get_xlabel()
    assert legend_labels(figure) == ["Base", "Fine-tuned"]


def test_slopes_reads_at_the_column_width() -> None:
    # Three panels in one row at 3.4 in overlapped "Base"/"Fine-tuned", the two ratio values,
    # and cut the scatter's axis label at the figure's edge.
    slopes = make_slopes()
    slopes.loc[slopes.variant == "ratio", ["slope", "ci_low", "ci_high"]] = [1.03, 0.75, 1.31]
    figure = plot_slopes(slopes, SlopesSettings(width=3.4, dpi=100), make_panel())
    assert label_clashes(figure) == []


def test_slopes_without_scatter_and_bad_tables() -> None:
    figure = plot_slopes(make_slopes(), SlopesSettings(show_scatter=False, **SMALL))
    assert len(figure.axes) == 2
    with pytest.raises(ValueError, match="show_scatter"):
        plot_slopes(make_slopes(), SlopesSettings(**SMALL))
    odd = make_slopes()
    odd.loc[0, "variant"] = "instruct"
    with pytest.raises(ValueError, match="instruct"):
        plot_slopes(odd, SlopesSettings(show_scatter=False, **SMALL))
    with pytest.raises(ValueError, match="ci_high"):
        plot_slopes(make_slopes().drop(columns="ci_high"), SlopesSettings(show_scatter=False))


# --------------------------------------------------------------------------- residuals


def test_residual_panels_draw_the_data() -> None:
    residuals = make_residuals()
    figure = plot_residuals(residuals, TESTS_JSON, ResidualsSettings(quantile_bins=5, **SMALL))
    (qq,) = by_gid(figure, "qq")
    expected_x, observed = uniform_qq(residuals["scaled_residual"])
    np.testing.assert_allclose(qq.get_xdata(), expected_x)
    np.testing.assert_allclose(qq.get_ydata(), np.sort(residuals["scaled_residual"]))
    ax_qq = figure.axes[0]
    assert "KS p = 0.431" in ax_qq.get_title()
    box = ax_qq.texts[0].get_text()
    assert "dispersion p = 0.87" in box and "outliers p = 1" in box
    (median,) = by_gid(figure, "quantile/0.5")
    rank = (residuals["predicted"].rank().to_numpy() - 0.5) / len(residuals)
    order = np.argsort(rank)
    first_bin = residuals["scaled_residual"].to_numpy()[order[:40]]
    assert median.get_ydata()[0] == pytest.approx(np.median(first_bin))
    labels = legend_labels(figure)
    assert labels[:2] == ["Base", "Fine-tuned"]


def test_test_p_values_are_read_defensively() -> None:
    assert diagnostic_p_values({}) == {}
    assert diagnostic_p_values({"ks_p": "n/a", "dispersion_p": None, "outlier_p": 0.2}) == {
        "outliers": 0.2
    }
    other = {"zero_inflation_p": 0.9, "n": 10, "dispersion": 1.2, "custom": {"p.value": 0.05}}
    assert diagnostic_p_values(other) == {"zero_inflation": 0.9, "custom": 0.05}
    # The shape canopy.stats writes: one object per test, plus run information.
    stats_shape = {
        "engine": "canopy",
        "n": 240,
        "nsim": 1000,
        "seed": 42,
        "simulation": {"residuals": "unconditional", "dispersion": "unconditional"},
        "outliers": {"statistic": 0.0, "p_value": 1.0},
        "uniformity": {"statistic": 0.05, "p_value": 0.3},
        "dispersion": {"statistic": 0.98, "p_value": 0.8},
    }
    p_values = diagnostic_p_values(stats_shape)
    assert p_values == {"KS": 0.3, "dispersion": 0.8, "outliers": 1.0}
    assert list(p_values) == ["KS", "dispersion", "outliers"]
    figure = plot_residuals(make_residuals(), {}, ResidualsSettings(**SMALL))
    assert "KS" not in figure.axes[0].get_title() and not figure.axes[0].texts


def test_binned_quantiles_and_residual_checks() -> None:
    x = np.arange(10.0)
    y = np.arange(10.0) * 0.1
    centres, quantiles = binned_quantiles(x, y, 2, (0.5,))
    np.testing.assert_allclose(centres, [2.0, 7.0])
    np.testing.assert_allclose(quantiles[:, 0], [0.2, 0.7])
    bad = make_residuals()
    bad.loc[0, "scaled_residual"] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plot_residuals(bad, TESTS_JSON, ResidualsSettings(**SMALL))


# --------------------------------------------------------------------------- rho and forest


def test_rho_summary_means_and_bootstrap_intervals() -> None:
    rng = np.random.default_rng(3)
    n = 400
    frame = pd.DataFrame(
        {
            "family": "f",
            "task": "math",
            "variant": np.repeat(["base", "finetuned"], n),
            "rho_pearson": np.r_[rng.normal(0.1, 0.2, n), rng.normal(0.4, 0.2, n)],
        }
    )
    frame.loc[0, "rho_pearson"] = np.nan  # an undefined correlation is left out and counted
    summary = rho_summary(frame, RhoSettings(resamples=4000)).set_index("variant")
    for variant, values in frame.groupby("variant")["rho_pearson"]:
        row = summary.loc[variant]
        assert row["mean"] == pytest.approx(values.mean())  # pandas skips the NaN
        # The percentile interval of a mean of normal values is the textbook one, ±1.96 SE.
        half = 1.96 * values.std(ddof=1) / np.sqrt(values.notna().sum())
        assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * half, rel=0.1)
        assert row["ci_low"] < row["mean"] < row["ci_high"]
    assert summary.loc["base", "n_missing"] == 1 and summary.loc["base", "n_prompts"] == n - 1
    again = rho_summary(frame, RhoSettings(resamples=4000))
    pd.testing.assert_frame_equal(summary.reset_index()[again.columns], again)


def test_rho_figure_names_the_prompts_it_leaves_out_in_its_log(
    metrics: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    frame = metrics.copy()
    key = ["family", "variant", "task"]
    first = frame.iloc[0]
    same_table = (frame[key] == first[key]).all(axis=1)
    frame.loc[frame.index[same_table][:2], "rho_pearson"] = np.nan
    with caplog.at_level("WARNING", logger="canopy.figures.rho"):
        plot_rho(frame, RhoSettings(**SMALL, resamples=50))
    warned = [r.getMessage() for r in caplog.records if r.name == "canopy.figures.rho"]
    where = f"{first['family']}/{first['variant']}/{first['task']}"
    assert warned == [f"{where}: 2 prompt(s) with an undefined correlation left out"]


def test_rho_figure_draws_every_family_and_variant(metrics: pd.DataFrame) -> None:
    settings = RhoSettings(**SMALL, resamples=200)
    figure = plot_rho(metrics, settings)
    summary = rho_summary(metrics, settings)
    drawn = {line.get_gid(): line for ax in figure.axes for line in ax.lines if line.get_gid()}
    for family in FAMILIES:
        for variant in VARIANTS:
            line = drawn[f"rho/{family}/{variant}"]
            part = summary[(summary.family == family) & (summary.variant == variant)]
            expected = part.set_index("task").reindex(list(pd.unique(metrics["task"])))["mean"]
            np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())
    assert not label_clashes(figure)
    with pytest.raises(ValueError, match=r"figures\.rho\.correlation = 'distance'"):
        RhoSettings.from_config({"correlation": "distance"})
    with pytest.raises(ValueError, match=r"correlation"):
        RhoSettings(correlation="distance")


def test_forest_plot_has_one_row_per_sweep_point() -> None:
    table = make_ablation()
    figure = plot_forest(table, ForestSettings(**SMALL))
    ratio = {l.get_gid(): l for l in figure.axes[0].lines if l.get_gid()}
    assert set(ratio) == {f"slope_ratio/{s} / {e}" for s, e in zip(table.sampling, table.embedder)}
    assert ratio["slope_ratio/topk1000 / minilm"].get_xdata()[0] == 2.2
    ticks = sorted(figure.axes[0].get_yticklabels(), key=lambda t: -t.get_position()[1])
    # Top to bottom in table order: the main setting on top.
    assert [t.get_text() for t in ticks] == [
        "default / minilm",
        "topk1000 / minilm",
        "default / minilm_prefix",
    ]
    assert not label_clashes(figure)
    with pytest.raises(ValueError, match="slope_ratio_boot_ci_low"):
        plot_forest(
            table.drop(columns="slope_ratio_boot_ci_low"), ForestSettings(interval="bootstrap")
        )


# --------------------------------------------------------------------------- files


def write_inputs(root: Path, rollouts: pd.DataFrame, metrics: pd.DataFrame) -> dict[str, dict]:
    """The workflow's input files for every figure, under ``root`` (sampling "default")."""
    paths: dict[str, dict] = {"metrics": {}, "trajectory": {}, "rollouts": {}}
    trajectory = make_trajectory()
    for family in FAMILIES:
        for variant in VARIANTS:
            for task in TASKS:
                key = (family, variant, task)

                def part(frame: pd.DataFrame) -> pd.DataFrame:
                    chosen = (
                        (frame.family == family) & (frame.variant == variant) & (frame.task == task)
                    )
                    return frame[chosen].drop(columns=["family", "variant", "task"])

                stem = f"default/{family}/{variant}/{task}"
                paths["metrics"][key] = root / f"results/metrics/{stem}.parquet"
                paths["trajectory"][key] = root / f"results/metrics/{stem}.trajectory.parquet"
                paths["rollouts"][key] = root / f"results/rollouts/{stem}.parquet"
                write_parquet(part(metrics), paths["metrics"][key])
                write_parquet(part(trajectory), paths["trajectory"][key])
                roll = part(rollouts).assign(
                    text="lorem ipsum", step_entropy=lambda f: [[1.0] * n for n in f["n_steps"]]
                )
                write_parquet(roll, paths["rollouts"][key])
    stats = root / "results/stats/default/minilm"
    write_tsv(make_slopes(), stats / "glmm/slopes.tsv")
    write_tsv(make_residuals(), stats / "diagnostics/residuals.tsv")
    write_json(TESTS_JSON, stats / "diagnostics/tests.json")
    write_parquet(make_panel(), root / "results/panel/default/minilm.parquet")
    write_tsv(make_ablation(), root / "results/ablation/summary.tsv")
    return paths


def test_render_functions_write_pdf_and_png(
    tmp_path: Path, rollouts: pd.DataFrame, metrics: pd.DataFrame
) -> None:
    written = write_inputs(tmp_path, rollouts, metrics)
    # One family and task keep the panels few: drawing, not reading, is what takes time here.
    paths = {
        kind: {k: v for k, v in keyed.items() if k[0] == "tinygpt" and k[2] == "math"}
        for kind, keyed in written.items()
    }
    out = tmp_path / "results/figures/default"
    render_decomposition(paths["metrics"], SMALL, out / "d.pdf", out / "d.png")
    render_trajectory(paths["trajectory"], SMALL, out / "t.pdf", out / "t.png")
    render_lengths(paths["rollouts"], SMALL, out / "l.pdf", out / "l.png", max_new_tokens=CAP)
    render_variance(paths["rollouts"], SMALL, out / "v.pdf", out / "v.png")
    stats = tmp_path / "results/stats/default/minilm"
    render_slopes(
        stats / "glmm/slopes.tsv",
        SMALL,
        out / "s.pdf",
        out / "s.png",
        panel_path=tmp_path / "results/panel/default/minilm.parquet",
    )
    render_residuals(
        stats / "diagnostics/residuals.tsv",
        stats / "diagnostics/tests.json",
        SMALL,
        out / "r.pdf",
        out / "r.png",
    )
    render_rho(paths["metrics"], {**SMALL, "resamples": 200}, out / "h.pdf", out / "h.png")
    render_forest(tmp_path / "results/ablation/summary.tsv", SMALL, out / "f.pdf", out / "f.png")
    for stem in "dtlvsrhf":
        assert_written(out / f"{stem}.pdf", out / f"{stem}.png")
    with pytest.raises(
        ValueError, match=r"figures\.lengths\.bin = 3: unknown key; allowed here: .*bins"
    ):
        render_lengths(paths["rollouts"], {"bin": 3}, out / "x.pdf", out / "x.png")


def test_tables_are_read_column_by_column(
    tmp_path: Path, rollouts: pd.DataFrame, metrics: pd.DataFrame
) -> None:
    paths = write_inputs(tmp_path, rollouts, metrics)
    table = read_matrix_tables(paths["rollouts"], columns=["n_steps"])
    assert list(table.columns) == ["family", "variant", "task", "n_steps"]
    assert len(table) == len(rollouts)
    assert table.groupby(["family", "variant", "task"], sort=False).ngroups == 8
    first = next(iter(paths["rollouts"].values()))
    with pytest.raises(ValueError, match=rf"{first.name} lacks column\(s\) hit_eos_typo"):
        read_matrix_tables(paths["rollouts"], columns=["n_steps", "hit_eos_typo"])
    matrix = [list(k) for k in paths["metrics"]]
    assert keyed_paths(matrix, list(paths["metrics"].values())) == paths["metrics"]
    with pytest.raises(ValueError, match="same order and length"):
        keyed_paths(matrix, [])


def test_save_figure_leaves_the_old_file_when_drawing_fails(tmp_path: Path) -> None:
    pdf = tmp_path / "f.pdf"
    pdf.write_bytes(b"old")
    figure = Figure()
    ax = figure.add_subplot()
    ax.set_title("$\\unknowncommand$")  # mathtext fails only when drawn
    with pytest.raises(ValueError):
        save_figure(figure, pdf, None)
    assert pdf.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.pdf"]


def test_style_does_not_leak_into_global_rcparams(metrics: pd.DataFrame) -> None:
    before = dict(matplotlib.rcParams)
    plot_decomposition(metrics, DecompositionSettings(**SMALL))
    assert matplotlib.rcParams["font.size"] == before["font.size"]
    assert matplotlib.rcParams["axes.spines.top"] == before["axes.spines.top"]


# --------------------------------------------------------------------------- workflow

COMMON_SMK = REPO / "workflow/rules/common.smk"
FIGURES_SMK = REPO / "workflow/rules/figures.smk"
TINY_CONFIG = REPO / "tests/configs/tiny.yaml"
SAMPLING_FIGURES = ("decomposition", "trajectory", "lengths", "variance", "rho")


@pytest.mark.slow
def test_figure_rules_run_and_settings_rerun_only_their_figure(
    tmp_path: Path, rollouts: pd.DataFrame, metrics: pd.DataFrame
) -> None:
    """Run every figure rule through Snakemake on synthetic inputs, then edit one figure's
    settings: the dry run must schedule that figure alone."""
    if shutil.which("snakemake") is None:
        pytest.skip("snakemake is not installed")
    write_inputs(tmp_path, rollouts, metrics)
    # The tiny test config has the same families, tasks, sampling setting and embedder as the
    # synthetic inputs; common.smk validates it as the real workflow does.
    config = yaml.safe_load(TINY_CONFIG.read_text())
    assert set(config["families"]) == set(FAMILIES) and set(config["tasks"]) == set(TASKS)
    config["sampling"]["default"]["max_new_tokens"] = CAP
    config["figures"] = {name: {"width": 4.0, "dpi": 50} for name in SETTINGS_CLASSES}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(textwrap.dedent(f"""
            configfile: "config.yaml"
            include: "{COMMON_SMK}"
            include: "{FIGURES_SMK}"
            rule all:
                input: figure_targets()
            """))

    def snakemake(*args: str) -> subprocess.CompletedProcess:
        return run_snakemake(
            tmp_path,
            "--cores",
            "1",
            *args,
            snakefile=tmp_path / "Snakefile",
            env={"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
            check=False,
            timeout=300,
        )

    run = snakemake()
    assert run.returncode == 0, run.stderr[-3000:]
    figures = sorted(
        p.relative_to(tmp_path / "results/figures").as_posix()
        for p in (tmp_path / "results/figures").rglob("*.p*")
    )
    assert figures == sorted(
        [f"default/{n}.{e}" for n in SAMPLING_FIGURES for e in ("pdf", "png")]
        + [f"default/minilm/{n}.{e}" for n in ("slopes", "residuals") for e in ("pdf", "png")]
        + [f"ablation_forest.{e}" for e in ("pdf", "png")]
    )
    again = snakemake("-n")
    assert "Nothing to be done" in again.stdout + again.stderr

    config["figures"]["lengths"]["bins"] = 7
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake("-n", "--quiet", "rules")
    assert dry.returncode == 0, dry.stderr[-3000:]
    scheduled = {line.split()[0] for line in dry.stdout.splitlines() if line.startswith("figure_")}
    assert scheduled == {"figure_lengths"}, dry.stdout

    config["figures"]["variance"]["tasks"] = ["stories"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    broken = snakemake("-n")
    assert broken.returncode != 0 and "figures.variance.tasks" in broken.stderr + broken.stdout
