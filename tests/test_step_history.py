"""The earlier steps a sync-mode shard keeps for restarted workers (server/sync_steps.py), without Ray.

The reference is a plain list: the parameters read after every step, and the rule "keep the steps from
``min over clients of their low water`` on (with checkpoints), else only the step before the last; at most
``history_bytes``". ``read_at`` must return exactly the recorded parameters of a kept step and None for a
dropped one; a ``ShardService`` read from a worker that recomputes pushes the shard already applied gets them.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState
from rayps.server.protocol import PullRequest, PushMessage, Reply
from rayps.server.shard_service import ShardService
from rayps.updaters import Adam
from rayps.updaters.groups import as_groups

WORKERS = 2


def _shard(keep_for_recovery: bool):
    shapes, dtypes = {"w": (6,), "b": (2,)}, {"w": "float32", "b": "float64"}
    layout = ParameterLayout.build(shapes, dtypes, 1, {"w": 0, "b": 0})
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=6).astype(np.float32), "b": rng.normal(size=2)}
    state = ShardState(0, layout.shard_pieces[0], as_groups(Adam(learning_rate=0.1)), layout.pack(0, params)[0],
                       consistency="sync", num_workers=WORKERS)
    state.keep_for_recovery = keep_for_recovery
    return layout, state


def _grads(layout, rng):
    return layout.pack(0, {"w": rng.normal(size=6).astype(np.float32), "b": rng.normal(size=2)})


def _run_steps(layout, state, steps, low_water=None, rng=None):
    """``steps`` BSP steps (both workers push each clock); ``low_water(step)``: (w0, w1) reported with the
    pushes of that step. Returns the parameters after every step, index = steps applied (the reference)."""
    rng = rng or np.random.default_rng(5)
    seen = [{d: a.copy() for d, a in state.read().items()}]
    for step in range(state.sync_clock, state.sync_clock + steps):
        for worker in range(WORKERS):
            if low_water is not None:
                state.report_low_water(f"w{worker}", worker, low_water(step)[worker])
            payload, present = _grads(layout, rng)
            assert state.push(f"w{worker}", step + 1, worker, payload, present).errors == []
        seen.append({d: a.copy() for d, a in state.read().items()})
    return seen


def _assert_kept(state, seen, kept_steps):
    for step, params in enumerate(seen):
        got = state.read_at(step)
        if step in kept_steps:
            assert got is not None, step
            for dtype in params:
                np.testing.assert_array_equal(got[dtype], params[dtype], strict=True)
        else:
            assert got is None, step


def test_without_checkpoints_only_the_step_before_the_last_is_kept():
    layout, state = _shard(keep_for_recovery=False)
    seen = _run_steps(layout, state, 6, low_water=lambda step: (0, 0))  # reports change nothing here
    assert state.sync_clock == 6
    _assert_kept(state, seen, {5, 6})  # 6: the live parameters


def test_with_checkpoints_every_step_back_to_the_lowest_low_water_is_kept():
    layout, state = _shard(keep_for_recovery=True)
    # worker 1's pushes are held by every checkpoint up to 3, worker 0's up to step - 1
    seen = _run_steps(layout, state, 8, low_water=lambda step: (max(step - 1, 0), min(step, 3)))
    _assert_kept(state, seen, set(range(3, 9)))
    # worker 1 hears newer checkpoints: the steps before its new low water go at the next step
    seen += _run_steps(layout, state, 1, low_water=lambda step: (step, 7))[1:]
    _assert_kept(state, seen, set(range(7, 10)))


def test_a_low_water_never_goes_back():
    layout, state = _shard(keep_for_recovery=True)
    state.report_low_water("w1", 1, 4)
    state.report_low_water("w1", 1, 2)  # a restarted process that has not heard the shards yet
    assert state.low_water["w1"] == (1, 4)


def test_history_bytes_bounds_the_steps_kept_oldest_first():
    layout, state = _shard(keep_for_recovery=True)
    size = sum(a.nbytes for a in state.params.values())
    state.history_bytes = 3 * size
    seen = _run_steps(layout, state, 7, low_water=lambda step: (0, 0))
    assert len(state.history) == 3
    _assert_kept(state, seen, {4, 5, 6, 7})


def _push(client, worker, seq, payload, present, pull=True):
    return PushMessage(1, client, seq, worker, 0, payload, present, pull_worker=worker, pull=pull)


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "dropped"])
def test_a_worker_recomputing_pushes_the_shard_has_reads_each_ones_own_step(kept):
    """After 5 steps, worker 1 restarts at 2 (another shard lacked its pushes 3-5): its fused push+pulls 3, 4
    are dropped as duplicates and answered with the parameters after steps 3 and 4 (what pushes 4 and 5 were
    computed on), not the live ones; without checkpoints only step 4 is kept (the step before the last), so
    the reads of steps 3 and 2 get the live ones, counted as inexact."""
    layout, state = _shard(keep_for_recovery=kept)
    seen = _run_steps(layout, state, 5, low_water=lambda step: (step, 2))
    service = ShardService(state, "inc")
    rng = np.random.default_rng(9)
    for seq in (3, 4):
        payload, present = _grads(layout, rng)
        ((_, reply),) = service.handle(b"peer", _push("w1", 1, seq, payload, present), now=0.0)
        assert isinstance(reply, Reply) and reply.params is not None
        expected = seen[seq] if kept or seq == 4 else seen[5]
        for dtype in expected:
            np.testing.assert_array_equal(reply.params[dtype], expected[dtype], strict=True)
    assert state.counters["duplicates_dropped"] == 2
    assert state.counters["resume_reads_inexact"] == (0 if kept else 1)
    # a plain read that says where it resumes (``at_seq``) gets the same
    ((_, reply),) = service.handle(b"peer", PullRequest(2, "w1", 4, 1, at_seq=2), now=0.0)
    expected = seen[2] if kept else seen[5]
    for dtype in expected:
        np.testing.assert_array_equal(reply.params[dtype], expected[dtype], strict=True)
    assert state.counters["resume_reads_inexact"] == (0 if kept else 2)


def test_a_worker_that_is_not_behind_reads_the_live_parameters():
    layout, state = _shard(keep_for_recovery=True)
    seen = _run_steps(layout, state, 3, low_water=lambda step: (0, 0))
    service = ShardService(state, "inc")
    ((_, reply),) = service.handle(b"peer", PullRequest(1, "w0", 3, 0), now=0.0)
    for dtype in seen[3]:
        np.testing.assert_array_equal(reply.params[dtype], seen[3][dtype], strict=True)
    assert state.counters["resume_reads_inexact"] == 0


def test_the_server_hands_its_history_bound_to_each_shard_and_refuses_a_bad_one():
    from rayps.server import ParameterServer
    from rayps.server.shard_spec import ShardOptions, ShardSpec, build_state

    layout, state = _shard(keep_for_recovery=False)
    spec = ShardSpec(0, layout.shard_pieces[0], {d: a.copy() for d, a in state.params.items()})
    for checkpoint_dir, kept in ((None, False), ("/some/dir", True)):
        built = build_state(spec, ShardOptions(state.groups, consistency="sync", num_workers=WORKERS,
                                               checkpoint_dir=checkpoint_dir, history_bytes=12345))
        assert (built.keep_for_recovery, built.history_bytes) == (kept, 12345)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="history_bytes must be an integer >= 0"):
            ParameterServer({"w": np.zeros(3, dtype=np.float32)}, history_bytes=bad)
