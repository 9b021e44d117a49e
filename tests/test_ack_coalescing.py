"""Cumulative acknowledgements, without Ray: the shard answers a burst of pushes with one ``Ack``
(``coalesce_acks``), the client takes ``ack.applied`` as every push up to it applied (``ShardLinks``), and the
window counts the bytes in flight (``InFlight``).

The reference is a plain model of the client: the set of sequence numbers it may forget. Whatever the shard
sends after coalescing must let the client forget at least every push the uncoalesced replies acknowledged,
and never one the shard did not apply or acknowledge; every other reply goes out unchanged, in order.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from rayps.server.protocol import Ack, PushMessage, Reply, to_frames
from rayps.server.push_linger import Linger
from rayps.server.replay import InFlight
from rayps.server import shard_links
from rayps.server.shard_links import Link, ShardLinks
from rayps.server.shard_service import coalesce_acks, is_plain_ack


def _forgotten(replies, peer) -> set:
    """The model: the pushes a client may forget after ``replies`` to ``peer`` (each ack: its seq, and every
    seq up to ``applied``)."""
    out = set()
    for to, reply in replies:
        if to == peer and isinstance(reply, Reply) and reply.ack is not None:
            out.add(reply.ack.seq)
            out.update(range(1, reply.ack.applied + 1))
    return out


def _random_replies(rng: random.Random, count: int) -> list:
    replies, applied, seq = [], {b"a": 0, b"b": 0}, {b"a": 0, b"b": 0}
    for rid in range(count):
        peer = rng.choice([b"a", b"b"])
        kind = rng.random()
        seq[peer] += 1
        if kind < 0.15:  # a push that waits for a gap: acknowledged above what is applied
            replies.append((peer, Reply(rid, Ack(seq[peer] + 5, applied[peer], 0, "i"))))
            continue
        applied[peer] = seq[peer]
        ack = Ack(seq[peer], applied[peer], 0, "i")
        if kind < 0.25:
            replies.append((peer, Reply(rid, ack, errors=["w: NaN"])))  # a problem: never dropped
        elif kind < 0.35:
            replies.append((peer, Reply(rid, ack, params={"float32": np.zeros(2, np.float32)})))  # a fused pull
        elif kind < 0.4:
            replies.append((peer, Reply(rid, ack, waiting=True)))
        else:
            replies.append((peer, Reply(rid, ack)))
    return replies


@pytest.mark.parametrize("seed", range(20))
def test_coalescing_lets_the_client_forget_what_it_could_before_and_keeps_every_other_reply(seed):
    replies = _random_replies(random.Random(seed), 40)
    out = coalesce_acks(replies)
    assert all(pair in replies for pair in out)
    assert [replies.index(pair) for pair in out] == sorted(replies.index(pair) for pair in out)  # in order
    assert [p for p in replies if not is_plain_ack(p[1])] == [p for p in out if not is_plain_ack(p[1])]
    for peer in (b"a", b"b"):
        assert _forgotten(out, peer) == _forgotten(replies, peer)
    assert len(out) < len(replies)  # 40 replies of 2 peers always have plain acks to fold


def test_a_burst_of_plain_pushes_is_answered_by_its_last_acknowledgement():
    replies = [(b"a", Reply(i, Ack(i, i, 0, "i"))) for i in range(1, 9)]
    assert coalesce_acks(replies) == [replies[-1]]
    other_incarnation = [(b"a", Reply(1, Ack(1, 1, 0, "old"))), (b"a", Reply(2, Ack(2, 2, 0, "new")))]
    assert coalesce_acks(other_incarnation) == other_incarnation


def _links_without_ray(link: Link) -> ShardLinks:
    links = ShardLinks.__new__(ShardLinks)  # only the acknowledgement bookkeeping is exercised
    links.links = [link]
    links.lock = threading.RLock()
    links.linger = Linger(links, shard_links.LINGER)
    links.bytes_pushed = 0
    return links


def test_the_client_forgets_every_push_up_to_the_acknowledged_applied_and_no_other():
    link = Link(incarnation="i")
    for seq in range(1, 11):
        link.unacked[seq] = PushMessage(0, "c", seq, 0, payload={"float32": np.zeros(4, np.float32)})
    links = _links_without_ray(link)
    links._acknowledged(0, link, Ack(seq=6, applied=6, covered=0, incarnation="i"))
    assert sorted(link.unacked) == [7, 8, 9, 10]
    links._acknowledged(0, link, Ack(seq=9, applied=7, covered=0, incarnation="i"))  # 9 waits for 8
    assert sorted(link.unacked) == [8, 10]
    links._acknowledged(0, link, Ack(seq=10, applied=10, covered=0, incarnation="other"))  # an old process
    assert sorted(link.unacked) == [8, 10]
    assert link.unacked.nbytes == 2 * 16


def _array_bytes(message) -> int:
    """The reference: every array the push carries, counted by hand."""
    total = sum(a.nbytes for a in message.payload.values())
    return total + sum(ids.nbytes + grads.nbytes for ids, grads in (message.rows or {}).values())


def test_in_flight_counts_the_bytes_of_the_pushes_it_holds_and_keeps_them_in_seq_order():
    rng = np.random.default_rng(0)
    held = InFlight()
    model = {}
    for step in range(200):
        seq = int(rng.integers(1, 30))
        if rng.random() < 0.6:
            message = PushMessage(0, "c", seq, 0, payload={"float32": np.zeros(int(rng.integers(0, 50)), np.float32)},
                                  rows={"t": (np.arange(3), np.zeros((3, 2)))} if rng.random() < 0.3 else None)
            held[seq] = model[seq] = message
        elif rng.random() < 0.5:
            assert (held.pop(seq) is None) == (model.pop(seq, None) is None)
        elif seq in model:
            del held[seq], model[seq]
        assert held.nbytes == sum(_array_bytes(m) for m in model.values())
        assert list(held) == list(model)


def test_a_window_full_of_bytes_blocks_the_next_push_until_half_of_them_are_acknowledged(monkeypatch):
    """``max_in_flight`` is far away; the window's byte bound (``WINDOW_BYTES``, here 1,000 bytes) blocks the
    push that finds 1,000 bytes or more unacknowledged, until at most 500 remain."""
    monkeypatch.setattr(shard_links, "WINDOW_BYTES", 1000)
    link = Link(incarnation="i")
    links = _links_without_ray(link)
    links.window, links.rid, links.pending = 128, 0, {}
    links._send = lambda shard, message: None
    waits = []

    def pump(done):  # the shard acknowledges the oldest push until ``done()``
        acknowledged = 0
        while not done():
            del link.unacked[next(iter(link.unacked))]
            acknowledged += 1
        waits.append((acknowledged, link.unacked.nbytes))
    links.pump = pump
    for seq in range(1, 6):  # 400 bytes each: the 4th push finds 1,200 in flight and waits for 2 acks
        links.push(0, PushMessage(0, "c", seq, 0, payload={"float32": np.zeros(100, np.float32)}))
    assert waits == [(2, 400)]
    assert sorted(link.unacked) == [3, 4, 5] and link.unacked.nbytes == 1200


def test_draining_a_socket_that_a_recovery_emptied_since_the_poller_saw_it_does_not_block():
    """``_drain`` is called for each socket the poller found readable; dispatching one socket's message may run a
    recovery that pumps, and so drains, another of them first. Its turn then finds nothing: it must return, not
    wait for a message (a deadline of 10 s, against the socket's 60 s receive timeout that keeps a blocked
    receive from hanging the suite), and a message that does arrive is taken."""
    import zmq

    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        router.bind("inproc://rayps-test-drain")
        dealer.connect("inproc://rayps-test-drain")
        dealer.rcvtimeo = 60_000
        link = Link(incarnation="i", socket=dealer)
        links = _links_without_ray(link)
        links.sockets, links.pending, links.errors = {dealer: 0}, {}, []
        link.unacked[1] = PushMessage(0, "c", 1, 0, payload={"float32": np.zeros(4, np.float32)})
        empty = threading.Thread(target=links._drain, args=(dealer,), daemon=True)  # nothing there
        empty.start()
        empty.join(timeout=10)
        assert not empty.is_alive(), "_drain waited for a message"
        assert list(link.unacked) == [1]
        dealer.send(b"hello")
        peer = router.recv_multipart()[0]
        router.send_multipart([peer, *to_frames(Reply(0, Ack(1, 1, 0, "i")))])
        deadline = time.monotonic() + 10
        while not link.unacked.nbytes == 0 and time.monotonic() < deadline:
            links._drain(dealer)
            time.sleep(0.001)
        assert list(link.unacked) == []
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        context.term()
