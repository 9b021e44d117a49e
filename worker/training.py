"""``train``: the Python entry point of a training run (the ``rayps train`` CLI is built on it).

    result = train(ps, model, data, num_workers=4, epochs=20, batch_size=32)

``data`` is a ``Dataset`` (in memory: ``load_dataset``, ``Dataset.from_arrays``) or a ``ray.data.Dataset``
(each worker streams its own split: worker/streams.py; ``label_column``, ``feature_columns``, ``eval_data``).
``model`` is a rayps model (``build_model``), a ``TorchModule``, or a plain ``grad_fn(params, batch) ->
(loss, grads)``. After each epoch the test set is evaluated: classification reports accuracy and loss,
regression (float labels) the loss (``test_accuracy`` is None); a bare ``grad_fn``'s test loss is its own loss
on the test set (pass ``evaluate(params) -> (accuracy, loss)`` for more).
The parameters a gradient function gets are read-only (views of the buffers the server sent, where the server
offers that: ``ParameterServer.pull(copy=False)``): it must not write into them.
Returns the result dict of every run (worker/epochs.py; its fields are documented once, in the README's "The
result of a run"), the same as ``rayps train --json-out``.
"""

from __future__ import annotations

import math
from typing import Callable

from .actor import WorkerActor, start_workers
from .data import Dataset
from .epochs import RESULT_FIELDS, check_run_args, drive_epochs, in_memory_data, run_result
from .loop import accepts_copy
from .models import grad_fn_for
from .streams import StreamSource, StreamWorkerActor, is_ray_dataset

RESULT_KEYS = RESULT_FIELDS  # every field of a run's result (README: "The result of a run")


def _model_parts(model) -> tuple[Callable, Callable | None]:
    if hasattr(model, "accuracy_and_loss"):  # the built-in models: one forward pass
        return grad_fn_for(model), model.accuracy_and_loss
    if hasattr(model, "loss_and_grads"):
        def evaluate(params, x, y):
            loss, _ = model.loss_and_grads(params, x, y)
            return model.accuracy(params, x, y), loss
        return grad_fn_for(model), evaluate
    if callable(model):
        return model, None
    raise TypeError(f"model must be a rayps model, a TorchModule or a grad_fn(params, batch), "
                    f"got {type(model).__name__}")


def _evaluator(model_evaluate, grad_fn, model, classification: bool, test) -> Callable:
    """``params -> (accuracy or None, loss)`` on the test arrays (``(nan, nan)`` without a test set)."""
    if test is None:
        return lambda params: (math.nan if classification else None, math.nan)
    x, y = test
    if classification and model_evaluate is not None:
        return lambda params: model_evaluate(params, x, y)
    if hasattr(model, "loss_and_grads"):
        return lambda params: (None, model.loss_and_grads(params, x, y)[0])
    return lambda params: (math.nan if classification else None, grad_fn(params, (x, y))[0])


def train(ps, model, data, num_workers: int = 4, epochs: int = 20, batch_size: int = 32, seed: int = 0,
          n_fetch: int = 1, n_push: int = 1, cpus_per_worker: float = 0.0, evaluate=None,
          progress: Callable[[dict], None] | None = None, first_epoch: int = 0,
          on_epoch_end: Callable[[int, object], None] | None = None, max_worker_restarts: int = 3,
          placement=None, prefetch: bool = False, eval_data=None, label_column: str = "label",
          feature_columns=None) -> dict:
    """Run epochs ``first_epoch .. epochs-1`` with ``num_workers`` worker actors against ``ps``; evaluate after
    each epoch (``on_epoch_end(epoch, ps)`` runs then, e.g. to save a checkpoint). A worker that dies is
    restarted by Ray (up to ``max_worker_restarts`` times) and resumes its partition; an error raised by the
    gradient function stops the run and is raised here. ``prefetch``: each worker's server calls run on a
    background thread while it computes its next gradient, one step staler (``worker/loop.py``).

    A ``ray.data.Dataset`` ``data``: ``label_column`` (default ``label``) and ``feature_columns`` (default: the
    other numeric columns) pick the columns; ``eval_data`` (a Ray Dataset, a ``Dataset`` or ``(x, y)``) is
    the test set. A worker that dies skips the rest of its split for that epoch, and the result says how many
    rows (worker/streams.py). The result: the README's "The result of a run" (``task`` is ``classification``
    or ``regression``; the table fields are None)."""
    check_run_args(num_workers, epochs, batch_size, first_epoch)
    if not isinstance(prefetch, bool):
        raise ValueError(f"prefetch must be True or False, got {prefetch!r}")
    grad_fn, model_evaluate = _model_parts(model)
    user_evaluate = evaluate
    stream = None
    data_refs = None  # (ps, [x_ref], [y_ref]) or (ps, splits, None), handed to the workers with each run_epoch
    if is_ray_dataset(data):
        stream = StreamSource(data, num_workers, batch_size, label_column, feature_columns)
        test, classification = stream.eval_arrays(eval_data), stream.classification
        dataset, data_rows, dropped = "ray.data", stream.rows, stream.dropped_per_epoch
        data_refs = (ps, stream.splits, None)  # each worker reads its own split
        workers = start_workers(StreamWorkerActor, num_workers, cpus_per_worker, max_worker_restarts, placement,
                                lambda w: (None, grad_fn, None, stream.columns, w, num_workers, batch_size,
                                           stream.split_rows, n_fetch, n_push, first_epoch, prefetch))
    elif isinstance(data, Dataset):
        check_run_args(num_workers, epochs, batch_size, first_epoch, num_train=data.num_train)
        test = (data.x_test, data.y_test) if eval_data is None else (eval_data.x_test, eval_data.y_test) \
            if isinstance(eval_data, Dataset) else tuple(eval_data)
        classification = data.is_classification
        dataset, data_rows, dropped = data.name, data.num_train, 0  # every partition covers its samples
        data_refs = in_memory_data(ps, data.x_train, data.y_train)
        workers = start_workers(WorkerActor, num_workers, cpus_per_worker, max_worker_restarts, placement,
                                lambda w: (None, grad_fn, None, None, w, num_workers, batch_size, seed, n_fetch,
                                           n_push, first_epoch, prefetch))
    else:
        raise TypeError(f"data must be a rayps Dataset (load_dataset, Dataset.from_arrays) or a ray.data.Dataset, "
                        f"got {type(data).__name__}")
    evaluate = evaluate or _evaluator(model_evaluate, grad_fn, model, classification, test)
    # the built-in evaluation only reads the parameters: read-only views, no copy (a user's evaluate gets its own)
    read_only = {"copy": False} if user_evaluate is None and accepts_copy(ps.pull) else {}

    def metrics(server) -> dict:
        accuracy, test_loss = evaluate(server.pull(**read_only))
        return {"test_accuracy": accuracy, "test_loss": test_loss}

    run = drive_epochs(ps, workers, epochs=epochs, evaluate=metrics, first_epoch=first_epoch, data=data_refs,
                       resume_flag=stream is not None, max_worker_restarts=max_worker_restarts,
                       on_epoch_end=on_epoch_end, progress=progress)
    return run_result(ps, run, task="classification" if classification else "regression", dataset=dataset,
                      num_workers=num_workers, epochs=epochs, first_epoch=first_epoch, data_rows=data_rows,
                      data_rows_dropped_per_epoch=dropped)
