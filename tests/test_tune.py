"""Ray Tune: ``rayps tune`` runs a real 4-trial sweep of 2 epochs (trials one at a time on the 2-CPU test
cluster: each trial's placement group holds its shards and workers), prints the ranking, and every trial's last
Tune checkpoint holds the server whose parameters give exactly the accuracy that trial reported."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rayps.deploy.cli import UsageError, main
from rayps.deploy.tune_command import sweep_points


def test_the_default_sweep_is_every_updater_at_three_rates_and_the_rateless_once():
    points = sweep_points(None, None)
    names = [p["updater"] for p in points]
    assert len(set(names)) == 11 and len(points) == 9 * 3 + 2
    assert {"updater": "adadelta"} in points and {"updater": "noop"} in points
    assert [p["learning_rate"] for p in points if p["updater"] == "adam"] == [0.0015, 0.005, 0.015]
    assert sweep_points(["sgd", "noop"], [0.1, 0.2]) == [{"updater": "sgd", "learning_rate": 0.1},
                                                         {"updater": "sgd", "learning_rate": 0.2}, {"updater": "noop"}]
    with pytest.raises(UsageError, match="--updaters: unknown updater 'adamw'"):
        sweep_points(["adamw"], None)


def test_trial_resources_hold_the_trial_its_shards_and_its_workers():
    from rayps.worker.tune import trial_resources

    factory = trial_resources(num_shards=2, num_workers=3, cpus_per_shard=0.5, cpus_per_worker=0.25, trial_cpus=1)
    assert factory.bundles == [{"CPU": 1}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}, {"CPU": 0.25}]


def test_a_four_trial_sweep_ranks_the_trials_and_checkpoints_through_tune(ray_session, tmp_path, capsys):
    from rayps.server.checkpoints import server_state
    from rayps.worker import build_model, load_dataset

    storage = tmp_path / "tune"
    assert main(["tune", "--updaters", "sgd,adam", "--learning-rates", "0.01,0.1", "--epochs", "2", "--model",
                 "softmax", "--batch-size", "64", "--workers", "1", "--scheduler", "fifo",
                 "--storage-path", str(storage)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in table[table.index(next(l for l in table if l.lstrip().startswith("rank"))) + 1:]]
    assert len(rows) == 4
    ranked = [(name, float(rate), float(acc), int(epochs)) for _, name, rate, acc, _, epochs in rows]
    assert {(name, rate) for name, rate, _, _ in ranked} == {("sgd", 0.01), ("sgd", 0.1), ("adam", 0.01),
                                                             ("adam", 0.1)}
    assert [acc for _, _, acc, _ in ranked] == sorted((acc for _, _, acc, _ in ranked), reverse=True)
    assert all(epochs == 2 for *_, epochs in ranked)

    digits = load_dataset("digits")
    model = build_model("softmax", digits.num_features, digits.num_classes)
    trial_dirs = sorted(p for p in (storage / "rayps-tune").iterdir() if p.is_dir() and p.name.startswith("trainable"))
    assert len(trial_dirs) == 4
    for trial in trial_dirs:
        reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in reports] == [1, 2]  # one tune.report per epoch
        checkpoints = sorted(trial.glob("checkpoint_*"))
        assert len(checkpoints) == 2
        loaded = server_state.load(checkpoints[-1] / "server")
        accuracy, loss = model.accuracy_and_loss(loaded["params"], digits.x_test, digits.y_test)
        assert accuracy == reports[-1]["test_accuracy"] and math.isclose(loss, reports[-1]["test_loss"])
        assert (checkpoints[-1] / "epoch.txt").read_text() == "1"  # the last finished epoch (from 0)
        assert np.isfinite(reports[-1]["train_loss"])


def test_a_failed_trial_resumes_from_its_tune_checkpoint(ray_session, tmp_path):
    """Tune restarts the trial (max_failures=1); the trainable picks up its checkpoint and runs only the second
    epoch: its last report says it started after one finished epoch (a restart from scratch would say 0)."""
    from ray import tune

    from rayps.worker.tune import trial_resources

    def flaky_trial(config):  # defined here so that Ray ships it by value
        """The rayps trainable, but the first attempt dies right after its first epoch's report (a lost node)."""
        import os

        from rayps.worker.tune import trainable

        if not os.path.exists(config["marker"]):
            open(config["marker"], "w").close()
            trainable({**config, "epochs": 1})
            raise RuntimeError("the trial's node was lost")
        trainable(config)

    tuner = tune.Tuner(
        tune.with_resources(flaky_trial, trial_resources(num_shards=1, num_workers=1)),
        param_space={"updater": "adam", "epochs": 2, "model": "softmax", "batch_size": 64, "num_workers": 1,
                     "marker": str(tmp_path / "failed-once")},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)))
    result = tuner.fit()[0]
    assert result.error is None and (tmp_path / "failed-once").exists()
    assert result.metrics["epoch"] == 2 and result.metrics["first_epoch"] == 1
    assert result.checkpoint is not None and result.metrics["test_accuracy"] > 0.5
