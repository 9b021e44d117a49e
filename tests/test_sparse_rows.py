"""RowTableShard (no Ray): per-row DL4J updates over lazily stored rows, row ownership, snapshots, bad input.

The reference is the updater applied to each row ALONE, as a ``(1, dim)`` array with ``kernel="reference"``
and the row's own iteration counter, over that row's pushes (duplicates of one push summed first, in order).
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from rayps.server.checkpoints.format import CheckpointError, pack
from rayps.server.row_index import HashedUniformInit, RowIndex, counter_uniform, row_owner, split_by_owner
from rayps.server.sparse_rows import RowTableShard
from rayps.updaters import L2, AdaGrad, Adam, Nesterovs, ParamGroup, RmsProp, Sgd, WeightDecay
from rayps.updaters.schedules import ExponentialSchedule
from rayps.worker.ctr import power_law_ranks
from state_invariants import record_instances, validate_all


@pytest.fixture(autouse=True)
def _invariants_hold_after_each_test(monkeypatch):
    """Every RowTableShard a test builds passes ``validate()`` when the test is done (tests/state_invariants.py)."""
    made = record_instances(monkeypatch, RowTableShard)
    yield
    validate_all(made)


NUM_ROWS, DIM = 200, 3


class RowReference:
    """Every row's own updater state and iteration counter, stepped alone with the reference kernel."""

    def __init__(self, updater, initial, dtype, group=None):
        self.updater, self.initial, self.dtype, self.group = updater, initial, np.dtype(dtype), group
        self.rows: dict[int, list] = {}  # id -> [params (1, dim), state, iteration]

    def push(self, ids, grads, epoch=0):
        summed: dict[int, np.ndarray] = {}
        compute = np.float64 if self.dtype == np.float64 else np.float32
        for i, g in zip(ids.tolist(), grads):  # duplicates summed in the order given
            summed[i] = summed[i] + g.astype(compute) if i in summed else g.astype(compute)
        for i, g in summed.items():
            if i not in self.rows:
                params = np.asarray(self.initial(np.array([i])), dtype=self.dtype)
                self.rows[i] = [params, self.updater.init(params), 0]
            params, state, iteration = self.rows[i]
            adjustments = self.group.adjustments(iteration, epoch) if self.group else None
            kwargs = {"adjustments": adjustments} if adjustments else {}
            self.updater.apply(params, g.astype(self.dtype)[None, :], state, iteration, epoch, kernel="reference",
                               **kwargs)
            self.rows[i][2] += 1


def _pushes(seed=0, count=7, high=40, size=25):
    """Pushes with duplicate ids; rows end up touched different numbers of times (some never)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        ids = np.minimum(rng.integers(0, high, size=size), rng.integers(0, high, size=size))  # low ids often
        yield ids.astype(np.int64), rng.standard_normal((size, DIM))


def _shards(updater, dtype=np.float32, num_shards=3, initial=None):
    initial = HashedUniformInit(DIM, 0.1, seed=5) if initial is None else initial
    return [RowTableShard("emb", NUM_ROWS, DIM, dtype, s, num_shards, updater, initial) for s in range(num_shards)]


def _route_push(shards, ids, grads, **kwargs):
    for shard, positions in zip(shards, split_by_owner(ids, len(shards))):
        shard.push_rows(ids[positions], grads[positions], **kwargs)


def _pull_all(shards, ids):
    out = np.empty((len(ids), DIM), dtype=shards[0].dtype)
    for shard, positions in zip(shards, split_by_owner(ids, len(shards))):
        out[positions] = shard.pull_rows(ids[positions])
    return out


@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [lambda: AdaGrad(learning_rate=0.1), lambda: Adam(learning_rate=0.05)],
                         ids=["AdaGrad", "Adam"])
def test_touched_rows_follow_their_own_updater_and_untouched_rows_keep_initial(make, dtype, kernel):
    updater = make()
    shards = _shards(updater, dtype)
    reference = RowReference(updater, shards[0]._initial, dtype)
    for ids, grads in _pushes():
        grads = grads.astype(dtype)
        _route_push(shards, ids, grads, kernel=kernel)
        reference.push(ids, grads)
    touched = np.array(sorted(reference.rows))
    counts = {reference.rows[i][2] for i in touched.tolist()}
    assert len(counts) >= 4, "the pushes should leave rows with different iteration counts"
    expected = np.concatenate([reference.rows[i][0] for i in touched.tolist()])
    np.testing.assert_array_equal(_pull_all(shards, touched), expected)  # bit for bit
    untouched = np.setdiff1d(np.arange(NUM_ROWS), touched)
    assert len(untouched) > 100
    np.testing.assert_array_equal(_pull_all(shards, untouched),
                                  shards[0]._initial(untouched).astype(dtype))
    assert sum(s.stats()["rows_touched"] for s in shards) == len(touched)
    for shard in shards:
        ids = shard.touched()[0]
        np.testing.assert_array_equal(shard.row_iterations(ids), [reference.rows[i][2] for i in ids.tolist()])


@pytest.mark.parametrize("updater", [Nesterovs(0.05, momentum=ExponentialSchedule("iteration", 0.9, 0.97)),
                                     RmsProp(0.01), Sgd(ExponentialSchedule("iteration", 0.1, 0.9))],
                         ids=["Nesterovs-scheduled", "RmsProp", "Sgd-scheduled"])
def test_vectorized_per_row_scalars_match_the_per_count_reference_path(updater):
    group = ParamGroup(updater, regularization=(L2(1e-3), WeightDecay(1e-2)), name="emb")
    fast, slow = _shards(group, num_shards=1), _shards(group, num_shards=1)
    reference = RowReference(updater, fast[0]._initial, np.float32, group=group)
    for ids, grads in _pushes(seed=3):
        grads = grads.astype(np.float32)
        fast[0].push_rows(ids, grads, epoch=1)
        slow[0].push_rows(ids, grads, epoch=1, kernel="reference")
        reference.push(ids, grads, epoch=1)
    touched = np.array(sorted(reference.rows))
    expected = np.concatenate([reference.rows[i][0] for i in touched.tolist()])
    np.testing.assert_array_equal(slow[0].pull_rows(touched), expected)
    np.testing.assert_allclose(fast[0].pull_rows(touched), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fast[0].touched()[2], slow[0].touched()[2], rtol=1e-6, atol=1e-7)


def test_duplicate_ids_are_summed_before_one_step():
    shard = _shards(Adam(0.1), num_shards=1)[0]
    ids = np.array([7, 7, 7, 2])
    grads = np.array([[1, 0, 0], [2, 0, 0], [3, -1, 0], [1, 1, 1]], dtype=np.float32)
    assert shard.push_rows(ids, grads) == 2
    other = _shards(Adam(0.1), num_shards=1)[0]
    other.push_rows(np.array([7, 2]), np.array([[6, -1, 0], [1, 1, 1]], dtype=np.float32))
    np.testing.assert_array_equal(shard.pull_rows([2, 7]), other.pull_rows([2, 7]))
    np.testing.assert_array_equal(shard.row_iterations([7, 2, 3]), [1, 1, 0])


def test_rows_cost_nothing_until_pushed_and_pulls_come_back_in_the_order_asked():
    big = RowTableShard("big", 2_000_000, 16, np.float32, 0, 1, Adam(), HashedUniformInit(16, 0.01, 1))
    assert big.stats()["allocated_bytes"] < 16_384
    ids = np.array([1_999_999, 5, 123_456, 5])
    before = big.pull_rows(ids)
    np.testing.assert_array_equal(before[1], before[3])
    big.push_rows(ids[:3], np.ones((3, 16), dtype=np.float32))
    stats = big.stats()
    assert stats["rows_touched"] == 3 and stats["state_bytes"] == 2 * 3 * 16 * 4
    assert stats["allocated_bytes"] < 50_000  # vs 128 MB of values (+256 MB of Adam state) for the dense table
    after = big.pull_rows(ids[::-1])  # ids 5, 123_456, 5, 1_999_999
    np.testing.assert_array_equal(after[0], after[2])
    assert (after[[0, 1, 3]] != before[[1, 2, 0]]).all()
    np.testing.assert_array_equal(big.pull_rows([7]), HashedUniformInit(16, 0.01, 1)(np.array([7])).astype(np.float32))


def test_empty_push_is_a_no_op_and_initial_may_be_zeros_or_an_array():
    zeros = RowTableShard("z", 10, 2, np.float64, 0, 1, Sgd(1.0))
    assert zeros.push_rows(np.array([], dtype=np.int64), np.zeros((0, 2))) == 0
    assert zeros.stats()["rows_touched"] == 0
    np.testing.assert_array_equal(zeros.pull_rows([3]), [[0.0, 0.0]])
    table = np.arange(20, dtype=np.float64).reshape(10, 2)
    shards = [RowTableShard("a", 10, 2, np.float64, s, 2, Sgd(1.0), table) for s in range(2)]
    everything = np.arange(10)
    np.testing.assert_array_equal(_pull_all_generic(shards, everything), table)
    _route_push(shards, np.array([4]), np.ones((1, 2)))
    expected = table.copy()
    expected[4] -= 1.0
    assemble = np.empty_like(table)
    for shard in shards:
        ids, rows = shard.materialize()
        assemble[ids] = rows
    np.testing.assert_array_equal(assemble, expected)


def _pull_all_generic(shards, ids):
    out = np.empty((len(ids), shards[0].dim))
    for shard, positions in zip(shards, split_by_owner(ids, len(shards))):
        out[positions] = shard.pull_rows(ids[positions])
    return out


# -- ownership ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_row_owner_spreads_a_power_law_hot_set_over_every_shard(num_shards):
    rng = np.random.default_rng(0)
    draws = power_law_ranks(rng, 200_000, 1_000_000, 1.1)  # the hot set: the smallest ids
    owners = row_owner(draws, num_shards)
    share = np.bincount(owners, minlength=num_shards) / len(draws)
    hottest = np.mean(draws == 0)  # one row's traffic cannot be split: it bounds the imbalance
    assert share.min() > 0.5 / num_shards and share.max() < 1.0 / num_shards + hottest + 0.02, share
    hot = np.arange(100)
    assert set(row_owner(hot, num_shards).tolist()) == set(range(num_shards))
    ranged = np.minimum(draws * num_shards // 1_000_000, num_shards - 1)  # a range split, for contrast
    assert np.bincount(ranged, minlength=num_shards).max() / len(draws) > 0.75


def test_row_owner_is_deterministic_and_independent_of_the_id_dtype():
    ids = np.arange(0, 60_000, 7)
    owners = row_owner(ids, 5)
    for dtype in (np.int32, np.uint32, np.int64, np.uint64):
        np.testing.assert_array_equal(row_owner(ids.astype(dtype), 5), owners)
    assert owners.dtype == np.int64 and owners.min() == 0 and owners.max() == 4
    np.testing.assert_array_equal(row_owner(ids, 1), 0)
    with pytest.raises(ValueError, match="num_shards"):
        row_owner(ids, 0)
    positions = split_by_owner(ids, 5)
    np.testing.assert_array_equal(np.sort(np.concatenate(positions)), np.arange(len(ids)))
    for shard, p in enumerate(positions):
        assert (owners[p] == shard).all()


def test_row_index_matches_a_dict_through_growth():
    rng = np.random.default_rng(1)
    index, expected, next_slot = RowIndex(), {}, 0
    for _ in range(6):
        fresh = np.setdiff1d(rng.integers(0, 10**12, 3000), np.array(list(expected), dtype=np.int64))
        index.insert(fresh, np.arange(next_slot, next_slot + len(fresh)))
        expected.update({int(i): next_slot + k for k, i in enumerate(fresh)})
        next_slot += len(fresh)
    probe = np.concatenate([np.array(list(expected), dtype=np.int64), rng.integers(0, 10**12, 500)])
    want = [expected.get(int(i), -1) for i in probe]
    np.testing.assert_array_equal(index.lookup(probe), want)
    assert index.size == len(expected) and 2 * index.size <= len(index.keys)


def test_hashed_initial_values_depend_only_on_seed_row_and_column():
    init = HashedUniformInit(4, 0.5, seed=9)
    a = init(np.array([3, 10**9, 3]))
    np.testing.assert_array_equal(a[0], a[2])
    np.testing.assert_array_equal(init(np.array([10**9])), a[1:2])
    assert np.abs(a).max() <= 0.5 and not np.array_equal(a, HashedUniformInit(4, 0.5, seed=8)(np.array([3, 10**9, 3])))
    u = counter_uniform(0, np.arange(100_000))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01


# -- snapshots ---------------------------------------------------------------------------------------------
def _trained(num_shards=2, updater=None):
    shards = _shards(updater or Adam(0.05), num_shards=num_shards)
    for ids, grads in _pushes(seed=2):
        _route_push(shards, ids, grads.astype(np.float32))
    return shards


def test_snapshot_round_trip_through_msgpack_then_both_step_alike():
    shards = _trained()
    for shard in shards:
        blob = msgpack.unpackb(pack(shard.snapshot()), raw=False)
        fresh = RowTableShard("emb", NUM_ROWS, DIM, np.float32, shard.shard_index, 2, Adam(0.05),
                              HashedUniformInit(DIM, 0.1, seed=5))
        fresh.restore(blob)
        for got, want in zip(fresh.touched(), shard.touched()):
            np.testing.assert_array_equal(got, want)
        assert fresh.counters == shard.counters
        ids = shard.touched()[0][:5]
        grads = np.full((len(ids), DIM), 0.3, dtype=np.float32)
        shard.push_rows(ids, grads)
        fresh.push_rows(ids, grads)
        np.testing.assert_array_equal(fresh.pull_rows(ids), shard.pull_rows(ids))


def test_rows_load_into_another_shard_count():
    old = _trained(num_shards=2)
    parts = [s.touched() for s in old]
    ids, values, state, iterations = (np.concatenate([p[k] for p in parts], axis=1 if k == 2 else 0) for k in range(4))
    new = _shards(Adam(0.05), num_shards=3)
    for shard in new:
        shard.load_rows(ids, values, state, iterations)
    np.testing.assert_array_equal(_pull_all(new, ids), _pull_all(old, ids))
    assert sum(s.stats()["rows_touched"] for s in new) == len(ids)
    with pytest.raises(CheckpointError, match="do not belong to shard"):
        new[0].load_rows(ids, values, state, iterations, strict=True)


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b.update(name="other"), "name is 'other'"),
    (lambda b: b.update(shard=1), "shard is 1"),
    (lambda b: b.update(num_shards=3), "num_shards is 3"),
    (lambda b: b.update(dim=4), "dim is 4"),
    (lambda b: b.update(version=9), "version 9"),
    (lambda b: b["ids"].update(data=b["ids"]["data"][:-8]), "does not hold"),
    (lambda b: b["ids"].update(dtype="float64"), "int64 vector"),
    (lambda b: b["values"].update(shape=[1, 3]), "bytes do not hold"),
    (lambda b: b["iterations"].update(data=(-np.ones(len(b["iterations"]["data"]) // 8, "<i8")).tobytes()),
     "iterations must be"),
    (lambda b: b.update(values={**b["values"], "data": np.full(len(b["values"]["data"]) // 4, np.nan,
                                                                np.float32).tobytes()}), "NaN or Inf"),
])
def test_restore_refuses_a_snapshot_that_does_not_fit_and_keeps_the_state(corrupt, message):
    shard = _trained()[0]
    blob = msgpack.unpackb(pack(shard.snapshot()), raw=False)
    corrupt(blob)
    before = shard.touched()
    with pytest.raises(CheckpointError, match=message):
        shard.restore(blob)
    for got, want in zip(shard.touched(), before):
        np.testing.assert_array_equal(got, want)


# -- bad input -----------------------------------------------------------------------------------------------
def _owned(shard, count):
    ids = np.arange(NUM_ROWS)
    return ids[row_owner(ids, shard.num_shards) == shard.shard_index][:count]


BAD_PUSHES = [
    ("out of range", lambda s: (np.array([NUM_ROWS + 3]), np.ones((1, DIM), np.float32)), r"out of range.*200 rows"),
    ("negative", lambda s: (np.array([-1]), np.ones((1, DIM), np.float32)), r"negative row ids \[-1\]"),
    ("float ids", lambda s: (np.array([1.0, 2.0]), np.ones((2, DIM), np.float32)), r"integer dtype, got float64"),
    ("bool ids", lambda s: (np.array([True]), np.ones((1, DIM), np.float32)), r"booleans are not row ids"),
    ("2-D ids", lambda s: (_owned(s, 2)[None, :], np.ones((2, DIM), np.float32)), r"1-D array of row ids"),
    ("rows mismatch", lambda s: (_owned(s, 3), np.ones((2, DIM), np.float32)), r"has 2 rows but 3 ids"),
    ("dim mismatch", lambda s: (_owned(s, 2), np.ones((2, DIM + 1), np.float32)), r"expected \(2, 3\)"),
    ("1-D grads", lambda s: (_owned(s, 3), np.ones(3, np.float32)), r"expected \(3, 3\)"),
    ("int grads", lambda s: (_owned(s, 1), np.ones((1, DIM), np.int64)), r"float dtype, got int64"),
    ("list grads", lambda s: (_owned(s, 1), [[1.0, 2.0, 3.0]]), r"NumPy float array, got list"),
    ("non-finite", lambda s: (_owned(s, 2), np.array([[1, 1, 1], [1, np.nan, 1]], np.float32)), r"non-finite.*ids \["),
    ("foreign ids", lambda s: (np.arange(NUM_ROWS)[row_owner(np.arange(NUM_ROWS), 2) == 1][:2],
                               np.ones((2, DIM), np.float32)), r"belong to shard\(s\) \[1\], not shard 0"),
]


@pytest.mark.parametrize("case, make, message", BAD_PUSHES, ids=[c[0] for c in BAD_PUSHES])
def test_bad_push_names_the_table_and_the_problem_and_changes_nothing(case, make, message):
    shard = _trained()[0]
    before, counters = shard.touched(), dict(shard.counters)
    ids, grads = make(shard)
    with pytest.raises(ValueError, match=r"table 'emb'.*" + message):
        shard.push_rows(ids, grads)
    for got, want in zip(shard.touched(), before):
        np.testing.assert_array_equal(got, want)
    assert shard.counters == counters


def test_bad_pulls_and_bad_initializers_are_refused():
    shard = _trained()[0]
    with pytest.raises(ValueError, match=r"table 'emb': pull_rows ids: row ids \[999\] out of range"):
        shard.pull_rows([999])
    with pytest.raises(ValueError, match="integer dtype"):
        shard.pull_rows(np.array([0.5]))
    broken = RowTableShard("t", 10, 2, np.float32, 0, 1, Sgd(0.1), initial=lambda ids: np.zeros((len(ids), 3)))
    with pytest.raises(ValueError, match=r"table 't': initial\(row_ids\) returned float64\(1, 3\)"):
        broken.push_rows(np.array([1]), np.ones((1, 2), np.float32))
    assert broken.stats()["rows_touched"] == 0 and broken.index.size == 0
    with pytest.raises(ValueError, match="initial array has shape"):
        RowTableShard("t", 10, 2, np.float32, 0, 1, Sgd(0.1), initial=np.zeros((9, 2)))
    with pytest.raises(ValueError, match="gradient normalization"):
        RowTableShard("t", 10, 2, np.float32, 0, 1, ParamGroup(Sgd(0.1), gradient_normalization="ClipL2PerLayer"))
    with pytest.raises(ValueError, match="shard_index 2 is not in"):
        RowTableShard("t", 10, 2, np.float32, 2, 2, Sgd(0.1))
