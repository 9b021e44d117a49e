"""``WorkerLoop``: one worker's pull -> compute -> push cycle over its data partition — plain logic, no Ray.

DistBelief's intervals: the worker fetches fresh parameters every ``n_fetch`` steps and pushes its gradient
every ``n_push`` steps (the mean of the gradients computed since the last push). With ``n_fetch == n_push ==
1`` a step is one fused ``push_pull`` call per shard: the pull that follows a push rides on the same message.
Otherwise a push returns at once (the client pipelines it) and a pull waits for this worker's pushes to be
applied and then reads, behind whatever other workers pushed meanwhile: slower than a fused ``push_pull`` by a
round trip, but the parameters it returns are fresher, which is what keeps a k-step interval accurate
(fusing the two for ``n_fetch == n_push == 4`` raised the staleness and cost test accuracy on digits, at no
gain in samples/s; figures in BENCHMARKS.md).

Prefetch (``prefetch=True``): a step's server calls (its push, or fused ``push_pull``, and the pull the next
step wants) run on one background thread while the main thread computes the next gradient on the parameters
it already has, so the round trip overlaps the computation (``ray.get`` and NumPy's matmuls release the GIL).
At most one call is in flight per worker: step ``s + 1``'s calls are issued only after step ``s``'s returned,
and its error, if any, is raised then, in the loop. The price is staleness: the gradient of step ``s`` is
computed on the parameters that step ``s - 1`` would have used without prefetch (one step older; the first
step of an epoch is not delayed, since the epoch ends by waiting for its last call). Every gradient is still
pushed once, and the clocks, ``resume`` and ticks are as without prefetch. It pays where a gradient takes about
as long as a round trip and releases the GIL (large matmuls) while the machine has cores to spare; a tiny
model's gradient hides nothing, and on a machine whose cores are already busy the overlap only adds staleness.

Under ``consistency="sync"`` (BSP) that is *delayed* BSP: every step still applies the mean of one gradient per
worker, and a worker still pushes clock ``c + 1`` only after its pull of clock ``c`` returned, but each gradient
is computed on the parameters of the step before (staleness exactly 1) — the barrier wait overlaps the next
gradient instead of idling. Under ``ssp`` the staleness bound gets one more step of local delay.

The server handle (``client``) needs ``pull(worker_id=)``, ``push(grads, worker_id=, epoch=)``, ``flush()``,
``tick(worker_id=, epoch=)`` and ``push_pull(grads, worker_id=, epoch=)``; a ``ParameterServer`` has them, and
so can a test double. Where ``pull``/``push_pull`` take ``copy=False`` (read-only parameters that may be views
of the received buffers) the loop asks for that: gradient functions only read the parameters. The arrays a
gradient function returns are read by the background call while the next gradient is computed, so with
prefetch it must return fresh arrays each call (the built-in models and ``TorchModule`` do).
"""

from __future__ import annotations

import dataclasses

import inspect
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

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
    rows_skipped: int = 0  # a Ray Data split's rows lost with a dead worker (worker/streams.py); 0 otherwise


def epoch_batches(num_samples: int, num_workers: int, worker_id: int, epoch: int, seed: int,
                  batch_size: int) -> list[np.ndarray]:
    """This worker's minibatches (index arrays) for ``epoch``.

    Every worker gets the SAME number of batches, ``ceil(largest partition / batch_size)``, so that BSP steps
    line up; a partition one sample smaller just has one batch one sample smaller.
    """
    parts = partition_indices(num_samples, num_workers, epoch, seed)
    steps = max(1, math.ceil(max(len(p) for p in parts) / batch_size))
    return [b for b in np.array_split(parts[worker_id], steps)]


def accepts_keyword(method, name: str) -> bool:
    """Does ``method`` accept the keyword ``name``?"""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def accepts_copy(method) -> bool:
    """Does ``method`` accept ``copy=`` (the zero-copy pull of ``ParameterServer``)?"""
    return accepts_keyword(method, "copy")


@dataclass
class StepCalls:
    """The server calls of one step: ``push`` is ``"push_pull"``, ``"push"``, ``"tick"`` or None; ``pull``
    asks for fresh parameters after it."""

    push: str | None
    grads: Mapping[str, np.ndarray] | None
    epoch: int
    pull: bool = False
    rows: Mapping | None = None  # row gradients that ride on a ``push_pull`` (``WorkerLoop.step``)


class WorkerLoop:
    """Runs epochs for one worker. ``grad_fn(params, (x, y)) -> (loss, grads)``. See the module docstring.

    The model hook: ``step(batch) -> (loss, grads, rows)`` computes one batch's gradients from ``self.params``;
    ``rows`` (None here) are row gradients ``{table: (ids, grads)}`` sent with the step's fused ``push_pull``, so a
    subclass that pulls a batch's rows itself (``CtrWorkerLoop``) keeps this class's epochs, clocks, resume and
    catch-up. ``pull_names`` (None: all) are the parameters a pull asks for."""

    pull_names: list | None = None

    def __init__(self, client, grad_fn: Callable, x: np.ndarray, y: np.ndarray, worker_id: int,
                 num_workers: int, batch_size: int, seed: int = 0, n_fetch: int = 1, n_push: int = 1,
                 first_epoch: int = 0, prefetch: bool = False):
        for field, value in (("batch_size", batch_size), ("n_fetch", n_fetch), ("n_push", n_push)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id must be in [0, {num_workers}), got {worker_id}")
        if not isinstance(prefetch, bool):
            raise ValueError(f"prefetch must be True or False, got {prefetch!r}")
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
        self.prefetch = prefetch
        self.clock = 0  # pushes sent
        self.steps_done = 0  # steps over all epochs (for the fetch/push intervals)
        self.params: dict | None = None
        self.resume_at: int | None = None  # a restarted worker's first read: ``pull(at_seq=...)``
        self._planned: tuple | None = None  # (epoch, its batches): ``epoch_plan``'s last
        self._pull_options = {"copy": False} if client is not None and accepts_copy(client.pull) else {}
        self._push_pull_options = {"copy": False} if client is not None and accepts_copy(client.push_pull) else {}

    @property
    def fused(self) -> bool:
        """One ``push_pull`` per step (``n_fetch == n_push == 1``)."""
        return self.n_fetch == 1 and self.n_push == 1

    def resume(self) -> None:
        """At a worker's (re)start: push as this worker's identity of the run (``ParameterServer.as_worker``) and
        take its clock from the server — the fewest of its pushes any shard applied — so ``run_epoch`` skips the
        batches whose gradients every shard has and recomputes the rest: a shard that already has one drops it
        (exactly once per shard). The first read after a restart (``at_seq``) gets, in sync mode, the parameters
        those gradients were first computed on, from every shard. A client without identities (a test double):
        the worker's clock as the server counts it."""
        as_worker = getattr(self.client, "as_worker", None)
        if as_worker is None:
            self.clock = int(self.client.worker_clock(self.worker_id))
            return
        self.clock = int(as_worker(self.worker_id))
        self.resume_at = self.clock if self.clock and accepts_keyword(self.client.pull, "at_seq") else None

    def pushes_per_epoch(self, num_batches: int) -> int:
        return num_batches if self.fused else math.ceil(num_batches / self.n_push)

    def step(self, batch) -> tuple[float, Mapping[str, np.ndarray], Mapping | None]:
        """The model hook: ``(loss, grads, rows)`` of one batch on ``self.params`` (see the class docstring)."""
        loss, grads = self.grad_fn(self.params, batch)
        return loss, grads, None

    def _pull(self) -> dict:
        options = dict(self._pull_options)
        if self.pull_names is not None:
            options["names"] = self.pull_names
        if self.resume_at is not None:
            at_seq, self.resume_at = self.resume_at, None
            return self.client.pull(worker_id=self.worker_id, at_seq=at_seq, **options)
        return self.client.pull(worker_id=self.worker_id, **options)

    def _call(self, calls: StepCalls) -> dict | None:
        """Make one step's server calls; the parameters they fetched, if any."""
        params = None
        if calls.push == "push_pull":
            rows = {} if calls.rows is None else {"rows": calls.rows}
            params = self.client.push_pull(calls.grads, worker_id=self.worker_id, epoch=calls.epoch,
                                           **rows, **self._push_pull_options)
        elif calls.push == "push":
            self.client.push(calls.grads, worker_id=self.worker_id, epoch=calls.epoch)
        elif calls.push == "tick":
            self.client.tick(worker_id=self.worker_id, epoch=calls.epoch)
        if calls.pull:
            params = self._pull()
        return params

    def epoch_plan(self, epoch: int, resumed: bool = False) -> tuple[int, Callable[[int], Iterator]]:
        """``(steps, batches)`` of ``epoch``: every worker takes ``steps`` steps; ``batches(skip)`` yields
        ``(step, (x, y) or None)`` for the steps from ``skip`` on (None: an empty step, which only ticks the
        clock). In memory the batches are this worker's partition (``epoch_batches``), so a restarted worker
        (``resumed``) recomputes them and skips the ``skip`` steps it already pushed."""
        if self._planned is None or self._planned[0] != epoch:  # asked twice an epoch: the shuffle drawn once
            self._planned = (epoch, epoch_batches(len(self.x), self.num_workers, self.worker_id, epoch, self.seed,
                                                  self.batch_size))
        batches = self._planned[1]

        def steps_from(skip: int) -> Iterator:
            for i in range(skip, len(batches)):
                ids = batches[i]
                yield i, ((self.x[ids], self.y[ids]) if len(ids) else None)
        return len(batches), steps_from

    def run_epoch(self, epoch: int, should_stop: Callable[[], bool] | None = None,
                  resumed: bool = False) -> EpochReport:
        """One epoch's steps; ``resumed``: this process replaces one that died during this epoch. A restarted
        worker whose clock is behind an earlier epoch (a shard lost pushes the dead process had kept for replay)
        first recomputes that epoch's remaining steps; the report counts them with this epoch's."""
        started = time.perf_counter()
        num_steps, _ = self.epoch_plan(epoch, resumed)
        per_epoch = self.pushes_per_epoch(num_steps)
        behind = self.first_epoch + self.clock // per_epoch if per_epoch else epoch
        samples, losses = 0, []
        for catch_up in range(min(behind, epoch), epoch):
            report = self._run_epoch_steps(catch_up, should_stop, resumed, time.perf_counter())
            samples += report.samples
            losses += [report.mean_loss] * report.steps if report.steps else []
        report = self._run_epoch_steps(epoch, should_stop, resumed, started)
        if samples:
            losses += [report.mean_loss] * report.steps if report.steps else []
            report = dataclasses.replace(report, samples=report.samples + samples, steps=len(losses),
                                         mean_loss=float(np.mean(losses)) if losses else math.nan)
        return report

    def _run_epoch_steps(self, epoch: int, should_stop, resumed: bool, started: float) -> EpochReport:
        num_steps, batches = self.epoch_plan(epoch, resumed)
        fused = self.fused
        per_epoch = self.pushes_per_epoch(num_steps)
        epoch_start_clock = (epoch - self.first_epoch) * per_epoch
        already_pushed = min(max(0, self.clock - epoch_start_clock), per_epoch)
        skip = already_pushed * (1 if fused else self.n_push)  # resumed after a restart: those are done
        self.clock = max(self.clock, epoch_start_clock)
        self.steps_done = (epoch - self.first_epoch) * num_steps + skip
        self.rows_skipped = 0
        losses, samples = [], 0
        pending_grads = GradientSum()
        background = ThreadPoolExecutor(1, thread_name_prefix=f"rayps-prefetch-{self.worker_id}") \
            if self.prefetch else None
        in_flight = None  # the Future of the previous step's calls (prefetch)
        try:
            for i, batch in batches(skip):
                if should_stop is not None and should_stop():
                    break
                if self.params is None or (not fused and not self.prefetch and self.steps_done % self.n_fetch == 0):
                    self.params = self._pull()  # nothing is in flight here (prefetch: only before the first call)
                grads = rows = None
                if batch is not None:  # a partition one sample short may get one empty batch: it only ticks
                    loss, grads, rows = self.step(batch)
                    losses.append(float(loss))
                    samples += len(batch[0])
                self.steps_done += 1
                if fused:
                    calls = StepCalls("tick" if grads is None else "push_pull", grads, epoch, rows=rows)
                else:
                    if rows is not None:
                        raise ValueError("rows: row gradients ride on a fused push_pull; they need n_fetch == "
                                         "n_push == 1")
                    if grads is not None:
                        pending_grads.add(grads)
                    calls = StepCalls(None, None, epoch)
                    if (i + 1) % self.n_push == 0 or i == num_steps - 1:
                        mean = pending_grads.take_mean()
                        calls = StepCalls("tick" if mean is None else "push", mean, epoch)
                    # prefetch: the pull the next step wants goes with this step's calls, in the background
                    calls.pull = self.prefetch and self.steps_done % self.n_fetch == 0
                if calls.push is not None:
                    self.clock += 1
                if background is None:
                    fetched = self._call(calls)
                else:
                    fetched = None if in_flight is None else in_flight.result()  # raises the call's error here
                    in_flight = None
                    if calls.push is not None or calls.pull:
                        in_flight = background.submit(self._call, calls)
                if fetched is not None:
                    self.params = fetched
            if in_flight is not None:
                fetched, in_flight = in_flight.result(), None
                if fetched is not None:
                    self.params = fetched
            if not fused:
                self.client.flush()
        finally:
            if in_flight is not None:  # the loop raised: let the call end before the client is used again
                in_flight.exception()
            if background is not None:
                background.shutdown(wait=True)
        return EpochReport(self.worker_id, epoch, samples, len(losses), float(np.mean(losses)) if losses else math.nan,
                           time.perf_counter() - started, self.clock, self.rows_skipped)


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
