"""Exactly-once across worker crashes on multi-shard servers, with deterministic fault points (server/faults.py).

Each run trains a softmax model on digits with 2 workers for 2 epochs through ``rayps.worker.train`` while a
``FaultPlan`` makes one process die (``os._exit``) at a chosen point, once: a worker after sending a push to k of
n shards, after sending it everywhere but before the acknowledgements, while replaying to a restarted shard, or a
shard between writing a checkpoint's blob and its pointer. Ray restarts the process. The references:

* every shard's clock of every worker equals the steps that worker has (nothing lost, nothing applied twice:
  a plain count), and every shard applied exactly the updates a clean run applies;
* BSP (``sync``): the final parameters are bit-identical to a clean run's (two clean runs are; 2 workers, so the
  order of a step's sum does not matter), and no read had to fall back to newer parameters
  (``resume_reads_inexact == 0``);
* async: the same counts, and the accuracy of a clean run within noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server.faults import Fault, FaultPlan
from rayps.updaters import Adam

pytestmark = pytest.mark.usefixtures("ray_session")
EPOCHS, BATCH, WORKERS = 2, 32, 2


@pytest.fixture(scope="module")
def digits():
    from rayps.worker import Dataset, build_model, epoch_batches, load_dataset

    full = load_dataset("digits")
    data = Dataset.from_arrays(full.x_train[:512], full.y_train[:512], full.x_test, full.y_test)
    model = build_model("softmax", data.num_features, data.num_classes)
    steps = len(epoch_batches(data.num_train, WORKERS, 0, 0, 0, BATCH))
    assert all(len(epoch_batches(data.num_train, WORKERS, w, 0, 0, BATCH)) == steps for w in range(WORKERS))
    return data, model, steps * EPOCHS


def _run(digits, consistency, num_shards, faults=(), checkpoint_dir=None, checkpoint_every=10):
    from rayps.server import ParameterServer
    from rayps.worker import train

    data, model, _ = digits
    ps = ParameterServer(model.init_params(0), updater=Adam(learning_rate=0.01), num_shards=num_shards,
                         num_workers=WORKERS, consistency=consistency, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, recovery_timeout=300, cpus_per_shard=0)
    try:
        if faults:
            ps.inject_faults(FaultPlan(faults))
        result = train(ps, model, data, num_workers=WORKERS, epochs=EPOCHS, batch_size=BATCH, seed=0,
                       max_worker_restarts=3)
        return ps.pull(), ps.stats(), result
    finally:
        ps.shutdown()


_clean_runs: dict = {}


def _clean(digits, consistency, num_shards):
    key = (consistency, num_shards)
    if key not in _clean_runs:
        _clean_runs[key] = _run(digits, consistency, num_shards)
    return _clean_runs[key]


def _assert_exactly_once(digits, stats, clean_stats, consistency):
    steps = digits[2]
    for shard in stats["shards"]:
        assert shard["clocks"] == {w: steps for w in range(WORKERS)}, shard["shard"]
        expected = steps if consistency == "sync" else WORKERS * steps
        assert shard["updates_applied"] == expected, shard["shard"]
    assert stats["updates_applied"] == clean_stats["updates_applied"]


def _assert_outcome(digits, consistency, num_shards, got, stats, result, exact=True):
    expected, clean_stats, clean_result = _clean(digits, consistency, num_shards)
    _assert_exactly_once(digits, stats, clean_stats, consistency)
    if consistency == "sync" and exact:
        assert stats["resume_reads_inexact"] == 0
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    else:  # async interleavings alone move this short run (512 samples, 2 epochs) by a few points
        assert abs(result["test_accuracy"] - clean_result["test_accuracy"]) <= 0.1


@pytest.mark.parametrize("consistency,num_shards,sent", [("sync", 2, 1), ("async", 2, 1), ("sync", 3, 2),
                                                          ("async", 3, 1)],
                         ids=["sync-1-of-2", "async-1-of-2", "sync-2-of-3", "async-1-of-3"])
def test_a_worker_dies_after_sending_to_some_shards(digits, tmp_path, consistency, num_shards, sent):
    """The restarted worker resumes at the fewest pushes any shard has, recomputes that step (in BSP on the
    parameters it first used, which a shard that already moved on still keeps), and the shards that have it
    drop it: per-shard clocks exact, BSP bit-identical."""
    marker = tmp_path / "fired"
    got, stats, result = _run(digits, consistency, num_shards,
                              [Fault("client.sent", str(marker), worker=1, seq=5, sent=sent)])
    assert marker.exists() and result["worker_restarts"] >= 1
    assert stats["duplicates_dropped"] >= sent  # the shards that had the push dropped its recomputation
    _assert_outcome(digits, consistency, num_shards, got, stats, result)


@pytest.mark.parametrize("consistency,num_shards", [("sync", 2), ("sync", 3), ("async", 2), ("async", 3)])
def test_a_worker_dies_after_sending_everywhere_before_the_acknowledgement(digits, tmp_path, consistency,
                                                                          num_shards):
    marker = tmp_path / "fired"
    got, stats, result = _run(digits, consistency, num_shards,
                              [Fault("client.before_ack", str(marker), worker=0, seq=11)])
    assert marker.exists() and result["worker_restarts"] >= 1
    _assert_outcome(digits, consistency, num_shards, got, stats, result)


@pytest.mark.parametrize("consistency,num_shards", [("sync", 2), ("sync", 3), ("async", 2), ("async", 3)])
def test_a_shard_dies_between_a_checkpoints_blob_and_its_pointer(digits, tmp_path, consistency, num_shards):
    """The half-written checkpoint is never read (its pointer was not written): the shard restores the one
    before and the workers replay what it lacks."""
    marker = tmp_path / "fired"
    got, stats, result = _run(digits, consistency, num_shards,
                              [Fault("shard.checkpoint_blob", str(marker), shard=1)], checkpoint_dir=tmp_path / "c")
    assert marker.exists() and stats["restarts"] >= 1 and stats["replayed"] >= 1
    _assert_outcome(digits, consistency, num_shards, got, stats, result)


@pytest.mark.parametrize("consistency", ["sync", "async"])
def test_a_shard_that_dies_in_the_final_checkpoint_gets_the_runs_last_pushes_from_the_workers(digits, tmp_path,
                                                                                               consistency):
    """No periodic checkpoint in this run (checkpoint_every is larger than it), so the first one shard 1 writes
    is train()'s last, taken while the workers (whose replay buffers end with them) are idle: it dies there and
    restores its initial checkpoint. The workers replay everything to it and the checkpoint is taken again
    (``checkpoint_at_end``); without that the run's pushes to shard 1 were lost (its clocks empty)."""
    marker = tmp_path / "fired"
    got, stats, result = _run(digits, consistency, 2, [Fault("shard.checkpoint_blob", str(marker), shard=1)],
                              checkpoint_dir=tmp_path / "c", checkpoint_every=100_000)
    assert marker.exists() and stats["restarts"] >= 1 and stats["replayed"] >= 1
    _assert_outcome(digits, consistency, 2, got, stats, result)


@pytest.mark.parametrize("consistency,num_shards", [("sync", 2), ("sync", 3), ("async", 2), ("async", 3)])
def test_a_worker_dies_while_replaying_to_a_restarted_shard(digits, tmp_path, consistency, num_shards):
    """Shard 1 dies mid-checkpoint, then worker 1 dies after replaying one push to it: the pushes it had kept
    for replay die with it, so the restarted worker recomputes them (steps of an earlier epoch too). Exactly
    once per shard per clock; in BSP bit-identical: the shards that moved on kept every step back to the
    worker's low water (what every shard's checkpoint held), so each recomputed gradient sees its step's own
    parameters, not newer ones (server/sync_steps.py)."""
    shard_died, worker_died = tmp_path / "shard-died", tmp_path / "worker-died"
    got, stats, result = _run(digits, consistency, num_shards,
                              [Fault("shard.checkpoint_blob", str(shard_died), shard=1),
                               Fault("client.replayed", str(worker_died), worker=1, shard=1, count=1)],
                              checkpoint_dir=tmp_path / "c")
    assert shard_died.exists() and worker_died.exists() and result["worker_restarts"] >= 1
    assert stats["replayed"] >= 1
    _assert_outcome(digits, consistency, num_shards, got, stats, result)


def test_a_shard_restarted_after_a_worker_restart_needs_none_of_the_dead_processes_pushes(tmp_path):
    """Worker 0 dies after push 12 (the shards' last checkpoint covers 10), then shard 1 is killed at clock 16
    of 32: the pushes 11-12 died with worker 0's replay buffer, so the restarted worker has every shard
    checkpoint what it applied before it goes on (``ShardActor.checkpoint_now``); shard 1 restores that and the
    run ends exactly once and bit-identical to a clean one (without it, shard 1 waited for 11-12 forever)."""
    import threading
    import time

    import ray

    from rayps.server import ParameterServer
    from rayps.worker import Dataset, build_model, epoch_batches, load_dataset, train

    full = load_dataset("digits")
    data = Dataset.from_arrays(full.x_train[:1024], full.y_train[:1024], full.x_test, full.y_test)
    model = build_model("softmax", data.num_features, data.num_classes)
    steps = len(epoch_batches(data.num_train, WORKERS, 0, 0, 0, BATCH)) * EPOCHS
    assert steps == 32
    marker = tmp_path / "fired"

    def run(faults, checkpoint_dir):
        ps = ParameterServer(model.init_params(0), updater=Adam(learning_rate=0.01), num_shards=2,
                             num_workers=WORKERS, consistency="sync", checkpoint_dir=checkpoint_dir,
                             checkpoint_every=10, recovery_timeout=300, cpus_per_shard=0)
        killed = []

        def killer():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    clocks = ray.get(ps.shard_actors[1].stats.remote(), timeout=30)["clocks"]
                except Exception:  # noqa: BLE001 - a shard being restarted: look again
                    clocks = {}
                if marker.exists() and min(clocks.values() or [0]) >= 16:
                    ray.kill(ps.shard_actors[1], no_restart=False)
                    killed.append(True)
                    return
                time.sleep(0.01)

        try:
            if faults:
                ps.inject_faults(FaultPlan(faults))
                threading.Thread(target=killer, daemon=True).start()
            result = train(ps, model, data, num_workers=WORKERS, epochs=EPOCHS, batch_size=BATCH, seed=0,
                           max_worker_restarts=3)
            return ps.pull(), ps.stats(), result, killed
        finally:
            ps.shutdown()

    expected, clean_stats, _, _ = run([], None)
    got, stats, result, killed = run([Fault("client.before_ack", str(marker), worker=0, seq=12)], tmp_path / "c")
    assert marker.exists() and killed and result["worker_restarts"] >= 1
    for shard in stats["shards"]:
        assert shard["clocks"] == {w: steps for w in range(WORKERS)}, shard["shard"]
        assert shard["updates_applied"] == steps
    assert stats["restarts"] >= 1
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_fault_plans_are_checked():
    with pytest.raises(ValueError, match="point must be one of"):
        Fault("client.nowhere", "/tmp/x")
    with pytest.raises(ValueError, match="marker must be a file path"):
        Fault("client.sent", "")
    with pytest.raises(TypeError, match="a FaultPlan holds Fault objects"):
        FaultPlan(["client.sent"])
    fault = Fault("client.sent", "/tmp/x", worker=1, sent=2)
    assert fault.matches("client.sent", {"worker": 1, "seq": 5, "sent": 2})
    assert not fault.matches("client.sent", {"worker": 0, "seq": 5, "sent": 2})
    assert not fault.matches("client.before_ack", {"worker": 1, "seq": 5})
