"""One sampling step of a batch of rows, and the checks and rows shared by every sampler."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from canopy.modeling import context_length
from canopy.sampling.distribution import entropy_and_logprob, full_vocabulary_step, inverse_cdf
from canopy.sampling.settings import NonFiniteLogitsError, PromptTooLongError, SamplingSettings
from canopy.sampling.transforms import active_filters, processed_log_distribution

__all__ = ["StepResult", "sample_step", "check_prompt_fits", "rollout_row"]


class StepResult:
    """Host copies of one step: drawn token ids (torch, on the device too), h_t and log q_t(y_t)."""

    __slots__ = ("drawn", "drawn_cpu", "entropy", "logprob")

    def __init__(self, drawn: torch.Tensor, entropy: np.ndarray, logprob: np.ndarray) -> None:
        self.drawn = drawn
        self.drawn_cpu = drawn.cpu()
        self.entropy = entropy
        self.logprob = logprob


def sample_step(
    logits: torch.Tensor,
    uniforms: np.ndarray,
    settings: SamplingSettings,
    describe_bad_rows: Any,
) -> StepResult:
    """Draw one token per row of ``logits`` [rows, vocab] with the given uniforms, by inverse CDF
    of the sampling point's distribution (:mod:`canopy.sampling.transforms`), and return the
    draws with the step's entropies and log-probs (float64, see
    :mod:`canopy.sampling.distribution`). With no filter on, the whole vocabulary is drawn from
    by :func:`full_vocabulary_step`; otherwise from the filters' float64 candidates.

    ``describe_bad_rows(bad: np.ndarray) -> str`` names the rows with non-finite logits (prompt,
    step, rollouts) for the error raised then. A NaN or +inf logit always makes the row's entropy
    non-finite: the full-vocabulary pass propagates it through the row's maximum, and the
    candidates' ranking puts NaN and +inf first, so no separate pass over the logits looks for
    them.
    """
    u = torch.from_numpy(uniforms).to(logits.device)
    if not active_filters(settings):
        drawn, h, drawn_log_q = full_vocabulary_step(logits, settings.temperature, u)
    else:
        log_q, ids = processed_log_distribution(logits, settings)
        choice = inverse_cdf(log_q.exp(), u)
        h, drawn_log_q = entropy_and_logprob(log_q, choice)
        drawn = ids.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    bad = ~torch.isfinite(h) | ~torch.isfinite(drawn_log_q)
    result = StepResult(drawn, h.cpu().numpy(), drawn_log_q.cpu().numpy())
    if bool(bad.any()):
        raise NonFiniteLogitsError(
            f"{describe_bad_rows(bad.cpu().numpy())}: non-finite logits (NaN or +inf). This "
            "usually means float16 overflow: try dtype bfloat16 or float32."
        )
    return result


def check_prompt_fits(
    model: Any, prompt_length: int, settings: SamplingSettings, prompt_id: str
) -> None:
    """Raise :class:`PromptTooLongError` if the prompt leaves no room for max_new_tokens.

    ``model`` is anything with a transformers ``config`` attribute (a model or a light holder).
    We raise instead of capping max_new_tokens for that prompt, because a silently lower cap would
    change what "truncated" means for some prompts only.
    """
    limit = context_length(model)
    if limit is not None and prompt_length + settings.max_new_tokens > limit:
        raise PromptTooLongError(
            f"prompt {prompt_id!r} has {prompt_length} tokens, which with max_new_tokens="
            f"{settings.max_new_tokens} exceeds the model's context of {limit} tokens "
            "(max_position_embeddings). Shorten or drop the prompt, or lower max_new_tokens."
        )


def rollout_row(
    prompt_id: str,
    sample: int,
    prompt_tokens: int,
    tokens: Sequence[int],
    entropies: Sequence[float],
    logprobs: Sequence[float],
    hit_eos: bool,
) -> dict[str, Any]:
    """One row of the rollout table (``text`` left empty: the caller decodes)."""
    return {
        "prompt_id": prompt_id,
        "sample": sample,
        "prompt_tokens": prompt_tokens,
        "n_steps": len(tokens),
        "hit_eos": hit_eos,
        "truncated": not hit_eos,
        "step_entropy": list(entropies),
        "step_logprob": list(logprobs),
        "sum_entropy": float(math.fsum(entropies)),
        "sum_logprob": float(math.fsum(logprobs)),
        "token_ids": list(tokens),
        "text": "",
    }
