"""Optimization paths of the eleven rayps updaters on two 2-D test functions (pure logic, no matplotlib).

``trajectory`` runs the real updater (``u.init`` then ``u.apply(..., kernel="reference")`` on a float64
2-vector), so the paths show ND4J's math as rayps codes it, quirks included.

The two objectives:

* ``QUADRATIC``: ``f(x, y) = 0.5 * (x^2 + 20 * y^2)``, minimum at (0, 0). Curvatures 1 and 20 (condition number
  20): plain gradient descent zig-zags across the narrow y direction unless ``lr < 2/20``.
* ``ROSENBROCK``: ``f(x, y) = (1 - x)^2 + 100 * (y - x^2)^2`` (a=1, b=100), minimum at (1, 1), classic start
  (-1.2, 1). A curved, flat-bottomed valley; the largest curvature near the minimum is about 1000, so Sgd and
  Nesterovs need ``lr ~ 1e-3``.

``LEARNING_RATES`` holds the learning rate of each updater on each function (every other hyperparameter is the
DL4J default). They were chosen so that each rule shows its character within ``DEFAULT_STEPS`` steps, using the
DL4J default where it works (RmsProp 0.1 on the quadratic, Sgd 1e-3 on Rosenbrock). AdaDelta has no learning
rate and NoOp never moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rayps.updaters import ALL_UPDATERS, Updater

DEFAULT_STEPS = 1000

UPDATER_CLASSES: dict[str, type[Updater]] = {cls.__name__: cls for cls in ALL_UPDATERS}


@dataclass(frozen=True)
class Objective:
    """A 2-D test function with its analytic gradient and where to start and look."""

    name: str
    formula: str  # for plot titles
    value: Callable  # f(x, y), elementwise over arrays (contours)
    gradient: Callable  # grad f at a (2,) array -> (2,) array
    start: tuple[float, float]
    minimum: tuple[float, float]
    x_range: tuple[float, float]  # a view that holds every path of LEARNING_RATES from start
    y_range: tuple[float, float]


QUADRATIC_CURVATURE_Y = 20.0


def quadratic_value(x, y):
    return 0.5 * (x * x + QUADRATIC_CURVATURE_Y * y * y)


def quadratic_gradient(p):
    x, y = p
    return np.array([x, QUADRATIC_CURVATURE_Y * y], dtype=np.float64)


ROSENBROCK_A = 1.0
ROSENBROCK_B = 100.0


def rosenbrock_value(x, y):
    return (ROSENBROCK_A - x) ** 2 + ROSENBROCK_B * (y - x * x) ** 2


def rosenbrock_gradient(p):
    x, y = p
    return np.array([-2.0 * (ROSENBROCK_A - x) - 4.0 * ROSENBROCK_B * x * (y - x * x),
                     2.0 * ROSENBROCK_B * (y - x * x)], dtype=np.float64)


QUADRATIC = Objective(
    name="quadratic",
    formula=r"$f = \frac{1}{2}(x^2 + 20\,y^2)$",
    value=quadratic_value,
    gradient=quadratic_gradient,
    start=(-4.0, 1.5),
    minimum=(0.0, 0.0),
    x_range=(-4.5, 1.5),
    y_range=(-1.4, 1.9),
)

ROSENBROCK = Objective(
    name="rosenbrock",
    formula=r"$f = (1 - x)^2 + 100\,(y - x^2)^2$",
    value=rosenbrock_value,
    gradient=rosenbrock_gradient,
    start=(-1.2, 1.0),
    minimum=(ROSENBROCK_A, ROSENBROCK_A ** 2),
    x_range=(-1.5, 1.45),
    y_range=(-0.35, 1.75),
)

OBJECTIVES: dict[str, Objective] = {objective.name: objective for objective in (QUADRATIC, ROSENBROCK)}

# Learning rate per objective and updater, chosen for the pictures; None: the rule has no learning rate (AdaDelta,
# NoOp).
LEARNING_RATES: dict[str, dict[str, float | None]] = {
    "quadratic": {
        "Sgd": 0.09,  # just under the stability limit 2/20: y zig-zags (factor -0.8 per step), x crawls
        "Nesterovs": 0.02,  # momentum 0.9; the DL4J default 0.1 diverges here (lr * 20 > 1.36)
        "AdaGrad": 0.5,  # steps shrink as the squared gradients accumulate
        "RmsProp": 0.1,  # DL4J default: sign-like steps, then hovers around the minimum (no decay of lr)
        "AdaDelta": None,  # no learning rate: starts with steps ~ sqrt(eps) and speeds up
        "Adam": 0.2,
        "AdaMax": 0.2,
        "Nadam": 0.02,  # ND4J does not bias-correct v: the first step is ~60 * lr in each coordinate
        "AMSGrad": 0.2,
        "AdaBelief": 0.2,
        "NoOp": None,
    },
    "rosenbrock": {
        "Sgd": 1e-3,  # DL4J default; crawls along the valley floor
        "Nesterovs": 1e-3,  # momentum 0.9 (DL4J default); lr 0.1 diverges
        "AdaGrad": 0.5,
        "RmsProp": 0.01,
        "AdaDelta": None,
        "Adam": 0.05,
        "AdaMax": 0.1,
        "Nadam": 0.01,
        "AMSGrad": 0.05,
        "AdaBelief": 0.05,
        "NoOp": None,
    },
}


def _objective(objective) -> Objective:
    if isinstance(objective, Objective):
        return objective
    if objective in OBJECTIVES:
        return OBJECTIVES[objective]
    raise ValueError(f"objective must be an Objective or one of {sorted(OBJECTIVES)}, got {objective!r}")


def make_updater(name: str, objective) -> Updater:
    """The updater ``name`` with the learning rate ``LEARNING_RATES`` gives it on ``objective`` (a rule not listed
    there: its DL4J default)."""
    objective = _objective(objective)
    if name not in UPDATER_CLASSES:
        raise ValueError(f"updater must be one of {sorted(UPDATER_CLASSES)}, got {name!r}")
    cls = UPDATER_CLASSES[name]
    if "learning_rate" not in cls.defaults:
        return cls()
    return cls(learning_rate=LEARNING_RATES[objective.name].get(name, cls.defaults["learning_rate"]))


def trajectory(updater: Updater, function, start, steps: int) -> np.ndarray:
    """The points visited by ``updater`` minimizing ``function`` from ``start``: shape ``(steps + 1, 2)``.

    Row 0 is ``start``; row ``i + 1`` is the point after ``u.apply(params, grad f(params), state, i,
    kernel="reference")``. Diverging paths are returned as they are (possibly inf/NaN).
    """
    function = _objective(function)
    if not isinstance(updater, Updater):
        raise TypeError(f"updater must be a rayps.updaters.Updater, got {type(updater).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    params = np.array(start, dtype=np.float64)
    if params.shape != (2,):
        raise ValueError(f"start must be a point (x, y), got shape {params.shape}")
    state = updater.init(params)
    path = np.empty((steps + 1, 2), dtype=np.float64)
    path[0] = params
    with np.errstate(over="ignore", invalid="ignore"):
        for iteration in range(steps):
            updater.apply(params, function.gradient(params), state, iteration, kernel="reference")
            path[iteration + 1] = params
    return path


def updater_paths(function, steps: int = DEFAULT_STEPS) -> dict[str, np.ndarray]:
    """``{updater name: trajectory}`` for every updater (``ALL_UPDATERS`` order) from ``function.start``."""
    function = _objective(function)
    return {name: trajectory(make_updater(name, function), function, function.start, steps)
            for name in UPDATER_CLASSES}
