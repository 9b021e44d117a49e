"""WorkerLoop(prefetch=True) (no Ray): a step's server calls run on a background thread while the next gradient
is computed. Every gradient is pushed exactly once, each is computed on parameters at most one step staler than
without prefetch, at most one call is in flight and it really overlaps the computation, a background error is
raised in the loop, a restarted worker resumes where its pushes stopped, delayed BSP keeps its barrier, and
``copy=False`` pulls are asked for where the client has them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rayps.updaters import Sgd
from rayps.worker import WorkerLoop, partition_indices

from test_worker_loop import NUM_FEATURES, FakeServer, RecordingGradFn, _data

TIMEOUT = 10.0  # seconds a test waits on another thread before it fails instead of hanging


def _loop(server=None, num_samples=64, batch_size=8, n_fetch=1, n_push=1, prefetch=True, num_workers=1,
          worker_id=0, grad_fn=None):
    x, y = _data(num_samples)
    server = server or FakeServer({"w": np.zeros(NUM_FEATURES), "b": np.array(0.0)}, Sgd(learning_rate=0.1))
    grad_fn = grad_fn or RecordingGradFn(server)
    loop = WorkerLoop(server, grad_fn, x, y, worker_id, num_workers, batch_size, n_fetch=n_fetch, n_push=n_push,
                      prefetch=prefetch)
    return loop, server, grad_fn


@pytest.mark.parametrize("n_fetch,n_push", [(1, 1), (2, 1), (4, 1), (1, 3), (3, 2), (4, 4)])
def test_every_gradient_is_pushed_exactly_once(n_fetch, n_push):
    num_batches, epochs = 8, 3
    loop, server, grad_fn = _loop(num_samples=num_batches * 8, n_fetch=n_fetch, n_push=n_push)
    for epoch in range(epochs):
        report = loop.run_epoch(epoch)
        assert report.steps == num_batches and report.samples == num_batches * 8
    steps = num_batches * epochs
    assert len(grad_fn.grads) == steps
    if n_fetch == n_push == 1:  # fused: one push_pull per step, carrying that step's gradient
        expected = grad_fn.grads
    else:  # the mean of the gradients since the last push, the last push of an epoch carrying that epoch only
        groups = [list(range(e * num_batches + start, e * num_batches + min(start + n_push, num_batches)))
                  for e in range(epochs) for start in range(0, num_batches, n_push)]
        expected = [{n: np.mean([grad_fn.grads[s][n] for s in group], axis=0) for n in ("w", "b")}
                    for group in groups]
    assert len(server.pushed) == len(expected) == report.clock == server.clocks[0]
    for pushed, want in zip(server.pushed, expected):
        for name in ("w", "b"):
            np.testing.assert_allclose(pushed[name], want[name], rtol=1e-14, atol=1e-16, err_msg=name)
    np.testing.assert_array_equal(np.sort(np.concatenate(grad_fn.batches)),
                                  np.sort(np.tile(np.arange(num_batches * 8), epochs)))


@pytest.mark.parametrize("n_fetch,n_push", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)])
def test_each_gradient_is_at_most_one_step_staler_than_without_prefetch(n_fetch, n_push):
    """One worker, so a version (pushes applied when the parameters were read) fixes what a step computed on.
    With prefetch, step s computes on what step s - 1 would have used without it, or on something fresher."""
    runs = {}
    for prefetch in (False, True):
        loop, server, grad_fn = _loop(num_samples=64, n_fetch=n_fetch, n_push=n_push, prefetch=prefetch)
        for epoch in range(3):
            loop.run_epoch(epoch)
        runs[prefetch] = grad_fn.versions
    plain, prefetched = runs[False], runs[True]
    assert len(plain) == len(prefetched) == 24
    assert prefetched[0] == plain[0] == 0
    for step in range(1, len(plain)):
        assert plain[step - 1] <= prefetched[step] <= plain[step], (step, plain, prefetched)
    if n_fetch == n_push == 1:  # fused: exactly one step behind, except the first step of an epoch (joined before)
        assert prefetched == [plain[s] if s % 8 == 0 else plain[s - 1] for s in range(24)]


class BlockingServer(FakeServer):
    """A push_pull that returns only once the loop has started computing the NEXT gradient: a loop without
    overlap would wait forever (here: TIMEOUT). Counts the calls in flight at once."""

    def __init__(self, *args, steps: int):
        super().__init__(*args)
        self.steps = steps
        self.changed = threading.Condition()
        self.gradients_started = 0
        self.active = 0
        self.most_active = 0
        self.overlapped = 0

    def gradient_started(self):
        with self.changed:
            self.gradients_started += 1
            self.changed.notify_all()

    def push_pull(self, grads, worker_id=0, epoch=0):
        with self.changed:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            step = self.calls.count("push_pull")  # this call carries gradient number `step` (from 0)
            out = super().push_pull(grads, worker_id, epoch)
            with self.changed:
                if step + 1 < self.steps and self.changed.wait_for(lambda: self.gradients_started >= step + 2,
                                                                   TIMEOUT):
                    self.overlapped += 1
            return out
        finally:
            with self.changed:
                self.active -= 1


def test_the_call_overlaps_the_next_gradient_and_only_one_is_in_flight():
    server = BlockingServer({"w": np.zeros(NUM_FEATURES), "b": np.array(0.0)}, Sgd(learning_rate=0.1), steps=8)
    recorder = RecordingGradFn(server)

    def grad_fn(params, batch):
        server.gradient_started()
        return recorder(params, batch)

    loop, _, _ = _loop(server=server, num_samples=64, grad_fn=grad_fn)
    loop.run_epoch(0)
    # 8 steps: the first 7 calls each overlap the next gradient; the last one is waited for at the epoch's end
    assert server.calls.count("push_pull") == 8 and server.overlapped == 7
    assert server.most_active == 1


class FailingServer(FakeServer):
    """Its ``fail_at``-th push or push_pull raises (and changes nothing)."""

    def __init__(self, *args, fail_at: int):
        super().__init__(*args)
        self.fail_at = fail_at
        self.sends = 0

    def _send(self, kind):
        self.sends += 1
        if self.sends == self.fail_at:
            self.calls.append(f"{kind} failed")
            raise ConnectionError(f"shard lost at call {self.fail_at}")

    def push_pull(self, grads, worker_id=0, epoch=0):
        self._send("push_pull")
        return super().push_pull(grads, worker_id, epoch)

    def push(self, grads, worker_id=0, epoch=0):
        self._send("push")
        super().push(grads, worker_id, epoch)


@pytest.mark.parametrize("n_fetch,n_push,kind", [(1, 1, "push_pull"), (2, 1, "push")])
def test_an_error_of_the_background_call_is_raised_in_the_loop(n_fetch, n_push, kind):
    """The third call fails (step 2's); it is raised when step 3 hands its calls over."""
    server = FailingServer({"w": np.zeros(NUM_FEATURES), "b": np.array(0.0)}, Sgd(learning_rate=0.1), fail_at=3)
    loop, _, grad_fn = _loop(server=server, num_samples=64, n_fetch=n_fetch, n_push=n_push)
    with pytest.raises(ConnectionError, match="shard lost at call 3"):
        loop.run_epoch(0)
    # one more gradient was computed meanwhile, and nothing else was sent
    assert server.calls[-1] == f"{kind} failed" or server.calls[-2:] == [f"{kind} failed", "grad"]
    assert len(grad_fn.grads) == 4 and len(server.pushed) == 2


def test_an_error_of_the_gradient_waits_for_the_call_in_flight():
    server = FakeServer({"w": np.zeros(NUM_FEATURES), "b": np.array(0.0)}, Sgd(learning_rate=0.1))
    recorder = RecordingGradFn(server)

    def grad_fn(params, batch):
        if len(recorder.grads) == 3:
            raise ArithmeticError("bad batch")
        return recorder(params, batch)

    loop, _, _ = _loop(server=server, num_samples=64, grad_fn=grad_fn)
    with pytest.raises(ArithmeticError, match="bad batch"):
        loop.run_epoch(0)
    assert len(server.pushed) == 3 and server.clocks == {0: 3}  # the step-3 call finished before the raise


@pytest.mark.parametrize("n_fetch,n_push", [(1, 1), (2, 2), (3, 1)])
def test_a_restarted_worker_resumes_after_its_last_push(n_fetch, n_push):
    """A worker dies mid-epoch (its gradient function raises); a fresh loop on the same server resumes from
    the server's clock: over both, each batch of the partition is pushed exactly once."""
    num_samples, batch_size = 64, 4  # 16 batches
    server = FakeServer({"w": np.zeros(NUM_FEATURES), "b": np.array(0.0)}, Sgd(learning_rate=0.1))
    recorder = RecordingGradFn(server)

    def dies_in_epoch_1(params, batch):
        if len(recorder.grads) == 16 + 5:  # step 5 of epoch 1
            raise SystemError("worker process lost")
        return recorder(params, batch)

    loop, _, _ = _loop(server=server, num_samples=num_samples, batch_size=batch_size, n_fetch=n_fetch,
                       n_push=n_push, grad_fn=dies_in_epoch_1)
    loop.run_epoch(0)
    with pytest.raises(SystemError):
        loop.run_epoch(1)
    pushed_before = server.clocks[0]
    restarted, _, after = _loop(server=server, num_samples=num_samples, batch_size=batch_size, n_fetch=n_fetch,
                                n_push=n_push)
    restarted.resume()
    assert restarted.clock == pushed_before
    restarted.run_epoch(1)
    per_epoch = 16 // n_push
    assert server.clocks[0] == restarted.clock == 2 * per_epoch
    # epoch 1: the steps before the crash that were pushed, plus the resumed ones, cover the partition once
    pushed_steps = (pushed_before - per_epoch) * n_push
    epoch1 = recorder.batches[16:16 + pushed_steps] + after.batches
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch1)),
                                  np.sort(partition_indices(num_samples, 1, 1, 0)[0]))


class CopyFlagServer(FakeServer):
    """A client with ``copy=`` on pull/push_pull, handing out read-only arrays when ``copy=False``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.copy_flags = []

    def _read_only(self, params, copy):
        self.copy_flags.append(copy)
        if not copy:
            for array in params.values():
                array.flags.writeable = False
        return params

    def pull(self, names=None, worker_id=None, *, copy=True):
        return self._read_only(super().pull(names, worker_id), copy)

    def push_pull(self, grads, worker_id=0, epoch=0, *, copy=True):
        return self._read_only(super().push_pull(grads, worker_id, epoch), copy)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("n_fetch", [1, 2])
def test_the_loop_asks_for_read_only_parameters_where_the_client_offers_them(prefetch, n_fetch):
    server = CopyFlagServer({"w": np.zeros(NUM_FEATURES), "b": np.array(0.0)}, Sgd(learning_rate=0.1))
    loop, _, grad_fn = _loop(server=server, num_samples=32, n_fetch=n_fetch, prefetch=prefetch)
    loop.run_epoch(0)
    assert server.copy_flags and set(server.copy_flags) == {False}
    assert len(grad_fn.grads) == 4


class BspServer:
    """Synchronous (BSP) server for several worker threads: the pushes of clock c are averaged and applied as
    step c once every worker sent one; a push_pull of clock c returns the parameters after step c."""

    def __init__(self, num_workers: int, learning_rate: float = 0.1):
        self.num_workers = num_workers
        self.learning_rate = learning_rate
        self.w = np.zeros(NUM_FEATURES)
        self.b = np.array(0.0)
        self.step = 0  # sync steps applied
        self.clocks = [0] * num_workers
        self.sums: dict[int, list] = {}
        self.changed = threading.Condition()
        self.events: list[tuple] = []  # (worker, "start"/"end", clock)
        self.violations: list[str] = []

    def _params(self):
        return {"w": self.w.copy(), "b": self.b.copy()}, self.step

    def pull(self, names=None, worker_id=None):
        with self.changed:
            return self._params()[0]

    def push_pull(self, grads, worker_id=0, epoch=0):
        with self.changed:
            clock = self.clocks[worker_id]
            self.events.append((worker_id, "start", clock))
            if clock > self.step:
                self.violations.append(f"worker {worker_id} pushed clock {clock} before step {clock - 1} returned")
            self.clocks[worker_id] += 1
            self.sums.setdefault(clock, []).append(grads)
            if len(self.sums[clock]) == self.num_workers:
                pushed = self.sums.pop(clock)
                self.w = self.w - self.learning_rate * np.mean([g["w"] for g in pushed], axis=0)
                self.b = self.b - self.learning_rate * np.mean([g["b"] for g in pushed], axis=0)
                self.step += 1
                self.changed.notify_all()
            if not self.changed.wait_for(lambda: self.step > clock, TIMEOUT):
                raise TimeoutError(f"worker {worker_id}: step {clock} never completed")
            self.events.append((worker_id, "end", clock))
            return self._params()[0]

    def tick(self, worker_id=0, epoch=0):
        raise AssertionError("no empty batches in this test")

    def worker_clock(self, worker_id):
        return self.clocks[worker_id]


def test_delayed_bsp_keeps_the_barrier_and_computes_one_step_behind():
    """Prefetch under BSP: a worker never pushes clock c + 1 before its call of clock c returned, every step
    averages one gradient per worker, and (within an epoch) step c's gradients are computed on the parameters
    after step c - 2 — the parameters plain BSP would compute step c - 1 on."""
    num_workers, num_samples, batch_size = 3, 48, 4  # 4 steps per worker per epoch
    server = BspServer(num_workers)
    seen = [[] for _ in range(num_workers)]  # per worker: the sync step its parameters were read at
    x, y = _data(num_samples)

    def grad_fn_for(worker):
        def grad_fn(params, batch):
            features, target = batch[0][:, 1:], batch[1]
            seen[worker].append(server.versions.get(id(params["w"]), None))
            residual = features @ params["w"] + params["b"] - target
            return float(0.5 * np.mean(residual ** 2)), {"w": features.T @ residual / len(target),
                                                           "b": np.array(residual.mean())}
        return grad_fn

    server.versions = {}
    original = server._params

    def tracked():
        params, step = original()
        server.versions[id(params["w"])] = step
        return params, step
    server._params = tracked

    loops = [WorkerLoop(server, grad_fn_for(w), x, y, w, num_workers, batch_size, prefetch=True)
             for w in range(num_workers)]
    errors = []

    def run(loop):
        try:
            for epoch in range(2):
                loop.run_epoch(epoch)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(loop,)) for loop in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert not server.violations, server.violations
    assert server.step == 2 * 4 and all(loop.clock == 8 for loop in loops)
    for worker in range(num_workers):  # epoch e's steps: first on fresh params, then one step behind
        assert seen[worker] == [0, 0, 1, 2, 4, 4, 5, 6], seen[worker]
        ends = [c for w, kind, c in server.events if w == worker and kind == "end"]
        starts = [c for w, kind, c in server.events if w == worker and kind == "start"]
        assert starts == ends == list(range(8))
