"""``drive_epochs`` (worker/epochs.py) against fake worker actors: the data reaches each worker as one
object-store reference per run, and the driver's BLAS runs on one thread while the epochs run (restored after)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import ray
from threadpoolctl import threadpool_info

from rayps.worker.epochs import EpochRun, drive_epochs

pytestmark = pytest.mark.usefixtures("ray_session")


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@ray.remote(num_cpus=0)
class _DataWorker:
    """Records what each ``run_epoch`` received as ``data``, and what reading it gives."""

    def __init__(self):
        self.seen = []

    def run_epoch(self, epoch, resumed=False, data=None):
        is_ref = isinstance(data, list) and len(data) == 1 and isinstance(data[0], ray.ObjectRef)
        value = ray.get(data[0]) if is_ref else data
        self.seen.append((epoch, is_ref, data[0].hex() if is_ref else None, value))
        return types.SimpleNamespace(samples=3, rows_skipped=0, mean_loss=0.5)  # an EpochReport's fields

    def received(self):
        return self.seen


class _Server:
    def __init__(self, workers=()):
        self.workers = workers
        self.checkpoints = 0

    def stats(self):
        return {"bytes_pushed": 0}

    def checkpoint_shards(self):
        ray.get([w.received.remote() for w in self.workers])  # raises if the workers were killed already
        self.checkpoints += 1


def test_the_data_travels_as_one_reference_for_the_whole_run_and_reads_back_whole():
    workers = [_DataWorker.remote() for _ in range(2)]
    seen = [None, None]

    def evaluate(_):
        seen[:] = ray.get([w.received.remote() for w in workers])  # before drive_epochs kills them
        return {"test_accuracy": 1.0}

    data = ("client", [1, 2], {"x": 3})
    server = _Server(workers)
    run = drive_epochs(server, workers, epochs=3, evaluate=evaluate, data=data)
    assert isinstance(run, EpochRun) and run.samples == 3 * 2 * 3
    assert server.checkpoints == 1  # once, at the end, while the workers were still alive
    for received in seen:
        assert [epoch for epoch, *_ in received] == [0, 1, 2]
        assert all(is_ref for _, is_ref, _, _ in received)
        assert all(value == data for *_, value in received)
    refs = {ref for received in seen for _, _, ref, _ in received}
    assert len(refs) == 1  # put once, not once per epoch or per worker


@pytest.mark.skipif(not any(n > 1 for n in _blas_threads()), reason="this NumPy's BLAS has one thread already")
def test_the_drivers_blas_runs_on_one_thread_during_the_epochs_and_is_restored_after():
    before = _blas_threads()
    during = []

    def evaluate(_):
        during.append(_blas_threads())
        np.ones((64, 64)) @ np.ones((64, 64))
        return {}

    drive_epochs(_Server(), [_DataWorker.remote()], epochs=2, evaluate=evaluate, data=("c", None, None))
    assert during == [[1] * len(before)] * 2
    assert _blas_threads() == before


@ray.remote(num_cpus=0)
class _AlwaysReplays:
    """A worker whose every catch_up replays to a restarted shard (a shard that dies in every final checkpoint)."""

    def catch_up(self) -> int:
        return 1


def test_the_final_checkpoint_gives_up_after_its_rounds_when_shards_keep_restarting():
    from rayps.worker.epochs import FINAL_CHECKPOINT_ROUNDS, checkpoint_at_end

    class Server:
        checkpoint_dir = "somewhere"
        checkpoints = 0

        def checkpoint_shards(self):
            self.checkpoints += 1

    server, gone = Server(), _AlwaysReplays.remote()
    ray.kill(gone)  # a worker that died after its last epoch counts as nothing to replay
    with pytest.raises(RuntimeError, match="shards kept restarting"):
        checkpoint_at_end(server, [_AlwaysReplays.remote(), gone])
    assert server.checkpoints == FINAL_CHECKPOINT_ROUNDS
    quiet = Server()
    checkpoint_at_end(quiet, [gone])  # nobody replayed: one round
    assert quiet.checkpoints == 1
