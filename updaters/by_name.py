"""Updaters by flag name, as ``rayps train --updater NAME`` and the benchmarks ask for them.

``UPDATERS_BY_FLAG``: every rule of ``ALL_UPDATERS`` under its class name in lower case. ``build_updater``: the
rule with the learning rate the demos start from (``DEFAULT_LEARNING_RATES``, tuned on digits; a rule not listed
there starts from its DL4J default), optionally decayed per epoch.
"""

from __future__ import annotations

from .base import Updater
from .rules import ALL_UPDATERS
from .schedules import ExponentialSchedule

UPDATERS_BY_FLAG = {cls.__name__.lower(): cls for cls in ALL_UPDATERS}
DEFAULT_LEARNING_RATES = {"sgd": 0.1, "nesterovs": 0.05, "adagrad": 0.05, "rmsprop": 0.001, "adam": 0.005,
                          "adamax": 0.005, "nadam": 0.005, "amsgrad": 0.005, "adabelief": 0.005}


def build_updater(name: str, learning_rate: float | None = None, lr_decay: float = 1.0) -> Updater:
    """The updater called ``name``; with ``lr_decay`` < 1 its learning rate is DL4J's
    ``ExponentialSchedule(EPOCH, lr, gamma)``: ``lr * gamma^epoch`` (async noise settles as the rate falls).

    ValueError naming the field: an unknown ``name``, or a ``learning_rate`` for a rule without one (AdaDelta,
    NoOp)."""
    if name not in UPDATERS_BY_FLAG:
        raise ValueError(f"name: unknown updater {name!r}; expected one of {sorted(UPDATERS_BY_FLAG)}")
    cls = UPDATERS_BY_FLAG[name]
    if "learning_rate" not in cls.defaults:
        if learning_rate is not None:
            raise ValueError(f"learning_rate: {cls.__name__} has no learning rate")
        return cls()
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATES.get(name, cls.defaults["learning_rate"])
    if lr_decay < 1.0:
        learning_rate = ExponentialSchedule("epoch", initial_value=learning_rate, gamma=lr_decay)
    return cls(learning_rate=learning_rate)
