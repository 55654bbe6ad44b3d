"""canopy.overview: the report's opening section, rendered from a run's rollout tables and model
training records, must state the measured truncation and parse as reStructuredText."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from docutils.core import publish_parts

from canopy.overview import truncation_rows, write_intro
from canopy.sources.record import RECORD_FILE

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "workflow" / "report" / "workflow.rst"
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def rollout_table(path: Path, truncated: list[bool], lengths: list[int]) -> Path:
    pq.write_table(
        pa.table({"truncated": truncated, "n_steps": lengths, "text": ["x"] * len(lengths)}), path
    )
    return path


def strict_html(text: str) -> str:
    """HTML of ``text``; any docutils warning (a broken table, say) fails the test."""
    return publish_parts(
        text, writer="html", settings_overrides={"halt_level": 2, "report_level": 2}
    )["html_body"]


@pytest.fixture
def run(tmp_path: Path) -> dict:
    rollouts = {
        ("tinygpt", "base", "math"): rollout_table(
            tmp_path / "a.parquet", [True, False, False, False], [64, 10, 20, 30]
        ),
        ("tinygpt", "finetuned", "math"): rollout_table(
            tmp_path / "b.parquet", [False] * 4, [5, 6, 7, 8]
        ),
    }
    models = {}
    for variant, stage in (("base", "pretrain"), ("finetuned", "finetune")):
        directory = tmp_path / variant
        directory.mkdir()
        record = {
            "stage": stage,
            "recipe": {"architecture": "gpt2", "tokenizer": "byte_bpe", "num_layers": 2,
                       "hidden_size": 64, "pretrain_steps": 300, "sft_steps": 150},
            "parameters": 123456,
            "vocab_size": 1024,
            "final_loss": 1.234,
            ("documents" if stage == "pretrain" else "pairs"): 4000,
        }  # fmt: skip
        # The fine-tune holds the one record of a made model; the base is one trained before
        # it, which kept its training_log.json: both are read.
        name = RECORD_FILE if variant == "finetuned" else "training_log.json"
        (directory / name).write_text(json.dumps({"source": "train", **record}))
        models[("tinygpt", variant)] = directory
    return {"rollouts": rollouts, "models": models, "out": tmp_path / "intro.rst"}


def test_truncation_is_read_from_the_rollout_tables(run) -> None:
    rows = {(r["variant"], r["task"]): r for r in truncation_rows(run["rollouts"])}
    assert rows["base", "math"]["rate"] == pytest.approx(0.25)
    assert rows["base", "math"]["mean_length"] == pytest.approx(31.0)
    assert rows["finetuned", "math"]["truncated"] == 0


def test_intro_states_what_was_measured_and_parses(run) -> None:
    sources = {key: "train" for key in run["models"]}
    measured = write_intro(
        TEMPLATE, CONFIG, run["rollouts"], run["models"], sources, run["out"], sampling="default"
    )
    assert measured["truncation_overall"] == pytest.approx(1 / 8)
    text = run["out"].read_text()
    assert "What you are looking at" in text
    assert "12.5 % of all rollouts were cut" in text
    assert "25.0 % (tinygpt\nbase on math)" in text
    assert "123,456" in text and "pre-training on 4000 documents" in text
    assert "fine-tuning on 4000 pairs" in text  # from the fine-tune's record
    assert "config/paper.yaml" in text and "not expected to reproduce" in text
    html = strict_html(text)
    assert html.count("<table") == 2


def test_template_renders_without_results_as_snakemake_does() -> None:
    """Before a run, Snakemake's report renders the template with the config only."""

    class Snakemake:
        config = CONFIG

    text = jinja2.Environment().from_string(TEMPLATE.read_text()).render(snakemake=Snakemake)
    assert "appear here once the workflow has run" in text
    assert "of all rollouts were cut" not in text
    strict_html(text)
