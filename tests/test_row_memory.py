"""Memory of a row table under a cap (issue 12): arrays and index allocated once for the cap, an index that
deletes by backward shift (no tombstones, never rebuilt under a cap), an eviction selection that gathers no
copy of the whole table, and the documented bound ``RowTable.shard_memory``. No Ray, no timing: array
lengths, object identity, dict and sort references, and tracemalloc's count of the bytes NumPy allocates."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from rayps.server import HashedUniformInit, LFUEviction, LRUEviction, RowTable, TTLEviction
from rayps.server.row_index import RowIndex, row_owner
from rayps.server.row_policies import smallest_except
from rayps.server.sparse_rows import RowTableShard
from rayps.updaters import Adam, Sgd


def _owned(rng, count: int, shard: int, num_shards: int, space: int = 10**9) -> np.ndarray:
    ids = rng.integers(0, space, 4 * count)
    return ids[row_owner(ids, num_shards) == shard][:count]


@pytest.mark.parametrize("eviction", [LRUEviction(2_000), LFUEviction(2_000)])
def test_a_capped_shard_never_reallocates_and_stores_at_most_its_cap(eviction):
    table = RowTableShard("emb", 10**9, 8, "float32", 1, 2, Adam(0.01), initial=HashedUniformInit(8),
                          eviction=eviction)
    cap = 1_000
    arrays = (table._values, table._state, table._ids, table._iterations, table._changed, table._stamps,
              table._counts, table.index.keys, table.index.vals)
    assert table.cap == cap and len(table._ids) == cap and table._values.shape == (cap, 8)
    assert table._state.shape == (2, cap, 8)
    rng, pushed = np.random.default_rng(3), set()
    for step in range(60):  # 60 x 150 new ids and some stored ones: about 9 times the cap
        fresh = _owned(rng, 150, 1, 2)
        again = table._ids[:table.n][rng.permutation(table.n)[:50]] if table.n else fresh[:0]
        ids = np.concatenate([fresh, again, fresh[:10]])  # duplicates too
        table.push_rows(ids, rng.standard_normal((len(ids), 8)).astype(np.float32))
        pushed.update(fresh.tolist())
        assert all(now is before for now, before in zip((table._values, table._state, table._ids,
                                                         table._iterations, table._changed, table._stamps,
                                                         table._counts, table.index.keys, table.index.vals),
                                                        arrays)), f"an array was reallocated at push {step}"
        assert table.n <= cap and table.index.deleted == 0
    every = np.array(sorted(pushed), dtype=np.int64)
    slots = table.index.lookup(every)
    found = slots >= 0
    assert int(found.sum()) == table.n == len(set(table._ids[:table.n].tolist()))  # a plain count
    np.testing.assert_array_equal(table._ids[slots[found]], every[found])  # each found id is at its slot
    assert table.n == cap and table.counters["evicted"] == len(every) - cap
    table.validate()


def test_backward_shift_deletion_matches_a_dict_at_full_load_with_wraparound():
    rng = np.random.default_rng(5)
    index, model, cells = RowIndex(64), {}, 64
    keys = index.keys
    universe = np.arange(0, 400, dtype=np.int64)  # few distinct homes in 64 cells: long clusters that wrap
    for _ in range(400):
        absent = np.setdiff1d(universe, np.array(list(model), dtype=np.int64))
        new = rng.choice(absent, size=min(int(rng.integers(1, 12)), cells // 2 - len(model)), replace=False)
        index.insert(new, new * 7 + 1)
        model.update({int(i): int(i) * 7 + 1 for i in new})
        if model and rng.random() < 0.9:
            gone = rng.choice(np.array(list(model)), size=int(rng.integers(1, len(model) + 1)), replace=False)
            index.delete(gone)
            for i in gone.tolist():
                del model[i]
        assert index.keys is keys and index.deleted == 0  # never rebuilt, no tombstones
        live = index.keys[index.keys >= 0]
        assert index.size == len(model) == len(live) == len(set(live.tolist()))
        np.testing.assert_array_equal(index.lookup(universe), [model.get(int(i), -1) for i in universe])


def test_smallest_except_matches_a_sort():
    rng = np.random.default_rng(8)
    for n, k, excluded in ((500, 40, 30), (500, 470, 30), (500, 0, 10), (50, 20, 30), (300, 1, 299)):
        keys = [rng.integers(0, 6, n), rng.integers(0, 4, n), rng.permutation(n)]  # ties up to the unique key
        skip = rng.choice(n, size=excluded, replace=False)
        order = [i for i in sorted(range(n), key=lambda i: (keys[0][i], keys[1][i], keys[2][i]))
                 if i not in set(skip.tolist())]
        assert sorted(smallest_except(keys, k, skip).tolist()) == sorted(order[:k])


def test_the_documented_bound_is_the_plain_sum_of_its_parts():
    lru = RowTable(10**6, 8, eviction=LRUEviction(1_000)).shard_memory(2, Adam(0.01), op_rows=100)
    cap = 500
    assert lru["rows"] == cap * 8 * (4 + 2 * 4)  # values and Adam's two moments, float32
    assert lru["bookkeeping"] == cap * 40
    assert lru["index"] == 16 * 1024  # the power of two above 2 cap + 1 = 1001
    assert lru["eviction_log"] == 8 * 65536  # max(4 cap, 65536) ids
    assert lru["eviction_scratch"] == 9 * cap + 33 * 100
    assert lru["push_scratch"] == 100 * (64 + 10 * 8 * 4)
    assert lru["bound"] == lru["rows"] + lru["overhead"] == sum(
        lru[k] for k in ("rows", "bookkeeping", "index", "eviction_log", "eviction_scratch", "push_scratch"))
    f64 = RowTable(10**6, 4, "float64", eviction=LFUEviction(300_000)).shard_memory(3, Sgd(0.1), op_rows=0)
    assert f64["rows"] == 100_000 * 4 * 8 and f64["index"] == 16 * 262_144 and f64["eviction_scratch"] == 33 * 100_000
    assert f64["eviction_log"] == 8 * 400_000 and f64["push_scratch"] == 0
    with pytest.raises(ValueError, match="eviction"):
        RowTable(10**6, 8, eviction=TTLEviction(5)).shard_memory(2, Adam(0.01), op_rows=10)
    with pytest.raises(ValueError, match="op_rows"):
        RowTable(10**6, 8, eviction=LRUEviction(10)).shard_memory(2, Adam(0.01), op_rows=-1)


@pytest.mark.parametrize("eviction", [LRUEviction(40_000), LFUEviction(40_000)])
def test_a_full_capped_shard_stays_within_the_documented_bound(eviction):
    """Held bytes (the arrays in use, the index, the log) plus the most any push allocates on top
    (tracemalloc's peak over a push, eviction batches included) stay within ``shard_memory``."""
    spec = RowTable(10**9, 16, initial=HashedUniformInit(16), eviction=eviction)
    table = RowTableShard("emb", 10**9, 16, "float32", 0, 2, Adam(0.01), initial=HashedUniformInit(16),
                          eviction=eviction)
    bound = spec.shard_memory(2, Adam(0.01), op_rows=2_000)
    rng = np.random.default_rng(11)
    table.push_rows(_owned(rng, 2_000, 0, 2), rng.standard_normal((2_000, 16)).astype(np.float32))  # warm-up
    tracemalloc.start()
    try:
        worst = 0
        for _ in range(25):  # 25 x 2,000 ids, a quarter stored already: past the cap, evicting in batches
            ids = np.concatenate([_owned(rng, 1_500, 0, 2), table._ids[:500]])
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            table.push_rows(ids, rng.standard_normal((len(ids), 16)).astype(np.float32))
            worst = max(worst, tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    assert table.n == bound["cap"] and table.counters["evicted"] > 0
    row_bytes = 16 * 4 * 3 + 40
    held = table.n * row_bytes + table.index.nbytes + 8 * table._evicted_logged
    assert table.used_bytes() == held
    assert worst <= bound["eviction_scratch"] + bound["push_scratch"]
    assert held + worst <= bound["bound"]
