"""Your own data: ``Dataset.from_arrays`` (what it infers, what it refuses), regression through a user grad_fn
and a TorchModule with an MSE loss, and training on a ``ray.data.Dataset`` read from a real Parquet file, with a
worker that dies mid-epoch (the run completes; the rows its split lost are reported, none applied twice)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rayps.worker.data import Dataset, load_dataset


# -- from_arrays, without Ray ---------------------------------------------------------------------------
def test_integer_labels_are_classes_and_a_seeded_fifth_is_held_out():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 3)), rng.integers(0, 4, 50)
    y[0] = 6  # the largest id decides the class count
    data = Dataset.from_arrays(x, y, seed=3)
    assert (data.task, data.num_classes, data.num_train, data.num_test) == ("classification", 7, 40, 10)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64 and not data.x_train.flags.writeable
    # each row in exactly one part, unchanged
    rows = {tuple(r) for r in np.concatenate([data.x_train, data.x_test])}
    assert rows == {tuple(r) for r in x.astype(np.float32)} and len(rows) == 50
    again = Dataset.from_arrays(x, y, seed=3)
    np.testing.assert_array_equal(again.x_test, data.x_test)


def test_float_labels_are_regression_targets_and_an_explicit_test_set_is_kept():
    x = np.arange(24, dtype=np.float64).reshape(12, 2)
    y = np.linspace(0, 1, 12)
    data = Dataset.from_arrays(x[:9], y[:9], x[9:], y[9:])
    assert (data.task, data.num_classes, data.num_train, data.num_test) == ("regression", 0, 9, 3)
    assert data.y_train.dtype == np.float32 and not data.is_classification
    np.testing.assert_array_equal(data.y_test, y[9:].astype(np.float32))
    images = Dataset.from_arrays(np.zeros((10, 1, 4, 4)), np.arange(10) % 2)  # any row shape (a CNN's input)
    assert images.x_train.shape[1:] == (1, 4, 4) and images.num_features == 16
    as_classes = Dataset.from_arrays(x, np.arange(12.0) % 3, task="classification")
    assert as_classes.num_classes == 3 and as_classes.y_train.dtype == np.int64


@pytest.mark.parametrize("kwargs,match", [
    ({"y_train": np.zeros(5)}, "y_train has 5 labels but x_train has 6 rows"),
    ({"x_train": np.full((6, 2), np.nan)}, "x_train has NaN"),
    ({"y_train": np.array([0, 1, np.inf, 0, 1, 0])}, "y_train has NaN or inf"),
    ({"y_train": np.array([0, -1, 1, 0, 1, 0])}, "negative class ids"),
    ({"x_train": np.array(["a"] * 6)}, "x_train must be numeric"),
    ({"x_train": np.zeros(6)}, r"x_train must have a row per sample"),
    ({"x_train": np.zeros((0, 2)), "y_train": np.zeros(0, np.int64)}, "x_train is empty"),
    ({"task": "ranking"}, "task must be one of"),
    ({"test_fraction": 1.5}, "test_fraction must be a number in"),
    ({"x_test": np.zeros((2, 3)), "y_test": np.zeros(2, np.int64)}, r"x_test rows have shape \(3,\)"),
    ({"x_test": np.zeros((2, 2))}, "give both x_test and y_test"),
    ({"y_train": np.array([0.5, 1, 2, 0, 1, 0]), "task": "classification"}, "non-integer values"),
])
def test_from_arrays_refuses_bad_input_naming_the_argument(kwargs, match):
    args = {"x_train": np.zeros((6, 2)), "y_train": np.array([0, 1, 1, 0, 1, 0]), **kwargs}
    with pytest.raises(ValueError, match=match):
        Dataset.from_arrays(**args)


# -- regression on Ray ----------------------------------------------------------------------------------
def _linear_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5))
    y = x @ np.arange(1.0, 6.0) + 0.5 + 0.01 * rng.standard_normal(n)
    return Dataset.from_arrays(x, y)


def test_regression_with_a_user_grad_fn_reports_its_test_loss(ray_session):
    from rayps.server import ParameterServer
    from rayps.updaters import Adam
    from rayps.worker import train

    data = _linear_data()

    def grad_fn(params, batch):  # mean squared error of a linear model, by hand
        x, y = batch
        err = x @ params["w"] + params["b"] - y
        return float(np.mean(err ** 2)), {"w": 2 * x.T @ err / len(y), "b": np.array([2 * err.mean()], np.float32)}

    ps = ParameterServer({"w": np.zeros(5, np.float32), "b": np.zeros(1, np.float32)},
                         updater=Adam(learning_rate=0.1))
    try:
        result = train(ps, grad_fn, data, num_workers=2, epochs=6, batch_size=16)
        learned = ps.pull()
    finally:
        ps.shutdown()
    # the independent reference: least squares on the training rows
    design = np.hstack([data.x_train.astype(np.float64), np.ones((data.num_train, 1))])
    solution = np.linalg.lstsq(design, data.y_train.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(learned["w"], solution[:5], atol=0.1)
    expected_loss = float(np.mean((data.x_test @ learned["w"] + learned["b"] - data.y_test) ** 2))
    assert result["task"] == "regression" and result["test_accuracy"] is None
    assert result["test_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert result["test_loss"] < 0.05


def test_regression_with_a_torch_module_and_mse_loss(ray_session):
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    from rayps.server import ParameterServer
    from rayps.updaters import Adam
    from rayps.worker import train
    from rayps.worker.torch_adapter import TorchModule

    data = _linear_data()
    model = TorchModule(torch.nn.Sequential(torch.nn.Linear(5, 1), torch.nn.Flatten(0)),
                        loss_fn=torch.nn.functional.mse_loss)
    ps = ParameterServer(model.init_params(seed=0), updater=Adam(learning_rate=0.1))
    try:
        result = train(ps, model, data, num_workers=2, epochs=6, batch_size=16)
        params = ps.pull()
    finally:
        ps.shutdown()
    predictions = data.x_test @ params["0.weight"][0] + params["0.bias"][0]
    assert result["test_accuracy"] is None
    assert result["test_loss"] == pytest.approx(float(np.mean((predictions - data.y_test) ** 2)), rel=1e-4)
    assert result["test_loss"] < 0.05


def test_a_torch_module_takes_float64_regression_targets_in_its_own_dtype():
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    from rayps.worker.torch_adapter import TorchModule

    model = TorchModule(torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0)),
                        loss_fn=torch.nn.functional.mse_loss)
    params = model.init_params(seed=0)
    x = np.random.default_rng(0).standard_normal((5, 3))
    y = x.sum(axis=1)  # float64, the module is float32
    loss, grads = model.loss_and_grads(params, x, y)
    err = x.astype(np.float32) @ params["0.weight"][0] + params["0.bias"][0] - y.astype(np.float32)
    assert loss == pytest.approx(float(np.mean(err.astype(np.float64) ** 2)), rel=1e-5)
    np.testing.assert_allclose(grads["0.weight"][0], 2 * x.T.astype(np.float32) @ err / 5, rtol=1e-4)


# -- a ray.data.Dataset, from a Parquet file --------------------------------------------------------------
def _digits_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    digits = load_dataset("digits")
    columns = {f"p{i}": digits.x_train[:, i] for i in range(digits.num_features)}
    pq.write_table(pa.table({**columns, "label": digits.y_train}), path)
    return digits


def test_a_ray_dataset_run_survives_a_worker_death_and_reports_the_rows_it_skipped(ray_session, tmp_path):
    """Digits from Parquet, 2 workers streaming their splits for 2 epochs. One worker's process dies at its 5th
    batch of epoch 0. A parameter ``n`` counts the rows of every gradient the server applied (SGD, rate 1,
    gradient -rows), so rows applied + rows reported skipped must be every row of every split of every epoch:
    nothing lost silently, nothing applied twice."""
    import ray

    from rayps.server import ParameterServer
    from rayps.updaters import ParamGroup, Adam, Sgd
    from rayps.worker import build_model, train

    digits = _digits_parquet(tmp_path / "train.parquet")
    dataset = ray.data.read_parquet(str(tmp_path / "train.parquet"))
    model = build_model("softmax", digits.num_features, digits.num_classes)
    marker = tmp_path / "died"

    def grad_fn(params, batch):
        x, y = batch
        grad_fn.batches = getattr(grad_fn, "batches", 0) + 1
        if grad_fn.batches == 5:  # the first process to get here dies (O_EXCL: only one ever creates the marker)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        loss, grads = model.loss_and_grads({k: v for k, v in params.items() if k != "n"}, x, y)
        return loss, {**grads, "n": np.array([-float(len(y))])}

    params = {**model.init_params(0), "n": np.zeros(1)}
    updater = [ParamGroup(Sgd(learning_rate=1.0), names=("n",), name="count"), ParamGroup(Adam(learning_rate=0.01))]
    ps = ParameterServer(params, updater=updater)
    try:
        result = train(ps, grad_fn, dataset, num_workers=2, epochs=2, batch_size=32, label_column="label",
                       evaluate=lambda p: model.accuracy_and_loss({k: v for k, v in p.items() if k != "n"},
                                                                  digits.x_test, digits.y_test))
        applied_rows = float(ps.pull(["n"])["n"][0])
    finally:
        ps.shutdown()
    assert marker.exists() and result["worker_restarts"] >= 1  # a retry sent while Ray restarts it may count too
    split_rows = digits.num_train // 2
    assert result["data_rows"] == digits.num_train and result["data_rows_dropped_per_epoch"] == digits.num_train % 2
    skipped = result["data_rows_skipped"]
    assert 0 < skipped < split_rows and result["data_rows_repeated"] == 0
    assert [row["rows_skipped"] for row in result["history"]] == [skipped, 0]
    assert applied_rows + skipped == 2 * 2 * split_rows
    assert result["test_accuracy"] > 0.8


def test_a_ray_dataset_run_prints_no_ray_internals(tmp_path):
    """In a fresh process (its own embedded Ray): training on a ``ray.data.Dataset`` hands each worker the server
    handle and its split with its first ``run_epoch``, not in the constructor, so Ray prints no core_worker line
    about constructor arguments in the object store."""
    import subprocess
    import sys

    _digits_parquet(tmp_path / "train.parquet")
    script = f"""
import ray
from rayps.server import ParameterServer
from rayps.server.client import ensure_ray
from rayps.worker import build_model, train
ensure_ray()
model = build_model("softmax", 64, 10)
ps = ParameterServer(model.init_params(0))
result = train(ps, model, ray.data.read_parquet({str(tmp_path / "train.parquet")!r}), num_workers=2, epochs=1,
               batch_size=64, label_column="label", max_worker_restarts=1)
ps.shutdown()
print("accuracy", result["test_accuracy"])
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    assert "accuracy" in completed.stdout
    for internal in ("core_worker", "constructor arguments"):
        assert internal not in completed.stdout + completed.stderr, completed.stderr
