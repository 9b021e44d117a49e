"""The textbook Ray parameter server — the pattern of Ray's docs example "Parameter Server" — on rayps' model.

The pattern (Ray docs, ``ray-core/examples/plot_parameter_server``), rewritten here for the NumPy MLP of
``rayps.worker.models`` and the optimizer math of ``rayps.updaters``:

* ONE parameter-server actor holding every weight; ``apply_gradients(*gradients)`` combines the gradients it
  is given, takes one optimizer step and returns the full weights; ``get_weights()`` returns them too;
* data-worker actors whose ``compute_gradients(weights)`` loads the weights, takes its next minibatch and
  returns the full gradients;
* the driver routes every step: it hands the current weights (an object ref) to the workers, gathers their
  gradient refs and passes them to ``apply_gradients``. Full weights and full gradients move every step.

Two variants, as in the docs:

* ``sync``: every step all workers compute on the same weights; the server applies their combined gradient;
* ``async``: the driver ``ray.wait``\\s for whichever gradient is ready, applies it alone, and hands that worker
  the weights that came back.

Differences from the docs' code, so that the comparison with ``rayps train`` measures the systems and not the
recipe: the model is ``build_model(...)`` (NumPy, exact gradients) instead of a torch ConvNet; the optimizer is
a ``rayps.updaters`` rule applied per parameter (the docs use ``torch.optim.SGD``); sync mode applies the *mean*
of the workers' gradients (the docs sum them — with a mean, one learning rate means the same step size in both
systems and in rayps' BSP mode); workers draw their minibatches from rayps' per-epoch partitions
(``worker.loop.epoch_batches``) instead of an endless loader, so an epoch is the same set of samples in both
systems, and the driver evaluates on the test set after every epoch, as ``rayps.worker.train`` does. The PS
actor's numba pool gets as many threads as the actor has CPUs (at least 1), the rule rayps' shards follow
(``ParameterServer(cpus_per_shard=...)``), so that both run the same kernels the same way and the ratio is not won
by a setting either could use (docs/profile.md section 1: a 2-thread pool on a busy 2-core machine waits at
barriers); for the same reason the applying thread flushes subnormal results to zero, as rayps' shards do by
default (updaters/float_env.py: Adam's moments of a dead unit decay into the subnormal range, ~100x slower).

    python benchmarks/textbook_ps.py --mode async --hidden 128 --epochs 20
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import start_ray  # noqa: E402

from rayps.updaters.float_env import flush_denormals  # noqa: E402
from rayps.worker.loop import epoch_batches  # noqa: E402

MODES = ("sync", "async")


@ray.remote
class TextbookParameterServer:
    """One actor, all the weights, one optimizer step per ``apply_gradients`` call."""

    def __init__(self, params: dict, updater, numba_threads: int | None = None):
        self.numba_threads = numba_threads
        self.pinned_thread = None  # numba's pool size is a per-thread setting: set on the thread that applies
        self.params = {name: np.array(value, copy=True) for name, value in params.items()}
        self.updater = updater
        self.state = {name: updater.init(value) for name, value in self.params.items()}
        self.iteration = 0
        self.epoch = 0

    def apply_gradients(self, *gradients):
        """Combine the gradients (mean), step every parameter, return the new weights."""
        if self.pinned_thread != threading.get_ident():
            self.pinned_thread = threading.get_ident()
            flush_denormals(True)  # as rayps' shards do by default: the same kernels at the same speed
            if self.numba_threads:
                import numba  # noqa: PLC0415

                numba.set_num_threads(min(self.numba_threads, numba.config.NUMBA_NUM_THREADS))
        for name, param in self.params.items():
            if len(gradients) == 1:
                combined = gradients[0][name]
            else:
                combined = np.array(gradients[0][name], copy=True)
                for other in gradients[1:]:
                    combined += other[name]
                combined /= len(gradients)
            self.updater.apply(param, combined, self.state[name], self.iteration, self.epoch)
        self.iteration += 1
        return self.params

    def get_weights(self):
        return self.params

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@ray.remote
class TextbookWorker:
    """Computes the gradient of its next minibatch at the weights it is handed."""

    def __init__(self, model, x, y, worker_id: int, num_workers: int, batch_size: int, seed: int):
        self.model = model
        self.x, self.y = x, y
        self.worker_id, self.num_workers = worker_id, num_workers
        self.batch_size, self.seed = batch_size, seed
        self.batches: list = []
        self.cursor = 0
        self.losses: list = []

    def start_epoch(self, epoch: int) -> int:
        self.batches = epoch_batches(len(self.x), self.num_workers, self.worker_id, epoch, self.seed, self.batch_size)
        self.cursor = 0
        self.losses = []
        return len(self.batches)

    def compute_gradients(self, weights):
        batch = self.batches[self.cursor]
        self.cursor += 1
        loss, grads = self.model.loss_and_grads(weights, self.x[batch], self.y[batch])
        self.losses.append((float(loss), len(batch)))
        return grads

    def epoch_report(self):
        return self.losses


def train_textbook(model, data, updater, num_workers: int = 4, epochs: int = 20, batch_size: int = 32,
                   seed: int = 0, mode: str = "async", cpus_per_actor: float | None = None,
                   params: dict | None = None, numba_threads: int | None = None) -> dict:
    """Train with the textbook PS; returns the keys of ``rayps.worker.train`` that the comparison needs.
    ``numba_threads``: the PS's numba pool (default: its CPUs, at least 1)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cpus_per_actor is None:
        total = float(ray.cluster_resources().get("CPU", 0.0))
        cpus_per_actor = min(1.0, total / (num_workers + 1)) if total else 0.0
    if numba_threads is None:
        numba_threads = max(1, int(cpus_per_actor))
    params = model.init_params(seed=seed, dtype=np.float32) if params is None else params
    x_ref, y_ref = ray.put(data.x_train), ray.put(data.y_train)
    ps = TextbookParameterServer.options(num_cpus=cpus_per_actor).remote(params, updater, numba_threads)
    workers = [TextbookWorker.options(num_cpus=cpus_per_actor).remote(model, x_ref, y_ref, w, num_workers,
                                                                      batch_size, seed)
               for w in range(num_workers)]
    started = time.perf_counter()
    history, samples = [], 0
    try:
        current_weights = ps.get_weights.remote()
        for epoch in range(epochs):
            steps = ray.get([w.start_epoch.remote(epoch) for w in workers])
            ps.set_epoch.remote(epoch)
            if mode == "sync":
                current_weights = _sync_epoch(ps, workers, current_weights, steps[0])
            else:
                current_weights = _async_epoch(ps, workers, current_weights, steps)
            weights = ray.get(current_weights)
            reports = ray.get([w.epoch_report.remote() for w in workers])
            samples += sum(n for report in reports for _, n in report)
            accuracy, test_loss = _evaluate(model, weights, data.x_test, data.y_test)
            wall = time.perf_counter() - started
            losses = [(loss, n) for report in reports for loss, n in report]
            history.append({"epoch": epoch + 1, "epochs": epochs, "test_accuracy": float(accuracy),
                            "test_loss": float(test_loss),
                            "train_loss": float(np.average([l for l, _ in losses], weights=[n for _, n in losses])),
                            "samples": samples, "samples_per_second": samples / wall, "wall_seconds": wall})
    finally:
        for actor in [ps, *workers]:
            ray.kill(actor)
    last = history[-1]
    return {"test_accuracy": last["test_accuracy"], "final_loss": last["train_loss"], "test_loss": last["test_loss"],
            "samples_per_second": last["samples_per_second"], "wall_seconds": last["wall_seconds"],
            "workers": num_workers, "mode": mode, "epochs": epochs, "history": history}


def _evaluate(model, weights, x, y) -> tuple[float, float]:
    """Test accuracy and loss as ``rayps.worker.train`` computes them (one forward pass where the model can)."""
    if hasattr(model, "accuracy_and_loss"):
        return model.accuracy_and_loss(weights, x, y)
    loss, _ = model.loss_and_grads(weights, x, y)
    return model.accuracy(weights, x, y), loss


def _sync_epoch(ps, workers, current_weights, steps: int):
    """Ray docs' synchronous loop: all workers on the same weights, one apply of all their gradients."""
    for _ in range(steps):
        gradients = [worker.compute_gradients.remote(current_weights) for worker in workers]
        current_weights = ps.apply_gradients.remote(*gradients)
    return current_weights


def _async_epoch(ps, workers, current_weights, steps: list[int]):
    """Ray docs' asynchronous loop: apply whichever gradient is ready, send that worker the new weights."""
    remaining = list(steps)
    in_flight = {}
    for index, worker in enumerate(workers):
        if remaining[index]:
            in_flight[worker.compute_gradients.remote(current_weights)] = index
            remaining[index] -= 1
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        index = in_flight.pop(ready[0])
        current_weights = ps.apply_gradients.remote(ready[0])
        if remaining[index]:
            in_flight[workers[index].compute_gradients.remote(current_weights)] = index
            remaining[index] -= 1
    return current_weights


def main(argv=None) -> int:
    from rayps.updaters.by_name import build_updater  # noqa: PLC0415
    from rayps.worker.data import load_dataset  # noqa: PLC0415
    from rayps.worker.models import build_model  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="async", choices=MODES)
    parser.add_argument("--hidden", default="128")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--updater", default="adam")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start_ray()
    data = load_dataset("digits", seed=args.seed)
    model = build_model("mlp", data.num_features, data.num_classes, hidden=args.hidden)
    result = train_textbook(model, data, build_updater(args.updater, args.learning_rate), args.workers, args.epochs,
                            args.batch_size, args.seed, args.mode)
    for row in result["history"]:
        print(f"epoch {row['epoch']:>3}  loss {row['train_loss']:.4f}  test acc {row['test_accuracy']:.4f}  "
              f"{row['samples_per_second']:,.0f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
