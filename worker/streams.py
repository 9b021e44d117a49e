"""Training on a ``ray.data.Dataset``: each worker iterates its own streaming split, epoch after epoch.

    result = train(ps, model, ray.data.read_parquet("s3://bucket/train/"), num_workers=4, epochs=10,
                   label_column="label", eval_data=ray.data.read_parquet("s3://bucket/test/"))

The driver splits the dataset once with ``streaming_split(num_workers, equal=True)``: every worker gets the
same number of rows per epoch, ``rows // num_workers`` (``equal`` drops the remainder, ``rows % num_workers``
rows per epoch, reported as ``data_rows_dropped``), so every worker takes the same number of steps, ``ceil(split
rows / batch_size)``, and BSP steps line up. Ray Data reads, and re-reads each epoch, where the data lives;
batches arrive as NumPy (``TableColumns.arrays``: features stacked into float32 rows, or one tensor column).
The order is Ray Data's (``seed`` does not apply): shuffle with ``ds.randomize_block_order()`` or
``ds.random_shuffle()`` before passing the dataset.

A worker's death. Ray restarts the worker (``max_worker_restarts``) and the driver asks it for the same epoch
again. The rows its dead process had taken from its split cannot be read again in that epoch (a split is a
stream that every worker must start together, once per epoch), so the new process does not read its split
for the rest of that epoch: it *skips* the split's remaining rows, ticking its remaining steps so the clocks
(and BSP steps) stay aligned, and reads its split again from the next epoch on. Gradients it had pushed are
applied exactly once (the server's sequence numbers), so nothing is repeated. The result says what was skipped:
``data_rows_skipped`` (and per epoch in ``history``), ``data_rows_repeated`` (always 0). The unread rest of the
dead worker's split stays in Ray's object store until the epoch ends.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import ray

from .actor import LoopActor
from .loop import WorkerLoop
from .tables import TableColumns, import_ray_data, table_arrays


def is_ray_dataset(data) -> bool:
    """Is ``data`` a ``ray.data.Dataset`` (checked without importing Ray Data when it is not loaded)?"""
    import sys  # noqa: PLC0415

    module = sys.modules.get("ray.data")
    return module is not None and isinstance(data, module.Dataset)


class StreamSource:
    """The driver's side of a Ray Dataset run: columns, row counts, the splits, evaluation arrays."""

    def __init__(self, dataset, num_workers: int, batch_size: int, label_column: str = "label",
                 feature_columns=None):
        import_ray_data()
        import pyarrow.types as pat  # noqa: PLC0415

        schema = dataset.schema()
        self.columns = TableColumns.resolve(schema, label_column, feature_columns, "train data")
        label_type = dict(zip(schema.names, schema.types))[self.columns.label]
        self.classification = pat.is_integer(label_type) or pat.is_boolean(label_type)  # float labels: regression
        self.dataset = dataset.select_columns([self.columns.label, *self.columns.features])
        self.rows = int(self.dataset.count())
        if self.rows < num_workers:
            raise ValueError(f"num_workers ({num_workers}) exceeds the training rows ({self.rows})")
        self.split_rows = self.rows // num_workers
        self.dropped_per_epoch = self.rows - self.split_rows * num_workers
        self.steps_per_epoch = max(1, math.ceil(self.split_rows / batch_size))
        self.splits = self.dataset.streaming_split(num_workers, equal=True)

    def eval_arrays(self, eval_data):
        """``(x, y)`` for evaluation from a Ray Dataset (same columns), a rayps ``Dataset`` (its test part) or
        an ``(x, y)`` pair; None without ``eval_data``."""
        if eval_data is None:
            return None
        if is_ray_dataset(eval_data):
            columns = TableColumns.resolve(eval_data.schema(), self.columns.label, list(self.columns.features),
                                           "eval data")
            return table_arrays(eval_data, columns, "eval data")
        if hasattr(eval_data, "x_test"):
            return eval_data.x_test, eval_data.y_test
        x, y = eval_data
        return x, y


class StreamLoop(WorkerLoop):
    """``WorkerLoop`` over one streaming split: the epoch's batches come from ``split.iter_batches``."""

    def __init__(self, client, grad_fn: Callable, split, columns: TableColumns, worker_id: int, num_workers: int,
                 batch_size: int, split_rows: int, n_fetch: int = 1, n_push: int = 1, first_epoch: int = 0,
                 prefetch: bool = False):
        super().__init__(client, grad_fn, None, None, worker_id, num_workers, batch_size, 0, n_fetch, n_push,
                         first_epoch, prefetch)
        self.split, self.columns, self.split_rows = split, columns, int(split_rows)

    def epoch_plan(self, epoch: int, resumed: bool = False) -> tuple[int, Callable[[int], Iterator]]:
        steps = max(1, math.ceil(self.split_rows / self.batch_size))

        def steps_from(skip: int) -> Iterator:
            if resumed:  # this epoch's split went with the dead process: tick the rest, count what is skipped
                self.rows_skipped = self.split_rows - min(self.split_rows, skip * self.batch_size)
                for i in range(skip, steps):
                    yield i, None
                return
            i = 0
            for batch in self.split.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                                 drop_last=False):
                x, y = self.columns.arrays(batch, f"worker {self.worker_id}'s split")
                if skip <= i < steps:
                    yield i, (x, y)
                i += 1
            for j in range(max(i, skip), steps):  # fewer rows than planned: empty steps keep the clocks aligned
                yield j, None
        return steps, steps_from


@ray.remote(max_concurrency=4)  # threads: clock() and stop() are answered while run_epoch() runs
class StreamWorkerActor(LoopActor):
    """``StreamLoop`` on a Ray actor. ``client, split``: given, or None to take them from the first
    ``run_epoch(..., data=(client, splits, None))`` (what ``train`` does: this worker reads
    ``splits[worker_id]``; worker/actor.py says why not in the constructor)."""

    fetch = staticmethod(lambda splits, _: (splits, None))  # the splits are no object refs: nothing to fetch

    def __init__(self, client, grad_fn, split, columns, worker_id, num_workers, batch_size, split_rows, n_fetch,
                 n_push, first_epoch=0, prefetch=False):
        import_ray_data()  # quiet Ray Data's per-execution logging in this process too

        def build(client, splits, _):
            return StreamLoop(client, grad_fn, splits[worker_id], columns, worker_id, num_workers, batch_size,
                              split_rows, n_fetch, n_push, first_epoch, prefetch)
        if client is None:
            self.later(build)
        else:
            self.adopt(StreamLoop(client, grad_fn, split, columns, worker_id, num_workers, batch_size, split_rows,
                                  n_fetch, n_push, first_epoch, prefetch))
