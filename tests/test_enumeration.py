"""Exact canopy enumeration against closed forms and brute force.

Everything else checks its estimators against the oracle in ``tests/support/enumeration.py``,
so it is checked here against truths that do not use it: closed forms for a memoryless model, and for a
model with memory a brute-force walk over every full-length token sequence.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pytest

from support.enumeration import enumerate_canopy, exact_canopy


def _entropy(q: np.ndarray) -> float:
    q = q[q > 0]
    return float(-(q * np.log(q)).sum())


def memoryless(p_eos: float, n_other: int):
    """Each step: EOS (the last id) with probability p_eos, else one of n_other tokens uniformly."""
    q = np.full(n_other + 1, (1 - p_eos) / n_other)
    q[-1] = p_eos
    return (lambda prefix: q), n_other, q


def with_memory(prefix: Sequence[int]) -> np.ndarray:
    """Vocabulary {0, 1, 2, EOS = 3}; the distribution depends on the whole prefix."""
    logits = np.array([0.4, -0.2, 0.1, -1.5])
    if prefix:
        logits[prefix[-1]] += 1.2  # repeat the last token
        logits[3] += 0.5 * len(prefix) - 0.3 * prefix.count(2)  # EOS later after many 2s
        if len(prefix) >= 2 and prefix[-2] == 0:
            logits[1] = -np.inf  # 1 never follows "0 ?": exercises zero-probability tokens
    q = np.exp(logits - logits[np.isfinite(logits)].max())
    return q / q.sum()


@pytest.mark.parametrize(
    ("p_eos", "n_other", "max_new_tokens"), [(0.3, 2, 5), (0.1, 3, 4), (0.9, 1, 6)]
)
def test_memoryless_canopy_matches_closed_forms(p_eos, n_other, max_new_tokens):
    model, _, q = memoryless(p_eos, n_other)
    leaves = enumerate_canopy(model, [n_other], max_new_tokens)
    canopy = exact_canopy(leaves)
    keep = 1 - p_eos
    h = _entropy(q)
    # leaves: an EOS leaf at every length 1..T (n_other^(n-1) of each) plus n_other^T truncated
    assert (
        len(leaves)
        == sum(n_other ** (n - 1) for n in range(1, max_new_tokens + 1)) + n_other**max_new_tokens
    )
    assert sum(leaf.prob for leaf in leaves) == pytest.approx(1.0, abs=1e-12)
    lengths = {n: keep ** (n - 1) * p_eos for n in range(1, max_new_tokens)}
    lengths[max_new_tokens] = keep ** (max_new_tokens - 1)
    assert canopy.length_distribution == pytest.approx(lengths, abs=1e-12)
    mean_length = sum(keep**k for k in range(max_new_tokens))
    assert canopy.mean_length == pytest.approx(mean_length, abs=1e-12)
    assert canopy.canopy_entropy == pytest.approx(h * mean_length, abs=1e-12)
    assert canopy.canopy_entropy_chain == pytest.approx(h * mean_length, abs=1e-12)
    assert canopy.mean_rate == pytest.approx(h, abs=1e-12)  # every rollout runs at rate h
    assert canopy.truncation_prob == pytest.approx(keep**max_new_tokens, abs=1e-12)
    assert canopy.length_entropy == pytest.approx(
        _entropy(np.array(list(lengths.values()))), abs=1e-12
    )
    assert all(leaf.step_entropies == (h,) * leaf.length for leaf in leaves)


def test_canopy_with_memory_matches_brute_force():
    """Walk all 4^T full sequences, cut each at its first EOS, and add up the leaf probabilities."""
    max_new_tokens = 5
    brute: dict[tuple[int, ...], float] = defaultdict(float)
    for sequence in itertools.product(range(4), repeat=max_new_tokens):
        prob, tokens = 1.0, []
        for token in sequence:
            prob *= with_memory(tokens)[token]
            tokens.append(token)
            if token == 3:
                break
        # the remaining positions are free: each distinct leaf is reached by 4^(T - len) sequences
        brute[tuple(tokens)] += prob / 4 ** (max_new_tokens - len(tokens))
    brute = {leaf: p for leaf, p in brute.items() if p > 0}

    leaves = enumerate_canopy(with_memory, [3], max_new_tokens)
    enumerated = {leaf.tokens: leaf.prob for leaf in leaves}
    assert set(enumerated) == set(brute)
    for tokens, prob in brute.items():
        assert enumerated[tokens] == pytest.approx(prob, rel=1e-12, abs=1e-15)
    assert not any(
        a == 0 and b == 1 for leaf in leaves for a, b in zip(leaf.tokens[:-2], leaf.tokens[2:])
    )

    canopy = exact_canopy(leaves)
    assert sum(enumerated.values()) == pytest.approx(1.0, abs=1e-12)
    assert canopy.canopy_entropy == pytest.approx(
        _entropy(np.array(list(brute.values()))), abs=1e-12
    )
    # chain rule: the entropy of the leaf distribution equals the expected summed step entropy
    assert canopy.canopy_entropy == pytest.approx(canopy.canopy_entropy_chain, abs=1e-12)
    for leaf in leaves:
        expected = [_entropy(with_memory(leaf.tokens[:t])) for t in range(leaf.length)]
        assert leaf.step_entropies == pytest.approx(expected, abs=1e-15)
    truncated = sum(p for tokens, p in brute.items() if tokens[-1] != 3)
    assert canopy.truncation_prob == pytest.approx(truncated, abs=1e-12)
    assert 0.01 < canopy.truncation_prob < 0.9
    by_length: dict[int, float] = defaultdict(float)
    for tokens, p in brute.items():
        by_length[len(tokens)] += p
    assert canopy.length_distribution == pytest.approx(dict(by_length), abs=1e-12)
    assert canopy.mean_length == pytest.approx(sum(n * p for n, p in by_length.items()), abs=1e-12)
    assert canopy.mean_rate == pytest.approx(
        sum(leaf.prob * leaf.sum_entropy / leaf.length for leaf in leaves), abs=1e-12
    )
    # H(N, Y) = H(N) + H(Y | N), H(Y | N) computed length by length
    h_y_given_n = sum(
        p_n * _entropy(np.array([p for t, p in brute.items() if len(t) == n]) / p_n)
        for n, p_n in by_length.items()
    )
    assert canopy.conditional_entropy_given_length == pytest.approx(h_y_given_n, abs=1e-12)


def test_several_eos_ids_end_rollouts():
    model, _, _ = memoryless(0.5, 3)  # ids 0..2 ordinary, 3 EOS; also treat 0 as an EOS
    leaves = enumerate_canopy(model, [0, 3], 3)
    assert all(leaf.tokens[-1] in (0, 3) or leaf.length == 3 for leaf in leaves)
    assert all(t not in (0, 3) for leaf in leaves for t in leaf.tokens[:-1])
    assert exact_canopy(leaves).truncation_prob == pytest.approx((2 / 6) ** 3, abs=1e-12)


def test_pruning_drops_mass_and_bad_input_is_rejected():
    leaves = enumerate_canopy(with_memory, [3], 5, min_prob=1e-3)
    total = sum(leaf.prob for leaf in leaves)
    assert 0.9 < total < 1.0
    assert all(leaf.prob > 1e-3 for leaf in leaves)
    with pytest.raises(ValueError, match="max_new_tokens"):
        enumerate_canopy(with_memory, [3], 0)
    with pytest.raises(ValueError, match="not a probability vector"):
        enumerate_canopy(lambda prefix: np.array([0.5, 0.6]), [1], 2)
    with pytest.raises(ValueError, match="not a probability vector"):
        enumerate_canopy(lambda prefix: np.array([math.nan, 1.0]), [1], 2)
