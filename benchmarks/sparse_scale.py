"""Embedding tables at production scale (issue 12), measured through the Ray server (2 shards) in one run.

1. **Memory under a cap.** Pushes of uniformly random ids from a 10^8-id space (every id new: the worst case for
   a cap) into ``RowTable(10^8, 16, eviction=LRUEviction(CAP))`` with Adam, until the ids pushed are twice the
   cap; the same stream into an uncapped table. Peak resident memory of each shard process (polled /proc RSS
   every 50 ms) above its RSS after one warm-up batch: what is fixed per process and not per row (numba
   compiling the row kernels, the allocator's first arenas, Ray's worker) is in that baseline and excluded.
   Checked against the documented bound ``RowTable.shard_memory`` (docs/sparse.md, "Memory under a cap"):
   ``cap x (values + state)`` plus bookkeeping, index, eviction log and scratch. The baseline already holds
   the index (``np.full`` writes every cell at construction) and the warm-up batch's rows, so the measured
   figure a shard is held to is its peak growth + its index bytes + the warm-up rows' bytes.
2. **AUC and samples/s per policy.** The CTR workload (``train_ctr``, 2 workers x 2 shards, 1 epoch, Adam) on
   ids hashed over an id space where the uncapped table fits; LRU / LFU at half the rows the uncapped run
   stores, TTL, count and probability admission, each against no policy, test AUC and training samples/s.
3. **Checkpoint bytes.** On the capped table of part 1: a full save, then a save after pushing 0.1 %, 1 % and
   10 % of the cap's rows: the bytes of each delta file against the full table's.

    python benchmarks/sparse.py --scale            # writes docs/benchmarks/sparse_scale.json
    python benchmarks/sparse.py --scale --quick    # a 10^5-row cap, smaller CTR data
    python benchmarks/sparse.py --scale --memory-only   # part 1 alone (the JSON keeps parts 2 and 3)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import numpy as np

from common import human_bytes, read_json, table, write_json

ID_SPACE, DIM, BATCH, SHARDS = 10**8, 16, 8192, 2
JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks", "sparse_scale.json")


def _raylet_pid() -> int | None:
    """This driver's raylet (the parent of its workers), so another session's Ray on the machine is left out."""
    import ray  # noqa: PLC0415

    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - no public API gives the pid
    raylets = node.all_processes.get("raylet", []) if node is not None else []
    return raylets[0].process.pid if raylets else None


def _shard_pids() -> list[int]:
    """The shard processes of THIS driver's Ray (children of its raylet named ray::ShardActor...)."""
    raylet, pids = _raylet_pid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if not handle.read().startswith(b"ray::ShardActor"):
                        continue
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if raylet is None or parent == raylet:
                pids.append(int(entry))
    return sorted(pids)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the process is gone
        pass
    return 0


class PeakRss:
    """Polls the resident memory of the shard processes every 50 ms; ``peak`` per pid."""

    def __init__(self, pids):
        self.pids, self.peak, self.stop = pids, dict.fromkeys(pids, 0), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.stop.wait(0.05):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], _rss(pid))

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        return self.peak


def memory_under_cap(cap: int | None, total_ids: int, ps_out: list | None = None) -> dict:
    from rayps.server import HashedUniformInit, LRUEviction, ParameterServer, RowTable
    from rayps.updaters import Adam

    deadline = time.monotonic() + 30
    while _shard_pids() and time.monotonic() < deadline:  # the previous server's shard processes exit first
        time.sleep(0.2)
    eviction = None if cap is None else LRUEviction(cap)
    table = RowTable(ID_SPACE, DIM, initial=HashedUniformInit(DIM, 0.05), eviction=eviction)
    ps = ParameterServer({"emb": table, "b": np.zeros(1, np.float32)}, sparse=["emb"], updater=Adam(0.01),
                         num_shards=SHARDS)
    pids = _shard_pids()
    rng = np.random.default_rng(0)
    # one batch first: numba compiles the row kernels and the allocator warms up (a fixed cost per process,
    # not per row); the growth is measured from here
    ps.push_rows("emb", rng.integers(0, ID_SPACE, BATCH), rng.standard_normal((BATCH, DIM)).astype(np.float32))
    warm_rows = max(s["rows"] for s in ps.table_stats("emb")["shards"])
    baseline = {pid: _rss(pid) for pid in pids}
    poll = PeakRss(pids)
    started = time.perf_counter()
    for _ in range(total_ids // BATCH):
        ps.push_rows("emb", rng.integers(0, ID_SPACE, BATCH), rng.standard_normal((BATCH, DIM)).astype(np.float32))
    ps.flush()
    seconds = time.perf_counter() - started
    peak = poll.close()
    stats = ps.table_stats("emb")
    row_bytes = DIM * 4 * 3  # values + Adam's m and v, float32
    growth = {pid: peak[pid] - baseline[pid] for pid in pids}
    out = {"cap": cap, "ids_pushed": total_ids // BATCH * BATCH, "rows": stats["rows"], "evicted": stats["evicted"],
           "rows_per_shard": [s["rows"] for s in stats["shards"]], "table_bytes": stats["bytes"],
           "cap_bytes": None if cap is None else cap * row_bytes,
           "peak_rss_growth": int(sum(growth.values())), "peak_rss_growth_per_shard": sorted(growth.values()),
           "peak_rss": int(sum(peak.values())), "push_seconds": seconds, "row_bytes": row_bytes}
    if cap is not None:
        bound = table.shard_memory(SHARDS, Adam(0.01), op_rows=BATCH)  # a push's ids may all go to one shard
        log_bytes = max(8 * s["evicted"] for s in stats["shards"])  # at most the log limit
        held = {pid: growth[pid] + bound["index"] + warm_rows * (row_bytes + bound["bookkeeping"] // bound["cap"])
                for pid in pids}
        out.update(bound=bound, warm_rows_per_shard=warm_rows, shard_measured=sorted(held.values()),
                   eviction_log_bytes_used=min(log_bytes, bound["eviction_log"]),
                   holds=all(v <= bound["bound"] for v in held.values()))
    if ps_out is not None:
        ps_out.append(ps)
    else:
        ps.shutdown()
    print(out, flush=True)
    return out


def checkpoint_bytes(ps, cap: int) -> list[dict]:
    """A full save of the capped table, then a save after touching 0.1 %, 1 %, 10 % of the cap's rows."""
    directory = tempfile.mkdtemp(prefix="rayps-bench-ckpt-")
    try:
        ps.save(directory)
        full = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if "-full-" in f)
        rows = []
        rng = np.random.default_rng(1)
        for share in (0.001, 0.01, 0.1):
            seen = set(os.listdir(directory))
            count = int(cap * share)
            ps.push_rows("emb", rng.integers(0, ID_SPACE, count), rng.standard_normal((count, DIM)).astype(np.float32))
            started = time.perf_counter()
            ps.save(directory)
            seconds = time.perf_counter() - started
            delta = sum(os.path.getsize(os.path.join(directory, f)) for f in set(os.listdir(directory)) - seen
                        if "-delta-" in f)
            rows.append({"rows_touched": count, "share": share, "delta_bytes": delta, "full_bytes": full,
                         "save_seconds": seconds})
            print(rows[-1], flush=True)
        return rows
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ctr_policies(samples: int, id_space: int) -> list[dict]:
    from rayps.server import CountAdmission, LFUEviction, LRUEviction, ParameterServer, ProbabilityAdmission
    from rayps.server import TTLEviction
    from rayps.updaters import Adam
    from rayps.worker.ctr import EmbeddingBagLogistic, synthetic_ctr
    from rayps.worker.ctr_training import ctr_params, train_ctr

    data = synthetic_ctr(samples, table_rows=id_space, dim=DIM, seed=0, hashed=True)
    model = EmbeddingBagLogistic(id_space, DIM, data.num_fields)
    runs, half = [], None

    def run(label, admission=None, eviction=None):
        params, sparse = ctr_params(model, seed=0, admission=admission, eviction=eviction)
        ps = ParameterServer(params, sparse=sparse, updater=Adam(0.005), num_shards=SHARDS, num_workers=2)
        try:
            result = train_ctr(ps, model, data, num_workers=2, epochs=1, batch_size=256)
        finally:
            ps.shutdown()
        runs.append({"run": label, "test_auc": result["test_auc"], "rows": result["rows_touched"],
                     "evicted": result["table_evicted"], "dropped": result["table_dropped_gradients"],
                     "samples_per_second": result["train_samples_per_second"]})
        print(runs[-1], flush=True)
        return result

    half = max(2, run("no policy")["rows_touched"] // 2)
    run(f"lru:{half}", eviction=LRUEviction(half))
    run(f"lfu:{half}", eviction=LFUEviction(half))
    idle = max(1, data.num_train // 256 // 8)  # an eighth of the pushes a shard takes in the epoch
    run(f"ttl:{idle}", eviction=TTLEviction(idle))
    run("count:2", admission=CountAdmission(2))
    run("prob:0.5", admission=ProbabilityAdmission(0.5))
    run("no policy (again, last)")  # the first run is also the session's first CTR run: a second baseline
    return runs


def run(quick: bool, info: dict) -> str:
    cap = 100_000 if quick else 1_000_000
    started = time.perf_counter()
    uncapped = memory_under_cap(None, 2 * cap)
    keep = []
    capped = memory_under_cap(cap, 2 * cap, keep)
    try:
        checkpoints = checkpoint_bytes(keep[0], cap)
    finally:
        keep[0].shutdown()
    samples, id_space = (30_000, 200_000) if quick else (100_000, 1_000_000)
    ctr = ctr_policies(samples, id_space)
    write_json(JSON, {"machine": info, "date": "2026-12-07", "memory": [uncapped, capped],
                      "checkpoints": checkpoints, "ctr": ctr, "ctr_samples": samples, "ctr_id_space": id_space,
                      "seconds": time.perf_counter() - started})
    return report(uncapped, capped, checkpoints, ctr, samples, id_space)


def memory_check(capped: dict) -> str:
    """The criterion per shard: peak RSS growth + index + warm-up rows <= cap x row bytes + documented overhead."""
    bound = capped["bound"]
    rows = [[name, formula, human_bytes(bound[name])] for name, formula in (
        ("rows", "cap x dim x (4 + 2 x 4): values + Adam's m, v"), ("bookkeeping", "cap x 40"),
        ("index", "16 x cells(2 cap + 1)"), ("eviction_log", "8 x max(4 cap, 65536) (at its limit)"),
        ("eviction_scratch", "9 x cap + 33 x op_rows"), ("push_scratch", "op_rows x (64 + 10 x dim x 4)"),
        ("overhead", "all but rows"), ("bound", "rows + overhead"))]
    measured = capped["shard_measured"]
    rows.append(["measured (max shard)", "peak RSS growth + index + warm-up rows", human_bytes(max(measured))])
    verdict = "holds" if capped["holds"] else "does NOT hold"
    return "\n".join([table(["per shard", "formula", "bytes"], rows,
                             title=f"Bound per shard (cap {bound['cap']:,} rows, op_rows {BATCH:,})"),
                       f"each shard: {', '.join(human_bytes(m) for m in measured)} measured <= "
                       f"{human_bytes(bound['bound'])} bound: {verdict} (eviction log in use "
                       f"{human_bytes(capped['eviction_log_bytes_used'])} of {human_bytes(bound['eviction_log'])})"])


def run_memory(quick: bool, info: dict) -> str:
    """Part 1 alone: replaces ``memory`` in the JSON (not for ``quick``) and keeps the other parts' figures."""
    cap = 100_000 if quick else 1_000_000
    uncapped = memory_under_cap(None, 2 * cap)
    capped = memory_under_cap(cap, 2 * cap)
    if not quick:  # a quick run never replaces the full-size figures
        payload = read_json(JSON) if os.path.exists(JSON) else {}
        payload.update(memory=[uncapped, capped], memory_machine=info, memory_date="2026-12-07")
        write_json(JSON, payload)
    return memory_check(capped)


def report(uncapped, capped, checkpoints, ctr, samples, id_space) -> str:
    lines = [table(["table", "rows stored", "evicted", "table bytes in use", "peak RSS growth, 2 shards",
                    "cap x (values + Adam state)"],
                   [["uncapped", f"{uncapped['rows']:,}", 0, human_bytes(uncapped["table_bytes"]),
                     human_bytes(uncapped["peak_rss_growth"]), "-"],
                    [f"LRUEviction({capped['cap']:,})", f"{capped['rows']:,}", f"{capped['evicted']:,}",
                     human_bytes(capped["table_bytes"]), human_bytes(capped["peak_rss_growth"]),
                     human_bytes(capped["cap_bytes"])]],
                   title=f"Memory: {capped['ids_pushed']:,} random ids of a 10^8-id space pushed, dim {DIM}, Adam")]
    lines += ["", memory_check(capped)]
    lines += ["", table(["rows touched", "delta file bytes", "full table bytes", "delta / full"],
                        [[f"{c['rows_touched']:,} ({c['share']:.1%} of the cap)", human_bytes(c["delta_bytes"]),
                          human_bytes(c["full_bytes"]), f"{c['delta_bytes'] / c['full_bytes']:.4f}"]
                         for c in checkpoints], title="Incremental checkpoint bytes (ps.save into the same directory)")]
    base = dict(ctr[0], samples_per_second=(ctr[0]["samples_per_second"] + ctr[-1]["samples_per_second"]) / 2)
    lines += ["", table(["policy", "test AUC", "AUC - no policy", "rows stored", "evicted", "dropped row grads",
                         "train samples/s", "vs no policy"],
                        [[r["run"], f"{r['test_auc']:.4f}", f"{r['test_auc'] - base['test_auc']:+.4f}",
                          f"{r['rows']:,}", f"{r['evicted']:,}", f"{r['dropped']:,}",
                          f"{r['samples_per_second']:,.0f}",
                          f"{r['samples_per_second'] / base['samples_per_second']:.2f}x"] for r in ctr],

                        title=f"CTR workload: {samples:,} samples, ids hashed over {id_space:,} rows, 2 workers x "
                              f"2 shards, 1 epoch, batch 256, Adam 0.005")]
    return "\n".join(lines)
