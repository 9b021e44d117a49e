"""A plain-Python model of one table shard's admission and eviction (the semantics documented in
server/row_policies.py), the independent reference of tests/test_row_policies*.py.

Dicts and sorted() only; the update rule is plain SGD in float64 (``w -= lr * g``, duplicates summed), ownership
and the probability hash are re-implemented from their documented formulas with Python integers.
"""

from __future__ import annotations

import math

import numpy as np

M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def uniform(seed: int, counter: int) -> float:
    return (mix64(counter ^ mix64(seed)) >> 11) * (1.0 / (1 << 53))


def owner(row: int, num_shards: int) -> int:
    h = (row * 0x9E3779B97F4A7C15) & M64
    return ((h >> 32) * num_shards) >> 32


class ShardModel:
    """``kind``: None, "lru", "lfu" or "ttl"; ``cap``: rows of this shard; ``admission``: None,
    ("count", min_count) or ("prob", probability, seed)."""

    def __init__(self, kind=None, cap=None, max_idle=None, admission=None, lr=0.1, initial=None, dim=2):
        self.kind, self.cap, self.max_idle, self.admission, self.lr = kind, cap, max_idle, admission, lr
        self.initial = initial or (lambda row: np.zeros(dim))
        self.rows: dict[int, dict] = {}
        self.counts: dict[int, int] = {}  # pushes seen while not stored (exact)
        self.version = self.ops = 0
        self.admitted = self.evicted = self.dropped = 0
        self.evicted_log: list[tuple[int, int]] = []  # (version, id)

    def clock(self) -> int:
        return self.version if self.kind == "ttl" else self.ops

    def _admits(self, row: int) -> bool:
        if self.admission is None:
            return True
        if self.admission[0] == "count":
            self.counts[row] = self.counts.get(row, 0) + 1
            return self.counts[row] >= self.admission[1]
        return uniform(self.admission[2], row) < self.admission[1]

    def _evict(self, row: int) -> None:
        del self.rows[row]
        self.evicted += 1
        self.evicted_log.append((self.version + 1, row))

    def push(self, ids, grads) -> None:
        summed: dict[int, np.ndarray] = {}
        for row, g in zip(ids.tolist(), grads):
            summed[row] = summed.get(row, 0.0) + g.astype(np.float64)
        rows = sorted(summed)
        admitted = [r for r in rows if r not in self.rows and self._admits(r)]
        if self.cap is not None and len(self.rows) + len(admitted) > self.cap:
            evictable = [r for r in self.rows if r not in summed]
            need = len(self.rows) + len(admitted) - self.cap
            k = min(max(need, math.ceil(self.cap / 64)), len(evictable))
            if self.kind == "lfu":
                order = sorted(evictable, key=lambda r: (self.rows[r]["count"], self.rows[r]["stamp"], r))
            else:
                order = sorted(evictable, key=lambda r: (self.rows[r]["stamp"], r))
            for r in order[:k]:
                self._evict(r)
            admitted = admitted[:max(0, self.cap - len(self.rows))]
        for r in admitted:
            self.rows[r] = {"value": np.asarray(self.initial(r), np.float64), "it": 0, "stamp": 0, "count": 0}
            self.admitted += 1
        self.version += 1
        self.ops += 1
        for r in rows:
            if r in self.rows:
                row = self.rows[r]
                row["value"] = row["value"] - self.lr * summed[r]
                row["it"] += 1
                row["stamp"] = self.clock()
                row["count"] += 1
                row["changed"] = self.version
            else:
                self.dropped += 1
        if self.kind == "ttl":
            for r in [r for r, row in self.rows.items() if self.version - row["stamp"] > self.max_idle]:
                del self.rows[r]
                self.evicted += 1
                self.evicted_log.append((self.version, r))

    def pull(self, ids) -> None:
        if len(ids) == 0:
            return
        self.ops += 1
        for r in set(ids.tolist()):
            if r in self.rows:
                self.rows[r]["stamp"] = self.clock()
                self.rows[r]["count"] += 1

    def value(self, row: int) -> np.ndarray:
        return self.rows[row]["value"] if row in self.rows else np.asarray(self.initial(row), np.float64)


def stream(seed: int, steps: int, id_space: int, max_batch: int = 12, dim: int = 2, pull_share: float = 0.3):
    """``("push", ids, grads)`` and ``("pull", ids)`` events; ids skewed toward the small ones."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        size = int(rng.integers(1, max_batch + 1))
        ids = np.minimum(rng.integers(0, id_space, size), rng.integers(0, id_space, size)).astype(np.int64)
        if rng.random() < pull_share:
            yield "pull", ids, None
        else:
            yield "push", ids, rng.standard_normal((size, dim)).astype(np.float32)
