"""The sampler against the exact canopy of a real transformers model with a 5-token vocabulary.

The next-token distributions for the enumeration come from full forward passes of the model on
prompt + prefix (no KV cache, no batching, no compaction) passed through processed_distribution;
the sampler's cached, batched, compacting loop must reproduce them step by step, and its rollout
frequencies must follow the enumerated leaf probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from support.enumeration import enumerate_canopy, exact_canopy
from canopy.modeling import LoadedModel
from canopy.sampling import SamplingSettings, processed_distribution, sample_prompt
from support.models import build_gpt2, build_llama

VOCAB = 5
EOS_IDS = [3, 4]  # two end-of-sequence ids, as real instruct models have
PROMPT = [1, 0, 2]
MAX_NEW = 5
SAMPLES = 4000


def next_distribution_from(model, settings: SamplingSettings, prompt: list[int] = PROMPT):
    """Exact q_t(. | prefix) over the whole vocabulary, from an uncached forward pass."""

    def next_distribution(prefix) -> np.ndarray:
        ids = torch.tensor([prompt + list(prefix)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :]
        probs, token_ids = processed_distribution(logits, settings)
        full = np.zeros(model.config.vocab_size)
        full[token_ids[0].numpy()] = probs[0].double().numpy()
        return full / full.sum()  # float32 -> float64 rounding only

    return next_distribution


CASES = {
    "llama-filters-off": (build_llama, dict(temperature=1.0, top_k=0, top_p=1.0)),
    "llama-filters-on": (build_llama, dict(temperature=0.7, top_k=3, top_p=0.8)),
    "gpt2-temperature-topp": (build_gpt2, dict(temperature=1.3, top_k=0, top_p=0.9)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_matches_the_enumerated_canopy(case: str) -> None:
    builder, filters = CASES[case]
    model = builder(VOCAB, hidden=16, seed=3)
    settings = SamplingSettings(
        rollouts=SAMPLES, max_new_tokens=MAX_NEW, seed=11, max_batch_rows=1500, **filters
    )
    leaves = enumerate_canopy(next_distribution_from(model, settings), EOS_IDS, MAX_NEW)
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


def float64_truth(
    logits: torch.Tensor, temperature: float, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``logits`` [rows, vocab]: q (float64, over the vocabulary) and its entropy,
    computed in numpy from the logits the sampler received (top-k by a stable argsort, which
    agrees with torch.topk unless logits tie at the k-th place)."""
    scaled = logits.double().numpy() / temperature
    if top_k:
        dropped = np.argsort(-scaled, axis=1, kind="stable")[:, top_k:]
        np.put_along_axis(scaled, dropped, -np.inf, axis=1)
    q = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    kept = q > 0
    entropy = -np.where(kept, q * np.log(np.where(kept, q, 1.0)), 0.0).sum(axis=1)
    return q, entropy


def record_sampling_steps(monkeypatch) -> list[tuple[torch.Tensor, np.ndarray, Any]]:
    """Record every call of the sampling kernel inside the batcher: (the logits it received,
    its uniforms, its StepResult). Also for the real-weights tier."""
    from canopy.sampling import batcher as batcher_module

    recorded = []
    kernel = batcher_module.sample_step

    def recording_step(logits, uniforms, settings, describe):
        result = kernel(logits, uniforms, settings, describe)
        recorded.append((logits.clone(), uniforms.copy(), result))
        return result

    monkeypatch.setattr(batcher_module, "sample_step", recording_step)
    return recorded


def float64_errors(recorded, settings: SamplingSettings) -> tuple[float, float]:
    """Largest |h_t - float64 h_t| and |log q_t(y_t) - float64| over the recorded steps, each
    from the logits that step received; with top-k off, every draw must also be the float64
    inverse-CDF draw of its uniform (in token order, as the sampler draws then)."""
    worst_h = worst_lq = 0.0
    for logits, uniforms, result in recorded:
        q, entropy = float64_truth(logits, settings.temperature, settings.top_k)
        tokens = result.drawn_cpu.numpy()
        worst_h = max(worst_h, float(np.abs(result.entropy - entropy).max()))
        drawn_log_q = np.log(q[np.arange(len(tokens)), tokens])
        worst_lq = max(worst_lq, float(np.abs(result.logprob - drawn_log_q).max()))
        if settings.top_k == 0:
            cdf = np.cumsum(q, axis=1)
            expected = [np.searchsorted(c, u * c[-1], side="right") for c, u in zip(cdf, uniforms)]
            assert tokens.tolist() == expected
    return worst_h, worst_lq


@pytest.mark.parametrize("top_k, temperature", [(0, 1.0), (0, 0.8), (100, 1.0)])
def test_every_step_is_float64_exact_on_a_262k_vocabulary(
    wide_model, monkeypatch, top_k: int, temperature: float
) -> None:
    """Each step's entropy and drawn log-probability equal a float64 computation from the very
    logits that step sampled from to 1e-6 (the earlier float32 reductions: 1.1e-5 here)."""
    recorded = record_sampling_steps(monkeypatch)
    settings = SamplingSettings(
        rollouts=3, max_new_tokens=4, top_k=top_k, temperature=temperature, seed=8
    )
    loaded = LoadedModel(
        model=wide_model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32
    )
    rows = sample_prompt(loaded, [1, 17, 9000, 250_000], settings, prompt_id="w", eos_ids=[2])
    assert sum(row["n_steps"] for row in rows) == 12 and len(recorded) == 4
    # Spread distributions, where float32 sums over the vocabulary went wrong.
    assert min(h for row in rows for h in row["step_entropy"]) > 1.0
    worst_h, worst_lq = float64_errors(recorded, settings)
    assert worst_h < 1e-6 and worst_lq < 1e-6, (worst_h, worst_lq)
