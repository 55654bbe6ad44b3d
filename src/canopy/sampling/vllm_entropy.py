"""The step entropy computed inside vLLM: a vLLM plugin that makes the engine's sampler hand back,
with every drawn token, the entropy of the distribution it drew from and the token's log q.

vLLM's V1 sampler builds the processed logits of every step over the whole vocabulary (after
temperature, its min-p logits processor, top-k and top-p; the masked tokens at -inf) and, with
``logprobs_mode="processed_logits"``, passes them with the drawn tokens to
``Sampler.gather_logprobs``. This plugin replaces that method for requests that ask for one
log-probability: instead of vLLM's top-1 candidate and the drawn token's rank, it reduces each row
in float64 to

* column 0: log q(drawn) (so vLLM's cumulative log-probability is the rollout's log q),
* column 1: h = -sum q log q,

both under the drawn token's id, with the rank set to :data:`MARK` (a real rank is >= 1) so that
the backend can tell these rows from vLLM's own. The two numbers travel as float64 through vLLM's
output path (its lists are numpy arrays until ``tolist``), so nothing is rounded to float32.

The reduction runs a few rows at a time (on a CPU they stay in the core's cache): float32
elementwise work (d = x - max, e = exp d), float32 sums over blocks of :data:`BLOCK` columns and
float64 sums over the blocks; then h = log Z - S / Z with Z = sum e, S = sum e d, and
log q(y) = d_y - log Z. A float32 exponential is off by about 1e-7 of itself, which averages out in
the sums (to about 1e-8 nats here, see the vllm test tier).

This file is what vLLM loads: it needs only the standard library, torch and vLLM, and is never
imported by the workflow itself. The backend's worker (``canopy.sampling.vllm``) registers it for
its own engine only: it writes a one-entry-point distribution (``vllm.general_plugins``) into a
scratch folder on ``PYTHONPATH``, so that vLLM loads it in every process it starts (the engine
core, its workers), and sets :data:`ENABLE_VARIABLE`. vLLM installed elsewhere never sees it.
"""

from __future__ import annotations

import logging
import os

#: The vLLM release whose sampler this plugin was written against and tested with: the backend
#: refuses any other before the first prompt.
SUPPORTED_VLLM = "0.32.0"
#: Set to 1 in the engine's environment to switch the plugin on.
ENABLE_VARIABLE = "CANOPY_VLLM_STEP_ENTROPY"
#: The entry point's name (what ``VLLM_PLUGINS`` must list when a user restricts plugins).
PLUGIN_NAME = "canopy_step_entropy"
#: The rank the plugin gives every drawn token: vLLM's own ranks start at 1.
MARK = -1
#: Columns per float32 block sum.
BLOCK = 256
#: Where the shifted logits are clamped: exp gives an exact 0 far above it (below -104 in float32).
FLOOR = -1.0e4
#: Bytes of float32 work per chunk of rows on a CPU (two buffers of this size): its passes then
#: run in the core's cache. On [40, 262144] rows, one thread: 18-20 ms at 2-4 MB, 26 ms at 32 MB,
#: against 33 ms for one torch.softmax of the same rows.
CPU_CHUNK_BYTES = 4 << 20
#: Entries per chunk on an accelerator: bounds the work buffers (two float32 [rows, vocab]) that
#: vLLM's memory profile does not see.
DEVICE_CHUNK_ENTRIES = 1 << 24

logger = logging.getLogger(__name__)


class _Buffers:
    """Two float32 work buffers per device, kept between steps: allocating them anew each step
    cost as much as the passes over them (page faults, on a CPU)."""

    def __init__(self) -> None:
        self.held: dict = {}

    def get(self, rows: int, width: int, device):
        import torch

        held = self.held.get(device)
        if held is None or held.shape[1] < rows * width:
            held = torch.empty((2, rows * width), dtype=torch.float32, device=device)
            self.held[device] = held
        return held[0, : rows * width].view(rows, width), held[1, : rows * width].view(rows, width)


_BUFFERS = _Buffers()


def _sparse_rows(x, top_k):
    """The finite entries of rows that top-k alone filtered, [B, k] (-inf padded), or None where
    a row may hold more (ties at its k-th logit, or no top-k): such a row takes the dense path.
    One top-(k + 1) per row instead of passes over the whole vocabulary."""
    import torch

    if top_k is None:
        return None
    k = top_k.to(device=x.device, dtype=torch.long)
    widest = int(k.max())
    if widest + 1 >= x.shape[-1]:
        return None
    values = torch.topk(x, widest + 1, dim=-1).values
    # The (k + 1)-th largest is -inf exactly when at most k entries survived.
    beyond = values.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    if not bool(torch.isneginf(beyond).all()):
        return None
    return values[:, :widest]


def _kept_top_k(survivors):
    """The survivors of the top-k mask, [B, k] (-inf padded), from the top k + 1 logits of each
    row that :func:`_top_k_mask_keeping_survivors` took before masking; None where a row kept more
    than its k (a tie with its k-th logit) or had no top-k."""
    import torch

    top, k, unfiltered = survivors
    if bool(unfiltered.any()):
        return None
    kth = top.gather(-1, (k - 1).unsqueeze(-1))
    following = top.gather(-1, k.unsqueeze(-1))
    if not bool((following < kth).all()):
        return None
    widest = int(k.max())
    columns = torch.arange(widest, device=top.device)
    return top[:, :widest].masked_fill(columns >= k.unsqueeze(-1), float("-inf"))


def _reduce(values):
    """(h, log Z, max) per row of finite-or--inf logits [B, K], all float64, outright."""
    import torch

    x = values.double()
    largest = x.amax(dim=-1)
    log_q = torch.log_softmax(x, dim=-1)
    q = log_q.exp()
    entropy = -torch.where(q > 0, q * log_q, 0.0).sum(-1)
    return entropy, torch.logsumexp(x - largest.unsqueeze(-1), dim=-1), largest


def step_entropy(processed_logits, drawn, top_k=None, survivors=None):
    """(h, log q(drawn)) per row, float64, of softmax(processed_logits) (rows [B, V], -inf where
    a filter removed a token) and the drawn token ids [B]. Rows that top-k alone filtered skip the
    full-vocabulary passes: with ``survivors`` (what the top-k mask kept aside) at no cost, with
    ``top_k`` [B] (the rows' top-k) at the cost of one top-(k + 1); None where none applies."""
    import torch

    rows, vocab = processed_logits.shape
    device = processed_logits.device
    token = drawn.to(device=device, dtype=torch.long).unsqueeze(-1)
    drawn_logit = processed_logits.gather(-1, token).squeeze(-1).double()
    if survivors is not None:
        sparse = _kept_top_k(survivors)
    else:
        sparse = _sparse_rows(processed_logits, top_k)
    if sparse is not None:
        entropy, log_total, largest = _reduce(sparse)
        return entropy, drawn_logit - largest - log_total

    width = -(-vocab // BLOCK) * BLOCK
    if device.type == "cpu":
        chunk = max(1, CPU_CHUNK_BYTES // (4 * width))
    else:
        chunk = max(1, DEVICE_CHUNK_ENTRIES // width)
    entropy = torch.empty(rows, dtype=torch.float64, device=device)
    drawn_log_q = torch.empty(rows, dtype=torch.float64, device=device)
    for start in range(0, rows, chunk):
        x = processed_logits[start : start + chunk]
        n = x.shape[0]
        shifted, weights = _BUFFERS.get(n, width, device)
        largest = x.amax(dim=-1, keepdim=True)
        torch.sub(x, largest, out=shifted[:, :vocab])
        # At FLOOR the exponential is the same exact 0 as at -inf, and weight * shifted a 0
        # instead of 0 * -inf = NaN: the sums need no mask.
        shifted[:, :vocab].clamp_(min=FLOOR)
        shifted[:, vocab:] = FLOOR  # padding to whole blocks
        torch.exp(shifted, out=weights)
        total = weights.view(n, -1, BLOCK).sum(-1).double().sum(-1)
        torch.mul(weights, shifted, out=weights)
        tilted = weights.view(n, -1, BLOCK).sum(-1).double().sum(-1)
        log_total = total.log()
        entropy[start : start + n] = log_total - tilted / total
        drawn_log_q[start : start + n] = (
            drawn_logit[start : start + n] - largest.squeeze(-1).double() - log_total
        )
    return entropy, drawn_log_q


class _Step:
    """What the sampler knows of the batch it is working on, for ``gather_logprobs`` (a static
    method, called without it): the rows' top-k from ``forward``'s sampling metadata, and the
    survivors of the top-k mask on the CPU path."""

    top_k = None
    survivors = None


def _forward_noting_top_k(original):
    def forward(self, logits, sampling_metadata, *args, **kwargs):
        # With top-p on, a row's survivors are not its top k: those rows take the dense path.
        _Step.top_k = sampling_metadata.top_k if sampling_metadata.top_p is None else None
        try:
            return original(self, logits, sampling_metadata, *args, **kwargs)
        finally:
            _Step.top_k = _Step.survivors = None

    return forward


def _top_k_mask_keeping_survivors(logits, k):
    """The top-k mask of vLLM's CPU path (rows with top-k and no top-p): every logit below its
    row's k-th largest to -inf, ties with it kept, in place. It takes each row's top k + 1 values
    (one more than the mask needs, to see ties) and keeps them aside, so that the entropy of the
    survivors needs no second pass over the vocabulary."""
    import torch

    vocab = logits.shape[-1]
    k = k.to(device=logits.device, dtype=torch.long)
    unfiltered = k >= vocab  # vLLM gives a row without top-k the whole vocabulary
    k = k.masked_fill(unfiltered, 1)
    top = logits.topk(min(int(k.max()) + 1, vocab), dim=-1).values
    kth = top.gather(-1, (k - 1).unsqueeze(-1))
    kth = kth.masked_fill(unfiltered.unsqueeze(-1), float("-inf"))
    _Step.survivors = (top, k, unfiltered)
    return logits.masked_fill_(logits < kth, float("-inf"))


def _gather_step_entropy(original):
    """``Sampler.gather_logprobs`` for our requests (one log-probability each), else vLLM's own."""
    import torch
    from vllm.v1.outputs import LogprobsTensors

    def gather_logprobs(logprobs, num_logprobs, token_ids):
        if num_logprobs != 1:
            return original(logprobs, num_logprobs, token_ids)
        entropy, drawn_log_q = step_entropy(logprobs, token_ids, _Step.top_k, _Step.survivors)
        ids = token_ids.to(torch.int32).unsqueeze(-1).expand(-1, 2).contiguous()
        values = torch.stack([drawn_log_q, entropy], dim=-1)
        ranks = torch.full_like(token_ids, MARK)
        return LogprobsTensors(ids, values, ranks)

    return staticmethod(gather_logprobs)


def register() -> None:
    """vLLM's entry point: patch the V1 sampler when the backend asked for it (in each process)."""
    if os.environ.get(ENABLE_VARIABLE) != "1":
        return
    import vllm
    from vllm.v1.sample.ops import topk_topp_sampler
    from vllm.v1.sample.sampler import Sampler

    if vllm.__version__ != SUPPORTED_VLLM:
        # The backend refuses other versions before it starts an engine; a process that gets here
        # anyway leaves vLLM's sampler alone, and the backend sees rows without the mark.
        logger.error(
            "canopy step entropy: vLLM %s is not %s; sampler left alone",
            vllm.__version__,
            SUPPORTED_VLLM,
        )
        return
    if getattr(Sampler, "_canopy_step_entropy", False):
        return  # plugins may load more than once per process
    Sampler.gather_logprobs = _gather_step_entropy(Sampler.gather_logprobs)
    Sampler.forward = _forward_noting_top_k(Sampler.forward)
    topk_topp_sampler.apply_top_k_only = _top_k_mask_keeping_survivors
    Sampler._canopy_step_entropy = True
    logger.info("canopy step entropy: vLLM's V1 sampler returns (log q, entropy) per step")
