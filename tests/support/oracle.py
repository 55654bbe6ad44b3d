"""The float64 sampling oracle of the exactness tests: a sampling point's distribution over the
whole vocabulary, computed in numpy from a step's logits, independently of the library's torch
path (no candidate ranking in float32, no block sums, no shared code).

It applies the sampling transforms in the library's order (canopy.sampling.transforms):
temperature, min-p, top-k, top-p. Top-k and top-p rank tokens by a stable float64 argsort, which
agrees with the sampler's ranking unless logits tie where a filter cuts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from canopy.sampling import SamplingSettings

__all__ = [
    "float64_errors",
    "next_distribution_from",
    "oracle_distribution",
    "record_sampling_steps",
]


def _row_distribution(scaled: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """q over one row of logits / temperature (float64), every filter applied in turn."""
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    keep = np.ones(p.shape, dtype=bool)
    if settings.min_p > 0:
        keep &= p >= settings.min_p * p.max()
    order = np.argsort(-scaled, kind="stable")
    if settings.top_k > 0:
        keep[order[settings.top_k :]] = False
    if settings.top_p < 1:
        ranked = order[keep[order]]
        kept = p[ranked] / p[ranked].sum()
        before = np.cumsum(kept) - kept
        keep[ranked[before >= settings.top_p]] = False
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def oracle_distribution(
    logits: torch.Tensor | np.ndarray, settings: SamplingSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``logits`` [rows, vocab]: q over the vocabulary (float64, zeros where a filter
    dropped a token) and its entropy, from the logits the sampler received."""
    if isinstance(logits, torch.Tensor):
        logits = logits.double().numpy()
    scaled = np.asarray(logits, dtype=np.float64) / settings.temperature
    q = np.stack([_row_distribution(row, settings) for row in scaled])
    kept = q > 0
    entropy = -np.where(kept, q * np.log(np.where(kept, q, 1.0)), 0.0).sum(axis=1)
    return q, entropy


def next_distribution_from(
    model: Any, settings: SamplingSettings, prompt: Sequence[int]
) -> Callable[[Sequence[int]], np.ndarray]:
    """prefix -> the exact q_t(. | prompt + prefix) over the vocabulary, from an uncached forward
    pass of ``model`` (what the enumeration of a small model's canopy takes)."""

    def next_distribution(prefix: Sequence[int]) -> np.ndarray:
        ids = torch.tensor([list(prompt) + list(prefix)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :]
        return oracle_distribution(logits, settings)[0][0]

    return next_distribution


def record_sampling_steps(monkeypatch: Any) -> list[tuple[torch.Tensor, np.ndarray, Any]]:
    """Record every call of the sampling kernel inside the batcher: (the logits it received, its
    uniforms, its StepResult)."""
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
    """Largest |h_t - oracle h_t| and |log q_t(y_t) - oracle| over the recorded steps, each from
    the logits that step received. Every drawn token must be one the oracle keeps; with no filter
    on, every draw must also be the float64 inverse-CDF draw of its uniform (in token order, as
    the sampler draws then)."""
    worst_h = worst_lq = 0.0
    unfiltered = settings.top_k == 0 and settings.top_p >= 1 and settings.min_p == 0
    for logits, uniforms, result in recorded:
        q, entropy = oracle_distribution(logits, settings)
        tokens = result.drawn_cpu.numpy()
        drawn_q = q[np.arange(len(tokens)), tokens]
        assert (drawn_q > 0).all(), "a token the oracle drops was drawn"
        worst_h = max(worst_h, float(np.abs(result.entropy - entropy).max()))
        worst_lq = max(worst_lq, float(np.abs(result.logprob - np.log(drawn_q)).max()))
        if unfiltered:
            cdf = np.cumsum(q, axis=1)
            expected = [np.searchsorted(c, u * c[-1], side="right") for c, u in zip(cdf, uniforms)]
            assert tokens.tolist() == expected
    return worst_h, worst_lq
