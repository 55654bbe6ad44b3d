"""Continuous batching: the rollouts of many prompts share one batch that is refilled as rows end.

The batch has a row budget (``max_batch_rows``, default: the rollout count M) and optionally a
KV-cache budget in token slots (``max_batch_tokens``: the length classes its rows hold). Prompts are taken in
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

Rows live in length classes (32 x 2^k cache positions, one slot cache each, one forward per class
in use), so a row holds at most twice its length rather than the longest row's. In a class, rows
``0 .. c-1`` are continuing rollouts (their last drawn token still has to be fed) and rows
``c .. n-1`` were just admitted and draw their first token from the prompt's prefill logits,
without a forward pass. After a step, finished rows are compacted away by moving rows from the end
into their slots, and a row that filled its class is copied into the next one (see
:mod:`canopy.sampling.cache`). One sampling kernel call covers the rows of every class.
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

#: Rows live in length classes SMALLEST_CLASS x 2^k: a row's cache slot is at most twice its length,
#: so the cache holds about what the rows need, not the longest row's length for every row. A row
#: that outgrows its class is copied once into the next (amortised: under one copy per token).
SMALLEST_CLASS = 32
#: Attention reads a multiple of this many positions (capped at the class length).
LENGTH_QUANTUM = 64
#: A class's row slots grow by at least this factor when they grow.
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
    # The uniforms of each step reached so far: rows admitted at different times reach a step at
    # different times, and a generator is seeded once per (prompt, step), not once per row.
    uniforms: dict[int, np.ndarray] = field(default_factory=dict)

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


def class_length(needed: int) -> int:
    """The cache length of the class a row needing ``needed`` positions belongs to."""
    length = SMALLEST_CLASS
    while length < needed:
        length *= 2
    return length


class _Group:
    """The rows of one length class: a slot cache of that length and the rows' bookkeeping.

    Rows ``0 .. continuing-1`` have a pending token (``pending``) to feed; the rest were admitted
    since the last step and draw from their prompt's prefill logits.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.cache: SlotCache | None = None
        self.prompt: list[_Prompt] = []
        self.sample: list[int] = []
        self.row_length: list[int] = []  # positions of the row already in the cache
        self.continuing = 0
        self.pending: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt)

    def append(self, prompt: _Prompt, sample: int, length: int) -> None:
        self.prompt.append(prompt)
        self.sample.append(sample)
        self.row_length.append(length)


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
        self.groups: dict[int, _Group] = {}  # by class length

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

    def rows(self) -> int:
        return sum(len(group) for group in self.groups.values())

    def held_tokens(self) -> int:
        """Token slots the live rows occupy (each row: its class length)."""
        return sum(len(group) * group.length for group in self.groups.values())

    def cache_bytes(self) -> int:
        return sum(g.cache.nbytes() for g in self.groups.values() if g.cache is not None)

    def _group(self, length: int) -> _Group:
        if length not in self.groups:
            self.groups[length] = _Group(length)
            self.groups = dict(sorted(self.groups.items()))
        return self.groups[length]

    def _room(self, group: _Group, rows: int) -> SlotCache:
        """The group's cache, with at least ``rows`` row slots (grown geometrically)."""
        cache = group.cache
        if cache is None:
            group.cache = self._new_cache(max(rows, MIN_FORWARD_ROWS), group.length)
        elif rows > cache.rows:
            live = len(group)
            used = max(group.row_length[:live], default=0)
            cache.resize(max(rows, math.ceil(cache.rows * GROWTH)), group.length, live, used)
            self.stats.reallocations += 1
        return group.cache

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
        """Fill free rows with the next rollouts of the queued prompts, in order, while the row
        budget and the token budget allow (at least one row when the batch is empty)."""
        while queue:
            prompt = queue[0]
            length = class_length(len(prompt.job.token_ids) + 1)
            live = self.rows()
            wanted = min(prompt.rollouts - prompt.admitted, self.row_budget - live)
            if self.token_budget:
                spare = (self.token_budget - self.held_tokens()) // length
                wanted = min(wanted, max(spare, 1 if live == 0 else 0))
            if wanted <= 0:
                return
            if prompt.prefill is None:
                self._prefill(prompt)
            group = self._group(length)
            start = len(group)
            cache = self._room(group, start + wanted)
            cache.fill(start, start + wanted, prompt.prefill)
            for sample in range(prompt.admitted, prompt.admitted + wanted):
                group.append(prompt, sample, len(prompt.job.token_ids))
            prompt.admitted += wanted
            if prompt.admitted < prompt.rollouts:
                return  # the batch is full
            prompt.prefill = None  # its rows hold the prompt now
            queue.pop(0)

    # ------------------------------------------------------------------ one step

    def _forward(self, group: _Group) -> torch.Tensor:
        """Logits of the group's continuing rows: one forward, padded to MIN_FORWARD_ROWS rows."""
        c = group.continuing
        positions = group.row_length[:c]
        tokens = group.pending
        if c < MIN_FORWARD_ROWS:
            # Padding rows write into slots that are free, or into a new row's next position
            # (which that row overwrites when it is fed): nothing live is touched.
            extra = range(c, MIN_FORWARD_ROWS)
            positions = positions + [group.row_length[r] if r < len(group) else 0 for r in extra]
            tokens = torch.cat([tokens, tokens[:1].expand(len(extra))])
        positions = torch.tensor(positions, device=self.device).unsqueeze(-1)
        mask = group.cache.begin(positions, LENGTH_QUANTUM)
        output = self.model(
            input_ids=tokens.unsqueeze(-1),
            position_ids=positions,
            attention_mask=mask,
            cache=group.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for row in range(c):
            group.row_length[row] += 1
        self.stats.forwards += 1
        return output.logits[:c, -1, :]

    def logits(self) -> torch.Tensor:
        """Logits of every row, group by group (continuing rows, then new rows)."""
        parts = []
        for group in self.groups.values():
            if group.continuing:
                parts.append(self._forward(group))
            row = group.continuing
            while row < len(group):
                prompt = group.prompt[row]
                end = row
                while end < len(group) and group.prompt[end] is prompt:
                    end += 1
                parts.append(prompt.prefill_logits.expand(end - row, -1))
                row = end
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def step(self, on_done: Callable[[_Prompt], None]) -> None:
        logits = self.logits()
        rows = [(g, r) for g in self.groups.values() for r in range(len(g))]
        uniforms = np.empty(len(rows))
        steps = np.empty(len(rows), dtype=np.int64)
        for index, (group, row) in enumerate(rows):
            prompt, sample = group.prompt[row], group.sample[row]
            step = len(prompt.tokens[sample])
            steps[index] = step
            drawn_at_step = prompt.uniforms.get(step)
            if drawn_at_step is None:
                drawn_at_step = prompt.uniforms[step] = step_uniforms(
                    prompt.seed, step, prompt.rollouts
                )
            uniforms[index] = drawn_at_step[sample]

        def describe(bad: np.ndarray) -> str:
            flagged = [rows[i] for i in np.flatnonzero(bad)]
            first = flagged[0][0].prompt[flagged[0][1]]
            samples = [g.sample[r] for g, r in flagged if g.prompt[r] is first]
            step = int(steps[np.flatnonzero(bad)[0]]) + 1
            return f"prompt {first.job.prompt_id!r}, step {step}, rollout(s) {samples[:10]}"

        result = sample_step(logits, uniforms, self.settings, describe)
        finished = torch.isin(result.drawn_cpu, self.eos).numpy()
        done_prompts = []
        for index, (group, row) in enumerate(rows):
            prompt, sample = group.prompt[row], group.sample[row]
            prompt.tokens[sample].append(int(result.drawn_cpu[index]))
            prompt.entropies[sample].append(float(result.entropy[index]))
            prompt.logprobs[sample].append(float(result.logprob[index]))
            if finished[index]:
                prompt.hit_eos[sample] = True
            elif steps[index] + 1 == self.settings.max_new_tokens:
                finished[index] = True
            if finished[index]:
                prompt.finished += 1
                if prompt.finished == prompt.rollouts:
                    done_prompts.append(prompt)
        self.stats.steps += 1
        self.stats.rows_sampled += len(rows)
        self.stats.rows_per_step.append(len(rows))
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache_bytes())
        self._regroup(finished, result.drawn)
        for prompt in done_prompts:
            on_done(prompt)

    def _regroup(self, finished: np.ndarray, drawn: torch.Tensor) -> None:
        """Drop finished rows and move rows that outgrew their class into the next one."""
        offset = 0
        slices = []
        for group in self.groups.values():
            slices.append((group, offset))
            offset += len(group)
        # Longest class first, so a row moved up is not looked at again in this step.
        for group, offset in reversed(slices):
            n = len(group)
            tokens = drawn[offset : offset + n]
            gone = finished[offset : offset + n].copy()
            outgrown = [r for r in range(n) if not gone[r] and group.row_length[r] >= group.length]
            if outgrown:
                target = self._group(group.length * 2)
                start = len(target)
                cache = self._room(target, start + len(outgrown))
                cache.copy_rows(group.cache, outgrown, start, group.length)
                for r in outgrown:
                    target.append(group.prompt[r], group.sample[r], group.row_length[r])
                moved = tokens[torch.tensor(outgrown, device=tokens.device)]
                target.pending = (
                    moved
                    if target.pending is None
                    else torch.cat([target.pending[: target.continuing], moved])
                )
                target.continuing += len(outgrown)
                gone[outgrown] = True
            self._compact(group, gone, tokens)
        for length, group in list(self.groups.items()):
            live = len(group)
            if not live:
                del self.groups[length]  # frees that class's buffers
            elif group.cache.rows > max(MIN_FORWARD_ROWS, 4 * live):
                # Give back slots a class no longer needs (one copy, after it lost 3/4 of them).
                used = max(group.row_length)
                group.cache.resize(max(MIN_FORWARD_ROWS, 2 * live), group.length, live, used)
                self.stats.reallocations += 1

    def _compact(self, group: _Group, gone: np.ndarray, drawn: torch.Tensor) -> None:
        """Drop rows: rows from the end move into their slots (only those are copied)."""
        keep = int((~gone).sum())
        holes = [row for row in range(keep) if gone[row]]
        movers = [row for row in range(keep, len(gone)) if not gone[row]]
        order = list(range(keep))
        if holes:
            group.cache.move(movers, holes, max(group.row_length[r] for r in movers))
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        group.prompt = [group.prompt[r] for r in order]
        group.sample = [group.sample[r] for r in order]
        group.row_length = [group.row_length[r] for r in order]
        group.continuing = keep
        group.pending = drawn[torch.tensor(order, dtype=torch.long, device=drawn.device)]


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
        prompt.uniforms.clear()
        on_done(prompt.index, prompt.rows())

    with torch.inference_mode():
        while queue or batcher.rows():
            batcher.admit(queue)
            batcher.step(finish)
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
