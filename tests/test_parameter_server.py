"""ParameterServer on a local Ray (the session's ``ray_session``): the issue's "Must show" and "Bad input" lists.

* async, one writer: the pulled parameters equal every updater applied to the pushes in order, 1..4 shards,
  float32 and float64, split tensors included (one server per shard count; each of the eleven updaters is its
  own ParamGroup over its own parameters, so one server exercises every rule);
* sync with 3 workers (pickled copies of the handle, each its own client): the updater applied to the mean;
* ssp: a deliberately slow worker never lets the fast one get more than ``s`` clocks ahead;
* read-your-writes, pull of a subset, caller-owned arrays, per-group updaters with gradient normalization,
  the handle inside a Ray actor; bad pushes and bad configs rejected with the shards' state unchanged.

The reference is each parameter's updater applied here with ``kernel="reference"`` (its math is held to
hand-written formulas in test_updaters.py), with one iteration counter per parameter.
"""

from __future__ import annotations

import pickle
import re
import threading
import time

import numpy as np
import pytest

from rayps.updaters import (ALL_UPDATERS, L2, AdaBelief, AdaDelta, AdaGrad, AdaMax, Adam, AMSGrad, Nadam,
                            Nesterovs, NoOp, ParameterUpdater, ParamGroup, RmsProp, Sgd, WeightDecay)
from rayps.updaters.groups import as_groups, assign_groups

from state_invariants import validate_shards

TOLERANCE = {np.dtype(np.float32): dict(rtol=5e-6, atol=1e-6), np.dtype(np.float64): dict(rtol=1e-12, atol=1e-14)}
PUSHES = 5
WAIT_SECONDS = 120  # a generous deadline for conditions the tests wait on (never asserted as a time)


class Reference:
    """Each parameter's own updater, state and iteration counter, stepped with the plain reference kernel.

    A 0-d parameter is stepped as a 1-element vector (elementwise the same math): updaters/' reference path
    loses the state of 0-d arrays, a separate bug, so the reference sidesteps it.
    """

    def __init__(self, params, updater):
        groups = as_groups(updater)
        group_of = assign_groups(groups, list(params))
        self.updaters = {n: groups[group_of[n]].updater for n in params}
        self.shapes = {n: a.shape for n, a in params.items()}
        self._params = {n: np.array(a, copy=True).reshape(a.shape or (1,)) for n, a in params.items()}
        self.state = {n: self.updaters[n].init(self._params[n]) for n in params}
        self.iteration = {n: 0 for n in params}

    @property
    def params(self):
        return {n: a.reshape(self.shapes[n]).copy() for n, a in self._params.items()}

    def apply(self, grads):
        for name, g in grads.items():
            g = np.ascontiguousarray(g).reshape(self._params[name].shape)
            self.updaters[name].apply(self._params[name], g, self.state[name], self.iteration[name], 0,
                                      kernel="reference")
            self.iteration[name] += 1


def _grads(rng, params, names=None, scale=1.0):
    names = list(params) if names is None else names
    return {n: np.array(rng.normal(size=params[n].shape) * scale, dtype=params[n].dtype) for n in names}


def assert_params_close(got, expected, names=None):
    for name in names or expected:
        assert got[name].shape == expected[name].shape and got[name].dtype == expected[name].dtype, name
        np.testing.assert_allclose(got[name], expected[name], err_msg=name, **TOLERANCE[got[name].dtype])


def assert_bit_identical(got, expected):
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name, strict=True)


def wait_until(condition, what):
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


# -- async, one writer: every updater, 1..4 shards, float32 and float64, split tensors ---------------------------

UPDATERS = {"Sgd": Sgd(learning_rate=0.1), "Nesterovs": Nesterovs(learning_rate=0.1, momentum=0.9),
            "AdaGrad": AdaGrad(learning_rate=0.2), "RmsProp": RmsProp(learning_rate=0.05), "AdaDelta": AdaDelta(),
            "Adam": Adam(learning_rate=0.05), "AdaMax": AdaMax(learning_rate=0.05), "Nadam": Nadam(learning_rate=0.05),
            "AMSGrad": AMSGrad(learning_rate=0.05), "AdaBelief": AdaBelief(learning_rate=0.05), "NoOp": NoOp()}
DTYPES = {"f32": np.float32, "f64": np.float64}
# which (updater, dtype) owns a tensor big enough to be split, per shard count: a tensor is split when it is
# larger than total / shards, so at most shards - 1 of them can be; across the servers six rules get one
SPLIT = {1: [], 2: [("Adam", "f32")], 3: [("Nesterovs", "f64"), ("AdaBelief", "f32")],
         4: [("AdaDelta", "f64"), ("Nadam", "f32"), ("AMSGrad", "f64")]}
SMALL_SHAPES = [(2, 3), (4,), (), (3, 1)]


def test_the_matrix_covers_every_updater():
    assert set(UPDATERS) == {cls.__name__ for cls in ALL_UPDATERS}
    assert {type(u).__name__ for u in UPDATERS.values()} == set(UPDATERS)


def _matrix_params(num_shards, rng):
    params, groups = {}, []
    for index, name in enumerate(UPDATERS):
        members = []
        for offset, (suffix, dtype) in enumerate(DTYPES.items()):
            key = f"{name}.{suffix}"
            params[key] = np.asarray(rng.normal(size=SMALL_SHAPES[(index + offset) % len(SMALL_SHAPES)])).astype(dtype)
            members.append(key)
        for split_name, suffix in SPLIT[num_shards]:
            if split_name == name:
                key = f"{name}.{suffix}.big"  # 1280 bytes: larger than all the small tensors together
                rows = 80 if suffix == "f32" else 40
                params[key] = rng.normal(size=(rows, 4)).astype(DTYPES[suffix])
                members.append(key)
        groups.append(ParamGroup(UPDATERS[name], names=tuple(members), name=name))
    return params, groups


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda k: f"shards={k}")
def async_run(request, ray_session):
    """One server per shard count; PUSHES pushes (full and partial) from one writer, then one pull."""
    from rayps.server import ParameterServer

    num_shards = request.param
    rng = np.random.default_rng(num_shards)
    params, groups = _matrix_params(num_shards, rng)
    ps = ParameterServer(params, updater=groups, num_shards=num_shards)
    try:
        for name, _ in SPLIT[num_shards]:  # the premise: each big tensor really spans several shards
            pieces = ps.layout.pieces_of[next(k for k in params if k.startswith(name) and k.endswith(".big"))]
            assert len({p.shard for p in pieces}) > 1
        reference = Reference(params, groups)
        names = list(params)
        key_sets = [names, names, names[0::2], names, names[1::2]]
        assert len(key_sets) == PUSHES
        for keys in key_sets:
            grads = _grads(rng, params, keys)
            ps.push(grads)  # no flush: the pull below must see every push of this handle
            reference.apply(grads)
        pulled = ps.pull()
        stats = ps.stats()
        assert validate_shards(ps) == num_shards
    finally:
        ps.shutdown()
    assert stats["updates_applied"] == PUSHES and stats["pushes"] == PUSHES
    assert stats["num_shards"] == num_shards
    return {"params": params, "pulled": pulled, "reference": reference.params, "num_shards": num_shards}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("updater", list(UPDATERS))
def test_async_one_writer_equals_the_updater_applied_to_the_pushes_in_order(async_run, updater, dtype):
    names = [k for k in async_run["params"] if k.startswith(f"{updater}.{dtype}")]
    assert names
    assert_params_close(async_run["pulled"], async_run["reference"], names)
    for name in names:
        moved = not np.array_equal(async_run["pulled"][name], async_run["params"][name])
        assert moved is (updater != "NoOp"), name


# -- sync: 3 workers, the mean of each step -----------------------------------------------------------------------


def test_sync_with_three_workers_equals_the_updater_applied_to_each_steps_mean(ray_session):
    from rayps.server import ParameterServer

    rng = np.random.default_rng(20)
    params = {"W": rng.normal(size=(16, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32),
              "v": rng.normal(size=4), "s": np.array(0.5)}
    updater = Adam(learning_rate=0.05)
    ps = ParameterServer(params, updater=updater, num_shards=2, consistency="sync", num_workers=3,
                         pull_timeout=WAIT_SECONDS)
    try:
        assert len({p.shard for p in ps.layout.pieces_of["W"]}) == 2  # a split tensor
        workers = [pickle.loads(pickle.dumps(ps)) for _ in range(3)]
        assert len({w.client_id for w in workers} | {ps.client_id}) == 4  # each copy is its own client
        steps = [[_grads(rng, params) for _ in range(3)] for _ in range(3)]
        reference = Reference(params, updater)

        def mean(pushes):
            return {n: (sum(g[n].astype(np.float64) for g in pushes) / 3).astype(params[n].dtype) for n in params}

        workers[0].push(steps[0][0], worker_id=0)
        workers[1].push(steps[0][1], worker_id=1)
        workers[0].flush()
        workers[1].flush()
        assert_bit_identical(ps.pull(), params)  # step 0 waits for worker 2
        assert ps.stats()["updates_applied"] == 0
        workers[2].push(steps[0][2], worker_id=2)
        workers[2].flush()
        reference.apply(mean(steps[0]))
        assert_params_close(ps.pull(), reference.params)

        # worker 0 runs two steps ahead; the others arrive in another order
        workers[0].push(steps[1][0], worker_id=0)
        workers[0].push(steps[2][0], worker_id=0)
        workers[2].push(steps[1][2], worker_id=2)
        workers[1].push(steps[1][1], worker_id=1)
        workers[1].push(steps[2][1], worker_id=1)
        workers[2].push(steps[2][2], worker_id=2)
        reference.apply(mean(steps[1]))
        reference.apply(mean(steps[2]))
        for worker_id, worker in enumerate(workers):  # a worker's pull returns once its steps are applied
            assert_params_close(worker.pull(worker_id=worker_id), reference.params)
        stats = ps.stats()
        assert stats["updates_applied"] == 3 and stats["consistency"] == "sync"
        assert all(s["sync_clock"] == 3 for s in stats["shards"])
        assert validate_shards(ps) == 2
    finally:
        ps.shutdown()


# -- ssp: a slow worker holds the fast one back -------------------------------------------------------------------


def test_ssp_a_slow_worker_never_lets_another_run_more_than_s_clocks_ahead(ray_session):
    from rayps.server import ParameterServer

    staleness, fast_steps = 1, 5
    rng = np.random.default_rng(21)
    params = {"w": rng.normal(size=(8, 2)), "b": rng.normal(size=2)}
    ps = ParameterServer(params, updater=Sgd(learning_rate=0.1), num_shards=1, consistency="ssp",
                         staleness=staleness, num_workers=2, pull_timeout=WAIT_SECONDS)
    fast, slow = pickle.loads(pickle.dumps(ps)), pickle.loads(pickle.dumps(ps))
    lock = threading.Lock()
    slow_sent = [0]  # slow pushes SENT (counted before sending: an upper bound of those applied)
    fast_done = [0]  # fast steps whose pull has returned
    observed = []  # (fast clock, slow pushes sent) when each fast pull returned
    errors = []

    def fast_worker():
        try:
            fast.pull(worker_id=0)
            for clock in range(1, fast_steps + 1):
                fast.push_pull(_grads(np.random.default_rng(clock), params), worker_id=0)
                with lock:
                    observed.append((clock, slow_sent[0]))
                    fast_done[0] = clock
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    def fast_clock_everywhere():
        return min(s["clocks"].get(0, 0) for s in ps.stats()["shards"])

    thread = threading.Thread(target=fast_worker, daemon=True)
    thread.start()
    try:
        for slow_clock in range(fast_steps):
            target = min(fast_steps, slow_clock + staleness + 1)
            # the fast worker gets to push clock slow + s + 1 (its pull after it must then wait) ...
            wait_until(lambda: fast_clock_everywhere() >= target or errors, f"fast clock {target}")
            assert not errors, errors
            with lock:
                # ... and no pull of it after clock slow + s can have returned while slow has pushed slow_clock
                assert fast_done[0] <= slow_clock + staleness, (fast_done[0], slow_clock)
                slow_sent[0] += 1
            slow.push(_grads(rng, params), worker_id=1)
            slow.flush()
        thread.join(WAIT_SECONDS)
        assert not thread.is_alive() and not errors, errors
        assert [clock for clock, _ in observed] == list(range(1, fast_steps + 1))
        assert all(clock - sent <= staleness for clock, sent in observed), observed
        stats = ps.stats()
        # clocks are compared when a push lands: the fast worker's push may make the gap s + 1, never more;
        # this run drove it to exactly that bound
        assert stats["max_clock_gap"] == staleness + 1
        assert stats["updates_applied"] == 2 * fast_steps
        assert validate_shards(ps) == 1
    finally:
        ps.shutdown()


# -- one shared async server for the API and bad-input tests --------------------------------------------------------


@pytest.fixture(scope="module")
def sgd_server(ray_session):
    """Sgd (stateless, so any state is a fine starting point for the reference), 2 shards, W split."""
    from rayps.server import ParameterServer

    rng = np.random.default_rng(30)
    params = {"W": rng.normal(size=(12, 3)), "b": rng.normal(size=3).astype(np.float32),
              "v": rng.normal(size=5), "s": np.array(2.0)}
    ps = ParameterServer(params, updater=Sgd(learning_rate=0.5), num_shards=2)
    assert len({p.shard for p in ps.layout.pieces_of["W"]}) == 2
    yield ps
    try:
        assert validate_shards(ps) == 2  # after every test that used it, bad pushes included
    finally:
        ps.shutdown()


def _sgd_reference(start, grads):
    reference = Reference(start, Sgd(learning_rate=0.5))
    reference.apply(grads)
    return reference.params


def test_read_your_writes_a_pull_right_after_a_push_sees_it(sgd_server):
    rng = np.random.default_rng(31)
    current = sgd_server.pull()
    for keys in (["W", "b", "v", "s"], ["W"], ["s", "b"], ["v", "W"]):
        grads = _grads(rng, current, keys)
        sgd_server.push(grads)
        pulled = sgd_server.pull()  # no flush in between
        assert_params_close(pulled, _sgd_reference(current, grads))
        current = pulled


def test_pull_of_a_subset_returns_caller_owned_arrays_in_the_original_shapes_and_dtypes(sgd_server):
    full = sgd_server.pull()
    subset = sgd_server.pull(names=["s", "W"])
    assert set(subset) == {"s", "W"}
    assert subset["W"].shape == (12, 3) and subset["W"].dtype == np.float64
    assert subset["s"].shape == () and subset["s"].dtype == np.float64
    assert_bit_identical(subset, {n: full[n] for n in ("s", "W")})
    single = sgd_server.pull(names=["b"])
    assert set(single) == {"b"} and single["b"].dtype == np.float32 and single["b"].shape == (3,)
    for arrays in (full, subset, single):
        for array in arrays.values():
            assert array.flags.writeable
    subset["W"][...] = 0.0  # the caller's to change: the server and other pulls are unaffected
    full["b"] += 1.0
    np.testing.assert_array_equal(sgd_server.pull(names=["W"])["W"], full["W"])
    assert not np.shares_memory(sgd_server.pull()["b"], full["b"])
    with pytest.raises(ValueError, match="nope"):
        sgd_server.pull(names=["W", "nope"])


def test_a_non_contiguous_but_valid_gradient_is_accepted_and_applied(sgd_server):
    rng = np.random.default_rng(32)
    start = sgd_server.pull()
    grads = {"W": np.asfortranarray(rng.normal(size=(12, 3))), "v": rng.normal(size=10)[::2],
             "b": rng.normal(size=(3, 2)).astype(np.float32)[:, 1]}
    assert not any(g.flags.c_contiguous for g in (grads["v"], grads["b"])) and not grads["W"].flags.c_contiguous
    sgd_server.push(grads)
    sgd_server.flush()
    contiguous = {n: np.ascontiguousarray(g) for n, g in grads.items()}
    assert_params_close(sgd_server.pull(), _sgd_reference(start, contiguous))


BAD_PUSHES = [
    ("unknown key", lambda p: {"nope": np.ones(3)}, ValueError, "'nope'"),
    ("unknown key beside a good one", lambda p: {"b": np.ones(3, np.float32), "nope": np.ones(3)}, ValueError,
     "'nope'"),
    ("transposed shape", lambda p: {"W": np.ones((3, 12))}, ValueError, "'W'"),
    ("0-d for a 1-d param", lambda p: {"b": np.array(1.0, np.float32)}, ValueError, "'b'"),
    ("integer dtype", lambda p: {"b": np.ones(3, np.int64)}, TypeError, "'b'"),
    ("complex dtype", lambda p: {"v": np.ones(5, np.complex128)}, TypeError, "'v'"),
    ("object dtype", lambda p: {"v": np.array([1.0, 2.0, None, 4.0, 5.0], dtype=object)}, TypeError, "'v'"),
    ("list instead of an array", lambda p: {"b": [1.0, 2.0, 3.0]}, TypeError, "'b'"),
    ("string instead of a mapping", lambda p: "W", TypeError, "grads"),
    ("None instead of a mapping", lambda p: None, TypeError, "grads"),
    ("list instead of a mapping", lambda p: [np.ones((12, 3))], TypeError, "grads"),
    ("empty mapping", lambda p: {}, ValueError, "grads"),
    ("NaN in a split tensor", lambda p: {"W": np.where(np.arange(36).reshape(12, 3) == 31, np.nan, 1.0)},
     ValueError, "'W'"),
    ("+Inf", lambda p: {"b": np.array([0.0, np.inf, 1.0], np.float32), "v": np.ones(5)}, ValueError, "'b'"),
    ("-Inf in a 0-d param", lambda p: {"s": np.array(-np.inf), "W": np.ones((12, 3))}, ValueError, "'s'"),
]


@pytest.mark.parametrize("make,error,key", [pytest.param(m, e, k, id=i) for i, m, e, k in BAD_PUSHES])
def test_a_bad_push_is_rejected_naming_the_key_and_changes_no_shard(sgd_server, make, error, key):
    before = sgd_server.pull()
    applied = sgd_server.stats()["updates_applied"]
    with pytest.raises(error, match=re.escape(key)):
        sgd_server.push(make(before))
        sgd_server.flush()  # at the latest here
    assert_bit_identical(sgd_server.pull(), before)
    assert sgd_server.stats()["updates_applied"] == applied
    # the handle stays usable
    good = {"v": np.full(5, 0.25)}
    sgd_server.push(good)
    assert_params_close(sgd_server.pull(), _sgd_reference(before, good))


def test_nan_policy_skip_drops_a_non_finite_push_and_counts_it(ray_session):
    from rayps.server import ParameterServer

    rng = np.random.default_rng(33)
    params = {"a": rng.normal(size=4).astype(np.float32), "m": rng.normal(size=(2, 2))}
    ps = ParameterServer(params, updater=Adam(learning_rate=0.1), nan_policy="skip")
    try:
        bad = _grads(rng, params)
        bad["m"][1, 0] = np.nan
        ps.push(bad)
        ps.flush()
        assert_bit_identical(ps.pull(), params)
        stats = ps.stats()
        assert stats["nonfinite_skipped"] == 1 and stats["updates_applied"] == 0
        good = _grads(rng, params)  # the skipped push used no iteration: this is iteration 0
        ps.push(good)
        reference = Reference(params, Adam(learning_rate=0.1))
        reference.apply(good)
        assert_params_close(ps.pull(), reference.params)
        assert ps.stats()["updates_applied"] == 1
        assert validate_shards(ps) == 1
    finally:
        ps.shutdown()


# -- per-group updaters, gradient normalization, the handle inside an actor ----------------------------------------


def test_per_group_updaters_and_gradient_normalization_equal_a_local_parameter_updater(ray_session):
    from rayps.server import ParameterServer

    rng = np.random.default_rng(40)
    params = {"W0": rng.normal(size=(12, 4)).astype(np.float32), "b0": rng.normal(size=4).astype(np.float32),
              "W1": rng.normal(size=(4, 3)), "b1": rng.normal(size=3)}
    groups = [
        ParamGroup(Adam(learning_rate=0.05), names=("W0", "b0"), gradient_normalization="RenormalizeL2PerLayer",
                   name="layer0"),
        ParamGroup(Sgd(learning_rate=0.1), names=("W1",), gradient_normalization="ClipL2PerParamType",
                   gradient_normalization_threshold=0.5, regularization=(L2(0.01),), name="W1"),
        ParamGroup(Nesterovs(learning_rate=0.05), gradient_normalization="ClipElementWiseAbsoluteValue",
                   gradient_normalization_threshold=0.3, regularization=(WeightDecay(0.02),), name="rest"),
    ]
    ps = ParameterServer(params, updater=groups, num_shards=2)
    try:
        assert len({p.shard for p in ps.layout.pieces_of["W0"]}) == 2  # the layer's norm spans both shards
        local = {n: a.copy() for n, a in params.items()}
        updater = ParameterUpdater(groups, list(params))
        state = updater.init(local)
        for iteration in range(4):
            grads = _grads(rng, params, scale=3.0)  # large enough that every clip acts
            ps.push(grads)
            updater.apply(local, grads, state, iteration, kernel="reference")
        assert_params_close(ps.pull(), local)
    finally:
        ps.shutdown()


def test_the_handle_is_serializable_and_pushes_from_inside_a_ray_actor(sgd_server, ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Pusher:  # defined here so that Ray ships it by value
        def __init__(self, server):
            self.server = server

        def push(self, grads):
            self.server.push(grads, worker_id=0)
            self.server.flush()
            return self.server.client_id

        def pull(self):
            return self.server.pull()

    before = sgd_server.pull()
    grads = {"W": np.full((12, 3), 0.5), "s": np.array(-1.0)}
    pusher = Pusher.remote(sgd_server)
    try:
        client_id = ray.get(pusher.push.remote(grads))
        assert client_id != sgd_server.client_id  # the copy is its own client
        expected = _sgd_reference(before, grads)
        assert_params_close(sgd_server.pull(), expected)
        assert_params_close(ray.get(pusher.pull.remote()), expected)
    finally:
        ray.kill(pusher)
    copy = pickle.loads(pickle.dumps(sgd_server))
    copy.shutdown()  # only the handle that created the shards may kill them
    assert_params_close(sgd_server.pull(names=["s"]), {"s": expected["s"]})


# -- config errors ------------------------------------------------------------------------------------------------

GOOD = {"w": np.zeros(3)}
BAD_CONFIGS = [
    ("empty params", dict(params={}), ValueError, "params"),
    ("params not a mapping", dict(params=[np.zeros(3)]), TypeError, "params"),
    ("integer params", dict(params={"w": np.zeros(3, dtype=np.int64)}), TypeError, "'w'"),
    ("complex params", dict(params={"w": np.zeros(3, dtype=np.complex64)}), TypeError, "'w'"),
    ("non-finite params", dict(params={"w": np.array([0.0, np.nan])}), ValueError, "'w'"),
    ("num_shards=0", dict(num_shards=0), ValueError, "num_shards"),
    ("num_shards=-2", dict(num_shards=-2), ValueError, "num_shards"),
    ("unknown consistency", dict(consistency="eventual"), ValueError, "consistency"),
    ("negative staleness", dict(staleness=-1), ValueError, "staleness"),
    ("num_workers=0", dict(num_workers=0), ValueError, "num_workers"),
    ("unknown nan_policy", dict(nan_policy="ignore"), ValueError, "nan_policy"),
    ("a string as updater", dict(updater="adam"), TypeError, "updater"),
    ("an updater class, not an instance", dict(updater=Adam), TypeError, "updater"),
    ("a list holding a non-group", dict(updater=[Adam()]), TypeError, "updater"),
    ("a group naming an unknown parameter", dict(updater=[ParamGroup(Adam(), names=("x",))]), ValueError, "'x'"),
]


@pytest.mark.parametrize("kwargs,error,field", [pytest.param(k, e, f, id=i) for i, k, e, f in BAD_CONFIGS])
def test_a_bad_config_is_rejected_naming_the_field(ray_session, kwargs, error, field):
    from rayps.server import ParameterServer

    kwargs = dict(kwargs)
    params = kwargs.pop("params", GOOD)
    with pytest.raises(error, match=re.escape(field)):
        ParameterServer(params, **kwargs)


def test_push_copy_false_sends_the_callers_arrays_and_copy_true_keeps_its_own(sgd_server):
    """``push(copy=False)``: applied from the caller's arrays (unchanged until flush); the default copies, so
    changing the array right after ``push`` returns changes nothing. Reference: plain float64 SGD."""
    ps = sgd_server
    start = ps.pull()
    grads = {n: np.full_like(v, 0.25) for n, v in start.items()}
    ps.push(grads, copy=False)
    ps.flush()
    after = ps.pull()
    for n in start:
        np.testing.assert_allclose(after[n], start[n].astype(np.float64) - 0.5 * 0.25, rtol=1e-6)
    mutable = {n: np.full_like(v, 0.5) for n, v in start.items()}
    ps.push(mutable)
    for v in mutable.values():
        v[...] = 1e6  # after push returned: must not reach the shards
    ps.flush()
    final = ps.pull()
    for n in start:
        np.testing.assert_allclose(final[n], after[n].astype(np.float64) - 0.5 * 0.5, rtol=1e-6)


def test_as_worker_and_at_seq_refuse_what_they_cannot_mean(sgd_server):
    """``as_worker`` after a push (the identity would split a sequence) and a bad ``at_seq`` are refused,
    naming the field; the server is unchanged."""
    ps = pickle.loads(pickle.dumps(sgd_server))  # a handle of its own (a worker's copy)
    before = ps.pull()
    with pytest.raises(ValueError, match="worker_id must be an integer >= 0"):
        ps.as_worker(-1)
    with pytest.raises(ValueError, match="at_seq must be an integer >= 0 and comes with a worker_id"):
        ps.pull(at_seq=0)
    with pytest.raises(ValueError, match="at_seq must be an integer >= 0"):
        ps.pull(worker_id=0, at_seq=-1)
    ps.tick(worker_id=0)
    ps.flush()
    with pytest.raises(RuntimeError, match="as_worker must come before this handle's first push"):
        ps.as_worker(0)
    after = ps.pull()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_small_pushes_to_a_busy_shard_travel_in_batches_and_each_is_applied_once(ray_session):
    """Pushes made faster than a shard applies them are held and sent several to a message (server/shard_links.py);
    each is applied on its own, in order: the parameters equal float32 SGD applied push by push in NumPy (the
    fused Sgd kernel computes ``p - lr * g`` in float32, bit for bit), and the counters see every push."""
    from rayps.server import ParameterServer

    rng = np.random.default_rng(40)
    start = {"w": rng.normal(size=256).astype(np.float32), "u": rng.normal(size=(4, 8)).astype(np.float32)}
    ps = ParameterServer(start, updater=Sgd(learning_rate=0.125), num_shards=2)
    try:
        expected = {name: value.copy() for name, value in start.items()}
        pushes = 600
        for _ in range(pushes):
            grads = {name: rng.normal(size=value.shape).astype(np.float32) for name, value in start.items()}
            ps.push(grads)
            for name, grad in grads.items():
                expected[name] = expected[name] - np.float32(0.125) * grad
        ps.flush()
        pulled = ps.pull()
        for name in start:
            np.testing.assert_array_equal(pulled[name], expected[name], err_msg=name)
        stats = ps.stats()
        assert stats["updates_applied"] == pushes and stats["duplicates_dropped"] == 0
        assert stats["pushes_batched"] > 0  # the pushes outran the shards: some travelled in batches
        assert validate_shards(ps) == 2
    finally:
        ps.shutdown()


def test_a_push_to_an_idle_shard_goes_at_once_without_a_flush(ray_session):
    """A push that finds nothing of this handle unacknowledged is sent when ``push`` returns, not held: the shard
    applies it while the handle makes no other call (watched through Ray, the control plane)."""
    import ray

    from rayps.server import ParameterServer

    ps = ParameterServer({"w": np.zeros(8, np.float32)}, updater=Sgd(learning_rate=1.0), num_shards=1)
    try:
        for step in range(1, 4):
            ps.push({"w": np.ones(8, np.float32)})
            deadline = time.monotonic() + WAIT_SECONDS
            while ray.get(ps.shard_actors[0].stats.remote())["updates_applied"] < step:
                assert time.monotonic() < deadline, f"push {step} was not applied without a flush"
                time.sleep(0.01)
        ps.flush()
        np.testing.assert_array_equal(ps.pull()["w"], np.full(8, -3.0, np.float32))
        assert ps.stats()["pushes_batched"] == 0
    finally:
        ps.shutdown()
