"""The distribution actually sampled from at one step, its entropy, and the draw from it.

Exactness: every step's entropy, log-normaliser and drawn token's log-probability equal a float64
computation from the logits the model produced, to about 1e-8 (the logits stay in the model's
dtype). Over a filtered distribution (top-k, top-p) the candidates are few and are processed in
float64 outright (:func:`processed_log_distribution`). Over the full vocabulary (top-k 0, top-p 1,
262,144 entries for Gemma-3) a float64 copy of every row would cost more than the model's forward
on a CPU, so :func:`full_vocabulary_step` keeps the elementwise work in float32 and accumulates in
float64 instead: the float32 exponentials carry a relative rounding of about 1e-7 each, which
averages out in the sums, whereas a float32 accumulation over 262k entries is biased by up to 5e-4
nats (what the sampler did before).

Randomness depends only on (seed, prompt_id, rollout, step): ``prompt_seed`` derives a per-prompt
seed with SHA-256 (stable across processes, unlike ``hash()``), and ``step_uniforms`` draws the
uniforms of all M rollouts of a prompt at one step from a generator seeded by (prompt seed, step).
Rollout i uses the i-th uniform and samples by inverse CDF (in float64), so batching, compaction,
chunking and the order or subset of prompts never change which token it draws.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from canopy.sampling.settings import SamplingSettings

__all__ = [
    "BLOCK",
    "entropy_and_logprob",
    "entropy_from_log",
    "full_vocabulary_step",
    "inverse_cdf",
    "processed_distribution",
    "processed_log_distribution",
    "prompt_seed",
    "step_uniforms",
]

#: Columns per block of :func:`full_vocabulary_step`. A block's sums are float32 (256 terms: a
#: relative error near 1e-7, unbiased) and the sums over blocks float64; the inverse CDF finds the
#: block from the block sums and then the column inside that one block, so no [rows, vocab]
#: cumulative sum is built (in float64 it cost more than the rest of the step together).
BLOCK = 256
#: Blocks per row whose sums :func:`full_vocabulary_step` takes in float64 (those of the most
#: mass): with 16, the entropy of peaked, flat and heavy-headed random rows over 262,144 entries
#: was within 4e-8 of float64, against 3.4e-7 with float32 block sums alone.
EXACT_BLOCKS = 16
#: Where :func:`full_vocabulary_step` clamps the shifted logits: exp gives an exact 0 far above it
#: (below -104 in float32), and a finite floor keeps e * d finite for -inf logits.
FLOOR = -1.0e4
#: Bytes of one float32 work buffer of :func:`full_vocabulary_step` on a CPU: a few rows at a
#: time, so that its passes over the two buffers run in the core's cache (on [40, 262144] the same
#: passes took 1.5-3x as long per entry as on [4, 262144]).
CPU_WORK_BYTES = 4 << 20


def _ranking_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The float32 values candidates are ranked by (the model's logits / temperature): the order
    the sampler has always used, so top-k and top-p keep the same candidates in the same order."""
    if logits.dtype == torch.float32 and temperature == 1.0:
        return logits  # dividing by one is exact: no copy
    return logits.float() / temperature


def processed_log_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [B, K] (float64, -inf where dropped) and token ids [B, K] of the processed
    distribution: temperature, then top-k, then top-p (nucleus), renormalised.

    With top-k on, K = top_k and the candidates come sorted by decreasing probability; with both
    filters off, K = vocab and the ids are simply 0..V-1. Top-p keeps the smallest prefix of the
    sorted candidates whose mass reaches ``top_p`` (the token that crosses it is kept). The
    candidates' logits are taken from ``logits`` and divided by the temperature in float64.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if top_k == 0 and top_p >= 1.0:
        ids = torch.arange(vocab, device=logits.device).expand(logits.shape)
        return torch.log_softmax(logits.double() / temperature, dim=-1), ids
    ranking = _ranking_logits(logits, temperature)
    if 0 < top_k < vocab:
        ids = torch.topk(ranking, top_k, dim=-1, sorted=True).indices
    else:
        ids = torch.sort(ranking, dim=-1, descending=True).indices
    values = logits.gather(-1, ids).double() / temperature
    log_q = torch.log_softmax(values, dim=-1)
    if top_p < 1.0:
        q = log_q.exp()
        mass_before = torch.cumsum(q, dim=-1) - q
        values = values.masked_fill(mass_before >= top_p, float("-inf"))
        log_q = torch.log_softmax(values, dim=-1)
    return log_q, ids


def processed_distribution(
    logits: torch.Tensor, settings: SamplingSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [B, K] (float64, rows sum to one, zeros where top-p dropped a candidate) and
    the token ids [B, K] they belong to: the distribution each rollout actually samples from."""
    log_q, ids = processed_log_distribution(
        logits, settings.temperature, settings.top_k, settings.top_p
    )
    return log_q.exp(), ids


def entropy_from_log(log_q: torch.Tensor) -> torch.Tensor:
    """-sum q log q per row (in float64), with 0 log 0 = 0 (dropped candidates carry -inf)."""
    log_q = log_q.double()
    q = log_q.exp()
    return -torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(dim=-1)


def entropy_and_logprob(
    log_q: torch.Tensor, column: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, log q[column]) per row of a block of normalised log-probabilities [rows, K] (-inf where
    dropped) and one column per row [rows], both float64: what a step records."""
    drawn = log_q.gather(-1, column.unsqueeze(-1)).squeeze(-1).double()
    return entropy_from_log(log_q), drawn


def _last_positive(weights: torch.Tensor) -> torch.Tensor:
    """Index of each row's last positive entry (the last one when none is)."""
    positive = (weights > 0).to(torch.int8)
    return weights.shape[-1] - 1 - torch.argmax(positive.flip(-1), dim=-1)


def inverse_cdf(q: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column index drawn from each row of ``q`` (weights, not necessarily normalised) by inverse
    CDF with the given uniforms in [0, 1).

    The cumulative sum is taken in float64; searching with ``right=True`` never lands on a
    zero-probability column, and the clamp guards the case where rounding puts u * total on the
    total itself.
    """
    cdf = torch.cumsum(q.double(), dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return torch.minimum(choice, _last_positive(q))


class _Work:
    """The two float32 work buffers of :func:`full_vocabulary_step` per device, kept between
    steps: allocating them anew cost as much as the passes over them (page faults on a CPU)."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, rows: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.buffers.get(device)
        if held is None or held.shape[1] < rows * width:
            held = torch.empty((2, rows * width), dtype=torch.float32, device=device)
            self.buffers[device] = held
        return held[0, : rows * width].view(rows, width), held[1, : rows * width].view(rows, width)


_WORK = _Work()


def full_vocabulary_step(
    logits: torch.Tensor, temperature: float, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw from softmax(logits / temperature) over the whole vocabulary: (drawn token ids [rows],
    entropies [rows] and drawn log-probabilities [rows], float64).

    Per row, with m the largest logit and d = (x - m) c (float32, <= 0; c = 1/T rounded to
    float32): e = exp(d), Z = sum e and S = sum e d, summed per block of BLOCK columns in float32
    (in float64 for the EXACT_BLOCKS blocks of the largest sums) and over the blocks in float64;
    then h = log Z - S / Z and log q(y) = (x_y - m) / T - log Z with x_y and m in float64. A NaN
    or +inf logit makes m, and so h, non-finite (the caller's check); a -inf logit gives e = 0.

    The float32 multiplier c differs from 1/T by a relative eps below 3e-8 (zero when 1/T is a
    float32: T = 1, 0.5, 2, ...). Every entry shares it, so it does not average out: it is the
    distribution at inverse temperature (1 + eps) c. To first order in eps, log Z gains eps S / Z
    and h loses eps Var(d) under q, so when eps is not 0 one more pass sums e d^2.
    """
    rows, vocab = logits.shape
    blocks = -(-vocab // BLOCK)
    width = blocks * BLOCK
    device = logits.device
    chunk = max(1, CPU_WORK_BYTES // (4 * width)) if device.type == "cpu" else rows
    scale = float(np.float32(1.0 / temperature))
    eps = (1.0 / temperature) / scale - 1.0
    uniforms = uniforms.to(device=device, dtype=torch.float64)
    drawn = torch.empty(rows, dtype=torch.long, device=device)
    entropy = torch.empty(rows, dtype=torch.float64, device=device)
    logprob = torch.empty(rows, dtype=torch.float64, device=device)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        x = logits[start:stop]
        n = stop - start
        shifted, exp = _WORK.get(n, width, device)
        largest = x.amax(dim=-1, keepdim=True).float()
        torch.sub(x, largest, out=shifted[:, :vocab])
        # A -inf logit would make e d = 0 * -inf = NaN; at FLOOR, e is the same exact 0 and e d
        # a 0, so plain sums serve (nansum took five times as long). NaN stays NaN.
        shifted[:, :vocab].clamp_(min=FLOOR)
        if width > vocab:
            shifted[:, vocab:] = FLOOR  # padding columns: e = 0
        if scale != 1.0:
            shifted.mul_(scale)
        torch.exp(shifted, out=exp)
        exp_blocks = exp.view(n, blocks, BLOCK)
        block_z = exp_blocks.sum(dim=-1)
        # The blocks holding most of the mass are summed again in float64: a float32 block sum
        # is off by about 1e-7 of itself, which a peaked distribution does not average away.
        top = block_z.topk(min(EXACT_BLOCKS, blocks), dim=-1).indices
        picked = top.unsqueeze(-1).expand(n, top.shape[1], BLOCK)
        exp_top = exp_blocks.gather(1, picked).double()
        shifted_top = shifted.view(n, blocks, BLOCK).gather(1, picked).double()
        block_z = block_z.double().scatter(1, top, exp_top.sum(dim=-1))
        # The inverse CDF: the block where u * Z falls, then the column inside it.
        cdf = block_z.cumsum(dim=-1)
        target = uniforms[start:stop] * cdf[:, -1]
        block = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
        block = torch.minimum(block, _last_positive(block_z))
        before = torch.where(
            block > 0, cdf.gather(-1, (block - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0
        )
        inside = exp_blocks[torch.arange(n, device=device), block]
        column = torch.searchsorted(
            inside.double().cumsum(dim=-1), (target - before).unsqueeze(-1), right=True
        ).squeeze(-1)
        column = torch.minimum(column, _last_positive(inside))
        # Rows with non-finite logits draw nonsense, but from inside the vocabulary.
        token = (block * BLOCK + column).clamp(max=vocab - 1)
        drawn[start:stop] = token
        # e is no longer needed: its buffer takes e d (and then e d^2).
        torch.mul(exp, shifted, out=exp)
        block_s = exp_blocks.sum(dim=-1).double()
        block_s = block_s.scatter(1, top, (exp_top * shifted_top).sum(dim=-1))
        z = block_z.sum(dim=-1)
        mean = block_s.sum(dim=-1) / z  # E_q[d]
        log_z = z.log()
        h = log_z - mean
        if eps != 0.0:
            torch.mul(exp, shifted, out=exp)
            variance = exp.sum(dim=-1).double() / z - mean**2
            log_z = log_z + eps * mean
            h = h - eps * variance
        entropy[start:stop] = h
        chosen = x.gather(-1, token.unsqueeze(-1)).squeeze(-1).double()
        logprob[start:stop] = (chosen - largest.squeeze(-1).double()) / temperature - log_z
    return drawn, entropy, logprob


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A 63-bit seed for one prompt, stable across processes and machines (SHA-256)."""
    digest = hashlib.sha256(f"canopy-sampling\x00{int(seed)}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_uniforms(seed_of_prompt: int, step: int, rollouts: int) -> np.ndarray:
    """The uniforms in [0, 1) of all M rollouts at step ``step`` (0-based), float64.

    Drawn for all M rollouts from a generator seeded by (prompt seed, step), so rollout i's number
    at step t is the same however the rollouts are batched or which of them are still running.
    """
    return np.random.default_rng([seed_of_prompt, step]).random(rollouts)
