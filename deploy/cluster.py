"""Connecting to Ray: an embedded local instance by default, or an existing cluster by address.

``connect`` fails fast with one line when nothing (or nothing that speaks Ray's gRPC) listens at the address,
instead of Ray's long reconnect loop; ``placement.capacity_problems`` names what is missing when the cluster is
too small for the requested actors. ``cpus_per_process`` and ``shard_placement`` size a run's shards and workers
on the cluster it connected to (every run command uses them).
"""

from __future__ import annotations

import os
import socket

from .cli import UsageError

CONNECT_TIMEOUT_SECONDS = 3.0


def _host_port(address: str) -> tuple[str, int] | None:
    """Host and port of ``host:port`` or ``ray://host:port``; None for "auto" and other forms Ray resolves."""
    target = address.split("://", 1)[1] if "://" in address else address
    if ":" not in target:
        return None
    host, _, port = target.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise UsageError(f"--address: {address!r} is not host:port or ray://host:port") from None


def _speaks_grpc(target: tuple[str, int]) -> bool:
    """Whether an HTTP/2 gRPC channel to ``target`` becomes ready within the connect timeout."""
    import grpc  # noqa: PLC0415 - installed with ray

    host, port = target
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_SECONDS)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def connect(address: str | None) -> None:
    """Start an embedded Ray, or connect to ``address`` / ``RAY_ADDRESS`` after checking something listens."""
    import ray  # noqa: PLC0415

    from ..server.client import ensure_ray  # noqa: PLC0415

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        target = _host_port(address)
        if target is not None:
            try:
                socket.create_connection(target, timeout=CONNECT_TIMEOUT_SECONDS).close()
            except OSError as error:
                raise UsageError(f"--address: no Ray cluster answers at {address} ({error.strerror or error}); "
                                 f"start one with `ray start --head` or check the address") from None
            if not _speaks_grpc(target):  # something listens, but not Ray's GCS / client server (both gRPC)
                raise UsageError(f"--address: {address} answers, but not as a Ray cluster (no gRPC server "
                                 f"there); give the GCS address (HEAD:6379) or ray://HEAD:10001")
    try:
        ensure_ray(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--address: could not connect to Ray at {address}: {first_line}") from None


def cpus_per_process(args, ray) -> tuple[float, float]:
    """CPUs per shard and per worker: the user's, or the cluster's CPUs shared out (at most 1 each). A cluster too
    small for the shards and workers (CPUs or GPUs, in total or on any one node) is a one-line UsageError naming
    what is missing (server/placement.py: capacity_problems)."""
    from ..server.placement import capacity_problems  # noqa: PLC0415

    total = float(ray.cluster_resources().get("CPU", 0.0))
    share = min(1.0, total / (args.shards + args.workers)) if total else 0.0
    per_shard = share if args.cpus_per_shard is None else args.cpus_per_shard
    per_worker = share if args.cpus_per_worker is None else args.cpus_per_worker
    problems = capacity_problems(ray.nodes(), args.shards, per_shard, args.gpus_per_shard, args.workers,
                                 per_worker, args.gpus_per_worker)
    if problems:
        raise UsageError("; ".join(problems))
    return per_shard, per_worker


def shard_placement(args, per_shard: float, per_worker: float):
    """The placement group of the shards (server/placement.py); a cluster that cannot hold it is a UsageError."""
    from ..server.placement import PlacementError, ShardPlacement  # noqa: PLC0415

    try:
        return ShardPlacement(args.shards, per_shard, args.gpus_per_shard, per_worker, args.gpus_per_worker,
                              num_workers=args.workers)
    except PlacementError as error:
        raise UsageError(str(error)) from None
