"""canopy.sources: one module per kind of model source, with its config block, its rule and its
record, and the workflow wired through the registry (exactly one rule for each model directory,
with no rule order)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from support.workflow import REPO, planned_jobs, snakemake, workflow_rules

from canopy.config import ConfigError, validate_config
from canopy.config.families import SOURCES as CONFIG_BLOCKS
from canopy.provenance import lock_table, model_entry
from canopy.sources.record import RECORD_FILE, read_record, write_record
from canopy.sources.registry import SOURCES, source_of


def test_each_config_block_has_its_source_module_and_each_module_its_rule() -> None:
    assert [block.kind() for block in CONFIG_BLOCKS] == list(SOURCES)
    rules = workflow_rules()
    for kind, source in SOURCES.items():
        assert source.kind == kind and source.settings in CONFIG_BLOCKS
        assert set(source.keys) == set(source.settings.model_fields) - {"source"}
        for variant in source.variants:
            rule = source.rule_for(variant)
            assert rule is None or rule in rules, (kind, variant, rule)
    assert SOURCES["local"].rule_for("base") is None  # used where it is
    assert SOURCES["finetune"].variants == ("finetuned",)


def test_no_rule_order_sorts_out_the_model_rules() -> None:
    assert not re.search(r"^ruleorder:", (REPO / "workflow/rules/models.smk").read_text(), re.M)


def test_the_package_is_light_to_import() -> None:
    """The registry is read while the Snakefile is parsed: no model library comes with it."""
    import subprocess
    import sys

    code = (
        "import sys; import canopy.sources.registry; "
        "print(sorted(m for m in ('torch', 'transformers', 'pandas', 'canopy.checkpoints') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_one_record_for_every_kind_and_the_older_files_are_still_read(tmp_path: Path) -> None:
    record = write_record(tmp_path, "gguf", {"source": "ignored", "sha256": "ab" * 32})
    assert record == {"source": "gguf", "sha256": "ab" * 32}
    assert json.loads((tmp_path / RECORD_FILE).read_text()) == record
    assert read_record(tmp_path, source="gguf") == record
    assert read_record(tmp_path / "none", source="gguf") is None
    # A directory trained before the one record holds its training log only.
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "training_log.json").write_text(json.dumps({"recipe": {"steps": 3}}))
    assert read_record(trained, source="finetune") is None
    assert SOURCES["finetune"].read_record(trained) == {
        "source": "finetune",
        "recipe": {"steps": 3},
    }


def test_the_lock_entry_of_each_kind_comes_from_its_module(tmp_path: Path) -> None:
    base = tmp_path / "fam/base"
    base.mkdir(parents=True)
    fetched = {"kind": "model", "repo_id": "org/m", "repo_type": "model", "revision": "c" * 40,
               "commit": "c" * 40, "endpoint": "e", "fetched_at": "t", "files": []}  # fmt: skip
    write_record(base, "hub", fetched)
    hub = model_entry("fam", "base", {"source": "hub", "id": "org/m"}, base)
    assert hub["repository"] == "org/m" and hub["pinned"] is True
    tuned = tmp_path / "fam/finetuned"
    tuned.mkdir()
    spec = {"source": "finetune", "recipe": "sft"}
    with pytest.raises(FileNotFoundError, match="finetune_model rule"):
        model_entry("fam", "finetuned", spec, tuned, hub)
    write_record(tuned, "finetune", {"recipe": {"steps": 3}, "heldout_loss_after": 1.5})
    finetuned = model_entry("fam", "finetuned", spec, tuned, hub)
    assert finetuned["commit"] == "c" * 40 and finetuned["heldout_loss_after"] == 1.5
    trained = model_entry("tiny", "base", {"source": "train", "recipe": "gpt2"}, base)
    local = model_entry("own", "base", {"source": "local", "path": "/models/own"}, base)
    assert source_of({"source": "local"}).directory("own", "base", {"path": "/m"}) == "/m"
    lock = {"models": [hub, finetuned, trained, local], "prompts": [], "embedders": [],
            "software": {}}  # fmt: skip
    table = lock_table(lock).set_index("name")
    assert table.loc["fam/finetuned", "repository"] == "fine-tuned here from fam/base (recipe sft)"
    assert table.loc["tiny/base", "repository"] == "trained here (recipe gpt2)"
    assert table.loc["own/base", "repository"] == "/models/own"


def test_a_key_of_another_source_or_a_wrong_source_is_named(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["families"]["tinygpt"]["finetuned"]["id"] = "org/m"
    config["families"]["tinyllama"]["base"] = {"recipe": "llama"}
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    message = str(error.value)
    assert (
        "families.tinygpt.finetuned.id = 'org/m': not used by source train (a key of source hub)"
        in message
    )
    assert "families.tinyllama.base.source = None: required key is missing" in message


def write_gguf(path: Path) -> None:
    """A small real GGUF file (metadata and one tensor), written with the gguf package."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_mixed_sources_plan_one_rule_per_model_directory(tmp_path: Path) -> None:
    """A GGUF base with a hub fine-tune, a hub base fine-tuned here and a trained family: each
    model directory is planned by the rule its source names, with no rule order."""
    write_gguf(tmp_path / "base.gguf")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    trained = copy.deepcopy(config["families"]["tinygpt"])
    config["families"] = {
        "tinygpt": trained,
        "mixed": {
            "base": {"source": "gguf", "gguf": str(tmp_path / "base.gguf")},
            "finetuned": {"source": "hub", "id": "org/instruct", "revision": "a" * 40},
        },
        "tuned": {
            "base": {"source": "hub", "id": "org/base", "revision": "b" * 40},
            "finetuned": {"source": "finetune", "recipe": "sft"},
        },
    }
    config["training"]["finetunes"] = {"sft": {"steps": 2, "device": "cpu"}}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "resources/models/mixed/base", "resources/models/mixed/finetuned",
                       "resources/models/tuned/finetuned", "resources/models/tinygpt/finetuned",
                       "--configfile", str(path))  # fmt: skip
    jobs = planned_jobs(result.stdout)
    assert jobs["convert_gguf"] == 1 and jobs["download_model"] == 2
    assert jobs["finetune_model"] == 2 and jobs["pretrain_base_model"] == 1
    # A GGUF package that is not installed stops the plan, naming the key and the rule.
    config["families"]["mixed"]["base"]["gguf"] = "package:canopy_missing_gguf"
    path.write_text(yaml.safe_dump(config))
    failed = snakemake(tmp_path, "-n", "--configfile", str(path), check=False)
    message = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "families.mixed.base.gguf = 'package:canopy_missing_gguf'" in message
    assert "(read by rule convert_gguf)" in message
