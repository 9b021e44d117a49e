"""``WorkerActor``: the thin Ray actor around ``WorkerLoop``; it holds the training data by reference (one
object in Ray's store, read zero-copy) and trains on its own partition of it each epoch."""

from __future__ import annotations

import threading

import ray

from .loop import WorkerLoop


@ray.remote
class WorkerActor:
    def __init__(self, client, grad_fn, x, y, worker_id, num_workers, batch_size, seed, n_fetch, n_push):
        self.loop = WorkerLoop(client, grad_fn, x, y, worker_id, num_workers, batch_size, seed, n_fetch, n_push)
        self.stop_requested = threading.Event()

    def run_epoch(self, epoch: int):
        return self.loop.run_epoch(epoch, should_stop=self.stop_requested.is_set)

    def stop(self) -> None:
        self.stop_requested.set()

    def clock(self) -> int:
        return self.loop.clock
