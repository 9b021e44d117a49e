"""Chaos soak: BSP training while shards and workers are killed and the network misbehaves, bit for bit.

A BSP run (``consistency="sync"``, ``rayps.worker.train``, softmax on 512 digits, 2 workers, 2 shards, a
checkpoint directory) of a fixed number of steps, while (tests/chaos.py) a killer thread driven by a seeded
schedule ``ray.kill``s shards (Ray restarts them from their last checkpoint, the workers replay), seeded
``FaultPlan`` points kill workers mid-push (after sending to one of the two shards, or to both before the
acknowledgement; Ray restarts them, and they resume under the same identity), and every message of the data
plane goes through the fault-injection proxy (tests/fault_proxy.py: drops, duplicates, delays, reorders, cut
connections). The references: a clean run of the same seed (no kills, no proxy): the final parameters are
bit-identical (2 workers, so a step's sum does not depend on the order its gradients arrive in); and a plain
count: every shard applied each worker's every step exactly once (its clocks and its updates equal the steps).

Nothing keeps the kinds of failure apart (a shard may die next to a worker's death), and at the first shard
kill a worker dies while it replays to the restarted shard (``client.replayed``): its restarted process
recomputes the pushes it had kept, on the parameters of each one's own step, which the other shard kept
(server/sync_steps.py). Each shard is killed while it holds pushes of every worker that its last checkpoint
does not, so every kill makes every worker replay.

``pytest -m chaos`` runs this alone; ``benchmarks/chaos_soak.py`` is the longer version. No duration is asserted;
every wait has a deadline."""

from __future__ import annotations

import pytest

from chaos import GAP, SoakConfig, chaos_run, clean_run, digits, identical, schedule  # tests/chaos.py

pytestmark = pytest.mark.chaos
CONFIG = SoakConfig(seed=0, epochs=5, worker_kills=2, shard_kills=2)


def test_the_schedule_is_seeded_and_keeps_room_between_kills():
    steps = 80
    events = schedule(CONFIG, steps)
    assert events == schedule(CONFIG, steps) and events != schedule(SoakConfig(seed=1, epochs=5, worker_kills=2,
                                                                               shard_kills=2), steps)
    *timed, replay = events
    assert (replay.kind, replay.point, replay.step) == ("worker", "client.replayed", 0)  # at the first shard kill
    assert sorted(e.kind for e in timed) == ["shard", "shard", "worker", "worker"]
    assert [e.step for e in timed] == sorted(e.step for e in timed)
    assert all(b.step - a.step >= 2 * GAP for a, b in zip(timed, timed[1:]))
    assert all(0 < e.step < steps for e in timed)
    with pytest.raises(AssertionError, match="too few"):
        schedule(SoakConfig(worker_kills=10, shard_kills=10), steps)


@pytest.mark.usefixtures("ray_session")
def test_bsp_survives_killed_shards_killed_workers_and_a_faulty_network_bit_for_bit(tmp_path):
    data, model, steps = digits(CONFIG)
    clean = clean_run(CONFIG, data, model, tmp_path)
    soak = chaos_run(CONFIG, data, model, steps, tmp_path)
    kills = f"shard kills {soak.shard_kills} (skipped {soak.shard_kills_skipped}), worker kills {soak.worker_kills}"
    # every worker death of the plan happened (chaos_run checks each marker), and at least one shard kill
    assert sum(soak.worker_kills.values()) == CONFIG.worker_kills + CONFIG.replay_kills, kills
    assert soak.worker_kills.get("client.replayed") == CONFIG.replay_kills, kills  # a worker died mid-replay
    assert soak.result["worker_restarts"] >= CONFIG.worker_kills + CONFIG.replay_kills, kills
    assert soak.shard_kills >= 1 and soak.shard_kills + soak.shard_kills_skipped == CONFIG.shard_kills, kills
    assert soak.stats["restarts"] == soak.shard_kills, kills  # each kill: one restart, restored and replayed
    assert all(soak.proxy_faults.values()), soak.proxy_faults  # every kind of network fault happened
    for run in (clean, soak):  # exactly once per shard per clock: a plain count
        for shard in run.stats["shards"]:
            assert shard["clocks"] == {w: steps for w in range(CONFIG.workers)}, shard["shard"]
            assert shard["updates_applied"] == steps, shard["shard"]
    assert soak.stats["resume_reads_inexact"] == 0
    assert identical(soak.params, clean.params), kills
