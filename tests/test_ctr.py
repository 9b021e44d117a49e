"""The CTR workload (no Ray): the synthetic click generator, the embedding-bag logistic model's exact gradients,
and the log-loss / AUC metrics."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from rayps.server.sparse_rows import RowTableShard
from rayps.updaters import AdaGrad
from rayps.worker.ctr import (EmbeddingBagLogistic, auc, hashed_normal, logloss, power_law_ranks,
                              synthetic_ctr)


def test_the_generator_is_deterministic_and_splits_train_and_test():
    a, b = synthetic_ctr(3000, seed=3), synthetic_ctr(3000, seed=3)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert not getattr(a, field).flags.writeable
    assert not np.array_equal(a.x_train, synthetic_ctr(3000, seed=4).x_train)
    assert a.num_train == 2400 and a.num_test == 600 and a.x_train.shape == (2400, 8)
    assert a.x_train.dtype == np.int64 and set(np.unique(a.y_train).tolist()) == {0, 1}
    fields = a.x_train // a.rows_per_field
    np.testing.assert_array_equal(fields, np.broadcast_to(np.arange(8), fields.shape))  # field f's own id block
    assert a.x_train.max() < a.table_rows


def test_feature_ids_follow_a_power_law():
    data = synthetic_ctr(20_000, table_rows=2_000_000, alpha=1.1)
    ranks = data.x_train % data.rows_per_field
    assert np.mean(ranks < data.rows_per_field // 100) > 0.6  # the top 1% of ids: most of the traffic
    counts = np.bincount(ranks[:, 0], minlength=10)
    assert counts[0] > counts[1] > counts[3] > counts[9]  # the hottest ids are the smallest ranks
    rng = np.random.default_rng(0)
    draws = power_law_ranks(rng, 400_000, 1_000, 1.5)
    freq = np.bincount(draws, minlength=1000) / len(draws)
    slope = np.polyfit(np.log(np.arange(10, 200)), np.log(freq[9:199]), 1)[0]  # P(rank k) ~ (k + 1)^-alpha
    assert -1.65 < slope < -1.35
    assert draws.min() >= 0 and draws.max() <= 999


def test_labels_come_from_the_known_logistic_ground_truth():
    data = synthetic_ctr(20_000, seed=1)
    assert auc(data.y_train, data.truth.logit(data.x_train)) > 0.7
    assert 0.1 < data.y_train.mean() < 0.6
    weights = data.truth.weights(np.array([5, 1_999_999, 5]))
    assert weights[0] == weights[2] and weights[0] != weights[1]
    z = hashed_normal(0, np.arange(200_000))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01


def test_a_fifty_million_row_table_costs_no_table_sized_memory():
    tracemalloc.start()
    try:
        data = synthetic_ctr(10_000, table_rows=50_000_000, dim=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2 ** 20  # the table alone would be 3.2 GB (50M x 16 float32)
    assert data.x_train.max() > 40_000_000 and data.table_rows == 50_000_000


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_gradients_match_finite_differences(combiner):
    rng = np.random.default_rng(2)
    model = EmbeddingBagLogistic(table_rows=30, dim=4, num_fields=3, combiner=combiner)
    ids = np.stack([rng.integers(0, 10, 7), rng.integers(10, 20, 7), rng.integers(20, 30, 7)], axis=1)
    ids[3] = ids[0]  # a repeated sample: its rows' gradients add up
    y = rng.integers(0, 2, 7)
    uniq = model.rows_needed(ids)
    rows = rng.standard_normal((len(uniq), 4))
    dense = {"w": rng.standard_normal(4), "b": np.array([0.3])}
    loss, row_ids, row_grads, dense_grads = model.loss_and_grads(rows, dense, ids, y)
    np.testing.assert_array_equal(row_ids, uniq)
    h = 1e-6

    def numeric(array, index):
        saved = array[index]
        array[index] = saved + h
        up = model.loss_and_grads(rows, dense, ids, y)[0]
        array[index] = saved - h
        down = model.loss_and_grads(rows, dense, ids, y)[0]
        array[index] = saved
        return (up - down) / (2 * h)

    for index in itertools.product(range(len(uniq)), range(4)):
        assert row_grads[index] == pytest.approx(numeric(rows, index), rel=1e-6, abs=1e-9)
    for name in ("w", "b"):
        for index in np.ndindex(dense[name].shape):
            assert dense_grads[name][index] == pytest.approx(numeric(dense[name], index), rel=1e-6, abs=1e-9)
    assert loss == pytest.approx(logloss(y, model.predict_proba(rows, dense, ids)), rel=1e-12)


def test_the_model_trains_on_a_row_table_shard():
    """The pieces together, as a worker will use them: pull_rows -> loss_and_grads -> push_rows."""
    data = synthetic_ctr(12_000, table_rows=100_000, dim=8, seed=0)
    model = EmbeddingBagLogistic(data.table_rows, 8, data.num_fields)
    table = RowTableShard("emb", data.table_rows, 8, np.float32, 0, 1, AdaGrad(0.1), model.table_initializer())
    dense, updater = model.init_dense(0), AdaGrad(0.1)
    state = {name: updater.init(value) for name, value in dense.items()}
    for step, start in enumerate(range(0, data.num_train, 200)):
        ids, y = data.x_train[start:start + 200], data.y_train[start:start + 200]
        _, row_ids, row_grads, dense_grads = model.loss_and_grads(table.pull_rows(model.rows_needed(ids)), dense,
                                                                  ids, y)
        table.push_rows(row_ids, row_grads)
        for name in dense:
            updater.apply(dense[name], dense_grads[name], state[name], step)
    p = model.predict_proba(table.pull_rows(model.rows_needed(data.x_test)), dense, data.x_test)
    assert auc(data.y_test, p) > 0.65
    assert table.stats()["rows_touched"] < data.table_rows // 2


def test_model_inputs_are_checked():
    model = EmbeddingBagLogistic(table_rows=10, dim=2, num_fields=2)
    dense = {"w": np.zeros(2), "b": np.zeros(1)}
    ids = np.array([[1, 5], [2, 5]])
    rows = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"pulled_rows must be float \(3, 2\)"):
        model.loss_and_grads(np.zeros((2, 2)), dense, ids, [0, 1])
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        model.loss_and_grads(rows, dense, np.array([[1, 10], [2, 5]]), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(n >= 1, 2\)"):
        model.loss_and_grads(rows, dense, np.array([1, 2, 5]), [0, 1])
    with pytest.raises(ValueError, match=r"y must be 2 labels"):
        model.loss_and_grads(rows, dense, ids, [0, 2])
    with pytest.raises(ValueError, match=r"dense param 'w'"):
        model.loss_and_grads(rows, {"w": np.zeros(3), "b": np.zeros(1)}, ids, [0, 1])
    with pytest.raises(ValueError, match="combiner"):
        EmbeddingBagLogistic(10, 2, 2, combiner="max")


# -- metrics ---------------------------------------------------------------------------------------------
def _brute_force_auc(y, p):
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_matches_a_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(5):
        y = rng.integers(0, 2, 300)
        p = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
        assert auc(y, p) == pytest.approx(_brute_force_auc(y, p), abs=1e-12)
    assert auc([0, 1], [0.2, 0.8]) == 1.0 and auc([0, 1], [0.8, 0.2]) == 0.0 and auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="labels 0 and 1"):
        auc([0, 2], [0.1, 0.2])


def test_logloss():
    y = np.array([1, 0, 1])
    p = np.array([0.9, 0.2, 0.6])
    assert logloss(y, p) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.6])))
    assert np.isfinite(logloss([1, 0], [0.0, 1.0]))  # clipped, not infinite


def test_generator_arguments_are_checked():
    for kwargs, message in (({"num_samples": 1}, "num_samples"), ({"num_samples": 10, "num_fields": 0}, "num_fields"),
                            ({"num_samples": 10, "alpha": 0}, "alpha"),
                            ({"num_samples": 10, "test_fraction": 1.0}, "test_fraction"),
                            ({"num_samples": 10, "table_rows": 4}, "table_rows")):
        with pytest.raises(ValueError, match=f"synthetic-ctr: {message}"):
            synthetic_ctr(**kwargs)
