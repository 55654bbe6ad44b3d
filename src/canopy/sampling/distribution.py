"""The reductions and draws every sampling step shares, and the randomness behind the draws.

Exactness: every step's entropy, log-normaliser and drawn token's log-probability equal a float64
computation from the logits the model produced, to about 1e-8 (the logits stay in the model's
dtype). Over a filtered distribution (:mod:`canopy.sampling.transforms`) the candidates are
processed in float64 outright (:func:`entropy_and_logprob`). Over the full vocabulary (no
filter on, 262,144 entries for Gemma-3) a float64 copy of every row would cost more than the
model's forward on a CPU, so :func:`full_vocabulary_step` keeps the elementwise work in float32 and
accumulates in float64 instead: the float32 exponentials carry a relative rounding of about 1e-7
each, which averages out in the sums, whereas a float32 accumulation over 262k entries is biased
by up to 5e-4 nats (what the sampler did before).

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

__all__ = [
    "BLOCK",
    "entropy_and_logprob",
    "entropy_from_log",
    "full_vocabulary_step",
    "inverse_cdf",
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
