"""Durability on Ray: shard restarts lose nothing and double nothing; save/restore; worker restarts; load.

The reference for every trajectory is the same server run without the fault (the updater math itself is held
to hand-written formulas in test_updaters.py), so equality here means "the fault changed nothing".
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from rayps.server.client import DEFAULT_MAX_IN_FLIGHT
from rayps.updaters import Adam, AdaGrad

pytestmark = pytest.mark.usefixtures("ray_session")


def _server(tmp_path, params, **kwargs):
    from rayps.server import ParameterServer

    kwargs.setdefault("updater", Adam(learning_rate=0.01))
    return ParameterServer(params, checkpoint_dir=tmp_path, recovery_timeout=300, **kwargs)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((24, 4)).astype(np.float32), "b": np.zeros(4, np.float32),
            "h": rng.standard_normal(6)}


def _grads(params, count, seed=1):
    rng = np.random.default_rng(seed)
    return [{n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in params.items()} for _ in range(count)]


REPLAY_BOUND = 2 * (2 * 10 + DEFAULT_MAX_IN_FLIGHT)  # 2 shards, checkpoint_every=10


def _trajectory(tmp_path, kills: dict, pushes=60, checkpoint_every=10, num_shards=2):
    import ray

    params = _params()
    ps = _server(tmp_path, params, num_shards=num_shards, checkpoint_every=checkpoint_every)
    try:
        for i, grads in enumerate(_grads(params, pushes), start=1):
            ps.push(grads)
            if i in kills:
                ray.kill(ps.shard_actors[kills[i]], no_restart=False)
        final, stats = ps.pull(), ps.stats()
        # the replay memory drains once the shards' checkpoints catch up (a slow machine writes them late):
        # clock ticks (no update) bring acknowledgements that carry the newest covered mark
        deadline = time.monotonic() + 120
        while stats["replay_buffered"] > REPLAY_BOUND and time.monotonic() < deadline:
            ps.tick()
            ps.flush()
            time.sleep(0.1)
            stats = ps.stats()
        return final, stats
    finally:
        ps.shutdown()


def test_killed_shards_restore_and_replay_exactly_once(tmp_path):
    """60 pushes; shard 0 killed after push 33, shard 1 after push 47: the same final parameters."""
    expected, clean = _trajectory(tmp_path / "clean", {})
    got, stats = _trajectory(tmp_path / "faulty", {33: 0, 47: 1})
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert clean["restarts"] == 0
    assert stats["restarts"] >= 2
    assert stats["updates_applied"] == 60  # each shard applied every push once: none lost, none doubled
    assert stats["replayed"] > 0
    # replay memory: per shard at most two checkpoint intervals (the covered mark lags one interval while a
    # checkpoint is being written) plus the pushes in flight, once the checkpoints caught up
    assert stats["replay_buffered"] <= REPLAY_BOUND


def test_a_shard_lost_without_checkpoint_dir_is_a_clear_error():
    import ray

    from rayps.server import ParameterServer

    params = _params()
    ps = ParameterServer(params, num_shards=1)
    try:
        ps.push(_grads(params, 1)[0])
        ps.flush()
        ray.kill(ps.shard_actors[0])
        # the kill travels through Ray, not the data plane: the dying process may still answer a push or two
        deadline = time.monotonic() + 60
        with pytest.raises(RuntimeError, match="no checkpoint_dir"):
            while time.monotonic() < deadline:
                ps.push(_grads(params, 1)[0])
                ps.flush()
                time.sleep(0.05)
    finally:
        ps.shutdown()


def test_save_restore_reshard_and_continue_identically(tmp_path):
    """Save, restore into 1, 2 and 3 shards: identical parameters; training continues identically."""
    from rayps.server import ParameterServer

    params = _params()
    grads = _grads(params, 12)
    ps = ParameterServer(params, updater=AdaGrad(learning_rate=0.05), num_shards=2)
    try:
        for g in grads[:6]:
            ps.push(g)
        ps.save(tmp_path / "ckpt")
        saved = ps.pull()
        for g in grads[6:]:
            ps.push(g)
        expected = ps.pull()
    finally:
        ps.shutdown()
    for shards in (1, 2, 3):
        restored = ParameterServer.restore(tmp_path / "ckpt", num_shards=shards)
        try:
            assert restored.layout.num_shards == shards
            for name, value in restored.pull().items():
                np.testing.assert_array_equal(value, saved[name])
            for g in grads[6:]:
                restored.push(g)
            for name, value in restored.pull().items():  # the AdaGrad accumulators came back too
                np.testing.assert_array_equal(value, expected[name])
        finally:
            restored.shutdown()


def test_restore_of_a_missing_path_raises_file_not_found(tmp_path):
    from rayps.server import ParameterServer

    with pytest.raises(FileNotFoundError):
        ParameterServer.restore(tmp_path / "absent")


def test_training_survives_a_shard_killed_every_few_seconds(tmp_path):
    """4 workers on digits, the shards killed in turn every ~1 s: the run completes within a point of a clean run.

    Each shard is killed first from its initial checkpoint, then again only once it has written a checkpoint
    since its last kill: on a slow machine, where a restart and its replay take longer than the interval, the run
    still makes progress instead of killing shards that have not finished recovering (CI failed that way).

    BSP (``sync``): each step applies the mean of one gradient per worker, computed on that step's parameters,
    so a clean and a faulty run take the same steps whatever the timing (up to the order of the float sums);
    under ``async`` the two differ by timing alone by a few points, which would hide a lost or doubled update."""
    import ray

    from rayps.server import ParameterServer
    from rayps.server.checkpoints import format as ckpt
    from rayps.worker import build_model, load_dataset, train

    data = load_dataset("digits")
    model = build_model("mlp", data.num_features, data.num_classes, hidden=(64,))

    def run(kill: bool, directory):
        ps = ParameterServer(model.init_params(0), updater=Adam(learning_rate=0.005), num_shards=2,
                             consistency="sync", num_workers=4, checkpoint_dir=directory, checkpoint_every=8,
                             recovery_timeout=300)
        stop = threading.Event()

        def killer():
            shard, killed_at = 0, [-1, -1]  # per shard: the checkpoint generation it had when last killed
            while not stop.wait(1.0):
                generation = (ckpt.read_pointer(directory, shard) or {}).get("generation", 0)
                if generation > killed_at[shard]:  # it has made progress since its last kill
                    killed_at[shard] = generation
                    ray.kill(ps.shard_actors[shard], no_restart=False)
                    shard = 1 - shard

        thread = threading.Thread(target=killer, daemon=True)
        if kill:
            thread.start()
        try:
            return train(ps, model, data, num_workers=4, epochs=4, batch_size=32), ps.stats()
        finally:
            stop.set()
            if kill:
                thread.join()
            ps.shutdown()

    clean, clean_stats = run(False, tmp_path / "clean")
    faulty, stats = run(True, tmp_path / "faulty")
    assert stats["restarts"] >= 1
    assert stats["updates_applied"] == clean_stats["updates_applied"]  # every step once: none lost, none doubled
    assert abs(faulty["test_accuracy"] - clean["test_accuracy"]) <= 0.01
    assert faulty["test_accuracy"] >= 0.88


def test_a_killed_worker_restarts_and_resumes_its_partition(tmp_path):
    """Kill a worker mid-epoch: Ray restarts it, it resumes from its clock, and every epoch's pushes add up."""
    import ray

    from rayps.server import ParameterServer
    from rayps.worker import WorkerActor, build_model, epoch_batches, load_dataset
    from rayps.worker.epochs import run_epoch_on

    data = load_dataset("digits")
    model = build_model("softmax", data.num_features, data.num_classes)
    ps = ParameterServer(model.init_params(0), updater=Adam(learning_rate=0.01), num_shards=1, num_workers=2)

    def slow_grad_fn(params, batch):  # 30 ms slower per batch (~3 s an epoch): killed mid-epoch even under load
        time.sleep(0.03)
        return model.loss_and_grads(params, *batch)

    workers = [WorkerActor.options(num_cpus=0, max_restarts=2).remote(
        ps, slow_grad_fn, data.x_train, data.y_train, w, 2, 8, 0, 1, 1) for w in range(2)]
    try:
        steps = len(epoch_batches(data.num_train, 2, 0, 0, 0, 8))
        pending = [w.run_epoch.remote(0) for w in workers]
        deadline = time.monotonic() + 120
        while ray.get(workers[1].clock.remote()) < steps // 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(workers[1], no_restart=False)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(pending[1])
        ray.get(pending[0])
        reports, _ = run_epoch_on(workers, 0)  # worker 0 has nothing left to do; worker 1 resumes where it died
        assert reports[0].samples == 0
        assert 0 < reports[1].samples < len(epoch_batches(data.num_train, 2, 1, 0, 0, 8)) * 8
        assert [ps.worker_clock(w) for w in range(2)] == [steps, steps]
        assert ps.stats()["updates_applied"] == 2 * steps  # no batch pushed twice, none skipped
    finally:
        for w in workers:
            ray.kill(w)
        ps.shutdown()


@pytest.mark.parametrize("consistency", ["async", "sync"])
def test_sixteen_writers_five_hundred_pushes_each(consistency):
    """16 concurrent writers x 500 pushes: updates applied equal pushes sent; the object store drains."""
    import ray

    from rayps.server import ParameterServer

    @ray.remote(num_cpus=0)
    class Writer:
        def __init__(self, ps, worker_id):
            self.ps, self.worker_id = ps, worker_id

        def run(self, pushes):
            grad = {"w": np.full(256, 1e-3, np.float32)}
            for _ in range(pushes):
                self.ps.push(grad, worker_id=self.worker_id)
            self.ps.flush()
            return pushes

    def used():
        return ray.available_resources().get("object_store_memory", 0.0)

    writers_count, pushes = 16, 500
    gc.collect()
    baseline = used()
    ps = ParameterServer({"w": np.zeros(256, np.float32)}, updater=Adam(), num_shards=2, consistency=consistency,
                         num_workers=writers_count)
    try:
        writers = [Writer.remote(ps, w) for w in range(writers_count)]
        sent = sum(ray.get([w.run.remote(pushes) for w in writers]))
        stats = ps.stats()
        expected_updates = sent if consistency == "async" else pushes  # sync: one averaged step per clock
        assert stats["updates_applied"] == expected_updates
        assert stats["pushes"] == sent
        for w in writers:
            ray.kill(w)
    finally:
        ps.shutdown()
    deadline = time.monotonic() + 30
    while abs(used() - baseline) > 1 << 20 and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.5)
    assert abs(used() - baseline) <= 1 << 20


def test_a_shard_restarted_after_train_returned_keeps_the_trained_state(tmp_path):
    """``train`` ends with a checkpoint of every shard (``ParameterServer.checkpoint_shards``): the workers, whose
    handles kept their pushes for replay, are gone, so a shard that restarts after the run must find them all in
    its checkpoint. ``checkpoint_every`` is larger than the run, so without that final checkpoint the restarted
    shard would restore its first one (the initial parameters). Reference: the parameters pulled before the kill."""
    import ray

    from rayps.server import ParameterServer
    from rayps.worker import build_model, load_dataset, train

    data = load_dataset("digits")
    model = build_model("mlp", data.num_features, data.num_classes, hidden=(16,))
    ps = ParameterServer(model.init_params(0), updater=Adam(learning_rate=0.005), num_shards=2,
                         checkpoint_dir=tmp_path, checkpoint_every=1_000_000, recovery_timeout=300)
    try:
        train(ps, model, data, num_workers=2, epochs=1, batch_size=32)
        trained = ps.pull()
        assert any(not np.array_equal(trained[n], v) for n, v in model.init_params(0).items())
        before = [ray.get(actor.endpoint.remote(None))[1] for actor in ps.shard_actors]  # the incarnations
        for actor in ps.shard_actors:
            ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + 300
        for actor, incarnation in zip(ps.shard_actors, before):  # until each runs in a new process
            while True:
                try:
                    if ray.get(actor.endpoint.remote(None), timeout=10)[1] != incarnation:
                        break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.GetTimeoutError):
                    pass  # still restarting
                assert time.monotonic() < deadline, "a shard did not restart"
                time.sleep(0.2)
        restarted = ps.pull()
        for name, value in trained.items():
            np.testing.assert_array_equal(restarted[name], value, err_msg=name)
        assert ps.stats()["restarts"] == 2
    finally:
        ps.shutdown()
