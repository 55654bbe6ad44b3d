"""The analysis panel joins metrics and diversity without losing or inventing prompts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from canopy.panel import PANEL_ALIASES, build_panel


def _metrics(prompts: list[str], shift: float) -> pd.DataFrame:
    n = len(prompts)
    return pd.DataFrame(
        {
            "prompt_id": prompts,
            "n_rollouts": [8] * n,
            "canopy_entropy": np.arange(n) + shift,
            "mean_rate": np.linspace(0.5, 1.5, n) + shift,
            "mean_length": np.linspace(10, 20, n),
            "rho_pearson": np.zeros(n),
            "note": [""] * n,
        }
    )


def _diversity(prompts: list[str]) -> pd.DataFrame:
    n = len(prompts)
    return pd.DataFrame(
        {
            "prompt_id": prompts[::-1],  # order must not matter
            "n_rollouts": [8] * n,
            "dissimilarity": np.linspace(0.1, 0.9, n),
            "vendi": np.linspace(1, 5, n),
            "log_vendi": np.log(np.linspace(1, 5, n)),
            "note": [""] * n,
        }
    )


def test_panel_rows_ids_and_aliases() -> None:
    prompts = ["p0", "p1", "p2"]
    keys = [(f, v, "math") for f in ("a", "b") for v in ("base", "finetuned")]
    panel = build_panel(
        {k: _metrics(prompts, i) for i, k in enumerate(keys)},
        {k: _diversity(prompts) for k in keys},
    )
    assert len(panel) == 12
    assert list(panel.columns[:5]) == ["family", "variant", "task", "prompt_id", "prompt_uid"]
    assert set(panel["prompt_uid"]) == {"math/p0", "math/p1", "math/p2"}
    for short, long in PANEL_ALIASES.items():
        np.testing.assert_array_equal(panel[short], panel[long])
    # Each prompt's diversity lands on its own row, whatever the input order.
    row = panel[(panel.family == "b") & (panel.variant == "base") & (panel.prompt_id == "p2")]
    assert row["D"].item() == pytest.approx(0.1)
    assert row["CE"].item() == pytest.approx(2 + 2)


def test_mismatched_prompts_are_an_error() -> None:
    key = ("a", "base", "math")
    with pytest.raises(ValueError, match="disagree on prompts"):
        build_panel({key: _metrics(["p0", "p1"], 0)}, {key: _diversity(["p0"])})


def test_missing_model_is_an_error() -> None:
    key = ("a", "base", "math")
    with pytest.raises(ValueError, match="different"):
        build_panel({key: _metrics(["p0"], 0)}, {})


def test_semantic_entropy_joins_by_prompt_and_must_cover_the_same_prompts():
    prompts = ["a", "b", "c"]
    key = ("fam", "base", "math")
    semantic = pd.DataFrame(
        {
            "prompt_id": ["c", "a", "b"],
            "semantic_entropy": [0.3, 0.1, 0.2],
            "semantic_entropy_weighted": [0.0, 0.0, 0.0],
            "n_semantic_clusters": [3, 1, 2],
        }
    )
    panel = build_panel({key: _metrics(prompts, 0)}, {key: _diversity(prompts)}, {key: semantic})
    assert panel.set_index("prompt_id")["semantic_entropy"].to_dict() == {
        "a": 0.1,
        "b": 0.2,
        "c": 0.3,
    }
    with pytest.raises(ValueError, match="semantic entropy disagree"):
        build_panel({key: _metrics(prompts, 0)}, {key: _diversity(prompts)}, {key: semantic[:2]})
