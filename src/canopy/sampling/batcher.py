"""Continuous batching: the rollouts of many prompts share one batch that is refilled as rows end.

The batch has a row budget (``max_batch_rows``, default: the rollout count M) and optionally a
KV-cache budget in token slots (``max_batch_tokens``: rows x cache length). Prompts are taken in
order; each is prefilled once (batch size 1) and its cache written into the slot of every rollout
admitted from it. Admission happens whenever rows are free, so the tail of one prompt's rollouts
runs beside the start of the next prompt's instead of alone. A prompt is handed to ``on_done``
(which writes its shard) as soon as its last rollout ends, so a killed job keeps every prompt
finished before it.

Determinism is the sampler's contract, unchanged: rollout i of prompt p draws step t with the i-th
uniform of (prompt seed of p, t), so the tokens do not depend on the budget, on which other
prompts share the batch, or on where a row sits in it; the entropies agree with the
one-prompt-at-a-time sampler up to the rounding of the model's kernels for other batch shapes
(about 1e-7 on CPU).

Rows ``0 .. c-1`` of the batch are continuing rollouts (their last drawn token still has to be
fed); rows ``c .. n-1`` were just admitted and draw their first token from the prompt's prefill
logits, without a forward pass. After a step, finished rows are compacted away by moving rows from
the end into their slots (see :mod:`canopy.sampling.cache`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from canopy.modeling import LoadedModel
from canopy.sampling.cache import SlotCache, layer_types_of, sliding_window_of
from canopy.sampling.distribution import prompt_seed, step_uniforms
from canopy.sampling.kernel import check_prompt_fits, rollout_row, sample_step
from canopy.sampling.settings import SamplingSettings

__all__ = ["BatchStats", "PromptJob", "sample_prompts", "sample_prompt"]

#: Cache lengths (and the positions attention reads) are multiples of this; the cache grows by at
#: least GROWTH when it grows.
LENGTH_QUANTUM = 64
GROWTH = 1.5
#: Decode forwards run at least this many rows (padding rows are fed and discarded): CPU matrix
#: products take another code path, which rounds differently, for one to three rows, and a
#: prompt's floats must not depend on how many rows it shared a step with.
MIN_FORWARD_ROWS = 4


@dataclass(frozen=True)
class PromptJob:
    """One formatted prompt to sample."""

    prompt_id: str
    token_ids: Sequence[int]


@dataclass
class BatchStats:
    """What a run of the batcher did (the benchmark reports these)."""

    steps: int = 0  # sampling steps (one draw for every row of the batch)
    rows_sampled: int = 0  # sum over steps of the rows in the batch
    forwards: int = 0  # decode forward passes (prefills not counted)
    prefills: int = 0
    reallocations: int = 0
    peak_cache_bytes: int = 0
    rows_per_step: list[int] = field(default_factory=list, repr=False)

    @property
    def mean_rows(self) -> float:
        return self.rows_sampled / self.steps if self.steps else 0.0


@dataclass
class _Prompt:
    """A prompt being sampled: its rollouts' records, and its prefill while rollouts remain."""

    index: int
    job: PromptJob
    seed: int
    rollouts: int
    admitted: int = 0
    finished: int = 0
    prefill: SlotCache | None = None
    prefill_logits: torch.Tensor | None = None
    tokens: list[list[int]] = field(default_factory=list)
    entropies: list[list[float]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    hit_eos: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = [[] for _ in range(self.rollouts)]
        self.entropies = [[] for _ in range(self.rollouts)]
        self.logprobs = [[] for _ in range(self.rollouts)]
        self.hit_eos = [False] * self.rollouts

    def rows(self) -> list[dict[str, Any]]:
        return [
            rollout_row(
                self.job.prompt_id,
                sample,
                len(self.job.token_ids),
                self.tokens[sample],
                self.entropies[sample],
                self.logprobs[sample],
                self.hit_eos[sample],
            )
            for sample in range(self.rollouts)
        ]


def _round_up(value: int, quantum: int = LENGTH_QUANTUM) -> int:
    return -(-value // quantum) * quantum


class _Batcher:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: SamplingSettings,
        eos_ids: Sequence[int],
        stats: BatchStats,
    ) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.settings = settings
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long)
        self.stats = stats
        config = self.model.config
        self.layer_types = layer_types_of(config)
        self.window = sliding_window_of(config)
        self.dtype = next(self.model.parameters()).dtype
        self.row_budget = settings.max_batch_rows or settings.rollouts
        self.token_budget = settings.max_batch_tokens
        self.cache: SlotCache | None = None
        # Per row of the batch: its prompt, its rollout index, and the cache length it has.
        self.row_prompt: list[_Prompt] = []
        self.row_sample: list[int] = []
        self.row_length: list[int] = []
        self.continuing = 0  # rows 0 .. continuing-1 have a pending token to feed
        self.pending: torch.Tensor | None = None

    # ------------------------------------------------------------------ capacity

    def _new_cache(self, rows: int, length: int) -> SlotCache:
        return SlotCache(
            self.layer_types,
            self.window,
            rows=rows,
            length=length,
            dtype=self.dtype,
            device=self.device,
        )

    def _rows_allowed(self, length: int) -> int:
        """Rows the budgets allow at a cache length (at least one: the batch must progress)."""
        if not self.token_budget:
            return max(MIN_FORWARD_ROWS, self.row_budget)
        return max(MIN_FORWARD_ROWS, min(self.row_budget, self.token_budget // length))

    def _reserve(self, rows: int, length: int) -> bool:
        """Make the cache hold ``rows`` rows of ``length`` positions; False if the budgets forbid
        it (only ever for admitting new rows: live rows are always given room)."""
        cache = self.cache
        live = len(self.row_prompt)
        if cache is not None and rows <= cache.rows and length <= cache.length:
            return True
        if cache is not None and length > cache.length:
            # Grow geometrically: a run reallocates a few times, not at every step.
            new_length = _round_up(max(length, math.ceil(cache.length * GROWTH)))
        else:
            # First allocation, or more rows: a shorter length may now leave room for them.
            new_length = _round_up(length)
        allowed = self._rows_allowed(new_length)
        if rows > max(allowed, live):
            return False
        new_rows = max(rows, allowed)
        if cache is None:
            self.cache = self._new_cache(new_rows, new_length)
            return True
        cache.resize(new_rows, new_length, live, max(self.row_length, default=0))
        self.stats.reallocations += 1
        return True

    # ------------------------------------------------------------------ admission

    def _prefill(self, prompt: _Prompt) -> None:
        ids = list(prompt.job.token_ids)
        cache = self._new_cache(1, len(ids))
        positions = torch.arange(len(ids), device=self.device).unsqueeze(0)
        mask = cache.begin(positions)
        output = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
            position_ids=positions,
            attention_mask=mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        prompt.prefill = cache
        prompt.prefill_logits = output.logits[:, -1, :]
        self.stats.prefills += 1

    def admit(self, queue: list[_Prompt]) -> None:
        """Fill free rows with the next rollouts of the queued prompts, in order."""
        while queue:
            prompt = queue[0]
            start = len(self.row_prompt)
            length = len(prompt.job.token_ids) + 1
            wanted = min(prompt.rollouts - prompt.admitted, self.row_budget - start)
            if wanted <= 0:
                return
            needed = max([length] + [n + 1 for n in self.row_length])
            while wanted > 0 and not self._reserve(start + wanted, needed):
                wanted = min(wanted - 1, self._rows_allowed(_round_up(needed)) - start)
            if wanted <= 0:
                return
            if prompt.prefill is None:
                self._prefill(prompt)
            self.cache.fill(start, start + wanted, prompt.prefill)
            for sample in range(prompt.admitted, prompt.admitted + wanted):
                self.row_prompt.append(prompt)
                self.row_sample.append(sample)
                self.row_length.append(len(prompt.job.token_ids))
            prompt.admitted += wanted
            if prompt.admitted == prompt.rollouts:
                prompt.prefill = None  # its rows hold the prompt now
                queue.pop(0)
            else:
                return  # the batch is full

    # ------------------------------------------------------------------ one step

    def logits(self) -> torch.Tensor:
        parts = []
        c = self.continuing
        if c:
            self._reserve(len(self.row_prompt), max(self.row_length) + 1)
            positions = self.row_length[:c]
            tokens = self.pending
            if c < MIN_FORWARD_ROWS:
                # Padding rows write into slots that are free, or into a new row's next position
                # (which that row overwrites when it is fed): nothing live is touched.
                extra = range(c, MIN_FORWARD_ROWS)
                positions = positions + [
                    self.row_length[r] if r < len(self.row_length) else 0 for r in extra
                ]
                tokens = torch.cat([tokens, tokens[:1].expand(len(extra))])
            positions = torch.tensor(positions, device=self.device).unsqueeze(-1)
            mask = self.cache.begin(positions, LENGTH_QUANTUM)
            output = self.model(
                input_ids=tokens.unsqueeze(-1),
                position_ids=positions,
                attention_mask=mask,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            parts.append(output.logits[:c, -1, :])
            for row in range(c):
                self.row_length[row] += 1
            self.stats.forwards += 1
        row = c
        while row < len(self.row_prompt):
            prompt = self.row_prompt[row]
            end = row
            while end < len(self.row_prompt) and self.row_prompt[end] is prompt:
                end += 1
            logits = prompt.prefill_logits
            if logits is None:  # all rollouts admitted: the prefill was released, logits kept
                raise RuntimeError("internal error: prefill logits missing for new rows")
            parts.append(logits.expand(end - row, -1))
            row = end
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def step(self, on_done: Callable[[_Prompt], None]) -> None:
        rows = len(self.row_prompt)
        logits = self.logits()
        memo: dict[tuple[int, int], np.ndarray] = {}
        uniforms = np.empty(rows)
        steps = []
        for row in range(rows):
            prompt, sample = self.row_prompt[row], self.row_sample[row]
            step = len(prompt.tokens[sample])
            steps.append(step)
            key = (prompt.index, step)
            if key not in memo:
                memo[key] = step_uniforms(prompt.seed, step, prompt.rollouts)
            uniforms[row] = memo[key][sample]

        def describe(bad: np.ndarray) -> str:
            row = int(np.flatnonzero(bad)[0])
            prompt = self.row_prompt[row]
            samples = [
                self.row_sample[r] for r in np.flatnonzero(bad) if self.row_prompt[r] is prompt
            ]
            return (
                f"prompt {prompt.job.prompt_id!r}, step {steps[row] + 1}, rollout(s) {samples[:10]}"
            )

        result = sample_step(logits, uniforms, self.settings, describe)
        finished = torch.isin(result.drawn_cpu, self.eos).numpy()
        done_prompts = []
        for row in range(rows):
            prompt, sample = self.row_prompt[row], self.row_sample[row]
            prompt.tokens[sample].append(int(result.drawn_cpu[row]))
            prompt.entropies[sample].append(float(result.entropy[row]))
            prompt.logprobs[sample].append(float(result.logprob[row]))
            if finished[row]:
                prompt.hit_eos[sample] = True
            elif steps[row] + 1 == self.settings.max_new_tokens:
                finished[row] = True
            if finished[row]:
                prompt.finished += 1
                if prompt.finished == prompt.rollouts:
                    done_prompts.append(prompt)
        self.stats.steps += 1
        self.stats.rows_sampled += rows
        self.stats.rows_per_step.append(rows)
        self._compact(finished, result.drawn)
        for prompt in done_prompts:
            on_done(prompt)

    def _compact(self, finished: np.ndarray, drawn: torch.Tensor) -> None:
        """Drop finished rows: rows from the end move into their slots (only those are copied)."""
        keep = int((~finished).sum())
        holes = [row for row in range(keep) if finished[row]]
        movers = [row for row in range(keep, len(finished)) if not finished[row]]
        order = list(range(keep))
        if holes:
            self.cache.move(movers, holes, max(self.row_length[r] for r in movers))
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        self.row_prompt = [self.row_prompt[r] for r in order]
        self.row_sample = [self.row_sample[r] for r in order]
        self.row_length = [self.row_length[r] for r in order]
        self.continuing = keep
        self.pending = drawn[torch.tensor(order, dtype=torch.long, device=drawn.device)]


def sample_prompts(
    loaded: LoadedModel,
    jobs: Sequence[PromptJob],
    settings: SamplingSettings,
    *,
    eos_ids: Sequence[int],
    on_done: Callable[[int, list[dict[str, Any]]], None],
    stats: BatchStats | None = None,
) -> BatchStats:
    """Sample ``settings.rollouts`` rollouts of every job through one continuous batch.

    ``on_done(job_index, rows)`` receives each prompt's rows (ordered by ``sample``, ``text``
    empty) as soon as its last rollout ends; prompts may finish out of order.
    """
    if not eos_ids:
        raise ValueError("no EOS ids given")
    for job in jobs:
        if len(job.token_ids) == 0:
            raise ValueError(f"prompt {job.prompt_id!r} has no tokens")
        check_prompt_fits(loaded.model, len(job.token_ids), settings, job.prompt_id)
    stats = stats if stats is not None else BatchStats()
    batcher = _Batcher(loaded, settings, eos_ids, stats)
    queue = [
        _Prompt(index, job, prompt_seed(settings.seed, job.prompt_id), settings.rollouts)
        for index, job in enumerate(jobs)
    ]

    def finish(prompt: _Prompt) -> None:
        on_done(prompt.index, prompt.rows())

    with torch.inference_mode():
        while queue or batcher.row_prompt:
            batcher.admit(queue)
            batcher.step(finish)
            if batcher.cache is not None:
                stats.peak_cache_bytes = max(stats.peak_cache_bytes, batcher.cache.nbytes())
    return stats


def sample_prompt(
    loaded: LoadedModel,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    prompt_id: str,
    eos_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """Draw ``settings.rollouts`` rollouts of one formatted prompt (through the batcher).

    Returns one dict per rollout with the rollout-table columns (``text`` left empty: the caller
    decodes), ordered by ``sample``.
    """
    if not eos_ids:
        raise ValueError(f"prompt {prompt_id!r}: no EOS ids given")
    collected: list[dict[str, Any]] = []
    sample_prompts(
        loaded,
        [PromptJob(prompt_id, list(prompt_ids))],
        settings,
        eos_ids=eos_ids,
        on_done=lambda _, rows: collected.extend(rows),
    )
    return collected
