"""Shared fixtures. Ray: ONE small local cluster per test session, for the tests that ask for it.

Only the parameter-server, worker and CLI integration tests request ``ray_session``; every other test (the
updaters, the layout, ``ShardState``, ``WorkerLoop``) runs without Ray, so the fixture is not autouse.
"""

from __future__ import annotations

import os

import pytest

# the data plane binds loopback in tests: every process of these local clusters runs on this machine
os.environ.setdefault("RAYPS_DATA_HOST", "127.0.0.1")


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
