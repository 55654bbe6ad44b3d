"""The one-prompt-at-a-time sampler (the project's first sampler), kept as the named baseline.

It runs one prompt at a time with transformers' ``DynamicCache``: the prompt is prefilled once,
its cache expanded to the rollouts of a batch (all M, or ``max_batch_rows`` at a time), and rows
leave the batch as their rollouts end, so the batch shrinks towards the prompt's longest rollout
and the cache grows by concatenation (a copy of the whole cache at every step). The continuous
batcher (:mod:`canopy.sampling.batcher`) draws the same tokens; the benchmark and the tests
compare the two.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from canopy.modeling import LoadedModel
from canopy.sampling.distribution import prompt_seed, step_uniforms
from canopy.sampling.kernel import check_prompt_fits, rollout_row, sample_step
from canopy.sampling.settings import SamplingSettings, fixed_batch_rows

__all__ = ["sample_prompt_dynamic"]


def _output_cache(output: Any) -> Any:
    # transformers 5 names the returned cache `cache`; 4.x called it `past_key_values`.
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    if cache is None:
        raise RuntimeError("the model returned no KV cache; it cannot be sampled incrementally")
    return cache


def sample_prompt_dynamic(
    loaded: LoadedModel,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    prompt_id: str,
    eos_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Draw ``settings.rollouts`` rollouts of one formatted prompt, one prompt at a time.

    Returns one dict per rollout with the rollout-table columns, ordered by ``sample``.
    """
    if len(prompt_ids) == 0:
        raise ValueError(f"prompt {prompt_id!r} has no tokens")
    if not eos_ids:
        raise ValueError(f"prompt {prompt_id!r}: no EOS ids given")
    model = loaded.model
    check_prompt_fits(model, len(prompt_ids), settings, prompt_id)
    rollouts = settings.rollouts
    # auto sizes the continuous batch; the baseline runs all M rows of its one prompt then.
    rows_per_batch = fixed_batch_rows(settings) or rollouts
    seed_of_prompt = prompt_seed(settings.seed, prompt_id)
    eos_tensor = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long)

    tokens: list[list[int]] = [[] for _ in range(rollouts)]
    entropies: list[list[float]] = [[] for _ in range(rollouts)]
    logprobs: list[list[float]] = [[] for _ in range(rollouts)]
    hit_eos = [False] * rollouts

    with torch.inference_mode():
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=loaded.device)
        prefill = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill_cache = _output_cache(prefill)
        prefill_logits = prefill.logits[:, -1, :]
        starts = list(range(0, rollouts, rows_per_batch))
        for batch_number, start in enumerate(starts):
            samples = np.arange(start, min(start + rows_per_batch, rollouts))
            # The last batch may consume the prefill cache itself; earlier ones work on copies.
            cache = (
                prefill_cache if batch_number == len(starts) - 1 else copy.deepcopy(prefill_cache)
            )
            cache.batch_repeat_interleave(len(samples))
            logits = prefill_logits.expand(len(samples), -1)
            for step in range(settings.max_new_tokens):
                uniforms = step_uniforms(seed_of_prompt, step, rollouts)[samples]
                result = sample_step(
                    logits,
                    uniforms,
                    settings,
                    lambda bad: (
                        f"prompt {prompt_id!r}, step {step + 1}, rollout(s) "
                        f"{samples[bad].tolist()[:10]}"
                    ),
                )
                finished = torch.isin(result.drawn_cpu, eos_tensor).numpy()
                for row, sample in enumerate(samples.tolist()):
                    tokens[sample].append(int(result.drawn_cpu[row]))
                    entropies[sample].append(float(result.entropy[row]))
                    logprobs[sample].append(float(result.logprob[row]))
                    if finished[row]:
                        hit_eos[sample] = True
                if step + 1 == settings.max_new_tokens or finished.all():
                    break
                next_tokens = result.drawn
                if finished.any():
                    keep = np.flatnonzero(~finished)
                    keep_index = torch.from_numpy(keep).to(loaded.device)
                    cache.batch_select_indices(keep_index)
                    next_tokens = result.drawn.index_select(0, keep_index)
                    samples = samples[keep]
                output = model(
                    input_ids=next_tokens.unsqueeze(-1),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = _output_cache(output)
                logits = output.logits[:, -1, :]
            del cache

    return [
        rollout_row(
            prompt_id,
            sample,
            len(prompt_ids),
            tokens[sample],
            entropies[sample],
            logprobs[sample],
            hit_eos[sample],
        )
        for sample in range(rollouts)
    ]
