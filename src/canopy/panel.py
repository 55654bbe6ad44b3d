"""The analysis panel: one row per (family, variant, task, prompt).

It joins the per-prompt Canopy Entropy metrics with the per-prompt semantic diversity of the same
rollouts and adds the short column names the regression formula uses (D, VS, R, N, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from canopy.config.formula import PANEL_ALIASES

__all__ = ["PanelKey", "build_panel", "read_panel_inputs", "PANEL_ALIASES"]

#: (family, variant, task)
PanelKey = tuple[str, str, str]

_ID_COLUMNS = ["family", "variant", "task", "prompt_id", "prompt_uid"]


def build_panel(
    metrics: Mapping[PanelKey, pd.DataFrame],
    diversity: Mapping[PanelKey, pd.DataFrame],
    semantic: Mapping[PanelKey, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Join metrics and diversity tables of every (family, variant, task) into one panel.

    Both mappings must hold the same keys, and each pair of tables the same prompts: a prompt
    missing on one side means a stage dropped it, which would silently bias the regression.
    ``semantic`` (optional, the semantic-entropy tables) joins the same way, adding its columns.
    """
    if set(metrics) != set(diversity):
        missing = sorted(set(metrics) ^ set(diversity))
        raise ValueError(
            f"metrics and diversity cover different (family, variant, task): {missing}"
        )
    if semantic is not None and set(semantic) != set(metrics):
        missing = sorted(set(metrics) ^ set(semantic))
        raise ValueError(
            f"metrics and semantic entropy cover different (family, variant, task): {missing}"
        )
    frames = []
    for key in sorted(metrics):
        family, variant, task = key
        left, right = metrics[key], diversity[key]
        if set(left["prompt_id"]) != set(right["prompt_id"]):
            only = sorted(set(left["prompt_id"]) ^ set(right["prompt_id"]))
            raise ValueError(
                f"{family}/{variant}/{task}: metrics and diversity disagree on prompts {only[:5]}"
            )
        # n_rollouts appears on both sides; the diversity count is the one embedded, which equals
        # the metric count unless truncated rollouts were dropped from the metrics.
        right = right.rename(
            columns={"n_rollouts": "n_rollouts_embedded", "note": "diversity_note"}
        )
        joined = left.merge(right, on="prompt_id", how="inner", validate="one_to_one")
        if semantic is not None:
            extra = semantic[key]
            if set(extra["prompt_id"]) != set(left["prompt_id"]):
                only = sorted(set(left["prompt_id"]) ^ set(extra["prompt_id"]))
                raise ValueError(
                    f"{family}/{variant}/{task}: metrics and semantic entropy disagree on "
                    f"prompts {only[:5]}"
                )
            joined = joined.merge(extra, on="prompt_id", how="inner", validate="one_to_one")
        joined.insert(0, "task", task)
        joined.insert(0, "variant", variant)
        joined.insert(0, "family", family)
        joined.insert(4, "prompt_uid", task + "/" + joined["prompt_id"].astype(str))
        frames.append(joined)
    if not frames:
        raise ValueError("the panel is empty: no (family, variant, task) was given")
    panel = pd.concat(frames, ignore_index=True)
    for short, long in PANEL_ALIASES.items():
        panel[short] = panel[long]
    ordered = _ID_COLUMNS + list(PANEL_ALIASES)
    panel = panel[ordered + [c for c in panel.columns if c not in ordered]]
    if not np.isfinite(panel["R"]).all() or not np.isfinite(panel["N"]).all():
        bad = panel.loc[~np.isfinite(panel["R"]) | ~np.isfinite(panel["N"]), "prompt_uid"]
        raise ValueError(f"non-finite entropy rate or length for prompts {list(bad)[:5]}")
    return panel


def read_panel_inputs(
    metric_paths: Mapping[PanelKey, str | Path],
    diversity_paths: Mapping[PanelKey, str | Path],
    semantic_paths: Mapping[PanelKey, str | Path] | None = None,
) -> pd.DataFrame:
    """Read the per-(family, variant, task) tables from disk and build the panel."""
    metrics = {key: pd.read_parquet(path) for key, path in metric_paths.items()}
    diversity = {key: pd.read_parquet(path) for key, path in diversity_paths.items()}
    semantic = (
        {key: pd.read_parquet(path) for key, path in semantic_paths.items()}
        if semantic_paths
        else None
    )
    return build_panel(metrics, diversity, semantic)
