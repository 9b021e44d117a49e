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

Evaluation (after every epoch, on the driver): test logloss and AUC from the rows the test split needs.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import ray

from ..server.row_tables import RowTable
from .actor import LoopActor, start_workers
from .ctr import EmbeddingBagLogistic, auc, logloss
from .loop import EpochReport, WorkerLoop, epoch_batches

TABLE = "emb"
CTR_RESULT_KEYS = ("test_auc", "test_logloss", "final_loss", "samples_per_second", "wall_seconds", "updates_applied",
                   "workers", "shards", "consistency", "max_staleness", "bytes_pushed", "bytes_pulled")


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
    """One CTR worker over its partition (see the module docstring). Batches, clocks and the resume after a
    restart are ``WorkerLoop``'s (fused: one push per step)."""

    def __init__(self, client, model: EmbeddingBagLogistic, x: np.ndarray, y: np.ndarray, worker_id: int,
                 num_workers: int, batch_size: int, seed: int = 0, first_epoch: int = 0):
        super().__init__(client, None, x, y, worker_id, num_workers, batch_size, seed, 1, 1, first_epoch)
        self.model = model
        self.sparse = _is_sparse(client)
        self.dense_names = list(model.dense_shapes()) + ([] if self.sparse else [TABLE])

    def step(self, ids: np.ndarray, y: np.ndarray, epoch: int) -> float:
        """Pull the batch's rows, compute, push dense + row grads in one message; returns the batch loss."""
        if self.params is None:
            self.params = self.client.pull(names=self.dense_names, worker_id=self.worker_id)
        needed = self.model.rows_needed(ids)
        if self.sparse:
            rows = self.client.pull_rows(TABLE, needed)
        else:
            rows = self.params[TABLE][needed]
        dense = {name: self.params[name] for name in self.model.dense_shapes()}
        loss, row_ids, row_grads, dense_grads = self.model.loss_and_grads(rows, dense, ids, y)
        if self.sparse:
            params = self.client.push_pull(dense_grads, worker_id=self.worker_id, epoch=epoch,
                                           rows={TABLE: (row_ids, row_grads)})
        else:  # the dense baseline: a table-sized gradient, zeros except the batch's rows
            table_grad = np.zeros(self.params[TABLE].shape, dtype=row_grads.dtype)
            table_grad[row_ids] = row_grads
            params = self.client.push_pull({TABLE: table_grad, **dense_grads}, worker_id=self.worker_id, epoch=epoch)
        self.params = {name: params[name] for name in self.dense_names}
        return loss

    def run_epoch(self, epoch: int, should_stop: Callable[[], bool] | None = None) -> EpochReport:
        started = time.perf_counter()
        batches = epoch_batches(len(self.x), self.num_workers, self.worker_id, epoch, self.seed, self.batch_size)
        epoch_start_clock = (epoch - self.first_epoch) * len(batches)
        skip = min(max(0, self.clock - epoch_start_clock), len(batches))  # resumed after a restart: done already
        self.clock = max(self.clock, epoch_start_clock)
        losses, samples = [], 0
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            if should_stop is not None and should_stop():
                break
            if len(batch):
                losses.append(self.step(self.x[batch], self.y[batch], epoch))
                samples += len(batch)
            else:  # a partition one sample short: its step only ticks the clock
                self.client.tick(worker_id=self.worker_id, epoch=epoch)
            self.clock += 1
        return EpochReport(self.worker_id, epoch, samples, len(losses), float(np.mean(losses)) if losses else math.nan,
                           time.perf_counter() - started, self.clock)


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
    evaluate after each epoch. Returns a result dict like ``train()``'s, with ``test_auc`` and ``test_logloss``
    in place of the accuracy."""
    from .training import _run_epoch, mean_train_loss  # noqa: PLC0415 - the same epoch driver as train()

    for field, value in (("num_workers", num_workers), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
    if num_workers > data.num_train:
        raise ValueError(f"num_workers ({num_workers}) exceeds the training samples ({data.num_train})")
    x_ref, y_ref = ray.put(data.x_train), ray.put(data.y_train)
    workers = start_workers(CtrWorkerActor, num_workers, cpus_per_worker, max_worker_restarts, placement,
                            lambda w: (None, model, None, None, w, num_workers, batch_size, seed))
    started = time.perf_counter()
    samples, train_seconds, history, worker_restarts = 0, 0.0, [], 0
    try:
        for epoch in range(epochs):
            epoch_started = time.perf_counter()
            reports, restarted = _run_epoch(workers, epoch, max_worker_restarts, data=(ps, [x_ref], [y_ref]))
            train_seconds += time.perf_counter() - epoch_started
            worker_restarts += restarted
            samples += sum(r.samples for r in reports)
            test_auc, test_logloss = evaluate_ctr(ps, model, data.x_test, data.y_test)
            wall = time.perf_counter() - started
            row = {"epoch": epoch + 1, "epochs": epochs, "train_loss": mean_train_loss(reports),
                   "test_logloss": test_logloss, "test_auc": test_auc,
                   "samples_per_second": samples / wall if wall > 0 else 0.0, "wall_seconds": wall,
                   "bytes_pushed": ps.stats()["bytes_pushed"]}
            history.append(row)
            if progress is not None:
                progress(row)
    finally:
        for worker in workers:
            ray.kill(worker)
    stats = ps.stats()
    last = history[-1]
    table = [s["row_tables"].get(TABLE, {}) for s in stats["shards"]]
    return {
        "dataset": data.name, "test_auc": last["test_auc"], "test_logloss": last["test_logloss"],
        "final_loss": last["train_loss"], "samples_per_second": last["samples_per_second"],
        "train_samples_per_second": samples / train_seconds if train_seconds > 0 else 0.0,
        "wall_seconds": last["wall_seconds"], "updates_applied": stats["updates_applied"], "workers": num_workers,
        "shards": stats["num_shards"], "consistency": stats["consistency"], "max_staleness": stats["max_staleness"],
        "bytes_pushed": stats["bytes_pushed"], "bytes_pulled": stats["bytes_pulled"], "epochs": epochs,
        "table_rows": model.table_rows, "embedding_dim": model.dim, "sparse_table": _is_sparse(ps),
        "rows_touched": int(sum(t.get("rows_touched", 0) for t in table)),
        **{f"table_{key}": int(sum(t.get(key, 0) for t in table)) for key in ("admitted", "evicted",
                                                                               "dropped_gradients")},
        "table_state_bytes": int(sum(t.get("allocated_bytes", 0) for t in table)),
        "worker_restarts": worker_restarts, "shard_restarts": stats["restarts"], "history": history,
    }
