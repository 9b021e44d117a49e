r"""Admission and eviction policies of row-sparse tables — the user-facing specs and the per-shard pieces of
logic ``RowTableShard`` consults, vectorized; no Ray.

**Admission** (which ids get storage and updater state). Before an id is admitted it reads as its initial value
and the gradients pushed to it are dropped (counted as ``dropped_gradients``).

* ``CountAdmission(min_count, width=2**18, depth=4, seed=0)``: an id is admitted by the push that brings the
  number of pushes it appeared in while not stored to ``min_count`` (duplicates of one push count once). The
  counts live in a count-min sketch per table shard (``CountMinSketch``: ``depth`` rows of ``width`` uint32
  cells, cell ``h_r(id) = mix64(id ^ key_r) mod width``), with conservative update (a push raises only the
  cells at the id's current minimum). The estimate never undercounts, so **an id is never admitted late**;
  it may be admitted early: with ``N`` the pushes of not-yet-stored ids a shard has counted, the estimate
  exceeds the true count by more than ``e N / width`` with probability at most ``e^-depth`` (Cormode and
  Muthukrishnan 2005; conservative update only lowers the error). Memory: ``depth * width * 12`` bytes per
  table shard (the counts, and the version of each cell for incremental checkpoints). An evicted id keeps its
  count, so it is re-admitted at its next push.
* ``ProbabilityAdmission(probability, seed=0)``: id r is admitted iff ``counter_uniform(seed, r) <
  probability`` (SplitMix64 of the id and the seed: the same ids on any shard count and in any order). A
  fixed fraction of the id space trains; the rest keeps its initial value. No state.

**Eviction** (a cap on the stored rows). ``max_rows`` is for the whole table; each of the ``S`` shards holds at
most ``shard_cap = max_rows // S`` rows (floor, so the shards together never exceed ``max_rows``;
``max_rows < S`` is refused). An evicted row's value, updater state and iteration count are dropped: its next
access starts it afresh from ``initial``.

* ``LRUEviction(max_rows)``: when a push would store more than ``shard_cap`` rows, the rows not in that push
  with the oldest last access (push or pull of the row; a table shard counts its pushes and pulls, the
  operations, as its clock) are evicted first, ties broken by the smaller id.
* ``LFUEviction(max_rows)``: the same, least accessed first (operations that touched the row since it was
  stored), then the oldest access, then the smaller id.
* ``TTLEviction(max_idle_steps)``: no cap; at the end of each push of the shard, the rows left more than
  ``max_idle_steps`` pushes of that shard without a push or pull are evicted (the clock is the shard's pushes).

Evictions under a cap come in batches: a push that needs ``k`` slots evicts ``max(k, ceil(shard_cap /
EVICTION_BATCH))`` rows (or every row not in the push, if fewer), so the O(stored rows) selection runs once per
``shard_cap / EVICTION_BATCH`` new rows, not at every push. If a single push brings more new rows than fit
even then, the new rows with the smallest ids are stored and the others dropped (counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .row_index import counter_uniform, mix64

EVICTION_BATCH = 64  # a cap eviction frees at least shard_cap / EVICTION_BATCH slots


def _check_int(owner: str, field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}: {field} must be an integer >= {minimum}, got {value!r}")


# -- admission --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CountAdmission:
    """Admit an id after ``min_count`` pushes (see the module docstring for the sketch and its error)."""

    min_count: int
    width: int = 1 << 18
    depth: int = 4
    seed: int = 0

    def __post_init__(self):
        _check_int("CountAdmission", "min_count", self.min_count, 1)
        _check_int("CountAdmission", "width", self.width, 1)
        _check_int("CountAdmission", "depth", self.depth, 1)
        _check_int("CountAdmission", "seed", self.seed, 0)
        if self.width * self.depth > 1 << 30:
            raise ValueError(f"CountAdmission: width * depth must be at most 2^30 cells, got {self.width * self.depth}")

    def to_config(self) -> dict:
        return {"type": "CountAdmission", "min_count": int(self.min_count), "width": int(self.width),
                "depth": int(self.depth), "seed": int(self.seed)}


@dataclass(frozen=True)
class ProbabilityAdmission:
    """Admit id r iff ``counter_uniform(seed, r) < probability`` (deterministic per id and seed)."""

    probability: float
    seed: int = 0

    def __post_init__(self):
        p = self.probability
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 < p <= 1:
            raise ValueError(f"ProbabilityAdmission: probability must be a number in (0, 1], got {p!r}")
        _check_int("ProbabilityAdmission", "seed", self.seed, 0)

    def admits(self, ids: np.ndarray) -> np.ndarray:
        return counter_uniform(int(self.seed), np.asarray(ids, dtype=np.int64)) < float(self.probability)

    def to_config(self) -> dict:
        return {"type": "ProbabilityAdmission", "probability": float(self.probability), "seed": int(self.seed)}


class CountMinSketch:
    """Counts of pushes per id in ``depth x width`` uint32 cells, conservative update; ``versions`` records the
    table version that last changed each cell (incremental checkpoints write the changed cells only)."""

    def __init__(self, policy: CountAdmission):
        self.width, self.depth = int(policy.width), int(policy.depth)
        keys = mix64(np.arange(self.depth, dtype=np.uint64) + np.uint64(int(policy.seed) * 1_000_003 + 17))
        self.keys = keys.reshape(self.depth, 1)
        self.counts = np.zeros(self.depth * self.width, dtype=np.uint32)
        self.versions = np.zeros(self.depth * self.width, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + self.versions.nbytes

    def cells(self, ids: np.ndarray) -> np.ndarray:
        """Flat cell index ``(depth, len(ids))``: row r's cell is ``r * width + mix64(id ^ key_r) % width``."""
        h = mix64(np.asarray(ids, dtype=np.uint64)[None, :] ^ self.keys) % np.uint64(self.width)
        return h.astype(np.int64) + (np.arange(self.depth, dtype=np.int64) * self.width)[:, None]

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.counts[self.cells(ids)].min(axis=0).astype(np.int64)

    def plan(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counting one push of each of ``ids`` (unique), without doing it: ``(cells, their new counts, the
        estimate of each id after)`` for ``commit``. Conservative update: each of an id's cells rises to (its
        current minimum + 1) unless already higher."""
        if len(ids) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        cells = self.cells(ids)
        current = self.counts[cells].astype(np.int64)
        target = np.minimum(current.min(axis=0) + 1, np.iinfo(np.uint32).max)
        touched, inverse = np.unique(cells.reshape(-1), return_inverse=True)
        counts = self.counts[touched].astype(np.int64)
        np.maximum.at(counts, inverse, np.broadcast_to(target, cells.shape).reshape(-1))
        after = counts[inverse].reshape(cells.shape).min(axis=0)
        return touched, counts, after

    def commit(self, plan, version: int) -> None:
        cells, counts, _ = plan
        changed = self.counts[cells] != counts
        self.counts[cells[changed]] = counts[changed]
        self.versions[cells[changed]] = version

    def nonzero(self) -> tuple[np.ndarray, np.ndarray]:
        cells = np.flatnonzero(self.counts)
        return cells, self.counts[cells].astype(np.int64)

    def changed_since(self, version: int) -> tuple[np.ndarray, np.ndarray]:
        cells = np.flatnonzero(self.versions > version)
        return cells, self.counts[cells].astype(np.int64)

    def set_cells(self, cells: np.ndarray, counts: np.ndarray, version: int = 0) -> None:
        self.counts[cells] = counts.astype(np.uint32)
        self.versions[cells] = version


def check_sketch_cells(cells, counts, size: int, what: str) -> None:
    """Cells inside the sketch, counts in uint32 (for restores)."""
    if len(cells) != len(counts):
        raise ValueError(f"{what}: {len(cells)} sketch cells but {len(counts)} counts")
    if len(cells) and (cells.min() < 0 or cells.max() >= size):
        raise ValueError(f"{what}: sketch cells outside [0, {size})")
    if len(counts) and (counts.min() < 0 or counts.max() > np.iinfo(np.uint32).max):
        raise ValueError(f"{what}: sketch counts outside the uint32 range")


# -- eviction ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LRUEviction:
    """At most ``max_rows`` rows (whole table); least recently accessed evicted first."""

    max_rows: int

    def __post_init__(self):
        _check_int("LRUEviction", "max_rows", self.max_rows, 1)

    def to_config(self) -> dict:
        return {"type": "LRUEviction", "max_rows": int(self.max_rows)}


@dataclass(frozen=True)
class LFUEviction:
    """At most ``max_rows`` rows (whole table); least frequently accessed evicted first."""

    max_rows: int

    def __post_init__(self):
        _check_int("LFUEviction", "max_rows", self.max_rows, 1)

    def to_config(self) -> dict:
        return {"type": "LFUEviction", "max_rows": int(self.max_rows)}


@dataclass(frozen=True)
class TTLEviction:
    """Rows idle for more than ``max_idle_steps`` pushes of their shard are evicted."""

    max_idle_steps: int

    def __post_init__(self):
        _check_int("TTLEviction", "max_idle_steps", self.max_idle_steps, 1)

    def to_config(self) -> dict:
        return {"type": "TTLEviction", "max_idle_steps": int(self.max_idle_steps)}


ADMISSIONS = (CountAdmission, ProbabilityAdmission)
EVICTIONS = (LRUEviction, LFUEviction, TTLEviction)
_BY_NAME = {cls.__name__: cls for cls in ADMISSIONS + EVICTIONS}


def check_policy(owner: str, field: str, value, kinds) -> None:
    """``value`` is None or one of ``kinds`` (the error names the field and the accepted classes)."""
    if value is not None and not isinstance(value, kinds):
        names = ", ".join(k.__name__ for k in kinds)
        raise TypeError(f"{owner}: {field} must be None or one of {names}, got {type(value).__name__}")


def shard_cap(eviction, num_shards: int, where: str = "table") -> int | None:
    """Rows one shard may store: ``max_rows // num_shards`` (None: no cap)."""
    if not isinstance(eviction, (LRUEviction, LFUEviction)):
        return None
    if eviction.max_rows < num_shards:
        raise ValueError(f"{where}: eviction max_rows ({eviction.max_rows}) is smaller than num_shards "
                         f"({num_shards}); every shard needs a cap of at least one row")
    return int(eviction.max_rows) // int(num_shards)


def eviction_batch(cap: int) -> int:
    return max(1, math.ceil(cap / EVICTION_BATCH))


def eviction_log_limit(cap: int | None) -> int:
    """Ids a table shard's eviction log keeps (older entries are dropped and the horizon moves):
    ``max(4 x cap, 65536)`` under a cap, ``2^20`` without one."""
    return max(4 * cap, 1 << 16) if cap else 1 << 20


def policy_config(policy) -> dict | None:
    return None if policy is None else policy.to_config()


def policy_from_config(config):
    """The policy a ``to_config`` record describes (None for None); errors name the record's problem."""
    if config is None:
        return None
    if not isinstance(config, dict) or config.get("type") not in _BY_NAME:
        raise ValueError(f"policy config {config!r} does not name one of {sorted(_BY_NAME)}")
    return _BY_NAME[config["type"]](**{k: v for k, v in config.items() if k != "type"})


def smallest(keys: list[np.ndarray], k: int) -> np.ndarray:
    """Positions of the ``k`` smallest entries in lexicographic order of ``keys`` (primary key first), in O(n)
    per key level (``np.partition`` on the boundary group only); the order of the result is unspecified.
    Scratch memory on the first level: one copy of the primary key (``np.partition``) and a bool per entry;
    later levels work on the boundary group only."""
    n = len(keys[0])
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    chosen, pool = [], None  # pool None: every entry (the key itself, no gathered copy)
    for level, key in enumerate(keys):
        values = key if pool is None else key[pool]
        kth = np.partition(values, k - 1)[k - 1]
        below = np.flatnonzero(values < kth)
        ties = np.flatnonzero(values == kth)
        if pool is not None:
            below, ties = pool[below], pool[ties]
        del values
        chosen.append(below)
        k -= len(below)
        pool = ties
        if k == 0 or len(pool) == k:
            break
        if level == len(keys) - 1:  # ties on every key: any k of them (callers end the keys with unique ids)
            pool = pool[:k]
            break
    if k:
        chosen.append(pool[:k] if len(pool) > k else pool)
    return np.concatenate(chosen)


def smallest_except(keys: list[np.ndarray], k: int, excluded: np.ndarray) -> np.ndarray:
    """Positions of the ``k`` smallest entries (lexicographic in ``keys``, as ``smallest``) that are not in
    ``excluded`` (unique positions). The k smallest of the others are among the ``k + len(excluded)`` smallest
    of all, so those are chosen first and the excluded ones dropped: no mask or gathered copy of every entry."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    first = smallest(keys, k + len(excluded))
    first = first[~np.isin(first, excluded)]
    if len(first) > k:
        first = first[smallest([key[first] for key in keys], k)]
    return first


__all__ = ["ADMISSIONS", "CountAdmission", "CountMinSketch", "EVICTIONS", "EVICTION_BATCH", "LFUEviction",
           "LRUEviction", "ProbabilityAdmission", "TTLEviction", "check_policy", "policy_config",
           "policy_from_config", "shard_cap", "smallest", "smallest_except"]
