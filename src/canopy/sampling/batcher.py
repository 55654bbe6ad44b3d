"""Continuous batching: the rollouts of many prompts share one batch that is refilled as rows end.

The batch has a row budget (``max_batch_rows``, default: the rollout count M) and a KV-cache budget
in tokens (``max_batch_tokens``: the size of the paged pool every row's keys and values live in;
0 derives an admission budget, see :func:`default_pool_tokens`). Prompts are taken in order; each is
prefilled once (batch size 1), its full blocks written into the pool once and shared by all its
rollouts. Admission happens whenever rows and blocks are free, so the tail of one prompt's
rollouts runs beside the start of the next prompt's instead of alone. A prompt is handed to
``on_done`` (which writes its shard) as soon as its last rollout ends, so a killed job keeps every
prompt finished before it.

Memory follows the one-prompt-at-a-time sampler's: by default no new row is admitted while the
blocks in use exceed what that sampler holds on its first step (M copies of the prompt plus one
token), or, once prompts have finished, the most it would have held on any of them (computed from
their rollouts' lengths); admitted rows always grow. Under ``max_batch_tokens`` the pool is a hard
bound: a row that needs a new block when none can be spared waits (it is not fed and draws nothing
that step) until rows end and give theirs back. So that waiting never deadlocks, the oldest row is
always served, and everything else (admissions, other rows' blocks) leaves free at least the
blocks one rollout can need from its prompt to ``max_new_tokens``: when the oldest row ends, the
next oldest can run to the end too.

Determinism is the sampler's contract, unchanged: rollout i of prompt p draws step t with the i-th
uniform of (prompt seed of p, t), so the tokens do not depend on the budgets, on which other
prompts share the batch, on where a row sits in it or on the steps it waited; the entropies agree
with the one-prompt-at-a-time sampler up to the rounding of the model's kernels for other batch
shapes (about 1e-7 on CPU).

One decode forward per step serves every row that is fed; attention reads rows in length buckets
(32 x 2^k positions, see :mod:`canopy.sampling.cache`), so a short row never reads a long row's
length. Rows admitted since the last step draw their first token from the prompt's prefill logits,
without a forward pass. One sampling kernel call covers the step's rows, in chunks of
``LOGIT_CHUNK`` rows so that the float32 copies of many rows' logits stay small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from canopy.modeling import LoadedModel
from canopy.sampling.cache import (
    PagedCache,
    PagedDecoding,
    SlotCache,
    layer_types_of,
    sliding_window_of,
)
from canopy.sampling.distribution import prompt_seed, step_uniforms
from canopy.sampling.kernel import check_prompt_fits, rollout_row, sample_step
from canopy.sampling.settings import SamplingSettings

__all__ = [
    "BatchStats",
    "PromptJob",
    "default_pool_tokens",
    "sample_prompts",
    "sample_prompt",
]

#: Token slots per block of the paged pool: a row wastes under one block, and a prompt's full
#: blocks are shared by its rollouts.
BLOCK_SIZE = 16
#: Attention reads rows in buckets of SMALLEST_CLASS x 2^k positions: a row reads at most about
#: twice its length, never the longest row's.
SMALLEST_CLASS = 32
#: Attention reads a multiple of this many positions (capped at the bucket length): a row's result
#: then does not depend on the longest row beside it, since masked positions add exact zeros to
#: the same vectorised sums.
LENGTH_QUANTUM = 64
#: Rows per call of the sampling kernel (its float32 copies of the logits are this many rows).
LOGIT_CHUNK = 64
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
    waits: int = 0  # row-steps a row waited for a block of the pool
    pool_growths: int = 0  # times the default pool was enlarged (one copy each)
    peak_cache_bytes: int = 0  # the pool at its largest
    peak_cache_tokens: int = 0  # token slots of the pool in use at the fullest
    rows_per_step: list[int] = field(default_factory=list, repr=False)

    @property
    def mean_rows(self) -> float:
        return self.rows_sampled / self.steps if self.steps else 0.0


@dataclass
class _Prompt:
    """A prompt being sampled: its rollouts' records, and its prefill while rollouts remain
    (logits, shared blocks, and the keys/values of its last partial block)."""

    index: int
    job: PromptJob
    seed: int
    rollouts: int
    admitted: int = 0
    finished: int = 0
    live: int = 0  # admitted rollouts not finished
    prefill_logits: torch.Tensor | None = None
    shared: list[int] = field(default_factory=list)  # the prompt's full blocks in the pool
    tail: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer
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
    """The attention length bucket of a row needing ``needed`` positions (32 x 2^k)."""
    length = SMALLEST_CLASS
    while length < needed:
        length *= 2
    return length


def default_pool_tokens(rows: int, longest_prompt: int, max_new_tokens: int) -> int:
    """The KV pool, in tokens, when ``max_batch_tokens`` is 0.

    What the one-prompt-at-a-time sampler holds on its first step with the same row budget: its
    ``rows`` rows, each a copy of the longest prompt plus one token (rounded up to whole blocks;
    here the rows share the prompt's full blocks, so these blocks admit at least as many rows),
    plus one rollout's reserve (its prompt to ``max_new_tokens``). New rows are admitted while the
    blocks in use stay within it (or within the most the one-prompt sampler held on a finished
    prompt, when that is more).
    """
    first_step = max(
        -(-rows * (longest_prompt + 1) // BLOCK_SIZE), longest_prompt // BLOCK_SIZE + rows
    )
    reserve = -(-(longest_prompt + max_new_tokens - 1) // BLOCK_SIZE)
    return (first_step + reserve) * BLOCK_SIZE


@dataclass
class _Row:
    """One rollout in the batch: its block table and the token it feeds next."""

    prompt: _Prompt
    sample: int
    length: int  # positions in the cache (prompt + tokens fed)
    own: list[int]  # blocks this row wrote (its last partial prompt block on)
    pending: int | None = None  # the token drawn last step, fed this step; None: newly admitted

    def table(self) -> list[int]:
        return self.prompt.shared + self.own


class _Batcher:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: SamplingSettings,
        eos_ids: Sequence[int],
        stats: BatchStats,
        longest_prompt: int,
    ) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.settings = settings
        self.eos = frozenset(int(e) for e in eos_ids)
        self.stats = stats
        config = self.model.config
        self.layer_types = layer_types_of(config)
        self.window = sliding_window_of(config)
        self.dtype = next(self.model.parameters()).dtype
        self.row_budget = settings.max_batch_rows or settings.rollouts
        bs = BLOCK_SIZE
        # Blocks one rollout can need, from its prompt to its last fed token.
        self.reserve = -(-(longest_prompt + settings.max_new_tokens - 1) // bs)
        # A given max_batch_tokens is a hard bound: the pool's size; rows admitted and grown leave
        # one rollout's reserve free, and rows that need more wait. By default the budget
        # governs admission only: it starts at what the one-prompt sampler holds on its first
        # step (default_pool_tokens) and rises to the most that sampler held on any prompt
        # finished so far (computed from their rollouts' lengths); admitted rows always grow,
        # the pool growing geometrically if they need more than it holds.
        self.budget = -(-settings.max_batch_tokens // bs)
        self.adaptive = not settings.max_batch_tokens
        if self.adaptive:
            self.budget = (
                default_pool_tokens(self.row_budget, longest_prompt, settings.max_new_tokens) // bs
            )
        if self.budget < self.reserve:
            raise ValueError(
                f"max_batch_tokens={settings.max_batch_tokens} cannot hold one rollout of the "
                f"longest prompt ({longest_prompt} tokens) to max_new_tokens="
                f"{settings.max_new_tokens}: set it to at least {self.reserve * bs} (or 0)"
            )
        self.cache = PagedCache(
            self.layer_types,
            self.window,
            blocks=self.budget + 1,  # + the scratch block
            block_size=bs,
            dtype=self.dtype,
            device=self.device,
        )
        self.switch = PagedDecoding(self.model)
        self.rows: list[_Row] = []  # in admission order: rows[0] is the oldest

    def used_blocks(self) -> int:
        return self.cache.blocks - 1 - self.cache.free_blocks

    def admission_room(self) -> int:
        """Blocks new rows may take now."""
        room = self.budget - self.used_blocks()
        return room if self.adaptive else room - self.reserve

    def growth_room(self, oldest: bool) -> int:
        """Blocks a growing row may take now (the oldest may use the reserve; by default any)."""
        if self.adaptive:
            return 1
        return self.budget - self.used_blocks() - (0 if oldest else self.reserve)

    def take(self, count: int) -> list[int]:
        """``count`` blocks of the pool, enlarging it by default when it has too few."""
        if self.cache.free_blocks < count and self.adaptive:
            self.cache.grow(max(self.cache.blocks * 3 // 2, self.cache.blocks + count))
            self.stats.pool_growths += 1
        return self.cache.allocate(count)

    def observe(self, prompt: _Prompt) -> None:
        """Raise the default budget to the KV the one-prompt sampler held on ``prompt``: its
        rows that reached step t, each holding the prompt and t tokens."""
        if not self.adaptive:
            return
        lengths = np.sort([len(tokens) for tokens in prompt.tokens])[::-1]
        # After its t-th forward (t = 1 .. longest - 1) it holds rows with n_steps > t.
        steps = np.arange(1, lengths[0])
        alive = len(lengths) - np.searchsorted(lengths[::-1], steps, side="right")
        held = int((alive * (len(prompt.job.token_ids) + steps)).max(initial=0))
        self.budget = max(self.budget, -(-held // BLOCK_SIZE))

    # ------------------------------------------------------------------ admission

    def _prefill(self, prompt: _Prompt) -> None:
        """Prefill the prompt (batch size 1) and write its full blocks into the pool."""
        ids = list(prompt.job.token_ids)
        dense = SlotCache(
            self.layer_types,
            self.window,
            rows=1,
            length=len(ids),
            dtype=self.dtype,
            device=self.device,
        )
        positions = torch.arange(len(ids), device=self.device).unsqueeze(0)
        mask = dense.begin(positions)
        output = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
            position_ids=positions,
            attention_mask=mask,
            cache=dense,
            use_cache=True,
            logits_to_keep=1,
        )
        prompt.prefill_logits = output.logits[:, -1, :]
        full = len(ids) // BLOCK_SIZE * BLOCK_SIZE
        prompt.shared = self.take(full // BLOCK_SIZE)
        slots = self.cache.slots(prompt.shared, 0, full)
        # The tail (under one block) is copied into each rollout's own first block.
        prompt.tail = []
        for layer in range(len(self.layer_types)):
            keys = dense.keys[layer][0].transpose(0, 1)  # [positions, heads, dim]
            values = dense.values[layer][0].transpose(0, 1)
            if full:
                self.cache.write(layer, slots, keys[:full], values[:full])
            prompt.tail.append((keys[full:].clone(), values[full:].clone()))
        self.stats.prefills += 1

    def _admission_cost(self, prompt: _Prompt) -> int:
        length = len(prompt.job.token_ids)
        shared = 0 if prompt.prefill_logits is not None else length // BLOCK_SIZE
        return shared + (1 if length % BLOCK_SIZE else 0)

    def admit(self, queue: list[_Prompt]) -> None:
        """Fill free rows with the next rollouts of the queued prompts, in order, while rows and
        blocks allow (keeping the oldest row's reserve; the first row of an empty batch always)."""
        while queue and len(self.rows) < self.row_budget:
            prompt = queue[0]
            cost = self._admission_cost(prompt)
            if self.rows and self.admission_room() < cost:
                return
            if prompt.prefill_logits is None:
                self._prefill(prompt)
            length = len(prompt.job.token_ids)
            own = self.take(1) if length % BLOCK_SIZE else []
            if own:
                start = length // BLOCK_SIZE * BLOCK_SIZE
                slots = self.cache.slots(prompt.shared + own, start, length)
                for layer, (keys, values) in enumerate(prompt.tail):
                    self.cache.write(layer, slots, keys, values)
            self.rows.append(_Row(prompt, prompt.admitted, length, own))
            prompt.admitted += 1
            prompt.live += 1
            if prompt.admitted == prompt.rollouts:
                prompt.tail = []
                queue.pop(0)

    # ------------------------------------------------------------------ one step

    def _fed_rows(self) -> list[_Row]:
        """The continuing rows fed this step: a row needing a new block gets one if the oldest
        row's reserve allows (the oldest always), else it waits."""
        fed = []
        for number, row in enumerate(self.rows):
            if row.pending is None:
                continue
            if row.length == len(row.table()) * BLOCK_SIZE:
                if self.growth_room(oldest=number == 0) < 1:
                    self.stats.waits += 1
                    continue
                row.own += self.take(1)
            fed.append(row)
        return fed

    def _forward(self, fed: list[_Row]) -> torch.Tensor:
        """Logits of the fed rows (in the order given): one forward of every row, padded to
        MIN_FORWARD_ROWS rows, attention bucketed by length."""
        n = len(fed)
        tables = [row.table() for row in fed]
        lengths = [row.length for row in fed]  # the position each row writes now
        tokens = [row.pending for row in fed]
        bs = BLOCK_SIZE
        write = [t[p // bs] * bs + p % bs for t, p in zip(tables, lengths)]
        buckets = []
        start = 0
        while start < n:
            bucket = class_length(lengths[start] + 1)
            stop = start
            while stop < n and class_length(lengths[stop] + 1) == bucket:
                stop += 1
            needed = max(lengths[start:stop]) + 1
            buckets.append(
                (start, stop, min(bucket, -(-needed // LENGTH_QUANTUM) * LENGTH_QUANTUM))
            )
            start = stop
        positions = list(lengths)
        if n < MIN_FORWARD_ROWS:
            # Padding rows write into the scratch block and read only it: nothing live is touched.
            pad = MIN_FORWARD_ROWS - n
            tables += [[0]] * pad
            lengths += [0] * pad
            positions += [0] * pad
            tokens += [tokens[0]] * pad
            write += [0] * pad
            buckets.append((n, MIN_FORWARD_ROWS, 1))
        self.cache.begin(torch.tensor(write, device=self.device), tables, lengths, buckets)
        position_ids = torch.tensor(positions, device=self.device).unsqueeze(-1)
        # The model wants a prepared mask to pass the cache through; attention uses the buckets'.
        placeholder = torch.zeros((len(positions), 1, 1, 1), dtype=self.dtype, device=self.device)
        mask: Any = placeholder
        if self.window is not None:
            mask = {"full_attention": placeholder, "sliding_attention": placeholder}
        with self.switch(self.cache):
            output = self.model(
                input_ids=torch.tensor(tokens, device=self.device).unsqueeze(-1),
                position_ids=position_ids,
                attention_mask=mask,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache.buckets = []
        self.stats.forwards += 1
        return output.logits[:n, -1, :]

    def step(self, on_done: Callable[[_Prompt], None]) -> None:
        fed = self._fed_rows()
        # Fed rows go through the forward sorted by length, so that buckets are contiguous.
        fed.sort(key=lambda row: row.length)
        new = [row for row in self.rows if row.pending is None]
        active = fed + new
        if not active:
            raise RuntimeError("no row of the batch could be served (KV pool exhausted)")
        parts = [self._forward(fed)] if fed else []
        index = 0
        while index < len(new):
            prompt, end = new[index].prompt, index
            while end < len(new) and new[end].prompt is prompt:
                end += 1
            parts.append(prompt.prefill_logits.expand(end - index, -1))
            index = end
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        steps = np.array([len(row.prompt.tokens[row.sample]) for row in active], dtype=np.int64)
        uniforms = np.empty(len(active))
        for index, row in enumerate(active):
            prompt, step = row.prompt, int(steps[index])
            drawn_at_step = prompt.uniforms.get(step)
            if drawn_at_step is None:
                drawn_at_step = prompt.uniforms[step] = step_uniforms(
                    prompt.seed, step, prompt.rollouts
                )
            uniforms[index] = drawn_at_step[row.sample]

        def describe(bad: np.ndarray, offset: int) -> str:
            flagged = [active[offset + i] for i in np.flatnonzero(bad)]
            first = flagged[0].prompt
            samples = [row.sample for row in flagged if row.prompt is first]
            step = int(steps[offset + np.flatnonzero(bad)[0]]) + 1
            return f"prompt {first.job.prompt_id!r}, step {step}, rollout(s) {samples[:10]}"

        drawn, entropy, logprob = [], [], []
        for start in range(0, len(active), LOGIT_CHUNK):
            stop = min(start + LOGIT_CHUNK, len(active))
            result = sample_step(
                logits[start:stop],
                uniforms[start:stop],
                self.settings,
                lambda bad, offset=start: describe(bad, offset),
            )
            drawn += result.drawn_cpu.tolist()
            entropy.append(result.entropy)
            logprob.append(result.logprob)
        entropies, logprobs = np.concatenate(entropy), np.concatenate(logprob)
        done_prompts = []
        for index, row in enumerate(active):
            prompt, sample, token = row.prompt, row.sample, drawn[index]
            prompt.tokens[sample].append(token)
            prompt.entropies[sample].append(float(entropies[index]))
            prompt.logprobs[sample].append(float(logprobs[index]))
            if row.pending is not None:
                row.length += 1  # its pending token is in the cache now
            row.pending = token
            finished = token in self.eos
            if finished:
                prompt.hit_eos[sample] = True
            elif steps[index] + 1 == self.settings.max_new_tokens:
                finished = True
            if finished:
                row.prompt = None  # type: ignore[assignment]  # marks the row for removal
                self.cache.release(row.own)
                prompt.finished += 1
                prompt.live -= 1
                if prompt.admitted == prompt.rollouts and prompt.live == 0:
                    self.cache.release(prompt.shared)
                    prompt.shared = []
                    prompt.prefill_logits = None
                if prompt.finished == prompt.rollouts:
                    done_prompts.append(prompt)
        self.rows = [row for row in self.rows if row.prompt is not None]
        self.stats.steps += 1
        self.stats.rows_sampled += len(active)
        self.stats.rows_per_step.append(len(active))
        self.stats.peak_cache_tokens = max(
            self.stats.peak_cache_tokens, (self.used_blocks()) * BLOCK_SIZE
        )
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache.nbytes())
        for prompt in done_prompts:
            self.observe(prompt)
            on_done(prompt)


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
    longest = max((len(job.token_ids) for job in jobs), default=1)
    batcher = _Batcher(loaded, settings, eos_ids, stats, longest)
    queue = [
        _Prompt(index, job, prompt_seed(settings.seed, job.prompt_id), settings.rollouts)
        for index, job in enumerate(jobs)
    ]

    def finish(prompt: _Prompt) -> None:
        prompt.uniforms.clear()
        on_done(prompt.index, prompt.rows())

    with torch.inference_mode():
        while queue or batcher.rows:
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
