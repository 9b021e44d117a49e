"""``WorkerActor``: the thin Ray actor around ``WorkerLoop``; it holds the training data by reference (one
object in Ray's store, read zero-copy) and trains on its own partition of it each epoch.

Ray restarts a killed worker (``max_restarts``); the new process asks the server for the worker's clock and
``run_epoch`` skips the batches it had already pushed, so the partition is covered once and the clock goes on.
"""

from __future__ import annotations

import threading
import warnings

import ray

from .loop import WorkerLoop


@ray.remote(max_concurrency=4)  # threads: clock() and stop() are answered while run_epoch() runs
class WorkerActor:
    def __init__(self, client, grad_fn, x, y, worker_id, num_workers, batch_size, seed, n_fetch, n_push,
                 first_epoch=0, prefetch=False):
        if isinstance(x, list):  # [ObjectRef]: the data set stays in the object store, read zero-copy here
            x, y = ray.get(x[0]), ray.get(y[0])
        self.loop = WorkerLoop(client, grad_fn, x, y, worker_id, num_workers, batch_size, seed, n_fetch, n_push,
                               first_epoch, prefetch)
        self.stop_requested = threading.Event()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if self.restarted:
            self.loop.resume()

    def run_epoch(self, epoch: int):
        return self.loop.run_epoch(epoch, should_stop=self.stop_requested.is_set)

    def stop(self) -> None:
        self.stop_requested.set()

    def clock(self) -> int:
        return self.loop.clock
