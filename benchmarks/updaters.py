"""Updater kernels: every DL4J rule on one large float32 tensor, reference vs fused, against torch.optim.

One run measures, interleaved round by round (so every implementation sees the same machine noise):

* per rayps updater, one group of interleaved rounds: ``apply(kernel="reference")`` and
  ``apply(kernel="fused")`` (no adjustments), its torch counterpart (``foreach=False``, ``foreach=True`` and
  ``fused=True`` where torch has them), the baseline ``torch.optim.Adam(fused=True)`` and the memory-bandwidth
  roofline probes: a numba ``prange`` triad ``a = b + s*c`` and the in-place ``a = a + s*b``, on ``--threads``
  threads.

Reported: medians over ``--repeats`` rounds; the fused kernel's ratios are medians of per-round ratios (each
pair timed in the same round) to the baseline and to the fastest torch counterpart (< 1 means faster); its
achieved bandwidth from the bytes it must move (params, grads and state read once,
params and state written once: ``(3 + 2 * slots) * 4`` B per element for float32) and the % of the roofline
measured in the same round: the larger of the triad counted with its write-allocate (16 B per element) and
the in-place stream (12 B per element).

    python benchmarks/updaters.py [--size 16777216] [--repeats 10] [--threads 2] [--markdown] [--json PATH]

Thread counts are pinned for fairness: ``numba.set_num_threads`` and ``torch.set_num_threads``; both OpenMP
runtimes (numba's and torch's own libgomp) are made to sleep rather than spin between calls
(``OMP_WAIT_POLICY=PASSIVE``, unless already set), so neither steals cycles from the other while interleaved.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before numba/torch load their OpenMP runtimes

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402

from rayps.updaters import ALL_UPDATERS, fused_cpu  # noqa: E402
from rayps.updaters.base import NO_ADJUSTMENTS  # noqa: E402

BASELINE = "torch Adam fused"
PACKED = "fused, slots back to back"

# rayps updater -> (torch optimizer, its kwargs matching the DL4J defaults, variants torch offers on CPU)
TORCH_COUNTERPARTS = {
    "Sgd": ("SGD", {"lr": 1e-3}, ("single", "foreach", "fused")),
    "Nesterovs": ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, ("single", "foreach", "fused")),
    "AdaGrad": ("Adagrad", {"lr": 0.1, "eps": 1e-6, "initial_accumulator_value": 1e-6},
                ("single", "foreach", "fused")),
    "RmsProp": ("RMSprop", {"lr": 0.1, "alpha": 0.95, "eps": 1e-8}, ("single", "foreach")),
    "AdaDelta": ("Adadelta", {"lr": 1.0, "rho": 0.95, "eps": 1e-6}, ("single", "foreach")),
    "Adam": ("Adam", {"lr": 1e-3}, ("single", "foreach", "fused")),
    "AdaMax": ("Adamax", {"lr": 1e-3}, ("single", "foreach")),
    "Nadam": ("NAdam", {"lr": 1e-3}, ("single", "foreach")),
    "AMSGrad": ("Adam", {"lr": 1e-3, "amsgrad": True}, ("single", "foreach", "fused")),
}
VARIANT_KWARGS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def bytes_per_element(updater, itemsize: int) -> int:
    """What one step must move: params, grads and every state slot read, params and every slot written."""
    if type(updater).__name__ == "NoOp":
        return 0  # update = 0 and no weight decay: nothing to read or write
    slots = len(updater.state_keys)
    return (3 + 2 * slots) * itemsize


def interleaved(functions: dict, repeats: int, warmup: int = 1) -> dict:
    """Seconds per call of each function, ``repeats`` rounds, one call of each per round (same noise for all)."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def bandwidth_probes(size: int) -> dict:
    """Two numba ``prange`` streams: the triad ``a = b + s*c`` and the in-place ``a = a + s*b`` (both float32)."""
    import numba  # noqa: PLC0415

    @numba.njit(parallel=True, fastmath=False)
    def triad(a, b, c, s):
        for i in numba.prange(a.size):
            a[i] = b[i] + s * c[i]

    @numba.njit(parallel=True, fastmath=False)
    def axpy(a, b, s):
        for i in numba.prange(a.size):
            a[i] = a[i] + s * b[i]

    rng = np.random.default_rng(0)
    a, b, c = np.zeros(size, np.float32), rng.standard_normal(size, dtype=np.float32), \
        rng.standard_normal(size, dtype=np.float32)
    s = np.float32(0.5)
    return {"triad": lambda: triad(a, b, c, s), "axpy": lambda: axpy(a, b, s)}


def roofline_GBps(size: int, triad_s: float, axpy_s: float) -> dict:
    """GB/s of the probes. STREAM counts the triad as 3 arrays; its store to ``a`` also reads ``a`` first
    (write-allocate), so 4 arrays cross memory: the roofline counts those, like the updaters' in-place bytes."""
    rates = {"triad_GBps": 12 * size / triad_s / 1e9, "triad_with_write_allocate_GBps": 16 * size / triad_s / 1e9,
             "axpy_GBps": 12 * size / axpy_s / 1e9}
    rates["roofline_GBps"] = max(rates["triad_with_write_allocate_GBps"], rates["axpy_GBps"])
    return rates


def paired(numerator: list, denominator: list) -> float:
    """Median of the per-round ratios: both timed in the same round, so slow drifts of the load cancel."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def _torch_step(torch, name, kwargs, variant, param):
    optimizer = getattr(torch.optim, name)([param], **kwargs, **VARIANT_KWARGS[variant])
    return optimizer.step


def measure_group(updater, size: int, repeats: int, torch, probes: dict) -> dict:
    """One rayps updater: reference, fused, its torch counterparts, the baseline and the bandwidth probes,
    interleaved (so the roofline and the baseline see the same machine load as the rule)."""
    name = type(updater).__name__
    rng = np.random.default_rng(1)
    params = rng.standard_normal(size, dtype=np.float32)
    grads = rng.standard_normal(size, dtype=np.float32)
    state = updater.init(params)
    step = {"reference": 0, "fused": 0}

    def rayps_step(kernel):
        def run():
            updater.apply(params, grads, state, step[kernel], kernel=kernel)
            step[kernel] += 1
        return run

    functions = {"reference": rayps_step("reference")}
    if torch is not None:
        param = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(size, dtype=np.float32)))
        param.grad = torch.from_numpy(grads.copy())
        if name in TORCH_COUNTERPARTS:
            optimizer, kwargs, variants = TORCH_COUNTERPARTS[name]
            for variant in variants:
                functions[f"torch {variant}"] = _torch_step(torch, optimizer, kwargs, variant, param)
    functions["fused"] = rayps_step("fused")
    if updater.state_keys:  # diagnostic: the same kernel on one C-contiguous state (slots back to back)
        packed = np.ascontiguousarray(state)  # init() spaces the slots apart; this is the layout before that
        kernel = fused_cpu.kernel_for(updater, np.float32)
        packed_step = {"iteration": 0}

        def run_packed():
            kernel(params, grads, packed, updater.rule_scalars(packed_step["iteration"], 0), NO_ADJUSTMENTS)
            packed_step["iteration"] += 1
        functions[PACKED] = run_packed
    if torch is not None:
        baseline_param = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(size, dtype=np.float32)))
        baseline_param.grad = torch.from_numpy(grads.copy())
        functions[BASELINE] = _torch_step(torch, "Adam", {"lr": 1e-3}, "fused", baseline_param)
    functions.update(probes)
    return interleaved(functions, repeats)


def run(size: int, repeats: int, threads: int, names=None) -> dict:
    import numba  # noqa: PLC0415

    numba.set_num_threads(threads)
    try:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    probes = bandwidth_probes(size)
    rows = []
    for cls in ALL_UPDATERS:
        if names and cls.__name__ not in names:
            continue
        updater = cls()
        times = measure_group(updater, size, repeats, torch, probes)
        medians = {key: statistics.median(values) for key, values in times.items()}
        nbytes = bytes_per_element(updater, 4) * size
        torch_variants = {k[len("torch "):]: v for k, v in medians.items() if k.startswith("torch ") and k != BASELINE}
        best_torch = min(torch_variants, key=torch_variants.get) if torch_variants else None
        # per round: the fused kernel's GB/s over the roofline measured in that round
        roofs = [roofline_GBps(size, t, a)["roofline_GBps"] for t, a in zip(times["triad"], times["axpy"])]
        percent = [100.0 * nbytes / f / 1e9 / roof for f, roof in zip(times["fused"], roofs)]
        rows.append({
            "updater": cls.__name__, "bytes_per_element": bytes_per_element(updater, 4),
            "reference_s": medians["reference"], "fused_s": medians["fused"],
            "torch": {"optimizer": TORCH_COUNTERPARTS.get(cls.__name__, ("-",))[0], **torch_variants},
            "baseline_s": medians.get(BASELINE, float("nan")),
            "fused_over_baseline": paired(times["fused"], times[BASELINE]) if BASELINE in times else float("nan"),
            "fused_over_best_torch": (paired(times["fused"], times[f"torch {best_torch}"]) if best_torch
                                      else float("nan")),
            "fused_over_reference": paired(times["fused"], times["reference"]),
            "packed_s": medians.get(PACKED, float("nan")),
            "packed_over_baseline": (paired(times[PACKED], times[BASELINE])
                                     if PACKED in times and BASELINE in times else float("nan")),
            "fused_GBps": nbytes / medians["fused"] / 1e9 if nbytes else float("nan"),
            "percent_of_roofline": statistics.median(percent) if nbytes else float("nan"),
            "torch_GBps": {k: nbytes / v / 1e9 for k, v in torch_variants.items()},
            "bandwidth": roofline_GBps(size, medians["triad"], medians["axpy"]),
            "times_s": times,
        })
    summary = {key: statistics.median(row["bandwidth"][key] for row in rows) for key in rows[0]["bandwidth"]}
    summary["roofline_GBps"] = max(summary["triad_with_write_allocate_GBps"], summary["axpy_GBps"])
    return {"machine": machine(threads), "size": size, "repeats": repeats, "roofline": summary,
            "torch": None if torch is None else torch.__version__, "rows": rows}


def machine(threads: int) -> dict:
    import numba  # noqa: PLC0415

    return {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "numba": numba.__version__, "numba_threading_layer": _threading_layer(), "numpy": np.__version__,
            "python": platform.python_version()}


def _threading_layer() -> str:
    import numba  # noqa: PLC0415

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "?"


# -- output ---------------------------------------------------------------------------------------------------


def _ms(seconds):
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1e3:.1f}"


def _ratio(value):
    return "-" if value != value else f"{value:.2f}"


def render(results: dict, markdown: bool) -> str:
    rows = results["rows"]
    headers = ["updater", "B/elem", "reference ms", "fused ms", "fused / reference", "torch counterpart",
               "torch single ms", "torch foreach ms", "torch fused ms", "fused / torch fused Adam",
               "fused / best torch", "fused GB/s", "% roofline", "back-to-back ms", "back-to-back / torch fused Adam"]
    body = []
    for row in rows:
        torch_row = row["torch"]
        body.append([row["updater"], str(row["bytes_per_element"]), _ms(row["reference_s"]), _ms(row["fused_s"]),
                     _ratio(row["fused_over_reference"]), torch_row["optimizer"], _ms(torch_row.get("single")),
                     _ms(torch_row.get("foreach")),
                     _ms(torch_row.get("fused")), _ratio(row["fused_over_baseline"]),
                     _ratio(row["fused_over_best_torch"]),
                     "-" if row["fused_GBps"] != row["fused_GBps"] else f"{row['fused_GBps']:.1f}",
                     "-" if row["percent_of_roofline"] != row["percent_of_roofline"]
                     else f"{row['percent_of_roofline']:.0f}",
                     _ms(row["packed_s"]), _ratio(row["packed_over_baseline"])])
    baselines = [row["baseline_s"] for row in rows if row["baseline_s"] == row["baseline_s"]]
    bandwidth = results["roofline"]
    m = results["machine"]
    lines = [
        f"{results['size']:,} float32 params, {m['threads']} threads, median of {results['repeats']} interleaved "
        f"rounds; {m['cpu']} ({m['cores']} cores), numba {m['numba']} ({m['numba_threading_layer']}), "
        f"torch {results['torch'] or 'not installed'}, {m['date']}",
        f"roofline {bandwidth['roofline_GBps']:.1f} GB/s (medians over groups; a row's % is per round)"
        f" = max(triad a = b + s*c incl. write-allocate {bandwidth['triad_with_write_allocate_GBps']:.1f} GB/s "
        f"[STREAM-counted {bandwidth['triad_GBps']:.1f}], in-place a = a + s*b {bandwidth['axpy_GBps']:.1f} GB/s)",
        (f"baseline {BASELINE}: {_ms(statistics.median(baselines))} ms (median over groups); ratios are medians "
         f"of per-round ratios within a group" if baselines else "baseline: torch not installed"),
        "back-to-back: diagnostic, the same fused kernel called directly on one C-contiguous state (slots exactly "
        "size * 4 B apart, the layout before Updater.init spaced them; see its docstring)",
        "",
    ]
    lines.append(_table(headers, body, markdown))
    return "\n".join(lines)


def _table(headers, body, markdown: bool) -> str:
    cells = [headers] + body
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if markdown:
        out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
               "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                + " |" for row in body]
        return "\n".join(out)
    out = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16 * 2 ** 20, help="float32 parameters (default 16Mi)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds per group (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="numba and torch threads (default 2)")
    parser.add_argument("--updaters", default="", help="comma-separated subset, e.g. Adam,Sgd (default all)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    names = {n.strip() for n in args.updaters.split(",") if n.strip()}
    results = run(args.size, args.repeats, args.threads, names)
    print(render(results, args.markdown))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
