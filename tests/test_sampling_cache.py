"""The length-class KV cache of the continuous batch: rows move up a class when they outgrow it,
a leaving row's slot takes its class's last row, vacated pages go back to the system, and the
attention views see exactly each row's positions."""

from __future__ import annotations

import mmap

import pytest
import torch

from canopy.sampling import cache as cache_module
from canopy.sampling.cache import ClassCache, class_length

LAYERS, HEADS, DIM = 2, 2, 8
# One slot of the 32-position class: 2 layers x keys/values x 2 heads x 32 x 8 float32 = 8 KiB,
# whole pages, so a vacated slot is released entirely.
SLOT_32 = LAYERS * 2 * HEADS * 32 * DIM * 4


def cache(rows: int = 4, mapped: bool = True) -> ClassCache:
    return ClassCache(
        ["full_attention"] * LAYERS,
        None,
        rows=rows,
        dtype=torch.float32,
        device=torch.device("cpu"),
        mapped=mapped,
    )


def prompt(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((LAYERS, 2, HEADS, length, DIM), generator=generator)


def stored(kv: ClassCache, place) -> torch.Tensor:
    """The row's written positions, as [layers, 2, heads, length, dim]."""
    return kv.classes[place.cls].storage[place.slot, :, :, :, : place.length]


def test_class_lengths_double_from_32() -> None:
    assert [class_length(n) for n in (1, 32, 33, 64, 65, 1000, 1025)] == [
        32,
        32,
        64,
        64,
        128,
        1024,
        2048,
    ]


@pytest.mark.parametrize("mapped", [True, False])
def test_a_row_outgrowing_its_class_moves_up_with_its_positions(mapped: bool) -> None:
    kv = cache(mapped=mapped)
    data = [prompt(n, seed) for seed, n in enumerate([32, 20, 30])]
    places = [kv.add(d) for d in data]
    assert [(p.cls, p.slot) for p in places] == [(32, 0), (32, 1), (32, 2)]
    kv.fit(places[1], 31)  # fits: nothing moves
    assert kv.migrations == 0 and (places[1].cls, places[1].slot) == (32, 1)
    kv.fit(places[0], 33)
    # Row 0 went to the 64-class; the 32-class's last row (row 2) took its slot.
    assert (places[0].cls, places[0].slot) == (64, 0)
    assert (places[2].cls, places[2].slot) == (32, 0)
    assert kv.migrations == 1 and kv.compactions == 1
    assert [p.slot for p in kv.classes[32].places] == [0, 1]
    for place, expected in zip(places, data):
        assert torch.equal(stored(kv, place), expected)
    kv.fit(places[0], 129)  # straight to the class that holds 129 positions
    assert places[0].cls == 256 and torch.equal(stored(kv, places[0]), data[0])


@pytest.mark.parametrize("mapped", [True, False])
def test_removing_a_row_refills_its_slot_with_the_class_last_row(mapped: bool) -> None:
    kv = cache(rows=5, mapped=mapped)
    data = [prompt(10 + n, n) for n in range(5)]
    places = [kv.add(d) for d in data]
    kv.remove(places[1])
    assert [p.slot for p in kv.classes[32].places] == [0, 1, 2, 3]
    assert kv.classes[32].places[1] is places[4]
    kv.remove(places[3])  # the last row now: nothing moves
    kv.remove(places[0])
    assert kv.classes[32].places == [places[2], places[4]]
    assert kv.compactions == 2
    for place in (places[2], places[4]):
        assert torch.equal(stored(kv, place), data[places.index(place)])


def test_vacated_slots_are_handed_back_and_read_as_zeros() -> None:
    kv = cache(rows=3)
    data = [prompt(n, seed) for seed, n in enumerate([30, 30, 30])]
    places = [kv.add(d) for d in data]
    storage = kv.classes[32].storage
    kv.remove(places[0])  # slot 0 takes row 2; slot 2 is vacated
    assert kv.released_bytes == SLOT_32  # slot 2 (slot 0's runs are under a page each)
    assert storage[2].abs().sum() == 0  # given back, not zeroed by a write
    assert torch.equal(stored(kv, places[2]), data[2]) and places[2].slot == 0
    assert kv.classes[32].buffer is not None and SLOT_32 % mmap.PAGESIZE == 0


def test_a_slot_refilled_by_a_shorter_row_hands_back_the_pages_past_it() -> None:
    """The class's last row moves into a leaving row's slot first, then the pages past its
    positions go back, in every (layer, keys/values, head) run of positions."""
    kv = cache(rows=3)
    data = [prompt(n, seed) for seed, n in enumerate([600, 600, 520])]
    places = [kv.add(d) for d in data]
    storage = kv.classes[1024].storage
    run = 1024 * DIM * 4  # bytes of one run of positions: 8 pages
    kv.remove(places[0])
    page = mmap.PAGESIZE // (DIM * 4)  # positions per page
    kept = -(-520 // page) * page  # the mover's positions, rounded up to pages
    past = run - kept * DIM * 4
    assert kv.released_bytes == LAYERS * 2 * HEADS * (run + past)  # slot 2 whole, slot 0's tails
    assert torch.equal(stored(kv, places[2]), data[2]) and places[2].slot == 0
    assert storage[0, :, :, :, kept:].abs().sum() == 0 and storage[2].abs().sum() == 0
    # Positions between the mover's end and the page boundary keep the old row's finite values,
    # which attention masks.
    assert storage[0, :, :, :, 520:kept].abs().sum() > 0


def test_dense_classes_grow_by_slots_and_keep_their_rows() -> None:
    kv = cache(rows=20, mapped=False)
    data = [prompt(5, n) for n in range(12)]
    places = [kv.add(d) for d in data]
    assert kv.classes[32].storage.shape[0] == 16 and kv.growths == 1  # 8 slots, doubled once
    assert all(torch.equal(stored(kv, p), d) for p, d in zip(places, data))
    assert kv.held(5) == 32 and cache().held(5) == 16


def test_mapped_classes_beyond_their_first_mapping_grow_by_slots(monkeypatch) -> None:
    """A class whose every-row mapping would exceed MAPPED_CLASS_BYTES starts smaller and grows,
    copying its rows' written positions into the new mapping (nothing else is touched)."""
    monkeypatch.setattr(cache_module, "MAPPED_CLASS_BYTES", 2 * SLOT_32)
    kv = cache(rows=5)
    data = [prompt(3 + 5 * n, n) for n in range(5)]
    places = [kv.add(d) for d in data]
    owner = kv.classes[32]
    assert owner.storage.shape[0] == 5 and kv.growths == 2  # 2 slots, then 4, then 5
    assert owner.buffer is not None and len(owner.buffer) == 5 * SLOT_32
    assert all(torch.equal(stored(kv, p), d) for p, d in zip(places, data))
    # Past each row's positions the new mapping holds zeros: only written positions were copied.
    for place in places:
        assert owner.storage[place.slot, :, :, :, place.length :].abs().sum() == 0
    with pytest.raises(RuntimeError, match="length class 32 is full"):
        kv.add(prompt(4, 9))


def test_attention_views_see_only_each_rows_positions() -> None:
    """begin() builds one group per class; a row not fed (slot 1) gets a zero query, and the
    masks let every row see exactly its positions up to the one it writes now."""
    kv = cache(rows=4)
    places = [kv.add(prompt(n, n)) for n in (5, 9, 20)]
    kv.fit(places[2], 40)  # to the 64-class (it was the 32-class's last row: nothing moves)
    fed = [places[0], places[2]]
    kv.begin(fed, padding=2)
    small, large = kv._groups
    assert (small.view_rows, small.view_length, small.dense) == (1, 32, True)
    assert (large.view_rows, large.view_length) == (1, 64)
    visible = small.masks["full_attention"][0, 0, 0] == 0
    assert visible.nonzero().flatten().tolist() == list(range(6))  # positions 0..5
    kv.end()
    assert [p.length for p in places] == [6, 9, 21]
    kv.begin([places[1]])
    (group,) = kv._groups
    # Row 1 sits at slot 1 behind row 0, which is not fed: the view covers both.
    assert (group.view_rows, group.dense) == (2, False)
    with pytest.raises(ValueError, match="ordered by class and slot"):
        kv.begin([places[1], places[0]])
