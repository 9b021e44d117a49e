"""``ShardState.validate()`` and ``RowTableShard.validate()`` (server/shard_invariants.py) can fail: each
invariant is broken on purpose in a state that a real scenario produced, and ``validate()`` must raise
``InvariantError`` naming that invariant. The scenarios themselves (async with early and duplicate pushes,
sync with a forced step and a late push, ssp, row tables under an LRU cap and a TTL) pass it untouched.

The other tests run ``validate()`` after every scenario (tests/state_invariants.py); these show it would
catch a state they left broken.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server import LRUEviction, ShardState, TTLEviction
from rayps.server.layout import Piece
from rayps.server.shard_invariants import InvariantError
from rayps.server.sparse_rows import RowTableShard
from rayps.updaters import Adam, ParamGroup, Sgd

from state_invariants import record_instances, validate_all

GROUPS = (ParamGroup(Adam(learning_rate=0.01), names=("W",), name="adam"), ParamGroup(Sgd(0.1), name="sgd"))
# W (4, 3) float32 in two pieces on this shard (group 0), b (3,) float32 and h (2,) float64 (group 1)
PIECES = (Piece("W", 0, "float32", 0, 2, 0, 6, (2, 3), 0, 0), Piece("W", 0, "float32", 2, 4, 6, 6, (2, 3), 0, 1),
          Piece("b", 0, "float32", 0, 3, 12, 3, (3,), 1, 2), Piece("h", 0, "float64", 0, 2, 0, 2, (2,), 1, 3))
SIZES = {"float32": 15, "float64": 2}


def _grads(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {dtype: rng.standard_normal(size).astype(dtype) for dtype, size in SIZES.items()}


def _table(eviction=None) -> RowTableShard:
    return RowTableShard("emb", 500, 2, np.float32, 0, 1, Sgd(0.1), eviction=eviction)


def _state(consistency="async", num_workers=2, **options) -> ShardState:
    buffers = {dtype: np.linspace(-1, 1, size).astype(dtype) for dtype, size in SIZES.items()}
    return ShardState(0, PIECES, GROUPS, buffers, consistency=consistency, num_workers=num_workers,
                      row_tables={"emb": _table(LRUEviction(40))}, **options)


def _async_scenario() -> ShardState:
    """Two clients, pushes out of order and duplicated (client b's seq 4 waits for 3), one rejected (NaN),
    a partial push of b, rows under the table's cap, pulls by both workers."""
    state = _state("async")
    rng = np.random.default_rng(0)
    for seq in (1, 3, 2, 2, 1):
        state.push("a", seq, 0, _grads(seq), rows={"emb": (rng.integers(0, 500, 30), rng.standard_normal((30, 2)))})
    state.push("b", 1, 1, {"float32": np.ones(3, np.float32)}, present=[2])
    state.push("b", 2, 1, {"float32": np.full(15, np.nan, np.float32), "float64": np.ones(2)})
    state.push("b", 4, 1, _grads(4))
    state.read(worker_id=0)
    state.read([2, 3], worker_id=1)
    assert state.pending_count("b") == 1 and state.applied_seq == {"a": 3, "b": 2}
    assert state.row_tables["emb"].n == 40  # at its cap
    return state


def _sync_scenario() -> ShardState:
    """Sync, two workers: step 0 complete, step 1 forced without worker 1, worker 1's late push dropped,
    worker 0 two steps ahead (steps 2 and 3 wait)."""
    state = _state("sync")
    state.push("a", 1, 0, _grads(1))
    state.push("b", 1, 1, _grads(2))
    state.push("a", 2, 0, _grads(3))
    assert state.force_sync_step()
    state.push("b", 2, 1, _grads(4))  # its step 1 was forced: dropped
    state.push("a", 3, 0, _grads(5))
    state.push("a", 4, 0, _grads(6))
    assert state.sync_clock == 2 and sorted(state.sync_steps) == [2, 3]
    assert state.counters["late_pushes_dropped"] == 1
    return state


def test_real_scenarios_pass_validate():
    _async_scenario().validate()
    _sync_scenario().validate()
    ssp = _state("ssp", staleness=1)
    for seq in range(1, 4):
        ssp.push("a", seq, seq % 2, _grads(seq))
    ssp.validate()
    ttl = _table(TTLEviction(2))
    for step in range(6):
        ttl.push_rows(np.array([step, step + 1, 7]), np.ones((3, 2)))
        ttl.pull_rows(np.array([3, 300]))
    assert ttl.counters["evicted"] > 0
    ttl.validate()


def _set(obj, attr, value):
    setattr(obj, attr, value)


ASYNC_CORRUPTIONS = {
    "params buffers": [
        lambda s: s.params.__setitem__("float32", np.zeros(30, np.float32)[::2]),  # strided, not contiguous
        lambda s: s.params.__setitem__("float32", np.zeros(16, np.float32)),  # the wrong size
        lambda s: s.params.__setitem__("float64", np.zeros(2, np.float32)),  # the wrong dtype
    ],
    "ranges": [lambda s: _set(s.ranges[("float32", 0)], "stop", 13)],
    "state slots": [
        lambda s: s.state.__setitem__(("float32", 0), s.state[("float32", 0)][:, :-1]),
        lambda s: s.state.__setitem__(("float32", 0), s.state[("float32", 0)].astype(np.float64)),
        lambda s: s.state.__setitem__(("float32", 0), np.zeros((12, 2), np.float32).T),  # slots strided
    ],
    "iterations": [
        lambda s: s.iterations.__setitem__(2, -1),
        lambda s: s.iterations.__setitem__(1, s.iterations[1] + 1),  # W's two pieces disagree
        lambda s: _set(s, "iterations", s.iterations.astype(np.int32)),
    ],
    "exactly-once": [
        lambda s: s.applied_seq.__setitem__("a", -1),
        lambda s: s.pending["b"].__setitem__(3, s.pending["b"][4]),  # the next seq left waiting
        lambda s: s.pending.setdefault("a", {}).__setitem__(2, None),  # an applied seq waiting again
    ],
    "clocks": [
        lambda s: s.clocks.__setitem__(1, -2),
        lambda s: s.pulled_version.__setitem__(0, s.version + 1),
    ],
    "sync": [lambda s: _set(s, "sync_clock", 1)],  # async mode never steps
    "counters": [
        lambda s: s.counters.__setitem__("bytes_pulled", -8),
        lambda s: _set(s, "version", s.version + 1),
    ],
    "row tables": [lambda s: s.row_tables.__setitem__("other", s.row_tables.pop("emb"))],
}

SYNC_CORRUPTIONS = {
    "sync": [
        lambda s: s.sync_steps.__setitem__(1, s.sync_steps[2]),  # a step below sync_clock waits
        lambda s: s.sync_steps[2].workers.add(1),  # worker 1's clock (2) is not past clock 2
        lambda s: (s.clocks.__setitem__(1, 3), s.sync_steps[2].workers.add(1)),  # complete, not applied
        lambda s: (s.sync_steps.clear(), _set(s, "sync_clock", 5)),  # past every worker's clock
        lambda s: (s.counters.__setitem__("sync_steps_forced", 0), s.clocks.__setitem__(1, 1)),
        lambda s: s.sync_steps[3].sums.__setitem__("float64", np.zeros(3)),
    ],
}


def _cases(corruptions, scenario=None):
    return [pytest.param(*([scenario] if scenario else []), invariant, corrupt, id=f"{scenario.__name__.strip('_') + '-' if scenario else ''}{invariant}-{i}")
            for invariant, options in corruptions.items() for i, corrupt in enumerate(options)]


@pytest.mark.parametrize("scenario, invariant, corrupt", _cases(ASYNC_CORRUPTIONS, _async_scenario) +
                         _cases(SYNC_CORRUPTIONS, _sync_scenario))
def test_each_broken_shard_invariant_is_caught_and_named(scenario, invariant, corrupt):
    state = scenario()
    state.validate()
    corrupt(state)
    with pytest.raises(InvariantError, match=f"^shard 0: invariant '{invariant}' broken: ") as caught:
        state.validate()
    assert caught.value.invariant == invariant and isinstance(caught.value, AssertionError)


def _duplicate_id(table):
    table._ids[1] = table._ids[0]


ROW_CORRUPTIONS = {
    "row arrays": [lambda t: _set(t, "n", len(t._ids) + 1), lambda t: _set(t, "_values", t._values[:, :1])],
    "row cap": [lambda t: _set(t, "cap", t.n - 1)],
    "row ids": [_duplicate_id, lambda t: t._ids.__setitem__(0, 500)],
    "row index": [lambda t: t.index.delete(t._ids[:1]),
                  lambda t: t.index.update(t._ids[:2], np.array([1, 0]))],  # two ids point at each other's slot
    "row columns": [lambda t: t._iterations.__setitem__(0, -1), lambda t: t._changed.__setitem__(3, t.version + 1),
                    lambda t: t._stamps.__setitem__(0, t.ops + 1)],
    "row clocks": [lambda t: _set(t, "horizon", t.version + 1), lambda t: t.counters.__setitem__("evicted", -1),
                   lambda t: _set(t, "_evicted_logged", t._evicted_logged + 1)],
}


@pytest.mark.parametrize("invariant, corrupt", _cases(ROW_CORRUPTIONS))
def test_each_broken_row_table_invariant_is_caught_and_named(invariant, corrupt):
    table = _async_scenario().row_tables["emb"]
    assert table.counters["evicted"] > 0 and table.n == table.cap
    table.validate()
    corrupt(table)
    with pytest.raises(InvariantError, match=f"^table 'emb' shard 0: invariant '{invariant}' broken: "):
        table.validate()


def test_a_ttl_row_idle_past_its_limit_is_caught():
    table = _table(TTLEviction(2))
    table.push_rows(np.array([1, 2]), np.ones((2, 2)))
    table.validate()
    table.version += 3  # as if three pushes passed without the eviction they imply
    with pytest.raises(InvariantError, match="invariant 'row columns' broken: 2 stored rows idle for more than 2"):
        table.validate()


def test_a_shard_state_checks_its_row_tables(monkeypatch):
    state = _async_scenario()
    state.row_tables["emb"].horizon = -1
    with pytest.raises(InvariantError, match="^table 'emb' shard 0: invariant 'row clocks'"):
        state.validate()


def test_the_teardown_helper_validates_every_instance_a_test_builds(monkeypatch):
    made = record_instances(monkeypatch, ShardState)
    first, second = _state(), _state("sync")
    assert made == [first, second] and validate_all(made) == 2
    second.sync_clock = 3
    with pytest.raises(InvariantError, match="invariant 'sync'"):
        validate_all(made)
