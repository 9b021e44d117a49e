"""Scaling: rayps train throughput over workers 1/2/4/8 x shards 1/2/4 (digits, MLP 128, 2 epochs).

Each cell is ``rayps.worker.train`` + ``ParameterServer`` in-process (async, pull and push every step, Adam,
batch 32), with the CLI's CPU shares (``min(1, cpus / (shards + workers))``); the textbook Ray PS (async, one
PS actor) is measured at each worker count in the same run as the reference line. samples/s is "steady"
(second epoch only: actor start-up and JIT loading excluded) and "overall" (what ``train()`` reports).

What a 2-core machine can show: at most 2 processes run at once, so beyond 2 processes (workers + shards +
driver) more workers only add contention; the curve measures per-step overheads and how the system
degrades under oversubscription, not how it scales on more cores. See the cost model in the results file.

    python benchmarks/scaling.py            # writes docs/benchmarks/scaling.{json,png}
    python benchmarks/scaling.py --quick    # workers 1/4, shards 1/2, one repeat
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FIGURE_DIR, machine, median, plot_scaling, start_ray, table, write_json  # noqa: E402
from end_to_end import run_rayps, steady_rate  # noqa: E402
from textbook_ps import train_textbook  # noqa: E402

from rayps.updaters.by_name import build_updater  # noqa: E402
from rayps.worker.data import load_dataset  # noqa: E402
from rayps.worker.models import build_model  # noqa: E402

WORKERS = (1, 2, 4, 8)
SHARDS = (1, 2, 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="default 2 (quick 1)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", default="128")
    parser.add_argument("--no-textbook", action="store_true")
    parser.add_argument("--json-out", default=os.path.join(FIGURE_DIR, "scaling.json"))
    parser.add_argument("--png-out", default=os.path.join(FIGURE_DIR, "scaling.png"))
    args = parser.parse_args(argv)
    workers_list, shards_list = ((1, 4), (1, 2)) if args.quick else (WORKERS, SHARDS)
    repeats = args.repeats or (1 if args.quick else 2)
    start_ray()
    data = load_dataset("digits", seed=0)
    model = build_model("mlp", data.num_features, data.num_classes, hidden=args.hidden)
    params = model.init_params(seed=0, dtype=np.float32)
    cells = [(w, s) for w in workers_list for s in shards_list]
    if not args.no_textbook:
        cells += [(w, 0) for w in workers_list]  # shards 0 = the textbook PS
    samples: dict = {cell: [] for cell in cells}
    for rep in range(repeats):
        for workers, shards in cells:
            started = time.perf_counter()
            if shards:
                result = run_rayps(model, data, build_updater("adam", None), params, workers, args.epochs, 32, 0,
                                   shards=shards)
            else:
                result = train_textbook(model, data, build_updater("adam", None), workers, args.epochs, 32, 0,
                                        mode="async", params=params)
            out = {"steady": steady_rate(result["history"]), "overall": result["samples_per_second"],
                   "accuracy": result["test_accuracy"]}
            samples[(workers, shards)].append(out)
            name = f"{shards} shard(s)" if shards else "textbook"
            print(f"  rep {rep + 1}: {workers} workers x {name:<11} steady {out['steady']:>8,.0f}/s overall "
                  f"{out['overall']:>8,.0f}/s acc {out['accuracy']:.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    rows = [{"workers": w, "shards": s, "samples_per_second": median([r["steady"] for r in samples[(w, s)]]),
             "overall": median([r["overall"] for r in samples[(w, s)]]),
             "accuracy": median([r["accuracy"] for r in samples[(w, s)]])} for w, s in cells if s]
    textbook = {w: median([r["steady"] for r in samples[(w, 0)]]) for w, s in cells if not s}
    body = []
    for w in workers_list:
        line = [w]
        for s in shards_list:
            line.append(next(r["samples_per_second"] for r in rows if r["workers"] == w and r["shards"] == s))
        line.append(textbook.get(w, float("nan")))
        best = max(line[1:1 + len(shards_list)])
        line.append(best / textbook[w] if w in textbook else float("nan"))
        body.append(line)
    headers = ["workers"] + [f"rayps {s} shard{'s' if s > 1 else ''}" for s in shards_list] + \
        ["textbook async", "best rayps / textbook"]
    print(table(headers, body, title=f"### steady samples/s (median of {repeats}), digits MLP {args.hidden}, "
                                     f"{args.epochs} epochs"))
    results = {"machine": machine(), "repeats": repeats, "config": {"hidden": args.hidden, "epochs": args.epochs},
               "rows": rows, "textbook_async": {str(k): v for k, v in textbook.items()}}
    write_json(args.json_out, results)
    plot_scaling(results, args.png_out)
    print(f"\nwrote {args.json_out} and {args.png_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
