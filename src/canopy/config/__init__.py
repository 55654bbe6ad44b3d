"""One definition of the configuration: a pydantic model per block.

The library's settings objects (``StatsSettings``, ``SamplingSettings``, ``Recipe``, the figure
settings, ...) are these models, re-exported by the modules that use them: a notebook builds one
with ``Settings(**values)`` or ``Settings.from_config(block)``, the workflow validates the whole
file with :func:`validate_config` before any job, and the JSON schema in
``workflow/schemas/config.schema.yaml`` is generated from them (``python -m canopy.config.schema``).
Importing this package loads pydantic only, and each block's models when first used (the
Snakefile validates at start-up; every job imports the block it reads). The names the whole
experiment shares (``VARIANTS``, ``CHAT_OPTION_KEYS``, ``PACKAGE_PREFIX``) are defined in
:mod:`canopy.config.constants` and exported here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from canopy.config.base import Block, ConfigError, Problem, format_key, render
from canopy.config.constants import CHAT_OPTION_KEYS, PACKAGE_PREFIX, VARIANTS

if TYPE_CHECKING:
    from canopy.config.analysis import (
        BootstrapSettings,
        DiversitySettings,
        EmbedderSettings,
        MetricSettings,
        RobustnessSettings,
        SemanticEntropySettings,
        StatsSettings,
    )
    from canopy.config.figures import FigureSettings, FiguresSettings
    from canopy.config.families import FamilySettings
    from canopy.config.models import CorpusSettings, Recipe, TrainingSettings
    from canopy.config.prompts import FewShotSettings, TaskSettings
    from canopy.config.root import Config, SweepsSettings
    from canopy.config.sampling import FilterSettings, SamplingSettings

#: Where each model is defined. Loaded on first use: a job that validates one block (stats.py
#: importing canopy.config.analysis) then builds only that module's models, not every block's.
_HOMES = {
    **dict.fromkeys(
        ["BootstrapSettings", "DiversitySettings", "EmbedderSettings", "MetricSettings",
         "RobustnessSettings", "SemanticEntropySettings", "StatsSettings"],
        "analysis",
    ),
    **dict.fromkeys(["FigureSettings", "FiguresSettings"], "figures"),
    "FamilySettings": "families",
    **dict.fromkeys(["CorpusSettings", "Recipe", "TrainingSettings"], "models"),
    **dict.fromkeys(["FewShotSettings", "TaskSettings"], "prompts"),
    **dict.fromkeys(["FilterSettings", "SamplingSettings"], "sampling"),
    **dict.fromkeys(["Config", "SweepsSettings"], "root"),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"canopy.config.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Block",
    "BootstrapSettings",
    "CHAT_OPTION_KEYS",
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
    "PACKAGE_PREFIX",
    "Problem",
    "Recipe",
    "RobustnessSettings",
    "SamplingSettings",
    "SweepsSettings",
    "SemanticEntropySettings",
    "StatsSettings",
    "TaskSettings",
    "TrainingSettings",
    "VARIANTS",
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
    from pydantic import ValidationError

    from canopy.config.base import problems_from
    from canopy.config.root import Config, cross_problems

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
