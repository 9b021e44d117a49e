"""CtrWorkerLoop (no Ray) on WorkerLoop's epoch machinery through the model hook ``step``: one fused push per
batch carrying the batch's dense and row gradients, pulls of the dense parameters only, and WorkerLoop's resume
and catch-up after a restart — checked against ``epoch_batches`` and a plain dict model of the server."""

from __future__ import annotations

import numpy as np
import pytest

from rayps.worker import WorkerLoop, epoch_batches
from rayps.worker.ctr import EmbeddingBagLogistic, synthetic_ctr
from rayps.worker.ctr_training import CtrWorkerLoop

ROWS, DIM, FIELDS = 400, 4, 3
LR = 0.05


class FakeCtrServer:
    """Plain SGD over a dict of rows (initial value: the row id / 1000 in every column) and dense ``w``, ``b``;
    records what each call carried. ``resume_at``: the clock ``as_worker`` reports (a restarted worker)."""

    def __init__(self, model: EmbeddingBagLogistic, resume_at: int = 0, dense_table: bool = False):
        self.dense = model.init_dense(0, np.float64)
        self.rows: dict[int, np.ndarray] = {}
        self.dense_table = dense_table
        if dense_table:
            self.dense["emb"] = np.arange(ROWS, dtype=np.float64)[:, None].repeat(DIM, 1) / 1000
        self.tables = {} if dense_table else {"emb": object()}
        self.resume_at = resume_at
        self.pushes: list[tuple[int, dict, dict | None]] = []  # (epoch, dense grads, rows)
        self.pull_names: list = []
        self.row_pulls: list[np.ndarray] = []

    def row(self, i: int) -> np.ndarray:
        return self.rows.get(int(i), np.full(DIM, i / 1000.0))

    def as_worker(self, worker_id: int) -> int:
        return self.resume_at

    def pull(self, names=None, worker_id=None):
        self.pull_names.append(list(names))
        return {name: self.dense[name].copy() for name in names}

    def pull_rows(self, name, ids):
        self.row_pulls.append(np.asarray(ids).copy())
        return np.stack([self.row(i) for i in ids])

    def push_pull(self, grads, worker_id=0, epoch=0, rows=None):
        self.pushes.append((epoch, {n: g.copy() for n, g in grads.items()}, rows))
        for name, g in grads.items():
            self.dense[name] = self.dense[name] - LR * g
        for ids, row_grads in (rows or {}).values():
            for i, g in zip(ids, row_grads):
                self.rows[int(i)] = self.row(i) - LR * g
        return {name: self.dense[name].copy() for name in self.dense}

    def tick(self, worker_id=0, epoch=0):
        self.pushes.append((epoch, {}, None))

    def flush(self):
        pass


def _setup(num_workers=2, resume_at=0, dense_table=False, first_epoch=0):
    data = synthetic_ctr(300, num_fields=FIELDS, table_rows=ROWS, dim=DIM, seed=1)
    model = EmbeddingBagLogistic(ROWS, DIM, FIELDS)
    server = FakeCtrServer(model, resume_at, dense_table)
    loop = CtrWorkerLoop(server, model, data.x_train, data.y_train, 0, num_workers, 32, seed=5,
                         first_epoch=first_epoch)
    loop.resume()  # what the actor does in every process of a worker with an identity
    return data, model, server, loop


def test_each_batch_pulls_its_rows_and_pushes_dense_and_row_grads_in_one_message():
    data, model, server, loop = _setup()
    batches = epoch_batches(data.num_train, 2, 0, 0, 5, 32)
    reference = FakeCtrServer(model)  # the same SGD, stepped by hand batch by batch
    report = loop.run_epoch(0)
    assert report.steps == len(batches) == len(server.pushes) == report.clock
    assert report.samples == sum(len(b) for b in batches)
    assert server.pull_names == [["w", "b"]]  # once, the dense parameters only; then push_pull's answers
    for batch, pulled, (epoch, grads, rows) in zip(batches, server.row_pulls, server.pushes):
        ids, y = data.x_train[batch], data.y_train[batch]
        np.testing.assert_array_equal(pulled, np.unique(ids))  # only the rows this batch touches
        loss, row_ids, row_grads, dense_grads = model.loss_and_grads(
            np.stack([reference.row(i) for i in np.unique(ids)]), reference.dense, ids, y)
        reference.push_pull(dense_grads, rows={"emb": (row_ids, row_grads)})
        assert epoch == 0 and set(grads) == {"w", "b"}
        np.testing.assert_array_equal(rows["emb"][0], row_ids)
        np.testing.assert_allclose(rows["emb"][1], row_grads, rtol=1e-12)
        for name in ("w", "b"):
            np.testing.assert_allclose(grads[name], dense_grads[name], rtol=1e-12)


def test_a_restarted_worker_skips_the_batches_every_shard_has():
    data, model, server, loop = _setup(resume_at=3)
    batches = epoch_batches(data.num_train, 2, 0, 0, 5, 32)
    report = loop.run_epoch(0)
    assert len(server.pushes) == len(batches) - 3 and report.clock == len(batches)
    for batch, pulled in zip(batches[3:], server.row_pulls):
        np.testing.assert_array_equal(pulled, np.unique(data.x_train[batch]))


def test_a_worker_behind_an_earlier_epoch_first_recomputes_its_rest():
    """WorkerLoop's catch-up, now CTR's too: clock 2 when epoch 1 is asked for -> epoch 0 from step 2, then 1."""
    data, model, server, loop = _setup(resume_at=2)
    rest_of_0 = epoch_batches(data.num_train, 2, 0, 0, 5, 32)[2:]
    all_of_1 = epoch_batches(data.num_train, 2, 0, 1, 5, 32)
    expected = rest_of_0 + all_of_1
    report = loop.run_epoch(1, resumed=True)
    assert [epoch for epoch, _, _ in server.pushes] == [0] * len(rest_of_0) + [1] * len(all_of_1)
    for batch, pulled in zip(expected, server.row_pulls):
        np.testing.assert_array_equal(pulled, np.unique(data.x_train[batch]))
    assert report.samples == sum(len(b) for b in expected)


def test_the_dense_table_baseline_pushes_a_table_sized_gradient_zero_off_the_batch():
    data, model, server, loop = _setup(dense_table=True)
    loop.run_epoch(0)
    assert server.pull_names == [["w", "b", "emb"]] and server.row_pulls == []
    first = epoch_batches(data.num_train, 2, 0, 0, 5, 32)[0]
    _, grads, rows = server.pushes[0]
    assert rows is None and grads["emb"].shape == (ROWS, DIM)
    untouched = np.setdiff1d(np.arange(ROWS), data.x_train[first])
    assert not grads["emb"][untouched].any() and grads["emb"][np.unique(data.x_train[first])].any()


def test_row_gradients_need_a_fused_step():
    class RowStep(WorkerLoop):
        def step(self, batch):
            return 0.0, {"w": np.zeros(1)}, {"emb": (np.array([0]), np.zeros((1, 1)))}

    x, y = np.zeros((8, 1)), np.zeros(8)
    server = type("S", (), {"pull": lambda self, worker_id=None: {"w": np.zeros(1)},
                            "push": lambda self, *a, **k: None, "push_pull": lambda self, *a, **k: {},
                            "flush": lambda self: None})()
    loop = RowStep(server, None, x, y, 0, 1, 4, n_fetch=1, n_push=2)
    with pytest.raises(ValueError, match="rows: row gradients ride on a fused push_pull"):
        loop.run_epoch(0)
