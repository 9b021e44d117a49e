"""64 MB push+apply over 2 shards against its floor, same run: a raw-socket transfer of the same bytes plus the
bare update kernel.

* rayps: ``ParameterServer({"w": float32[16.7 M]}, Sgd, num_shards=2)``; one ``push(grads)`` then ``flush()``
  (sent, received, checked, applied by the Sgd kernel on each shard, acknowledged), median over ``--repeats``;
  and ``push(grads, copy=False)`` (no private copy of the gradient: the caller keeps it unchanged until
  ``flush``). By default a client on the shards' node talks to them over a Unix socket (ipc://); "rayps over
  TCP" connects to the shards' TCP endpoints instead (``route_data_plane``), as a client on another node does;
* floor: two Ray actors (``num_cpus=0``) each serving one stream socket; the driver sends each its 32 MB half
  (length-prefixed, ``sendall``, one thread per socket) and waits for both one-byte answers; each actor reads
  the bytes straight into a preallocated buffer (``recv_into``: no extra copy) and applies the same fused Sgd
  kernel to its 32 MB of parameters before answering. No checks, no protocol, no recovery: what any
  implementation must pay to move the bytes and update. Measured over TCP loopback and over a Unix socket, so
  each rayps transport has the floor of its own kind of socket.

Every variant runs ``WARMUP`` untimed rounds, then ``--repeats`` timed ones, twice, interleaved with the others;
each figure is the median of the timed rounds. The issue's target: rayps <= 1.3x the floor (the like-for-like
pairs: rayps over ipc:// against the Unix-socket floor, rayps over TCP against the TCP floor).

    python benchmarks/push_64mb.py [--repeats 7] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import tempfile
import threading
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median, start_ray, write_json  # noqa: E402

from rayps.server.client import ParameterServer  # noqa: E402
from rayps.updaters import Sgd  # noqa: E402
from rayps.updaters.base import StepAdjustments  # noqa: E402

ELEMENTS = (64 << 20) // 4  # float32: 64 MB
LOOPBACK = "127.0.0.1"
WARMUP = 3  # untimed rounds per variant: new actors finish starting, buffers and kernels are warm


@ray.remote(num_cpus=0)
class RawShard:
    """One stream socket (TCP, or Unix at ``unix_path``): receive a length-prefixed gradient into a buffer, apply
    Sgd to its parameters, answer."""

    def start(self, elements: int, unix_path: str | None = None):
        updater = Sgd(learning_rate=1e-3)
        self.params = np.zeros(elements, np.float32)
        self.grads = np.empty(elements, np.float32)
        state = updater.init(self.params)
        kernel = updater.select_kernel(self.params, self.grads, state)
        if unix_path is None:
            listener = socket.create_server((LOOPBACK, 0))
            address = listener.getsockname()[1]
        else:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(unix_path)
            listener.listen(1)
            address = unix_path

        def serve():
            connection, _ = listener.accept()
            if unix_path is None:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            view = memoryview(self.grads).cast("B")
            iteration = 0
            while True:
                header = _read(connection, 8)
                if header is None:
                    return
                (size,) = struct.unpack("<Q", header)
                got = 0
                while got < size:
                    n = connection.recv_into(view[got:size])
                    if n == 0:
                        return
                    got += n
                kernel(self.params, self.grads, state, updater.rule_scalars(iteration, 0), StepAdjustments())
                iteration += 1
                connection.sendall(b"k")

        threading.Thread(target=serve, daemon=True).start()
        return address


def _read(connection, size: int):
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _send(connection, payload: memoryview) -> None:
    connection.sendall(struct.pack("<Q", payload.nbytes))
    connection.sendall(payload)


def floor(repeats: int, unix: bool = False) -> list[float]:
    shards = [RawShard.remote() for _ in range(2)]
    directory = tempfile.mkdtemp(prefix="rayps-floor-") if unix else None
    paths = [os.path.join(directory, f"shard{i}.sock") if unix else None for i in range(2)]
    addresses = ray.get([s.start.remote(ELEMENTS // 2, path) for s, path in zip(shards, paths)])
    if unix:
        connections = []
        for path in addresses:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.connect(path)
            connections.append(connection)
    else:
        connections = [socket.create_connection((LOOPBACK, port)) for port in addresses]
        for c in connections:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    grads = np.full(ELEMENTS, 1e-3, np.float32)
    halves = [memoryview(grads[:ELEMENTS // 2]).cast("B"), memoryview(grads[ELEMENTS // 2:]).cast("B")]

    def once() -> float:
        started = time.perf_counter()
        senders = [threading.Thread(target=_send, args=(c, h)) for c, h in zip(connections, halves)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        for c in connections:
            assert _read(c, 1) == b"k"
        return time.perf_counter() - started

    for _ in range(WARMUP):
        once()
    times = [once() for _ in range(repeats)]
    for c in connections:
        c.close()
    for s in shards:
        ray.kill(s)
    for path in paths:
        if path is not None and os.path.exists(path):
            os.unlink(path)
    if directory is not None:
        os.rmdir(directory)
    return times


def rayps(repeats: int, copy: bool = True, tcp: bool = False) -> list[float]:
    ps = ParameterServer({"w": np.zeros(ELEMENTS, np.float32)}, Sgd(learning_rate=1e-3), num_shards=2,
                         cpus_per_shard=0)
    if tcp:  # the shards' TCP endpoints, not their same-node Unix sockets
        ps.route_data_plane(lambda shard, endpoint: endpoint)
    grads = {"w": np.full(ELEMENTS, 1e-3, np.float32)}

    def once() -> float:
        started = time.perf_counter()
        ps.push(grads, copy=copy)
        ps.flush()
        return time.perf_counter() - started

    try:
        for _ in range(WARMUP):
            once()
        return [once() for _ in range(repeats)]
    finally:
        ps.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    start_ray()
    variants = (("floor tcp", floor), ("floor unix", lambda r: floor(r, unix=True)), ("rayps", rayps),
                ("rayps copy=False", lambda r: rayps(r, copy=False)), ("rayps tcp", lambda r: rayps(r, tcp=True)))
    results = {}
    for round_ in range(2):  # interleaved: every variant, then every variant again
        for name, fn in variants:
            results.setdefault(name, []).extend(fn(args.repeats))
    m = {name: median(times) for name, times in results.items()}
    gb = ELEMENTS * 4 / 1e9
    print(f"64 MB push+apply over 2 shards, median of {len(results['rayps'])} each, same run ({machine()}):")
    for name, label in (("floor tcp", "raw TCP socket + Sgd kernel (floor)"),
                        ("floor unix", "raw Unix socket + Sgd kernel (floor)"),
                        ("rayps", "rayps push + flush (ipc)"), ("rayps copy=False", "rayps push(copy=False) + flush"),
                        ("rayps tcp", "rayps push + flush over TCP")):
        print(f"  {label:38s} {m[name] * 1e3:8.1f} ms  ({gb / m[name]:.2f} GB/s)")
    ratios = {"ratio": m["rayps"] / m["floor tcp"], "ratio_nocopy": m["rayps copy=False"] / m["floor tcp"],
              "ratio_ipc_vs_unix_floor": m["rayps"] / m["floor unix"],
              "ratio_nocopy_vs_unix_floor": m["rayps copy=False"] / m["floor unix"],
              "ratio_tcp_vs_tcp_floor": m["rayps tcp"] / m["floor tcp"]}
    print(f"  rayps (ipc) / TCP floor {ratios['ratio']:.2f}x, / Unix floor {ratios['ratio_ipc_vs_unix_floor']:.2f}x; "
          f"copy=False {ratios['ratio_nocopy']:.2f}x / {ratios['ratio_nocopy_vs_unix_floor']:.2f}x; "
          f"rayps over TCP / TCP floor {ratios['ratio_tcp_vs_tcp_floor']:.2f}x (target <= 1.3x)")
    if args.json_out:
        write_json(args.json_out, {"machine": machine(), "floor_seconds": results["floor tcp"],
                                   "floor_unix_seconds": results["floor unix"], "rayps_seconds": results["rayps"],
                                   "rayps_nocopy_seconds": results["rayps copy=False"],
                                   "rayps_tcp_seconds": results["rayps tcp"], **ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
