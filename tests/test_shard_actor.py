"""``ShardActor`` on a local Ray (the session's ``ray_session``): its data plane, zero-copy replies, waiting pulls.

* a live-buffer pull followed at once by a push on the same connection returns the values from before the
  push (small replies are copied by ZeroMQ at once; large ones are sent from the live buffer and tracked);
* ``pull``/``push_pull`` with ``copy=False`` give read-only arrays with the right values (views where a
  parameter is one piece), ``copy=True`` caller-owned writeable ones, and neither changes under later pushes;
* a pull that must wait (read-your-writes ahead of the push, BSP gating) waits on the shard and is released
  by the push, or times out with a rejection naming it; the sync dead-worker policy forces the stuck step
  after ``sync_timeout``;
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

from rayps.server.protocol import PullRequest, PushMessage, Rejection, RowsRequest, from_frames, to_frames
from rayps.updaters import Sgd

from state_invariants import validate_shards

pytestmark = pytest.mark.usefixtures("ray_session")
WAIT_SECONDS = 120
INLINE, PLASMA = 256, 64 * 1024  # float32 elements: 1 KB, 256 KB
LIVE = 256 * 1024  # 1 MB: sent from the live buffer, tracked


def _server(params, **kwargs):
    from rayps.server import ParameterServer

    kwargs.setdefault("updater", Sgd(learning_rate=1.0))
    kwargs.setdefault("pull_timeout", WAIT_SECONDS)
    return ParameterServer(params, **kwargs)


def _request(ps, after_seq=None, worker_id=None):
    """A pull request as ``ParameterServer`` sends it: [client_id, after_seq, worker_id, pieces, incarnation]."""
    return [ps.client_id, ps.seq if after_seq is None else after_seq, worker_id, None, None]


class Member:
    """A raw data-plane client holding the run's credentials: sends protocol messages, reads replies."""

    def __init__(self, ps, shard=0):
        import ray
        import zmq

        endpoint, self.incarnation, _ = ray.get(ps.shard_actors[shard].endpoint.remote(None))
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.linger = 0
        ps.credentials.configure_client(self.socket)
        self.socket.connect(endpoint)

    def send(self, message):
        self.socket.send_multipart(to_frames(message), copy=False)

    def receive(self, timeout=WAIT_SECONDS):
        if not self.socket.poll(timeout * 1000):
            return None
        return from_frames(self.socket.recv_multipart(copy=False))

    def close(self):
        self.socket.close(linger=0)


@pytest.mark.parametrize("size", [INLINE, LIVE], ids=["copied-by-zeromq", "live-tracked"])
def test_a_live_pull_reply_is_sent_before_the_next_push_changes_it(size):
    """A whole pull is answered from the live buffers (ZeroMQ copies small frames at once; larger ones it sends
    from the buffer itself, tracked): a push right behind the pull must not change what the pull returns."""
    ps = _server({"w": np.zeros(size, np.float32)})
    member = Member(ps)
    try:
        step = {"float32": np.full(size, -1.0, np.float32)}  # Sgd(1.0): every push adds 1 to every element
        for i in range(12):
            member.send(PullRequest(100 + i, "member", i, None))
            member.send(PushMessage(200 + i, "member", i + 1, 0, 0, step))
            replies = {}
            while len(replies) < 2:
                reply = member.receive()
                replies[reply.rid] = reply
            np.testing.assert_array_equal(replies[100 + i].params["float32"], np.full(size, i, np.float32))
            assert replies[200 + i].ack.applied == i + 1 and not replies[200 + i].errors
        np.testing.assert_array_equal(ps.pull()["w"], np.full(size, 12, np.float32))
    finally:
        member.close()
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


def test_a_pull_ahead_of_its_push_waits_on_the_shard_and_the_push_releases_it():
    ps = _server({"w": np.zeros(INLINE, np.float32)}, num_shards=1)
    member = Member(ps)
    try:
        member.send(PullRequest(1, "member", 1, None, timeout=WAIT_SECONDS))  # read-your-writes for seq 1, unsent
        member.send(RowsRequest(2, "member", 1, "nope", np.arange(1)))
        rejected = member.receive()  # an unknown table is refused at once, naming the field
        assert isinstance(rejected, Rejection) and rejected.rid == 2 and rejected.field == "table"
        assert "'nope' is not a row-sparse table" in rejected.message
        for _ in range(3):  # the shard keeps answering control calls meanwhile
            assert ps.stats()["shards"][0]["pushes"] == 0
        assert member.receive(timeout=0.2) is None  # the pull waits
        member.send(PushMessage(3, "member", 1, 0, 0, {"float32": np.full(INLINE, -2.0, np.float32)}))
        replies = {}
        while len(replies) < 2:
            reply = member.receive()
            replies[reply.rid] = reply
        assert replies[3].ack.seq == 1 and replies[3].ack.applied == 1
        np.testing.assert_array_equal(replies[1].params["float32"], np.full(INLINE, 2.0, np.float32))
        member.send(PullRequest(4, "member", 5, None, timeout=0.2))  # never satisfied: times out, named
        timed_out = member.receive()
        assert isinstance(timed_out, Rejection) and timed_out.code == "timeout" and "waited 0.2s" in timed_out.message
    finally:
        member.close()
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
        assert validate_shards(ps) == 2
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
        assert validate_shards(ps) == 2  # a forced step and a dropped late push leave a valid state
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
        assert validate_shards(ps) == 2
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


def test_a_pull_past_its_timeout_raises_timeout_error_naming_the_wait():
    ps = _server({"w": np.zeros(6, np.float32)}, consistency="sync", num_workers=2, pull_timeout=0.5)
    try:  # worker 1 never pushes: the step never completes, the shard rejects the read after 0.5 s
        with pytest.raises(TimeoutError, match=r"pull by worker 0 waited 0.5s; clocks \{0: 1\}"):
            ps.push_pull({"w": np.ones(6, np.float32)}, worker_id=0)
    finally:
        ps.shutdown()


@pytest.mark.parametrize("option,value,field", [("data_host", "0.0.0.0", "data_host"),
                                                ("data_ports", "nope", "data_ports"),
                                                ("data_ports", "80-90", "data_ports"),
                                                ("max_in_flight", 0, "max_in_flight")])
def test_bad_data_plane_settings_are_errors_naming_the_field(option, value, field):
    with pytest.raises(ValueError, match=field):
        _server({"w": np.zeros(6, np.float32)}, **{option: value})


def test_a_shard_restarted_on_the_same_port_rejects_the_old_incarnation_and_the_client_replays(tmp_path,
                                                                                                monkeypatch):
    """One data port: the restarted process listens where the old one did, so this client's next message (for
    the old incarnation) reaches it and is rejected ``restarted``; the client recovers (new incarnation,
    replay from its checkpoint) at once, without waiting for silence. Nothing is lost or applied twice. The
    client looks at a silent shard through Ray only after 5 s here (``resend_after``; 0.5 s by default):
    ZeroMQ's reconnection to the new process and its handshake took longer than 0.5 s in one CI run on a slow
    machine, and the silence path (also a recovery, counted ``silence``) came first."""
    import socket

    import ray

    from rayps.server import shard_links

    monkeypatch.setattr(shard_links, "LOOK_FIRST", 10.0)

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ps = _server({"w": np.zeros(INLINE, np.float32)}, checkpoint_dir=tmp_path, checkpoint_every=1000,
                 data_ports=f"{port}-{port}", recovery_timeout=WAIT_SECONDS)
    try:
        actor = ps.shard_actors[0]
        step = {"w": np.full(INLINE, -1.0, np.float32)}  # Sgd(1.0): +1 per push
        for _ in range(5):
            ps.push(step)
        ps.flush()
        endpoint, incarnation, _ = ray.get(actor.endpoint.remote(None))
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + WAIT_SECONDS
        while True:  # wait for the new process, so the next push meets it at the same endpoint
            try:
                now_endpoint, now_incarnation, _ = ray.get(actor.endpoint.remote(None), timeout=10)
                if now_incarnation != incarnation:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert now_endpoint == endpoint
        ps.push(step)
        np.testing.assert_array_equal(ps.pull()["w"], np.full(INLINE, 6.0, np.float32))
        stats = ps.stats()
        assert stats["recovery_causes"].get("rejected", 0) >= 1, stats["recovery_causes"]
        assert stats["updates_applied"] == 6 and stats["restarts"] == 1
        assert validate_shards(ps) == 1  # restored from its checkpoint, then replayed to
    finally:
        ps.shutdown()
