"""``rayps train --dataset synthetic-ctr``: the CTR workload (worker/ctr_training.py) behind the train command.

Synthetic click data with power-law feature ids from a known logistic ground truth (worker/ctr.py), an
embedding-bag logistic model whose table ``emb`` (``--table-rows`` x ``--embedding-dim``, default 2,000,000 x 16)
is a row-sparse parameter: a ``RowTable`` spec with ``HashedUniformInit``, so neither the driver, the workers nor
the shards ever build the table; workers pull the rows of each batch and push dense + row grads in one push.
Reports test AUC and logloss. Defaults differ from digits where the workload asks for it: 1 epoch (a second
one overfits the rare ids) and batches of 256.

At scale: ``--id-space N`` hashes the feature ids over a table of N rows (up to 10^9 and more; nothing is
materialized), ``--admission count:K`` (a row gets storage after K pushes) or ``prob:P`` (a fixed fraction P
of the ids trains), ``--eviction lru:N`` / ``lfu:N`` (at most N stored rows over all shards) or ``ttl:S`` (rows
idle for more than S pushes of their shard are dropped); server/row_policies.py has the semantics.
"""

from __future__ import annotations

import sys
import time

from .cli import UsageError

CTR_DEFAULTS = {"epochs": 1, "batch_size": 256, "table_rows": 2_000_000}
MAX_ID_SPACE = 1 << 40


def parse_admission(text: str):
    """``count:K`` -> ``CountAdmission(K)``, ``prob:P`` -> ``ProbabilityAdmission(P)`` (argparse type)."""
    from ..server.row_policies import CountAdmission, ProbabilityAdmission  # noqa: PLC0415

    return _policy(text, "--admission", "count:K (K >= 1) or prob:P (0 < P <= 1)",
                   {"count": (int, CountAdmission), "prob": (float, ProbabilityAdmission)})


def parse_eviction(text: str):
    """``lru:N`` / ``lfu:N`` (a cap of N rows) or ``ttl:S`` (idle pushes) -> the policy (argparse type)."""
    from ..server.row_policies import LFUEviction, LRUEviction, TTLEviction  # noqa: PLC0415

    return _policy(text, "--eviction", "lru:N, lfu:N (N rows >= 1) or ttl:S (S pushes >= 1)",
                   {"lru": (int, LRUEviction), "lfu": (int, LFUEviction), "ttl": (int, TTLEviction)})


def _policy(text: str, flag: str, expected: str, kinds: dict):
    import argparse  # noqa: PLC0415

    kind, _, value = str(text).partition(":")
    if kind not in kinds or not value:
        raise argparse.ArgumentTypeError(f"{flag}: expected {expected}, got {text!r}")
    number, make = kinds[kind]
    try:
        parsed = number(float(value)) if number is int and value.replace("e", "", 1).isdigit() else number(value)
        return make(parsed)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{flag} {text}: {str(error).split(': ', 1)[-1]}") from None


def _id_space(text: str) -> int:
    import argparse  # noqa: PLC0415

    try:
        value = int(float(text)) if text.replace("e", "", 1).isdigit() else int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_ID_SPACE:
        raise argparse.ArgumentTypeError(f"--id-space: expected an integer in [1, 2^40] (e.g. 1e9), got {text!r}")
    return value


def add_arguments(parser, _positive_int, _positive_float) -> None:
    """The CTR flags of ``rayps train`` (used with ``--dataset synthetic-ctr`` only); the value checkers are the
    train command's."""
    parser.add_argument("--table-rows", type=_positive_int, default=None,
                        help="synthetic-ctr: rows of the embedding table (default 2,000,000; never materialized)")
    parser.add_argument("--id-space", type=_id_space, default=None,
                        help="synthetic-ctr: hash the feature ids over N table rows (e.g. 1e9; never materialized)")
    parser.add_argument("--admission", type=parse_admission, default=None,
                        help="synthetic-ctr: count:K (a row is stored after K pushes) or prob:P")
    parser.add_argument("--eviction", type=parse_eviction, default=None,
                        help="synthetic-ctr: lru:N or lfu:N (at most N stored rows, all shards) or ttl:S (idle pushes)")
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
                      f"stored)"),
            ("admitted / evicted", f"{result.get('table_admitted', 0):,} / {result.get('table_evicted', 0):,}"),
            ("dropped row gradients", f"{result.get('table_dropped_gradients', 0):,}"),
            ("compression", str(result.get("compression", "none"))),
            ("bytes pushed", f"{result['bytes_pushed']:,}"), ("bytes pulled", f"{result['bytes_pulled']:,}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_ctr(args) -> int:
    from .train_command import ProgressBar, build_updater, finish_result, say_fitted, write_result  # noqa: PLC0415

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
    if args.id_space is not None and args.table_rows is not None:
        raise UsageError("--id-space and --table-rows both size the table: give one")
    table_rows = args.id_space or args.table_rows or CTR_DEFAULTS["table_rows"]

    from ..worker.ctr import EmbeddingBagLogistic, synthetic_ctr  # noqa: PLC0415

    try:
        data = synthetic_ctr(args.ctr_samples, num_fields=args.ctr_fields, table_rows=table_rows,
                             dim=args.embedding_dim, alpha=args.ctr_alpha, seed=args.seed,
                             hashed=args.id_space is not None)
        model = EmbeddingBagLogistic(table_rows, args.embedding_dim, args.ctr_fields)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.workers > data.num_train:
        raise UsageError(f"--workers {args.workers} exceeds the {data.num_train} training samples")
    if args.eviction is not None and getattr(args.eviction, "max_rows", args.shards) < args.shards:
        raise UsageError(f"--eviction: {args.eviction.max_rows} rows cannot be split over {args.shards} shards "
                         f"(at least one row per shard)")

    import ray  # noqa: PLC0415

    from ..server.client import ParameterServer  # noqa: PLC0415
    from ..worker.ctr_training import ctr_params, train_ctr  # noqa: PLC0415
    from .cluster import connect, cpus_per_process, shard_placement  # noqa: PLC0415

    connect(args.address)
    per_shard, per_worker = cpus_per_process(args, ray)
    placement = shard_placement(args, per_shard, per_worker)
    params, sparse = ctr_params(model, seed=args.seed, admission=args.admission, eviction=args.eviction)
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
    print(summary_table(finish_result(result, args, updater, started)))
    write_result(result, args.json_out)
    return 0
