"""End to end: ``rayps train`` against the textbook Ray parameter server, same run, same Ray.

Same data (digits, seed 0), model (``build_model("mlp", hidden=...)``, float32, same initial parameters),
optimizer (Adam, lr 0.005 — ``rayps train``'s default — unless ``--updater``/``--learning-rate``), batch size
32, 4 workers, epochs; both evaluate on the test set after every epoch (inside the timed wall). Two models:

* small: MLP hidden 128, 20 epochs (9.6 K parameters, 38 KB per message);
* wide:  MLP hidden 2048,2048, 2 epochs (4.35 M parameters, 17.4 MB per message).

Systems (each run ``--repeats`` times, interleaved; medians reported):

* ``textbook sync`` / ``textbook async``: ``benchmarks/textbook_ps.py`` (Ray docs' pattern);
* rayps at the textbook's semantics — pull and push every step (``n_fetch = n_push = 1``: one fused
  ``push_pull`` per shard per step), float32: async with 1 and 2 shards, and sync (BSP) with 2 shards;
* rayps with its knobs: ``n_fetch``/``n_push`` intervals, ``consistency="ssp"`` + ``staleness``, shard count,
  and, where the installed ``ParameterServer`` has a ``compression`` argument, fp16/bf16/threshold push
  encoding; a knob the installed rayps lacks is skipped and listed as not implemented.

samples/s: "overall" is what ``train()`` reports (samples / wall, actor start-up included); "steady" leaves
out the first epoch (actor start-up, JIT loading): (samples after the last epoch - after the first) / (wall
after the last - after the first). Ratios use steady samples/s against the textbook variant with the same
consistency (async vs async, sync vs sync), and against the faster textbook variant.

    python benchmarks/end_to_end.py            # both models, 3 repeats
    python benchmarks/end_to_end.py --quick    # small model only, fewer epochs, 1 repeat
    python benchmarks/end_to_end.py --experiments                # also the patched experiments (see EXPERIMENTS)
    python benchmarks/end_to_end.py --pyspy DIR --model small   # one rayps run with py-spy on every process
    python benchmarks/end_to_end.py --profile-inprocess DIR     # pyinstrument, worker loop + shard logic, no Ray
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median, pyspy_summary, start_ray, table, write_json  # noqa: E402
from textbook_ps import train_textbook  # noqa: E402

from rayps.deploy.train_command import build_updater  # noqa: E402
from rayps.server.client import ParameterServer  # noqa: E402
from rayps.worker.data import load_dataset  # noqa: E402
from rayps.worker.models import build_model  # noqa: E402
try:  # rayps <= 5bb9686 kept train() in worker/train.py; later in worker/training.py
    from rayps.worker.train import train  # noqa: E402
except ImportError:
    from rayps.worker.training import train  # noqa: E402

MODELS = {"small": {"hidden": "128", "epochs": 20}, "wide": {"hidden": "2048,2048", "epochs": 2}}
QUICK_EPOCHS = {"small": 5, "wide": 2}

# (label, system, options); rayps options: shards, consistency, staleness, n_fetch, n_push
TEXTBOOK = [("textbook sync", "textbook", {"mode": "sync"}),
            ("textbook async", "textbook", {"mode": "async"})]
RAYPS_TEXTBOOK_SEMANTICS = [
    ("rayps async 1sh", "rayps", {"shards": 1, "consistency": "async"}),
    ("rayps async 2sh", "rayps", {"shards": 2, "consistency": "async"}),
    ("rayps sync 2sh", "rayps", {"shards": 2, "consistency": "sync"}),
]
RAYPS_KNOBS = [
    ("rayps async 1sh n_fetch=4", "rayps", {"shards": 1, "consistency": "async", "n_fetch": 4}),
    ("rayps async 1sh n_fetch=n_push=4", "rayps", {"shards": 1, "consistency": "async", "n_fetch": 4, "n_push": 4}),
    ("rayps async 1sh n_fetch=n_push=8", "rayps", {"shards": 1, "consistency": "async", "n_fetch": 8, "n_push": 8}),
    ("rayps async 2sh n_fetch=n_push=4", "rayps", {"shards": 2, "consistency": "async", "n_fetch": 4, "n_push": 4}),
    ("rayps ssp(2) 1sh n_fetch=n_push=4", "rayps", {"shards": 1, "consistency": "ssp", "staleness": 2,
                                                    "n_fetch": 4, "n_push": 4}),
    ("rayps async 1sh bf16", "rayps", {"shards": 1, "consistency": "async", "compression": "bf16"}),
    ("rayps async 1sh fp16", "rayps", {"shards": 1, "consistency": "async", "compression": "fp16"}),
    ("rayps async 1sh threshold", "rayps", {"shards": 1, "consistency": "async", "compression": "threshold"}),
    ("rayps async 1sh bf16 n_fetch=n_push=4", "rayps", {"shards": 1, "consistency": "async", "compression": "bf16",
                                                        "n_fetch": 4, "n_push": 4}),
]
# Experiments (not rayps as shipped): the profile's first fixes patched in from benchmarks/transport.py
# (shard: numba on 1 thread, no metrics calls, one-sum finiteness check; client: no client-side isfinite pass),
# and the textbook PS with the same numba fix, so that the ratio is not won by a fix both could make.
EXPERIMENTS = [
    ("exp: textbook async, numba 1 thread", "textbook", {"mode": "async", "numba_threads": 1}),
    ("exp: rayps-lean async 1sh", "rayps", {"shards": 1, "consistency": "async", "lean": True}),
    ("exp: rayps-lean async 1sh n_fetch=n_push=4", "rayps", {"shards": 1, "consistency": "async", "lean": True,
                                                            "n_fetch": 4, "n_push": 4}),
]
KNOB_NAMES = {"compression": "fp16/bf16/threshold push encoding (ParameterServer(compression=...))"}


def supported(options: dict) -> bool:
    """Does the installed rayps have every knob these options use?"""
    import inspect  # noqa: PLC0415

    accepted = inspect.signature(ParameterServer.__init__).parameters
    return all(knob in accepted for knob in KNOB_NAMES if knob in options)


def missing_knobs() -> list[str]:
    import inspect  # noqa: PLC0415

    accepted = inspect.signature(ParameterServer.__init__).parameters
    return [text for knob, text in KNOB_NAMES.items() if knob not in accepted] + ["fp16/bf16 pull (parameters)"]


def run_rayps(model, data, updater, params, workers: int, epochs: int, batch_size: int, seed: int, shards: int = 1,
              consistency: str = "async", staleness: int = 0, n_fetch: int = 1, n_push: int = 1,
              lean: bool = False, compression: str | None = None) -> dict:
    """``rayps train`` in-process: ParameterServer + ``worker.train`` with the CLI's CPU shares."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    share = min(1.0, total / (shards + workers)) if total else 0.0
    kwargs = dict(updater=updater, num_shards=shards, consistency=consistency, staleness=staleness,
                  num_workers=workers, cpus_per_shard=share)
    if compression is not None:
        kwargs["compression"] = compression
    if lean:  # patches the internals of commit 5bb9686 (see transport.py); may not fit later versions
        from rayps.server import client  # noqa: PLC0415
        from transport import LeanParameterServer, _lean_shard_class  # noqa: PLC0415

        original, client.ShardActor = client.ShardActor, _lean_shard_class()
        try:
            ps = LeanParameterServer(params, **kwargs)
        finally:
            client.ShardActor = original
    else:
        ps = ParameterServer(params, **kwargs)
    try:
        return train(ps, model, data, num_workers=workers, epochs=epochs, batch_size=batch_size, seed=seed,
                     n_fetch=n_fetch, n_push=n_push, cpus_per_worker=share)
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


def run_one(system: str, options: dict, model, data, updater, params, workers, epochs, batch_size, seed) -> dict:
    if system == "textbook":
        result = train_textbook(model, data, updater, workers, epochs, batch_size, seed, mode=options["mode"],
                                params=params, numba_threads=options.get("numba_threads"))
    else:
        result = run_rayps(model, data, updater, params, workers, epochs, batch_size, seed, **options)
    return {"overall": result["samples_per_second"], "steady": steady_rate(result["history"]),
            "accuracy": result["test_accuracy"], "wall": result["wall_seconds"]}


def compare(model_name: str, configs, repeats: int, epochs: int, workers: int, batch_size: int, seed: int,
            updater_name: str, learning_rate) -> list[dict]:
    spec = MODELS[model_name]
    data = load_dataset("digits", seed=seed)
    model = build_model("mlp", data.num_features, data.num_classes, hidden=spec["hidden"])
    params = model.init_params(seed=seed, dtype=np.float32)
    samples = {label: [] for label, _, _ in configs}
    for rep in range(repeats):
        for label, system, options in configs:
            updater = build_updater(updater_name, learning_rate)
            started = time.perf_counter()
            out = run_one(system, options, model, data, updater, params, workers, epochs, batch_size, seed)
            samples[label].append(out)
            print(f"  [{model_name} rep {rep + 1}/{repeats}] {label:<36} steady {out['steady']:>8,.0f}/s  overall "
                  f"{out['overall']:>8,.0f}/s  acc {out['accuracy']:.4f}  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    rows = []
    for label, system, options in configs:
        runs = samples[label]
        rows.append({"label": label, "system": system, "options": options, "runs": runs,
                     "steady": median([r["steady"] for r in runs]), "overall": median([r["overall"] for r in runs]),
                     "accuracy": median([r["accuracy"] for r in runs]),
                     "accuracy_min": min(r["accuracy"] for r in runs), "accuracy_max": max(r["accuracy"] for r in runs)})
    return rows


def report(model_name: str, rows: list[dict], params: int, epochs: int) -> str:
    by_label = {r["label"]: r for r in rows}
    tb = {mode: by_label.get(f"textbook {mode}") for mode in ("sync", "async")}
    best = max((r for r in tb.values() if r), key=lambda r: r["steady"], default=None)
    body = []
    for r in rows:
        consistency = r["options"].get("mode") or r["options"].get("consistency")
        same = tb.get("sync" if consistency == "sync" else "async")
        body.append([r["label"], r["steady"], r["overall"],
                     r["steady"] / same["steady"] if same else float("nan"),
                     r["steady"] / best["steady"] if best else float("nan"),
                     f"{r['accuracy']:.4f}", f"{(r['accuracy'] - (same or r)['accuracy']) * 100:+.1f}"])
    title = (f"### {model_name}: MLP {MODELS[model_name]['hidden']} ({params:,} parameters), {epochs} epochs — "
             f"steady samples/s (median), ratio vs textbook")
    return table(["system", "steady samples/s", "overall samples/s", "x textbook (same consistency)",
                  "x best textbook", "test acc (median)", "acc pts vs textbook"], body, title=title)


# -- profiling: py-spy on the driver and every actor of one rayps run -----------------------------------------
def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def attach_pyspy(out_dir: str, seconds: int, start: threading.Event, expected: dict, idle: bool = False
                 ) -> threading.Thread:
    """Once ``start`` is set, record every actor process of this driver (and the driver) for ``seconds`` s
    (CPU samples only; with ``idle``, waiting threads too)."""
    names = tuple(expected)
    os.makedirs(out_dir, exist_ok=True)
    pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")

    def run():
        start.wait()
        deadline = time.time() + 60
        while True:  # actors start late on a busy machine: wait until every expected one has its title
            targets = {"driver": os.getpid()}
            counts: dict[str, int] = {}
            for pid in _descendants(os.getpid()):
                line = _cmdline(pid)
                for name in names:
                    if line.startswith(f"ray::{name}"):
                        counts[name] = counts.get(name, 0) + 1
                        targets[f"{name}{counts[name] - 1}"] = pid
            if all(counts.get(n, 0) >= expected.get(n, 1) for n in names) or time.time() > deadline:
                break
            time.sleep(0.5)
        procs = [subprocess.Popen([pyspy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw",
                                   "--nonblocking", *(["--idle", "--threads"] if idle else []), "-o", os.path.join(out_dir, f"{label}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for label, pid in targets.items()]
        for proc in procs:
            proc.wait()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def profile_run(out_dir: str, model_name: str, options: dict, seconds: int, seed: int = 0, idle: bool = False
                ) -> None:
    """One rayps run (Adam, 4 workers); py-spy records every process from the end of epoch 1 for ``seconds``."""
    spec = MODELS[model_name]
    data = load_dataset("digits", seed=seed)
    model = build_model("mlp", data.num_features, data.num_classes, hidden=spec["hidden"])
    params = model.init_params(seed=seed, dtype=np.float32)
    epochs = 200 if model_name == "small" else 20  # longer than the recording; stopped when it ends
    shards, workers = options.get("shards", 2), 4
    first_epoch_done = threading.Event()
    thread = attach_pyspy(out_dir, seconds, first_epoch_done, {"ShardActor": shards, "WorkerActor": workers}, idle)
    done = threading.Event()

    def stopper():
        thread.join()
        done.set()
    threading.Thread(target=stopper, daemon=True).start()
    total = float(ray.cluster_resources().get("CPU", 0.0))
    share = min(1.0, total / (shards + workers))
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
    """The client's real message code (``ParameterServer._messages``, layout pack/unpack) delivering straight
    to ``ShardState`` objects: what a step costs in rayps' own Python, without Ray's transport."""

    def __init__(self, params, updater, num_shards: int):
        from rayps.server.layout import ParameterLayout  # noqa: PLC0415
        from rayps.server.shard_state import ShardState  # noqa: PLC0415
        from rayps.updaters.groups import as_groups, assign_groups  # noqa: PLC0415

        groups = as_groups(updater)
        group_of = assign_groups(groups, list(params))
        layout = ParameterLayout.build({n: a.shape for n, a in params.items()},
                                       {n: str(a.dtype) for n, a in params.items()}, num_shards, group_of)
        self.messenger = ParameterServer.__new__(ParameterServer)  # only for _messages: no actors, no Ray
        self.messenger.layout, self.messenger.groups = layout, groups
        self.messenger.config = {"nan_policy": "reject"}
        self.messenger._normalizes = False
        self.layout = layout
        self.shards = [ShardState(s, layout.shard_pieces[s], groups, layout.pack(s, params)[0])
                       for s in range(num_shards)]
        self.seq = 0

    def push(self, grads, worker_id=0, epoch=0):
        messages = ParameterServer._messages(self.messenger, grads)
        self.seq += 1
        for shard, payload, present, factors in messages:
            self.shards[shard].push("c", self.seq, worker_id, payload, present, factors, epoch)

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
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override the model's epochs")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--updater", default="adam")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="comma list of labels to run (substring match)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--experiments", action="store_true", help="also run the patched experiment configs")
    parser.add_argument("--pyspy", default=None, metavar="DIR", help="profile one rayps run with py-spy instead")
    parser.add_argument("--pyspy-seconds", type=int, default=20)
    parser.add_argument("--pyspy-shards", type=int, default=2)
    parser.add_argument("--pyspy-idle", action="store_true", help="record waiting threads too (wall-time view)")
    parser.add_argument("--profile-inprocess", default=None, metavar="DIR",
                        help="pyinstrument the worker loop + shard logic in one process (no Ray) instead")
    args = parser.parse_args(argv)
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
    configs = TEXTBOOK + RAYPS_TEXTBOOK_SEMANTICS + RAYPS_KNOBS + (EXPERIMENTS if args.experiments else [])
    if args.quick:
        configs = TEXTBOOK + RAYPS_TEXTBOOK_SEMANTICS[:1] + [k for k in RAYPS_KNOBS if k[0] in (
            "rayps async 1sh n_fetch=n_push=4", "rayps async 1sh bf16")]
    skipped = [c[0] for c in configs if c[1] == "rayps" and not supported(c[2])]
    configs = [c for c in configs if c[1] != "rayps" or supported(c[2])]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        labels = {c[0] for c in configs}
        configs = [c for c in configs if any(w == c[0] if w in labels else w in c[0] for w in wanted)]
    results = {"machine": machine(), "repeats": repeats, "workers": args.workers, "batch_size": args.batch_size,
               "updater": args.updater, "learning_rate": args.learning_rate, "not_implemented": missing_knobs(),
               "skipped": skipped,
               "models": {}}
    reports = []
    for name in models:
        epochs = args.epochs or (QUICK_EPOCHS[name] if args.quick else MODELS[name]["epochs"])
        rows = compare(name, configs, repeats, epochs, args.workers, args.batch_size, args.seed, args.updater,
                       args.learning_rate)
        data = load_dataset("digits", seed=args.seed)
        count = sum(int(np.prod(s)) for s in build_model("mlp", data.num_features, data.num_classes,
                                                         hidden=MODELS[name]["hidden"]).param_shapes().values())
        results["models"][name] = {"epochs": epochs, "params": count, "rows": rows}
        reports.append(report(name, rows, count, epochs))
    print("\n".join(reports))
    print(f"\nnot in this rayps (so not measured): {'; '.join(missing_knobs())}")
    if skipped:
        print(f"skipped (knob missing): {', '.join(skipped)}")
    if args.json_out:
        write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
