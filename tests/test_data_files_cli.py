"""``rayps train --data`` with Parquet and CSV files, read through Ray Data: digits written to Parquet (a
directory of parts) and to CSV train to the accuracy of the built-in digits path; bad files exit 2 with one line
naming the column."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from rayps.deploy.cli import main
from rayps.worker.data import load_dataset

pytestmark = pytest.mark.usefixtures("ray_session")

RUN = ["--epochs", "2", "--workers", "1", "--shards", "1", "--model", "softmax", "--quiet"]  # one worker: deterministic


def _table(x, y, label="label"):
    import pyarrow as pa

    return pa.table({**{f"p{i}": x[:, i] for i in range(x.shape[1])}, label: y})


def _accuracy(tmp_path, name, extra):
    out = tmp_path / f"{name}.json"
    assert main(["train", *RUN, "--json-out", str(out), *extra]) == 0
    return json.loads(out.read_text())["test_accuracy"]


def test_digits_from_parquet_and_csv_train_to_the_accuracy_of_the_built_in_path(tmp_path):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    digits = load_dataset("digits")  # the same seeded split the built-in path uses
    parts = tmp_path / "train_parts"
    parts.mkdir()
    half = digits.num_train // 2  # a directory of two Parquet files, read in file order
    pq.write_table(_table(digits.x_train[:half], digits.y_train[:half]), parts / "part-0.parquet")
    pq.write_table(_table(digits.x_train[half:], digits.y_train[half:]), parts / "part-1.parquet")
    pq.write_table(_table(digits.x_test, digits.y_test), tmp_path / "test.parquet")
    pcsv.write_csv(_table(digits.x_train, digits.y_train), tmp_path / "train.csv")
    pcsv.write_csv(_table(digits.x_test, digits.y_test), tmp_path / "test.csv")

    from rayps.worker.tables import load_table_dataset  # what the flags read: the same arrays, in order
    read = load_table_dataset(parts, tmp_path / "test.csv")
    np.testing.assert_array_equal(read.x_train, digits.x_train)
    np.testing.assert_array_equal(read.y_test, digits.y_test)

    built_in = _accuracy(tmp_path, "built-in", [])
    parquet = _accuracy(tmp_path, "parquet", ["--data", str(parts), "--test-data", str(tmp_path / "test.parquet")])
    csv = _accuracy(tmp_path, "csv", ["--data", str(tmp_path / "train.csv"), "--test-data",
                                      str(tmp_path / "test.csv")])
    assert built_in > 0.6  # it learned (chance: 0.1); 2 epochs of softmax regression
    assert abs(parquet - built_in) <= 0.01 and abs(csv - built_in) <= 0.01, (built_in, parquet, csv)


def _bad(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    y = np.arange(8) % 2
    train, extra = tmp_path / "train.parquet", []
    if kind == "missing-label":
        pq.write_table(_table(x, y, label="target"), train)
    elif kind == "non-numeric-feature":
        table = _table(x, y).append_column("city", pa.array(["a"] * 8))
        pq.write_table(table, train)
        extra = ["--feature-columns", "p0,city"]
    elif kind == "nan":
        train = tmp_path / "train.csv"
        train.write_text("p0,p1,label\n1.0,2.0,0\n3.0,,1\n5.0,6.0,0\n")
    elif kind == "empty":
        train = tmp_path / "train.csv"
        train.write_text("p0,p1,label\n")
    elif kind == "mismatched":
        pq.write_table(_table(x, y), train)
        pq.write_table(_table(x[:, :2], y), tmp_path / "test.parquet")
        extra = ["--test-data", str(tmp_path / "test.parquet")]
    elif kind == "float-label":
        pq.write_table(_table(x, y.astype(np.float64) + 0.5), train)
    return [str(train), *extra]


FORWARDED = re.compile(r"^\s*(\x1b\[[0-9;]*m)?\([^)]*pid=")  # "(Name pid=...)", "(pid=gcs_server)", colored or not


@pytest.mark.parametrize("kind,needle", [
    ("missing-label", "no label column 'label'"),
    ("non-numeric-feature", "feature column 'city' is not numeric"),
    ("nan", "column 'p1' has NaN or missing values"),
    ("empty", "no rows"),
    ("mismatched", "lacks feature column 'p2'"),
    ("float-label", "floating-point labels (regression)"),
])
def test_a_bad_table_exits_2_with_one_line_naming_the_column(capsys, tmp_path, kind, needle):
    assert main(["train", *RUN, "--data", *_bad(tmp_path, kind)]) == 2
    err = capsys.readouterr().err
    # lines Ray forwards from other processes of the session's cluster (prefixed "(Name pid=...)") are not the
    # command's output: a Ray Data task of an earlier read may still be logging while it is torn down
    lines = [line for line in err.strip().splitlines() if line.strip() and not FORWARDED.match(line)]
    assert not any("Traceback" in line for line in lines)
    assert len(lines) == 1 and lines[0].startswith("rayps train: error:") and needle in lines[0], err


@pytest.mark.parametrize("label,features,match", [
    ("label", ["p0", "p9"], "no feature column 'p9'"),
    ("label", ["label"], "column 'label' is the label"),
    ("name", None, "label column 'name' is not numeric"),
    ("label", ["name"], "feature column 'name' is not numeric"),
    ("label", [], "feature_columns is empty"),
])
def test_columns_are_checked_against_the_schema(label, features, match):
    import pyarrow as pa

    from rayps.worker.tables import TableColumns

    schema = pa.schema([("p0", pa.float32()), ("name", pa.string()), ("label", pa.int64())])
    assert TableColumns.resolve(schema) == TableColumns("label", ("p0",))  # the other numeric columns
    with pytest.raises(ValueError, match=match):
        TableColumns.resolve(schema, label, features, "t.parquet")


def test_table_flags_are_checked(capsys):
    assert main(["train", *RUN, "--test-fraction", "0.2"]) == 2  # with the built-in digits
    assert "--test-fraction: applies to Parquet/CSV --data only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(["train", *RUN, "--test-fraction", "1.5"])
    assert raised.value.code == 2 and "expected a number in (0, 1)" in capsys.readouterr().err


def test_test_fraction_holds_out_a_seeded_share_of_a_csv(tmp_path):
    from rayps.worker.tables import load_table_dataset

    path = tmp_path / "rows.csv"
    rows = "\n".join(f"{i},{i * 2},{i % 3}" for i in range(20))
    path.write_text("a,b,label\n" + rows + "\n")
    data = load_table_dataset(path, test_fraction=0.25, seed=1)
    assert (data.num_train, data.num_test, data.num_classes) == (15, 5, 3)
    together = np.concatenate([data.x_train, data.x_test])
    np.testing.assert_array_equal(np.sort(together[:, 0]), np.arange(20))  # every row once
    np.testing.assert_array_equal(together[:, 1], together[:, 0] * 2)  # columns stay together
