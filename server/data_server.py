"""``DataServer``: a shard's data-plane socket and the one thread that serves it (ZeroMQ, no Ray).

One ROUTER socket, bound on the node's address (never every interface) at the first free port of the
configured range, authenticated by the run's credentials (server/credentials.py: a ZAP handler polled by
this same thread). The thread loops: poll; answer ZAP requests; count failed handshakes (the socket monitor:
outsiders never reach the logic); receive a batch of messages; decode each (``protocol.from_frames``: every
size checked against the header before a buffer is read) and hand it to ``ShardService`` under the shard's
lock; send the replies (a batch's plain push acknowledgements once, at its end: ``coalesce_acks``; any other
reply at once). A frame that does not decode gets a ``Rejection`` naming the field, and the connection and the
state stay as they were.

Zero copy both ways: a received gradient is a view of the received frame (or, from a client on this node with
shared memory, of its slot there: ``_region_of``), read by the update kernel; a whole-parameter reply is sent
from the live buffers (or copied into the client's slot, server/shared_regions.py). Frames below
``sockets.COPY_BELOW`` are copied at once; larger ones ZeroMQ reads later, from its I/O thread, so before the
next change of the state the thread waits for those sends to finish (a ``MessageTracker`` per frame).

Received buffers are reused, not mapped afresh: ZeroMQ allocates each received message with ``malloc``, and
glibc serves an allocation above its mmap threshold (128 KiB, raised by use to at most 32 MiB) from a
fresh ``mmap`` that ``free`` unmaps, so every large push
would fault its pages in again (a fault and a zeroed page per 4 KiB) while the bytes arrive. A shard
process therefore raises glibc's mmap threshold to ``MESSAGE_HEAP_BYTES`` and its trim threshold to
``HEAP_KEEP_BYTES`` (``keep_message_buffers``, once, at the first ``DataServer``): a received message below that
size is taken from, and returned to, the heap (glibc's per-thread heaps hold at most 64 MiB, so larger
messages are still mapped). Nothing changes where ``mallopt`` is not glibc's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import tempfile
import threading
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from .credentials import RunCredentials, ZapHandler
from .protocol import ProtocolError, PushMessage, Rejection, from_frames, peek_rid, to_frames
from .shard_service import ShardService, coalesce_acks, is_plain_ack
from .shared_regions import private_directory
from .sockets import has_message, recv_frames, send_frames

HWM = 1000  # messages queued per peer, each way, before ZeroMQ drops (clients resend) or blocks
BATCH = 64  # messages handled per poll
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
MONITORED = HANDSHAKE_FAILED | zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
MESSAGE_HEAP_BYTES = 64 << 20  # glibc M_MMAP_THRESHOLD in a shard: smaller allocations come from the heap
HEAP_KEEP_BYTES = 256 << 20  # glibc M_TRIM_THRESHOLD in a shard: free heap memory kept for the next message
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
log = logging.getLogger(__name__)
_buffers_kept = False


def keep_message_buffers() -> bool:
    """Set this process's glibc malloc thresholds (module docstring), once; False where there is no glibc."""
    global _buffers_kept
    if not _buffers_kept:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _buffers_kept = bool(libc.mallopt(M_MMAP_THRESHOLD, MESSAGE_HEAP_BYTES)
                                 and libc.mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))
        except (OSError, AttributeError):  # not glibc (macOS, musl): every large message is mapped afresh
            _buffers_kept = False
    return _buffers_kept


def parse_ports(ports) -> tuple[int, int]:
    """``(low, high)`` from ``"47000-47999"``, ``"47000"``, an int or a pair; ValueError naming the field."""
    try:
        if isinstance(ports, str):
            low, _, high = ports.partition("-")
            low, high = int(low), int(high or low)
        elif isinstance(ports, int):
            low = high = ports
        else:
            low, high = (int(p) for p in ports)
    except (TypeError, ValueError):
        raise ValueError(f"data_ports must be 'LOW-HIGH', a port or a pair of ports, got {ports!r}") from None
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"data_ports must be 'LOW-HIGH' with 1024 <= LOW <= HIGH <= 65535, got {ports!r}")
    return low, high


def bind_in_range(socket: zmq.Socket, host: str, ports: tuple[int, int]) -> int:
    """Bind ``socket`` on ``host`` at a free port of ``ports`` (tried from a random start); the port."""
    low, high = ports
    count = high - low + 1
    start = random.randrange(count)
    for step in range(count):
        port = low + (start + step) % count
        try:
            socket.bind(f"tcp://{host}:{port}")
            return port
        except zmq.ZMQError as error:
            if error.errno != zmq.EADDRINUSE:
                raise RuntimeError(f"cannot bind the data plane on {host}:{port}: {error}") from None
    raise RuntimeError(f"data_ports {low}-{high}: every port is in use on {host}; widen RAYPS_DATA_PORTS")


def local_socket_dir() -> str | None:
    """``<tmp>/rayps-<uid>``: where shards put their same-node (ipc://) sockets, created 0700 so only this user
    may connect at all; None (tcp only) when it is not a directory of ours with that mode, or when
    ``RAYPS_DATA_IPC=0``."""
    if os.environ.get("RAYPS_DATA_IPC", "1") == "0":
        return None
    directory = os.path.join(tempfile.gettempdir(), f"rayps-{os.getuid()}")
    if private_directory(directory) is None:
        log.warning("rayps data plane: %s is not a private directory of this user (mode 0700); same-node "
                    "clients use TCP", directory)
        return None
    return directory


def bind_local(socket: zmq.Socket, host: str, port: int) -> str | None:
    """Also bind ``socket`` on a Unix socket for clients on this node (cheaper than TCP loopback): its
    endpoint, or None. Named by the TCP address, which this process holds, so a restarted shard on the same
    port replaces a file its dead predecessor left."""
    directory = local_socket_dir()
    if directory is None:
        return None
    endpoint = f"ipc://{directory}/{host}-{port}.sock"
    if len(endpoint) > 100:  # sun_path holds ~107 bytes
        return None
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as error:
        log.warning("rayps data plane: no same-node socket at %s (%s); clients use TCP", endpoint, error)
        return None
    return endpoint


class DataServer:
    def __init__(self, service: ShardService, credentials: RunCredentials, host: str, ports: tuple[int, int],
                 lock: threading.Lock, on_change=None, on_start=None):
        self.service = service
        self.lock = lock
        self.on_change = on_change  # called (lock held) after a message changed the state
        self.on_start = on_start  # called first thing on the data-plane thread
        keep_message_buffers()
        self.context = zmq.Context(io_threads=1)
        self.zap = ZapHandler(self.context, credentials)
        socket = self.socket = self.context.socket(zmq.ROUTER)
        socket.linger = 0
        socket.router_handover = 1  # a client that reconnects keeps its identity
        socket.sndhwm = socket.rcvhwm = HWM
        credentials.configure_server(socket)
        self.port = bind_in_range(socket, host, ports)
        self.endpoint = f"tcp://{host}:{self.port}"
        self.local_endpoint = bind_local(socket, host, self.port)  # ipc://, for clients on this node
        self.monitor = socket.get_monitor_socket(MONITORED)
        self.connections = {"accepted": 0, "succeeded": 0, "failed": 0}  # for handshakes that end without an event
        self.counters = {"handshakes_failed": 0, "malformed_rejected": 0,
                         "pushes_shared": 0, "reads_shared": 0}  # arrays that came or went by shared memory
        self.trackers: list = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="rayps-data-plane", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stopping = True
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        self.socket.disable_monitor()
        for socket in (self.socket, self.monitor):
            socket.close(linger=0)
        self.zap.close()
        self.context.term()

    # -- the loop ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.on_start is not None:
            self.on_start()
        poller = zmq.Poller()
        for socket in (self.socket, self.zap.socket, self.monitor):
            poller.register(socket, zmq.POLLIN)
        while not self.stopping:
            deadline = self.service.next_deadline()
            timeout = 100 if deadline is None else max(0, min(100, int((deadline - time.monotonic()) * 1000) + 1))
            ready = dict(poller.poll(timeout))
            try:
                if self.zap.socket in ready:
                    self.zap.handle()
                if self.monitor in ready:
                    self._connection_event()
                if self.socket in ready:  # the first message is there (not asked again: two system calls)
                    outbox: list = []  # this batch's replies: acknowledgements coalesced, sent at its end
                    try:
                        for _ in range(BATCH):
                            self._message(recv_frames(self.socket), outbox)
                            if not has_message(self.socket):
                                break
                    finally:
                        self._send(coalesce_acks(outbox))
            except Exception:  # noqa: BLE001 - one bad event must not stop the shard's data plane
                log.exception("rayps data plane: error while serving; the shard goes on")
            deadline = self.service.next_deadline()
            if deadline is not None and time.monotonic() >= deadline:
                self._settle_sends()
                with self.lock:
                    replies = self.service.expire(time.monotonic())
                    self._changed()
                self._send(replies)

    def _message(self, parts, outbox: list) -> None:
        """Handle one message; its replies go to ``outbox`` (plain acknowledgements wait there for the batch's
        end, any other reply is sent first: a read's live buffers must leave before a push changes them)."""
        peer, frames = parts[0].bytes, parts[1:]
        try:
            message = from_frames(frames, self._region_of)
        except ProtocolError as error:
            self.counters["malformed_rejected"] += 1
            if self.counters["malformed_rejected"] == 1:
                log.warning("rayps data plane: rejected a malformed message (%s); further ones are only counted",
                            error)
            self._send([(peer, Rejection(peek_rid(frames), "malformed", error.field, str(error)))])
            return
        if isinstance(message, PushMessage):
            if message.shared:
                self.counters["pushes_shared"] += message.count
            self._settle_sends()  # the live buffers of earlier replies must be sent before they change
        with self.lock:
            replies = self.service.handle(peer, message, time.monotonic())
            self._changed()
        outbox += replies  # until now it held plain acknowledgements only
        if not all(is_plain_ack(reply) for _, reply in replies):
            self._send(coalesce_acks(outbox))
            outbox.clear()

    def _region_of(self, header: dict):
        """The up region of the client a message names, if it carries that region's token (``from_frames``)."""
        client = header.get("c")
        regions = self.service.regions.get(client) if type(client) is str else None
        return regions.up.array if regions is not None and header.get("rg") == regions.token else None

    def _changed(self) -> None:
        if self.service.changed and self.on_change is not None:
            self.on_change()

    def _send(self, replies) -> None:
        for peer, reply in replies:
            region = getattr(reply, "region", None)  # a Reply whose params lie in the client's shared memory
            if region is not None:
                self.counters["reads_shared"] += 1
            try:
                self.trackers += send_frames(self.socket, [peer, *to_frames(reply, region)], track=True)
            except zmq.ZMQError:  # the peer is gone (its queue is full or it disconnected): it will resend
                continue

    def _settle_sends(self) -> None:
        for tracker in self.trackers:
            tracker.wait()
        self.trackers.clear()

    def _connection_event(self) -> None:
        """Count connections refused before they held the run's credentials: a handshake-failed event, or (a
        peer that does not speak ZMTP 3, e.g. plain text, gets no such event from libzmq) a connection that
        was accepted and closed with no handshake finished."""
        event = parse_monitor_message(self.monitor.recv_multipart())
        kind, seen = event["event"], self.connections
        if kind == zmq.EVENT_ACCEPTED:
            seen["accepted"] += 1
            return
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            seen["succeeded"] += 1
            return
        if kind == zmq.EVENT_DISCONNECTED:
            if seen["accepted"] - seen["succeeded"] - seen["failed"] <= 0:
                return  # a member left
        seen["failed"] += 1
        self.counters["handshakes_failed"] += 1
        if self.counters["handshakes_failed"] == 1:
            log.warning("rayps data plane: a connection from %s ended without the run's credentials (event %s: "
                        "refused, or closed before its handshake finished, as a member's may be when it reconnects "
                        "to a restarted shard); further ones are only counted", event.get("endpoint"),
                        event.get("event"))
