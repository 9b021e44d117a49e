"""The ZeroMQ data plane without sockets and without Ray: server/protocol.py and server/shard_service.py.

* Round trip: every message kind -> ``to_frames`` -> a bytes copy of each frame (the wire) -> ``from_frames``
  gives the original back field by field; decoded arrays are read-only and equal with dtype and shape.
* Arrays go out as views: ``to_frames`` does not copy a contiguous array.
* Malformed frames: each raises ``ProtocolError`` naming the field and saying what was expected;
  ``peek_rid`` recovers the request id of a decodable header (0 for garbage).
* ``ShardService`` driven message by message (pushes through the wire) against a float64 NumPy SGD reference
  and a plain-Python model of the exactly-once policy: acks, duplicates, out-of-order pushes, fused pulls,
  waiting reads (answered by the push that readies them, replaced when resent), timeouts, sync mode's forced
  step, restarted incarnations, NaN gradients (reject / skip) and reads of unknown tables or pieces.
"""

from __future__ import annotations

import dataclasses
import math
import time

import msgpack
import numpy as np
import pytest

from rayps.server import ParameterLayout, ShardState, transport
from rayps.server.frames import MAX_HEADER_BYTES
from rayps.server.protocol import (Ack, CastRows, EncodedPayload, ProtocolError, PullRequest, PushMessage, Rejection,
                                   Reply, RowsRequest, from_frames, peek_rid, to_frames)
from rayps.server.shard_service import ShardService
from rayps.updaters import Sgd
from rayps.updaters.groups import as_groups, assign_groups
from rayps.server.compression import EncodedTensor
from state_invariants import record_instances, validate_all


@pytest.fixture(autouse=True)
def _invariants_hold_after_each_test(monkeypatch):
    """Every ShardState a test builds passes ``validate()`` when the test is done (tests/state_invariants.py)."""
    made = record_instances(monkeypatch, ShardState)
    yield
    validate_all(made)


LR = 0.5
INCARNATION = "inc-1"
SHAPES = {"W": (6, 4), "b": (4,), "h": (3,)}
DTYPES = {"W": "float32", "b": "float32", "h": "float64"}
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def wire(message):
    """``message`` as the peer receives it: every frame copied to bytes, then decoded."""
    return from_frames([memoryview(frame).tobytes() for frame in to_frames(message)])


def assert_same(got, want, where="message"):
    """Field-by-field equality; arrays: equal values, dtype and shape, and read-only once decoded."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), where
        assert not got.flags.writeable, f"{where} is writable"
        np.testing.assert_array_equal(got, want, strict=True, err_msg=where)
    elif isinstance(want, EncodedPayload):
        assert isinstance(got, EncodedPayload) and got.mode == want.mode, where
        assert_same(dict(got), dict(want), where)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):  # EncodedTensor is a tuple too
        assert type(got) is type(want) and len(got) == len(want), where
        for index, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{index}]")
    elif dataclasses.is_dataclass(want):
        assert type(got) is type(want), where
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), f"{where}.{f.name}")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


# -- round trip ----------------------------------------------------------------------------------------------
def _rng_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(12).astype(np.float32), rng.standard_normal(5)


def _messages():
    f32, f64 = _rng_arrays()
    ids = np.array([3, 0, 9], dtype=np.int64)
    row_grads = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    sparse64 = np.r_[np.zeros(40), 0.5, -0.7]  # few elements over tau: indices + signs
    threshold = transport.encode_payload(0, {"float32": np.linspace(-1, 1, 40, dtype=np.float32),
                                             "float64": sparse64}, None, "threshold", {})
    assert threshold["float32"].bitmap is not None and threshold["float64"].indices is not None  # both formats
    fp16 = transport.encode_payload(0, {"float32": f32}, None, "fp16", {})
    return {
        "push dense": PushMessage(1, "client-a", 1, 0, payload={"float32": f32, "float64": f64}),
        "push present factors": PushMessage(
            2, "client-a", 7, 3, epoch=2, payload={"float32": f32[:4]}, present=[0, 2],
            factors={"W": (0.5, 1.0), "b": (1.0, math.inf)}, replayed=True, incarnation="inc-0", pull_worker=3,
            pull=True, timeout=2.5),
        "push rows": PushMessage(3, "c", 2, 1, payload={}, rows={"emb": (ids, row_grads)}),
        "push tick": PushMessage(4, "c", 3, 1, payload={}, present="tick"),
        "push skipped": PushMessage(5, "c", 4, 1, payload=None),
        "push batch": PushMessage.batch([PushMessage(15 + i, "c", 9 + i, 2, 1, {"float32": f32 * i, "float64": f64},
                                                     incarnation=INCARNATION, low_water=i) for i in range(3)]),
        "push threshold": PushMessage(6, "c", 5, 1, payload=threshold),
        "push fp16": PushMessage(7, "c", 6, 1, payload=fp16, rows=transport.encode_rows({"emb": (ids, row_grads)},
                                                                                          "fp16")),
        "pull": PullRequest(8, "c", 6, worker_id=1, pieces=[0, 2], incarnation=INCARNATION, timeout=10.0),
        "pull all": PullRequest(9, "c", 0),
        "rows ids": RowsRequest(10, "c", 4, "emb", ids=ids, incarnation=INCARNATION, timeout=1.0),
        "rows all": RowsRequest(11, "c", 4, "emb", ids=None),
        "reply params": Reply(12, Ack(6, 5, 3, INCARNATION), ["'W': non-finite"], params={"float32": f32,
                                                                                          "float64": f64}),
        "reply rows": Reply(13, None, [], ids=ids, rows=row_grads, waiting=True),
        "rejection": Rejection(14, "restarted", "incarnation", "shard 0 restarted"),
    }


@pytest.mark.parametrize("name", list(_messages()))
def test_every_message_kind_survives_the_wire_field_by_field(name):
    message = _messages()[name]
    assert_same(wire(message), message)
    if name == "push fp16":  # the types the rows and payload decode to
        decoded = wire(message)
        assert isinstance(decoded.rows["emb"][1], CastRows) and decoded.rows["emb"][1].mode == "fp16"
    if name == "push threshold":
        assert all(isinstance(part, EncodedTensor) for part in wire(message).payload.values())
    if name == "push batch":  # seqs 9..11, one after the other in each array, the last push's rid and low water
        decoded = wire(message)
        assert (decoded.count, decoded.seq, decoded.rid, decoded.low_water, decoded.worker_id) == (3, 9, 17, 2, 2)
        f32, f64 = _rng_arrays()
        np.testing.assert_array_equal(decoded.payload["float32"], np.concatenate([f32 * 0, f32 * 1, f32 * 2]))
        np.testing.assert_array_equal(decoded.payload["float64"], np.concatenate([f64, f64, f64]))


def test_arrays_are_sent_as_views_not_copies():
    grads = np.arange(10, dtype=np.float32)
    row_grads = np.ones((3, 4), dtype=np.float32)
    frames = to_frames(PushMessage(1, "c", 1, 0, payload={"float32": grads},
                                   rows={"emb": (np.arange(3, dtype=np.int64), row_grads)}))
    assert frames[1] is grads
    assert np.shares_memory(frames[3], row_grads)  # a 2-D array goes flat, still a view
    params = {"float64": np.zeros(5)}
    assert to_frames(Reply(2, params=params))[1] is params["float64"]
    strided = np.arange(10, dtype=np.float32)[::2]  # not contiguous: copied, and still right
    assert not np.shares_memory(to_frames(PushMessage(3, "c", 1, 0, payload={"float32": strided}))[1], strided)
    np.testing.assert_array_equal(wire(PushMessage(3, "c", 1, 0, payload={"float32": strided})).payload["float32"],
                                  strided, strict=True)


def test_a_non_native_byte_order_array_arrives_with_its_values():
    swapped = np.arange(4, dtype=np.float32).astype(np.dtype("float32").newbyteorder())
    decoded = wire(PushMessage(1, "c", 1, 0, payload={"float32": swapped})).payload["float32"]
    np.testing.assert_array_equal(decoded, np.arange(4, dtype=np.float32))


# -- malformed frames ----------------------------------------------------------------------------------------
def _valid_frames():
    f32, f64 = _rng_arrays()
    return [memoryview(f).tobytes() for f in to_frames(PushMessage(42, "c", 1, 0, payload={"float32": f32,
                                                                                          "float64": f64}))]


def _edit(change):
    """A mutation of valid frames: the header unpacked, changed by ``change(header)``, packed again."""
    def mutate(frames):
        header = msgpack.unpackb(frames[0])
        change(header)
        return [msgpack.packb(header, use_bin_type=True), *frames[1:]]
    return mutate


def _set(key, value):
    return _edit(lambda header: header.__setitem__(key, value))


def _set_dtype(dtype):
    return _edit(lambda header: header["a"][0].__setitem__(0, dtype))


MALFORMED = {
    "no frames": (lambda frames: [], "frames", "at least a header frame"),
    "garbage header": (lambda frames: [b"\xc1\xc1 not msgpack", *frames[1:]], "header", "a msgpack map"),
    "header not a map": (lambda frames: [msgpack.packb([1, 2, 3]), *frames[1:]], "header", "a msgpack map"),
    "version 3": (_set("v", 3), "version", "protocol version 4"),
    "version 5": (_set("v", 5), "version", "protocol version 4"),
    "unknown kind": (_set("k", "gossip"), "kind", "'push'"),
    "array frame dropped": (lambda frames: frames[:-1], "frames", "2 array frame(s)"),
    "extra frame": (lambda frames: [*frames, b"\0" * 8], "frames", "2 array frame(s)"),
    "truncated array": (lambda frames: [frames[0], frames[1][:-4], *frames[2:]], "a[0]", "48 bytes for float32"),
    "object dtype": (_set_dtype("object"), "a[0]", "dtype in"),
    "complex64 dtype": (_set_dtype("complex64"), "a[0]", "dtype in"),
    "client_id not a string": (_set("c", 5), "client_id", "a client id"),
    "seq 0": (_set("s", 0), "seq", "a sequence number >= 1"),
    "low_water missing": (_edit(lambda header: header.pop("lw")), "low_water", "a sequence number >= 0"),
    "low_water negative": (_set("lw", -1), "low_water", "a sequence number >= 0"),
    "seq negative": (_set("s", -3), "seq", "a sequence number >= 1"),
    "present not tick": (_set("pr", "tock"), "present", "'tick'"),
    "count missing": (_edit(lambda header: header.pop("n")), "count", "a push count 1..1024"),
    "count 0": (_set("n", 0), "count", "a push count 1..1024"),
    "count over the cap": (_set("n", 1025), "count", "a push count 1..1024"),
    "count a float": (_set("n", 2.0), "count", "a push count 1..1024"),
    "batch sizes not a multiple": (_set("n", 5), "payload['float32']", "a multiple of count 5 elements"),
    "batch with pieces": (_edit(lambda header: header.update(n=2, pr=[0])), "present", "nothing in a batch of 2"),
    "batch of ticks": (_edit(lambda header: header.update(n=2, pr="tick")), "present", "nothing in a batch of 2"),
    "batch with a pull": (_edit(lambda header: header.update(n=2, pl=True, pw=0)), "pull", "nothing in a batch"),
    "batch with factors": (_edit(lambda header: header.update(n=2, f={"w": [1.0, 2.0]})), "factors",
                           "nothing in a batch"),
    "batch of a dropped push": (lambda frames: _edit(lambda header: header.update(n=2, p=None, a=[]))(frames[:1]),
                                "payload", "plain arrays for a batch of 2 pushes"),
    "batch past the last seq": (_edit(lambda header: header.update(n=2, s=(1 << 62) - 1)), "seq",
                                "a batch whose last sequence number is below 2**62"),
    "payload ref out of range": (_edit(lambda header: header["p"]["d"].__setitem__("float32", 9)),
                                 "payload['float32']", "an index into the 2 array frame(s)"),
    "header too large": (_set("pad", "x" * MAX_HEADER_BYTES), "header", f"at most {MAX_HEADER_BYTES} bytes"),
}


def test_the_valid_frames_the_malformed_cases_start_from_decode():
    assert wire(from_frames(_valid_frames())).rid == 42


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frames_raise_a_protocol_error_naming_the_field(case):
    mutate, field, expected = MALFORMED[case]
    with pytest.raises(ProtocolError) as raised:
        from_frames(mutate(_valid_frames()))
    assert raised.value.field == field
    assert expected in raised.value.expected and expected in str(raised.value)
    assert str(raised.value).startswith(f"{field}: expected ")


def test_peek_rid_reads_a_decodable_header_and_gives_0_for_garbage():
    assert peek_rid(_set("v", 2)(_valid_frames())) == 42
    assert peek_rid(_set("s", 0)(_valid_frames())) == 42
    assert peek_rid([b"\xc1\xc1 not msgpack"]) == 0
    assert peek_rid([msgpack.packb([1, 2])]) == 0
    assert peek_rid(_set("r", -1)(_valid_frames())) == 0
    assert peek_rid([]) == 0


# -- ShardService against references ---------------------------------------------------------------------------
def _initial():
    rng = np.random.default_rng(1)
    return {n: rng.standard_normal(s).astype(DTYPES[n]) for n, s in SHAPES.items()}


def _grads(seed, nan_in=None):
    rng = np.random.default_rng(1000 + seed)
    grads = {n: (0.1 * rng.standard_normal(s)).astype(DTYPES[n]) for n, s in SHAPES.items()}
    if nan_in is not None:
        grads[nan_in].flat[1] = np.nan
    return grads


class Fixture:
    """One ShardService over one shard holding W, b (float32) and h (float64), SGD(0.5)."""

    def __init__(self, consistency="async", num_workers=2, nan_policy="reject", sync_timeout=None):
        groups = as_groups(Sgd(LR))
        self.layout = ParameterLayout.build(SHAPES, DTYPES, 1, assign_groups(groups, list(SHAPES)))
        buffers = self.layout.pack(0, _initial())[0]
        self.state = ShardState(0, self.layout.shard_pieces[0], groups, buffers, consistency=consistency,
                                num_workers=num_workers, nan_policy=nan_policy)
        self.service = ShardService(self.state, INCARNATION, sync_timeout=sync_timeout)

    def push(self, peer, rid, client, seq, worker, grads, now=0.0, **options):
        payload, present = self.layout.pack(0, grads)
        message = PushMessage(rid, client, seq, worker, payload=payload, present=present, **options)
        return [(to, wire(reply)) for to, reply in self.service.handle(peer, wire(message), now)]

    def named(self, buffers):
        out = {n: np.full(s, np.nan, dtype=DTYPES[n]) for n, s in SHAPES.items()}
        self.layout.unpack_into(0, buffers, out)
        return out

    def snapshot(self):
        return {dtype: buf.copy() for dtype, buf in self.state.params.items()}


class Reference:
    """Float64 SGD, and the exactly-once policy: applied seq per client, early seqs held until the gap fills."""

    def __init__(self):
        self.params = {n: a.astype(np.float64) for n, a in _initial().items()}
        self.applied: dict[str, int] = {}
        self.held: dict[str, dict[int, dict]] = {}
        self.duplicates = {"applied": 0, "held": 0}

    def push(self, client, seq, grads):
        applied, held = self.applied.get(client, 0), self.held.setdefault(client, {})
        if seq <= applied or seq in held:
            self.duplicates["applied" if seq <= applied else "held"] += 1
            return
        held[seq] = grads
        while applied + 1 in held:
            applied += 1
            self.sgd(held.pop(applied))
        self.applied[client] = applied

    def sgd(self, grads, divisor=1):
        for name, grad in grads.items():
            self.params[name] -= LR * grad.astype(np.float64) / divisor


def assert_params(fixture, buffers, reference):
    for name, value in fixture.named(buffers).items():
        np.testing.assert_allclose(value, reference.params[name], **FLOAT32_TOLERANCE, err_msg=name)


def _stream(rng, count=24, window=4, duplicate_rate=0.35):
    """Seqs 1..count shuffled within windows, with resends of seqs already sent."""
    order = []
    for start in range(1, count + 1, window):
        chunk = list(range(start, min(start + window, count + 1)))
        rng.shuffle(chunk)
        order += chunk
    out = []
    for seq in order:
        out.append(seq)
        if rng.random() < duplicate_rate:
            out.append(int(rng.choice(out)))
    return out


def test_pushes_out_of_order_with_duplicates_are_applied_exactly_once_in_seq_order():
    fixture, reference = Fixture(), Reference()
    rng = np.random.default_rng(7)
    streams = {"a": _stream(rng), "b": _stream(rng)}
    workers = {"a": 0, "b": 1}
    rid = 0
    while any(streams.values()):
        client = str(rng.choice([c for c, s in streams.items() if s]))
        seq = streams[client].pop(0)
        rid += 1
        grads = _grads(100 * workers[client] + seq)
        reference.push(client, seq, grads)
        replies = fixture.push(client.encode(), rid, client, seq, workers[client], grads)
        assert replies == [(client.encode(), Reply(rid, Ack(seq, reference.applied.get(client, 0), 0, INCARNATION)))]
    assert reference.applied == {"a": 24, "b": 24} == fixture.state.applied_seq
    assert reference.duplicates["applied"] > 0 and reference.duplicates["held"] > 0  # both kinds were exercised
    assert fixture.state.counters["duplicates_dropped"] == sum(reference.duplicates.values())
    assert_params(fixture, fixture.state.params, reference)


def test_a_fused_push_in_async_mode_returns_the_parameters_after_that_push():
    fixture, reference = Fixture(), Reference()
    for seq in (1, 2, 3):
        grads = _grads(seq)
        reference.push("a", seq, grads)
        [(peer, reply)] = fixture.push(b"w0", seq, "a", seq, 0, grads, pull=True, pull_worker=0)
        assert peer == b"w0" and reply.ack == Ack(seq, seq, 0, INCARNATION) and not reply.waiting
        assert_params(fixture, reply.params, reference)


def test_a_pull_ahead_of_the_applied_seq_waits_and_is_answered_by_the_push_that_readies_it():
    fixture, reference = Fixture(), Reference()
    for seq in (2, 1):
        reference.push("a", seq, _grads(seq))
    [(_, early)] = fixture.push(b"w", 1, "a", 2, 0, _grads(2), now=0.0)
    assert early.ack.applied == 0  # held: seq 1 is missing
    pull = PullRequest(50, "a", after_seq=2)
    assert fixture.service.handle(b"r", wire(pull), 1.0) == []
    assert fixture.service.handle(b"r", wire(pull), 2.0) == []  # resent: replaces the waiting one
    assert len(fixture.service.waiting) == 1
    replies = fixture.push(b"w", 2, "a", 1, 0, _grads(1), now=3.0)
    assert [(peer, reply.rid) for peer, reply in replies] == [(b"w", 2), (b"r", 50)]
    assert replies[0][1].ack == Ack(1, 2, 0, INCARNATION)
    assert_params(fixture, replies[1][1].params, reference)
    assert fixture.service.waiting == {}


def test_a_waiting_read_past_its_timeout_is_rejected_timeout():
    fixture = Fixture()
    assert fixture.service.handle(b"r", wire(PullRequest(9, "a", after_seq=1, timeout=2.0)), 10.0) == []
    assert fixture.service.next_deadline() == 12.0
    assert fixture.service.expire(11.9) == []
    [(peer, rejection)] = fixture.service.expire(12.0)
    assert peer == b"r" and isinstance(rejection, Rejection)
    assert (rejection.rid, rejection.code) == (9, "timeout")
    assert fixture.service.waiting == {} and fixture.service.next_deadline() is None


def test_sync_mode_forces_the_stuck_step_with_the_mean_of_the_workers_that_pushed():
    fixture, reference = Fixture("sync", num_workers=2, sync_timeout=5.0), Reference()
    before = fixture.snapshot()
    [(_, ack)] = fixture.push(b"w0", 1, "a", 1, 0, _grads(1), now=100.0, pull=True, pull_worker=0)
    assert ack.waiting and ack.params is None and ack.ack.applied == 1
    assert all(np.array_equal(before[d], fixture.state.params[d]) for d in before)  # worker 1 has not pushed
    assert fixture.service.next_deadline() == 105.0
    assert fixture.service.expire(104.9) == []
    [(peer, reply)] = fixture.service.expire(105.0)
    reference.sgd(_grads(1), divisor=1)  # the mean of the one push
    assert peer == b"w0" and reply.rid == 1 and not reply.waiting
    assert_params(fixture, wire(reply).params, reference)
    assert fixture.state.counters["sync_steps_forced"] == 1


def test_a_message_for_an_earlier_incarnation_is_rejected_restarted_and_changes_nothing():
    fixture = Fixture()
    before = fixture.snapshot()
    [(_, push)] = fixture.push(b"w", 3, "a", 1, 0, _grads(1), incarnation="inc-0")
    [(_, pull)] = fixture.service.handle(b"w", wire(PullRequest(4, "a", 0, incarnation="inc-0")), 0.0)
    for rid, rejection in ((3, push), (4, pull)):
        assert isinstance(rejection, Rejection)
        assert (rejection.rid, rejection.code, rejection.field) == (rid, "restarted", "incarnation")
    assert all(np.array_equal(before[d], fixture.state.params[d]) for d in before)
    assert fixture.state.applied_seq == {} and fixture.state.clocks == {}
    [(_, accepted)] = fixture.push(b"w", 5, "a", 1, 0, _grads(1), incarnation=INCARNATION)
    assert accepted.ack == Ack(1, 1, 0, INCARNATION)


def test_a_nan_gradient_is_rejected_by_parameter_name_and_changes_nothing_but_the_clock():
    fixture = Fixture(nan_policy="reject")
    before = fixture.snapshot()
    [(_, reply)] = fixture.push(b"w", 1, "a", 1, 0, _grads(1, nan_in="b"))
    assert len(reply.errors) == 1 and "'b'" in reply.errors[0]
    assert reply.ack == Ack(1, 1, 0, INCARNATION)
    assert all(np.array_equal(before[d], fixture.state.params[d]) for d in before)
    assert fixture.state.clocks == {0: 1} and fixture.state.counters["nonfinite_rejected"] == 1


def test_a_nan_gradient_under_nan_policy_skip_is_counted_not_reported():
    fixture = Fixture(nan_policy="skip")
    before = fixture.snapshot()
    [(_, reply)] = fixture.push(b"w", 1, "a", 1, 0, _grads(1, nan_in="h"))
    assert reply.errors == [] and fixture.state.counters["nonfinite_skipped"] == 1
    assert all(np.array_equal(before[d], fixture.state.params[d]) for d in before)
    assert fixture.state.clocks == {0: 1}


def test_reads_of_an_unknown_table_or_piece_are_rejected_naming_the_field():
    fixture = Fixture()
    rows = RowsRequest(5, "a", 0, "emb", ids=np.array([1], dtype=np.int64))
    [(_, rejection)] = fixture.service.handle(b"r", wire(rows), 0.0)
    assert (rejection.rid, rejection.code, rejection.field) == (5, "malformed", "table")
    [(_, rejection)] = fixture.service.handle(b"r", wire(PullRequest(6, "a", 0, pieces=[0, 3])), 0.0)
    assert (rejection.rid, rejection.code, rejection.field) == (6, "malformed", "pieces")
    assert fixture.service.waiting == {}


def test_a_client_with_too_many_pushes_held_for_a_gap_is_rejected_overloaded_and_nothing_changes():
    """Seq 1 never arrives: MAX_PENDING later pushes are held, the next one is refused (field ``seq``) and
    nothing is applied; once seq 1 comes, every held push is applied in order."""
    from rayps.server.shard_service import MAX_PENDING

    fixture = Fixture()
    before = fixture.snapshot()
    message = PushMessage(0, "a", 0, 0, payload=fixture.layout.pack(0, _grads(1))[0])
    for seq in range(2, MAX_PENDING + 2):
        message.rid, message.seq = seq, seq
        [(_, held)] = fixture.service.handle(b"w", message, 0.0)
        assert held.ack.applied == 0 and held.errors == []
    message.rid, message.seq = 9999, MAX_PENDING + 2
    [(_, refused)] = fixture.service.handle(b"w", message, 0.0)
    assert isinstance(refused, Rejection) and (refused.code, refused.field) == ("overloaded", "seq")
    assert all(np.array_equal(before[d], fixture.state.params[d]) for d in before)
    assert fixture.state.pending_count("a") == MAX_PENDING and fixture.state.counters["updates_applied"] == 0
    message.rid, message.seq = 1, 1
    [(_, released)] = fixture.service.handle(b"w", message, 0.0)
    assert released.ack.applied == MAX_PENDING + 1 and fixture.state.pending_count("a") == 0


def test_a_data_port_range_with_every_port_taken_is_an_error_naming_the_range():
    import threading

    import zmq

    from rayps.server.credentials import RunCredentials
    from rayps.server.data_server import DataServer, parse_ports

    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1", min_port=40000, max_port=46000)
    try:
        with pytest.raises(RuntimeError, match=f"data_ports {port}-{port}: every port is in use on 127.0.0.1"):
            DataServer(Fixture().service, RunCredentials.new(), "127.0.0.1", (port, port), threading.Lock())
    finally:
        taken.close(linger=0)
    for bad in ("abc", "80-90", "47010-47000", (1, 2, 3)):
        with pytest.raises(ValueError, match="data_ports"):
            parse_ports(bad)
    assert parse_ports("47000-47007") == (47000, 47007) and parse_ports(47001) == (47001, 47001)


def test_the_data_server_serves_a_member_on_its_thread_and_closes():
    """The socket loop without Ray: a member's fused push is applied, acknowledged and answered with the
    parameters; ``close`` stops the thread and frees the port."""
    import threading

    import zmq

    from rayps.server.credentials import RunCredentials
    from rayps.server.data_server import DataServer

    fixture, credentials = Fixture(), RunCredentials.new()
    server = DataServer(fixture.service, credentials, "127.0.0.1", (40000, 46000), threading.Lock())
    server.start()
    member = zmq.Context.instance().socket(zmq.DEALER)
    member.linger = 0
    credentials.configure_client(member)
    member.connect(server.endpoint)
    try:
        grads = _grads(1)
        member.send_multipart(to_frames(PushMessage(1, "a", 1, 0, payload=fixture.layout.pack(0, grads)[0],
                                                    pull=True, pull_worker=0)), copy=False)
        assert member.poll(30_000)
        reply = from_frames(member.recv_multipart(copy=False))
        reference = Reference()
        reference.push("a", 1, grads)
        assert reply.ack == Ack(1, 1, 0, INCARNATION)
        assert_params(fixture, reply.params, reference)
    finally:
        member.close(linger=0)
        server.close()
    assert not server.thread.is_alive()
    again = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        again.bind(server.endpoint)  # the port is free again
    finally:
        again.close(linger=0)


def test_has_message_and_recv_frames_on_real_sockets_take_whole_messages_in_order():
    """``sockets.has_message`` (``zmq_poll``, no timeout) and ``sockets.recv_frames`` (``Frame.more``) against a
    DEALER/ROUTER pair: nothing to receive, then messages of 1 to 4 frames come back whole, in order, frame for
    frame as sent (after the ROUTER's peer identity), and nothing is left."""
    import zmq

    from rayps.server.sockets import has_message, recv_frames

    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        router.bind("inproc://rayps-test-recv-frames")
        dealer.connect("inproc://rayps-test-recv-frames")
        assert has_message(router) is False
        sent = [[b"h%d" % n] + [bytes([n, k]) * (k + 1) for k in range(n)] for n in range(4)]
        for message in sent:
            dealer.send_multipart(message)
        received = []
        for _ in sent:
            deadline = time.monotonic() + 10
            while not has_message(router):
                assert time.monotonic() < deadline
                time.sleep(0.001)
            received.append([frame.bytes for frame in recv_frames(router)[1:]])
        assert received == sent and has_message(router) is False
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        context.term()
