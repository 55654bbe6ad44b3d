"""The configuration's one definition: models per block, the generated schema, every check."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from snakemake.utils import update_config

import canopy.bootstrap
import canopy.prompts
import canopy.diversity
import canopy.entropy
import canopy.filtering
import canopy.figures.slopes
import canopy.sampling.settings
import canopy.semantic_entropy
import canopy.stats
import canopy.training
import canopy.training.corpus
from canopy import config as cfg
from canopy.config import ConfigError, validate_config
from canopy.config.schema import render_schema

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def merged(base: str, overlay: str) -> dict:
    """``overlay`` merged on top of ``base`` the way Snakemake merges two --configfile arguments
    (nested mappings key by key)."""
    config = yaml.safe_load((REPO / base).read_text())
    update_config(config, yaml.safe_load((REPO / overlay).read_text()))
    return config


def paper_with_ablations() -> dict:
    return merged("config/paper.yaml", "config/ablations.yaml")


def problems(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return str(info.value)


# ------------------------------------------------------------------------- schema and files


def test_committed_schema_is_the_one_the_models_generate() -> None:
    assert SCHEMA.read_text() == render_schema(), (
        "workflow/schemas/config.schema.yaml is out of date: run "
        "`PYTHONPATH=src python3 -m canopy.config.schema`"
    )
    check = subprocess.run(
        [sys.executable, "-m", "canopy.config.schema", "--check", str(SCHEMA)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src")},
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    "path", ["config.yaml", "config/paper.yaml", "config/gemma.yaml", "tests/configs/tiny.yaml"]
)
def test_shipped_configs_are_valid_for_the_models_and_the_schema(path: str) -> None:
    config = yaml.safe_load((REPO / path).read_text())
    validate_config(config)
    # Editors and other tools see the same rules through the generated JSON schema.
    jsonschema.validate(config, yaml.safe_load(SCHEMA.read_text()))


def test_ablations_merged_onto_the_paper_config_are_valid() -> None:
    config = validate_config(paper_with_ablations())
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


def test_the_defaults_sweep_points_merged_onto_it_are_valid(default_config) -> None:
    config = validate_config(merged("config.yaml", "config/sweeps.yaml"))
    assert list(config["sampling"]) == ["default", "topk20", "minp10"]
    assert list(config["embedders"]) == ["minilm", "minilm_prefixed"]
    assert config["tasks"]["math_1shot"]["few_shot"]["k"] == 1
    # The overlay adds sweep points only: the main setting is the default's own.
    assert config["sampling"]["default"] == validate_config(default_config)["sampling"]["default"]


def test_defaults_are_filled_as_plain_values_without_touching_the_input(default_config) -> None:
    config = copy.deepcopy(default_config)
    del config["sampling"]["default"]["top_p"]
    filled = validate_config(config)
    assert filled["sampling"]["default"]["top_p"] == 1.0
    assert "top_p" not in config["sampling"]["default"]
    assert filled["stats"]["robustness"]["length_bins"] == 10
    assert filled["diversity"] == {
        "distinct_n": [1, 2],
        "vendi_orders": [1.0],
        "semantic_entropy": None,
    }
    # Keys a task's source does not use stay absent, as in the file.
    assert filled["tasks"]["coding"] == {"source": "humaneval", "n_prompts": 10}
    # Plain YAML types only: what Snakemake stores as params and a YAML dump can write.
    assert yaml.safe_load(yaml.safe_dump(filled)) == filled


# ------------------------------------------------------------------------------- messages


def test_every_problem_names_key_value_allowed_and_readers(default_config) -> None:
    config = copy.deepcopy(default_config)
    config["sampling"]["default"]["top_k"] = "many"
    config["sampling"]["default"]["temprature"] = 0.7
    config["tasks"]["math"]["source"] = "web"
    readers = {"sampling": ["sample_rollouts"], "tasks": ["prepare_prompts"]}
    with pytest.raises(ConfigError) as info:
        validate_config(config, readers=lambda key: readers.get(key[0], []))
    message = str(info.value)
    assert "3 problem(s)" in message
    assert (
        "sampling.default.top_k = 'many': Input should be a valid integer "
        "(read by rule sample_rollouts)" in message
    )
    assert "sampling.default.temprature = 0.7: unknown key; allowed here: rollouts," in message
    assert "tasks.math.source = 'web': Input should be 'humaneval', 'generated'" in message
    assert [p.dotted for p in info.value.problems] == [
        "tasks.math.source",
        "sampling.default.top_k",
        "sampling.default.temprature",
    ]


@pytest.mark.parametrize(
    ("block", "key", "values"),
    [("sweeps", "tasks", ["math", "completion", "math"]), ("diversity", "distinct_n", [1, 2, 1])],
)
def test_a_list_setting_that_repeats_a_value_is_named(default_config, block, key, values) -> None:
    config = copy.deepcopy(default_config)
    config.setdefault(block, {})[key] = values
    assert f"{block}.{key} = {values}: repeats a value: {values}" in problems(config)


def test_the_regression_formulas_are_checked_term_by_term(default_config) -> None:
    config = copy.deepcopy(default_config)
    config["stats"]["formula"] = "D ~ Rsc * variant + task + (1 | prompt_uid)"
    config["stats"]["dispersion"] = "~ variant + splines(invN_sc)"
    config["stats"]["robustness"] = {"fixed_effects_formula": "logit_D ~ R_sc + C(family)"}
    message = problems(config)
    assert (
        "stats.formula = 'D ~ Rsc * variant + task + (1 | prompt_uid)': unknown variable(s) Rsc"
        in (message)
    )
    assert (
        "stats.dispersion = '~ variant + splines(invN_sc)': unknown function(s) splines" in message
    )
    assert (
        "stats.robustness.fixed_effects_formula" in message
        and "interaction with variant" in message
    )
    for formula, why in [
        ("R_sc * variant", "exactly one '~'"),
        ("logit_D ~ R_sc * variant", "response 'D'"),
        ("D ~ R_sc * variant + (1 | prompt_uid", "unbalanced parentheses"),
        ("D ~ R_sc * variant + task$", "unexpected character"),
    ]:
        config["stats"] = {"formula": formula}
        assert why in problems(config), formula
    # The paper's formulas, interaction written either way round, and every panel column pass.
    for formula in [
        "D ~ R_sc * variant + ns(invN_sc, 4) * variant + task + (1 | prompt_uid) + (1 | family)",
        "D ~ variant:R_sc + R_sc + variant + log_VS + CE + I(N^2) + (1 | family)",
    ]:
        config["stats"] = {"formula": formula}
        validate_config(config)


def test_figure_settings_are_checked_as_the_figures_check_them(default_config) -> None:
    config = copy.deepcopy(default_config)
    config["figures"]["slopes"]["scatter_alpha"] = 0
    config["figures"]["residuals"]["point_alpha"] = 1.5
    config["figures"]["rho"]["resamples"] = 5
    config["figures"]["trajectory"]["tasks"] = ["math", "poetry"]
    config["figures"]["lengths"]["tasks"] = []
    message = problems(config)
    assert "figures.slopes.scatter_alpha = 0: Input should be greater than 0" in message
    assert "figures.residuals.point_alpha = 1.5: Input should be less than or equal to 1" in message
    assert "figures.rho.resamples = 5: Input should be greater than or equal to 10" in message
    assert "figures.trajectory.tasks = 'poetry': not a key of tasks" in message
    assert "figures.lengths.tasks = []" in message


def test_references_across_blocks_are_checked(default_config, tmp_path: Path) -> None:
    config = copy.deepcopy(default_config)
    config["families"]["tinygpt"]["finetuned"] = {"source": "local", "path": str(tmp_path / "no")}
    config["families"]["tinyllama"]["base"]["recipe"] = "missing"
    config["stats"]["reference_task"] = "poetry"
    config["embedders"]["minilm"]["model"] = str(tmp_path / "no-embedder")
    rm = {"model": "org/rm", "revision": "abc"}
    config["sampling"]["rm"] = {"filter": {"from": "nowhere", "reward_model": rm}}
    config["sampling"]["rm2"] = {"filter": {"from": "rm", "reward_model": rm}}
    message = problems(config)
    assert "families.tinygpt.finetuned.path" in message and "not a directory" in message
    assert "families.tinygpt: source train must be used for both" in message
    assert "families.tinyllama.base.recipe = 'missing': not a key of training.recipes" in message
    assert "stats.reference_task = 'poetry': not a key of tasks" in message
    assert "embedders.minilm.model" in message and "embedders.minilm.revision" in message
    assert "sampling.rm.filter.from = 'nowhere': must name a sampling entry" in message
    assert "sampling.rm2.filter.from = 'rm'" in message


def test_required_keys_follow_the_source(default_config) -> None:
    config = copy.deepcopy(default_config)
    config["families"]["tinygpt"]["base"] = {"source": "hub", "id": "org/model"}
    config["families"]["tinygpt"]["finetuned"] = {"source": "hub", "id": "o/m", "revision": "a"}
    config["tasks"]["math"] = {
        "source": "jsonl",
        "n_prompts": 3,
        "field": "q",
        "generator": "stories",
    }
    message = problems(config)
    assert "families.tinygpt.base.revision = None: required by source hub" in message
    assert "tasks.math.path = None: required by source jsonl" in message
    assert "tasks.math.generator = 'stories': not used by source jsonl" in message


def test_gguf_keys_follow_the_source(default_config) -> None:
    config = copy.deepcopy(default_config)
    config["families"]["tinygpt"]["base"] = {"source": "gguf"}
    config["families"]["tinygpt"]["finetuned"] = {
        "source": "gguf",
        "gguf": "package:some_gguf",
        "sha256": "abc",
        "dtype": "int4",
    }
    config["families"]["tinyllama"]["base"]["sha256"] = "0" * 64
    message = problems(config)
    assert "families.tinygpt.base.gguf = None: required by source gguf" in message
    assert "families.tinygpt.finetuned.sha256 = 'abc': String should match pattern" in message
    assert "families.tinygpt.finetuned.dtype = 'int4'" in message
    # A key of another source is named as such, with the keys this source reads.
    assert (
        f"families.tinyllama.base.sha256 = '{'0' * 64}': not used by source train (a key of "
        "source gguf); allowed here: source, recipe," in message
    )


def test_a_fine_tune_made_here_names_a_recipe_of_training_finetunes(default_config) -> None:
    config = copy.deepcopy(default_config)
    config["families"]["tinygpt"] = {
        "base": {"source": "local", "path": "/nonexistent", "prompt_template": "Q: {prompt}"},
        "finetuned": {"source": "finetune", "recipe": "gpt2"},
    }
    config["families"]["tinyllama"]["base"] = {"source": "finetune", "recipe": "llama"}
    config["training"]["finetunes"] = {"sft": {"lora_rank": 4, "train_embeddings": True}}
    message = problems(config)
    assert "families.tinygpt.finetuned.recipe = 'gpt2': not a key of training.finetunes" in message
    assert "families.tinygpt.base.prompt_template = 'Q: {prompt}': must contain {text}" in message
    assert (
        "families.tinyllama.base.source = 'finetune': Input should be 'train', 'hub', 'local' or "
        "'gguf'" in message
    )
    assert "training.finetunes.sft: train_embeddings applies to full fine-tuning" in message
    config["families"]["tinygpt"]["finetuned"]["prompt_template"] = "Q: {text}"
    assert "families.tinygpt.finetuned.prompt_template" in problems(config)
    # Per task: the base's template may read the prompt's document; a finetuned variant's
    # per_task entry sets stops only.
    config = copy.deepcopy(default_config)
    config["families"]["tinygpt"]["base"]["per_task"] = {
        "math": {"prompt_template": "{text}{document}"}
    }
    assert (
        "families.tinygpt.base.per_task.math.prompt_template = '{text}{document}': must contain "
        "{text} or {document}, once" in problems(config)
    )
    config["families"]["tinygpt"]["base"]["per_task"] = {"math": {"prompt_template": "{document}"}}
    config["families"]["tinygpt"]["finetuned"]["per_task"] = {
        "math": {"stop_sequences": ["\n\n"], "prompt_template": "{text}"}
    }
    assert "families.tinygpt.finetuned.per_task.math.prompt_template" in problems(config)
    del config["families"]["tinygpt"]["finetuned"]["per_task"]["math"]["prompt_template"]
    validated = validate_config(config)["families"]["tinygpt"]
    assert validated["base"]["per_task"] == {"math": {"prompt_template": "{document}"}}
    assert validated["finetuned"]["per_task"] == {"math": {"stop_sequences": ["\n\n"]}}


def test_chat_options_belong_to_the_finetuned_side(default_config) -> None:
    config = copy.deepcopy(default_config)
    config["families"]["tinygpt"]["base"]["system_prompt"] = "Be brief."
    config["families"]["tinyllama"]["chat_template_kwargs"] = {"not a name": True}
    config["families"]["tinyllama"]["finetuned"]["chat_template_kwargs"] = {"tokenize": False}
    message = problems(config)
    assert "families.tinygpt.base.system_prompt = 'Be brief.': unknown key" in message
    assert "families.tinyllama.chat_template_kwargs" in message
    assert "families.tinyllama.finetuned.chat_template_kwargs: may not set tokenize" in message


# -------------------------------------------------------------------- one definition


@pytest.mark.parametrize(
    ("library", "model"),
    [
        (canopy.stats.StatsSettings, cfg.StatsSettings),
        (canopy.stats.RobustnessSettings, cfg.RobustnessSettings),
        (canopy.bootstrap.BootstrapSettings, cfg.BootstrapSettings),
        (canopy.entropy.MetricSettings, cfg.MetricSettings),
        (canopy.diversity.EmbedderSettings, cfg.EmbedderSettings),
        (canopy.diversity.DiversitySettings, cfg.DiversitySettings),
        (canopy.semantic_entropy.SemanticEntropySettings, cfg.SemanticEntropySettings),
        (canopy.filtering.FilterSettings, cfg.FilterSettings),
        (canopy.sampling.settings.SamplingSettings, cfg.SamplingSettings),
        (canopy.training.corpus.CorpusSettings, cfg.CorpusSettings),
        (canopy.training.Recipe, cfg.Recipe),
        (
            canopy.figures.slopes.SlopesSettings,
            cfg.FiguresSettings.model_fields["slopes"].annotation,
        ),
    ],
)
def test_library_settings_are_the_config_models(library: type, model: type) -> None:
    """One definition: what the library validates is what the workflow validates at plan time."""
    assert library is model


def test_the_settings_of_each_block_are_the_models_of_the_whole_config(default_config) -> None:
    config = validate_config(default_config)
    stats = canopy.stats.StatsSettings.from_config(config["stats"])
    assert (
        stats.robustness.length_repeats == default_config["stats"]["robustness"]["length_repeats"]
    )
    assert cfg.Config.model_validate(config).stats == stats


def test_a_notebook_builds_settings_from_a_plain_dict_with_a_clear_error() -> None:
    recipe = canopy.training.Recipe.from_config(
        {"architecture": "gpt2", "tokenizer": "byte_bpe"}, name="tiny"
    )
    assert recipe.vocab_size == 1024
    with pytest.raises(ConfigError, match=r"training\.recipes\.tiny\.num_heads = 0"):
        canopy.training.Recipe.from_config(
            {"architecture": "gpt2", "tokenizer": "byte_bpe", "num_heads": 0}, name="tiny"
        )
    with pytest.raises(ConfigError, match=r"stats\.robustness must be a mapping"):
        canopy.stats.RobustnessSettings.from_config(["lmm"])
    # ConfigError is a ValueError: callers that caught the old per-module errors still do.
    assert issubclass(ConfigError, ValueError)


def test_the_generators_the_config_names_are_the_ones_prompts_implements() -> None:
    from canopy.config.prompts import GENERATOR_NAMES

    assert tuple(canopy.prompts.GENERATORS) == GENERATOR_NAMES


def _heavy_modules_loaded_by(module: str) -> list[str]:
    code = (
        f"import sys, json; import {module}; "
        "print(json.dumps(sorted(m for m in ('torch', 'pandas', 'numpy', 'transformers', "
        "'sentence_transformers', 'matplotlib') if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO / "src")},
    )
    return json.loads(result.stdout)


def test_validating_loads_no_heavy_library() -> None:
    """The Snakefile validates at start-up: canopy.config must not pull in torch or pandas."""
    assert _heavy_modules_loaded_by("canopy.config") == []


def test_writing_the_corpus_loads_no_model_library() -> None:
    """The corpus job generates text: its module must not load torch through canopy.training."""
    loaded = _heavy_modules_loaded_by("canopy.training.corpus")
    assert not {"torch", "transformers"} & set(loaded), loaded
