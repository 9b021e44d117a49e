"""rayps.worker: data partitions, models and gradient functions, the worker loop and worker actors."""

from .data import Dataset, iterate_minibatches, load_dataset, partition_indices
from .loop import EpochReport, WorkerLoop, epoch_batches
from .models import MLP, SoftmaxRegression, build_model, grad_fn_for


def __getattr__(name):  # Ray is imported only when a run is started
    if name in ("train", "RESULT_KEYS"):
        from . import training as train_module

        return getattr(train_module, name)
    if name == "RESULT_FIELDS":  # the fields of a run's result: README, "The result of a run"
        from .epochs import RESULT_FIELDS

        return RESULT_FIELDS
    if name == "WorkerActor":
        from .actor import WorkerActor

        return WorkerActor
    raise AttributeError(name)


__all__ = ["MLP", "RESULT_FIELDS", "RESULT_KEYS", "Dataset", "EpochReport", "SoftmaxRegression", "WorkerActor",
           "WorkerLoop", "build_model", "epoch_batches", "grad_fn_for", "iterate_minibatches", "load_dataset",
           "partition_indices", "train"]
