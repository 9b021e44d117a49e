"""Per-group updater configuration, the way DL4J sets an updater per layer.

A ``ParamGroup`` names a set of parameters (DL4J's "layer") that share one updater, one gradient
normalization and one list of regularization terms. ``ParameterUpdater`` applies a list of groups to a dict of
named arrays in DL4J's order of one step:

1. gradient normalization over the group (``normalization.py``);
2. L1/L2 before the updater; 3. the updater; 4. WeightDecay after it; 5. ``params -= update`` — steps 2-5 in one
   kernel pass per parameter (``StepAdjustments``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .base import StepAdjustments, Updater, from_config as updater_from_config
from .normalization import check_gradient_normalization, normalization_factors
from .regularization import L1, L2, WeightDecay, regularization_from_config, regularization_terms

GROUP_CONFIG_VERSION = 1


@dataclass(frozen=True)
class ParamGroup:
    """One DL4J "layer": the parameters in ``names`` (``None``: every parameter no other group names)."""

    updater: Updater
    names: tuple[str, ...] | None = None
    gradient_normalization: str = "None"
    gradient_normalization_threshold: float = 1.0
    regularization: tuple = field(default_factory=tuple)
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.updater, Updater):
            raise TypeError(f"ParamGroup {self.name!r}: updater must be a rayps.updaters.Updater, "
                            f"got {type(self.updater).__name__}")
        if self.names is not None:
            if isinstance(self.names, str) or not all(isinstance(n, str) for n in self.names):
                raise TypeError(f"ParamGroup {self.name!r}: names must be a sequence of str, got {self.names!r}")
            object.__setattr__(self, "names", tuple(self.names))
        check_gradient_normalization(self.gradient_normalization, self.gradient_normalization_threshold)
        object.__setattr__(self, "gradient_normalization_threshold", float(self.gradient_normalization_threshold))
        terms = tuple(self.regularization)
        for term in terms:
            if not isinstance(term, (L1, L2, WeightDecay)):
                raise TypeError(f"ParamGroup {self.name!r}: regularization entries must be L1, L2 or WeightDecay, "
                                f"got {type(term).__name__}")
        object.__setattr__(self, "regularization", terms)

    def adjustments(self, iteration: int, epoch: int, grad_scale: float = 1.0,
                    clip_value: float = float("inf")) -> StepAdjustments:
        """The scalars the kernel applies around this group's rule at this step."""
        lr = self.updater.learning_rate_at(iteration, epoch)
        l1, l2, decay = regularization_terms(self.regularization, lr, iteration, epoch)
        return StepAdjustments(grad_scale, clip_value, l1, l2, decay)

    def normalization_factors(self, grads: Mapping, squared_norms: Mapping | None = None):
        return normalization_factors(self.gradient_normalization, self.gradient_normalization_threshold,
                                     grads, squared_norms)

    def to_config(self) -> dict:
        return {
            "version": GROUP_CONFIG_VERSION,
            "name": self.name,
            "names": None if self.names is None else list(self.names),
            "updater": self.updater.to_config(),
            "gradient_normalization": self.gradient_normalization,
            "gradient_normalization_threshold": self.gradient_normalization_threshold,
            "regularization": [term.to_config() for term in self.regularization],
        }

    @classmethod
    def from_config(cls, config) -> "ParamGroup":
        if not isinstance(config, dict):
            raise TypeError(f"param group config must be a dict, got {type(config).__name__}")
        config = dict(config)
        version = config.pop("version", GROUP_CONFIG_VERSION)
        if version != GROUP_CONFIG_VERSION:
            raise ValueError(f"param group config: unsupported version {version!r}; expected {GROUP_CONFIG_VERSION}")
        allowed = {"name", "names", "updater", "gradient_normalization", "gradient_normalization_threshold",
                   "regularization"}
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"param group config: unknown field(s) {unknown}; expected a subset of {sorted(allowed)}")
        if "updater" not in config:
            raise ValueError("param group config: missing field 'updater'")
        config["updater"] = updater_from_config(config["updater"])
        config["regularization"] = tuple(regularization_from_config(t) for t in config.get("regularization", ()))
        if config.get("names") is not None:
            config["names"] = tuple(config["names"])
        return cls(**config)


def as_groups(updater) -> tuple[ParamGroup, ...]:
    """An ``Updater``, a ``ParamGroup`` or a sequence of ``ParamGroup``s, as a tuple of groups."""
    if isinstance(updater, Updater):
        return (ParamGroup(updater=updater, name="default"),)
    if isinstance(updater, ParamGroup):
        return (updater,)
    if isinstance(updater, Sequence) and not isinstance(updater, str) and updater:
        groups = tuple(updater)
        for group in groups:
            if not isinstance(group, ParamGroup):
                raise TypeError(f"updater: expected an Updater, a ParamGroup or a list of ParamGroup, "
                                f"found a {type(group).__name__} in the list")
        return groups
    raise TypeError(f"updater: expected an Updater, a ParamGroup or a non-empty list of ParamGroup, "
                    f"got {type(updater).__name__}")


def assign_groups(groups: Sequence[ParamGroup], names: Sequence[str]) -> dict[str, int]:
    """``name -> index of its group``; every name in exactly one group, a ``names=None`` group takes the rest."""
    owner: dict[str, int] = {}
    catch_all = [i for i, g in enumerate(groups) if g.names is None]
    if len(catch_all) > 1:
        raise ValueError("updater: at most one ParamGroup may have names=None (the group for the rest)")
    known = set(names)
    for index, group in enumerate(groups):
        for name in group.names or ():
            if name not in known:
                raise ValueError(f"updater: ParamGroup {group.name or index!r} names unknown parameter {name!r}")
            if name in owner:
                raise ValueError(f"updater: parameter {name!r} is in two groups ({owner[name]} and {index})")
            owner[name] = index
    for name in names:
        if name not in owner:
            if not catch_all:
                raise ValueError(f"updater: parameter {name!r} is in no ParamGroup (add it, or a group with names=None)")
            owner[name] = catch_all[0]
    return owner


class ParameterUpdater:
    """Applies groups of DL4J updaters to named arrays: DL4J's ``MultiLayerUpdater`` without the network.

    ``state = pu.init(params)`` then ``pu.apply(params, grads, state, iteration, epoch)`` (in place).
    """

    def __init__(self, updater, names: Sequence[str]):
        self.groups = as_groups(updater)
        self.names = tuple(names)
        self.group_of = assign_groups(self.groups, self.names)

    def init(self, params: Mapping) -> dict:
        return {name: self.groups[self.group_of[name]].updater.init(params[name]) for name in self.names}

    def apply(self, params: Mapping, grads: Mapping, state: Mapping, iteration: int, epoch: int = 0,
              kernel: str = "auto") -> None:
        unknown = sorted(set(grads) - set(self.names))
        if unknown:
            raise ValueError(f"grads: unknown parameter name(s) {unknown}")
        for name in grads:  # check every array before the first write: nothing changes when this raises
            updater = self.groups[self.group_of[name]].updater
            updater.check_step(params[name], grads[name], state[name], iteration, epoch)
            updater.select_kernel(params[name], grads[name], state[name], kernel)
        for index, group in enumerate(self.groups):
            members = {n: grads[n] for n in grads if self.group_of[n] == index}
            if not members:
                continue
            factors = group.normalization_factors(members)
            for name, g in members.items():
                adjustments = group.adjustments(iteration, epoch, *factors[name])
                group.updater.apply(params[name], g, state[name], iteration, epoch,
                                    adjustments=adjustments, kernel=kernel)
