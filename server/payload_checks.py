"""What a shard checks in a push before it touches anything (plain functions over ``ShardState``'s fields).

Each returns None, or ``(message, nonfinite)``: one line naming the problem: the payload's dtypes and sizes
against the layout of the pieces present, every array 1-D and of its key's dtype, no NaN or Inf (one pass per
array reading each element's exponent bits, ``finite_copy.all_finite``; the offending parameter is named), and
row pushes against their tables. A message that fails changes nothing; the caller turns the line into the
push's error (``ShardState.Problem``).
"""

from __future__ import annotations

import numpy as np

from .finite_copy import all_finite


def check_rows(shard_index: int, row_tables, rows) -> tuple[str, bool] | None:
    for name, (ids, grads) in (rows or {}).items():
        table = row_tables.get(name)
        if table is None:
            return f"shard {shard_index}: {name!r} is not a row-sparse table here", False
        try:
            ids = table.check_ids(ids, "push_rows ids")
        except (TypeError, ValueError) as error:
            return str(error), False
        problem = table.grads_problem(grads, ids)
        if problem is not None:
            return problem
    return None


def check_payload(shard_index: int, pieces, full_sizes: dict, payload, present_idx) -> tuple[str, bool] | None:
    """``payload``: dtype -> flat array of the pieces ``present_idx`` (every piece: sizes ``full_sizes``)."""
    if len(present_idx) == len(pieces):
        expected = full_sizes
    else:
        expected = {}
        for i in present_idx:
            piece = pieces[int(i)]
            expected[piece.dtype] = expected.get(piece.dtype, 0) + piece.size
    if len(payload) != len(expected):
        return _size_mismatch(shard_index, payload, expected), False
    for dtype, array in payload.items():
        if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype) or array.ndim != 1:
            return (f"shard {shard_index}: payload[{dtype!r}] must be a 1-D {dtype} array, got "
                    f"{getattr(array, 'dtype', type(array).__name__)} with shape {getattr(array, 'shape', None)}",
                    False)
        if array.size != expected.get(dtype):
            return _size_mismatch(shard_index, payload, expected), False
    for dtype, array in payload.items():
        if not all_finite(array):
            bad = _first_nonfinite_name(pieces, dtype, array, present_idx)
            return f"non-finite value (NaN or Inf) in the gradient of {bad!r}", True
    return None


def _size_mismatch(shard_index: int, payload, expected) -> str:
    got = {dtype: int(getattr(a, "size", -1)) for dtype, a in payload.items()}
    return f"shard {shard_index}: payload sizes {got} do not match the layout {expected}"


def _first_nonfinite_name(pieces, dtype, array, present_idx) -> str:
    cursor = 0
    for i in present_idx:
        piece = pieces[int(i)]
        if piece.dtype != dtype:
            continue
        if not all_finite(array[cursor:cursor + piece.size]):
            return piece.name
        cursor += piece.size
    return "?"
