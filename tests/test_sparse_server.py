"""Row-sparse tables through the parameter server (Ray): routing, exactly-once, errors, checkpoints.

The per-row math of ``RowTableShard`` is held to a per-row reference in test_sparse_rows.py; here the
reference is the same updater applied to each row alone, through the whole client -> shard path.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.updaters import AdaGrad, Adam

pytestmark = pytest.mark.usefixtures("ray_session")

ROWS, DIM = 5000, 4


def _server(updater, tmp_path=None, num_shards=3, **kwargs):
    from rayps.server import ParameterServer
    from rayps.server.row_tables import RowTable
    from rayps.server.row_index import HashedUniformInit

    table = RowTable(ROWS, DIM, initial=HashedUniformInit(DIM, 0.1, seed=3))
    params = {"emb": table, "w": np.zeros(3, np.float32)}
    if tmp_path is not None:
        kwargs.update(checkpoint_dir=tmp_path, checkpoint_every=3)
    return ParameterServer(params, sparse=["emb"], updater=updater, num_shards=num_shards, **kwargs), table


@pytest.mark.parametrize("updater", [AdaGrad(learning_rate=0.1), Adam(learning_rate=0.05)], ids=["AdaGrad", "Adam"])
def test_rows_follow_the_dense_updater_over_their_own_summed_pushes(updater):
    ps, table = _server(updater)
    rng = np.random.default_rng(0)
    reference: dict[int, tuple] = {}
    try:
        for _ in range(6):
            ids = rng.integers(0, 40, size=25)  # duplicates, and rows touched a different number of times
            grads = rng.standard_normal((25, DIM)).astype(np.float32)
            ps.push_rows("emb", ids, grads)
            for row in np.unique(ids):
                summed = grads[ids == row].sum(axis=0, dtype=np.float32)
                params, state, it = reference.get(row) or (table.initial(np.array([row]))[0].astype(np.float32),
                                                           None, 0)
                state = updater.init(params) if state is None else state
                updater.apply(params, summed, state, it, kernel="reference")
                reference[row] = (params, state, it + 1)
        touched = np.array(sorted(reference))
        got = ps.pull_rows("emb", touched)
        for i, row in enumerate(touched):
            np.testing.assert_allclose(got[i], reference[row][0], rtol=1e-6, atol=1e-7)
        untouched = np.array([100, 2000, 4999])
        np.testing.assert_array_equal(ps.pull_rows("emb", untouched), table.initial(untouched).astype(np.float32))
        whole = ps.pull(["emb"])["emb"]
        assert whole.shape == (ROWS, DIM)
        np.testing.assert_array_equal(whole[touched], got)
        stats = ps.stats()["shards"]
        assert all(s["row_tables"]["emb"]["rows_touched"] > 0 for s in stats)  # the table uses every shard
        assert sum(s["row_tables"]["emb"]["rows_touched"] for s in stats) == len(touched)
    finally:
        ps.shutdown()


@pytest.mark.parametrize("call,match", [
    (lambda ps: ps.push_rows("emb", np.array([ROWS]), np.ones((1, DIM), np.float32)), r"outside \[0, 5000\)"),
    (lambda ps: ps.push_rows("emb", np.array([-2]), np.ones((1, DIM), np.float32)), r"\[-2\] are outside"),
    (lambda ps: ps.push_rows("emb", np.array([1.5]), np.ones((1, DIM), np.float32)), "ids must be integers"),
    (lambda ps: ps.push_rows("emb", np.array([1, 2]), np.ones((1, DIM), np.float32)), "one row per id"),
    (lambda ps: ps.push_rows("emb", np.array([[1]]), np.ones((1, DIM), np.float32)), "1-D"),
    (lambda ps: ps.push_rows("emb", np.array([1]), np.full((1, DIM), np.nan, np.float32)), "NaN or Inf"),
    (lambda ps: ps.push_rows("w", np.array([1]), np.ones((1, 3), np.float32)), "'w' is dense"),
    (lambda ps: ps.push({"emb": np.ones((ROWS, DIM), np.float32)}), "'emb' is a row-sparse table"),
    (lambda ps: ps.pull_rows("w", np.array([0])), "'w' is dense"),
    (lambda ps: ps.pull_rows("emb", np.array([ROWS + 1])), "outside"),
])
def test_bad_row_pushes_name_the_table_and_change_nothing(call, match):
    ps, _ = _server(Adam(learning_rate=0.05), num_shards=2)
    try:
        ps.push_rows("emb", np.array([1, 2, 3]), np.ones((3, DIM), np.float32))
        before = ps.pull(["emb", "w"])
        with pytest.raises((ValueError, TypeError), match=match):
            call(ps)
        after = ps.pull(["emb", "w"])
        for name in before:
            np.testing.assert_array_equal(after[name], before[name])
    finally:
        ps.shutdown()


def test_a_killed_shard_restores_its_rows_and_save_restore_reshards_them(tmp_path):
    import ray

    from rayps.server import ParameterServer

    ps, _ = _server(AdaGrad(learning_rate=0.1), tmp_path / "ckpt", num_shards=3)
    rng = np.random.default_rng(1)
    pushes = [(rng.integers(0, 200, 30), rng.standard_normal((30, DIM)).astype(np.float32)) for _ in range(12)]
    probe = np.arange(200)
    try:
        for i, (ids, grads) in enumerate(pushes):
            ps.push_rows("emb", ids, grads)
            if i == 7:
                ray.kill(ps.shard_actors[1], no_restart=False)
        got = ps.pull_rows("emb", probe)
        assert ps.stats()["restarts"] >= 1
        ps.save(tmp_path / "saved")
    finally:
        ps.shutdown()
    clean, _ = _server(AdaGrad(learning_rate=0.1), num_shards=3)
    try:
        for ids, grads in pushes:
            clean.push_rows("emb", ids, grads)
        np.testing.assert_array_equal(got, clean.pull_rows("emb", probe))  # the restart lost and doubled nothing
    finally:
        clean.shutdown()
    restored = ParameterServer.restore(tmp_path / "saved", num_shards=2)
    try:
        np.testing.assert_array_equal(restored.pull_rows("emb", probe), got)
        from rayps.server.row_index import HashedUniformInit

        untouched = np.array([4000, 4999])  # rows never pushed come back from the saved initializer
        np.testing.assert_array_equal(restored.pull_rows("emb", untouched),
                                      HashedUniformInit(DIM, 0.1, seed=3)(untouched).astype(np.float32))
    finally:
        restored.shutdown()
