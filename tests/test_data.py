"""rayps.worker.data: the digits set, user .npz files (and every malformed one), partitions, minibatches."""

import os
import pickle

import numpy as np
import pytest

from rayps.worker.data import Dataset, iterate_minibatches, load_dataset, partition_indices


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def test_digits_shapes_classes_and_range(digits):
    assert isinstance(digits, Dataset) and digits.name == "digits"
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.num_features == 64 and digits.num_train == 1437 and digits.num_test == 360
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.num_classes == 10
    assert set(np.unique(digits.y_train)) == set(range(10)) == set(np.unique(digits.y_test))
    for x in (digits.x_train, digits.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert not digits.x_train.flags.writeable


def test_digits_split_is_deterministic_and_stratified(digits):
    again = load_dataset("digits", seed=0)
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)
    # stratified: each class's share of the test set matches its share of all the data within one sample
    all_y = np.concatenate([digits.y_train, digits.y_test])
    full = np.bincount(all_y, minlength=10)
    test = np.bincount(digits.y_test, minlength=10)
    assert np.all(np.abs(test - full * 0.2) <= 1.0)
    # train and test together are exactly scikit-learn's 1797 digits (scaled by 1/16), each once
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ours = np.concatenate([np.concatenate([digits.x_train, digits.x_test]) * 16,
                           np.concatenate([digits.y_train, digits.y_test])[:, None]], axis=1)
    theirs = np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0))
    assert ours.shape == theirs.shape == (1797, 65)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"unknown name 'mnist'.*digits"):
        load_dataset("mnist")


@pytest.mark.parametrize("num_samples, num_workers", [(10, 1), (10, 3), (1797, 4), (7, 7), (1437, 5)])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_partitions_disjoint_covering_balanced(num_samples, num_workers, epoch):
    parts = partition_indices(num_samples, num_workers, epoch=epoch, seed=3)
    assert len(parts) == num_workers
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == num_samples  # nothing in two partitions ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(num_samples))  # ... and nothing left out
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_partitions_deterministic_and_reshuffled_per_epoch():
    first = partition_indices(100, 4, epoch=0, seed=7)
    for a, b in zip(first, partition_indices(100, 4, epoch=0, seed=7)):
        np.testing.assert_array_equal(a, b)
    next_epoch = partition_indices(100, 4, epoch=1, seed=7)
    other_seed = partition_indices(100, 4, epoch=0, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(first, next_epoch))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed))


@pytest.mark.parametrize("args, message", [
    ((10, 0, 0, 0), r"num_workers must be an integer >= 1, got 0"),
    ((10, 11, 0, 0), r"num_workers \(11\) must be <= num_samples \(10\)"),
    ((0, 1, 0, 0), r"num_samples must be an integer >= 1, got 0"),
    ((10, 2, -1, 0), r"epoch must be an integer >= 0, got -1"),
    ((10, 2, 0, -3), r"seed must be an integer >= 0, got -3"),
    ((10, 2.0, 0, 0), r"num_workers must be an integer >= 1, got 2.0"),
])
def test_partition_errors(args, message):
    with pytest.raises(ValueError, match=message):
        partition_indices(*args)


def test_iterate_minibatches_in_order_with_partial_last_batch():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10) * 10
    indices = np.array([9, 0, 3, 4, 1, 8, 2])
    batches = list(iterate_minibatches(x, y, indices, batch_size=3))
    assert [len(yb) for _, yb in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in batches]), indices * 10)
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in batches]), x[indices])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        next(iterate_minibatches(x, y, indices, 0))


def _write_npz(tmp_path, name="data.npz", **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.random((12, 5)), "y_train": np.arange(12) % 3,
        "x_test": rng.random((4, 5)), "y_test": np.array([0, 1, 2, 3]),
    }
    arrays.update(overrides)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    path = tmp_path / name
    np.savez(path, **arrays)
    return path, arrays


def test_npz_round_trip(tmp_path):
    path, arrays = _write_npz(tmp_path, name="mine.npz")
    data = load_dataset(path=path)
    assert data.name == "mine"
    np.testing.assert_array_equal(data.x_train, arrays["x_train"].astype(np.float32))
    np.testing.assert_array_equal(data.y_test, arrays["y_test"])
    assert data.x_test.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.num_classes == 4  # the largest label over train (2) and test (3), plus one
    # integral float labels are class ids too
    path, _ = _write_npz(tmp_path, name="floats.npz", y_train=(np.arange(12) % 3).astype(np.float64))
    np.testing.assert_array_equal(load_dataset(path=str(path)).y_train, np.arange(12) % 3)


def test_npz_missing_file(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=f"data file not found: {missing}"):
        load_dataset(path=missing)


@pytest.mark.parametrize("overrides, message", [
    ({"y_test": None}, r"missing key\(s\) \['y_test'\]"),
    ({"x_train": None, "y_train": None}, r"missing key\(s\) \['x_train', 'y_train'\]"),
    ({"x_train": np.zeros((12, 5, 1))}, r"x_train must be 2-D.*\(ndim 3\)"),
    ({"x_test": np.zeros(4)}, r"x_test must be 2-D.*\(ndim 1\)"),
    ({"y_train": np.zeros((12, 1), dtype=int)}, r"y_train must be 1-D.*\(ndim 2\)"),
    ({"y_train": np.zeros(11, dtype=int)}, r"y_train has 11 labels but x_train has 12 rows"),
    ({"y_test": np.zeros(5, dtype=int)}, r"y_test has 5 labels but x_test has 4 rows"),
    ({"x_train": np.full((12, 5), "a")}, r"x_train must be numeric, got dtype <U1"),
    ({"x_test": np.zeros((4, 5), dtype=complex)}, r"x_test must be numeric, got dtype complex128"),
    ({"y_train": np.full(12, 0.5)}, r"y_train must hold integer class ids, got non-integer values"),
    ({"y_test": np.array(["a", "b", "c", "d"])}, r"y_test must hold integer class ids, got dtype <U1"),
    ({"y_test": np.array([0, -1, 2, 1])}, r"y_test has negative class ids \(min -1\)"),
    ({"x_train": np.where(np.eye(12, 5) > 0, np.nan, 0.0)}, r"x_train has NaN or inf"),
    ({"x_test": np.full((4, 5), np.inf)}, r"x_test has NaN or inf"),
    ({"x_test": np.zeros((4, 6))}, r"x_train has 5 features but x_test has 6"),
    ({"x_train": np.zeros((0, 5)), "y_train": np.zeros(0, dtype=int)}, r"x_train is empty \(shape \(0, 5\)\)"),
    ({"x_test": np.zeros((4, 0))}, r"x_test is empty"),
])
def test_npz_malformed(tmp_path, overrides, message):
    path, _ = _write_npz(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(path=path)
    assert str(path) in str(info.value)


class _Boom:
    """Unpickling this would write a marker file: proof that the loader never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_npz_object_array_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    labels = np.empty(4, dtype=object)
    labels[:] = [_Boom(str(marker)), 1, 2, 3]
    path, _ = _write_npz(tmp_path, y_test=labels)
    with pytest.raises(ValueError, match=r"y_test is an object array"):
        load_dataset(path=path)
    assert not marker.exists()
    # sanity: the file really holds a pickle that would have run the payload
    with np.load(path, allow_pickle=True) as archive:
        archive["y_test"]
    assert marker.exists()


def test_not_an_npz(tmp_path):
    text = tmp_path / "data.npz"
    text.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        load_dataset(path=text)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="expected an .npz archive .* got a single array"):
        load_dataset(path=single)
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps({"x_train": np.zeros((2, 2))}))
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        load_dataset(path=os.fspath(pickled))
