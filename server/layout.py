"""``ParameterLayout``: parameter name -> pieces (shard, rows, offset) over flat per-dtype shard buffers.

Rules (deterministic for the same inputs):

* the fair share is ``ceil(total_bytes / num_shards)``; a tensor larger than it is split by rows (first axis)
  into ``ceil(bytes / fair)`` near-equal pieces; smaller tensors stay whole;
* pieces go, largest first (ties by parameter order), to the least-loaded shard (ties by lowest index) — the
  LPT rule, which keeps the largest shard within 4/3 of the optimum;
* inside a shard, pieces are laid out per dtype in (group, parameter order, first row) order, so every
  param group is ONE contiguous range of each dtype buffer: a push that carries every key is one kernel call
  per (dtype, group) on each shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Rows ``[row_start, row_stop)`` of parameter ``name``, stored at ``offset`` of shard ``shard``'s buffer."""

    name: str
    shard: int
    dtype: str
    row_start: int
    row_stop: int
    offset: int  # in elements of the shard's buffer for this dtype
    size: int  # elements
    shape: tuple  # shape of this piece
    group: int  # index of the ParamGroup this parameter belongs to
    index: int  # position of the piece in its shard's piece list


class ParameterLayout:
    """Where every parameter lives. Build with ``ParameterLayout.build(specs, num_shards, group_of)``."""

    def __init__(self, shapes: Mapping[str, tuple], dtypes: Mapping[str, str], num_shards: int,
                 shard_pieces: Sequence[Sequence[Piece]]):
        self.shapes = dict(shapes)
        self.dtypes = dict(dtypes)
        self.names = tuple(shapes)
        self.num_shards = num_shards
        self.shard_pieces = tuple(tuple(p) for p in shard_pieces)
        self.pieces_of: dict[str, list[Piece]] = {name: [] for name in self.names}
        for pieces in self.shard_pieces:
            for piece in pieces:
                self.pieces_of[piece.name].append(piece)
        for pieces in self.pieces_of.values():
            pieces.sort(key=lambda p: p.row_start)
        self.buffer_sizes = [self._sizes(pieces) for pieces in self.shard_pieces]

    @staticmethod
    def _sizes(pieces) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for piece in pieces:
            sizes[piece.dtype] = max(sizes.get(piece.dtype, 0), piece.offset + piece.size)
        return sizes

    @classmethod
    def build(cls, shapes: Mapping[str, tuple], dtypes: Mapping[str, str], num_shards: int,
              group_of: Mapping[str, int] | None = None) -> "ParameterLayout":
        names = list(shapes)
        group_of = group_of or {name: 0 for name in names}
        itemsize = {name: np.dtype(dtypes[name]).itemsize for name in names}
        nbytes = {name: int(np.prod(shapes[name], dtype=np.int64)) * itemsize[name] for name in names}
        fair = max(1, math.ceil(sum(nbytes.values()) / num_shards))

        # (name, row_start, row_stop, bytes) before placement
        raw: list[tuple[str, int, int, int]] = []
        for name in names:
            shape = tuple(shapes[name])
            rows = shape[0] if shape else 1
            parts = min(rows, math.ceil(nbytes[name] / fair)) if nbytes[name] > fair and shape else 1
            bounds = np.linspace(0, rows, parts + 1).round().astype(int)
            row_bytes = nbytes[name] // max(rows, 1)
            for start, stop in zip(bounds[:-1], bounds[1:]):
                raw.append((name, int(start), int(stop), row_bytes * int(stop - start) if shape else nbytes[name]))

        order = {name: i for i, name in enumerate(names)}
        load = [0] * num_shards
        assigned: list[list[tuple[str, int, int]]] = [[] for _ in range(num_shards)]
        for name, start, stop, size in sorted(raw, key=lambda r: (-r[3], order[r[0]], r[1])):
            shard = min(range(num_shards), key=lambda s: (load[s], s))
            load[shard] += size
            assigned[shard].append((name, start, stop))

        shard_pieces = []
        for shard, members in enumerate(assigned):
            members.sort(key=lambda m: (group_of[m[0]], order[m[0]], m[1]))
            offsets: dict[str, int] = {}
            pieces = []
            for name, start, stop in members:
                shape = tuple(shapes[name])
                piece_shape = ((stop - start),) + shape[1:] if shape else ()
                size = int(np.prod(piece_shape, dtype=np.int64))
                dtype = str(np.dtype(dtypes[name]))
                offset = offsets.get(dtype, 0)
                offsets[dtype] = offset + size
                pieces.append(Piece(name=name, shard=shard, dtype=dtype, row_start=start, row_stop=stop,
                                    offset=offset, size=size, shape=piece_shape, group=group_of[name],
                                    index=len(pieces)))
            shard_pieces.append(pieces)
        return cls(shapes, {n: str(np.dtype(dtypes[n])) for n in names}, num_shards, shard_pieces)

    # -- packing: one flat array per dtype per shard ---------------------------------------------------
    def shards_of(self, names) -> list[int]:
        return sorted({p.shard for name in names for p in self.pieces_of[name]})

    def pack(self, shard: int, arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[int] | None]:
        """One flat array per dtype holding ``arrays``' pieces for ``shard``, and the piece indices present
        (``None`` when every piece of the shard is present, the common full push)."""
        pieces = self.shard_pieces[shard]
        present = [p for p in pieces if p.name in arrays]
        full = len(present) == len(pieces)
        buffers: dict[str, np.ndarray] = {}
        sizes: dict[str, int] = {}
        for piece in present:
            sizes[piece.dtype] = sizes.get(piece.dtype, 0) + piece.size
        for dtype, size in sizes.items():
            buffers[dtype] = np.empty(size, dtype=dtype)
        cursor: dict[str, int] = {dtype: 0 for dtype in sizes}
        for piece in present:
            source = arrays[piece.name]
            rows = source[piece.row_start:piece.row_stop] if source.ndim else source
            start = cursor[piece.dtype]
            np.copyto(buffers[piece.dtype][start:start + piece.size].reshape(piece.shape), rows, casting="same_kind")
            cursor[piece.dtype] = start + piece.size
        return buffers, (None if full else [p.index for p in present])

    def unpack_into(self, shard: int, buffers: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray],
                    piece_indices: Sequence[int] | None = None) -> None:
        """Copy a shard's flat buffers (laid out as ``pack`` lays them) into the full arrays in ``out``."""
        pieces = self.shard_pieces[shard]
        selected = pieces if piece_indices is None else [pieces[i] for i in piece_indices]
        cursor: dict[str, int] = {}
        for piece in selected:
            start = cursor.get(piece.dtype, 0) if piece_indices is not None else piece.offset
            flat = buffers[piece.dtype][start:start + piece.size].reshape(piece.shape)
            target = out.get(piece.name)
            if target is not None:
                if target.ndim:
                    target[piece.row_start:piece.row_stop] = flat
                else:
                    target[...] = flat
            cursor[piece.dtype] = start + piece.size

    def assemble(self, received: Mapping[int, Mapping[str, np.ndarray]], names: Sequence[str], copy: bool = True,
                 packed: Mapping[int, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
        """The whole arrays ``names`` from shards' flat buffers (``received``: shard -> dtype -> flat array).
        ``packed``: shard -> the piece indices its buffers hold, packed in that order (a partial pull, as
        ``pack`` lays them out); any other shard's buffers hold every piece at its layout offset.

        ``copy=True``: fresh writeable arrays the caller owns. ``copy=False``: read-only arrays; where a
        parameter is one piece, a view into the received buffer (no copy), else a freshly assembled array."""
        offsets = {shard: self.packed_offsets(shard, indices) for shard, indices in (packed or {}).items()
                   if indices is not None}
        out = {}
        for name in names:
            pieces = self.pieces_of[name]
            if len(pieces) == 1:
                piece = pieces[0]
                start = offsets[piece.shard][piece.index] if piece.shard in offsets else piece.offset
                view = received[piece.shard][piece.dtype][start:start + piece.size].reshape(self.shapes[name])
                if copy:
                    out[name] = view.copy()
                else:
                    view.flags.writeable = False  # this view only: the received buffer is Ray's (read-only) anyway
                    out[name] = view
                continue
            array = np.empty(self.shapes[name], dtype=self.dtypes[name])
            for piece in pieces:
                start = offsets[piece.shard][piece.index] if piece.shard in offsets else piece.offset
                array[piece.row_start:piece.row_stop] = \
                    received[piece.shard][piece.dtype][start:start + piece.size].reshape(piece.shape)
            if not copy:
                array.flags.writeable = False
            out[name] = array
        return out

    def packed_offsets(self, shard: int, piece_indices: Sequence[int]) -> dict[int, int]:
        """piece index -> its offset in buffers that hold only ``piece_indices``, packed in that order."""
        pieces = self.shard_pieces[shard]
        cursor: dict[str, int] = {}
        offsets = {}
        for index in piece_indices:
            piece = pieces[index]
            offsets[index] = cursor.get(piece.dtype, 0)
            cursor[piece.dtype] = offsets[index] + piece.size
        return offsets

    def describe(self) -> list[dict]:
        """Per shard: bytes and piece count (for stats and docs)."""
        return [{"shard": s, "bytes": int(sum(p.size * np.dtype(p.dtype).itemsize for p in pieces)),
                 "pieces": len(pieces)} for s, pieces in enumerate(self.shard_pieces)]

    def to_config(self) -> dict:
        return {"shapes": {n: list(s) for n, s in self.shapes.items()}, "dtypes": dict(self.dtypes),
                "num_shards": self.num_shards}
