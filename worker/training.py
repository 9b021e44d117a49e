"""``train``: the Python entry point of a training run (the ``rayps train`` CLI is built on it).

    result = train(ps, model, data, num_workers=4, epochs=20, batch_size=32)

``model`` is a rayps model (``build_model``), a ``TorchModule``, or a plain ``grad_fn(params, batch) ->
(loss, grads)``; with a bare ``grad_fn``, pass ``evaluate(params) -> (accuracy, loss)`` to get test figures.
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


def train(ps, model, data: Dataset, num_workers: int = 4, epochs: int = 20, batch_size: int = 32, seed: int = 0,
          n_fetch: int = 1, n_push: int = 1, cpus_per_worker: float = 0.0, evaluate=None,
          progress: Callable[[dict], None] | None = None, first_epoch: int = 0,
          on_epoch_end: Callable[[int, object], None] | None = None, max_worker_restarts: int = 3,
          placement=None, prefetch: bool = False) -> dict:
    """Run epochs ``first_epoch .. epochs-1`` with ``num_workers`` worker actors against ``ps``; evaluate after
    each epoch (``on_epoch_end(epoch, ps)`` runs then, e.g. to save a checkpoint). A worker that dies is
    restarted by Ray (up to ``max_worker_restarts`` times) and resumes its partition; an error raised by the
    gradient function stops the run and is raised here. ``prefetch``: each worker's server calls run on a
    background thread while it computes its next gradient, one step staler (``worker/loop.py``)."""
    for field, value, minimum in (("num_workers", num_workers, 1), ("epochs", epochs, 1),
                                  ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
    if not isinstance(prefetch, bool):
        raise ValueError(f"prefetch must be True or False, got {prefetch!r}")
    if num_workers > data.num_train:
        raise ValueError(f"num_workers ({num_workers}) exceeds the training samples ({data.num_train})")
    grad_fn, model_evaluate = _model_parts(model)
    user_evaluate = evaluate
    evaluate = evaluate or (lambda params: model_evaluate(params, data.x_test, data.y_test) if model_evaluate
                            else (math.nan, math.nan))
    # put once; passed nested in a list, so a restarted worker fetches them again (a top-level object-store
    # argument of a restartable actor is one Ray warns about, ray-project/ray#53727)
    x_ref, y_ref = ray.put(data.x_train), ray.put(data.y_train)
    if not 0 <= first_epoch < epochs:
        raise ValueError(f"first_epoch must be in [0, epochs={epochs}), got {first_epoch}")
    workers = start_workers(WorkerActor, num_workers, cpus_per_worker, max_worker_restarts, placement,
                            lambda w: (ps, grad_fn, [x_ref], [y_ref], w, num_workers, batch_size, seed, n_fetch,
                                       n_push, first_epoch, prefetch))
    # the built-in evaluation only reads the parameters: read-only views, no copy (a user's evaluate gets its own)
    read_only = {"copy": False} if user_evaluate is None and accepts_copy(ps.pull) else {}
    started = time.perf_counter()
    samples, history, worker_restarts = 0, [], 0
    try:
        for epoch in range(first_epoch, epochs):
            reports, restarted = _run_epoch(workers, epoch, max_worker_restarts)
            worker_restarts += restarted
            samples += sum(r.samples for r in reports)
            params = ps.pull(**read_only)  # evaluation only reads them
            accuracy, test_loss = evaluate(params)
            wall = time.perf_counter() - started
            row = {"epoch": epoch + 1, "epochs": epochs,
                   "train_loss": mean_train_loss(reports),
                   "test_loss": float(test_loss), "test_accuracy": float(accuracy),
                   "samples_per_second": samples / wall if wall > 0 else 0.0, "wall_seconds": wall,
                   "bytes_pushed": ps.stats()["bytes_pushed"]}  # encoded bytes, all shards (one call per epoch)
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
    return {
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


def _run_epoch(workers, epoch: int, max_worker_restarts: int = 3) -> tuple[list, int]:
    """Run one epoch on every worker; returns the reports and how many worker restarts it took. A worker
    process that died is asked again (Ray restarts it and it resumes where its pushes stopped); any other
    error stops the others and is raised as itself."""
    pending = {worker.run_epoch.remote(epoch): i for i, worker in enumerate(workers)}
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
            pending[workers[index].run_epoch.remote(epoch)] = index
        except Exception as error:  # noqa: BLE001 - the worker's own exception is re-raised
            for worker in workers:
                ray.kill(worker)
            raise unwrap(error) from None
    return reports, sum(retries)
