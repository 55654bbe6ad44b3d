"""Tests of canopy.semantic_entropy: the clustering and both entropies against hand-computed
answers with a deterministic entailment function, the cache, and the NLI path with a tiny BERT
sequence-classification model built here from a config (random weights, own vocabulary)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from canopy.auxiliary_models import load_classifier
from canopy.semantic_entropy import (
    EntailmentCache,
    NliEntailment,
    SemanticEntropySettings,
    cluster_by_entailment,
    discrete_semantic_entropy,
    semantic_entropy_table,
    weighted_semantic_entropy,
)
from support.models import build_nli_dir


def same_first_letter(pairs):
    """Entailment both ways exactly when two texts start with the same letter."""
    return [p[0] == h[0] for p, h in pairs]


def contains(pairs):
    """One-directional: the premise entails the hypothesis when it contains it."""
    return [h in p for p, h in pairs]


def test_clusters_by_bidirectional_entailment():
    texts = ["apple", "avocado", "banana", "apricot", "blue", "cherry", "banana"]
    labels = cluster_by_entailment(texts, same_first_letter)
    assert labels.tolist() == [0, 0, 1, 0, 1, 2, 1]
    # "a cat sat" contains "a cat" but not the other way round: not the same meaning.
    assert cluster_by_entailment(["a cat sat", "a cat", "a cat sat"], contains).tolist() == [
        0,
        1,
        0,
    ]


def test_discrete_and_weighted_entropy_by_hand():
    labels = np.array([0, 0, 1, 0, 1, 2])
    expected = -(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6))
    assert discrete_semantic_entropy(labels) == pytest.approx(expected, abs=1e-15)
    # probabilities 0.1, 0.1, 0.2, 0.2, 0.3, 0.1 (normalised over the rollouts) -> clusters
    # 0.4, 0.5, 0.1
    probs = np.array([0.1, 0.1, 0.2, 0.2, 0.3, 0.1])
    logprobs = np.log(probs) - 700.0  # far below exp's range: must still work in log space
    expected_w = -(0.4 * math.log(0.4) + 0.5 * math.log(0.5) + 0.1 * math.log(0.1))
    assert weighted_semantic_entropy(labels, logprobs) == pytest.approx(expected_w, abs=1e-12)
    assert discrete_semantic_entropy(np.zeros(5)) == 0.0
    with pytest.raises(ValueError, match="finite"):
        weighted_semantic_entropy(labels, np.r_[logprobs[:-1], np.nan])


def test_cache_asks_each_pair_once():
    asked = []

    def entails(pairs):
        asked.extend(pairs)
        return same_first_letter(pairs)

    cache = EntailmentCache(entails)
    texts = ["apple", "avocado", "banana", "apricot"]
    first = cluster_by_entailment(texts, cache)
    calls = cache.calls
    again = cluster_by_entailment(texts, cache)
    assert first.tolist() == again.tolist() and cache.calls == calls == len(set(asked))
    assert len(asked) == len(set(asked))


def test_table_per_prompt():
    rollouts = pd.DataFrame(
        {
            "prompt_id": ["p", "p", "p", "q", "q"],
            "text": ["apple", "avocado", "banana", "kiwi", "kiwi"],
            "sum_logprob": [-1.0, -2.0, -1.0, -3.0, -5.0],
            "n_steps": [1, 4, 2, 3, 5],
        }
    )
    table = semantic_entropy_table(rollouts, same_first_letter).set_index("prompt_id")
    assert table.loc["p", "n_semantic_clusters"] == 2
    assert table.loc["p", "semantic_entropy"] == pytest.approx(
        -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    )
    p = np.exp([-1.0, -2.0, -1.0])
    pa = (p[0] + p[1]) / p.sum()
    assert table.loc["p", "semantic_entropy_weighted"] == pytest.approx(
        -(pa * math.log(pa) + (1 - pa) * math.log(1 - pa))
    )
    assert table.loc["q", "semantic_entropy"] == 0.0
    mean = semantic_entropy_table(rollouts, same_first_letter, logprob="mean").set_index(
        "prompt_id"
    )
    p = np.exp([-1.0, -0.5, -0.5])
    pa = (p[0] + p[1]) / p.sum()
    assert mean.loc["p", "semantic_entropy_weighted"] == pytest.approx(
        -(pa * math.log(pa) + (1 - pa) * math.log(1 - pa))
    )


def test_settings_reject_bad_keys():
    assert SemanticEntropySettings.from_config({"model": "m"}).logprob == "sum"
    with pytest.raises(ValueError, match="semantic_entropy.modle"):
        SemanticEntropySettings.from_config({"modle": "m"})
    with pytest.raises(ValueError, match="logprob"):
        SemanticEntropySettings(model="m", logprob="max")


# ------------------------------------------------------------------------------ the NLI path


def test_nli_entailment_matches_the_model_pair_by_pair(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = build_nli_dir(tmp_path)
    texts = [
        "the cat sat",
        "a dog ran on the mat",
        "the big cat sat on a small mat",
        "a cat",
        "the dog",
        "small dog ran",
    ]
    pairs = [(p, h) for p in texts for h in texts if p != h]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def logits_one_by_one():  # one pair at a time: no padding to get wrong
        with torch.no_grad():
            return torch.cat(
                [model(**tokenizer(p, h, return_tensors="pt")).logits for p, h in pairs]
            )

    # Move the entailment bias to the widest gap between pair margins near their median, so that
    # about half the pairs entail and no pair sits on the boundary.
    logits = logits_one_by_one()
    margin = np.sort((logits[:, 2] - logits[:, :2].max(dim=1).values).numpy())
    third = len(margin) // 3
    gap = third + int(np.argmax(np.diff(margin[third : 2 * third + 1])))
    with torch.no_grad():
        model.classifier.bias[2] -= float(margin[gap] + margin[gap + 1]) / 2
    model.save_pretrained(path)
    expected = (logits_one_by_one().argmax(dim=1) == 2).tolist()

    got = NliEntailment(load_classifier(path, device="cpu"), batch_size=4)(pairs)
    assert got == expected
    assert 0 < sum(got) < len(got)  # random weights: a mix, so the comparison means something

    labels = cluster_by_entailment(
        texts, EntailmentCache(NliEntailment(load_classifier(path), batch_size=3))
    )
    lookup = dict(zip(pairs, expected))
    # Reference clustering from the pair-by-pair answers.
    reps, ref = [], []
    for text in texts:
        hit = next((c for c, r in enumerate(reps) if lookup[(text, r)] and lookup[(r, text)]), None)
        if hit is None:
            reps.append(text)
            hit = len(reps) - 1
        ref.append(hit)
    assert labels.tolist() == ref


def test_nli_model_forced_to_entail_gives_one_cluster(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    path = build_nli_dir(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.bias[:] = torch.tensor([0.0, 0.0, 1e4])
    model.save_pretrained(path)
    rollouts = pd.DataFrame(
        {
            "prompt_id": "p",
            "text": ["the cat", "a dog ran", "the mat"],
            "sum_logprob": [-1.0, -2.0, -3.0],
        }
    )
    table = semantic_entropy_table(rollouts, NliEntailment(load_classifier(path, device="cpu")))
    assert table.loc[0, "n_semantic_clusters"] == 1 and table.loc[0, "semantic_entropy"] == 0.0


def test_nli_model_without_entailment_label_is_rejected(tmp_path):
    path = build_nli_dir(tmp_path, labels=("negative", "positive"))
    with pytest.raises(ValueError, match="entailment"):
        NliEntailment(load_classifier(path, device="cpu"))
