"""The sampler against the exact canopy of a real transformers model with a 5-token vocabulary,
and every step against the float64 oracle (tests/support/oracle.py) at Gemma-3's vocabulary size.

The next-token distributions for the enumeration come from full forward passes of the model on
prompt + prefix (no KV cache, no batching, no compaction) passed through the oracle; the sampler's
cached, batched, compacting loop must reproduce them step by step, and its rollout frequencies
must follow the enumerated leaf probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from canopy.modeling import LoadedModel
from canopy.sampling import SamplingSettings, sample_prompt
from support.enumeration import enumerate_canopy, exact_canopy
from support.models import build_gpt2, build_llama
from support.oracle import float64_errors, next_distribution_from, record_sampling_steps

VOCAB = 5
EOS_IDS = [3, 4]  # two end-of-sequence ids, as real instruct models have
PROMPT = [1, 0, 2]
MAX_NEW = 5
SAMPLES = 4000


CASES = {
    "llama-filters-off": (build_llama, dict(temperature=1.0, top_k=0, top_p=1.0)),
    "llama-filters-on": (build_llama, dict(temperature=0.7, top_k=3, top_p=0.8)),
    "gpt2-temperature-topp": (build_gpt2, dict(temperature=1.3, top_k=0, top_p=0.9)),
    # These models' next-token distributions are nearly flat: min-p bites from about 0.6.
    "llama-min-p": (build_llama, dict(temperature=1.2, top_k=0, top_p=1.0, min_p=0.7)),
    "gpt2-every-filter": (build_gpt2, dict(temperature=0.9, top_k=3, top_p=0.8, min_p=0.75)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_the_enumerated_canopy(case: str) -> None:
    builder, filters = CASES[case]
    model = builder(VOCAB, hidden=16, seed=3)
    settings = SamplingSettings(
        rollouts=SAMPLES, max_new_tokens=MAX_NEW, seed=11, max_batch_rows=1500, **filters
    )
    leaves = enumerate_canopy(next_distribution_from(model, settings, PROMPT), EOS_IDS, MAX_NEW)
    exact = exact_canopy(leaves)
    by_tokens = {leaf.tokens: leaf for leaf in leaves}
    assert math.isclose(sum(leaf.prob for leaf in leaves), 1.0, abs_tol=1e-9)

    loaded = LoadedModel(
        model=model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32
    )
    rows = sample_prompt(loaded, PROMPT, settings, prompt_id="p", eos_ids=EOS_IDS)
    assert [row["sample"] for row in rows] == list(range(SAMPLES))

    # Every rollout is a leaf of the canopy, with its exact step entropies and probability.
    for row in rows:
        leaf = by_tokens[tuple(row["token_ids"])]
        assert row["n_steps"] == leaf.length
        assert row["hit_eos"] == leaf.hit_eos and row["truncated"] == (not leaf.hit_eos)
        np.testing.assert_allclose(row["step_entropy"], leaf.step_entropies, rtol=0, atol=1e-5)
        assert row["sum_logprob"] == pytest.approx(math.log(leaf.prob), abs=1e-5)
        assert row["sum_entropy"] == pytest.approx(sum(row["step_entropy"]), abs=1e-12)

    # Rollout frequencies follow the leaf probabilities (chi-square, rare leaves merged).
    counts: dict[tuple[int, ...], int] = {}
    for row in rows:
        key = tuple(row["token_ids"])
        counts[key] = counts.get(key, 0) + 1
    expected = np.array([leaf.prob * SAMPLES for leaf in leaves])
    observed = np.array([counts.get(leaf.tokens, 0) for leaf in leaves], dtype=float)
    common = expected >= 5
    assert common.sum() >= 5, "the test model's canopy is too concentrated to be a test"
    f_exp = np.append(expected[common], expected[~common].sum())
    f_obs = np.append(observed[common], observed[~common].sum())
    if f_exp[-1] < 5:  # fold a tiny remainder into the smallest common cell
        smallest = int(np.argmin(f_exp[:-1]))
        f_exp[smallest] += f_exp[-1]
        f_obs[smallest] += f_obs[-1]
        f_exp, f_obs = f_exp[:-1], f_obs[:-1]
    assert stats.chisquare(f_obs, f_exp).pvalue > 0.001

    # The chain-rule estimator of CE* agrees with the exact value within its standard error.
    sums = np.array([row["sum_entropy"] for row in rows])
    se = sums.std(ddof=1) / math.sqrt(SAMPLES)
    assert abs(sums.mean() - exact.canopy_entropy) < 4 * se
    surprisal = -np.array([row["sum_logprob"] for row in rows])
    assert abs(surprisal.mean() - exact.canopy_entropy) < 4 * surprisal.std(ddof=1) / math.sqrt(
        SAMPLES
    )


# ------------------------------------------- float64 exactness at Gemma-3's vocabulary size

GEMMA_VOCAB = 262_144


@pytest.fixture(scope="module")
def wide_model():
    """A two-layer random model with Gemma-3's 262,144-token vocabulary (logits spread over
    several nats, like a trained model's)."""
    return build_llama(GEMMA_VOCAB, hidden=32, layers=2, seed=4)


WIDE_CASES = {
    "full-vocabulary": dict(top_k=0, temperature=1.0),
    "full-vocabulary-temperature": dict(top_k=0, temperature=0.8),
    "top-k": dict(top_k=100, temperature=1.0),
    # This model's logits lie within about 1.5 nats of each row's largest: min-p 0.5 drops about
    # half the vocabulary, and 0.8 at temperature 1.3 leaves about 760 tokens for top-k to cut.
    "min-p": dict(top_k=0, min_p=0.5, temperature=1.0),
    "min-p-top-k-top-p": dict(top_k=500, top_p=0.9, min_p=0.8, temperature=1.3),
}


@pytest.mark.parametrize("case", list(WIDE_CASES))
def test_every_step_is_float64_exact_on_a_262k_vocabulary(wide_model, monkeypatch, case) -> None:
    """Each step's entropy and drawn log-probability equal the float64 oracle's from the very
    logits that step sampled from: to 1e-6 over the whole vocabulary (float32 elementwise work;
    the earlier float32 reductions: 1.1e-5 here), to 1e-10 over a filter's float64 candidates."""
    recorded = record_sampling_steps(monkeypatch)
    settings = SamplingSettings(rollouts=3, max_new_tokens=4, seed=8, **WIDE_CASES[case])
    loaded = LoadedModel(
        model=wide_model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32
    )
    rows = sample_prompt(loaded, [1, 17, 9000, 250_000], settings, prompt_id="w", eos_ids=[2])
    assert sum(row["n_steps"] for row in rows) == 12 and len(recorded) == 4
    # Spread distributions, where float32 sums over the vocabulary went wrong.
    assert min(h for row in rows for h in row["step_entropy"]) > 1.0
    worst_h, worst_lq = float64_errors(recorded, settings)
    tolerance = 1e-6 if case.startswith("full-vocabulary") else 1e-10
    assert worst_h < tolerance and worst_lq < tolerance, (worst_h, worst_lq)
