"""The prompt stage: each task's prompts from its configured source, written to a prompt file.

* :mod:`~canopy.prompts.records` — :class:`Prompt`, the prompt file (read and written here only)
  and the seeded random streams;
* :mod:`~canopy.prompts.sources` — the source dispatch (``humaneval``, ``generated``, ``jsonl``,
  ``hub``), key checks, few-shot prefixes and the provenance record of a source;
* :mod:`~canopy.prompts.humaneval` — the HumanEval rewrite;
* :mod:`~canopy.prompts.generators` — the arithmetic, creative-problem and scene generators, whose
  word lists are the package data files ``canopy/prompts/data/*.json``.
"""

from canopy.prompts.generators import (
    GENERATORS,
    PAPER_CREATIVE_TEMPLATE,
    ArithmeticProblem,
    CreativeProblem,
    EverydayScene,
    arithmetic_problem,
    creative_problem,
    everyday_scene,
)
from canopy.prompts.humaneval import humaneval_instruction, load_humaneval_problems
from canopy.prompts.records import (
    Prompt,
    PromptSourceError,
    derived_rng,
    read_prompts,
    write_prompts,
)
from canopy.prompts.sources import (
    SOURCE_KEYS,
    SOURCES,
    prepare_prompts,
    prompt_source_record,
)

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
