"""Compressed pushes and the CTR workload end to end (Ray), through the real ``rayps train`` CLI in-process.

* the issue's must-show: ``--compression threshold`` (DL4J's AdaptiveThresholdAlgorithm defaults and
  ResidualClippingPostProcessor(5.0, 5), untuned) on digits pushes >= 10x fewer bytes than ``--compression none``
  and still reaches test accuracy >= 0.93 (20 epochs keep a margin over the epoch where the threshold run first
  crosses 0.93; figures in BENCHMARKS.md, "Sparse rows and compression");
* fp16 / bf16 reach accuracy >= 0.93 with exactly half the bytes per update;
* ``--dataset synthetic-ctr --table-rows 200000 --epochs 1`` finishes with AUC > 0.6;
* through a ``ParameterServer``: the shard applies exactly what the worker's encoder sent (decode + residual ==
  gradient), counts encoded bytes like the client, and row pushes ride the cast modes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayps.deploy.cli import main

pytestmark = pytest.mark.usefixtures("ray_session")

DIGITS_PARAMS = 64 * 128 + 128 + 128 * 10 + 10  # the default MLP (hidden 128)


def _train(tmp_path, *flags) -> dict:
    out = tmp_path / f"result-{'-'.join(f.strip('-') for f in flags)}.json"
    assert main(["train", *flags, "--json-out", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("none"), "--epochs", "20", "--compression", "none")


def test_threshold_encoding_pushes_10x_fewer_bytes_than_none_at_test_accuracy_093(uncompressed, tmp_path):
    threshold = _train(tmp_path, "--epochs", "20", "--compression", "threshold")
    assert threshold["updates_applied"] == uncompressed["updates_applied"]
    assert uncompressed["bytes_pushed"] == uncompressed["updates_applied"] * 4 * DIGITS_PARAMS  # float32, every push
    ratio = uncompressed["bytes_pushed"] / threshold["bytes_pushed"]
    assert ratio >= 10, ratio
    assert threshold["test_accuracy"] >= 0.93, threshold["test_accuracy"]
    assert uncompressed["test_accuracy"] >= 0.93
    assert threshold["bytes_pulled"] == uncompressed["bytes_pulled"]  # pulls are not compressed
    assert [row["bytes_pushed"] for row in threshold["history"]] == sorted(r["bytes_pushed"]
                                                                            for r in threshold["history"])


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_fp16_and_bf16_reach_the_accuracy_with_half_the_bytes_per_update(uncompressed, tmp_path, mode):
    result = _train(tmp_path, "--epochs", "15", "--compression", mode)
    per_update = result["bytes_pushed"] / result["updates_applied"]
    assert per_update == 2 * DIGITS_PARAMS
    assert uncompressed["bytes_pushed"] / uncompressed["updates_applied"] / per_update == 2.0
    assert result["test_accuracy"] >= 0.93, result["test_accuracy"]


def test_synthetic_ctr_with_a_200k_row_table_reaches_auc_06_in_one_epoch(tmp_path):
    result = _train(tmp_path, "--dataset", "synthetic-ctr", "--table-rows", "200000", "--epochs", "1",
                    "--ctr-samples", "20000", "--workers", "2")
    assert result["test_auc"] > 0.6, result["test_auc"]
    assert np.isfinite(result["test_logloss"]) and result["test_logloss"] < np.log(2)
    assert result["sparse_table"] and result["table_rows"] == 200_000 and result["embedding_dim"] == 16
    assert 0 < result["rows_touched"] < 200_000  # only the rows pushed are stored
    assert result["bytes_pushed"] > 0 and result["bytes_pulled"] > 0 and result["samples_per_second"] > 0
    # one push per step, dense and row grads together: 16000 train samples, 2 workers, batches of 256 by default
    assert result["updates_applied"] == 2 * int(np.ceil(8000 / 256))


def test_bad_compression_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--compression", "zip"])
    assert exit_info.value.code == 2
    assert "--compression" in capsys.readouterr().err


def test_the_shard_applies_exactly_what_the_workers_encoder_sent_and_counts_encoded_bytes():
    from rayps.server import ParameterServer
    from rayps.updaters import Sgd

    rng = np.random.default_rng(0)
    shapes = {"W": (50, 30), "b": (30,)}
    params = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    ps = ParameterServer(params, updater=Sgd(learning_rate=1.0), num_shards=2, compression="threshold")
    try:
        total = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        for _ in range(5):
            grads = {n: (1e-2 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
            ps.push(grads)
            for n in shapes:
                total[n] += grads[n]
        pulled = ps.pull()
        # Sgd(lr=1): params = -(sum of decoded pushes); what was not sent is in the residuals, per shard
        sent = {n: -pulled[n] for n in shapes}
        residual = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        for shard, encoder in ps._encoders.items():
            ps.layout.unpack_into(shard, {k.split("/")[1]: v for k, v in encoder.residuals.items()}, residual)
        for n in shapes:
            np.testing.assert_allclose(sent[n] + residual[n], total[n], rtol=1e-5, atol=1e-7)
            assert set(np.unique(np.abs(sent[n]))) != {0.0}  # something was sent
        stats = ps.stats()
        assert stats["compression"] == "threshold"
        assert stats["bytes_pushed"] == ps.bytes_pushed < 5 * 4 * (50 * 30 + 30)
    finally:
        ps.shutdown()


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_row_pushes_ride_the_cast_modes(mode):
    from rayps.server import ParameterServer
    from rayps.server.row_tables import RowTable
    from rayps.updaters import Sgd

    ps = ParameterServer({"emb": RowTable(1000, 4), "w": np.zeros(3, np.float32)}, sparse=["emb"],
                         updater=Sgd(learning_rate=1.0), num_shards=2, compression=mode)
    try:
        ids = np.array([1, 5, 5, 999], dtype=np.int64)
        grads = np.array([[0.5, -1.0, 2.0, 0.25]] * 4, dtype=np.float32)
        ps.push({"w": np.ones(3, np.float32)}, rows={"emb": (ids, grads)})
        got = ps.pull_rows("emb", np.array([1, 5, 999, 2]))
        np.testing.assert_array_equal(got, -np.array([grads[0], 2 * grads[0], grads[0], np.zeros(4)]))
        np.testing.assert_array_equal(ps.pull(["w"])["w"], -np.ones(3))
        # 2 bytes per value sent, ids as int64
        assert ps.bytes_pushed == 2 * 3 + 2 * grads.size + ids.nbytes == ps.stats()["bytes_pushed"]
    finally:
        ps.shutdown()
