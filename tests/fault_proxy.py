"""A fault-injection proxy for the data plane (tests only): ``FaultProxy`` sits between the clients and the shards
and, seeded, drops, duplicates, delays and reorders messages both ways and cuts connections.

    proxy = FaultProxy(ps.credentials, endpoints, seed)   # endpoints: each shard's TCP data-plane endpoint
    ps.route_data_plane(proxy.route, resend_after=0.3)    # worker handles made from ps connect through it too
    ...
    proxy.close()

``retarget(shard, endpoint)`` points the proxy at a restarted shard's new endpoint; ``freeze()``/``thaw()`` stop
and restart forwarding (what arrives meanwhile waits in the proxy), so a test can read the shards' counters while
nothing moves. Used by tests/test_data_plane_faults.py and the chaos soak (tests/chaos.py)."""

from __future__ import annotations

import heapq
import queue
import random
import threading
import time

import zmq

from rayps.server.credentials import ZapHandler

WAIT = 120  # seconds: a deadline for the proxy's thread to start, stop or answer, never an expectation of speed


class FaultProxy:
    """ROUTERs facing the clients (one per shard; the run's credentials, ZAP served in the proxy's own context)
    and one DEALER per (shard, client identity) to the real shard, all on one thread. Both ways, seeded: drops,
    duplicates, 10-50 ms delays, reorders (holds one message back until the next has gone), and every ~50
    messages of a client a cut (the DEALER to the shard closed and reopened; what was queued for it is lost)."""

    ODDS = {"drop": 0.05, "duplicate": 0.05, "delay": 0.1, "hold": 0.05}
    CUT_EVERY = (40, 60)

    def __init__(self, credentials, endpoints, seed):
        self.credentials, self.endpoints, self.rng = credentials, list(endpoints), random.Random(seed)
        self.faults = dict.fromkeys(("dropped", "duplicated", "delayed", "reordered", "cuts"), 0)
        self.retargets = 0  # times a shard's endpoint changed (a restarted shard)
        self.fronts, self.backends, self.owner = [], {}, {}  # shard -> ROUTER, key -> DEALER, DEALER -> key
        self.queue, self.held, self.counts, self.next_cut, self.order = [], {}, {}, {}, 0
        self.requests: queue.SimpleQueue = queue.SimpleQueue()  # retargets, done on the proxy's thread
        self.freeze_asked = self.freeze_seen = 0  # freeze() asks with a number; the thread says it saw it
        self.frozen = False
        self.seen = threading.Condition()
        self.stopping, self.error, self.ready = False, None, threading.Event()
        # route(shard, endpoint) -> the proxy's endpoint for the shard (ParameterServer.route_data_plane):
        # {shard: endpoint}.get, a builtin's method, so it pickles without this module (the workers' processes
        # that a pickled server handle reaches cannot import tests/)
        self.route = None
        self.thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self.thread.start()
        assert self.ready.wait(WAIT) and self.error is None, self.error

    def close(self) -> None:
        self.stopping = True
        self.thread.join(WAIT)
        assert not self.thread.is_alive() and self.error is None, self.error

    def retarget(self, shard: int, endpoint: str) -> None:
        """From now on forward ``shard``'s traffic to ``endpoint`` (its connections are reopened there)."""
        self.requests.put((shard, endpoint))

    def freeze(self) -> None:
        """Stop forwarding; returns once the proxy's thread has stopped (nothing it holds goes out until
        ``thaw``; what was already sent may still be on its way)."""
        with self.seen:
            self.frozen = True
            self.freeze_asked += 1
            asked = self.freeze_asked
            assert self.seen.wait_for(lambda: self.freeze_seen >= asked or self.error is not None, WAIT), \
                "the proxy's thread did not stop forwarding"
        assert self.error is None, self.error

    def thaw(self) -> None:
        with self.seen:
            self.frozen = False

    def _run(self) -> None:
        self.context = zmq.Context()  # its own: its ZAP endpoint clashes with no other
        try:
            zap = ZapHandler(self.context, self.credentials)
            self.poller = zmq.Poller()
            self.poller.register(zap.socket, zmq.POLLIN)
            frontends = []
            for _ in self.endpoints:
                front = self.context.socket(zmq.ROUTER)
                front.linger = 0
                self.credentials.configure_server(front)
                frontends.append(f"tcp://127.0.0.1:{front.bind_to_random_port('tcp://127.0.0.1')}")
                self.fronts.append(front)
                self.poller.register(front, zmq.POLLIN)
            self.route = dict(enumerate(frontends)).get
            self.ready.set()
            while not self.stopping:
                while not self.requests.empty():
                    self._retarget(*self.requests.get())
                with self.seen:
                    frozen = self.frozen
                    if frozen and self.freeze_seen < self.freeze_asked:
                        self.freeze_seen = self.freeze_asked
                        self.seen.notify_all()
                timeout = 20 if self.held or frozen else 50
                if self.queue and not frozen:
                    timeout = max(0, min(timeout, int((self.queue[0][0] - time.monotonic()) * 1000) + 1))
                for sock, _ in self.poller.poll(timeout):
                    if sock is zap.socket:
                        zap.handle()
                    else:
                        self._drain(sock)
                if not frozen:
                    self._release(time.monotonic())
        except BaseException as error:  # noqa: BLE001 - reported by close() and freeze()
            self.error = error
            self.ready.set()
            with self.seen:
                self.seen.notify_all()
        finally:
            self.context.destroy(linger=0)

    def _retarget(self, shard: int, endpoint: str) -> None:
        if self.endpoints[shard] == endpoint:
            return
        self.endpoints[shard] = endpoint
        self.retargets += 1
        for key in [key for key in self.backends if key[0] == shard]:
            self._cut(key, counted=False)

    def _drain(self, sock) -> None:
        while sock in self.owner or sock in self.fronts:  # a DEALER cut meanwhile is skipped
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if sock in self.fronts:
                key = (self.fronts.index(sock), frames[0])
                if key not in self.backends:
                    self._connect(key)
                self._inject(key, "up", frames[1:])
            else:
                self._inject(self.owner[sock], "down", frames)

    def _connect(self, key) -> None:
        dealer = self.context.socket(zmq.DEALER)
        dealer.linger = 0
        self.credentials.configure_client(dealer)
        dealer.connect(self.endpoints[key[0]])
        self.backends[key], self.owner[dealer] = dealer, key
        self.poller.register(dealer, zmq.POLLIN)

    def _cut(self, key, counted: bool = True) -> None:
        dealer = self.backends.pop(key)
        self.poller.unregister(dealer)
        del self.owner[dealer]
        dealer.close(linger=0)
        self.queue = [entry for entry in self.queue if entry[2] != key]
        heapq.heapify(self.queue)
        self.held = {lane: held for lane, held in self.held.items() if lane[0] != key}
        self._connect(key)
        self.faults["cuts"] += counted

    def _schedule(self, due, key, direction, frames) -> None:
        self.order += 1
        heapq.heappush(self.queue, (due, self.order, key, direction, frames))

    def _inject(self, key, direction, frames) -> None:
        rng, odds, now, lane = self.rng, self.ODDS, time.monotonic(), (key, direction)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] >= self.next_cut.setdefault(key, rng.randint(*self.CUT_EVERY)):
            self.counts[key], self.next_cut[key] = 0, rng.randint(*self.CUT_EVERY)
            self._cut(key)  # this message is lost with the connection
        elif rng.random() < odds["drop"]:
            self.faults["dropped"] += 1
        elif lane not in self.held and rng.random() < odds["hold"]:
            self.held[lane] = (frames, now)
        else:
            due = now + (rng.uniform(0.01, 0.05) if rng.random() < odds["delay"] else 0.0)
            self.faults["delayed"] += due > now
            copies = 2 if rng.random() < odds["duplicate"] else 1
            self.faults["duplicated"] += copies - 1
            for _ in range(copies):
                self._schedule(due, key, direction, frames)
            if lane in self.held:  # the held one goes right after the one behind it
                self._schedule(due, key, direction, self.held.pop(lane)[0])
                self.faults["reordered"] += 1

    def _release(self, now) -> None:
        for lane, (frames, since) in list(self.held.items()):
            if now - since > 0.05:  # nothing came after it: send it late rather than never
                del self.held[lane]
                self._schedule(now, *lane, frames)
        while self.queue and self.queue[0][0] <= now:
            _, _, key, direction, frames = heapq.heappop(self.queue)
            try:
                if direction == "up":
                    self.backends[key].send_multipart(frames, flags=zmq.NOBLOCK)
                else:
                    self.fronts[key[0]].send_multipart([key[1], *frames], flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # a full queue: lost, like any other drop
                pass
