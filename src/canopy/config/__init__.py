"""One definition of the configuration: a pydantic model per block.

The library's settings objects (``StatsSettings``, ``SamplingSettings``, ``Recipe``, the figure
settings, ...) are these models, re-exported by the modules that use them: a notebook builds one
with ``Settings(**values)`` or ``Settings.from_config(block)``, the workflow validates the whole
file with :func:`validate_config` before any job, and the JSON schema in
``workflow/schemas/config.schema.yaml`` is generated from them (``python -m canopy.config.schema``).
Importing this package loads pydantic only (the Snakefile validates at start-up).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from canopy.config.analysis import (
    BootstrapSettings,
    DiversitySettings,
    EmbedderSettings,
    MetricSettings,
    RobustnessSettings,
    SemanticEntropySettings,
    StatsSettings,
)
from canopy.config.base import Block, ConfigError, Problem, format_key, problems_from, render
from canopy.config.figures import FigureSettings, FiguresSettings
from canopy.config.models import CorpusSettings, FamilySettings, Recipe, TrainingSettings
from canopy.config.prompts import FewShotSettings, TaskSettings
from canopy.config.root import Config, cross_problems
from canopy.config.sampling import FilterSettings, SamplingSettings

__all__ = [
    "Block",
    "BootstrapSettings",
    "Config",
    "ConfigError",
    "CorpusSettings",
    "DiversitySettings",
    "EmbedderSettings",
    "FamilySettings",
    "FewShotSettings",
    "FigureSettings",
    "FiguresSettings",
    "FilterSettings",
    "MetricSettings",
    "Problem",
    "Recipe",
    "RobustnessSettings",
    "SamplingSettings",
    "SemanticEntropySettings",
    "StatsSettings",
    "TaskSettings",
    "TrainingSettings",
    "format_key",
    "validate_config",
]

#: Given a problem's key path, the workflow rules that read it.
Readers = Callable[[Sequence[Any]], Sequence[str]]


def validate_config(config: Mapping[str, Any], readers: Readers | None = None) -> dict[str, Any]:
    """Validate a whole configuration; return it as plain values with every default filled in.

    Raises :class:`ConfigError` listing every problem (each block's own and those across blocks),
    each naming its key, its value, what is allowed and, with ``readers``, the rules reading it.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"the configuration must be a mapping, got {type(config).__name__}")
    problems = []
    try:
        model = Config.model_validate(dict(config))
    except ValidationError as error:
        problems = problems_from(error)
    seen = {problem.key for problem in problems}
    problems += [problem for problem in cross_problems(config) if problem.key not in seen]
    if problems:
        raise ConfigError(render(problems, readers), problems)
    return model.to_config()
