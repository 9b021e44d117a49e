"""Batched pushes (server/push_batches.py): ``ShardState.push_batch`` against the same pushes one by one, no Ray.

The promise held here: ``push_batch(client, seq, worker, stacked, count, epoch)`` ends in the state that ``count``
calls of ``ShardState.push`` (seqs ``seq .. seq + count - 1``) reach, bit for bit — parameters, updater state,
per-piece iterations, applied seqs, pending pushes, clocks, version and every counter but ``apply_seconds`` (a
timing) — and returns what those calls returned together (pushes received, their errors in order). Each test
builds two ``ShardState``s identically (two parameter groups: Adam with an iteration learning-rate schedule and
L2; Nesterovs with an epoch schedule and weight decay; float32 and float64 parameters): A takes batches, B the
same pushes one by one. Cases: the fast path (in order, nothing pending, finite, not sync), a batch held for a
gap, a resend overlapping applied and held pushes, a NaN in one push (reject / skip), sync mode with two workers,
pieces whose iterations diverged after a partial push, and ``ShardService`` acknowledging a batch's last seq.
``split_payload`` is checked against plain slicing.
"""

from __future__ import annotations

import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState
from rayps.server.protocol import PushMessage, Reply, from_frames, to_frames
from rayps.server.push_batches import split_payload
from rayps.server.shard_state import TICK
from rayps.server.shard_service import ShardService
from rayps.updaters import L2, Adam, Nesterovs, ParamGroup, WeightDecay, schedules
from rayps.updaters.groups import assign_groups
from state_invariants import record_instances, validate_all


@pytest.fixture(autouse=True)
def _invariants_hold_after_each_test(monkeypatch):
    """Every ShardState a test builds passes ``validate()`` when the test is done (tests/state_invariants.py)."""
    made = record_instances(monkeypatch, ShardState)
    yield
    validate_all(made)


INCARNATION = "inc-batch"
# group 0 (weights): W1, W3 in the float32 buffer, W2 in the float64 one; group 1 (the rest): b1, gain (float32),
# b2, b3 (float64). Four ranges, two of them with pieces that are not consecutive in the piece list.
SHAPES = {"W1": (5, 3), "W2": (4, 2), "W3": (3, 3), "b1": (3,), "b2": (2,), "b3": (3,), "gain": ()}
DTYPES = {"W1": "float32", "W2": "float64", "W3": "float32", "b1": "float32", "b2": "float64", "b3": "float64",
          "gain": "float32"}
NONFINITE = "non-finite value (NaN or Inf) in the gradient of {!r}"


def _groups():
    """Fresh groups (each state gets its own objects)."""
    return [ParamGroup(Adam(learning_rate=schedules.ExponentialSchedule("iteration", 0.05, 0.9)),
                       names=("W1", "W2", "W3"), regularization=(L2(0.01),), name="weights"),
            ParamGroup(Nesterovs(learning_rate=schedules.StepSchedule("epoch", 0.1, 0.5, 1), momentum=0.9),
                       regularization=(WeightDecay(0.001),), name="rest")]


def _initial():
    rng = np.random.default_rng(11)
    return {n: np.asarray(rng.standard_normal(s)).astype(DTYPES[n]) for n, s in SHAPES.items()}


class Pair:
    """Two ShardStates built identically: ``batched`` (A) takes batches, ``single`` (B) the same pushes one by one."""

    def __init__(self, **options):
        groups = _groups()
        self.layout = ParameterLayout.build(SHAPES, DTYPES, 1, assign_groups(groups, list(SHAPES)))
        buffers = self.layout.pack(0, _initial())[0]
        self.pieces = self.layout.shard_pieces[0]
        self.batched = ShardState(0, self.pieces, groups, buffers, **options)
        self.single = ShardState(0, self.pieces, _groups(), buffers, **options)
        self.initial = {dtype: buf.copy() for dtype, buf in self.single.params.items()}
        self.sent_in_batches = 0

    def payload(self, rng, names=None, bad=None, value=np.nan):
        """A packed full (or, with ``names``, partial) gradient; ``bad``: a parameter holding one ``value``."""
        names = list(SHAPES) if names is None else names
        grads = {n: np.asarray(0.5 * rng.standard_normal(SHAPES[n])).astype(DTYPES[n]) for n in names}
        if bad is not None:
            grads[bad].flat[-1] = value
        return self.layout.pack(0, grads)

    def batch(self, client, seq, worker, payloads, epoch=0):
        """``payloads`` as one batch to A and one by one to B; the outcomes must agree. Returns A's outcome and
        B's outcomes."""
        stacked = {dtype: np.concatenate([p[dtype] for p in payloads]) for dtype in payloads[0]}
        self.sent_in_batches += len(payloads)
        got = self.batched.push_batch(client, seq, worker, stacked, len(payloads), epoch)
        want = [self.single.push(client, seq + i, worker, {d: a.copy() for d, a in p.items()}, None, None, epoch)
                for i, p in enumerate(payloads)]
        assert got.received == sum(one.received for one in want)
        assert got.errors == [error for one in want for error in one.errors]
        return got, want

    def push(self, client, seq, worker, payload, present=None, epoch=0):
        """One plain push to both; the outcomes must be equal."""
        got = self.batched.push(client, seq, worker, {d: a.copy() for d, a in payload.items()}, present, None,
                                epoch)
        want = self.single.push(client, seq, worker, {d: a.copy() for d, a in payload.items()}, present, None,
                                epoch)
        assert got == want
        return got

    def read(self, worker):
        """A pull by ``worker`` on both (it sets the staleness baseline)."""
        self.batched.read(worker_id=worker)
        self.single.read(worker_id=worker)

    def assert_same(self):
        a, b = self.batched, self.single
        assert a.params.keys() == b.params.keys()
        for dtype in b.params:
            np.testing.assert_array_equal(a.params[dtype], b.params[dtype], strict=True, err_msg=dtype)
        assert a.state.keys() == b.state.keys()
        for key in b.state:
            np.testing.assert_array_equal(a.state[key], b.state[key], strict=True, err_msg=f"state {key}")
        np.testing.assert_array_equal(a.iterations, b.iterations, strict=True, err_msg="iterations")
        assert a.applied_seq == b.applied_seq
        assert a.clocks == b.clocks
        assert a.version == b.version
        assert _pending(a) == _pending(b)
        assert (a.sync_clock, sorted(a.sync_steps), sorted(a.history)) == \
               (b.sync_clock, sorted(b.sync_steps), sorted(b.history))
        for step in b.history:
            for dtype in b.history[step]:
                np.testing.assert_array_equal(a.history[step][dtype], b.history[step][dtype], strict=True)
        assert _counters(a) == _counters(b)
        # every push of a batch is counted on arrival (duplicates too); one by one, none is
        assert (a.counters["pushes_batched"], b.counters["pushes_batched"]) == (self.sent_in_batches, 0)

    def assert_moved(self):
        """The pushes did something (so equality is not that of two untouched states)."""
        for dtype, buf in self.single.params.items():
            assert not np.array_equal(buf, self.initial[dtype]), dtype
            assert np.all(np.isfinite(buf)), dtype


def _pending(state):
    """Client -> the seqs held, for clients with any (an emptied queue may be left as ``{}`` or dropped)."""
    return {client: sorted(queue) for client, queue in state.pending.items() if queue}


NOT_COMPARED = ("apply_seconds", "pushes_batched")  # a timing; the pushes that came in batches (A's alone)


def _counters(state):
    return {name: value for name, value in state.counters.items() if name not in NOT_COMPARED}


def _spy(monkeypatch, state, name):
    """Wrap ``state.<name>`` (on the instance only): the list of the calls' positional arguments."""
    calls = []
    original = getattr(state, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(state, name, spy)
    return calls


# -- the fast path ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_in_order_batches_take_the_fast_path_and_match_one_by_one(monkeypatch, kernel):
    pair = Pair(num_workers=2)
    if kernel == "reference":  # the readable path on both (the states picked fused kernels where numba allows)
        for state in (pair.batched, pair.single):
            state.kernels = dict.fromkeys(state.kernels)
    rng = np.random.default_rng(0)
    pushes = _spy(monkeypatch, pair.batched, "push")
    fast = _spy(monkeypatch, pair.batched, "_take_batch")
    seqs = {"a": 1, "b": 1}
    plan = [("a", 0, 3, 0), ("b", 1, 2, 0), ("a", 0, 1, 1), ("a", 0, 4, 1), ("b", 1, 5, 2), ("a", 0, 2, 2)]
    for step, (client, worker, count, epoch) in enumerate(plan):
        payloads = [pair.payload(rng)[0] for _ in range(count)]
        got, want = pair.batch(client, seqs[client], worker, payloads, epoch)
        assert (got.received, got.errors, got.duplicate, got.held) == (count, [], False, False)
        assert all(one.received == 1 for one in want)
        seqs[client] += count
        if step == 2:
            pair.read(1)  # staleness is counted against the last pull
        pair.assert_same()
    assert pushes == []  # never push by push
    assert len(fast) == len(plan)
    assert pair.batched.applied_seq == {"a": 10, "b": 7}
    assert set(pair.single.iterations.tolist()) == {17}
    assert pair.single.counters["max_clock_gap"] > 0 and pair.single.counters["max_staleness"] > 0
    pair.assert_moved()
    # the spies count: a batch that is not next in line goes push by push
    got, _ = pair.batch("a", 13, 0, [pair.payload(rng)[0] for _ in range(2)])  # 11 and 12 not sent: held
    assert got.held and [call[1] for call in pushes] == [13, 14] and len(fast) == len(plan)
    pair.assert_same()


def test_a_batch_counts_the_clock_gap_after_its_first_push_when_that_is_the_largest():
    """Worker 1's clock ticks ahead (a tick moves a clock without counting the gap); worker 0, far behind, then
    pushes a batch: the gap is largest after its FIRST push and shrinks with each one after, as one by one
    (``_count_batch`` takes the larger of the gaps after the first and the last push)."""
    pair = Pair(num_workers=2)
    rng = np.random.default_rng(7)
    for seq in range(1, 11):
        pair.push("ticker", seq, 1, {}, TICK)
    assert pair.single.counters["max_clock_gap"] == 0
    pair.batch("behind", 1, 0, [pair.payload(rng)[0] for _ in range(5)])
    assert pair.single.counters["max_clock_gap"] == 9  # 10 - 1 after the first push; 10 - 5 after the last
    pair.assert_same()


# -- push by push ----------------------------------------------------------------------------------------------
def test_a_batch_before_the_push_it_follows_is_held_then_released_by_that_push(monkeypatch):
    pair = Pair()
    rng = np.random.default_rng(1)
    fast = _spy(monkeypatch, pair.batched, "_take_batch")
    pair.batch("c", 1, 0, [pair.payload(rng)[0] for _ in range(2)])
    got, want = pair.batch("c", 4, 0, [pair.payload(rng)[0] for _ in range(3)])  # seq 3 missing
    assert (got.received, got.held, got.duplicate) == (0, True, False)
    assert all(one.held for one in want)
    assert pair.batched.pending_count("c") == 3
    pair.assert_same()
    assert pair.push("c", 3, 0, pair.payload(rng)[0]).received == 4  # itself and the batch's three
    pair.assert_same()
    # in order but something waits (seq 9): push by push, and the batch releases it
    assert pair.push("c", 9, 0, pair.payload(rng)[0]).held
    got, _ = pair.batch("c", 7, 0, [pair.payload(rng)[0] for _ in range(2)])
    assert got.received == 3 and pair.batched.applied_seq["c"] == 9
    assert len(fast) == 1  # only the first batch was next in line with nothing waiting
    assert set(pair.single.iterations.tolist()) == {9}
    pair.assert_same()
    pair.assert_moved()


def test_a_resent_batch_overlapping_applied_and_held_pushes_drops_the_duplicates():
    pair = Pair()
    rng = np.random.default_rng(2)
    payloads = {seq: pair.payload(rng)[0] for seq in range(1, 13)}
    pair.batch("c", 1, 0, [payloads[s] for s in range(1, 5)])
    got, want = pair.batch("c", 3, 0, [payloads[s] for s in range(3, 7)])  # 3, 4 again: a resend
    assert got.received == 2 and [one.duplicate for one in want] == [True, True, False, False]
    assert pair.batched.counters["duplicates_dropped"] == 2
    pair.assert_same()
    got, want = pair.batch("c", 2, 0, [payloads[s] for s in range(2, 5)])  # all applied already
    assert (got.received, got.duplicate, got.held) == (0, True, False) and all(one.duplicate for one in want)
    pair.assert_same()
    assert pair.push("c", 9, 0, payloads[9]).held
    # 7 missing: 8, 10, 11 wait too, and the resent 9 is a duplicate of the one waiting
    got, want = pair.batch("c", 8, 0, [payloads[8], pair.payload(rng)[0], payloads[10], payloads[11]])
    assert (got.received, got.held, got.duplicate) == (0, True, False)
    assert [one.duplicate for one in want] == [False, True, False, False]
    assert pair.batched.pending_count("c") == 4
    pair.assert_same()
    got, want = pair.batch("c", 7, 0, [payloads[7], payloads[8]])  # 7 fills the gap; 8 is then a duplicate
    assert (got.received, got.duplicate, got.held) == (5, False, False)  # a duplicate only if all its pushes are
    assert [one.duplicate for one in want] == [False, True]
    assert pair.batched.applied_seq["c"] == 11
    assert pair.batched.counters["duplicates_dropped"] == 2 + 3 + 1 + 1
    assert set(pair.single.iterations.tolist()) == {11}  # seqs 1..11, each applied once
    pair.assert_same()
    pair.assert_moved()


@pytest.mark.parametrize("nan_policy", ["reject", "skip"])
def test_a_nonfinite_push_in_a_batch_is_rejected_alone(nan_policy):
    pair = Pair(nan_policy=nan_policy)
    rng = np.random.default_rng(3)
    good = [pair.payload(rng)[0] for _ in range(4)]
    got, want = pair.batch("c", 1, 0, [good[0], pair.payload(rng, bad="b2")[0], good[1], good[2]])
    expected = [NONFINITE.format("b2")] if nan_policy == "reject" else []
    assert got.errors == expected and [one.errors for one in want] == [[], expected, [], []]
    assert got.received == 4
    pair.assert_same()
    # an Inf in a float32 parameter, in the last push
    got, _ = pair.batch("c", 5, 0, [good[3], pair.payload(rng, bad="W3", value=-np.inf)[0]])
    assert got.errors == ([NONFINITE.format("W3")] if nan_policy == "reject" else [])
    pair.assert_same()
    state = pair.single
    assert set(state.iterations.tolist()) == {4}  # 6 pushes, 2 of them not applied
    assert state.applied_seq["c"] == 6 and state.clocks == {0: 6}
    counter = "nonfinite_rejected" if nan_policy == "reject" else "nonfinite_skipped"
    assert (state.counters[counter], state.counters["updates_applied"]) == (2, 4)
    # two bad pushes in one batch: both errors, in order
    got, _ = pair.batch("c", 7, 0, [pair.payload(rng, bad="gain")[0], good[0], pair.payload(rng, bad="W2")[0]])
    assert got.errors == ([NONFINITE.format("gain"), NONFINITE.format("W2")] if nan_policy == "reject" else [])
    pair.assert_same()
    pair.batch("c", 10, 0, [pair.payload(rng)[0] for _ in range(3)])  # and the fast path again after them
    pair.assert_same()
    pair.assert_moved()


def test_sync_mode_with_two_workers_matches_one_by_one():
    pair = Pair(consistency="sync", num_workers=2)
    rng = np.random.default_rng(4)
    seqs = {"a": 1, "b": 1}
    plan = [("a", 0, 3), ("b", 1, 2), ("b", 1, 2), ("a", 0, 1), ("a", 0, 3), ("b", 1, 3), ("a", 0, 2)]
    for client, worker, count in plan:
        got, _ = pair.batch(client, seqs[client], worker, [pair.payload(rng)[0] for _ in range(count)])
        assert got.received == count
        seqs[client] += count
        pair.assert_same()
    assert pair.single.clocks == {0: 9, 1: 7}
    assert pair.single.sync_clock == 7 and pair.single.version == 7  # the steps both workers pushed
    pair.assert_moved()


def test_a_batch_after_a_partial_push_steps_the_pieces_whose_iterations_diverged(monkeypatch):
    pair = Pair()
    rng = np.random.default_rng(5)
    fast = _spy(monkeypatch, pair.batched, "_take_batch")
    pair.batch("c", 1, 0, [pair.payload(rng)[0] for _ in range(2)])
    payload, present = pair.payload(rng, names=["W1", "b2", "gain"])
    assert present is not None and len(present) == 3
    pair.push("c", 3, 0, payload, present)
    its = pair.single.iterations
    for key, r in pair.single.ranges.items():  # every range but W2's alone holds pieces of both counts now
        assert len(set(its[r.pieces_at].tolist())) == (1 if key == ("float64", 0) else 2), key
    pair.assert_same()
    pair.batch("c", 4, 0, [pair.payload(rng)[0] for _ in range(3)], epoch=1)
    assert len(fast) == 2
    pair.assert_same()
    by_name = {p.name: int(pair.single.iterations[p.index]) for p in pair.pieces}
    assert by_name == {"W1": 6, "W2": 5, "W3": 5, "b1": 5, "b2": 6, "b3": 5, "gain": 6}
    pair.assert_moved()


# -- through ShardService --------------------------------------------------------------------------------------
def _wire(message):
    return from_frames([memoryview(frame).tobytes() for frame in to_frames(message)])


def test_shard_service_acknowledges_a_batch_by_its_last_seq():
    pair = Pair()
    rng = np.random.default_rng(6)
    batched = ShardService(pair.batched, INCARNATION)
    single = ShardService(pair.single, INCARNATION)
    rid = 0

    def send(seq, payloads):
        nonlocal rid
        pushes = []
        for i, payload in enumerate(payloads):
            rid += 1
            pushes.append(PushMessage(rid, "c", seq + i, 0, payload=payload, incarnation=INCARNATION))
        assert all(push.batchable() for push in pushes)
        message = _wire(PushMessage.batch(pushes))
        pair.sent_in_batches += len(pushes)
        assert (message.count, message.seq) == (len(pushes), seq)
        (to, reply), = batched.handle(b"peer", message, 0.0)
        errors = []
        for push in pushes:
            (_, one), = single.handle(b"peer", _wire(push), 0.0)
            errors += one.errors
        assert to == b"peer" and isinstance(reply, Reply) and reply.rid == rid
        assert reply.errors == errors
        return reply

    reply = send(1, [pair.payload(rng)[0] for _ in range(3)])
    assert (reply.ack.seq, reply.ack.applied, reply.ack.incarnation) == (3, 3, INCARNATION)
    assert batched.changed
    reply = send(5, [pair.payload(rng)[0] for _ in range(2)])  # 4 missing: held
    assert (reply.ack.seq, reply.ack.applied) == (6, 3) and not batched.changed
    reply = send(4, [pair.payload(rng)[0], pair.payload(rng, bad="W1")[0]])  # 5 a duplicate of the held one
    assert (reply.ack.seq, reply.ack.applied) == (5, 6)
    assert reply.errors == []  # the NaN push 5 was dropped: the held 5 was applied
    reply = send(7, [pair.payload(rng)[0], pair.payload(rng, bad="b3")[0], pair.payload(rng)[0]])
    assert (reply.ack.seq, reply.ack.applied) == (9, 9) and reply.errors == [NONFINITE.format("b3")]
    pair.assert_same()
    pair.assert_moved()


# -- split_payload ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 5])
def test_split_payload_matches_plain_slicing(count):
    rng = np.random.default_rng(count)
    sizes = {"float32": 7, "float64": 3, "float16": 1}
    payload = {dtype: rng.standard_normal(size * count).astype(dtype) for dtype, size in sizes.items()}
    parts = split_payload(payload, count)
    assert len(parts) == count
    for i, part in enumerate(parts):
        assert list(part) == list(payload)
        for dtype, size in sizes.items():
            expected = list(payload[dtype])[i * size:(i + 1) * size]  # the plain model: list slicing
            assert part[dtype].dtype == np.dtype(dtype) and part[dtype].shape == (size,)
            assert part[dtype].tolist() == [float(x) for x in expected]
            assert np.shares_memory(part[dtype], payload[dtype])  # a view, not a copy
