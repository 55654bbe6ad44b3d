"""The whole configuration: every block, and the checks across blocks (names that must name
other entries, paths that must exist)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from canopy.config.analysis import (
    DiversitySettings,
    EmbedderSettings,
    MetricSettings,
    StatsSettings,
)
from canopy.config.base import Block, Problem
from canopy.config.figures import FiguresSettings
from canopy.config.models import FamilySettings, TrainingSettings
from canopy.config.prompts import TaskSettings
from canopy.config.sampling import SamplingSettings

__all__ = ["Config", "cross_problems"]

#: Names of tasks, families, sampling points and embedders become folder names and wildcards.
EntryName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Config(Block):
    """The canopy-entropy configuration. Unknown keys are errors, so a typo fails before any job
    starts, naming the key."""

    seed: int = 42
    """Seed of prompt generation and shuffling."""
    tasks: Annotated[dict[EntryName, TaskSettings], Field(min_length=1)]
    """Prompt sets, one per task; the key is the task name."""
    families: Annotated[dict[EntryName, FamilySettings], Field(min_length=1)]
    """Model pairs; the key is the family name."""
    training: TrainingSettings = TrainingSettings()
    sampling: Annotated[dict[EntryName, SamplingSettings], Field(min_length=1)]
    """Sampling settings; each key is a sweep point and names a results folder."""
    metrics: MetricSettings = MetricSettings()
    embedders: Annotated[dict[EntryName, EmbedderSettings], Field(min_length=1)]
    """Sentence embedders; each key names a results folder."""
    diversity: DiversitySettings = DiversitySettings()
    stats: StatsSettings = StatsSettings()
    figures: FiguresSettings = FiguresSettings()

    def to_config(self) -> dict[str, Any]:
        """Plain values with every default filled in (what the workflow's rules read)."""
        values = super().to_config()
        values["tasks"] = {name: task.to_config() for name, task in self.tasks.items()}
        values["families"] = {name: fam.to_config() for name, fam in self.families.items()}
        return values


def cross_problems(config: Config) -> list[Problem]:
    """Problems a single block cannot see: keys naming other entries, local paths."""
    problems: list[Problem] = []
    recipes = config.training.recipes
    for name, family in config.families.items():
        for variant in ("base", "finetuned"):
            spec = getattr(family, variant)
            key = ["families", name, variant]
            if spec.source == "train" and spec.recipe not in recipes:
                problems.append(Problem([*key, "recipe"], spec.recipe,
                                        f"not a key of training.recipes (known: "
                                        f"{', '.join(recipes) or 'none'})"))  # fmt: skip
            if spec.source == "local" and not Path(spec.path).is_dir():
                problems.append(Problem([*key, "path"], spec.path,
                                        "not a directory; put the transformers model directory "
                                        "there (config.json, weights, tokenizer) or correct it"))  # fmt: skip
    sampled = [name for name, spec in config.sampling.items() if spec.filter is None]
    for name, spec in config.sampling.items():
        if spec.filter is not None and spec.filter.source not in sampled:
            problems.append(Problem(["sampling", name, "filter", "from"], spec.filter.source,
                                    f"must name a sampling entry that samples (not a filter): "
                                    f"one of {', '.join(sampled) or 'none'}"))  # fmt: skip
    tasks = list(config.tasks)
    if config.stats.reference_task not in tasks:
        problems.append(Problem(["stats", "reference_task"], config.stats.reference_task,
                                f"not a key of tasks (known: {', '.join(tasks)})"))  # fmt: skip
    for figure, settings in config.figures:
        for task in getattr(settings, "tasks", None) or ():
            if task not in tasks:
                problems.append(Problem(["figures", figure, "tasks"], task,
                                        f"not a key of tasks (known: {', '.join(tasks)})"))  # fmt: skip
    for name, embedder in config.embedders.items():
        model = embedder.model
        if not model.startswith("package:") and embedder.revision is None and not Path(model).exists():
            problems.append(Problem(["embedders", name, "model"], model,
                                    "neither a local directory nor a packaged model "
                                    "(package:<module>); for a hub model add "
                                    f"embedders.{name}.revision (a commit SHA, or a branch such "
                                    "as main) and the download_embedder rule fetches it"))  # fmt: skip
    return problems
