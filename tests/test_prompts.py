"""canopy.prompts: prompt sources, the generators, and the prompt files.

The generators are checked for determinism and variety, and their worked arithmetic is checked
against Python's own arithmetic; HumanEval is read from the installed package; the hub source is
run for real with HF_HUB_OFFLINE=1 (in a subprocess, so the hub libraries read that setting at
import) and must fail with the actionable error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from canopy.config import ConfigError
from canopy.prompts import (
    PAPER_CREATIVE_TEMPLATE,
    SOURCE_KEYS,
    Prompt,
    PromptSourceError,
    arithmetic_problem,
    derived_rng,
    load_humaneval_problems,
    humaneval_instruction,
    prepare_prompts,
    read_prompts,
    write_prompts,
)

GENERATORS = ["arithmetic", "stories", "completion"]


def generated(generator: str, n: int, seed: int = 42, task: str = "t", **extra) -> list[Prompt]:
    return prepare_prompts(
        task, {"source": "generated", "generator": generator, "n_prompts": n, **extra}, seed=seed
    )


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generator", GENERATORS)
def test_generators_are_deterministic_and_nested(generator: str) -> None:
    first = generated(generator, 40)
    again = generated(generator, 40)
    assert first == again
    # A longer request extends a shorter one, so raising n_prompts keeps the earlier prompts.
    assert generated(generator, 15) == first[:15]
    assert [p.prompt_id for p in first[:3]] == [
        f"{generator}-0000",
        f"{generator}-0001",
        f"{generator}-0002",
    ]
    assert all(p.task == "t" and p.source == f"generated:{generator}" for p in first)


@pytest.mark.parametrize("generator", GENERATORS)
def test_generators_depend_on_seed_and_task(generator: str) -> None:
    base = [p.prompt for p in generated(generator, 20)]
    other_seed = [p.prompt for p in generated(generator, 20, seed=43)]
    other_task = [p.prompt for p in generated(generator, 20, task="u")]
    assert len(set(base) & set(other_seed)) < 5
    assert len(set(base) & set(other_task)) < 5


@pytest.mark.parametrize("generator", GENERATORS)
def test_generators_are_varied(generator: str) -> None:
    prefix = PAPER_CREATIVE_TEMPLATE.split("{text}")[0]
    prompts = [p.prompt.removeprefix(prefix) for p in generated(generator, 400)]
    assert len(set(prompts)) == 400
    # Variety beyond one template: many different openings, endings and lengths.
    openings = {" ".join(p.split()[:6]) for p in prompts}
    endings = {" ".join(p.split()[-6:]) for p in prompts}
    assert len(openings) >= 20 and len(endings) >= 20
    assert len(openings) * len(endings) > 2000
    assert len({len(p.split()) for p in prompts}) > 10


def test_stories_get_the_paper_instruction_unless_a_template_is_given() -> None:
    default = generated("stories", 3)
    assert all(p.prompt.startswith(PAPER_CREATIVE_TEMPLATE.split("{text}")[0]) for p in default)
    custom = generated("stories", 3, template="Problem: {text}\nSolution:")
    problem = default[0].prompt[len(PAPER_CREATIVE_TEMPLATE.split("{text}")[0]) :]
    assert custom[0].prompt == f"Problem: {problem}\nSolution:"


def test_completion_contexts_end_mid_sentence() -> None:
    for prompt in generated("completion", 50):
        assert not prompt.prompt.endswith("."), prompt.prompt
        assert ": " in prompt.prompt  # "Activity: scene ..." as HellaSwag's ctx with its label


_EQUATION = re.compile(r"((?:\$?\d+ [x+\-/] )+\$?\d+) = \$?(\d+)")
_PERCENT = re.compile(r"(\d+)% of \$(\d+) = \$(\d+)")


def _check_worked_solution(solution: str, answer: int) -> int:
    """Check every 'a op b ... = c' of a solution with Python's arithmetic; return how many."""
    checked = 0
    for left, right in _EQUATION.findall(solution):
        expression = left.replace("$", "").replace(" x ", " * ").replace(" / ", " // ")
        assert eval(expression) == int(right), (
            left,
            right,
            solution,
        )  # noqa: S307 - digits and operators only
        if "/" in left:
            numbers = [int(n) for n in re.findall(r"\d+", left)]
            assert numbers[0] % numbers[1] == 0, solution
        checked += 1
    for percent, whole, part in _PERCENT.findall(solution):
        assert int(percent) * int(whole) == 100 * int(part), solution
        checked += 1
    assert solution.endswith(f"The answer is {answer}.")
    return checked


def test_arithmetic_solutions_are_correct() -> None:
    rng = derived_rng(0, "test")
    for _ in range(500):
        problem = arithmetic_problem(rng)
        assert _check_worked_solution(problem.solution, problem.answer) >= 2
        assert problem.answer > 0
        assert problem.question.endswith("?")


# ---------------------------------------------------------------------------------------------
# HumanEval
# ---------------------------------------------------------------------------------------------


def test_humaneval_loads_offline_and_builds_instructions() -> None:
    problems = load_humaneval_problems()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    for problem in problems:
        instruction = humaneval_instruction(problem)
        assert f"def {problem['entry_point']}(" in instruction
        assert "You should write self-contained code starting with:\n```\n" in instruction
        assert instruction.endswith("\n```")
        # The description is the docstring: its first words appear before the code block.
        head, code = instruction.split("You should write self-contained code starting with:")
        # The entry point's docstring moved out of the code block (helpers keep theirs).
        first_line = head.strip().splitlines()[0]
        assert first_line and first_line not in code


def test_humaneval_selection_is_a_seeded_permutation() -> None:
    spec = {"source": "humaneval", "n_prompts": 12}
    first = prepare_prompts("coding", spec, seed=1)
    assert first == prepare_prompts("coding", spec, seed=1)
    assert [p.prompt_id for p in first] != [
        p.prompt_id for p in prepare_prompts("coding", spec, seed=2)
    ]
    assert prepare_prompts("coding", {**spec, "n_prompts": 5}, seed=1) == first[:5]
    everything = prepare_prompts("coding", {**spec, "n_prompts": 164}, seed=1)
    assert len({p.prompt_id for p in everything}) == 164
    with pytest.raises(PromptSourceError, match=r"tasks\.coding\.n_prompts.*164"):
        prepare_prompts("coding", {**spec, "n_prompts": 165}, seed=1)


def test_humaneval_prompts_carry_their_code_prompt_as_the_document(tmp_path: Path) -> None:
    """A base framed with prompt_template "{document}" continues HumanEval's own code prompt;
    prompts of other sources carry none, and their files do not change."""
    from canopy.modeling import format_prompt
    from canopy.prompts import read_prompts, write_prompts
    from support.models import build_tokenizer

    problems = {p["task_id"]: p["prompt"] for p in load_humaneval_problems()}
    coding = prepare_prompts("coding", {"source": "humaneval", "n_prompts": 3}, seed=1)
    assert [p.document for p in coding] == [problems[p.prompt_id] for p in coding]
    write_prompts(coding, tmp_path / "coding.jsonl")
    assert read_prompts(tmp_path / "coding.jsonl") == coding
    math = prepare_prompts("math", {"source": "generated", "generator": "arithmetic",
                                    "n_prompts": 2}, seed=1)  # fmt: skip
    assert all(p.document is None for p in math)
    write_prompts(math, tmp_path / "math.jsonl")
    assert all("document" not in json.loads(line) for line in open(tmp_path / "math.jsonl"))
    tokenizer = build_tokenizer()
    framed = format_prompt(
        tokenizer, "the cat", "base", prompt_template="{document} and", document="a dog"
    )
    assert framed == tokenizer("a dog and")["input_ids"]
    with pytest.raises(ValueError, match=r"prompt 'm1'.*uses \{document\}.*no document"):
        format_prompt(tokenizer, "the cat", "base", prompt_id="m1", prompt_template="{document}")


# ---------------------------------------------------------------------------------------------
# jsonl
# ---------------------------------------------------------------------------------------------


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_source_keeps_file_order_ids_and_template(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"q": f"question {i}", "key": f"k{i}"} for i in range(6)])
    spec = {"source": "jsonl", "path": str(path), "field": "q", "n_prompts": 4}
    prompts = prepare_prompts("math", spec, seed=0)
    assert [p.prompt for p in prompts] == [f"question {i}" for i in range(4)]
    assert [p.prompt_id for p in prompts] == ["0", "1", "2", "3"]
    keyed = prepare_prompts(
        "math", {**spec, "id_field": "key", "template": "Q: {text}\nA:"}, seed=0
    )
    assert [p.prompt_id for p in keyed] == ["k0", "k1", "k2", "k3"]
    assert keyed[1].prompt == "Q: question 1\nA:"
    assert keyed[0].source == f"jsonl:{path}"


def test_jsonl_source_errors_name_the_problem(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"q": "a"}, {"text": "b"}])
    spec = {"source": "jsonl", "path": str(path), "field": "q", "n_prompts": 2}
    with pytest.raises(PromptSourceError, match=r"tasks\.math\.field.*p\.jsonl:2"):
        prepare_prompts("math", spec, seed=0)
    with pytest.raises(PromptSourceError, match=r"n_prompts is 5.*only 1"):
        prepare_prompts(
            "math",
            {**spec, "path": str(_jsonl(tmp_path / "one.jsonl", [{"q": "a"}])), "n_prompts": 5},
            seed=0,
        )
    with pytest.raises(PromptSourceError, match=r"tasks\.math\.path .*does not exist"):
        prepare_prompts("math", {**spec, "path": str(tmp_path / "missing.jsonl")}, seed=0)
    duplicate = _jsonl(tmp_path / "dup.jsonl", [{"q": "a", "i": 1}, {"q": "b", "i": 1}])
    with pytest.raises(PromptSourceError, match=r"prompt id '1' occurs twice"):
        prepare_prompts("math", {**spec, "path": str(duplicate), "id_field": "i"}, seed=0)


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"source": "generated", "generator": "arithmetic", "n_prompts": 3, "path": "x"},
            r"tasks\.math\.path = 'x': not used by source generated",
        ),
        (
            {"source": "humaneval", "n_prompts": 3, "field": "q"},
            r"tasks\.math\.field = 'q': not used by source humaneval",
        ),
        (
            {"source": "hub", "dataset": "d", "split": "train", "field": "q", "n_prompts": 3},
            r"tasks\.math\.revision = None: required by source hub",
        ),
        (
            {"source": "generated", "n_prompts": 3},
            r"tasks\.math\.generator = None: required by source generated",
        ),
        (
            {"source": "generated", "generator": "poems", "n_prompts": 3},
            r"tasks\.math\.generator = 'poems': Input should be 'arithmetic'",
        ),
        (
            {"source": "web", "n_prompts": 3},
            r"tasks\.math\.source = 'web': Input should be 'humaneval'",
        ),
        (
            {"source": "humaneval", "n_prompts": 0},
            r"tasks\.math\.n_prompts = 0: Input should be greater than or equal to 1",
        ),
        (
            {"source": "humaneval", "n_prompts": 2, "template": "no field"},
            r"tasks\.math\.template = 'no field': must contain \{text\}",
        ),
        (
            {"source": "humaneval", "n_prompts": 2, "template": "{txt}"},
            r"tasks\.math\.template = '\{txt\}': must contain \{text\}",
        ),
        (
            {"source": "humaneval", "n_prompts": 2, "template": "{text"},
            r"tasks\.math\.template = '\{text': not a valid format string",
        ),
    ],
)
def test_bad_keys_are_named(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        prepare_prompts("math", spec, seed=0)


def test_source_keys_table_is_what_prepare_prompts_accepts() -> None:
    assert set(SOURCE_KEYS) == {"humaneval", "generated", "jsonl", "hub"}
    assert SOURCE_KEYS["hub"] == (("dataset", "revision", "split", "field"), ("config", "id_field"))


# ---------------------------------------------------------------------------------------------
# hub, offline
# ---------------------------------------------------------------------------------------------


def test_hub_source_offline_raises_the_actionable_error(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        from canopy.prompts import PromptSourceError, prepare_prompts
        spec = {"source": "hub", "dataset": "openai/gsm8k", "config": "main", "revision": "main",
                "split": "train", "field": "question", "n_prompts": 3}
        try:
            prepare_prompts("math", spec, seed=0)
        except PromptSourceError as error:
            print("ERROR:", error)
        else:
            print("LOADED")
        """)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache: nothing to fall back on
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert message.startswith("ERROR:"), message
    for expected in (
        "tasks.math",
        "openai/gsm8k",
        "HF_HUB_OFFLINE",
        "source: jsonl",
        "field: question",
    ):
        assert expected in message, (expected, message)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_write_and_read_prompts_round_trip(tmp_path: Path) -> None:
    prompts = generated("completion", 5) + [Prompt("x/1", "t", 'ünïcode "quoted"\nline', "jsonl:a")]
    path = tmp_path / "sub" / "t.jsonl"
    write_prompts(prompts, path)
    assert read_prompts(path) == prompts
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.jsonl"]  # no temporary left behind
    lines = path.read_text().splitlines()
    assert set(json.loads(lines[0])) == {"prompt_id", "task", "prompt", "source"}
    path.write_text(lines[0] + "\n{broken\n")
    with pytest.raises(PromptSourceError, match=r"t\.jsonl:2"):
        read_prompts(path)


# ---------------------------------------------------------------------------------------------
# Few-shot variants


def test_few_shot_prefix_is_reproducible_and_never_a_prompt():
    spec = {"source": "generated", "generator": "arithmetic", "n_prompts": 6, "few_shot": {"k": 2}}
    shots = prepare_prompts("math_fewshot", spec, seed=42)
    plain = prepare_prompts("math_fewshot", {**spec, "few_shot": None}, seed=42)
    assert shots == prepare_prompts("math_fewshot", spec, seed=42)
    questions = {p.prompt for p in plain}
    prefixes = set()
    for shot, base in zip(shots, plain):
        # The same prompts, each after the same two worked examples, in the query format.
        assert shot.prompt.endswith("\n\nQuestion: " + base.prompt + "\nAnswer:")
        prefix = shot.prompt[: -len("\n\nQuestion: " + base.prompt + "\nAnswer:")]
        prefixes.add(prefix)
        assert prefix.count("Question: ") == 2 and prefix.count("The answer is") == 2
        for block in prefix.split("\n\n"):
            assert block.split("\n")[0].removeprefix("Question: ") not in questions
        assert shot.source == "generated:arithmetic+2shot"
    assert len(prefixes) == 1
    other = prepare_prompts("math_fewshot", {**spec, "few_shot": {"k": 2, "seed": 7}}, seed=42)
    assert other[0].prompt != shots[0].prompt


def test_few_shot_examples_take_the_task_template():
    spec = {
        "source": "generated",
        "generator": "stories",
        "n_prompts": 1,
        "few_shot": {"k": 1, "example": "{question}\n=> {answer}", "query": "{text}\n=>"},
    }
    prompt = prepare_prompts("stories_fewshot", spec, seed=1)[0].prompt
    assert prompt.count(PAPER_CREATIVE_TEMPLATE.split("{text}")[0]) == 2
    assert prompt.endswith("\n=>") and "\n=> " in prompt


@pytest.mark.parametrize(
    "few_shot, message",
    [
        ({"k": 0}, r"tasks\.t\.few_shot\.k = 0: Input should be greater than or equal to 1"),
        (
            {"k": 1, "shots": 2},
            r"tasks\.t\.few_shot\.shots = 2: unknown key; allowed here: k, seed",
        ),
        (
            {"k": 1, "example": "{question}"},
            r"tasks\.t\.few_shot\.example = '\{question\}': must contain \{question\}, \{answer\}",
        ),
        (
            {"k": 1, "query": "{prompt}"},
            r"tasks\.t\.few_shot\.query = '\{prompt\}': must contain \{text\}",
        ),
    ],
)
def test_few_shot_settings_are_checked(few_shot, message):
    spec = {"source": "generated", "generator": "arithmetic", "n_prompts": 1, "few_shot": few_shot}
    with pytest.raises(ConfigError, match=message):
        prepare_prompts("t", spec, seed=1)


def test_few_shot_needs_worked_answers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"q": "one"}\n{"q": "two"}\n')
    spec = {
        "source": "jsonl",
        "path": str(path),
        "field": "q",
        "n_prompts": 1,
        "few_shot": {"k": 1},
    }
    with pytest.raises(PromptSourceError, match=r"tasks\.t\.few_shot needs worked answers"):
        prepare_prompts("t", spec, seed=1)


def test_few_shot_from_a_hub_split_skips_the_prompts(tmp_path):
    """A data set in the hub layout (parquet under data/), loaded by `datasets` as a hub source
    would be: the examples come from its train split with their answers, never a prompt."""
    import pandas as pd

    (tmp_path / "data").mkdir()
    questions = [f"question number {i}?" for i in range(12)]
    pd.DataFrame({"question": questions, "answer": [f"answer {i}" for i in range(12)]}).to_parquet(
        tmp_path / "data" / "train-00000-of-00001.parquet"
    )
    spec = {
        "source": "hub",
        "dataset": str(tmp_path),
        "revision": "main",
        "split": "train",
        "field": "question",
        "n_prompts": 8,
        "few_shot": {"k": 3, "answer_field": "answer"},
    }
    prompts = prepare_prompts("math_fewshot", spec, seed=3)
    blocks = prompts[0].prompt.split("\n\n")[:-1]
    assert len(blocks) == 3
    for block in blocks:
        question, answer = block.split("\n")
        index = questions.index(question.removeprefix("Question: "))
        assert index >= 8 and answer == f"Answer: answer {index}"
    with pytest.raises(PromptSourceError, match=r"few_shot\.answer_field is required"):
        prepare_prompts("m", {**spec, "few_shot": {"k": 1}}, seed=3)
    with pytest.raises(PromptSourceError, match=r"few_shot\.k = 5, but only 4 examples"):
        prepare_prompts("m", {**spec, "few_shot": {"k": 5, "answer_field": "answer"}}, seed=3)
