"""The sampling transforms: how a model's logits become the distribution a rollout draws from.

A sampling point's distribution is softmax(logits / temperature) with the tokens its filters drop
removed and the rest renormalised. The filters, in the order they apply:

1. **min-p** (``min_p``): drop each token whose probability is below min_p times the largest one;
2. **top-k** (``top_k``): keep the k most probable tokens;
3. **top-p** (``top_p``, nucleus): keep the smallest prefix of the tokens, most probable first,
   whose renormalised mass reaches top_p (the token that crosses it is kept).

This is the order of vLLM 0.32's V1 sampler (temperature, then its min-p logits processor, then
top-k and top-p), so that both backends draw from the same distribution. transformers' ``generate``
applies min-p last, after top-p; the two orders agree except when min-p and top-p are both on
(min-p and top-k commute: a token's probability relative to the largest survives any
renormalisation, and both keep a prefix of the tokens ranked by probability).

Each filter is a :class:`Filter` that knows its config key's "off" value (:func:`active_filters`
is the one place that decides whether any filter is on), how many of the top-ranked candidates
can survive it, which candidates it drops, and how vLLM's ``SamplingParams`` spell it. Adding a
filter is one class here, its key in the config model and its test.

With no filter on, the kernel draws over the whole vocabulary with
:func:`canopy.sampling.distribution.full_vocabulary_step`. With filters, the candidates (the top
``width`` tokens of each row, ranked by the float32 logits / temperature, or the whole sorted
vocabulary) are processed in float64: their logits divided by the temperature in float64, each
filter's drop mask applied in turn, then one log-softmax; the entropy and log q come from that one
float64 reduction (:func:`canopy.sampling.distribution.entropy_and_logprob`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from canopy.sampling.settings import SamplingSettings

__all__ = [
    "Filter",
    "MinP",
    "TopK",
    "TopP",
    "active_filters",
    "processed_distribution",
    "processed_log_distribution",
    "vllm_sampling_params",
]


class Filter(ABC):
    """One filtering transform, applied after the temperature."""

    def width(self, vocab: int) -> int | None:
        """How many of the top-ranked candidates can survive (None: any of the vocabulary)."""
        return None

    @abstractmethod
    def drop(self, values: torch.Tensor) -> torch.Tensor | None:
        """Which candidates to drop (bool, True = dropped), or None for none.

        ``values`` [rows, K]: the candidates' logits / temperature in float64, ranked by
        decreasing probability, -inf where an earlier filter dropped one.
        """

    @abstractmethod
    def vllm_params(self) -> dict[str, Any]:
        """The filter as keyword arguments of vLLM's ``SamplingParams``."""


@dataclass(frozen=True)
class MinP(Filter):
    """Drop tokens whose probability is below ``share`` times the row's largest probability."""

    share: float

    # No width: how many tokens survive differs from row to row, and a batch-wide top-K sized by
    # its rows could order a row's tied logits differently in another batch, changing its draw.
    # Alone (or with top-p alone), the whole vocabulary is sorted, as for top-p.

    def drop(self, values: torch.Tensor) -> torch.Tensor:
        # A ratio of two probabilities is that of their unnormalised weights, so no normaliser.
        largest = values.amax(dim=-1, keepdim=True)
        return torch.exp(values - largest) < self.share

    def vllm_params(self) -> dict[str, Any]:
        return {"min_p": self.share}


@dataclass(frozen=True)
class TopK(Filter):
    """Keep the ``k`` most probable tokens."""

    k: int

    def width(self, vocab: int) -> int | None:
        return self.k if self.k < vocab else None

    def drop(self, values: torch.Tensor) -> torch.Tensor | None:
        # Candidates come ranked, so top-k is a column cut (a no-op when only k were taken).
        if values.shape[-1] <= self.k:
            return None
        columns = torch.arange(values.shape[-1], device=values.device)
        return (columns >= self.k).expand(values.shape)

    def vllm_params(self) -> dict[str, Any]:
        return {"top_k": self.k}


@dataclass(frozen=True)
class TopP(Filter):
    """Keep the smallest ranked prefix whose renormalised mass reaches ``mass``."""

    mass: float

    def drop(self, values: torch.Tensor) -> torch.Tensor:
        q = torch.log_softmax(values, dim=-1).exp()
        mass_before = torch.cumsum(q, dim=-1) - q
        return mass_before >= self.mass

    def vllm_params(self) -> dict[str, Any]:
        return {"top_p": self.mass}


def active_filters(settings: SamplingSettings) -> tuple[Filter, ...]:
    """The filters a sampling point turns on, in the order they apply (empty: the whole
    vocabulary). ``top_k: 0``, ``top_p: 1`` and ``min_p: 0`` are off."""
    filters: list[Filter] = []
    if settings.min_p > 0.0:
        filters.append(MinP(settings.min_p))
    if settings.top_k > 0:
        filters.append(TopK(settings.top_k))
    if settings.top_p < 1.0:
        filters.append(TopP(settings.top_p))
    return tuple(filters)


def vllm_sampling_params(settings: SamplingSettings) -> dict[str, Any]:
    """The sampling point's distribution as keyword arguments of vLLM's ``SamplingParams``: the
    temperature and each active filter (vLLM's own defaults leave the others off)."""
    params: dict[str, Any] = {"temperature": settings.temperature}
    for item in active_filters(settings):
        params.update(item.vllm_params())
    return params


def _ranking_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The float32 values candidates are ranked by (the model's logits / temperature): the order
    the sampler has always used, so the filters keep the same candidates in the same order."""
    if logits.dtype == torch.float32 and temperature == 1.0:
        return logits  # dividing by one is exact: no copy
    return logits.float() / temperature


def processed_log_distribution(
    logits: torch.Tensor, settings: SamplingSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [B, K] (float64, -inf where dropped) and token ids [B, K] of the
    sampling point's distribution over the rows of ``logits`` [B, vocab].

    With no filter on, K = vocab and the ids are 0..V-1. Otherwise the candidates come ranked by
    decreasing probability: K is the narrowest filter's width (top-k's k), else the vocabulary.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    temperature = settings.temperature
    filters = active_filters(settings)
    vocab = logits.shape[-1]
    if not filters:
        ids = torch.arange(vocab, device=logits.device).expand(logits.shape)
        return torch.log_softmax(logits.double() / temperature, dim=-1), ids
    widths = [w for w in (item.width(vocab) for item in filters) if w is not None]
    ranking = _ranking_logits(logits, temperature)
    if widths:
        ids = torch.topk(ranking, min(widths), dim=-1, sorted=True).indices
    else:
        ids = torch.sort(ranking, dim=-1, descending=True).indices
    values = logits.gather(-1, ids).double() / temperature
    for item in filters:
        dropped = item.drop(values)
        if dropped is not None:
            values = values.masked_fill(dropped, -math.inf)
    return torch.log_softmax(values, dim=-1), ids


def processed_distribution(
    logits: torch.Tensor, settings: SamplingSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [B, K] (float64, rows sum to one, zeros where a filter dropped a candidate)
    and the token ids [B, K] they belong to: the distribution each rollout actually samples from."""
    log_q, ids = processed_log_distribution(logits, settings)
    return log_q.exp(), ids
