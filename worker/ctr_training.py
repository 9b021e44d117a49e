"""The CTR workload on the parameter server: ``EmbeddingBagLogistic`` over ``synthetic_ctr`` data, workers as Ray
actors on disjoint partitions (``rayps train --dataset synthetic-ctr``).

    params, sparse = ctr_params(model, seed=0)                   # emb: a RowTable spec, never materialized
    ps = ParameterServer(params, sparse=sparse, updater=AdaGrad(0.1), num_shards=2)
    result = train_ctr(ps, model, data, num_workers=2, epochs=1, batch_size=256)

One worker step (``CtrWorkerLoop``), for a batch of feature ids:

1. ``rows = ps.pull_rows("emb", model.rows_needed(ids))``: only the rows this batch touches (sorted unique ids);
2. ``loss, row_ids, row_grads, dense_grads = model.loss_and_grads(rows, dense, ids, y)``;
3. ``dense = ps.push_pull(dense_grads, worker_id, epoch, rows={"emb": (row_ids, row_grads)})``: the dense grads
   and the row grads in ONE push (one message per shard, the rows each shard owns riding along), and the fresh
   dense parameters back on the same call.

Nothing table-sized exists on a worker: it holds the dense ``w``/``b`` and the rows of one batch. The server
holds only the rows ever pushed (``RowTable(table_rows, dim, initial=HashedUniformInit(...))``).

``dense_table=True`` (``ctr_params``) makes ``emb`` an ordinary dense parameter instead, for the sparse-vs-dense
benchmark: the worker then pulls the whole table with the dense parameters and pushes a table-sized gradient
(zeros except the batch's rows). Only sensible for small tables.

The epochs, clocks, resume after a restart and catch-up are ``WorkerLoop``'s: ``CtrWorkerLoop`` only fills its
model hook ``step(batch)`` (the row pull, the gradients, the rows to push). The driver is ``train``'s
(worker/epochs.py). Evaluation (after every epoch, on the driver): test logloss and AUC from the rows the test
split needs. The result: the README's "The result of a run" (``task`` is ``ctr``, ``test_accuracy`` None).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import ray

from ..server.row_tables import RowTable
from .actor import LoopActor, start_workers
from .ctr import EmbeddingBagLogistic, auc, logloss
from .epochs import check_run_args, drive_epochs, in_memory_data, run_result
from .loop import WorkerLoop

TABLE = "emb"


def ctr_params(model: EmbeddingBagLogistic, seed: int = 0, scale: float = 0.05, dense_table: bool = False,
               dtype=np.float32, admission=None, eviction=None) -> tuple[dict, list | None]:
    """``(params, sparse)`` for ``ParameterServer(params, sparse=sparse, ...)``: the table as a ``RowTable`` spec
    with ``HashedUniformInit(dim, scale, seed)`` (nothing table-sized is built) and the given admission and
    eviction policies, plus the dense ``w``, ``b``. ``dense_table``: the same initial values as one dense
    ``(table_rows, dim)`` array (benchmarks only)."""
    initial = model.table_initializer(scale, seed)
    dense = model.init_dense(seed, dtype)
    if dense_table:
        return {TABLE: initial(np.arange(model.table_rows)).astype(dtype), **dense}, None
    table = RowTable(model.table_rows, model.dim, str(np.dtype(dtype)), initial=initial, admission=admission,
                     eviction=eviction)
    return {TABLE: table, **dense}, [TABLE]


def _is_sparse(client) -> bool:
    return TABLE in getattr(client, "tables", {})


class CtrWorkerLoop(WorkerLoop):
    """One CTR worker over its partition (see the module docstring): ``WorkerLoop`` with the model hook
    ``step`` (fused: one push per step); its pulls ask for the dense parameters only."""

    def __init__(self, client, model: EmbeddingBagLogistic, x: np.ndarray, y: np.ndarray, worker_id: int,
                 num_workers: int, batch_size: int, seed: int = 0, first_epoch: int = 0):
        super().__init__(client, None, x, y, worker_id, num_workers, batch_size, seed, 1, 1, first_epoch)
        self.model = model
        self.sparse = _is_sparse(client)
        self.pull_names = list(model.dense_shapes()) + ([] if self.sparse else [TABLE])

    def step(self, batch):
        """Pull the batch's rows, compute; the dense grads, with the row grads to ride on the same push."""
        ids, y = batch
        needed = self.model.rows_needed(ids)
        rows = self.client.pull_rows(TABLE, needed) if self.sparse else self.params[TABLE][needed]
        dense = {name: self.params[name] for name in self.model.dense_shapes()}
        loss, row_ids, row_grads, dense_grads = self.model.loss_and_grads(rows, dense, ids, y)
        if self.sparse:
            return loss, dense_grads, {TABLE: (row_ids, row_grads)}
        table_grad = np.zeros(self.params[TABLE].shape, dtype=row_grads.dtype)  # the dense baseline: table-sized,
        table_grad[row_ids] = row_grads  # zeros except the batch's rows
        return loss, {TABLE: table_grad, **dense_grads}, None


@ray.remote(max_concurrency=4)  # threads: clock() and stop() are answered while run_epoch() runs
class CtrWorkerActor(LoopActor):
    """``CtrWorkerLoop`` on a Ray actor; the server handle, ids and labels arrive with the first ``run_epoch``
    (the arrays by reference, zero-copy from the store), like ``WorkerActor``'s (worker/actor.py says why)."""

    def __init__(self, client, model, x, y, worker_id, num_workers, batch_size, seed, first_epoch=0):
        def build(client, x, y):
            return CtrWorkerLoop(client, model, x, y, worker_id, num_workers, batch_size, seed, first_epoch)
        if client is None:
            self.later(build)
        else:
            self.adopt(build(client, *self.fetch(x, y)))


def evaluate_ctr(ps, model: EmbeddingBagLogistic, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(auc, logloss)`` of the server's current model on ``(x, y)``, from the rows ``x`` needs."""
    needed = model.rows_needed(x)
    names = list(model.dense_shapes())
    if _is_sparse(ps):
        rows, dense = ps.pull_rows(TABLE, needed), ps.pull(names=names)
    else:
        params = ps.pull(names=names + [TABLE])
        rows, dense = params[TABLE][needed], params
    p = model.predict_proba(rows, dense, x)
    return auc(y, p), logloss(y, p)


def train_ctr(ps, model: EmbeddingBagLogistic, data, num_workers: int = 2, epochs: int = 1, batch_size: int = 256,
              seed: int = 0, cpus_per_worker: float = 0.0, progress: Callable[[dict], None] | None = None,
              max_worker_restarts: int = 3, placement=None) -> dict:
    """Train ``model`` on ``data`` (a ``CtrDataset``) with ``num_workers`` CTR worker actors against ``ps``;
    evaluate after each epoch. Returns the result dict of every run (README: "The result of a run"), with
    ``test_auc``, ``test_logloss`` (= ``test_loss``) and the table fields set and ``test_accuracy`` None."""
    check_run_args(num_workers, epochs, batch_size, num_train=data.num_train)
    data_refs = in_memory_data(ps, data.x_train, data.y_train)
    workers = start_workers(CtrWorkerActor, num_workers, cpus_per_worker, max_worker_restarts, placement,
                            lambda w: (None, model, None, None, w, num_workers, batch_size, seed))

    def metrics(server) -> dict:
        test_auc, test_logloss = evaluate_ctr(server, model, data.x_test, data.y_test)
        return {"test_auc": test_auc, "test_logloss": test_logloss, "test_loss": test_logloss}

    run = drive_epochs(ps, workers, epochs=epochs, evaluate=metrics, data=data_refs,
                       max_worker_restarts=max_worker_restarts, progress=progress)
    return run_result(ps, run, task="ctr", dataset=data.name, num_workers=num_workers, epochs=epochs, first_epoch=0,
                      data_rows=data.num_train, **table_fields(ps, model))


def table_fields(ps, model: EmbeddingBagLogistic) -> dict:
    """The embedding table's fields of the result (``TABLE_FIELDS``), summed over the shards."""
    table = [s["row_tables"].get(TABLE, {}) for s in ps.stats()["shards"]]
    return {"table_rows": model.table_rows, "embedding_dim": model.dim, "sparse_table": _is_sparse(ps),
            "rows_touched": int(sum(t.get("rows_touched", 0) for t in table)),
            **{f"table_{key}": int(sum(t.get(key, 0) for t in table))
               for key in ("admitted", "evicted", "dropped_gradients")},
            "table_state_bytes": int(sum(t.get("allocated_bytes", 0) for t in table))}
