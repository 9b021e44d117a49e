"""Round trips between two processes, same run: the paths rayps could move data on, and rayps itself.

For each array size (1 KB, 38 KB — the small MLP's parameters — and 17 MB — the wide MLP's), the median time
of one request carrying the array and a reply carrying it back, every path between the driver and one Ray
actor (``num_cpus=0``) on this machine:

* ``ray call``: ``ray.get(actor.echo.remote(a))`` (Ray's task path, what every push and pull was before);
* ``zmq tcp`` / ``zmq ipc``: pyzmq REQ/REP echo (a thread of the actor), TCP loopback / a Unix socket;
* ``zmq tcp curve``: the same with CURVE encryption;
* ``raw tcp``: a length-prefixed echo over one TCP socket (the floor of any TCP protocol);
* ``rayps push_pull``: ``ParameterServer.push_pull`` on one shard (Sgd: the update is applied) — protocol
  header, checks, the kernel, the reply — authenticated (PLAIN, the default) and with ``encrypt=True``;
* ``rayps logic alone``: the same round trip's client and shard logic run in this process, no socket
  (``shard_logic.push_pull_logic``), and ``bound: zmq ipc + logic``: that added to the bare pyzmq round trip,
  the least a ``push_pull`` with this logic can take over ZeroMQ on this machine in this run.

And pipelined 1 KB pushes: ``rayps push()`` x N then ``flush()`` against N bare Ray calls submitted together
(``[actor.sink.remote(a) for ...]`` then one ``ray.get``), the issue's small-push target, and the pyzmq floor
of that stream: the same window over a bare DEALER/ROUTER pair whose receiver applies each 1 KB gradient and
acknowledges each burst once (``EchoServer.start_zmq_stream``).

    python benchmarks/round_trip.py [--repeats 7] [--json-out PATH]
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
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median, start_ray, table, write_json  # noqa: E402
from shard_logic import push_pull_logic  # noqa: E402

from rayps.server.client import DEFAULT_MAX_IN_FLIGHT, ParameterServer  # noqa: E402
from rayps.updaters import Sgd  # noqa: E402

SIZES = {"1 KB": 256, "38 KB": 9610, "17 MB": 4_350_000}  # float32 elements
LOOPBACK = "127.0.0.1"


@ray.remote(num_cpus=0)
class EchoServer:
    """Serves echo on the paths under test, one thread each."""

    def echo(self, array):
        return array

    def sink(self, array):
        return None

    def start_zmq(self, endpoint: str, curve: tuple | None = None) -> str:
        context = zmq.Context.instance()
        rep = context.socket(zmq.REP)
        if curve is not None:
            rep.curve_server = True
            rep.curve_publickey, rep.curve_secretkey = curve
        if endpoint.startswith("tcp"):
            port = rep.bind_to_random_port(endpoint)
            endpoint = f"{endpoint}:{port}"
        else:
            rep.bind(endpoint)

        def serve():
            while True:
                rep.send_multipart(rep.recv_multipart(copy=False), copy=False)

        threading.Thread(target=serve, daemon=True).start()
        return endpoint

    def start_zmq_stream(self, endpoint: str, size: int) -> str:
        """The floor of pipelined small pushes over pyzmq: a ROUTER thread that takes what arrived (up to 64
        messages), applies each as ``params[:] -= 1e-6 * g`` straight from the frame, and answers the burst with
        one acknowledgement (its count): rayps' flow control, without its protocol, checks or bookkeeping."""
        router = zmq.Context.instance().socket(zmq.ROUTER)
        port = router.bind_to_random_port(endpoint)
        params = np.zeros(size, np.float32)

        def serve():
            while True:
                router.poll()
                acks: dict = {}
                for _ in range(64):
                    try:
                        peer, frame = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    params[:] -= np.float32(1e-6) * np.frombuffer(frame.buffer, np.float32)
                    acks[peer.bytes] = acks.get(peer.bytes, 0) + 1
                for peer, count in acks.items():
                    router.send_multipart([peer, struct.pack("<I", count)])

        threading.Thread(target=serve, daemon=True).start()
        return f"{endpoint}:{port}"

    def start_socket(self) -> int:
        server = socket.socket()
        server.bind((LOOPBACK, 0))
        server.listen(1)

        def serve():
            connection, _ = server.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    header = _read_exactly(connection, 8)
                    (size,) = struct.unpack("<Q", header)
                    body = _read_exactly(connection, size)
                    connection.sendall(header)
                    connection.sendall(body)
            except ConnectionError:  # the driver closed its end: this size is done
                connection.close()

        threading.Thread(target=serve, daemon=True).start()
        return server.getsockname()[1]


def _read_exactly(connection, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = connection.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed")
        got += n
    return buffer


def timed(fn, count: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per call of ``count`` calls."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(count):
            fn()
        times.append((time.perf_counter() - started) / count)
    return median(times)


def paths(server, array) -> dict:
    context = zmq.Context.instance()
    out = {"ray call": lambda: ray.get(server.echo.remote(array))}
    for label, endpoint, curve in (("zmq tcp", f"tcp://{LOOPBACK}", None), ("zmq ipc", None, None),
                                   ("zmq tcp curve", f"tcp://{LOOPBACK}", zmq.curve_keypair())):
        if endpoint is None:
            endpoint = f"ipc:///tmp/rayps-bench-{os.getpid()}-{len(out)}.ipc"
        req = context.socket(zmq.REQ)
        if curve is not None:
            client_public, client_secret = zmq.curve_keypair()
            req.curve_serverkey, req.curve_publickey, req.curve_secretkey = curve[0], client_public, client_secret
        req.connect(ray.get(server.start_zmq.remote(endpoint, curve)))

        def call(req=req):
            req.send(array, copy=False)
            return req.recv(copy=False)
        out[label] = call
    connection = socket.create_connection((LOOPBACK, ray.get(server.start_socket.remote())))
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = struct.pack("<Q", array.nbytes)

    def raw():
        connection.sendall(header)
        connection.sendall(memoryview(array).cast("B"))
        (size,) = struct.unpack("<Q", _read_exactly(connection, 8))
        return _read_exactly(connection, size)
    out["raw tcp"] = raw
    return out


def measure(repeats: int) -> dict:
    server = EchoServer.remote()
    rows = []
    for label, size in SIZES.items():
        array = np.ones(size, np.float32)
        count = 3 if size > 1_000_000 else 200
        row = {"size": label}
        for path, fn in paths(server, array).items():
            row[path] = timed(fn, count, repeats)
        for path, encrypt in (("rayps push_pull", False), ("rayps push_pull curve", True)):
            ps = ParameterServer({"w": np.zeros(size, np.float32)}, updater=Sgd(1e-6), encrypt=encrypt)
            grads = {"w": array}
            row[path] = timed(lambda: ps.push_pull(grads, copy=False), count, repeats)
            ps.shutdown()
        row["rayps logic alone"] = median([push_pull_logic({"w": np.zeros(size, np.float32)}, Sgd(1e-6), count)
                                           for _ in range(repeats)])
        row["bound: zmq ipc + logic"] = row["zmq ipc"] + row["rayps logic alone"]
        rows.append(row)
    return {"round_trips": rows, "pipelined_1kb": pipelined(server, repeats)}


def pipelined(server, repeats: int, count: int = 2000) -> dict:
    array = np.ones(256, np.float32)

    def bare():
        ray.get([server.sink.remote(array) for _ in range(count)])
    ps = ParameterServer({"w": np.zeros(256, np.float32)}, updater=Sgd(1e-6))
    grads = {"w": array}

    def pushes():
        for _ in range(count):
            ps.push(grads)
        ps.flush()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(ray.get(server.start_zmq_stream.remote(f"tcp://{LOOPBACK}", array.size)))
    window = DEFAULT_MAX_IN_FLIGHT

    def stream():  # the same window as rayps: at most ``window`` unacknowledged, refilled when half empty
        sent = acked = 0
        while acked < count:
            while sent < count and sent - acked < window:
                dealer.send(array, copy=False)
                sent += 1
            while acked < count and (sent - acked > window // 2 or sent == count):
                acked += struct.unpack("<I", dealer.recv())[0]
    out = {"bare ray pipelined": count / timed(bare, 1, repeats), "rayps push": count / timed(pushes, 1, repeats),
           "zmq pipelined": count / timed(stream, 1, repeats)}
    ps.shutdown()
    return out


def report(results: dict) -> str:
    rows = results["round_trips"]
    paths_ = [k for k in rows[0] if k != "size"]
    lines = [table(["path"] + [r["size"] for r in rows],
                   [[p] + [f"{r[p] * 1e6:,.0f} us" for r in rows] for p in paths_],
                   title="round trip, median (driver <-> one actor on this machine)")]
    lines.append(table(["path"] + [r["size"] for r in rows],
                       [[p] + [f"{r['ray call'] / r[p]:.1f}x" for r in rows] for p in paths_],
                       title="speed-up over one Ray actor call (same run)"))
    rates = results["pipelined_1kb"]
    bare = rates["bare ray pipelined"]
    lines.append(f"1 KB pipelined: rayps push {rates['rayps push']:,.0f}/s, bare Ray calls {bare:,.0f}/s: "
                 f"{rates['rayps push'] / bare:.1f}x; the pyzmq floor (same window, bare update, one ack a burst) "
                 f"{rates['zmq pipelined']:,.0f}/s: {rates['zmq pipelined'] / bare:.1f}x")
    return "\n\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAYPS_DATA_HOST", LOOPBACK)
    start_ray()
    results = {"machine": machine(), **measure(args.repeats)}
    print(report(results))
    if args.json_out:
        write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
