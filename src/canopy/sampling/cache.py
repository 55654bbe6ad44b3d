"""KV caches of the sampler: a one-row dense cache for a prompt's prefill, and a paged pool that
the continuous batch's rows share, written in place and never copied per step.

:class:`PagedCache` holds, per layer, one pool of token slots ``[blocks x block_size, kv_heads,
head_dim]``, sized by the batch's budget (a hard bound under ``max_batch_tokens``; by default it
grows geometrically when the admitted rows need more, one copy each time, a few times per run; on
CPU the blocks never handed out are never touched, so they cost no resident memory). A row is one
rollout; it owns a list of blocks (its block table), and the full blocks of its prompt are shared
by all the prompt's rollouts (written once, released when the prompt's last rollout ends). A
finished row gives its blocks back; nothing is moved. A decode step writes every row's new key and
value at the slot of its position, then attention reads, per length bucket of rows (32 x 2^k
positions), the bucket's slots gathered into ``[rows, kv_heads, length, head_dim]`` and masked so
that a row sees only its own positions (and, on sliding-window layers, only the last
``sliding_window``). One forward pass serves every row of the batch, whatever their lengths: the
bucketing lives in the attention function (:func:`paged_attention`, registered with transformers'
``AttentionInterface`` and switched on only for the batch's decode forwards), which hands each
bucket to the model's own attention implementation (sdpa or eager).

:class:`SlotCache` is a dense cache of a few rows (here: one prompt's prefill, batch size 1).

Why not transformers' own machinery (5.24): ``StaticCache`` keeps one write position for the whole
batch (``cumulative_length``), so all rows must be at the same step, and it allocates
``max_cache_len`` for every row up front. Its continuous-batching manager (``generate_batch``) pages
the cache too, but draws tokens with ``torch.multinomial`` from one global generator: it can
neither give rollout i of prompt p the uniform of (seed, p, i, t) nor return the entropy of the
processed distribution; and it reads one padded gather of every row's keys per layer, so one long
row makes every row read its length.

Decoder layers of transformers 5 only call ``cache.update(keys, values, layer_idx, ...)`` when the
caller passes explicit ``position_ids`` and a prepared 4D attention mask (or, for models with
sliding-window layers, a mapping from layer type to mask), which is all these classes need.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PagedCache",
    "SlotCache",
    "layer_types_of",
    "paged_attention",
    "PagedDecoding",
    "sliding_window_of",
]


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


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, q, kv]`` booleans to the additive mask ``[n, 1, q, kv]`` attention takes."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


class SlotCache:
    """Dense KV buffers of ``rows`` x ``length`` positions per layer (allocated at first use)."""

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
        full = additive_mask(visible, self.dtype)
        if self.sliding_window is None:
            return full
        return {
            "full_attention": full,
            "sliding_attention": additive_mask(
                visible & (distance < self.sliding_window), self.dtype
            ),
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

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.keys + self.values if b is not None)

    # ------------------------------------------------------------ allocation

    def _allocate(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        shape = (self.rows, key.shape[1], self.length)
        self.keys[layer] = torch.zeros((*shape, key.shape[3]), dtype=key.dtype, device=key.device)
        self.values[layer] = torch.zeros(
            (*shape, value.shape[3]), dtype=value.dtype, device=value.device
        )


# ------------------------------------------------------------------------------ the paged pool


@dataclass(frozen=True)
class Bucket:
    """Rows ``start .. stop-1`` of a decode forward that attend over ``length`` gathered slots."""

    start: int
    stop: int
    length: int
    slots: torch.Tensor  # [(stop - start) * length] pool slots, row by row
    masks: dict[str, torch.Tensor]  # layer type -> additive mask [rows, 1, 1, length]


class PagedCache:
    """A pool of ``blocks`` x ``block_size`` token slots per layer, shared by the batch's rows.

    Block 0 is scratch: padding rows write there, and gathers point there past a row's end
    (masked). The caller owns the block tables; :meth:`allocate` and :meth:`release` keep the
    free list.
    """

    def __init__(
        self,
        layer_types: list[str],
        sliding_window: int | None,
        *,
        blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if blocks < 2:
            raise ValueError("a paged cache needs at least two blocks (one is scratch)")
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"unsupported attention layer type(s) {unknown}")
        self.layer_types = layer_types
        self.sliding_window = sliding_window
        self.blocks, self.block_size = blocks, block_size
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor | None] = [None] * len(layer_types)
        self.values: list[torch.Tensor | None] = [None] * len(layer_types)
        self._free = list(range(blocks - 1, 0, -1))  # pop() hands out low blocks first
        self.growths = 0
        self._write: torch.Tensor | None = None
        self.buckets: list[Bucket] = []

    # ------------------------------------------------------------ blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        """``count`` free blocks, zeroed (attention multiplies their unwritten slots by exact
        zeros, which must not meet a NaN left in memory)."""
        if count > len(self._free):
            raise RuntimeError(f"paged cache: {count} blocks wanted, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        if blocks:
            self._zero(blocks)
        return blocks

    def _zero(self, blocks: Sequence[int]) -> None:
        slots = self.slots(blocks, 0, len(blocks) * self.block_size)
        for pool in self.keys + self.values:
            if pool is not None:
                pool.index_fill_(0, slots, 0)

    def grow(self, blocks: int) -> None:
        """Enlarge the pool to ``blocks`` blocks (one copy of what it holds; rare: geometric)."""
        if blocks <= self.blocks:
            return
        for pools in (self.keys, self.values):
            for layer, old in enumerate(pools):
                if old is not None:
                    new = old.new_empty((blocks * self.block_size, *old.shape[1:]))
                    new[: old.shape[0]] = old
                    pools[layer] = new
        self._free = list(range(blocks - 1, self.blocks - 1, -1)) + self._free
        self.blocks = blocks
        self.growths += 1

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)

    def slots(self, table: Sequence[int], start: int, stop: int) -> torch.Tensor:
        """Pool slots of positions ``start .. stop-1`` of a row with block table ``table``."""
        positions = torch.arange(start, stop)
        blocks = torch.tensor(list(table), dtype=torch.long)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.device)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Store ``keys``/``values`` [positions, kv_heads, head_dim] at ``slots`` of ``layer``."""
        if self.keys[layer] is None:
            # Uninitialised: on CPU the pages of blocks never handed out are never touched, so
            # the resident memory is the blocks in use at the fullest, not the pool's size.
            # Blocks are zeroed when handed out (allocate), the scratch block here.
            shape = (self.blocks * self.block_size, keys.shape[1])
            self.keys[layer] = torch.empty(
                (*shape, keys.shape[2]), dtype=self.dtype, device=self.device
            )
            self.values[layer] = torch.empty(
                (*shape, values.shape[2]), dtype=self.dtype, device=self.device
            )
            for pool in (self.keys[layer], self.values[layer]):
                pool[: self.block_size].zero_()
            free = set(self._free)
            in_use = [b for b in range(1, self.blocks) if b not in free]
            if in_use:
                used = self.slots(in_use, 0, len(in_use) * self.block_size)
                self.keys[layer].index_fill_(0, used, 0)
                self.values[layer].index_fill_(0, used, 0)
        self.keys[layer].index_copy_(0, slots, keys.to(self.dtype))
        self.values[layer].index_copy_(0, slots, values.to(self.dtype))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.keys + self.values if b is not None)

    # ------------------------------------------------------------ the forward pass

    def begin(
        self,
        write_slots: torch.Tensor,
        tables: list[Sequence[int]],
        lengths: list[int],
        buckets: list[tuple[int, int, int]],
    ) -> None:
        """Prepare a decode forward: row r writes its token at ``write_slots[r]``; the rows of
        bucket ``(start, stop, length)`` attend over their first ``length`` positions (a row sees
        its positions ``0 .. lengths[r]``, the one written now included)."""
        self._write = write_slots
        self.buckets = []
        bs = self.block_size
        for start, stop, length in buckets:
            width = -(-length // bs)
            # Past a row's end the table points at the scratch block (those positions are masked).
            table = torch.tensor(
                [(list(t) + [0] * width)[:width] for t in tables[start:stop]], dtype=torch.long
            )
            positions = torch.arange(length)
            slots = table[:, positions // bs] * bs + positions % bs  # [rows, length]
            query = torch.tensor(lengths[start:stop], dtype=torch.long).unsqueeze(-1)
            distance = (query - positions).unsqueeze(1)  # [rows, 1, length]
            visible = distance >= 0
            full = additive_mask(visible, self.dtype).to(self.device)
            masks = {"full_attention": full, "sliding_attention": full}
            if self.sliding_window is not None:
                sliding = visible & (distance < self.sliding_window)
                masks["sliding_attention"] = additive_mask(sliding, self.dtype).to(self.device)
            self.buckets.append(Bucket(start, stop, length, slots.flatten().to(self.device), masks))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values [n, heads, 1, dim] at the rows' slots; return the
        layer's pools (the attention function gathers from them bucket by bucket)."""
        if self._write is None:
            raise RuntimeError("PagedCache.update called outside a forward prepared by begin()")
        self.write(layer_idx, self._write, key_states[:, :, -1], value_states[:, :, -1])
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((bucket.length for bucket in self.buckets), default=0)

    def attend(
        self,
        inner: Any,
        module: Any,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention of every bucket through ``inner`` (the model's own implementation)."""
        layer_type = self.layer_types[module.layer_idx]
        outputs = []
        for bucket in self.buckets:
            rows = bucket.stop - bucket.start
            shape = (rows, bucket.length, keys.shape[1], keys.shape[2])
            k = keys.index_select(0, bucket.slots).view(shape).transpose(1, 2)
            v = values.index_select(0, bucket.slots).view(shape).transpose(1, 2)
            out, _ = inner(
                module, query[bucket.start : bucket.stop], k, v, bucket.masks[layer_type], **kwargs
            )
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


# The cache of the decode forward under way (set by paged_decoding); the attention function has
# no other way to reach it, since models hand attention only what cache.update returned.
_ACTIVE: list[tuple[PagedCache, Any]] = []
PAGED_ATTENTION = "canopy_paged"


def paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function of the batch's decode forwards (see :class:`PagedCache`)."""
    if not _ACTIVE:
        raise RuntimeError(f"{PAGED_ATTENTION} attention runs only inside paged_decoding()")
    cache, inner = _ACTIVE[-1]
    return cache.attend(inner, module, query, key, value, **kwargs), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_ATTENTION, paged_attention)


def _attention_modules(model: Any) -> list[Any]:
    """The model's self-attention modules (the ones that call ``cache.update``)."""
    return [
        module
        for module in model.modules()
        if type(module).__name__.endswith("Attention")
        and hasattr(module, "layer_idx")
        and hasattr(module, "config")
    ]


def _attention_configs(model: Any) -> list[Any]:
    """The configs the model's attention modules read their implementation from."""
    configs: dict[int, Any] = {}
    for module in _attention_modules(model):
        configs[id(module.config)] = module.config
    if not configs:
        raise ValueError(f"found no attention modules in {type(model).__name__}")
    return list(configs.values())


def _inner_attention(model: Any, implementation: str) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in (None, "eager"):
        # Each model family has its own eager function, in its modeling module.
        module = _attention_modules(model)[0]
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


class PagedDecoding:
    """Switches a model's attention to :func:`paged_attention` for the batch's decode forwards.

    ``with switch(cache): model(...)``: within the block the model's attention reads ``cache``
    bucket by bucket through the model's own implementation (sdpa, eager...), restored on exit.
    """

    def __init__(self, model: Any) -> None:
        self.configs = _attention_configs(model)
        self.implementations = [config._attn_implementation_internal for config in self.configs]
        if len(set(self.implementations)) != 1:
            raise ValueError(f"the model mixes attention implementations {self.implementations}")
        self.inner = _inner_attention(model, self.implementations[0])
        if PAGED_ATTENTION not in _registered:
            _register()
            _registered.add(PAGED_ATTENTION)

    @contextlib.contextmanager
    def __call__(self, cache: PagedCache) -> Iterator[None]:
        _ACTIVE.append((cache, self.inner))
        try:
            for config in self.configs:
                config._attn_implementation_internal = PAGED_ATTENTION
            yield
        finally:
            for config, implementation in zip(self.configs, self.implementations):
                config._attn_implementation_internal = implementation
            _ACTIVE.pop()


_registered: set[str] = set()
