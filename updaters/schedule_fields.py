"""What DL4J's schedules (updaters/schedules.py) are checked and computed with: argument checks, each naming the
schedule class and the field; the position a schedule is evaluated at; and Java's float arithmetic where it
differs from Python's (``Math.pow``/``Math.exp`` overflow to infinity, ``Math.round`` rounds halves up).
"""

from __future__ import annotations

import math
import numbers

SCHEDULE_TYPE_CHOICES = ("iteration", "epoch")


def check_finite(owner: str, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {field} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {field} must be finite, got {value}")
    return value


def check_integer(owner: str, field: str, value, minimum: int | None = None) -> int:
    """An int field of DL4J's (``int maxIter``...): integers only (not bool, not 10.0), optionally >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {field} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {field} must be >= {minimum}, got {value}")
    return value


def check_positive(owner: str, field: str, value) -> float:
    number = check_finite(owner, field, value)
    if number <= 0:
        raise ValueError(f"{owner}: {field} must be > 0, got {value!r}")
    return number


def check_schedule_type(owner: str, value) -> str:
    if not isinstance(value, str) or value not in SCHEDULE_TYPE_CHOICES:
        raise ValueError(f"{owner}: schedule_type must be one of {SCHEDULE_TYPE_CHOICES}, got {value!r}")
    return value


def position_of(schedule_type: str, iteration: int, epoch: int) -> int:
    """DL4J's ``i = (scheduleType == ITERATION ? iteration : epoch)``."""
    return iteration if schedule_type == "iteration" else epoch


def java_pow(base: float, exponent: float) -> float:
    """``Math.pow``: overflow gives +-infinity instead of Python's OverflowError."""
    try:
        return math.pow(base, exponent)
    except OverflowError:
        negative = base < 0 and float(exponent).is_integer() and exponent % 2 == 1
        return -math.inf if negative else math.inf


def java_exp(x: float) -> float:
    """``Math.exp``: overflow gives infinity instead of Python's OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def java_round(x: float) -> int:
    """``Math.round``: nearest integer, halves up (Python's ``round`` sends 2.5 to 2; Java to 3)."""
    floor = math.floor(x)
    return int(floor) + (1 if x - floor >= 0.5 else 0)
