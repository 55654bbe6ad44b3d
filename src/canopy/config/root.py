"""The whole configuration: every block, and the checks across blocks (names that must name
other entries, paths that must exist)."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from canopy.config.analysis import (
    DiversitySettings,
    EmbedderSettings,
    MetricSettings,
    StatsSettings,
)
from canopy.config.base import Block, Problem, as_tuple
from canopy.config.families import FamilySettings
from canopy.config.figures import FiguresSettings
from canopy.config.models import TrainingSettings
from canopy.config.prompts import TaskSettings
from canopy.config.sampling import SamplingSettings
from canopy.config.types import distinct

__all__ = ["Config", "SweepsSettings", "cross_problems"]

#: Names of tasks, families, sampling points and embedders become folder names and wildcards.
EntryName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class SweepsSettings(Block):
    """``sweeps``: which (sampling point, embedder) pairs are analysed (a panel, a regression and
    a row of the ablation summary each), and on which tasks. The main setting is the first
    sampling point with the first embedder."""

    where = "sweeps"

    design: Literal["grid", "one_at_a_time"] = "grid"
    """grid: every pair. one_at_a_time: every sampling point with the first embedder, and every
    further embedder with the first sampling point, so that each sweep point differs from the
    main setting in one thing and costs one regression."""
    tasks: (
        Annotated[
            tuple[EntryName, ...],
            Field(min_length=2),
            BeforeValidator(as_tuple),
            AfterValidator(distinct),
        ]
        | None
    ) = None
    """The tasks every pair but the main setting is sampled, embedded and fitted on (null: every
    task). Must contain stats.reference_task: a cheaper sweep, at the price of comparing sweep
    points on fewer tasks than the main setting."""

    checks: Literal["main", "every_pair"] = "main"
    """Which pairs get the residual diagnostics, the robustness refits (stats.robustness) and
    the residual figure: main, the main setting only (a sweep point's row of the ablation summary
    needs only its regression); every_pair, each analysed pair."""


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
    sweeps: SweepsSettings = SweepsSettings()
    stats: StatsSettings = StatsSettings()
    figures: FiguresSettings = FiguresSettings()

    def to_config(self) -> dict[str, Any]:
        """Plain values with every default filled in (what the workflow's rules read)."""
        values = super().to_config()
        values["tasks"] = {name: task.to_config() for name, task in self.tasks.items()}
        values["families"] = {name: fam.to_config() for name, fam in self.families.items()}
        return values


def _entries(value: Any) -> dict[str, Any]:
    """A block of named entries as a dict of mappings (anything malformed is left to the models)."""
    if not isinstance(value, Mapping):
        return {}
    return {name: entry for name, entry in value.items() if isinstance(entry, Mapping)}


def cross_problems(config: Mapping[str, Any]) -> list[Problem]:
    """Problems a single block cannot see: keys naming other entries, local paths. Reads the raw
    mapping defensively, so that they are listed together with the blocks' own problems."""
    problems: list[Problem] = []
    tasks = list(_entries(config.get("tasks")))
    training = config.get("training") if isinstance(config.get("training"), Mapping) else {}
    recipe_tables = {
        "train": ("training.recipes", _entries(training.get("recipes"))),
        "finetune": ("training.finetunes", _entries(training.get("finetunes"))),
    }
    for name, family in _entries(config.get("families")).items():
        for variant in ("base", "finetuned"):
            spec = family.get(variant)
            if not isinstance(spec, Mapping):
                continue
            key = ["families", name, variant]
            table, recipes = recipe_tables.get(spec.get("source"), (None, {}))
            if table is not None and "recipe" in spec and spec["recipe"] not in recipes:
                problems.append(Problem([*key, "recipe"], spec["recipe"],
                                        f"not a key of {table} (known: "
                                        f"{', '.join(recipes) or 'none'})"))  # fmt: skip
            for task in _entries(spec.get("per_task")):
                if tasks and task not in tasks:
                    problems.append(Problem([*key, "per_task", task], task,
                                            f"not a key of tasks (known: "
                                            f"{', '.join(tasks)})"))  # fmt: skip
            path = spec.get("path")
            if spec.get("source") == "local" and isinstance(path, str) and not Path(path).is_dir():
                problems.append(Problem([*key, "path"], path,
                                        "not a directory; put the transformers model directory "
                                        "there (config.json, weights, tokenizer) or correct it"))  # fmt: skip
    sampling = _entries(config.get("sampling"))
    sampled = [name for name, spec in sampling.items() if not spec.get("filter")]
    for name, spec in sampling.items():
        source = (
            spec.get("filter", {}).get("from") if isinstance(spec.get("filter"), Mapping) else None
        )
        if source is not None and source not in sampled:
            problems.append(Problem(["sampling", name, "filter", "from"], source,
                                    f"must name a sampling entry that samples (not a filter): "
                                    f"one of {', '.join(sampled) or 'none'}"))  # fmt: skip
    stats = config.get("stats") if isinstance(config.get("stats"), Mapping) else {}
    reference = stats.get("reference_task", Config.model_fields["stats"].default.reference_task)
    if tasks and reference not in tasks:
        problems.append(Problem(["stats", "reference_task"], reference,
                                f"not a key of tasks (known: {', '.join(tasks)})"))  # fmt: skip
    sweeps = config.get("sweeps") if isinstance(config.get("sweeps"), Mapping) else {}
    swept = sweeps.get("tasks")
    if isinstance(swept, list) and tasks:
        unknown = [task for task in swept if task not in tasks]
        if unknown:
            problems.append(Problem(["sweeps", "tasks"], swept,
                                    f"{', '.join(map(str, unknown))} not a key of tasks "
                                    f"(known: {', '.join(tasks)})"))  # fmt: skip
        elif reference not in swept:
            problems.append(Problem(["sweeps", "tasks"], swept,
                                    f"must contain stats.reference_task ({reference}), the task "
                                    "every regression compares the others with"))  # fmt: skip
    for figure, settings in _entries(config.get("figures")).items():
        chosen = settings.get("tasks")
        for task in chosen if isinstance(chosen, list) else ():
            if tasks and task not in tasks:
                problems.append(Problem(["figures", figure, "tasks"], task,
                                        f"not a key of tasks (known: {', '.join(tasks)})"))  # fmt: skip
    for name, embedder in _entries(config.get("embedders")).items():
        model = embedder.get("model")
        local = isinstance(model, str) and not model.startswith("package:")
        if local and not embedder.get("revision") and not Path(model).exists():
            problems.append(Problem(["embedders", name, "model"], model,
                                    "neither a local directory nor a packaged model "
                                    "(package:<module>); for a hub model add "
                                    f"embedders.{name}.revision (a commit SHA, or a branch such "
                                    "as main) and the download_embedder rule fetches it"))  # fmt: skip
    return problems
