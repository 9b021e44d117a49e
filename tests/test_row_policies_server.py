"""Admission, eviction, serving deltas, table stats and incremental checkpoints through the Ray server
(``ParameterServer`` with 2 shards), held to the plain-Python model of tests/row_policy_model.py."""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server import CountAdmission, LRUEviction, ProbabilityAdmission, RowTable, TTLEviction
from rayps.server.row_index import HashedUniformInit
from rayps.updaters import Sgd

from row_policy_model import ShardModel, owner, stream
from state_invariants import validate_shards

pytestmark = pytest.mark.usefixtures("ray_session")

DIM, ROWS, LR = 2, 10**9, 0.1  # a hashed id space: nothing table-sized exists anywhere
INIT = HashedUniformInit(DIM, 0.1, seed=4)
SPREAD = 1_919_993  # the stream's small ids (< 400), scattered over the id space


def _server(admission=None, eviction=None, num_shards=2, **kwargs):
    from rayps.server import ParameterServer

    table = RowTable(ROWS, DIM, initial=INIT, admission=admission, eviction=eviction)
    return ParameterServer({"emb": table, "w": np.zeros(1, np.float32)}, sparse=["emb"], updater=Sgd(LR),
                           num_shards=num_shards, **kwargs)


def _table(ps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every stored row of every shard (ids, values, iterations), sorted by id: a control call, not an access."""
    import ray

    ps.flush()
    parts = ray.get([actor.table_rows.remote("emb") for actor in ps.shard_actors])
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids)
    return ids[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[3] for p in parts])[order]


def _events(seed, steps, id_space=150):
    for kind, ids, grads in stream(seed, steps, id_space):
        yield kind, ids * SPREAD, grads


@pytest.mark.parametrize("eviction, admission, model_kw", [
    (LRUEviction(40), CountAdmission(2, width=4096), {"kind": "lru", "cap": 20, "admission": ("count", 2)}),
    (TTLEviction(5), ProbabilityAdmission(0.6, seed=3), {"kind": "ttl", "max_idle": 5, "admission": ("prob", 0.6, 3)}),
], ids=["lru+count", "ttl+prob"])
def test_the_server_matches_the_dict_model_and_sums_its_stats(eviction, admission, model_kw):
    ps = _server(admission, eviction)
    models = [ShardModel(lr=LR, initial=lambda r: INIT(np.array([r]))[0].astype(np.float32), **model_kw)
              for _ in range(2)]
    try:
        for kind, ids, grads in _events(seed=21, steps=160):
            (ps.push_rows("emb", ids, grads) if kind == "push" else ps.pull_rows("emb", ids))
            for s, model in enumerate(models):
                mine = np.array([owner(int(i), 2) == s for i in ids], dtype=bool)
                if mine.any():
                    model.push(ids[mine], grads[mine]) if kind == "push" else model.pull(ids[mine])
        ids, values, iterations = _table(ps)
        rows = {r: row for model in models for r, row in model.rows.items()}
        assert ids.tolist() == sorted(rows)
        np.testing.assert_allclose(values, np.stack([rows[r]["value"] for r in ids.tolist()]), rtol=1e-5, atol=1e-6)
        assert iterations.tolist() == [rows[r]["it"] for r in ids.tolist()]
        stats = ps.table_stats("emb")
        assert stats["rows"] == len(rows) and stats["bytes"] > 0
        assert stats["admitted"] == sum(m.admitted for m in models)
        assert stats["evicted"] == sum(m.evicted for m in models) > 0
        assert stats["dropped_gradients"] == sum(m.dropped for m in models) > 0
        if isinstance(eviction, LRUEviction):
            assert all(s["rows"] <= 20 for s in stats["shards"])
        assert validate_shards(ps) == 2
    finally:
        ps.shutdown()


def test_a_replica_fed_the_delta_stream_equals_the_server_table():
    ps = _server(CountAdmission(2, width=4096), LRUEviction(50))
    replica: dict[int, np.ndarray] = {}

    def apply(delta):
        assert delta.values.dtype == np.float32 and delta.values.shape == (len(delta.ids), DIM)  # values only
        for i in delta.evicted.tolist():
            replica.pop(i, None)
        replica.update({i: v for i, v in zip(delta.ids.tolist(), delta.values)})

    try:
        delta = ps.export_deltas("emb")
        apply(delta)
        events = list(_events(seed=4, steps=200))
        for start in range(0, 200, 40):
            for kind, ids, grads in events[start:start + 40]:
                (ps.push_rows("emb", ids, grads) if kind == "push" else ps.pull_rows("emb", ids))
            delta = ps.export_deltas("emb", since=delta.token)
            apply(delta)
            ids, values, _ = _table(ps)
            assert sorted(replica) == ids.tolist()
            np.testing.assert_array_equal(np.stack([replica[i] for i in ids.tolist()]), values)
        assert ps.table_stats("emb")["evicted"] > 0
        probe = np.unique(np.concatenate([e[1] for e in events]))  # every id, stored or not
        want = np.stack([replica[i] if i in replica else INIT(np.array([i]))[0].astype(np.float32)
                         for i in probe.tolist()])
        np.testing.assert_array_equal(ps.pull_rows("emb", probe), want)
        token = delta.token
        for since, match in [(token.replace("emb@", "other@"), "since: the token is for table 'other'"),
                             (token.split(",")[0], r"since: the token covers 1 shard\(s\), this server has 2"),
                             (token.rsplit(":", 1)[0] + ":999999", "since: .*future token"),
                             (42, "since: expected None or a token")]:
            before = _table(ps)
            with pytest.raises(ValueError, match=match):
                ps.export_deltas("emb", since=since)
            for got, want in zip(_table(ps), before):
                np.testing.assert_array_equal(got, want)
    finally:
        ps.shutdown()


def _file_bytes(path, kind):
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("rows-") and f"-{kind}-" in f.name)


def test_incremental_saves_grow_with_touched_rows_and_restore_into_3_shards(tmp_path):
    from rayps.server import ParameterServer
    from rayps.server.checkpoints.table_chains import MAX_DELTAS

    ps = _server(CountAdmission(2, width=4096), TTLEviction(30))
    saved = tmp_path / "saved"
    try:
        for kind, ids, grads in _events(seed=8, steps=120, id_space=400):
            (ps.push_rows("emb", ids, grads) if kind == "push" else ps.pull_rows("emb", ids))
        ps.push_rows("emb", np.array([500]) * SPREAD, np.ones((1, DIM), np.float32))  # counted once, not stored
        ps.save(saved)
        full = _file_bytes(saved, "full")
        ps.push_rows("emb", np.array([1, 2]) * SPREAD, np.ones((2, DIM), np.float32))
        ps.save(saved)
        assert 0 < _file_bytes(saved, "delta") < full / 4  # two rows touched: a fraction of the full table
        for i in range(MAX_DELTAS + 2):  # compaction: a new base, older files deleted
            ps.push_rows("emb", np.array([i % 3 + 1]) * SPREAD, np.ones((1, DIM), np.float32))
            ps.save(saved)
        assert len([f for f in saved.iterdir() if f.name.startswith("rows-s0-")]) <= MAX_DELTAS + 1
        live = _table(ps)
    finally:
        ps.shutdown()
    for num_shards in (3, 2):
        restored = ParameterServer.restore(saved, num_shards=num_shards)
        try:
            for got, want in zip(_table(restored), live):
                np.testing.assert_array_equal(got, want)
            assert 500 * SPREAD not in live[0].tolist()  # counted once before the save: one more push admits it
            restored.push_rows("emb", np.array([500]) * SPREAD, np.ones((1, DIM), np.float32))
            assert 500 * SPREAD in _table(restored)[0].tolist()
            assert validate_shards(restored) == num_shards
        finally:
            restored.shutdown()


def test_a_killed_shard_replays_row_pushes_exactly_once_over_incremental_checkpoints(tmp_path):
    import ray

    pushes = [(ids, grads) for kind, ids, grads in _events(seed=6, steps=40) if kind == "push"]
    ps = _server(CountAdmission(2, width=4096), TTLEviction(8), checkpoint_dir=tmp_path, checkpoint_every=3)
    try:
        for i, (ids, grads) in enumerate(pushes):
            ps.push_rows("emb", ids, grads)
            if i == len(pushes) // 2:
                ray.kill(ps.shard_actors[1], no_restart=False)
        got = _table(ps)
        assert ps.stats()["restarts"] >= 1
        assert any(f.name.startswith("rows-s1-") for f in tmp_path.iterdir())  # the table's chain files
        assert validate_shards(ps) == 2  # shard 1 restored its chain and took the replay
    finally:
        ps.shutdown()
    clean = _server(CountAdmission(2, width=4096), TTLEviction(8))
    try:
        for ids, grads in pushes:
            clean.push_rows("emb", ids, grads)
        for a, b in zip(got, _table(clean)):
            np.testing.assert_array_equal(a, b)
    finally:
        clean.shutdown()


def test_bad_policies_through_the_server_name_the_field():
    with pytest.raises(ValueError, match=r"table 'emb': eviction max_rows \(2\) is smaller than num_shards \(3\)"):
        _server(eviction=LRUEviction(2), num_shards=3)
    ps = _server()
    try:
        with pytest.raises(ValueError, match="export_deltas: 'nope' is not a row-sparse table"):
            ps.export_deltas("nope")
        with pytest.raises(ValueError, match="table_stats: 'nope' is not a row-sparse table"):
            ps.table_stats("nope")
    finally:
        ps.shutdown()
