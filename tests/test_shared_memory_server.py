"""Shared memory between clients and shards on one node (server/shared_regions.py), through Ray.

A server whose shards each hold over ``SHARED_FROM_BYTES`` of parameters: the handle on the shards' node maps
two regions per shard, its large pushes are packed into them and whole-parameter replies are written there.
The reference is plain float32 SGD (``p - lr * g``, what the fused Sgd kernel computes) applied to the same
gradients in order: equality means shared memory changed nothing but the path. Also: a reply read without a
copy stays as it was while later steps run (its slot is not reused), a shard that no longer knows a client's
regions gets the rest over the socket, and a shard killed mid-run replays exactly once.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from rayps.server.shared_regions import SHARED_FROM_BYTES, region_dir
from rayps.updaters import Sgd

pytestmark = pytest.mark.usefixtures("ray_session")
LEARNING_RATE = np.float32(0.25)


def _params():
    """Two float32 parameters; ~2.4 MB, so each of two shards holds more than SHARED_FROM_BYTES."""
    rng = np.random.default_rng(3)
    params = {"W": rng.standard_normal((600, 1000)).astype(np.float32),
              "b": rng.standard_normal(1000).astype(np.float32)}
    assert sum(a.nbytes for a in params.values()) > 2 * SHARED_FROM_BYTES
    return params


def _grads(params, rng):
    return {name: rng.standard_normal(a.shape).astype(np.float32) for name, a in params.items()}


def _step(reference, grads):
    for name in reference:
        reference[name] = reference[name] - LEARNING_RATE * grads[name]


def _region_files() -> set:
    directory = region_dir()
    return {name for name in os.listdir(directory) if name.startswith("region-")} if directory else set()


def _server(params, **kwargs):
    from rayps.server import ParameterServer

    return ParameterServer(params, updater=Sgd(learning_rate=float(LEARNING_RATE)), num_shards=2, **kwargs)


def test_large_pushes_and_pulls_go_through_shared_memory_and_match_float32_sgd():
    if region_dir() is None:
        pytest.skip("no /dev/shm on this machine: shards offer no shared memory")
    params = _params()
    before = _region_files()
    ps = _server(params)
    try:
        rng = np.random.default_rng(4)
        reference = {name: a.copy() for name, a in params.items()}
        for step in range(12):
            grads = _grads(params, rng)
            _step(reference, grads)
            if step % 3 == 0:
                ps.push(grads)  # copied into a pooled buffer: an up slot
                got = ps.pull()
            else:
                got = ps.push_pull(grads, copy=step % 2 == 0)
            for name in reference:
                np.testing.assert_array_equal(got[name], reference[name])
        assert all(link.regions is not None for link in ps._links.links)
        stats = ps.stats()
        # every push on both shards but the first, built before the link connected and mapped its regions
        assert stats["pushes_shared"] == 2 * 11
        assert stats["reads_shared"] == 2 * 12
        assert _region_files() <= before  # the client unlinked every file it mapped
    finally:
        ps.shutdown()


def test_a_reply_read_without_a_copy_stays_as_it_was_while_later_steps_run():
    if region_dir() is None:
        pytest.skip("no /dev/shm on this machine")
    params = _params()
    ps = _server(params)
    try:
        rng = np.random.default_rng(5)
        held = ps.push_pull(_grads(params, rng), copy=False)  # views of a down slot
        snapshot = {name: a.copy() for name, a in held.items()}
        for _ in range(5):
            latest = ps.push_pull(_grads(params, rng), copy=False)
        for name in held:  # its slot stayed in use: the later replies went to the other slot, or the socket
            np.testing.assert_array_equal(held[name], snapshot[name])
            assert not np.array_equal(latest[name], snapshot[name])
        assert ps.stats()["reads_shared"] >= 2 * 6 - 2
    finally:
        ps.shutdown()


def test_a_shard_that_no_longer_knows_the_regions_gets_the_rest_over_the_socket():
    import ray

    if region_dir() is None:
        pytest.skip("no /dev/shm on this machine")
    params = _params()
    ps = _server(params)
    try:
        rng = np.random.default_rng(6)
        reference = {name: a.copy() for name, a in params.items()}
        for _ in range(3):
            grads = _grads(params, rng)
            _step(reference, grads)
            ps.push(grads)
        ps.flush()
        # shard 0 makes new regions for this client: the ones the client maps are no longer known there
        wire = ray.get(ps.shard_actors[0].shared_regions.remote(ps.client_id))
        for path in (wire["up"], wire["down"]):
            os.unlink(path)
        for step in range(6):
            grads = _grads(params, rng)
            _step(reference, grads)
            ps.push(grads) if step % 2 else ps.push_pull(grads)
        got = ps.pull()
        for name in reference:
            np.testing.assert_array_equal(got[name], reference[name])
        assert ps._links.links[0].regions is None and ps._links.links[1].regions is not None
        shards = ps.stats()["shards"]
        assert shards[0]["malformed_rejected"] >= 1 and shards[1]["malformed_rejected"] == 0
        assert ps.stats()["updates_applied"] == 9  # nothing lost, nothing applied twice
    finally:
        ps.shutdown()


def test_a_killed_shard_replays_pushes_that_were_in_shared_memory_exactly_once(tmp_path):
    import ray

    if region_dir() is None:
        pytest.skip("no /dev/shm on this machine")
    params = _params()
    ps = _server(params, checkpoint_dir=tmp_path, checkpoint_every=4, recovery_timeout=300)
    try:
        rng = np.random.default_rng(7)
        reference = {name: a.copy() for name, a in params.items()}
        for step in range(1, 19):
            grads = _grads(params, rng)
            _step(reference, grads)
            ps.push(grads)
            if step == 9:
                ray.kill(ps.shard_actors[0], no_restart=False)
        got = ps.pull()
        for name in reference:
            np.testing.assert_array_equal(got[name], reference[name])
        stats = ps.stats()
        assert stats["restarts"] >= 1
        assert stats["updates_applied"] == 18
    finally:
        ps.shutdown()


def test_a_small_server_stays_on_the_socket():
    """Below SHARED_FROM_BYTES a shard offers no shared memory (the socket is as fast): nothing is mapped."""
    from rayps.server import ParameterServer

    params = {"w": np.ones(256, np.float32)}
    ps = ParameterServer(params, updater=Sgd(learning_rate=0.5), num_shards=1)
    try:
        got = ps.push_pull({"w": np.ones(256, np.float32)})
        np.testing.assert_array_equal(got["w"], np.full(256, 0.5, np.float32))
        assert ps._links.links[0].regions is None
        stats = ps.stats()
        assert stats["pushes_shared"] == stats["reads_shared"] == 0
    finally:
        ps.shutdown()
