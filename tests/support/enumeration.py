"""Exact canopies by enumeration: the ground truth every estimator is checked against.

For a model with a tiny vocabulary and a short ``max_new_tokens`` the tree of all rollouts (the
canopy) is small enough to walk completely. Each leaf is a rollout that ends at its first
end-of-sequence token or at ``max_new_tokens``; its probability is the product of the sampled
distributions along the way. From the leaves we get the exact Canopy Entropy H(N, Y | X), the
length distribution and its entropy H(N), E[N], E[r_N] and the truncation probability.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CanopyLeaf", "ExactCanopy", "enumerate_canopy", "exact_canopy"]

#: Given the tokens generated so far, return the distribution actually sampled from at the next
#: step (after temperature, top-k and top-p), as probabilities over the whole vocabulary.
NextTokenDistribution = Callable[[Sequence[int]], np.ndarray]


@dataclass(frozen=True)
class CanopyLeaf:
    """One complete rollout of the canopy."""

    tokens: tuple[int, ...]
    prob: float
    step_entropies: tuple[float, ...]
    hit_eos: bool

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def sum_entropy(self) -> float:
        return float(sum(self.step_entropies))


@dataclass(frozen=True)
class ExactCanopy:
    """Exact canopy quantities of one prompt (natural logarithms)."""

    leaves: tuple[CanopyLeaf, ...]
    canopy_entropy: float  # H(N, Y_1:N | X) = -sum p log p over leaves
    canopy_entropy_chain: float  # E[sum_t h_t]: equal to the above by the chain rule
    length_entropy: float  # H(N)
    mean_length: float  # E[N]
    mean_rate: float  # E[H_i / N_i], the expected per-rollout entropy rate
    length_distribution: dict[int, float]
    truncation_prob: float  # P(N = max_new_tokens without EOS)

    @property
    def conditional_entropy_given_length(self) -> float:
        """H(Y | N) = H(N, Y) - H(N)."""
        return self.canopy_entropy - self.length_entropy


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def enumerate_canopy(
    next_distribution: NextTokenDistribution,
    eos_ids: Iterable[int],
    max_new_tokens: int,
    *,
    min_prob: float = 0.0,
    ends: Callable[[tuple[int, ...]], bool] | None = None,
) -> list[CanopyLeaf]:
    """Walk every rollout of the canopy depth-first.

    ``min_prob`` prunes branches whose probability falls below it; leave it at 0 for an exact
    canopy (then the leaf probabilities sum to one up to rounding). ``ends(tokens)``, a further
    stopping rule on the prefix (a stop sequence), ends a rollout there as EOS does.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    eos = frozenset(int(e) for e in eos_ids)
    leaves: list[CanopyLeaf] = []
    stack: list[tuple[tuple[int, ...], float, tuple[float, ...]]] = [((), 1.0, ())]
    while stack:
        prefix, prob, entropies = stack.pop()
        q = np.asarray(next_distribution(prefix), dtype=np.float64)
        if q.ndim != 1 or not np.isfinite(q).all() or abs(q.sum() - 1.0) > 1e-6:
            raise ValueError(f"next_distribution({prefix}) is not a probability vector")
        h = _entropy(q)
        for token in np.flatnonzero(q > 0):
            token = int(token)
            p = prob * float(q[token])
            if p <= min_prob:
                continue
            tokens = prefix + (token,)
            step_entropies = entropies + (h,)
            if token in eos or (ends is not None and ends(tokens)):
                leaves.append(CanopyLeaf(tokens, p, step_entropies, hit_eos=True))
            elif len(tokens) == max_new_tokens:
                leaves.append(CanopyLeaf(tokens, p, step_entropies, hit_eos=False))
            else:
                stack.append((tokens, p, step_entropies))
    return leaves


def exact_canopy(leaves: Sequence[CanopyLeaf]) -> ExactCanopy:
    """Exact canopy quantities from a complete list of leaves."""
    probs = np.array([leaf.prob for leaf in leaves], dtype=np.float64)
    lengths = np.array([leaf.length for leaf in leaves], dtype=np.float64)
    sums = np.array([leaf.sum_entropy for leaf in leaves], dtype=np.float64)
    length_dist: dict[int, float] = defaultdict(float)
    for leaf in leaves:
        length_dist[leaf.length] += leaf.prob
    return ExactCanopy(
        leaves=tuple(leaves),
        canopy_entropy=_entropy(probs),
        canopy_entropy_chain=float((probs * sums).sum()),
        length_entropy=_entropy(np.array(list(length_dist.values()))),
        mean_length=float((probs * lengths).sum()),
        mean_rate=float((probs * sums / lengths).sum()),
        length_distribution=dict(sorted(length_dist.items())),
        truncation_prob=float(sum(leaf.prob for leaf in leaves if not leaf.hit_eos)),
    )
