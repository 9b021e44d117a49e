"""Training data for the workers: the bundled ``digits`` set, a user's ``.npz`` or arrays, epoch partitions,
minibatches. (Parquet and CSV files through Ray Data: worker/tables.py; a ``ray.data.Dataset``: worker/streams.py.)

Every worker trains on its own partition of the training set: each epoch, the sample ids are permuted by a
generator seeded with ``(seed, epoch)`` and cut into ``num_workers`` near-equal disjoint parts, so every sample
is in exactly one partition per epoch, and every worker can compute its own part without talking to the others.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

DATASETS = ("digits",)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_TEST_FRACTION = 0.2
TASKS = ("classification", "regression")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set split into train and test: classification (the default) or regression.

    ``x_*``: float32 features, shape ``(n, num_features)`` (``from_arrays``: ``(n, ...)``, e.g. images for a
    ``TorchModule``). Classification: ``y_*`` int64 class ids in ``[0, num_classes)``, shape ``(n,)``.
    Regression: ``y_*`` float32 targets, shape ``(n,)`` or ``(n, k)``, and ``num_classes == 0``. The arrays are
    read-only (workers only read them; Ray hands out read-only views anyway). Build one with ``from_arrays``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    task: str = "classification"

    @classmethod
    def from_arrays(cls, x_train, y_train, x_test=None, y_test=None, *, task: str | None = None,
                    test_fraction: float = DIGITS_TEST_FRACTION, seed: int = 0, name: str = "arrays") -> "Dataset":
        """A data set from your own arrays, with what can be inferred inferred.

        ``task``: integer or bool labels mean classification (class ids ``0..C-1``, ``num_classes = C`` = the
        largest id + 1), floating labels regression; pass ``task`` to override (``"classification"`` accepts
        integral floats). Features become float32 (any shape ``(n, ...)``), regression targets float32. Without
        ``x_test``/``y_test`` a seeded ``test_fraction`` of the rows (default 0.2, at least one row) is held
        out. Every problem is a ValueError naming the argument: rows that do not match, NaN/inf, an empty
        array, negative class ids, non-numeric dtypes, a test set whose feature shape differs.
        """
        owner = "Dataset.from_arrays"
        if (x_test is None) != (y_test is None):
            raise ValueError(f"{owner}: give both x_test and y_test, or neither (then test_fraction is held out)")
        x_train = _check_array_features(x_train, "x_train", owner)
        y_train = np.asarray(y_train)
        if task is None:
            task = "regression" if y_train.dtype.kind == "f" else "classification"
        if task not in TASKS:
            raise ValueError(f"{owner}: task must be one of {list(TASKS)}, got {task!r}")
        y_train = _check_targets(y_train, "y_train", len(x_train), task, owner)
        if x_test is None:
            if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or \
                    not 0 < test_fraction < 1:
                raise ValueError(f"{owner}: test_fraction must be a number in (0, 1), got {test_fraction!r}")
            if len(x_train) < 2:
                raise ValueError(f"{owner}: x_train has {len(x_train)} row; holding out a test set needs at least 2")
            x_train, y_train, x_test, y_test = hold_out(x_train, y_train, test_fraction, seed)
        else:
            x_test = _check_array_features(x_test, "x_test", owner)
            if x_test.shape[1:] != x_train.shape[1:]:
                raise ValueError(f"{owner}: x_test rows have shape {x_test.shape[1:]}, x_train rows "
                                 f"{x_train.shape[1:]}")
            y_test = _check_targets(np.asarray(y_test), "y_test", len(x_test), task, owner)
            if y_test.shape[1:] != y_train.shape[1:]:
                raise ValueError(f"{owner}: y_test rows have shape {y_test.shape[1:]}, y_train rows "
                                 f"{y_train.shape[1:]}")
        return _freeze(x_train, y_train, x_test, y_test, name, task)

    @property
    def is_classification(self) -> bool:
        return self.task == "classification"

    @property
    def num_features(self) -> int:
        """Features per sample (values in one row of ``x_train``)."""
        return int(np.prod(self.x_train.shape[1:], dtype=np.int64))

    @property
    def num_train(self) -> int:
        """Training samples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Held-out samples."""
        return int(self.x_test.shape[0])


def load_dataset(name: str = "digits", path: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """The named bundled data set, or the user's ``.npz`` at ``path`` (then ``name`` is ignored).

    ``digits``: scikit-learn's 1797 8x8 handwritten digits (bundled, no download), features scaled to [0, 1],
    a stratified 80/20 train/test split seeded by ``seed``. ``path``: an ``.npz`` holding ``x_train, y_train,
    x_test, y_test``, validated (see ``load_npz``).
    """
    if path is not None:
        return load_npz(path)
    if name == "digits":
        return _load_digits(seed)
    raise ValueError(f"dataset: unknown name {name!r}; expected one of {list(DATASETS)} (or a path to an .npz)")


def _load_digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - scikit-learn is slow to import
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"dataset: seed must be an integer >= 0, got {seed!r}")
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=int(seed))
    return _freeze(x_train, y_train, x_test, y_test, "digits")


def load_npz(path: str | os.PathLike) -> Dataset:
    """A user's data set from an ``.npz`` with ``x_train, y_train, x_test, y_test``; never unpickles.

    Checks, each a ValueError naming the key: the four keys present; no object arrays; ``x_*`` 2-D numeric,
    finite, non-empty, with the same feature count; ``y_*`` 1-D non-negative integers (integral floats are
    accepted) with one label per row of ``x_*``. Features become float32, labels int64, and ``num_classes`` is
    the largest label over train and test plus one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - not NumPy data, or pickled data (errors vary by format)
        raise ValueError(f"{path}: not a readable .npz archive of numeric arrays ({type(exc).__name__}: {exc})"
                         ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive with keys {list(NPZ_KEYS)}, got a single array")
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; expected {list(NPZ_KEYS)}, found {archive.files}")
        arrays = {key: _read_member(archive, key, path) for key in NPZ_KEYS}
    x_train = _check_features(arrays["x_train"], "x_train", path)
    x_test = _check_features(arrays["x_test"], "x_test", path)
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"{path}: x_train has {x_train.shape[1]} features but x_test has {x_test.shape[1]}")
    y_train = _check_labels(arrays["y_train"], "y_train", len(x_train), path)
    y_test = _check_labels(arrays["y_test"], "y_test", len(x_test), path)
    name = os.path.splitext(os.path.basename(path))[0]
    return _freeze(x_train, y_train, x_test, y_test, name)


def _read_member(archive, key: str, path: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:  # NumPy refuses object arrays when allow_pickle=False
        raise ValueError(f"{path}: {key} is an object array (would need unpickling, which rayps never does); "
                         f"save it as a numeric array") from exc


def _check_features(x: np.ndarray, key: str, path: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {key} must be numeric, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{path}: {key} must be 2-D (samples, features), got shape {x.shape} (ndim {x.ndim})")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{path}: {key} is empty (shape {x.shape})")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: {key} has NaN or inf values (or values beyond float32's range)")
    return x


def _check_labels(y: np.ndarray, key: str, num_rows: int, path: str) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(f"{path}: {key} must be 1-D (one class id per sample), got shape {y.shape} (ndim {y.ndim})")
    if len(y) != num_rows:
        x_key = "x" + key[1:]
        raise ValueError(f"{path}: {key} has {len(y)} labels but {x_key} has {num_rows} rows")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
            raise ValueError(f"{path}: {key} must hold integer class ids, got non-integer values")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{path}: {key} must hold integer class ids, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"{path}: {key} has negative class ids (min {y.min()}); expected ids 0..C-1")
    return y.astype(np.int64)


def _freeze(x_train, y_train, x_test, y_test, name: str, task: str = "classification") -> Dataset:
    arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test)]
    for array in arrays:
        array.flags.writeable = False
    num_classes = 0
    if task == "classification":
        num_classes = int(max(arrays[1].max(), arrays[3].max() if len(arrays[3]) else 0)) + 1
    return Dataset(*arrays, num_classes=num_classes, name=name, task=task)


def hold_out(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple:
    """``(x_train, y_train, x_test, y_test)``: a permutation seeded by ``seed`` puts ``max(1, round(n *
    fraction))`` rows (at most ``n - 1``) in the test part, the rest in train, each row in exactly one."""
    n = len(x)
    count = min(n - 1, max(1, int(round(n * fraction))))
    order = np.random.default_rng(seed).permutation(n)
    test, train = np.sort(order[:count]), np.sort(order[count:])
    return x[train], y[train], x[test], y[test]


def _check_array_features(x, key: str, owner: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{owner}: {key} must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{owner}: {key} must have a row per sample, shape (n, features...), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{owner}: {key} is empty (shape {x.shape})")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{owner}: {key} has NaN or inf values (or values beyond float32's range)")
    return x


def _check_targets(y: np.ndarray, key: str, num_rows: int, task: str, owner: str) -> np.ndarray:
    if y.dtype.kind not in "biuf":
        raise ValueError(f"{owner}: {key} must be numeric, got dtype {y.dtype}")
    if y.ndim == 0 or len(y) != num_rows:
        raise ValueError(f"{owner}: {key} has {len(y) if y.ndim else 0} labels but x{key[1:]} has {num_rows} rows")
    if not np.isfinite(y).all():
        raise ValueError(f"{owner}: {key} has NaN or inf values")
    if task == "regression":
        if y.ndim > 2:
            raise ValueError(f"{owner}: {key} regression targets must be (n,) or (n, k), got shape {y.shape}")
        return y.astype(np.float32)
    if y.ndim != 1:
        raise ValueError(f"{owner}: {key} class ids must be 1-D (one per row), got shape {y.shape}")
    if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
        raise ValueError(f"{owner}: {key} has non-integer values; class ids must be integers "
                         f"(or pass task='regression')")
    if y.min() < 0:
        raise ValueError(f"{owner}: {key} has negative class ids (min {y.min()}); expected ids 0..C-1")
    return y.astype(np.int64)


def _check_count(value, field: str, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"partition: {field} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def partition_indices(num_samples: int, num_workers: int, epoch: int, seed: int) -> list[np.ndarray]:
    """Sample ids of each worker's partition for one epoch: disjoint, covering, sizes differing by at most one.

    A permutation of ``range(num_samples)`` drawn from a generator seeded with ``(seed, epoch)``, cut into
    ``num_workers`` consecutive parts; the same ``(seed, epoch)`` always gives the same partitions, and a new
    epoch reshuffles. Returns ``num_workers`` int64 arrays.
    """
    num_samples = _check_count(num_samples, "num_samples", 1)
    num_workers = _check_count(num_workers, "num_workers", 1)
    epoch = _check_count(epoch, "epoch", 0)
    seed = _check_count(seed, "seed", 0)
    if num_workers > num_samples:
        raise ValueError(f"partition: num_workers ({num_workers}) must be <= num_samples ({num_samples}); "
                         f"every worker needs at least one sample")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_samples).astype(np.int64)
    return np.array_split(order, num_workers)


def iterate_minibatches(x: np.ndarray, y: np.ndarray, indices: np.ndarray,
                        batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x[ids], y[ids])`` for consecutive chunks of ``indices`` of ``batch_size`` (the last may be shorter)."""
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"minibatches: batch_size must be an integer >= 1, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"minibatches: x has {len(x)} rows but y has {len(y)}")
    indices = np.asarray(indices)
    for start in range(0, len(indices), batch_size):
        ids = indices[start:start + batch_size]
        yield x[ids], y[ids]
