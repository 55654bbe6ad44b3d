"""KV caches of the sampler: a one-row dense cache for a prompt's prefill, and the length classes
that the continuous batch's rows live in, read by attention as views, never gathered or copied
per step.

:class:`ClassCache` keeps, per length class (32 x 2^k positions), one tensor of row slots
``[slots, layers, keys/values, kv_heads, class length, head_dim]``. A row lives in the smallest
class holding its positions; a decode step writes every fed row's new key and value at its slot
and position, then attention reads each class as the view ``[:rows, layer, 0 or 1, :, :length]``
(length: the class's longest row, rounded up to 64, at most the class length), masked so that a
row sees only its own positions (and, on sliding-window layers, only the last
``sliding_window``). So a short row never reads a long row's length, and nothing is gathered: the
per-step gather of a paged pool cost more than the attention itself on CPU. Rows of a class fill
its first slots (a leaving row's slot takes the class's last row), and a row that outgrows its
class is copied once into the next: O(1) copied positions per generated token. One forward pass
serves every row of the batch whatever their lengths: the classes live in the attention function
(:func:`class_attention`, registered with transformers' ``AttentionInterface`` and switched on only
for the batch's decode forwards), which hands each class to the model's own attention
implementation (sdpa or eager).

Memory: on CPU the classes are anonymous memory mappings, resident only where rows wrote, and a
vacated slot's pages are handed back, so the batch holds its rows' positions rounded up to pages.
On CUDA the classes are ordinary tensors: a row holds its class length (up to twice its positions)
and a class keeps the slots of its busiest moment; that is the price of reading views there.
Rollouts of a prompt each hold a copy of the prompt's keys (as the one-prompt sampler's rows do).

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
import mmap
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ClassCache",
    "ClassDecoding",
    "Place",
    "SlotCache",
    "class_attention",
    "class_length",
    "kv_bytes_per_position",
    "layer_types_of",
    "maps_classes",
    "most_held",
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


def kv_bytes_per_position(config: Any, dtype: torch.dtype) -> int:
    """Bytes of one position's keys and values over every layer (what the classes store)."""
    text = _text_config(config)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return len(layer_types_of(config)) * 2 * heads * dim * element


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
        _check_layer_types(layer_types)
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


# ------------------------------------------------------------------------------ length classes

#: Class lengths are SMALLEST_CLASS x 2^k positions.
SMALLEST_CLASS = 32
#: Attention reads a multiple of this many positions of a class (at most the class length): a
#: row's result then does not depend on the longest row beside it, since masked positions add
#: exact zeros to the same vectorised sums.
LENGTH_QUANTUM = 64
#: The accounting quantum of a row's keys and values on CPU: its positions rounded up to this
#: (one 4 KiB page per head for 64-dim float32 or 128-dim bfloat16 keys).
HELD_QUANTUM = 16
#: A memory-mapped class starts with as many slots as fit in this many bytes (at most one per row
#: of the batch), growing by slots beyond: the kernel refuses a single anonymous mapping larger
#: than the machine's memory, which every-row classes of a large model would be.
MAPPED_CLASS_BYTES = 1 << 30
#: A dense class starts with this many slots (at most one per row of the batch).
DENSE_CLASS_SLOTS = 8


def class_length(needed: int) -> int:
    """The length class of a row needing ``needed`` positions (SMALLEST_CLASS x 2^k)."""
    length = SMALLEST_CLASS
    while length < needed:
        length *= 2
    return length


def _check_layer_types(layer_types: Sequence[str]) -> None:
    """Both caches know full and sliding-window attention layers only."""
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"unsupported attention layer type(s) {unknown}")


_CAN_MAP = all(hasattr(mmap, name) for name in ("MAP_PRIVATE", "MAP_ANONYMOUS", "MADV_DONTNEED"))


@dataclass(eq=False)
class Place:
    """Where a row's keys and values live: slot ``slot`` of the class of length ``cls``, with
    ``length`` positions written. The cache updates it when the row moves."""

    cls: int
    slot: int
    length: int


@dataclass(eq=False)
class _Class:
    """The rows of one length class: ``storage[slot, layer, 0 or 1 (keys, values), head, position,
    dim]``; the rows occupy slots ``0 .. len(places) - 1``."""

    length: int
    storage: torch.Tensor
    buffer: mmap.mmap | None  # the anonymous mapping behind storage on CPU
    slot_bytes: int
    places: list[Place] = field(default_factory=list)


@dataclass(frozen=True)
class _Group:
    """Rows ``start .. stop-1`` of a decode forward: fed rows of one class at ``slots``, writing
    their key and value vectors at ``writes[layer, 0 or 1]`` (rows of the storage seen as
    ``[-1, head_dim]``, row by row then head by head); attention reads the class's slots
    ``0 .. view_rows-1`` up to ``view_length`` (the other rows in that range get zero queries and
    their outputs are dropped)."""

    start: int
    stop: int
    storage: torch.Tensor
    slots: torch.Tensor
    writes: torch.Tensor  # [layers, 2, rows x kv_heads]
    view_rows: int
    view_length: int
    masks: dict[str, torch.Tensor]  # layer type -> additive mask [view_rows, 1, 1, view_length]

    @property
    def dense(self) -> bool:
        return self.stop - self.start == self.view_rows


def maps_classes(device: torch.device) -> bool:
    """Whether classes on ``device`` are memory mappings (CPU) rather than dense tensors.
    Anonymous private mappings and madvise are POSIX (Linux, macOS); elsewhere (Windows) CPU
    classes are dense tensors too."""
    return device.type == "cpu" and _CAN_MAP


def most_held(length: int, mapped: bool) -> int:
    """The most positions one row growing to ``length`` positions can cost: with mapped classes
    what it holds (:meth:`ClassCache.held`); with dense ones the slot it keeps in every class it
    passed through (classes keep the slots of their busiest moment): 32 + 64 + ... + its class,
    under twice its class."""
    if mapped:
        return -(-length // HELD_QUANTUM) * HELD_QUANTUM
    return 2 * class_length(length) - SMALLEST_CLASS


class ClassCache:
    """The continuous batch's keys and values: one dense tensor per length class, row by row, so
    that attention reads a class as a view ``storage[:rows, layer, 0, :, :length]``, without a
    gather.

    A row lives in the smallest class that holds its positions (:class:`Place`). Rows of a class
    fill its slots ``0 .. n-1``: when one leaves (it ended, or it outgrew the class), the class's
    last row moves into its slot (one copy of that row's positions). A row that outgrows its class
    is copied once into the next one, twice as long: as classes double, a row is copied
    O(its length) positions in all.

    On CPU a class's storage is an anonymous memory mapping with a slot for every row of the batch
    (up to MAPPED_CLASS_BYTES; beyond, it grows by slots like a dense class, copying only what its
    rows wrote), and the pages of a vacated slot are handed back to the system
    (``MADV_DONTNEED``; they read as zeros after). Pages never written are never resident, so the
    memory in use is the positions the rows wrote, rounded up to pages (:meth:`held`), however
    large the classes are. Elsewhere (CUDA) a class is an ordinary zeroed tensor whose slots grow
    geometrically (one copy each time) and are not given back during a run: a row costs its class
    length, up to twice its positions, and a class keeps the slots of its busiest moment.
    """

    def __init__(
        self,
        layer_types: list[str],
        sliding_window: int | None,
        *,
        rows: int,
        dtype: torch.dtype,
        device: torch.device,
        mapped: bool | None = None,
    ) -> None:
        _check_layer_types(layer_types)
        self.layer_types = layer_types
        self.sliding_window = sliding_window
        self.rows = rows  # the most rows of the batch at once
        self.dtype, self.device = dtype, device
        self.mapped = maps_classes(device) if mapped is None else mapped
        self.classes: dict[int, _Class] = {}
        self.migrations = 0  # rows copied into a longer class
        self.compactions = 0  # rows moved into a vacated slot
        self.released_bytes = 0  # pages handed back to the system (mapped storage)
        self.growths = 0  # classes enlarged by slots (one copy of their rows each)
        self._shape: tuple[int, int] | None = None  # (kv_heads, head_dim)
        self._groups: list[_Group] = []
        self._fed: list[Place] = []
        self._padding = 0

    # ------------------------------------------------------------ accounting

    def held(self, length: int) -> int:
        """Token positions a row of ``length`` positions holds (what the batch's budgets count)."""
        if self.mapped:
            return most_held(length, mapped=True)
        return class_length(length)

    def nbytes(self) -> int:
        """Bytes of every class's storage (on CPU virtual: only written pages are resident)."""
        return sum(c.storage.numel() * c.storage.element_size() for c in self.classes.values())

    # ------------------------------------------------------------ rows

    def add(self, keys_values: torch.Tensor) -> Place:
        """A new row holding ``keys_values`` [layers, 2, kv_heads, positions, head_dim] (its
        prompt's), in the smallest class that holds them."""
        layers, _, heads, length, dim = keys_values.shape
        if layers != len(self.layer_types):
            raise ValueError(f"keys of {layers} layers for a model of {len(self.layer_types)}")
        if self._shape is None:
            self._shape = (heads, dim)
        target = self._class(class_length(max(length, 1)))
        place = Place(target.length, self._slot(target), length)
        target.storage[place.slot, :, :, :, :length] = keys_values.to(self.dtype)
        target.places.append(place)
        return place

    def fit(self, place: Place, needed: int) -> None:
        """Move the row to the class that holds ``needed`` positions if its own is too short."""
        if needed <= place.cls:
            return
        source = self.classes[place.cls]
        target = self._class(class_length(needed))
        slot = self._slot(target)
        length = place.length
        target.storage[slot, :, :, :, :length] = source.storage[place.slot, :, :, :, :length]
        self._vacate(source, place.slot)
        place.cls, place.slot = target.length, slot
        target.places.append(place)
        self.migrations += 1

    def remove(self, place: Place) -> None:
        """Drop the row (its slot is refilled by its class's last row)."""
        self._vacate(self.classes[place.cls], place.slot)

    def _vacate(self, owner: _Class, slot: int) -> None:
        last = len(owner.places) - 1
        if slot != last:
            mover = owner.places[last]
            length = mover.length
            owner.storage[slot, :, :, :, :length] = owner.storage[last, :, :, :, :length]
            # Only the pages past the mover's positions are handed back: releasing the whole slot
            # first would make the copy fault in (and the kernel zero) the pages it then fills.
            self._release(owner, slot, keep=length)
            mover.slot = slot
            owner.places[slot] = mover
            self.compactions += 1
        owner.places.pop()
        self._release(owner, last)

    def _release(self, owner: _Class, slot: int, keep: int = 0) -> None:
        """Hand the slot's whole pages back to the system (they read as zeros after), past its
        first ``keep`` positions in every (layer, keys/values, head) run of positions; positions
        on pages shared with what is kept keep finite old values, which attention masks."""
        if owner.buffer is None:
            return
        start = slot * owner.slot_bytes
        if keep == 0:
            runs = [(start, start + owner.slot_bytes)]
        else:
            _, layers, _, heads, length, dim = owner.storage.shape
            run = length * dim * owner.storage.element_size()
            kept = keep * dim * owner.storage.element_size()
            runs = [
                (begin + kept, begin + run) for begin in range(start, start + owner.slot_bytes, run)
            ]
        for begin, end in runs:
            first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
            stop = end // mmap.PAGESIZE * mmap.PAGESIZE
            if stop > first:
                owner.buffer.madvise(mmap.MADV_DONTNEED, first, stop - first)
                self.released_bytes += stop - first

    def _class(self, length: int) -> _Class:
        found = self.classes.get(length)
        if found is None:
            slots = DENSE_CLASS_SLOTS
            if self.mapped:
                slots = max(1, MAPPED_CLASS_BYTES // self._slot_bytes(length))
            storage, buffer = self._allocate(min(self.rows, slots), length)
            found = self.classes[length] = _Class(length, storage, buffer, self._slot_bytes(length))
        return found

    def _slot_bytes(self, length: int) -> int:
        if self._shape is None:
            raise RuntimeError("ClassCache: add a row before a class is allocated")
        heads, dim = self._shape
        element = torch.empty((), dtype=self.dtype).element_size()
        return len(self.layer_types) * 2 * heads * length * dim * element

    def _slot(self, owner: _Class) -> int:
        """The next free slot of ``owner``; a full class grows geometrically (one copy of its
        rows' written positions, a few times per run)."""
        slot = len(owner.places)
        capacity = owner.storage.shape[0]
        if slot >= capacity:
            if capacity >= self.rows:
                raise RuntimeError(f"length class {owner.length} is full ({capacity} rows)")
            grown, buffer = self._allocate(min(self.rows, capacity * 2), owner.length)
            if buffer is None:
                grown[:capacity] = owner.storage
            else:
                # Row by row, only what was written: the new mapping's other pages stay untouched.
                for place in owner.places:
                    length = place.length
                    grown[place.slot, :, :, :, :length] = owner.storage[
                        place.slot, :, :, :, :length
                    ]
            owner.storage, owner.buffer = grown, buffer
            self.growths += 1
        return slot

    def _allocate(self, slots: int, length: int) -> tuple[torch.Tensor, mmap.mmap | None]:
        if self._shape is None:
            raise RuntimeError("ClassCache: add a row before a class is allocated")
        heads, dim = self._shape
        shape = (slots, len(self.layer_types), 2, heads, length, dim)
        if not self.mapped:
            return torch.zeros(shape, dtype=self.dtype, device=self.device), None
        # Anonymous pages are zero and not resident until written: the class costs what its rows
        # write, not its size. Private: MADV_DONTNEED on a shared mapping keeps the data.
        size = slots * self._slot_bytes(length)
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns about non-writable buffers only
            storage = torch.frombuffer(buffer, dtype=self.dtype).view(shape)
        return storage, buffer

    # ------------------------------------------------------------ the forward pass

    def begin(self, places: Sequence[Place], padding: int = 0) -> None:
        """Prepare a decode forward of the rows at ``places`` (ordered by class, then slot; each
        writes its next position, which its class must hold, see :meth:`fit`) followed by
        ``padding`` rows that write nothing and whose attention output is zero."""
        groups: list[_Group] = []
        start = 0
        while start < len(places):
            owner = self.classes[places[start].cls]
            stop = start
            while stop < len(places) and places[stop].cls == owner.length:
                stop += 1
            fed = places[start:stop]
            slots = [place.slot for place in fed]
            if slots != sorted(set(slots)) or max(p.length for p in fed) >= owner.length:
                raise ValueError("rows must be ordered by class and slot, with room to write")
            view_rows = slots[-1] + 1
            # Query position of every slot in view: the position it writes now (fed rows) or its
            # last written one (rows not fed: their output is dropped, they must just see
            # something finite).
            query = [place.length - 1 for place in owner.places[:view_rows]]
            for place in fed:
                query[place.slot] = place.length
            needed = max(query) + 1
            view_length = min(owner.length, -(-needed // LENGTH_QUANTUM) * LENGTH_QUANTUM)
            distance = (
                torch.tensor(query, dtype=torch.long).unsqueeze(-1) - torch.arange(view_length)
            ).unsqueeze(
                1
            )  # [view_rows, 1, view_length]
            visible = distance >= 0
            full = additive_mask(visible, self.dtype).to(self.device)
            masks = {"full_attention": full, "sliding_attention": full}
            if self.sliding_window is not None:
                sliding = visible & (distance < self.sliding_window)
                masks["sliding_attention"] = additive_mask(sliding, self.dtype).to(self.device)
            # One index per written vector: (((slot x layers + layer) x 2 + part) x heads + head)
            # x length + position, in the storage's row-major order.
            _, layers, _, heads, length, _ = owner.storage.shape
            slot_positions = torch.tensor(
                [place.slot * layers * 2 * heads * length + place.length for place in fed]
            )
            writes = (
                slot_positions.view(1, 1, -1, 1)
                + torch.arange(heads).view(1, 1, 1, -1) * length
                + torch.arange(layers * 2).view(layers, 2, 1, 1) * heads * length
            ).flatten(2)
            groups.append(
                _Group(
                    start,
                    stop,
                    owner.storage,
                    torch.tensor(slots, device=self.device),
                    writes.to(self.device),
                    view_rows,
                    view_length,
                    masks,
                )
            )
            start = stop
        self._groups, self._fed, self._padding = groups, list(places), padding

    def end(self) -> None:
        """After the forward: the fed rows hold one more position."""
        for place in self._fed:
            place.length += 1
        self._groups, self._fed, self._padding = [], [], 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values [rows, heads, 1, dim] at each fed row's slot and
        position (the attention function reads them back from the classes)."""
        if not self._groups:
            raise RuntimeError("ClassCache.update called outside a forward prepared by begin()")
        for group in self._groups:
            vectors = group.storage.view(-1, group.storage.shape[-1])
            for part, states in ((0, key_states), (1, value_states)):
                written = states[group.start : group.stop, :, -1].reshape(-1, states.shape[-1])
                vectors.index_copy_(0, group.writes[layer_idx, part], written.to(vectors.dtype))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((group.view_length for group in self._groups), default=0)

    def attend(self, inner: Any, module: Any, query: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Attention of every class group through ``inner`` (the model's own implementation),
        reading the class's keys and values as views."""
        layer = module.layer_idx
        layer_type = self.layer_types[layer]
        outputs = []
        for group in self._groups:
            rows, length = group.view_rows, group.view_length
            keys = group.storage[:rows, layer, 0, :, :length]
            values = group.storage[:rows, layer, 1, :, :length]
            queries = query[group.start : group.stop]
            if not group.dense:
                queries = query.new_zeros((rows, *query.shape[1:])).index_copy_(
                    0, group.slots, queries
                )
            out, _ = inner(module, queries, keys, values, group.masks[layer_type], **kwargs)
            outputs.append(out if group.dense else out.index_select(0, group.slots))
        if self._padding:
            outputs.append(outputs[0].new_zeros((self._padding, *outputs[0].shape[1:])))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


# The cache of the decode forward under way (set by ClassDecoding); the attention function has
# no other way to reach it, since models hand attention only what cache.update returned.
_ACTIVE: list[tuple[ClassCache, Any]] = []
CLASS_ATTENTION = "canopy_length_classes"


def class_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function of the batch's decode forwards (see :class:`ClassCache`)."""
    if not _ACTIVE:
        raise RuntimeError(f"{CLASS_ATTENTION} attention runs only inside ClassDecoding()")
    cache, inner = _ACTIVE[-1]
    return cache.attend(inner, module, query, **kwargs), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CLASS_ATTENTION, class_attention)


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


class ClassDecoding:
    """Switches a model's attention to :func:`class_attention` for the batch's decode forwards.

    ``with switch(cache): model(...)``: within the block the model's attention reads ``cache``
    class by class through the model's own implementation (sdpa, eager...), restored on exit.
    """

    def __init__(self, model: Any) -> None:
        self.configs = _attention_configs(model)
        self.implementations = [config._attn_implementation_internal for config in self.configs]
        if len(set(self.implementations)) != 1:
            raise ValueError(f"the model mixes attention implementations {self.implementations}")
        self.inner = _inner_attention(model, self.implementations[0])
        if CLASS_ATTENTION not in _registered:
            _register()
            _registered.add(CLASS_ATTENTION)

    @contextlib.contextmanager
    def __call__(self, cache: ClassCache) -> Iterator[None]:
        _ACTIVE.append((cache, self.inner))
        try:
            for config in self.configs:
                config._attn_implementation_internal = CLASS_ATTENTION
            yield
        finally:
            for config, implementation in zip(self.configs, self.implementations):
                config._attn_implementation_internal = implementation
            _ACTIVE.pop()


_registered: set[str] = set()
