"""A shard's own work per push, in one process (no Ray, no sockets): what each message costs in rayps' Python.

Every message goes the way the data-plane thread takes it — ``protocol.from_frames`` (header and arrays checked),
``ShardService.handle`` (exactly-once bookkeeping, NaN check, counters, the update kernel, the read) and, for a
reply carrying parameters, ``protocol.to_frames`` — on messages encoded beforehand by ``to_frames``, as a client
sends them. The baseline, in the same process on the same arrays: the bare fused kernel
(``Updater.select_kernel``), called once per push, which is all a shard must do per push. Cases:

* ``1 KB alone``: 256 float32 gradients, one push per message (a push to an idle shard);
* ``1 KB batch``: the same pushes, ``--batch`` per message (``PushMessage.batch``: a busy shard's small pushes);
* ``MLP push_pull``: the small MLP's gradient (9,610 parameters, 4 arrays) with the fused pull of a training step
  (its reply encoded).

Reported: microseconds per push (median of ``--repeats`` rounds) and the ratio to the bare kernel.

    python benchmarks/shard_logic.py [--updater sgd|adam] [--repeats 7] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median, table, write_json  # noqa: E402

from rayps.server.layout import ParameterLayout  # noqa: E402
from rayps.server.protocol import PushMessage, from_frames, to_frames  # noqa: E402
from rayps.server.push_plan import PushPlan  # noqa: E402
from rayps.server.shard_service import ShardService  # noqa: E402
from rayps.server.shard_state import ShardState  # noqa: E402
from rayps.updaters import Adam, Sgd  # noqa: E402
from rayps.updaters.groups import as_groups, assign_groups  # noqa: E402
from rayps.worker.models import build_model  # noqa: E402

UPDATERS = {"sgd": lambda: Sgd(1e-6), "adam": lambda: Adam(1e-6)}
INCARNATION = "bench"


def layout_of(params: dict, groups) -> ParameterLayout:
    return ParameterLayout.build({n: a.shape for n, a in params.items()}, {n: str(a.dtype) for n, a in params.items()},
                                 1, assign_groups(groups, list(params)))


def shard_of(params: dict, updater) -> tuple[ShardService, ShardState]:
    groups = as_groups(updater)
    layout = layout_of(params, groups)
    state = ShardState(0, layout.shard_pieces[0], groups, layout.pack(0, params)[0])
    return ShardService(state, INCARNATION), state


def wire(message) -> list:
    """``message`` as the shard receives it: its frames, as bytes or read-only arrays."""
    message.incarnation = INCARNATION
    return [frame if hasattr(frame, "nbytes") else bytes(frame) for frame in to_frames(message)]


def messages(case: str, params: dict, rounds: int, per_round: int, batch: int) -> list:
    """Per round, the frames of ``per_round`` pushes, sequence numbers following on from round to round."""
    flat = np.concatenate([a.reshape(-1) for a in params.values()])
    gradient = np.full(flat.size, 1e-3, flat.dtype)
    out, seq = [], 1
    for _ in range(rounds):
        frames = []
        if case == "1 KB batch":
            for _ in range(per_round // batch):
                pushes = [PushMessage(s, "c", s, 0, 0, {"float32": gradient}) for s in range(seq, seq + batch)]
                frames.append(wire(PushMessage.batch(pushes)))
                seq += batch
        else:
            for _ in range(per_round):
                pull = case == "MLP push_pull"
                frames.append(wire(PushMessage(seq, "c", seq, 0, 0, {"float32": gradient}, pull_worker=0 if pull
                                               else None, pull=pull, timeout=30.0)))
                seq += 1
        out.append(frames)
    return out


def rayps_per_push(case: str, params: dict, updater, rounds: int, per_round: int, batch: int) -> list[float]:
    service, _ = shard_of(params, updater)
    times = []
    for frames in messages(case, params, rounds + 1, per_round, batch):
        started = time.perf_counter()
        for message in frames:
            for _, reply in service.handle(b"peer", from_frames(message), 0.0):
                if getattr(reply, "params", None) is not None:
                    to_frames(reply)
        times.append((time.perf_counter() - started) / per_round * 1e6)
    return times[1:]  # the first round compiles and warms


def push_pull_logic(params: dict, updater, count: int) -> float:
    """Seconds of rayps' own logic in one ``push_pull`` round trip on one shard, in this process (mean of
    ``count``): the client's (``PushPlan.messages``, the push's frames, the reply decoded and assembled) and the
    shard's (``from_frames``, ``ShardService.handle``, the reply's frames); no socket, no window bookkeeping, so
    less than the real thing. Added to a bare ZeroMQ round trip it bounds what a ``push_pull`` can take."""
    service, _ = shard_of(params, updater)
    layout = layout_of(params, as_groups(updater))
    plan = PushPlan(layout, as_groups(updater), {}, "reject", own_payloads=False)
    grads = {n: np.full(a.shape, 1e-3, a.dtype) for n, a in params.items()}
    started = None
    for seq in range(1, 2 * count + 1):
        if seq == count + 1:  # the first half warms
            started = time.perf_counter()
        _, payload, present, factors, rows = plan.messages(grads)[0]
        push = PushMessage(seq, "c", seq, 0, 0, payload, present, factors, rows, pull_worker=0, pull=True,
                           timeout=30.0)
        push.incarnation = INCARNATION
        (_, reply), = service.handle(b"peer", from_frames(to_frames(push)), 0.0)
        layout.assemble({0: from_frames(to_frames(reply)).params}, layout.names, False)
    return (time.perf_counter() - started) / count


def kernel_per_push(params: dict, updater, rounds: int, per_round: int) -> list[float]:
    flat = np.concatenate([a.reshape(-1) for a in params.values()])
    gradient = np.full(flat.size, 1e-3, flat.dtype)
    state = updater.init(flat)
    kernel = updater.select_kernel(flat, gradient, state)
    adjustments = as_groups(updater)[0].adjustments(0, 0)
    times = []
    for round_ in range(rounds + 1):
        started = time.perf_counter()
        for i in range(per_round):
            iteration = round_ * per_round + i
            kernel(flat, gradient, state, updater.rule_scalars(iteration, 0), adjustments)
        times.append((time.perf_counter() - started) / per_round * 1e6)
    return times[1:]


def measure(updater_name: str, repeats: int, per_round: int, batch: int) -> list[dict]:
    small = {"w": np.zeros(256, np.float32)}
    mlp = build_model("mlp", 64, 10, hidden=(128,)).init_params(seed=0, dtype=np.float32)
    rows = []
    for case, params in (("1 KB alone", small), ("1 KB batch", small), ("MLP push_pull", mlp)):
        bare = median(kernel_per_push(params, UPDATERS[updater_name](), repeats, per_round))
        logic = median(rayps_per_push(case, params, UPDATERS[updater_name](), repeats, per_round, batch))
        rows.append({"case": case, "rayps_us": logic, "bare_kernel_us": bare, "ratio": logic / bare})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updater", choices=sorted(UPDATERS), default="sgd")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pushes", type=int, default=1024, help="pushes per round")
    parser.add_argument("--batch", type=int, default=32, help="pushes per batch message (the client's BATCH_PUSHES)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    rows = measure(args.updater, args.repeats, args.pushes, args.batch)
    print(table(["case", "rayps shard logic, us/push", "bare kernel, us/push", "ratio"],
                [[r["case"], f"{r['rayps_us']:.2f}", f"{r['bare_kernel_us']:.2f}", f"{r['ratio']:.1f}x"] for r in rows],
                title=f"A shard's work per push, {args.updater}, medians of {args.repeats} rounds of {args.pushes}"))
    if args.json_out:
        write_json(args.json_out, {"machine": machine(), "updater": args.updater, "batch": args.batch, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
