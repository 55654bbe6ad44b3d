"""One ``sampling.<name>`` entry of the config, validated, and the errors sampling raises."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BACKENDS",
    "DTYPES",
    "NonFiniteLogitsError",
    "PromptTooLongError",
    "SamplingSettings",
    "TOKEN_NEUTRAL_SETTINGS",
]

BACKENDS: tuple[str, ...] = ("canopy", "vllm")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")

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


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN or +inf logits (usually fp16 overflow)."""


class PromptTooLongError(ValueError):
    """A prompt leaves no room for max_new_tokens within the model's context."""


@dataclass(frozen=True)
class SamplingSettings:
    """One ``sampling.<name>`` entry of config.yaml (the paper's defaults)."""

    rollouts: int = 100
    temperature: float = 1.0
    top_k: int = 100  # 0 turns top-k off
    top_p: float = 1.0
    max_new_tokens: int = 4000
    seed: int = 42
    backend: str = "canopy"
    device: str = "auto"
    dtype: str = "auto"
    # Rows of the continuous batch (rollouts of one or more prompts); 0: the rollout count M.
    max_batch_rows: int = 0
    # KV-cache positions the batch's rows may hold at once (its paged pool); 0: what the
    # one-prompt-at-a-time sampler holds (see canopy.sampling.batcher.default_pool_tokens).
    max_batch_tokens: int = 0
    # Sampling jobs a task's prompts are split into (gathered into one table).
    chunks: int = 1

    def __post_init__(self) -> None:
        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"sampling setting {name} must be an integer >= {minimum}, got {value!r}"
                )

        def number(name: str) -> float:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"sampling setting {name} must be a finite number, got {value!r}")
            return float(value)

        integer("rollouts", 1)
        integer("top_k", 0)
        integer("max_new_tokens", 1)
        integer("seed", -(2**63))
        integer("max_batch_rows", 0)
        integer("max_batch_tokens", 0)
        integer("chunks", 1)
        # Store floats as floats: YAML's `temperature: 1` must fingerprint like 1.0.
        object.__setattr__(self, "temperature", number("temperature"))
        object.__setattr__(self, "top_p", number("top_p"))
        if number("temperature") <= 0:
            raise ValueError(f"sampling setting temperature must be > 0, got {self.temperature!r}")
        top_p = number("top_p")
        if not 0 < top_p <= 1:
            raise ValueError(f"sampling setting top_p must be in (0, 1], got {self.top_p!r}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"sampling setting backend must be one of {BACKENDS}, got {self.backend!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"sampling setting dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"sampling setting device must be auto, cpu or cuda[:i], got {self.device!r}"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SamplingSettings:
        """Settings from a config mapping; unknown keys are an error that names them."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"unknown sampling setting(s) {', '.join(unknown)}; known keys are "
                f"{', '.join(sorted(known))}"
            )
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
