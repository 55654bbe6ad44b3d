"""A KV cache for continuous batching: preallocated row slots, written in place, never copied per step.

Per layer the keys and values live in one tensor [rows, kv_heads, length, head_dim]. A row is one
rollout; the rows of a forward pass are the slots ``0 .. n-1`` (kept contiguous, so attention reads
a view of the buffer, not a gathered copy). Each row has its own position: a step writes every
row's new key and value at that row's position (a scatter of one token per row), and the
attention mask lets a row see only its own positions ``0 .. pos`` (and, on sliding-window layers,
only the last ``sliding_window`` of them). Rows of different prompts and lengths therefore share a
batch without padding tokens being fed through the model.

Rows change between steps by index: a finished rollout's slot is refilled by moving a surviving
row from the end into it (``move``: only the moved rows are copied), and a new rollout is written
into the next free slot from its prompt's prefill (``fill``). The buffers are reallocated only when
the batch needs more rows or a longer length than they hold (geometric growth, a few times per
run), never at every step as a concatenating cache is.

Why not transformers' own machinery (5.24): ``StaticCache`` keeps one write position for the whole
batch (``cumulative_length``), so all rows must be at the same step, and it allocates
``max_cache_len`` for every row up front. Its continuous-batching manager (``generate_batch``) pages
the cache but, with the sdpa and eager kernels, reads each step's keys and values back with
``index_select`` (a gathered copy per layer and step), and it draws tokens with
``torch.multinomial`` from one global generator: it can neither give rollout i of prompt p the
uniform of (seed, p, i, t) nor return the entropy of the processed distribution.

Decoder layers of transformers 5 only call ``cache.update(keys, values, layer_idx, ...)`` when the
caller passes explicit ``position_ids`` and a prepared 4D attention mask (or, for models with
sliding-window layers, a mapping from layer type to mask), which is all this class provides.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SlotCache", "layer_types_of", "sliding_window_of"]


def _text_config(config: Any) -> Any:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def layer_types_of(config: Any) -> list[str]:
    """The attention type of every decoder layer (``full_attention`` or ``sliding_attention``)."""
    text = _text_config(config)
    types = getattr(text, "layer_types", None)
    if types:
        return list(types)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if layers is None:
        raise ValueError(f"cannot tell how many layers the model {type(config).__name__} has")
    return ["full_attention"] * int(layers)


def sliding_window_of(config: Any) -> int | None:
    """The window of the model's sliding-window layers, or None when it has none."""
    if "sliding_attention" not in layer_types_of(config):
        return None
    window = getattr(_text_config(config), "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        raise ValueError("the model has sliding-window layers but names no sliding_window")
    return window


class SlotCache:
    """KV buffers of ``rows`` slots x ``length`` positions per layer (allocated at first use)."""

    def __init__(
        self,
        layer_types: list[str],
        sliding_window: int | None,
        *,
        rows: int,
        length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"unsupported attention layer type(s) {unknown}")
        self.layer_types = layer_types
        self.sliding_window = sliding_window
        self.rows, self.length = rows, length
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor | None] = [None] * len(layer_types)
        self.values: list[torch.Tensor | None] = [None] * len(layer_types)
        self.reallocations = 0
        self._write: torch.Tensor | None = None  # [n, q] positions written by this forward
        self._row_index: torch.Tensor | None = None  # [n, 1]
        self._kv_length = 0

    # ------------------------------------------------------------ the forward pass

    def begin(
        self, positions: torch.Tensor, kv_quantum: int = 1
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Prepare a forward of rows ``0 .. n-1`` feeding tokens at ``positions`` [n, q]; return
        the attention mask to pass to the model (a dict per layer type when some slide).

        Attention reads the first ``kv_quantum``-multiple of positions that covers every row (at
        most the buffer's length): a row's result then does not depend on the longest row beside
        it, since masked positions add exact zeros to the same vectorised sums.
        """
        n = positions.shape[0]
        if n > self.rows or int(positions.max()) >= self.length:
            raise ValueError(
                f"forward of {n} rows up to position {int(positions.max())} does not fit the "
                f"cache ({self.rows} rows x {self.length} positions)"
            )
        self._write = positions
        self._row_index = torch.arange(n, device=positions.device).unsqueeze(-1)
        needed = int(positions.max()) + 1
        self._kv_length = min(self.length, -(-needed // kv_quantum) * kv_quantum)
        keys = torch.arange(self._kv_length, device=positions.device)
        distance = positions.unsqueeze(-1) - keys  # [n, q, kv]: query position - key position
        visible = distance >= 0
        blocked = torch.finfo(self.dtype).min

        def additive(allowed: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=positions.device)
            return mask.masked_fill_(~allowed, blocked).unsqueeze(1)  # [n, 1, q, kv]

        full = additive(visible)
        if self.sliding_window is None:
            return full
        return {
            "full_attention": full,
            "sliding_attention": additive(visible & (distance < self.sliding_window)),
        }

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values [n, heads, q, dim] at each row's positions; return views
        of rows ``0 .. n-1`` up to the longest row's position."""
        if self._write is None:
            raise RuntimeError("SlotCache.update called outside a forward prepared by begin()")
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        n = key_states.shape[0]
        # Indexing [rows, :, positions] puts the indexed dims first: [n, q, heads, dim].
        keys[self._row_index, :, self._write] = key_states.transpose(1, 2).to(keys.dtype)
        values[self._row_index, :, self._write] = value_states.transpose(1, 2).to(values.dtype)
        return keys[:n, :, : self._kv_length], values[:n, :, : self._kv_length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_length

    # ------------------------------------------------------------ rows between steps

    def move(self, sources: list[int], targets: list[int], used_length: int) -> None:
        """Copy rows ``sources`` into slots ``targets`` (positions below ``used_length`` only)."""
        if not sources:
            return
        src = torch.tensor(sources, device=self.device)
        dst = torch.tensor(targets, device=self.device)
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                if buffer is not None:
                    buffer[dst, :, :used_length] = buffer[src, :, :used_length]

    def copy_rows(self, source: SlotCache, rows: list[int], start: int, length: int) -> None:
        """Copy rows ``rows`` of ``source`` (positions below ``length``) into slots from
        ``start`` on (a row moving to a longer length class)."""
        index = torch.tensor(rows, device=self.device)
        for layer in range(len(self.layer_types)):
            for mine, theirs in ((self.keys, source.keys), (self.values, source.values)):
                if mine[layer] is None:
                    mine[layer] = self._empty_like(theirs[layer])
                mine[layer][start : start + len(rows), :, :length] = theirs[layer][
                    index, :, :length
                ]

    def fill(self, start: int, stop: int, prompt: SlotCache) -> None:
        """Write the one-row cache ``prompt`` (a prefilled prompt) into slots ``start .. stop-1``."""
        length = prompt.length
        for layer in range(len(self.layer_types)):
            for mine, theirs in ((self.keys, prompt.keys), (self.values, prompt.values)):
                if theirs[layer] is None:
                    raise RuntimeError("the prompt cache was never filled")
                if mine[layer] is None:
                    mine[layer] = self._empty_like(theirs[layer])
                mine[layer][start:stop, :, :length] = theirs[layer][0:1, :, :length]

    def resize(self, rows: int, length: int, keep_rows: int, keep_length: int) -> None:
        """Reallocate to ``rows`` x ``length``, keeping rows ``0 .. keep_rows-1`` up to
        ``keep_length`` (one copy; happens when the batch outgrows the buffers)."""
        if rows < keep_rows or length < keep_length:
            raise ValueError("resize would drop live rows or positions")
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                if old is None:
                    continue
                new = old.new_zeros((rows, old.shape[1], length, old.shape[3]))
                new[:keep_rows, :, :keep_length] = old[:keep_rows, :, :keep_length]
                buffers[layer] = new
        self.rows, self.length = rows, length
        self.reallocations += 1

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.keys + self.values if b is not None)

    # ------------------------------------------------------------ allocation

    def _empty_like(self, example: torch.Tensor) -> torch.Tensor:
        return example.new_zeros((self.rows, example.shape[1], self.length, example.shape[3]))

    def _allocate(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        shape = (self.rows, key.shape[1], self.length)
        self.keys[layer] = torch.zeros((*shape, key.shape[3]), dtype=key.dtype, device=key.device)
        self.values[layer] = torch.zeros(
            (*shape, value.shape[3]), dtype=value.dtype, device=value.device
        )
