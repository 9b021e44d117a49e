"""Flush-to-zero (updaters/float_env.py): on the thread that asks for it and the threads it starts, and on the
shards' update kernels (``ParameterServer(flush_denormals=...)``). The reference: the same float32 subtraction
done by NumPy on a thread without it (IEEE: a subnormal result)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rayps.updaters.float_env import denormals_flushed, flush_denormals

BIG, SMALL = np.float32(2e-38), np.float32(1.5e-38)  # both normal; their difference is not (< 1.18e-38)
SUBNORMAL = BIG - SMALL  # computed on this thread, which never sets the bit: IEEE


def _on_thread(work):
    out = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join()
    return out[0]


def test_the_reference_difference_is_a_subnormal():
    assert 0 < SUBNORMAL < np.finfo(np.float32).tiny


def test_a_thread_that_flushes_gets_zero_and_its_children_too_and_clearing_restores_ieee():
    def work():
        if not flush_denormals(True):
            return None
        flushed = (denormals_flushed(), np.subtract(BIG, SMALL), _on_thread(lambda: np.subtract(BIG, SMALL)))
        flush_denormals(False)
        return flushed, (denormals_flushed(), np.subtract(BIG, SMALL))

    result = _on_thread(work)
    if result is None:
        pytest.skip("no flush-to-zero switch on this machine (not x86-64 with numba)")
    (on, own, child), (after, cleared) = result
    assert on and own == 0 and child == 0  # a thread started by a flushing thread inherits the bit
    assert not after and cleared == SUBNORMAL
    assert not denormals_flushed()  # this (main) thread never asked


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("flush", [True, False])
@pytest.mark.parametrize("size", [4, 40_000], ids=["one-thread loop", "parallel loop"])  # SERIAL_BELOW: 32,768
def test_the_shards_kernels_flush_results_below_the_normal_range_unless_told_not_to(flush, size):
    from rayps.server import ParameterServer
    from rayps.updaters import Sgd

    if not _on_thread(lambda: flush_denormals(True)):
        pytest.skip("no flush-to-zero switch on this machine (not x86-64 with numba)")
    params = {"w": np.resize(np.array([BIG, BIG, 1.0, -1.0], dtype=np.float32), size)}
    grads = {"w": np.resize(np.array([SMALL, -SMALL, 0.25, 0.5], dtype=np.float32), size)}
    ps = ParameterServer(params, Sgd(learning_rate=1.0), cpus_per_shard=0, flush_denormals=flush)
    try:
        ps.push(grads)
        got = ps.pull()["w"]
    finally:
        ps.shutdown()
    expected = params["w"] - grads["w"]  # NumPy on this thread: IEEE float32
    assert expected[0] == SUBNORMAL
    if flush:
        expected[0::4] = 0.0
    np.testing.assert_array_equal(got, expected, strict=True)


def test_the_server_option_is_checked():
    from rayps.server import ParameterServer

    with pytest.raises(ValueError, match="flush_denormals must be True or False"):
        ParameterServer({"w": np.zeros(2, np.float32)}, flush_denormals="yes")
