"""64 MB push+apply over 2 shards against its floor, same run: a raw-socket transfer of the same bytes plus the
bare update kernel.

* rayps: ``ParameterServer({"w": float32[16.7 M]}, Sgd, num_shards=2)``; one ``push(grads)`` then ``flush()``
  (sent, received, checked, applied by the Sgd kernel on each shard, acknowledged), median over ``--repeats``;
  and ``push(grads, copy=False)`` (no private copy of the gradient: the caller keeps it unchanged until
  ``flush``);
* floor: two Ray actors (``num_cpus=0``) each serving one TCP socket; the driver sends each its 32 MB half
  (length-prefixed, ``sendall``) and waits for both one-byte answers; each actor reads the bytes straight into a
  preallocated buffer (``recv_into``: no extra copy) and applies the same fused Sgd kernel to its 32 MB of
  parameters before answering. No checks, no protocol, no recovery: what any implementation must pay to move
  the bytes and update.

The issue's target: rayps <= 1.3x the floor.

    python benchmarks/push_64mb.py [--repeats 7] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
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


@ray.remote(num_cpus=0)
class RawShard:
    """One TCP socket: receive a length-prefixed gradient into a buffer, apply Sgd to its parameters, answer."""

    def start(self, elements: int) -> int:
        updater = Sgd(learning_rate=1e-3)
        self.params = np.zeros(elements, np.float32)
        self.grads = np.empty(elements, np.float32)
        state = updater.init(self.params)
        kernel = updater.select_kernel(self.params, self.grads, state)
        listener = socket.create_server((LOOPBACK, 0))
        port = listener.getsockname()[1]

        def serve():
            connection, _ = listener.accept()
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
        return port


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


def floor(repeats: int) -> list[float]:
    shards = [RawShard.remote() for _ in range(2)]
    ports = ray.get([s.start.remote(ELEMENTS // 2) for s in shards])
    connections = [socket.create_connection((LOOPBACK, port)) for port in ports]
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

    once()
    times = [once() for _ in range(repeats)]
    for c in connections:
        c.close()
    for s in shards:
        ray.kill(s)
    return times


def rayps(repeats: int, copy: bool = True) -> list[float]:
    ps = ParameterServer({"w": np.zeros(ELEMENTS, np.float32)}, Sgd(learning_rate=1e-3), num_shards=2,
                         cpus_per_shard=0)
    grads = {"w": np.full(ELEMENTS, 1e-3, np.float32)}

    def once() -> float:
        started = time.perf_counter()
        ps.push(grads, copy=copy)
        ps.flush()
        return time.perf_counter() - started

    try:
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
    results = {}
    for round_ in range(2):  # interleaved: floor, rayps, floor, rayps
        for name, fn in (("floor", floor), ("rayps", rayps), ("rayps copy=False", lambda r: rayps(r, copy=False))):
            results.setdefault(name, []).extend(fn(args.repeats))
    floor_s, rayps_s = median(results["floor"]), median(results["rayps"])
    nocopy_s = median(results["rayps copy=False"])
    gb = ELEMENTS * 4 / 1e9
    print(f"64 MB push+apply over 2 shards, median of {len(results['floor'])} each, same run ({machine()}):")
    print(f"  raw socket + Sgd kernel (floor): {floor_s * 1e3:8.1f} ms  ({gb / floor_s:.2f} GB/s)")
    print(f"  rayps push + flush:              {rayps_s * 1e3:8.1f} ms  ({gb / rayps_s:.2f} GB/s)")
    print(f"  rayps push(copy=False) + flush:  {nocopy_s * 1e3:8.1f} ms  ({gb / nocopy_s:.2f} GB/s)")
    print(f"  rayps / floor: {rayps_s / floor_s:.2f}x; with copy=False {nocopy_s / floor_s:.2f}x (target <= 1.3x)")
    if args.json_out:
        write_json(args.json_out, {"machine": machine(), "floor_seconds": results["floor"],
                                   "rayps_seconds": results["rayps"], "ratio": rayps_s / floor_s,
                                   "rayps_nocopy_seconds": results["rayps copy=False"],
                                   "ratio_nocopy": nocopy_s / floor_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
