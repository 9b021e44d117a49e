"""``WorkerLoop``: one worker's pull -> compute -> push cycle over its data partition — plain logic, no Ray.

DistBelief's intervals: the worker fetches fresh parameters every ``n_fetch`` steps and pushes its gradient
every ``n_push`` steps (the mean of the gradients computed since the last push). With ``n_fetch == n_push ==
1`` a step is one fused ``push_pull`` call per shard: the pull that follows a push rides on the same message.

The server handle (``client``) needs ``pull(worker_id=)``, ``push(grads, worker_id=, epoch=)``, ``flush()``
and ``push_pull(grads, worker_id=, epoch=)``; a ``ParameterServer`` has them, and so can a test double.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .data import partition_indices


@dataclass
class EpochReport:
    """What one worker did in one epoch."""

    worker_id: int
    epoch: int
    samples: int
    steps: int
    mean_loss: float
    seconds: float
    clock: int


def epoch_batches(num_samples: int, num_workers: int, worker_id: int, epoch: int, seed: int,
                  batch_size: int) -> list[np.ndarray]:
    """This worker's minibatches (index arrays) for ``epoch``.

    Every worker gets the SAME number of batches, ``ceil(largest partition / batch_size)``, so that BSP steps
    line up; a partition one sample smaller just has one batch one sample smaller.
    """
    parts = partition_indices(num_samples, num_workers, epoch, seed)
    steps = max(1, math.ceil(max(len(p) for p in parts) / batch_size))
    return [b for b in np.array_split(parts[worker_id], steps)]


class WorkerLoop:
    """Runs epochs for one worker. ``grad_fn(params, (x, y)) -> (loss, grads)``."""

    def __init__(self, client, grad_fn: Callable, x: np.ndarray, y: np.ndarray, worker_id: int,
                 num_workers: int, batch_size: int, seed: int = 0, n_fetch: int = 1, n_push: int = 1,
                 first_epoch: int = 0):
        for field, value in (("batch_size", batch_size), ("n_fetch", n_fetch), ("n_push", n_push)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id must be in [0, {num_workers}), got {worker_id}")
        self.client = client
        self.grad_fn = grad_fn
        self.x, self.y = x, y
        self.worker_id = worker_id
        self.num_workers = num_workers
        self.batch_size = batch_size
        self.seed = seed
        self.n_fetch = n_fetch
        self.n_push = n_push
        self.first_epoch = first_epoch  # the epoch this run started at (clocks count from there)
        self.clock = 0  # pushes sent
        self.steps_done = 0  # steps over all epochs (for the fetch/push intervals)
        self.params: dict | None = None

    def resume(self) -> None:
        """After a restart: take this worker's clock from the server, where its pushes are counted, so
        ``run_epoch`` skips the batches whose gradients were already pushed."""
        self.clock = int(self.client.worker_clock(self.worker_id))

    def pushes_per_epoch(self, num_batches: int) -> int:
        fused = self.n_fetch == 1 and self.n_push == 1
        return num_batches if fused else math.ceil(num_batches / self.n_push)

    def run_epoch(self, epoch: int, should_stop: Callable[[], bool] | None = None) -> EpochReport:
        started = time.perf_counter()
        batches = epoch_batches(len(self.x), self.num_workers, self.worker_id, epoch, self.seed, self.batch_size)
        fused = self.n_fetch == 1 and self.n_push == 1
        per_epoch = self.pushes_per_epoch(len(batches))
        epoch_start_clock = (epoch - self.first_epoch) * per_epoch
        already_pushed = min(max(0, self.clock - epoch_start_clock), per_epoch)
        skip = already_pushed * (1 if fused else self.n_push)  # resumed after a restart: those are done
        self.clock = max(self.clock, epoch_start_clock)
        self.steps_done = (epoch - self.first_epoch) * len(batches) + skip
        losses, samples = [], 0
        pending = GradientSum()
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            if should_stop is not None and should_stop():
                break
            if self.params is None or (not fused and self.steps_done % self.n_fetch == 0):
                self.params = self.client.pull(worker_id=self.worker_id)
            grads = None
            if len(batch):  # a partition one sample short may get one empty batch: its step only ticks the clock
                loss, grads = self.grad_fn(self.params, (self.x[batch], self.y[batch]))
                losses.append(float(loss))
                samples += len(batch)
            self.steps_done += 1
            if fused:
                if grads is None:
                    self.client.tick(worker_id=self.worker_id, epoch=epoch)
                else:
                    self.params = self.client.push_pull(grads, worker_id=self.worker_id, epoch=epoch)
                self.clock += 1
                continue
            if grads is not None:
                pending.add(grads)
            if (i + 1) % self.n_push == 0 or i == len(batches) - 1:
                mean = pending.take_mean()
                if mean is None:
                    self.client.tick(worker_id=self.worker_id, epoch=epoch)
                else:
                    self.client.push(mean, worker_id=self.worker_id, epoch=epoch)
                self.clock += 1
        if not fused:
            self.client.flush()
        return EpochReport(self.worker_id, epoch, samples, len(losses), float(np.mean(losses)) if losses else math.nan,
                           time.perf_counter() - started, self.clock)


class GradientSum:
    """The gradients computed since the last push; DistBelief pushes their mean every ``n_push`` steps."""

    def __init__(self):
        self.total: dict | None = None
        self.count = 0

    def add(self, grads: Mapping[str, np.ndarray]) -> None:
        if self.total is None:
            self.total = {name: np.array(g, copy=True) for name, g in grads.items()}
        else:
            for name, g in grads.items():
                self.total[name] += g
        self.count += 1

    def take_mean(self) -> dict | None:
        """The mean so far (None when nothing was added), and a fresh start."""
        total, count = self.total, self.count
        self.total, self.count = None, 0
        if total is not None and count > 1:
            for g in total.values():
                g /= count
        return total
