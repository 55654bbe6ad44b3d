"""Simulated analysis panels with known coefficients.

The statistics stage is checked against data whose generating model is known: a Beta response with
a logit mean that is linear in the standardised entropy rate (one slope per variant), a linear
effect of the standardised inverse length, task shifts, random prompt and family intercepts, and a
precision (glmmTMB's "dispersion") that varies by variant and task. Every term of the generating
model lies inside the model the paper fits (a linear function of ``invN_sc`` is in the span of
``ns(invN_sc, 4)`` plus the intercept), so a correct fit must recover the coefficients.

The panel has the columns of the real panel (docs/architecture.md), so the same code path is tested.
The true coefficients refer to ``R_sc`` and ``invN_sc`` standardised over the simulated panel, in
exactly the way :func:`canopy.stats.prepare_panel` standardises them.

Also here: :func:`simulate_rollouts`, small rollout tables and embeddings for the length-matched
reanalysis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["PanelTruth", "SimulatedPanel", "simulate_panel", "simulate_rollouts", "standardise"]

PAPER_FAMILIES = ("fam_a", "fam_b", "fam_c")
PAPER_TASKS = ("completion", "coding", "math", "stories")


def standardise(values: np.ndarray | pd.Series) -> np.ndarray:
    """(x - mean) / sd with the sample sd (ddof = 1), as R's ``scale()`` does."""
    array = np.asarray(values, dtype=float)
    sd = array.std(ddof=1)
    if not np.isfinite(sd) or sd == 0:
        raise ValueError("cannot standardise a constant (or too short) column")
    return (array - array.mean()) / sd


@dataclass(frozen=True)
class PanelTruth:
    """The generating coefficients (logit mean, log precision) and random-effect SDs."""

    intercept: float = -0.6
    slope_base: float = 0.25
    slope_finetuned: float = 0.70
    variant_finetuned: float = -0.30
    inv_length_base: float = -0.15
    inv_length_finetuned: float = -0.25
    #: task shifts of the logit mean, relative to the reference task (absent tasks get 0)
    task_effects: Mapping[str, float] = field(
        default_factory=lambda: {"coding": -0.20, "math": -0.40, "stories": 0.30}
    )
    prompt_sd: float = 0.35
    family_sd: float = 0.25
    #: log precision phi (glmmTMB's beta dispersion): intercept, fine-tuned shift, task shifts
    log_precision: float = 3.0
    log_precision_finetuned: float = 0.5
    log_precision_tasks: Mapping[str, float] = field(
        default_factory=lambda: {"coding": 0.3, "math": -0.3, "stories": 0.0}
    )

    @property
    def slope_ratio(self) -> float:
        return self.slope_finetuned / self.slope_base

    def conditional_coefficients(self, finetuned: str = "finetuned") -> dict[str, float]:
        """True values of the glmmTMB conditional terms that do not involve the spline."""
        out = {
            "(Intercept)": self.intercept,
            "R_sc": self.slope_base,
            f"variant{finetuned}": self.variant_finetuned,
            f"R_sc:variant{finetuned}": self.slope_finetuned - self.slope_base,
        }
        out.update({f"task{task}": value for task, value in self.task_effects.items()})
        return out


@dataclass(frozen=True)
class SimulatedPanel:
    panel: pd.DataFrame
    truth: PanelTruth


def simulate_panel(
    seed: int,
    *,
    families: Sequence[str] = PAPER_FAMILIES,
    tasks: Sequence[str] = PAPER_TASKS,
    n_prompts: int = 100,
    variants: Sequence[str] = ("base", "finetuned"),
    truth: PanelTruth | None = None,
    rollouts_per_prompt: int = 100,
    family_rate_sd: float = 0.1,
) -> SimulatedPanel:
    """Simulate a panel of ``len(families) x len(variants) x len(tasks) x n_prompts`` rows.

    Raw covariates look like the real ones: fine-tuned models have lower entropy rates and shorter
    outputs; rate and length are negatively correlated within a variant; each family shifts the
    rates of both its models by a draw with SD ``family_rate_sd``. ``D`` is drawn from
    Beta(mu * phi, (1 - mu) * phi) with logit(mu) and log(phi) given by ``truth``.
    """
    truth = truth or PanelTruth()
    rng = np.random.default_rng(seed)
    prompt_effect = {
        f"{task}/p{index:03d}": rng.normal(0.0, truth.prompt_sd)
        for task in tasks
        for index in range(n_prompts)
    }
    family_effect = {family: rng.normal(0.0, truth.family_sd) for family in families}
    # Each prompt has its own "difficulty" that moves rate and length for every model.
    prompt_rate = {uid: rng.normal(0.0, 0.25) for uid in prompt_effect}

    rows = []
    for family in families:
        family_rate = rng.normal(0.0, family_rate_sd) if family_rate_sd > 0 else 0.0
        for variant in variants:
            finetuned = variant != variants[0]
            for task in tasks:
                for index in range(n_prompts):
                    uid = f"{task}/p{index:03d}"
                    rate = (0.9 if finetuned else 1.6) + family_rate + prompt_rate[uid]
                    rate += rng.normal(0.0, 0.35 if finetuned else 0.45)
                    log_length = (4.3 if finetuned else 4.9) - 0.4 * (rate - 1.2)
                    log_length += rng.normal(0.0, 0.45)
                    rows.append(
                        {
                            "family": family,
                            "variant": variant,
                            "task": task,
                            "prompt_id": f"p{index:03d}",
                            "prompt_uid": uid,
                            "R": max(rate, 0.05),
                            "N": float(np.exp(log_length)) + 1.0,
                        }
                    )
    panel = pd.DataFrame(rows)
    r_sc = standardise(panel["R"])
    inv_n_sc = standardise(1.0 / panel["N"])
    is_ft = (panel["variant"] != variants[0]).to_numpy()
    task_shift = panel["task"].map(lambda t: truth.task_effects.get(t, 0.0)).to_numpy(float)
    eta = (
        truth.intercept
        + np.where(is_ft, truth.variant_finetuned, 0.0)
        + np.where(is_ft, truth.slope_finetuned, truth.slope_base) * r_sc
        + np.where(is_ft, truth.inv_length_finetuned, truth.inv_length_base) * inv_n_sc
        + task_shift
        + panel["prompt_uid"].map(prompt_effect).to_numpy(float)
        + panel["family"].map(family_effect).to_numpy(float)
    )
    log_phi = (
        truth.log_precision
        + np.where(is_ft, truth.log_precision_finetuned, 0.0)
        + panel["task"].map(lambda t: truth.log_precision_tasks.get(t, 0.0)).to_numpy(float)
    )
    mu = 1.0 / (1.0 + np.exp(-eta))
    phi = np.exp(log_phi)
    d = rng.beta(mu * phi, (1.0 - mu) * phi)

    m = rollouts_per_prompt
    panel["D"] = d
    # Secondary columns of the real panel, filled with plausible values derived from the above.
    panel["VS"] = 1.0 + d * (m - 1) * 0.5
    panel["log_VS"] = np.log(panel["VS"])
    panel["CE"] = panel["R"] * panel["N"]
    panel["rho"] = np.clip(rng.normal(-0.2, 0.2, len(panel)), -1, 1)
    panel["M"] = m
    panel["truncation_rate"] = 0.0
    order = [
        "family",
        "variant",
        "task",
        "prompt_id",
        "prompt_uid",
        "D",
        "VS",
        "log_VS",
        "R",
        "N",
        "CE",
        "rho",
        "M",
        "truncation_rate",
    ]
    return SimulatedPanel(panel=panel[order], truth=truth)


def simulate_rollouts(
    seed: int,
    *,
    families: Sequence[str] = ("fam_a", "fam_b"),
    tasks: Sequence[str] = ("completion", "math"),
    n_prompts: int = 12,
    n_rollouts: int = 40,
    dim: int = 16,
    length_shift: float = 0.5,
) -> tuple[
    dict[tuple[str, str, str], pd.DataFrame], dict[tuple[str, str, str], dict[str, np.ndarray]]
]:
    """Rollout tables and L2-normalised embeddings keyed by (family, variant, task).

    Fine-tuned rollouts are shorter (log length shifted by ``-length_shift``) and have lower
    rates. Each rollout's embedding is a prompt centre plus noise whose size grows with the
    rollout's entropy rate, so semantic dissimilarity rises with the rate in both variants.
    """
    rng = np.random.default_rng(seed)
    rollouts: dict[tuple[str, str, str], pd.DataFrame] = {}
    embeddings: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    centres = {(task, p): rng.normal(size=dim) for task in tasks for p in range(n_prompts)}
    for family in families:
        for variant in ("base", "finetuned"):
            ft = variant == "finetuned"
            for task in tasks:
                ids, samples, steps, sums, eos, vectors = [], [], [], [], [], []
                for p in range(n_prompts):
                    prompt_rate = rng.uniform(0.5, 2.0) * (0.6 if ft else 1.0)
                    log_len = rng.normal(4.0 - (length_shift if ft else 0.0), 0.6, n_rollouts)
                    n = np.maximum(np.round(np.exp(log_len)), 1).astype(np.int64)
                    rate = np.abs(prompt_rate + rng.normal(0.0, 0.2, n_rollouts))
                    noise = rng.normal(size=(n_rollouts, dim)) * (0.3 + rate)[:, None]
                    vec = centres[(task, p)][None, :] + noise
                    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
                    ids += [f"p{p:02d}"] * n_rollouts
                    samples += list(range(n_rollouts))
                    steps += list(n)
                    sums += list(rate * n)
                    eos += [True] * n_rollouts
                    vectors.append(vec.astype(np.float32))
                key = (family, variant, task)
                rollouts[key] = pd.DataFrame(
                    {
                        "prompt_id": ids,
                        "sample": np.asarray(samples, np.int64),
                        "n_steps": np.asarray(steps, np.int64),
                        "sum_entropy": np.asarray(sums),
                        "hit_eos": eos,
                    }
                )
                embeddings[key] = {
                    "prompt_id": np.asarray(ids),
                    "sample": np.asarray(samples, np.int64),
                    "embeddings": np.concatenate(vectors),
                }
    return rollouts, embeddings
