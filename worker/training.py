"""``train``: the Python entry point of a training run (the ``rayps train`` CLI is built on it).

    result = train(ps, model, data, num_workers=4, epochs=20, batch_size=32)

``data`` is a ``Dataset`` (in memory: ``load_dataset``, ``Dataset.from_arrays``) or a ``ray.data.Dataset``
(each worker streams its own split: worker/streams.py; ``label_column``, ``feature_columns``, ``eval_data``).
``model`` is a rayps model (``build_model``), a ``TorchModule``, or a plain ``grad_fn(params, batch) ->
(loss, grads)``. After each epoch the test set is evaluated: classification reports accuracy and loss,
regression (float labels) the loss (``test_accuracy`` is None); a bare ``grad_fn``'s test loss is its own loss
on the test set (pass ``evaluate(params) -> (accuracy, loss)`` for more).
The parameters a gradient function gets are read-only (views of the buffers the server sent, where the server
offers that: ``ParameterServer.pull(copy=False)``): it must not write into them.
Returns the same dict as ``rayps train --json-out``.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import ray

from ..server.remote_errors import unwrap
from .actor import WorkerActor, start_workers
from .data import Dataset
from .loop import accepts_copy
from .models import grad_fn_for
from .streams import StreamSource, StreamWorkerActor, is_ray_dataset

RESULT_KEYS = ("test_accuracy", "final_loss", "samples_per_second", "wall_seconds", "updates_applied", "workers",
               "shards", "consistency", "max_staleness", "bytes_pushed", "bytes_pulled")


def _model_parts(model) -> tuple[Callable, Callable | None]:
    if hasattr(model, "accuracy_and_loss"):  # the built-in models: one forward pass
        return grad_fn_for(model), model.accuracy_and_loss
    if hasattr(model, "loss_and_grads"):
        def evaluate(params, x, y):
            loss, _ = model.loss_and_grads(params, x, y)
            return model.accuracy(params, x, y), loss
        return grad_fn_for(model), evaluate
    if callable(model):
        return model, None
    raise TypeError(f"model must be a rayps model, a TorchModule or a grad_fn(params, batch), "
                    f"got {type(model).__name__}")


def _evaluator(model_evaluate, grad_fn, model, classification: bool, test) -> Callable:
    """``params -> (accuracy or None, loss)`` on the test arrays (``(nan, nan)`` without a test set)."""
    if test is None:
        return lambda params: (math.nan if classification else None, math.nan)
    x, y = test
    if classification and model_evaluate is not None:
        return lambda params: model_evaluate(params, x, y)
    if hasattr(model, "loss_and_grads"):
        return lambda params: (None, model.loss_and_grads(params, x, y)[0])
    return lambda params: (math.nan if classification else None, grad_fn(params, (x, y))[0])


def train(ps, model, data, num_workers: int = 4, epochs: int = 20, batch_size: int = 32, seed: int = 0,
          n_fetch: int = 1, n_push: int = 1, cpus_per_worker: float = 0.0, evaluate=None,
          progress: Callable[[dict], None] | None = None, first_epoch: int = 0,
          on_epoch_end: Callable[[int, object], None] | None = None, max_worker_restarts: int = 3,
          placement=None, prefetch: bool = False, eval_data=None, label_column: str = "label",
          feature_columns=None) -> dict:
    """Run epochs ``first_epoch .. epochs-1`` with ``num_workers`` worker actors against ``ps``; evaluate after
    each epoch (``on_epoch_end(epoch, ps)`` runs then, e.g. to save a checkpoint). A worker that dies is
    restarted by Ray (up to ``max_worker_restarts`` times) and resumes its partition; an error raised by the
    gradient function stops the run and is raised here. ``prefetch``: each worker's server calls run on a
    background thread while it computes its next gradient, one step staler (``worker/loop.py``).

    A ``ray.data.Dataset`` ``data``: ``label_column`` (default ``label``) and ``feature_columns`` (default: the
    other numeric columns) pick the columns; ``eval_data`` (a Ray Dataset, a ``Dataset`` or ``(x, y)``) is
    the test set. A worker that dies skips the rest of its split for that epoch, and the result says how many
    rows (worker/streams.py)."""
    for field, value, minimum in (("num_workers", num_workers, 1), ("epochs", epochs, 1),
                                  ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    if not isinstance(prefetch, bool):
        raise ValueError(f"prefetch must be True or False, got {prefetch!r}")
    if not 0 <= first_epoch < epochs:
        raise ValueError(f"first_epoch must be in [0, epochs={epochs}), got {first_epoch}")
    grad_fn, model_evaluate = _model_parts(model)
    user_evaluate = evaluate
    stream = None
    data_refs = None  # in-memory data: (ps, [x_ref], [y_ref]), handed to the workers with each run_epoch
    if is_ray_dataset(data):
        stream = StreamSource(data, num_workers, batch_size, label_column, feature_columns)
        test, classification = stream.eval_arrays(eval_data), stream.classification
        workers = start_workers(StreamWorkerActor, num_workers, cpus_per_worker, max_worker_restarts, placement,
                                lambda w: (ps, grad_fn, stream.splits[w], stream.columns, w, num_workers, batch_size,
                                           stream.split_rows, n_fetch, n_push, first_epoch, prefetch))
    elif isinstance(data, Dataset):
        if num_workers > data.num_train:
            raise ValueError(f"num_workers ({num_workers}) exceeds the training samples ({data.num_train})")
        test = (data.x_test, data.y_test) if eval_data is None else (eval_data.x_test, eval_data.y_test) \
            if isinstance(eval_data, Dataset) else tuple(eval_data)
        classification = data.is_classification
        # put once; handed to the workers with the server handle in each run_epoch (worker/actor.py says why not
        # in the constructor)
        x_ref, y_ref = ray.put(data.x_train), ray.put(data.y_train)
        data_refs = (ps, [x_ref], [y_ref])
        workers = start_workers(WorkerActor, num_workers, cpus_per_worker, max_worker_restarts, placement,
                                lambda w: (None, grad_fn, None, None, w, num_workers, batch_size, seed, n_fetch,
                                           n_push, first_epoch, prefetch))
    else:
        raise TypeError(f"data must be a rayps Dataset (load_dataset, Dataset.from_arrays) or a ray.data.Dataset, "
                        f"got {type(data).__name__}")
    evaluate = evaluate or _evaluator(model_evaluate, grad_fn, model, classification, test)
    # the built-in evaluation only reads the parameters: read-only views, no copy (a user's evaluate gets its own)
    read_only = {"copy": False} if user_evaluate is None and accepts_copy(ps.pull) else {}
    started = time.perf_counter()
    samples, history, worker_restarts, rows_skipped = 0, [], 0, 0
    try:
        for epoch in range(first_epoch, epochs):
            reports, restarted = _run_epoch(workers, epoch, max_worker_restarts, resume_flag=stream is not None,
                                            data=data_refs)
            worker_restarts += restarted
            rows_skipped += sum(r.rows_skipped for r in reports)
            samples += sum(r.samples for r in reports)
            params = ps.pull(**read_only)  # evaluation only reads them
            accuracy, test_loss = evaluate(params)
            wall = time.perf_counter() - started
            row = {"epoch": epoch + 1, "epochs": epochs,
                   "train_loss": mean_train_loss(reports),
                   "test_loss": float(test_loss), "test_accuracy": None if accuracy is None else float(accuracy),
                   "samples_per_second": samples / wall if wall > 0 else 0.0, "wall_seconds": wall,
                   "bytes_pushed": ps.stats()["bytes_pushed"]}  # encoded bytes, all shards (one call per epoch)
            if stream is not None:
                row["rows_skipped"] = sum(r.rows_skipped for r in reports)
            history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, ps)
            if progress is not None:
                progress(row)
    finally:
        for worker in workers:
            ray.kill(worker)
    stats = ps.stats()
    last = history[-1]
    data_report = {} if stream is None else {  # worker/streams.py: what a worker's death skipped (never repeats)
        "data_rows": stream.rows, "data_rows_skipped": rows_skipped, "data_rows_repeated": 0,
        "data_rows_dropped_per_epoch": stream.dropped_per_epoch}
    return {
        "task": "classification" if classification else "regression", **data_report,
        "test_accuracy": last["test_accuracy"], "final_loss": last["train_loss"],
        "test_loss": last["test_loss"],
        "samples_per_second": last["samples_per_second"], "wall_seconds": last["wall_seconds"],
        "updates_applied": stats["updates_applied"], "workers": num_workers, "shards": stats["num_shards"],
        "consistency": stats["consistency"], "max_staleness": stats["max_staleness"],
        "bytes_pushed": stats["bytes_pushed"], "bytes_pulled": stats["bytes_pulled"], "epochs": epochs,
        "first_epoch": first_epoch, "worker_restarts": worker_restarts, "shard_restarts": stats["restarts"],
        "history": history,
    }


def mean_train_loss(reports) -> float:
    """The epoch's training loss: the workers' mean losses weighted by their samples (NaN without samples)."""
    weights = [r.samples for r in reports]
    return float(np.average([r.mean_loss for r in reports], weights=weights)) if sum(weights) else math.nan


def _run_epoch(workers, epoch: int, max_worker_restarts: int = 3, resume_flag: bool = False,
               data=None) -> tuple[list, int]:
    """Run one epoch on every worker; returns the reports and how many worker restarts it took. A worker
    process that died is asked again (Ray restarts it and it resumes where its pushes stopped; with
    ``resume_flag`` it is told so: ``run_epoch(epoch, resumed=True)``); any other error stops the others and is
    raised as itself."""
    pending = {worker.run_epoch.remote(epoch, False, data): i for i, worker in enumerate(workers)}
    reports = [None] * len(workers)
    retries = [0] * len(workers)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        try:
            reports[index] = ray.get(done[0])
        except ray.exceptions.RayActorError:
            if retries[index] >= max_worker_restarts:
                for worker in workers:
                    ray.kill(worker)
                raise RuntimeError(f"worker {index} died {retries[index] + 1} times in epoch {epoch}") from None
            retries[index] += 1
            again = workers[index].run_epoch.remote(epoch, resume_flag, data)
            pending[again] = index
        except Exception as error:  # noqa: BLE001 - the worker's own exception is re-raised
            for worker in workers:
                ray.kill(worker)
            raise unwrap(error) from None
    return reports, sum(retries)
