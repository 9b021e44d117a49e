"""``rayps train --dataset synthetic-ctr``: the CTR workload (worker/ctr_training.py) behind the train command.

Synthetic click data with power-law feature ids from a known logistic ground truth (worker/ctr.py), an
embedding-bag logistic model whose table ``emb`` (``--table-rows`` x ``--embedding-dim``, default 2,000,000 x 16)
is a row-sparse parameter: a ``RowTable`` spec with ``HashedUniformInit``, so neither the driver, the workers nor
the shards ever build the table; workers pull the rows of each batch and push dense + row grads in one push.
Reports test AUC and logloss. Defaults differ from digits where the workload asks for it: 1 epoch (a second
one overfits the rare ids) and batches of 256.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .cli import UsageError

CTR_DEFAULTS = {"epochs": 1, "batch_size": 256}


def add_arguments(parser, _positive_int, _positive_float) -> None:
    """The CTR flags of ``rayps train`` (used with ``--dataset synthetic-ctr`` only); the value checkers are the
    train command's."""
    parser.add_argument("--table-rows", type=_positive_int, default=2_000_000,
                        help="synthetic-ctr: rows of the embedding table (default 2,000,000; never materialized)")
    parser.add_argument("--embedding-dim", type=_positive_int, default=16, help="synthetic-ctr: embedding dim")
    parser.add_argument("--ctr-samples", type=_positive_int, default=200_000,
                        help="synthetic-ctr: samples generated (20%% held out for the test; default 200,000)")
    parser.add_argument("--ctr-fields", type=_positive_int, default=8, help="synthetic-ctr: categorical fields")
    parser.add_argument("--ctr-alpha", type=_positive_float, default=1.1,
                        help="synthetic-ctr: power-law exponent of the feature ids (default 1.1)")


def summary_table(result: dict) -> str:
    rows = [("test AUC", f"{result['test_auc']:.4f}"), ("test logloss", f"{result['test_logloss']:.4f}"),
            ("final train loss", f"{result['final_loss']:.4f}"), ("samples/s", f"{result['samples_per_second']:,.0f}"),
            ("wall seconds", f"{result['wall_seconds']:.1f}"), ("updates applied", str(result["updates_applied"])),
            ("workers x shards", f"{result['workers']} x {result['shards']}"),
            ("consistency", str(result["consistency"])), ("max staleness", str(result["max_staleness"])),
            ("table", f"{result['table_rows']:,} x {result['embedding_dim']} ({result['rows_touched']:,} rows "
                      f"touched)"),
            ("compression", str(result.get("compression", "none"))),
            ("bytes pushed", f"{result['bytes_pushed']:,}"), ("bytes pulled", f"{result['bytes_pulled']:,}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_ctr(args) -> int:
    from .train_command import ProgressBar, _placement, _resources, build_updater  # noqa: PLC0415

    for flag, value, default in (("--data", args.data, None), ("--resume", args.resume, False),
                                 ("--checkpoint-dir", args.checkpoint_dir, None)):
        if value != default:
            raise UsageError(f"{flag} is not supported with --dataset synthetic-ctr")
    if args.n_fetch != 1 or args.n_push != 1:
        raise UsageError("--n-fetch/--n-push: the synthetic-ctr workers pull and push every step")
    if args.consistency != "ssp" and args.staleness:
        raise UsageError("--staleness applies to --consistency ssp only")
    epochs = CTR_DEFAULTS["epochs"] if args.epochs is None else args.epochs
    batch_size = CTR_DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size
    updater = build_updater(args.updater, args.learning_rate, getattr(args, "lr_decay", 1.0))

    from ..worker.ctr import EmbeddingBagLogistic, synthetic_ctr  # noqa: PLC0415

    try:
        data = synthetic_ctr(args.ctr_samples, num_fields=args.ctr_fields, table_rows=args.table_rows,
                             dim=args.embedding_dim, alpha=args.ctr_alpha, seed=args.seed)
        model = EmbeddingBagLogistic(args.table_rows, args.embedding_dim, args.ctr_fields)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.workers > data.num_train:
        raise UsageError(f"--workers {args.workers} exceeds the {data.num_train} training samples")

    import ray  # noqa: PLC0415

    from ..server.client import ParameterServer  # noqa: PLC0415
    from ..worker.ctr_training import ctr_params, train_ctr  # noqa: PLC0415
    from .cluster import connect  # noqa: PLC0415

    connect(args.address)
    per_shard, per_worker = _resources(args, ray)
    placement = _placement(args, per_shard, per_worker)
    params, sparse = ctr_params(model, seed=args.seed)
    try:
        ps = ParameterServer(params, updater=updater, sparse=sparse, num_shards=args.shards,
                             consistency=args.consistency, staleness=args.staleness, num_workers=args.workers,
                             cpus_per_shard=per_shard, sync_timeout=args.sync_timeout, placement=placement,
                             compression=args.compression, encrypt=args.encrypt, data_ports=args.data_ports)
    except BaseException:
        placement.remove()
        raise
    started = time.perf_counter()
    try:
        from .train_command import say_fitted  # noqa: PLC0415

        say_fitted(args)
        print(f"rayps train: {model!r} on {data.name} ({data.num_train} train / {data.num_test} test), "
              f"{type(updater).__name__}, {args.workers} workers x {args.shards} shards, {args.consistency}, "
              f"compression {args.compression}", file=sys.stderr)
        result = train_ctr(ps, model, data, num_workers=args.workers, epochs=epochs, batch_size=batch_size,
                           seed=args.seed, cpus_per_worker=per_worker,
                           progress=None if args.quiet else ProgressBar(), placement=placement)
    finally:
        ps.shutdown()
        placement.remove()
    result.update(updater=type(updater).__name__, compression=args.compression,
                  total_seconds=time.perf_counter() - started)
    print(summary_table(result))
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0
