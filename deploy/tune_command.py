"""``rayps tune``: a Ray Tune sweep of the DL4J updaters and their learning rates on digits; prints the ranking.

Each trial is one rayps run (``rayps.worker.tune.trainable``: its own shards and workers in the trial's
placement group), reporting every epoch; ASHA (``--scheduler asha``, the default) stops the weak trials early.
By default every updater is tried at its tuned learning rate times 0.3, 1 and 3 (AdaDelta and NoOp, which have
no learning rate, once): 29 trials. ``--updaters`` and ``--learning-rates`` choose instead.
"""

from __future__ import annotations

import argparse
import math
import sys

from .cli import UsageError

LR_SCALES = (0.3, 1.0, 3.0)


def _csv(kind, what: str):
    def parse(text: str):
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
        if not values or (kind is float and not all(math.isfinite(v) and v > 0 for v in values)):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return values
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="sweep the DL4J updaters and learning rates with Ray Tune",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updaters", type=_csv(str, "updater names"), default=None,
                        help="comma-separated updater names (default: all eleven)")
    parser.add_argument("--learning-rates", type=_csv(float, "positive learning rates"), default=None,
                        help="comma-separated rates tried with every updater that has one (default: each "
                             "updater's tuned rate x 0.3, 1, 3)")
    parser.add_argument("--epochs", type=_positive_int, default=5)
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--workers", type=_positive_int, default=2, help="workers per trial (default 2)")
    parser.add_argument("--shards", type=_positive_int, default=1, help="shards per trial (default 1)")
    parser.add_argument("--model", default="mlp", choices=("softmax", "mlp"))
    parser.add_argument("--hidden", default="64")
    parser.add_argument("--scheduler", default="asha", choices=("asha", "fifo"),
                        help="asha: stop weak trials early (default); fifo: run every trial to the end")
    parser.add_argument("--max-concurrent", type=_positive_int, default=None,
                        help="trials at once (default: as many as the cluster's CPUs hold)")
    parser.add_argument("--storage-path", default=None,
                        help="where Tune keeps results and checkpoints: a path or a URI such as s3://bucket/tune "
                             "(default ~/ray_results)")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else an "
                                                        "embedded local Ray)")
    parser.set_defaults(run=run)


def sweep_points(updaters, learning_rates) -> list[dict]:
    """Every (updater, learning rate) point of the sweep; an updater without a learning rate appears once."""
    from ..updaters import DEFAULT_LEARNING_RATES, UPDATERS_BY_FLAG  # noqa: PLC0415

    names = list(UPDATERS_BY_FLAG) if updaters is None else updaters
    unknown = [n for n in names if n not in UPDATERS_BY_FLAG]
    if unknown:
        raise UsageError(f"--updaters: unknown updater {unknown[0]!r}; expected some of {sorted(UPDATERS_BY_FLAG)}")
    points = []
    for name in names:
        defaults = UPDATERS_BY_FLAG[name].defaults
        if "learning_rate" not in defaults:
            points.append({"updater": name})
            continue
        base = DEFAULT_LEARNING_RATES.get(name, defaults["learning_rate"])
        rates = learning_rates or [float(f"{base * scale:.3g}") for scale in LR_SCALES]
        points += [{"updater": name, "learning_rate": rate} for rate in rates]
    return points


def ranking_table(rows: list[dict]) -> str:
    """Rows sorted by test accuracy (best first): rank, updater, learning rate, accuracy, loss, epochs run."""
    rows = sorted(rows, key=lambda r: -r["test_accuracy"] if r["test_accuracy"] == r["test_accuracy"] else math.inf)
    lines = [f"{'rank':>4}  {'updater':<10} {'learning rate':>13}  {'test acc':>8}  {'test loss':>9}  {'epochs':>6}"]
    for rank, row in enumerate(rows, start=1):
        rate = "-" if row.get("learning_rate") is None else f"{row['learning_rate']:g}"
        lines.append(f"{rank:>4}  {row['updater']:<10} {rate:>13}  {row['test_accuracy']:>8.4f}  "
                     f"{row['test_loss']:>9.4f}  {row['epochs_run']:>6}")
    return "\n".join(lines)


def run(args) -> int:
    points = sweep_points(args.updaters, args.learning_rates)
    from ray import tune  # noqa: PLC0415

    from ..worker.tune import trainable, trial_resources  # noqa: PLC0415
    from .cluster import connect  # noqa: PLC0415

    connect(args.address)
    scheduler = tune.schedulers.ASHAScheduler(max_t=args.epochs, grace_period=1, time_attr="epoch") \
        if args.scheduler == "asha" else None
    config = {"point": tune.grid_search(points), "epochs": args.epochs, "batch_size": args.batch_size,
              "num_workers": args.workers, "num_shards": args.shards, "model": args.model, "hidden": args.hidden}
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources(args.shards, args.workers)), param_space=config,
        tune_config=tune.TuneConfig(metric="test_accuracy", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=args.max_concurrent),
        run_config=tune.RunConfig(name="rayps-tune", storage_path=args.storage_path, verbose=0))
    print(f"rayps tune: {len(points)} trials of {args.epochs} epochs ({args.model}, {args.workers} workers x "
          f"{args.shards} shard{'s' if args.shards > 1 else ''} each), scheduler {args.scheduler}", file=sys.stderr)
    results = tuner.fit()
    rows = []
    for result in results:
        if result.error is not None:
            raise UsageError(f"a trial failed: {str(result.error).splitlines()[0]}")
        point = result.config["point"]
        metrics = result.metrics or {}
        rows.append({"updater": point["updater"], "learning_rate": point.get("learning_rate"),
                     "test_accuracy": metrics.get("test_accuracy", math.nan),
                     "test_loss": metrics.get("test_loss", math.nan), "epochs_run": metrics.get("epoch", 0)})
    print(ranking_table(rows))
    return 0
