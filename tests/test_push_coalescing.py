"""Push coalescing on the client (Nagle's rule, server/shard_links.py), without Ray or sockets.

``ShardLinks`` holds a plain push (``PushMessage.batchable``) to a shard that has sent pushes still
unacknowledged, and sends the held ones as ONE message (``PushMessage.batch``) when they reach ``BATCH_PUSHES``
or ``BATCH_BYTES``, when the first has waited ``LINGER``, when the shard has acknowledged everything sent (the
link asks its socket at 0, 1, 2, 4, 8, ... held pushes), or when the client sends that shard anything else or
waits. A push to an idle link goes at once, alone.

Each test builds ``ShardLinks.__new__(ShardLinks)`` with one link and a ``FakeShard``: the wire (``_send``
replaced by a recorder that puts every message through ``to_frames`` -> bytes -> ``from_frames``, as a shard
would receive it), a fake socket that holds a message while acknowledgements are queued (``has_message`` asks
it: an autouse fixture), a
``_drain`` that delivers them through ``_acknowledged``, and a ``pump`` that never blocks (it sends what is held
through the real ``send_held``, then acknowledges everything). The clock is fake (``time.monotonic``).

The independent reference for the wire (``expand``): the recorded messages, expanded (a batch of ``count`` n at
``seq`` s holds s .. s+n-1, each dtype's array the n payloads concatenated), carry every push exactly once, in
seq order, with the very arrays that were pushed.
"""

from __future__ import annotations

import collections
import gc
import threading
import time

import numpy as np
import pytest
import zmq

from rayps.server import shard_links
from rayps.server.faults import NO_FAULTS
from rayps.server.push_linger import Linger
from rayps.server.protocol import Ack, EncodedPayload, PullRequest, PushMessage, from_frames, to_frames
from rayps.server.replay import ReplayBuffer
from rayps.server.shard_links import BATCH_BYTES, BATCH_PUSHES, LINGER, Link, ShardLinks

INCARNATION = "i"


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeLinger:
    """Stands for the linger thread (server/push_linger.py): records when it is armed and closed."""

    def __init__(self, links):
        self.links = links
        self.armed_at: list = []  # (seqs held before the arming push, unacked) at each ``arm``
        self.closed = False

    def arm(self) -> None:
        assert self.links.lock._is_owned()  # called with the links' lock held
        link = self.links.links[0]
        self.armed_at.append(([m.seq for m in link.held], sorted(link.unacked)))

    def close(self) -> None:
        self.closed = True


class FakeSocket:
    """What ``has_message`` asks (``holds_message``): whether the shard has acknowledgements queued. Records how
    many pushes were held each time it was asked."""

    def __init__(self, shard: "FakeShard"):
        self.shard = shard
        self.asked_at_held: list[int] = []
        self.closed = False

    def holds_message(self) -> bool:
        self.asked_at_held.append(len(self.shard.link.held))
        return bool(self.shard.queued)

    def close(self, linger=None):
        self.closed = True


class FakeShard:
    """The wire to shard 0 and the shard's end of it."""

    def __init__(self, links: ShardLinks, link: Link):
        self.links, self.link = links, link
        self.wire: list = []  # (shard, message as the shard decodes it)
        self.queued: list[Ack] = []  # acknowledgements waiting in the socket
        self.pumps: list = []  # (wire length, unacked, held) at each pump
        self.socket = FakeSocket(self)

    # the client's side
    def send(self, shard: int, message) -> None:
        """The recorder that replaces ``ShardLinks._send``: what the shard would receive, decoded from bytes."""
        message.incarnation = self.links.links[shard].incarnation
        frames = [memoryview(frame).tobytes() for frame in to_frames(message)]
        self.wire.append((shard, from_frames(frames)))

    def drain(self, socket) -> None:
        """Replaces ``ShardLinks._drain``: deliver the queued acknowledgements."""
        assert socket is self.socket
        queued, self.queued = self.queued, []
        for ack in queued:
            self.links._acknowledged(0, self.link, ack)

    def pump(self, done) -> None:
        """Replaces ``ShardLinks.pump`` (never blocks): send what is held, then the shard acknowledges all."""
        self.pumps.append((len(self.wire), len(self.link.unacked), len(self.link.held)))
        self.links.send_held()
        self.acknowledge_all()
        self.drain(self.socket)
        assert done()

    # the shard's side
    def top_seq(self) -> int:
        return max((m.seq + m.count - 1 for _, m in self.wire if m.kind == "push"), default=0)

    def acknowledge_all(self) -> None:
        """Queue one cumulative acknowledgement of every push received so far."""
        top = self.top_seq()
        self.queued.append(Ack(seq=top, applied=top, covered=0, incarnation=INCARNATION))

    def pushes(self) -> list:
        return [m for _, m in self.wire if m.kind == "push"]

    def counts(self) -> list:
        return [m.count for m in self.pushes()]


@pytest.fixture(autouse=True)
def _fake_sockets_are_asked_themselves(monkeypatch):
    """``has_message`` asks libzmq (``zmq_poll``), which takes real sockets only: a ``FakeSocket`` answers."""
    real = shard_links.has_message
    monkeypatch.setattr(shard_links, "has_message",
                        lambda socket: socket.holds_message() if isinstance(socket, FakeSocket) else real(socket))


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(shard_links.time, "monotonic", clock)
    return clock


def make_links(window: int = 1000, replay: bool = False):
    links = ShardLinks.__new__(ShardLinks)  # no Ray, no sockets: only the sending bookkeeping
    link = Link(incarnation=INCARNATION, replay=ReplayBuffer() if replay else None)
    links.links = [link]
    links.window, links.rid, links.pending, links.errors = window, 0, {}, []
    links.faults, links.worker = NO_FAULTS, None
    links.recoveries, links.recovery_causes, links.bytes_pushed = 0, collections.Counter(), 0
    links.keeps_replay = replay
    links.sockets = {}
    links.resend_after = shard_links.RESEND_AFTER
    links.lock = threading.RLock()
    links.linger = FakeLinger(links)
    shard = FakeShard(links, link)
    link.socket = shard.socket
    links._send = shard.send
    links._drain = shard.drain
    links.pump = shard.pump
    return links, link, shard


def payload_of(seq: int, size: int = 4) -> dict:
    """A push's own arrays: different for every seq, two dtypes."""
    return {"float32": np.arange(size, dtype=np.float32) + 1000 * seq,
            "float64": np.arange(3, dtype=np.float64) - seq}


def plain(seq: int, worker_id: int = 0, epoch: int = 0, payload=None, **kwargs) -> PushMessage:
    return PushMessage(0, "c", seq, worker_id, epoch, payload_of(seq) if payload is None else payload, **kwargs)


def push_all(links, seqs, **kwargs) -> dict:
    """Push ``seqs`` (plain pushes) to shard 0; seq -> the message pushed."""
    pushed = {}
    for seq in seqs:
        pushed[seq] = plain(seq, **kwargs)
        links.push(0, pushed[seq])
    return pushed


def expand(messages, pushed: dict) -> list:
    """The seqs the wire carries, in order, checking each message's arrays against the pushes it holds: a batch
    of ``count`` n at seq s holds s .. s+n-1, each dtype's array their payloads concatenated."""
    seqs = []
    for message in messages:
        if message.kind != "push":
            continue
        held = list(range(message.seq, message.seq + message.count))
        seqs.extend(held)
        originals = [pushed[seq] for seq in held]
        if message.count > 1:
            assert all(type(o.payload) is dict for o in originals)
        if type(originals[0].payload) is not dict:
            continue  # a dropped or compressed push: not ours to compare here
        assert sorted(message.payload) == sorted(originals[0].payload)
        for dtype, array in message.payload.items():
            np.testing.assert_array_equal(array, np.concatenate([o.payload[dtype] for o in originals]))
            assert array.dtype == originals[0].payload[dtype].dtype
    return seqs


def assert_every_push_once_in_order(shard: FakeShard, pushed: dict) -> None:
    assert expand(shard.pushes(), pushed) == sorted(pushed)


# -- 1. an idle link ----------------------------------------------------------------------------------------------
def test_a_push_to_an_idle_link_goes_out_at_once_alone(clock):
    links, link, shard = make_links()
    pushed = push_all(links, [1])
    assert shard.counts() == [1]  # right after push returned
    assert link.held == [] and list(link.unacked) == [1]
    assert_every_push_once_in_order(shard, pushed)


def test_a_push_after_everything_was_acknowledged_goes_out_at_once_alone(clock):
    links, link, shard = make_links()
    pushed = push_all(links, [1])
    shard.acknowledge_all()
    pushed.update(push_all(links, [2]))
    assert shard.counts() == [1, 1] and link.held == []
    assert list(link.unacked) == [2]
    assert_every_push_once_in_order(shard, pushed)


# -- 2. a busy shard ----------------------------------------------------------------------------------------------
def test_a_hundred_pushes_to_a_shard_that_acknowledges_nothing_go_out_in_batches_of_32(clock):
    assert BATCH_PUSHES == 32
    links, link, shard = make_links()
    pushed = push_all(links, range(1, 101))
    assert shard.counts() == [1, 32, 32, 32]
    assert [m.seq for m in shard.pushes()] == [1, 2, 34, 66]
    assert [m.seq for m in link.held] == [98, 99, 100]
    assert sorted(link.unacked) == list(range(1, 101))  # held pushes are in the window too
    links.send_held()
    assert shard.counts() == [1, 32, 32, 32, 3]
    assert link.held == [] and link.held_bytes == 0
    assert_every_push_once_in_order(shard, pushed)
    links.send_held()  # nothing held: nothing sent
    assert len(shard.wire) == 5


def test_the_link_asks_its_socket_only_at_0_1_2_4_8_16_held_pushes_and_only_while_a_sent_push_is_unacknowledged(
        clock):
    links, link, shard = make_links()
    push_all(links, range(1, 34))  # 1 alone (nothing was in flight: not asked), then 2 .. 33 held, sent at 32
    assert shard.socket.asked_at_held == [0, 1, 2, 4, 8, 16]
    assert shard.counts() == [1, 32]
    shard.acknowledge_all()
    links.flush()
    push_all(links, [34])  # every push acknowledged (the link knows): sent alone, the socket not asked
    assert shard.socket.asked_at_held == [0, 1, 2, 4, 8, 16] and shard.counts() == [1, 32, 1]


def test_a_batch_keeps_the_last_pushs_rid_and_low_water(clock):
    links, link, shard = make_links()
    rids = {}
    for seq in range(1, 5):
        link.covered = seq - 1  # what the shard's checkpoints hold grows between pushes
        message = plain(seq)
        rids[seq] = links.push(0, message)
        assert message.low_water == seq - 1 and message.rid == rids[seq]
    links.send_held()
    single, batch = shard.pushes()
    assert (single.seq, single.count, single.rid, single.low_water) == (1, 1, rids[1], 0)
    assert (batch.seq, batch.count) == (2, 3)
    assert batch.rid == rids[4] and batch.low_water == 3
    assert batch.incarnation == INCARNATION and batch.worker_id == 0 and not batch.replayed


def test_push_message_batch_keeps_the_last_rid_and_low_water_and_concatenates_in_order():
    pushes = [PushMessage(10 + i, "c", 5 + i, 2, 7, payload_of(5 + i), low_water=i, incarnation=f"x{i}")
              for i in range(3)]
    batch = PushMessage.batch(pushes)
    assert (batch.rid, batch.low_water, batch.incarnation) == (12, 2, "x2")
    assert (batch.client_id, batch.seq, batch.worker_id, batch.epoch, batch.count) == ("c", 5, 2, 7, 3)
    assert not batch.replayed and batch.present is None and batch.rows is None and not batch.pull
    assert expand([batch], {p.seq: p for p in pushes}) == [5, 6, 7]
    pushes[1].replayed = True
    assert PushMessage.batch(pushes).replayed


# -- 3. acknowledgements end the wait --------------------------------------------------------------------------
def test_once_the_shard_acknowledged_everything_sent_the_next_push_sends_the_held_ones_with_it(clock):
    links, link, shard = make_links()
    pushed = push_all(links, [1, 2])
    assert shard.counts() == [1] and [m.seq for m in link.held] == [2]
    shard.acknowledge_all()  # push 1: everything sent is acknowledged
    pushed.update(push_all(links, [3]))  # 1 held: the link asks its socket
    assert shard.counts() == [1, 2]  # right after push returned
    assert link.held == [] and sorted(link.unacked) == [2, 3]
    assert_every_push_once_in_order(shard, pushed)


def test_an_acknowledgement_is_seen_at_the_next_power_of_two_held_pushes(clock):
    links, link, shard = make_links()
    pushed = push_all(links, [1, 2, 3, 4])  # 2, 3, 4 held
    shard.acknowledge_all()  # push 1
    pushed.update(push_all(links, [5]))  # 3 held: the link does not ask
    assert shard.counts() == [1] and len(link.held) == 4 and shard.queued
    pushed.update(push_all(links, [6]))  # 4 held: it asks, and sees the shard idle
    assert shard.counts() == [1, 5] and link.held == [] and not shard.queued
    assert_every_push_once_in_order(shard, pushed)


def test_an_acknowledgement_of_only_some_pushes_sent_keeps_the_next_ones_held(clock):
    links, link, shard = make_links()
    pushed = push_all(links, range(1, 34))  # [1], [2 .. 33]
    shard.queued.append(Ack(seq=1, applied=1, covered=0, incarnation=INCARNATION))  # the batch is not
    pushed.update(push_all(links, [34, 35]))
    assert not shard.queued and sorted(link.unacked) == list(range(2, 36))
    assert shard.counts() == [1, 32] and [m.seq for m in link.held] == [34, 35]
    shard.acknowledge_all()
    pushed.update(push_all(links, [36]))  # 2 held: asks, the shard is idle
    assert shard.counts() == [1, 32, 3] and link.held == []
    assert_every_push_once_in_order(shard, pushed)


def test_an_acknowledgement_of_an_older_incarnation_does_not_end_the_wait(clock):
    links, link, shard = make_links()
    push_all(links, [1, 2])
    shard.queued.append(Ack(seq=1, applied=1, covered=0, incarnation="old"))
    push_all(links, [3])
    assert shard.counts() == [1] and [m.seq for m in link.held] == [2, 3]


# -- 4. anything else sent or waited for sends the held pushes first -------------------------------------------
def test_a_request_sends_the_held_batch_first_then_the_request(clock):
    links, link, shard = make_links()
    pushed = push_all(links, [1, 2, 3])
    rid = links.request(0, PullRequest(0, "c", after_seq=3, worker_id=0))
    assert [(m.kind, m.seq if m.kind == "push" else m.after_seq) for _, m in shard.wire] == \
        [("push", 1), ("push", 2), ("pull", 3)]
    assert shard.counts() == [1, 2]
    assert shard.wire[-1][1].rid == rid and rid in links.pending
    assert link.held == []
    assert_every_push_once_in_order(shard, pushed)


def test_waiting_sends_the_held_pushes_first(clock):
    links, link, shard = make_links()
    pushed = push_all(links, [1, 2, 3])
    ShardLinks.pump(links, lambda: True)  # the real pump: send what is held before waiting
    assert shard.counts() == [1, 2] and link.held == []
    pushed.update(push_all(links, [4, 5]))
    links.flush()  # waits (the fake pump): what is held goes before anything is acknowledged
    assert shard.pumps == [(2, 5, 2)]
    assert shard.counts() == [1, 2, 2] and not link.unacked
    assert_every_push_once_in_order(shard, pushed)


def test_closing_sends_the_held_pushes(clock):
    links, link, shard = make_links()
    pushed = push_all(links, [1, 2, 3])
    links.close()
    assert shard.counts() == [1, 2] and shard.socket.closed
    assert_every_push_once_in_order(shard, pushed)


# -- 5. a push that cannot be batched --------------------------------------------------------------------------
NOT_BATCHABLE = {
    "pieces": dict(present=[0]),
    "rows": dict(rows={"t": (np.array([3, 7], np.int64), np.ones((2, 2), np.float32))}),
    "factors": dict(factors={"w": (0.5, 1.0)}),
    "dropped": dict(payload=None),
    "compressed": dict(payload=EncodedPayload("fp16", {"float32": np.ones(4, np.float16)})),
    "tick": dict(payload={}, present="tick"),
}


@pytest.mark.parametrize("kind", [*NOT_BATCHABLE, "fused pull"])
def test_a_push_that_cannot_be_batched_sends_the_held_batch_first_then_goes_alone(clock, kind):
    links, link, shard = make_links()
    pushed = push_all(links, [1, 2, 3])
    if kind == "fused pull":
        pushed[4] = message = plain(4, pull=True, pull_worker=0, timeout=1.0)
        rid = links.push(0, message, wait_reply=True)
        assert links.pending[rid].message is message
    else:
        fields = dict(NOT_BATCHABLE[kind])
        pushed[4] = message = PushMessage(0, "c", 4, 0, 0, fields.pop("payload", payload_of(4)), **fields)
        assert not message.batchable()
        links.push(0, message)
    assert shard.counts() == [1, 2, 1]  # right after push returned
    assert [m.seq for m in shard.pushes()] == [1, 2, 4]
    assert link.held == [] and sorted(link.unacked) == [1, 2, 3, 4]
    assert_every_push_once_in_order(shard, pushed)
    pushed.update(push_all(links, [5, 6]))  # plain again: held while the shard is busy
    assert [m.seq for m in link.held] == [5, 6]
    links.send_held()
    assert shard.counts() == [1, 2, 1, 2]
    assert_every_push_once_in_order(shard, pushed)


def test_a_push_that_cannot_be_batched_to_an_idle_link_goes_alone_at_once(clock):
    links, link, shard = make_links()
    links.push(0, PushMessage(0, "c", 1, 0, 0, payload_of(1), present=[0]))
    assert shard.counts() == [1] and link.held == []


# -- 6. what closes a batch ------------------------------------------------------------------------------------
CHANGES = {
    "worker": lambda: plain(4, worker_id=1),
    "epoch": lambda: plain(4, epoch=1),
    "seq gap": lambda: plain(5),
    "dtypes": lambda: plain(4, payload={"float32": np.arange(4, dtype=np.float32) + 4000}),
}


@pytest.mark.parametrize("change", CHANGES)
def test_another_worker_epoch_dtype_set_or_a_seq_gap_closes_the_batch(clock, change):
    links, link, shard = make_links()
    pushed = push_all(links, [1, 2, 3])
    message = CHANGES[change]()
    pushed[message.seq] = message
    links.push(0, message)
    assert shard.counts() == [1, 2]  # [2, 3] closed
    assert link.held == [message]  # the shard is still busy: the new push starts the next batch
    after = message.seq + 1
    pushed[after] = follower = plain(after, worker_id=message.worker_id, epoch=message.epoch,
                                     payload={d: a + 1 for d, a in message.payload.items()})
    links.push(0, follower)
    links.send_held()
    assert shard.counts() == [1, 2, 2]
    last = shard.pushes()[-1]
    assert (last.seq, last.worker_id, last.epoch) == (message.seq, message.worker_id, message.epoch)
    assert_every_push_once_in_order(shard, pushed)


# -- 7. size ---------------------------------------------------------------------------------------------------
def test_a_push_of_batch_bytes_or_more_is_never_held(clock):
    links, link, shard = make_links()
    big = lambda seq: plain(seq, payload={"float32": np.full(BATCH_BYTES // 4, seq, np.float32)})  # noqa: E731
    pushed = {1: big(1)}
    links.push(0, pushed[1])
    pushed.update(push_all(links, [2, 3]))
    assert shard.counts() == [1]
    pushed[4] = big(4)
    links.push(0, pushed[4])  # the shard is busy, yet it goes at once, after the held ones
    assert shard.counts() == [1, 2, 1] and link.held == []
    pushed[5] = big(5)
    links.push(0, pushed[5])
    assert shard.counts() == [1, 2, 1, 1]
    assert_every_push_once_in_order(shard, pushed)


@pytest.mark.parametrize("elements,counts", [(-(-BATCH_BYTES // 12), [1, 3]), (BATCH_BYTES // 12, [1, 4])])
def test_held_pushes_go_out_once_they_hold_batch_bytes(clock, elements, counts):
    """Three pushes of a third of BATCH_BYTES (rounded up) reach it; three a little smaller need a fourth."""
    links, link, shard = make_links()
    pushed = {}
    for seq in range(1, 6):
        pushed[seq] = plain(seq, payload={"float32": np.full(elements, seq, np.float32)})
        links.push(0, pushed[seq])
    assert shard.counts() == counts
    assert link.held_bytes == sum(4 * elements for _ in link.held)
    links.send_held()
    assert_every_push_once_in_order(shard, pushed)


# -- 8. LINGER ------------------------------------------------------------------------------------------------
def test_a_held_push_goes_out_at_the_next_push_once_linger_has_passed_and_not_before(clock):
    links, link, shard = make_links()
    pushed = push_all(links, [1, 2])  # 2 held since now
    clock.now += LINGER * 0.5
    pushed.update(push_all(links, [3]))
    clock.now += LINGER * 0.45  # 0.95 LINGER since push 2
    pushed.update(push_all(links, [4]))
    assert shard.counts() == [1] and [m.seq for m in link.held] == [2, 3, 4]
    clock.now += LINGER * 10  # no thread: nothing goes out until the next call
    assert shard.counts() == [1]
    pushed.update(push_all(links, [5]))
    assert shard.counts() == [1, 4] and link.held == []
    # the next batch's wait starts with its own first push
    pushed.update(push_all(links, [6]))
    clock.now += LINGER * 0.9
    pushed.update(push_all(links, [7]))
    assert shard.counts() == [1, 4] and [m.seq for m in link.held] == [6, 7]
    clock.now += LINGER * 0.2
    pushed.update(push_all(links, [8]))
    assert shard.counts() == [1, 4, 3]
    assert_every_push_once_in_order(shard, pushed)


# -- the linger thread (server/push_linger.py) ------------------------------------------------------------------
def test_the_linger_thread_is_armed_when_a_link_holds_its_first_push_for_a_busy_shard(clock):
    links, link, shard = make_links()
    push_all(links, [1])  # idle: sent, nothing held, nothing to wake up for
    assert links.linger.armed_at == []
    push_all(links, [2, 3, 4])  # 2 begins a batch: armed once
    assert links.linger.armed_at == [([], [1, 2])]
    links.send_held()
    push_all(links, [5])  # a new batch
    assert links.linger.armed_at == [([], [1, 2]), ([], [1, 2, 3, 4, 5])]
    links.close()
    assert links.linger.closed


def test_send_held_older_than_sends_only_the_batches_that_waited_that_long(clock):
    links, link, shard = make_links()
    assert links.oldest_held() is None
    push_all(links, [1, 2])
    started = clock.now
    assert links.oldest_held() == started
    clock.now += LINGER * 0.9
    push_all(links, [3])
    links.send_held(older_than=LINGER)  # what the linger thread calls: not yet
    assert shard.counts() == [1] and [m.seq for m in link.held] == [2, 3]
    clock.now = started + LINGER * 1.1
    links.send_held(older_than=LINGER)
    assert shard.counts() == [1, 2] and link.held == [] and links.oldest_held() is None


def test_a_held_push_leaves_within_linger_with_no_further_call():
    """The real linger thread and the real clock: the caller stops after push 2, which is held."""
    links, link, shard = make_links()
    links.linger = Linger(links, LINGER)
    try:
        pushed = push_all(links, [1, 2])
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with links.lock:
                if len(shard.wire) == 2:
                    break
            time.sleep(LINGER / 5)
        with links.lock:
            assert shard.counts() == [1, 1] and link.held == []
            assert_every_push_once_in_order(shard, pushed)
    finally:
        links.linger.close()


class CountingLock:
    """The links' lock, counting the times each thread took it."""

    def __init__(self):
        self.lock = threading.RLock()
        self.taken = collections.Counter()

    def __enter__(self):
        self.lock.acquire()
        self.taken[threading.current_thread().name] += 1
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def _is_owned(self) -> bool:
        return self.lock._is_owned()


def test_the_linger_thread_takes_the_lock_only_to_send_a_due_batch_and_to_go_to_sleep():
    """The real thread and clock: push 2 is held (push 1 unacknowledged) and the caller stops. The thread takes
    the links' lock once to send it, once it is due; then it wakes ``IDLE_ROUNDS`` times finding nothing held
    and takes the lock only the last time, to clear its event and sleep (an idle handle costs no wake-ups)."""
    links, link, shard = make_links()
    links.lock = lock = CountingLock()
    links.linger = Linger(links, LINGER)
    try:
        pushed = push_all(links, [1, 2])
        deadline = time.monotonic() + 5.0
        while (links.linger.armed.is_set() or lock.taken["rayps-push-linger"] < 2) and time.monotonic() < deadline:
            time.sleep(LINGER / 5)
        assert not links.linger.armed.is_set()
        with lock:
            assert shard.counts() == [1, 1] and link.held == []
            assert_every_push_once_in_order(shard, pushed)
        assert lock.taken["rayps-push-linger"] == 2
    finally:
        links.linger.close()


def test_a_send_that_fails_on_the_linger_thread_is_logged_and_the_push_stays_in_the_window(caplog):
    """The linger thread's send raises (a socket error): it logs it, the push stays unacknowledged (the next
    wait resends it), and the thread goes on sending later batches."""
    links, link, shard = make_links()
    links.linger = Linger(links, LINGER)
    failures = []

    def fail_once(shard_index, message):
        if not failures:
            failures.append(message.seq)
            raise zmq.ZMQError(zmq.EAGAIN)
        shard.send(shard_index, message)

    try:
        push_all(links, [1])  # sent: the shard is busy from now on
        links._send = fail_once
        push_all(links, [2])  # held; the linger thread's send fails
        deadline = time.monotonic() + 60  # a generous bound, never asserted as a time
        while not failures and time.monotonic() < deadline:
            time.sleep(LINGER / 5)
        with links.lock:
            assert failures == [2] and link.held == [] and sorted(link.unacked) == [1, 2]
        assert "sending held pushes failed" in caplog.text
        push_all(links, [3])  # held again: this time the thread's send goes through
        while len(shard.wire) < 2 and time.monotonic() < deadline:
            time.sleep(LINGER / 5)
        with links.lock:
            assert [m.seq for m in shard.pushes()] == [1, 3] and link.held == []
    finally:
        links.linger.close()


def test_the_linger_thread_ends_when_its_links_are_dropped_without_close():
    """The thread holds its links weakly: a handle dropped without ``shutdown`` is collected, and the thread
    ends instead of keeping it (and its sockets) alive."""
    links, link, shard = make_links()
    links.linger = linger = Linger(links, LINGER)
    push_all(links, [1, 2])  # 2 is held: the thread runs
    thread = linger.thread
    assert thread is not None and thread.is_alive()
    del links, link, shard
    gc.collect()
    thread.join(timeout=60)  # a generous bound, never asserted as a time
    assert not thread.is_alive() and linger.closed


# -- 9. the window, resends and replays --------------------------------------------------------------------------
def test_held_pushes_count_in_the_window(clock):
    links, link, shard = make_links(window=8)
    pushed = push_all(links, range(1, 9))  # 1 sent, 2 .. 8 held: the window is full
    assert shard.counts() == [1] and len(link.held) == 7 and len(link.unacked) == 8
    pushed.update(push_all(links, [9]))  # waits for the window: the held ones go first
    assert shard.pumps == [(1, 8, 7)]
    assert shard.counts() == [1, 7, 1]
    assert_every_push_once_in_order(shard, pushed)


def test_a_resend_clears_the_held_pushes_and_sends_every_push_one_by_one(clock):
    links, link, shard = make_links()
    pushed = push_all(links, range(1, 11))
    assert shard.counts() == [1] and len(link.held) == 9
    before = len(shard.wire)
    links._resend(0)
    assert link.held == [] and link.held_bytes == 0
    resent = [m for _, m in shard.wire[before:]]
    assert [(m.seq, m.count) for m in resent] == [(seq, 1) for seq in range(1, 11)]
    assert expand(resent, pushed) == list(range(1, 11))
    links.send_held()
    assert len(shard.wire) == before + 10  # nothing left held: nothing sent twice
    pushed.update(push_all(links, [11]))  # the shard is busy: held again
    assert [m.seq for m in link.held] == [11]
    # the handle's bytes_pushed: each push's arrays once, however often it went on the wire
    assert links.bytes_pushed == sum(a.nbytes for m in pushed.values() for a in m.payload.values())


def test_a_replay_after_a_restart_clears_the_held_pushes_and_sends_them_one_by_one(clock):
    links, link, shard = make_links(replay=True)
    links._open = lambda shard_index, endpoint: None
    pushed = push_all(links, range(1, 11))
    assert len(link.held) == 9
    before = len(shard.wire)
    links._recover(0, ("tcp://new", "j", 3), "silence")  # the new process applied 1 .. 3
    assert link.held == [] and link.held_bytes == 0 and link.incarnation == "j"
    replayed = [m for _, m in shard.wire[before:]]
    assert [(m.seq, m.count, m.replayed, m.incarnation) for m in replayed] == \
        [(seq, 1, True, "j") for seq in range(4, 11)]
    assert expand(replayed, pushed) == list(range(4, 11))
    assert sorted(link.unacked) == list(range(4, 11))


# -- the wire is valid: every batch the client makes must decode -----------------------------------------------
def test_pushes_with_an_empty_payload_travel_alone(clock):
    """A shard holding no dense piece (only row tables) gets ``{}`` payloads: a batch of those would hold no
    array to divide into pushes, so each goes alone (the recorder decodes each as the shard would)."""
    links, link, shard = make_links()
    pushed = {}
    for seq in range(1, 4):
        pushed[seq] = plain(seq, payload={})
        links.push(0, pushed[seq])
    links.send_held()
    assert shard.counts() == [1, 1, 1] and not link.held
    assert_every_push_once_in_order(shard, pushed)
