r"""A CTR-scale workload: synthetic click data with power-law feature ids, and an embedding-bag logistic model.

**Data** (``synthetic_ctr``): ``num_fields`` categorical fields share one table of ``table_rows`` ids; field f
owns the id block ``[f * rows_per_field, (f + 1) * rows_per_field)`` (each field's vocabulary at its own
offset, the usual CTR layout). A sample draws, per field, a rank from a power law truncated to the field's
vocabulary, ``P(rank >= k) ~ k^(1 - alpha)`` (inverse-CDF of the continuous law on ``[1, V + 1)``, floored; no
table-sized array), so the smallest ids of each field are the hot set. Its label is drawn from a KNOWN logistic
model: ``P(click) = sigmoid(bias + sum_f w*(id_f))`` with a hidden weight per id, ``w*(id) = weight_scale *
N(0, 1)`` made on demand from a counter-based hash of ``(seed, id)`` (``CtrGroundTruth``), so millions of ids
cost no memory. Memory is O(num_samples * num_fields), whatever ``table_rows`` is. ``hashed=True`` (the
hashing trick of production CTR pipelines, ``rayps train --id-space N``): each field-offset id ``r`` becomes
``mix64(r ^ mix64(seed)) mod table_rows``, so the ids (hot ones too) scatter over the whole id space, up to
10^9 and beyond, still with nothing materialized; collisions merge features, as they do in production.

**Model** (``EmbeddingBagLogistic``): a sparse table ``emb`` ``(table_rows, dim)``, never materialized on the
worker, and dense ``w`` ``(dim,)``, ``b`` ``(1,)``:

.. math::  e_i = \sum_f emb[id_{if}] \;(\text{or the mean}),\quad z_i = e_i \cdot w + b,\quad
           L = \frac{1}{n}\sum_i \mathrm{softplus}(z_i) - y_i z_i,

    dL/dz_i = (sigmoid(z_i) - y_i) / n,  dL/dw = sum_i dL/dz_i e_i,  dL/db = sum_i dL/dz_i,
    dL/d emb[r] = sum over (i, f) with id_if = r of dL/dz_i * w   (/ num_fields for the mean).

A worker pulls the rows of ``rows_needed(ids)`` (sorted unique ids), calls ``loss_and_grads`` and pushes the
returned ``(row_ids, row_grads)`` with ``push_rows`` and the dense grads with ``push``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..server.row_index import HashedUniformInit, counter_uniform, mix64

CTR_DATASET = "synthetic-ctr"
COMBINERS = ("sum", "mean")


def _check_int(value, field: str, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"synthetic-ctr: {field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def hashed_normal(seed: int, ids) -> np.ndarray:
    """A standard normal per id (float64) from ``(seed, id)`` alone (Box-Muller over two hashed uniforms)."""
    ids = np.asarray(ids, dtype=np.uint64)
    u1 = 1.0 - counter_uniform(seed, ids * np.uint64(2))  # (0, 1]
    u2 = counter_uniform(seed, ids * np.uint64(2) + np.uint64(1))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def power_law_ranks(rng: np.random.Generator, size, num_values: int, alpha: float) -> np.ndarray:
    """Ranks in ``[0, num_values)``, ``P(rank = k) ~ (k + 1)^-alpha`` for large k (truncated continuous power law)."""
    u = rng.random(size)
    top = float(num_values) + 1.0
    if abs(alpha - 1.0) < 1e-12:
        x = np.exp(u * math.log(top))
    else:
        x = (1.0 + u * (top ** (1.0 - alpha) - 1.0)) ** (1.0 / (1.0 - alpha))
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, num_values - 1)


class CtrGroundTruth:
    """The hidden logistic model: ``logit(ids) = bias + sum_f weight_scale * hashed_normal(seed, id_f)``."""

    def __init__(self, seed: int, weight_scale: float, bias: float):
        self.seed, self.weight_scale, self.bias = int(seed), float(weight_scale), float(bias)

    def weights(self, ids) -> np.ndarray:
        return self.weight_scale * hashed_normal(self.seed, ids)

    def logit(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return self.bias + self.weights(ids.reshape(-1)).reshape(ids.shape).sum(axis=1)


@dataclass(frozen=True, eq=False)
class CtrDataset:
    """Click data: ``x_*`` feature ids ``(n, num_fields)`` int64 (global table rows), ``y_*`` clicks ``(n,)`` int64
    in {0, 1}; read-only arrays. Field names follow ``worker.data.Dataset`` so partitions and loops apply."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    table_rows: int
    num_fields: int
    dim: int
    rows_per_field: int
    truth: CtrGroundTruth
    num_classes: int = 2
    name: str = CTR_DATASET

    @property
    def num_features(self) -> int:
        return self.num_fields

    @property
    def num_train(self) -> int:
        return int(len(self.y_train))

    @property
    def num_test(self) -> int:
        return int(len(self.y_test))


def synthetic_ctr(num_samples: int, num_fields: int = 8, table_rows: int = 2_000_000, dim: int = 16,
                  alpha: float = 1.1, seed: int = 0, test_fraction: float = 0.2, weight_scale: float = 0.6,
                  bias: float = -1.0, hashed: bool = False) -> CtrDataset:
    """Train/test click data from the known logistic ground truth (see the module docstring); deterministic
    for the arguments. ``dim`` is recorded for the model; the data do not depend on it."""
    num_samples = _check_int(num_samples, "num_samples", 2)
    num_fields = _check_int(num_fields, "num_fields", 1)
    table_rows = _check_int(table_rows, "table_rows", num_fields)
    dim = _check_int(dim, "dim", 1)
    seed = _check_int(seed, "seed", 0)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"synthetic-ctr: alpha must be a finite number > 0, got {alpha!r}")
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"synthetic-ctr: test_fraction must be in (0, 1), got {test_fraction!r}")
    rows_per_field = table_rows // num_fields
    rng = np.random.default_rng([seed, 0xC7])
    ids = np.empty((num_samples, num_fields), dtype=np.int64)
    for f in range(num_fields):
        ids[:, f] = f * rows_per_field + power_law_ranks(rng, num_samples, rows_per_field, float(alpha))
    if hashed:  # the hashing trick: scatter the ids over the whole id space
        key = mix64(np.array([seed], dtype=np.uint64))
        ids = (mix64(ids.astype(np.uint64) ^ key) % np.uint64(table_rows)).astype(np.int64)
    truth = CtrGroundTruth(seed, weight_scale, bias)
    clicks = (rng.random(num_samples) < _sigmoid(truth.logit(ids))).astype(np.int64)
    num_test = min(max(1, int(round(num_samples * test_fraction))), num_samples - 1)
    cut = num_samples - num_test
    arrays = [np.ascontiguousarray(a) for a in (ids[:cut], clicks[:cut], ids[cut:], clicks[cut:])]
    for array in arrays:
        array.flags.writeable = False
    return CtrDataset(*arrays, table_rows=table_rows, num_fields=num_fields, dim=dim,
                      rows_per_field=rows_per_field, truth=truth)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.result_type(z, np.float32), copy=False)


class EmbeddingBagLogistic:
    """Embedding bag (sum or mean over fields) + logistic head; see the module docstring for the math."""

    sparse_names = ("emb",)

    def __init__(self, table_rows: int, dim: int, num_fields: int, combiner: str = "sum"):
        self.table_rows = _check_int(table_rows, "table_rows", 1)
        self.dim = _check_int(dim, "dim", 1)
        self.num_fields = _check_int(num_fields, "num_fields", 1)
        if combiner not in COMBINERS:
            raise ValueError(f"EmbeddingBagLogistic: combiner must be one of {list(COMBINERS)}, got {combiner!r}")
        self.combiner = combiner

    def sparse_shapes(self) -> dict[str, tuple[int, int]]:
        return {"emb": (self.table_rows, self.dim)}

    def dense_shapes(self) -> dict[str, tuple[int]]:
        return {"w": (self.dim,), "b": (1,)}

    def table_initializer(self, scale: float = 0.05, seed: int = 0) -> HashedUniformInit:
        """The deterministic per-row initial values of ``emb`` to hand the server (``initial=``)."""
        return HashedUniformInit(self.dim, scale, seed)

    def init_dense(self, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, 0x3E])
        return {"w": (rng.standard_normal(self.dim) / math.sqrt(self.dim)).astype(dtype),
                "b": np.zeros(1, dtype=dtype)}

    @staticmethod
    def rows_needed(ids) -> np.ndarray:
        """The sorted unique row ids of a batch: pull these, in this order, for ``loss_and_grads``."""
        return np.unique(np.asarray(ids))

    def _check(self, rows, dense: Mapping[str, np.ndarray], ids):
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] != self.num_fields or ids.dtype.kind not in "iu" or ids.shape[0] == 0:
            raise ValueError(f"EmbeddingBagLogistic: ids must be integer, shape (n >= 1, {self.num_fields}), got "
                             f"{ids.dtype}{ids.shape}")
        if ids.min() < 0 or ids.max() >= self.table_rows:
            raise ValueError(f"EmbeddingBagLogistic: ids must be in [0, {self.table_rows})")
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = np.asarray(rows)
        if rows.shape != (len(uniq), self.dim) or rows.dtype.kind != "f":
            raise ValueError(f"EmbeddingBagLogistic: pulled_rows must be float ({len(uniq)}, {self.dim}): the rows "
                             f"of rows_needed(ids), got {rows.dtype}{rows.shape}")
        for name, shape in self.dense_shapes().items():
            if name not in dense or np.shape(dense[name]) != shape:
                raise ValueError(f"EmbeddingBagLogistic: dense param {name!r} must have shape {shape}")
        return uniq, inverse.reshape(ids.shape), rows

    def _forward(self, rows, dense, ids):
        uniq, inverse, rows = self._check(rows, dense, ids)
        bag = rows[inverse].sum(axis=1)  # (n, dim)
        if self.combiner == "mean":
            bag /= self.num_fields
        z = bag @ dense["w"].astype(rows.dtype, copy=False) + dense["b"].astype(rows.dtype, copy=False)[0]
        return uniq, inverse, bag, z

    def loss_and_grads(self, pulled_rows, dense_params: Mapping[str, np.ndarray], ids, y):
        """``(loss, row_ids, row_grads, dense_grads)``: mean log-loss; ``row_ids`` the sorted unique ids,
        ``row_grads`` ``(len(row_ids), dim)``; ``dense_grads`` ``{"w", "b"}``. All in the rows' dtype."""
        uniq, inverse, bag, z = self._forward(pulled_rows, dense_params, ids)
        y = np.asarray(y)
        if y.shape != (len(z),) or not np.isin(y, (0, 1)).all():
            raise ValueError(f"EmbeddingBagLogistic: y must be {len(z)} labels in {{0, 1}}, got shape {y.shape}")
        n = len(z)
        loss = float(np.mean(np.logaddexp(0.0, z) - y * z, dtype=np.float64))
        dz = (_sigmoid(z) - y).astype(z.dtype) / z.dtype.type(n)
        w = dense_params["w"].astype(z.dtype, copy=False)
        dense_grads = {"w": bag.T @ dz, "b": np.array([dz.sum()], dtype=z.dtype)}
        dbag = dz[:, None] * w[None, :]  # (n, dim)
        if self.combiner == "mean":
            dbag /= self.num_fields
        row_grads = np.zeros((len(uniq), self.dim), dtype=z.dtype)
        np.add.at(row_grads, inverse.reshape(-1), np.repeat(dbag, self.num_fields, axis=0))
        return loss, uniq, row_grads, dense_grads

    def predict_proba(self, pulled_rows, dense_params: Mapping[str, np.ndarray], ids) -> np.ndarray:
        """Click probabilities ``(n,)`` for the rows of ``rows_needed(ids)``."""
        return _sigmoid(self._forward(pulled_rows, dense_params, ids)[3])

    def __repr__(self):
        return (f"EmbeddingBagLogistic(table_rows={self.table_rows}, dim={self.dim}, num_fields={self.num_fields}, "
                f"combiner={self.combiner!r})")


def _check_labels_scores(y, p, what: str):
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape or not len(y):
        raise ValueError(f"{what}: y and p must be non-empty 1-D arrays of one length, got {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what}: y must hold labels 0 and 1")
    if not np.isfinite(p).all():
        raise ValueError(f"{what}: p contains NaN or Inf")
    return y.astype(bool), p


def logloss(y, p, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (clipped to ``[eps, 1 - eps]``)."""
    y, p = _check_labels_scores(y, p, "logloss")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def auc(y, p) -> float:
    """ROC AUC by ranks (Mann-Whitney U), ties given their average rank; O(n log n)."""
    y, p = _check_labels_scores(y, p, "auc")
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("auc: y must contain both classes")
    order = np.argsort(p, kind="mergesort")
    _, first, counts = np.unique(p[order], return_index=True, return_counts=True)
    ranks = np.empty(len(p), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average rank of each tie group
    return float((ranks[y].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))
