"""The data plane under hostile and faulty networks (local Ray, loopback only). Outsiders (no or foreign
credentials, raw TCP garbage, wrong CURVE keys) get no reply, change nothing, leave the shard serving and are
counted (``handshakes_failed``: a socket-monitor event, so polled). Members' malformed frames get a ``malformed``
rejection naming the field, change nothing and leave the connection working. Through a fault-injection proxy
(drops, duplicates, delays, reorders, cut connections) async and BSP runs end bit-identical to clean runs.
No test asserts a duration; every wait has a generous deadline."""

from __future__ import annotations

import pickle
import socket
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from fault_proxy import FaultProxy  # tests/fault_proxy.py
from rayps.server import shard_links
from rayps.server.credentials import RunCredentials
from rayps.server.protocol import PushMessage, Rejection, Reply, from_frames, to_frames
from rayps.updaters import Sgd

pytestmark = pytest.mark.usefixtures("ray_session")
WAIT = 120  # seconds: a deadline for what must happen, never an expectation of speed
COUNTER_WAIT = 10  # seconds for the (asynchronous) handshake-failure event to be counted
PROBE_WAIT = 10  # seconds for a pull from a shard whose data plane may have been hurt (a local shard: ms)
PARAMS = {"w": np.linspace(-1.0, 1.0, 6, dtype=np.float32), "b": np.array([0.5, -0.25, 2.0], np.float32)}
_rng = np.random.default_rng(7)
PARAMS2 = {"W": _rng.standard_normal((10, 4)).astype(np.float32), "b": _rng.standard_normal(4).astype(np.float32)}


def _server(params, **kwargs):
    from rayps.server import ParameterServer

    kwargs.setdefault("updater", Sgd(learning_rate=1.0))
    kwargs.setdefault("cpus_per_shard", 0)
    kwargs.setdefault("pull_timeout", WAIT)
    return ParameterServer({n: v.copy() for n, v in params.items()}, **kwargs)


def _endpoints(ps) -> list[str]:
    import ray

    return [ray.get(actor.endpoint.remote(None), timeout=WAIT)[0] for actor in ps.shard_actors]


def _counter(ps, key: str, shard: int = 0) -> int:
    return ps.stats()["shards"][shard][key]


def _wait_increase(ps, key: str, before: int) -> int:
    deadline = time.monotonic() + COUNTER_WAIT
    while (value := _counter(ps, key)) <= before:
        assert time.monotonic() < deadline, f"{key} stayed at {before} for {COUNTER_WAIT}s"
        time.sleep(0.1)
    return value


def _assert_same(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name


def _within(fn, seconds: float = PROBE_WAIT):
    """``fn()`` on a thread, given up after ``seconds`` (a dead data plane would leave a call waiting)."""
    out = []

    def call():
        try:
            out.append((True, fn()))
        except BaseException as error:  # noqa: BLE001 - re-raised below
            out.append((False, error))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"no answer within {seconds}s: the shard's data plane does not serve"
    if not out[0][0]:
        raise out[0][1]
    return out[0][1]


def _payload(ps, grads, shard=0) -> dict:
    """The flat float32 payload of a push to ``shard`` of a server whose parameters are whole on it."""
    pieces = sorted(ps.layout.shard_pieces[shard], key=lambda p: p.offset)
    assert all(p.size == grads[p.name].size and p.dtype == "float32" for p in pieces)
    return {"float32": np.concatenate([grads[p.name].reshape(-1) for p in pieces])}


def _frames(message) -> list[bytes]:
    return [bytes(f) if isinstance(f, bytes) else np.ascontiguousarray(f).tobytes() for f in to_frames(message)]


def _dealer(endpoint, configure=None) -> zmq.Socket:
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.linger = 0
    if configure is not None:
        configure(dealer)
    dealer.connect(endpoint)
    return dealer


def _receive(dealer, timeout: float):
    """One protocol message, or None after ``timeout`` seconds."""
    return from_frames(dealer.recv_multipart(copy=False)) if dealer.poll(timeout * 1000) else None


# -- 1. outsiders ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_server(ray_session):
    ps = _server(PARAMS, num_shards=1)
    ps.push({n: np.full_like(v, 0.125) for n, v in PARAMS.items()})
    ps.pull()
    yield ps
    ps.shutdown()


def _outsider_dealer(configure):
    def attempt(endpoint):
        outsider = _dealer(endpoint, configure)  # its messages queue: the handshake never completes
        try:
            push = PushMessage(1, "outsider", 1, 0, 0, {"float32": np.full(9, 9.0, np.float32)})
            outsider.send_multipart(_frames(push))
            outsider.send_multipart([b"\x00garbage\xff", b"more garbage"])
            assert _receive(outsider, 0.5) is None
        finally:
            outsider.close(linger=0)
    return attempt


def _raw_tcp(garbage: bytes):
    def attempt(endpoint):
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        assert host == "127.0.0.1"
        with socket.create_connection((host, int(port)), timeout=WAIT) as conn:
            conn.sendall(garbage)
            conn.settimeout(0.5)
            received = b""
            try:
                while chunk := conn.recv(4096):
                    received += chunk
            except (TimeoutError, ConnectionResetError):
                pass
        assert len(received) <= 64, received  # at most ZeroMQ's own greeting: never a protocol reply
    return attempt


OUTSIDERS = [
    pytest.param(_outsider_dealer(None), id="dealer-without-credentials"),
    pytest.param(_outsider_dealer(lambda s: RunCredentials.new().configure_client(s)),
                 id="plain-secret-of-another-run"),
    pytest.param(_raw_tcp(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03junk" * 40), id="raw-tcp-zmtp-like-garbage"),
    pytest.param(_raw_tcp(b"GET / HTTP/1.1\r\nHost: shard\r\n\r\n" + bytes(range(256))), id="raw-tcp-text-garbage"),
]


@pytest.mark.parametrize("attempt", OUTSIDERS)
def test_an_outsider_gets_nothing_changes_nothing_and_is_counted(plain_server, attempt):
    ps = plain_server
    before, failed, pushes = ps.pull(), _counter(ps, "handshakes_failed"), _counter(ps, "pushes")
    attempt(_endpoints(ps)[0])
    _wait_increase(ps, "handshakes_failed", failed)
    _assert_same(ps.pull(), before)
    assert _counter(ps, "pushes") == pushes  # the shard answers control calls and took nothing from the outsider
    step = {n: np.full_like(v, 0.5) for n, v in PARAMS.items()}  # a member's push still works
    ps.push(step)
    _assert_same(ps.pull(), {n: before[n] - step[n] for n in before})


def _local_endpoints(ps) -> list[str]:
    import ray

    node = ray.get_runtime_context().get_node_id()
    return [ray.get(actor.endpoint.remote(None, node), timeout=WAIT)[0] for actor in ps.shard_actors]


def test_a_client_on_the_shards_node_gets_a_private_unix_socket_that_admits_only_members(plain_server):
    """Same node: ``ipc://`` in a 0700 directory of this user (the TCP endpoint for anyone else); the run's
    credentials are checked there as on TCP."""
    import os
    import stat

    ps = plain_server
    local, tcp = _local_endpoints(ps)[0], _endpoints(ps)[0]
    assert tcp.startswith("tcp://127.0.0.1:") and local.startswith("ipc://")
    directory = os.path.dirname(local.removeprefix("ipc://"))
    info = os.stat(directory)
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    for configure in (None, lambda s: RunCredentials.new().configure_client(s)):
        before, failed = ps.pull(), _counter(ps, "handshakes_failed")
        _outsider_dealer(configure)(local)
        _wait_increase(ps, "handshakes_failed", failed)
        _assert_same(ps.pull(), before)
    member = _dealer(local, ps.credentials.configure_client)
    try:
        before = ps.pull()
        grads = {n: np.full_like(v, 0.25) for n, v in PARAMS.items()}
        member.send_multipart(_frames(PushMessage(1, "ipc-member", 1, 0, 0, _payload(ps, grads), pull=True,
                                                  pull_worker=0)))
        reply = _receive(member, WAIT)
        assert isinstance(reply, Reply) and reply.ack.applied == 1
        _assert_same(ps.pull(), {n: before[n] - grads[n] for n in before})
    finally:
        member.close(linger=0)


def test_no_unix_socket_when_the_directory_is_not_private(tmp_path, monkeypatch):
    """A socket directory someone else could enter (not 0700) is not used: TCP only (logic, no Ray)."""
    import os
    import tempfile

    from rayps.server import data_server

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / f"rayps-{os.getuid()}"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    assert data_server.local_socket_dir() is None
    os.chmod(shared, 0o700)
    assert data_server.local_socket_dir() == str(shared)
    monkeypatch.setenv("RAYPS_DATA_IPC", "0")
    assert data_server.local_socket_dir() is None


def test_encrypted_shard_refuses_wrong_curve_keys():
    ps = _server(PARAMS, num_shards=1, encrypt=True)
    try:
        step = {n: np.full_like(v, 0.125) for n, v in PARAMS.items()}
        probe = pickle.loads(pickle.dumps(ps))  # a handle a stuck call may keep: never closed under it
        before = _within(lambda: probe.push_pull(step))
        _assert_same(before, {n: PARAMS[n] - step[n] for n in PARAMS})
        other = RunCredentials.new(encrypt=True)

        def foreign_client_key(socket_):  # knows the (public) server key, but is no member
            socket_.curve_serverkey = ps.credentials.server_public
            socket_.curve_publickey, socket_.curve_secretkey = other.client_public, other.client_secret

        for configure in (other.configure_client, foreign_client_key):
            failed = _counter(ps, "handshakes_failed")
            _outsider_dealer(configure)(_endpoints(ps)[0])
            _wait_increase(ps, "handshakes_failed", failed)
            probe = pickle.loads(pickle.dumps(ps))
            _assert_same(_within(probe.pull), before)
        probe = pickle.loads(pickle.dumps(ps))
        _assert_same(_within(lambda: probe.push_pull(step)), {n: before[n] - step[n] for n in PARAMS})
    finally:
        ps.shutdown()


# -- 2. members sending malformed frames --------------------------------------------------------------------------
MALFORMED = [  # (name, frames of a valid push -> broken frames, the field the rejection names)
    ("truncated header", lambda f: [f[0][:len(f[0]) // 2], *f[1:]], "header"),
    ("wrong frame count", lambda f: f[:1], "frames"),
    ("array size disagrees", lambda f: [f[0], f[1][:-4]], "a[0]"),
    ("version 99", lambda f: [msgpack.packb({**msgpack.unpackb(f[0]), "v": 99}), *f[1:]], "version"),
]


def test_malformed_frames_are_rejected_by_field_and_the_connection_survives():
    ps = _server(PARAMS, num_shards=1)
    member = _dealer(_endpoints(ps)[0], ps.credentials.configure_client)
    try:
        state = ps.pull()
        seq = 1

        def valid_push(rid):
            grads = {n: np.full_like(v, 0.25 * rid) for n, v in PARAMS.items()}
            member.send_multipart(_frames(PushMessage(rid, "member", seq, 0, 0, _payload(ps, grads))))
            reply = _receive(member, WAIT)
            assert isinstance(reply, Reply) and reply.rid == rid and not reply.errors, reply
            assert reply.ack.seq == seq and reply.ack.applied == seq
            return {n: state[n] - grads[n] for n in state}

        for index, (name, damage, field) in enumerate(MALFORMED):
            rid = 100 + index
            frames = _frames(PushMessage(rid, "member", seq, 0, 0, {"float32": np.ones(9, np.float32)}))
            member.send_multipart(damage(frames))
            rejected = _receive(member, WAIT)
            assert isinstance(rejected, Rejection) and rejected.code == "malformed", (name, rejected)
            assert rejected.field == field, (name, rejected)
            assert rejected.rid == (0 if field == "header" else rid), name
            _assert_same(ps.pull(), state)
            assert _counter(ps, "pushes") == seq - 1 and _counter(ps, "malformed_rejected") == index + 1
            state = valid_push(rid + 50)  # the same socket, a valid push: acknowledged and applied
            _assert_same(ps.pull(), state)
            seq += 1

        bad = {n: np.ones_like(v) for n, v in PARAMS.items()}
        bad["b"][1] = np.nan  # a push-level rejection (nan_policy reject): the clock moves, the params do not
        member.send_multipart(_frames(PushMessage(200, "member", seq, 0, 0, _payload(ps, bad))))
        reply = _receive(member, WAIT)
        assert isinstance(reply, Reply) and reply.rid == 200 and reply.ack.applied == seq, reply
        assert len(reply.errors) == 1 and "'b'" in reply.errors[0], reply.errors
        _assert_same(ps.pull(), state)
        stats = ps.stats()["shards"][0]
        assert stats["nonfinite_rejected"] == 1 and stats["clocks"][0] == seq and stats["updates_applied"] == seq - 1
        seq += 1
        state = valid_push(201)
        _assert_same(ps.pull(), state)
        assert _counter(ps, "malformed_rejected") == len(MALFORMED)
    finally:
        member.close(linger=0)
        ps.shutdown()


# -- 3. through a fault-injection proxy (tests/fault_proxy.py) ------------------------------------------------
def _grads(worker: int, step: int) -> dict:
    rng = np.random.default_rng([worker, step])
    return {n: rng.standard_normal(v.shape).astype(v.dtype) for n, v in PARAMS2.items()}


def _through_proxy(ps, handles, seed):
    proxy = FaultProxy(ps.credentials, _endpoints(ps), seed)
    for handle in handles:
        handle.route_data_plane(lambda shard, endpoint: proxy.route(shard, endpoint), resend_after=0.3)
    return proxy


@pytest.fixture(scope="module")
def clean_async(ray_session):
    ps = _server(PARAMS2, num_shards=2)
    try:
        assert all(ps.layout.shard_pieces)
        steps = [ps.push_pull(_grads(0, step)) for step in range(60)]
        return steps, ps.pull()
    finally:
        ps.shutdown()


@pytest.mark.parametrize("mode", ["push_pull", "pipelined"])
def test_async_single_writer_through_faults_matches_a_clean_run(clean_async, mode, monkeypatch):
    """``push_pull``: 60 steps, each answered before the next. ``pipelined``: 240 pushes that outrun the shards,
    so they travel in batches (server/shard_links.py; here of at most 4 pushes, so that the run makes about as
    many messages as the other mode for the proxy's faults to meet), against the same pushes to a server
    without the proxy."""
    clean_steps, clean_final = clean_async
    steps = 60
    if mode == "pipelined":
        monkeypatch.setattr(shard_links, "BATCH_PUSHES", 4)
        steps = 240
        clean = _server(PARAMS2, num_shards=2)
        try:
            for step in range(steps):
                clean.push(_grads(0, step))
            clean_final = clean.pull()
        finally:
            clean.shutdown()
    ps = _server(PARAMS2, num_shards=2)
    proxy = _through_proxy(ps, [ps], seed=11 if mode == "push_pull" else 12)
    try:
        for step in range(steps):
            if mode == "push_pull":
                _assert_same(ps.push_pull(_grads(0, step)), clean_steps[step])
            else:
                ps.push(_grads(0, step))
        ps.flush()
        _assert_same(ps.pull(), clean_final)
        stats = ps.stats()
        assert [s["updates_applied"] for s in stats["shards"]] == [steps, steps]
        assert [s["pushes"] for s in stats["shards"]] == [steps, steps]  # every duplicate dropped, none applied
        assert stats["duplicates_dropped"] > 0
        assert (stats["pushes_batched"] > 0) == (mode == "pipelined")
        # every kind happened; a push_pull lane carries one message at a time, so a held message is reordered
        # only when a resend follows it (often, not always): there the others must have happened
        kinds = proxy.faults if mode == "pipelined" else {k: v for k, v in proxy.faults.items() if k != "reordered"}
        assert all(kinds.values()), proxy.faults
    finally:
        ps.shutdown()
        proxy.close()


def _bsp_run(seed=None, steps=30):
    ps = _server(PARAMS2, num_shards=2, consistency="sync", num_workers=2)
    handles = [pickle.loads(pickle.dumps(ps)) for _ in range(2)]  # a new client identity each
    proxy = _through_proxy(ps, handles, seed) if seed is not None else None
    results, errors = {0: [], 1: []}, []

    def work(worker):
        try:
            for step in range(steps):
                results[worker].append(handles[worker].push_pull(_grads(worker, step), worker_id=worker))
        except BaseException as error:  # noqa: BLE001 - asserted below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in (0, 1)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in threads) and not errors, errors
        stats = ps.stats()
        assert [s["sync_clock"] for s in stats["shards"]] == [steps, steps]
        assert [s["updates_applied"] for s in stats["shards"]] == [steps, steps]
        if proxy is not None:
            # every kind happened, reorders aside: as in the push_pull test above, a lane carries one message at a
            # time here (a worker waits for each step), so a held message is reordered only when a resend or the
            # step's parameters follow it within the hold (one CI run of four saw none); the pipelined test
            # asserts reorders
            assert all(v for k, v in proxy.faults.items() if k != "reordered"), proxy.faults
        return results, ps.pull()
    finally:
        for handle in handles:
            handle.shutdown()
        ps.shutdown()
        if proxy is not None:
            proxy.close()


def test_bsp_two_workers_through_faults_match_a_clean_run():
    clean_results, clean_final = _bsp_run()
    results, final = _bsp_run(seed=21)
    _assert_same(final, clean_final)
    for worker in (0, 1):
        for step in range(30):
            _assert_same(results[worker][step], clean_results[worker][step])
