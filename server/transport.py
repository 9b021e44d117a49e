"""Compression on the push path: encode one shard's push at the client, decode it at the shard (no Ray here).

    ParameterServer(params, ..., compression="none" | "threshold" | "fp16" | "bf16")

A push message carries, per shard, a dense *payload* (one flat array per dtype, as ``ParameterLayout.pack``
builds it) and optional *rows* (table -> ``(ids, grads)``). The client handle encodes both right before sending
(``encode_messages``, after every check, NaN included, has passed) and the shard decodes them first thing in
``ShardState._receive`` (``decode_push``), so everything after it sees the float payload it always saw.

* ``none``: the payload and rows go as they are.
* ``fp16`` / ``bf16``: ``compression.cast_transport`` semantics: float16 (finite values saturate at
  +-65504) or bfloat16 as ``uint16`` bit patterns (NumPy has no bfloat16); half the bytes of float32. Row grads
  are cast the same way (``protocol.CastRows``); ids stay int64.
* ``threshold``: DL4J threshold encoding with residual accumulation (``compression.ThresholdEncoder``,
  DL4J's AdaptiveThresholdAlgorithm defaults and ResidualClippingPostProcessor(5.0, 5)). The client handle keeps
  ONE encoder PER SHARD (its threshold adapts to that shard's slice of the parameters; with one shard this is
  DL4J's single flattened view), and the residual of each payload array under the key ``f"{shard}/{dtype}"``
  (a partial push of only some parameters uses its own key, ``f"{shard}/{dtype}/{pieces}"``: a key keeps its
  shape). The encoders belong to one client identity: a handle shipped to a worker starts with fresh ones, and
  the residual is lost with the worker, as in DL4J. Row pushes get only the cast modes: a per-row residual
  would be worker state the size of the touched table, so under ``threshold`` rows travel as float32.
Gradient-normalization factors (groups with ``gradient_normalization``) are computed by the client from the
uncompressed gradients and applied by the shard to the decoded ones.

The shard decodes what it receives whatever the server's mode (every encoding decodes to the same float payload),
and treats it as hostile input: an encoded array must decode to exactly the size the layout expects for its
dtype (``compression.decode_tensor`` checks indices, signs, bitmap and tau). A bad encoding is reported
like a bad payload: the push is not applied, its clock still moves.

``bytes_pushed`` (client ``bytes_pushed``, shard ``counters["bytes_pushed"]``) counts the ENCODED bytes: the
payload arrays as sent (``EncodedTensor.nbytes``: indices + signs or the 2-bit bitmap, plus 4 bytes of tau), plus
the ids and (cast) grads of the rows.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import numpy as np

from .compression import (COMPRESSIONS, EncodedTensor, ThresholdEncoder, cast_transport, decode_tensor,
                          restore_transport)
from .protocol import CastRows, EncodedPayload

CAST_DTYPES = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}


def check_mode(mode) -> str:
    if mode not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {mode!r}")
    return mode


# -- client side -----------------------------------------------------------------------------------------------
def residual_key(shard: int, dtype: str, present: Sequence[int] | None) -> str:
    """The residual key of one payload array: ``f"{shard}/{dtype}"`` for a full push, else with the pieces."""
    if present is None:
        return f"{shard}/{dtype}"
    return f"{shard}/{dtype}/{zlib.crc32(np.asarray(present, dtype=np.int64).tobytes()):08x}:{len(present)}"


def encode_payload(shard: int, payload, present, mode: str, encoders: dict):
    """One shard's dense payload (dtype -> flat float array) as it goes on the wire. ``encoders``: the client
    handle's dict shard -> ``ThresholdEncoder`` (created here on first use)."""
    if not payload or mode == "none":
        return payload
    if mode == "threshold":
        encoder = encoders.get(shard)
        if encoder is None:
            encoder = encoders[shard] = ThresholdEncoder()
        keys = {dtype: residual_key(shard, dtype, present) for dtype in payload}
        encoded = encoder.encode({keys[dtype]: array for dtype, array in payload.items()})
        return EncodedPayload(mode, {dtype: encoded[keys[dtype]] for dtype in payload})
    return EncodedPayload(mode, cast_transport(payload, mode))


def encode_rows(rows, mode: str):
    """A shard's rows part (table -> (ids, grads)) with the grads cast (fp16/bf16); ``none``/``threshold``: as is."""
    if not rows or mode not in CAST_DTYPES:
        return rows
    return {name: (ids, CastRows(mode, cast_transport({"g": grads}, mode)["g"]))
            for name, (ids, grads) in rows.items()}


def encode_messages(messages: list, mode: str, encoders: dict) -> list:
    """``ParameterServer._messages``' per-shard tuples ``(shard, payload, present, factors, rows)``, encoded."""
    if mode == "none":
        return messages
    return [(shard, encode_payload(shard, payload, present, mode, encoders), present, factors, encode_rows(rows, mode))
            for shard, payload, present, factors, rows in messages]


def message_nbytes(payload, rows=None) -> int:
    """Bytes of one shard's push as sent: payload arrays (encoded) plus the rows' ids and grads."""
    total = 0
    if type(payload) is dict:  # plain arrays (the common case first)
        for array in payload.values():
            total += array.nbytes
    elif isinstance(payload, EncodedPayload):
        total = payload.nbytes
    if rows:
        for ids, grads in rows.values():
            total += int(ids.nbytes) + int(grads.nbytes)
    return total


# -- shard side ------------------------------------------------------------------------------------------------
def expected_sizes(pieces, present) -> dict[str, int]:
    """dtype -> elements of the payload the layout expects for the pieces ``present`` (None: all)."""
    selected = pieces if present is None else [pieces[int(i)] for i in present]
    sizes: dict[str, int] = {}
    for piece in selected:
        sizes[piece.dtype] = sizes.get(piece.dtype, 0) + piece.size
    return sizes


def decode_payload(payload, pieces, present):
    """The float payload (dtype -> flat array of that dtype) of an ``EncodedPayload``; a plain payload as is.
    Raises ValueError on any malformed part."""
    if not isinstance(payload, EncodedPayload):
        return payload
    mode = payload.mode
    if mode not in ("threshold", *CAST_DTYPES):
        raise ValueError(f"unknown transport encoding {mode!r}")
    sizes = expected_sizes(pieces, present)
    if set(payload.parts) != set(sizes):
        raise ValueError(f"{mode} payload has dtypes {sorted(payload.parts)}, the layout expects {sorted(sizes)}")
    out = {}
    for dtype, part in payload.parts.items():
        if mode == "threshold":
            if not isinstance(part, EncodedTensor):
                raise ValueError(f"threshold payload[{dtype!r}] is a {type(part).__name__}, not an EncodedTensor")
            work = np.float64 if dtype == "float64" else np.float32
            out[dtype] = decode_tensor(part, (sizes[dtype],), work, dtype).astype(dtype, copy=False)
        else:
            if not isinstance(part, np.ndarray) or part.shape != (sizes[dtype],):
                raise ValueError(f"{mode} payload[{dtype!r}]: expected {sizes[dtype]} elements, got "
                                 f"{getattr(part, 'shape', type(part).__name__)}")
            out[dtype] = restore_transport({dtype: part}, mode, {dtype: dtype})[dtype]
    return out


def decode_rows(rows, tables: Mapping):
    """Rows with cast grads (``protocol.CastRows``) restored to their table's dtype; plain rows as they are."""
    if not rows or not isinstance(rows, Mapping):
        return rows
    out = {}
    for name, part in rows.items():
        ids, grads = part
        if isinstance(grads, CastRows):
            if grads.mode not in CAST_DTYPES:
                raise ValueError(f"table {name!r}: unknown row transport cast {grads.mode!r}")
            dtype = tables[name].dtype if name in tables else np.float32
            grads = restore_transport({name: grads.data}, grads.mode, {name: dtype})[name]
        out[name] = (ids, grads)
    return out


def decode_push(payload, rows, pieces, present, tables: Mapping, where: str = "shard"):
    """``(payload, rows, encoded bytes, problem)``: the push decoded for ``ShardState._receive``. On a malformed
    encoding, ``problem`` says what is wrong (and the push must not be applied)."""
    try:
        nbytes = message_nbytes(payload, rows)
    except (AttributeError, TypeError, ValueError):
        nbytes = 0
    try:
        return decode_payload(payload, pieces, present), decode_rows(rows, tables), nbytes, None
    except (TypeError, ValueError, KeyError, IndexError) as error:
        return payload, rows, nbytes, f"{where}: undecodable push: {error}"
