"""Transport: rayps push+apply / pull against a bare Ray actor moving the same bytes, same run.

For every message size (1 KB .. 64 MB, powers of 4) and shard count (1, 2, 4):

* rayps: ``ParameterServer({"w": float32[n]}, updater=Sgd, num_shards=k)`` — Sgd is the cheapest rule, so
  the figures measure transport plus the smallest possible apply;
* bare: ``k`` plain Ray actors whose ``push(array)`` does nothing and whose ``pull()`` returns a stored array;
  the message is split into the same ``k`` parts (one per actor), so both move the same bytes to the same
  number of processes.

Four modes, each the median over ``--repeats`` repeats of a batch of messages:

* ``push pipelined``: ``ps.push`` x m then ``ps.flush()`` (bare: the same calls with the same bound of
  in-flight calls per actor, ``DEFAULT_MAX_IN_FLIGHT``, then ``ray.get``);
* ``push sync``: one push and wait for its acknowledgement (``ps.push; ps.flush()`` / ``ray.get``);
* ``pull``: ``ps.pull()`` / ``ray.get([a.pull.remote() ...])`` (bare keeps Ray's read-only zero-copy views);
* ``push_pull``: ``ps.push_pull`` (the worker step) / a bare ``push_pull(array)`` that returns the stored array.

Small messages are reported in messages/s, large ones in GB/s; the ratio column is rayps/bare *time*
(1.0 = as fast as bare Ray; the issue's targets: 64 MB over 2 shards <= 1.3, small pushes >= 0.8x the call
rate, i.e. a time ratio <= 1.25).

    python benchmarks/transport.py            # full run, writes docs/benchmarks/transport.{json,png}
    python benchmarks/transport.py --quick    # a short run (fewer sizes and repeats)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FIGURE_DIR, human_bytes, machine, median, plot_transport, start_ray, table, write_json  # noqa: E402

from rayps.server.client import DEFAULT_MAX_IN_FLIGHT, ParameterServer  # noqa: E402
from rayps.updaters import Sgd  # noqa: E402

SIZES = [1024 * 4 ** i for i in range(9)]  # 1 KB .. 64 MB
QUICK_SIZES = [1024, 16 * 1024, 1024 ** 2, 16 * 1024 ** 2, 64 * 1024 ** 2]
SHARDS = (1, 2, 4)
SMALL = 64 * 1024  # at or below: report messages/s; above: GB/s
MODES = ("push_pipelined_s", "push_sync_s", "pull_s", "push_pull_s")


@ray.remote
class BareSink:
    """The floor: receives an array and does nothing; returns a stored array on pull."""

    def __init__(self, size: int):
        self.array = np.zeros(size, dtype=np.float32)

    def push(self, array) -> None:
        return None

    def pull(self):
        return self.array

    def push_pull(self, array):
        return self.array

    def ping(self) -> int:
        return 0


class Bare:
    """k ``SINK`` actors (``BareSink``) driven like a ``ParameterServer`` (same in-flight bound)."""

    SINK = BareSink
    SINK_OPTIONS: dict = {}

    def __init__(self, num_actors: int, num_elements: int, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT):
        self.bounds = np.linspace(0, num_elements, num_actors + 1).round().astype(int)
        self.actors = [self.SINK.options(num_cpus=0, **self.SINK_OPTIONS).remote(int(b - a))
                       for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        self.max_in_flight = max_in_flight
        self.in_flight = [collections.deque() for _ in self.actors]
        ray.get([a.ping.remote() for a in self.actors])

    def parts(self, array):
        return [array[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def push(self, array) -> None:
        for actor, queue, part in zip(self.actors, self.in_flight, self.parts(array)):
            while len(queue) >= self.max_in_flight:
                ray.get(queue.popleft())
            queue.append(actor.push.remote(part))

    def flush(self) -> None:
        refs = [r for q in self.in_flight for r in q]
        for q in self.in_flight:
            q.clear()
        ray.get(refs)

    def pull(self):
        return ray.get([a.pull.remote() for a in self.actors])

    def push_pull(self, array):
        return ray.get([a.push_pull.remote(p) for a, p in zip(self.actors, self.parts(array))])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


class Rayps:
    """The system under test behind the same four calls."""

    def __init__(self, num_shards: int, num_elements: int):
        self.ps = ParameterServer({"w": np.zeros(num_elements, dtype=np.float32)}, updater=Sgd(learning_rate=1e-6),
                                  num_shards=num_shards, consistency="async", num_workers=1)

    def push(self, array) -> None:
        self.ps.push({"w": array})

    def flush(self) -> None:
        self.ps.flush()

    def pull(self):
        return self.ps.pull()

    def push_pull(self, array):
        return self.ps.push_pull({"w": array})

    def shutdown(self) -> None:
        self.ps.shutdown()


# -- experiments: other floors (an async actor; bare Ray plus the update kernel) ------------------------------
@ray.remote
class BareAsyncSink(BareSink.__ray_actor_class__):
    """The floor as an *async* actor (rayps' ShardActor is one): isolates asyncio's per-call cost."""

    async def push(self, array) -> None:
        return None

    async def pull(self):
        return self.array.copy()

    async def push_pull(self, array):
        return self.array.copy()


class BareAsync(Bare):
    SINK = BareAsyncSink
    SINK_OPTIONS = {"max_concurrency": 1000}


@ray.remote
class BareApplySink(BareSink.__ray_actor_class__):
    """The floor of push+apply: receives its part and runs the same fused Sgd kernel on it, in place, on one
    numba thread (as a rayps shard with <= 1 CPU does), with no check and no bookkeeping. What no parameter
    server that applies the update can beat: bare Ray's copy plus the kernel's own memory traffic."""

    def __init__(self, size: int):
        super().__init__(size)
        self.updater = Sgd(learning_rate=1e-6)
        self.state = self.updater.init(self.array)
        self.iteration = 0
        self.pinned = None

    def push(self, array) -> None:
        if self.pinned != threading.get_ident():  # numba's pool size is per calling thread
            import numba  # noqa: PLC0415

            numba.set_num_threads(1)
            self.pinned = threading.get_ident()
        self.updater.apply(self.array, array, self.state, self.iteration, kernel="fused")
        self.iteration += 1


class BareApply(Bare):
    SINK = BareApplySink


EXPERIMENT_SIZES = [1024, 64 * 1024, 1024 ** 2, 16 * 1024 ** 2, 64 * 1024 ** 2]
EXPERIMENT_SYSTEMS = {"bare": Bare, "bare_async": BareAsync, "bare_apply": BareApply, "rayps": Rayps}


def measure_experiment(nbytes: int, shards: int, repeats: int, quick: bool) -> dict:
    n = nbytes // 4
    grad = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    m = messages_per_repeat(nbytes, quick)
    systems = {name: factory(shards, n) for name, factory in EXPERIMENT_SYSTEMS.items()}
    for system in systems.values():
        time_modes(system, grad, min(m, 5))  # warm-up (kernel JIT/cache load, worker imports)
    row = {"bytes": nbytes, "shards": shards}
    row.update(time_systems(systems, grad, m, repeats, warm_up=False))
    return row


def experiment_report(rows: list[dict]) -> str:
    body = []
    for r in rows:
        for mode in MODES:
            body.append([human_bytes(r["bytes"]), r["shards"], mode[:-2], rate(r["bytes"], r["bare"][mode])]
                        + [r[name][mode] / r["bare"][mode] if name in r else float("nan")
                           for name in ("bare_async", "bare_apply", "rayps")])
    return table(["size", "shards", "mode", "bare (sync actor)", "bare async actor / bare",
                  "bare + Sgd kernel / bare", "rayps / bare"], body,
                 title="### experiments: time ratios vs the bare sync actor (lower is better), same run")


def profile_push(out_dir: str, nbytes: int, shards: int, seconds: int) -> None:
    """py-spy (CPU samples) on the driver and every shard while the driver pushes ``nbytes`` messages."""
    from common import pyspy_summary  # noqa: PLC0415
    from end_to_end import attach_pyspy  # noqa: PLC0415

    system = Rayps(shards, nbytes // 4)
    grad = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    time_modes(system, grad, 5)
    go = threading.Event()
    thread = attach_pyspy(out_dir, seconds, go, {"ShardActor": shards})
    go.set()
    time.sleep(1.0)
    pushes, started = 0, time.perf_counter()
    while thread.is_alive():
        system.push(grad)
        pushes += 1
    system.flush()
    system.shutdown()
    print(f"{pushes / (time.perf_counter() - started):,.1f} pushes/s while profiling")
    for name in sorted(os.listdir(out_dir)):
        print(pyspy_summary(os.path.join(out_dir, name)))


def messages_per_repeat(nbytes: int, quick: bool) -> int:
    budget = (48 if quick else 96) * 1024 ** 2  # bytes per timed batch
    cap = 30 if quick else 60
    return int(max(3, min(cap, budget // nbytes)))


def time_modes(system, grad: np.ndarray, m: int) -> dict[str, float]:
    """Seconds per message for each mode, one batch of ``m`` messages each."""
    out = {}
    started = time.perf_counter()
    for _ in range(m):
        system.push(grad)
    system.flush()
    out["push_pipelined_s"] = (time.perf_counter() - started) / m
    started = time.perf_counter()
    for _ in range(m):
        system.push(grad)
        system.flush()
    out["push_sync_s"] = (time.perf_counter() - started) / m
    started = time.perf_counter()
    for _ in range(m):
        system.pull()
    out["pull_s"] = (time.perf_counter() - started) / m
    started = time.perf_counter()
    for _ in range(m):
        system.push_pull(grad)
    out["push_pull_s"] = (time.perf_counter() - started) / m
    return out


def time_systems(systems: dict, grad: np.ndarray, m: int, repeats: int, warm_up: bool) -> dict:
    """name -> mode -> median seconds per message; the systems alternate repeat by repeat (same load for all),
    and are shut down at the end."""
    samples = {name: {mode: [] for mode in MODES} for name in systems}
    try:
        if warm_up:  # JIT of the update kernel, worker imports, caches
            for system in systems.values():
                time_modes(system, grad, min(m, 5))
        for _ in range(repeats):
            for name, system in systems.items():
                for mode, seconds in time_modes(system, grad, m).items():
                    samples[name][mode].append(seconds)
    finally:
        for system in systems.values():
            system.shutdown()
    return {name: {mode: median(values) for mode, values in samples[name].items()} for name in systems}


def measure(nbytes: int, shards: int, repeats: int, quick: bool, rayps_factory=Rayps) -> dict:
    """Bare and rayps for one (size, shards): repeats alternate between the two systems."""
    n = nbytes // 4
    grad = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    m = messages_per_repeat(nbytes, quick)
    systems = {"bare": Bare(shards, n), "rayps": rayps_factory(shards, n)}
    row = {"bytes": nbytes, "shards": shards, "messages_per_repeat": m}
    row.update(time_systems(systems, grad, m, repeats, warm_up=True))
    return row


def rate(nbytes: int, seconds: float) -> str:
    if nbytes <= SMALL:
        return f"{1 / seconds:,.0f}/s"
    return f"{nbytes / seconds / 1e9:.3g} GB/s"


def report(rows: list[dict], label: str = "rayps") -> str:
    blocks = []
    titles = {"push_pipelined_s": "push + apply, pipelined (push x m, flush)",
              "push_sync_s": "push + apply, synchronous round trip (push, flush)",
              "pull_s": "pull (full parameters)",
              "push_pull_s": "push_pull (the worker step: push, then pull, one call per shard)"}
    for mode in MODES:
        body = []
        for size in sorted({r["bytes"] for r in rows}):
            line = [human_bytes(size)]
            for shards in SHARDS:
                r = next((r for r in rows if r["bytes"] == size and r["shards"] == shards), None)
                if r is None:
                    line += ["-", "-", "-"]
                    continue
                line += [rate(size, r[label][mode]), rate(size, r["bare"][mode]), r[label][mode] / r["bare"][mode]]
            body.append(line)
        headers = ["size"]
        for shards in SHARDS:
            headers += [f"{label} {shards}sh", f"bare {shards}sh", f"time ratio {shards}sh"]
        blocks.append(table(headers, body, title=f"### {titles[mode]} — {label} vs bare Ray (ratio: {label} time / "
                                                 f"bare time, lower is better)"))
    return "\n".join(blocks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed batches per system (default 5; quick 3)")
    parser.add_argument("--shards", default=None, help="comma list of shard counts (default 1,2,4)")
    parser.add_argument("--sizes", default=None, help="comma list of message sizes in bytes")
    parser.add_argument("--json-out", default=os.path.join(FIGURE_DIR, "transport.json"))
    parser.add_argument("--png-out", default=os.path.join(FIGURE_DIR, "transport.png"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--pyspy", default=None, metavar="DIR",
                        help="instead: py-spy the driver and shards pushing the first --sizes size over the "
                             "first --shards count for 15 s")
    parser.add_argument("--experiments", action="store_true",
                        help="instead: bare sync actor vs bare async actor vs bare + the Sgd kernel (the floor "
                             "of push+apply) vs rayps")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    shard_counts = tuple(int(s) for s in args.shards.split(",")) if args.shards else SHARDS
    start_ray()
    if args.pyspy:
        profile_push(args.pyspy, sizes[0], shard_counts[0], 15)
        return 0
    if args.experiments:
        rows = []
        for shards in (tuple(int(s) for s in args.shards.split(",")) if args.shards else (2,)):
            for nbytes in ([int(s) for s in args.sizes.split(",")] if args.sizes else EXPERIMENT_SIZES):
                started = time.perf_counter()
                rows.append(measure_experiment(nbytes, shards, repeats, args.quick))
                print(f"  {human_bytes(nbytes):>6} x {shards} shard(s) [{time.perf_counter() - started:.0f} s]",
                      flush=True)
        print(experiment_report(rows))
        write_json(args.json_out.replace("transport.json", "transport_experiments.json"),
                   {"machine": machine(), "repeats": repeats, "rows": rows})
        return 0
    rows = []
    for shards in shard_counts:
        for nbytes in sizes:
            started = time.perf_counter()
            row = measure(nbytes, shards, repeats, args.quick)
            rows.append(row)
            print(f"  {human_bytes(nbytes):>6} x {shards} shard(s) [{time.perf_counter() - started:.0f} s]: "
                  + ", ".join(f"{mode[:-2]} {row['rayps'][mode] / row['bare'][mode]:.2f}x" for mode in MODES),
                  flush=True)
    results = {"machine": machine(), "repeats": repeats, "quick": args.quick, "rows": rows}
    print(report(rows))
    write_json(args.json_out, results)
    if not args.no_plot:
        plot_transport(results, args.png_out)
        print(f"\nwrote {args.json_out} and {args.png_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
