"""``rayps train``: the main job — an MLP (or softmax regression) on real data, sharded on Ray.

With no flags: MLP (hidden 128) on scikit-learn's bundled digits, Adam, async, on an embedded local Ray, with
the workers and shards fitted to the CPUs it sees (``fit_processes``: 4 workers x 1 shard on 2 cores) and said
so. ``--address``/``RAY_ADDRESS`` runs it on an existing cluster instead (fitted to the cluster's CPUs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from . import ctr_command, data_flags
from .cli import UsageError

UPDATER_FLAGS = ("sgd", "nesterovs", "adagrad", "rmsprop", "adadelta", "adam", "adamax", "nadam", "amsgrad",
                 "adabelief", "noop")


def _number(kind, minimum: float, inclusive: bool = True):
    """An argparse type: a finite ``kind`` (int or float) >= ``minimum`` (> when not ``inclusive``)."""
    relation = ">=" if inclusive else ">"
    expected = f"{'an integer' if kind is int else 'a finite number'} {relation} {minimum:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_positive_float = _number(float, 0, inclusive=False)
_non_negative_float = _number(float, 0)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model with sharded parameter servers on Ray",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=("digits", "synthetic-ctr"),
                        help="bundled data set (default digits); synthetic-ctr: the CTR workload "
                             "(deploy/ctr_command.py)")
    data_flags.add_arguments(parser)  # --data (.npz, Parquet, CSV), --label-column, --feature-columns, --test-*
    parser.add_argument("--model", default="mlp", choices=("softmax", "mlp"))
    parser.add_argument("--hidden", default="128", help="hidden sizes, e.g. 128 or 2048,2048")
    parser.add_argument("--updater", default="adam", choices=UPDATER_FLAGS)
    parser.add_argument("--learning-rate", type=_non_negative_float, default=None,
                        help="default: a per-updater value tuned for digits")
    parser.add_argument("--lr-decay", type=_decay, default=0.9,
                        help="learning rate x this per epoch (DL4J ExponentialSchedule on epochs; 1 = constant)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="default 32 (synthetic-ctr: 256)")
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="default: fitted to the CPUs (max(4, CPUs - shards))")
    parser.add_argument("--shards", type=_positive_int, default=None, help="default: fitted to the CPUs "
                        "(one per 8 CPUs, at least 1)")
    parser.add_argument("--consistency", default="async", choices=("async", "ssp", "sync"))
    parser.add_argument("--staleness", type=_non_negative_int, default=0)
    parser.add_argument("--epochs", type=_positive_int, default=None, help="default 20 (synthetic-ctr: 1)")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--n-fetch", type=_positive_int, default=1, help="pull every N steps (DistBelief n_fetch)")
    parser.add_argument("--n-push", type=_positive_int, default=1, help="push every N steps (DistBelief n_push)")
    parser.add_argument("--prefetch", action="store_true",
                        help="each worker's push/pull runs in the background while it computes the next gradient "
                             "(one step staler; with --consistency sync: delayed BSP, see worker/loop.py)")
    parser.add_argument("--cpus-per-shard", type=_non_negative_float, default=None,
                        help="Ray CPUs reserved per shard (default: the cluster's CPUs shared out)")
    parser.add_argument("--cpus-per-worker", type=_non_negative_float, default=None,
                        help="Ray CPUs reserved per worker (default: the cluster's CPUs shared out)")
    # -- placement (server/placement.py): GPUs per shard/worker; shards spread over nodes by a placement group --
    parser.add_argument("--gpus-per-shard", type=_non_negative_float, default=0.0,
                        help="Ray GPUs reserved per shard (default 0)")
    parser.add_argument("--gpus-per-worker", type=_non_negative_float, default=0.0,
                        help="Ray GPUs reserved per worker (default 0)")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else an "
                                                        "embedded local Ray)")
    parser.add_argument("--json-out", default=None, help="write the result summary as JSON to this file")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint here: shards every --checkpoint-every updates (restarted shards restore "
                             "and lose nothing), the whole server after every epoch (for --resume). On a cluster "
                             "this must be storage that every node reaches: a shared volume, or a URI such as "
                             "s3://bucket/run or gs://bucket/run (server/checkpoints/storage.py)")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=200, help="updates per shard between "
                                                                                      "shard checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    parser.add_argument("--compression", default="none", choices=("none", "threshold", "fp16", "bf16"),
                        help="push encoding (server/transport.py): DL4J threshold encoding with residuals at the "
                             "worker, or fp16/bf16 casts (row pushes: the casts only); default none")
    ctr_command.add_arguments(parser, _positive_int, _positive_float)  # --table-rows, --embedding-dim, ...
    parser.add_argument("--sync-timeout", type=_positive_float, default=60.0,
                        help="sync mode: seconds a step waits for a dead worker before going on without it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--encrypt", action="store_true", help="encrypt the data plane (ZeroMQ CURVE); default: "
                        "authenticated by a per-run secret, not encrypted (README, 'Data plane and security')")
    parser.add_argument("--keep-subnormals", action="store_true", help="keep IEEE subnormal results in the "
                        "shards' update kernels (default: flushed to 0, ~100x faster on x86; README, 'Subnormal "
                        "results')")
    parser.add_argument("--data-ports", default=None, help="port range of the shards' data-plane sockets, "
                        "LOW-HIGH (default: RAYPS_DATA_PORTS, else 47000-47999)")
    parser.set_defaults(run=run)


def build_updater(name: str, learning_rate: float | None, lr_decay: float = 1.0):
    """The updater of ``--updater``, ``--learning-rate`` and ``--lr-decay`` (``rayps.updaters.build_updater``); a
    learning rate for a rule without one is a UsageError naming the flag."""
    from ..updaters.by_name import build_updater as updater_by_name  # noqa: PLC0415 - NumPy only when training

    try:
        return updater_by_name(name, learning_rate, lr_decay)
    except ValueError as error:
        raise UsageError(str(error).replace("learning_rate:", "--learning-rate:", 1)) from None


def _decay(text: str) -> float:
    value = _positive_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


class ProgressBar:
    """One line per epoch on a pipe, a redrawn bar on a terminal: epoch, loss, the test metric (AUC, else
    accuracy, else loss: whichever the history row has, README "The result of a run"), samples/s."""

    def __init__(self, stream=sys.stderr, width: int = 24):
        self.stream = stream
        self.width = width
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def __call__(self, row: dict) -> None:
        done = int(self.width * row["epoch"] / row["epochs"])
        bar = "#" * done + "." * (self.width - done)
        metric = next((f"test {label} {row[name]:.4f}  " for name, label in (
            ("test_auc", "auc"), ("test_accuracy", "acc"), ("test_loss", "loss")) if row.get(name) is not None), "")
        line = (f"[{bar}] epoch {row['epoch']:>3}/{row['epochs']}  loss {row['train_loss']:.4f}  " + metric
                + f"{row['samples_per_second']:,.0f} samples/s")
        if "bytes_pushed" in row:
            line += f"  {row['bytes_pushed']:,} B pushed"
        if self.tty:
            end = "\n" if row["epoch"] == row["epochs"] else ""
            self.stream.write("\r" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def summary_table(result: dict) -> str:
    rows = [("test accuracy", f"{result['test_accuracy']:.4f}"), ("final train loss", f"{result['final_loss']:.4f}"),
            ("samples/s", f"{result['samples_per_second']:,.0f}"), ("wall seconds", f"{result['wall_seconds']:.1f}"),
            ("updates applied", str(result["updates_applied"])), ("workers x shards",
                                                                  f"{result['workers']} x {result['shards']}"),
            ("consistency", str(result["consistency"])), ("max staleness", str(result["max_staleness"])),
            ("bytes pushed", f"{result['bytes_pushed']:,}"), ("bytes pulled", f"{result['bytes_pulled']:,}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def fit_processes(args, cpus: int) -> str | None:
    """Fill in ``--shards`` and ``--workers`` the user left out, from ``cpus``: one shard per 8 CPUs (at least
    one) and ``max(4, cpus - shards)`` workers. Returns the line that says so (None when both were given)."""
    if args.shards is not None and args.workers is not None:
        return None
    cpus = max(1, int(cpus))
    if args.shards is None:
        args.shards = max(1, cpus // 8)
    if args.workers is None:
        args.workers = max(4, cpus - args.shards)
    return (f"rayps train: {cpus} CPUs seen: {args.workers} workers x {args.shards} shard"
            f"{'s' if args.shards > 1 else ''} (choose with --workers/--shards)")


def say_fitted(args) -> None:
    """Print what ``fit_processes`` chose, if it chose anything."""
    if getattr(args, "fitted", None):
        print(args.fitted, file=sys.stderr)


def _fit(args) -> None:
    """``fit_processes`` from this machine's CPUs, or from the cluster's when one is given or already connected."""
    if args.shards is not None and args.workers is not None:
        return
    import ray  # noqa: PLC0415

    if args.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        from .cluster import connect  # noqa: PLC0415

        connect(args.address)
        cpus = int(ray.cluster_resources().get("CPU", 0)) or (os.cpu_count() or 1)
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.fitted = fit_processes(args, cpus)  # said with the run's first line, once every check has passed


def run(args) -> int:
    import numpy as np  # noqa: PLC0415

    if args.data_ports is not None:
        from ..server.data_server import parse_ports  # noqa: PLC0415

        try:
            parse_ports(args.data_ports)
        except ValueError as error:
            raise UsageError(f"--data-ports: {error}") from None
    _fit(args)
    if args.dataset == "synthetic-ctr":  # the CTR workload: deploy/ctr_command.py, worker/ctr_training.py
        if args.prefetch:
            raise UsageError("--prefetch: not available with --dataset synthetic-ctr (its worker loop pulls rows "
                             "per batch)")
        return ctr_command.run_ctr(args)
    args.epochs = 20 if args.epochs is None else args.epochs
    args.batch_size = 32 if args.batch_size is None else args.batch_size

    from ..worker.models import build_model  # noqa: PLC0415
    from .cluster import connect, cpus_per_process, shard_placement  # noqa: PLC0415

    updater = build_updater(args.updater, args.learning_rate, args.lr_decay)
    data = data_flags.load_data(args, lambda: connect(args.address))  # Parquet/CSV: read on the run's Ray
    try:
        model = build_model(args.model, data.num_features, data.num_classes, hidden=args.hidden)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if args.workers > data.num_train:
        raise UsageError(f"--workers {args.workers} exceeds the {data.num_train} training samples")
    if args.consistency != "ssp" and args.staleness:
        raise UsageError("--staleness applies to --consistency ssp only")
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir (the directory of the run to continue)")

    import ray  # noqa: PLC0415

    from ..server.client import ParameterServer  # noqa: PLC0415
    from ..server.checkpoints.training_run import load_progress, save_progress, shards_dir  # noqa: PLC0415
    from ..worker.training import train  # noqa: PLC0415

    connect(args.address)
    per_shard, per_worker = cpus_per_process(args, ray)
    server_options = dict(num_shards=args.shards, consistency=args.consistency, staleness=args.staleness,
                          num_workers=args.workers, cpus_per_shard=per_shard, sync_timeout=args.sync_timeout,
                          compression=args.compression, encrypt=args.encrypt, data_ports=args.data_ports,
                          flush_denormals=not args.keep_subnormals)
    first_epoch, on_epoch_end = 0, None
    if args.checkpoint_dir:
        server_options.update(checkpoint_dir=shards_dir(args.checkpoint_dir),
                              checkpoint_every=args.checkpoint_every)
        on_epoch_end = lambda epoch, server: save_progress(args.checkpoint_dir, epoch, server)  # noqa: E731
    resume = None
    if args.resume:
        try:
            resume = load_progress(args.checkpoint_dir)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from None
        if resume is None:  # killed before its first epoch finished: nothing to continue (an orchestrator that
            print(f"rayps train: --resume: no finished epoch in {args.checkpoint_dir}; starting the run afresh",
                  file=sys.stderr)  # always passes --resume, e.g. a retried RayJob, gets a run)
        else:
            first_epoch, run_dir = resume[0] + 1, resume[1]
    if resume is not None:
        if first_epoch >= args.epochs:
            raise UsageError(f"--resume: the run in {args.checkpoint_dir} already finished {first_epoch} epochs "
                             f"(--epochs {args.epochs})")
    placement = shard_placement(args, per_shard, per_worker)  # shards: one placement-group bundle each
    server_options["placement"] = placement
    try:
        if resume is not None:
            ps = ParameterServer.restore(run_dir, **server_options)
            print(f"rayps train: resuming from {run_dir} at epoch {first_epoch + 1}", file=sys.stderr)
        else:
            params = model.init_params(seed=args.seed, dtype=np.float32)
            ps = ParameterServer(params, updater=updater, **server_options)
    except BaseException:
        placement.remove()
        raise
    started = time.perf_counter()
    try:
        say_fitted(args)
        print(f"rayps train: {args.model} {model!r} on {data.name} ({data.num_train} train / {data.num_test} test), "
              f"{type(updater).__name__}, {args.workers} workers x {args.shards} shards, {args.consistency}"
              f"{', prefetch' if args.prefetch else ''}",
              file=sys.stderr)
        result = train(ps, model, data, num_workers=args.workers, epochs=args.epochs, batch_size=args.batch_size,
                       seed=args.seed, n_fetch=args.n_fetch, n_push=args.n_push, prefetch=args.prefetch,
                       cpus_per_worker=per_worker,
                       progress=None if args.quiet else ProgressBar(), first_epoch=first_epoch,
                       on_epoch_end=on_epoch_end, placement=placement)
    finally:
        ps.shutdown()
        placement.remove()
    print(summary_table(finish_result(result, args, updater, started)))
    write_result(result, args.json_out)
    return 0


def finish_result(result: dict, args, updater, started: float) -> dict:
    """The CLI's fields (``CLI_FIELDS``, README "The result of a run") added to a run's result, in place."""
    result.update(updater=type(updater).__name__, prefetch=bool(getattr(args, "prefetch", False)),
                  compression=args.compression, total_seconds=time.perf_counter() - started)
    return result


def write_result(result: dict, json_out: str | None) -> None:
    """``--json-out``: the result as JSON (its directory made as needed)."""
    if json_out:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
        with open(json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
