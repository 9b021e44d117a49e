"""Tabular data through Ray Data: which columns are the label and the features, and Parquet/CSV files read
into a ``Dataset`` (``rayps train --data file.parquet|dir|file.csv``).

A table has one label column (``label`` unless named) and feature columns: the other numeric columns, or
the ones named. Every problem is one ``ValueError`` line naming the file and the column: a missing label or
feature column, a non-numeric feature, NaN or missing values, no rows, a test file whose feature columns
differ from the training file's. Labels: integer (or bool) columns are class ids, floating ones regression
targets (``Dataset.from_arrays``). Ray Data (``pip install "rayps[data]"``) is imported only here and in
worker/streams.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from .data import Dataset, hold_out

DATA_INSTALL_HINT = 'pip install "rayps[data]"'
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)


def import_ray_data():
    """``ray.data``, with its per-execution logging (progress included) turned down to warnings here."""
    try:
        import ray.data  # noqa: PLC0415 - optional: the data extra
        import pyarrow  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ImportError(f"reading Parquet/CSV and ray.data.Dataset training need Ray Data; {DATA_INSTALL_HINT}") \
            from exc
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray.data


def _numeric(arrow_type) -> bool:
    import pyarrow.types as pat  # noqa: PLC0415

    return pat.is_integer(arrow_type) or pat.is_floating(arrow_type) or pat.is_boolean(arrow_type) or \
        (pat.is_fixed_size_list(arrow_type) and _numeric(arrow_type.value_type)) or \
        type(arrow_type).__name__.startswith("ArrowTensorType")


@dataclass(frozen=True)
class TableColumns:
    """The label column and the feature columns (in order) of a table."""

    label: str
    features: tuple[str, ...]

    @classmethod
    def resolve(cls, schema, label: str = "label", features=None, what: str = "data") -> "TableColumns":
        """The columns of ``schema`` (a Ray Data / pyarrow schema): checked to exist and be numeric."""
        names = list(schema.names)
        types = dict(zip(names, schema.types))
        if label not in types:
            raise ValueError(f"{what}: no label column {label!r} (columns: {', '.join(names)}); "
                             f"name it with --label-column / label_column=")
        if not _numeric(types[label]):
            raise ValueError(f"{what}: label column {label!r} is not numeric ({types[label]})")
        if features is None:
            chosen = [n for n in names if n != label and _numeric(types[n])]
            if not chosen:
                raise ValueError(f"{what}: no numeric feature column besides the label {label!r} "
                                 f"(columns: {', '.join(names)})")
        else:
            chosen = [features] if isinstance(features, str) else list(features)
            if not chosen:
                raise ValueError(f"{what}: feature_columns is empty")
            for name in chosen:
                if name not in types:
                    raise ValueError(f"{what}: no feature column {name!r} (columns: {', '.join(names)})")
                if name == label:
                    raise ValueError(f"{what}: column {name!r} is the label; it cannot be a feature too")
                if not _numeric(types[name]):
                    raise ValueError(f"{what}: feature column {name!r} is not numeric ({types[name]}); leave it "
                                     f"out or name the features with --feature-columns / feature_columns=")
        return cls(label, tuple(chosen))

    def arrays(self, batch: dict, what: str = "data") -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of a NumPy batch (``column -> array``): x float32 ``(n, features)`` (a single tensor
        column keeps its shape ``(n, ...)``), y as stored; NaN anywhere is refused, naming the column."""
        for name in (self.label, *self.features):
            column = batch[name]
            if column.dtype.kind == "O" or (column.dtype.kind == "f" and not np.isfinite(column).all()):
                raise ValueError(f"{what}: column {name!r} has NaN or missing values")
        if len(self.features) == 1 and batch[self.features[0]].ndim > 1:
            x = batch[self.features[0]].astype(np.float32)
        else:
            x = np.stack([np.asarray(batch[n], dtype=np.float32) for n in self.features], axis=1)
        return x, np.asarray(batch[self.label])


def file_format(path: str) -> str:
    """``npz``, ``parquet`` or ``csv``, from the suffix (a directory: the suffix of the files in it)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    names = [path] if os.path.isfile(path) else sorted(os.listdir(path))
    for name in names:
        lower = name.lower()
        if lower.endswith(".npz"):
            return "npz"
        if lower.endswith(PARQUET_SUFFIXES):
            return "parquet"
        if lower.endswith(CSV_SUFFIXES):
            return "csv"
    raise ValueError(f"{path}: not an .npz, .parquet or .csv file (or a directory of them)")


def read_table(path, fmt: str | None = None):
    """A ``ray.data.Dataset`` reading the Parquet or CSV file (or directory) at ``path``, in order."""
    rd = import_ray_data()
    path = os.path.abspath(os.fspath(path))
    fmt = fmt or file_format(path)
    context = rd.DataContext.get_current()  # a Dataset keeps the context it was made in
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # rows in file order (files in name order), every run alike
    try:
        return rd.read_parquet(path) if fmt == "parquet" else rd.read_csv(path)
    except Exception as error:  # noqa: BLE001 - Ray Data wraps pyarrow's errors in its own
        raise ValueError(f"{path}: not a readable {fmt} file ({_first_line(error)})") from None
    finally:
        context.execution_options.preserve_order = preserve


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def table_arrays(ds, columns: TableColumns, what: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a Ray Dataset as ``(x, y)`` arrays, in order (checked as ``TableColumns.arrays``)."""
    parts = [columns.arrays(batch, what) for batch in
             ds.select_columns([columns.label, *columns.features]).iter_batches(batch_size=None,
                                                                               batch_format="numpy")]
    parts = [p for p in parts if len(p[1])]
    if not parts:
        raise ValueError(f"{what}: no rows")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_table_dataset(path, test_path=None, test_fraction: float = 0.2, label_column: str = "label",
                       feature_columns=None, seed: int = 0) -> Dataset:
    """A ``Dataset`` from a Parquet or CSV file or directory, read through Ray Data: the test set from
    ``test_path`` (same feature columns) or a seeded ``test_fraction`` of the rows."""
    path = os.fspath(path)
    ds = read_table(path)
    try:
        schema = ds.schema()
    except Exception as error:  # noqa: BLE001 - Ray Data wraps the reader's errors
        raise ValueError(f"{path}: not a readable table ({_first_line(error)})") from None
    if schema is None:
        raise ValueError(f"{path}: no rows")
    columns = TableColumns.resolve(schema, label_column, feature_columns, path)
    x, y = table_arrays(ds, columns, path)
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if test_path is None:
        x, y, x_test, y_test = hold_out(x, y, test_fraction, seed) if len(x) > 1 else (x, y, None, None)
        if x_test is None:
            raise ValueError(f"{path}: 1 row; holding out a test set needs at least 2 (or give --test-data)")
    else:
        test_path = os.fspath(test_path)
        test_ds = read_table(test_path)
        test_schema = test_ds.schema()
        if test_schema is None:
            raise ValueError(f"{test_path}: no rows")
        test_columns = TableColumns.resolve(test_schema, label_column, feature_columns, test_path)
        if test_columns.features != columns.features:
            missing = [c for c in columns.features if c not in test_columns.features]
            extra = [c for c in test_columns.features if c not in columns.features]
            column = (missing or extra or [next(a for a, b in zip(columns.features, test_columns.features)
                                                if a != b)])[0]
            kind = "lacks" if missing else "has the extra" if extra else "orders differently"
            raise ValueError(f"{test_path}: {kind} feature column {column!r} (the training file {path} has "
                             f"{len(columns.features)} feature columns)")
        x_test, y_test = table_arrays(test_ds, test_columns, test_path)
    task = "classification" if y.dtype.kind in "biu" else "regression"  # the training file's label type
    return Dataset.from_arrays(x, y, x_test, y_test, task=task, name=name)
