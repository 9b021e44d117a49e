"""How arrays travel between the client handle and the shard actors (no Ray here).

Ray serializes a NumPy array through pickle protocol 5 (out-of-band buffers): zero-copy for large arrays, but
~40 µs of fixed cost per array on each side, the price of a whole small call; ``bytes`` cost ~1 µs. So an
array of at most ``SMALL_WIRE_BYTES`` travels as its raw bytes (one copy of <= 64 KiB, and ``bytes`` own
their data), a larger one as the array itself. The receiver restores a raw part with ``np.frombuffer``: a
read-only view of the received bytes, as Ray's own arrays are.

* push payloads (``PushPlan``, compression ``none``): dtype -> array or raw bytes of that dtype;
* pull replies (``reply``): the one flat array of a shard that holds one dtype (raw when small), else the
  dict dtype -> array; ``buffers_of`` turns a reply back into the dict, given the dtypes it holds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SMALL_WIRE_BYTES = 64 * 1024  # below Ray's 100 KB limit for arguments and replies sent inline


def to_wire(array: np.ndarray):
    """``array`` as sent: its raw bytes when small, else itself."""
    return array.tobytes() if array.nbytes <= SMALL_WIRE_BYTES else array


def from_wire(part, dtype: str):
    """The array of a received part (raw bytes of ``dtype``, or an array as is). Bytes that are not a whole
    number of ``dtype`` elements, or an unknown dtype, stay as they are: the shard's checks report them."""
    if type(part) is not bytes:
        return part
    try:
        return np.frombuffer(part, dtype=dtype)
    except (TypeError, ValueError):
        return part


def payload_from_wire(payload):
    """A received push payload with raw parts restored (a payload with none is returned as is)."""
    if type(payload) is not dict:  # None (a skipped push), or an EncodedPayload (compression)
        return payload
    for part in payload.values():
        if type(part) is bytes:
            return {dtype: from_wire(part, dtype) for dtype, part in payload.items()}
    return payload


def nbytes(payload) -> int:
    """Bytes of a payload's parts as sent (raw or array)."""
    return sum(len(a) if type(a) is bytes else int(a.nbytes) for a in payload.values()) if payload else 0


def reply(buffers: dict):
    """A read's buffers (dtype -> flat array) as sent: the one array when they hold a single dtype (raw when
    small), else the dict."""
    if len(buffers) == 1:
        for array in buffers.values():
            return to_wire(array)
    return buffers


def buffers_of(answer, dtypes: Sequence[str]) -> dict | None:
    """dtype -> flat array from a ``reply`` whose buffers hold ``dtypes`` (None stays None: not ready)."""
    if answer is None or type(answer) is dict:
        return answer
    if type(answer) is bytes:
        return {dtypes[0]: np.frombuffer(answer, dtype=dtypes[0])}
    return {answer.dtype.name: answer}
