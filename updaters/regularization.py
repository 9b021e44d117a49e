"""DL4J regularization: L1 and L2 act on the gradient BEFORE the updater, WeightDecay on the update AFTER it.

Sources: ``org.nd4j.linalg.learning.regularization.{L1Regularization, L2Regularization, WeightDecay}``.
Coefficients may be schedules (``ISchedule`` in DL4J).

* ``L1(l1)``:            ``g += l1 * sign(w)``                       (ApplyStep.BEFORE_UPDATER)
* ``L2(l2)``:            ``g += l2 * w``                             (ApplyStep.BEFORE_UPDATER)
* ``WeightDecay(coeff, apply_lr=True)``: ``update += coeff * (lr if apply_lr else 1) * w``  (POST_UPDATER),
  ``lr`` being the updater's learning rate at this step, 1 for rules that have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import schedules as _schedules
from .base import check_non_negative, resolve


def _coefficient(owner: str, value):
    return check_non_negative(owner, "coefficient", value, schedulable=True)


def _config_value(value):
    return value.to_config() if isinstance(value, _schedules.Schedule) else value


@dataclass(frozen=True)
class L1:
    """``g += coefficient * sign(w)`` before the updater."""

    coefficient: Any

    def __post_init__(self):
        object.__setattr__(self, "coefficient", _coefficient("L1", self.coefficient))

    def to_config(self) -> dict:
        return {"type": "L1", "coefficient": _config_value(self.coefficient)}


@dataclass(frozen=True)
class L2:
    """``g += coefficient * w`` before the updater."""

    coefficient: Any

    def __post_init__(self):
        object.__setattr__(self, "coefficient", _coefficient("L2", self.coefficient))

    def to_config(self) -> dict:
        return {"type": "L2", "coefficient": _config_value(self.coefficient)}


@dataclass(frozen=True)
class WeightDecay:
    """``update += coefficient * (lr if apply_lr else 1) * w`` after the updater (DL4J ``WeightDecay``)."""

    coefficient: Any
    apply_lr: bool = True

    def __post_init__(self):
        object.__setattr__(self, "coefficient", _coefficient("WeightDecay", self.coefficient))
        if not isinstance(self.apply_lr, bool):
            raise TypeError(f"WeightDecay: apply_lr must be a bool, got {type(self.apply_lr).__name__}")

    def to_config(self) -> dict:
        return {"type": "WeightDecay", "coefficient": _config_value(self.coefficient), "apply_lr": self.apply_lr}


REGULARIZATION_TYPES = {"L1": L1, "L2": L2, "WeightDecay": WeightDecay}


def regularization_from_config(config) -> L1 | L2 | WeightDecay:
    if not isinstance(config, dict):
        raise TypeError(f"regularization config must be a dict, got {type(config).__name__}")
    config = dict(config)
    type_name = config.pop("type", None)
    if type_name not in REGULARIZATION_TYPES:
        raise ValueError(f"regularization config: unknown type {type_name!r}; expected one of "
                         f"{sorted(REGULARIZATION_TYPES)}")
    allowed = {"coefficient", "apply_lr"} if type_name == "WeightDecay" else {"coefficient"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"regularization config for {type_name}: unknown field(s) {unknown}")
    if isinstance(config.get("coefficient"), dict):
        config["coefficient"] = _schedules.from_config(config["coefficient"])
    return REGULARIZATION_TYPES[type_name](**config)


def regularization_terms(regularization, learning_rate: float, iteration: int, epoch: int) -> tuple[float, float, float]:
    """``(l1, l2, weight_decay)`` scalars for one step; several terms of one kind add up."""
    l1 = l2 = decay = 0.0
    for term in regularization:
        coefficient = resolve(term.coefficient, iteration, epoch)
        if isinstance(term, L1):
            l1 += coefficient
        elif isinstance(term, L2):
            l2 += coefficient
        else:
            decay += coefficient * (learning_rate if term.apply_lr else 1.0)
    return l1, l2, decay
