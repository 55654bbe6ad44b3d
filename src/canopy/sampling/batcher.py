"""Continuous batching: the rollouts of many prompts share one batch that is refilled as rows end.

The batch has a row budget (``max_batch_rows``; by default ``auto``, what the memory left after the
weights holds with every row at its longest, see :func:`auto_batch_rows`) and a KV-cache budget
in tokens (``max_batch_tokens``: the positions every row's keys and values may hold, counted as
:meth:`ClassCache.held` does; 0 derives an admission budget, see :func:`default_kv_budget`).
Prompts are taken in order; each is prefilled once (batch size 1) and its keys and values copied
into each of its rollouts' rows. Admission happens whenever rows and budget are free, so the tail
of one prompt's rollouts runs beside the start of the next prompt's instead of alone. A prompt is
handed to ``on_done`` (which writes its shard) as soon as its last rollout ends, so a killed job
keeps every prompt finished before it.

Memory follows the one-prompt-at-a-time sampler's: by default no new row is admitted while the
positions held exceed what that sampler holds on its first step (M copies of the prompt plus one
token, each rounded up as rows hold them), or, once prompts have finished, the most it would have
held on any of them (computed from their rollouts' lengths), times CPU_BUDGET_FACTOR on CPU;
admitted rows always grow. Under
``max_batch_tokens`` the budget is a hard bound: a row that needs to hold more when nothing can be
spared waits (it is not fed and draws nothing that step) until rows end and give theirs back. So
that waiting never deadlocks, the oldest row is always served, and everything else (admissions,
other rows' growth) leaves free at least what one rollout can need from its prompt to
``max_new_tokens``: when the oldest row ends, the next oldest can run to the end too.

Determinism is the sampler's contract, unchanged: rollout i of prompt p draws step t with the i-th
uniform of (prompt seed of p, t), so the tokens do not depend on the budgets, on which other
prompts share the batch, on where a row sits in it or on the steps it waited; the entropies agree
with the one-prompt-at-a-time sampler up to the rounding of the model's kernels for other batch
shapes (about 1e-7 on CPU).

One decode forward per step serves every row that is fed; attention reads rows class by class
(length classes of 32 x 2^k positions, see :mod:`canopy.sampling.cache`), so a short row never
reads a long row's length. Rows admitted since the last step draw their first token from the
prompt's prefill logits, without a forward pass. One sampling kernel call covers the step's rows,
in chunks of ``LOGIT_CHUNK`` rows so that the float32 copies of many rows' logits stay small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from canopy.modeling import LoadedModel
from canopy.sampling.cache import (
    HELD_QUANTUM,
    ClassCache,
    ClassDecoding,
    Place,
    SlotCache,
    kv_bytes_per_position,
    layer_types_of,
    maps_classes,
    most_held,
    sliding_window_of,
)
from canopy.sampling.distribution import prompt_seed, step_uniforms
from canopy.sampling.kernel import check_prompt_fits, rollout_row, sample_step
from canopy.sampling.settings import BatchOutOfMemoryError, SamplingSettings, fixed_batch_rows
from canopy.sampling.stops import StopScanner, StopSequences

__all__ = [
    "BatchStats",
    "PromptJob",
    "auto_batch_rows",
    "available_memory",
    "default_kv_budget",
    "sample_prompts",
    "sample_prompt",
]

#: On CPU the default budget lets rows hold this many times the positions the one-prompt sampler
#: held. That sampler re-allocates its DynamicCache at every step (one concatenation per layer
#: and keys/values), and on the heavy-tailed benchmark its resident memory was 2.4-3.1 times its
#: keys and values (82-92 MiB above the model for 27 MiB of positions), while the classes' pages
#: on CPU hold the rows' positions rounded up to pages: at 1.5 the batch still stays under the
#: one-prompt sampler's peak resident memory there (0.8-0.9x), with a third more rows per step.
#: Off CPU the budget counts class lengths and is the one-prompt sampler's positions (a GPU's
#: allocator was not measured).
CPU_BUDGET_FACTOR = 1.5
#: Rows per call of the sampling kernel (its float32 copies of the logits are this many rows).
LOGIT_CHUNK = 64
#: Share of the memory found free that ``max_batch_rows: auto`` fills with rows: the rest is left
#: to the allocator's fragmentation, a prompt's prefill and the forward's transient activations.
AUTO_MEMORY_SHARE = 0.8
#: Float32 copies of a row's logits a step may hold at once (the forward's output, the batcher's
#: concatenation of new and fed rows, the sampling kernel's two work rows on CUDA).
LOGIT_ROW_COPIES = 4
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

    row_budget: int = 0  # rows the batch may hold (max_batch_rows, resolved)
    steps: int = 0  # sampling steps (one draw for every row of the batch)
    rows_sampled: int = 0  # sum over steps of the rows in the batch
    forwards: int = 0  # decode forward passes (prefills not counted)
    prefills: int = 0
    waits: int = 0  # row-steps a row waited for room in the KV budget
    migrations: int = 0  # rows copied into a longer length class
    compactions: int = 0  # rows moved into a vacated slot of their class
    class_growths: int = 0  # length classes enlarged by slots (one copy of their rows each)
    peak_cache_tokens: int = 0  # KV positions held at the fullest (ClassCache.held)
    rows_per_step: list[int] = field(default_factory=list, repr=False)

    @property
    def mean_rows(self) -> float:
        return self.rows_sampled / self.steps if self.steps else 0.0


@dataclass
class _Prompt:
    """A prompt being sampled: its rollouts' records, and its prefill while rollouts remain
    (logits, and keys/values [layers, 2, kv_heads, positions, head_dim] until all are admitted)."""

    index: int
    job: PromptJob
    seed: int
    rollouts: int
    admitted: int = 0
    finished: int = 0
    live: int = 0  # admitted rollouts not finished
    prefill_logits: torch.Tensor | None = None
    keys_values: torch.Tensor | None = None
    tokens: list[list[int]] = field(default_factory=list)
    entropies: list[list[float]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    hit_eos: list[bool] = field(default_factory=list)
    # The uniforms of each step reached so far: rows admitted at different times reach a step at
    # different times, and a generator is seeded once per (prompt, step), not once per row.
    uniforms: dict[int, np.ndarray] = field(default_factory=dict)
    # Each rollout's stop-sequence scanner (None: no stop sequences), fed every drawn token.
    stops: StopSequences | None = None
    scans: list[StopScanner] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = [[] for _ in range(self.rollouts)]
        self.entropies = [[] for _ in range(self.rollouts)]
        self.logprobs = [[] for _ in range(self.rollouts)]
        self.hit_eos = [False] * self.rollouts
        if self.stops is not None:
            self.scans = [self.stops.scanner() for _ in range(self.rollouts)]

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


def default_kv_budget(rows: int, longest_prompt: int, max_new_tokens: int) -> int:
    """The admission budget in KV positions when ``max_batch_tokens`` is 0.

    What the one-prompt-at-a-time sampler holds on its first step with the same row budget: its
    ``rows`` rows, each a copy of the longest prompt plus one token, rounded up to the quantum
    rows hold on CPU (so that those rows are admitted), plus one rollout's reserve (its prompt to
    ``max_new_tokens``). New rows are admitted while the positions held stay within it (or within
    the most the one-prompt sampler held on a finished prompt, when that is more).
    """

    def rounded(length: int) -> int:
        return -(-length // HELD_QUANTUM) * HELD_QUANTUM

    return rows * rounded(longest_prompt + 1) + rounded(longest_prompt + max_new_tokens - 1)


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup may still take (the job's limit under Slurm and most
    container runtimes), or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = open(limit_file).read().strip()
            usage = int(open(usage_file).read())
        except (OSError, ValueError):
            continue
        # cgroup v1 writes "no limit" as a huge number.
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory(device: torch.device) -> int:
    """Bytes the batch may still take on ``device``, after the weights: CUDA's free device memory;
    on CPU the machine's available memory, or the room left in the job's memory cgroup if less."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    room = _cgroup_room()
    return available if room is None else min(available, room)


def auto_batch_rows(
    loaded: LoadedModel,
    settings: SamplingSettings,
    longest_prompt: int,
    job_rollouts: int,
    free_bytes: int | None = None,
) -> int:
    """Rows for ``max_batch_rows: auto``: as many as fit with every row at its longest (the
    longest prompt and max_new_tokens, as the length classes hold it) and its logits, in
    AUTO_MEMORY_SHARE of ``free_bytes`` (default :func:`available_memory`), or within
    ``max_batch_tokens`` positions when that is set; at least 1, at most the job's rollouts."""
    config = loaded.model.config
    dtype = next(loaded.model.parameters()).dtype
    positions = most_held(longest_prompt + settings.max_new_tokens, maps_classes(loaded.device))
    if settings.max_batch_tokens:
        fitting = settings.max_batch_tokens // positions
    else:
        vocabulary = loaded.model.get_output_embeddings().weight.shape[0]
        row_bytes = kv_bytes_per_position(config, dtype) * positions
        row_bytes += LOGIT_ROW_COPIES * vocabulary * 4
        free = available_memory(loaded.device) if free_bytes is None else free_bytes
        fitting = int(AUTO_MEMORY_SHARE * free) // row_bytes
    return max(1, min(job_rollouts, fitting))


def batch_rows(
    loaded: LoadedModel, settings: SamplingSettings, longest_prompt: int, job_rollouts: int
) -> int:
    """The rows the batch may hold: ``max_batch_rows`` (0: the rollout count M; auto: see
    :func:`auto_batch_rows`)."""
    fixed = fixed_batch_rows(settings)
    if fixed is None:
        return auto_batch_rows(loaded, settings, longest_prompt, job_rollouts)
    return fixed


@dataclass
class _Row:
    """One rollout in the batch: where its keys and values live and the token it feeds next."""

    prompt: _Prompt
    sample: int
    place: Place  # its class, slot and positions in the cache (prompt + tokens fed)
    pending: int | None = None  # the token drawn last step, fed this step; None: newly admitted


class _Batcher:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: SamplingSettings,
        eos_ids: Sequence[int],
        stats: BatchStats,
        longest_prompt: int,
        row_budget: int,
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
        self.row_budget = stats.row_budget = row_budget
        self.cache = ClassCache(
            self.layer_types,
            self.window,
            rows=self.row_budget,
            dtype=self.dtype,
            device=self.device,
        )
        held = self.cache.held
        # Positions one rollout can need held, from its prompt to its last fed token.
        self.reserve = held(longest_prompt + settings.max_new_tokens - 1)
        # A given max_batch_tokens is a hard bound: rows admitted and grown leave one rollout's
        # reserve free, and rows that need more wait. By default the budget governs admission
        # only: it starts at what the one-prompt sampler holds on its first step
        # (default_kv_budget) and rises to the most that sampler held on any prompt finished so
        # far (computed from their rollouts' lengths), times CPU_BUDGET_FACTOR on CPU; admitted
        # rows always grow.
        self.budget = settings.max_batch_tokens
        self.adaptive = not settings.max_batch_tokens
        self.factor = CPU_BUDGET_FACTOR if self.cache.mapped else 1.0
        if self.adaptive:
            self.budget = int(
                self.factor
                * default_kv_budget(self.row_budget, longest_prompt, settings.max_new_tokens)
            )
            if fixed_batch_rows(settings) is None:
                # auto sized the rows for memory with every row at its longest: admission need
                # not hold rows back for memory's sake.
                self.budget = max(self.budget, self.row_budget * self.reserve)
        if self.budget < self.reserve:
            raise ValueError(
                f"max_batch_tokens={settings.max_batch_tokens} cannot hold one rollout of the "
                f"longest prompt ({longest_prompt} tokens) to max_new_tokens="
                f"{settings.max_new_tokens}: set it to at least {self.reserve} (or 0)"
            )
        self.used = 0  # positions the rows hold (ClassCache.held)
        self.switch = ClassDecoding(self.model)
        self.rows: list[_Row] = []  # in admission order: rows[0] is the oldest

    def admission_room(self) -> int:
        """Positions new rows may take now."""
        room = self.budget - self.used
        return room if self.adaptive else room - self.reserve

    def growth_room(self, oldest: bool) -> int | float:
        """Positions a growing row may take now (the oldest may use the reserve; by default any)."""
        if self.adaptive:
            return float("inf")
        return self.budget - self.used - (0 if oldest else self.reserve)

    def observe(self, prompt: _Prompt) -> None:
        """Raise the default budget to the KV the one-prompt sampler held on ``prompt``: its
        rows that reached step t, each holding the prompt and t tokens."""
        if not self.adaptive:
            return
        lengths = np.sort([len(tokens) for tokens in prompt.tokens])[::-1]
        # After its t-th forward (t = 1 .. longest - 1) it holds rows with n_steps > t.
        steps = np.arange(1, lengths[0])
        alive = len(lengths) - np.searchsorted(lengths[::-1], steps, side="right")
        held = int((alive * (len(prompt.job.token_ids) + steps)).max(initial=0) * self.factor)
        self.budget = max(self.budget, -(-held // HELD_QUANTUM) * HELD_QUANTUM)

    # ------------------------------------------------------------------ admission

    def _prefill(self, prompt: _Prompt) -> None:
        """Prefill the prompt (batch size 1); keep its logits and keys/values for its rows."""
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
        prompt.keys_values = torch.stack(
            [torch.stack([k[0], v[0]]) for k, v in zip(dense.keys, dense.values)]
        )  # [layers, 2, kv_heads, positions, head_dim]
        self.stats.prefills += 1

    def admit(self, queue: list[_Prompt]) -> None:
        """Fill free rows with the next rollouts of the queued prompts, in order, while rows and
        budget allow (keeping the oldest row's reserve; the first row of an empty batch always)."""
        while queue and len(self.rows) < self.row_budget:
            prompt = queue[0]
            cost = self.cache.held(len(prompt.job.token_ids))
            if self.rows and self.admission_room() < cost:
                return
            if prompt.prefill_logits is None:
                self._prefill(prompt)
            place = self.cache.add(prompt.keys_values)
            self.used += cost
            self.rows.append(_Row(prompt, prompt.admitted, place))
            prompt.admitted += 1
            prompt.live += 1
            if prompt.admitted == prompt.rollouts:
                prompt.keys_values = None
                queue.pop(0)

    # ------------------------------------------------------------------ one step

    def _fed_rows(self) -> list[_Row]:
        """The continuing rows fed this step, each in a class with room for its next position: a
        row that must hold more gets it if the oldest row's reserve allows (the oldest always),
        else it waits."""
        fed = []
        held = self.cache.held
        for number, row in enumerate(self.rows):
            if row.pending is None:
                continue
            length = row.place.length
            more = held(length + 1) - held(length)
            if more:
                if self.growth_room(oldest=number == 0) < more:
                    self.stats.waits += 1
                    continue
                self.used += more
            if length + 1 > row.place.cls:
                self.cache.fit(row.place, length + 1)
            fed.append(row)
        return fed

    def _forward(self, fed: list[_Row]) -> torch.Tensor:
        """Logits of the fed rows (ordered by class and slot): one forward of every row, padded
        to MIN_FORWARD_ROWS rows, attention class by class."""
        n = len(fed)
        positions = [row.place.length for row in fed]  # the position each row writes now
        tokens = [row.pending for row in fed]
        pad = max(0, MIN_FORWARD_ROWS - n)
        # Padding rows write nothing and attend to nothing (their output is dropped).
        positions += [0] * pad
        tokens += [tokens[0]] * pad
        self.cache.begin([row.place for row in fed], pad)
        position_ids = torch.tensor(positions, device=self.device).unsqueeze(-1)
        # The model wants a prepared mask to pass the cache through; attention uses the classes'.
        placeholder = torch.zeros((len(positions), 1, 1, 1), dtype=self.dtype, device=self.device)
        mask: Any = placeholder
        if self.window is not None:
            mask = {"full_attention": placeholder, "sliding_attention": placeholder}
        try:
            with self.switch(self.cache):
                output = self.model(
                    input_ids=torch.tensor(tokens, device=self.device).unsqueeze(-1),
                    position_ids=position_ids,
                    attention_mask=mask,
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            self.cache.end()
        self.stats.forwards += 1
        return output.logits[:n, -1, :]

    def step(self, on_done: Callable[[_Prompt], None]) -> None:
        fed = self._fed_rows()
        self.stats.peak_cache_tokens = max(self.stats.peak_cache_tokens, self.used)
        # Fed rows go through the forward ordered by class and slot: each class is one view.
        fed.sort(key=lambda row: (row.place.cls, row.place.slot))
        new = [row for row in self.rows if row.pending is None]
        active = fed + new
        if not active:
            raise RuntimeError("no row of the batch could be served (KV budget exhausted)")
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
            row.pending = token
            # EOS, a stop token or a stop sequence completed by this token (decided from the
            # prefix alone: a stopping time) ends the rollout here, counting this token.
            finished = token in self.eos or (
                prompt.stops is not None and prompt.scans[sample].push(token)
            )
            if finished:
                prompt.hit_eos[sample] = True
            elif steps[index] + 1 == self.settings.max_new_tokens:
                finished = True
            if finished:
                row.prompt = None  # type: ignore[assignment]  # marks the row for removal
                self.used -= self.cache.held(row.place.length)
                self.cache.remove(row.place)
                prompt.finished += 1
                prompt.live -= 1
                if prompt.admitted == prompt.rollouts and prompt.live == 0:
                    prompt.prefill_logits = None
                if prompt.finished == prompt.rollouts:
                    done_prompts.append(prompt)
        self.rows = [row for row in self.rows if row.prompt is not None]
        self.stats.steps += 1
        self.stats.rows_sampled += len(active)
        self.stats.rows_per_step.append(len(active))
        self.stats.migrations = self.cache.migrations
        self.stats.compactions = self.cache.compactions
        self.stats.class_growths = self.cache.growths
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
    stops: StopSequences | None = None,
) -> BatchStats:
    """Sample ``settings.rollouts`` rollouts of every job through one continuous batch.

    ``on_done(job_index, rows)`` receives each prompt's rows (ordered by ``sample``, ``text``
    empty) as soon as its last rollout ends; prompts may finish out of order. With ``stops`` a
    rollout also ends at the token that completes one of its stop sequences.
    """
    if not eos_ids:
        raise ValueError("no EOS ids given")
    for job in jobs:
        if len(job.token_ids) == 0:
            raise ValueError(f"prompt {job.prompt_id!r} has no tokens")
        check_prompt_fits(loaded.model, len(job.token_ids), settings, job.prompt_id)
    stats = stats if stats is not None else BatchStats()
    longest = max((len(job.token_ids) for job in jobs), default=1)
    rows = batch_rows(loaded, settings, longest, len(jobs) * settings.rollouts)
    batcher = _Batcher(loaded, settings, eos_ids, stats, longest, rows)
    queue = [
        _Prompt(
            index, job, prompt_seed(settings.seed, job.prompt_id), settings.rollouts, stops=stops
        )
        for index, job in enumerate(jobs)
    ]

    def finish(prompt: _Prompt) -> None:
        prompt.uniforms.clear()
        prompt.scans = []
        on_done(prompt.index, prompt.rows())

    try:
        with torch.inference_mode():
            while queue or batcher.rows:
                batcher.admit(queue)
                batcher.step(finish)
    except (torch.OutOfMemoryError, MemoryError) as error:
        chosen = " (chosen by max_batch_rows: auto)" if fixed_batch_rows(settings) is None else ""
        raise BatchOutOfMemoryError(
            f"out of memory with a batch of {rows} rows{chosen}, up to {longest} prompt tokens + "
            f"max_new_tokens={settings.max_new_tokens} each: set max_batch_rows to fewer rows "
            f"(e.g. {max(1, rows // 2)}) or max_batch_tokens to a KV bound; prompts finished so "
            "far are kept"
        ) from error
    return stats


def sample_prompt(
    loaded: LoadedModel,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    prompt_id: str,
    eos_ids: Sequence[int],
    stops: StopSequences | None = None,
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
        stops=stops,
    )
    return collected
