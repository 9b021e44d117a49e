"""``ShardActor`` on a local Ray (the session's ``ray_session``): threads, zero-copy replies, blocking pulls.

* Ray serializes a sync method's return value on the executing thread before the group's next task runs:
  a live-buffer pull followed at once by a push returns the values from before the push (a reply inlined in
  Ray's answer and one through the object store; small replies are copied to raw bytes by the shard itself);
* ``pull``/``push_pull`` with ``copy=False`` give read-only arrays with the right values (views where a
  parameter is one piece), ``copy=True`` caller-owned writeable ones, and neither changes under later pushes;
* a pull that must wait (read-your-writes ahead of the push, BSP gating) blocks in the wait group and is
  released by the push; the sync dead-worker policy forces the stuck step after ``sync_timeout``;
* a non-finite push is rejected by the client before any shard sees it; gradients changed by the caller
  after ``push`` returns do not change what was sent, with and without a replay buffer (``checkpoint_dir``),
  including what a restarted shard gets replayed.

No test asserts a duration; waits use generous deadlines only.
"""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest

from rayps.updaters import Sgd

pytestmark = pytest.mark.usefixtures("ray_session")
WAIT_SECONDS = 120
INLINE, PLASMA = 256, 64 * 1024  # float32 elements: 1 KB (inlined in Ray's reply), 256 KB (object store)
LIVE_INLINE = 20 * 1024  # 80 KB: above wire.SMALL_WIRE_BYTES (sent as the live array), below Ray's inline limit


def _server(params, **kwargs):
    from rayps.server import ParameterServer

    kwargs.setdefault("updater", Sgd(learning_rate=1.0))
    kwargs.setdefault("pull_timeout", WAIT_SECONDS)
    return ParameterServer(params, **kwargs)


def _request(ps, after_seq=None, worker_id=None):
    """A pull request as ``ParameterServer`` sends it: [client_id, after_seq, worker_id, pieces, incarnation]."""
    return [ps.client_id, ps.seq if after_seq is None else after_seq, worker_id, None, None]


@pytest.mark.parametrize("size", [INLINE, LIVE_INLINE, PLASMA], ids=["raw-bytes", "live-inline", "live-object-store"])
def test_a_live_pull_reply_is_serialized_before_the_next_push_runs(size):
    """A small reply is copied to bytes by the shard; a larger one is the live buffer, which Ray must have
    serialized (inline in the reply, or into the object store) before the push behind it changes it."""
    import ray

    from rayps.server.wire import buffers_of

    ps = _server({"w": np.zeros(size, np.float32)})
    try:
        actor = ps.shard_actors[0]
        step = {"w": np.full(size, -1.0, np.float32)}  # Sgd(1.0): every push adds 1 to every element
        for i in range(12):
            ref = actor.pull.remote(_request(ps))  # returns the live buffer ...
            ps.push(step)  # ... and this push is queued right behind it on the same thread
            got = buffers_of(ray.get(ref), ["float32"])["float32"]
            np.testing.assert_array_equal(got, np.full(size, i, np.float32))
        ps.flush()
        np.testing.assert_array_equal(ps.pull()["w"], np.full(size, 12, np.float32))
    finally:
        ps.shutdown()


def _split_params():
    rng = np.random.default_rng(1)
    return {"W": rng.standard_normal((64, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32),
            "s": np.array(0.5), "v": rng.standard_normal(5)}


def test_copy_false_pulls_are_read_only_and_copy_true_pulls_are_caller_owned():
    params = _split_params()
    ps = _server(params, num_shards=2)
    try:
        assert len(ps.layout.pieces_of["W"]) == 2 and len(ps.layout.pieces_of["b"]) == 1
        owned = ps.pull()
        shared = ps.pull(copy=False)
        for name, value in params.items():
            np.testing.assert_array_equal(owned[name], value, strict=True)
            np.testing.assert_array_equal(shared[name], value, strict=True)
            assert owned[name].flags.writeable and not shared[name].flags.writeable, name
            with pytest.raises(ValueError, match="read-only"):
                shared[name][...] = 0
        for name in ("b", "s", "v"):  # one piece each: a view of the received buffer, no copy
            assert not shared[name].flags.owndata and shared[name].base is not None, name
        subset = ps.pull(names=["v", "W"], copy=False)
        assert list(subset) == ["v", "W"] and not any(a.flags.writeable for a in subset.values())
        np.testing.assert_array_equal(subset["W"], params["W"], strict=True)

        owned["b"][...] = 100.0  # the caller's own array: the server and other pulls are unaffected
        grads = {n: np.ones_like(v) for n, v in params.items()}
        after = ps.push_pull(grads, copy=False)
        again = ps.push_pull(grads)
        for name, value in params.items():
            np.testing.assert_array_equal(shared[name], value, strict=True)  # earlier pulls do not move
            np.testing.assert_array_equal(after[name], value - 1, strict=True)
            np.testing.assert_array_equal(again[name], after[name] - 1, strict=True)
            assert not after[name].flags.writeable and again[name].flags.writeable
    finally:
        ps.shutdown()


def test_a_pull_ahead_of_its_push_waits_in_the_wait_group_and_the_push_releases_it():
    import ray

    from rayps.server.wire import buffers_of

    ps = _server({"w": np.zeros(INLINE, np.float32)}, num_shards=1)
    try:
        actor = ps.shard_actors[0]
        ahead = _request(ps, after_seq=ps.seq + 1)  # read-your-writes for a push not sent yet
        assert ray.get(actor.pull.remote(ahead)) is None  # the push thread never blocks: "ask wait_pull"
        waiting = actor.wait_pull.remote(ahead, WAIT_SECONDS)
        rows_waiting = actor.wait_pull_rows.remote([ps.client_id, ps.seq + 1, "nope", np.arange(1), None],
                                                   WAIT_SECONDS)
        for _ in range(3):  # the shard keeps answering on its push thread meanwhile
            assert ray.get(actor.stats.remote())["pushes"] == 0
        ready, _ = ray.wait([waiting], timeout=0.2)
        assert not ready
        ps.push({"w": np.full(INLINE, -2.0, np.float32)})
        released = buffers_of(ray.get(waiting, timeout=WAIT_SECONDS), ["float32"])["float32"]
        np.testing.assert_array_equal(released, np.full(INLINE, 2.0, np.float32))
        with pytest.raises(ValueError, match="'nope' is not a row-sparse table"):  # released, then it read
            ray.get(rows_waiting, timeout=WAIT_SECONDS)
    finally:
        ps.shutdown()


def test_sync_a_pull_blocks_until_every_worker_pushed_its_step():
    params = {"w": np.zeros(6, np.float32), "W": np.zeros((20, 3))}
    ps = _server(params, num_shards=2, consistency="sync", num_workers=2)
    try:
        w0, w1 = pickle.loads(pickle.dumps(ps)), pickle.loads(pickle.dumps(ps))
        result, errors = {}, []

        def step0():
            try:
                result["params"] = w0.push_pull({n: np.ones_like(v) for n, v in params.items()}, worker_id=0,
                                                copy=False)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        thread = threading.Thread(target=step0, daemon=True)
        thread.start()
        deadline = time.monotonic() + WAIT_SECONDS
        while min(s["clocks"].get(0, 0) for s in ps.stats()["shards"]) < 1:  # both shards have w0's push
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.02)
        thread.join(0.3)
        assert thread.is_alive() and not result  # blocked: step 0 lacks worker 1
        w1.push({n: np.full_like(v, 3.0) for n, v in params.items()}, worker_id=1)
        thread.join(WAIT_SECONDS)
        assert not thread.is_alive() and not errors, errors
        for name, value in params.items():  # Sgd(1.0) of the mean (1 + 3) / 2
            np.testing.assert_array_equal(result["params"][name], value - 2.0)
    finally:
        ps.shutdown()


def test_sync_dead_worker_policy_forces_the_step_and_drops_the_late_push():
    params = {"w": np.zeros(6, np.float32), "W": np.zeros((20, 3))}
    ps = _server(params, num_shards=2, consistency="sync", num_workers=2, sync_timeout=0.3)
    try:
        late = pickle.loads(pickle.dumps(ps))
        got = ps.push_pull({n: np.ones_like(v) for n, v in params.items()}, worker_id=0)  # worker 1 is "dead"
        for name, value in params.items():  # the step is applied with the one push it has
            np.testing.assert_array_equal(got[name], value - 1.0)
        late.push({n: np.full_like(v, 100.0) for n, v in params.items()}, worker_id=1)  # its clock-0 push: too late
        late.flush()
        stats = ps.stats()
        assert all(s["sync_steps_forced"] == 1 and s["late_pushes_dropped"] == 1 for s in stats["shards"])
        assert all(s["sync_clock"] == 1 for s in stats["shards"])
        for name, value in ps.pull().items():
            np.testing.assert_array_equal(value, params[name] - 1.0)
    finally:
        ps.shutdown()


def test_a_non_finite_push_reaches_no_shard():
    params = _split_params()
    ps = _server(params, num_shards=2)
    try:
        ps.push({n: np.ones_like(v) for n, v in params.items()})
        before, shards_before = ps.pull(), ps.stats()["shards"]
        bad = {n: np.ones_like(v) for n, v in params.items()}
        bad["W"][63, 7] = np.nan  # the last element: in the second piece of W
        pushed = ps.seq
        with pytest.raises(ValueError, match=r"grads\['W'\] contains NaN or Inf"):
            ps.push(bad)
        assert ps.seq == pushed  # nothing was sent: the handle's sequence did not move
        after, shards_after = ps.pull(), ps.stats()["shards"]
        assert [s["pushes"] for s in shards_after] == [s["pushes"] for s in shards_before]
        assert [s["clocks"] for s in shards_after] == [s["clocks"] for s in shards_before]
        for name in params:
            np.testing.assert_array_equal(after[name], before[name], strict=True)
    finally:
        ps.shutdown()


def _expected_after(params, sent):
    out = {n: v.copy() for n, v in params.items()}
    for grads in sent:
        for name, g in grads.items():
            out[name] = (out[name] - g).astype(params[name].dtype)  # Sgd(1.0)
    return out


@pytest.mark.parametrize("durable", [False, True], ids=["no-replay", "checkpoint_dir"])
def test_gradients_changed_after_push_returns_do_not_change_what_was_sent(tmp_path, durable):
    """Views travel where a shard's part is one piece: Ray must have copied them at ``.remote()``; with a
    replay buffer the kept message must own its data, so a restarted shard is replayed the original values."""
    import ray

    rng = np.random.default_rng(2)
    params = {"big": np.zeros(PLASMA, np.float32), "W": np.zeros((16, 4), np.float32), "b": np.zeros(4, np.float32)}
    extra = {"checkpoint_dir": tmp_path, "checkpoint_every": 1000, "recovery_timeout": 300} if durable else {}
    ps = _server(params, num_shards=2, **extra)
    try:
        sent = []
        grads = {n: np.empty_like(v) for n, v in params.items()}  # one set of arrays, reused by "the model"
        for _ in range(6):
            for name, value in grads.items():
                value[...] = rng.integers(-4, 5, size=value.shape)
            sent.append({n: v.copy() for n, v in grads.items()})
            ps.push(grads)
            for value in grads.values():
                value[...] = np.nan  # overwritten at once, before the shards have applied the push
        if durable:  # every push is still in the replay buffer (no checkpoint covers it): kill and replay
            ray.kill(ps.shard_actors[0], no_restart=False)
        got = ps.pull()
        expected = _expected_after(params, sent)
        for name in params:
            np.testing.assert_array_equal(got[name], expected[name])
        if durable:
            stats = ps.stats()
            assert stats["restarts"] >= 1 and stats["replayed"] > 0 and stats["updates_applied"] == 6
    finally:
        ps.shutdown()
