"""canopy.training.corpus: determinism, coverage of the four task kinds, correctness of the
generated code and arithmetic (checked by running it), settings and files."""

from __future__ import annotations

import ast
import doctest
import re
from pathlib import Path

import pytest

from canopy.config import ConfigError
from canopy.training.corpus import (
    CorpusError,
    CorpusSettings,
    pretraining_documents,
    python_function,
    read_corpus,
    sft_pairs,
    write_corpus,
)
from canopy.prompts import PAPER_CREATIVE_TEMPLATE, derived_rng

CREATIVE_PREFIX = PAPER_CREATIVE_TEMPLATE.split("{text}")[0]
CODE_MARK = "You should write self-contained code starting with:"


def kind_of_instruction(instruction: str) -> str:
    if instruction.startswith(CREATIVE_PREFIX):
        return "stories"
    if CODE_MARK in instruction:
        return "coding"
    if re.match(r"^[A-Z][a-z]+(?: [a-z]+)*: ", instruction) and not instruction.endswith(
        (".", "?")
    ):
        return "completion"
    if instruction.endswith("?"):
        return "math"
    return "other"


def test_documents_and_pairs_are_deterministic_for_a_seed() -> None:
    assert pretraining_documents(50, 3) == pretraining_documents(50, 3)
    assert sft_pairs(40, 3) == sft_pairs(40, 3)
    assert pretraining_documents(50, 3) != pretraining_documents(50, 4)
    assert sft_pairs(40, 3) != sft_pairs(40, 4)


def test_pairs_cover_the_four_task_kinds_evenly() -> None:
    pairs = sft_pairs(200, 0)
    kinds = [kind_of_instruction(instruction) for instruction, _ in pairs]
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "math": 50,
        "stories": 50,
        "completion": 50,
        "coding": 50,
    }
    for (instruction, response), kind in zip(pairs, kinds, strict=True):
        assert response.strip() == response and response
        if kind == "math":
            assert re.search(r"The answer is \d+\.$", response)
        if kind == "coding":
            code = response.split("```python\n", 1)[1].rsplit("```", 1)[0]
            ast.parse(code)  # the answer is valid Python
            signature = instruction.split("```\n", 1)[1].rsplit("\n```", 1)[0].splitlines()[-1]
            assert signature in code


def test_documents_mix_the_task_kinds() -> None:
    documents = pretraining_documents(600, 1)
    assert len(set(documents)) > 550
    counts = {
        "math": sum(bool(re.search(r"The answer is \d+\.$", d)) for d in documents),
        "stories": sum("First, take" in d for d in documents),
        "code": sum("def " in d for d in documents),
        "scenes": sum(bool(re.match(r"^[A-Z][a-z]+(?: [a-z]+)*: (A|An) ", d)) for d in documents),
    }
    assert all(count > 60 for count in counts.values()), counts
    # Creative problems appear with and without the paper's instruction in front.
    with_instruction = sum(d.startswith(CREATIVE_PREFIX) for d in documents)
    assert 0 < with_instruction < counts["stories"]


def test_generated_functions_pass_their_own_doctests() -> None:
    rng = derived_rng(5, "test-functions")
    names = set()
    for index in range(150):
        function = python_function(rng)
        names.add(function.name)
        namespace: dict = {}
        exec(function.source, namespace)  # noqa: S102 - the generator's own code
        parser = doctest.DocTestParser()
        test = parser.get_doctest(
            namespace[function.name].__doc__, namespace, function.name, None, 0
        )
        assert test.examples, function.source
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        runner.run(test, out=lambda _: None)
        assert runner.failures == 0, function.source
    assert len(names) > 30


def test_settings_reject_unknown_and_bad_keys() -> None:
    assert CorpusSettings.from_config({}) == CorpusSettings()
    assert (
        CorpusSettings.from_config({"pretrain_documents": 10, "seed": 1}).pretrain_documents == 10
    )
    with pytest.raises(ConfigError, match=r"training\.corpus\.documents = 3: unknown key"):
        CorpusSettings.from_config({"documents": 3})
    with pytest.raises(
        ConfigError, match=r"training\.corpus\.sft_pairs = 0: Input should be greater"
    ):
        CorpusSettings.from_config({"sft_pairs": 0})
    with pytest.raises(
        ConfigError, match=r"training\.corpus\.seed = 'x': Input should be a valid integer"
    ):
        CorpusSettings.from_config({"seed": "x"})


def test_write_and_read_corpus(tmp_path: Path) -> None:
    settings = CorpusSettings(pretrain_documents=30, sft_pairs=12, seed=9)
    pretrain, sft = tmp_path / "c" / "pretrain.jsonl", tmp_path / "c" / "sft.jsonl"
    write_corpus(settings, pretrain_path=pretrain, sft_path=sft)
    documents, pairs = read_corpus(pretrain, sft)
    assert documents == pretraining_documents(30, 9)
    assert pairs == sft_pairs(12, 9)
    assert sorted(p.name for p in pretrain.parent.iterdir()) == ["pretrain.jsonl", "sft.jsonl"]
    sft.write_text('{"instruction": "x"}\n')
    with pytest.raises(
        CorpusError, match=r"sft\.jsonl:1 needs the text fields instruction, response"
    ):
        read_corpus(pretrain, sft)
