"""The epoch driver of every training run (``train``: dense, in memory or Ray Data; ``train_ctr``: CTR with row
tables), and the one result dict they return.

    workers = start_workers(...)                       # worker/actor.py: one actor per worker id
    run = drive_epochs(ps, workers, epochs=..., evaluate=metrics_of_the_server, data=in_memory_data(ps, x, y))
    return run_result(ps, run, task=..., dataset=..., num_workers=..., data_rows=..., **table_fields)

Per epoch: every worker runs ``run_epoch`` (``run_epoch_on``: a worker whose process died is asked again, Ray
having restarted it; any other error stops the others and is raised as itself; every ``IDLE_CHECK_SECONDS``
the workers that already finished replay to shards that restarted since, ``LoopActor.catch_up``), then the
driver evaluates
(``evaluate(ps) -> {metric: value}``), appends a history row, calls ``on_epoch_end(epoch, ps)`` and
``progress(row)``. The workers are killed when the driver ends, whether it finished or raised.

While it drives the epochs, the driver's BLAS runs on one thread (``threadpool_limits``): after a call, an
OpenBLAS pool's threads spin waiting for the next one, and with an evaluation every epoch a pool of the
machine's cores never goes to sleep — one core taken from the workers and shards for the whole run.

The result's fields (``RESULT_FIELDS``; ``rayps train --json-out`` writes the same, plus ``CLI_FIELDS``) and a
history row's (``HISTORY_FIELDS``) are documented once, in the README ("The result of a run"). Every field is
present in every result; a metric that does not apply to the task (accuracy of a regression, AUC of a dense
classifier, the embedding table of a run without one) is None.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from ..server.remote_errors import unwrap

FINAL_CHECKPOINT_ROUNDS = 8  # final checkpoints in a row a shard may die in (``checkpoint_at_end``)
IDLE_CHECK_SECONDS = 2.0  # while an epoch runs: how often the workers that finished it catch up (``catch_up``)
METRIC_FIELDS = ("test_accuracy", "test_loss", "test_auc", "test_logloss")
TABLE_FIELDS = ("table_rows", "embedding_dim", "sparse_table", "rows_touched", "table_admitted", "table_evicted",
                "table_dropped_gradients", "table_state_bytes")
RESULT_FIELDS = ("task", "dataset", "workers", "shards", "consistency", "max_staleness", "epochs", "first_epoch",
                 *METRIC_FIELDS, "final_loss", "samples_per_second", "train_samples_per_second", "wall_seconds",
                 "updates_applied", "bytes_pushed", "bytes_pulled", "worker_restarts", "shard_restarts",
                 "data_rows", "data_rows_skipped", "data_rows_repeated", "data_rows_dropped_per_epoch",
                 *TABLE_FIELDS, "history")
HISTORY_FIELDS = ("epoch", "epochs", "train_loss", *METRIC_FIELDS, "samples_per_second", "wall_seconds",
                  "bytes_pushed", "rows_skipped")
CLI_FIELDS = ("updater", "prefetch", "compression", "total_seconds")  # added by ``rayps train``


def check_run_args(num_workers, epochs, batch_size, first_epoch: int = 0, num_train: int | None = None) -> None:
    """The arguments every run shares; a ValueError naming the field."""
    for name, value in (("num_workers", num_workers), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(first_epoch, bool) or not isinstance(first_epoch, int) or not 0 <= first_epoch < epochs:
        raise ValueError(f"first_epoch must be in [0, epochs={epochs}), got {first_epoch!r}")
    if num_train is not None and num_workers > num_train:
        raise ValueError(f"num_workers ({num_workers}) exceeds the training samples ({num_train})")


def in_memory_data(ps, x, y) -> tuple:
    """``(ps, [x_ref], [y_ref])``: the arrays put in the object store once; ``drive_epochs`` puts this tuple
    there too and hands its reference to every worker with each ``run_epoch`` (worker/actor.py says why not in
    the constructor)."""
    return ps, [ray.put(x)], [ray.put(y)]


def mean_train_loss(reports) -> float:
    """The epoch's training loss: the workers' mean losses weighted by their samples (NaN without samples)."""
    weights = [r.samples for r in reports]
    return float(np.average([r.mean_loss for r in reports], weights=weights)) if sum(weights) else math.nan


def run_epoch_on(workers, epoch: int, max_worker_restarts: int = 3, resume_flag: bool = False,
                 data=None) -> tuple[list, int]:
    """Run one epoch on every worker; returns the reports and how many worker restarts it took. A worker
    process that died is asked again (Ray restarts it and it resumes where its pushes stopped; with
    ``resume_flag`` it is told so: ``run_epoch(epoch, resumed=True)``); any other error stops the others and is
    raised as itself.

    While some workers still run, every ``IDLE_CHECK_SECONDS`` each one that finished is asked to ``catch_up``
    (replay to the shards that restarted since; one call at a time per worker, never while it runs, all
    answered before the next epoch). Without it a shard that restarts after a worker finished lacks that
    worker's last pushes until its next epoch, and in sync mode the workers still running wait for them
    forever. A worker that dies during its catch-up is asked to run the epoch again, like one that died in it:
    its restarted process recomputes what the shards lack."""
    calls = {worker.run_epoch.remote(epoch, False, data): (i, "run") for i, worker in enumerate(workers)}
    reports = [None] * len(workers)
    retries = [0] * len(workers)
    while calls:
        running = {index for index, kind in calls.values() if kind == "run"}
        done, _ = ray.wait(list(calls), num_returns=1, timeout=IDLE_CHECK_SECONDS if running else None)
        if not done:
            asked = {index for index, kind in calls.values() if kind == "catch_up"}
            for index, worker in enumerate(workers):
                if index not in running and index not in asked:
                    calls[worker.catch_up.remote()] = (index, "catch_up")
            continue
        index, kind = calls.pop(done[0])
        try:
            value = ray.get(done[0])
            if kind == "run" and reports[index] is None:
                reports[index] = value
        except ray.exceptions.RayActorError:
            if retries[index] >= max_worker_restarts:
                for worker in workers:
                    ray.kill(worker)
                raise RuntimeError(f"worker {index} died {retries[index] + 1} times in epoch {epoch}") from None
            retries[index] += 1
            calls[workers[index].run_epoch.remote(epoch, resume_flag, data)] = (index, "run")
        except Exception as error:  # noqa: BLE001 - the worker's own exception is re-raised
            for worker in workers:
                ray.kill(worker)
            raise unwrap(error) from None
    return reports, sum(retries)


@dataclass
class EpochRun:
    """What ``drive_epochs`` ran: the history rows and the totals over its epochs."""

    history: list = field(default_factory=list)
    samples: int = 0
    train_seconds: float = 0.0  # time in the workers' epochs, without evaluation
    worker_restarts: int = 0
    rows_skipped: int = 0


def drive_epochs(ps, workers, *, epochs: int, evaluate: Callable[[object], dict], first_epoch: int = 0, data=None,
                 resume_flag: bool = False, max_worker_restarts: int = 3,
                 on_epoch_end: Callable[[int, object], None] | None = None,
                 progress: Callable[[dict], None] | None = None) -> EpochRun:
    """Epochs ``first_epoch .. epochs-1`` on ``workers`` (see the module docstring); ``evaluate(ps)`` returns
    some of ``METRIC_FIELDS`` (the others are None in the row). At the end every shard checkpoints (with a
    ``checkpoint_dir``: ``checkpoint_at_end``, which survives a shard dying meanwhile) and the workers are killed.

    ``data`` (the server handle and the training data) is put in the object store once and each ``run_epoch``
    carries only its reference, ``[ObjectRef]``: a worker reads it when it has no loop yet (its first epoch, or
    the first after Ray restarted it). Sent as itself, the handle and its shard actors' handles were pickled by
    the driver and unpickled by every worker on every epoch."""
    data = None if data is None else [ray.put(data)]
    run = EpochRun()
    started = time.perf_counter()
    blas = threadpool_limits(limits=1, user_api="blas")  # see the module docstring
    try:
        for epoch in range(first_epoch, epochs):
            epoch_started = time.perf_counter()
            reports, restarted = run_epoch_on(workers, epoch, max_worker_restarts, resume_flag, data)
            run.train_seconds += time.perf_counter() - epoch_started
            run.worker_restarts += restarted
            run.samples += sum(r.samples for r in reports)
            skipped = sum(r.rows_skipped for r in reports)
            run.rows_skipped += skipped
            metrics = evaluate(ps)
            unknown = set(metrics) - set(METRIC_FIELDS)
            if unknown:
                raise ValueError(f"evaluate: metrics must be among {list(METRIC_FIELDS)}, got {sorted(unknown)}")
            wall = time.perf_counter() - started
            row = {"epoch": epoch + 1, "epochs": epochs, "train_loss": mean_train_loss(reports),
                   **{name: _number(metrics.get(name)) for name in METRIC_FIELDS},
                   "samples_per_second": run.samples / wall if wall > 0 else 0.0, "wall_seconds": wall,
                   "bytes_pushed": ps.stats()["bytes_pushed"],  # encoded bytes, all shards (one call per epoch)
                   "rows_skipped": skipped}
            run.history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, ps)
            if progress is not None:
                progress(row)
        checkpoint_at_end(ps, workers)  # the workers' replay buffers end with them
    finally:
        blas.restore_original_limits()
        for worker in workers:
            ray.kill(worker)
    return run


def checkpoint_at_end(ps, workers) -> None:
    """Every shard writes a checkpoint that holds every push of the run (with a ``checkpoint_dir``;
    ``ParameterServer.checkpoint_shards``), while the workers, whose replay buffers end with them, still live. A
    shard that dies during it restores its last finished checkpoint and lacks the pushes since, so the workers
    then replay to the shards that restarted (``catch_up``) and the round repeats, until one in which no worker
    had anything to replay (at most ``FINAL_CHECKPOINT_ROUNDS``)."""
    for _ in range(FINAL_CHECKPOINT_ROUNDS):
        ps.checkpoint_shards()
        if not getattr(ps, "checkpoint_dir", None):
            return
        recovered = 0
        for call in [worker.catch_up.remote() for worker in workers]:  # all at once: each replays by itself
            try:
                recovered += int(ray.get(call))
            except ray.exceptions.RayActorError:  # a worker gone after its last epoch has nothing left to give
                continue
        if not recovered:
            return
    raise RuntimeError(f"the final checkpoint: shards kept restarting ({FINAL_CHECKPOINT_ROUNDS} rounds)")


def _number(value):
    return None if value is None else float(value)


def run_result(ps, run: EpochRun, *, task: str, dataset: str, num_workers: int, epochs: int, first_epoch: int,
               data_rows: int, data_rows_dropped_per_epoch: int = 0, **table) -> dict:
    """The result dict: every one of ``RESULT_FIELDS``, from the server's stats, the run and ``table`` (some of
    ``TABLE_FIELDS``; the rest None)."""
    unknown = set(table) - set(TABLE_FIELDS)
    if unknown:
        raise ValueError(f"table fields must be among {list(TABLE_FIELDS)}, got {sorted(unknown)}")
    stats = ps.stats()
    last = run.history[-1]
    result = {
        "task": task, "dataset": dataset, "workers": num_workers, "shards": stats["num_shards"],
        "consistency": stats["consistency"], "max_staleness": stats["max_staleness"], "epochs": epochs,
        "first_epoch": first_epoch, **{name: last[name] for name in METRIC_FIELDS},
        "final_loss": last["train_loss"], "samples_per_second": last["samples_per_second"],
        "train_samples_per_second": run.samples / run.train_seconds if run.train_seconds > 0 else 0.0,
        "wall_seconds": last["wall_seconds"], "updates_applied": stats["updates_applied"],
        "bytes_pushed": stats["bytes_pushed"], "bytes_pulled": stats["bytes_pulled"],
        "worker_restarts": run.worker_restarts, "shard_restarts": stats["restarts"],
        "data_rows": int(data_rows), "data_rows_skipped": run.rows_skipped, "data_rows_repeated": 0,
        "data_rows_dropped_per_epoch": int(data_rows_dropped_per_epoch),
        **{name: table.get(name) for name in TABLE_FIELDS}, "history": run.history,
    }
    assert tuple(result) == RESULT_FIELDS  # one set of fields, in one order
    return result
