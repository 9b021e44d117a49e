"""Admission, eviction, deltas and incremental records of ``RowTableShard`` (no Ray), each held to the
plain-Python model of tests/row_policy_model.py driven by the same random stream of pushes and pulls."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from rayps.server import CountAdmission, LFUEviction, LRUEviction, ProbabilityAdmission, RowTable, TTLEviction
from rayps.server.checkpoints.format import CheckpointError, pack
from rayps.server.row_index import HashedUniformInit, RowIndex
from rayps.server.row_policies import CountMinSketch, smallest
from rayps.server.sparse_rows import RowTableShard
from rayps.updaters import Sgd

from row_policy_model import ShardModel, owner, stream
from state_invariants import record_instances, validate_all


@pytest.fixture(autouse=True)
def _invariants_hold_after_each_test(monkeypatch):
    """Every RowTableShard a test builds passes ``validate()`` when the test is done (tests/state_invariants.py)."""
    made = record_instances(monkeypatch, RowTableShard)
    yield
    validate_all(made)

DIM, ROWS, LR = 2, 10_000, 0.1
INIT = HashedUniformInit(DIM, 0.1, seed=4)


def _pair(num_shards, admission=None, eviction=None, model_kw=None):
    shards = [RowTableShard("emb", ROWS, DIM, np.float32, s, num_shards, Sgd(LR), INIT, admission, eviction)
              for s in range(num_shards)]
    models = [ShardModel(lr=LR, initial=lambda r: INIT(np.array([r]))[0].astype(np.float32), dim=DIM,
                         **(model_kw or {})) for _ in range(num_shards)]
    return shards, models


def _drive(shards, models, events):
    n = len(shards)
    for kind, ids, grads in events:
        for s in range(n):
            mine = np.array([owner(int(i), n) == s for i in ids], dtype=bool)
            if not mine.any():
                continue
            if kind == "push":
                shards[s].push_rows(ids[mine], grads[mine])
                models[s].push(ids[mine], grads[mine])
            else:
                shards[s].pull_rows(ids[mine])
                models[s].pull(ids[mine])
            _assert_same(shards[s], models[s])


def _assert_same(shard, model):
    ids, values, _, iterations = shard.touched()
    assert ids.tolist() == sorted(model.rows)
    assert shard.n <= (shard.cap if shard.cap is not None else shard.n)
    if len(ids):
        want = np.stack([model.rows[i]["value"] for i in ids.tolist()])
        np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-6)
        assert iterations.tolist() == [model.rows[i]["it"] for i in ids.tolist()]
    c = shard.counters
    assert (c["admitted"], c["evicted"], c["dropped_gradients"]) == (model.admitted, model.evicted, model.dropped)


CASES = [
    ("lru", LRUEviction(40), None, {"kind": "lru", "cap": 20}),
    ("lfu", LFUEviction(40), None, {"kind": "lfu", "cap": 20}),
    ("ttl", TTLEviction(6), None, {"kind": "ttl", "max_idle": 6}),
    ("count", None, CountAdmission(3, width=4096), {"admission": ("count", 3)}),
    ("prob", None, ProbabilityAdmission(0.4, seed=7), {"admission": ("prob", 0.4, 7)}),
    ("lru+count", LRUEviction(30), CountAdmission(2, width=4096),
     {"kind": "lru", "cap": 15, "admission": ("count", 2)}),
    ("lfu+prob", LFUEviction(30), ProbabilityAdmission(0.7, seed=1),
     {"kind": "lfu", "cap": 15, "admission": ("prob", 0.7, 1)}),
]


@pytest.mark.parametrize("label, eviction, admission, model_kw", CASES, ids=[c[0] for c in CASES])
def test_policies_match_the_dict_model_row_by_row(label, eviction, admission, model_kw):
    shards, models = _pair(2, admission, eviction, model_kw)
    _drive(shards, models, stream(seed=11, steps=220, id_space=150))
    assert sum(m.evicted for m in models) > 0 or eviction is None
    assert sum(m.dropped for m in models) > 0 or admission is None


def test_a_large_cap_evicts_in_batches_as_documented():
    shards, models = _pair(1, eviction=LRUEviction(200), model_kw={"kind": "lru", "cap": 200})
    _drive(shards, models, stream(seed=3, steps=200, id_space=2000, max_batch=20))
    assert models[0].evicted >= 4 and shards[0].n <= 200


def test_count_min_sketch_never_undercounts_so_never_admits_late():
    exact, sketch = {}, CountMinSketch(CountAdmission(5, width=16, depth=2))  # tiny: many collisions
    rng = np.random.default_rng(0)
    for version in range(1, 200):
        ids = np.unique(rng.integers(0, 300, 10))
        plan = sketch.plan(ids)
        sketch.commit(plan, version)
        for i in ids.tolist():
            exact[i] = exact.get(i, 0) + 1
        got = sketch.estimate(np.array(sorted(exact)))
        assert (got >= np.array([exact[i] for i in sorted(exact)])).all()
        np.testing.assert_array_equal(plan[2], sketch.estimate(ids))


def test_probability_admission_is_the_same_ids_on_any_shard_count():
    admitted = []
    for num_shards in (1, 3):
        shards, _ = _pair(num_shards, admission=ProbabilityAdmission(0.3, seed=2))
        ids = np.arange(500)
        for s, shard in enumerate(shards):
            mine = np.array([owner(int(i), num_shards) == s for i in ids])
            shard.push_rows(ids[mine], np.ones((mine.sum(), DIM), np.float32))
        admitted.append(sorted(i for shard in shards for i in shard.touched()[0].tolist()))
    assert admitted[0] == admitted[1] and 100 < len(admitted[0]) < 200


def test_smallest_is_lexicographic_and_index_deletion_keeps_lookups_right():
    rng = np.random.default_rng(1)
    keys = [rng.integers(0, 4, 300), rng.integers(0, 5, 300), rng.permutation(300)]
    order = sorted(range(300), key=lambda i: (keys[0][i], keys[1][i], keys[2][i]))
    for k in (0, 1, 17, 299, 300):
        assert sorted(smallest(keys, k).tolist()) == sorted(order[:k])
    index, model = RowIndex(), {}
    for _ in range(40):
        new = np.setdiff1d(rng.integers(0, 5000, 60), list(model))
        index.insert(new, new * 3)
        model.update({int(i): int(i) * 3 for i in new})
        gone = rng.choice(list(model), size=min(30, len(model)), replace=False)
        index.delete(np.array(gone))
        for i in gone.tolist():
            del model[i]
    probe = np.arange(5000)
    np.testing.assert_array_equal(index.lookup(probe), [model.get(i, -1) for i in probe.tolist()])


def _replica_apply(replica, delta):
    ids, values, evicted = delta
    for i in evicted.tolist():
        replica.pop(i, None)
    replica.update({i: v for i, v in zip(ids.tolist(), values)})


def test_export_since_builds_a_replica_equal_to_the_table_and_tokens_are_checked():
    shards, models = _pair(1, CountAdmission(2, width=4096), LRUEviction(25), {"kind": "lru", "cap": 25,
                                                                             "admission": ("count", 2)})
    shard = shards[0]
    ids, values, evicted, token = shard.export_since(None)
    replica = {}
    _replica_apply(replica, (ids, values, evicted))
    events = list(stream(seed=5, steps=150, id_space=120))
    for start in range(0, 150, 30):
        _drive(shards, models, events[start:start + 30])
        ids, values, evicted, token = shard.export_since(token)
        assert len(np.intersect1d(ids, evicted)) == 0
        _replica_apply(replica, (ids, values, evicted))
        stored = shard.touched()
        assert sorted(replica) == stored[0].tolist()
        np.testing.assert_array_equal(np.stack([replica[i] for i in stored[0].tolist()]), stored[1])
    before = shard.touched()
    with pytest.raises(ValueError, match="since: .*future token"):
        shard.export_since((token[0], token[1] + 1))
    with pytest.raises(ValueError, match="since: the token is from another incarnation"):
        shard.export_since(("0" * 12, 0))
    for got, want in zip(shard.touched(), before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("eviction", [LRUEviction(30), TTLEviction(5)], ids=["lru", "ttl"])
def test_a_base_and_deltas_restore_the_live_table_and_deltas_are_small(eviction):
    shard = _pair(1, CountAdmission(2, width=1024), eviction)[0][0]
    chain, since = [], None
    for i, (kind, ids, grads) in enumerate(stream(seed=9, steps=120, id_space=90)):
        shard.push_rows(ids, grads) if kind == "push" else shard.pull_rows(ids)
        if i % 20 == 19:
            record = msgpack.unpackb(pack(shard.snapshot(since)), raw=False)
            assert record["kind"] == ("full" if since is None else "delta")
            chain.append(record)
            since = (record["epoch"], record["table_version"])
    fresh = _pair(1, CountAdmission(2, width=1024), eviction)[0][0]
    fresh.restore(chain)
    for got, want in zip(fresh.touched(), shard.touched()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fresh.sketch.counts, shard.sketch.counts)
    assert fresh.counters == shard.counters and fresh.epoch != shard.epoch
    shard.push_rows(np.array([3]), np.ones((1, DIM), np.float32))
    small = len(pack(shard.snapshot(since)))
    assert small < len(pack(shard.snapshot())) / 2  # one row touched: the delta is a fraction of the table
    before = fresh.touched()
    with pytest.raises(CheckpointError, match="does not continue the chain"):
        fresh.restore([chain[0], chain[2]])
    for got, want in zip(fresh.touched(), before):  # refused: nothing changed
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("make, message", [
    (lambda: CountAdmission(0), "CountAdmission: min_count must be an integer >= 1"),
    (lambda: ProbabilityAdmission(0.0), r"ProbabilityAdmission: probability must be a number in \(0, 1\]"),
    (lambda: ProbabilityAdmission(1.5), r"probability must be a number in \(0, 1\], got 1.5"),
    (lambda: LRUEviction(0), "LRUEviction: max_rows must be an integer >= 1"),
    (lambda: LFUEviction(-3), "LFUEviction: max_rows must be an integer >= 1"),
    (lambda: TTLEviction(0), "TTLEviction: max_idle_steps must be an integer >= 1"),
    (lambda: RowTable(10, 2, admission="count:3"), "RowTable: admission must be None or one of CountAdmission"),
    (lambda: RowTable(10, 2, eviction=object()), "RowTable: eviction must be None or one of LRUEviction"),
    (lambda: RowTableShard("emb", 10, 2, np.float32, 0, 3, Sgd(0.1), eviction=LRUEviction(2)),
     r"table 'emb': eviction max_rows \(2\) is smaller than num_shards \(3\)"),
])
def test_bad_policies_are_refused_naming_the_field(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
