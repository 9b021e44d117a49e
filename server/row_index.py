"""Row ownership and lookup for row-sparse tables (``sparse_rows.RowTableShard``): hashing, a per-row initial
value that needs no stored table, and a vectorized open-addressing index.

* **Ownership** — ``row_owner(ids, num_shards)``: a multiplicative (Fibonacci) hash, ``h = id * 2^64/phi mod
  2^64``, shard ``= (h >> 32) * num_shards >> 32``. A range split would keep neighbouring ids together, which
  puts the whole hot head of a power-law table (the smallest ids of every field) on one shard; the hash
  spreads consecutive ids evenly (three-distance theorem), so one hot table uses every shard. Deterministic,
  vectorized, O(len(ids)).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_EMPTY = -1


# -- hashing ----------------------------------------------------------------------------------------------
def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer of ``x + golden``: a bijection of uint64 with full avalanche (vectorized)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniform(seed: int, counters: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) that depend only on ``(seed, counter)``: float64, the shape of ``counters``."""
    key = mix64(np.array([seed], dtype=np.uint64))[0]
    bits = mix64(np.asarray(counters, dtype=np.uint64) ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def row_owner(ids, num_shards: int) -> np.ndarray:
    """The shard (int64) that owns each row id: Fibonacci hashing, see the module docstring."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or not 1 <= num_shards < 1 << 31:
        raise ValueError(f"num_shards must be an integer in [1, 2^31), got {num_shards!r}")
    h = np.asarray(ids).astype(np.uint64) * _GOLDEN  # wraps mod 2^64
    return (((h >> np.uint64(32)) * np.uint64(num_shards)) >> np.uint64(32)).astype(np.int64)


class HashedUniformInit:
    """``initial(row_ids)``: row r, column j is ``scale * (2u - 1)``, u = ``counter_uniform(seed, r * dim + j)``.

    Reproducible per row without storing the table (any shard count, any order). Picklable; ``to_config``.
    """

    def __init__(self, dim: int, scale: float = 0.01, seed: int = 0):
        self.dim, self.scale, self.seed = int(dim), float(scale), int(seed)

    def __call__(self, row_ids) -> np.ndarray:
        ids = np.asarray(row_ids, dtype=np.uint64)
        counters = ids[:, None] * np.uint64(self.dim) + np.arange(self.dim, dtype=np.uint64)
        return self.scale * (2.0 * counter_uniform(self.seed, counters) - 1.0)

    def to_config(self) -> dict:
        return {"type": "HashedUniformInit", "dim": self.dim, "scale": self.scale, "seed": self.seed}

    def __repr__(self):
        return f"HashedUniformInit(dim={self.dim}, scale={self.scale}, seed={self.seed})"


# -- the index ----------------------------------------------------------------------------------------------
class RowIndex:
    """Open-addressing hash map (linear probing, load <= 1/2) from int64 row id to int64 slot, vectorized:
    each probe round is one NumPy pass over the ids still unresolved.

    Memory: ``keys`` and ``vals``, int64 each, ``cells = 2^ceil(log2(2 x capacity + 1))`` (at least 64), so
    ``16 x cells`` bytes: between 32 and 64 bytes per row of ``capacity``. Deletion shifts back (no tombstones):
    the keys in the run after a deleted cell, up to the next empty cell, are taken out and placed again, so
    the load counts live keys only and an index sized for a table's cap never grows or rebuilds while rows are
    evicted and stored (``deleted`` stays 0; kept for the invariant checks). Growth (a table without a cap):
    a table of twice the cells, the old one's keys moved over ``GROW_CHUNK`` cells at a time (the old and the
    new tables coexist while it runs, no other table-sized copy).
    """

    GROW_CHUNK = 1 << 16

    def __init__(self, capacity: int = 64):
        cells = self.cells_for(capacity)
        self.keys = np.full(cells, _EMPTY, dtype=np.int64)
        self.vals = np.zeros(cells, dtype=np.int64)
        self.size = 0
        self.deleted = 0  # no tombstones: deletion shifts back

    @staticmethod
    def cells_for(capacity: int) -> int:
        """The cells of ``RowIndex(capacity)`` (its bytes: ``16 x cells``)."""
        return 1 << max(6, int(capacity - 1).bit_length())

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return (mix64(ids) & np.uint64(len(self.keys) - 1)).astype(np.int64)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id, -1 where absent (ids: int64 >= 0, duplicates allowed)."""
        cells = self.positions(ids)
        return np.where(cells >= 0, self.vals[cells], -1)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Cell of each id, -1 where absent."""
        result = np.full(len(ids), -1, dtype=np.int64)
        pos = self._home(ids)
        pending = np.arange(len(ids))
        mask = len(self.keys) - 1
        while pending.size:
            found = self.keys[pos[pending]]
            hit = found == ids[pending]
            result[pending[hit]] = pos[pending[hit]]
            pending = pending[~hit & (found != _EMPTY)]
            pos[pending] = (pos[pending] + 1) & mask
        return result

    def delete(self, ids: np.ndarray) -> None:
        """Remove ids that are present (unique). Backward shift: every key in the run after an emptied cell (up
        to the next empty cell) may have probed past it, so those keys are taken out and placed again; a run
        ends at the next emptied cell too, so the runs are disjoint. Work: the deleted ids plus their runs."""
        cells = self.positions(ids)
        cells = cells[cells >= 0]
        if not len(cells):
            return
        self.keys[cells] = _EMPTY
        self.size -= len(cells)
        mask = len(self.keys) - 1
        runs, frontier = [], (cells + 1) & mask
        while frontier.size:
            frontier = frontier[self.keys[frontier] != _EMPTY]
            runs.append(frontier)
            frontier = (frontier + 1) & mask
        moved = np.concatenate(runs)
        if len(moved):
            moved_ids, moved_slots = self.keys[moved], self.vals[moved]  # copies (fancy indexing)
            self.keys[moved] = _EMPTY
            self.size -= len(moved)
            self._place(moved_ids, moved_slots)

    def update(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Point present ids at new slots."""
        self.vals[self.positions(ids)] = slots

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Add ids that are unique and absent, with their slots."""
        if 2 * (self.size + len(ids)) > len(self.keys):
            self._grow(2 * (self.size + len(ids)) + 1)
        self._place(ids, slots)

    def _grow(self, capacity: int) -> None:
        old_keys, old_vals = self.keys, self.vals
        grown = RowIndex(capacity)
        for start in range(0, len(old_keys), self.GROW_CHUNK):
            keys = old_keys[start:start + self.GROW_CHUNK]
            live = keys != _EMPTY
            grown._place(keys[live], old_vals[start:start + self.GROW_CHUNK][live])
        self.keys, self.vals, self.size = grown.keys, grown.vals, grown.size

    def _place(self, ids: np.ndarray, slots: np.ndarray) -> None:
        pos = self._home(ids)
        pending = np.arange(len(ids))
        mask = len(self.keys) - 1
        while pending.size:
            target = pos[pending]
            free = self.keys[target] == _EMPTY  # the ids are absent: no later duplicate
            cells, first = np.unique(target[free], return_index=True)  # one winner per free cell
            winners = pending[free][first]
            self.keys[cells] = ids[winners]
            self.vals[cells] = slots[winners]
            placed = np.zeros(len(ids), dtype=bool)
            placed[winners] = True
            pending = pending[~placed[pending]]
            pos[pending] = (pos[pending] + 1) & mask
        self.size += len(ids)


def split_by_owner(ids, num_shards: int) -> list[np.ndarray]:
    """For a client: the positions in ``ids`` that go to each shard (``ids[positions[s]]`` for shard s)."""
    owners = row_owner(ids, num_shards)
    order = np.argsort(owners, kind="stable")
    bounds = np.searchsorted(owners[order], np.arange(num_shards + 1))
    return [order[bounds[s]:bounds[s + 1]] for s in range(num_shards)]
