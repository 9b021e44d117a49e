"""The CTR workload at scale: hashed ids over a huge id space, and ``rayps train --id-space/--admission/--eviction``
(bad values: one line, exit code 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayps.deploy.cli import main
from rayps.worker.ctr import synthetic_ctr
from rayps.worker.epochs import CLI_FIELDS, RESULT_FIELDS

from row_policy_model import mix64


def test_hashed_ids_scatter_over_a_billion_rows_as_the_formula_says():
    plain = synthetic_ctr(400, num_fields=4, table_rows=10**9, seed=3)
    hashed = synthetic_ctr(400, num_fields=4, table_rows=10**9, seed=3, hashed=True)
    raw = np.concatenate([plain.x_train, plain.x_test]).reshape(-1).tolist()
    got = np.concatenate([hashed.x_train, hashed.x_test]).reshape(-1).tolist()
    assert got == [mix64(r ^ mix64(3)) % 10**9 for r in raw]  # the documented hash, in Python integers
    assert max(got) > 9 * 10**8 and min(got) >= 0
    np.testing.assert_array_equal(hashed.x_train, synthetic_ctr(400, num_fields=4, table_rows=10**9, seed=3,
                                                                hashed=True).x_train)


@pytest.mark.parametrize("argv, message", [
    (["--admission", "count:0"], "--admission count:0: min_count must be an integer >= 1"),
    (["--admission", "prob:1.5"], r"--admission prob:1.5: probability must be a number in \(0, 1\]"),
    (["--admission", "often"], "--admission: expected count:K"),
    (["--eviction", "lru:0"], "--eviction lru:0: max_rows must be an integer >= 1"),
    (["--eviction", "ttl:0"], "--eviction ttl:0: max_idle_steps must be an integer >= 1"),
    (["--eviction", "fifo:3"], "--eviction: expected lru:N, lfu:N"),
    (["--id-space", "0"], r"--id-space: expected an integer in \[1, 2\^40\]"),
    (["--id-space", "1e13"], r"--id-space: expected an integer in \[1, 2\^40\]"),
    (["--id-space", "1000", "--table-rows", "500"], "--id-space and --table-rows both size the table"),
    (["--eviction", "lru:1", "--shards", "2", "--workers", "1"], "--eviction: 1 rows cannot be split over 2 shards"),
])
def test_bad_scale_flags_exit_2_with_one_line(capsys, argv, message):
    code = None
    try:
        code = main(["train", "--dataset", "synthetic-ctr", "--ctr-samples", "200", "--quiet", *argv])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    import re

    assert re.search(message, lines[0]), lines[0]


def test_rayps_train_over_a_billion_id_space_under_a_cap(ray_session, tmp_path):
    out = tmp_path / "result.json"
    assert main(["train", "--dataset", "synthetic-ctr", "--id-space", "1e9", "--ctr-samples", "6000",
                 "--admission", "count:2", "--eviction", "lru:1500", "--workers", "2", "--shards", "2",
                 "--json-out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {*RESULT_FIELDS, *CLI_FIELDS}  # the fields of every run (README: the result of a run)
    assert (result["task"], result["test_accuracy"], result["sparse_table"]) == ("ctr", None, True)
    assert result["test_loss"] == result["test_logloss"] and result["data_rows"] == 4800
    assert result["table_rows"] == 10**9
    assert 0 < result["rows_touched"] <= 1500
    assert result["table_evicted"] > 0 and result["table_dropped_gradients"] > 0
    assert result["test_auc"] > 0.55
