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


class LoopActor:
    """What every worker actor shares: the loop it runs (``run_epoch``, ``stop``, ``clock``), its data fetched
    from the object store, and the resume after Ray restarted the process.

    The server handle and the training data travel in ``run_epoch(..., data=(client, [x_ref], [y_ref]))``, not
    in the constructor: Ray re-runs a restartable actor's constructor with its original arguments, and
    object-store arguments there (the data, and the shard actors' handles inside the client) are what
    ray-project/ray#53727 warns about on every run. The loop is built on the first ``run_epoch`` of each process
    (a restarted one gets the same call again from the driver)."""

    build = None  # (client, x, y) -> the loop; set by a subclass constructor that was given no client

    @staticmethod
    def fetch(x, y):
        """``x, y`` as arrays: nested ``[ObjectRef]``s are fetched here (zero-copy from the store)."""
        if isinstance(x, list):
            x, y = ray.get(x[0]), ray.get(y[0])
        return x, y

    def adopt(self, loop) -> None:
        self.loop = loop
        if not hasattr(self, "stop_requested"):
            self.stop_requested = threading.Event()
        with warnings.catch_warnings():  # Ray's property warns about its own internal use of a deprecated API
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if self.restarted or hasattr(loop.client, "as_worker"):  # the worker's identity, in every process
            loop.resume()

    def later(self, build) -> None:
        """Build the loop with ``build(client, x, y)`` on the first ``run_epoch``, from the ``data`` it passes."""
        self.build, self.loop, self.stop_requested = build, None, threading.Event()

    def run_epoch(self, epoch: int, resumed: bool = False, data=None):
        """``resumed``: the driver asks again after this worker's process died during ``epoch``. ``data``:
        ``(client, [x_ref], [y_ref])`` for a worker built without a client, or ``[ObjectRef]`` of that tuple
        (``drive_epochs``: read only by a worker that has no loop yet)."""
        if self.loop is None:
            if data is None:
                raise ValueError("data: this worker was built without a client; pass data=(client, [x_ref], "
                                 "[y_ref])")
            client, x, y = ray.get(data[0]) if isinstance(data, list) else data
            self.adopt(self.build(client, *self.fetch(x, y)))
        if resumed:
            return self.loop.run_epoch(epoch, should_stop=self.stop_requested.is_set, resumed=True)
        return self.loop.run_epoch(epoch, should_stop=self.stop_requested.is_set)

    def catch_up(self) -> int:
        """Between epochs (the driver asks while other workers still run): replay this worker's pushes to the
        shards that restarted since it finished (``ParameterServer.catch_up``); how many shards it recovered."""
        catch_up = getattr(getattr(self.loop, "client", None), "catch_up", None)
        return 0 if catch_up is None else int(catch_up())

    def stop(self) -> None:
        self.stop_requested.set()

    def clock(self) -> int:
        return 0 if self.loop is None else self.loop.clock


@ray.remote(max_concurrency=4)  # threads: clock() and stop() are answered while run_epoch() runs
class WorkerActor(LoopActor):
    """``WorkerLoop`` on a Ray actor. ``client, x, y``: given, or None to take them from the first
    ``run_epoch(..., data=(client, [x_ref], [y_ref]))`` (what ``train`` does)."""

    def __init__(self, client, grad_fn, x, y, worker_id, num_workers, batch_size, seed, n_fetch, n_push,
                 first_epoch=0, prefetch=False):
        def build(client, x, y):
            return WorkerLoop(client, grad_fn, x, y, worker_id, num_workers, batch_size, seed, n_fetch, n_push,
                              first_epoch, prefetch)
        if client is None:
            self.later(build)
        else:
            self.adopt(build(client, *self.fetch(x, y)))


def start_workers(actor_class, num_workers: int, cpus_per_worker: float, max_restarts: int, placement,
                  args_of) -> list:
    """One ``actor_class`` actor per worker id ``w``, built with ``args_of(w)``, with its CPU share, Ray's
    restarts and (with a ``placement``) its node; ``train`` and ``train_ctr`` start their workers here."""
    def options(w: int) -> dict:
        return {"num_cpus": cpus_per_worker, "max_restarts": max_restarts,
                **(placement.worker_options(w) if placement is not None else {})}
    return [actor_class.options(**options(w)).remote(*args_of(w)) for w in range(num_workers)]
