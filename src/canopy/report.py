"""The headline table: what a reader of the report wants first."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

__all__ = ["headline_table"]

_MEANS = {
    "canopy_entropy": "CE",
    "mean_rate": "R",
    "mean_length": "N",
    "rho_pearson": "rho",
    "dissimilarity": "D",
    "vendi": "VS",
    "truncation_rate": "truncation_rate",
}


def headline_table(
    combinations: Sequence[tuple[str, str]],
    panel_paths: Sequence[str | Path],
    slope_paths: Sequence[str | Path],
) -> pd.DataFrame:
    """Per (sampling, embedder, family, variant): prompt means of the key metrics, plus the
    regression's entropy-rate slope for that variant and the fine-tuned/base slope ratio.

    The three sequences are parallel: one panel (results/panel/...) and one slopes table
    (results/stats/.../glmm/slopes.tsv) per (sampling, embedder) combination.
    """
    rows = []
    for (sampling, embedder), panel_path, slope_path in zip(
        combinations, panel_paths, slope_paths, strict=True
    ):
        panel = pd.read_parquet(panel_path)
        slopes = pd.read_csv(slope_path, sep="\t")
        ratio = slopes[(slopes["variant"] == "ratio") & (slopes["method"] == "delta")]
        means = (
            panel.groupby(["family", "variant"])[list(_MEANS)]
            .mean()
            .rename(columns=_MEANS)
            .reset_index()
        )
        means.insert(0, "embedder", embedder)
        means.insert(0, "sampling", sampling)
        means["n_prompts"] = panel.groupby(["family", "variant"]).size().to_numpy()
        by_variant = slopes[slopes["variant"].isin(["base", "finetuned"])].drop_duplicates("variant")
        slope_of = dict(zip(by_variant["variant"], by_variant["slope"]))
        means["entropy_rate_slope"] = means["variant"].map(slope_of)
        if len(ratio):
            means["slope_ratio"] = float(ratio["slope"].iloc[0])
            means["slope_ratio_ci_low"] = float(ratio["ci_low"].iloc[0])
            means["slope_ratio_ci_high"] = float(ratio["ci_high"].iloc[0])
        rows.append(means)
    return pd.concat(rows, ignore_index=True)
