"""The ablation table: one row per sweep point, slopes from the GLMM table, the rho difference
from a paired prompt bootstrap pooled over families and tasks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from canopy.bootstrap import BootstrapSettings
from canopy.io import write_parquet, write_tsv
from canopy.report import ABLATION_COLUMNS, ablation_table


def _slopes(ratio: float) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "variant": ["base", "finetuned", "ratio", "ratio"],
            "slope": [0.1, 0.1 * ratio, ratio, ratio],
            "se": [0.01, 0.02, 0.3, 0.35],
            "ci_low": [0.08, 0.1 * ratio - 0.04, ratio - 0.6, ratio - 0.5],
            "ci_high": [0.12, 0.1 * ratio + 0.04, ratio + 0.6, ratio + 0.8],
            "method": ["wald", "wald", "delta", "bootstrap"],
        }
    )


def _panel(shift: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for family in ("f1", "f2"):
        for task in ("math", "stories"):
            for prompt in range(60):
                base = rng.normal(0.1, 0.2)
                for variant, value in (("base", base), ("finetuned", base + shift)):
                    rows.append(
                        {
                            "family": family,
                            "variant": variant,
                            "task": task,
                            "prompt_id": f"p{prompt}",
                            "rho_pearson": value + rng.normal(0, 0.05),
                        }
                    )
    return pd.DataFrame(rows)


def test_ablation_table_rows_per_sweep_point(tmp_path):
    combos = [("default", "minilm"), ("topk1000", "minilm")]
    panels, slopes = [], []
    for i, ((sampling, embedder), shift, ratio) in enumerate(zip(combos, (0.3, 0.0), (2.5, 1.2))):
        panel = _panel(shift, seed=i)
        panels.append(tmp_path / f"{sampling}.parquet")
        slopes.append(tmp_path / f"{sampling}.tsv")
        write_parquet(panel, panels[-1])
        write_tsv(_slopes(ratio), slopes[-1])
    table = ablation_table(combos, panels, slopes, BootstrapSettings(resamples=1000))
    assert list(table.columns) == list(ABLATION_COLUMNS)
    assert table[["sampling", "embedder"]].apply(tuple, axis=1).tolist() == combos
    first, second = table.iloc[0], table.iloc[1]
    assert first["slope_ratio"] == 2.5 and first["slope_ratio_ci_low"] == 1.9
    assert first["slope_ratio_boot_ci_high"] == pytest.approx(3.3)
    assert first["slope_base"] == 0.1 and first["slope_finetuned"] == pytest.approx(0.25)
    # Pooled over both families (the prompt ids repeat across families: 240 pairs, not 120).
    assert first["n_prompts"] == 240
    panel = pd.read_parquet(panels[0])
    means = panel.groupby("variant")["rho_pearson"].mean()
    assert first["rho_difference"] == pytest.approx(means["finetuned"] - means["base"])
    assert first["rho_difference_ci_low"] > 0.25 and first["rho_difference_ci_high"] < 0.35
    # The interval is the paired one: its width follows the SD of the per-prompt differences
    # (stratified by task, which here changes nothing), not the far larger SD of the values.
    panel = pd.read_parquet(panels[1]).pivot(
        index=["family", "task", "prompt_id"], columns="variant", values="rho_pearson"
    )
    diffs = panel["finetuned"] - panel["base"]
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))
    width = second["rho_difference_ci_high"] - second["rho_difference_ci_low"]
    assert width == pytest.approx(2 * half, rel=0.15)
    assert second["rho_difference"] == pytest.approx(diffs.mean())


def test_ablation_table_names_a_missing_slope_row(tmp_path):
    write_parquet(_panel(0.1, 0), tmp_path / "p.parquet")
    write_tsv(_slopes(2.0).iloc[:3], tmp_path / "s.tsv")
    with pytest.raises(ValueError, match="ratio/bootstrap"):
        ablation_table([("default", "minilm")], [tmp_path / "p.parquet"], [tmp_path / "s.tsv"])
