"""Shared fixtures. Ray: ONE small local cluster per test session, for the tests that ask for it.

Only the parameter-server, worker and CLI integration tests request ``ray_session``; every other test (the
updaters, the layout, ``ShardState``, ``WorkerLoop``) runs without Ray, so the fixture is not autouse.
"""

from __future__ import annotations

import os

import pytest

# the data plane binds loopback in tests: every process of these local clusters runs on this machine
os.environ.setdefault("RAYPS_DATA_HOST", "127.0.0.1")
# the S3 tests' server (s3_endpoint below) takes fixed test credentials. Set here, before Ray starts, so every
# Ray process finds them the way a user's would: in its environment (server/checkpoints/storage.py). The SDK
# never asks the cloud's instance-metadata address for credentials.
for _key, _value in (("AWS_ACCESS_KEY_ID", "rayps-test"), ("AWS_SECRET_ACCESS_KEY", "rayps-test-secret"),
                     ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, started once and shut down at the end of the session (if this fixture started it).

    Actors in the tests take zero or fractional CPUs (``ParameterServer(cpus_per_shard=0)``, ``train(...,
    cpus_per_worker=0)``), so they never wait for resources on this 2-CPU cluster.
    """
    import ray  # noqa: PLC0415 - only the tests that need Ray pay for importing it

    started = False
    if not ray.is_initialized():
        for attempt in range(3):  # on a loaded machine the raylet may give up waiting for its agents once
            try:
                ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
                break
            except Exception:  # noqa: BLE001 - retried, then re-raised
                ray.shutdown()
                if attempt == 2:
                    raise
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server on loopback for the session: moto's standalone server (``moto[server]``, in
    the ``test`` extra) on 127.0.0.1 at a free port, with a bucket ``rayps-test``. Yields ``host:port``; URIs
    are ``s3://rayps-test/<prefix>?endpoint_override=<host:port>&scheme=http``."""
    from s3_server import start_s3_server  # noqa: PLC0415 - tests/s3_server.py

    server = start_s3_server()
    try:
        yield server.endpoint
    finally:
        server.stop()
