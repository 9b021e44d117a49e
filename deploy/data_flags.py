"""``rayps train``'s data flags: ``--data`` (.npz, Parquet file or directory, CSV), ``--label-column``,
``--feature-columns``, ``--test-data``, ``--test-fraction``; and the data set they name.

Parquet and CSV are read through Ray Data on the run's Ray (worker/tables.py). Every problem with a file is one
line naming the file and the column (a ``UsageError``: exit code 2).
"""

from __future__ import annotations

import argparse
import os

from .cli import UsageError


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument("--data", default=None,
                        help="your own data: an .npz with x_train, y_train, x_test, y_test; or a Parquet file or "
                             "directory, or a CSV file, read through Ray Data (one row per sample)")
    parser.add_argument("--label-column", default="label", help="Parquet/CSV: the label column (default label); "
                        "integer labels are class ids")
    parser.add_argument("--feature-columns", default=None,
                        help="Parquet/CSV: the feature columns, e.g. a,b,c (default: every other numeric column)")
    parser.add_argument("--test-data", default=None,
                        help="Parquet/CSV: the test set, with the same columns (default: --test-fraction of --data)")
    parser.add_argument("--test-fraction", type=_fraction, default=None,
                        help="Parquet/CSV without --test-data: the share of rows held out, seeded by --seed "
                             "(default 0.2)")


def _table_flags_given(args) -> list[str]:
    return [flag for flag, value, default in (("--label-column", args.label_column, "label"),
                                              ("--feature-columns", args.feature_columns, None),
                                              ("--test-data", args.test_data, None),
                                              ("--test-fraction", args.test_fraction, None)) if value != default]


def load_data(args, connect):
    """The ``Dataset`` the flags name. ``connect()`` is called before Ray Data reads (so it reads on the run's
    Ray, never an implicitly started one)."""
    from ..worker.data import load_dataset  # noqa: PLC0415

    try:
        if args.data is None or _file_format(args.data) == "npz":
            given = _table_flags_given(args)
            if given:
                raise UsageError(f"{given[0]}: applies to Parquet/CSV --data only")
            return load_dataset(args.dataset, path=args.data, seed=args.seed)
        if args.test_data is not None and args.test_fraction is not None:
            raise UsageError("--test-fraction: not with --test-data (the test set is that file)")
        from ..worker.tables import load_table_dataset  # noqa: PLC0415

        features = None if args.feature_columns is None else \
            [name.strip() for name in args.feature_columns.split(",") if name.strip()]
        connect()
        data = load_table_dataset(args.data, args.test_data, args.test_fraction or 0.2, args.label_column, features,
                                  args.seed)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise UsageError(str(error).replace("\n", " ")) from None
    if not data.is_classification:
        raise UsageError(f"--label-column {args.label_column}: {args.data} holds floating-point labels "
                         f"(regression); the built-in models are classifiers: train a regression from Python "
                         f"(Dataset.from_arrays with a grad_fn or a TorchModule, README)")
    return data


def _file_format(path) -> str:
    from ..worker.tables import file_format  # noqa: PLC0415 - no Ray Data import for .npz

    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    return "npz" if os.path.isfile(path) and str(path).lower().endswith(".npz") else file_format(path)
