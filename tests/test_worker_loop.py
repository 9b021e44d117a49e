"""WorkerLoop (no Ray) against an in-process fake server: DistBelief's n_fetch/n_push intervals, the pushed
gradient is the mean of the accumulated ones, each worker visits its partition exactly once per epoch, and
epoch_batches lines the workers up (same batch count, disjoint partitions that cover the data)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rayps.updaters import ParameterUpdater, Sgd
from rayps.worker import WorkerLoop, epoch_batches, partition_indices

NUM_FEATURES = 3


class FakeServer:
    """The client interface WorkerLoop needs, over a local ParameterUpdater; records every call.

    Every dict it hands out is a fresh copy whose version (updates applied when it was read) is remembered,
    so a gradient function can tell which parameters it was given.
    """

    def __init__(self, params, updater):
        self.params = {n: a.copy() for n, a in params.items()}
        self.updater = ParameterUpdater(updater, list(params))
        self.state = self.updater.init(self.params)
        self.version = 0
        self.calls: list[str] = []
        self.pushed: list[dict] = []
        self.clocks: dict[int, int] = {}
        self._served: dict[int, tuple[dict, int]] = {}

    def _serve(self):
        copy = {n: a.copy() for n, a in self.params.items()}
        self._served[id(copy)] = (copy, self.version)
        return copy

    def version_of(self, params) -> int:
        return self._served[id(params)][1]

    def _apply(self, grads, worker_id):
        self.pushed.append({n: np.array(g, copy=True) for n, g in grads.items()})
        self.updater.apply(self.params, grads, self.state, self.version)
        self.version += 1
        self.clocks[worker_id] = self.clocks.get(worker_id, 0) + 1

    def pull(self, names=None, worker_id=None):
        self.calls.append("pull")
        return self._serve()

    def push(self, grads, worker_id=0, epoch=0):
        self.calls.append("push")
        self._apply(grads, worker_id)

    def flush(self):
        self.calls.append("flush")

    def push_pull(self, grads, worker_id=0, epoch=0):
        self.calls.append("push_pull")
        self._apply(grads, worker_id)
        return self._serve()

    def tick(self, worker_id=0, epoch=0):
        self.calls.append("tick")
        self.clocks[worker_id] = self.clocks.get(worker_id, 0) + 1

    def worker_clock(self, worker_id):
        return self.clocks.get(worker_id, 0)


class RecordingGradFn:
    """Least squares on ``x[:, 1:]``; column 0 of ``x`` holds the sample id. Records ids, versions, grads."""

    def __init__(self, server):
        self.server = server
        self.batches: list[np.ndarray] = []
        self.versions: list[int] = []
        self.grads: list[dict] = []  # copies of what was returned
        self.returned: list[dict] = []  # what was returned, to check nobody wrote into it
        self.losses: list[float] = []

    def __call__(self, params, batch):
        x, y = batch
        self.server.calls.append("grad")
        self.batches.append(x[:, 0].astype(np.int64))
        self.versions.append(self.server.version_of(params))
        features = x[:, 1:]
        residual = features @ params["w"] + params["b"] - y
        loss = float(0.5 * np.mean(residual ** 2))
        grads = {"w": features.T @ residual / len(y), "b": np.array(residual.mean())}
        self.grads.append({n: g.copy() for n, g in grads.items()})
        self.returned.append(grads)
        self.losses.append(loss)
        return loss, grads


def _data(num_samples, seed=0):
    rng = np.random.default_rng(seed)
    x = np.empty((num_samples, 1 + NUM_FEATURES))
    x[:, 0] = np.arange(num_samples)
    x[:, 1:] = rng.normal(size=(num_samples, NUM_FEATURES))
    y = x[:, 1:] @ np.array([1.0, -2.0, 0.5]) + 0.3
    return x, y


def _loop(num_samples=64, num_workers=1, worker_id=0, batch_size=8, n_fetch=1, n_push=1, seed=0):
    x, y = _data(num_samples)
    server = FakeServer({"w": np.zeros(NUM_FEATURES), "b": np.array(0.0)}, Sgd(learning_rate=0.1))
    grad_fn = RecordingGradFn(server)
    loop = WorkerLoop(server, grad_fn, x, y, worker_id, num_workers, batch_size, seed, n_fetch, n_push)
    return loop, server, grad_fn


def _api(calls):
    """The server calls alone (the gradient function logs ``"grad"`` into the same list)."""
    return [c for c in calls if c != "grad"]


def _steps_before(calls, kind):
    """For each call of ``kind``, how many gradient steps came before it."""
    steps, out = 0, []
    for call in calls:
        if call == "grad":
            steps += 1
        elif call == kind:
            out.append(steps)
    return out


def test_fused_step_pulls_once_then_one_push_pull_per_batch():
    loop, server, grad_fn = _loop(num_samples=40, batch_size=8)
    for epoch in range(2):
        report = loop.run_epoch(epoch)
        assert report.steps == 5 and report.samples == 40 and report.clock == 5 * (epoch + 1)
    assert _api(server.calls) == ["pull"] + ["push_pull"] * 10
    # every gradient is computed on the parameters that include every earlier push (nothing stale)
    assert grad_fn.versions == list(range(10))
    assert server.clocks == {0: 10}


@pytest.mark.parametrize("n_fetch,n_push", [(2, 1), (1, 3), (3, 2), (2, 4), (4, 4)])
def test_pull_every_n_fetch_steps_and_push_every_n_push_steps(n_fetch, n_push):
    num_batches = 8
    loop, server, grad_fn = _loop(num_samples=num_batches * 4, batch_size=4, n_fetch=n_fetch, n_push=n_push)
    report = loop.run_epoch(0)
    assert report.steps == num_batches and report.samples == num_batches * 4

    # the expected call sequence, written out step by step
    expected = []
    for step in range(num_batches):
        if step % n_fetch == 0:
            expected.append("pull")
        if (step + 1) % n_push == 0 or step == num_batches - 1:
            expected.append("push")
    expected.append("flush")
    assert _api(server.calls) == expected
    assert server.calls.count("pull") == math.ceil(num_batches / n_fetch)
    assert server.calls.count("push") == math.ceil(num_batches / n_push) == report.clock

    # a step computes on what the last pull returned
    versions_at_pull = []
    pushes = 0
    for call in expected:
        if call == "pull":
            versions_at_pull.append(pushes)
        elif call == "push":
            pushes += 1
    assert grad_fn.versions == [versions_at_pull[step // n_fetch] for step in range(num_batches)]


@pytest.mark.parametrize("n_push", [2, 3, 5])
def test_each_push_is_the_mean_of_the_gradients_since_the_last_push(n_push):
    loop, server, grad_fn = _loop(num_samples=56, batch_size=8, n_fetch=2, n_push=n_push)  # 7 batches
    loop.run_epoch(0)
    groups = [list(range(start, min(start + n_push, 7))) for start in range(0, 7, n_push)]
    assert len(server.pushed) == len(groups)
    for pushed, steps in zip(server.pushed, groups):
        for name in ("w", "b"):
            expected = np.mean([grad_fn.grads[s][name] for s in steps], axis=0)
            np.testing.assert_allclose(pushed[name], expected, rtol=1e-14, atol=1e-16, err_msg=name)
    # the accumulation never writes into the arrays the gradient function returned
    for returned, copy in zip(grad_fn.returned, grad_fn.grads):
        for name in ("w", "b"):
            np.testing.assert_array_equal(returned[name], copy[name])


@pytest.mark.parametrize("n_fetch,n_push,batch_size", [
    (1, 1, 8), (3, 2, 8), (2, 4, 8), (2, 2, 8), (3, 3, 8),
    (2, 3, 8),
])
def test_intervals_hold_across_epoch_boundaries(n_fetch, n_push, batch_size):
    """Over several epochs no two consecutive pulls are more than n_fetch steps apart, and every push carries
    the gradients of one epoch only (the last push of an epoch may carry fewer than n_push)."""
    loop, server, grad_fn = _loop(num_samples=60, batch_size=batch_size, n_fetch=n_fetch, n_push=n_push)  # 8 batches
    epochs = 3
    per_epoch = []
    for epoch in range(epochs):
        before = len(server.pushed)
        loop.run_epoch(epoch)
        per_epoch.append(len(server.pushed) - before)
    steps = len(grad_fn.versions)
    assert steps == 8 * epochs
    pull_steps = sorted(_steps_before(server.calls, "pull") + _steps_before(server.calls, "push_pull"))
    gaps = np.diff(pull_steps + [steps])
    assert pull_steps[0] == 0 and gaps.max() <= n_fetch, pull_steps
    push_steps = sorted(_steps_before(server.calls, "push") + _steps_before(server.calls, "push_pull"))
    epoch_ends = [8 * (e + 1) for e in range(epochs)]
    assert set(epoch_ends) <= set(push_steps)  # the last push of an epoch carries only that epoch
    assert max(np.diff([0] + push_steps)) <= n_push
    assert per_epoch == [math.ceil(8 / n_push)] * epochs


def test_each_worker_visits_its_partition_exactly_once_per_epoch():
    num_samples, num_workers, seed = 53, 3, 4
    loops = [_loop(num_samples, num_workers, w, batch_size=5, n_fetch=2, n_push=2, seed=seed)
             for w in range(num_workers)]
    for epoch in range(3):
        parts = partition_indices(num_samples, num_workers, epoch, seed)
        seen_this_epoch = []
        for worker, (loop, server, grad_fn) in enumerate(loops):
            done = len(grad_fn.batches)
            report = loop.run_epoch(epoch)
            visited = np.concatenate(grad_fn.batches[done:])
            np.testing.assert_array_equal(np.sort(visited), np.sort(parts[worker]))  # once each, nothing else
            assert report.samples == len(parts[worker])
            np.testing.assert_allclose(report.mean_loss, np.mean(grad_fn.losses[done:]))
            seen_this_epoch.append(visited)
        everything = np.concatenate(seen_this_epoch)
        np.testing.assert_array_equal(np.sort(everything), np.arange(num_samples))


@pytest.mark.parametrize("num_samples,num_workers,batch_size", [
    (100, 4, 8), (101, 4, 8), (1437, 4, 32), (10, 3, 4), (7, 7, 2), (53, 5, 3), (9, 2, 2),
    (9, 2, 1),
])
@pytest.mark.parametrize("epoch", [0, 1])
def test_epoch_batches_line_workers_up_on_disjoint_covering_partitions(num_samples, num_workers, batch_size, epoch):
    seed = 3
    per_worker = [epoch_batches(num_samples, num_workers, w, epoch, seed, batch_size) for w in range(num_workers)]
    counts = {len(batches) for batches in per_worker}
    assert counts == {math.ceil(math.ceil(num_samples / num_workers) / batch_size)}  # same step count for BSP
    everything = np.concatenate([b for batches in per_worker for b in batches])
    np.testing.assert_array_equal(np.sort(everything), np.arange(num_samples))  # disjoint and covering
    parts = partition_indices(num_samples, num_workers, epoch, seed)
    for worker, batches in enumerate(per_worker):
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.sort(parts[worker]))
        # a partition one sample short of the largest may get one EMPTY batch (batch_size 1): its step only
        # ticks the worker's clock (WorkerLoop), so BSP steps still line up
        assert sum(1 for batch in batches if len(batch) == 0) <= 1
        for batch in batches:
            assert len(batch) <= batch_size


def test_should_stop_ends_the_epoch_early():
    loop, server, grad_fn = _loop(num_samples=40, batch_size=8)
    stop_after = 2
    report = loop.run_epoch(0, should_stop=lambda: len(grad_fn.versions) >= stop_after)
    assert report.steps == stop_after and server.clocks == {0: stop_after}


@pytest.mark.parametrize("field", ["batch_size", "n_fetch", "n_push"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_intervals_are_rejected_naming_the_field(field, value):
    x, y = _data(8)
    kwargs = dict(batch_size=2, n_fetch=1, n_push=1)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        WorkerLoop(None, lambda p, b: None, x, y, 0, 1, **kwargs)


@pytest.mark.parametrize("n_fetch,n_push", [(1, 1), (2, 2)])
def test_an_empty_batch_ticks_the_clock_and_computes_nothing(n_fetch, n_push):
    """9 samples, 2 workers, batch size 1: worker partitions of 5 and 4, so the short one gets an empty batch.
    Both workers still end the epoch on the same clock (BSP stays aligned), and no gradient is computed
    for the empty batch."""
    reports = []
    for worker in range(2):
        x, y = _data(9)
        server = FakeServer({"w": np.zeros(NUM_FEATURES), "b": np.array(0.0)}, Sgd(learning_rate=0.01))
        grad_fn = RecordingGradFn(server)
        loop = WorkerLoop(server, grad_fn, x, y, worker, 2, batch_size=1, seed=3, n_fetch=n_fetch, n_push=n_push)
        reports.append((loop.run_epoch(0), server, grad_fn))
    parts = partition_indices(9, 2, 0, 3)
    short = min(range(2), key=lambda w: len(parts[w]))
    clocks = [server.clocks[w] for w, (_, server, _) in enumerate(reports)]
    assert clocks[0] == clocks[1]
    assert "tick" in reports[short][1].calls
    assert reports[short][0].samples == len(parts[short]) and len(reports[short][2].batches) == len(parts[short])
