"""``sampling.<name>``: one sweep point, sampled (canopy.sampling) or filtered from another point's
rollouts by a reward model (canopy.filtering)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from canopy.config.base import Block
from canopy.config.types import (
    Device,
    NonEmptyStr,
    NonNegativeInt,
    PositiveInt,
    PositiveNumber,
    Share,
)

__all__ = ["BACKENDS", "DTYPES", "FilterSettings", "RewardModel", "SamplingSettings"]

BACKENDS: tuple[str, ...] = ("canopy", "vllm")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class RewardModel(Block):
    """A sequence-classification reward model with a chat template."""

    where = "sampling.<name>.filter.reward_model"

    model: NonEmptyStr
    """Hub id, model directory or package:<module>."""
    revision: NonEmptyStr | None = None
    """A hub id's revision (fetched into resources/classifiers/ by download_classifier)."""


class FilterSettings(Block):
    """``sampling.<name>.filter``: makes the entry a rollout filter instead of a sampling run: the
    reward model scores the rollouts of the entry ``from`` and each prompt's top ``keep`` share
    forms this sweep point (rule filter_rollouts). The sampling keys of a filter entry are not used.
    """

    where = "sampling.<name>.filter"

    source: NonEmptyStr = Field(alias="from")
    """The sampling entry whose rollouts are filtered."""
    reward_model: RewardModel
    keep: Share = 0.7
    """Share of each prompt's rollouts kept."""
    batch_size: PositiveInt = 8
    """(prompt, answer) pairs per forward pass."""
    max_length: PositiveInt = 4096
    """Tokens per (prompt, answer) pair; longer ones are cut from the end."""
    device: Device = "auto"
    dtype: Dtype = "auto"
    """auto: bfloat16 on CUDA, float32 on the CPU."""

    @property
    def model(self) -> str:
        return self.reward_model.model

    @property
    def revision(self) -> str | None:
        return self.reward_model.revision


class SamplingSettings(Block):
    """``sampling.<name>``: one sampling run (the paper's defaults); the key names a results folder."""

    where = "sampling.<name>"
    #: Keys added after finished runs existed: at their default they stay out of :meth:`to_dict`
    #: (what the rule's params and the shard fingerprints are made of), so those runs stay done.
    identity_when_set: ClassVar[tuple[str, ...]] = ("min_p",)

    rollouts: PositiveInt = 100
    temperature: PositiveNumber = 1.0
    top_k: NonNegativeInt = 100
    """0 turns top-k off."""
    top_p: Share = 1.0
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """0 turns min-p off. Drops each token whose probability (after the temperature) is below
    min_p times the most probable token's, as vLLM and transformers define it. Applied before
    top-k and top-p, in vLLM's order (canopy.sampling.transforms); transformers applies it after
    top-p, so the two differ when min_p and top_p are both on."""
    max_new_tokens: PositiveInt = 4000
    seed: int = 42
    backend: Literal["canopy", "vllm"] = "canopy"
    """canopy (our KV-cache sampler) or vllm (vLLM 0.32.0, whose sampler computes each step's
    entropy and log q through the canopy plugin; exact at every setting)."""
    device: Device = "auto"
    dtype: Dtype = "auto"
    max_batch_rows: NonNegativeInt | Literal["auto"] = "auto"
    """Rows of the continuous batch, filled with the rollouts of one prompt after another, rows of
    the next prompts admitted while earlier ones run. auto: as many as the memory left after the
    weights holds with every row at max_new_tokens (CUDA: the device's free memory; CPU: the
    job's memory limit (the cgroup Slurm sets from the profile's mem_mb) or the machine's
    available memory, whichever is less; with max_batch_tokens set, that many KV positions), at
    most the job's rollouts (canopy.sampling.batcher.auto_batch_rows). 0 = the rollout count.
    Never changes a token: set a number below auto's after running out of memory."""
    max_batch_tokens: NonNegativeInt = 0
    """KV-cache bound of the batch in token positions (what its rows hold): a row that needs more
    waits for others to end. 0 = admit rows while the cache holds no more than the
    one-prompt-at-a-time sampler would (canopy.sampling.batcher.default_kv_budget; 1.5 times
    that on CPU, where that sampler's re-allocated cache takes more memory than its positions).
    Never changes a token."""
    chunks: PositiveInt = 1
    """Sampling jobs per (model, task), each with its own prompts slice (and GPU on a cluster),
    gathered into the same rollout table as one job writes."""
    filter: FilterSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        """The sampling keys (not ``filter``), as plain values; those of
        :attr:`identity_when_set` only when they differ from their default."""
        values = self.to_config()
        values.pop("filter")
        for key in self.identity_when_set:
            if values[key] == type(self).model_fields[key].default:
                del values[key]
        return values
