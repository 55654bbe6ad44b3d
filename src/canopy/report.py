"""The headline table: what a reader of the report wants first; and the example rollouts that
show what each model writes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from canopy.bootstrap import ALL_TASKS, BootstrapSettings, paired_bootstrap
from canopy.config import VARIANTS
from canopy.prompts import Prompt, read_prompts

__all__ = [
    "ABLATION_COLUMNS",
    "EXAMPLE_COLUMNS",
    "ablation_table",
    "example_rollouts",
    "headline_table",
]

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
        by_variant = slopes[slopes["variant"].isin(VARIANTS)].drop_duplicates("variant")
        slope_of = dict(zip(by_variant["variant"], by_variant["slope"]))
        means["entropy_rate_slope"] = means["variant"].map(slope_of)
        if len(ratio):
            means["slope_ratio"] = float(ratio["slope"].iloc[0])
            for column, bound in _interval(ratio.iloc[0], "slope_ratio").items():
                means[column] = bound
        rows.append(means)
    return pd.concat(rows, ignore_index=True)


def _interval(row: pd.Series, name: str) -> dict[str, float]:
    """The columns ``<name>_ci_low`` and ``<name>_ci_high`` from a row's ci_low and ci_high."""
    return {f"{name}_ci_{end}": float(row[f"ci_{end}"]) for end in ("low", "high")}


#: Columns of :func:`ablation_table`, one row per sweep point (sampling x embedder).
ABLATION_COLUMNS: tuple[str, ...] = (
    "sampling",
    "embedder",
    "n_prompts",
    "slope_base",
    "slope_finetuned",
    "slope_ratio",
    "slope_ratio_ci_low",
    "slope_ratio_ci_high",
    "slope_ratio_boot_ci_low",
    "slope_ratio_boot_ci_high",
    "rho_base",
    "rho_finetuned",
    "rho_difference",
    "rho_difference_ci_low",
    "rho_difference_ci_high",
)


def ablation_table(
    combinations: Sequence[tuple[str, str]],
    panel_paths: Sequence[str | Path],
    slope_paths: Sequence[str | Path],
    bootstrap: BootstrapSettings | None = None,
    *,
    rho: str = "rho_pearson",
) -> pd.DataFrame:
    """One row per sweep point (sampling setting x embedder; a rollout filter is a sampling
    setting): the Beta GLMM's entropy-rate slopes and their ratio fine-tuned / base with its
    delta-method and parametric-bootstrap intervals, and the mean ρ(N, r_N) per variant with the
    paired prompt-bootstrap interval of their difference, pooled over families and tasks
    (resampling prompts within each task).

    The sequences are parallel, as in :func:`headline_table`.
    """
    bootstrap = bootstrap or BootstrapSettings()
    rows = []
    for (sampling, embedder), panel_path, slope_path in zip(
        combinations, panel_paths, slope_paths, strict=True
    ):
        slopes = pd.read_csv(slope_path, sep="\t")

        def pick(variant: str, method: str) -> pd.Series:
            hit = slopes[(slopes["variant"] == variant) & (slopes["method"] == method)]
            if hit.empty:
                raise ValueError(f"{slope_path} has no {variant}/{method} row")
            return hit.iloc[0]

        base, finetuned = pick("base", "wald"), pick("finetuned", "wald")
        delta, boot = pick("ratio", "delta"), pick("ratio", "bootstrap")
        panel = pd.read_parquet(panel_path, columns=["family", "variant", "task", "prompt_id", rho])
        # Pool the families: one pseudo-family whose prompts are (family, prompt) pairs.
        pooled = panel.assign(
            prompt_id=panel["family"].astype(str) + "/" + panel["prompt_id"].astype(str),
            family=ALL_TASKS,
        )
        table = paired_bootstrap(
            pooled,
            [rho],
            resamples=bootstrap.resamples,
            confidence=bootstrap.confidence,
            seed=bootstrap.seed,
        )
        overall = table[table["task"] == ALL_TASKS].iloc[0]
        rows.append(
            {
                "sampling": sampling,
                "embedder": embedder,
                "n_prompts": int(overall["n_prompts"]),
                "slope_base": float(base["slope"]),
                "slope_finetuned": float(finetuned["slope"]),
                "slope_ratio": float(delta["slope"]),
                **_interval(delta, "slope_ratio"),
                **_interval(boot, "slope_ratio_boot"),
                "rho_base": float(overall["base_mean"]),
                "rho_finetuned": float(overall["finetuned_mean"]),
                "rho_difference": float(overall["difference"]),
                **_interval(overall, "rho_difference"),
            }
        )
    return pd.DataFrame(rows, columns=list(ABLATION_COLUMNS))


#: Columns of :func:`example_rollouts`, one row per (family, variant, task).
EXAMPLE_COLUMNS: tuple[str, ...] = (
    "family",
    "variant",
    "task",
    "prompt_id",
    "sample",
    "n_steps",
    "hit_eos",
    "prompt",
    "text",
)

_EXAMPLE_ROLLOUT = ["prompt_id", "sample", "n_steps", "hit_eos", "text"]


def example_rollouts(
    rollout_paths: Mapping[tuple[str, str, str], str | os.PathLike[str]],
    prompts_paths: Mapping[str, str | os.PathLike[str]],
) -> pd.DataFrame:
    """One rollout per (family, variant, task), in the order of ``rollout_paths``, next to the
    prompt it answers: what a reader needs to see how a fine-tune writes differently from its base.

    The choice is fixed in advance rather than made by looking at the texts, so that the example
    is a typical rollout and never a cherry-picked one: the task's first prompt (prompt file
    order, the same prompt for every model) and, of that prompt's rollouts, one of median length
    ``n_steps`` (the lower median for an even count), the lowest sample index among those of that
    length. ``prompts_paths`` maps each task to its prompt file (``resources/prompts/{task}.jsonl``).
    """
    first_prompts: dict[str, Prompt] = {}
    rows = []
    for (family, variant, task), path in rollout_paths.items():
        if task not in first_prompts:
            first_prompts[task] = read_prompts(prompts_paths[task])[0]
        prompt = first_prompts[task]
        rollouts = pd.read_parquet(path, columns=_EXAMPLE_ROLLOUT)
        rollouts = rollouts[rollouts["prompt_id"].astype(str) == prompt.prompt_id]
        if rollouts.empty:
            raise ValueError(
                f"{path} holds no rollout of {task}'s first prompt {prompt.prompt_id!r}"
            )
        lengths = sorted(rollouts["n_steps"])
        median = lengths[(len(lengths) - 1) // 2]
        chosen = rollouts[rollouts["n_steps"] == median].sort_values("sample").iloc[0]
        rows.append(
            {
                "family": family,
                "variant": variant,
                "task": task,
                "prompt_id": prompt.prompt_id,
                "sample": int(chosen["sample"]),
                "n_steps": int(chosen["n_steps"]),
                "hit_eos": bool(chosen["hit_eos"]),
                "prompt": prompt.prompt,
                "text": str(chosen["text"]),
            }
        )
    return pd.DataFrame(rows, columns=list(EXAMPLE_COLUMNS))
