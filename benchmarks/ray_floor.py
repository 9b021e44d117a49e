"""The Ray floor of "pull and push every step": what any parameter server built on Ray actor calls can reach.

``train_floor`` runs the same epochs as ``rayps.worker.train`` — 4 worker actors, each over its partition
(``worker.loop.epoch_batches``), the driver calling ``run_epoch`` on all of them and evaluating after every epoch
— but a step is the real gradient followed by ONE bare Ray actor call that carries the gradient dict to an
``EchoServer`` and brings a parameter dict back, with no update, no checks, no bookkeeping. Nothing learns (the
parameters never change), so only its samples/s mean something: it is the ceiling of one actor round trip per
step at the textbook's semantics on this machine, the rate rayps' fused ``push_pull`` would have if its own
code cost nothing.

    python benchmarks/end_to_end.py --model small --only "textbook async,rayps async,ray floor"
"""

from __future__ import annotations

import time

import ray

from rayps.worker.loop import epoch_batches


@ray.remote
class EchoServer:
    """Receives a gradient dict, returns the parameters it was built with (the same each call)."""

    def __init__(self, params: dict):
        self.params = params

    def push_pull(self, grads: dict) -> dict:
        return self.params


@ray.remote
class FloorWorker:
    def __init__(self, model, server, x, y, worker_id: int, num_workers: int, batch_size: int, seed: int):
        self.model, self.server = model, server
        self.x, self.y = x, y
        self.worker_id, self.num_workers, self.batch_size, self.seed = worker_id, num_workers, batch_size, seed
        self.params = None

    def run_epoch(self, epoch: int) -> int:
        batches = epoch_batches(len(self.x), self.num_workers, self.worker_id, epoch, self.seed, self.batch_size)
        if self.params is None:
            self.params = ray.get(self.server.push_pull.remote({}))
        samples = 0
        for batch in batches:
            _, grads = self.model.loss_and_grads(self.params, self.x[batch], self.y[batch])
            self.params = ray.get(self.server.push_pull.remote(grads))
            samples += len(batch)
        return samples


def train_floor(model, data, params: dict, num_workers: int = 4, epochs: int = 20, batch_size: int = 32,
                seed: int = 0, cpus_per_actor: float = 0.0) -> dict:
    """``rayps.worker.train``'s epoch structure with a bare echo actor as the server; the keys of its result
    that the comparison reads (test accuracy: of the unchanged initial parameters)."""
    x_ref, y_ref = ray.put(data.x_train), ray.put(data.y_train)
    server = EchoServer.options(num_cpus=cpus_per_actor).remote(params)
    workers = [FloorWorker.options(num_cpus=cpus_per_actor).remote(model, server, x_ref, y_ref, w, num_workers,
                                                                  batch_size, seed) for w in range(num_workers)]
    started = time.perf_counter()
    history, samples = [], 0
    try:
        for epoch in range(epochs):
            samples += sum(ray.get([w.run_epoch.remote(epoch) for w in workers]))
            weights = ray.get(server.push_pull.remote({}))
            accuracy, _ = model.accuracy_and_loss(weights, data.x_test, data.y_test)
            wall = time.perf_counter() - started
            history.append({"epoch": epoch + 1, "samples_per_second": samples / wall, "wall_seconds": wall,
                            "test_accuracy": float(accuracy)})
    finally:
        for actor in [server, *workers]:
            ray.kill(actor)
    last = history[-1]
    return {"test_accuracy": last["test_accuracy"], "samples_per_second": last["samples_per_second"],
            "wall_seconds": last["wall_seconds"], "history": history}

