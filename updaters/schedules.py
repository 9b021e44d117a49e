"""DL4J's hyperparameter schedules (``org.nd4j.linalg.schedule``): ``value_at(iteration, epoch)``.

Accepted wherever DL4J accepts an ``ISchedule``: learning rate, momentum, regularization coefficients.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

SCHEDULE_CONFIG_VERSION = 1
SCHEDULE_TYPES: dict[str, type["Schedule"]] = {}
SCHEDULE_TYPE_CHOICES = ("iteration", "epoch")


class Schedule:
    """Base of all schedules. Subclasses list their constructor fields in ``fields`` and implement ``_value``."""

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


def _finite(owner: str, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {field} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {field} must be finite, got {value}")
    return value
