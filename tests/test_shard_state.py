"""ShardState (no Ray): the updater math over flat buffers, per-piece iteration counters, exactly-once delivery,
payload checks against a hostile client, SSP/BSP gating and the staleness counters.

The reference is the updater applied here, parameter by parameter, on separate arrays with ``kernel="reference"``
(its math is held to hand-written formulas in test_updaters.py) with one iteration counter per parameter.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState
from rayps.updaters import AdaGrad, Adam, Nesterovs, ParamGroup, RmsProp, Sgd
from rayps.updaters.groups import as_groups, assign_groups
from state_invariants import record_instances, validate_all


@pytest.fixture(autouse=True)
def _invariants_hold_after_each_test(monkeypatch):
    """Every ShardState a test builds passes ``validate()`` when the test is done (tests/state_invariants.py)."""
    made = record_instances(monkeypatch, ShardState)
    yield
    validate_all(made)


TOLERANCE = {np.dtype(np.float32): dict(rtol=2e-6, atol=1e-7), np.dtype(np.float64): dict(rtol=1e-13, atol=1e-15)}


class Reference:
    """Each parameter's own updater, state and iteration counter, stepped with the plain reference kernel.

    A 0-d parameter is stepped as a 1-element vector (the same math elementwise): the reference kernel loses
    the state of 0-d arrays (``state[0]`` of a ``(slots,)`` array is a copy), a bug of updaters/ reported
    separately, so the reference sidesteps it.
    """

    def __init__(self, params, groups):
        group_of = assign_groups(groups, list(params))
        self.updaters = {n: groups[group_of[n]].updater for n in params}
        self.shapes = {n: a.shape for n, a in params.items()}
        self._params = {n: np.array(a, copy=True).reshape(a.shape or (1,)) for n, a in params.items()}
        self.state = {n: self.updaters[n].init(self._params[n]) for n in params}
        self.iteration = {n: 0 for n in params}

    @property
    def params(self):
        return {n: a.reshape(self.shapes[n]) for n, a in self._params.items()}

    def apply(self, grads, epoch=0):
        for name, g in grads.items():
            g = np.asarray(g).reshape(self._params[name].shape)
            self.updaters[name].apply(self._params[name], g, self.state[name], self.iteration[name], epoch,
                                      kernel="reference")
            self.iteration[name] += 1


class Shard:
    """One ShardState over ``params`` (every piece on shard 0 unless ``num_shards`` says otherwise)."""

    def __init__(self, params, updater, num_shards=1, shard=0, **options):
        self.groups = as_groups(updater)
        group_of = assign_groups(self.groups, list(params))
        self.shapes = {n: a.shape for n, a in params.items()}
        self.dtypes = {n: str(a.dtype) for n, a in params.items()}
        self.layout = ParameterLayout.build(self.shapes, self.dtypes, num_shards, group_of)
        self.shard = shard
        self.pieces = self.layout.shard_pieces[shard]
        self.names = sorted({p.name for p in self.pieces})
        self.state = ShardState(shard, self.pieces, self.groups, self.layout.pack(shard, params)[0], **options)

    def push(self, grads, seq, client="c", worker=0):
        payload, present = self.layout.pack(self.shard, grads)
        return self.state.push(client, seq, worker, payload, present).errors

    def params(self):
        """The parameters held by this shard, as whole arrays (NaN where another shard holds the rows)."""
        out = {n: np.full(self.shapes[n], np.nan, dtype=self.dtypes[n]) for n in self.names}
        self.layout.unpack_into(self.shard, self.state.read(), out)
        return out

    def updater_state(self, name):
        """``name``'s updater state slots in this shard, shape ``(slots, size)``."""
        (piece,) = [p for p in self.pieces if p.name == name]
        r = self.state.ranges[(piece.dtype, piece.group)]
        start = piece.offset - r.start
        return self.state.state[(piece.dtype, piece.group)][:, start:start + piece.size]

    def iteration_of(self, name):
        return {int(self.state.iterations[p.index]) for p in self.pieces if p.name == name}

    def snapshot(self):
        return ({d: b.copy() for d, b in self.state.params.items()},
                {k: s.copy() for k, s in self.state.state.items()}, self.state.iterations.copy(),
                self.state.counters["updates_applied"], self.state.version)


def assert_unchanged(before, after):
    params0, state0, its0, applied0, version0 = before
    params1, state1, its1, applied1, version1 = after
    for dtype in params0:
        np.testing.assert_array_equal(params1[dtype], params0[dtype], strict=True)
    for key in state0:
        np.testing.assert_array_equal(state1[key], state0[key], strict=True)
    np.testing.assert_array_equal(its1, its0)
    assert (applied1, version1) == (applied0, version0)


def _params(rng):
    """Mixed float32/float64, 0-d, 1-d and 2-d parameters."""
    return {"W0": rng.normal(size=(4, 3)).astype(np.float32), "b0": rng.normal(size=3).astype(np.float32),
            "W1": rng.normal(size=(3, 2)), "b1": rng.normal(size=2), "gain": np.array(1.5),
            "temp": np.array(0.25, dtype=np.float32)}


def _grads(rng, params, names=None):
    names = list(params) if names is None else names
    return {n: np.asarray(rng.normal(size=params[n].shape)).astype(params[n].dtype) for n in names}


GROUPS = [ParamGroup(Adam(learning_rate=0.05), names=("W0", "W1"), name="weights"),
          ParamGroup(Nesterovs(learning_rate=0.1, momentum=0.9), names=("b0", "b1"), name="biases"),
          ParamGroup(AdaGrad(learning_rate=0.2), name="rest")]


def assert_matches(shard, reference):
    got = shard.params()
    for name in shard.names:
        np.testing.assert_allclose(got[name], reference.params[name], err_msg=name,
                                   **TOLERANCE[np.dtype(shard.dtypes[name])])
        expected_state = reference.state[name].reshape(reference.state[name].shape[0], -1)
        np.testing.assert_allclose(shard.updater_state(name), expected_state, err_msg=f"state of {name}",
                                   **TOLERANCE[np.dtype(shard.dtypes[name])])


# -- the update ------------------------------------------------------------------------------------------------


def test_full_pushes_apply_each_groups_updater_like_the_reference():
    rng = np.random.default_rng(0)
    params = _params(rng)
    shard = Shard(params, GROUPS)
    reference = Reference(params, GROUPS)
    for seq in range(1, 7):
        grads = _grads(rng, params)
        assert shard.push(grads, seq) == []
        reference.apply(grads)
        assert_matches(shard, reference)
    # every push carried every key: each counter is DL4J's iteration (pushes applied so far)
    assert set(shard.state.iterations.tolist()) == {6}
    assert shard.state.counters["updates_applied"] == 6
    for name in params:
        assert not np.array_equal(shard.params()[name], params[name])  # every parameter moved


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_full_push_is_one_fused_step_per_dtype_and_group(dtype):
    """The iteration handed to the updater is the push count, for every rule whose math depends on it."""
    rng = np.random.default_rng(1)
    params = {"a": rng.normal(size=(5, 2)).astype(dtype), "b": rng.normal(size=4).astype(dtype)}
    groups = [ParamGroup(Adam(learning_rate=0.1), names=("a",)), ParamGroup(RmsProp(learning_rate=0.1))]
    shard = Shard(params, groups)
    reference = Reference(params, groups)
    for seq in range(1, 5):
        grads = _grads(rng, params)
        shard.push(grads, seq)
        reference.apply(grads)
    assert_matches(shard, reference)
    assert shard.iteration_of("a") == shard.iteration_of("b") == {4}


def test_partial_pushes_update_only_present_params_and_their_counters():
    rng = np.random.default_rng(2)
    params = _params(rng)
    shard = Shard(params, GROUPS)
    reference = Reference(params, GROUPS)
    key_sets = [list(params), ["W0", "gain"], ["b1"], ["W0", "W1", "b0", "b1"], list(params), ["temp"]]
    for seq, names in enumerate(key_sets, start=1):
        before = shard.params()
        grads = _grads(rng, params, names)
        assert shard.push(grads, seq) == []
        reference.apply(grads)
        after = shard.params()
        for name in params:
            if name not in names:
                np.testing.assert_array_equal(after[name], before[name], strict=True)
        for name in params:
            assert shard.iteration_of(name) == {reference.iteration[name]}, name
        assert_matches(shard, reference)
    assert shard.state.counters["updates_applied"] == len(key_sets)


def test_split_parameter_pieces_keep_counters_in_step_on_their_shard():
    """A parameter split across shards: shard 1 alone, driven with full and partial pushes."""
    rng = np.random.default_rng(3)
    params = {"big": rng.normal(size=(12, 3)), "small": rng.normal(size=2).astype(np.float32)}
    shard = Shard(params, Adam(learning_rate=0.1), num_shards=2, shard=1)
    assert len(shard.layout.pieces_of["big"]) == 2 and "big" in shard.names
    piece = next(p for p in shard.pieces if p.name == "big")
    rows = slice(piece.row_start, piece.row_stop)
    reference = Reference(params, as_groups(Adam(learning_rate=0.1)))
    for seq, names in enumerate([["big", "small"], ["big"], ["small"], ["big", "small"]], start=1):
        grads = _grads(rng, params, names)
        shard.push(grads, seq)
        reference.apply(grads)
    np.testing.assert_allclose(shard.params()["big"][rows], reference.params["big"][rows], rtol=1e-13)
    assert shard.iteration_of("big") == {3}


# -- exactly once ----------------------------------------------------------------------------------------------


def test_duplicate_sequence_numbers_are_dropped_and_counted():
    rng = np.random.default_rng(4)
    params = _params(rng)
    shard = Shard(params, GROUPS)
    reference = Reference(params, GROUPS)
    first, second = _grads(rng, params), _grads(rng, params)
    shard.push(first, 1)
    shard.push(second, 2)
    reference.apply(first)
    reference.apply(second)
    before = shard.snapshot()
    assert shard.push(first, 1) == [] and shard.push(second, 2) == []  # a resend: already applied
    assert_unchanged(before, shard.snapshot())
    assert shard.state.counters["duplicates_dropped"] == 2
    assert_matches(shard, reference)
    # sequence numbers are per client: another client's seq 1 is new
    third = _grads(rng, params)
    shard.push(third, 1, client="other")
    reference.apply(third)
    assert_matches(shard, reference)
    assert shard.state.counters["duplicates_dropped"] == 2


def test_out_of_order_pushes_wait_and_are_applied_in_sequence_order():
    rng = np.random.default_rng(5)
    params = _params(rng)
    shard = Shard(params, GROUPS)
    reference = Reference(params, GROUPS)
    grads = [_grads(rng, params) for _ in range(3)]
    initial = shard.snapshot()
    shard.push(grads[2], 3)
    shard.push(grads[1], 2)
    assert_unchanged(initial, shard.snapshot())  # seq 1 is missing: nothing applied yet
    assert shard.state.stats()["pending"] == 2
    assert shard.state.pull_ready("c", 1, None) is False  # read-your-writes waits for seq 1
    shard.push(grads[1], 2)  # the same early message again: dropped
    assert shard.state.counters["duplicates_dropped"] == 1
    shard.push(grads[0], 1)
    for g in grads:
        reference.apply(g)
    assert_matches(shard, reference)
    assert shard.state.stats()["pending"] == 0 and shard.state.applied_seq["c"] == 3
    assert shard.state.pull_ready("c", 3, None) is True
    assert shard.state.pull_ready("c", 4, None) is False


# -- payload checks (a client that skipped the handle's validation) ---------------------------------------------


def _payload(shard, grads):
    return shard.layout.pack(shard.shard, grads)


@pytest.mark.parametrize("damage", ["truncated", "longer", "missing dtype", "extra dtype"])
def test_payload_of_the_wrong_size_is_rejected_and_changes_nothing(damage):
    rng = np.random.default_rng(6)
    params = _params(rng)
    shard = Shard(params, GROUPS)
    shard.push(_grads(rng, params), 1)
    payload, present = _payload(shard, _grads(rng, params))
    if damage == "truncated":
        payload["float32"] = payload["float32"][:-1]
    elif damage == "longer":
        payload["float64"] = np.concatenate([payload["float64"], [0.5]])
    elif damage == "missing dtype":
        del payload["float64"]
    else:
        payload["float16"] = np.zeros(2, np.float16)
    before = shard.snapshot()
    errors = shard.state.push("c", 2, 0, payload, present).errors
    assert len(errors) == 1 and "payload sizes" in errors[0] and "shard 0" in errors[0]
    assert_unchanged(before, shard.snapshot())
    # the message was consumed (a resend of seq 2 is a duplicate); the next push applies normally
    good = _grads(rng, params)
    assert shard.push(good, 3) == []
    assert shard.state.counters["updates_applied"] == 2


@pytest.mark.parametrize("key,wrong", [
    ("float32", np.float64),
    ("float64", np.float32),
])
def test_payload_whose_array_dtype_disagrees_with_its_key_is_rejected_and_changes_nothing(key, wrong):
    rng = np.random.default_rng(7)
    params = _params(rng)
    shard = Shard(params, GROUPS)
    payload, present = _payload(shard, _grads(rng, params))
    payload[key] = payload[key].astype(wrong)  # right size, wrong element type
    before = shard.snapshot()
    try:
        errors = shard.state.push("c", 1, 0, payload, present).errors
    except (TypeError, ValueError) as error:
        errors = [str(error)]
    assert errors and "float" in errors[0]
    assert_unchanged(before, shard.snapshot())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_payload_is_rejected_and_the_state_stays_bit_identical(bad):
    rng = np.random.default_rng(8)
    params = _params(rng)
    shard = Shard(params, GROUPS)
    shard.push(_grads(rng, params), 1)
    grads = _grads(rng, params)
    grads["b1"][1] = bad  # the client check is bypassed: pack() copies whatever it is given
    before = shard.snapshot()
    errors = shard.push(grads, 2)
    assert len(errors) == 1 and "non-finite" in errors[0] and "'b1'" in errors[0]
    assert_unchanged(before, shard.snapshot())
    assert shard.state.counters["nonfinite_rejected"] == 1
    assert shard.state.counters["nonfinite_skipped"] == 0


def test_non_finite_payload_with_nan_policy_skip_is_dropped_and_counted():
    rng = np.random.default_rng(9)
    params = _params(rng)
    shard = Shard(params, GROUPS, nan_policy="skip")
    reference = Reference(params, GROUPS)
    grads = _grads(rng, params)
    grads["W0"][0, 0] = np.nan
    before = shard.snapshot()
    assert shard.push(grads, 1) == []
    assert_unchanged(before, shard.snapshot())
    assert shard.state.counters["nonfinite_skipped"] == 1
    assert shard.state.counters["nonfinite_rejected"] == 0
    assert shard.state.clocks[0] == 1  # the worker's clock still moves
    # the skipped push used no iteration: the next one is iteration 0 of every parameter
    good = _grads(rng, params)
    shard.push(good, 2)
    reference.apply(good)
    assert_matches(shard, reference)
    # a push the client already dropped arrives as payload None
    before = shard.snapshot()
    assert shard.state.push("c", 3, 0, None).errors == []
    assert_unchanged(before, shard.snapshot())
    assert shard.state.counters["nonfinite_skipped"] == 2


# -- consistency: SSP and BSP gating ---------------------------------------------------------------------------


def test_ssp_pull_waits_while_a_worker_is_more_than_s_clocks_ahead_of_the_slowest():
    rng = np.random.default_rng(10)
    params = {"w": rng.normal(size=4)}
    staleness, workers = 2, 3
    shard = Shard(params, Sgd(learning_rate=0.1), consistency="ssp", staleness=staleness, num_workers=workers)
    clocks = [0] * workers
    seqs = [0] * workers
    largest_gap = 0

    def push(worker):
        nonlocal largest_gap
        seqs[worker] += 1
        clocks[worker] += 1
        shard.push(_grads(rng, params), seqs[worker], client=f"w{worker}", worker=worker)
        largest_gap = max(largest_gap, max(clocks) - min(clocks))

    def check():
        for worker in range(workers):
            expected = clocks[worker] - min(clocks) <= staleness
            assert shard.state.pull_ready(None, 0, worker) is expected, (worker, clocks)
        assert shard.state.pull_ready(None, 0, None) is True  # a pull without a worker (evaluation) never waits

    check()
    for _ in range(staleness + 2):  # worker 0 runs ahead; workers 1 and 2 never push
        push(0)
        check()
    push(1)
    check()  # worker 2 is still at clock 0
    assert shard.state.pull_ready(None, 0, 0) is False
    push(2)
    push(2)
    check()
    assert shard.state.pull_ready(None, 0, 0) is False  # worker 0 at s + 2, the slowest (worker 1) at 1
    push(1)
    check()
    assert shard.state.pull_ready(None, 0, 0) is True  # the slowest is at 2 now: worker 0 is s ahead
    assert shard.state.counters["max_clock_gap"] == largest_gap == staleness + 2
    assert shard.state.counters["updates_applied"] == sum(clocks)  # ssp applies on arrival


def _mean(pushes, params):
    """The per-step mean in each parameter's dtype, summed in the given order."""
    out = {}
    for name in params:
        total = np.zeros_like(params[name])
        for grads in pushes:
            total += grads[name]
        out[name] = total / params[name].dtype.type(len(pushes))
    return out


def test_sync_applies_the_mean_of_all_workers_once_per_clock():
    rng = np.random.default_rng(11)
    params = _params(rng)
    workers = 3
    shard = Shard(params, GROUPS, consistency="sync", num_workers=workers)
    reference = Reference(params, GROUPS)
    seqs = [0] * workers

    def push(worker, grads):
        seqs[worker] += 1
        return shard.push(grads, seqs[worker], client=f"w{worker}", worker=worker)

    step0 = [_grads(rng, params) for _ in range(workers)]
    initial = shard.snapshot()
    push(0, step0[0])
    push(1, step0[1])
    assert_unchanged(initial, shard.snapshot())  # worker 2 has not pushed clock 0
    assert shard.state.pull_ready(None, 0, 0) is False  # worker 0 (clock 1) waits for step 0 ...
    assert shard.state.pull_ready(None, 0, 2) is True  # ... worker 2 (clock 0) does not
    push(2, step0[2])
    mean = _mean([step0[0], step0[1], step0[2]], params)
    reference.apply(mean)
    assert_matches(shard, reference)
    assert shard.state.counters["updates_applied"] == 1 and shard.state.sync_clock == 1
    assert all(shard.state.pull_ready(None, 0, w) for w in range(workers))

    # worker 0 runs two clocks ahead: its pushes wait until the others complete each step
    step1 = [_grads(rng, params) for _ in range(workers)]
    step2 = [_grads(rng, params) for _ in range(workers)]
    push(0, step1[0])
    push(0, step2[0])
    assert shard.state.counters["updates_applied"] == 1
    push(2, step1[2])
    push(1, step1[1])
    mean = _mean([step1[0], step1[2], step1[1]], params)  # summed in arrival order, like the shard
    reference.apply(mean)
    assert_matches(shard, reference)
    assert shard.state.counters["updates_applied"] == 2
    assert shard.state.pull_ready(None, 0, 0) is False  # worker 0's step 2 is not applied yet
    assert shard.state.pull_ready(None, 0, 1) is True
    push(1, step2[1])
    push(2, step2[2])
    mean = _mean([step2[0], step2[1], step2[2]], params)
    reference.apply(mean)
    assert_matches(shard, reference)
    assert shard.state.counters["updates_applied"] == 3
    assert set(shard.state.iterations.tolist()) == {3}
    assert all(shard.state.pull_ready(None, 0, w) for w in range(workers))


def test_staleness_counts_the_updates_applied_since_the_pushing_worker_last_pulled():
    rng = np.random.default_rng(12)
    params = {"w": rng.normal(size=3)}
    shard = Shard(params, Sgd(learning_rate=0.1), num_workers=2)
    seqs = {0: 0, 1: 0}
    last_read = {0: 0, 1: 0}
    applied = 0
    largest = 0

    def push(worker):
        nonlocal applied, largest
        seqs[worker] += 1
        largest = max(largest, applied - last_read[worker])
        shard.push(_grads(rng, params), seqs[worker], client=f"w{worker}", worker=worker)
        applied += 1

    def read(worker):
        shard.state.read(worker_id=worker)
        last_read[worker] = applied

    read(0)
    read(1)
    for _ in range(3):  # worker 1 pulls after each push: never stale
        push(1)
        read(1)
    assert shard.state.counters["max_staleness"] == 0
    push(0)  # worker 0 computed on the version before worker 1's three updates
    assert shard.state.counters["max_staleness"] == largest == 3
    read(0)
    push(0)
    push(1)
    assert shard.state.counters["max_staleness"] == largest == 3
    assert shard.state.stats()["clocks"] == {0: 2, 1: 4}


# -- the fast paths: finiteness from one sum, live reads, per-slot state ---------------------------------------


def test_finite_gradients_whose_sum_overflows_are_accepted_and_applied():
    """The one-pass check sums the payload; a sum that overflows although every value is finite is rechecked."""
    params = {"w": np.zeros(4, dtype=np.float32)}
    shard = Shard(params, Sgd(learning_rate=1e-30))
    grads = {"w": np.full(4, 3e38, dtype=np.float32)}  # float32 sum: inf
    assert shard.push(grads, 1) == []
    reference = Reference(params, as_groups(Sgd(learning_rate=1e-30)))
    reference.apply(grads)
    np.testing.assert_array_equal(shard.params()["w"], reference.params["w"])
    assert shard.state.counters["nonfinite_rejected"] == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_beside_an_overflowing_sum_is_still_rejected(bad):
    params = {"w": np.zeros(4, dtype=np.float32)}
    shard = Shard(params, Sgd(learning_rate=1e-30))
    grads = {"w": np.array([3e38, 3e38, bad, 1.0], dtype=np.float32)}
    before = shard.snapshot()
    errors = shard.push(grads, 1)
    assert len(errors) == 1 and "non-finite" in errors[0] and "'w'" in errors[0]
    assert_unchanged(before, shard.snapshot())


def test_read_copy_false_returns_the_live_buffers_and_copy_true_a_snapshot():
    rng = np.random.default_rng(11)
    params = {"w": rng.normal(size=6).astype(np.float32)}
    shard = Shard(params, Sgd(learning_rate=0.5))
    live = shard.state.read(copy=False)["float32"]
    copied = shard.state.read()["float32"]
    before = copied.copy()
    shard.push({"w": np.ones(6, dtype=np.float32)}, 1)
    np.testing.assert_array_equal(copied, before)  # the copy is a snapshot
    np.testing.assert_array_equal(live, before - np.float32(0.5))  # the live buffer moved with the push
    assert np.shares_memory(live, shard.state.params["float32"])


def test_partial_pushes_update_multi_slot_state_in_place():
    """Adam's two slots (over a page: spaced apart) are each contiguous; a slice of them is updated in place."""
    rng = np.random.default_rng(12)
    params = {"a": rng.normal(size=(600, 3)).astype(np.float32), "b": rng.normal(size=500).astype(np.float32)}
    shard = Shard(params, Adam(learning_rate=0.05))
    (key,) = shard.state.state
    state = shard.state.state[key]
    assert all(state[k].flags.c_contiguous for k in range(2)) and not state.flags.c_contiguous
    reference = Reference(params, as_groups(Adam(learning_rate=0.05)))
    for seq, names in enumerate([["a"], ["b"], ["a", "b"], ["b"]], start=1):
        grads = _grads(rng, params, names)
        assert shard.push(grads, seq) == []
        reference.apply(grads)
    assert shard.state.state[key] is state  # never re-allocated
    assert_matches(shard, reference)
