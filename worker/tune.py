"""Ray Tune: one rayps training per trial, reported per epoch, checkpointed through Tune.

    from ray import tune
    from rayps.worker.tune import trainable, trial_resources

    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources(num_shards=1, num_workers=2)),
        param_space={"updater": tune.grid_search(["sgd", "adam"]), "learning_rate": tune.grid_search([0.01, 0.1]),
                     "epochs": 5},
        tune_config=tune.TuneConfig(metric="test_accuracy", mode="max", scheduler=tune.schedulers.ASHAScheduler()))
    best = tuner.fit().get_best_result()

``trainable(config, data=None)`` starts a ``ParameterServer`` and ``num_workers`` workers, runs ``train`` and,
after every epoch, saves the server into a Tune checkpoint and calls ``tune.report`` with that epoch's row
(``epoch``, ``train_loss``, ``test_loss``, ``test_accuracy``, ``samples_per_second``, ..., and ``first_epoch``:
the epochs this attempt found done in its checkpoint). So a scheduler (ASHA,
median stopping) stops a bad trial after any epoch, and a trial that Tune restarts or resumes (a failure, PBT,
``Tuner.restore``) continues from its last finished epoch with the server's parameters and updater state.

``config`` keys (all optional): ``updater`` (a flag name of ``rayps.updaters.UPDATERS_BY_FLAG``, default
``adam``), ``learning_rate`` (default: the updater's tuned default; none for AdaDelta/NoOp), ``epochs`` (5),
``batch_size`` (32), ``num_workers`` (2), ``num_shards`` (1), ``consistency`` (``async``), ``model``
(``mlp``/``softmax``, default ``mlp``), ``hidden`` (``"64"``), ``seed`` (0); ``point``: a dict merged into the
config (``tune.grid_search`` over chosen combinations, as ``rayps tune`` sweeps). ``data``: a ``Dataset`` (pass it
with ``tune.with_parameters(trainable, data=...)``: it goes to the object store once); default digits.

Resources: ``trial_resources`` is the trial's placement group: bundle 0 for the trial's own process, then one
per shard and one per worker; the trainable puts its shards and workers in those bundles (``TrialPlacement``).
A trial therefore starts only when all of it fits, and its processes never wait on another trial's: no
deadlock, on 2 CPUs too (there, trials run one at a time).
"""

from __future__ import annotations

import os
import shutil
import tempfile

PROGRESS_FILE = "epoch.txt"
SERVER_DIR = "server"


class TrialPlacement:
    """Shards and workers of a trial in its placement group (the interface ``ParameterServer(placement=)``
    and ``train(placement=)`` use): shard ``s`` in bundle ``1 + s``, worker ``w`` in ``1 + num_shards + w``."""

    def __init__(self, num_shards: int, cpus_per_shard: float, cpus_per_worker: float):
        from ray.util import get_current_placement_group  # noqa: PLC0415

        self.group = get_current_placement_group()
        self.num_shards = num_shards
        self.cpus_per_shard, self.cpus_per_worker = cpus_per_shard, cpus_per_worker

    def _in_bundle(self, index: int, cpus: float) -> dict:
        if self.group is None:  # called outside a Tune trial: plain actors
            return {"num_cpus": 0}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415

        return {"num_cpus": cpus, "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=index)}

    def options_for(self, shard: int) -> dict:
        return self._in_bundle(1 + shard, self.cpus_per_shard)

    def worker_options(self, worker: int) -> dict:
        return self._in_bundle(1 + self.num_shards + worker, self.cpus_per_worker)


def trial_resources(num_shards: int = 1, num_workers: int = 2, cpus_per_shard: float = 0.25,
                    cpus_per_worker: float = 0.25, trial_cpus: float = 0.5):
    """The ``tune.PlacementGroupFactory`` of one trial: ``[{CPU: trial_cpus}]`` then one bundle per shard
    and per worker (pack them on one node where they fit)."""
    from ray import tune  # noqa: PLC0415

    bundles = [{"CPU": trial_cpus}] + [{"CPU": cpus_per_shard}] * num_shards + [{"CPU": cpus_per_worker}] * num_workers
    return tune.PlacementGroupFactory(bundles, strategy="PACK")


def trainable(config: dict, data=None) -> None:
    """One rayps training run as a Tune trial (see the module docstring)."""
    from ray import tune  # noqa: PLC0415

    from ..server.client import ParameterServer  # noqa: PLC0415
    from ..updaters import build_updater  # noqa: PLC0415
    from .data import load_dataset  # noqa: PLC0415
    from .models import build_model  # noqa: PLC0415
    from .training import train  # noqa: PLC0415

    config = {**config, **config.get("point", {})}  # a sweep over chosen combinations: grid_search of dicts
    seed = int(config.get("seed", 0))
    data = load_dataset("digits", seed=seed) if data is None else data
    num_shards, num_workers = int(config.get("num_shards", 1)), int(config.get("num_workers", 2))
    epochs = int(config.get("epochs", 5))
    model = build_model(config.get("model", "mlp"), data.num_features, data.num_classes,
                        hidden=config.get("hidden", "64"))
    bundle_cpus = _bundle_cpus()
    placement = TrialPlacement(num_shards, *bundle_cpus)
    options = dict(num_shards=num_shards, num_workers=num_workers, consistency=config.get("consistency", "async"),
                   placement=placement)
    first_epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a restarted or resumed trial: its last finished epoch
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, PROGRESS_FILE), encoding="utf-8") as handle:
                first_epoch = int(handle.read().strip()) + 1
            ps = ParameterServer.restore(os.path.join(directory, SERVER_DIR), **options)
    else:
        updater = build_updater(config.get("updater", "adam"), config.get("learning_rate"))
        ps = ParameterServer(model.init_params(seed=seed), updater=updater, **options)
    if first_epoch >= epochs:
        ps.shutdown()
        return
    saved = {}

    def save(epoch: int, server) -> None:  # train() calls this first, then report() with the epoch's row
        directory = tempfile.mkdtemp(prefix="rayps-tune-")
        server.save(os.path.join(directory, SERVER_DIR))
        with open(os.path.join(directory, PROGRESS_FILE), "w", encoding="utf-8") as handle:
            handle.write(str(epoch))
        saved["directory"] = directory

    def report(row: dict) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        metrics["first_epoch"] = first_epoch  # > 0: this attempt resumed from a checkpoint of that many epochs
        directory = saved.pop("directory")
        try:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))  # Tune copies it to storage
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    try:
        train(ps, model, data, num_workers=num_workers, epochs=epochs, batch_size=int(config.get("batch_size", 32)),
              seed=seed, first_epoch=first_epoch, on_epoch_end=save, progress=report, placement=placement)
    finally:
        ps.shutdown()


def _bundle_cpus() -> tuple[float, float]:
    """(CPUs of a shard's bundle, of a worker's bundle) in this trial's placement group (0 outside one)."""
    from ray.util import get_current_placement_group  # noqa: PLC0415

    group = get_current_placement_group()
    if group is None or len(group.bundle_specs) < 2:
        return 0.0, 0.0
    specs = group.bundle_specs
    return float(specs[1].get("CPU", 0.0)), float(specs[-1].get("CPU", 0.0))
