"""DL4J's hyperparameter schedules (``org.nd4j.linalg.schedule``): ``value_at(iteration, epoch)``.

Accepted wherever DL4J accepts an ``ISchedule``: learning rate, momentum, regularization coefficients.

Most schedules take a ``schedule_type`` ("iteration" or "epoch", DL4J's ``ScheduleType``) that picks the
position ``i`` they are evaluated at; ``RampSchedule`` and ``CosineWarmupSchedule`` always use the iteration,
``FixedSchedule`` neither. The arithmetic follows DL4J's Java code operation by operation (same order, same
integer divisions), and where the code and its Javadoc disagree the code wins; each docstring says where.
Where Java's ``Math.pow``/``Math.exp`` overflow to infinity, so do these (Python's ``math`` would raise).
"""

from __future__ import annotations

import bisect
import math
from typing import Any, ClassVar

from .schedule_fields import (check_finite, check_integer, check_positive, check_schedule_type, java_exp, java_pow,
                              java_round, position_of)

SCHEDULE_CONFIG_VERSION = 1
SCHEDULE_TYPES: dict[str, type["Schedule"]] = {}


class Schedule:
    """Base of all schedules. Subclasses list their constructor fields in ``fields`` and implement ``value_at``."""

    fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        SCHEDULE_TYPES[cls.__name__] = cls

    def value_at(self, iteration: int, epoch: int) -> float:
        raise NotImplementedError

    def to_config(self) -> dict:
        config: dict[str, Any] = {"type": type(self).__name__, "version": SCHEDULE_CONFIG_VERSION}
        for name in self.fields:
            value = getattr(self, name)
            if isinstance(value, dict):  # MapSchedule: msgpack keys must be strings to round-trip everywhere
                value = {str(k): v for k, v in value.items()}
            config[name] = value
        return config

    def __eq__(self, other):
        return type(other) is type(self) and other.to_config() == self.to_config()

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.fields)
        return f"{type(self).__name__}({args})"


def from_config(config) -> Schedule:
    """Rebuild a schedule from ``to_config()``'s dict; unknown types or keys raise ValueError naming them."""
    if not isinstance(config, dict):
        raise TypeError(f"schedule config must be a dict, got {type(config).__name__}")
    config = dict(config)
    type_name = config.pop("type", None)
    if type_name not in SCHEDULE_TYPES:
        raise ValueError(f"schedule config: unknown type {type_name!r}; expected one of {sorted(SCHEDULE_TYPES)}")
    version = config.pop("version", SCHEDULE_CONFIG_VERSION)
    if version != SCHEDULE_CONFIG_VERSION:
        raise ValueError(f"schedule config: unsupported version {version!r}; expected {SCHEDULE_CONFIG_VERSION}")
    cls = SCHEDULE_TYPES[type_name]
    unknown = sorted(set(config) - set(cls.fields))
    if unknown:
        raise ValueError(f"schedule config for {type_name}: unknown field(s) {unknown}; expected {list(cls.fields)}")
    return cls(**config)


# ---------------------------------------------------------------------------------------------------------
# The schedules
# ---------------------------------------------------------------------------------------------------------


class FixedSchedule(Schedule):
    """The same value at every step. DL4J ``FixedSchedule``: :math:`v(i) = value`."""

    fields = ("value",)

    def __init__(self, value):
        self.value = check_finite("FixedSchedule", "value", value)

    def value_at(self, iteration: int, epoch: int) -> float:
        return self.value


class ExponentialSchedule(Schedule):
    r"""Exponential decay. DL4J ``ExponentialSchedule``: :math:`v(i) = v_0 \cdot \gamma^{i}`."""

    fields = ("schedule_type", "initial_value", "gamma")

    def __init__(self, schedule_type, initial_value, gamma):
        self.schedule_type = check_schedule_type("ExponentialSchedule", schedule_type)
        self.initial_value = check_finite("ExponentialSchedule", "initial_value", initial_value)
        self.gamma = check_finite("ExponentialSchedule", "gamma", gamma)

    def value_at(self, iteration: int, epoch: int) -> float:
        return self.initial_value * java_pow(self.gamma, position_of(self.schedule_type, iteration, epoch))


class StepSchedule(Schedule):
    r"""Step decay. DL4J ``StepSchedule``: :math:`v(i) = v_0 \cdot r^{\lfloor i / step \rfloor}`.

    ``decay_rate`` is :math:`r`. ``step`` is a real number > 0 (a ``double`` in DL4J, so 2.5 is allowed).
    """

    fields = ("schedule_type", "initial_value", "decay_rate", "step")

    def __init__(self, schedule_type, initial_value, decay_rate, step):
        self.schedule_type = check_schedule_type("StepSchedule", schedule_type)
        self.initial_value = check_finite("StepSchedule", "initial_value", initial_value)
        self.decay_rate = check_finite("StepSchedule", "decay_rate", decay_rate)
        self.step = check_positive("StepSchedule", "step", step)

    def value_at(self, iteration: int, epoch: int) -> float:
        i = position_of(self.schedule_type, iteration, epoch)
        return self.initial_value * java_pow(self.decay_rate, math.floor(i / self.step))


class InverseSchedule(Schedule):
    r"""Inverse decay. DL4J ``InverseSchedule``: :math:`v(i) = v_0 / (1 + \gamma i)^{p}`.

    (The Javadoc's :math:`v_0 (1 + \gamma i)^{-p}` is the same.) ``gamma`` must be >= 0 here, so the base
    stays >= 1; DL4J does not check, and a negative ``gamma`` gives NaN there once :math:`1 + \gamma i < 0`.
    """

    fields = ("schedule_type", "initial_value", "gamma", "power")

    def __init__(self, schedule_type, initial_value, gamma, power):
        self.schedule_type = check_schedule_type("InverseSchedule", schedule_type)
        self.initial_value = check_finite("InverseSchedule", "initial_value", initial_value)
        self.gamma = check_finite("InverseSchedule", "gamma", gamma)
        if self.gamma < 0:
            raise ValueError(f"InverseSchedule: gamma must be >= 0, got {gamma!r}")
        self.power = check_finite("InverseSchedule", "power", power)

    def value_at(self, iteration: int, epoch: int) -> float:
        i = position_of(self.schedule_type, iteration, epoch)
        return self.initial_value / java_pow(1 + self.gamma * i, self.power)


class PolySchedule(Schedule):
    r"""Polynomial schedule. DL4J ``PolySchedule``, as its code computes it:

    .. math:: v(i) = v_0 \cdot (1 + i / maxIter)^{p} \quad (i < maxIter), \qquad v(i) = 0 \quad (i \ge maxIter)

    The Javadoc says :math:`(1 + i/maxIter)^{-p}`; the code (``Math.pow(1 + i/(double)maxIter, power)``)
    has no minus sign, and the code wins: with ``power > 0`` the value *grows* towards :math:`v_0 2^{p}`
    before dropping to 0 at ``max_iter``; pass a negative ``power`` for the Javadoc's decay.
    """

    fields = ("schedule_type", "initial_value", "power", "max_iter")

    def __init__(self, schedule_type, initial_value, power, max_iter):
        self.schedule_type = check_schedule_type("PolySchedule", schedule_type)
        self.initial_value = check_finite("PolySchedule", "initial_value", initial_value)
        self.power = check_finite("PolySchedule", "power", power)
        self.max_iter = check_integer("PolySchedule", "max_iter", max_iter, minimum=1)

    def value_at(self, iteration: int, epoch: int) -> float:
        i = position_of(self.schedule_type, iteration, epoch)
        if i >= self.max_iter:
            return 0.0
        return self.initial_value * java_pow(1 + i / self.max_iter, self.power)


class SigmoidSchedule(Schedule):
    r"""Sigmoid schedule. DL4J ``SigmoidSchedule``: :math:`v(i) = v_0 / (1 + e^{-\gamma (i - stepSize)})`.

    ``step_size`` is the integer position of the midpoint (:math:`v_0 / 2`), >= 0 here.
    """

    fields = ("schedule_type", "initial_value", "gamma", "step_size")

    def __init__(self, schedule_type, initial_value, gamma, step_size):
        self.schedule_type = check_schedule_type("SigmoidSchedule", schedule_type)
        self.initial_value = check_finite("SigmoidSchedule", "initial_value", initial_value)
        self.gamma = check_finite("SigmoidSchedule", "gamma", gamma)
        self.step_size = check_integer("SigmoidSchedule", "step_size", step_size, minimum=0)

    def value_at(self, iteration: int, epoch: int) -> float:
        i = position_of(self.schedule_type, iteration, epoch)
        return self.initial_value / (1.0 + java_exp(-self.gamma * (i - self.step_size)))


class MapSchedule(Schedule):
    """Piecewise constant. DL4J ``MapSchedule``: :math:`v(i) = values[k]`, ``k`` the largest key <= ``i``.

    ``values`` maps integer positions >= 0 to numbers and must contain key 0 (the initial value). Keys may
    also be decimal strings ("10"), which is how ``to_config`` writes them for msgpack.
    """

    fields = ("schedule_type", "values")

    def __init__(self, schedule_type, values):
        self.schedule_type = check_schedule_type("MapSchedule", schedule_type)
        if not isinstance(values, dict):
            raise TypeError(f"MapSchedule: values must be a dict {{position: value}}, got {type(values).__name__}")
        parsed: dict[int, float] = {}
        for key, value in values.items():
            position = self._position_key(key)
            if position in parsed:
                raise ValueError(f"MapSchedule: values key {key!r} repeats position {position}")
            parsed[position] = check_finite("MapSchedule", f"values[{position}]", value)
        if 0 not in parsed:
            raise ValueError(f"MapSchedule: values must contain key 0 (the initial value), got keys {sorted(parsed)}")
        self.values = dict(sorted(parsed.items()))
        self._keys = list(self.values)

    @staticmethod
    def _position_key(key) -> int:
        if isinstance(key, str):
            try:
                key = int(key)
            except ValueError:
                raise ValueError(f"MapSchedule: values keys must be integers >= 0, got {key!r}") from None
        return check_integer("MapSchedule", f"values key {key!r}", key, minimum=0)

    def value_at(self, iteration: int, epoch: int) -> float:
        i = position_of(self.schedule_type, iteration, epoch)
        return self.values[self._keys[bisect.bisect_right(self._keys, i) - 1]]


class CycleSchedule(Schedule):
    r"""DL4J ``CycleSchedule``: the 1cycle policy (Smith 2018, arXiv:1803.09820), repeating every cycle.

    With ``step_size = (cycle_length - annealing_length) // 2``, ``increment = (max - initial) / step_size``
    and ``p = i mod cycle_length``::

        p < step_size       : initial + increment * p                        (linear up to max)
        p < 2 * step_size   : max - increment * (p - step_size)              (linear back down)
        otherwise           : initial * decay ** (annealing_length - (cycle_length - p))   (annealing)

    The annealing exponent is ``p - (cycle_length - annealing_length)``; when ``cycle_length -
    annealing_length`` is odd, position ``2 * step_size`` falls one before the annealing period and DL4J's
    code gives it ``initial / decay`` (exponent -1). That is reproduced, not fixed.

    DL4J's short form ``CycleSchedule(scheduleType, maxLearningRate, cycleLength)`` is
    :meth:`from_max_learning_rate`: initial = ``max * 0.1``, annealing_length = ``Math.round(cycle_length *
    0.1)`` (halves up), annealing_decay = 0.1. ``initial_learning_rate > max_learning_rate`` raises, as in
    current DL4J; ``step_size`` must be >= 1 (DL4J would divide by zero).
    """

    fields = ("schedule_type", "initial_learning_rate", "max_learning_rate", "cycle_length", "annealing_length",
              "annealing_decay")

    def __init__(self, schedule_type, initial_learning_rate, max_learning_rate, cycle_length, annealing_length,
                 annealing_decay):
        owner = "CycleSchedule"
        self.schedule_type = check_schedule_type(owner, schedule_type)
        self.initial_learning_rate = check_finite(owner, "initial_learning_rate", initial_learning_rate)
        self.max_learning_rate = check_finite(owner, "max_learning_rate", max_learning_rate)
        if self.initial_learning_rate > self.max_learning_rate:
            raise ValueError(f"{owner}: initial_learning_rate must be <= max_learning_rate "
                             f"({max_learning_rate!r}), got {initial_learning_rate!r}")
        self.cycle_length = check_integer(owner, "cycle_length", cycle_length, minimum=1)
        self.annealing_length = check_integer(owner, "annealing_length", annealing_length, minimum=0)
        if self.cycle_length - self.annealing_length < 2:
            raise ValueError(f"{owner}: annealing_length must be <= cycle_length - 2 so that step_size = "
                             f"(cycle_length - annealing_length) // 2 >= 1, got annealing_length="
                             f"{self.annealing_length} with cycle_length={self.cycle_length}")
        self.annealing_decay = check_positive(owner, "annealing_decay", annealing_decay)
        self.step_size = (self.cycle_length - self.annealing_length) // 2
        self.increment = (self.max_learning_rate - self.initial_learning_rate) / self.step_size

    @classmethod
    def from_max_learning_rate(cls, schedule_type, max_learning_rate, cycle_length) -> "CycleSchedule":
        """DL4J's three-argument constructor: initial 0.1 * max, annealing round(0.1 * cycle), decay 0.1."""
        max_learning_rate = check_finite("CycleSchedule", "max_learning_rate", max_learning_rate)
        cycle_length = check_integer("CycleSchedule", "cycle_length", cycle_length, minimum=1)
        return cls(schedule_type, max_learning_rate * 0.1, max_learning_rate, cycle_length,
                   java_round(cycle_length * 0.1), 0.1)

    def value_at(self, iteration: int, epoch: int) -> float:
        p = position_of(self.schedule_type, iteration, epoch) % self.cycle_length
        if p < self.step_size:
            return self.initial_learning_rate + self.increment * p
        if p < 2 * self.step_size:
            return self.max_learning_rate - self.increment * (p - self.step_size)
        exponent = self.annealing_length - (self.cycle_length - p)
        return self.initial_learning_rate * java_pow(self.annealing_decay, exponent)


class RampSchedule(Schedule):
    r"""Linear warm-up in front of another schedule. DL4J ``RampSchedule``:

    .. math:: v = \frac{iteration + 1}{numIter} \cdot base(iteration, epoch) \quad (iteration < numIter - 1),
              \qquad v = base(iteration, epoch) \quad \text{otherwise}

    The ramp always counts iterations, whatever the base schedule's ``schedule_type``. ``base_schedule`` is
    a :class:`Schedule` or its config dict; ``to_config`` nests the base's config as a dict.
    """

    fields = ("base_schedule", "num_iter")

    def __init__(self, base_schedule, num_iter):
        if isinstance(base_schedule, dict):
            base_schedule = from_config(base_schedule)
        if not isinstance(base_schedule, Schedule):
            raise TypeError(f"RampSchedule: base_schedule must be a Schedule or a schedule config dict, "
                            f"got {type(base_schedule).__name__} {base_schedule!r}")
        self.base_schedule = base_schedule
        self.num_iter = check_integer("RampSchedule", "num_iter", num_iter, minimum=1)

    def to_config(self) -> dict:
        config = super().to_config()
        config["base_schedule"] = self.base_schedule.to_config()
        return config

    def value_at(self, iteration: int, epoch: int) -> float:
        base = self.base_schedule.value_at(iteration, epoch)
        if iteration >= self.num_iter - 1:
            return base
        return (iteration + 1) / self.num_iter * base


class CosineWarmupSchedule(Schedule):
    r"""Linear warm-up from 0, then cosine annealing. DL4J ``CosineWarmupSchedule``; counts iterations only::

        iteration <  warmup_steps : max_lr * (iteration / warmup_steps)
        iteration >= total_steps  : min_lr
        otherwise                 : min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * progress)),
                                    progress = (iteration - warmup_steps) / (total_steps - warmup_steps)

    The warm-up starts at 0 (not ``min_lr``) and reaches ``max_lr`` at ``iteration == warmup_steps``. DL4J's
    three-argument constructor ``(maxLR, warmupSteps, totalSteps)`` is ``min_lr=0.0``; its ``fromRatio`` is
    :meth:`from_ratio`. Here ``0 <= warmup_steps <= total_steps`` (DL4J does not check).
    """

    fields = ("max_lr", "min_lr", "warmup_steps", "total_steps")

    def __init__(self, max_lr, min_lr, warmup_steps, total_steps):
        owner = "CosineWarmupSchedule"
        self.max_lr = check_finite(owner, "max_lr", max_lr)
        self.min_lr = check_finite(owner, "min_lr", min_lr)
        self.warmup_steps = check_integer(owner, "warmup_steps", warmup_steps, minimum=0)
        self.total_steps = check_integer(owner, "total_steps", total_steps, minimum=0)
        if self.total_steps < self.warmup_steps:
            raise ValueError(f"{owner}: total_steps must be >= warmup_steps ({self.warmup_steps}), "
                             f"got {self.total_steps}")

    @classmethod
    def from_ratio(cls, max_lr, min_lr, warmup_ratio, total_steps) -> "CosineWarmupSchedule":
        """DL4J's ``fromRatio``: ``warmup_steps = int(warmup_ratio * total_steps)`` (truncated), ratio in [0, 1]."""
        ratio = check_finite("CosineWarmupSchedule", "warmup_ratio", warmup_ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"CosineWarmupSchedule: warmup_ratio must be in [0, 1], got {warmup_ratio!r}")
        total_steps = check_integer("CosineWarmupSchedule", "total_steps", total_steps, minimum=0)
        return cls(max_lr, min_lr, int(ratio * total_steps), total_steps)

    def value_at(self, iteration: int, epoch: int) -> float:
        if iteration < self.warmup_steps:
            return self.max_lr * (iteration / self.warmup_steps)
        if iteration >= self.total_steps:
            return self.min_lr
        progress = (iteration - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
