"""The distribution actually sampled from at one step, its entropy, and the draw from it.

Randomness depends only on (seed, prompt_id, rollout, step): ``prompt_seed`` derives a per-prompt
seed with SHA-256 (stable across processes, unlike ``hash()``), and ``step_uniforms`` draws the
uniforms of all M rollouts of a prompt at one step from a generator seeded by (prompt seed, step).
Rollout i uses the i-th uniform and samples by inverse CDF, so batching, compaction, chunking and
the order or subset of prompts never change which token it draws.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from canopy.sampling.settings import SamplingSettings

__all__ = [
    "processed_log_distribution",
    "processed_distribution",
    "entropy_from_log",
    "inverse_cdf",
    "prompt_seed",
    "step_uniforms",
]


def processed_log_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [B, K] (float32, -inf where dropped) and token ids [B, K] of the processed
    distribution: temperature, then top-k, then top-p (nucleus), renormalised.

    With top-k on, K = top_k and the candidates come sorted by decreasing probability; with both
    filters off, K = vocab and the ids are simply 0..V-1. Top-p keeps the smallest prefix of the
    sorted candidates whose mass reaches ``top_p`` (the token that crosses it is kept).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    if top_k == 0 and top_p >= 1.0:
        ids = torch.arange(vocab, device=scaled.device).expand_as(scaled)
        return torch.log_softmax(scaled, dim=-1), ids
    if 0 < top_k < vocab:
        values, ids = torch.topk(scaled, top_k, dim=-1, sorted=True)
    else:
        values, ids = torch.sort(scaled, dim=-1, descending=True)
    log_q = torch.log_softmax(values, dim=-1)
    if top_p < 1.0:
        q = log_q.exp()
        mass_before = torch.cumsum(q, dim=-1) - q
        values = values.masked_fill(mass_before >= top_p, float("-inf"))
        log_q = torch.log_softmax(values, dim=-1)
    return log_q, ids


def processed_distribution(
    logits: torch.Tensor, settings: SamplingSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [B, K] (float32, rows sum to one, zeros where top-p dropped a candidate) and
    the token ids [B, K] they belong to: the distribution each rollout actually samples from."""
    log_q, ids = processed_log_distribution(
        logits, settings.temperature, settings.top_k, settings.top_p
    )
    return log_q.exp(), ids


def entropy_from_log(log_q: torch.Tensor) -> torch.Tensor:
    """-sum q log q per row, with 0 log 0 = 0 (dropped candidates carry -inf)."""
    q = log_q.exp()
    return -torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(dim=-1)


def inverse_cdf(q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column index drawn from each row of ``q`` by inverse CDF with the given uniforms in [0, 1).

    The cumulative sum is taken in float64; searching with ``right=True`` never lands on a
    zero-probability column, and the clamp guards the case where rounding puts u * total on the
    total itself.
    """
    cdf = torch.cumsum(q.double(), dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    positive = q > 0
    last_positive = q.shape[-1] - 1 - torch.argmax(positive.flip(-1).to(torch.int8), dim=-1)
    return torch.minimum(choice, last_positive)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A 63-bit seed for one prompt, stable across processes and machines (SHA-256)."""
    digest = hashlib.sha256(f"canopy-sampling\x00{int(seed)}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_uniforms(seed_of_prompt: int, step: int, rollouts: int) -> np.ndarray:
    """The uniforms in [0, 1) of all M rollouts at step ``step`` (0-based), float64.

    Drawn for all M rollouts from a generator seeded by (prompt seed, step), so rollout i's number
    at step t is the same however the rollouts are batched or which of them are still running.
    """
    return np.random.default_rng([seed_of_prompt, step]).random(rollouts)
