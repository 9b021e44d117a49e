"""The data-plane protocol between clients and shards: the message types and their frames (no sockets here).

Every message is one ZeroMQ multipart message::

    frame 0      header: a msgpack map {"v": VERSION, "k": kind, "r": request id, ..., "a": [[dtype, shape], ...]}
    frame 1..n   one raw array each, in the order of the header's "a" list (C order, native byte order)

The frame layer (header decoding, array frames checked against the header, the field checks) is
server/frames.py. ``to_frames()`` returns the header bytes followed by the arrays themselves (views: no pack
copy; ZeroMQ sends them as they are). On one node a link may also share memory (server/shared_regions.py):
``to_frames(message, region)`` names an array that lies in the link's region by its offset there, and
``from_frames(frames, region_of)`` reads such an array where it lies, in the region ``region_of(header)``
gives for the token the header names. ``from_frames(frames)`` checks the header first — version, kind, every
field's type, the number of array frames, and each frame's length against its declared dtype and shape — and
only then reads a buffer, as a read-only ``np.frombuffer`` view of the received frame (no unpack copy: the
update kernel reads the gradient straight from it). Anything that does not fit raises
``ProtocolError(field, expected)``; the shard answers it with a ``Rejection`` that names the field, and changes
nothing. Nothing here ever unpickles.

Kinds (``Message.kind``):

* ``push`` (``PushMessage``): one clock tick of a worker for one shard — a dense payload (dtype -> flat array,
  or a compressed ``EncodedPayload``; None: the client dropped a non-finite push), row gradients, and
  optionally the pull that follows it (``pull_worker``, the fused push+pull of a training step). A *batch*
  (``count`` > 1, ``PushMessage.batch``) carries ``count`` plain pushes of one worker and epoch, sequence numbers
  ``seq .. seq + count - 1``: each dtype's array is their payloads one after the other, and nothing else
  (no rows, pieces, factors, encoding or pull); the shard applies them exactly as if each had come alone
  (server/push_batches.py).
* ``pull`` (``PullRequest``): parameters (all, or some pieces) once this client's pushes up to ``after_seq``
  are applied and the consistency model lets ``worker_id`` read; with ``at_seq`` (sync mode, a restarted
  worker), the parameters of the step on which this client's push ``at_seq + 1`` is computed.
* ``rows`` (``RowsRequest``): rows ``ids`` of a table (None: every row the shard owns), after ``after_seq``.
* ``reply`` (``Reply``): the shard's answer: the acknowledgement of a push (``Ack``), the push's rejected
  parts (``errors``, e.g. a NaN gradient naming its parameter), and the read's arrays. ``waiting``: the push
  was received and its pull will be answered later, under the same request id.
* ``reject`` (``Rejection``): the request was not taken: ``code`` is ``malformed`` (names ``field``),
  ``restarted`` (addressed to an earlier incarnation of the shard: recover, then ask again), ``timeout``
  (a pull waited past its timeout) or ``overloaded`` (too many pushes out of order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .compression import EncodedTensor  # the threshold codec's own type
from .frames import (ARRAY_DTYPES, VERSION, ArrayFrames, ProtocolError, array_at, buffer_of,  # noqa: F401
                     fields, header_field, is_client_id, is_count, is_opt_count, is_opt_str, is_timeout, read_arrays,
                     read_header)

CAST_MODES = ("fp16", "bf16")
REJECTION_CODES = ("malformed", "restarted", "timeout", "overloaded")
MAX_BATCH = 1024  # pushes one message may hold


@dataclass
class Ack:
    """A push arrived: ``seq`` it acknowledges; the client's last applied sequence number; the last one a
    finished checkpoint holds (the client may drop what is at or below it); the shard process's identity."""

    seq: int
    applied: int
    covered: int
    incarnation: str


class EncodedPayload(dict):
    """A compressed dense payload: dtype -> encoded part (an ``EncodedTensor`` for threshold, the cast array
    otherwise), and its ``mode`` (``threshold``, ``fp16``, ``bf16``); see server/transport.py."""

    def __init__(self, mode: str, parts):
        super().__init__(parts)
        self.mode = mode

    @property
    def parts(self) -> dict:
        return self

    @property
    def nbytes(self) -> int:
        return int(sum(part.nbytes for part in self.parts.values()))


@dataclass
class CastRows:
    """Row gradients cast for transport (``fp16``: float16; ``bf16``: uint16 bit patterns)."""

    mode: str
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class PushMessage:
    kind = "push"
    rid: int
    client_id: str
    seq: int
    worker_id: int
    epoch: int = 0
    payload: Any = field(default_factory=dict)  # dtype -> array | EncodedPayload | None (a dropped push)
    present: Any = None  # None (every piece), list of piece indices, or "tick" (a clock tick only)
    factors: dict | None = None  # param name -> (scale, clip) of gradient normalization
    rows: dict | None = None  # table -> (ids, grads | CastRows)
    replayed: bool = False
    incarnation: str | None = None  # the shard incarnation the client knows (None: none yet)
    pull_worker: int | None = None  # fused pull after the push: the worker whose consistency gates it
    pull: bool = False
    timeout: float | None = None  # of the fused pull
    low_water: int = 0  # the client's pushes every shard's finished checkpoint covers (``ShardState.low_water``)
    count: int = 1  # pushes this message holds (a batch: seqs ``seq .. seq + count - 1``)
    slot: int | None = None  # the fused pull's down slot in the link's shared region (None: over the socket)
    shared: bool = field(default=False, compare=False)  # received: its arrays lie in the link's shared region
    token: str | None = field(default=None, compare=False)  # received: the shared region's token it names

    def batchable(self) -> bool:
        """Whether this push may travel in a batch: a plain dense push (arrays; no rows, pieces, factors,
        encoding or pull) of one message."""
        return (self.count == 1 and type(self.payload) is dict and bool(self.payload) and self.present is None
                and self.factors is None and self.rows is None and not self.pull)

    @classmethod
    def batch(cls, pushes: list) -> "PushMessage":
        """One message holding ``pushes`` (``batchable``, one client, worker and epoch, consecutive seqs, the same
        dtypes): each dtype's payloads concatenated (one copy; a batch is for small pushes)."""
        first, last = pushes[0], pushes[-1]
        payload = {dtype: np.concatenate([push.payload[dtype] for push in pushes]) for dtype in first.payload}
        return cls(last.rid, first.client_id, first.seq, first.worker_id, first.epoch, payload,
                   replayed=any(push.replayed for push in pushes), incarnation=last.incarnation,
                   low_water=last.low_water, count=len(pushes))


@dataclass
class PullRequest:
    kind = "pull"
    rid: int
    client_id: str
    after_seq: int
    worker_id: int | None = None
    pieces: list | None = None
    incarnation: str | None = None
    timeout: float | None = None
    at_seq: int | None = None  # sync mode: the parameters this client's push ``at_seq + 1`` is computed on
    slot: int | None = None  # the reply's down slot in the link's shared region (None: over the socket)
    token: str | None = field(default=None, compare=False)  # received: the shared region's token it names


@dataclass
class RowsRequest:
    kind = "rows"
    rid: int
    client_id: str
    after_seq: int
    table: str
    ids: np.ndarray | None = None  # None: every row this shard owns
    incarnation: str | None = None
    timeout: float | None = None


@dataclass
class Reply:
    kind = "reply"
    rid: int
    ack: Ack | None = None
    errors: list = field(default_factory=list)
    params: dict | None = None  # dtype -> flat array (a pull)
    ids: np.ndarray | None = None  # a rows read of a whole table: the ids
    rows: np.ndarray | None = None  # a rows read
    waiting: bool = False
    region: Any = field(default=None, compare=False, repr=False)  # sent: the shared region its params lie in


@dataclass
class Rejection:
    kind = "reject"
    rid: int
    code: str
    field: str
    message: str


Message = PushMessage | PullRequest | RowsRequest | Reply | Rejection


# -- encoding ----------------------------------------------------------------------------------------------------
def _encode_payload(payload, arrays: ArrayFrames):
    if payload is None:
        return None
    if isinstance(payload, EncodedPayload):
        parts = {}
        for dtype, part in payload.parts.items():
            if payload.mode == "threshold":
                parts[dtype] = [list(part.shape), float(part.tau), arrays.ref(part.indices), arrays.ref(part.signs),
                                arrays.ref(part.bitmap)]
            else:
                parts[dtype] = arrays.ref(part)
        return {"m": payload.mode, "d": parts}
    return {"m": "none", "d": {dtype: arrays.ref(array) for dtype, array in payload.items()}}


def _encode_rows(rows, arrays: ArrayFrames):
    if rows is None:
        return None
    out = {}
    for name, (ids, grads) in rows.items():
        if isinstance(grads, CastRows):
            out[name] = [arrays.ref(ids), arrays.ref(grads.data), grads.mode]
        else:
            out[name] = [arrays.ref(ids), arrays.ref(grads), None]
    return out


def to_frames(message: Message, region=None) -> list:
    """The frames of ``message``: the header bytes, then the arrays themselves (no copy); those lying in
    ``region`` (the link's ``SharedRegion``) are named by their offset instead."""
    arrays = ArrayFrames(region)
    kind = message.kind
    if kind == "push":
        header = {"c": message.client_id, "s": message.seq, "w": message.worker_id, "e": message.epoch,
                  "p": _encode_payload(message.payload, arrays), "pr": message.present, "f": message.factors,
                  "rw": _encode_rows(message.rows, arrays), "rp": message.replayed, "i": message.incarnation,
                  "pl": message.pull, "pw": message.pull_worker, "t": message.timeout,
                  "lw": message.low_water, "n": message.count, "sl": message.slot}
    elif kind == "pull":
        header = {"c": message.client_id, "s": message.after_seq, "w": message.worker_id, "pc": message.pieces,
                  "i": message.incarnation, "t": message.timeout, "as": message.at_seq, "sl": message.slot}
    elif kind == "rows":
        header = {"c": message.client_id, "s": message.after_seq, "tb": message.table,
                  "ids": arrays.ref(message.ids), "i": message.incarnation, "t": message.timeout}
    elif kind == "reply":
        ack = message.ack
        header = {"ack": None if ack is None else [ack.seq, ack.applied, ack.covered, ack.incarnation],
                  "er": list(message.errors), "wt": message.waiting, "ids": arrays.ref(message.ids),
                  "rw": arrays.ref(message.rows),
                  "pm": None if message.params is None else {d: arrays.ref(a) for d, a in message.params.items()}}
    elif kind == "reject":
        header = {"cd": message.code, "fd": message.field, "ms": message.message}
    else:
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    header.update(v=VERSION, k=kind, r=message.rid, a=arrays.specs)
    if arrays.shared or (region is not None and getattr(message, "slot", None) is not None):
        header["rg"] = region.token  # the regions its arrays lie in, or its reply is to be written to
    return [msgpack.packb(header, use_bin_type=True), *arrays.frames]


# -- decoding ----------------------------------------------------------------------------------------------------
def _decode_payload(value, arrays):
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("d"), dict):
        raise ProtocolError("payload", "a map {m: mode, d: {dtype: part}} or nil", value)
    mode, parts = value.get("m"), value["d"]
    if mode not in ("none", "threshold", *CAST_MODES):
        raise ProtocolError("payload.m", f"one of {['none', 'threshold', *CAST_MODES]}", mode)
    decoded = {}
    for dtype, part in parts.items():
        if dtype not in ARRAY_DTYPES:
            raise ProtocolError("payload.d", f"dtype keys in {sorted(ARRAY_DTYPES)}", dtype)
        name = f"payload[{dtype!r}]"
        if mode == "threshold":
            if (not isinstance(part, list) or len(part) != 5 or not isinstance(part[0], list)
                    or not all(is_count(d) for d in part[0]) or type(part[1]) not in (int, float)):
                raise ProtocolError(name, "[shape, tau, indices, signs, bitmap]", part)
            decoded[dtype] = EncodedTensor(tuple(part[0]), float(part[1]),
                                           array_at(arrays, part[2], f"{name}.indices", 1, True),
                                           array_at(arrays, part[3], f"{name}.signs", 1, True),
                                           array_at(arrays, part[4], f"{name}.bitmap", 1, True))
        else:
            decoded[dtype] = array_at(arrays, part, name, 1)
    return decoded if mode == "none" else EncodedPayload(mode, decoded)


def _decode_rows(value, arrays):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("rows", "a map table -> [ids, grads, cast]", value)
    rows = {}
    for name, part in value.items():
        if not isinstance(part, list) or len(part) != 3 or part[2] not in (None, *CAST_MODES):
            raise ProtocolError(f"rows[{name!r}]", f"[ids, grads, cast in {[None, *CAST_MODES]}]", part)
        ids = array_at(arrays, part[0], f"rows[{name!r}].ids", 1)
        grads = array_at(arrays, part[1], f"rows[{name!r}].grads")
        rows[name] = (ids, grads if part[2] is None else CastRows(part[2], grads))
    return rows


def _is_present(value) -> bool:
    return value is None or value == "tick" or (
        isinstance(value, list) and all(type(i) is int and 0 <= i < 1 << 31 for i in value))


def _is_factors(value) -> bool:
    return value is None or (isinstance(value, dict) and all(
        type(k) is str and isinstance(v, list) and len(v) == 2 and all(type(x) in (int, float) for x in v)
        for k, v in value.items()))


def _is_bool(value) -> bool:
    return type(value) is bool


def _is_seq(value) -> bool:
    return is_count(value) and value >= 1


def _is_push_count(value) -> bool:
    return type(value) is int and 1 <= value <= MAX_BATCH


# a push's header fields: (key, field name, check, what is expected), in the order ``from_frames`` checks them
PUSH_FIELDS = (("c", "client_id", is_client_id, "a client id (1-256 characters)"),
               ("s", "seq", _is_seq, "a sequence number >= 1"),
               ("w", "worker_id", is_count, "a worker id (int >= 0)"),
               ("e", "epoch", is_count, "an epoch (int >= 0)"),
               ("pr", "present", _is_present, "nil, 'tick' or a list of piece indices"),
               ("f", "factors", _is_factors, "nil or a map name -> [scale, clip]"),
               ("rp", "replayed", _is_bool, "true or false"),
               ("i", "incarnation", is_opt_str, "nil or an incarnation id"),
               ("pw", "pull_worker", is_opt_count, "nil or a worker id"),
               ("pl", "pull", _is_bool, "true or false"),
               ("t", "timeout", is_timeout, "nil or seconds >= 0"),
               ("lw", "low_water", is_count, "a sequence number >= 0"),
               ("n", "count", _is_push_count, f"a push count 1..{MAX_BATCH}"),
               ("sl", "slot", is_opt_count, "nil or a slot number"))


def from_frames(frames, region_of=None) -> Message:
    """The message in ``frames`` (bytes, memoryviews or ``zmq.Frame``), checked whole before any array is
    read; ``ProtocolError`` naming the field otherwise. ``region_of(header)``: the link's shared region (a
    uint8 array) for arrays named by offset, or None (see server/frames.py)."""
    header = read_header(frames)
    kind = header.get("k")
    rid = header_field(header, "r", "rid", is_count, "a request id (int >= 0)")
    arrays = read_arrays(header, frames, region_of)
    if kind == "push":
        (client_id, seq, worker_id, epoch, present, factors, replayed, incarnation, pull_worker, pull, timeout,
         low_water, count, slot) = fields(header, PUSH_FIELDS)
        message = PushMessage(
            rid, client_id, seq, worker_id, epoch, _decode_payload(header.get("p"), arrays), present,
            None if factors is None else {k: (float(v[0]), float(v[1])) for k, v in factors.items()},
            _decode_rows(header.get("rw"), arrays), replayed, incarnation, pull_worker, pull, timeout, low_water,
            count, slot, any(len(spec) == 3 for spec in header["a"]), _token(header))
        if count > 1:
            _check_batch(message)
        return message
    if kind == "pull":
        return PullRequest(
            rid, header_field(header, "c", "client_id", is_client_id, "a client id (1-256 characters)"),
            header_field(header, "s", "after_seq", is_count, "a sequence number >= 0"),
            header_field(header, "w", "worker_id", is_opt_count, "nil or a worker id"),
            header_field(header, "pc", "pieces", lambda v: v is None or (_is_present(v) and v != "tick"),
                   "nil or a list of piece indices"),
            header_field(header, "i", "incarnation", is_opt_str, "nil or an incarnation id"),
            header_field(header, "t", "timeout", is_timeout, "nil or seconds >= 0"),
            header_field(header, "as", "at_seq", is_opt_count, "nil or a sequence number >= 0"),
            header_field(header, "sl", "slot", is_opt_count, "nil or a slot number"), _token(header))
    if kind == "rows":
        return RowsRequest(
            rid, header_field(header, "c", "client_id", is_client_id, "a client id (1-256 characters)"),
            header_field(header, "s", "after_seq", is_count, "a sequence number >= 0"),
            header_field(header, "tb", "table", lambda v: type(v) is str and len(v) <= 256, "a table name"),
            array_at(arrays, header.get("ids"), "ids", 1, True),
            header_field(header, "i", "incarnation", is_opt_str, "nil or an incarnation id"),
            header_field(header, "t", "timeout", is_timeout, "nil or seconds >= 0"))
    if kind == "reply":
        ack = header.get("ack")
        if ack is not None:
            if (not isinstance(ack, list) or len(ack) != 4 or not all(is_count(x) for x in ack[:3])
                    or type(ack[3]) is not str):
                raise ProtocolError("ack", "[seq, applied, covered, incarnation]", ack)
            ack = Ack(*ack)
        params = header.get("pm")
        if params is not None:
            if not isinstance(params, dict):
                raise ProtocolError("params", "a map dtype -> array", params)
            params = {d: array_at(arrays, ref, f"params[{d!r}]", 1) for d, ref in params.items()}
        return Reply(rid, ack, header_field(header, "er", "errors", lambda v: isinstance(v, list) and all(
            type(e) is str for e in v), "a list of strings"), params,
            array_at(arrays, header.get("ids"), "ids", 1, True), array_at(arrays, header.get("rw"), "rows", 2, True),
            header_field(header, "wt", "waiting", _is_bool, "true or false"))
    if kind == "reject":
        return Rejection(rid, header_field(header, "cd", "code", lambda v: v in REJECTION_CODES,
                                     f"one of {list(REJECTION_CODES)}"),
                         header_field(header, "fd", "field", lambda v: type(v) is str, "a field name"),
                         header_field(header, "ms", "message", lambda v: type(v) is str, "a message"))
    raise ProtocolError("kind", "one of ['push', 'pull', 'rows', 'reply', 'reject']", kind)


def _token(header: dict) -> str | None:
    token = header.get("rg")
    return token if type(token) is str else None


def _check_batch(message: PushMessage) -> None:
    """A batch holds plain dense pushes only, and each array divides into ``count`` equal parts."""
    if type(message.payload) is not dict or not message.payload:
        raise ProtocolError("payload", f"plain arrays for a batch of {message.count} pushes", message.payload)
    for name in ("present", "factors", "rows", "pull"):
        if getattr(message, name):
            raise ProtocolError(name, f"nothing in a batch of {message.count} pushes", getattr(message, name))
    if message.seq + message.count - 1 >= 1 << 62:
        raise ProtocolError("seq", "a batch whose last sequence number is below 2**62", message.seq)
    for dtype, array in message.payload.items():
        if array.size % message.count:
            raise ProtocolError(f"payload[{dtype!r}]", f"a multiple of count {message.count} elements", array.size)


def peek_rid(frames) -> int:
    """The request id of a message that failed to decode, if its header says one (else 0): the rejection
    goes back under it."""
    try:
        rid = msgpack.unpackb(buffer_of(frames[0]), raw=False, max_bin_len=0, max_ext_len=0).get("r", 0)
        return rid if is_count(rid) else 0
    except Exception:  # noqa: BLE001
        return 0
