"""A worker that finished its epoch still replays to a shard that restarts afterwards (``catch_up``).

A client notices a shard's restart only while it sends or waits. A worker done with its epoch sends nothing
until the next one, so without ``catch_up`` a shard that restarts in between lacks that worker's last pushes,
and in sync mode the workers still running wait for them forever (the chaos soak found it: a shard killed at
an epoch's last step). The references: a server that got the same pushes and was never killed (bit for bit),
and for the driver a plain record of which worker was asked when.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray

pytestmark = pytest.mark.usefixtures("ray_session")


def _pushes(ps, grads):
    for g in grads:
        ps.push({"w": g}, worker_id=0)
    ps.flush()


def _restart(ps, shard: int) -> None:
    before = ray.get(ps.shard_actors[shard].ping.remote())
    ray.kill(ps.shard_actors[shard], no_restart=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            if ray.get(ps.shard_actors[shard].ping.remote(), timeout=10) != before:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the shard did not restart"
        time.sleep(0.1)


def test_an_idle_handle_replays_to_a_shard_that_restarted_and_ends_as_if_it_had_not(tmp_path):
    from rayps.server import ParameterServer
    from rayps.updaters import Adam

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=64).astype(np.float32)
    grads = [rng.normal(size=64).astype(np.float32) for _ in range(5)]
    options = dict(updater=Adam(learning_rate=0.01), num_shards=2, cpus_per_shard=0, checkpoint_every=1000)
    clean = ParameterServer({"w": w0}, **options)
    try:
        _pushes(clean, grads)
        expected = clean.pull()["w"]
    finally:
        clean.shutdown()
    ps = ParameterServer({"w": w0}, checkpoint_dir=str(tmp_path / "c"), **options)
    try:
        _pushes(ps, grads)
        assert ps.catch_up() == 0  # nothing restarted: nothing to do
        _restart(ps, 1)  # back at its first checkpoint: none of the 5 pushes
        assert ray.get(ps.shard_actors[1].stats.remote())["clocks"].get(0, 0) == 0
        assert ps.catch_up() == 1
        assert ray.get(ps.shard_actors[1].stats.remote())["clocks"] == {0: 5}
        assert ps.stats()["recovery_causes"] == {"idle": 1}
        np.testing.assert_array_equal(ps.pull()["w"], expected)
    finally:
        ps.shutdown()


@ray.remote(num_cpus=0, max_concurrency=4, max_restarts=1)
class _FakeWorker:
    """Worker 0 finishes at once; worker 1 runs until ``wait_for`` exists (or 60 s). Each records in
    ``log.<index>`` whether it was asked to catch up while running, and each run in ``runs.<index>``; with
    ``die_once`` worker 0's first catch-up kills its process."""

    def __init__(self, index: int, log: str, wait_for: str, die_once: bool):
        self.index, self.log, self.wait_for, self.die_once, self.running = index, log, wait_for, die_once, False

    def run_epoch(self, epoch, resumed=False, data=None):
        self.running = True
        with open(f"{self.log}.runs.{self.index}", "a") as handle:
            handle.write("run\n")
        try:
            deadline = time.monotonic() + (0 if self.index == 0 else 60)
            while time.monotonic() < deadline and not os.path.exists(self.wait_for):
                time.sleep(0.05)
            return f"worker {self.index}, run {len(open(f'{self.log}.runs.{self.index}').read().split())}"
        finally:
            self.running = False

    def catch_up(self):
        with open(f"{self.log}.{self.index}", "a") as handle:
            handle.write("running\n" if self.running else "idle\n")
        if self.die_once and not os.path.exists(f"{self.log}.died"):
            open(f"{self.log}.died", "w").close()
            os._exit(1)
        return 0


def test_the_driver_asks_only_the_workers_that_finished_to_catch_up_while_others_run(tmp_path):
    from rayps.worker.epochs import IDLE_CHECK_SECONDS, run_epoch_on

    log = str(tmp_path / "asked")
    workers = [_FakeWorker.remote(i, log, f"{log}.0", False) for i in range(2)]
    reports, restarts = run_epoch_on(workers, 0)
    assert reports == ["worker 0, run 1", "worker 1, run 1"] and restarts == 0
    with open(f"{log}.0") as handle:  # worker 1 ended only because worker 0 was asked, idle
        assert set(handle.read().split()) == {"idle"}
    assert not os.path.exists(f"{log}.1")  # never asked while it ran
    assert IDLE_CHECK_SECONDS <= 5


def test_a_worker_that_dies_catching_up_runs_the_epoch_again(tmp_path):
    """Its restarted process recomputes what the shards lack (the replay it died in): one restart counted,
    the report of its finished run kept."""
    from rayps.worker.epochs import run_epoch_on

    log = str(tmp_path / "asked")
    workers = [_FakeWorker.remote(i, log, f"{log}.died", True) for i in range(2)]  # 1 runs until 0 died
    reports, restarts = run_epoch_on(workers, 0)
    assert restarts == 1
    assert reports[0] == "worker 0, run 1"
    with open(f"{log}.runs.0") as handle:
        assert handle.read().split() == ["run", "run"]  # asked again after it died catching up


def test_checkpoint_now_names_a_failed_write_and_a_write_that_never_ends_and_loses_nothing(tmp_path):
    """What a restarted worker asks of every shard (``as_worker``): a checkpoint covering what the shard applied.
    Its checkpoint directory replaced by a file: a RuntimeError naming the directory, and the shard serves on
    with its state intact; a write already in flight that never ends: a RuntimeError after ``checkpoint_wait``;
    once the directory is back, the checkpoint covers every push."""
    import shutil

    from rayps.server import ParameterServer
    from rayps.updaters import Sgd

    directory = tmp_path / "c"
    ps = ParameterServer({"w": np.zeros(8, np.float32)}, updater=Sgd(learning_rate=1.0),
                         checkpoint_dir=str(directory), checkpoint_every=1000, cpus_per_shard=0)
    try:
        for _ in range(3):
            ps.push({"w": np.ones(8, np.float32)})
        ps.flush()
        actor = ps.shard_actors[0]
        shutil.rmtree(directory)
        directory.write_text("not a directory")  # every write below it fails, even as root
        with pytest.raises(RuntimeError, match="could not be written to"):
            ray.get(actor.checkpoint_now.remote(ps.client_id))
        np.testing.assert_array_equal(ps.pull()["w"], np.full(8, -3.0, np.float32))

        ray.get(actor.__ray_call__.remote(lambda shard: setattr(shard, "checkpoint_wait", 0.2)
                                          or setattr(shard, "checkpoint_writing", True)))
        with pytest.raises(RuntimeError, match="did not finish within 0.2s"):
            ray.get(actor.checkpoint_now.remote(ps.client_id))
        ray.get(actor.__ray_call__.remote(lambda shard: setattr(shard, "checkpoint_writing", False)))

        directory.unlink()
        directory.mkdir()
        assert ray.get(actor.checkpoint_now.remote(ps.client_id)) == 3
        assert ray.get(actor.stats.remote())["uncovered"] == {ps.client_id: 0}
    finally:
        ps.shutdown()


def test_a_worker_built_without_a_client_needs_data_with_its_first_epoch():
    """``WorkerActor(None, ...)`` takes its server handle and arrays from the first ``run_epoch(..., data=...)``
    (worker/actor.py); asked without it, a ValueError that names ``data``; a
    worker that was never started has nothing to catch up."""
    from rayps.worker import WorkerActor

    worker = WorkerActor.options(num_cpus=0).remote(None, lambda params, batch: (0.0, {}), None, None, 0, 1, 32, 0,
                                                    1, 1)
    try:
        with pytest.raises(ValueError, match="data: this worker was built without a client"):
            ray.get(worker.run_epoch.remote(0))
        assert ray.get(worker.catch_up.remote()) == 0
        assert ray.get(worker.clock.remote()) == 0
    finally:
        ray.kill(worker)
