"""One ``sampling.<name>`` entry of the config (its model is in canopy.config) and the errors
sampling raises."""

from __future__ import annotations

from canopy.config.sampling import BACKENDS, DTYPES, SamplingSettings

__all__ = [
    "BACKENDS",
    "DTYPES",
    "BatchOutOfMemoryError",
    "NonFiniteLogitsError",
    "PromptTooLongError",
    "SamplingSettings",
    "TOKEN_NEUTRAL_SETTINGS",
    "fixed_batch_rows",
]


#: Settings that decide how the work is laid out, never which tokens are drawn: they stay out of
#: the shard fingerprint, so that a rerun with a smaller batch (after running out of memory) or
#: another chunking keeps the prompts already done. device and dtype enter it resolved instead.
TOKEN_NEUTRAL_SETTINGS: tuple[str, ...] = (
    "max_batch_rows",
    "max_batch_tokens",
    "chunks",
    "device",
    "dtype",
)


def fixed_batch_rows(settings: SamplingSettings) -> int | None:
    """The rows ``max_batch_rows`` fixes (0: the rollout count), or None for ``auto``, which each
    backend sizes itself (the canopy batcher from the memory left, vLLM's scheduler within its KV
    cache)."""
    if settings.max_batch_rows == "auto":
        return None
    return settings.max_batch_rows or settings.rollouts


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or +inf logits (usually fp16 overflow)."""


class BatchOutOfMemoryError(MemoryError):
    """The batch ran out of memory; the message names the batch size and what to lower."""


class PromptTooLongError(ValueError):
    """A prompt leaves no room for max_new_tokens within the model's context."""
