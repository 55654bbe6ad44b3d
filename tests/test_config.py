"""Configuration validation: every problem named by key, schema rule and consuming rule."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from canopy.config import ConfigError, check_references, validate_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONSUMERS = {"sampling": ["sample_rollouts"], "figures": ["figure_{name}"]}


@pytest.fixture(scope="module")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


@pytest.mark.parametrize("path", ["config.yaml", "config/paper.yaml", "tests/configs/tiny.yaml"])
def test_shipped_configs_are_valid(path: str) -> None:
    config = validate_config(yaml.safe_load((REPO / path).read_text()), SCHEMA)
    check_references(config)


def test_defaults_are_filled_without_touching_the_input(default_config: dict) -> None:
    config = copy.deepcopy(default_config)
    del config["sampling"]["default"]["top_p"]
    filled = validate_config(config, SCHEMA)
    assert filled["sampling"]["default"]["top_p"] == 1.0
    assert "top_p" not in config["sampling"]["default"]


def test_every_problem_is_listed_with_key_schema_rule_and_consumer(default_config: dict) -> None:
    config = copy.deepcopy(default_config)
    config["sampling"]["default"]["top_k"] = "many"
    config["sampling"]["default"]["temprature"] = 0.7
    config["tasks"]["math"]["source"] = "web"
    with pytest.raises(ConfigError) as info:
        validate_config(config, SCHEMA, CONSUMERS)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "sampling.default.top_k: 'many' is not of type 'integer' [schema rule: type" in message
    assert "unknown key sampling.default.temprature" in message
    assert "tasks.math.source" in message and "enum" in message
    assert message.count("(read by rule sample_rollouts)") == 2


def test_required_keys_per_source(default_config: dict) -> None:
    config = copy.deepcopy(default_config)
    config["families"]["tinygpt"]["base"] = {"source": "hub", "id": "org/model"}
    with pytest.raises(ConfigError, match=r"families\.tinygpt\.base: 'revision' is a required"):
        validate_config(config, SCHEMA)


def test_references_are_checked(default_config: dict, tmp_path: Path) -> None:
    config = validate_config(copy.deepcopy(default_config), SCHEMA)
    config["families"]["tinygpt"]["finetuned"] = {"source": "local", "path": str(tmp_path / "no")}
    config["families"]["tinyllama"]["base"]["recipe"] = "missing"
    config["stats"]["reference_task"] = "poetry"
    with pytest.raises(ConfigError) as info:
        check_references(config)
    message = str(info.value)
    assert "families.tinygpt.finetuned.path" in message and "is not a directory" in message
    assert "families.tinygpt: source 'train' must be used for both" in message
    assert "families.tinyllama.base.recipe: 'missing'" in message
    assert "stats.reference_task: 'poetry'" in message


def test_ablations_merged_onto_the_paper_config_are_valid() -> None:
    """config/ablations.yaml is merged on top of config/paper.yaml the way Snakemake merges two
    --configfile arguments (nested mappings key by key): the result is valid and keeps both."""
    from snakemake.utils import update_config

    merged = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    update_config(merged, yaml.safe_load((REPO / "config/ablations.yaml").read_text()))
    config = validate_config(merged, SCHEMA)
    check_references(config)
    assert set(config["sampling"]) == {"default", "topk1000", "topk5000", "rm70"}
    assert set(config["embedders"]) == {
        "modernbert",
        "bge_m3",
        "e5_mistral",
        "modernbert_clustering",
    }
    assert {"math", "math_fewshot", "coding_fewshot"} <= set(config["tasks"])
    assert config["sampling"]["rm70"]["filter"]["from"] == "default"
    assert config["embedders"]["modernbert_clustering"]["prefix"] == "clustering: "


def test_a_filter_must_come_from_a_sampled_entry(default_config: dict) -> None:
    config = copy.deepcopy(default_config)
    rm = {"model": "org/rm", "revision": "abc"}
    config["sampling"]["rm"] = {"filter": {"from": "nowhere", "reward_model": rm}}
    config["sampling"]["rm2"] = {"filter": {"from": "rm", "reward_model": rm}}
    config = validate_config(config, SCHEMA)
    assert config["sampling"]["rm"]["filter"]["keep"] == 0.7
    with pytest.raises(ConfigError) as info:
        check_references(config)
    message = str(info.value)
    assert "sampling.rm.filter.from: 'nowhere' must name a sampling entry" in message
    assert "sampling.rm2.filter.from: 'rm'" in message
    bad = copy.deepcopy(default_config)
    bad["sampling"]["rm"] = {"filter": {"from": "default", "reward_model": rm, "keep": 1.5}}
    with pytest.raises(ConfigError, match=r"sampling\.rm\.filter\.keep"):
        validate_config(bad, SCHEMA)
