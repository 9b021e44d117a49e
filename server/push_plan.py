"""``PushPlan``: how one push's gradients become one message per shard — routing worked out once per layout,
applied on every push with few Python steps and no copy that is not needed.

Per shard and dtype the payload is ONE flat array (``ParameterLayout.pack``'s layout), which the data plane
sends as one frame without copying it (server/protocol.py):

* when it is a single piece whose source is C-contiguous and of the parameter's dtype, it is a VIEW of the
  caller's array (``grads[name].reshape(-1)[start:stop]``). A message that may outlive the call (``own``: a
  pipelined ``push`` returns before its acknowledgement; ``own_payloads``: the client keeps its pushes for
  replay, with a ``checkpoint_dir``) must own its data, so the view is copied;
* otherwise the pieces are packed into a buffer the message owns (``own`` or not: ZeroMQ reads a large frame
  after the call returns, and an unacknowledged message may be resent, so no later push may write into it).

A buffer (a copy or a pack) of a full push of ``POOL_FROM_BYTES`` or more is recycled, not allocated afresh (a
fresh large allocation is a fresh mapping whose every page faults in while it is written): up to
``POOL_DEPTH`` buffers per (shard, dtype) are kept, and the message gets an array over one of them through a
``Lease`` (server/shared_regions.py), an object that every array, view, memoryview or ZeroMQ frame made from
the message's array keeps alive. A buffer is given to a new push only once its lease is garbage: nothing made
from the earlier message is left (not the message in the client's unacknowledged or replay lists, not a frame
ZeroMQ has yet to send).
When all are in use a fresh buffer is allocated and not kept. On a link with shared memory
(server/shared_regions.py; ``shared_buffers``) the recycled buffers are the link's up slots, so the pack writes
the push where the shard reads it (a piece that would go as a view of the caller's array is copied there too:
one copy instead of the socket's two); a new region (the shard restarted) starts a new pool, and the buffers
of the old one stay alive while their messages do.

Checks run before anything is sent, over the whole push, so a bad push reaches no shard (atomic across shards):
structure (``validation.check_gradients``) first; then finiteness: an array below ``finite_copy.SWEEP_FROM``
elements whole, before anything is built (``finite_copy.all_finite``); a larger one while the payloads are
built, every element read once: a copied piece is copied and checked in one pass
(``finite_copy.copy_all_finite``), a view is checked where it lies (``finite_copy.all_finite``: an exact test of
the exponent bits). The pieces of a parameter cover it, so every element of every pushed array is checked. On
a non-finite element the built payloads are dropped and the first non-finite gradient in ``grads`` order is
named: a ValueError naming ``grads['name']`` (nan_policy "reject") or a push of clock ticks (payload ``None``,
"skip"). Large arrays are swept by ``SWEEP_THREADS`` threads.
"""

from __future__ import annotations

import weakref
from typing import Mapping

import numpy as np

from ..updaters.groups import assign_groups
from . import finite_copy
from .layout import ParameterLayout
from .row_tables import check_rows, route
from .shared_regions import Lease
from .validation import check_gradients

SWEEP_THREADS = 2  # threads that copy and check one large array (finite_copy)
POOL_FROM_BYTES = 1 << 20  # owned buffers of full pushes this large are recycled
POOL_DEPTH = 2  # recycled buffers per (shard, dtype): a push and the one after it


class _NonFinite(Exception):
    """A piece being built holds a NaN or Inf (caught in ``PushPlan.messages``)."""


class PushPlan:
    """Builds ``(shard, payload, present, factors, rows)`` per shard from a push (see the module docstring)."""

    def __init__(self, layout: ParameterLayout, groups, tables: Mapping, nan_policy: str, own_payloads: bool):
        self.layout = layout
        self.tables = dict(tables)
        self.groups = tuple(groups)
        self.nan_policy = nan_policy
        self.own_payloads = own_payloads
        self.num_shards = layout.num_shards
        self.normalizes = any(g.gradient_normalization != "None" for g in self.groups)
        self.group_of = assign_groups(self.groups, list(layout.names) + list(self.tables)) if self.normalizes else {}
        self.shard_names = [frozenset(p.name for p in pieces) for pieces in layout.shard_pieces]
        # per shard: ((dtype, numpy dtype, elements, ((name, flat start, flat stop, piece), ...)), ...)
        self.full_parts = [self._parts(pieces) for pieces in layout.shard_pieces]
        self.recycled: dict[tuple[int, str], tuple] = {}  # (shard, dtype) -> (source, [(buffer, weakref to lease)])
        self.shared_buffers = None  # shard -> its link's ``LinkRegions`` or None (set by the client)

    @staticmethod
    def _parts(pieces) -> tuple:
        by_dtype: dict[str, list] = {}
        for piece in pieces:
            row_elements = piece.size // max(piece.row_stop - piece.row_start, 1) if piece.shape else piece.size
            start = piece.row_start * row_elements if piece.shape else 0
            by_dtype.setdefault(piece.dtype, []).append((piece.name, start, start + piece.size, piece))
        return tuple((dtype, np.dtype(dtype), sum(p[3].size for p in members), tuple(members))
                     for dtype, members in by_dtype.items())

    # -- the messages --------------------------------------------------------------------------------------
    def messages(self, grads, rows=None, own: bool = False) -> list:
        """Per shard ``(shard, payload, present, factors, rows)``; raises (changing nothing) on a bad push.
        ``own``: the payloads must own their data (see the module docstring)."""
        own = own or self.own_payloads
        if self.tables and isinstance(grads, Mapping):
            for name in grads:
                if name in self.tables:
                    raise ValueError(f"grads[{name!r}]: {name!r} is a row-sparse table: use "
                                     f"push_rows({name!r}, ids, grads) or push(..., rows=...)")
        if not (rows and isinstance(grads, Mapping) and not grads):
            check_gradients(grads, self.layout.shapes, self.layout.dtypes)
        shard_rows, nonfinite = self._route_rows(rows)
        full = len(grads) == len(self.layout.names)
        small = finite_copy.SWEEP_FROM  # smaller arrays are checked whole, first; larger ones while built
        bad = False
        for value in grads.values():
            if value.size < small and not finite_copy.all_finite(value):
                bad = True
                break
        if not bad:
            try:  # builds and checks every piece (module docstring); nothing is sent before this returns
                built = [(self._payload(shard, self.full_parts[shard], grads, own), None) if full
                         else self._partial(shard, grads) for shard in range(self.num_shards)]
            except _NonFinite:
                bad = True
        if bad:  # the first non-finite gradient in grads order
            nonfinite = next((name for name, value in grads.items() if not finite_copy.all_finite(value)), "?")
        if nonfinite is not None:
            if self.nan_policy == "reject":
                raise ValueError(f"grads[{nonfinite!r}] contains NaN or Inf (nan_policy='reject'; "
                                 f"use nan_policy='skip' to drop such pushes)")
            return [(shard, None, None, None, None) for shard in range(self.num_shards)]
        factors = self._normalization_factors(grads) if self.normalizes else None
        messages = []
        for shard, (payload, present) in enumerate(built):
            shard_factors = None
            if factors:
                names = self.shard_names[shard]
                shard_factors = {name: value for name, value in factors.items() if name in names}
            messages.append((shard, payload, present, shard_factors, shard_rows[shard]))
        return messages

    def _payload(self, shard: int, parts, grads, own: bool, full: bool = True) -> dict:
        """The payload of ``parts`` (``full``: every piece of the shard); raises ``_NonFinite`` on a NaN or
        Inf (see the module docstring)."""
        payload = {}
        small = finite_copy.SWEEP_FROM  # arrays this small were checked whole in ``messages``
        if not own and full and self.shared_buffers is not None and self.shared_buffers(shard) is not None:
            own = True  # copied into the link's shared memory, where the shard reads it: cheaper than the socket
        for dtype, np_dtype, size, members in parts:
            if len(members) == 1:
                name, start, stop, _ = members[0]
                source = grads[name]
                if source.dtype == np_dtype and source.flags.c_contiguous:
                    view = source.reshape(-1)[start:stop]
                    if source.size < small and not own:
                        payload[dtype] = view
                    elif source.size < small and (not full or view.nbytes < POOL_FROM_BYTES):
                        payload[dtype] = view.copy()  # what _owned would give, in one step
                    elif source.size < small:
                        payload[dtype] = copy = self._owned(shard, dtype, np_dtype, size, full)
                        np.copyto(copy, view)
                    elif own:
                        copy = self._owned(shard, dtype, np_dtype, size, full)
                        if not finite_copy.copy_all_finite(view, copy, SWEEP_THREADS):
                            raise _NonFinite(name)
                        payload[dtype] = copy
                    elif finite_copy.all_finite(view, SWEEP_THREADS):
                        payload[dtype] = view
                    else:
                        raise _NonFinite(name)
                    continue
            buffer = self._owned(shard, dtype, np_dtype, size, full)
            cursor = 0
            for name, start, stop, piece in members:
                source = grads[name]
                end = cursor + stop - start
                if source.flags.c_contiguous:
                    part, into = source.reshape(-1)[start:stop], buffer[cursor:end]
                else:
                    part = source[piece.row_start:piece.row_stop] if source.ndim else source
                    into = buffer[cursor:end].reshape(piece.shape)
                if source.size < small:
                    np.copyto(into, part, casting="same_kind")
                elif not finite_copy.copy_all_finite(part, into, SWEEP_THREADS):
                    raise _NonFinite(name)
                cursor = end
            payload[dtype] = buffer
        return payload

    def _owned(self, shard: int, dtype: str, np_dtype, size: int, full: bool) -> np.ndarray:
        """A buffer for a message: recycled for a large full push, else fresh (module docstring)."""
        if not full or size * np_dtype.itemsize < POOL_FROM_BYTES:
            return np.empty(size, dtype=np_dtype)
        regions = None if self.shared_buffers is None else self.shared_buffers(shard)
        source, pool = self.recycled.get((shard, dtype), (None, None))
        if pool is None or source is not regions:  # first use, or the link's shared memory changed
            pool = []
            self.recycled[(shard, dtype)] = (regions, pool)
        for slot, (buffer, lease) in enumerate(pool):
            if lease() is None:
                break
        else:
            if len(pool) >= POOL_DEPTH:
                return np.empty(size, dtype=np_dtype)
            slot = len(pool)
            shared = regions is not None and slot < regions.up_slots and regions.layout.sizes.get(dtype) == size
            buffer = regions.up_buffers(slot)[dtype] if shared else np.empty(size, dtype=np_dtype)
            pool.append(None)
        lease = Lease(buffer)
        pool[slot] = (buffer, weakref.ref(lease))
        return np.asarray(lease)

    def _partial(self, shard: int, grads) -> tuple[dict, list[int]]:
        """A push of only some parameters: the present pieces, packed in layout order (fresh buffers), and their
        indices (None when they are all of this shard's pieces, as ``ParameterLayout.pack`` says it)."""
        pieces = self.layout.shard_pieces[shard]
        present = [p for p in pieces if p.name in grads]
        payload = self._payload(shard, self._parts(present), grads, True, full=False) if present else {}
        return payload, None if len(present) == len(pieces) else [p.index for p in present]

    # -- rows and normalization ----------------------------------------------------------------------------
    def _route_rows(self, rows) -> tuple[list, str | None]:
        """Per shard: {table: (ids, grads)} of the rows it owns; and the first table with non-finite grads."""
        per_shard = [None] * self.num_shards
        if not rows:
            return per_shard, None
        if not isinstance(rows, Mapping):
            raise TypeError(f"rows must map a table name to (ids, grads), got {type(rows).__name__}")
        per_shard = [{} for _ in range(self.num_shards)]
        nonfinite = None
        for name, part in rows.items():
            if name not in self.tables:
                kind = "dense: use push()" if name in self.layout.shapes else "not a parameter"
                raise ValueError(f"push_rows: {name!r} is {kind}")
            if not isinstance(part, tuple) or len(part) != 2:
                raise TypeError(f"rows[{name!r}] must be a tuple (ids, grads)")
            ids, grads = check_rows(name, self.tables[name], *part)
            if nonfinite is None:
                if not finite_copy.all_finite(grads):
                    nonfinite = name
            grads = grads.astype(self.tables[name].dtype, copy=False)
            for shard, positions in enumerate(route(ids, self.num_shards)):
                per_shard[shard][name] = (ids[positions], grads[positions])
        return per_shard, nonfinite

    def _normalization_factors(self, grads) -> dict[str, tuple[float, float]]:
        factors = {}
        for index, group in enumerate(self.groups):
            members = {n: g for n, g in grads.items() if self.group_of[n] == index}
            if members and group.gradient_normalization != "None":
                factors.update(group.normalization_factors(members))
        return factors
