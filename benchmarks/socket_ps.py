"""What a data plane outside Ray's task path would give: a minimal parameter server over plain TCP sockets.

Not part of rayps: a measurement for the design question the floors raise (section "Floors" of
``benchmarks/RESULTS-transport-e2e.md``: one bare Ray actor call per step, with no update at all, already falls
short of the end-to-end target). Ray still places the processes — one ``SocketServer`` actor and 4
``SocketWorker`` actors, the same epochs, partitions, gradients and evaluation as ``rayps.worker.train`` — but a
step's gradient goes out and the parameters come back over one persistent TCP connection per worker (a
length-prefixed frame of raw float32 bytes; no pickle, no Ray call). The server applies rayps' own fused kernel
(``Updater.apply`` on one flat float32 buffer, one numba thread, subnormal results flushed to zero as on rayps'
shards) under one lock, in arrival order: the textbook's asynchronous semantics (pull and push every step,
float32). Nothing here handles failures, authentication or hostile frames, all of which rayps' path does; it
bounds what such a data plane could add, it is not one.

``transport="zmq"``: the same server over pyzmq instead — one ROUTER socket on a Unix socket (``ipc://``, what
rayps' clients use on the shard's node; in Linux's abstract namespace, so a killed server leaves no file),
served by ONE thread as rayps' shard is, each worker a DEALER; one frame of raw float32 each way, nothing else.
That is the floor of a ZeroMQ data plane, where every message also passes ZeroMQ's I/O thread in each process.

``transport="shm"``: the ZeroMQ server with the arrays in shared memory, as BytePS moves them within a node
(the way around copies the issue names for large same-node arrays). Each worker maps one file in ``/dev/shm``
(mode 0600) that the server maps too: the worker writes its gradient there (the flatten every path does) and
sends an empty ZeroMQ message; the server applies the kernel reading the gradient where it lies, copies the
parameters into the worker's half of the file and answers with an empty message; the worker computes its next
gradient on those parameters where they lie. No array crosses a socket: per step one copy of the parameters
and the kernel, the least any parameter server that keeps one consistent copy of the parameters can do.

    python benchmarks/end_to_end.py --model small --only "textbook async,rayps async,socket PS"
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time
import uuid

import numpy as np
import ray
import zmq

from rayps.updaters.float_env import flush_denormals
from rayps.worker.loop import epoch_batches

FRAME = struct.Struct("<Q")  # byte length of the float32 payload that follows


def _recv_into(connection: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from the socket; False when the peer closed first."""
    while len(view):
        received = connection.recv_into(view)
        if not received:
            return False
        view = view[received:]
    return True


def _send_frame(connection: socket.socket, flat: np.ndarray) -> None:
    connection.sendall(FRAME.pack(flat.nbytes))
    connection.sendall(memoryview(flat).cast("B"))


def _recv_frame(connection: socket.socket, out: np.ndarray) -> bool:
    header = bytearray(FRAME.size)
    if not _recv_into(connection, memoryview(header)):
        return False
    (nbytes,) = FRAME.unpack(header)
    if nbytes != out.nbytes:
        raise ValueError(f"frame of {nbytes} bytes, expected {out.nbytes}")
    return _recv_into(connection, memoryview(out).cast("B"))


@ray.remote
class SocketServer:
    """Flat float32 parameters and updater state; every frame received is a gradient, applied, then answered
    with the parameters."""

    def __init__(self, flat_params: np.ndarray, updater, transport: str = "tcp"):
        self.params = np.array(flat_params, dtype=np.float32)
        self.updater = updater
        self.state = updater.init(self.params)
        self.iteration = 0
        self.lock = threading.Lock()
        self.regions: dict = {}  # shm: peer -> (mapping, gradient view, parameter view)
        if transport in ("zmq", "shm"):
            self.router = zmq.Context.instance().socket(zmq.ROUTER)
            self.endpoint = f"ipc://@rayps-zmq-ps-{uuid.uuid4().hex}"
            self.router.bind(self.endpoint)
            serve = self._serve_zmq if transport == "zmq" else self._serve_shm
            threading.Thread(target=serve, daemon=True).start()
            return
        self.endpoint = None
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((ray.util.get_node_ip_address(), 0))
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def address(self):
        return self.endpoint or self.listener.getsockname()[:2]

    def weights(self) -> np.ndarray:
        with self.lock:
            return self.params.copy()

    def _accept(self) -> None:
        while True:
            connection, _ = self.listener.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        import numba  # noqa: PLC0415 - numba's pool size is per calling thread

        numba.set_num_threads(1)
        flush_denormals(True)  # as rayps' shards do by default (updaters/float_env.py)
        grads = np.empty_like(self.params)
        reply = np.empty_like(self.params)
        with connection:
            while _recv_frame(connection, grads):
                with self.lock:
                    self.updater.apply(self.params, grads, self.state, self.iteration)
                    self.iteration += 1
                    reply[...] = self.params
                _send_frame(connection, reply)

    def _serve_zmq(self) -> None:
        import numba  # noqa: PLC0415

        numba.set_num_threads(1)
        flush_denormals(True)
        while True:
            peer, frame = self.router.recv_multipart(copy=False)
            grads = np.frombuffer(frame.buffer, dtype=np.float32)
            with self.lock:
                self.updater.apply(self.params, grads, self.state, self.iteration)
                self.iteration += 1
                self.router.send_multipart([peer, self.params])  # copied at once: the next apply may follow

    def _serve_shm(self) -> None:
        import numba  # noqa: PLC0415

        numba.set_num_threads(1)
        flush_denormals(True)
        size = self.params.size
        while True:
            peer, frame = self.router.recv_multipart()
            if frame:  # a worker's first message: the path of its shared file
                mapping = _map(frame.decode(), 2 * self.params.nbytes)
                both = np.frombuffer(mapping, dtype=np.float32)
                self.regions[peer] = (mapping, both[:size], both[size:])
            _, grads, reply = self.regions[peer]
            with self.lock:
                self.updater.apply(self.params, grads, self.state, self.iteration)
                self.iteration += 1
                reply[...] = self.params
            self.router.send_multipart([peer, b""])


def _map(path: str, nbytes: int) -> mmap.mmap:
    descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        return mmap.mmap(descriptor, nbytes)
    finally:
        os.close(descriptor)


@ray.remote
class SocketWorker:
    def __init__(self, model, address, shapes: dict, x, y, worker_id: int, num_workers: int, batch_size: int,
                 seed: int, shared_memory: bool = False):
        self.model, self.shapes = model, shapes
        self.x, self.y = x, y
        self.worker_id, self.num_workers, self.batch_size, self.seed = worker_id, num_workers, batch_size, seed
        sizes = [int(np.prod(shape)) for shape in shapes.values()]
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self.flat = np.empty(int(self.bounds[-1]), dtype=np.float32)
        self.grads = np.empty_like(self.flat)
        self.iteration = 0
        self.shared = None  # shm: the file's path, sent with the first step
        if isinstance(address, str):  # a ZeroMQ endpoint
            self.dealer = zmq.Context.instance().socket(zmq.DEALER)
            self.dealer.connect(address)
            if shared_memory:
                self.shared = f"/dev/shm/rayps-shm-ps-{uuid.uuid4().hex}"
                descriptor = os.open(self.shared, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(descriptor, 2 * self.flat.nbytes)
                self.mapping = mmap.mmap(descriptor, 2 * self.flat.nbytes)
                os.close(descriptor)
                both = np.frombuffer(self.mapping, dtype=np.float32)
                self.grads, self.flat = both[:self.flat.size], both[self.flat.size:]
            return
        self.dealer = None
        self.connection = socket.create_connection(tuple(address))
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _step(self) -> None:
        """Send the gradient, receive the parameters."""
        if self.shared is not None:
            self.dealer.send(self.shared.encode() if self.iteration == 0 else b"")
            self.iteration += 1
            self.dealer.recv()  # the parameters are in self.flat, the file's second half
            if self.iteration == 1:
                os.unlink(self.shared)  # both processes hold the mapping: the file needs no name any more
            return
        if self.dealer is not None:
            self.dealer.send(self.grads)
            self.flat[...] = np.frombuffer(self.dealer.recv(copy=False).buffer, dtype=np.float32)
            return
        _send_frame(self.connection, self.grads)
        if not _recv_frame(self.connection, self.flat):
            raise ConnectionError("the socket server closed the connection")

    def _params(self) -> dict:
        return {name: self.flat[a:b].reshape(shape)
                for (name, shape), a, b in zip(self.shapes.items(), self.bounds[:-1], self.bounds[1:])}

    def run_epoch(self, epoch: int, initial: np.ndarray | None = None) -> int:
        if initial is not None:
            self.flat[...] = initial
        batches = epoch_batches(len(self.x), self.num_workers, self.worker_id, epoch, self.seed, self.batch_size)
        samples = 0
        for batch in batches:
            _, grads = self.model.loss_and_grads(self._params(), self.x[batch], self.y[batch])
            for name, a, b in zip(self.shapes, self.bounds[:-1], self.bounds[1:]):
                self.grads[a:b] = grads[name].reshape(-1)
            self._step()
            samples += len(batch)
        return samples


def train_socket_ps(model, data, updater, params: dict, num_workers: int = 4, epochs: int = 20,
                    batch_size: int = 32, seed: int = 0, cpus_per_actor: float = 0.0, transport: str = "tcp") -> dict:
    """``rayps.worker.train``'s epochs over the socket PS (``transport``: "tcp" sockets, "zmq" or "shm"); the
    keys of its result the comparison reads."""
    shapes = {name: value.shape for name, value in params.items()}
    flat = np.concatenate([np.asarray(value, dtype=np.float32).reshape(-1) for value in params.values()])
    x_ref, y_ref = ray.put(data.x_train), ray.put(data.y_train)
    server = SocketServer.options(num_cpus=cpus_per_actor).remote(flat, updater, transport)
    shared_memory = transport == "shm"
    address = ray.get(server.address.remote())
    workers = [SocketWorker.options(num_cpus=cpus_per_actor).remote(model, address, shapes, x_ref, y_ref, w,
                                                                    num_workers, batch_size, seed, shared_memory)
               for w in range(num_workers)]
    bounds = np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in shapes.values()])]).astype(int)
    started = time.perf_counter()
    history, samples = [], 0
    try:
        for epoch in range(epochs):
            initial = flat if epoch == 0 else None
            samples += sum(ray.get([w.run_epoch.remote(epoch, initial) for w in workers]))
            weights = ray.get(server.weights.remote())
            accuracy, test_loss = model.accuracy_and_loss(
                {name: weights[a:b].reshape(shape) for (name, shape), a, b in zip(shapes.items(), bounds[:-1],
                                                                                   bounds[1:])},
                data.x_test, data.y_test)
            wall = time.perf_counter() - started
            history.append({"epoch": epoch + 1, "samples_per_second": samples / wall, "wall_seconds": wall,
                            "test_accuracy": float(accuracy), "test_loss": float(test_loss)})
    finally:
        for actor in [*workers, server]:
            ray.kill(actor)
    last = history[-1]
    return {"test_accuracy": last["test_accuracy"], "samples_per_second": last["samples_per_second"],
            "wall_seconds": last["wall_seconds"], "history": history}
