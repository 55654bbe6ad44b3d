"""The ablation table: one row per sweep point, slopes from the GLMM table, the rho difference
from a paired prompt bootstrap pooled over families and tasks; and the example rollouts: one
typical rollout per model and task, next to its prompt."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from canopy.bootstrap import BootstrapSettings
from canopy.io import write_parquet, write_tsv
from canopy.prompts import Prompt, write_prompts
from canopy.report import ABLATION_COLUMNS, EXAMPLE_COLUMNS, ablation_table, example_rollouts


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


def _rollouts(lengths: dict[str, list[int]]) -> pd.DataFrame:
    """A rollout table with the given lengths per prompt, in sample order."""
    rows = []
    for prompt_id, steps in lengths.items():
        for sample, n_steps in enumerate(steps):
            rows.append(
                {
                    "prompt_id": prompt_id,
                    "sample": sample,
                    "n_steps": n_steps,
                    "hit_eos": n_steps < 9,
                    "truncated": n_steps >= 9,
                    "step_entropy": [0.5] * n_steps,
                    "text": f"{prompt_id} sample {sample}\tof {n_steps} tokens\nsecond line",
                }
            )
    # Stored in no particular order: the choice must not depend on the row order.
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)


def test_example_rollouts_take_the_first_prompts_median_rollout(tmp_path):
    prompts = {}
    for task, ids in (("math", ["m7", "m1", "m3"]), ("stories", ["s2", "s0"])):
        prompts[task] = tmp_path / f"{task}.jsonl"
        write_prompts([Prompt(i, task, f"Prompt {i}?", "test") for i in ids], prompts[task])
    lengths = {
        # Odd count: the median 5 is held by samples 1 and 3; the lowest index wins.
        ("f1", "base", "math"): {"m7": [9, 5, 2, 5, 7], "m1": [1, 1, 1, 1, 1]},
        # Even count: the lower median, 4 (not 6, and never the mean 5.25).
        ("f1", "finetuned", "math"): {"m7": [8, 3, 4, 6], "m3": [4, 4, 4, 4]},
        ("f1", "base", "stories"): {"s0": [2, 2, 2], "s2": [3]},
        ("f1", "finetuned", "stories"): {"s2": [9, 9, 9], "s0": [1, 1, 1]},
    }
    paths = {}
    for (family, variant, task), table in lengths.items():
        paths[family, variant, task] = tmp_path / family / variant / f"{task}.parquet"
        write_parquet(_rollouts(table), paths[family, variant, task])
    examples = example_rollouts(paths, prompts)
    assert list(examples.columns) == list(EXAMPLE_COLUMNS)
    # One row per table, in the order given.
    assert examples[["family", "variant", "task"]].apply(tuple, axis=1).tolist() == list(paths)
    # The first prompt of each file, for every model: the variants answer the same prompt.
    assert examples["prompt_id"].tolist() == ["m7", "m7", "s2", "s2"]
    assert examples["prompt"].tolist() == ["Prompt m7?", "Prompt m7?", "Prompt s2?", "Prompt s2?"]
    assert examples["sample"].tolist() == [1, 2, 0, 0]
    assert examples["n_steps"].tolist() == [5, 4, 3, 9]
    assert examples["hit_eos"].tolist() == [True, True, True, False]
    assert examples["text"].iloc[0] == "m7 sample 1\tof 5 tokens\nsecond line"
    # The texts' tabs and newlines survive the report's TSV.
    write_tsv(examples, tmp_path / "examples.tsv")
    read = pd.read_csv(tmp_path / "examples.tsv", sep="\t")
    pd.testing.assert_frame_equal(read, examples)


def test_example_rollouts_name_a_table_without_the_first_prompt(tmp_path):
    prompts = tmp_path / "math.jsonl"
    write_prompts([Prompt("m0", "math", "Prompt?", "test")], prompts)
    table = tmp_path / "math.parquet"
    write_parquet(_rollouts({"m1": [3, 4]}), table)
    with pytest.raises(ValueError, match="first prompt 'm0'"):
        example_rollouts({("f1", "base", "math"): table}, {"math": prompts})
