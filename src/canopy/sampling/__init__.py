"""Rollouts with the exact entropy of every sampling step (resumable, batch-independent).

For every prompt we draw M rollouts from a causal LM and record, at every step t of every rollout,
the entropy h_t of the distribution q_t the token was actually drawn from (after temperature,
min-p, top-k and top-p, renormalised) and log q_t(y_t) of the drawn token.

Modules:

* :mod:`~canopy.sampling.settings` — ``SamplingSettings`` (one ``sampling.<name>`` entry) and errors;
* :mod:`~canopy.sampling.transforms` — the sampling transforms (temperature, min-p, top-k, top-p)
  and the distribution they make from a step's logits;
* :mod:`~canopy.sampling.distribution` — the full-vocabulary step, the float64 entropy and
  log q, the inverse-CDF draw, and the randomness that depends only on (seed, prompt, rollout,
  step);
* :mod:`~canopy.sampling.kernel` — one sampling step of a batch of rows;
* :mod:`~canopy.sampling.cache` — the KV caches (a prompt's prefill; the batch's length classes);
* :mod:`~canopy.sampling.batcher` — continuous batching of many prompts' rollouts;
* :mod:`~canopy.sampling.reference` — the one-prompt-at-a-time sampler, kept as the baseline;
* :mod:`~canopy.sampling.shards` — the rollout table's schema and per-prompt shards;
* :mod:`~canopy.sampling.task` — a prompts file to a rollout table, chunks and their gathering;
* :mod:`~canopy.sampling.backends` — the backend registry (``canopy``; ``vllm`` in
  :mod:`~canopy.sampling.vllm`, imported only when chosen);
* :mod:`~canopy.sampling.vllm_entropy` — the vLLM plugin that computes each step's entropy and
  log q inside vLLM's sampler (loaded by vLLM, never imported by the workflow).
"""

from canopy.sampling.batcher import BatchStats, PromptJob, sample_prompt, sample_prompts
from canopy.sampling.distribution import prompt_seed, step_uniforms
from canopy.sampling.kernel import check_prompt_fits
from canopy.sampling.reference import sample_prompt_dynamic
from canopy.sampling.settings import NonFiniteLogitsError, PromptTooLongError, SamplingSettings
from canopy.sampling.shards import ROLLOUT_SCHEMA, model_identity, shard_dir_for
from canopy.sampling.task import (
    chunk_prompts,
    chunk_table_path,
    gather_rollouts,
    read_prompts,
    sample_task,
)
from canopy.sampling.transforms import processed_distribution, processed_log_distribution

__all__ = [
    "BatchStats",
    "NonFiniteLogitsError",
    "PromptJob",
    "PromptTooLongError",
    "ROLLOUT_SCHEMA",
    "SamplingSettings",
    "check_prompt_fits",
    "chunk_prompts",
    "chunk_table_path",
    "gather_rollouts",
    "model_identity",
    "processed_distribution",
    "processed_log_distribution",
    "prompt_seed",
    "read_prompts",
    "sample_prompt",
    "sample_prompt_dynamic",
    "sample_prompts",
    "sample_task",
    "shard_dir_for",
    "step_uniforms",
]
