"""End to end: ``rayps train`` against the textbook Ray parameter server, same run, same Ray.

Same data (digits, seed 0), model (``build_model("mlp", hidden=...)``, float32, same initial parameters),
optimizer (Adam at a constant rate: 0.005 — ``rayps train``'s default — for the small model, 0.001 for the wide
one, where 0.005 is unstable in 2 epochs in both systems; ``--learning-rate`` and ``--lr-decay``, e.g. 0.9 as
``rayps train`` defaults to, override), batch size 32, 4 workers, epochs; both evaluate on the test set after
every epoch (inside the timed wall, one forward pass: ``accuracy_and_loss``). Two models:

* small: MLP hidden 128, 20 epochs (9.6 K parameters, 38 KB per message);
* wide:  MLP hidden 2048,2048, 2 epochs (4.35 M parameters, 17.4 MB per message).

Processes on the machine: 4 workers, the textbook's one PS actor or rayps' shards, the driver. Every actor
gets the same Ray CPU share (``min(1, cpus / actors)``, what ``rayps train`` does); NumPy in an actor then runs
on 1 BLAS thread (Ray sets ``OMP_NUM_THREADS`` to an actor's whole CPUs, at least 1) and the update kernels on a
numba pool of the server actor's whole CPUs, at least 1 (rayps' shards and the textbook PS alike). rayps runs
ONE shard for both models here (``--shards``): on 2 cores a second shard adds a Ray call per step and no core to
run it on (the 2-shard row shows it).

Systems (each run ``--repeats`` times, interleaved; medians reported):

* ``textbook sync`` / ``textbook async``: ``benchmarks/textbook_ps.py`` (Ray docs' pattern);
* ``ray floor``: ``benchmarks/ray_floor.py``, the same epochs with one bare actor round trip per step and no
  update (it learns nothing): the ceiling of "pull and push every step" through Ray actor calls;
* ``socket PS``: ``benchmarks/socket_ps.py``, the same epochs with each step's push and pull over a TCP
  socket to one server actor applying rayps' kernel (no Ray call per step; no recovery, no checks): what a
  data plane outside Ray's task path could give;
* ``zmq PS``: the socket PS over pyzmq instead (a ROUTER on a Unix socket served by one thread, DEALER
  workers, one raw frame each way): the floor of a ZeroMQ data plane, which is what rayps' is;
* ``shm PS``: the zmq PS with the arrays in shared memory (one file in ``/dev/shm`` per worker: the gradient
  is written there, the parameters copied there, empty ZeroMQ messages say when): the floor of a same-node
  data plane that moves no array through a socket;
* rayps at the textbook's semantics — pull and push every step (``n_fetch = n_push = 1``: one fused
  ``push_pull`` per shard per step), float32, no prefetch: async and sync (BSP), and async with 2 shards;
* rayps with its knobs: ``prefetch`` (the next gradient computed while the step's call is in flight: one step
  staler; delayed BSP under sync), ``n_fetch`` (pull every k steps, push every step: the same updates),
  ``n_push`` (push the mean of k gradients: k times fewer updates, so the learning rate is scaled — ``lr x s``
  in the label — and said so), ``ssp`` staleness, and bf16/fp16/threshold push encoding (``compression``; pulls
  stay float32). A knob the installed rayps lacks is skipped and listed.

samples/s: "overall" is what ``train()`` reports (samples / wall, actor start-up included); "steady" leaves
out the first epoch (actor start-up, JIT loading): (samples after the last epoch - after the first) / (wall
after the last - after the first). Ratios use steady samples/s against both textbook variants; accuracy points
are against the textbook variant with the same consistency (sync for rayps sync, async for everything else).
The compute ceiling printed with each table is ``batch x cores / (one gradient on one thread)``: no system can
beat it on this machine, whatever it does with the parameters.

    python benchmarks/end_to_end.py --model small --repeats 3
    python benchmarks/end_to_end.py --model wide --repeats 2
    python benchmarks/end_to_end.py --quick      # small model only, fewer epochs, 1 repeat
    python benchmarks/end_to_end.py --list       # the configurations' labels (for --only)
    python benchmarks/end_to_end.py --pyspy DIR --model small   # one rayps run with py-spy on every process
    python benchmarks/end_to_end.py --profile-inprocess DIR     # pyinstrument, worker loop + shard logic, no Ray
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import threading
import time

import numpy as np
import ray
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import attach_pyspy, machine, median, pyspy_summary, start_ray, table, write_json  # noqa: E402
from textbook_ps import train_textbook  # noqa: E402
from ray_floor import train_floor  # noqa: E402
from socket_ps import train_socket_ps  # noqa: E402

from rayps.updaters.by_name import DEFAULT_LEARNING_RATES, build_updater  # noqa: E402
from rayps.server.client import ParameterServer  # noqa: E402
from rayps.worker.data import load_dataset  # noqa: E402
from rayps.worker.models import build_model  # noqa: E402
from rayps.worker.training import train  # noqa: E402

MODELS = {"small": {"hidden": "128", "epochs": 20, "learning_rate": None, "shards": 1},
          "wide": {"hidden": "2048,2048", "epochs": 2, "learning_rate": 0.001, "shards": 1}}
QUICK_EPOCHS = {"small": 5, "wide": 2}

# (label, system, options). rayps options: shards (default: the model's), consistency, staleness, n_fetch,
# n_push, prefetch, compression, lr_scale (x the learning rate; used only with n_push > 1, see the docstring)
TEXTBOOK = [("textbook sync", "textbook", {"mode": "sync"}),
            ("textbook async", "textbook", {"mode": "async"})]
# the ceiling of one bare Ray actor round trip per step (benchmarks/ray_floor.py): samples/s only, it learns nothing
RAY_FLOOR = [("ray floor (1 bare call/step, no update)", "floor", {})]
# a data plane outside Ray's task path (benchmarks/socket_ps.py): TCP frames, rayps' kernel, no recovery
SOCKET_PS = [("socket PS (async, TCP, no recovery)", "socket", {}),
             ("zmq PS (async, ipc, no recovery)", "socket", {"transport": "zmq"}),
             ("shm PS (async, shared memory, no recovery)", "socket", {"transport": "shm"})]
RAYPS_TEXTBOOK_SEMANTICS = [
    ("rayps async", "rayps", {"consistency": "async"}),
    ("rayps sync", "rayps", {"consistency": "sync"}),
    ("rayps async 2sh", "rayps", {"consistency": "async", "shards": 2}),
]
RAYPS_KNOBS = [
    ("rayps async prefetch", "rayps", {"prefetch": True}),
    ("rayps sync prefetch (delayed BSP)", "rayps", {"consistency": "sync", "prefetch": True}),
    ("rayps async bf16", "rayps", {"compression": "bf16"}),
    ("rayps async threshold", "rayps", {"compression": "threshold"}),
    ("rayps async n_fetch=4", "rayps", {"n_fetch": 4}),
    ("rayps async n_fetch=n_push=4", "rayps", {"n_fetch": 4, "n_push": 4}),
    ("rayps async n_fetch=n_push=4 lr x2", "rayps", {"n_fetch": 4, "n_push": 4, "lr_scale": 2.0}),
    ("rayps async n_fetch=n_push=8 lr x2", "rayps", {"n_fetch": 8, "n_push": 8, "lr_scale": 2.0}),
    ("rayps ssp(2) n_fetch=n_push=4", "rayps", {"consistency": "ssp", "staleness": 2, "n_fetch": 4, "n_push": 4}),
]
# knob -> (where the installed rayps must have it, what it is)
KNOBS = {"compression": (lambda: ParameterServer.__init__, "fp16/bf16/threshold push encoding"),
         "prefetch": (lambda: train, "prefetching worker loop (train(prefetch=...))")}


def supported(options: dict) -> bool:
    """Does the installed rayps have every knob these options use?"""
    return all(knob in inspect.signature(where()).parameters for knob, (where, _) in KNOBS.items()
               if knob in options)


def missing_knobs() -> list[str]:
    return [text for knob, (where, text) in KNOBS.items() if knob not in inspect.signature(where()).parameters]


def cpu_share(actors: int) -> float:
    """The Ray CPUs each of ``actors`` actors gets: ``rayps train``'s rule, ``min(1, cpus / actors)``."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    return min(1.0, total / actors) if total else 0.0


def run_rayps(model, data, updater, params, workers: int, epochs: int, batch_size: int, seed: int, shards: int = 1,
              consistency: str = "async", staleness: int = 0, n_fetch: int = 1, n_push: int = 1,
              prefetch: bool = False, compression: str | None = None) -> dict:
    """``rayps train`` in-process: ParameterServer + ``worker.train`` with the CLI's CPU shares."""
    share = cpu_share(shards + workers)
    kwargs = dict(updater=updater, num_shards=shards, consistency=consistency, staleness=staleness,
                  num_workers=workers, cpus_per_shard=share)
    if compression is not None:
        kwargs["compression"] = compression
    ps = ParameterServer(params, **kwargs)
    extra = {"prefetch": True} if prefetch else {}
    try:
        return train(ps, model, data, num_workers=workers, epochs=epochs, batch_size=batch_size, seed=seed,
                     n_fetch=n_fetch, n_push=n_push, cpus_per_worker=share, **extra)
    finally:
        ps.shutdown()


def steady_rate(history: list[dict]) -> float:
    """samples/s after the first epoch (NaN with one epoch)."""
    if len(history) < 2:
        return float("nan")
    first, last = history[0], history[-1]
    s0 = first["samples_per_second"] * first["wall_seconds"]
    s1 = last["samples_per_second"] * last["wall_seconds"]
    return (s1 - s0) / (last["wall_seconds"] - first["wall_seconds"])


def run_one(system: str, options: dict, model, data, updater, params, workers, epochs, batch_size, seed,
            shards: int) -> dict:
    """One run of one system. Every system's driver runs with a 1-thread BLAS, as ``rayps``' epoch driver does
    (worker/epochs.py: an idle OpenBLAS pool spins and takes a core from the actors): the baselines' drivers
    evaluate with NumPy after every epoch too, and the textbook's routes every step, so without the same limit
    the ratio would measure the spinning pool, not the systems."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _run_one(system, options, model, data, updater, params, workers, epochs, batch_size, seed, shards)


def _run_one(system: str, options: dict, model, data, updater, params, workers, epochs, batch_size, seed,
             shards: int) -> dict:
    if system == "textbook":
        result = train_textbook(model, data, updater, workers, epochs, batch_size, seed, mode=options["mode"],
                                params=params)
    elif system == "socket":
        result = train_socket_ps(model, data, updater, params, workers, epochs, batch_size, seed,
                                 cpus_per_actor=cpu_share(workers + 1), transport=options.get("transport", "tcp"))
    elif system == "floor":
        result = train_floor(model, data, params, workers, epochs, batch_size, seed,
                             cpus_per_actor=cpu_share(workers + 1))
    else:
        options = {k: v for k, v in options.items() if k != "lr_scale"}
        options.setdefault("shards", shards)
        result = run_rayps(model, data, updater, params, workers, epochs, batch_size, seed, **options)
    return {"overall": result["samples_per_second"], "steady": steady_rate(result["history"]),
            "accuracy": result["test_accuracy"], "wall": result["wall_seconds"]}


def gradient_ceiling(model, data, params, batch_size: int, cores: int, repeats: int = 5) -> dict:
    """Seconds of one gradient on one BLAS thread (median), and ``batch x cores / that``: the samples/s no PS
    can exceed on this machine."""
    x, y = data.x_train[:batch_size], data.y_train[:batch_size]
    with threadpool_limits(1):
        model.loss_and_grads(params, x, y)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model.loss_and_grads(params, x, y)
            times.append(time.perf_counter() - started)
    seconds = median(times)
    return {"gradient_seconds": seconds, "samples_per_second": batch_size * cores / seconds}


def compare(model_name: str, configs, repeats: int, epochs: int, workers: int, batch_size: int, seed: int,
            updater_name: str, learning_rate, shards: int, lr_decay: float = 1.0) -> list[dict]:
    spec = MODELS[model_name]
    data = load_dataset("digits", seed=seed)
    model = build_model("mlp", data.num_features, data.num_classes, hidden=spec["hidden"])
    params = model.init_params(seed=seed, dtype=np.float32)
    base_lr = learning_rate if learning_rate is not None else spec["learning_rate"]
    base_lr = DEFAULT_LEARNING_RATES[updater_name] if base_lr is None else base_lr
    samples = {label: [] for label, _, _ in configs}
    for rep in range(repeats):
        for label, system, options in configs:
            updater = build_updater(updater_name, base_lr * options.get("lr_scale", 1.0), lr_decay)
            started = time.perf_counter()
            out = run_one(system, options, model, data, updater, params, workers, epochs, batch_size, seed, shards)
            samples[label].append(out)
            print(f"  [{model_name} rep {rep + 1}/{repeats}] {label:<44} steady {out['steady']:>8,.0f}/s  overall "
                  f"{out['overall']:>8,.0f}/s  acc {out['accuracy']:.4f}  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    rows = []
    for label, system, options in configs:
        runs = samples[label]
        rows.append({"label": label, "system": system, "options": options, "runs": runs,
                     "learning_rate": base_lr * options.get("lr_scale", 1.0),
                     "steady": median([r["steady"] for r in runs]), "overall": median([r["overall"] for r in runs]),
                     "accuracy": median([r["accuracy"] for r in runs]),
                     "accuracy_min": min(r["accuracy"] for r in runs), "accuracy_max": max(r["accuracy"] for r in runs)})
    return rows


def report(model_name: str, rows: list[dict], params: int, epochs: int, ceiling: dict, shards: int) -> str:
    by_label = {r["label"]: r for r in rows}
    tb = {mode: by_label.get(f"textbook {mode}") for mode in ("sync", "async")}
    nan = float("nan")
    body = []
    for r in rows:
        consistency = r["options"].get("mode") or r["options"].get("consistency", "async")
        same = tb["sync" if consistency == "sync" else "async"]
        accuracy = [f"{r['accuracy']:.4f}", f"{(r['accuracy'] - (same or r)['accuracy']) * 100:+.1f}",
                    f"{r['accuracy_min']:.3f}-{r['accuracy_max']:.3f}"]
        if r["system"] == "floor":
            accuracy = ["-", "- (learns nothing)", "-"]
        body.append([r["label"], r["steady"], r["overall"],
                     r["steady"] / tb["async"]["steady"] if tb["async"] else nan,
                     r["steady"] / tb["sync"]["steady"] if tb["sync"] else nan, *accuracy])
    title = (f"### {model_name}: MLP {MODELS[model_name]['hidden']} ({params:,} parameters), {epochs} epochs, "
             f"rayps {shards} shard(s) unless marked — steady samples/s (median); compute ceiling "
             f"{ceiling['samples_per_second']:,.0f} samples/s (one gradient: "
             f"{ceiling['gradient_seconds'] * 1e3:.2f} ms on one thread)")
    return table(["system", "steady samples/s", "overall samples/s", "x textbook async", "x textbook sync",
                  "test acc (median)", "pts vs textbook (same consistency)", "acc range"], body, title=title)


# -- profiling: py-spy on the driver and every actor of one rayps run -----------------------------------------
def profile_run(out_dir: str, model_name: str, options: dict, seconds: int, seed: int = 0, idle: bool = False
                ) -> None:
    """One rayps run (Adam, 4 workers); py-spy records every process from the end of epoch 1 for ``seconds``."""
    spec = MODELS[model_name]
    data = load_dataset("digits", seed=seed)
    model = build_model("mlp", data.num_features, data.num_classes, hidden=spec["hidden"])
    params = model.init_params(seed=seed, dtype=np.float32)
    epochs = 200 if model_name == "small" else 20  # longer than the recording; stopped when it ends
    shards, workers = options.get("shards", 1), 4
    first_epoch_done = threading.Event()
    thread = attach_pyspy(out_dir, seconds, first_epoch_done, {"ShardActor": shards, "WorkerActor": workers}, idle)
    done = threading.Event()

    def stopper():
        thread.join()
        done.set()
    threading.Thread(target=stopper, daemon=True).start()
    share = cpu_share(shards + workers)
    ps = ParameterServer(params, updater=build_updater("adam", None), num_shards=shards,
                         consistency=options.get("consistency", "async"), num_workers=workers, cpus_per_shard=share)

    def progress(row):
        first_epoch_done.set()
        if done.is_set():
            raise KeyboardInterrupt  # recording over: stop training
    try:
        train(ps, model, data, num_workers=workers, epochs=epochs, batch_size=32, seed=seed, cpus_per_worker=share,
              n_fetch=options.get("n_fetch", 1), n_push=options.get("n_push", 1), progress=progress)
    except KeyboardInterrupt:
        pass
    finally:
        ps.shutdown()
    thread.join()
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".txt"):
            print(pyspy_summary(os.path.join(out_dir, name)))
    print(f"py-spy raw stacks in {out_dir}")


# -- profiling: pyinstrument on the worker loop and the shard logic in ONE process (no Ray) ------------------
class InProcessClient:
    """rayps' own push and pull code — ``PushPlan`` (checks, routing, packing), ``ParameterLayout`` (unpacking),
    ``ShardState`` (the update) — with the shards in this process: what a step costs in rayps' Python, without
    Ray's transport."""

    def __init__(self, params, updater, num_shards: int):
        from rayps.server.layout import ParameterLayout  # noqa: PLC0415
        from rayps.server.push_plan import PushPlan  # noqa: PLC0415
        from rayps.server.shard_state import ShardState  # noqa: PLC0415
        from rayps.updaters.groups import as_groups, assign_groups  # noqa: PLC0415

        groups = as_groups(updater)
        layout = ParameterLayout.build({n: a.shape for n, a in params.items()},
                                       {n: str(a.dtype) for n, a in params.items()}, num_shards,
                                       assign_groups(groups, list(params)))
        self.plan = PushPlan(layout, groups, {}, "reject", own_payloads=False)
        self.layout = layout
        self.shards = [ShardState(s, layout.shard_pieces[s], groups, layout.pack(s, params)[0])
                       for s in range(num_shards)]
        self.seq = 0

    def push(self, grads, worker_id=0, epoch=0):
        self.seq += 1
        for shard, payload, present, factors, rows in self.plan.messages(grads):
            self.shards[shard].push("c", self.seq, worker_id, payload, present, factors, epoch, rows)

    def flush(self):
        pass

    def pull(self, worker_id=None):
        out = {n: np.empty(self.layout.shapes[n], dtype=self.layout.dtypes[n]) for n in self.layout.names}
        for shard, state in enumerate(self.shards):
            self.layout.unpack_into(shard, state.read(None, worker_id), out)
        return out

    def push_pull(self, grads, worker_id=0, epoch=0):
        self.push(grads, worker_id, epoch)
        return self.pull(worker_id)


def profile_inprocess(out_dir: str, model_name: str, shards: int, seconds: float) -> None:
    """pyinstrument over ``WorkerLoop.run_epoch`` with an ``InProcessClient`` (Adam), text + HTML reports."""
    from pyinstrument import Profiler  # noqa: PLC0415

    from rayps.worker.loop import WorkerLoop  # noqa: PLC0415
    from rayps.worker.models import grad_fn_for  # noqa: PLC0415

    spec = MODELS[model_name]
    data = load_dataset("digits", seed=0)
    model = build_model("mlp", data.num_features, data.num_classes, hidden=spec["hidden"])
    client = InProcessClient(model.init_params(seed=0, dtype=np.float32), build_updater("adam", None), shards)
    loop = WorkerLoop(client, grad_fn_for(model), data.x_train, data.y_train, 0, 1, 32)
    loop.run_epoch(0)  # warm-up (kernel JIT/cache load)
    profiler = Profiler(interval=0.0005)
    profiler.start()
    started, epoch = time.perf_counter(), 1
    while time.perf_counter() - started < seconds:
        loop.run_epoch(epoch)
        epoch += 1
    profiler.stop()
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"inprocess_{model_name}_{shards}sh")
    with open(stem + ".txt", "w", encoding="utf-8") as handle:
        handle.write(profiler.output_text(unicode=False, color=False, time="percent_of_total"))
    with open(stem + ".html", "w", encoding="utf-8") as handle:
        handle.write(profiler.output_html())
    print(f"pyinstrument: {stem}.txt ({loop.steps_done} steps in {time.perf_counter() - started:.1f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, 5 epochs, 1 repeat")
    parser.add_argument("--model", choices=("small", "wide", "both"), default=None)
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="override the model's epochs")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=None, help="rayps shards where a row does not say "
                                                                    "(default: the model's, 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--updater", default="adam")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default: 0.005 (small; rayps train's Adam default), 0.001 (wide)")
    parser.add_argument("--lr-decay", type=float, default=1.0,
                        help="learning rate x this per epoch (default 1: constant; rayps train's default is 0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="comma list of labels to run (exact label, else substring)")
    parser.add_argument("--list", action="store_true", help="print the configurations' labels and exit")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--experiments", action="store_true",
                        help="retired: the profile's fixes those rows patched in are in rayps now (a no-op)")
    parser.add_argument("--pyspy", default=None, metavar="DIR", help="profile one rayps run with py-spy instead")
    parser.add_argument("--pyspy-seconds", type=int, default=20)
    parser.add_argument("--pyspy-shards", type=int, default=1)
    parser.add_argument("--pyspy-idle", action="store_true", help="record waiting threads too (wall-time view)")
    parser.add_argument("--profile-inprocess", default=None, metavar="DIR",
                        help="pyinstrument the worker loop + shard logic in one process (no Ray) instead")
    args = parser.parse_args(argv)
    configs = TEXTBOOK + RAY_FLOOR + SOCKET_PS + RAYPS_TEXTBOOK_SEMANTICS + RAYPS_KNOBS
    if args.experiments:
        print("end_to_end.py: --experiments is retired (the patched rows' fixes are in rayps now); ignored",
              file=sys.stderr)
    if args.list:
        print("\n".join(label for label, _, _ in configs))
        return 0
    if args.profile_inprocess:
        for name in (["small", "wide"] if args.model in (None, "both") else [args.model]):
            profile_inprocess(args.profile_inprocess, name, args.pyspy_shards, args.pyspy_seconds)
        return 0
    start_ray()
    if args.pyspy:
        profile_run(args.pyspy, args.model if args.model in MODELS else "small",
                    {"shards": args.pyspy_shards}, args.pyspy_seconds, args.seed, args.pyspy_idle)
        return 0
    models = ["small"] if args.quick and args.model is None else (
        ["small", "wide"] if args.model in (None, "both") else [args.model])
    repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        configs = TEXTBOOK + RAYPS_TEXTBOOK_SEMANTICS[:2] + [k for k in RAYPS_KNOBS if k[0] in (
            "rayps async prefetch", "rayps async n_fetch=n_push=4")]
    skipped = [c[0] for c in configs if c[1] == "rayps" and not supported(c[2])]
    configs = [c for c in configs if c[1] != "rayps" or supported(c[2])]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        labels = {c[0] for c in configs}
        configs = [c for c in configs if any(w == c[0] if w in labels else w in c[0] for w in wanted)]
    results = {"machine": machine(), "repeats": repeats, "workers": args.workers, "batch_size": args.batch_size,
               "updater": args.updater, "learning_rate": args.learning_rate, "lr_decay": args.lr_decay,
               "not_implemented": missing_knobs(),
               "skipped": skipped, "models": {}}
    reports = []
    for name in models:
        epochs = args.epochs or (QUICK_EPOCHS[name] if args.quick else MODELS[name]["epochs"])
        shards = args.shards or MODELS[name]["shards"]
        data = load_dataset("digits", seed=args.seed)
        model = build_model("mlp", data.num_features, data.num_classes, hidden=MODELS[name]["hidden"])
        ceiling = gradient_ceiling(model, data, model.init_params(seed=args.seed, dtype=np.float32),
                                   args.batch_size, int(ray.cluster_resources().get("CPU", 1)))
        rows = compare(name, configs, repeats, epochs, args.workers, args.batch_size, args.seed, args.updater,
                       args.learning_rate, shards, args.lr_decay)
        count = sum(int(np.prod(s)) for s in model.param_shapes().values())
        results["models"][name] = {"epochs": epochs, "params": count, "shards": shards, "ceiling": ceiling,
                                   "rows": rows}
        reports.append(report(name, rows, count, epochs, ceiling, shards))
    print("\n".join(reports))
    if missing_knobs():
        print(f"\nnot in this rayps (so not measured): {'; '.join(missing_knobs())}")
    if skipped:
        print(f"skipped (knob missing): {', '.join(skipped)}")
    if args.json_out:
        write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
