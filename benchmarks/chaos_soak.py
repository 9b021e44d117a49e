"""The chaos soak, long: a BSP run killed again and again, and whether it still ends bit for bit.

    flock /tmp/rayps-bench.lock python benchmarks/chaos_soak.py --seed 0 --epochs 20 --worker-kills 6 --shard-kills 6

The harness is the test's (tests/chaos.py, tests/fault_proxy.py; tests/test_chaos_soak.py runs it short): softmax
on 512 digits, 2 workers, 2 shards, ``consistency="sync"``, a checkpoint directory; seeded worker deaths
(``FaultPlan`` points mid-push), a killer thread that ``ray.kill``s seeded shards, and the data plane through the
fault-injection proxy (drops, duplicates, delays, reorders, cut connections). Prints the kills survived of each
kind, the proxy's faults, the wall time of the soak and of the clean run of the same seed (the baseline,
measured in the same process), and whether the final parameters are bit-identical to the clean run's.
``--json-out`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the soak's harness lives with the tests
os.environ.setdefault("RAYPS_DATA_HOST", "127.0.0.1")  # everything runs on this machine: loopback

from common import machine, start_ray  # noqa: E402
from chaos import SoakConfig, chaos_run, clean_run, digits, identical, schedule  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20, help="16 steps per worker per epoch")
    parser.add_argument("--worker-kills", type=int, default=6)
    parser.add_argument("--shard-kills", type=int, default=6)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    config = SoakConfig(seed=args.seed, epochs=args.epochs, worker_kills=args.worker_kills,
                        shard_kills=args.shard_kills, wait=600.0)
    start_ray()
    data, model, steps = digits(config)
    events = schedule(config, steps)
    print(f"{steps} steps per worker; schedule: " + ", ".join(
        f"{e.kind} {e.index} @ {'the first shard kill' if e.point == 'client.replayed' else e.step}" + (f" ({e.point}{'' if e.sent is None else f', sent={e.sent}'})"
                                            if e.kind == "worker" else "") for e in events), flush=True)
    with tempfile.TemporaryDirectory(prefix="rayps-chaos-") as workdir:
        clean = clean_run(config, data, model, workdir)
        soak = chaos_run(config, data, model, steps, workdir)
    exactly_once = all(s["clocks"] == {w: steps for w in range(config.workers)} and s["updates_applied"] == steps
                       for s in soak.stats["shards"])
    report = {
        "seed": config.seed, "steps": steps, "epochs": config.epochs, "workers": config.workers,
        "shards": config.shards, "shard_kills": soak.shard_kills, "shard_kills_skipped": soak.shard_kills_skipped,
        "worker_kills": soak.worker_kills, "worker_restarts": soak.result["worker_restarts"],
        "shard_restarts": soak.stats["restarts"], "proxy_faults": soak.proxy_faults,
        "replayed": soak.stats["replayed"], "duplicates_dropped": soak.stats["duplicates_dropped"],
        "soak_seconds": round(soak.wall_seconds, 1), "clean_seconds": round(clean.wall_seconds, 1),
        "exactly_once": exactly_once, "bit_identical": identical(soak.params, clean.params), "machine": machine(),
    }
    print(f"shard kills survived: {soak.shard_kills} (skipped by the rules: {soak.shard_kills_skipped})")
    print(f"worker kills survived: {sum(soak.worker_kills.values())} {soak.worker_kills}")
    print(f"network faults: {soak.proxy_faults}")
    print(f"replayed pushes: {report['replayed']}, duplicates dropped: {report['duplicates_dropped']}")
    print(f"wall time: soak {soak.wall_seconds:.1f} s, clean run {clean.wall_seconds:.1f} s "
          f"({soak.wall_seconds / clean.wall_seconds:.1f}x)")
    print(f"exactly once per shard per clock: {exactly_once}; bit-identical to the clean run: "
          f"{report['bit_identical']}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0 if report["bit_identical"] and exactly_once else 1


if __name__ == "__main__":
    sys.exit(main())
